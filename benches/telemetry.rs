//! Telemetry throughput through the agent's real path, against a bare publish loop,
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
//! 2. **raw rumqttc loop**: the same points published QoS 1 by a bare rumqttc loop with the same
//!    TLS configuration, timed until the last PUBACK. The loop encodes and batches each point
//!    exactly as the agent does (100 per message, the same functions) and publishes it: what
//!    any publisher of these points has to do, minus the outbox. The ratio agent / raw loop is
//!    the figure to watch (goal: at least 0.5).
//!    Printed for context: the client library's ceiling, the same messages built *before* the
//!    clock starts so the loop only publishes (ratio agent / prebuilt), and a per-point loop
//!    (one point per message, as a naive publisher would send them).
//!    `TELEMETRY_ROUNDS` (default 5) interleaved runs of each; medians are printed.
//! 3. **agent binary at the outbox cap**: `texture-agent run` with an external driver that
//!    prints states as fast as it can and no broker to talk to, until the outbox (4 MiB) is full
//!    and dropping; then its RSS and peak RSS are read from /proc. A broker is then started and
//!    the rate the binary delivers while the driver keeps pushing is measured by a subscriber.
//!    `TELEMETRY_BINARY=0` skips this part; `TELEMETRY_RAW=0` stops after phase 1 (profiling).

use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration, Transport,
};
use tokio::sync::mpsc;

use kit::{device_topic, Agent, AgentConfig, Mosquitto, Pki};
use texture_agent::config::Settings;
use texture_agent::drivers::Sample;
use texture_agent::link::{Link, LinkState};
use texture_agent::model::clock::system_secs;
use texture_agent::model::device::{DeviceState, DeviceType};
use texture_agent::sim::platform::{ApiKey, AttestedCommand, PlatformSigner};
use texture_agent::telemetry::outbox::{Outbox, Record};
use texture_agent::telemetry::{batch_message, encode_state, Telemetry};
use texture_agent_testkit as kit;

/// The agent binary cargo built for these benches.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

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
            let mut d = texture_agent::drivers::simulated::SimDevice::new(kinds[i as usize % 4], i);
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
async fn agent_path(pki: &Pki, port: u16, points: u64) -> (f64, u64, u64, f64) {
    let settings = settings(pki, port, "gw-bench");
    let (trigger, shutdown) = texture_agent::agent::service::shutdown_channel();
    let clock = texture_agent::model::clock::Clock::system();
    let link = Link::start(&settings, shutdown.clone(), clock.clone()).unwrap();
    let mut status = link.status();
    status
        .wait_for(|s| s.state == LinkState::Connected)
        .await
        .unwrap();
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (outbox, _) = Outbox::open(dir.path(), settings.telemetry.outbox_max_bytes).unwrap();
    let (telemetry, mut stats) = Telemetry::new(
        settings.device.id.as_str(),
        &settings.telemetry,
        &link,
        outbox,
        dir.path(),
        clock,
    );
    let (tx, rx) = mpsc::channel(texture_agent::drivers::SAMPLE_QUEUE);
    let task = tokio::spawn(telemetry.run(rx, shutdown));
    let states = states();
    let (t, cpu) = (Instant::now(), own_cpu());
    tokio::spawn(async move {
        for i in 0..points as usize {
            let (device_id, state) = &states[i % states.len()];
            let sample = Sample {
                device_id: device_id.clone(),
                state: state.clone(),
                commands: None,
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
    let busy = (own_cpu() - cpu) / elapsed;
    let dropped = stats.borrow().dropped;
    trigger.trigger();
    let _ = task.await;
    link.shutdown(Duration::from_secs(2)).await;
    (
        (points - dropped) as f64 / elapsed,
        dropped,
        peak_bytes,
        busy,
    )
}

/// The run with the median rate (and its CPU share).
fn median(mut runs: Vec<(f64, f64)>) -> (f64, f64) {
    runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    runs[runs.len() / 2]
}

/// CPU seconds this process has used (all threads; the runtime has one).
fn own_cpu() -> f64 {
    kit::cpu_seconds(&std::process::id().to_string())
}

/// Phase 2: the same points through a bare rumqttc client, `per_message` points per PUBLISH.
///
/// With `preserialised`, every message is built before the clock starts and the loop only
/// publishes: the client library's ceiling. Without it, the loop does what any publisher of
/// these points must do, the agent's encoding and batching (`encode_state`, `batch_message`)
/// for each point, and publishes; only the outbox, the sample channel and the acknowledgement
/// bookkeeping are missing.
async fn raw_path(
    pki: &Pki,
    port: u16,
    points: u64,
    per_message: usize,
    preserialised: bool,
) -> (f64, f64) {
    let settings = settings(pki, port, &format!("gw-raw-{per_message}-{preserialised}"));
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
    let gateway = settings.device.id.to_string();
    let states = states();
    // The points of messages `from..to`, encoded and batched as the agent does.
    let build = move |seqs: std::ops::Range<u64>| -> Vec<u8> {
        let ts = texture_agent::model::clock::system_millis();
        let records: Vec<Record> = seqs
            .map(|seq| {
                let (device_id, state) = &states[seq as usize % states.len()];
                let mut payload = Vec::with_capacity(320);
                encode_state(ts, device_id, state, &mut payload);
                Record {
                    epoch: 1,
                    seq,
                    payload,
                }
            })
            .collect();
        batch_message(&gateway, &records)
    };
    let ranges: Vec<std::ops::Range<u64>> = (0..points.div_ceil(per_message as u64))
        .map(|m| {
            let first = 1 + m * per_message as u64;
            first..(first + per_message as u64).min(points + 1)
        })
        .collect();
    let count = ranges.len();
    let prebuilt: Vec<Vec<u8>> = if preserialised {
        ranges.iter().cloned().map(&build).collect()
    } else {
        Vec::new()
    };
    let topic = device_topic(settings.device.id.as_str(), "telemetry");
    let (t, cpu) = (Instant::now(), own_cpu());
    tokio::spawn(async move {
        let mut prebuilt = prebuilt.into_iter();
        for range in ranges {
            let message = match prebuilt.next() {
                Some(m) => m,
                None => build(range),
            };
            client
                .publish(&topic, QoS::AtLeastOnce, false, message)
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
    let elapsed = t.elapsed().as_secs_f64();
    (points as f64 / elapsed, (own_cpu() - cpu) / elapsed)
}

/// Commands in the burst of phase 3.
const BURST: u32 = 1000;

/// Phase 3: the release binary, an external driver printing as fast as it can.
fn binary_at_cap(pki: &Pki, runtime: &tokio::runtime::Runtime) {
    let (_, state) = &states()[0];
    let line = serde_json::to_string(&serde_json::json!({
        "type": "state", "deviceId": "bat-1", "state": state,
    }))
    .unwrap();
    let script = kit::firehose_script(pki.path(), &line);
    let port = kit::free_port();
    let signer = PlatformSigner::generate("platform-1");
    let mut cfg = AgentConfig::new(pki, port, "gw-cap").trusting(&signer, "ws-cap");
    cfg.extra_toml = format!(
        "[telemetry]\nhealth_interval_secs = 3600\n\n[[drivers]]\nkind = \"process\"\nname = \"firehose\"\ncommand = [\"sh\", \"{}\"]\n\n\
         [[drivers]]\nkind = \"simulated\"\ndevice_id = \"bat-sim\"\ndevice_type = \"battery\"\ninterval_ms = 5000\n",
        script.display()
    );
    let config = cfg.write(pki.path());
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("level = \"debug\"", "level = \"info\"");
    std::fs::write(&config, text).unwrap();

    let agent = Agent::spawn(BIN, &config);
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
        kit::proc_status_kib(&pid.to_string(), "VmRSS:"),
        kit::proc_status_kib(&pid.to_string(), "VmHWM:"),
        kit::proc_status_kib(&pid.to_string(), "RssAnon:")
    );

    let broker = Mosquitto::start_on(pki, port);
    let topic = device_topic("gw-cap", "telemetry");
    let replies = device_topic("gw-cap", "replies");
    let status = device_topic("gw-cap", "status");
    let received = runtime.block_on(async {
        let mut peer =
            kit::platform_peer(pki, broker.port, &signer, &[&topic, &replies, &status]).await;
        // The burst: as soon as the agent is back online, with its outbox at the cap and the
        // driver still pushing, 1000 signed commands at once.
        peer.expect(&status, Duration::from_secs(60), |m| {
            m.json()["state"] == "online"
        })
        .await;
        let key = ApiKey::server("key-server", "ws-cap");
        let now = system_secs();
        let t = Instant::now();
        for i in 0..BURST {
            let id = format!("burst-{i}");
            let input = serde_json::json!({"chargePercentage": 20 + i % 50});
            let command = AttestedCommand::new("gw-cap", &id, "battery:set-reserve", input)
                .for_device("bat-sim");
            let claims = signer.claims(&key, command, now, 300);
            let token = signer.attest(&claims);
            peer.publish(&device_topic("gw-cap", "commands"), token, false)
                .await;
        }
        let published = t.elapsed();
        let mut answered = std::collections::BTreeMap::<String, usize>::new();
        let mut total = 0;
        loop {
            let batch = peer.collect(&replies, Duration::from_secs(3)).await;
            if batch.is_empty() {
                break;
            }
            for m in batch {
                let reply = m.json();
                let key = format!(
                    "{} {}",
                    reply["type"].as_str().unwrap_or("?"),
                    reply["status"]
                );
                *answered.entry(key).or_default() += 1;
                total += 1;
            }
        }
        let dropped = agent.logs_with_message("inbound queue full; message dropped").len();
        println!(
            "binary, burst of {BURST} signed commands on reconnect (outbox at its cap, driver pushing), published in {} ms:",
            published.as_millis()
        );
        println!(
            "  {total} replies {answered:?}; {dropped} dropped unanswered at the inbound queue; peak rss (VmHWM) {} KiB",
            kit::proc_status_kib(&pid.to_string(), "VmHWM:")
        );
        // Let it connect and work through the full outbox first.
        peer.collect(&topic, Duration::from_secs(3)).await;
        let (cpu, t) = (kit::cpu_seconds(&pid.to_string()), Instant::now());
        let batches = peer.collect(&topic, Duration::from_secs(5)).await;
        let (cpu, window) = (
            kit::cpu_seconds(&pid.to_string()) - cpu,
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
        kit::proc_status_kib(&pid.to_string(), "Threads:"),
        kit::proc_status_kib(&pid.to_string(), "VmHWM:")
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

    let rounds: usize = env_or("TELEMETRY_ROUNDS", 5);
    let port = broker.port;
    let mut agent = Vec::new();
    let mut raw = Vec::new();
    let mut ceiling = Vec::new();
    let mut last_agent = (0, 0);
    let mut hwm = 0;
    // Interleaved rounds, medians reported: the broker shares this machine, and a single run
    // of either path swings by a third from one run to the next.
    for _ in 0..rounds {
        let (rate, dropped, peak_bytes, cpu) = runtime.block_on(agent_path(&pki, port, points));
        agent.push((rate, cpu));
        last_agent = (dropped, peak_bytes);
        if hwm == 0 {
            // Before the prebuilt messages (tens of MiB) inflate it.
            hwm = kit::proc_status_kib(&std::process::id().to_string(), "VmHWM:");
        }
        if env_or("TELEMETRY_RAW", 1) == 0 {
            // For profiling the agent path alone.
            println!("agent path {rate:.0} points/s, CPU {:.0} %", cpu * 100.0);
            continue;
        }
        raw.push(runtime.block_on(raw_path(&pki, port, points, 100, false)));
        ceiling.push(runtime.block_on(raw_path(&pki, port, points, 100, true)));
    }
    if raw.is_empty() {
        return;
    }
    let (raw_single, _) = runtime.block_on(raw_path(&pki, port, single, 1, false));
    // Each round's own ratio: the two paths of one round ran back to back, so this shows the
    // spread the noise of the machine leaves on the figure.
    let (low, high) = agent
        .iter()
        .zip(&raw)
        .map(|(a, r)| a.0 / r.0)
        .fold((f64::MAX, 0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
    let (agent, raw, ceiling) = (median(agent), median(raw), median(ceiling));

    println!(
        "points                  {points} per run, median of {rounds} runs (stored point ≈ 280 bytes, batches of 100)"
    );
    println!(
        "agent path              {:>10.0} points/s  (CPU {:.0} %; last run: outbox peak {:.1} KiB, {} dropped)",
        agent.0,
        agent.1 * 100.0,
        last_agent.1 as f64 / 1024.0,
        last_agent.0
    );
    println!(
        "raw rumqttc loop        {:>10.0} points/s  (CPU {:.0} %; encodes and batches each point)",
        raw.0,
        raw.1 * 100.0
    );
    println!(
        "ratio agent/raw loop    {:>10.2}  (goal >= 0.5; single rounds {low:.2} – {high:.2})",
        agent.0 / raw.0
    );
    println!(
        "raw rumqttc, prebuilt   {:>10.0} points/s  (CPU {:.0} %; messages built before the clock)",
        ceiling.0,
        ceiling.1 * 100.0
    );
    println!("ratio agent/prebuilt    {:>10.2}", agent.0 / ceiling.0);
    println!(
        "raw rumqttc, per point  {raw_single:>10.0} points/s  ({single} messages, one point each)"
    );
    println!("bench process peak rss  {hwm:>10} KiB after the first agent run");
    if env_or("TELEMETRY_BINARY", 1) != 0 {
        binary_at_cap(&pki, &runtime);
    }
}
