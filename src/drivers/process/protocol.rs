//! The driver protocol's messages: JSON lines to and from a driver (docs/PROTOCOL.md 15).
//!
//! Pure encoding and parsing, apart from any I/O, so that every way a driver can get a line
//! wrong is a unit test rather than a process to script.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::drivers::Sample;
use crate::model::device::DeviceState;
use crate::model::safety::{Failsafe, Hold};

/// Agent → driver messages, as they appear on the driver's stdin.
#[derive(Debug, Serialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
pub(super) enum ToDriver<'a> {
    Command {
        command_id: &'a str,
        device_id: &'a str,
        slug: &'a str,
        input: &'a Map<String, Value>,
        /// The setpoint's hold, when the command carries one (PROTOCOL 15.3).
        #[serde(skip_serializing_if = "Option::is_none")]
        hold: Option<&'a Hold>,
        /// The device's fail-safe control, when it has one.
        #[serde(skip_serializing_if = "Option::is_none")]
        failsafe: Option<&'a Failsafe>,
    },
    Cancel {
        command_id: &'a str,
    },
}

/// One message as a `\n`-terminated line.
pub(super) fn encode(message: &ToDriver) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("strings and a JSON object always serialise");
    line.push(b'\n');
    line
}

/// Driver → agent messages as they appear on the wire. Unknown fields are ignored so that
/// drivers written against a newer protocol still work.
#[derive(Debug, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
enum WireMessage {
    State {
        device_id: String,
        state: DeviceState,
    },
    Result {
        command_id: String,
        ok: bool,
        #[serde(default)]
        result: Value,
        #[serde(default)]
        error: Option<String>,
    },
}

/// A driver line, checked and in the agent's terms.
#[derive(Debug, PartialEq)]
pub(super) enum FromDriver {
    State(Sample),
    Result {
        command_id: String,
        outcome: Result<Value, String>,
    },
}

/// Why a driver line was skipped.
#[derive(Debug, thiserror::Error)]
pub(super) enum MalformedLine {
    /// Not JSON, an unknown `type`, or a state that does not match the device model.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("empty deviceId")]
    EmptyDeviceId,
    #[error("empty commandId")]
    EmptyCommandId,
}

/// Parses one stdout line. Pure, so every way a driver can get it wrong is unit-testable.
pub(super) fn parse_line(line: &[u8]) -> Result<FromDriver, MalformedLine> {
    Ok(match serde_json::from_slice(line)? {
        WireMessage::State { device_id, state } => {
            if device_id.is_empty() {
                return Err(MalformedLine::EmptyDeviceId);
            }
            FromDriver::State(Sample {
                device_id,
                state,
                commands: None,
            })
        }
        WireMessage::Result {
            command_id,
            ok,
            result,
            error,
        } => {
            if command_id.is_empty() {
                return Err(MalformedLine::EmptyCommandId);
            }
            let outcome = if ok {
                Ok(result)
            } else {
                Err(error.unwrap_or_else(|| "driver gave no reason".into()))
            };
            FromDriver::Result {
                command_id,
                outcome,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn battery_json(reserve: f64) -> Value {
        json!({
            "type": "battery", "charge": 5000.0, "chargePercentage": 50.0,
            "chargingState": "idle", "chargeRate": 0.0, "backupReserve": reserve,
            "gridStatus": "idle", "gridPower": 0.0, "strategy": "self-consumption"
        })
    }

    #[test]
    fn a_state_line_becomes_a_sample() {
        let line = json!({"type": "state", "deviceId": "bat-1", "state": battery_json(20.0)});
        let parsed = parse_line(line.to_string().as_bytes()).unwrap();
        let FromDriver::State(sample) = parsed else {
            panic!("not a state: {parsed:?}")
        };
        assert_eq!(sample.device_id, "bat-1");
        assert_eq!(
            sample.state,
            serde_json::from_value::<DeviceState>(battery_json(20.0)).unwrap()
        );
    }

    /// PROTOCOL 14.4: what the device does not measure is left out, never sent as a made-up
    /// number; the rest stays required, and `null` is never a value.
    #[test]
    fn optional_members_may_be_left_out_but_required_ones_not_and_never_null() {
        let mut partial = battery_json(20.0);
        for member in [
            "charge",
            "chargeRate",
            "backupReserve",
            "gridPower",
            "strategy",
        ] {
            partial.as_object_mut().unwrap().remove(member);
        }
        partial["gridStatus"] = json!("unknown");
        let line = json!({"type": "state", "deviceId": "bat-1", "state": partial});
        let FromDriver::State(sample) = parse_line(line.to_string().as_bytes()).unwrap() else {
            panic!("not a state")
        };
        assert_eq!(
            serde_json::to_value(&sample.state).unwrap(),
            json!({"type": "battery", "chargePercentage": 50.0, "chargingState": "idle", "gridStatus": "unknown"}),
            "what was left out stays out"
        );
        let inverter = json!({"type": "inverter", "power": 1200.0, "gridStatus": "unknown"});
        let line = json!({"type": "state", "deviceId": "pv-1", "state": inverter});
        assert!(parse_line(line.to_string().as_bytes()).is_ok());

        for required in ["chargePercentage", "chargingState", "gridStatus"] {
            let mut state = battery_json(20.0);
            state.as_object_mut().unwrap().remove(required);
            let line = json!({"type": "state", "deviceId": "bat-1", "state": state});
            let e = parse_line(line.to_string().as_bytes()).unwrap_err();
            assert!(e.to_string().contains(required), "{required}: {e}");
        }
        let mut with_null = battery_json(20.0);
        with_null["chargeRate"] = Value::Null;
        let line = json!({"type": "state", "deviceId": "bat-1", "state": with_null});
        let parsed = parse_line(line.to_string().as_bytes());
        assert!(parsed.is_err(), "null is not absent: {parsed:?}");
    }

    #[test]
    fn results_carry_their_outcome() {
        let ok = br#"{"type":"result","commandId":"c1","ok":true,"result":{"backupReserve":42}}"#;
        assert_eq!(
            parse_line(ok).unwrap(),
            FromDriver::Result {
                command_id: "c1".into(),
                outcome: Ok(json!({"backupReserve": 42}))
            }
        );
        let refused = br#"{"type":"result","commandId":"c2","ok":false,"error":"no such slug"}"#;
        assert_eq!(
            parse_line(refused).unwrap(),
            FromDriver::Result {
                command_id: "c2".into(),
                outcome: Err("no such slug".into())
            }
        );
        let silent = br#"{"type":"result","commandId":"c3","ok":false}"#;
        assert!(matches!(
            parse_line(silent).unwrap(),
            FromDriver::Result {
                outcome: Err(_),
                ..
            }
        ));
    }

    #[test]
    fn unusable_lines_are_malformed() {
        let mut bad_state = battery_json(20.0);
        bad_state["chargingState"] = json!("exploding");
        let mut extra_field = battery_json(20.0);
        extra_field["colour"] = json!("red");
        let cases = [
            b"not json".to_vec(),
            br#"{"type":"mystery"}"#.to_vec(),
            br#"{"deviceId":"bat-1"}"#.to_vec(),
            json!({"type": "state", "deviceId": "bat-1", "state": bad_state})
                .to_string()
                .into_bytes(),
            json!({"type": "state", "deviceId": "bat-1", "state": extra_field})
                .to_string()
                .into_bytes(),
            json!({"type": "state", "deviceId": "", "state": battery_json(1.0)})
                .to_string()
                .into_bytes(),
            br#"{"type":"result","commandId":"","ok":true}"#.to_vec(),
            b"\xff\xfe".to_vec(),
        ];
        for line in cases {
            assert!(
                parse_line(&line).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(&line)
            );
        }
    }

    #[test]
    fn commands_are_encoded_as_the_protocol_says() {
        let input = json!({"chargePercentage": 42}).as_object().unwrap().clone();
        let line = encode(&ToDriver::Command {
            command_id: "c1",
            device_id: "bat-1",
            slug: "battery:set-reserve",
            input: &input,
            hold: None,
            failsafe: None,
        });
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"type": "command", "commandId": "c1", "deviceId": "bat-1",
                   "slug": "battery:set-reserve", "input": {"chargePercentage": 42}})
        );
        let cancel: Value =
            serde_json::from_slice(&encode(&ToDriver::Cancel { command_id: "c1" })).unwrap();
        assert_eq!(cancel, json!({"type": "cancel", "commandId": "c1"}));
    }

    #[test]
    fn a_command_tells_the_driver_its_hold_and_failsafe_control_for_a_hardware_revert_timer() {
        use crate::model::safety::Control;
        let input = json!({"chargePercentage": 42}).as_object().unwrap().clone();
        let control = |pct: u64| Control {
            command: "battery:set-reserve".into(),
            input: json!({"chargePercentage": pct})
                .as_object()
                .unwrap()
                .clone(),
        };
        let hold = Hold {
            until: 1_795_786_500,
            then: control(30),
        };
        let failsafe = Failsafe {
            after_secs: 900,
            control: control(50),
        };
        let line = encode(&ToDriver::Command {
            command_id: "c1",
            device_id: "bat-1",
            slug: "battery:set-reserve",
            input: &input,
            hold: Some(&hold),
            failsafe: Some(&failsafe),
        });
        assert_eq!(
            std::str::from_utf8(&line).unwrap(),
            concat!(
                r#"{"type":"command","commandId":"c1","deviceId":"bat-1","slug":"battery:set-reserve","#,
                r#""input":{"chargePercentage":42},"#,
                r#""hold":{"until":1795786500,"then":{"command":"battery:set-reserve","input":{"chargePercentage":30}}},"#,
                r#""failsafe":{"afterSecs":900,"control":{"command":"battery:set-reserve","input":{"chargePercentage":50}}}}"#,
                "\n"
            )
        );
    }
}
