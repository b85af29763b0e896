//! Pairing: `PairingState` fed owner bindings and verified against a real `TrustStore` (every
//! refusal, crash safety of the stored binding), then end to end over mosquitto (`texture-agent
//! pair`, the platform's signed binding, the owner's keys) and the pending request re-sent after
//! a reconnect.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use ed25519_dalek::{SigningKey, VerifyingKey};
use tempfile::TempDir;

use texture_agent::inbound::auth::claims::{
    OwnerBindingClaims, ATTESTATION_TYP, OWNER_BINDING_TYP,
};
use texture_agent::inbound::auth::jws::{self, JwsError};
use texture_agent::inbound::auth::trust::{TrustBundle, TrustStore};
use texture_agent::inbound::pairing::code::commitment;
use texture_agent::inbound::pairing::{
    code, Binding, BindingRejected, PairingError, PairingRequest, PairingState,
    ATTEMPT_WINDOW_SECS, BINDING_FILE, MAX_ATTEMPTS, MAX_BINDING_BYTES,
};
use texture_agent::model::clock::system_secs;
use texture_agent::sim::platform::{generate_key, ApiKey, AttestedCommand, PlatformSigner};
use texture_agent_testkit as kit;

use kit::{device_topic, Agent, AgentConfig, Mosquitto, Peer, Pki, Testbed, PLATFORM_CLIENT};

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

/// How long the end-to-end cases wait for the agent or the platform.
const WAIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Pairing seen from outside: `PairingState` fed owner bindings minted by
// `texture_agent::sim::platform`, verified against a real `TrustStore`.
//
// Every case works in its own temporary directory with an explicit clock (`NOW` and offsets), so
// nothing depends on the wall clock. Each refusal is checked twice: the specific
// `BindingRejected` variant, and that the stored binding is exactly as before, in memory and on
// disk (same bytes, or still absent), and as a fresh `PairingState::open` reads it.
//
// The crash-safety case re-executes this test binary as a writer child and SIGKILLs it at a
// random moment; only that kill timing is random (and seeded).

const DEVICE: &str = "gw-1";
const OTHER_DEVICE: &str = "gw-2";
const WORKSPACE: &str = "ws-a";
const OTHER_WORKSPACE: &str = "ws-b";
const KID: &str = "platform-1";
const CODE_TTL: u64 = 600;
const NOW: u64 = 1_700_000_000;
const BUNDLE_LIFETIME: u64 = 3600;
const ROOT_SEED: [u8; 32] = [0x11; 32];
const KEY_SEED: [u8; 32] = [0x22; 32];

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn root_key(signer: &PlatformSigner) -> VerifyingKey {
    jws::public_key_from_base64(&signer.root_public_key()).expect("root key decodes")
}

fn device_public_key() -> String {
    texture_agent::agent::identity::public_key(&generate_key())
}

/// The binding file's bytes, or `None` if it does not exist.
fn read_opt(path: &Path) -> Option<Vec<u8>> {
    match fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("{}: {e}", path.display()),
    }
}

/// What is stored before a refusal, to compare with afterwards.
#[derive(Debug)]
struct Stored {
    binding: Binding,
    file: Option<Vec<u8>>,
}

/// One device: a trust store holding a bundle from `signer`, and its pairing state.
struct Fixture {
    root: TempDir,
    state_dir: PathBuf,
    signer: PlatformSigner,
    trust: TrustStore,
    pairing: PairingState,
    public_key: String,
}

impl Fixture {
    fn new() -> Fixture {
        Fixture::with_signer(PlatformSigner::generate(KID))
    }

    fn with_signer(signer: PlatformSigner) -> Fixture {
        let root = tempfile::tempdir().unwrap();
        let state_dir = root.path().join("state");
        fs::create_dir(&state_dir).unwrap();
        let mut trust = TrustStore::open(root_key(&signer), &signer.issuer, &state_dir);
        let bundle = signer.trust_bundle(1, NOW, NOW + BUNDLE_LIFETIME, &[]);
        assert_eq!(trust.offer(bundle.as_bytes(), NOW).unwrap(), Some(1));
        let pairing = PairingState::open(&state_dir, DEVICE, CODE_TTL).unwrap();
        Fixture {
            root,
            state_dir,
            signer,
            trust,
            pairing,
            public_key: device_public_key(),
        }
    }

    /// A fixture already paired to `owner-1` at version 1 (session started and accepted at
    /// `NOW`), with no session pending.
    fn paired_at_v1() -> Fixture {
        let mut f = Fixture::new();
        f.pair(1, "owner-1", NOW);
        f
    }

    fn binding_path(&self) -> PathBuf {
        self.state_dir.join(BINDING_FILE)
    }

    fn bundle(&self) -> &TrustBundle {
        self.trust.current().expect("a trust bundle was accepted")
    }

    fn start(&mut self, now: u64) -> PairingRequest {
        let (_code, request) = self.pairing.start(&self.public_key, now).unwrap();
        request
    }

    /// A binding for this device in `WORKSPACE`, signed by the fixture's platform.
    fn token(&self, version: u64, owner: &str, commitment: &str) -> String {
        self.signer
            .owner_binding(DEVICE, WORKSPACE, owner, version, NOW, commitment)
    }

    /// The claims of a binding that would be accepted, for cases that spoil one field.
    fn claims(&self, version: u64, commitment: &str) -> OwnerBindingClaims {
        OwnerBindingClaims {
            iss: self.signer.issuer.clone(),
            kid: KID.into(),
            device_id: DEVICE.into(),
            workspace_id: WORKSPACE.into(),
            reference_id: format!("owner-{version}"),
            version,
            iat: NOW,
            code_commitment: commitment.into(),
        }
    }

    fn accept_in(
        &mut self,
        token: &[u8],
        configured_workspace: Option<&str>,
        now: u64,
    ) -> Result<Binding, BindingRejected> {
        let trust = self.trust.current();
        self.pairing
            .accept_binding(token, trust, &self.signer.issuer, configured_workspace, now)
            .cloned()
    }

    fn accept(&mut self, token: &[u8], now: u64) -> Result<Binding, BindingRejected> {
        self.accept_in(token, None, now)
    }

    /// Starts a session at `now` and accepts a binding to `owner` at `version` for it.
    fn pair(&mut self, version: u64, owner: &str, now: u64) -> Binding {
        let request = self.start(now);
        let token = self.token(version, owner, &request.code_commitment);
        let binding = self.accept(token.as_bytes(), now).unwrap();
        assert_eq!(binding.version, version);
        assert_eq!(binding.reference_id.as_deref(), Some(owner));
        binding
    }

    fn stored(&self) -> Stored {
        Stored {
            binding: self.pairing.binding().clone(),
            file: read_opt(&self.binding_path()),
        }
    }

    #[track_caller]
    fn assert_unchanged(&self, before: &Stored) {
        assert_eq!(
            self.pairing.binding(),
            &before.binding,
            "in-memory binding changed"
        );
        assert_eq!(
            read_opt(&self.binding_path()),
            before.file,
            "binding file changed"
        );
        let reopened = PairingState::open(&self.state_dir, DEVICE, CODE_TTL).unwrap();
        assert_eq!(
            reopened.binding(),
            &before.binding,
            "reopened binding differs"
        );
        assert_no_temporary_files(&self.state_dir);
    }
}

/// Only the trust bundle, its version record and (maybe) the binding live in the state
/// directory.
#[track_caller]
fn assert_no_temporary_files(dir: &Path) {
    use texture_agent::inbound::auth::trust::{BUNDLE_FILE, STATE_FILE};
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names.retain(|n| n != BINDING_FILE && n != BUNDLE_FILE && n != STATE_FILE);
    assert!(names.is_empty(), "unexpected files left behind: {names:?}");
}

// ---------------------------------------------------------------------------------------------
// Acceptance
// ---------------------------------------------------------------------------------------------

#[test]
fn valid_binding_pairs_and_is_stored_atomically() {
    let mut f = Fixture::new();
    assert_eq!(f.pairing.owner(), None);
    assert_eq!(f.pairing.binding(), &Binding::default());
    assert_eq!(read_opt(&f.binding_path()), None);

    let request = f.start(NOW);
    assert_eq!(request.device_id, DEVICE);
    assert_eq!(request.public_key, f.public_key);
    assert_eq!(request.expires_at, NOW + CODE_TTL);
    assert!(f.pairing.is_pending(NOW));
    assert_eq!(f.pairing.pending_expires_at(), Some(NOW + CODE_TTL));

    let token = f.token(1, "owner-1", &request.code_commitment);
    let binding = f.accept(token.as_bytes(), NOW + 30).unwrap();
    assert_eq!(
        binding,
        Binding {
            version: 1,
            reference_id: Some("owner-1".into()),
            workspace_id: Some(WORKSPACE.into()),
            issued_at: NOW,
            token: Some(token.clone()),
        }
    );
    assert_eq!(f.pairing.owner(), Some("owner-1"));
    assert_eq!(f.pairing.binding(), &binding);
    // The session is over: the same binding cannot be accepted a second time.
    assert!(!f.pairing.is_pending(NOW + 30));
    assert_eq!(f.pairing.pending_expires_at(), None);

    // Durable: a restart reads the very same binding.
    let reopened = PairingState::open(&f.state_dir, DEVICE, CODE_TTL).unwrap();
    assert_eq!(reopened.binding(), &binding);
    assert_eq!(reopened.owner(), Some("owner-1"));
    // Owner-only, and written through a temporary file that is gone.
    let mode = fs::metadata(f.binding_path()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "binding file mode is {mode:o}");
    assert_no_temporary_files(&f.state_dir);
    // The file is the JSON record itself.
    let on_disk: serde_json::Value =
        serde_json::from_slice(&fs::read(f.binding_path()).unwrap()).unwrap();
    assert_eq!(on_disk["referenceId"], "owner-1");
    assert_eq!(on_disk["version"], 1);
}

#[test]
fn higher_version_repairs_to_new_owner() {
    let mut f = Fixture::paired_at_v1();
    let request = f.start(NOW + 60);
    let token = f.token(2, "owner-2", &request.code_commitment);
    let binding = f.accept(token.as_bytes(), NOW + 60).unwrap();
    assert_eq!(binding.version, 2);
    assert_eq!(f.pairing.owner(), Some("owner-2"));

    let reopened = PairingState::open(&f.state_dir, DEVICE, CODE_TTL).unwrap();
    assert_eq!(reopened.owner(), Some("owner-2"));
    assert_eq!(reopened.binding(), &binding);
    assert_eq!(reopened.binding().token.as_deref(), Some(token.as_str()));
    // A version may skip ahead; only "strictly higher" matters.
    f.pair(10, "owner-3", NOW + 120);
    assert_eq!(f.pairing.binding().version, 10);
}

#[test]
fn unpair_keeps_the_version_so_old_bindings_stay_refused() {
    let mut f = Fixture::paired_at_v1();
    f.pairing.unpair(NOW + 10).unwrap();
    assert_eq!(f.pairing.owner(), None);
    assert_eq!(f.pairing.binding().version, 1);
    assert_eq!(f.pairing.binding().token, None);
    let reopened = PairingState::open(&f.state_dir, DEVICE, CODE_TTL).unwrap();
    assert_eq!(reopened.owner(), None);
    assert_eq!(reopened.binding().version, 1);
    assert_eq!(
        fs::metadata(f.binding_path()).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The platform (or an attacker replaying its old answer) re-issues version 1 for a new
    // session: the tombstone's version refuses it.
    let before = f.stored();
    let request = f.start(NOW + 20);
    let token = f.token(1, "owner-1", &request.code_commitment);
    let err = f.accept(token.as_bytes(), NOW + 20).unwrap_err();
    assert!(
        matches!(
            err,
            BindingRejected::NotNewer {
                offered: 1,
                stored: 1
            }
        ),
        "{err:?}"
    );
    f.assert_unchanged(&before);
    assert_eq!(f.pairing.owner(), None);

    // A genuinely newer binding pairs again.
    f.pair(2, "owner-2", NOW + 30);
}

// ---------------------------------------------------------------------------------------------
// Refusals: each leaves the stored binding exactly as it was
// ---------------------------------------------------------------------------------------------

#[test]
fn expired_code_is_refused() {
    let mut f = Fixture::paired_at_v1();
    let started = NOW + 100;
    let request = f.start(started);
    let token = f.token(2, "owner-2", &request.code_commitment);
    let before = f.stored();

    for now in [started + CODE_TTL + 1, started + CODE_TTL] {
        let err = f.accept(token.as_bytes(), now).unwrap_err();
        assert!(
            matches!(err, BindingRejected::CodeExpired { expired_at } if expired_at == started + CODE_TTL),
            "at {now}: {err:?}"
        );
        assert!(!f.pairing.is_pending(now));
        f.assert_unchanged(&before);
    }
    assert_eq!(f.pairing.owner(), Some("owner-1"));
}

#[test]
fn binding_for_another_device_is_refused() {
    let mut f = Fixture::paired_at_v1();
    let request = f.start(NOW + 10);
    let token = f.signer.owner_binding(
        OTHER_DEVICE,
        WORKSPACE,
        "owner-2",
        2,
        NOW,
        &request.code_commitment,
    );
    let before = f.stored();
    let err = f.accept(token.as_bytes(), NOW + 10).unwrap_err();
    assert!(
        matches!(&err, BindingRejected::WrongDevice(d) if d == OTHER_DEVICE),
        "{err:?}"
    );
    f.assert_unchanged(&before);
}

#[test]
fn replayed_binding_is_refused() {
    let mut f = Fixture::paired_at_v1();
    let request = f.start(NOW + 10);
    let v2 = f.token(2, "owner-2", &request.code_commitment);
    f.accept(v2.as_bytes(), NOW + 10).unwrap();
    let before = f.stored();

    // Straight after acceptance there is no session to answer.
    let err = f.accept(v2.as_bytes(), NOW + 11).unwrap_err();
    assert!(matches!(err, BindingRejected::NotPending), "{err:?}");
    f.assert_unchanged(&before);

    // In a new session the old answer echoes the old commitment.
    f.start(NOW + 20);
    let err = f.accept(v2.as_bytes(), NOW + 20).unwrap_err();
    assert!(matches!(err, BindingRejected::WrongCommitment), "{err:?}");
    f.assert_unchanged(&before);
    assert_eq!(f.pairing.owner(), Some("owner-2"));
}

#[test]
fn lower_version_binding_is_refused() {
    // Unpaired (version 0): version 0 is not newer either.
    let mut f = Fixture::new();
    let request = f.start(NOW);
    let before = f.stored();
    let err = f
        .accept(
            f.token(0, "owner-0", &request.code_commitment).as_bytes(),
            NOW,
        )
        .unwrap_err();
    assert!(
        matches!(
            err,
            BindingRejected::NotNewer {
                offered: 0,
                stored: 0
            }
        ),
        "{err:?}"
    );
    f.assert_unchanged(&before);

    // Paired at version 2: the current session's commitment, but version 1 or 2.
    let mut f = Fixture::paired_at_v1();
    f.pair(2, "owner-2", NOW + 10);
    let request = f.start(NOW + 20);
    let before = f.stored();
    for (offered, owner) in [(1, "owner-1"), (2, "someone-else")] {
        let token = f.token(offered, owner, &request.code_commitment);
        let err = f.accept(token.as_bytes(), NOW + 20).unwrap_err();
        assert!(
            matches!(err, BindingRejected::NotNewer { offered: o, stored: 2 } if o == offered),
            "version {offered}: {err:?}"
        );
        f.assert_unchanged(&before);
    }
    assert_eq!(f.pairing.owner(), Some("owner-2"));
}

#[test]
fn bad_signature_is_refused() {
    let mut f = Fixture::paired_at_v1();
    let request = f.start(NOW + 10);
    // Same kid, same issuer, but not the key the trust bundle lists.
    let impostor = PlatformSigner::generate(KID);
    let token = impostor.owner_binding(
        DEVICE,
        WORKSPACE,
        "mallory",
        2,
        NOW,
        &request.code_commitment,
    );
    let before = f.stored();
    let err = f.accept(token.as_bytes(), NOW + 10).unwrap_err();
    assert!(
        matches!(err, BindingRejected::Signature(JwsError::BadSignature)),
        "{err:?}"
    );
    f.assert_unchanged(&before);

    // A valid token with one payload byte changed no longer verifies either.
    let genuine = f.token(2, "owner-2", &request.code_commitment);
    let mut parts: Vec<String> = genuine.split('.').map(str::to_owned).collect();
    let mut payload: serde_json::Value = serde_json::from_slice(&base64_decode(&parts[1])).unwrap();
    payload["referenceId"] = "mallory".into();
    parts[1] = base64_encode(&serde_json::to_vec(&payload).unwrap());
    let tampered = parts.join(".");
    let err = f.accept(tampered.as_bytes(), NOW + 10).unwrap_err();
    assert!(
        matches!(err, BindingRejected::Signature(JwsError::BadSignature)),
        "{err:?}"
    );
    f.assert_unchanged(&before);
}

fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .unwrap()
}

fn base64_encode(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[test]
fn binding_signed_by_a_key_missing_from_the_bundle_is_refused() {
    let mut f = Fixture::paired_at_v1();
    let request = f.start(NOW + 10);
    let stranger = PlatformSigner::generate("platform-9");
    let token = stranger.owner_binding(
        DEVICE,
        WORKSPACE,
        "mallory",
        2,
        NOW,
        &request.code_commitment,
    );
    let before = f.stored();
    let err = f.accept(token.as_bytes(), NOW + 10).unwrap_err();
    assert!(
        matches!(&err, BindingRejected::Signature(JwsError::UnknownKey(Some(k))) if k == "platform-9"),
        "{err:?}"
    );
    f.assert_unchanged(&before);
}

#[test]
fn binding_without_trust_bundle_is_refused() {
    let mut f = Fixture::paired_at_v1();
    let request = f.start(NOW + 10);
    let token = f.token(2, "owner-2", &request.code_commitment);
    let before = f.stored();
    let err = f
        .pairing
        .accept_binding(token.as_bytes(), None, &f.signer.issuer, None, NOW + 10)
        .unwrap_err();
    assert!(matches!(err, BindingRejected::NoTrustBundle), "{err:?}");
    f.assert_unchanged(&before);
}

#[test]
fn malformed_binding_is_refused() {
    // Known seeds, so the test can sign arbitrary payloads with the bundle's key.
    let mut f = Fixture::with_signer(PlatformSigner::from_seeds(ROOT_SEED, KID, KEY_SEED));
    f.pair(1, "owner-1", NOW);
    let key = SigningKey::from_bytes(&KEY_SEED);
    let request = f.start(NOW + 10);
    let before = f.stored();
    let good = f.claims(2, &request.code_commitment);
    // Signed with the bundle's own key: each failure below comes from the one spoiled part (the
    // genuine claims, signed the same way, are accepted at the end).
    let sign_json = |v: &serde_json::Value| {
        jws::sign(
            &key,
            Some(KID),
            OWNER_BINDING_TYP,
            &serde_json::to_vec(v).unwrap(),
        )
    };

    let mut accept = |token: &[u8]| {
        let err = f.accept(token, NOW + 10).unwrap_err();
        f.assert_unchanged(&before);
        err
    };

    // Not a JWS at all.
    for garbage in [&b"garbage"[..], b"", b"\xff\xfe\x00.", b"a.b.c.d"] {
        let err = accept(garbage);
        assert!(
            matches!(err, BindingRejected::Signature(JwsError::NotCompact)),
            "{garbage:?}: {err:?}"
        );
    }
    // Too large, refused before parsing.
    let huge = vec![b'a'; MAX_BINDING_BYTES + 1];
    let err = accept(&huge);
    assert!(
        matches!(err, BindingRejected::Signature(JwsError::TooLarge { len, max })
            if len == MAX_BINDING_BYTES + 1 && max == MAX_BINDING_BYTES),
        "{err:?}"
    );
    // Correctly signed, but the payload is not an owner binding.
    let token = jws::sign(
        &key,
        Some(KID),
        OWNER_BINDING_TYP,
        b"{\"not\":\"a binding\"}",
    );
    let err = accept(token.as_bytes());
    assert!(matches!(err, BindingRejected::Malformed(_)), "{err:?}");
    let token = jws::sign(&key, Some(KID), OWNER_BINDING_TYP, b"not json");
    let err = accept(token.as_bytes());
    assert!(matches!(err, BindingRejected::Malformed(_)), "{err:?}");
    // Every field right plus one the format does not have.
    let mut extra = serde_json::to_value(&good).unwrap();
    extra["admin"] = true.into();
    let err = accept(sign_json(&extra).as_bytes());
    assert!(
        matches!(&err, BindingRejected::Malformed(m) if m.contains("admin")),
        "{err:?}"
    );
    // A field missing.
    let mut missing = serde_json::to_value(&good).unwrap();
    missing.as_object_mut().unwrap().remove("version");
    let err = accept(sign_json(&missing).as_bytes());
    assert!(matches!(err, BindingRejected::Malformed(_)), "{err:?}");
    // The payload's kid is not the header's.
    let other_kid = OwnerBindingClaims {
        kid: "platform-2".into(),
        ..good.clone()
    };
    let err = accept(sign_json(&serde_json::to_value(&other_kid).unwrap()).as_bytes());
    assert!(matches!(err, BindingRejected::Malformed(_)), "{err:?}");
    // Another issuer.
    let other_iss = OwnerBindingClaims {
        iss: "someone-else".into(),
        ..good.clone()
    };
    let err = accept(sign_claims(&other_iss, &key).as_bytes());
    assert!(matches!(err, BindingRejected::Malformed(_)), "{err:?}");
    // A command attestation's typ: never accepted as a binding.
    let as_attestation = jws::sign(
        &key,
        Some(KID),
        ATTESTATION_TYP,
        &serde_json::to_vec(&good).unwrap(),
    );
    let err = accept(as_attestation.as_bytes());
    assert!(
        matches!(err, BindingRejected::Signature(JwsError::Type { .. })),
        "{err:?}"
    );

    // The session survived all of that: the genuine binding still pairs.
    let genuine = sign_claims(&good, &key);
    let binding = f.accept(genuine.as_bytes(), NOW + 10).unwrap();
    assert_eq!(binding.version, 2);
}

/// Signs binding claims with `key` under the header kid `KID` (what the platform would do).
fn sign_claims(claims: &OwnerBindingClaims, key: &SigningKey) -> String {
    jws::sign(
        key,
        Some(KID),
        OWNER_BINDING_TYP,
        &serde_json::to_vec(claims).unwrap(),
    )
}

#[test]
fn binding_with_wrong_commitment_is_refused() {
    let mut f = Fixture::paired_at_v1();
    let request = f.start(NOW + 10);
    let before = f.stored();
    // Another code for this device, the right code's commitment for another device, and empty.
    let other_code = code::commitment(DEVICE, "AAAA-AAAA-AAAA").unwrap();
    let other_device = PairingState::open(f.root.path(), OTHER_DEVICE, CODE_TTL)
        .unwrap()
        .start(&f.public_key, NOW + 10)
        .unwrap()
        .1
        .code_commitment;
    for commitment in [other_code.as_str(), other_device.as_str(), ""] {
        assert_ne!(commitment, request.code_commitment);
        let token = f.token(2, "owner-2", commitment);
        let err = f.accept(token.as_bytes(), NOW + 10).unwrap_err();
        assert!(
            matches!(err, BindingRejected::WrongCommitment),
            "{commitment:?}: {err:?}"
        );
        f.assert_unchanged(&before);
    }
}

#[test]
fn binding_without_pending_session_is_refused() {
    // Never started.
    let mut f = Fixture::new();
    let commitment = code::commitment(DEVICE, "AAAA-AAAA-AAAA").unwrap();
    let token = f.token(1, "owner-1", &commitment);
    let before = f.stored();
    let err = f.accept(token.as_bytes(), NOW).unwrap_err();
    assert!(matches!(err, BindingRejected::NotPending), "{err:?}");
    f.assert_unchanged(&before);
    assert_eq!(read_opt(&f.binding_path()), None);

    // Paired at version 1, no session since: a newer binding for the finished session.
    let mut f = Fixture::new();
    let request = f.start(NOW);
    let v1 = f.token(1, "owner-1", &request.code_commitment);
    let v2 = f.token(2, "owner-2", &request.code_commitment);
    f.accept(v1.as_bytes(), NOW).unwrap();
    let before = f.stored();
    let err = f.accept(v2.as_bytes(), NOW + 1).unwrap_err();
    assert!(matches!(err, BindingRejected::NotPending), "{err:?}");
    f.assert_unchanged(&before);

    // A fresh process (restart) has no pending session either.
    let mut restarted = PairingState::open(&f.state_dir, DEVICE, CODE_TTL).unwrap();
    let err = restarted
        .accept_binding(
            v2.as_bytes(),
            f.trust.current(),
            &f.signer.issuer,
            None,
            NOW + 2,
        )
        .unwrap_err();
    assert!(matches!(err, BindingRejected::NotPending), "{err:?}");
    f.assert_unchanged(&before);
}

#[test]
fn binding_for_another_workspace_than_configured_is_refused() {
    let mut f = Fixture::paired_at_v1();
    let request = f.start(NOW + 10);
    let token = f.signer.owner_binding(
        DEVICE,
        OTHER_WORKSPACE,
        "owner-2",
        2,
        NOW,
        &request.code_commitment,
    );
    let before = f.stored();
    let err = f
        .accept_in(token.as_bytes(), Some(WORKSPACE), NOW + 10)
        .unwrap_err();
    assert!(
        matches!(&err, BindingRejected::WrongWorkspace { offered, configured }
            if offered == OTHER_WORKSPACE && configured == WORKSPACE),
        "{err:?}"
    );
    f.assert_unchanged(&before);

    // Without a configured workspace the binding's own workspace is taken.
    let binding = f.accept_in(token.as_bytes(), None, NOW + 10).unwrap();
    assert_eq!(binding.workspace_id.as_deref(), Some(OTHER_WORKSPACE));
}

#[test]
fn too_many_pairing_attempts_are_rate_limited() {
    let mut f = Fixture::paired_at_v1(); // one attempt at NOW
    let mut last = None;
    for i in 1..MAX_ATTEMPTS as u64 {
        last = Some(f.start(NOW + i));
    }
    let last = last.unwrap();
    let before = f.stored();

    // The sixth start within the window is refused, and tells how long to wait.
    let err = f.pairing.start(&f.public_key, NOW + 5).unwrap_err();
    assert_eq!(
        err,
        PairingError::RateLimited {
            retry_after_secs: ATTEMPT_WINDOW_SECS - 5
        }
    );
    let err = f
        .pairing
        .start(&f.public_key, NOW + ATTEMPT_WINDOW_SECS - 1)
        .unwrap_err();
    assert_eq!(
        err,
        PairingError::RateLimited {
            retry_after_secs: 1
        }
    );
    f.assert_unchanged(&before);
    // A refused start does not replace the pending session.
    assert_eq!(
        f.pairing.pending_expires_at(),
        Some(NOW + (MAX_ATTEMPTS as u64 - 1) + CODE_TTL)
    );

    // Once the oldest attempt leaves the window, one more start is allowed ...
    let request = f.start(NOW + ATTEMPT_WINDOW_SECS);
    assert_ne!(request.code_commitment, last.code_commitment);
    // ... and only one: the next oldest (NOW + 1) is still inside it.
    let err = f
        .pairing
        .start(&f.public_key, NOW + ATTEMPT_WINDOW_SECS)
        .unwrap_err();
    assert_eq!(
        err,
        PairingError::RateLimited {
            retry_after_secs: 1
        }
    );
    // The session that got through pairs normally.
    let token = f.token(2, "owner-2", &request.code_commitment);
    f.accept(token.as_bytes(), NOW + ATTEMPT_WINDOW_SECS + 1)
        .unwrap();
    assert_eq!(f.pairing.owner(), Some("owner-2"));
}

#[test]
fn storage_failure_refuses_and_keeps_the_binding() {
    let mut f = Fixture::paired_at_v1();
    let request = f.start(NOW + 10);
    let token = f.token(2, "owner-2", &request.code_commitment);
    let before = f.stored();
    // The state directory vanishes from under the daemon (unmounted, say).
    let moved = f.root.path().join("moved");
    fs::rename(&f.state_dir, &moved).unwrap();
    let err = f.accept(token.as_bytes(), NOW + 10).unwrap_err();
    fs::rename(&moved, &f.state_dir).unwrap();
    assert!(matches!(err, BindingRejected::Storage(_)), "{err:?}");
    f.assert_unchanged(&before);
    // Nothing was committed, so the session is still pending and can complete once it is back.
    let binding = f.accept(token.as_bytes(), NOW + 11).unwrap();
    assert_eq!(binding.version, 2);
}

/// SUSPECTED BUG: `accept_binding` never looks at the trust bundle's `expires_at`.
///
/// For attestations, an expired bundle means no platform key is trusted any more
/// (`auth::decide` refuses with `trust-bundle-expired`), but an owner binding signed by a key
/// from a bundle that expired is still accepted and stored, so a retired (possibly compromised)
/// platform key can still re-pair the device to a new owner as long as no newer bundle arrived.
#[test]
fn binding_verified_against_an_expired_trust_bundle_is_refused() {
    let mut f = Fixture::paired_at_v1();
    let expires_at = f.bundle().expires_at;
    assert_eq!(expires_at, NOW + BUNDLE_LIFETIME);
    // The code is still valid; only the bundle has expired.
    let request = f.start(expires_at - 100);
    let token = f.token(2, "owner-2", &request.code_commitment);
    let before = f.stored();
    let now = expires_at + 1;
    assert!(f.pairing.is_pending(now));
    let result = f.accept(token.as_bytes(), now);
    assert!(
        result.is_err(),
        "binding accepted at {now} with a trust bundle that expired at {expires_at}: {result:?}"
    );
    f.assert_unchanged(&before);
}

// ---------------------------------------------------------------------------------------------
// Crash safety
// ---------------------------------------------------------------------------------------------

/// Set (to a state directory) only in the writer child spawned by the crash test.
const WRITER_ENV: &str = "TEXTURE_PAIRING_WRITER";
/// The helper test the crash test re-executes.
const WRITER_TEST: &str = "crash_helper_writes_ever_newer_bindings_until_killed";
/// Prefix of the writer's progress lines (libtest may put its own text before them).
const MARK: &str = "@@pairing-writer ";
const CHILD_RUNS: u32 = 30;

/// When run as the crash test's child: pairs over and over with ever higher versions, printing
/// each version once it is stored, until killed. Otherwise returns at once.
#[test]
fn crash_helper_writes_ever_newer_bindings_until_killed() {
    let Some(dir) = std::env::var_os(WRITER_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let signer = PlatformSigner::from_seeds(ROOT_SEED, KID, KEY_SEED);
    // The trust bundle lives apart, so the state directory holds only binding files.
    let trust_dir = dir.join("trust");
    fs::create_dir_all(&trust_dir).unwrap();
    let mut trust = TrustStore::open(root_key(&signer), &signer.issuer, &trust_dir);
    // Identical bytes every run (deterministic keys and signatures): accepted once, then a no-op.
    let far = NOW + 1_000_000_000_000;
    trust
        .offer(signer.trust_bundle(1, NOW, far, &[]).as_bytes(), NOW)
        .unwrap();
    let bundle = trust.current().unwrap().clone();

    let mut pairing = PairingState::open(&dir, DEVICE, CODE_TTL).unwrap();
    let mut version = pairing.binding().version;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{MARK}ready {version}").unwrap();
    out.flush().unwrap();
    loop {
        version += 1;
        // One session per rate-limit window, so the writer is never rate limited.
        let now = NOW + version * ATTEMPT_WINDOW_SECS;
        let (_, request) = pairing.start("device-key", now).unwrap();
        let token = signer.owner_binding(
            DEVICE,
            WORKSPACE,
            &format!("owner-{version}"),
            version,
            now,
            &request.code_commitment,
        );
        pairing
            .accept_binding(
                token.as_bytes(),
                Some(&bundle),
                &signer.issuer,
                Some(WORKSPACE),
                now,
            )
            .unwrap();
        writeln!(out, "{MARK}{version}").unwrap();
        out.flush().unwrap();
    }
}

enum WriterLine {
    Ready(u64),
    Stored(u64),
}

fn parse_writer_line(line: &str) -> Option<WriterLine> {
    let rest = &line[line.find(MARK)? + MARK.len()..];
    match rest.strip_prefix("ready ") {
        Some(v) => Some(WriterLine::Ready(v.trim().parse().ok()?)),
        None => Some(WriterLine::Stored(rest.trim().parse().ok()?)),
    }
}

#[test]
fn killing_the_writer_never_leaves_a_torn_binding() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("state");
    fs::create_dir(&dir).unwrap();
    let path = dir.join(BINDING_FILE);
    let exe = std::env::current_exe().unwrap();
    let mut rng = fastrand::Rng::with_seed(0x7e57_0b1d);

    // The version on disk after the previous run (0: none yet).
    let mut stored: u64 = 0;
    let mut runs_killed_mid_stream = 0;
    let mut runs_with_in_flight_write = 0;
    let mut leftovers = 0;
    for run in 0..CHILD_RUNS {
        let window = Duration::from_millis(rng.u64(5..=60));
        let mut child = Command::new(&exe)
            .args(["--exact", WRITER_TEST, "--nocapture", "--test-threads=1"])
            .env(WRITER_ENV, &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(parsed) = parse_writer_line(&line) {
                    if tx.send(parsed).is_err() {
                        break;
                    }
                }
            }
        });

        // Wait for the writer to be set up (no timing involved), then let it write for the
        // random window.
        let mut printed = Vec::new();
        let mut ready = None;
        let mut deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(WriterLine::Ready(v)) => {
                    ready = Some(v);
                    deadline = Instant::now() + window;
                }
                Ok(WriterLine::Stored(v)) => printed.push(v),
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let still_running = child.try_wait().unwrap().is_none();
        let _ = child.kill();
        let status = child.wait().unwrap();
        reader.join().unwrap();
        // Lines already in the pipe when the kill landed were printed before it, too.
        printed.extend(rx.try_iter().filter_map(|l| match l {
            WriterLine::Stored(v) => Some(v),
            WriterLine::Ready(_) => None,
        }));
        let mut stderr = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut stderr)
            .unwrap();
        assert_eq!(
            status.signal(),
            Some(9),
            "run {run}: the writer was not killed but ended with {status:?}:\n{stderr}"
        );
        let ready = ready.unwrap_or_else(|| panic!("run {run}: writer never got ready:\n{stderr}"));
        assert_eq!(
            ready, stored,
            "run {run}: writer resumed from the wrong version"
        );
        // Each run continues exactly where the stored binding left off.
        let expected: Vec<u64> = (stored + 1..=stored + printed.len() as u64).collect();
        assert_eq!(printed, expected, "run {run}: versions out of sequence");

        let last_printed = printed.last().copied().unwrap_or(stored);
        match read_opt(&path) {
            None => assert_eq!(
                last_printed, 0,
                "run {run}: binding file missing after version {last_printed} was stored"
            ),
            Some(bytes) => {
                let binding: Binding = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    panic!(
                        "run {run}: torn binding ({e}): {:?}",
                        String::from_utf8_lossy(&bytes)
                    )
                });
                let v = binding.version;
                assert!(
                    (last_printed..=last_printed + 1).contains(&v),
                    "run {run}: stored version {v}, last printed {last_printed}"
                );
                assert_eq!(
                    binding.reference_id,
                    Some(format!("owner-{v}")),
                    "run {run}: record mixes versions"
                );
                assert_eq!(binding.workspace_id.as_deref(), Some(WORKSPACE));
                let token = binding.token.as_deref().unwrap_or_default();
                assert_eq!(token.split('.').count(), 3, "run {run}: token cut short");
                let mode = fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "run {run}: mode {mode:o}");
                // The binding path is the record itself, and a restart reads exactly that.
                let reopened = PairingState::open(&dir, DEVICE, CODE_TTL).unwrap();
                assert_eq!(reopened.binding(), &binding, "run {run}");
                if v == last_printed + 1 {
                    runs_with_in_flight_write += 1;
                }
                stored = v;
            }
        }
        // A kill mid-write may leave the writer's one temporary file (overwritten by the next
        // write, so they never pile up), but never a torn file under the binding's name.
        leftovers = 0;
        for entry in fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().to_string_lossy().into_owned();
            if name == BINDING_FILE || name == "trust" {
                continue;
            }
            assert!(
                name == format!(".{BINDING_FILE}.tmp"),
                "run {run}: unexpected file {name:?}"
            );
            leftovers += 1;
        }
        assert!(leftovers <= 1, "run {run}: {leftovers} temporary files");

        if still_running && !printed.is_empty() {
            runs_killed_mid_stream += 1;
        }
    }
    eprintln!(
        "{CHILD_RUNS} runs: {runs_killed_mid_stream} killed mid-stream, \
         {runs_with_in_flight_write} with a write in flight, final version {stored}, \
         {leftovers} temporary files left in the state directory"
    );
    assert!(
        runs_killed_mid_stream > 0,
        "no run was killed while writing bindings"
    );
    assert!(stored > 0, "no binding was ever written");
}

// ---------------------------------------------------------------------------------------------
// Unverified text and repeated members (issue 13, items 4 and 8)
// ---------------------------------------------------------------------------------------------

/// Any character a terminal acts on: C0, DEL, C1 (among them CSI U+009B), bidi overrides.
fn has_terminal_control(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'))
}

#[test]
fn refusal_reason_never_repeats_unverified_header_text() {
    let mut f = Fixture::with_signer(PlatformSigner::from_seeds(ROOT_SEED, KID, KEY_SEED));
    let request = f.start(NOW);
    let before = f.stored();
    let key = SigningKey::from_bytes(&KEY_SEED);
    let payload =
        base64_encode(&serde_json::to_vec(&f.claims(1, &request.code_commitment)).unwrap());
    let evil = r"\u001b[2J\u001b[Hpaired to mallory (binding version 9)\r\n\u009b31m\u202e";
    for header in [
        // An unknown member whose name is the attack (the case the review reproduced).
        format!(r#"{{"alg":"EdDSA","kid":"{KID}","typ":"{OWNER_BINDING_TYP}","{evil}":1}}"#),
        format!(r#"{{"alg":"{evil}","kid":"{KID}","typ":"{OWNER_BINDING_TYP}"}}"#),
        format!(r#"{{"alg":"EdDSA","kid":"{KID}","typ":"{evil}"}}"#),
        format!(r#"{{"alg":"EdDSA","kid":"{evil}","typ":"{OWNER_BINDING_TYP}"}}"#),
    ] {
        // Correctly signed too, so no check stops before the header's text is looked at.
        let signing_input = format!("{}.{payload}", base64_encode(header.as_bytes()));
        let signature = ed25519_dalek::Signer::sign(&key, signing_input.as_bytes());
        let token = format!("{signing_input}.{}", base64_encode(&signature.to_bytes()));
        let err = f.accept(token.as_bytes(), NOW + 1).unwrap_err();
        assert!(matches!(err, BindingRejected::Signature(_)), "{err:?}");
        let reason = err.to_string();
        assert!(
            !has_terminal_control(&reason) && !reason.contains("mallory"),
            "{header}: {reason:?}"
        );
        f.assert_unchanged(&before);
    }
}

#[test]
fn binding_repeating_a_member_at_any_depth_is_refused_as_malformed() {
    let mut f = Fixture::with_signer(PlatformSigner::from_seeds(ROOT_SEED, KID, KEY_SEED));
    let request = f.start(NOW);
    let before = f.stored();
    let key = SigningKey::from_bytes(&KEY_SEED);
    let good = serde_json::to_string(&f.claims(1, &request.code_commitment)).unwrap();
    // The owner named twice: a first-wins reader would see another owner than the device.
    let twice = good.replacen(
        r#""referenceId":"owner-1""#,
        r#""referenceId":"owner-1","referenceId":"mallory""#,
        1,
    );
    assert_ne!(twice, good);
    let token = jws::sign(&key, Some(KID), OWNER_BINDING_TYP, twice.as_bytes());
    let err = f.accept(token.as_bytes(), NOW + 1).unwrap_err();
    assert!(
        matches!(&err, BindingRejected::Malformed(m) if m.contains("repeats")),
        "{err:?}"
    );
    f.assert_unchanged(&before);
    let token = jws::sign(&key, Some(KID), OWNER_BINDING_TYP, good.as_bytes());
    assert_eq!(f.accept(token.as_bytes(), NOW + 1).unwrap().version, 1);
}

// ---------------------------------------------------------------------------------------------
// Pairing end to end over mosquitto with TLS: `texture-agent pair` shows a code, the platform
// (a peer here) checks the typed code against the device's commitment and answers with a signed
// owner binding, and from then on exactly the owner's scoped keys run commands.

const GATEWAY: &str = "gw-pair";
const GATEWAY_WORKSPACE: &str = "ws-home";

struct Platform {
    signer: PlatformSigner,
    peer: Peer,
    next_id: u32,
}

impl Platform {
    /// Sends `slug` as `key` and returns the reply.
    async fn command(&mut self, key: &ApiKey, slug: &str) -> serde_json::Value {
        self.next_id += 1;
        let id = format!("cmd-{}", self.next_id);
        let claims = self.signer.claims(
            key,
            AttestedCommand::new(GATEWAY, &id, slug, serde_json::json!({})),
            system_secs(),
            300,
        );
        self.peer
            .publish(
                &device_topic(GATEWAY, "commands"),
                self.signer.attest(&claims),
                false,
            )
            .await;
        self.peer
            .expect(&device_topic(GATEWAY, "replies"), WAIT, |m| {
                m.json()["commandId"] == id.as_str()
            })
            .await
            .json()
    }

    async fn runs(&mut self, key: &ApiKey) -> bool {
        let r = self.command(key, "agent:ping").await;
        match r["type"].as_str() {
            Some("command.succeeded") => true,
            Some("command.refused") if r["status"] == 403 => false,
            _ => panic!("unexpected reply {r}"),
        }
    }

    /// Runs `texture-agent pair`, plays the Connect page for `owner`, and checks it completes.
    async fn pair(&mut self, config: &std::path::Path, owner: &str, version: u64) {
        let mut pair = kit::agent_process(BIN)
            .arg("--config")
            .arg(config)
            .arg("pair")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(pair.stdout.take().unwrap()).lines();
        // The code is printed alone on an indented line: what the person would type.
        let code = lines
            .by_ref()
            .map(Result::unwrap)
            .find_map(|l| {
                let t = l.trim();
                (l.starts_with("    ") && t.len() == 14 && t.as_bytes()[4] == b'-')
                    .then(|| t.to_string())
            })
            .expect("pair printed a code");
        let request = self
            .peer
            .expect(&device_topic(GATEWAY, "pairing/request"), WAIT, |_| true)
            .await
            .json();
        assert!(
            !request.to_string().contains(&code),
            "the code must not travel in clear"
        );
        assert!(request["publicKey"].as_str().unwrap().len() >= 43);
        // The platform's check: the typed code (lower case, as people type) matches the commitment.
        let typed = code.to_lowercase();
        let expected = commitment(GATEWAY, &typed).unwrap();
        assert_eq!(request["codeCommitment"], expected.as_str());
        let binding = self.signer.owner_binding(
            GATEWAY,
            GATEWAY_WORKSPACE,
            owner,
            version,
            system_secs(),
            &expected,
        );
        self.peer
            .publish(&device_topic(GATEWAY, "pairing/binding"), binding, false)
            .await;
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        let status = pair.wait().unwrap();
        assert!(status.success(), "pair failed: {rest:?}");
        assert!(
            rest.iter()
                .any(|l| l.contains(&format!("paired to {owner} (binding version {version})"))),
            "{rest:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_paired_owners_scoped_keys_run_through_repairing_and_unpairing() {
    let Testbed {
        pki,
        broker,
        signer,
        peer,
    } = Testbed::start(
        PlatformSigner::generate("platform-1"),
        &[
            &device_topic(GATEWAY, "replies"),
            &device_topic(GATEWAY, "pairing/request"),
        ],
    )
    .await;
    let mut platform = Platform {
        signer,
        peer,
        next_id: 0,
    };

    let cfg =
        AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&platform.signer, GATEWAY_WORKSPACE);
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(BIN, &config);
    agent.wait_for_log("trust bundle accepted", WAIT);

    let server = ApiKey::server("key-server", GATEWAY_WORKSPACE);
    let alice = ApiKey::scoped("key-alice", GATEWAY_WORKSPACE, "user-a");
    let bob = ApiKey::scoped("key-bob", GATEWAY_WORKSPACE, "user-b");

    // 1. Unpaired: no scoped key runs.
    assert!(!platform.runs(&alice).await);

    // 2. Paired to A.
    platform.pair(&config, "user-a", 1).await;
    assert!(platform.runs(&alice).await);
    assert!(!platform.runs(&bob).await);

    // 3. The home is sold: re-paired to B with a higher version.
    platform.pair(&config, "user-b", 2).await;
    assert!(platform.runs(&bob).await);
    assert!(!platform.runs(&alice).await);

    // 4. Only a server key may unpair; afterwards no scoped key runs.
    let r = platform.command(&bob, "agent:unpair").await;
    assert_eq!(r["status"], 403, "{r}");
    let r = platform.command(&server, "agent:unpair").await;
    assert_eq!(r["type"], "command.succeeded", "{r}");
    assert!(!platform.runs(&alice).await);
    assert!(!platform.runs(&bob).await);
    assert!(platform.runs(&server).await);

    // status reports the unpaired state with the version kept.
    let out = kit::agent_command(BIN, &config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("unpaired (binding version 2)"), "{text}");
    assert!(text.contains("bundle version 1"), "{text}");
}

/// A junk owner binding whose JWS header has an unknown member named with terminal escapes:
/// clear the screen, home the cursor, print a fake "paired to" line and a fake code. Anyone who
/// can publish on the device's `pairing/binding` topic can send it; the header is unverified.
fn junk_binding_with_escapes() -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let name =
        r"\u001b[2J\u001b[Hpaired to mallory (binding version 9)\n\n    AAAA-BBBB-CCCC\n\u009b32m";
    let header = format!(
        r#"{{"alg":"EdDSA","kid":"platform-1","typ":"texture-owner-binding+jws","{name}":1}}"#
    );
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(b"{}"),
        URL_SAFE_NO_PAD.encode([0u8; 64])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_output_never_carries_escapes_from_a_junk_binding() {
    let Testbed {
        pki,
        broker,
        signer,
        mut peer,
    } = Testbed::start(
        PlatformSigner::generate("platform-1"),
        &[&device_topic(GATEWAY, "pairing/request")],
    )
    .await;
    let cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, GATEWAY_WORKSPACE);
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(BIN, &config);
    agent.wait_for_log("trust bundle accepted", WAIT);

    let mut pair = kit::agent_process(BIN)
        .arg("--config")
        .arg(&config)
        .arg("pair")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Everything `pair` writes, as bytes: an escape must not hide in a lossy conversion.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let stdout = pair.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = Vec::new();
            match std::io::BufRead::read_until(&mut reader, b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut output: Vec<Vec<u8>> = Vec::new();
    let next_line = |output: &mut Vec<Vec<u8>>| {
        let line = rx.recv_timeout(WAIT).expect("pair kept printing");
        output.push(line.clone());
        String::from_utf8_lossy(&line).into_owned()
    };
    let code = loop {
        let l = next_line(&mut output);
        let t = l.trim();
        if l.starts_with("    ") && t.len() == 14 && t.as_bytes()[4] == b'-' {
            break t.to_string();
        }
    };
    let request = peer
        .expect(&device_topic(GATEWAY, "pairing/request"), WAIT, |_| true)
        .await
        .json();
    let binding_topic = device_topic(GATEWAY, "pairing/binding");
    peer.publish(&binding_topic, junk_binding_with_escapes(), false)
        .await;
    // The refusal reached `pair` ...
    while !next_line(&mut output).contains("binding refused") {}
    // ... and the session goes on: the genuine binding still pairs.
    let commitment = commitment(GATEWAY, &code).unwrap();
    assert_eq!(request["codeCommitment"], commitment.as_str());
    let binding = signer.owner_binding(
        GATEWAY,
        GATEWAY_WORKSPACE,
        "user-a",
        1,
        system_secs(),
        &commitment,
    );
    peer.publish(&binding_topic, binding, false).await;
    while let Ok(line) = rx.recv_timeout(WAIT) {
        output.push(line);
    }
    let status = pair.wait().unwrap();
    let mut stderr = Vec::new();
    std::io::Read::read_to_end(&mut pair.stderr.take().unwrap(), &mut stderr).unwrap();
    let all: Vec<u8> = output.concat();
    let text = String::from_utf8_lossy(&all);
    assert!(
        status.success(),
        "pair failed:\n{text}\n{}",
        String::from_utf8_lossy(&stderr)
    );
    for (name, bytes) in [("stdout", &all), ("stderr", &stderr)] {
        assert!(
            !bytes.contains(&0x1b) && !String::from_utf8_lossy(bytes).contains('\u{9b}'),
            "an escape reached pair's {name}:\n{text:?}"
        );
    }
    let paired: Vec<&str> = text.lines().filter(|l| l.contains("paired to")).collect();
    assert_eq!(
        paired,
        ["paired to user-a (binding version 1)"],
        "a fake line reached pair's output:\n{text}"
    );
    // The agent's own log of the refusal does not carry it either.
    let refused = agent.wait_for_logs("owner binding refused", 1, WAIT);
    for line in refused {
        let error = line["error"].as_str().unwrap_or_default();
        assert!(!error.chars().any(char::is_control), "{error:?}");
        assert!(!error.contains("mallory"), "{error:?}");
    }
}

/// A junk owner binding whose header carries an unknown member with a `len`-byte name.
fn junk_binding_of(len: usize) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let header = format!(
        r#"{{"alg":"EdDSA","kid":"platform-1","typ":"texture-owner-binding+jws","{}":1}}"#,
        "x".repeat(len)
    );
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(b"{}"),
        URL_SAFE_NO_PAD.encode([0u8; 64])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_client_that_stops_reading_does_not_stop_commands() {
    use std::io::Write;
    let replies = device_topic(GATEWAY, "replies");
    let Testbed {
        pki,
        broker,
        signer,
        mut peer,
    } = Testbed::start(PlatformSigner::generate("platform-1"), &[&replies]).await;
    let cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, GATEWAY_WORKSPACE);
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(BIN, &config);
    agent.wait_for_log("trust bundle accepted", WAIT);

    // A local client asks for a pairing session, then never reads a byte of what it is sent.
    let socket = pki
        .path()
        .join(format!("run-{GATEWAY}"))
        .join("control.sock");
    let mut stalled = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stalled.write_all(b"{\"op\":\"pair\"}\n").unwrap();
    agent.wait_for_log("pairing session started", WAIT);

    // A flood of junk bindings: each is refused and the refusal offered to that client, far
    // more than its queue of 8 events and its socket's buffer (a few hundred short writes) hold.
    // The refusals are short (they quote nothing from the junk, issue 13 item 4), so it takes
    // this many; with the long quoted names of before, a few dozen were enough.
    let binding_topic = device_topic(GATEWAY, "pairing/binding");
    let flood = 2_000;
    for _ in 0..flood {
        peer.publish(&binding_topic, junk_binding_of(16), false)
            .await;
    }

    // A signed command must still be answered. It is re-sent (the same attestation, so it runs
    // at most once) until answered, since the flood may have it shed (503) or dropped.
    let server = ApiKey::server("key-server", GATEWAY_WORKSPACE);
    let claims = signer.claims(
        &server,
        AttestedCommand::new(
            GATEWAY,
            "cmd-after-flood",
            "agent:ping",
            serde_json::json!({}),
        ),
        system_secs(),
        300,
    );
    let attestation = signer.attest(&claims);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let answered = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer to a signed command within 20 s of a flood while a pair client stalls; \
             {} bindings refused so far",
            agent.logs_with_message("owner binding refused").len()
        );
        peer.publish(
            &device_topic(GATEWAY, "commands"),
            attestation.clone(),
            false,
        )
        .await;
        let got = peer.collect(&replies, Duration::from_secs(1)).await;
        if let Some(r) = got
            .iter()
            .map(|m| m.json())
            .find(|r| r["commandId"] == "cmd-after-flood" && r["type"] == "command.succeeded")
        {
            break r;
        }
    };
    assert_eq!(answered["status"], 200, "{answered}");
    // The stalled client is still connected (it was skipped, not waited for), and the agent
    // handled the whole flood.
    let refused = agent.logs_with_message("owner binding refused").len();
    eprintln!("{refused} of {flood} junk bindings refused; the rest overflowed the inbound queue");
    assert!(refused >= 100, "only {refused} bindings refused");
    drop(stalled);
}

// ---------------------------------------------------------------------------------------------
// PROTOCOL 11.4: the pending pairing request is published again, byte for byte, after the link
// comes back, so a platform that missed it (or a broker that lost it) still gets it.

const RETRY_GATEWAY: &str = "gw-pair-again";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_pairing_request_is_sent_again_after_a_reconnect() {
    let pki = Pki::new();
    // Persistent: the platform's subscription and its queued messages survive the outage, so
    // what the agent publishes right after it reconnects reaches the peer whenever it is back.
    let mut broker = Mosquitto::start_with(&pki, true);
    let signer = PlatformSigner::generate("platform-1");
    let requests = device_topic(RETRY_GATEWAY, "pairing/request");
    let mut peer =
        Peer::connect_with(&pki, broker.port, PLATFORM_CLIENT, &[&requests], false).await;
    let now = system_secs();
    peer.publish(
        &texture_agent::link::topics::Topics::trust_bundle(),
        signer.trust_bundle(1, now, now + 3_600, &[]),
        true,
    )
    .await;
    let mut cfg = AgentConfig::new(&pki, broker.port, RETRY_GATEWAY);
    cfg.trust_root = Some(signer.root_public_key());
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(BIN, &config);
    agent.wait_for_log("trust bundle accepted", WAIT);

    let mut pair = kit::agent_process(BIN)
        .arg("--config")
        .arg(&config)
        .arg("pair")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = peer.expect(&requests, WAIT, |_| true).await;

    broker.stop_gracefully();
    agent.wait_for_log("link down", WAIT);
    broker.restart();
    let deadline = Instant::now() + WAIT;
    while agent.logs_with_message("connected").len() < 2 {
        assert!(
            Instant::now() < deadline,
            "no reconnect:\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let again = peer.expect(&requests, WAIT, |_| true).await;
    assert_eq!(
        String::from_utf8_lossy(&again.payload),
        String::from_utf8_lossy(&first.payload),
        "the same request, byte for byte"
    );
    let _ = pair.kill();
    let _ = pair.wait();
}
