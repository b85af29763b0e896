//! `[pairing]`: how long a pairing code lives and what the QR code says.

use serde::{Deserialize, Serialize};

use super::Rejection;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PairingSettings {
    /// How long a pairing code stays valid.
    #[serde(default = "default_code_ttl_secs")]
    pub code_ttl_secs: u64,
    /// What `texture-agent pair` encodes in its QR code, for the Connect page to scan.
    /// `{device_id}` and `{code}` are substituted.
    #[serde(default = "default_qr_uri")]
    pub qr_uri: String,
}

impl Default for PairingSettings {
    fn default() -> Self {
        PairingSettings {
            code_ttl_secs: default_code_ttl_secs(),
            qr_uri: default_qr_uri(),
        }
    }
}

fn default_code_ttl_secs() -> u64 {
    600
}
fn default_qr_uri() -> String {
    "texture-pair:{device_id}:{code}".into()
}

impl PairingSettings {
    /// A code must live long enough to be typed, and the QR code must carry it.
    pub(crate) fn validate(&self) -> Result<(), Rejection> {
        if !(60..=3_600).contains(&self.code_ttl_secs) {
            return Err(Rejection::new(
                "pairing.code_ttl_secs",
                format!("expected 60..=3600 seconds, found {}", self.code_ttl_secs),
            ));
        }
        if !self.qr_uri.contains("{code}") {
            return Err(Rejection::new(
                "pairing.qr_uri",
                "must contain the {code} placeholder",
            ));
        }
        Ok(())
    }
}
