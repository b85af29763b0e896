//! The platform's side of the trust protocol: signing trust bundles, command attestations, owner
//! bindings and site policies.
//!
//! This is the one implementation used by the tests, benchmarks, the simulator and the demo, so
//! every one of them exercises exactly the format the device verifies (the payload types are
//! shared with `auth::claims` and `safety::policy`). The daemon never calls it; the linker leaves it out of the
//! gateway binary.

use ed25519_dalek::SigningKey;

use crate::inbound::auth::claims::{
    AttestationClaims, BundleKey, CommandClaim, KeyKind, OwnerBindingClaims, TrustBundleClaims,
    ATTESTATION_TYP, OWNER_BINDING_TYP, TRUST_BUNDLE_TYP,
};
use crate::inbound::auth::jws;
use crate::inbound::safety::policy::{PolicyEntry, SitePolicyClaims, SITE_POLICY_TYP};

/// The default issuer name, matching the daemon's default `trust.issuer`.
pub const DEFAULT_ISSUER: &str = "texture-platform";

pub use crate::agent::identity::generate_key;

/// The platform's keys: a root that signs trust bundles, and named keys that sign attestations.
pub struct PlatformSigner {
    pub issuer: String,
    root: SigningKey,
    keys: Vec<(String, SigningKey)>,
}

/// The API key on whose behalf an attestation is minted.
#[derive(Debug, Clone)]
pub struct ApiKey {
    pub id: String,
    pub kind: KeyKind,
    pub workspace_id: String,
    /// The end user's reference id, for scoped keys.
    pub reference_id: Option<String>,
}

impl ApiKey {
    pub fn server(id: &str, workspace: &str) -> ApiKey {
        ApiKey {
            id: id.into(),
            kind: KeyKind::Server,
            workspace_id: workspace.into(),
            reference_id: None,
        }
    }
    pub fn connect(id: &str, workspace: &str) -> ApiKey {
        ApiKey {
            id: id.into(),
            kind: KeyKind::Connect,
            workspace_id: workspace.into(),
            reference_id: None,
        }
    }
    pub fn scoped(id: &str, workspace: &str, reference_id: &str) -> ApiKey {
        ApiKey {
            id: id.into(),
            kind: KeyKind::Scoped,
            workspace_id: workspace.into(),
            reference_id: Some(reference_id.into()),
        }
    }
}

/// The command an attestation authorises: `command_id` (the JWS `jti`) running `slug` with
/// `input` on `gateway` (the `aud`) or, with [`AttestedCommand::for_device`], on a device behind
/// it (`command.deviceId`).
#[derive(Debug, Clone)]
pub struct AttestedCommand<'a> {
    pub gateway: &'a str,
    pub device: Option<&'a str>,
    pub command_id: &'a str,
    pub slug: &'a str,
    /// Anything but a JSON object is sent as `{}`.
    pub input: serde_json::Value,
}

impl<'a> AttestedCommand<'a> {
    /// A command for the gateway itself.
    pub fn new(
        gateway: &'a str,
        command_id: &'a str,
        slug: &'a str,
        input: serde_json::Value,
    ) -> AttestedCommand<'a> {
        AttestedCommand {
            gateway,
            device: None,
            command_id,
            slug,
            input,
        }
    }

    /// The same command for `device`, a device behind the gateway.
    pub fn for_device(self, device: &'a str) -> AttestedCommand<'a> {
        AttestedCommand {
            device: Some(device),
            ..self
        }
    }
}

impl PlatformSigner {
    /// New random root and one signing key named `kid`.
    pub fn generate(kid: &str) -> PlatformSigner {
        PlatformSigner {
            issuer: DEFAULT_ISSUER.into(),
            root: generate_key(),
            keys: vec![(kid.into(), generate_key())],
        }
    }

    /// Deterministic keys, for reproducible benchmarks and fuzz seeds.
    pub fn from_seeds(root: [u8; 32], kid: &str, key: [u8; 32]) -> PlatformSigner {
        PlatformSigner {
            issuer: DEFAULT_ISSUER.into(),
            root: SigningKey::from_bytes(&root),
            keys: vec![(kid.into(), SigningKey::from_bytes(&key))],
        }
    }

    /// The value for the device's `trust.root_public_key`.
    pub fn root_public_key(&self) -> String {
        jws::public_key_to_base64(&self.root.verifying_key())
    }

    /// Adds a signing key (for a rotation: publish a bundle with both, then drop the old one).
    pub fn add_key(&mut self, kid: &str) {
        self.keys.push((kid.into(), generate_key()));
    }

    /// Removes a signing key from future bundles.
    pub fn remove_key(&mut self, kid: &str) {
        self.keys.retain(|(k, _)| k != kid);
    }

    /// The id of the newest signing key.
    pub fn current_kid(&self) -> &str {
        &self.keys.last().expect("at least one signing key").0
    }

    fn key(&self, kid: &str) -> &SigningKey {
        &self
            .keys
            .iter()
            .find(|(k, _)| k == kid)
            .expect("known kid")
            .1
    }

    /// A signed trust bundle listing every current signing key.
    pub fn trust_bundle(&self, version: u64, iat: u64, exp: u64, revoked: &[String]) -> String {
        let claims = TrustBundleClaims {
            iss: self.issuer.clone(),
            version,
            iat,
            exp,
            keys: self
                .keys
                .iter()
                .map(|(kid, key)| BundleKey {
                    kid: kid.clone(),
                    public_key: jws::public_key_to_base64(&key.verifying_key()),
                })
                .collect(),
            revoked_api_keys: revoked.to_vec(),
        };
        self.sign_bundle_claims(&claims)
    }

    /// Signs arbitrary bundle claims with the root (tests use it for malformed bundles).
    pub fn sign_bundle_claims(&self, claims: &TrustBundleClaims) -> String {
        jws::sign(
            &self.root,
            None,
            TRUST_BUNDLE_TYP,
            &serde_json::to_vec(claims).expect("serialises"),
        )
    }

    /// The claims of an attestation for `command`, valid for `ttl` seconds from `iat`.
    pub fn claims(
        &self,
        key: &ApiKey,
        command: AttestedCommand<'_>,
        iat: u64,
        ttl: u64,
    ) -> AttestationClaims {
        AttestationClaims {
            iss: self.issuer.clone(),
            kid: self.current_kid().to_owned(),
            aud: command.gateway.into(),
            jti: command.command_id.into(),
            iat,
            exp: iat + ttl,
            api_key_id: key.id.clone(),
            api_key_kind: key.kind,
            workspace_id: key.workspace_id.clone(),
            reference_id: key.reference_id.clone(),
            command: CommandClaim {
                device_id: command.device.map(Into::into),
                slug: command.slug.into(),
                input: match command.input {
                    serde_json::Value::Object(map) => map,
                    _ => serde_json::Map::new(),
                },
            },
        }
    }

    /// Signs attestation claims with the key their `kid` names.
    pub fn attest(&self, claims: &AttestationClaims) -> String {
        jws::sign(
            self.key(&claims.kid),
            Some(&claims.kid),
            ATTESTATION_TYP,
            &serde_json::to_vec(claims).expect("serialises"),
        )
    }

    /// A signed owner binding for `device`, answering the pairing request whose commitment is
    /// `code_commitment`.
    pub fn owner_binding(
        &self,
        device: &str,
        workspace: &str,
        reference_id: &str,
        version: u64,
        iat: u64,
        code_commitment: &str,
    ) -> String {
        let claims = OwnerBindingClaims {
            iss: self.issuer.clone(),
            kid: self.current_kid().to_owned(),
            device_id: device.into(),
            workspace_id: workspace.into(),
            reference_id: reference_id.into(),
            version,
            iat,
            code_commitment: code_commitment.into(),
        };
        self.sign_binding_claims(&claims)
    }

    /// Signs arbitrary binding claims with the key their `kid` names (tests use it for bad ones).
    pub fn sign_binding_claims(&self, claims: &OwnerBindingClaims) -> String {
        jws::sign(
            self.key(&claims.kid),
            Some(&claims.kid),
            OWNER_BINDING_TYP,
            &serde_json::to_vec(claims).expect("serialises"),
        )
    }

    /// A signed site policy for `gateway` (docs/PROTOCOL.md 4.10), signed with the newest
    /// signing key. `limits` is the claims' `limits` array, for example
    /// `json!([{"deviceId": "bat-1", "deviceType": "battery", "limits": {"min_backup_reserve": 30}}])`;
    /// `json!([])` clears the policy.
    ///
    /// Panics if `limits` is not an array of such entries (a test's mistake, not the device's).
    pub fn site_policy(
        &self,
        gateway: &str,
        version: u64,
        iat: u64,
        limits: serde_json::Value,
    ) -> String {
        let limits: Vec<PolicyEntry> = serde_json::from_value(limits)
            .expect("site policy limits: [{deviceId, deviceType, limits: {key: number}}]");
        let claims = SitePolicyClaims {
            iss: self.issuer.clone(),
            kid: self.current_kid().to_owned(),
            device_id: gateway.into(),
            version,
            iat,
            limits,
        };
        self.sign_site_policy_payload(&serde_json::to_vec(&claims).expect("serialises"))
    }

    /// Signs an arbitrary site policy payload with the newest signing key (tests use it for
    /// malformed policies).
    pub fn sign_site_policy_payload(&self, payload: &[u8]) -> String {
        let kid = self.current_kid();
        jws::sign(self.key(kid), Some(kid), SITE_POLICY_TYP, payload)
    }
}
