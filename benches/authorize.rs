//! The cost of authorising a command, against the floor set by the signature check alone.
//!
//!     cargo bench --bench authorize
//!
//! - `verify_strict`: bare Ed25519 verification of the attestation's signing input.
//! - `decide`: the whole decision: size check, base64url, header, verify_strict, payload
//!   parsing, policy and the replay-table lookup.
//! - `replay_record_fsync`: the durable replay insert (append + fsync), reported apart because it
//!   measures the disk, not the CPU.
//!
//! Prints the decide / verify_strict ratio at the end (goal: at most 1.5).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use criterion::{criterion_group, Criterion};
use ed25519_dalek::{Signature, VerifyingKey};
use texture_agent::inbound::auth::replay::ReplayWindow;
use texture_agent::inbound::auth::trust::TrustStore;
use texture_agent::inbound::auth::{decide, Context, Verdict};
use texture_agent::model::clock::system_secs;
use texture_agent::sim::platform::{ApiKey, AttestedCommand, PlatformSigner};

const DEVICE: &str = "gw-bench";
const WORKSPACE: &str = "ws-bench";

fn benches(c: &mut Criterion) {
    let signer = PlatformSigner::from_seeds([1; 32], "platform-1", [2; 32]);
    let dir = tempfile::tempdir().unwrap();
    let root: VerifyingKey =
        texture_agent::inbound::auth::jws::public_key_from_base64(&signer.root_public_key())
            .unwrap();
    let mut trust = TrustStore::open(root, &signer.issuer, dir.path());
    trust
        .offer(
            signer
                .trust_bundle(1, system_secs(), system_secs() + 3_600, &[])
                .as_bytes(),
            system_secs(),
        )
        .unwrap();
    let (mut replay, _) = ReplayWindow::open(dir.path(), 1_000_000, system_secs()).unwrap();
    let key = ApiKey::server("key-server", WORKSPACE);
    let claims = signer.claims(
        &key,
        AttestedCommand::new(
            DEVICE,
            "cmd-bench",
            "battery:set-reserve",
            serde_json::json!({ "chargePercentage": 40 }),
        ),
        system_secs(),
        300,
    );
    let token = signer.attest(&claims);
    let ctx = Context {
        device_id: DEVICE,
        workspace_id: Some(WORKSPACE),
        owner: None,
        trust: trust.current(),
        issuer: &signer.issuer,
        now: system_secs(),
        skew: 60,
    };
    assert!(matches!(
        decide(token.as_bytes(), &ctx, &replay),
        Verdict::Allow(_)
    ));

    let (signing_input, sig64) = token.rsplit_once('.').unwrap();
    let signature = Signature::from_slice(&URL_SAFE_NO_PAD.decode(sig64).unwrap()).unwrap();
    let platform_key = *trust.current().unwrap().key("platform-1").unwrap();

    let mut group = c.benchmark_group("authorize");
    group.bench_function("verify_strict", |b| {
        b.iter(|| {
            platform_key
                .verify_strict(std::hint::black_box(signing_input.as_bytes()), &signature)
                .unwrap()
        })
    });
    group.bench_function("decide", |b| {
        b.iter(|| decide(std::hint::black_box(token.as_bytes()), &ctx, &replay))
    });
    let mut n = 0u64;
    group.bench_function("replay_record_fsync", |b| {
        b.iter(|| {
            n += 1;
            replay
                .record(
                    &format!("cmd-{n}"),
                    system_secs(),
                    system_secs() + 360,
                    system_secs(),
                )
                .unwrap();
        })
    });
    group.finish();
}

fn mean_ns(bench: &str) -> Option<f64> {
    let path = format!("target/criterion/authorize/{bench}/new/estimates.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    json["mean"]["point_estimate"].as_f64()
}

criterion_group!(group, benches);

fn main() {
    group();
    Criterion::default().configure_from_args().final_summary();
    if let (Some(verify), Some(decide)) = (mean_ns("verify_strict"), mean_ns("decide")) {
        println!("verify_strict        {:>10.1} µs", verify / 1_000.0);
        println!("decide               {:>10.1} µs", decide / 1_000.0);
        println!(
            "ratio decide/verify  {:>10.2} (goal <= 1.5)",
            decide / verify
        );
    }
    if let Some(record) = mean_ns("replay_record_fsync") {
        println!("replay insert+fsync  {:>10.1} µs", record / 1_000.0);
    }
}
