//! The gateway's identity on the platform.
//!
//! The platform calls it the gateway's *device id* (`device_id` in the configuration,
//! `deviceId` on the wire, the `{device_id}` topic level); inside the agent it is a
//! [`GatewayId`], so it is never confused with the id of an appliance behind the gateway
//! (`model::device`).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The gateway's device id: at most 64 characters from `[A-Za-z0-9._-]`.
///
/// The id is used verbatim as the MQTT client id and as a topic level, so anything that could
/// change the meaning of a topic (`/`, `+`, `#`), or that some brokers refuse in client ids, is
/// rejected when the configuration is parsed rather than when the broker disconnects us.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct GatewayId(String);

/// Why a string is not a valid [`GatewayId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidGatewayId {
    #[error("device id is empty")]
    Empty,
    #[error("device id is {0} characters long, the maximum is 64")]
    TooLong(usize),
    #[error("device id contains {0:?}; only letters, digits, '.', '_' and '-' are allowed")]
    BadCharacter(char),
}

impl GatewayId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, InvalidGatewayId> {
        if s.is_empty() {
            return Err(InvalidGatewayId::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(InvalidGatewayId::TooLong(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(InvalidGatewayId::BadCharacter(c));
        }
        Ok(GatewayId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for GatewayId {
    type Error = InvalidGatewayId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        GatewayId::parse(&s)
    }
}

impl From<GatewayId> for String {
    fn from(id: GatewayId) -> String {
        id.0
    }
}

impl fmt::Display for GatewayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_metacharacters_are_rejected() {
        for bad in ["a/b", "a+b", "a#", "gw 1", "ü"] {
            assert!(GatewayId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(GatewayId::parse(""), Err(InvalidGatewayId::Empty));
        assert_eq!(
            GatewayId::parse(&"x".repeat(65)),
            Err(InvalidGatewayId::TooLong(65))
        );
        assert_eq!(GatewayId::parse("gw-01.a_b").unwrap().as_str(), "gw-01.a_b");
    }
}
