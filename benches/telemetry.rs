//! Telemetry throughput through the agent's real path, against the client library's ceiling,
//! and the agent's memory with its outbox at the cap.
//!
//!     cargo bench --bench telemetry
//!     TELEMETRY_POINTS=1000000 cargo bench --bench telemetry
//!
//! 1. **agent**: `Telemetry` (serialise, append to the outbox on disk, read back, batch, publish
//!    QoS 1, acknowledge on PUBACK) over `Link` to a local mosquitto with mutual TLS, fed from a
//!    sample channel as fast as it will take them, with the daemon's default settings and the
//!    daemon's single-threaded runtime. Timed from the first sample until the broker has
//!    acknowledged every point.
//! 2. **raw rumqttc**: the same points, already serialised and batched the same way (100 per
//!    message), published QoS 1 by a bare rumqttc loop with the same TLS configuration, timed
//!    until the last PUBACK. The ratio agent / raw is the figure to watch (goal: at least 0.5).
//!    A per-point variant (one point per message) is printed for context.
//! 3. **agent binary at the outbox cap**: `texture-agent run` with an external driver that
//!    prints states as fast as it can and no broker to talk to, until the outbox (4 MiB) is full
//!    and dropping; then its RSS and peak RSS are read from /proc. A broker is then started and
//!    the rate the binary delivers while the driver keeps pushing is measured by a subscriber.
//!    `TELEMETRY_BINARY=0` skips this part.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use common::{device_topic, Agent, AgentConfig, Mosquitto, Peer, Pki, PLATFORM_CLIENT};
use texture_agent::config::Settings;
use texture_agent::drivers::Sample;
use texture_agent::link::{Link, LinkState};
use texture_agent::outbox::{Outbox, Record};
use texture_agent::telemetry::model::{DeviceState, DeviceType};
use texture_agent::telemetry::{batch_message, Telemetry};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A handful of distinct device states, cycled.
fn states() -> Vec<(String, DeviceState)> {
    let kinds = [
        DeviceType::Battery,
        DeviceType::Inverter,
        DeviceType::Charger,
        DeviceType::Thermostat,
    ];
    (0..64u64)
        .map(|i| {
            let mut d = texture_agent::drivers::sim::SimDevice::new(kinds[i as usize % 4], i);
            (format!("dev-{}", i % 4), d.step(5.0, 43_200 + i).clone())
        })
        .collect()
}

/// Writes the configuration for `device` and loads it the daemon's way.
fn settings(pki: &Pki, port: u16, device: &str) -> Settings {
    let mut cfg = AgentConfig::new(pki, port, device);
    cfg.extra_toml = "[telemetry]\nhealth_interval_secs = 3600\n".into();
    let path = cfg.write(pki.path());
    let mut s = texture_agent::config::load_from(&path, std::iter::empty()).unwrap();
    // The harness's 5 s keepalive is for fast tests; use the production default.
    s.broker.keepalive_secs = 30;
    s
}

/// Phase 1: points/s through `Telemetry` + outbox + `Link`.
async fn agent_path(pki: &Pki, port: u16, points: u64) -> (f64, u64, u64) {
    let settings = settings(pki, port, "gw-bench");
    let (trigger, shutdown) = texture_agent::service::shutdown_channel();
    let link = Link::start(&settings, shutdown.clone()).unwrap();
    let mut status = link.status();
    status
        .wait_for(|s| s.state == LinkState::Connected)
        .await
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (outbox, _) = Outbox::open(dir.path(), settings.telemetry.outbox_max_bytes).unwrap();
    let (telemetry, mut stats) = Telemetry::new(&settings, &link, outbox, dir.path());
    let (tx, rx) = mpsc::channel(texture_agent::drivers::SAMPLE_QUEUE);
    let task = tokio::spawn(telemetry.run(rx, shutdown));
    let states = states();
    let t = Instant::now();
    tokio::spawn(async move {
        for i in 0..points as usize {
            let (device_id, state) = &states[i % states.len()];
            let sample = Sample {
                device_id: device_id.clone(),
                state: state.clone(),
            };
            if tx.send(sample).await.is_err() {
                return;
            }
        }
    });
    let mut peak_bytes = 0;
    stats
        .wait_for(|s| {
            peak_bytes = peak_bytes.max(s.bytes);
            s.next_seq > points && s.depth == 0
        })
        .await
        .unwrap();
    let elapsed = t.elapsed().as_secs_f64();
    let dropped = stats.borrow().dropped;
    trigger.trigger();
    let _ = task.await;
    link.shutdown(Duration::from_secs(2)).await;
    ((points - dropped) as f64 / elapsed, dropped, peak_bytes)
}

/// Phase 2: the same payloads through a bare rumqttc client; `per_message` points per PUBLISH.
async fn raw_path(pki: &Pki, port: u16, points: u64, per_message: usize) -> f64 {
    let settings = settings(pki, port, &format!("gw-raw-{per_message}"));
    let tls = texture_agent::link::tls::client_config(&settings.broker).unwrap();
    let mut options = MqttOptions::new(settings.device.id.as_str(), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(true)
        .set_max_packet_size(
            texture_agent::link::MAX_INBOUND_PACKET,
            texture_agent::link::MAX_OUTBOUND_PACKET,
        )
        .set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    loop {
        if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await.unwrap() {
            break;
        }
    }
    // Stored points, serialised and batched before the clock starts.
    let states = states();
    let messages: Vec<Vec<u8>> = (1..=points)
        .map(|seq| {
            let (device_id, state) = &states[seq as usize % states.len()];
            Record {
                seq,
                payload: serde_json::to_vec(&serde_json::json!({
                    "ts": 1_800_000_000_000u64 + seq,
                    "deviceId": device_id,
                    "state": state,
                }))
                .unwrap(),
            }
        })
        .collect::<Vec<_>>()
        .chunks(per_message)
        .map(|chunk| batch_message(settings.device.id.as_str(), chunk))
        .collect();
    let count = messages.len();
    let topic = device_topic(settings.device.id.as_str(), "telemetry");
    let t = Instant::now();
    tokio::spawn(async move {
        for m in messages {
            client
                .publish(&topic, QoS::AtLeastOnce, false, m)
                .await
                .unwrap();
        }
    });
    let mut acked = 0;
    while acked < count {
        match eventloop.poll().await.unwrap() {
            Event::Incoming(Packet::PubAck(_)) => acked += 1,
            Event::Outgoing(Outgoing::Disconnect) => panic!("disconnected"),
            _ => {}
        }
    }
    points as f64 / t.elapsed().as_secs_f64()
}

/// Phase 3: the release binary, an external driver printing as fast as it can.
fn binary_at_cap(pki: &Pki, runtime: &tokio::runtime::Runtime) {
    let (_, state) = &states()[0];
    let line = serde_json::to_string(&serde_json::json!({
        "type": "state", "deviceId": "bat-1", "state": state,
    }))
    .unwrap();
    let script = pki.path().join("firehose.sh");
    std::fs::write(
        &script,
        format!("line='{line}'\nwhile :; do printf '%s\\n' \"$line\"; done\n"),
    )
    .unwrap();
    let port = common::free_port();
    let mut cfg = AgentConfig::new(pki, port, "gw-cap");
    cfg.extra_toml = format!(
        "[telemetry]\nhealth_interval_secs = 3600\n\n[[drivers]]\nkind = \"process\"\nname = \"firehose\"\ncommand = [\"sh\", \"{}\"]\n",
        script.display()
    );
    let config = cfg.write(pki.path());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("level = \"debug\"", "level = \"info\"");
    std::fs::write(&config, text).unwrap();

    let agent = Agent::spawn(&config);
    agent.wait_for_log(
        "outbox full: oldest points dropped",
        Duration::from_secs(120),
    );
    let full_after = agent.started.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    let pid = agent.pid();
    println!(
        "binary, broker down, outbox full after {:.1} s and dropping:",
        full_after.as_secs_f64()
    );
    println!(
        "  rss {} KiB, peak rss (VmHWM) {} KiB, anonymous {} KiB",
        common::proc_status_kib(&pid.to_string(), "VmRSS:"),
        common::proc_status_kib(&pid.to_string(), "VmHWM:"),
        common::proc_status_kib(&pid.to_string(), "RssAnon:")
    );

    let broker = Mosquitto::start_on(pki, port);
    let topic = device_topic("gw-cap", "telemetry");
    let received = runtime.block_on(async {
        let mut peer = Peer::connect(pki, broker.port, PLATFORM_CLIENT, &[&topic]).await;
        // Let it connect and work through the full outbox first.
        peer.collect(&topic, Duration::from_secs(3)).await;
        let (cpu, t) = (common::cpu_seconds(&pid.to_string()), Instant::now());
        let batches = peer.collect(&topic, Duration::from_secs(5)).await;
        let (cpu, window) = (
            common::cpu_seconds(&pid.to_string()) - cpu,
            t.elapsed().as_secs_f64(),
        );
        let points: usize = batches
            .iter()
            .map(|m| m.json()["points"].as_array().map_or(0, Vec::len))
            .sum();
        (points as f64 / window, cpu / window)
    });
    println!(
        "binary, connected, driver pushing: {:.0} points/s delivered, {:.0} % CPU ({} threads); peak rss {} KiB",
        received.0,
        received.1 * 100.0,
        common::proc_status_kib(&pid.to_string(), "Threads:"),
        common::proc_status_kib(&pid.to_string(), "VmHWM:")
    );
    drop(agent);
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let points: u64 = env_or("TELEMETRY_POINTS", 100_000);
    let single: u64 = env_or("TELEMETRY_SINGLE_POINTS", 20_000);
    texture_agent::link::tls::install_default_provider();
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki);
    // The daemon's runtime: one thread.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let (agent, dropped, peak_bytes) = runtime.block_on(agent_path(&pki, broker.port, points));
    let pid = std::process::id();
    let hwm = common::proc_status_kib(&pid.to_string(), "VmHWM:");
    let raw = runtime.block_on(raw_path(&pki, broker.port, points, 100));
    let raw_single = runtime.block_on(raw_path(&pki, broker.port, single, 1));

    println!("points                  {points} (stored point ≈ 280 bytes, batches of 100)");
    println!(
        "agent path              {agent:>10.0} points/s  (outbox peak {:.1} KiB, {dropped} dropped)",
        peak_bytes as f64 / 1024.0
    );
    println!("raw rumqttc, batched    {raw:>10.0} points/s");
    println!(
        "ratio agent/raw         {:>10.2}  (goal >= 0.5)",
        agent / raw
    );
    println!("raw rumqttc, per point  {raw_single:>10.0} points/s  ({single} messages)");
    println!("bench process peak rss  {hwm:>10} KiB after the agent path");
    if env_or("TELEMETRY_BINARY", 1) != 0 {
        binary_at_cap(&pki, &runtime);
    }
}
