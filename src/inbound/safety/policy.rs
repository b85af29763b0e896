//! The signed site policy (docs/PROTOCOL.md 4.10): limits from the platform that may narrow the
//! installer's `[[limits]]`, never widen them.
//!
//! The installer's limits are the floor of safety a site was commissioned with; the platform
//! knows things the installer could not (a storm warning, a tariff, a grid operator's request)
//! and may tighten them for a while. Because a policy can only narrow, a compromised or buggy
//! platform can at worst refuse more commands; it can never let a command cross a limit the
//! installer set. That rule is enforced here, on the whole policy: one entry that would widen
//! an installer limit refuses the policy, so the platform never believes a policy is in force
//! that only partly is.
//!
//! The policy arrives retained on the device's `safety/policy` topic, so the broker redelivers it
//! on every reconnect: the very token already in force is [`Accepted::Unchanged`], not a
//! refusal. A policy is accepted only with a version above the stored one (no rollback to a
//! looser policy), and stored atomically before it is in force.
//!
//! The limits in force are the stricter of the installer's and the policy's for each key; that
//! combination is the envelope's job, not this module's.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::limits::{unit, DeviceLimits};
use crate::inbound::auth::jws;
use crate::inbound::auth::trust::TrustBundle;
use crate::model::device::DeviceType;
use crate::storage::{self, StorageError};

/// `typ` of a site policy, so a policy can never pass as a command, a bundle or a binding.
pub(crate) const SITE_POLICY_TYP: &str = "texture-site-policy+jws";
/// Largest policy accepted, checked before anything is decoded.
pub(crate) const MAX_POLICY_BYTES: usize = 16384;
/// File in the state directory holding the policy in force.
pub(crate) const POLICY_FILE: &str = "site-policy.json";

/// One device's limits in a policy. `limits` uses exactly the installer's `[[limits]]` key
/// names, so configuration, wire, messages and status share one vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct PolicyEntry {
    pub(crate) device_id: String,
    pub(crate) device_type: DeviceType,
    /// Limit key → number. Kept as JSON values so a key or value the agent cannot take is
    /// refused with a message naming it, rather than a bare parse error.
    pub(crate) limits: Map<String, Value>,
}

/// Payload of a site policy, signed by a platform key from the trust bundle. Shared with the
/// platform-side signer (`crate::sim::platform`), so the two cannot drift apart.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct SitePolicyClaims {
    pub(crate) iss: String,
    /// The signing key's id; must equal the header's `kid`.
    pub(crate) kid: String,
    /// The gateway the policy is for.
    pub(crate) device_id: String,
    /// Strictly increasing per gateway.
    pub(crate) version: u64,
    pub(crate) iat: u64,
    /// An empty array clears the policy: the installer's limits alone are in force.
    pub(crate) limits: Vec<PolicyEntry>,
}

/// What [`POLICY_FILE`] holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Stored {
    version: u64,
    issued_at: u64,
    limits: Vec<PolicyEntry>,
    /// The policy exactly as received: recognises its redelivery, and kept for audit.
    token: String,
}

/// The outcome of a policy that passed every check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Accepted {
    /// A newer policy is stored and in force.
    Applied { version: u64 },
    /// The policy already in force, delivered again (it is retained).
    Unchanged,
}

/// Why a policy was refused. The policy in force stays exactly as it was in every case.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PolicyRejected {
    #[error("no trust bundle yet: cannot verify the site policy")]
    NoTrustBundle,
    #[error("the trust bundle expired at {expired_at}: cannot verify the site policy")]
    TrustBundleExpired { expired_at: u64 },
    #[error("site policy signature: {0}")]
    Signature(jws::JwsError),
    #[error("site policy payload is malformed: {0}")]
    Malformed(String),
    #[error("site policy is for device {0:?}")]
    WrongDevice(String),
    #[error("site policy version {offered} is not newer than the stored version {stored}")]
    NotNewer { offered: u64, stored: u64 },
    /// An entry that is wrong on its own: `policy v<version>, entry #<n> (<device>): <problem>`.
    #[error("{0}")]
    BadEntry(String),
    #[error(
        "policy v{version}: {device_id} is a {} in the policy but a {} in the installer's \
         limits: a policy may only narrow the installer's limits",
        policy.as_str(),
        installer.as_str()
    )]
    WrongType {
        version: u64,
        device_id: String,
        policy: DeviceType,
        installer: DeviceType,
    },
    #[error(
        "policy v{version}: {key} = {value}{} for {device_id} is {side} the installer's \
         {installer_key} = {bound}{}: a policy may only narrow the installer's limits",
        unit(key),
        unit(installer_key)
    )]
    Widens {
        version: u64,
        device_id: String,
        key: &'static str,
        value: f64,
        /// `"below"` or `"above"`.
        side: &'static str,
        installer_key: &'static str,
        bound: f64,
    },
    #[error("could not store the site policy: {0}")]
    Storage(#[from] StorageError),
}

/// Why the stored policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PolicyError {
    /// Unreadable, or not JSON of the stored shape (the error names the path).
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// An entry the agent cannot enforce (for example written by a later version of the agent).
    #[error("{path}: {problem}")]
    Entry { path: PathBuf, problem: String },
}

/// The site policy in force and where it is stored.
#[derive(Debug)]
pub(crate) struct SitePolicy {
    path: PathBuf,
    version: u64,
    issued_at: u64,
    token: Option<String>,
    limits: Vec<DeviceLimits>,
}

impl SitePolicy {
    /// Loads [`POLICY_FILE`] from `state_dir`; without one, version 0 and no limits.
    pub(crate) fn open(state_dir: &Path) -> Result<SitePolicy, PolicyError> {
        let path = state_dir.join(POLICY_FILE);
        let Some(stored) = storage::read_json::<Stored>(&path)? else {
            return Ok(SitePolicy {
                path,
                version: 0,
                issued_at: 0,
                token: None,
                limits: Vec::new(),
            });
        };
        // Checked again as on acceptance (not against the installer, whose limits may have
        // changed since: the envelope takes the stricter of both anyway).
        let limits = stored
            .limits
            .iter()
            .enumerate()
            .map(|(i, entry)| entry_limits(stored.version, i + 1, entry))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|problem| PolicyError::Entry {
                path: path.clone(),
                problem,
            })?;
        Ok(SitePolicy {
            path,
            version: stored.version,
            issued_at: stored.issued_at,
            token: Some(stored.token),
            limits,
        })
    }

    /// The version in force; 0 when no policy was ever accepted.
    pub(crate) fn version(&self) -> u64 {
        self.version
    }

    /// The `iat` of the policy in force; 0 when none.
    pub(crate) fn issued_at(&self) -> u64 {
        self.issued_at
    }

    /// Each entry of the policy in force, as the installer's entries are expressed.
    pub(crate) fn limits(&self) -> &[DeviceLimits] {
        &self.limits
    }

    /// Checks a policy from the platform in the order of docs/PROTOCOL.md 4.10 and, if every
    /// check passes, stores it atomically and puts it in force. `installer` holds the
    /// (validated) `[[limits]]` entries the policy may only narrow.
    pub(crate) fn accept(
        &mut self,
        token: &[u8],
        trust: Option<&TrustBundle>,
        issuer: &str,
        gateway_id: &str,
        installer: &[DeviceLimits],
        now: u64,
    ) -> Result<Accepted, PolicyRejected> {
        // 1, 2: as for commands, keys from an expired bundle vouch for nothing.
        let trust = trust.ok_or(PolicyRejected::NoTrustBundle)?;
        if trust.expires_at <= now {
            return Err(PolicyRejected::TrustBundleExpired {
                expired_at: trust.expires_at,
            });
        }
        // 3
        let verified = jws::verify(token, MAX_POLICY_BYTES, SITE_POLICY_TYP, |kid| {
            kid.and_then(|k| trust.key(k))
        })
        .map_err(|e| match e {
            // Signed, but ambiguous: a payload problem, not a signature one.
            jws::JwsError::RepeatedMember { .. } => PolicyRejected::Malformed(e.to_string()),
            e => PolicyRejected::Signature(e),
        })?;
        // 4
        let claims: SitePolicyClaims = serde_json::from_slice(&verified.payload)
            .map_err(|e| PolicyRejected::Malformed(e.to_string()))?;
        // 5
        if Some(claims.kid.as_str()) != verified.header.kid.as_deref() || claims.iss != issuer {
            return Err(PolicyRejected::Malformed(
                "kid or iss does not match".into(),
            ));
        }
        // 6
        if claims.device_id != gateway_id {
            return Err(PolicyRejected::WrongDevice(claims.device_id));
        }
        // 7: the retained policy comes again on every reconnect.
        if claims.version == self.version && self.token.as_deref().map(str::as_bytes) == Some(token)
        {
            return Ok(Accepted::Unchanged);
        }
        if claims.version <= self.version {
            return Err(PolicyRejected::NotNewer {
                offered: claims.version,
                stored: self.version,
            });
        }
        // 8, 9
        let version = claims.version;
        let mut limits: Vec<DeviceLimits> = Vec::with_capacity(claims.limits.len());
        for (i, entry) in claims.limits.iter().enumerate() {
            let n = i + 1;
            let entry_limits = entry_limits(version, n, entry).map_err(PolicyRejected::BadEntry)?;
            if let Some(first) = limits
                .iter()
                .position(|l| l.device_id == entry_limits.device_id)
            {
                return Err(PolicyRejected::BadEntry(format!(
                    "policy v{version}, entry #{n} ({}): the device is already limited by \
                     entry #{}",
                    entry.device_id,
                    first + 1
                )));
            }
            limits.push(entry_limits);
        }
        for policy in &limits {
            if let Some(installer) = installer.iter().find(|l| l.device_id == policy.device_id) {
                narrows(version, policy, installer)?;
            }
        }
        // 10: stored before it is in force; a failed write leaves the old policy in both.
        let stored = Stored {
            version,
            issued_at: claims.iat,
            limits: claims.limits,
            token: String::from_utf8_lossy(token).into_owned(),
        };
        storage::write_json(&self.path, &stored, 0o600)?;
        self.version = version;
        self.issued_at = stored.issued_at;
        self.token = Some(stored.token);
        self.limits = limits;
        Ok(Accepted::Applied { version })
    }
}

/// Entry `n` of policy `version` as a [`DeviceLimits`], checked on its own by the installer's
/// rules ([`DeviceLimits::validate`]), with its messages naming the policy entry.
fn entry_limits(version: u64, n: usize, entry: &PolicyEntry) -> Result<DeviceLimits, String> {
    let here = format!("policy v{version}, entry #{n}");
    let device = &entry.device_id;
    // `validate` checks the id too, but the messages below show it, so it goes first.
    crate::model::gateway::GatewayId::parse(device).map_err(|e| format!("{here}: {e}"))?;
    let mut limits = DeviceLimits::new(device, entry.device_type);
    for (key, value) in &entry.limits {
        if !limits.values().iter().any(|(k, _)| k == key) {
            return Err(format!("{here} ({device}): {key:?} is not a limit key"));
        }
        let Some(number) = value.as_f64() else {
            return Err(format!("{here} ({device}): {key} must be a number"));
        };
        limits
            .set(key, number)
            .map_err(|e| format!("{here} ({device}): {e}"))?;
    }
    limits
        .validate(n)
        .map_err(|r| match r.problem.strip_prefix(&format!("limits #{n}")) {
            Some(rest) => format!("{here}{rest}"),
            None => format!("{here}: {}", r.problem),
        })?;
    Ok(limits)
}

/// Whether `policy` only narrows `installer` (the same device): the same device type, and each
/// policy limit, `min_X` or `max_X` alike, from the installer's `min_X` to its `max_X` (each
/// when set). A `min_X` above the installer's `max_X` would leave no value at all.
fn narrows(
    version: u64,
    policy: &DeviceLimits,
    installer: &DeviceLimits,
) -> Result<(), PolicyRejected> {
    if policy.device_type != installer.device_type {
        return Err(PolicyRejected::WrongType {
            version,
            device_id: policy.device_id.clone(),
            policy: policy.device_type,
            installer: installer.device_type,
        });
    }
    let installed = installer.values();
    let installed = |key: &str| {
        installed
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|&(k, v)| Some((k, v?)))
    };
    for (key, value) in policy.values() {
        let Some(value) = value else { continue };
        let Some(bound) = key
            .strip_prefix("min_")
            .or_else(|| key.strip_prefix("max_"))
        else {
            continue;
        };
        let widens = |side, (installer_key, limit)| PolicyRejected::Widens {
            version,
            device_id: policy.device_id.clone(),
            key,
            value,
            side,
            installer_key,
            bound: limit,
        };
        if let Some(low) = installed(&format!("min_{bound}")).filter(|&(_, lo)| value < lo) {
            return Err(widens("below", low));
        }
        if let Some(high) = installed(&format!("max_{bound}")).filter(|&(_, hi)| value > hi) {
            return Err(widens("above", high));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
