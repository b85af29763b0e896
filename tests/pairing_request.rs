//! PROTOCOL 11.4: the pending pairing request is published again, byte for byte, after the link
//! comes back, so a platform that missed it (or a broker that lost it) still gets it.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{device_topic, Agent, AgentConfig, Mosquitto, Peer, Pki, PLATFORM_CLIENT};
use texture_agent::sim::platform::PlatformSigner;

const WAIT: Duration = Duration::from_secs(15);
const DEVICE: &str = "gw-pair-again";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pending_pairing_request_is_sent_again_after_a_reconnect() {
    let pki = Pki::new();
    // Persistent: the platform's subscription and its queued messages survive the outage, so
    // what the agent publishes right after it reconnects reaches the peer whenever it is back.
    let mut broker = Mosquitto::start_with(&pki, true);
    let signer = PlatformSigner::generate("platform-1");
    let requests = device_topic(DEVICE, "pairing/request");
    let mut peer =
        Peer::connect_with(&pki, broker.port, PLATFORM_CLIENT, &[&requests], false).await;
    let now = common::unix_now();
    peer.publish(
        &texture_agent::link::topics::Topics::trust_bundle(),
        signer.trust_bundle(1, now, now + 3_600, &[]),
        true,
    )
    .await;
    let mut cfg = AgentConfig::new(&pki, broker.port, DEVICE);
    cfg.trust_root = Some(signer.root_public_key());
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(&config);
    agent.wait_for_log("trust bundle accepted", WAIT);

    let mut pair = common::agent_process()
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
