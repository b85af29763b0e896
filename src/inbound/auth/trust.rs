//! Which platform keys the device trusts, and which API keys are revoked.
//!
//! The chain is short on purpose: a root public key pinned in the configuration at install time
//! signs a versioned *trust bundle*, which lists the platform's current signing keys by `kid`
//! and the revoked API key ids. The platform publishes the bundle retained, so every device gets
//! the newest one on each (re)connect. A bundle is accepted only if the root signed it, its
//! version is strictly higher than the highest one ever accepted (no rollback to a bundle from
//! before a revocation) and it has not expired. It is then written atomically, so after a power
//! cut the device holds either the old bundle or the new one.
//!
//! The highest accepted version is kept a second time, apart from the bundle, in
//! `trust-state.json` (with the bundle's `iat` and SHA-256 and the root it chains to). Losing or
//! damaging the stored bundle therefore never lowers the version a new bundle must beat: the
//! store fails closed (no bundle in force, so no command runs) and accepts only a newer bundle,
//! or the very bundle it lost. If the stored bundle *and* the state record are unusable, the
//! highest version is unknown and no bundle is accepted until an operator resets the trust state
//! (docs/OPERATIONS.md).
//!
//! The bundle is written before the state record, so the record never names a version the
//! bundle file has not reached; at start-up the record is brought up to a stored bundle that is
//! newer than it.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use base64::Engine;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::claims::{TrustBundleClaims, TRUST_BUNDLE_TYP};
use super::jws;
use crate::storage;

/// Largest trust bundle accepted, checked before parsing.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024;
/// File in the state directory holding the accepted bundle, exactly as received.
pub const BUNDLE_FILE: &str = "trust-bundle.jws";
/// File in the state directory recording the highest accepted version (see the module docs).
pub const STATE_FILE: &str = "trust-state.json";

/// The record in [`STATE_FILE`]: what the newest accepted bundle was, kept apart from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TrustState {
    /// The root public key (unpadded base64url) the bundle chained to: versions count per root.
    root: String,
    version: u64,
    issued_at: u64,
    /// Lowercase hex SHA-256 of the bundle's bytes, so the lost bundle itself can be re-accepted.
    sha256: String,
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn root_text(root: &VerifyingKey) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(root.as_bytes())
}

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
    #[error(
        "the stored trust state is unusable ({0}), so the highest accepted version is unknown; \
         no bundle is accepted until the trust state is reset"
    )]
    StateUnknown(String),
}

/// What the store knows about the highest version it has accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Highest {
    /// Nothing was ever accepted under this root (a fresh install, or a new root).
    Nothing,
    Known(TrustState),
    /// The record and the bundle are both unusable: fail closed (see the module docs).
    Unknown(String),
}

/// The pinned root, the current bundle, and where it is persisted.
#[derive(Debug)]
pub struct TrustStore {
    root: VerifyingKey,
    issuer: String,
    path: PathBuf,
    state_path: PathBuf,
    current: Option<TrustBundle>,
    highest: Highest,
    /// A problem with the stored bundle found at open, for `status` and the log.
    problem: Option<String>,
}

impl TrustStore {
    /// Opens the store, re-verifying any persisted bundle against the root. Reads only: `status`
    /// opens it too (see [`TrustStore::persist_state`]).
    ///
    /// A stored bundle that cannot be read or no longer verifies is not in force (so every
    /// command is refused until a bundle is accepted), but the version it had stays the one to
    /// beat, from `trust-state.json`.
    pub fn open(root: VerifyingKey, issuer: &str, state_dir: &Path) -> TrustStore {
        let mut store = TrustStore {
            root,
            issuer: issuer.to_owned(),
            path: state_dir.join(BUNDLE_FILE),
            state_path: state_dir.join(STATE_FILE),
            current: None,
            highest: Highest::Nothing,
            problem: None,
        };
        // Set when the record names another root: the root was reconfigured, so a stored
        // bundle that no longer verifies is expected rather than a sign of damage.
        let mut root_changed = false;
        let recorded = match storage::read_json::<TrustState>(&store.state_path) {
            Ok(Some(state)) if state.root == root_text(&store.root) => Ok(Some(state)),
            Ok(Some(state)) => {
                tracing::warn!(
                    recorded_root = %state.root,
                    "trust state belongs to another root key; versions start again for this one"
                );
                root_changed = true;
                Ok(None)
            }
            Ok(None) => Ok(None),
            Err(error) => Err(error.to_string()),
        };
        let stored = match std::fs::read(&store.path) {
            Ok(bytes) => match store.verify(&bytes) {
                Ok(bundle) => Ok(Some((bundle, sha256_hex(&bytes)))),
                Err(error) => Err(format!("stored trust bundle does not verify: {error}")),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(format!("stored trust bundle unreadable: {error}")),
        };
        if let Err(problem) = &stored {
            tracing::warn!(path = %store.path.display(), %problem, "stored trust bundle not in force");
            store.problem = Some(problem.clone());
        }
        store.highest = match (recorded, stored) {
            // The bundle is written first, so a stored bundle newer than the record wins.
            (Ok(Some(state)), Ok(Some((bundle, sha256)))) if bundle.version >= state.version => {
                let state = store.state_of(&bundle, sha256);
                store.current = Some(bundle);
                Highest::Known(state)
            }
            (Ok(Some(state)), Ok(Some(_))) => {
                let problem = format!(
                    "stored trust bundle is older than version {} recorded as accepted",
                    state.version
                );
                tracing::warn!(%problem, "stored trust bundle not in force");
                store.problem = Some(problem);
                Highest::Known(state)
            }
            (Ok(Some(state)), Ok(None) | Err(_)) => Highest::Known(state),
            (Ok(None) | Err(_), Ok(Some((bundle, sha256)))) => {
                let state = store.state_of(&bundle, sha256);
                store.current = Some(bundle);
                Highest::Known(state)
            }
            (Ok(None), Ok(None)) => Highest::Nothing,
            (Ok(None), Err(_)) if root_changed => Highest::Nothing,
            (Ok(None), Err(problem)) => Highest::Unknown(problem),
            (Err(problem), Ok(None) | Err(_)) => Highest::Unknown(problem),
        };
        if let Highest::Unknown(problem) = &store.highest {
            tracing::error!(%problem, "trust state unknown: no trust bundle will be accepted");
        }
        store
    }

    fn state_of(&self, bundle: &TrustBundle, sha256: String) -> TrustState {
        TrustState {
            root: root_text(&self.root),
            version: bundle.version,
            issued_at: bundle.issued_at,
            sha256,
        }
    }

    /// Writes `trust-state.json` when it lags the stored bundle (an install from before the
    /// record existed, or a stop between writing the bundle and the record). Called once by the
    /// daemon at start.
    pub fn persist_state(&self) -> Result<(), storage::StorageError> {
        let Highest::Known(state) = &self.highest else {
            return Ok(());
        };
        match storage::read_json::<TrustState>(&self.state_path) {
            Ok(Some(recorded)) if &recorded == state => Ok(()),
            _ => storage::write_json(&self.state_path, state, 0o600),
        }
    }

    /// The highest accepted version (0 when none), also while no bundle is in force.
    pub fn highest_version(&self) -> u64 {
        match &self.highest {
            Highest::Known(state) => state.version,
            Highest::Nothing | Highest::Unknown(_) => 0,
        }
    }

    /// The `iat` of the newest bundle ever accepted: platform-signed evidence of how late it is
    /// at least (the time floor, docs/PROTOCOL.md 8).
    pub fn highest_issued_at(&self) -> u64 {
        match &self.highest {
            Highest::Known(state) => state.issued_at,
            Highest::Nothing | Highest::Unknown(_) => 0,
        }
    }

    /// Why no stored bundle is in force although one was stored, or why none can be accepted.
    pub fn problem(&self) -> Option<&str> {
        match &self.highest {
            Highest::Unknown(problem) => Some(problem),
            _ => self.problem.as_deref(),
        }
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
        let sha256 = sha256_hex(bytes);
        let highest = match &self.highest {
            Highest::Unknown(problem) => return Err(BundleRejected::StateUnknown(problem.clone())),
            Highest::Nothing => None,
            Highest::Known(state) => Some(state),
        };
        let stored = highest.map_or(0, |s| s.version);
        if bundle.version <= stored {
            let same = highest.is_some_and(|s| s.version == bundle.version && s.sha256 == sha256);
            if !same {
                return Err(BundleRejected::NotNewer {
                    offered: bundle.version,
                    stored,
                });
            }
            if self.current.is_some() {
                return Ok(None);
            }
            // The very bundle whose stored copy was lost: take it back (expiry still applies).
        }
        if bundle.expires_at <= now {
            return Err(BundleRejected::Expired {
                exp: bundle.expires_at,
                now,
            });
        }
        storage::write_atomic(&self.path, bytes, 0o600)?;
        let state = self.state_of(&bundle, sha256);
        // The bundle is in force once written. A failure to write the record cannot undo that;
        // it is logged, and the next start brings the record up to the stored bundle.
        if let Err(error) = storage::write_json(&self.state_path, &state, 0o600) {
            tracing::error!(%error, "could not record the accepted trust bundle's version");
        }
        let version = bundle.version;
        self.highest = Highest::Known(state);
        self.current = Some(bundle);
        self.problem = None;
        Ok(Some(version))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::platform::PlatformSigner;

    const NOW: u64 = 1_800_000_000;

    fn root(signer: &PlatformSigner) -> VerifyingKey {
        jws::public_key_from_base64(&signer.root_public_key()).unwrap()
    }

    fn store(signer: &PlatformSigner, dir: &Path) -> TrustStore {
        TrustStore::open(root(signer), &signer.issuer, dir)
    }

    fn bundle(signer: &PlatformSigner, version: u64) -> String {
        signer.trust_bundle(version, NOW - 10 + version, NOW + 3_600, &[])
    }

    #[test]
    fn a_damaged_stored_bundle_fails_closed_and_keeps_its_version() {
        let d = tempfile::tempdir().unwrap();
        let signer = PlatformSigner::generate("k1");
        let mut s = store(&signer, d.path());
        s.offer(bundle(&signer, 7).as_bytes(), NOW).unwrap();
        std::fs::write(d.path().join(BUNDLE_FILE), b"garbage").unwrap();

        let mut s = store(&signer, d.path());
        assert!(
            s.current().is_none(),
            "a bundle that does not verify is not in force"
        );
        assert_eq!(s.highest_version(), 7);
        assert!(s.problem().unwrap().contains("does not verify"));
        // An older bundle is a rollback, whatever happened to the file.
        assert!(matches!(
            s.offer(bundle(&signer, 6).as_bytes(), NOW),
            Err(BundleRejected::NotNewer {
                offered: 6,
                stored: 7
            })
        ));
        // The very bundle that was lost is taken back, and a newer one is accepted.
        assert_eq!(
            s.offer(bundle(&signer, 7).as_bytes(), NOW).unwrap(),
            Some(7)
        );
        assert!(s.current().is_some());
        assert_eq!(
            s.offer(bundle(&signer, 8).as_bytes(), NOW).unwrap(),
            Some(8)
        );
    }

    #[test]
    fn an_unreadable_stored_bundle_fails_closed() {
        let d = tempfile::tempdir().unwrap();
        let signer = PlatformSigner::generate("k1");
        let mut s = store(&signer, d.path());
        s.offer(bundle(&signer, 3).as_bytes(), NOW).unwrap();
        // A directory where the file should be: reading it fails with an I/O error.
        std::fs::remove_file(d.path().join(BUNDLE_FILE)).unwrap();
        std::fs::create_dir(d.path().join(BUNDLE_FILE)).unwrap();
        let mut s = store(&signer, d.path());
        assert!(s.current().is_none());
        assert!(s.problem().unwrap().contains("unreadable"));
        assert!(s.offer(bundle(&signer, 2).as_bytes(), NOW).is_err());
    }

    #[test]
    fn a_stored_bundle_older_than_the_record_is_not_in_force() {
        let d = tempfile::tempdir().unwrap();
        let signer = PlatformSigner::generate("k1");
        let mut s = store(&signer, d.path());
        s.offer(bundle(&signer, 1).as_bytes(), NOW).unwrap();
        let v1 = std::fs::read(d.path().join(BUNDLE_FILE)).unwrap();
        s.offer(bundle(&signer, 2).as_bytes(), NOW).unwrap();
        // Someone puts the old bundle back in place.
        std::fs::write(d.path().join(BUNDLE_FILE), v1).unwrap();
        let s = store(&signer, d.path());
        assert!(s.current().is_none());
        assert_eq!(s.highest_version(), 2);
    }

    #[test]
    fn losing_both_bundle_and_record_accepts_nothing() {
        let d = tempfile::tempdir().unwrap();
        let signer = PlatformSigner::generate("k1");
        let mut s = store(&signer, d.path());
        s.offer(bundle(&signer, 4).as_bytes(), NOW).unwrap();
        std::fs::write(d.path().join(BUNDLE_FILE), b"garbage").unwrap();
        std::fs::write(d.path().join(STATE_FILE), b"{torn").unwrap();
        let mut s = store(&signer, d.path());
        assert!(matches!(
            s.offer(bundle(&signer, 9).as_bytes(), NOW),
            Err(BundleRejected::StateUnknown(_))
        ));
        // The record alone damaged is repaired from the bundle, which is written first.
        let d = tempfile::tempdir().unwrap();
        let mut s = store(&signer, d.path());
        s.offer(bundle(&signer, 4).as_bytes(), NOW).unwrap();
        std::fs::write(d.path().join(STATE_FILE), b"{torn").unwrap();
        let s = store(&signer, d.path());
        assert_eq!(s.highest_version(), 4);
        assert!(s.current().is_some());
        s.persist_state().unwrap();
        assert!(storage::read_json::<TrustState>(&d.path().join(STATE_FILE))
            .unwrap()
            .is_some());
    }

    #[test]
    fn an_install_from_before_the_record_gets_one_at_start() {
        let d = tempfile::tempdir().unwrap();
        let signer = PlatformSigner::generate("k1");
        let mut s = store(&signer, d.path());
        s.offer(bundle(&signer, 5).as_bytes(), NOW).unwrap();
        std::fs::remove_file(d.path().join(STATE_FILE)).unwrap();
        let s = store(&signer, d.path());
        assert!(!d.path().join(STATE_FILE).exists(), "open only reads");
        s.persist_state().unwrap();
        std::fs::remove_file(d.path().join(BUNDLE_FILE)).unwrap();
        let s = store(&signer, d.path());
        assert_eq!(s.highest_version(), 5);
        assert_eq!(s.highest_issued_at(), NOW - 5);
    }

    #[test]
    fn a_new_root_starts_its_own_versions() {
        let d = tempfile::tempdir().unwrap();
        let old = PlatformSigner::generate("k1");
        let mut s = store(&old, d.path());
        s.offer(bundle(&old, 9).as_bytes(), NOW).unwrap();
        let new = PlatformSigner::generate("k2");
        let mut s = store(&new, d.path());
        assert_eq!(s.highest_version(), 0);
        assert_eq!(s.offer(bundle(&new, 1).as_bytes(), NOW).unwrap(), Some(1));
    }

    #[test]
    fn a_repeated_kid_rejects_the_bundle() {
        let d = tempfile::tempdir().unwrap();
        let mut signer = PlatformSigner::generate("k1");
        signer.add_key("k1");
        let mut s = store(&signer, d.path());
        let error = s.offer(bundle(&signer, 1).as_bytes(), NOW).unwrap_err();
        assert!(error.to_string().contains("listed twice"), "{error}");
    }
}
