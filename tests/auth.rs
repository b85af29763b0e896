//! Command authorisation: the decision table of the public `Authorizer` fed real Ed25519
//! attestations and trust bundles (replay, expiry, revocation, key rotation, mutation
//! properties), and the replay journal end to end against an agent whose clock runs ahead.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use tempfile::TempDir;

use texture_agent::inbound::auth::claims::ATTESTATION_TYP;
use texture_agent::inbound::auth::jws;
use texture_agent::inbound::auth::trust::BundleRejected;
use texture_agent::inbound::auth::{Authorization, Authorizer, AuthorizerConfig, Owner};
use texture_agent::inbound::reply::{rfc3339, Reply};
use texture_agent::model::clock::system_secs;
use texture_agent::sim::platform::{ApiKey, AttestedCommand, PlatformSigner, DEFAULT_ISSUER};
use texture_agent_testkit as kit;

use kit::{device_topic, Agent, AgentConfig, Testbed};

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

// ---------------------------------------------------------------------------------------------
// Command authorisation seen from outside: the public `Authorizer`, fed real Ed25519
// attestations and trust bundles minted by `texture_agent::sim::platform`, the one signing module.
//
// Every case opens its own authorizer in its own temporary directory, so the replay table and
// the time floor of one case never leak into another. The authorizer reads the system clock
// itself, so attestations are minted against the same clock (`system_secs()`); every margin
// used below is tens of seconds, far more than a test takes.

const DEVICE: &str = "gw-0001";
const OTHER_DEVICE: &str = "gw-0002";
const WORKSPACE: &str = "ws-acme";
const OTHER_WORKSPACE: &str = "ws-globex";
const OWNER: &str = "user-alice";
/// The pairing state the tests judge commands against unless they say otherwise.
const PAIRED: Owner<'static> = Owner {
    reference_id: Some(OWNER),
    workspace_id: None,
};
const OTHER_USER: &str = "user-bob";
const KID: &str = "platform-2026-01";
const ROOT_SEED: [u8; 32] = [0x11; 32];
const KEY_SEED: [u8; 32] = [0x22; 32];
const OTHER_ROOT_SEED: [u8; 32] = [0x33; 32];
const OTHER_KEY_SEED: [u8; 32] = [0x44; 32];
const SKEW: u64 = 60;
const TTL: u64 = 300;
const BUNDLE_LIFETIME: u64 = 86_400;
const CAPACITY: usize = 64;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The platform the device is pinned to: deterministic root and signing key.
fn platform() -> PlatformSigner {
    PlatformSigner::from_seeds(ROOT_SEED, KID, KEY_SEED)
}

fn config(capacity: usize) -> AuthorizerConfig {
    AuthorizerConfig {
        device_id: DEVICE.into(),
        workspace_id: Some(WORKSPACE.into()),
        root: jws::public_key_from_base64(&platform().root_public_key()).expect("root key"),
        issuer: DEFAULT_ISSUER.into(),
        skew: SKEW,
        replay_capacity: capacity,
    }
}

fn open(dir: &Path, capacity: usize) -> Authorizer {
    Authorizer::open(config(capacity), dir)
        .expect("open authorizer")
        .0
}

/// A fresh state directory and an authorizer in it, paired to `OWNER`, with no bundle yet.
fn fresh(capacity: usize) -> (TempDir, Authorizer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let auth = open(dir.path(), capacity);
    (dir, auth)
}

/// A trust bundle valid from now for a day, listing every current key of `p`.
fn bundle(p: &PlatformSigner, version: u64, revoked: &[&str]) -> String {
    let revoked: Vec<String> = revoked.iter().map(|s| s.to_string()).collect();
    p.trust_bundle(
        version,
        system_secs(),
        system_secs() + BUNDLE_LIFETIME,
        &revoked,
    )
}

fn offer_ok(auth: &mut Authorizer, bundle: &str) {
    match auth.offer_trust_bundle(bundle.as_bytes()) {
        Ok(Some(_)) => {}
        other => panic!("bundle not accepted: {other:?}"),
    }
}

fn server_key() -> ApiKey {
    ApiKey::server("sk-live-1", WORKSPACE)
}

fn other_server_key() -> ApiKey {
    ApiKey::server("sk-live-2", WORKSPACE)
}

/// An attestation for `device`, issued at `iat`, valid for `TTL`, signed by `p`'s current key.
fn attest_at(p: &PlatformSigner, key: &ApiKey, device: &str, jti: &str, iat: u64) -> String {
    attest_slug(p, key, device, jti, "battery.setMode", iat)
}

fn attest_slug(
    p: &PlatformSigner,
    key: &ApiKey,
    device: &str,
    jti: &str,
    slug: &str,
    iat: u64,
) -> String {
    let input = serde_json::json!({ "mode": "charge", "powerW": 2500 });
    p.attest(&p.claims(
        key,
        AttestedCommand::new(device, jti, slug, input),
        iat,
        TTL,
    ))
}

/// An attestation from the platform, for this device, issued now.
fn attest(p: &PlatformSigner, key: &ApiKey, jti: &str) -> String {
    attest_at(p, key, DEVICE, jti, system_secs())
}

/// A valid attestation's claims JSON under a header with `alg: HS256`, correctly signed
/// (Ed25519) by the platform key: only the algorithm is wrong.
fn hs256_attestation(jti: &str) -> String {
    let p = platform();
    let claims = p.claims(
        &server_key(),
        AttestedCommand::new(DEVICE, jti, "battery.setMode", serde_json::json!({})),
        system_secs(),
        TTL,
    );
    let header = format!(r#"{{"alg":"HS256","kid":"{KID}","typ":"{ATTESTATION_TYP}"}}"#);
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap()));
    let signature = SigningKey::from_bytes(&KEY_SEED).sign(token.as_bytes());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    token
}

/// `token` with its payload part replaced by `payload`, header and signature kept.
fn with_payload(token: &str, payload: &[u8]) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "compact JWS");
    format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(payload),
        parts[2]
    )
}

/// The decoded payload of a compact JWS.
fn payload_of(token: &str) -> Vec<u8> {
    let part = token.split('.').nth(1).expect("payload part");
    URL_SAFE_NO_PAD.decode(part).expect("payload base64")
}

/// `token` with its signature part replaced by the one of `donor`.
fn with_signature_of(token: &str, donor: &str) -> String {
    let (signing_input, _) = token.rsplit_once('.').unwrap();
    let (_, signature) = donor.rsplit_once('.').unwrap();
    format!("{signing_input}.{signature}")
}

/// A reply as the command pipeline would pass it to `complete`.
fn success_reply(jti: &str) -> Vec<u8> {
    Reply::Succeeded {
        command_id: jti.into(),
        device_id: DEVICE.into(),
        issued_at: rfc3339(system_secs()),
        executed_at: rfc3339(system_secs()),
        status: 200,
        result: serde_json::json!({ "mode": "charge" }),
    }
    .to_bytes()
}

/// Asserts `outcome` is `Execute` for command `jti`.
#[track_caller]
fn assert_execute(outcome: &Authorization, jti: &str) {
    match outcome {
        Authorization::Execute(claims) => assert_eq!(claims.jti, jti),
        other => panic!("expected Execute({jti}), got {}", describe(other)),
    }
}

/// Asserts `outcome` is a refusal reply with this status and code; `command_id` is the id the
/// reply must echo (`None`: it must be JSON `null`, nothing verified). Returns the reply.
#[track_caller]
fn assert_refused(
    outcome: &Authorization,
    status: u16,
    code: &str,
    command_id: Option<&str>,
) -> serde_json::Value {
    let Authorization::Reply(bytes) = outcome else {
        panic!(
            "expected a {status} {code} refusal, got {}",
            describe(outcome)
        );
    };
    let v: serde_json::Value = serde_json::from_slice(bytes).expect("reply is JSON");
    assert_eq!(v["type"], "command.refused", "{v}");
    assert_eq!(v["status"], status, "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["deviceId"], DEVICE, "{v}");
    match command_id {
        Some(id) => assert_eq!(v["commandId"], id, "{v}"),
        None => assert!(v["commandId"].is_null(), "{v}"),
    }
    v
}

fn describe(outcome: &Authorization) -> String {
    match outcome {
        Authorization::Execute(c) => format!("Execute({})", c.jti),
        Authorization::Reply(bytes) => format!("Reply({})", String::from_utf8_lossy(bytes)),
        Authorization::InProgress => "InProgress".into(),
    }
}

/// One row of the decision table: the device's state, one inbound token, the exact outcome.
struct Row {
    /// Bundles offered in order before the token; each must be accepted.
    bundles: Vec<String>,
    owner: Option<&'static str>,
    token: Vec<u8>,
    expect: Expect,
}

enum Expect {
    Execute(&'static str),
    /// status, code, echoed command id (`None`: unverified, `commandId` is null).
    Refused(u16, &'static str, Option<&'static str>),
}

impl Row {
    /// `token` delivered to a device paired to `OWNER` holding bundle v1 of `platform()`.
    fn new(token: impl Into<Vec<u8>>, expect: Expect) -> Row {
        Row {
            bundles: vec![bundle(&platform(), 1, &[])],
            owner: Some(OWNER),
            token: token.into(),
            expect,
        }
    }
    fn owner(mut self, owner: Option<&'static str>) -> Row {
        self.owner = owner;
        self
    }
    fn bundles(mut self, bundles: Vec<String>) -> Row {
        self.bundles = bundles;
        self
    }
    fn run(self) {
        let (_dir, mut auth) = fresh(CAPACITY);
        for b in &self.bundles {
            offer_ok(&mut auth, b);
        }
        let owner = Owner {
            reference_id: self.owner,
            workspace_id: None,
        };
        let outcome = auth.authorize(&self.token, owner);
        match self.expect {
            Expect::Execute(jti) => assert_execute(&outcome, jti),
            Expect::Refused(status, code, id) => {
                assert_refused(&outcome, status, code, id);
            }
        }
    }
}

fn unauthenticated() -> Expect {
    Expect::Refused(401, "UNAUTHENTICATED", None)
}

fn forbidden(jti: &'static str) -> Expect {
    Expect::Refused(403, "FORBIDDEN", Some(jti))
}

/// One `#[test]` per row, so each case passes or fails under its own name.
macro_rules! decision_table {
    ($($name:ident => $row:expr;)*) => {
        $(
            #[test]
            fn $name() {
                $row.run();
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// 1. The authorisation decision, one row per case
// ---------------------------------------------------------------------------------------------

decision_table! {
    // Nothing in the message can be trusted: 401, `commandId` null, never run.
    malformed_token_is_401 =>
        Row::new(&b"\xff\xfe not a \x00 jws at all ..."[..], unauthenticated());
    wrong_alg_is_401 =>
        Row::new(hs256_attestation("cmd-hs256"), unauthenticated());
    unknown_kid_is_401 => {
        let stranger = PlatformSigner::from_seeds(ROOT_SEED, "kid-not-in-bundle", OTHER_KEY_SEED);
        Row::new(attest(&stranger, &server_key(), "cmd-unknown-kid"), unauthenticated())
    };
    bad_signature_is_401 => {
        // Same kid as the bundle's key, signature made by another key.
        let forger = PlatformSigner::from_seeds(ROOT_SEED, KID, OTHER_KEY_SEED);
        let genuine = attest(&platform(), &server_key(), "cmd-forged");
        let forged = attest(&forger, &server_key(), "cmd-forged");
        Row::new(with_signature_of(&genuine, &forged), unauthenticated())
    };
    attestation_from_another_issuer_is_401 => {
        let mut p = platform();
        p.issuer = "someone-else".into();
        Row::new(attest(&p, &server_key(), "cmd-issuer"), unauthenticated())
    };
    no_trust_bundle_yet_is_401 =>
        Row::new(attest(&platform(), &server_key(), "cmd-no-bundle"), unauthenticated())
            .bundles(vec![]);
    attestation_moved_to_another_command_is_401 => {
        let p = platform();
        let iat = system_secs();
        let original = attest_slug(&p, &server_key(), DEVICE, "cmd-a", "battery.setMode", iat);
        let other = attest_slug(&p, &server_key(), DEVICE, "cmd-b", "ev.startCharging", iat);
        Row::new(with_payload(&original, &payload_of(&other)), unauthenticated())
    };

    // Verified but not authorised for this device: 403, the id echoed.
    audience_of_another_device_is_403 =>
        Row::new(
            attest_at(&platform(), &server_key(), OTHER_DEVICE, "cmd-aud", system_secs()),
            forbidden("cmd-aud"),
        );
    workspace_not_this_devices_is_403 =>
        Row::new(
            attest(&platform(), &ApiKey::server("sk-globex", OTHER_WORKSPACE), "cmd-ws"),
            forbidden("cmd-ws"),
        );
    connect_key_is_403_even_in_own_workspace =>
        Row::new(
            attest(&platform(), &ApiKey::connect("ck-acme", WORKSPACE), "cmd-connect"),
            forbidden("cmd-connect"),
        );
    scoped_key_of_paired_owner_executes =>
        Row::new(
            attest(&platform(), &ApiKey::scoped("sc-alice", WORKSPACE, OWNER), "cmd-owner"),
            Expect::Execute("cmd-owner"),
        );
    scoped_key_of_other_user_is_403 =>
        Row::new(
            attest(&platform(), &ApiKey::scoped("sc-bob", WORKSPACE, OTHER_USER), "cmd-bob"),
            forbidden("cmd-bob"),
        );
    scoped_key_while_unpaired_is_403 =>
        Row::new(
            attest(&platform(), &ApiKey::scoped("sc-alice", WORKSPACE, OWNER), "cmd-unpaired"),
            forbidden("cmd-unpaired"),
        )
        .owner(None);
    revoked_api_key_is_403 =>
        Row::new(attest(&platform(), &server_key(), "cmd-revoked"), forbidden("cmd-revoked"))
            .bundles(vec![
                bundle(&platform(), 1, &[]),
                bundle(&platform(), 2, &["sk-live-1"]),
            ]);
    other_server_key_of_workspace_still_executes_after_a_revocation =>
        Row::new(
            attest(&platform(), &other_server_key(), "cmd-not-revoked"),
            Expect::Execute("cmd-not-revoked"),
        )
        .bundles(vec![
            bundle(&platform(), 1, &[]),
            bundle(&platform(), 2, &["sk-live-1"]),
        ]);
    server_key_of_this_devices_customer_executes =>
        Row::new(
            attest(&platform(), &server_key(), "cmd-server"),
            Expect::Execute("cmd-server"),
        );

    // Time: skew 60 s, ttl 300 s.
    expired_attestation_is_401_attestation_expired =>
        Row::new(
            attest_at(&platform(), &server_key(), DEVICE, "cmd-expired", system_secs() - 1_000),
            Expect::Refused(401, "ATTESTATION_EXPIRED", Some("cmd-expired")),
        );
    attestation_issued_beyond_skew_is_401_not_yet_valid =>
        Row::new(
            attest_at(&platform(), &server_key(), DEVICE, "cmd-future", system_secs() + 600),
            Expect::Refused(401, "ATTESTATION_NOT_YET_VALID", Some("cmd-future")),
        );
    attestation_issued_within_skew_executes =>
        Row::new(
            attest_at(&platform(), &server_key(), DEVICE, "cmd-soon", system_secs() + 30),
            Expect::Execute("cmd-soon"),
        );
}

// ---------------------------------------------------------------------------------------------
// Replay
// ---------------------------------------------------------------------------------------------

#[test]
fn duplicate_command_id_gets_the_recorded_reply_byte_for_byte() {
    let (_dir, mut auth) = fresh(CAPACITY);
    offer_ok(&mut auth, &bundle(&platform(), 1, &[]));
    let token = attest(&platform(), &server_key(), "cmd-dup");

    assert_execute(&auth.authorize(token.as_bytes(), PAIRED), "cmd-dup");
    // Redelivered while still running: no second execution, and no reply yet.
    assert!(matches!(
        auth.authorize(token.as_bytes(), PAIRED),
        Authorization::InProgress
    ));

    let reply = success_reply("cmd-dup");
    auth.complete("cmd-dup", &reply);
    for _ in 0..3 {
        match auth.authorize(token.as_bytes(), PAIRED) {
            Authorization::Reply(bytes) => assert_eq!(bytes, reply, "recorded reply differs"),
            other => panic!(
                "duplicate not answered from the table: {}",
                describe(&other)
            ),
        }
    }
}

#[test]
fn refused_command_redelivered_gets_the_same_refusal() {
    let (_dir, mut auth) = fresh(CAPACITY);
    offer_ok(&mut auth, &bundle(&platform(), 1, &[]));
    let scoped = ApiKey::scoped("sc-alice", WORKSPACE, OWNER);
    let token = attest(&platform(), &scoped, "cmd-refused-once");

    let first = auth.authorize(token.as_bytes(), Owner::UNPAIRED);
    assert_refused(&first, 403, "FORBIDDEN", Some("cmd-refused-once"));
    // Pairing changes in between; the recorded answer stands and nothing runs.
    let second = auth.authorize(token.as_bytes(), PAIRED);
    match (&first, &second) {
        (Authorization::Reply(a), Authorization::Reply(b)) => assert_eq!(a, b),
        _ => panic!(
            "redelivery not answered from the table: {}",
            describe(&second)
        ),
    }
}

#[test]
fn replay_table_persists_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let token = attest(&platform(), &server_key(), "cmd-persist");
    let unfinished = attest(&platform(), &server_key(), "cmd-unfinished");
    let reply = success_reply("cmd-persist");
    {
        let mut auth = open(dir.path(), CAPACITY);
        offer_ok(&mut auth, &bundle(&platform(), 1, &[]));
        assert_execute(&auth.authorize(token.as_bytes(), PAIRED), "cmd-persist");
        auth.complete("cmd-persist", &reply);
        // Runs, then the agent stops before the reply is known.
        assert_execute(
            &auth.authorize(unfinished.as_bytes(), PAIRED),
            "cmd-unfinished",
        );
    }

    let (mut auth, report) = Authorizer::open(config(CAPACITY), dir.path()).unwrap();
    assert_eq!(report.damaged_lines, 0);
    assert_eq!(report.interrupted, vec!["cmd-unfinished".to_string()]);
    match auth.authorize(token.as_bytes(), PAIRED) {
        Authorization::Reply(bytes) => assert_eq!(bytes, reply),
        other => panic!("executed again after a restart: {}", describe(&other)),
    }
    assert!(matches!(
        auth.authorize(unfinished.as_bytes(), PAIRED),
        Authorization::InProgress
    ));
}

#[test]
fn full_replay_table_is_429_rate_limited() {
    let (_dir, mut auth) = fresh(2);
    offer_ok(&mut auth, &bundle(&platform(), 1, &[]));
    for jti in ["cmd-1", "cmd-2"] {
        assert_execute(
            &auth.authorize(attest(&platform(), &server_key(), jti).as_bytes(), PAIRED),
            jti,
        );
        auth.complete(jti, &success_reply(jti));
    }
    let third = auth.authorize(
        attest(&platform(), &server_key(), "cmd-3").as_bytes(),
        PAIRED,
    );
    let v = assert_refused(&third, 429, "RATE_LIMITED", Some("cmd-3"));
    let retry = v["retryAfter"].as_u64().expect("retryAfter set");
    assert!((1..=TTL + SKEW).contains(&retry), "retryAfter {retry}");
    // The live entries are not forgotten to make room.
    assert!(matches!(
        auth.authorize(
            attest(&platform(), &server_key(), "cmd-1").as_bytes(),
            PAIRED
        ),
        Authorization::Reply(_)
    ));
}

/// A validly signed attestation refused as not yet valid must not move the device's notion of
/// time: the next ordinary command, issued now, still runs.
#[test]
fn refused_future_attestation_does_not_advance_the_clock() {
    let (_dir, mut auth) = fresh(CAPACITY);
    offer_ok(&mut auth, &bundle(&platform(), 1, &[]));
    let future = attest_at(
        &platform(),
        &server_key(),
        DEVICE,
        "cmd-future",
        system_secs() + 600,
    );
    assert_refused(
        &auth.authorize(future.as_bytes(), PAIRED),
        401,
        "ATTESTATION_NOT_YET_VALID",
        Some("cmd-future"),
    );
    let ordinary = attest(&platform(), &server_key(), "cmd-ordinary");
    assert_execute(&auth.authorize(ordinary.as_bytes(), PAIRED), "cmd-ordinary");
}

// ---------------------------------------------------------------------------------------------
// Trust bundles
// ---------------------------------------------------------------------------------------------

#[test]
fn trust_bundle_rollback_to_lower_or_equal_version_is_rejected() {
    let p = platform();
    let (_dir, mut auth) = fresh(CAPACITY);
    let v5 = bundle(&p, 5, &[]);
    offer_ok(&mut auth, &v5);

    // Lower version, even if it lists the same keys.
    match auth.offer_trust_bundle(bundle(&p, 4, &[]).as_bytes()) {
        Err(BundleRejected::NotNewer {
            offered: 4,
            stored: 5,
        }) => {}
        other => panic!("lower version not rejected: {other:?}"),
    }
    // Equal version with different content (here: a revocation) is not accepted either.
    match auth.offer_trust_bundle(bundle(&p, 5, &["sk-live-1"]).as_bytes()) {
        Err(BundleRejected::NotNewer {
            offered: 5,
            stored: 5,
        }) => {}
        other => panic!("equal version with other content not rejected: {other:?}"),
    }
    // The very bundle held, arriving again (retained on reconnect), is no error.
    assert!(matches!(auth.offer_trust_bundle(v5.as_bytes()), Ok(None)));
    // The stored bundle is untouched: still v5, no revocation in force.
    assert_eq!(auth.trust_bundle().unwrap().version, 5);
    assert_execute(
        &auth.authorize(
            attest(&p, &server_key(), "cmd-after-rollback").as_bytes(),
            PAIRED,
        ),
        "cmd-after-rollback",
    );
}

#[test]
fn expired_trust_bundle_is_rejected() {
    let p = platform();
    let (_dir, mut auth) = fresh(CAPACITY);
    let expired = p.trust_bundle(
        1,
        system_secs() - 2 * BUNDLE_LIFETIME,
        system_secs() - 1,
        &[],
    );
    match auth.offer_trust_bundle(expired.as_bytes()) {
        Err(BundleRejected::Expired { .. }) => {}
        other => panic!("expired bundle not rejected: {other:?}"),
    }
    assert!(auth.trust_bundle().is_none());
    assert_refused(
        &auth.authorize(attest(&p, &server_key(), "cmd-x").as_bytes(), PAIRED),
        401,
        "UNAUTHENTICATED",
        None,
    );
}

#[test]
fn trust_bundle_signed_by_another_root_is_rejected() {
    let impostor = PlatformSigner::from_seeds(OTHER_ROOT_SEED, KID, OTHER_KEY_SEED);
    let (_dir, mut auth) = fresh(CAPACITY);
    match auth.offer_trust_bundle(bundle(&impostor, 1, &[]).as_bytes()) {
        Err(BundleRejected::Signature(jws::JwsError::BadSignature)) => {}
        other => panic!("foreign bundle not rejected: {other:?}"),
    }
    assert!(auth.trust_bundle().is_none());
    assert_refused(
        &auth.authorize(
            attest(&impostor, &server_key(), "cmd-impostor").as_bytes(),
            PAIRED,
        ),
        401,
        "UNAUTHENTICATED",
        None,
    );
}

#[test]
fn accepted_trust_bundle_persists_across_reopen() {
    let p = platform();
    let dir = tempfile::tempdir().unwrap();
    {
        let mut auth = open(dir.path(), CAPACITY);
        offer_ok(&mut auth, &bundle(&p, 7, &["sk-live-2"]));
    }
    let mut auth = open(dir.path(), CAPACITY);
    let held = auth.trust_bundle().expect("bundle reloaded");
    assert_eq!(held.version, 7);
    assert!(held.is_revoked("sk-live-2"));
    assert_execute(
        &auth.authorize(attest(&p, &server_key(), "cmd-reopened").as_bytes(), PAIRED),
        "cmd-reopened",
    );
    assert_refused(
        &auth.authorize(
            attest(&p, &other_server_key(), "cmd-still-revoked").as_bytes(),
            PAIRED,
        ),
        403,
        "FORBIDDEN",
        Some("cmd-still-revoked"),
    );
    // Rollback protection survives the restart too.
    assert!(matches!(
        auth.offer_trust_bundle(bundle(&p, 6, &[]).as_bytes()),
        Err(BundleRejected::NotNewer { .. })
    ));
}

/// A bundle accepted while valid stops authenticating anything once it expires (here: once the
/// time floor, raised by an accepted attestation issued within skew, passes its expiry).
#[test]
fn trust_bundle_expired_while_in_force_is_401() {
    let p = platform();
    let (_dir, mut auth) = fresh(CAPACITY);
    offer_ok(
        &mut auth,
        &p.trust_bundle(1, system_secs(), system_secs() + 10, &[]),
    );
    let soon = attest_at(&p, &server_key(), DEVICE, "cmd-soon", system_secs() + 30);
    assert_execute(&auth.authorize(soon.as_bytes(), PAIRED), "cmd-soon");
    assert_refused(
        &auth.authorize(attest(&p, &server_key(), "cmd-late").as_bytes(), PAIRED),
        401,
        "UNAUTHENTICATED",
        None,
    );
}

#[test]
fn key_rotation_with_overlap_then_old_key_dropped() {
    let mut p = platform();
    let (_dir, mut auth) = fresh(CAPACITY);
    offer_ok(&mut auth, &bundle(&p, 1, &[]));
    assert_execute(
        &auth.authorize(attest(&p, &server_key(), "rot-1").as_bytes(), PAIRED),
        "rot-1",
    );

    // v2 lists both the old and the new key.
    p.add_key("platform-2026-02");
    offer_ok(&mut auth, &bundle(&p, 2, &[]));
    let old_key_token = |jti: &str| {
        let mut claims = p.claims(
            &server_key(),
            AttestedCommand::new(DEVICE, jti, "battery.setMode", serde_json::json!({})),
            system_secs(),
            TTL,
        );
        claims.kid = KID.into();
        p.attest(&claims)
    };
    let by_new = attest(&p, &server_key(), "rot-new");
    let by_old = old_key_token("rot-old");
    let by_old_later = old_key_token("rot-old-later");
    assert_execute(&auth.authorize(by_new.as_bytes(), PAIRED), "rot-new");
    assert_execute(&auth.authorize(by_old.as_bytes(), PAIRED), "rot-old");

    // v3 drops the old key: what it signs no longer verifies, the new key still does.
    p.remove_key(KID);
    offer_ok(&mut auth, &bundle(&p, 3, &[]));
    assert_refused(
        &auth.authorize(by_old_later.as_bytes(), PAIRED),
        401,
        "UNAUTHENTICATED",
        None,
    );
    assert_execute(
        &auth.authorize(attest(&p, &server_key(), "rot-new-2").as_bytes(), PAIRED),
        "rot-new-2",
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Property: no single-byte change to a valid attestation is ever accepted
// ---------------------------------------------------------------------------------------------

const BASE_TOKENS: usize = 10;
const MUTATIONS_PER_BASE: usize = 1_000;

#[derive(Default)]
struct Tally {
    tried: usize,
    /// `Execute`: the property is violated.
    accepted: usize,
    /// Anything showing the signature verified (`InProgress`, a reply echoing a command id,
    /// a status other than 401).
    verified: usize,
}

impl Tally {
    fn record(&mut self, outcome: Authorization) {
        self.tried += 1;
        match outcome {
            Authorization::Execute(_) => self.accepted += 1,
            Authorization::InProgress => self.verified += 1,
            Authorization::Reply(bytes) => {
                let v: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON reply");
                if !v["commandId"].is_null() || v["status"] != 401 {
                    self.verified += 1;
                }
            }
        }
    }
}

/// `bytes` with one random position set to a random *different* value.
fn mutate_one_byte(rng: &mut fastrand::Rng, bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    let i = rng.usize(..out.len());
    let old = out[i];
    out[i] = loop {
        let b = rng.u8(..);
        if b != old {
            break b;
        }
    };
    out
}

/// Runs `mutations` over fresh base tokens; each base token is authorised afterwards and must
/// execute, proving the rejections were due to the mutation alone.
fn mutation_property(
    seed: u64,
    label: &str,
    mutate: impl Fn(&mut fastrand::Rng, &str) -> Vec<u8>,
) -> Tally {
    let p = platform();
    let (_dir, mut auth) = fresh(CAPACITY);
    offer_ok(&mut auth, &bundle(&p, 1, &[]));
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut tally = Tally::default();
    for base in 0..BASE_TOKENS {
        let jti = format!("{label}-{base}");
        let token = attest(&p, &server_key(), &jti);
        for _ in 0..MUTATIONS_PER_BASE {
            tally.record(auth.authorize(&mutate(&mut rng, &token), PAIRED));
        }
        assert_execute(&auth.authorize(token.as_bytes(), PAIRED), &jti);
    }
    println!(
        "{label}: {} single-byte mutations tried, {} accepted, {} verified",
        tally.tried, tally.accepted, tally.verified
    );
    tally
}

#[test]
fn no_single_byte_mutation_of_a_token_is_accepted() {
    let tally = mutation_property(0x7e57_0001, "token-mutation", |rng, token| {
        mutate_one_byte(rng, token.as_bytes())
    });
    assert_eq!(tally.tried, BASE_TOKENS * MUTATIONS_PER_BASE);
    assert_eq!(tally.accepted, 0, "mutated tokens executed");
    assert_eq!(tally.verified, 0, "mutated tokens verified");
}

#[test]
fn no_single_byte_mutation_of_the_payload_is_accepted() {
    let tally = mutation_property(0x7e57_0002, "payload-mutation", |rng, token| {
        let payload = mutate_one_byte(rng, &payload_of(token));
        with_payload(token, &payload).into_bytes()
    });
    assert_eq!(tally.tried, BASE_TOKENS * MUTATIONS_PER_BASE);
    assert_eq!(tally.accepted, 0, "mutated payloads executed");
    assert_eq!(tally.verified, 0, "mutated payloads verified");
}

// ---------------------------------------------------------------------------------------------
// Wrong clocks and a table that strangers fill (issue 13, items 1, 2 and 7)
// ---------------------------------------------------------------------------------------------

/// A system clock 200 s ahead: a bad RTC, a modem giving local time as UTC, fake NTP. Less
/// than an attestation's lifetime, so commands signed now still run.
fn clock_ahead() -> u64 {
    system_secs() + 200
}

/// A gateway without a real-time clock, booted at the start of 1970.
fn clock_at_1970() -> u64 {
    0
}

/// With its clock ahead, a gateway whose replay table is full must not make room by forgetting
/// an entry that is live in platform time: once the clock is corrected the broker could replay
/// it. (The restart variant, the journal pruned at start-up, is `replay_e2e.rs`.)
#[test]
fn a_clock_ahead_does_not_make_an_executed_command_replayable() {
    let (_dir, mut auth) = fresh(2);
    offer_ok(&mut auth, &bundle(&platform(), 1, &[]));
    // Issued 250 s ago, valid for 300 s: live in platform time for another 50 s + skew.
    let old = attest_at(
        &platform(),
        &server_key(),
        DEVICE,
        "cmd-old",
        system_secs() - 250,
    );
    assert_execute(&auth.authorize(old.as_bytes(), PAIRED), "cmd-old");
    // Built once: the reply carries timestamps, and a second call may fall in the next second.
    let old_reply = success_reply("cmd-old");
    auth.complete("cmd-old", &old_reply);
    let second = attest(&platform(), &server_key(), "cmd-second");
    assert_execute(&auth.authorize(second.as_bytes(), PAIRED), "cmd-second");
    auth.complete("cmd-second", &success_reply("cmd-second"));

    auth.set_clock(clock_ahead);
    let third = attest(&platform(), &server_key(), "cmd-third");
    assert_refused(
        &auth.authorize(third.as_bytes(), PAIRED),
        429,
        "RATE_LIMITED",
        Some("cmd-third"),
    );

    // The clock is corrected; the broker redelivers the old command: a duplicate.
    auth.set_clock(system_secs);
    match auth.authorize(old.as_bytes(), PAIRED) {
        Authorization::Reply(bytes) => assert_eq!(bytes, old_reply),
        other => panic!("executed twice: {}", describe(&other)),
    }
}

/// Verified refusals from callers with no right to command the gateway, as many as the table
/// holds, must leave the owner's server key and scoped key able to run commands.
#[test]
fn refusals_never_take_replay_capacity_from_commands_that_can_run() {
    let capacity = 50;
    let (_dir, mut auth) = fresh(capacity);
    offer_ok(&mut auth, &bundle(&platform(), 2, &["sk-revoked"]));
    let strangers = [
        ApiKey::server("sk-globex", OTHER_WORKSPACE),
        ApiKey::scoped("sc-bob", WORKSPACE, OTHER_USER),
        ApiKey::connect("ck-public", WORKSPACE),
        ApiKey::server("sk-revoked", WORKSPACE),
    ];
    for i in 0..capacity * 2 {
        let key = &strangers[i % strangers.len()];
        let jti = format!("cmd-stranger-{i}");
        assert_refused(
            &auth.authorize(attest(&platform(), key, &jti).as_bytes(), PAIRED),
            403,
            "FORBIDDEN",
            Some(&jti),
        );
    }
    let scoped = ApiKey::scoped("sc-alice", WORKSPACE, OWNER);
    assert_execute(
        &auth.authorize(
            attest(&platform(), &server_key(), "cmd-owner-server").as_bytes(),
            PAIRED,
        ),
        "cmd-owner-server",
    );
    assert_execute(
        &auth.authorize(
            attest(&platform(), &scoped, "cmd-owner-scoped").as_bytes(),
            PAIRED,
        ),
        "cmd-owner-scoped",
    );
}

/// On a fresh install whose clock says 1970, a root-signed bundle that expired years ago (and
/// may list a since-leaked key) is refused: the build's time floor says it is too old.
#[test]
fn a_fresh_install_at_1970_refuses_a_long_expired_bundle() {
    let (_dir, mut auth) = fresh(CAPACITY);
    auth.set_clock(clock_at_1970);
    let y2019 = 1_550_000_000;
    let old = platform().trust_bundle(1, y2019, y2019 + 7 * 86_400, &[]);
    assert!(matches!(
        auth.offer_trust_bundle(old.as_bytes()),
        Err(BundleRejected::Expired { .. })
    ));
    assert!(auth.now() >= texture_agent::inbound::auth::BUILD_TIME_FLOOR);
    let unpair = attest_slug(
        &platform(),
        &server_key(),
        DEVICE,
        "cmd-2019-unpair",
        "agent:unpair",
        y2019 + 60,
    );
    assert_refused(
        &auth.authorize(unpair.as_bytes(), PAIRED),
        401,
        "UNAUTHENTICATED",
        None,
    );
}

/// An accepted bundle's `iat` raises the time floor, so a gateway at 1970 learns how late it
/// is at least, and keeps it across a restart.
#[test]
fn an_accepted_bundle_raises_the_time_floor_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let issued = system_secs() - 30;
    {
        let mut auth = open(dir.path(), CAPACITY);
        auth.set_clock(clock_at_1970);
        let b = platform().trust_bundle(1, issued, issued + BUNDLE_LIFETIME, &[]);
        offer_ok(&mut auth, &b);
        assert_eq!(auth.now(), issued);
    }
    let mut auth = open(dir.path(), CAPACITY);
    auth.set_clock(clock_at_1970);
    assert_eq!(auth.time_floor(), issued);
}

// ---------------------------------------------------------------------------------------------
// Repeated members and unverified text (issue 13, items 8 and 4)
// ---------------------------------------------------------------------------------------------

/// A server-key attestation for this device whose payload is `claims` with the text of
/// `command.input` replaced by `input_json` verbatim, signed by the platform key: JSON that a
/// `serde_json::Value` could not even hold (a repeated member).
fn attest_raw_input(jti: &str, input_json: &str) -> String {
    let p = platform();
    let claims = p.claims(
        &server_key(),
        AttestedCommand::new(
            DEVICE,
            jti,
            "battery.setMode",
            serde_json::json!({ "placeholder": 0 }),
        ),
        system_secs(),
        TTL,
    );
    let text = serde_json::to_string(&claims).unwrap();
    let text = text.replacen(r#"{"placeholder":0}"#, input_json, 1);
    assert!(text.contains(input_json), "{text}");
    jws::sign(
        &SigningKey::from_bytes(&KEY_SEED),
        Some(KID),
        ATTESTATION_TYP,
        text.as_bytes(),
    )
}

fn authorize_once(token: &str) -> Authorization {
    let (_dir, mut auth) = fresh(CAPACITY);
    offer_ok(&mut auth, &bundle(&platform(), 1, &[]));
    auth.authorize(token.as_bytes(), PAIRED)
}

#[test]
fn attestation_repeating_a_member_of_command_is_401() {
    // Depth 2: `command` itself names its slug twice.
    let token = attest_raw_input("cmd-dup-2", r#"{},"slug":"agent:unpair""#);
    let v = assert_refused(&authorize_once(&token), 401, "UNAUTHENTICATED", None);
    assert!(v["message"].as_str().unwrap().contains("repeats"), "{v}");
}

#[test]
fn attestation_repeating_a_member_inside_command_input_is_401() {
    // Depth 3: the first value is what an auditor reading first-wins would see, the second what
    // a last-wins parser would run.
    let token = attest_raw_input("cmd-dup-3", r#"{"mode":"charge","mode":"discharge"}"#);
    let v = assert_refused(&authorize_once(&token), 401, "UNAUTHENTICATED", None);
    assert!(v["message"].as_str().unwrap().contains("repeats"), "{v}");
    // Depth 4, inside an object in the input.
    let token = attest_raw_input("cmd-dup-4", r#"{"limits":{"powerW":1,"powerW":9000}}"#);
    assert_refused(&authorize_once(&token), 401, "UNAUTHENTICATED", None);
    // The same input without the repeat runs: only the repeat is refused.
    let token = attest_raw_input("cmd-dup-none", r#"{"mode":"charge","powerW":2500}"#);
    assert_execute(&authorize_once(&token), "cmd-dup-none");
}

#[test]
fn refusal_of_an_unverified_header_never_repeats_its_text() {
    // An unknown header member whose name clears the screen and prints a fake line; the same in
    // `alg`, `typ` and `kid`. The refusal is published to the platform and logged: none of it
    // may carry the escape.
    let p = platform();
    let claims = p.claims(
        &server_key(),
        AttestedCommand::new(
            DEVICE,
            "cmd-escape",
            "battery.setMode",
            serde_json::json!({}),
        ),
        system_secs(),
        TTL,
    );
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    let evil = r"\u001b[2J\u001b[Hcommand.succeeded\u009b31m\r\n";
    for header in [
        format!(r#"{{"alg":"EdDSA","kid":"{KID}","typ":"{ATTESTATION_TYP}","{evil}":1}}"#),
        format!(r#"{{"alg":"{evil}","kid":"{KID}","typ":"{ATTESTATION_TYP}"}}"#),
        format!(r#"{{"alg":"EdDSA","kid":"{KID}","typ":"{evil}"}}"#),
        format!(r#"{{"alg":"EdDSA","kid":"{evil}","typ":"{ATTESTATION_TYP}"}}"#),
    ] {
        let mut token = URL_SAFE_NO_PAD.encode(&header);
        token.push('.');
        token.push_str(&payload);
        let signature = SigningKey::from_bytes(&KEY_SEED).sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.to_bytes()));
        let v = assert_refused(&authorize_once(&token), 401, "UNAUTHENTICATED", None);
        let message = v["message"].as_str().unwrap();
        assert!(
            !message.chars().any(char::is_control) && !message.contains("command.succeeded"),
            "{header}: {message:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The replay journal against a wrong clock, end to end: the real binary, a private mosquitto,
// and libfaketime moving the agent's clock (Debian's `faketime` package; scripts/test.sh
// installs it).
//
// The attack (issue 13, item 1): the broker keeps a command the gateway ran; the gateway
// restarts while its clock runs ahead (a power blip with a bad RTC, a modem giving local time
// as UTC, fake NTP); the clock is corrected; the broker redelivers the command while its
// attestation is still live. An agent that pruned its journal against the clock at start-up
// lost the entry for good, and ran the command a second time.

const GATEWAY: &str = "gw-clock";
const CLOCK_WORKSPACE: &str = "ws-clock";
const WAIT: Duration = Duration::from_secs(20);

/// libfaketime's preload library, where Debian puts it.
fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketime.so.1")])
        .find(|p| p.exists());
    found.expect(
        "libfaketime.so.1 not found: install Debian's faketime package (scripts/test.sh does)",
    )
}

fn stop(mut agent: Agent) {
    agent.signal("TERM");
    assert!(agent.wait_exit(WAIT).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_clock_ahead_does_not_let_the_broker_replay_an_executed_command() {
    let replies = device_topic(GATEWAY, "replies");
    let capabilities = device_topic(GATEWAY, "capabilities");
    let status = device_topic(GATEWAY, "status");
    let Testbed {
        pki,
        broker,
        signer,
        mut peer,
    } = Testbed::start(
        PlatformSigner::generate("platform-1"),
        &[&replies, &capabilities, &status],
    )
    .await;
    let driver_log = pki.path().join("commands.log");
    let mut cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, CLOCK_WORKSPACE);
    cfg.extra_toml = kit::counting_driver(pki.path(), &driver_log, Duration::ZERO);
    let config = cfg.write(pki.path());

    let key = ApiKey::server("key-server", CLOCK_WORKSPACE);
    let claims = signer.claims(
        &key,
        AttestedCommand::new(
            GATEWAY,
            "cmd-once",
            "battery:set-reserve",
            serde_json::json!({ "chargePercentage": 30 }),
        )
        .for_device("bat-count"),
        system_secs(),
        600,
    );
    let token = signer.attest(&claims);
    let commands = device_topic(GATEWAY, "commands");
    let is_reply = |m: &kit::Seen| m.json()["commandId"] == "cmd-once";

    // The birth of a run whose clock is right. It follows the run's subscriptions on the same
    // connection, so once the platform sees it, a command published next is delivered.
    let birth = |m: &kit::Seen| {
        let v = m.json();
        v["state"] == "online"
            && v["at"]
                .as_u64()
                .is_some_and(|at| at < system_secs() + 3_600)
    };

    // 1. The command runs once, with the clock right.
    let agent = Agent::spawn(BIN, &config);
    peer.expect(&status, WAIT, birth).await;
    // The driver's first state line makes the device known (and advertised) before the
    // command arrives.
    peer.expect(&capabilities, WAIT, |m| {
        m.json()["devices"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x["deviceId"] == "bat-count"))
    })
    .await;
    peer.publish(&commands, token.clone().into_bytes(), false)
        .await;
    let first = peer.expect(&replies, WAIT, is_reply).await;
    assert_eq!(
        first.json()["type"],
        "command.succeeded",
        "{}",
        first.json()
    );
    stop(agent);

    // 2. A restart with the clock two days ahead.
    let ahead = Agent::spawn_with_env(
        BIN,
        &config,
        &[
            ("LD_PRELOAD", libfaketime().to_str().unwrap()),
            ("FAKETIME", "+2d"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let started = ahead.wait_for_log("texture-agent started", WAIT);
    // The agent really ran two days ahead (its log is stamped with its own clock).
    let stamped = started["timestamp"].as_str().unwrap_or_default().to_owned();
    let today = texture_agent::inbound::reply::rfc3339(system_secs());
    assert!(
        stamped.get(..10).is_some() && stamped.get(..10) != today.get(..10),
        "libfaketime did not move the clock: log stamped {stamped:?}, today {today:?}"
    );
    stop(ahead);

    // 3. The clock is corrected, and 4. the broker redelivers the command, after this run's
    // birth (the births seen so far are the first run's and the run ahead's).
    peer.forget(&status);
    let agent = Agent::spawn(BIN, &config);
    peer.expect(&status, WAIT, birth).await;
    peer.publish(&commands, token.clone().into_bytes(), false)
        .await;
    let again = peer.expect(&replies, WAIT, is_reply).await;
    assert_eq!(
        again.payload, first.payload,
        "the redelivery must get the original reply byte for byte"
    );
    let runs = std::fs::read_to_string(&driver_log).unwrap();
    assert_eq!(
        runs.lines().filter(|l| *l == "cmd-once").count(),
        1,
        "the driver saw the command more than once:\n{runs}"
    );
    stop(agent);
}
