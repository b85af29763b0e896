//! Fuzzes the command authorisation decision (`texture_agent::inbound::auth::decide`).
//!
//! Every input is tried twice:
//! 1. as raw bytes on the command topic;
//! 2. as edits applied to one of a handful of genuinely signed attestations, so the fuzzer also
//!    reaches the checks that sit behind the signature (header members, base64 canonicality,
//!    signature malleability, payload parsing) without having to forge anything.
//!
//! Besides "never panics", the target asserts the property the whole design rests on: a verdict
//! that carries verified claims (Allow, Duplicate, or a refusal naming the command id) is only
//! ever reached by a token the platform actually signed, byte for byte. JWS over Ed25519 with
//! canonical base64url and `verify_strict` leaves exactly one accepted encoding per signed
//! token, so any other input reaching such a verdict is a forgery or a malleability bug.

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use serde_json::json;
use texture_agent::inbound::auth::jws::public_key_from_base64;
use texture_agent::inbound::auth::replay::ReplayWindow;
use texture_agent::inbound::auth::trust::{TrustBundle, TrustStore};
use texture_agent::inbound::auth::{decide, Context, Verdict};
use texture_agent::sim::platform::{ApiKey, AttestedCommand, PlatformSigner, DEFAULT_ISSUER};

const NOW: u64 = 1_800_000_000;
const SKEW: u64 = 60;
const DEVICE: &str = "gw-fuzz";
const WORKSPACE: &str = "ws-fuzz";
const OWNER: &str = "user-owner";

struct Fixture {
    bundle: TrustBundle,
    replay: ReplayWindow,
    /// Every token the "platform" signed; the only inputs allowed to verify.
    signed: Vec<String>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let signer = PlatformSigner::from_seeds([7; 32], "fuzz-key-1", [9; 32]);
        let dir = std::env::temp_dir().join(format!("texture-agent-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz state dir");
        // A fresh state dir per process: a leftover bundle or journal would change the verdicts.
        let _ = std::fs::remove_file(dir.join(texture_agent::inbound::auth::trust::BUNDLE_FILE));
        let _ = std::fs::remove_file(dir.join(texture_agent::inbound::auth::replay::JOURNAL_FILE));

        let root = public_key_from_base64(&signer.root_public_key()).expect("root key");
        let mut store = TrustStore::open(root, DEFAULT_ISSUER, &dir);
        let bundle_token =
            signer.trust_bundle(1, NOW - 1_000, NOW + 86_400, &["key-revoked".to_string()]);
        store
            .offer(bundle_token.as_bytes(), NOW)
            .expect("fixture bundle accepted");
        let bundle = store.current().expect("bundle held").clone();

        let server = ApiKey::server("key-server", WORKSPACE);
        let ping = |key: &ApiKey, device: &str, jti: &str, iat: u64, ttl: u64| {
            signer.claims(
                key,
                AttestedCommand::new(device, jti, "agent:ping", json!({})),
                iat,
                ttl,
            )
        };
        let scoped = |user: &str| ApiKey::scoped("key-scoped", WORKSPACE, user);
        let connect = ApiKey::connect("key-connect", WORKSPACE);
        let other_ws = ApiKey::server("key-server", "ws-other");
        let revoked = ApiKey::server("key-revoked", WORKSPACE);
        let t0 = NOW - 10;
        let mut other_issuer = ping(&server, DEVICE, "c-iss", NOW, 60);
        other_issuer.iss = "someone-else".into();
        let claims = vec![
            ping(&server, DEVICE, "c-allow", t0, 300),
            ping(&scoped(OWNER), DEVICE, "c-owner", t0, 300),
            ping(&scoped("user-other"), DEVICE, "c-not-owner", t0, 300),
            ping(&connect, DEVICE, "c-connect", t0, 300),
            ping(&server, "gw-other", "c-wrong-device", t0, 300),
            ping(&other_ws, DEVICE, "c-wrong-ws", t0, 300),
            ping(&revoked, DEVICE, "c-revoked", t0, 300),
            ping(&server, DEVICE, "c-expired", NOW - 4_000, 3_600),
            ping(&server, DEVICE, "c-future", NOW + 600, 300),
            ping(&server, DEVICE, "c-seen", t0, 300),
            signer.claims(
                &server,
                AttestedCommand::new(
                    DEVICE,
                    "c-input",
                    "vendor:set-power",
                    json!({"watts": 1500, "nested": {"a": [1, 2, 3]}}),
                ),
                t0,
                300,
            ),
            // Signed but malformed on purpose: lifetime too long, bad jti, wrong issuer.
            ping(&server, DEVICE, "c-long", NOW, 3_601),
            ping(&server, DEVICE, "bad jti!", NOW, 60),
            other_issuer,
        ];

        let mut signed: Vec<String> = claims.iter().map(|c| signer.attest(c)).collect();
        // Root-signed, but a trust bundle: must never pass as a command.
        signed.push(bundle_token);

        let (mut replay, _) = ReplayWindow::open(&dir, 1_000, NOW).expect("replay journal");
        replay
            .record("c-seen", NOW - 10, NOW + 290 + SKEW, NOW)
            .expect("record");
        replay
            .complete("c-seen", b"{\"recorded\":true}")
            .expect("complete");

        // Fuzzing only reads the fixture, so its files are not needed any more.
        let _ = std::fs::remove_dir_all(&dir);
        let fixture = Fixture {
            bundle,
            replay,
            signed,
        };
        // The signed tokens must reach the verdicts they were made for; otherwise the edit mode
        // below would silently explore less than it claims to.
        let expected = [
            "allow",
            "allow",
            "not-owner",
            "connect-key",
            "wrong-device",
            "wrong-workspace",
            "revoked-key",
            "expired",
            "not-yet-valid",
            "duplicate",
            "allow",
            "unverified",
            "unverified",
            "unverified",
            "unverified",
        ];
        assert_eq!(fixture.signed.len(), expected.len());
        for (token, want) in fixture.signed.iter().zip(expected) {
            let got = match verdict(&fixture, token.as_bytes()) {
                Verdict::Allow(_) => "allow",
                Verdict::Duplicate { .. } => "duplicate",
                Verdict::Refuse { claims: None, .. } => "unverified",
                Verdict::Refuse { refusal, .. } => refusal.reason,
            };
            assert_eq!(got, want, "fixture token {token}");
        }
        fixture
    })
}

fn verdict(f: &Fixture, token: &[u8]) -> Verdict {
    let ctx = Context {
        device_id: DEVICE,
        workspace_id: Some(WORKSPACE),
        owner: Some(OWNER),
        trust: Some(&f.bundle),
        issuer: DEFAULT_ISSUER,
        now: NOW,
        skew: SKEW,
    };
    decide(token, &ctx, &f.replay)
}

fn check(f: &Fixture, token: &[u8]) {
    let verified = match verdict(f, token) {
        Verdict::Allow(_) | Verdict::Duplicate { .. } => true,
        Verdict::Refuse { claims, .. } => claims.is_some(),
    };
    if verified {
        assert!(
            f.signed.iter().any(|t| t.as_bytes() == token),
            "a token the platform never signed reached a verified verdict: {:?}",
            String::from_utf8_lossy(token)
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    check(f, data);

    // Edits to a signed token: each 3-byte chunk (lo, hi, value) overwrites, inserts or removes
    // one byte at position u16(lo, hi) modulo the length.
    if let Some((&selector, edits)) = data.split_first() {
        let mut token = f.signed[selector as usize % f.signed.len()]
            .clone()
            .into_bytes();
        for edit in edits.chunks_exact(3) {
            let at = usize::from(u16::from_le_bytes([edit[0], edit[1]])) % (token.len() + 1);
            match (at == token.len(), edit[2]) {
                (true, value) => token.push(value),
                (false, 0) => {
                    token.remove(at);
                }
                (false, value) if edit[1] & 0x80 != 0 => token.insert(at, value),
                (false, value) => token[at] = value,
            }
        }
        check(f, &token);
    }
});
