//! Bytes on the wire: what the gateway's socket carries, counted by a relay between the agent
//! and the broker (`testkit::ByteRelay`), so TLS records, MQTT framing, PUBACKs and keepalives
//! all count; TCP/IP headers do not (docs/PERFORMANCE.md, "Bytes on the wire").
//!
//!     cargo bench --bench wire                      # 120 s per stream
//!     WIRE_SECS=30 cargo bench --bench wire         # shorter windows
//!     TEXTURE_AGENT_BIN=... cargo bench --bench wire
//!
//!     WIRE_ONLY=cellular cargo bench --bench wire   # the rows whose stream or profile match
//!     WIRE_ONLY=idle WIRE_PROFILE=cellular WIRE_SECS=3600 cargo bench --bench wire   # an hour
//!
//! Each row has its own broker and agent, mutual TLS and `info` logs, in one of three
//! profiles: `defaults` (JSON, every sample, 30 s keepalive, health every 60 s), `cellular`
//! (docs/OPERATIONS.md's: compact encoding, report by exception, 300 s keepalive, health every
//! 15 min) and `cellular, no TLS resumption` (for the reconnect only). Streams:
//! - `battery 1 Hz, 1 s batches` and `battery 1 Hz, 60 s batches`: one simulated battery
//!   sampled every second;
//! - `4 devices at 5 s`: the footprint bench's four simulated devices, default batching;
//! - `idle`: no device; keepalives and health only, scaled from the window to an hour;
//! - `connect` and `reconnect`: from the TCP connect to the first telemetry batch the platform
//!   receives (TLS handshake, CONNECT, subscriptions, the retained trust bundle, birth,
//!   capabilities), first at start-up and then after the relay cuts the connection.
//!
//! Bytes per sample divide everything both ways in the window by the samples the devices took
//! in it (`rate` × the window), so the samples that report by exception held back count too;
//! with devices the window spans whole batch periods, from one batch's arrival to another's.

use std::time::{Duration, Instant};

use texture_agent::sim::platform::PlatformSigner;
use texture_agent_testkit as kit;

use kit::{device_topic, Agent, AgentConfig, ByteRelay, Testbed};

const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");
const GATEWAY: &str = "gw-wire";
const WORKSPACE: &str = "ws-wire";

/// How the agent is configured for a row: its `[broker]` and `[telemetry]` lines.
struct Profile {
    name: &'static str,
    broker: &'static str,
    telemetry: &'static str,
}

/// The defaults: JSON batches, every sample a point, 30 s keepalive, health every 60 s.
const DEFAULTS: Profile = Profile {
    name: "defaults",
    broker: "",
    telemetry: "",
};

/// docs/OPERATIONS.md's profile for a metered cellular link.
const CELLULAR: Profile = Profile {
    name: "cellular",
    broker: "keepalive_secs = 300\npersistent_session = true\n",
    telemetry: "encoding = \"compact\"\nreport = \"on-change\"\nhealth_interval_secs = 900\n",
};

/// The cellular profile with a clean session, for what the persistent one saves a reconnect.
const CLEAN_SESSION: Profile = Profile {
    name: "cellular, clean session",
    broker: "keepalive_secs = 300\n",
    telemetry: CELLULAR.telemetry,
};

/// The cellular profile without TLS session resumption, for its reconnect figure.
const NO_RESUMPTION: Profile = Profile {
    name: "cellular, no TLS resumption",
    broker: "keepalive_secs = 300\npersistent_session = true\ntls_resumption = false\n",
    telemetry: CELLULAR.telemetry,
};

/// One simulated device's `[[drivers]]` table.
fn simulated(id: &str, kind: &str, interval_ms: u64, seed: u64) -> String {
    format!(
        "[[drivers]]\nkind = \"simulated\"\ndevice_id = \"{id}\"\ndevice_type = \"{kind}\"\n\
         interval_ms = {interval_ms}\nseed = {seed}\n\n"
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("WIRE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    // A substring of the stream or profile names, to run some rows only; a profile's name, to
    // run its rows only (`WIRE_ONLY=idle WIRE_PROFILE=cellular WIRE_SECS=3600`: an idle hour).
    let only = std::env::var("WIRE_ONLY").unwrap_or_default();
    let only_profile = std::env::var("WIRE_PROFILE").ok();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let battery = simulated("bat-1", "battery", 1000, 1);
    let four: String = ["battery", "inverter", "charger", "thermostat"]
        .iter()
        .enumerate()
        .map(|(i, kind)| simulated(&format!("sim-{i}"), kind, 5000, i as u64))
        .collect();
    // (stream, drivers, its own [telemetry] lines, samples per second)
    let streams: [(&str, &str, &str, f64); 4] = [
        (
            "battery 1 Hz, 1 s batches",
            &battery,
            "batch_max_ms = 1000\n",
            1.0,
        ),
        (
            "battery 1 Hz, 60 s batches",
            &battery,
            "batch_max_ms = 60000\nbatch_max_points = 1000\n",
            1.0,
        ),
        ("4 devices at 5 s", &four, "", 0.8),
        ("idle (no device)", "", "", 0.0),
    ];
    runtime.block_on(async {
        println!("binary {}", kit::agent_binary(BIN));
        println!("window {secs} s per stream");
        println!(
            "| stream | profile | samples | points | up B | down B | B/sample | connect B | reconnect B |\n|---|---|---|---|---|---|---|---|---|"
        );
        for (stream, drivers, telemetry, rate) in streams {
            for profile in [&DEFAULTS, &CELLULAR, &CLEAN_SESSION, &NO_RESUMPTION] {
                // These two differ from the cellular profile only in the reconnect: a row each
                // for the battery and the four devices is enough.
                let variant = [CLEAN_SESSION.name, NO_RESUMPTION.name].contains(&profile.name);
                if variant
                    && !stream.starts_with("battery 1 Hz, 1 s")
                    && !stream.starts_with("4 devices")
                {
                    continue;
                }
                if !only.is_empty() && !stream.contains(&only) && !profile.name.contains(&only) {
                    continue;
                }
                if only_profile.as_deref().is_some_and(|p| p != profile.name) {
                    continue;
                }
                let toml = format!("[telemetry]\n{telemetry}{}\n{drivers}", profile.telemetry);
                let (up, down) = measure(stream, profile, &toml, secs, rate).await;
                if drivers.is_empty() {
                    let per_hour = (up + down) as f64 * 3600.0 / secs as f64;
                    println!("idle hour, {} (scaled from {secs} s): {per_hour:.0} B", profile.name);
                }
            }
        }
    });
}

/// One row: the agent with `toml` (its `[telemetry]` table and drivers) and `profile`'s broker
/// lines, connected through a counting relay, measured over `secs`; prints the row and returns
/// (up, down) over the window. `rate` is the samples the drivers take per second, so B/sample
/// counts the samples report by exception held back as well.
async fn measure(name: &str, profile: &Profile, toml: &str, secs: u64, rate: f64) -> (u64, u64) {
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
    cfg.extra_toml = toml.to_owned();
    cfg.extra_broker = profile.broker.to_owned();
    let agent = Agent::spawn(BIN, &cfg.write_production(pki.path()));
    // Long enough for a first 60 s batch.
    let wait = Duration::from_secs(90);
    let has_devices = rate > 0.0;

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
    let window = Duration::from_secs(secs);
    // With devices, the window runs from one batch's arrival (the connect's last) to another's,
    // at least `secs` later: whole batch periods, so a 60 s batching is not cut in half.
    let batches = if has_devices {
        let mut batches = Vec::new();
        while t0.elapsed() < window {
            batches.push(peer.expect(&telemetry, wait, |_| true).await);
        }
        batches
    } else {
        peer.collect(&telemetry, window).await
    };
    let elapsed = t0.elapsed();
    let (up, down) = relay.bytes();
    assert!(elapsed >= window, "the window was cut short");
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

    let samples = (rate * elapsed.as_secs_f64()).round();
    let per_sample = if samples == 0.0 {
        "-".to_owned()
    } else {
        format!("{:.1}", (up + down) as f64 / samples)
    };
    println!(
        "| {name} | {} | {samples} | {points} | {up} | {down} | {per_sample} | {} | {} |",
        profile.name,
        connect.0 + connect.1,
        reconnect.0 + reconnect.1
    );
    // Scaled to the nominal window, for the idle hour.
    let scale = secs as f64 / elapsed.as_secs_f64();
    ((up as f64 * scale) as u64, (down as f64 * scale) as u64)
}
