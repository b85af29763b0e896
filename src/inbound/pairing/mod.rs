//! Pairing: binding the gateway to its owner through the platform's Connect flow.
//!
//! 1. `texture-agent pair` asks the daemon (over the control socket) to start a session. The
//!    daemon makes a [`code::PairingCode`], shows it to the person at the gateway, and publishes
//!    a [`PairingRequest`] carrying only a commitment to the code.
//! 2. The person types the code into the Connect page. The platform recomputes the commitment,
//!    finds the pending request, and answers with a signed owner binding naming the owner.
//! 3. The device accepts the binding only if a platform key from the trust bundle signed it, it
//!    names this device, echoes the pending commitment and has a higher version than the stored
//!    binding. It then stores it atomically; from then on that owner's scoped keys match.
//!
//! Every refusal leaves the stored binding exactly as it was.

pub mod code;
pub mod control;
pub(crate) mod session;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::inbound::auth::claims::{OwnerBindingClaims, OWNER_BINDING_TYP};
use crate::inbound::auth::jws;
use crate::inbound::auth::trust::TrustBundle;
use crate::storage::{self, StorageError};
use code::PairingCode;

/// File holding the accepted binding (or the unpaired tombstone).
pub const BINDING_FILE: &str = "owner-binding.json";
/// Largest binding accepted, checked before parsing.
pub const MAX_BINDING_BYTES: usize = 8 * 1024;
/// Pairing sessions allowed per [`ATTEMPT_WINDOW_SECS`].
pub const MAX_ATTEMPTS: usize = 5;
pub const ATTEMPT_WINDOW_SECS: u64 = 600;

/// The stored pairing state. `reference_id == None` with a version above zero is the tombstone
/// left by `agent:unpair`: it keeps the version, so an old binding cannot be replayed back in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    pub version: u64,
    pub reference_id: Option<String>,
    pub workspace_id: Option<String>,
    pub issued_at: u64,
    /// The signed binding as received, kept for audit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// What the device publishes to start pairing (docs/PROTOCOL.md, "Pairing").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PairingRequest {
    pub device_id: String,
    /// The device's Ed25519 public key, unpadded base64url.
    pub public_key: String,
    pub code_commitment: String,
    pub expires_at: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PairingError {
    #[error("too many pairing attempts; try again in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
}

/// Why a binding was refused.
#[derive(Debug, thiserror::Error)]
pub enum BindingRejected {
    #[error("no pairing session is pending")]
    NotPending,
    #[error("the pairing code expired at {expired_at}")]
    CodeExpired { expired_at: u64 },
    #[error("binding signature: {0}")]
    Signature(#[from] jws::JwsError),
    #[error("no trust bundle yet: cannot verify the binding")]
    NoTrustBundle,
    #[error("the trust bundle expired at {expired_at}: cannot verify the binding")]
    TrustBundleExpired { expired_at: u64 },
    #[error("binding payload is malformed: {0}")]
    Malformed(String),
    #[error("binding is for device {0:?}")]
    WrongDevice(String),
    #[error("binding does not echo the pending code commitment")]
    WrongCommitment,
    #[error("binding version {offered} is not newer than the stored version {stored}")]
    NotNewer { offered: u64, stored: u64 },
    #[error("binding names workspace {offered:?} but this device belongs to {configured:?}")]
    WrongWorkspace { offered: String, configured: String },
    #[error("could not store the binding: {0}")]
    Storage(#[from] StorageError),
}

#[derive(Debug)]
struct Pending {
    commitment: String,
    expires_at: u64,
}

/// The device's pairing state: the stored binding and any pending session.
#[derive(Debug)]
pub struct PairingState {
    device_id: String,
    path: PathBuf,
    binding: Binding,
    pending: Option<Pending>,
    attempts: VecDeque<u64>,
    code_ttl: u64,
}

impl PairingState {
    pub fn open(
        state_dir: &Path,
        device_id: &str,
        code_ttl: u64,
    ) -> Result<PairingState, StorageError> {
        let path = state_dir.join(BINDING_FILE);
        let binding = storage::read_json(&path)?.unwrap_or_default();
        Ok(PairingState {
            device_id: device_id.to_owned(),
            path,
            binding,
            pending: None,
            attempts: VecDeque::new(),
            code_ttl,
        })
    }

    pub fn binding(&self) -> &Binding {
        &self.binding
    }

    pub fn owner(&self) -> Option<&str> {
        self.binding.reference_id.as_deref()
    }

    /// Whether a session is pending and not yet expired at `now`.
    pub fn is_pending(&self, now: u64) -> bool {
        self.pending.as_ref().is_some_and(|p| p.expires_at > now)
    }

    /// When the pending session's code expires, if one is pending.
    pub fn pending_expires_at(&self) -> Option<u64> {
        self.pending.as_ref().map(|p| p.expires_at)
    }

    /// Starts a pairing session: a new code (replacing any pending one) and the request to send.
    pub fn start(
        &mut self,
        public_key: &str,
        now: u64,
    ) -> Result<(PairingCode, PairingRequest), PairingError> {
        while self
            .attempts
            .front()
            .is_some_and(|&t| t + ATTEMPT_WINDOW_SECS <= now)
        {
            self.attempts.pop_front();
        }
        if self.attempts.len() >= MAX_ATTEMPTS {
            let oldest = self.attempts.front().copied().unwrap_or(now);
            return Err(PairingError::RateLimited {
                retry_after_secs: (oldest + ATTEMPT_WINDOW_SECS).saturating_sub(now).max(1),
            });
        }
        self.attempts.push_back(now);
        let code = PairingCode::generate();
        let commitment = code.commitment(&self.device_id);
        let expires_at = now + self.code_ttl;
        self.pending = Some(Pending {
            commitment: commitment.clone(),
            expires_at,
        });
        let request = PairingRequest {
            device_id: self.device_id.clone(),
            public_key: public_key.to_owned(),
            code_commitment: commitment,
            expires_at,
        };
        Ok((code, request))
    }

    /// Checks a binding from the platform and, if every check passes, stores it atomically.
    pub fn accept_binding(
        &mut self,
        token: &[u8],
        trust: Option<&TrustBundle>,
        issuer: &str,
        configured_workspace: Option<&str>,
        now: u64,
    ) -> Result<&Binding, BindingRejected> {
        let pending = self.pending.as_ref().ok_or(BindingRejected::NotPending)?;
        if pending.expires_at <= now {
            return Err(BindingRejected::CodeExpired {
                expired_at: pending.expires_at,
            });
        }
        let trust = trust.ok_or(BindingRejected::NoTrustBundle)?;
        // The same rule as for commands: keys from an expired bundle vouch for nothing.
        if trust.expires_at <= now {
            return Err(BindingRejected::TrustBundleExpired {
                expired_at: trust.expires_at,
            });
        }
        let verified = jws::verify(token, MAX_BINDING_BYTES, OWNER_BINDING_TYP, |kid| {
            kid.and_then(|k| trust.key(k))
        })
        .map_err(|e| match e {
            // Signed, but ambiguous: a payload problem, not a signature one.
            jws::JwsError::RepeatedMember { .. } => BindingRejected::Malformed(e.to_string()),
            e => BindingRejected::Signature(e),
        })?;
        let claims: OwnerBindingClaims = serde_json::from_slice(&verified.payload)
            .map_err(|e| BindingRejected::Malformed(e.to_string()))?;
        if Some(claims.kid.as_str()) != verified.header.kid.as_deref() || claims.iss != issuer {
            return Err(BindingRejected::Malformed(
                "kid or iss does not match".into(),
            ));
        }
        if claims.device_id != self.device_id {
            return Err(BindingRejected::WrongDevice(claims.device_id));
        }
        if claims.code_commitment != pending.commitment {
            return Err(BindingRejected::WrongCommitment);
        }
        if claims.version <= self.binding.version {
            return Err(BindingRejected::NotNewer {
                offered: claims.version,
                stored: self.binding.version,
            });
        }
        if let Some(configured) = configured_workspace.filter(|c| *c != claims.workspace_id) {
            return Err(BindingRejected::WrongWorkspace {
                offered: claims.workspace_id,
                configured: configured.to_owned(),
            });
        }
        let binding = Binding {
            version: claims.version,
            reference_id: Some(claims.reference_id),
            workspace_id: Some(claims.workspace_id),
            issued_at: claims.iat,
            token: Some(String::from_utf8_lossy(token).into_owned()),
        };
        storage::write_json(&self.path, &binding, 0o600)?;
        self.binding = binding;
        self.pending = None;
        Ok(&self.binding)
    }

    /// Clears the owner (`agent:unpair`), keeping the version so old bindings stay refused.
    pub fn unpair(&mut self, now: u64) -> Result<(), StorageError> {
        let tombstone = Binding {
            version: self.binding.version,
            reference_id: None,
            workspace_id: self.binding.workspace_id.clone(),
            issued_at: now,
            token: None,
        };
        storage::write_json(&self.path, &tombstone, 0o600)?;
        self.binding = tombstone;
        Ok(())
    }
}
