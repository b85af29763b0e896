//! End to end over mosquitto with mutual TLS: a peer with full broker access (as a compromised
//! broker would have) publishes attestations for every kind of key, forged and replayed ones
//! included, straight onto the device's command topic. Only the allowed ones execute.

mod common;

use std::time::Duration;

use common::{device_topic, Agent, AgentConfig, Mosquitto, Peer, Pki};
use texture_agent::link::topics::Topics;
use texture_agent::sim::platform::{ApiKey, PlatformSigner};

const WAIT: Duration = Duration::from_secs(15);
const DEVICE: &str = "gw-e2e";
const WORKSPACE: &str = "ws-home";

fn now() -> u64 {
    common::unix_now()
}

fn ping(signer: &PlatformSigner, key: &ApiKey, id: &str) -> String {
    let claims = signer.claims(
        key,
        DEVICE,
        id,
        "agent:ping",
        serde_json::json!({}),
        now(),
        300,
    );
    signer.attest(&claims)
}

/// Publishes `token` and returns the next reply whose commandId is `id` (or null for `None`).
async fn send(peer: &mut Peer, token: &str, id: Option<&str>) -> serde_json::Value {
    let replies = device_topic(DEVICE, "replies");
    peer.publish(
        &device_topic(DEVICE, "commands"),
        token.as_bytes().to_vec(),
        false,
    )
    .await;
    let expected = id.map_or(serde_json::Value::Null, serde_json::Value::from);
    peer.expect(&replies, WAIT, |m| m.json()["commandId"] == expected)
        .await
        .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_server_and_owner_attestations_execute_over_a_hostile_broker() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki);
    let signer = PlatformSigner::generate("platform-1");
    let mut peer = common::platform_peer(
        &pki,
        broker.port,
        &signer,
        &[&device_topic(DEVICE, "replies")],
    )
    .await;

    let mut cfg = AgentConfig::new(&pki, broker.port, DEVICE);
    cfg.trust_root = Some(signer.root_public_key());
    cfg.workspace_id = Some(WORKSPACE.into());
    cfg.owner = Some("user-a".into());
    let agent = Agent::spawn(&cfg.write(pki.path()));
    agent.wait_for_log("trust bundle accepted", WAIT);

    let server = ApiKey::server("key-server", WORKSPACE);
    let owner = ApiKey::scoped("key-scoped-a", WORKSPACE, "user-a");
    let stranger = ApiKey::scoped("key-scoped-b", WORKSPACE, "user-b");
    let connect = ApiKey::connect("key-connect", WORKSPACE);

    let r = send(
        &mut peer,
        &ping(&signer, &server, "cmd-server"),
        Some("cmd-server"),
    )
    .await;
    assert_eq!(r["type"], "command.succeeded", "{r}");
    assert_eq!(r["result"]["pong"], true);

    let r = send(
        &mut peer,
        &ping(&signer, &owner, "cmd-owner"),
        Some("cmd-owner"),
    )
    .await;
    assert_eq!(r["type"], "command.succeeded", "{r}");

    let r = send(
        &mut peer,
        &ping(&signer, &stranger, "cmd-stranger"),
        Some("cmd-stranger"),
    )
    .await;
    assert_eq!(
        (r["status"].as_u64(), r["code"].as_str()),
        (Some(403), Some("FORBIDDEN")),
        "{r}"
    );

    let r = send(
        &mut peer,
        &ping(&signer, &connect, "cmd-connect"),
        Some("cmd-connect"),
    )
    .await;
    assert_eq!(r["status"], 403, "{r}");

    // A forger with broker access but not the platform's key: same kid, own key.
    let forger = PlatformSigner::generate("platform-1");
    let r = send(&mut peer, &ping(&forger, &server, "cmd-forged"), None).await;
    assert_eq!(
        (r["status"].as_u64(), r["code"].as_str()),
        (Some(401), Some("UNAUTHENTICATED")),
        "{r}"
    );

    // A replay gets the recorded reply again and does not run again.
    let token = ping(&signer, &server, "cmd-server");
    let again = send(&mut peer, &token, Some("cmd-server")).await;
    assert_eq!(again["type"], "command.succeeded");
    let decisions = |decision: &str| {
        agent
            .logs_with_message("command decision")
            .into_iter()
            .filter(|l| l["command_id"] == "cmd-server" && l["decision"] == decision)
            .count()
    };
    assert_eq!(decisions("allowed"), 1, "{}", agent.log_dump());
    assert_eq!(decisions("duplicate"), 1, "{}", agent.log_dump());

    // Revoking one key leaves the others working.
    let revoked = ApiKey::server("key-leaked", WORKSPACE);
    peer.publish(
        &Topics::trust_bundle(),
        signer.trust_bundle(2, now(), now() + 3_600, &["key-leaked".into()]),
        true,
    )
    .await;
    let deadline = std::time::Instant::now() + WAIT;
    while agent.logs_with_message("trust bundle accepted").len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "bundle v2 not accepted:\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = send(
        &mut peer,
        &ping(&signer, &revoked, "cmd-revoked"),
        Some("cmd-revoked"),
    )
    .await;
    assert_eq!(r["status"], 403, "{r}");
    assert!(r["message"].as_str().unwrap().contains("revoked"), "{r}");
    let r = send(
        &mut peer,
        &ping(&signer, &server, "cmd-after-revoke"),
        Some("cmd-after-revoke"),
    )
    .await;
    assert_eq!(r["type"], "command.succeeded", "{r}");

    // An old bundle replayed by the broker does not undo the revocation.
    peer.publish(
        &Topics::trust_bundle(),
        signer.trust_bundle(1, now(), now() + 3_600, &[]),
        true,
    )
    .await;
    let r = send(
        &mut peer,
        &ping(&signer, &revoked, "cmd-revoked-2"),
        Some("cmd-revoked-2"),
    )
    .await;
    assert_eq!(r["status"], 403, "{r}");
}
