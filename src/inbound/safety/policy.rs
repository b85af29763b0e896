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
    #[error("{message}")]
    BadEntry { version: u64, message: String },
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
    #[error("could not store the site policy: {source}")]
    Storage { version: u64, source: StorageError },
}

impl PolicyRejected {
    /// The version the refused policy claimed, once its payload was verified and read that far
    /// (checks 7 to 10); `None` before, since an unverified payload's version means nothing.
    pub(crate) fn version(&self) -> Option<u64> {
        match self {
            PolicyRejected::NoTrustBundle
            | PolicyRejected::TrustBundleExpired { .. }
            | PolicyRejected::Signature(_)
            | PolicyRejected::Malformed(_)
            | PolicyRejected::WrongDevice(_) => None,
            PolicyRejected::NotNewer { offered, .. } => Some(*offered),
            PolicyRejected::BadEntry { version, .. }
            | PolicyRejected::WrongType { version, .. }
            | PolicyRejected::Widens { version, .. }
            | PolicyRejected::Storage { version, .. } => Some(*version),
        }
    }
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
            let entry_limits = entry_limits(version, n, entry)
                .map_err(|message| PolicyRejected::BadEntry { version, message })?;
            if let Some(first) = limits
                .iter()
                .position(|l| l.device_id == entry_limits.device_id)
            {
                return Err(PolicyRejected::BadEntry {
                    version,
                    message: format!(
                        "policy v{version}, entry #{n} ({}): the device is already limited by \
                         entry #{}",
                        entry.device_id,
                        first + 1
                    ),
                });
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
        storage::write_json(&self.path, &stored, 0o600)
            .map_err(|source| PolicyRejected::Storage { version, source })?;
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
mod tests {
    use serde_json::json;

    use super::*;
    use crate::inbound::auth::trust::TrustStore;
    use crate::sim::platform::{ApiKey, AttestedCommand, PlatformSigner};

    const NOW: u64 = 1_800_000_000;
    const GW: &str = "gw-1";

    /// A trust bundle listing `signer`'s keys, expiring at `exp`, accepted before `exp`.
    fn trust(signer: &PlatformSigner, exp: u64) -> TrustBundle {
        let d = tempfile::tempdir().unwrap();
        let root = jws::public_key_from_base64(&signer.root_public_key()).unwrap();
        let mut store = TrustStore::open(root, &signer.issuer, d.path());
        store
            .offer(
                signer.trust_bundle(1, NOW - 600, exp, &[]).as_bytes(),
                NOW - 300,
            )
            .unwrap();
        store.current().unwrap().clone()
    }

    /// The installer's limits: a battery, a vehicle and a thermostat, each bounded.
    fn installer() -> Vec<DeviceLimits> {
        vec![
            DeviceLimits {
                min_backup_reserve: Some(20.0),
                min_operating_reserve: Some(10.0),
                max_operating_reserve: Some(90.0),
                ..DeviceLimits::new("bat-1", DeviceType::Battery)
            },
            DeviceLimits {
                max_charge_limit: Some(90.0),
                ..DeviceLimits::new("ev-1", DeviceType::Vehicle)
            },
            DeviceLimits {
                min_target_c: Some(16.0),
                max_target_c: Some(26.0),
                ..DeviceLimits::new("th-1", DeviceType::Thermostat)
            },
        ]
    }

    struct Bed {
        dir: tempfile::TempDir,
        signer: PlatformSigner,
        trust: TrustBundle,
        policy: SitePolicy,
    }

    fn bed() -> Bed {
        let signer = PlatformSigner::generate("k1");
        let trust = trust(&signer, NOW + 3_600);
        let dir = tempfile::tempdir().unwrap();
        let policy = SitePolicy::open(dir.path()).unwrap();
        Bed {
            dir,
            signer,
            trust,
            policy,
        }
    }

    impl Bed {
        fn token(&self, version: u64, limits: Value) -> String {
            self.signer.site_policy(GW, version, NOW - 5, limits)
        }

        fn offer(&mut self, token: &str) -> Result<Accepted, PolicyRejected> {
            self.policy.accept(
                token.as_bytes(),
                Some(&self.trust),
                &self.signer.issuer,
                GW,
                &installer(),
                NOW,
            )
        }

        /// Offers `token` expecting a refusal, and checks that nothing changed: not in memory, not
        /// on disk. Returns the refusal's message.
        fn refused(&mut self, token: &str) -> String {
            let before = (self.policy.version(), self.policy.limits().to_vec());
            let on_disk = std::fs::read(self.dir.path().join(POLICY_FILE)).ok();
            let e = self.offer(token).unwrap_err();
            assert_eq!(
                (self.policy.version(), self.policy.limits().to_vec()),
                before
            );
            assert_eq!(
                std::fs::read(self.dir.path().join(POLICY_FILE)).ok(),
                on_disk
            );
            e.to_string()
        }
    }

    fn battery(limits: Value) -> Value {
        json!([{"deviceId": "bat-1", "deviceType": "battery", "limits": limits}])
    }

    #[test]
    fn a_narrowing_policy_is_applied_stored_and_survives_a_reopen() {
        let mut b = bed();
        assert_eq!((b.policy.version(), b.policy.issued_at()), (0, 0));
        assert!(b.policy.limits().is_empty());
        let limits = json!([
            {"deviceId": "bat-1", "deviceType": "battery", "limits": {
                "min_backup_reserve": 30, "min_operating_reserve": 20, "max_operating_reserve": 80.5}},
            // Equal to the installer's limit is still inside it.
            {"deviceId": "ev-1", "deviceType": "vehicle", "limits": {
                "min_charge_limit": 50, "max_charge_limit": 90}},
            // A device the installer did not limit: any value in the key's range narrows it.
            {"deviceId": "bat-2", "deviceType": "battery", "limits": {"min_backup_reserve": 40}},
        ]);
        let token = b.token(4, limits);
        assert_eq!(b.offer(&token).unwrap(), Accepted::Applied { version: 4 });

        let expected = vec![
            DeviceLimits {
                min_backup_reserve: Some(30.0),
                min_operating_reserve: Some(20.0),
                max_operating_reserve: Some(80.5),
                ..DeviceLimits::new("bat-1", DeviceType::Battery)
            },
            DeviceLimits {
                min_charge_limit: Some(50.0),
                max_charge_limit: Some(90.0),
                ..DeviceLimits::new("ev-1", DeviceType::Vehicle)
            },
            DeviceLimits {
                min_backup_reserve: Some(40.0),
                ..DeviceLimits::new("bat-2", DeviceType::Battery)
            },
        ];
        assert_eq!(b.policy.version(), 4);
        assert_eq!(b.policy.issued_at(), NOW - 5);
        assert_eq!(b.policy.limits(), expected);

        let path = b.dir.path().join(POLICY_FILE);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let stored: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let members: Vec<&str> = stored
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(members, ["issuedAt", "limits", "token", "version"]);
        assert_eq!(stored["version"], 4);
        assert_eq!(stored["issuedAt"], NOW - 5);
        assert_eq!(stored["token"], token.as_str());
        assert_eq!(
            stored["limits"][0],
            json!({"deviceId": "bat-1", "deviceType": "battery", "limits": {
                "min_backup_reserve": 30, "min_operating_reserve": 20, "max_operating_reserve": 80.5}})
        );

        let mut reopened = SitePolicy::open(b.dir.path()).unwrap();
        assert_eq!(reopened.version(), 4);
        assert_eq!(reopened.issued_at(), NOW - 5);
        assert_eq!(reopened.limits(), expected);
        // The reopened policy still knows its token: the retained redelivery is not a refusal.
        let again = reopened.accept(
            token.as_bytes(),
            Some(&b.trust),
            &b.signer.issuer,
            GW,
            &installer(),
            NOW,
        );
        assert_eq!(again.unwrap(), Accepted::Unchanged);
    }

    #[test]
    fn each_widening_refuses_the_whole_policy_naming_the_limit() {
        let mut b = bed();
        let narrow = json!({"deviceId": "ev-1", "deviceType": "vehicle", "limits": {"max_charge_limit": 80}});
        let cases = [
            (
                json!([narrow, {"deviceId": "bat-1", "deviceType": "battery", "limits": {"min_backup_reserve": 10}}]),
                "policy v4: min_backup_reserve = 10 % for bat-1 is below the installer's \
                 min_backup_reserve = 20 %: a policy may only narrow the installer's limits",
            ),
            (
                battery(json!({"max_operating_reserve": 95})),
                "policy v4: max_operating_reserve = 95 % for bat-1 is above the installer's \
                 max_operating_reserve = 90 %: a policy may only narrow the installer's limits",
            ),
            (
                battery(json!({"min_operating_reserve": 5})),
                "policy v4: min_operating_reserve = 5 % for bat-1 is below the installer's \
                 min_operating_reserve = 10 %: a policy may only narrow the installer's limits",
            ),
            // A minimum above the installer's maximum, or a maximum below its minimum, would leave
            // no value at all.
            (
                battery(json!({"min_operating_reserve": 95})),
                "policy v4: min_operating_reserve = 95 % for bat-1 is above the installer's \
                 max_operating_reserve = 90 %: a policy may only narrow the installer's limits",
            ),
            (
                battery(json!({"max_operating_reserve": 5})),
                "policy v4: max_operating_reserve = 5 % for bat-1 is below the installer's \
                 min_operating_reserve = 10 %: a policy may only narrow the installer's limits",
            ),
            (
                json!([{"deviceId": "ev-1", "deviceType": "vehicle", "limits": {"max_charge_limit": 100}}]),
                "policy v4: max_charge_limit = 100 % for ev-1 is above the installer's \
                 max_charge_limit = 90 %: a policy may only narrow the installer's limits",
            ),
            (
                json!([{"deviceId": "th-1", "deviceType": "thermostat", "limits": {"max_target_c": 30}}]),
                "policy v4: max_target_c = 30 °C for th-1 is above the installer's \
                 max_target_c = 26 °C: a policy may only narrow the installer's limits",
            ),
            (
                json!([{"deviceId": "th-1", "deviceType": "thermostat", "limits": {"min_target_c": 15.5}}]),
                "policy v4: min_target_c = 15.5 °C for th-1 is below the installer's \
                 min_target_c = 16 °C: a policy may only narrow the installer's limits",
            ),
            (
                json!([{"deviceId": "ev-1", "deviceType": "battery", "limits": {"min_backup_reserve": 50}}]),
                "policy v4: ev-1 is a battery in the policy but a vehicle in the installer's \
                 limits: a policy may only narrow the installer's limits",
            ),
        ];
        for (limits, message) in cases {
            let token = b.token(4, limits);
            assert_eq!(b.refused(&token), message);
        }
        // After a narrowing policy is in force, a widening one still changes nothing.
        b.offer(&b.token(3, json!([narrow]))).unwrap();
        let token = b.token(4, battery(json!({"min_backup_reserve": 10})));
        assert!(b.refused(&token).contains("below the installer's"));
        assert_eq!(b.policy.version(), 3);
    }

    #[test]
    fn a_refusal_names_the_version_only_once_the_payload_was_verified() {
        let mut b = bed();
        b.offer(&b.token(5, battery(json!({"min_backup_reserve": 30}))))
            .unwrap();
        let version = |b: &mut Bed, token: &str| b.offer(token).unwrap_err().version();
        // Checks 7, 8 and 9: a verified payload, so its version is the policy's.
        let old = b.token(4, battery(json!({"min_backup_reserve": 40})));
        assert_eq!(version(&mut b, &old), Some(4));
        let bad = b.token(6, battery(json!({"min_backup_reserve": -1})));
        assert_eq!(version(&mut b, &bad), Some(6));
        let wide = b.token(7, battery(json!({"min_backup_reserve": 10})));
        assert_eq!(version(&mut b, &wide), Some(7));
        // Before that, the version claimed by an unverified payload means nothing.
        let mut forged = PlatformSigner::generate("k1");
        forged.issuer = b.signer.issuer.clone();
        let unsigned = forged.site_policy(GW, 8, NOW, battery(json!({"min_backup_reserve": 30})));
        assert_eq!(version(&mut b, &unsigned), None);
        let elsewhere = b.signer.site_policy("gw-other", 9, NOW, json!([]));
        assert_eq!(version(&mut b, &elsewhere), None);
    }

    #[test]
    fn the_retained_policy_redelivered_is_unchanged_and_older_or_equal_ones_are_not_newer() {
        let mut b = bed();
        let v5 = b.token(5, battery(json!({"min_backup_reserve": 30})));
        assert_eq!(b.offer(&v5).unwrap(), Accepted::Applied { version: 5 });
        assert_eq!(b.offer(&v5).unwrap(), Accepted::Unchanged);
        assert_eq!(b.offer(&v5).unwrap(), Accepted::Unchanged);

        // The same version with other contents is not the policy in force.
        let other = b.token(5, battery(json!({"min_backup_reserve": 40})));
        assert_eq!(
            b.refused(&other),
            "site policy version 5 is not newer than the stored version 5"
        );
        let older = b.token(4, battery(json!({"min_backup_reserve": 50})));
        assert_eq!(
            b.refused(&older),
            "site policy version 4 is not newer than the stored version 5"
        );
        // Version 0 is what a gateway without a policy holds.
        let mut fresh = bed();
        let zero = fresh.token(0, json!([]));
        assert_eq!(
            fresh.refused(&zero),
            "site policy version 0 is not newer than the stored version 0"
        );
    }

    #[test]
    fn an_empty_policy_clears_the_limits_back_to_the_installers() {
        let mut b = bed();
        b.offer(&b.token(1, battery(json!({"min_backup_reserve": 30}))))
            .unwrap();
        assert_eq!(b.policy.limits().len(), 1);
        assert_eq!(
            b.offer(&b.token(2, json!([]))).unwrap(),
            Accepted::Applied { version: 2 }
        );
        assert!(b.policy.limits().is_empty());
        let reopened = SitePolicy::open(b.dir.path()).unwrap();
        assert_eq!(reopened.version(), 2);
        assert!(reopened.limits().is_empty());
    }

    #[test]
    fn another_kind_of_token_is_refused_by_its_typ() {
        let mut b = bed();
        let claims = b.signer.claims(
            &ApiKey::server("key-1", "ws-1"),
            AttestedCommand::new(GW, "cmd-1", "agent:ping", json!({})),
            NOW,
            60,
        );
        let attestation = b.signer.attest(&claims);
        assert_eq!(
            b.refused(&attestation),
            r#"site policy signature: typ is not the expected "texture-site-policy+jws""#
        );
        let bundle = b.signer.trust_bundle(2, NOW, NOW + 60, &[]);
        assert!(b.refused(&bundle).starts_with("site policy signature: typ"));
    }

    #[test]
    fn a_policy_for_another_gateway_or_from_another_issuer_is_refused() {
        let mut b = bed();
        let token = b.signer.site_policy("gw-2", 1, NOW, json!([]));
        assert_eq!(b.refused(&token), r#"site policy is for device "gw-2""#);

        let payload = |iss: &str, kid: &str| {
            json!({"iss": iss, "kid": kid, "deviceId": GW, "version": 1, "iat": NOW, "limits": []})
                .to_string()
        };
        for (iss, kid) in [("someone-else", "k1"), ("texture-platform", "k2")] {
            let token = b
                .signer
                .sign_site_policy_payload(payload(iss, kid).as_bytes());
            assert_eq!(
                b.refused(&token),
                "site policy payload is malformed: kid or iss does not match"
            );
        }
    }

    #[test]
    fn malformed_claims_are_refused() {
        let mut b = bed();
        let sign = |b: &Bed, payload: &str| b.signer.sign_site_policy_payload(payload.as_bytes());
        let base = r#""iss":"texture-platform","kid":"k1","deviceId":"gw-1","version":1,"iat":1"#;
        let cases = [
            (format!(r#"{{{base},"limits":[],"exp":2}}"#), "unknown field `exp`"),
            (format!(r#"{{{base}}}"#), "missing field `limits`"),
            (
                format!(r#"{{{base},"limits":[{{"deviceId":"bat-1","deviceType":"battery"}}]}}"#),
                "missing field `limits`",
            ),
            (
                format!(r#"{{{base},"limits":[{{"deviceId":"bat-1","deviceType":"toaster","limits":{{}}}}]}}"#),
                "unknown variant `toaster`",
            ),
            (
                format!(r#"{{{base},"limits":[],"limits":[]}}"#),
                "repeats a member name within one object (object depth 1)",
            ),
            (
                format!(
                    r#"{{{base},"limits":[{{"deviceId":"bat-1","deviceType":"battery","limits":{{"min_backup_reserve":30,"min_backup_reserve":10}}}}]}}"#
                ),
                "(object depth 3)",
            ),
            (
                r#"{"iss":"texture-platform","kid":"k1","deviceId":"gw-1","version":"1","iat":1,"limits":[]}"#.into(),
                "invalid type: string \"1\"",
            ),
        ];
        for (payload, detail) in cases {
            let message = b.refused(&sign(&b, &payload));
            assert!(
                message.starts_with("site policy payload is malformed: ")
                    && message.contains(detail),
                "{payload}: {message}"
            );
        }
    }

    #[test]
    fn an_entry_wrong_on_its_own_is_refused_naming_the_policy_entry() {
        let mut b = bed();
        let ok = json!({"deviceId": "bat-2", "deviceType": "battery", "limits": {"min_backup_reserve": 30}});
        let entry = |id: &str, kind: &str, limits: Value| json!([ok, {"deviceId": id, "deviceType": kind, "limits": limits}]);
        let cases = [
            (
                entry("bat-1", "battery", json!({"min_backup_reserve": 101})),
                "policy v2, entry #2 (bat-1): min_backup_reserve must be from 0 to 100, found 101",
            ),
            (
                entry("bat-1", "battery", json!({"min_backup_reserve": "30"})),
                "policy v2, entry #2 (bat-1): min_backup_reserve must be a number",
            ),
            (
                entry("bat-1", "battery", json!({"max_backup_reserve": 30})),
                r#"policy v2, entry #2 (bat-1): "max_backup_reserve" is not a limit key"#,
            ),
            (
                entry("bat-1", "battery", json!({"min_target_c": 18})),
                "policy v2, entry #2 (bat-1): min_target_c does not apply to a battery; a battery \
                 takes min_backup_reserve, min_operating_reserve, max_operating_reserve",
            ),
            (
                entry(
                    "bat-1",
                    "battery",
                    json!({"min_operating_reserve": 60, "max_operating_reserve": 40}),
                ),
                "policy v2, entry #2 (bat-1): min_operating_reserve (60) is above \
                 max_operating_reserve (40)",
            ),
            (
                entry("bat-1", "battery", json!({})),
                "policy v2, entry #2 (bat-1): no limit given for this battery",
            ),
            (
                entry("ch-1", "charger", json!({"max_current_a": 100})),
                "policy v2, entry #2 (ch-1): max_current_a must be from 0 to 80, found 100",
            ),
            (
                entry("bat/1", "battery", json!({"min_backup_reserve": 30})),
                "policy v2, entry #2: device id contains '/'; only letters, digits, '.', '_' and \
                 '-' are allowed",
            ),
            (
                entry("bat-2", "battery", json!({"min_backup_reserve": 50})),
                "policy v2, entry #2 (bat-2): the device is already limited by entry #1",
            ),
        ];
        for (limits, message) in cases {
            let token = b.token(2, limits);
            assert_eq!(b.refused(&token), message);
        }
    }

    #[test]
    fn without_a_current_trust_bundle_nothing_is_accepted() {
        let mut b = bed();
        let token = b.token(1, json!([]));
        let e = b
            .policy
            .accept(token.as_bytes(), None, "texture-platform", GW, &[], NOW)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "no trust bundle yet: cannot verify the site policy"
        );
        let expired = trust(&b.signer, NOW);
        let e = b
            .policy
            .accept(
                token.as_bytes(),
                Some(&expired),
                "texture-platform",
                GW,
                &[],
                NOW,
            )
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("the trust bundle expired at {NOW}: cannot verify the site policy")
        );
        // A key the bundle does not list, and a token over the size limit.
        let mut stranger = PlatformSigner::generate("k9");
        stranger.issuer = b.signer.issuer.clone();
        let token = stranger.site_policy(GW, 1, NOW, json!([]));
        assert_eq!(
            b.refused(&token),
            r#"site policy signature: no trusted key for kid "k9""#
        );
        let huge = "x".repeat(MAX_POLICY_BYTES + 1);
        assert_eq!(
            b.refused(&huge),
            "site policy signature: token is 16385 bytes, the limit is 16384"
        );
        assert_eq!(b.policy.version(), 0);
    }

    #[test]
    fn a_failed_write_refuses_and_keeps_the_old_policy_in_memory_and_on_disk() {
        let mut b = bed();
        b.offer(&b.token(1, battery(json!({"min_backup_reserve": 30}))))
            .unwrap();
        // A directory where the temporary file goes: the write fails, even as root.
        std::fs::create_dir(b.dir.path().join(format!(".{POLICY_FILE}.tmp"))).unwrap();
        let token = b.token(2, battery(json!({"min_backup_reserve": 40})));
        let message = b.refused(&token);
        assert!(
            message.starts_with("could not store the site policy: "),
            "{message}"
        );
        assert_eq!(b.policy.version(), 1);
        assert_eq!(SitePolicy::open(b.dir.path()).unwrap().version(), 1);
    }

    #[test]
    fn a_damaged_stored_policy_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(POLICY_FILE);
        std::fs::write(&path, b"{\"version\": 3").unwrap();
        let e = SitePolicy::open(dir.path()).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{}: not valid JSON", path.display())),
            "{e}"
        );

        let stored = json!({"version": 3, "issuedAt": 1, "token": "t", "limits": [
            {"deviceId": "bat-1", "deviceType": "battery", "limits": {"min_charge_limit": 30}}]});
        std::fs::write(&path, stored.to_string()).unwrap();
        let e = SitePolicy::open(dir.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: policy v3, entry #1 (bat-1): min_charge_limit does not apply to a battery; a \
                 battery takes min_backup_reserve, min_operating_reserve, max_operating_reserve",
                path.display()
            )
        );
    }
}
