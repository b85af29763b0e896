//! The OCPP-J 1.6 RPC framing (OCPP-J 1.6, section 4): a text frame is a JSON array,
//! `[2, id, action, payload]` (CALL), `[3, id, payload]` (CALLRESULT) or
//! `[4, id, code, description, details]` (CALLERROR). Pure: text in, a typed frame out, and
//! the answers as text; no socket, so every malformed case is a unit test.
//!
//! A frame that cannot be read still gets a CALLERROR whenever its unique id can be found,
//! because OCPP-J says every CALL is answered; one whose id cannot be found can only be logged.

use serde_json::{json, Map, Value};

/// The longest unique id OCPP-J allows (a string of at most 36 characters).
pub(crate) const MAX_UNIQUE_ID: usize = 36;

/// The CALLERROR codes of OCPP-J 1.6's table (4.2.3), spelled as it spells them: 2.0.1's
/// `FormatViolation` and the correctly spelled `OccurrenceConstraintViolation` are not 1.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorCode {
    /// The action is not one OCPP 1.6 knows.
    NotImplemented,
    /// A 1.6 action this central system does not take from a charge point.
    NotSupported,
    InternalError,
    /// The payload is not JSON, or not the frame's shape.
    FormationViolation,
    /// A field has a value outside what the action allows (an unknown enumeration value).
    PropertyConstraintViolation,
    /// A required field is missing.
    OccurenceConstraintViolation,
    /// A field has the wrong JSON type.
    TypeConstraintViolation,
}

impl ErrorCode {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotImplemented => "NotImplemented",
            ErrorCode::NotSupported => "NotSupported",
            ErrorCode::InternalError => "InternalError",
            ErrorCode::FormationViolation => "FormationViolation",
            ErrorCode::PropertyConstraintViolation => "PropertyConstraintViolation",
            ErrorCode::OccurenceConstraintViolation => "OccurenceConstraintViolation",
            ErrorCode::TypeConstraintViolation => "TypeConstraintViolation",
        }
    }
}

/// A frame read from a charge point.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Frame {
    Call {
        unique_id: String,
        action: String,
        payload: Map<String, Value>,
    },
    /// An answer to a CALL of ours.
    CallResult { unique_id: String, payload: Value },
    CallError {
        unique_id: String,
        code: String,
        description: String,
    },
}

/// A frame that cannot be read, and the unique id to answer, when one was found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Unreadable {
    pub(crate) unique_id: Option<String>,
    pub(crate) problem: String,
}

/// Whether `text` looks like a CALLRESULT or CALLERROR (`[3,` or `[4,`): an answer to a CALL
/// of ours, which the message rate does not count (we send one CALL at a time, so answers
/// come no faster than our CALLs; the driver closes a connection that sends answers to no
/// CALL). Only the frame's start is looked at: this runs before the frame is parsed.
pub(crate) fn is_answer(text: &str) -> bool {
    let mut chars = text
        .trim_start()
        .strip_prefix('[')
        .unwrap_or("x")
        .trim_start()
        .chars();
    matches!(chars.next(), Some('3' | '4'))
        && chars.next().is_some_and(|c| c == ',' || c.is_whitespace())
}

/// Reads one text frame.
pub(crate) fn decode(text: &str) -> Result<Frame, Unreadable> {
    let value: Value = serde_json::from_str(text).map_err(|e| Unreadable {
        unique_id: salvage_call_id(text),
        problem: format!("not JSON: {e}"),
    })?;
    let Value::Array(items) = value else {
        return Err(Unreadable {
            unique_id: None,
            problem: "not a JSON array".into(),
        });
    };
    let unique_id = match items.get(1) {
        Some(Value::String(id)) if !id.is_empty() && id.len() <= MAX_UNIQUE_ID => id.clone(),
        _ => {
            return Err(Unreadable {
                unique_id: None,
                problem: "no unique id (a string of 1 to 36 characters) in position 2".into(),
            })
        }
    };
    let broken = |problem: &str| Unreadable {
        // Only a CALL is answered: an answer to an answer would start a loop.
        unique_id: (items.first() == Some(&json!(2))).then(|| unique_id.clone()),
        problem: problem.to_owned(),
    };
    match items.first().and_then(Value::as_u64) {
        Some(2) => match (items.get(2), items.get(3), items.len()) {
            (Some(Value::String(action)), Some(Value::Object(payload)), 4) => Ok(Frame::Call {
                unique_id,
                action: action.clone(),
                payload: payload.clone(),
            }),
            _ => Err(broken(
                "a CALL is [2, uniqueId, action (a string), payload (an object)]",
            )),
        },
        Some(3) if items.len() == 3 => Ok(Frame::CallResult {
            unique_id,
            payload: items[2].clone(),
        }),
        Some(4) if items.len() == 5 => Ok(Frame::CallError {
            unique_id,
            code: items[2].as_str().unwrap_or_default().to_owned(),
            description: items[3].as_str().unwrap_or_default().to_owned(),
        }),
        _ => Err(broken("not a CALL (2), CALLRESULT (3) or CALLERROR (4)")),
    }
}

/// The unique id of what looks like a CALL whose JSON is broken: `[2, "ID"` at its start, so
/// its sender can still be told (a charger waiting for its answer would otherwise time out).
fn salvage_call_id(text: &str) -> Option<String> {
    let rest = text.trim_start().strip_prefix('[')?.trim_start();
    let rest = rest.strip_prefix('2')?.trim_start();
    let rest = rest.strip_prefix(',')?.trim_start();
    let rest = rest.strip_prefix('"')?;
    let (id, _) = rest.split_once('"')?;
    let plain = !id.is_empty()
        && id.len() <= MAX_UNIQUE_ID
        && !id.contains('\\')
        && !id.chars().any(char::is_control);
    plain.then(|| id.to_owned())
}

/// `[2, id, action, payload]`: a CALL of the central system's.
pub(crate) fn call(unique_id: &str, action: &str, payload: Value) -> String {
    json!([2, unique_id, action, payload]).to_string()
}

/// `[3, id, payload]`.
pub(crate) fn call_result(unique_id: &str, payload: Value) -> String {
    json!([3, unique_id, payload]).to_string()
}

/// `[4, id, code, description, {}]`.
pub(crate) fn call_error(unique_id: &str, code: ErrorCode, description: &str) -> String {
    // errorDescription has no length limit in 1.6, but a charger's log line may: keep it short.
    let description: String = description.chars().take(255).collect();
    json!([4, unique_id, code.as_str(), description, {}]).to_string()
}

/// The 1.6 code for a payload serde could not read into an action's type.
pub(crate) fn payload_error(e: &serde_json::Error) -> ErrorCode {
    // serde's data errors are words, not kinds: these prefixes are what serde_derive and
    // serde_json write (`missing field`, `invalid type`, `unknown variant`, `invalid value`).
    let text = e.to_string();
    if text.starts_with("missing field") {
        ErrorCode::OccurenceConstraintViolation
    } else if text.starts_with("invalid type") {
        ErrorCode::TypeConstraintViolation
    } else if text.starts_with("unknown variant")
        || text.starts_with("invalid value")
        || text.starts_with("invalid length")
    {
        ErrorCode::PropertyConstraintViolation
    } else {
        ErrorCode::FormationViolation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_told_from_calls_by_their_first_element() {
        for answer in [r#"[3,"a",{}]"#, r#" [ 4 ,"a","x","",{}]"#] {
            assert!(is_answer(answer), "{answer}");
        }
        for other in [
            r#"[2,"a","Heartbeat",{}]"#,
            r#"[33,"a"]"#,
            "3,",
            "",
            "[",
            "[3",
        ] {
            assert!(!is_answer(other), "{other}");
        }
    }

    #[test]
    fn a_call_is_read_with_its_id_action_and_payload() {
        let frame = decode(r#"[2, "19223201", "BootNotification", {"chargePointVendor": "V"}]"#);
        let Ok(Frame::Call {
            unique_id,
            action,
            payload,
        }) = frame
        else {
            panic!("{frame:?}");
        };
        assert_eq!(
            (unique_id.as_str(), action.as_str()),
            ("19223201", "BootNotification")
        );
        assert_eq!(payload["chargePointVendor"], "V");
        assert_eq!(
            decode(r#"[3,"a",{}]"#),
            Ok(Frame::CallResult {
                unique_id: "a".into(),
                payload: json!({})
            })
        );
        assert_eq!(
            decode(r#"[4,"a","NotSupported","",{}]"#),
            Ok(Frame::CallError {
                unique_id: "a".into(),
                code: "NotSupported".into(),
                description: String::new()
            })
        );
    }

    #[test]
    fn broken_json_keeps_the_unique_id_of_a_call_when_it_can_be_found() {
        let e = decode(r#"[2, "abc-1", "Heartbeat", {"#).unwrap_err();
        assert_eq!(e.unique_id.as_deref(), Some("abc-1"));
        assert!(e.problem.starts_with("not JSON"), "{}", e.problem);
        for hopeless in [
            "{not json",
            "",
            r#"[3, "abc-1", {"#,
            r#"[2, "a\"b", {"#,
            "[2, 17",
        ] {
            assert_eq!(decode(hopeless).unwrap_err().unique_id, None, "{hopeless}");
        }
    }

    #[test]
    fn well_formed_json_of_the_wrong_shape_is_answered_only_when_it_is_a_call() {
        for (text, id) in [
            (r#"[2, "x", "Heartbeat"]"#, Some("x")),
            (r#"[2, "x", 7, {}]"#, Some("x")),
            (r#"[2, "x", "Heartbeat", []]"#, Some("x")),
            (r#"[9, "x", {}]"#, None),
            (r#"[3, "x"]"#, None),
            (r#"[2, 5, "Heartbeat", {}]"#, None),
            (r#"{"a": 1}"#, None),
            (
                &format!(r#"[2, "{}", "Heartbeat", {{}}]"#, "i".repeat(37)),
                None,
            ),
        ] {
            assert_eq!(decode(text).unwrap_err().unique_id.as_deref(), id, "{text}");
        }
    }

    #[test]
    fn answers_are_the_ocpp_j_arrays_with_1_6_error_codes() {
        assert_eq!(call_result("7", json!({})), r#"[3,"7",{}]"#);
        assert_eq!(
            call_error("7", ErrorCode::FormationViolation, "bad"),
            r#"[4,"7","FormationViolation","bad",{}]"#
        );
        #[derive(Debug, serde::Deserialize)]
        #[allow(dead_code)]
        struct T {
            n: u32,
            e: Option<E>,
        }
        #[derive(Debug, serde::Deserialize)]
        enum E {
            A,
        }
        let code = |text: &str| payload_error(&serde_json::from_str::<T>(text).unwrap_err());
        assert_eq!(code(r#"{}"#), ErrorCode::OccurenceConstraintViolation);
        assert_eq!(code(r#"{"n": "1"}"#), ErrorCode::TypeConstraintViolation);
        assert_eq!(
            code(r#"{"n": 1, "e": "B"}"#),
            ErrorCode::PropertyConstraintViolation
        );
        assert_eq!(code(r#"{"n": -1}"#), ErrorCode::PropertyConstraintViolation);
    }
}
