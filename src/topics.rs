//! The MQTT topic layout (docs/PROTOCOL.md, "Topics").
//!
//! Everything a device publishes or receives lives under `texture/v1/devices/{device_id}/`, so a
//! broker ACL of `pattern read`/`pattern write` lines on `texture/v1/devices/%u/...` confines each
//! gateway to its own subtree, reading only its inbound topics and writing only its outbound
//! ones (docs/PROTOCOL.md 2.1). The only topic outside it is the platform-wide trust bundle,
//! which devices may read but never write.

use crate::device::DeviceId;

/// Root of every topic. The version segment lets a future wire format live beside this one.
pub const ROOT: &str = "texture/v1";

/// The topics of one device.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(device: &DeviceId) -> Self {
        Topics {
            base: format!("{ROOT}/devices/{device}"),
        }
    }

    /// Retained `online`/`offline` presence (birth, last will, clean shutdown).
    pub fn status(&self) -> String {
        format!("{}/status", self.base)
    }

    /// Platform → device: attested commands.
    pub fn commands(&self) -> String {
        format!("{}/commands", self.base)
    }

    /// Device → platform: decisions and results for commands.
    pub fn replies(&self) -> String {
        format!("{}/replies", self.base)
    }

    /// Device → platform, retained: the devices behind the gateway and their commands.
    pub fn capabilities(&self) -> String {
        format!("{}/capabilities", self.base)
    }

    /// Device → platform: telemetry batches.
    pub fn telemetry(&self) -> String {
        format!("{}/telemetry", self.base)
    }

    /// Device → platform: a pairing request (code commitment and device public key).
    pub fn pairing_request(&self) -> String {
        format!("{}/pairing/request", self.base)
    }

    /// Platform → device: the signed owner binding answering a pairing request.
    pub fn pairing_binding(&self) -> String {
        format!("{}/pairing/binding", self.base)
    }

    /// The platform-wide, retained trust bundle (read-only for devices).
    pub fn trust_bundle() -> String {
        format!("{ROOT}/trust/bundle")
    }

    /// The topics the device subscribes to after every CONNACK.
    pub fn subscriptions(&self) -> Vec<String> {
        vec![
            Self::trust_bundle(),
            self.pairing_binding(),
            self.commands(),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_topic_is_under_its_own_subtree() {
        let t = Topics::new(&DeviceId::parse("gw-7").unwrap());
        for topic in [
            t.status(),
            t.commands(),
            t.replies(),
            t.telemetry(),
            t.capabilities(),
            t.pairing_request(),
            t.pairing_binding(),
        ] {
            assert!(topic.starts_with("texture/v1/devices/gw-7/"), "{topic}");
        }
    }
}
