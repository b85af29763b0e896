//! The signed payloads, as types shared by the verifier and the platform-side signer
//! (`crate::sim::platform`), so the two can never drift apart. docs/PROTOCOL.md documents each field.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `typ` of a command attestation.
pub const ATTESTATION_TYP: &str = "texture-command+jws";
/// `typ` of a trust bundle.
pub const TRUST_BUNDLE_TYP: &str = "texture-trust-bundle+jws";

/// The kind of API key that authorised a command on the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Secret backend key: may command every device of its workspace.
    Server,
    /// Public front-end key: may only create Connect links, never command.
    Connect,
    /// An end user's key from the Connect flow: only that user's devices.
    Scoped,
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Server => "server",
            KeyKind::Connect => "connect",
            KeyKind::Scoped => "scoped",
        })
    }
}

/// The command being authorised: the platform's slug and input, exactly as signed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandClaim {
    pub slug: String,
    pub input: serde_json::Map<String, serde_json::Value>,
    /// The device behind the gateway that the command is for (the platform's `deviceId`).
    /// Absent for the agent's own `agent:*` commands, which address the gateway itself.
    #[serde(rename = "deviceId", default, skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
}

/// Payload of a command attestation. Everything that decides what runs is in here, under the
/// platform's signature; nothing outside it is consulted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationClaims {
    /// Issuer; must equal the configured `trust.issuer`.
    pub iss: String,
    /// The signing key's id; must equal the header's `kid`.
    pub kid: String,
    /// Audience: the target device id.
    pub aud: String,
    /// The command id, unique per command; the replay table is keyed on it.
    pub jti: String,
    /// Issued-at, Unix seconds.
    pub iat: u64,
    /// Expires-at, Unix seconds.
    pub exp: u64,
    #[serde(rename = "apiKeyId")]
    pub api_key_id: String,
    #[serde(rename = "apiKeyKind")]
    pub api_key_kind: KeyKind,
    #[serde(rename = "workspaceId")]
    pub workspace_id: String,
    /// The end user's reference id; present exactly for scoped keys.
    #[serde(
        rename = "referenceId",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub reference_id: Option<String>,
    pub command: CommandClaim,
}

/// One platform signing key in a trust bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleKey {
    pub kid: String,
    /// Ed25519 public key, 32 bytes, unpadded base64url.
    #[serde(rename = "publicKey")]
    pub public_key: String,
}

/// Payload of a trust bundle, signed by the pinned root key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustBundleClaims {
    pub iss: String,
    /// Strictly increasing; a device never accepts a version at or below the one it holds.
    pub version: u64,
    pub iat: u64,
    pub exp: u64,
    /// The platform keys that may sign attestations. During a rotation both old and new are
    /// listed, so commands signed with either verify.
    pub keys: Vec<BundleKey>,
    /// API key ids whose commands are refused from the moment this bundle is accepted.
    #[serde(rename = "revokedApiKeys", default)]
    pub revoked_api_keys: Vec<String>,
}

/// `typ` of an owner binding.
pub const OWNER_BINDING_TYP: &str = "texture-owner-binding+jws";

/// Payload of a signed owner binding: the platform's word that `referenceId` owns `deviceId`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OwnerBindingClaims {
    pub iss: String,
    /// The signing key's id; must equal the header's `kid` and be in the trust bundle.
    pub kid: String,
    pub device_id: String,
    pub workspace_id: String,
    /// The owner's reference id (the customer's id for the end user).
    pub reference_id: String,
    /// Strictly increasing per device: a higher version re-pairs to a new owner.
    pub version: u64,
    pub iat: u64,
    /// Echo of the commitment from the device's pending pairing request.
    pub code_commitment: String,
}
