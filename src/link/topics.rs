//! The MQTT topic layout (docs/PROTOCOL.md, "Topics").
//!
//! Everything a device publishes or receives lives under `texture/v1/devices/{device_id}/`, so a
//! broker ACL of `pattern read`/`pattern write` lines on `texture/v1/devices/%u/...` confines each
//! gateway to its own subtree, reading only its inbound topics and writing only its outbound
//! ones (docs/PROTOCOL.md 2.1). The only topic outside it is the platform-wide trust bundle,
//! which devices may read but never write.
//!
//! Inbound topics are parsed once, where a message arrives ([`Topics::classify`] into an
//! [`InboundTopic`]), so whatever routes messages matches on a kind instead of comparing strings
//! it has to rebuild.

use crate::model::gateway::GatewayId;

/// Root of every topic. The version segment lets a future wire format live beside this one.
pub const ROOT: &str = "texture/v1";

/// The topics a device subscribes to: what the platform may send it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InboundTopic {
    /// The platform-wide, retained trust bundle.
    TrustBundle,
    /// The signed owner binding answering a pairing request.
    PairingBinding,
    /// The signed site policy narrowing the installer's limits (retained).
    SitePolicy,
    /// Attested commands.
    Commands,
}

impl InboundTopic {
    /// Every inbound topic, in the order the device subscribes to them.
    pub const ALL: [InboundTopic; 4] = [
        InboundTopic::TrustBundle,
        InboundTopic::PairingBinding,
        InboundTopic::SitePolicy,
        InboundTopic::Commands,
    ];
}

/// The topics of one device.
#[derive(Debug, Clone)]
pub struct Topics {
    base: String,
}

impl Topics {
    pub fn new(device: &GatewayId) -> Self {
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

    /// Platform → device, retained: the signed site policy (docs/PROTOCOL.md 4.10).
    pub fn site_policy(&self) -> String {
        format!("{}/safety/policy", self.base)
    }

    /// The platform-wide, retained trust bundle (read-only for devices).
    pub fn trust_bundle() -> String {
        format!("{ROOT}/trust/bundle")
    }

    /// The topic string of one of this device's inbound topics.
    pub(crate) fn inbound(&self, kind: InboundTopic) -> String {
        match kind {
            InboundTopic::TrustBundle => Self::trust_bundle(),
            InboundTopic::PairingBinding => self.pairing_binding(),
            InboundTopic::SitePolicy => self.site_policy(),
            InboundTopic::Commands => self.commands(),
        }
    }

    /// Which of this device's inbound topics `topic` is; `None` for anything else (another
    /// device's topics, our own outbound ones, a topic we never subscribed to).
    pub(crate) fn classify(&self, topic: &str) -> Option<InboundTopic> {
        if topic.strip_prefix(ROOT).and_then(|t| t.strip_prefix('/')) == Some("trust/bundle") {
            return Some(InboundTopic::TrustBundle);
        }
        match topic.strip_prefix(self.base.as_str())?.strip_prefix('/')? {
            "pairing/binding" => Some(InboundTopic::PairingBinding),
            "safety/policy" => Some(InboundTopic::SitePolicy),
            "commands" => Some(InboundTopic::Commands),
            _ => None,
        }
    }

    /// The topics the device subscribes to after every CONNACK.
    pub fn subscriptions(&self) -> Vec<String> {
        InboundTopic::ALL.map(|kind| self.inbound(kind)).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_topic_is_under_its_own_subtree() {
        let t = Topics::new(&GatewayId::parse("gw-7").unwrap());
        for topic in [
            t.status(),
            t.commands(),
            t.replies(),
            t.telemetry(),
            t.capabilities(),
            t.pairing_request(),
            t.pairing_binding(),
            t.site_policy(),
        ] {
            assert!(topic.starts_with("texture/v1/devices/gw-7/"), "{topic}");
        }
    }

    #[test]
    fn each_inbound_topic_is_classified_as_itself() {
        let t = Topics::new(&GatewayId::parse("gw-7").unwrap());
        assert_eq!(
            t.classify("texture/v1/trust/bundle"),
            Some(InboundTopic::TrustBundle)
        );
        assert_eq!(
            t.classify("texture/v1/devices/gw-7/pairing/binding"),
            Some(InboundTopic::PairingBinding)
        );
        assert_eq!(
            t.classify("texture/v1/devices/gw-7/safety/policy"),
            Some(InboundTopic::SitePolicy)
        );
        assert_eq!(
            t.classify("texture/v1/devices/gw-7/commands"),
            Some(InboundTopic::Commands)
        );
        for kind in InboundTopic::ALL {
            assert_eq!(t.classify(&t.inbound(kind)), Some(kind));
        }
    }

    #[test]
    fn subscriptions_are_the_inbound_topics_in_their_order() {
        let t = Topics::new(&GatewayId::parse("gw-7").unwrap());
        assert_eq!(
            t.subscriptions(),
            [
                "texture/v1/trust/bundle",
                "texture/v1/devices/gw-7/pairing/binding",
                "texture/v1/devices/gw-7/safety/policy",
                "texture/v1/devices/gw-7/commands",
            ]
        );
    }

    #[test]
    fn outbound_foreign_and_look_alike_topics_are_not_inbound() {
        let t = Topics::new(&GatewayId::parse("gw-7").unwrap());
        for topic in [
            t.status(),
            t.replies(),
            t.telemetry(),
            t.capabilities(),
            t.pairing_request(),
            // Another device's inbound topics, including one whose id extends ours.
            "texture/v1/devices/gw-8/commands".into(),
            "texture/v1/devices/gw-70/commands".into(),
            "texture/v1/devices/gw-7commands".into(),
            "texture/v1/devices/gw-7/commands/extra".into(),
            "texture/v1/devices/gw-7/safety/policy/extra".into(),
            "texture/v1/devices/gw-7/safety".into(),
            "texture/v1/devices/gw-8/safety/policy".into(),
            "texture/v1/devices/gw-7/".into(),
            "texture/v1/devices/gw-7".into(),
            "texture/v1/trust/bundle/".into(),
            "texture/v2/trust/bundle".into(),
            "texture/v1/devices/+/commands".into(),
            "texture/v1/devices/gw-7/#".into(),
            String::new(),
        ] {
            assert_eq!(t.classify(&topic), None, "{topic}");
        }
    }
}
