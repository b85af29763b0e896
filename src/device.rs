//! The gateway's identity on the platform.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A device id: at most 64 characters from `[A-Za-z0-9._-]`.
///
/// The id is used verbatim as the MQTT client id and as a topic level, so anything that could
/// change the meaning of a topic (`/`, `+`, `#`), or that some brokers refuse in client ids, is
/// rejected when the configuration is parsed rather than when the broker disconnects us.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct DeviceId(String);

/// Why a string is not a valid [`DeviceId`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidDeviceId {
    #[error("device id is empty")]
    Empty,
    #[error("device id is {0} characters long, the maximum is 64")]
    TooLong(usize),
    #[error("device id contains {0:?}; only letters, digits, '.', '_' and '-' are allowed")]
    BadCharacter(char),
}

impl DeviceId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, InvalidDeviceId> {
        if s.is_empty() {
            return Err(InvalidDeviceId::Empty);
        }
        if s.len() > Self::MAX_LEN {
            return Err(InvalidDeviceId::TooLong(s.len()));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
        {
            return Err(InvalidDeviceId::BadCharacter(c));
        }
        Ok(DeviceId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DeviceId {
    type Error = InvalidDeviceId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        DeviceId::parse(&s)
    }
}

impl From<DeviceId> for String {
    fn from(id: DeviceId) -> String {
        id.0
    }
}

impl fmt::Display for DeviceId {
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
            assert!(DeviceId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(DeviceId::parse(""), Err(InvalidDeviceId::Empty));
        assert_eq!(
            DeviceId::parse(&"x".repeat(65)),
            Err(InvalidDeviceId::TooLong(65))
        );
        assert_eq!(DeviceId::parse("gw-01.a_b").unwrap().as_str(), "gw-01.a_b");
    }
}
