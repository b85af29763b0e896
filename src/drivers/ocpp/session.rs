//! One charge point as the central system sees it, without a socket: each text frame in, the
//! answer frame out and what the frame says about its connectors. The server (`server.rs`) only
//! moves frames between the socket and [`Session::on_text`].
//!
//! The state starts empty at each connection: a charger that comes back is reported again from
//! its own next StatusNotification and MeterValues, never from what it said before it left.

use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Value};

use super::frame::{self, ErrorCode, Frame};
use super::messages::{self as m, ChargePointStatus};
use super::settings::OcppSettings;
use crate::model::device::{ChargerState, ChargingState};

/// What the server needs to answer one frame, besides the session.
pub(crate) struct Context<'a> {
    pub(crate) settings: &'a OcppSettings,
    /// Unix seconds, for `currentTime`.
    pub(crate) now_unix: u64,
    /// The next transaction id; shared by every charge point of the driver.
    pub(crate) next_transaction: &'a mut i64,
}

/// What one frame produced.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct Reaction {
    /// The answer to send back (every CALL has one).
    pub(crate) reply: Option<String>,
    /// A connector's new state, when this frame changed it and it is complete: the connector
    /// and its state.
    pub(crate) state: Option<(u32, ChargerState)>,
    /// Something for the log: a frame that could not be answered, or was answered with an error.
    pub(crate) problem: Option<String>,
    /// The charge point's answer to a CALL of ours: its unique id, and the CALLRESULT payload
    /// or the CALLERROR's code and description.
    pub(crate) answered: Option<(String, CallAnswer)>,
}

/// A charger's answer to a CALL of ours: the CALLRESULT payload, or the CALLERROR's code and
/// description.
pub(crate) type CallAnswer = Result<Value, (String, String)>;

/// One connector, as far as the charge point has told it.
#[derive(Debug, Clone, Default, PartialEq)]
struct Connector {
    status: Option<ChargePointStatus>,
    /// V, A and W, from the latest MeterValues that carried each.
    voltage: Option<f64>,
    current: Option<f64>,
    power: Option<f64>,
}

impl Connector {
    /// The device model's state, once the charger has given a status and all three measurands:
    /// until then there is nothing true to report (no made-up zeros).
    fn state(&self) -> Option<ChargerState> {
        let status = self.status?;
        let (voltage, mut current, mut power) = (self.voltage?, self.current?, self.power?);
        // Without a vehicle nothing flows, whatever the last meter reading during a session said.
        if matches!(
            status,
            ChargePointStatus::Available
                | ChargePointStatus::Reserved
                | ChargePointStatus::Unavailable
                | ChargePointStatus::Faulted
        ) {
            (current, power) = (0.0, 0.0);
        }
        Some(ChargerState {
            charging_state: if status == ChargePointStatus::Charging {
                ChargingState::Charging
            } else {
                ChargingState::Idle
            },
            is_plugged_in: plugged_in(status),
            charger_voltage: voltage,
            charger_current: current,
            charger_wattage: power,
        })
    }
}

/// The `charger:set-operating-mode` modes, as OCPP CALLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OperatingMode {
    /// RemoteStartTransaction on the device's connector.
    StartCharging,
    /// RemoteStopTransaction of the connector's transaction.
    StopCharging,
}

impl OperatingMode {
    pub(crate) fn parse(input: &Map<String, Value>) -> Result<OperatingMode, String> {
        match input.get("operatingMode").and_then(Value::as_str) {
            Some("start-charging") => Ok(OperatingMode::StartCharging),
            Some("stop-charging") => Ok(OperatingMode::StopCharging),
            other => Err(format!(
                "operatingMode: {other:?} is not start-charging or stop-charging"
            )),
        }
    }

    pub(crate) fn action(self) -> &'static str {
        match self {
            OperatingMode::StartCharging => "RemoteStartTransaction",
            OperatingMode::StopCharging => "RemoteStopTransaction",
        }
    }
}

/// Whether a vehicle is connected in this status (OCPP 1.6, 4.9, the connector statuses).
fn plugged_in(status: ChargePointStatus) -> bool {
    matches!(
        status,
        ChargePointStatus::Preparing
            | ChargePointStatus::Charging
            | ChargePointStatus::SuspendedEV
            | ChargePointStatus::SuspendedEVSE
            | ChargePointStatus::Finishing
    )
}

/// One connected charge point: its connectors 1 to N (connector 0, the charge point as a
/// whole, and any beyond N are answered but not mapped).
#[derive(Debug)]
pub(crate) struct Session {
    /// Connector `n` at index `n - 1`.
    connectors: Vec<ConnectorSession>,
}

/// One connector of a connected charge point.
#[derive(Debug, Default)]
struct ConnectorSession {
    connector: Connector,
    /// The last state reported, so an unchanged one is not sent again.
    reported: Option<ChargerState>,
    /// The transaction running on it, from its StartTransaction until its StopTransaction:
    /// what a RemoteStopTransaction names.
    transaction: Option<i64>,
}

impl Default for Session {
    fn default() -> Session {
        Session::new(1)
    }
}

impl Session {
    pub(crate) fn new(connectors: u32) -> Session {
        Session {
            connectors: (0..connectors)
                .map(|_| ConnectorSession::default())
                .collect(),
        }
    }

    fn at(&mut self, connector: u32) -> Option<&mut ConnectorSession> {
        let i = usize::try_from(connector.checked_sub(1)?).ok()?;
        self.connectors.get_mut(i)
    }

    /// The payload of the CALL that carries out `mode` on `connector`
    /// ([`OperatingMode::action`]); `Err` when there is nothing to do it to (no transaction to
    /// stop).
    pub(crate) fn operating_mode_call(
        &mut self,
        mode: OperatingMode,
        connector: u32,
        settings: &OcppSettings,
    ) -> Result<Value, String> {
        let payload = match mode {
            OperatingMode::StartCharging => {
                serde_json::json!({"connectorId": connector, "idTag": settings.remote_id_tag()})
            }
            OperatingMode::StopCharging => {
                let transaction = self
                    .at(connector)
                    .and_then(|c| c.transaction)
                    .ok_or_else(|| format!("no transaction is running on connector {connector}"))?;
                serde_json::json!({"transactionId": transaction})
            }
        };
        Ok(payload)
    }

    /// Reads one text frame and answers it.
    pub(crate) fn on_text(&mut self, text: &str, cx: &mut Context<'_>) -> Reaction {
        match frame::decode(text) {
            Ok(Frame::Call {
                unique_id,
                action,
                payload,
            }) => {
                let before: Vec<Connector> = self
                    .connectors
                    .iter()
                    .map(|c| c.connector.clone())
                    .collect();
                let (reply, problem) = match self.call(&action, payload, cx) {
                    Ok(answer) => (frame::call_result(&unique_id, answer), None),
                    Err((code, why)) => (
                        frame::call_error(&unique_id, code, &why),
                        Some(format!("{action} {unique_id}: {} ({why})", code.as_str())),
                    ),
                };
                // One frame is about one connector at most.
                let changed = self
                    .connectors
                    .iter_mut()
                    .zip(&before)
                    .zip(1..)
                    .find(|((c, before), _)| c.connector != **before);
                let state = changed.and_then(|((c, _), n)| {
                    let state = c
                        .connector
                        .state()
                        .filter(|s| c.reported.as_ref() != Some(s))?;
                    c.reported = Some(state.clone());
                    Some((n, state))
                });
                Reaction {
                    reply: Some(reply),
                    state,
                    problem,
                    answered: None,
                }
            }
            Ok(Frame::CallResult { unique_id, payload }) => Reaction {
                answered: Some((unique_id, Ok(payload))),
                ..Reaction::default()
            },
            Ok(Frame::CallError {
                unique_id,
                code,
                description,
            }) => Reaction {
                answered: Some((unique_id, Err((code, description)))),
                ..Reaction::default()
            },
            Err(unreadable) => Reaction {
                reply: unreadable.unique_id.as_deref().map(|id| {
                    frame::call_error(id, ErrorCode::FormationViolation, &unreadable.problem)
                }),
                problem: Some(unreadable.problem),
                ..Reaction::default()
            },
        }
    }

    /// The CALLRESULT payload for one CALL, or its CALLERROR code and description.
    fn call(
        &mut self,
        action: &str,
        payload: Map<String, Value>,
        cx: &mut Context<'_>,
    ) -> Result<Value, (ErrorCode, String)> {
        let now = crate::model::clock::rfc3339(cx.now_unix);
        match action {
            "BootNotification" => {
                let boot: m::BootNotification = read(payload)?;
                tracing::info!(vendor = %boot.charge_point_vendor, model = %boot.charge_point_model,
                    firmware = boot.firmware_version.as_deref().unwrap_or(""), "ocpp: boot");
                answer(m::BootNotificationConf {
                    status: "Accepted",
                    current_time: now,
                    interval: cx.settings.heartbeat_secs,
                })
            }
            "Heartbeat" => answer(m::HeartbeatConf { current_time: now }),
            "StatusNotification" => {
                let status: m::StatusNotification = read(payload)?;
                // Connector 0 is the charge point as a whole; those beyond the settings' are
                // not mapped.
                if let Some(c) = self.at(status.connector_id) {
                    c.connector.status = Some(status.status);
                }
                Ok(Value::Object(Map::new()))
            }
            "MeterValues" => {
                let values: m::MeterValues = read(payload)?;
                if let Some(c) = self.at(values.connector_id) {
                    meter(&mut c.connector, &values)
                        .map_err(|why| (ErrorCode::PropertyConstraintViolation, why))?;
                }
                Ok(Value::Object(Map::new()))
            }
            "StartTransaction" => {
                let start: m::StartTransaction = read(payload)?;
                let transaction_id = *cx.next_transaction;
                *cx.next_transaction = cx.next_transaction.wrapping_add(1).max(1);
                if let Some(c) = self.at(start.connector_id) {
                    c.transaction = Some(transaction_id);
                }
                tracing::info!(
                    connector = start.connector_id,
                    transaction_id,
                    "ocpp: transaction started"
                );
                answer(m::StartTransactionConf {
                    id_tag_info: id_tag_info(cx.settings, &start.id_tag),
                    transaction_id,
                })
            }
            "StopTransaction" => {
                let stop: m::StopTransaction = read(payload)?;
                for c in &mut self.connectors {
                    if c.transaction == Some(stop.transaction_id) {
                        c.transaction = None;
                    }
                }
                tracing::info!(
                    transaction_id = stop.transaction_id,
                    "ocpp: transaction stopped"
                );
                match stop.id_tag {
                    Some(tag) => answer(m::IdTagInfoConf {
                        id_tag_info: id_tag_info(cx.settings, &tag),
                    }),
                    None => Ok(Value::Object(Map::new())),
                }
            }
            "Authorize" => {
                let authorize: m::Authorize = read(payload)?;
                answer(m::IdTagInfoConf {
                    id_tag_info: id_tag_info(cx.settings, &authorize.id_tag),
                })
            }
            known if m::KNOWN_ACTIONS.contains(&known) => Err((
                ErrorCode::NotSupported,
                format!("this central system does not take {known}"),
            )),
            unknown => Err((
                ErrorCode::NotImplemented,
                format!("{unknown} is not an OCPP 1.6 action"),
            )),
        }
    }
}

/// Takes voltage, current and active power from one MeterValues.req into `connector`. A value
/// without a phase wins; otherwise per-phase values give the power summed, the current of the
/// most loaded phase and the voltage of L1 (line to neutral).
fn meter(connector: &mut Connector, values: &m::MeterValues) -> Result<(), String> {
    let mut voltage = Reading::default();
    let mut current = Reading::default();
    let mut power = Reading::default();
    for sampled in values.meter_value.iter().flat_map(|v| &v.sampled_value) {
        if sampled.format.as_deref() == Some("SignedData") {
            continue;
        }
        let measurand = sampled
            .measurand
            .as_deref()
            .unwrap_or("Energy.Active.Import.Register");
        let (scale, reading) = match (measurand, sampled.unit.as_deref()) {
            ("Voltage", None | Some("V")) => (1.0, &mut voltage),
            ("Current.Import", None | Some("A")) => (1.0, &mut current),
            ("Power.Active.Import", None | Some("W")) => (1.0, &mut power),
            ("Power.Active.Import", Some("kW")) => (1000.0, &mut power),
            ("Voltage" | "Current.Import" | "Power.Active.Import", Some(unit)) => {
                return Err(format!("{measurand} in {unit:?}"))
            }
            _ => continue,
        };
        let value: f64 = sampled
            .value
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite())
            .ok_or_else(|| format!("{measurand}: {:?} is not a number", sampled.value))?;
        reading.add(sampled.phase.as_deref(), value * scale);
    }
    if let Some(v) = voltage.value(|phases| phases.first().copied()) {
        connector.voltage = Some(v);
    }
    if let Some(a) = current.value(|phases| phases.iter().copied().reduce(f64::max)) {
        connector.current = Some(a);
    }
    if let Some(w) = power.value(|phases| phases.iter().copied().reduce(|a, b| a + b)) {
        connector.power = Some(w);
    }
    Ok(())
}

/// One measurand's values in one MeterValues.req.
#[derive(Debug, Default)]
struct Reading {
    whole: Option<f64>,
    /// L1, L2, L3 (or L1-N, ...) in the order given.
    phases: Vec<f64>,
}

impl Reading {
    fn add(&mut self, phase: Option<&str>, value: f64) {
        match phase {
            None => self.whole = Some(value),
            // Neutral and line-to-line values are not the charger's supply voltage or load.
            Some("L1" | "L2" | "L3" | "L1-N" | "L2-N" | "L3-N") => self.phases.push(value),
            Some(_) => {}
        }
    }

    fn value(&self, combine: impl Fn(&[f64]) -> Option<f64>) -> Option<f64> {
        self.whole.or_else(|| combine(&self.phases))
    }
}

fn id_tag_info(settings: &OcppSettings, tag: &str) -> m::IdTagInfo {
    m::IdTagInfo {
        status: if settings.accepts(tag) {
            m::AuthorizationStatus::Accepted
        } else {
            m::AuthorizationStatus::Invalid
        },
    }
}

fn read<T: serde::de::DeserializeOwned>(
    payload: Map<String, Value>,
) -> Result<T, (ErrorCode, String)> {
    serde_json::from_value(Value::Object(payload))
        .map_err(|e| (frame::payload_error(&e), e.to_string()))
}

fn answer(conf: impl Serialize) -> Result<Value, (ErrorCode, String)> {
    serde_json::to_value(conf).map_err(|e| (ErrorCode::InternalError, e.to_string()))
}

/// At most `per_sec` frames in any one-second window of one connection.
#[derive(Debug)]
pub(crate) struct RateLimit {
    per_sec: u32,
    window: Instant,
    seen: u32,
}

impl RateLimit {
    pub(crate) fn new(per_sec: u32, now: Instant) -> RateLimit {
        RateLimit {
            per_sec,
            window: now,
            seen: 0,
        }
    }

    /// Counts one frame; `false` when it is over the limit.
    pub(crate) fn admit(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.seen = 0;
        }
        self.seen += 1;
        self.seen <= self.per_sec
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::drivers::ocpp::settings::tests::settings;

    fn answer_to(session: &mut Session, frame: Value) -> (Value, Option<ChargerState>) {
        let settings = settings();
        let mut next = 41;
        let mut cx = Context {
            settings: &settings,
            now_unix: 1_764_700_000,
            next_transaction: &mut next,
        };
        let r = session.on_text(&frame.to_string(), &mut cx);
        let state = r.state.map(|(connector, state)| {
            assert_eq!(connector, 1, "a one-connector session reports connector 1");
            state
        });
        (serde_json::from_str(&r.reply.unwrap()).unwrap(), state)
    }

    fn status(s: &str) -> Value {
        json!([2, "s", "StatusNotification", {"connectorId": 1, "errorCode": "NoError", "status": s}])
    }

    fn meter(values: Value) -> Value {
        json!([2, "m", "MeterValues", {"connectorId": 1, "meterValue": [
            {"timestamp": "2026-12-03T07:00:00Z", "sampledValue": values}]}])
    }

    #[test]
    fn boot_heartbeat_and_authorize_are_answered_from_the_settings() {
        let mut s = Session::default();
        let (boot, _) = answer_to(
            &mut s,
            json!([2, "b1", "BootNotification",
            {"chargePointVendor": "V", "chargePointModel": "M"}]),
        );
        assert_eq!(
            boot,
            json!([3, "b1", {"status": "Accepted", "currentTime": "2025-12-02T18:26:40Z", "interval": 300}])
        );
        let (beat, _) = answer_to(&mut s, json!([2, "h", "Heartbeat", {}]));
        assert_eq!(
            beat,
            json!([3, "h", {"currentTime": "2025-12-02T18:26:40Z"}])
        );
        let (start, _) = answer_to(
            &mut s,
            json!([2, "t", "StartTransaction",
            {"connectorId": 1, "idTag": "X", "meterStart": 0, "timestamp": "2026-12-03T07:00:00Z"}]),
        );
        assert_eq!(
            start,
            json!([3, "t", {"idTagInfo": {"status": "Accepted"}, "transactionId": 41}])
        );
    }

    #[test]
    fn a_local_list_refuses_unknown_tags_as_invalid() {
        let mut settings = settings();
        settings.authorize = None;
        settings.id_tags = Some(vec!["GOOD".into()]);
        let mut next = 1;
        let mut cx = Context {
            settings: &settings,
            now_unix: 0,
            next_transaction: &mut next,
        };
        let mut s = Session::default();
        for (tag, status) in [("good", "Accepted"), ("BAD", "Invalid")] {
            let frame = json!([2, "a", "Authorize", {"idTag": tag}]).to_string();
            let reply: Value =
                serde_json::from_str(&s.on_text(&frame, &mut cx).reply.unwrap()).unwrap();
            assert_eq!(reply[2]["idTagInfo"]["status"], status, "{tag}");
        }
    }

    #[test]
    fn errors_carry_the_1_6_codes() {
        let mut s = Session::default();
        let code = |s: &mut Session, f: Value| answer_to(s, f).0[2].clone();
        assert_eq!(
            code(&mut s, json!([2, "1", "FlyToTheMoon", {}])),
            "NotImplemented"
        );
        assert_eq!(
            code(&mut s, json!([2, "2", "DataTransfer", {"vendorId": "x"}])),
            "NotSupported"
        );
        assert_eq!(
            code(&mut s, json!([2, "3", "Authorize", {}])),
            "OccurenceConstraintViolation"
        );
        assert_eq!(
            code(&mut s, json!([2, "4", "Authorize", {"idTag": 5}])),
            "TypeConstraintViolation"
        );
        assert_eq!(
            code(&mut s, status("Dancing")),
            "PropertyConstraintViolation"
        );
        let settings = settings();
        let mut next = 1;
        let mut cx = Context {
            settings: &settings,
            now_unix: 0,
            next_transaction: &mut next,
        };
        let r = s.on_text(r#"[2, "5", "Heartbeat", {"#, &mut cx);
        assert!(r
            .reply
            .unwrap()
            .starts_with(r#"[4,"5","FormationViolation","#));
        let r = s.on_text("}{", &mut cx);
        assert_eq!((r.reply, r.problem.is_some()), (None, true));
    }

    #[test]
    fn a_state_is_reported_only_once_status_and_all_three_measurands_are_known() {
        let mut s = Session::default();
        assert_eq!(answer_to(&mut s, status("Charging")).1, None);
        let (_, state) = answer_to(
            &mut s,
            meter(json!([
            {"measurand": "Voltage", "value": "230.5", "unit": "V"},
            {"measurand": "Current.Import", "value": "16", "unit": "A"}])),
        );
        assert_eq!(state, None);
        let (_, state) = answer_to(
            &mut s,
            meter(json!([
            {"measurand": "Power.Active.Import", "value": "3.68", "unit": "kW"}])),
        );
        assert_eq!(
            state,
            Some(ChargerState {
                charging_state: ChargingState::Charging,
                is_plugged_in: true,
                charger_voltage: 230.5,
                charger_current: 16.0,
                charger_wattage: 3680.0,
            })
        );
        // The same reading again changes nothing: nothing is reported.
        let (_, again) = answer_to(
            &mut s,
            meter(json!([
            {"measurand": "Power.Active.Import", "value": "3680", "unit": "W"}])),
        );
        assert_eq!(again, None);
        let (_, suspended) = answer_to(&mut s, status("SuspendedEV"));
        let suspended = suspended.unwrap();
        assert_eq!(
            (suspended.charging_state, suspended.is_plugged_in),
            (ChargingState::Idle, true)
        );
        let (_, unplugged) = answer_to(&mut s, status("Available"));
        let unplugged = unplugged.unwrap();
        assert!(!unplugged.is_plugged_in);
        assert_eq!(
            (unplugged.charger_current, unplugged.charger_wattage),
            (0.0, 0.0)
        );
        assert_eq!(unplugged.charger_voltage, 230.5);
    }

    #[test]
    fn per_phase_values_sum_the_power_and_take_the_highest_current_and_l1_voltage() {
        let mut s = Session::default();
        answer_to(&mut s, status("Charging"));
        let (_, state) = answer_to(
            &mut s,
            meter(json!([
            {"measurand": "Voltage", "phase": "L1-N", "value": "231"},
            {"measurand": "Voltage", "phase": "L2-N", "value": "229"},
            {"measurand": "Current.Import", "phase": "L1", "value": "10"},
            {"measurand": "Current.Import", "phase": "L2", "value": "11"},
            {"measurand": "Power.Active.Import", "phase": "L1", "value": "2300"},
            {"measurand": "Power.Active.Import", "phase": "L2", "value": "2500"},
            {"measurand": "Energy.Active.Import.Register", "value": "12345"}])),
        );
        let state = state.unwrap();
        assert_eq!(
            (
                state.charger_voltage,
                state.charger_current,
                state.charger_wattage
            ),
            (231.0, 11.0, 4800.0)
        );
        let (reply, _) = answer_to(
            &mut s,
            meter(json!([
            {"measurand": "Voltage", "value": "abc"}])),
        );
        assert_eq!(reply[2], "PropertyConstraintViolation");
    }

    #[test]
    fn connectors_beyond_the_settings_are_answered_and_not_mapped() {
        let mut s = Session::default();
        answer_to(
            &mut s,
            json!([2, "s", "StatusNotification",
            {"connectorId": 2, "errorCode": "NoError", "status": "Charging"}]),
        );
        assert_eq!(s.connectors[0].connector, Connector::default());
        assert_eq!(s.connectors.len(), 1);
    }

    #[test]
    fn each_connector_has_its_own_state_and_transaction() {
        let settings = settings();
        let mut s = Session::new(2);
        let mut next = 7;
        let mut cx = Context {
            settings: &settings,
            now_unix: 0,
            next_transaction: &mut next,
        };
        let mut send = |s: &mut Session, frame: Value| s.on_text(&frame.to_string(), &mut cx);
        let status = |n: u32, status: &str| {
            json!([2, "s", "StatusNotification",
            {"connectorId": n, "errorCode": "NoError", "status": status}])
        };
        let meter = |n: u32, watts: &str| {
            json!([2, "m", "MeterValues", {"connectorId": n, "meterValue": [
                {"timestamp": "2026-12-03T07:00:00Z", "sampledValue": [
                {"measurand": "Voltage", "value": "230"},
                {"measurand": "Current.Import", "value": "10"},
                {"measurand": "Power.Active.Import", "value": watts}]}]}])
        };
        send(&mut s, status(2, "Charging"));
        let r = send(&mut s, meter(2, "2300"));
        let (connector, state) = r.state.unwrap();
        assert_eq!(
            (connector, state.charging_state, state.charger_wattage),
            (2, ChargingState::Charging, 2300.0)
        );
        send(&mut s, status(1, "Available"));
        let r = send(&mut s, meter(1, "0"));
        assert_eq!(r.state.unwrap().0, 1);
        let r = send(
            &mut s,
            json!([2, "t", "StartTransaction",
            {"connectorId": 2, "idTag": "X", "meterStart": 0, "timestamp": "2026-12-03T07:00:00Z"}]),
        );
        assert_eq!(r.state, None);
        assert_eq!(
            s.operating_mode_call(OperatingMode::StopCharging, 2, &settings),
            Ok(json!({"transactionId": 7}))
        );
        assert_eq!(
            s.operating_mode_call(OperatingMode::StopCharging, 1, &settings),
            Err("no transaction is running on connector 1".into())
        );
        assert_eq!(
            s.operating_mode_call(OperatingMode::StartCharging, 2, &settings),
            Ok(json!({"connectorId": 2, "idTag": "texture-agent"}))
        );
    }

    #[test]
    fn set_operating_mode_is_a_remote_start_on_connector_1_or_a_remote_stop_of_its_transaction() {
        let settings = settings();
        let mut s = Session::default();
        let start = OperatingMode::parse(
            json!({"operatingMode": "start-charging"})
                .as_object()
                .unwrap(),
        );
        let stop = OperatingMode::parse(
            json!({"operatingMode": "stop-charging"})
                .as_object()
                .unwrap(),
        );
        assert_eq!(
            (start, stop),
            (
                Ok(OperatingMode::StartCharging),
                Ok(OperatingMode::StopCharging)
            )
        );
        assert!(
            OperatingMode::parse(json!({"operatingMode": "fly"}).as_object().unwrap()).is_err()
        );
        assert_eq!(
            s.operating_mode_call(OperatingMode::StartCharging, 1, &settings),
            Ok(json!({"connectorId": 1, "idTag": "texture-agent"}))
        );
        assert_eq!(
            s.operating_mode_call(OperatingMode::StopCharging, 1, &settings),
            Err("no transaction is running on connector 1".into())
        );
        let (started, _) = answer_to(
            &mut s,
            json!([2, "t", "StartTransaction",
            {"connectorId": 1, "idTag": "X", "meterStart": 0, "timestamp": "2026-12-03T07:00:00Z"}]),
        );
        assert_eq!(
            s.operating_mode_call(OperatingMode::StopCharging, 1, &settings),
            Ok(json!({"transactionId": started[2]["transactionId"]}))
        );
        answer_to(
            &mut s,
            json!([2, "p", "StopTransaction",
            {"transactionId": 41, "meterStop": 10, "timestamp": "2026-12-03T08:00:00Z"}]),
        );
        assert!(s
            .operating_mode_call(OperatingMode::StopCharging, 1, &settings)
            .is_err());
        // The charger's answers to our CALLs come back with their unique id.
        let mut next = 1;
        let mut cx = Context {
            settings: &settings,
            now_unix: 0,
            next_transaction: &mut next,
        };
        let r = s.on_text(r#"[3,"ta-1",{"status":"Rejected"}]"#, &mut cx);
        assert_eq!(
            (r.reply, r.answered),
            (
                None,
                Some(("ta-1".into(), Ok(json!({"status": "Rejected"}))))
            )
        );
        let r = s.on_text(r#"[4,"ta-2","NotSupported","no",{}]"#, &mut cx);
        assert_eq!(
            r.answered,
            Some(("ta-2".into(), Err(("NotSupported".into(), "no".into()))))
        );
    }

    #[test]
    fn the_rate_limit_counts_frames_per_second() {
        let t0 = Instant::now();
        let mut limit = RateLimit::new(2, t0);
        assert!(limit.admit(t0) && limit.admit(t0));
        assert!(!limit.admit(t0 + Duration::from_millis(900)));
        assert!(limit.admit(t0 + Duration::from_millis(1000)));
    }
}
