//! Replies to commands: what the device tells the platform about each command it received.
//!
//! The body mirrors the platform's API errors (`{code, message}`) plus an HTTP-like `status`, so
//! platform engineers can map a device's answer straight onto the status of their API call.

use serde::Serialize;

/// The machine-readable error codes a device can answer with (docs/PROTOCOL.md, "Errors").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// 400: the command or its input is malformed.
    ValidationError,
    /// 401: no valid platform signature (malformed, wrong algorithm, unknown key, forged).
    Unauthenticated,
    /// 403: validly signed, but this key may not command this device.
    Forbidden,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::ValidationError => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden => 403,
        }
    }
}

/// A refusal, published on the device's reply topic.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorReply {
    #[serde(rename = "commandId")]
    pub command_id: Option<String>,
    pub status: u16,
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorReply {
    pub fn new(command_id: Option<String>, code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            command_id,
            status: code.status(),
            code,
            message: message.into(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("replies serialise")
    }
}
