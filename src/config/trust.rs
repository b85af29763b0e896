//! `[trust]`: the pinned root of command authorisation and the limits of its checks.
//!
//! The root key is parsed here, at load time, so that a typo in it stops `check-config` and
//! `run` at once instead of making the daemon refuse every command later.

use serde::{Deserialize, Serialize};

use super::Rejection;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSettings {
    /// The platform's root public key (Ed25519, 32 bytes, unpadded base64url), pinned at
    /// install time. It signs the trust bundles that list the platform's signing keys.
    pub root_public_key: String,
    /// The `iss` every attestation and trust bundle must carry.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// How far the device's and the platform's clocks may disagree.
    #[serde(default = "default_skew_secs")]
    pub max_clock_skew_secs: u64,
    /// Live command ids remembered for replay protection; when full, new commands are refused.
    #[serde(default = "default_replay_capacity")]
    pub replay_capacity: usize,
}

fn default_issuer() -> String {
    "texture-platform".into()
}
fn default_skew_secs() -> u64 {
    60
}
fn default_replay_capacity() -> usize {
    10_000
}

impl TrustSettings {
    pub(crate) fn validate(&self) -> Result<(), Rejection> {
        if let Err(problem) =
            crate::inbound::auth::jws::public_key_from_base64(&self.root_public_key)
        {
            return Err(Rejection::new(
                "trust.root_public_key",
                format!("expected an Ed25519 public key, found {problem}"),
            ));
        }
        if self.max_clock_skew_secs > 3_600 {
            return Err(Rejection::new(
                "trust.max_clock_skew_secs",
                format!(
                    "expected 0..=3600 seconds, found {}",
                    self.max_clock_skew_secs
                ),
            ));
        }
        if !(1..=1_000_000).contains(&self.replay_capacity) {
            return Err(Rejection::new(
                "trust.replay_capacity",
                format!(
                    "expected 1..=1000000 entries, found {}",
                    self.replay_capacity
                ),
            ));
        }
        if self.issuer.is_empty() {
            return Err(Rejection::new(
                "trust.issuer",
                "expected a non-empty issuer name",
            ));
        }
        Ok(())
    }
}
