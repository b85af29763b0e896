//! Replies to commands: what the device tells the platform about each command it received.
//!
//! Three shapes, told apart by `type` (docs/PROTOCOL.md, "Replies"):
//! - `command.refused`: the command never ran. `{code, message}` mirror the platform's API
//!   errors and `status` is the HTTP status the platform's API would have answered.
//! - `command.succeeded` / `command.failed`: it ran; shaped like the platform's events of the
//!   same names (`commandId`, `deviceId`, `issuedAt`, `executedAt`, `error.message`).

use serde::Serialize;

/// The machine-readable error codes a device can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// 400: the command or its input is malformed.
    ValidationError,
    /// 401: no valid platform signature (malformed, wrong algorithm, unknown key, forged).
    Unauthenticated,
    /// 401: validly signed, but past its expiry (evaluated against the time floor too).
    AttestationExpired,
    /// 401: validly signed, but issued further in the future than the allowed clock skew.
    AttestationNotYetValid,
    /// 403: validly signed, but this key may not command this device.
    Forbidden,
    /// 404: the command names a device this gateway does not have.
    DeviceNotFound,
    /// 409: a newer command for the same device replaced this one while it ran.
    Superseded,
    /// 422: valid, but it would take the device outside the installer's limits on this gateway
    /// (the safety envelope, docs/PROTOCOL.md 4.7); it never reached the device.
    LimitExceeded,
    /// 409: the device's driver could not take the command: it has 64 commands unanswered or
    /// is not reading them. A conflict with the driver's state, not a reason to re-send the same
    /// attestation (its failure is recorded); mint a new command later.
    DeviceBusy,
    /// 429: the replay table is full of live entries; retry later.
    RateLimited,
    /// 500: the command could not be carried out.
    CommandFailed,
    /// 503: the device cannot take commands right now (say its state volume fails writes).
    Unavailable,
    /// 503: the device's driver is not running (between restarts, or it cannot be started).
    /// Sent as `command.failed` without `retryAfter`: the command id is recorded, so only a new
    /// command can run once the driver is back.
    DeviceUnavailable,
    /// 504: the driver did not finish the command within its timeout.
    CommandTimeout,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::ValidationError => 400,
            ErrorCode::Unauthenticated
            | ErrorCode::AttestationExpired
            | ErrorCode::AttestationNotYetValid => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::DeviceNotFound => 404,
            ErrorCode::Superseded | ErrorCode::DeviceBusy => 409,
            ErrorCode::LimitExceeded => 422,
            ErrorCode::RateLimited => 429,
            ErrorCode::CommandFailed => 500,
            ErrorCode::Unavailable | ErrorCode::DeviceUnavailable => 503,
            ErrorCode::CommandTimeout => 504,
        }
    }
}

/// A reply, published on the device's reply topic.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub enum Reply {
    #[serde(rename = "command.refused", rename_all = "camelCase")]
    Refused {
        /// `null` when the attestation did not verify: an unverified id is not worth echoing.
        /// The one exception is a command shed unread under overload (`inbound::router`), which echoes
        /// the well-formed id it peeked so the platform can match the "busy, retry" answer.
        command_id: Option<String>,
        device_id: String,
        status: u16,
        code: ErrorCode,
        message: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after: Option<u64>,
    },
    #[serde(rename = "command.succeeded", rename_all = "camelCase")]
    Succeeded {
        command_id: String,
        device_id: String,
        issued_at: String,
        executed_at: String,
        status: u16,
        result: serde_json::Value,
    },
    #[serde(rename = "command.failed", rename_all = "camelCase")]
    Failed {
        command_id: String,
        device_id: String,
        issued_at: String,
        executed_at: String,
        status: u16,
        error: FailedError,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct FailedError {
    pub code: ErrorCode,
    pub message: String,
}

impl Reply {
    pub fn refused(
        command_id: Option<String>,
        device_id: &str,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> Reply {
        Reply::Refused {
            command_id,
            device_id: device_id.to_owned(),
            status: code.status(),
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("replies serialise")
    }
}

/// Formats Unix seconds as RFC 3339 UTC; it lives with the clock, which the drivers use too.
pub use crate::model::clock::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_786_200), "2026-11-27T13:30:00Z");
    }

    #[test]
    fn refused_reply_has_the_platform_error_shape() {
        let r = Reply::refused(Some("c1".into()), "gw", ErrorCode::Forbidden, "nope");
        let v: serde_json::Value = serde_json::from_slice(&r.to_bytes()).unwrap();
        assert_eq!(v["type"], "command.refused");
        assert_eq!(v["commandId"], "c1");
        assert_eq!(v["status"], 403);
        assert_eq!(v["code"], "FORBIDDEN");
        assert_eq!(v["message"], "nope");
    }

    #[test]
    fn driver_failure_codes_have_their_documented_names_and_statuses() {
        for (code, name, status) in [
            (ErrorCode::DeviceBusy, "DEVICE_BUSY", 409),
            (ErrorCode::DeviceUnavailable, "DEVICE_UNAVAILABLE", 503),
            (ErrorCode::CommandFailed, "COMMAND_FAILED", 500),
            (ErrorCode::CommandTimeout, "COMMAND_TIMEOUT", 504),
            (ErrorCode::LimitExceeded, "LIMIT_EXCEEDED", 422),
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), name);
            assert_eq!(code.status(), status, "{name}");
        }
    }
}
