//! Bytes on the wire: what the gateway's socket carries, counted by a relay between the agent
//! and the broker (`testkit::ByteRelay`), so TLS records, MQTT framing, PUBACKs and keepalives
//! all count; TCP/IP headers do not (docs/PERFORMANCE.md, "Bytes on the wire").
//!
//!     cargo bench --bench wire                      # 120 s per stream
//!     WIRE_SECS=30 cargo bench --bench wire         # shorter windows
//!     TEXTURE_AGENT_BIN=... cargo bench --bench wire
//!
//! Four measurements, each with its own broker, agent and production settings (30 s
//! keepalive, `info` logs, mutual TLS):
//! - `battery 1 Hz, 1 s batches`: one simulated battery reporting every second, batches of at
//!   most 1 s;
//! - `4 devices at 5 s`: the footprint bench's four simulated devices, default batching;
//! - `idle`: no device; keepalives and health only, scaled from the window to an hour;
//! - `connect` and `reconnect`: from the TCP connect to the first telemetry batch the platform
//!   receives (TLS handshake, CONNECT, subscriptions, the retained trust bundle, birth,
//!   capabilities), first at start-up and then after the relay cuts the connection.
//!
//! Bytes per point divide everything both ways in the window by the device points the
//! platform received (health points not counted as points).

use std::time::{Duration, Instant};

use texture_agent::sim::platform::PlatformSigner;
use texture_agent_testkit as kit;

use kit::{device_topic, Agent, AgentConfig, ByteRelay, Testbed};

const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");
const GATEWAY: &str = "gw-wire";
const WORKSPACE: &str = "ws-wire";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("WIRE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("binary {}", kit::agent_binary(BIN));
        println!("window {secs} s per stream");
        println!(
            "| stream | points | up B | down B | B/point | connect B | reconnect B |\n|---|---|---|---|---|---|---|"
        );
        let battery = "[[drivers]]\nkind = \"simulated\"\ndevice_id = \"bat-1\"\n\
                       device_type = \"battery\"\ninterval_ms = 1000\nseed = 1\n\n\
                       [telemetry]\nbatch_max_ms = 1000\n";
        measure("battery 1 Hz, 1 s batches", battery, secs).await;
        let mut four = String::new();
        for (i, kind) in ["battery", "inverter", "charger", "thermostat"]
            .iter()
            .enumerate()
        {
            four.push_str(&format!(
                "[[drivers]]\nkind = \"simulated\"\ndevice_id = \"sim-{i}\"\n\
                 device_type = \"{kind}\"\ninterval_ms = 5000\nseed = {i}\n\n"
            ));
        }
        measure("4 devices at 5 s", &four, secs).await;
        let idle = measure("idle (no device)", "", secs).await;
        let per_hour = (idle.0 + idle.1) as f64 * 3600.0 / secs as f64;
        println!("idle hour (scaled from {secs} s): {per_hour:.0} B");
    });
}

/// One stream: the agent with `drivers` (TOML), connected through a counting relay, measured
/// over `secs`; prints its table row and returns (up, down) over the window.
async fn measure(name: &str, drivers: &str, secs: u64) -> (u64, u64) {
    let telemetry = device_topic(GATEWAY, "telemetry");
    let capabilities = device_topic(GATEWAY, "capabilities");
    let Testbed {
        pki,
        broker,
        signer,
        mut peer,
    } = Testbed::start(
        PlatformSigner::generate("platform-wire"),
        &[&telemetry, &capabilities],
    )
    .await;
    let relay = ByteRelay::start(broker.port);
    let mut cfg = AgentConfig::new(&pki, relay.port, GATEWAY).trusting(&signer, WORKSPACE);
    cfg.extra_toml = drivers.to_owned();
    let agent = Agent::spawn(BIN, &cfg.write_production(pki.path()));
    let wait = Duration::from_secs(30);
    let has_devices = !drivers.is_empty();

    // Connect: until the platform has the first batch (or, without devices, capabilities).
    let first = if has_devices {
        &telemetry
    } else {
        &capabilities
    };
    peer.expect(first, wait, |_| true).await;
    let connect = relay.bytes();

    peer.forget(&telemetry);
    relay.reset();
    let t0 = Instant::now();
    let batches = peer.collect(&telemetry, Duration::from_secs(secs)).await;
    let (up, down) = relay.bytes();
    assert!(
        t0.elapsed() >= Duration::from_secs(secs),
        "the window was cut short"
    );
    let points: usize = batches
        .iter()
        .map(|b| {
            b.json()["points"]
                .as_array()
                .map_or(0, |p| p.iter().filter(|p| p.get("state").is_some()).count())
        })
        .sum();

    // Reconnect: the relay drops the connection; the agent dials again.
    peer.forget(&telemetry);
    peer.forget(&capabilities);
    relay.reset();
    relay.cut();
    let deadline = Instant::now() + wait;
    while relay.connections() < 2 {
        assert!(Instant::now() < deadline, "the agent did not reconnect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    peer.expect(&capabilities, wait, |_| true).await;
    if has_devices {
        peer.expect(&telemetry, wait, |_| true).await;
    }
    let reconnect = relay.bytes();
    drop(agent);

    let per_point = if points == 0 {
        "-".to_owned()
    } else {
        format!("{:.0}", (up + down) as f64 / points as f64)
    };
    println!(
        "| {name} | {points} | {up} | {down} | {per_point} | {} | {} |",
        connect.0 + connect.1,
        reconnect.0 + reconnect.1
    );
    (up, down)
}
