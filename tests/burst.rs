//! The saturated burst, in a test binary of its own: its firehose driver keeps a core busy for
//! the whole test, which would starve the end-to-end tests that cargo runs beside it in one
//! binary (cargo runs test binaries one after another).

use std::time::Duration;

use texture_agent::model::clock::system_secs;
use texture_agent::sim::platform::{ApiKey, AttestedCommand, PlatformSigner};
use texture_agent_testkit as kit;

use kit::{device_topic, Agent, AgentConfig, Mosquitto, Pki};

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

/// The saturated burst of docs/PERFORMANCE.md, which used to leave a third of its commands
/// unanswered: a driver pushing states as fast as it can, the outbox at its cap being drained
/// after the broker comes back, and 1000 signed commands published at once. Every one gets
/// exactly one reply: run, superseded (409), or shed unread (503 with `retryAfter`), whether
/// the router shed it or the link did because the router's queue was full (PROTOCOL 7.1).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_on_a_saturated_gateway_is_answered_in_full() {
    const GW: &str = "gw-saturated";
    const WORKSPACE: &str = "ws-saturated";
    // Under mosquitto's default max_queued_messages (1000) plus its 20 in flight, so the broker
    // itself drops none of them.
    const BURST: usize = 1000;
    let pki = Pki::new();
    let signer = PlatformSigner::generate("platform-saturated");
    let line = serde_json::json!({
        "type": "state", "deviceId": "bat-fire",
        "state": {"type": "battery", "charge": 8100.0, "chargePercentage": 60.0,
                  "chargingState": "discharging", "chargeRate": 612.4, "backupReserve": 20.0,
                  "gridStatus": "idle", "gridPower": 0.0, "strategy": "self-consumption"},
    });
    let script = kit::firehose_script(pki.path(), &line.to_string());
    let port = kit::free_port();
    let mut cfg = AgentConfig::new(&pki, port, GW).trusting(&signer, WORKSPACE);
    cfg.extra_toml = format!(
        "[telemetry]\noutbox_max_bytes = 262144\nhealth_interval_secs = 3600\n\n\
         [[drivers]]\nkind = \"process\"\nname = \"firehose\"\ncommand = [\"sh\", \"{}\"]\n\n\
         [[drivers]]\nkind = \"simulated\"\ndevice_id = \"bat-1\"\ndevice_type = \"battery\"\ninterval_ms = 5000\n",
        script.display()
    );
    // As in production: info (a debug line per point would make the log the bottleneck) and
    // the 30 s keepalive, since a link lost under load discards the replies queued on it.
    let agent = Agent::spawn(BIN, &cfg.write_production(pki.path()));
    agent.wait_for_log(
        "outbox full: oldest points dropped",
        Duration::from_secs(60),
    );

    let broker = Mosquitto::start_on(&pki, port);
    let (status, replies) = (device_topic(GW, "status"), device_topic(GW, "replies"));
    let mut peer = kit::platform_peer(&pki, broker.port, &signer, &[&status, &replies]).await;
    peer.expect(&status, Duration::from_secs(15), |m| {
        m.json()["state"] == "online"
    })
    .await;
    let key = ApiKey::server("key-server", WORKSPACE);
    let mut ids = std::collections::BTreeSet::new();
    let tokens: Vec<String> = (0..BURST)
        .map(|i| {
            let id = format!("burst-{i}");
            let input = serde_json::json!({"chargePercentage": 20 + i % 50});
            let command =
                AttestedCommand::new(GW, &id, "battery:set-reserve", input).for_device("bat-1");
            let token = signer.attest(&signer.claims(&key, command, system_secs(), 300));
            ids.insert(id);
            token
        })
        .collect();
    for token in tokens {
        peer.publish(&device_topic(GW, "commands"), token.into_bytes(), false)
            .await;
    }
    let kinds = peer
        .burst_replies(GW, &mut ids, Duration::from_secs(90))
        .await;
    assert!(
        ids.is_empty(),
        "{} of {BURST} commands never answered ({kinds:?}); dropped: {}; link down: {:?}",
        ids.len(),
        agent
            .logs_with_message("inbound queue full; message dropped")
            .len(),
        agent.logs_with_message("link down"),
    );
    // Nothing more comes: exactly one reply each.
    let late = peer.collect(&replies, Duration::from_secs(2)).await;
    assert!(late.is_empty(), "{} more replies", late.len());
    let by_link = agent
        .logs_with_message("gateway busy: command shed unread")
        .iter()
        .filter(|l| l["by"] == "link")
        .count();
    println!("{kinds:?}; {by_link} shed by the link");
}
