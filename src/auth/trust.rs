//! Which platform keys the device trusts, and which API keys are revoked.
//!
//! The chain is short on purpose: a root public key pinned in the configuration at install time
//! signs a versioned *trust bundle*, which lists the platform's current signing keys by `kid`
//! and the revoked API key ids. The platform publishes the bundle retained, so every device gets
//! the newest one on each (re)connect. A bundle is accepted only if the root signed it, its
//! version is strictly higher than the stored one (no rollback to a bundle from before a
//! revocation) and it has not expired. It is then written atomically, so after a power cut the
//! device holds either the old bundle or the new one.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;

use super::claims::{TrustBundleClaims, TRUST_BUNDLE_TYP};
use super::jws;
use crate::storage;

/// Largest trust bundle accepted, checked before parsing.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024;
/// File in the state directory holding the accepted bundle, exactly as received.
pub const BUNDLE_FILE: &str = "trust-bundle.jws";

/// An accepted, verified bundle, indexed for lookups.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    pub version: u64,
    pub issued_at: u64,
    pub expires_at: u64,
    keys: HashMap<String, VerifyingKey>,
    revoked: HashSet<String>,
}

impl TrustBundle {
    pub fn key(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }
    pub fn is_revoked(&self, api_key_id: &str) -> bool {
        self.revoked.contains(api_key_id)
    }
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

/// Why a bundle was not accepted. The stored bundle is untouched in every case.
#[derive(Debug, thiserror::Error)]
pub enum BundleRejected {
    #[error("trust bundle signature: {0}")]
    Signature(#[from] jws::JwsError),
    #[error("trust bundle payload is malformed: {0}")]
    Malformed(String),
    #[error("trust bundle issuer {found:?} is not {expected:?}")]
    Issuer { found: String, expected: String },
    #[error("trust bundle version {offered} is not newer than the stored version {stored}")]
    NotNewer { offered: u64, stored: u64 },
    #[error("trust bundle expired at {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("trust bundle key {kid:?}: {problem}")]
    BadKey { kid: String, problem: String },
    #[error("could not persist the trust bundle: {0}")]
    Storage(#[from] storage::StorageError),
}

/// The pinned root, the current bundle, and where it is persisted.
#[derive(Debug)]
pub struct TrustStore {
    root: VerifyingKey,
    issuer: String,
    path: PathBuf,
    current: Option<TrustBundle>,
}

impl TrustStore {
    /// Opens the store, re-verifying any persisted bundle against the root.
    ///
    /// A stored bundle that no longer verifies (say the root was rotated by reinstalling) is
    /// ignored with a warning; the device then waits for the platform's retained bundle.
    pub fn open(root: VerifyingKey, issuer: &str, state_dir: &Path) -> TrustStore {
        let mut store = TrustStore {
            root,
            issuer: issuer.to_owned(),
            path: state_dir.join(BUNDLE_FILE),
            current: None,
        };
        match std::fs::read(&store.path) {
            Ok(bytes) => match store.verify(&bytes) {
                Ok(bundle) => store.current = Some(bundle),
                Err(error) => {
                    tracing::warn!(%error, path = %store.path.display(), "stored trust bundle ignored")
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                tracing::warn!(%error, path = %store.path.display(), "stored trust bundle unreadable")
            }
        }
        store
    }

    pub fn current(&self) -> Option<&TrustBundle> {
        self.current.as_ref()
    }

    /// Verifies a bundle's signature and content, without the version and expiry rules.
    fn verify(&self, bytes: &[u8]) -> Result<TrustBundle, BundleRejected> {
        let verified = jws::verify(bytes, MAX_BUNDLE_BYTES, TRUST_BUNDLE_TYP, |_| {
            Some(&self.root)
        })?;
        let claims: TrustBundleClaims = serde_json::from_slice(&verified.payload)
            .map_err(|e| BundleRejected::Malformed(e.to_string()))?;
        if claims.iss != self.issuer {
            return Err(BundleRejected::Issuer {
                found: claims.iss,
                expected: self.issuer.clone(),
            });
        }
        let mut keys = HashMap::with_capacity(claims.keys.len());
        for k in &claims.keys {
            let key = jws::public_key_from_base64(&k.public_key).map_err(|problem| {
                BundleRejected::BadKey {
                    kid: k.kid.clone(),
                    problem,
                }
            })?;
            if keys.insert(k.kid.clone(), key).is_some() {
                return Err(BundleRejected::BadKey {
                    kid: k.kid.clone(),
                    problem: "listed twice".into(),
                });
            }
        }
        Ok(TrustBundle {
            version: claims.version,
            issued_at: claims.iat,
            expires_at: claims.exp,
            keys,
            revoked: claims.revoked_api_keys.into_iter().collect(),
        })
    }

    /// Offers a bundle received from the platform. On success it is persisted and in force.
    ///
    /// `Ok(None)` means it is the very bundle already held (the retained copy arriving again on
    /// reconnect), which is not worth a warning.
    pub fn offer(&mut self, bytes: &[u8], now: u64) -> Result<Option<u64>, BundleRejected> {
        let bundle = self.verify(bytes)?;
        let stored = self.current.as_ref().map_or(0, |b| b.version);
        if bundle.version <= stored {
            if bundle.version == stored && std::fs::read(&self.path).is_ok_and(|b| b == bytes) {
                return Ok(None);
            }
            return Err(BundleRejected::NotNewer {
                offered: bundle.version,
                stored,
            });
        }
        if bundle.expires_at <= now {
            return Err(BundleRejected::Expired {
                exp: bundle.expires_at,
                now,
            });
        }
        storage::write_atomic(&self.path, bytes, 0o600)?;
        let version = bundle.version;
        self.current = Some(bundle);
        Ok(Some(version))
    }
}
