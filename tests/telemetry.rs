//! Telemetry end to end against mosquitto with TLS: nothing is lost across broker outages,
//! agent kills, a full outbox or a torn outbox file, and the order is kept.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kit::{device_topic, Agent, AgentConfig, Mosquitto, Peer, Pki, PLATFORM_CLIENT};
use texture_agent_testkit as kit;

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

const DEVICE: &str = "gw-tel";
const WAIT: Duration = Duration::from_secs(20);

/// Ten simulated devices at 10 Hz: 100 points per second.
fn hundred_points_per_second() -> String {
    let mut toml = String::from("[telemetry]\nbatch_max_points = 100\nbatch_max_ms = 200\nfsync_interval_ms = 200\nhealth_interval_secs = 3600\n\n");
    for i in 0..10 {
        let kind = ["battery", "inverter", "charger", "thermostat"][i % 4];
        toml.push_str(&format!(
            "[[drivers]]\nkind = \"simulated\"\ndevice_id = \"sim-{i}\"\ndevice_type = \"{kind}\"\ninterval_ms = 100\nseed = {i}\n\n"
        ));
    }
    toml
}

/// The sequence numbers the platform has seen, with how often each arrived.
#[derive(Default)]
struct Received {
    seqs: BTreeMap<u64, u32>,
    /// Arrival order, to check that delivery is in order.
    order: Vec<u64>,
    /// The first byte of every batch: `{` for JSON, 0x03 or 0x04 for compact (PROTOCOL 14.9).
    encodings: std::collections::BTreeSet<u8>,
    /// The epoch each sequence number came with: without a power cut a number is never given
    /// twice, so every copy of it has the epoch of the run that stored it (PROTOCOL 14.3).
    epochs: BTreeMap<u64, u64>,
}

impl Received {
    async fn drain(&mut self, peer: &mut Peer, window: Duration) {
        for m in peer
            .collect(&device_topic(DEVICE, "telemetry"), window)
            .await
        {
            self.encodings.insert(m.payload[0]);
            let batch = m.json();
            assert_eq!(batch["gatewayId"], DEVICE);
            let epoch = batch["epoch"].as_u64().expect("epoch");
            assert!(epoch >= 1, "{epoch}");
            for p in batch["points"].as_array().expect("points") {
                let seq = p["seq"].as_u64().expect("seq");
                let first = *self.epochs.entry(seq).or_insert(epoch);
                assert_eq!(first, epoch, "seq {seq} came with two epochs");
                assert!(
                    p["ts"].as_u64().is_some() && p["deviceId"].is_string(),
                    "{p}"
                );
                *self.seqs.entry(seq).or_default() += 1;
                self.order.push(seq);
            }
        }
    }

    /// Drains until every sequence number from `first` to `last` has arrived.
    async fn drain_until_complete(&mut self, peer: &mut Peer, first: u64, last: u64) {
        let deadline = Instant::now() + WAIT;
        while (first..=last).any(|s| !self.seqs.contains_key(&s)) {
            assert!(
                Instant::now() < deadline,
                "missing: {:?}",
                self.missing(first, last)
            );
            self.drain(peer, Duration::from_millis(300)).await;
        }
    }

    fn missing(&self, first: u64, last: u64) -> Vec<u64> {
        (first..=last)
            .filter(|s| !self.seqs.contains_key(s))
            .take(20)
            .collect()
    }

    fn duplicates(&self) -> u32 {
        self.seqs.values().map(|n| n - 1).sum()
    }

    /// First deliveries must be in increasing order (re-sends may repeat earlier numbers).
    fn assert_first_arrivals_in_order(&self) {
        let mut seen = std::collections::HashSet::new();
        let firsts: Vec<u64> = self
            .order
            .iter()
            .copied()
            .filter(|s| seen.insert(*s))
            .collect();
        assert!(
            firsts.windows(2).all(|w| w[0] < w[1]),
            "out of order first arrivals"
        );
    }
}

/// The outbox's next sequence number as `status` reports it after the agent stopped.
fn next_seq(config: &std::path::Path) -> u64 {
    let out = kit::agent_command(BIN, config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("outbox:"))
        .unwrap_or_else(|| panic!("{text}"));
    line.rsplit("next seq ")
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn stop(mut agent: Agent) {
    agent.signal("TERM");
    assert!(agent.wait_exit(Duration::from_secs(6)).success());
}

/// Restarts the agent without drivers so it only drains what its outbox holds.
fn drain_config(pki: &Pki, port: u16) -> std::path::PathBuf {
    drain_config_with(pki, port, "")
}

/// [`drain_config`] with more `[telemetry]` lines.
fn drain_config_with(pki: &Pki, port: u16, telemetry: &str) -> std::path::PathBuf {
    let mut cfg = AgentConfig::new(pki, port, DEVICE);
    cfg.extra_toml =
        format!("[telemetry]\nbatch_max_ms = 50\nhealth_interval_secs = 3600\n{telemetry}");
    cfg.write(pki.path())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_point_arrives_in_order_across_a_twenty_second_broker_outage() {
    let pki = Pki::new();
    let mut broker = Mosquitto::start_with(&pki, true);
    let telemetry = device_topic(DEVICE, "telemetry");
    let mut peer =
        Peer::connect_with(&pki, broker.port, PLATFORM_CLIENT, &[&telemetry], false).await;
    let mut cfg = AgentConfig::new(&pki, broker.port, DEVICE);
    cfg.extra_toml = hundred_points_per_second();
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(BIN, &config);
    let mut got = Received::default();
    got.drain(&mut peer, Duration::from_secs(3)).await;
    assert!(
        got.seqs.len() > 100,
        "only {} points before the outage",
        got.seqs.len()
    );

    broker.stop_gracefully();
    std::thread::sleep(Duration::from_secs(20));
    broker.restart();
    got.drain(&mut peer, Duration::from_secs(5)).await;
    stop(agent);

    // Whatever was still queued goes out with the next start.
    let last = next_seq(&config) - 1;
    let _drain = Agent::spawn(BIN, &drain_config(&pki, broker.port));
    got.drain_until_complete(&mut peer, 1, last).await;
    assert!(
        last > 2_000,
        "expected about 100 points/s for 28 s, got {last}"
    );
    got.assert_first_arrivals_in_order();
    eprintln!("outage: {last} points, {} duplicates", got.duplicates());
}

/// Compact batches (PROTOCOL 14.9) of points reported by exception (14.8), at 100 samples a
/// second, across a broker restart and an agent restart: every point stored arrives, decoded,
/// in order, and no batch is JSON; the capabilities message is deflated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compact_batches_by_exception_lose_nothing_across_broker_and_agent_restarts() {
    let pki = Pki::new();
    let mut broker = Mosquitto::start_with(&pki, true);
    let telemetry = device_topic(DEVICE, "telemetry");
    let capabilities = device_topic(DEVICE, "capabilities");
    let mut peer = Peer::connect_with(
        &pki,
        broker.port,
        PLATFORM_CLIENT,
        &[&telemetry, &capabilities],
        false,
    )
    .await;
    let compact = "encoding = \"compact\"\nreport = \"on-change\"\n";
    let mut cfg = AgentConfig::new(&pki, broker.port, DEVICE);
    cfg.extra_toml =
        hundred_points_per_second().replace("[telemetry]\n", &format!("[telemetry]\n{compact}"));
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(BIN, &config);
    // The capabilities message goes out deflated (PROTOCOL 13) and lists the ten devices.
    let listed = peer
        .expect(&capabilities, WAIT, |m| {
            m.json()["devices"].as_array().map_or(0, Vec::len) == 10
        })
        .await;
    assert_eq!(listed.payload[0], 0x02);
    let mut got = Received::default();
    got.drain(&mut peer, Duration::from_secs(3)).await;
    assert!(got.seqs.len() > 50, "only {} points", got.seqs.len());

    broker.stop_gracefully();
    std::thread::sleep(Duration::from_secs(3));
    broker.restart();
    got.drain(&mut peer, Duration::from_secs(3)).await;
    stop(agent);

    let last = next_seq(&config) - 1;
    let _drain = Agent::spawn(BIN, &drain_config_with(&pki, broker.port, compact));
    got.drain_until_complete(&mut peer, 1, last).await;
    got.assert_first_arrivals_in_order();
    assert!(
        got.encodings.iter().all(|b| [0x03, 0x04].contains(b)),
        "first bytes {:?}",
        got.encodings
    );
    assert!(got.encodings.contains(&0x04), "no batch was deflated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_gaps_after_five_sigkills_mid_stream() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki);
    let telemetry = device_topic(DEVICE, "telemetry");
    let mut peer = Peer::connect(&pki, broker.port, PLATFORM_CLIENT, &[&telemetry]).await;
    let mut cfg = AgentConfig::new(&pki, broker.port, DEVICE);
    cfg.extra_toml = hundred_points_per_second();
    let config = cfg.write(pki.path());
    let mut got = Received::default();
    for round in 0..5 {
        let agent = Agent::spawn(BIN, &config);
        agent.wait_for_log("connected", WAIT);
        got.drain(&mut peer, Duration::from_millis(1_200 + 300 * round))
            .await;
        agent.signal("KILL");
        drop(agent);
    }
    let last = next_seq(&config) - 1;
    let _drain = Agent::spawn(BIN, &drain_config(&pki, broker.port));
    got.drain_until_complete(&mut peer, 1, last).await;
    eprintln!(
        "kills: {last} points, {} duplicates after 5 SIGKILLs",
        got.duplicates()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_outbox_drops_exactly_the_oldest_points_and_reports_them() {
    let pki = Pki::new();
    // No broker yet: everything stays in the 64 KiB outbox, and the oldest must go.
    let port = kit::free_port();
    let mut cfg = AgentConfig::new(&pki, port, DEVICE);
    cfg.extra_toml = hundred_points_per_second()
        .replace("[telemetry]\n", "[telemetry]\noutbox_max_bytes = 65536\n");
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(BIN, &config);
    let deadline = Instant::now() + WAIT;
    while agent
        .logs_with_message("outbox full: oldest points dropped")
        .len()
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "outbox never filled:\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop(agent);
    let out = kit::agent_command(BIN, &config, &["status"]);
    let status = String::from_utf8_lossy(&out.stdout).into_owned();
    let dropped: u64 = status
        .split(" dropped since install")
        .next()
        .and_then(|s| s.rsplit(", ").next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("{status}"));
    assert!(dropped > 0, "{status}");
    let last = next_seq(&config) - 1;

    let broker = Mosquitto::start_on(&pki, port);
    let telemetry = device_topic(DEVICE, "telemetry");
    let mut peer = Peer::connect(&pki, broker.port, PLATFORM_CLIENT, &[&telemetry]).await;
    let _drain = Agent::spawn(BIN, &drain_config(&pki, port));
    let mut got = Received::default();
    got.drain_until_complete(&mut peer, dropped + 1, last).await;
    // Exactly the oldest were dropped: nothing at or below the dropped count ever arrives.
    got.drain(&mut peer, Duration::from_millis(500)).await;
    assert_eq!(
        got.seqs.keys().next(),
        Some(&(dropped + 1)),
        "first delivered point"
    );
    eprintln!(
        "full outbox: {dropped} oldest dropped, {} delivered",
        last - dropped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_outbox_tail_keeps_every_intact_record() {
    let pki = Pki::new();
    let port = kit::free_port();
    let mut cfg = AgentConfig::new(&pki, port, DEVICE);
    cfg.extra_toml = hundred_points_per_second();
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(BIN, &config);
    std::thread::sleep(Duration::from_secs(2));
    stop(agent);
    let last = next_seq(&config) - 1;
    assert!(last > 50);

    // Cut the newest segment in the middle of its last record, as a power cut would.
    let outbox = cfg.state_dir(pki.path()).join("outbox");
    let mut segments: Vec<_> = std::fs::read_dir(&outbox)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segments.sort();
    let newest = segments.last().unwrap();
    let len = std::fs::metadata(newest).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(newest)
        .unwrap()
        .set_len(len - 10)
        .unwrap();

    let broker = Mosquitto::start_on(&pki, port);
    let telemetry = device_topic(DEVICE, "telemetry");
    let mut peer = Peer::connect(&pki, broker.port, PLATFORM_CLIENT, &[&telemetry]).await;
    let drain = Agent::spawn(BIN, &drain_config(&pki, port));
    let recovered = drain.wait_for_log("outbox recovered from an interrupted write", WAIT);
    assert!(recovered["torn_bytes"].as_u64().unwrap() > 0);
    let mut got = Received::default();
    got.drain_until_complete(&mut peer, 1, last - 1).await;
    // The drain agent has no drivers and no health point is due: nothing new is numbered.
    got.drain(&mut peer, Duration::from_millis(500)).await;
    assert!(
        !got.seqs.contains_key(&last),
        "the torn record cannot have been delivered"
    );
}

/// The agent's "data budget: telemetry adjusted" steps so far, in order.
fn budget_steps(agent: &Agent) -> Vec<String> {
    agent
        .logs_with_message("data budget: telemetry adjusted")
        .iter()
        .map(|l| l["step"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// PROTOCOL 14.10 with a 100,000-byte budget and a battery at 5 Hz in JSON (about 1.7 KB/s, so
/// the 5 s counts cannot jump over the 15 KB of the saving step): health reports the
/// month's bytes, telemetry degrades in order (saving from 75 %, exhausted from 100 %) and its
/// batches then wait at least 15 s, a command is still answered at once at 100 %, the count is
/// saved at stop and a restart carries on from it, exhausted from its first moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_data_budget_degrades_telemetry_in_steps_and_never_the_replies() {
    use texture_agent::sim::platform::{AttestedCommand, PlatformSigner};
    const WORKSPACE: &str = "ws-budget";
    let telemetry = device_topic(DEVICE, "telemetry");
    let replies = device_topic(DEVICE, "replies");
    let kit::Testbed {
        pki,
        broker,
        signer,
        mut peer,
    } = kit::Testbed::start(
        PlatformSigner::generate("platform-budget"),
        &[&telemetry, &replies],
    )
    .await;
    let mut cfg = AgentConfig::new(&pki, broker.port, DEVICE).trusting(&signer, WORKSPACE);
    cfg.extra_toml = "[telemetry]\nbatch_max_ms = 200\nhealth_interval_secs = 1\n\
                      monthly_budget_bytes = 100000\n\n\
                      [[drivers]]\nkind = \"simulated\"\ndevice_id = \"bat-1\"\n\
                      device_type = \"battery\"\ninterval_ms = 200\nseed = 3\n"
        .into();
    let config = cfg.write(pki.path());
    let mut agent = Agent::spawn(BIN, &config);

    // Health reports the count from the start, at step normal.
    let health = peer
        .expect(&telemetry, WAIT, |m| {
            m.json()["points"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["health"]["dataUsage"]["sentBytes"].as_u64() > Some(0))
        })
        .await
        .json();
    let usage = health["points"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|p| p["health"].get("dataUsage"))
        .unwrap()
        .clone();
    assert_eq!(usage["budgetBytes"], 100000, "{usage}");
    assert_eq!(usage["step"], "normal", "{usage}");
    assert!(usage["month"].as_str().unwrap().len() == 7, "{usage}");

    // The budget runs out within a minute at this rate.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !budget_steps(&agent).contains(&"exhausted".to_owned()) {
        assert!(
            Instant::now() < deadline,
            "steps so far: {:?}",
            budget_steps(&agent)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let steps = budget_steps(&agent);
    assert_eq!(
        steps.first().map(String::as_str),
        Some("saving"),
        "{steps:?}"
    );
    let order = ["normal", "saving", "strict", "exhausted"];
    let rank = |s: &String| order.iter().position(|o| o == s).unwrap();
    assert!(
        steps.windows(2).all(|w| rank(&w[0]) < rank(&w[1])),
        "{steps:?}"
    );

    // At 100 %, a command is answered as fast as ever.
    let sent = Instant::now();
    peer.send_server_command(
        &signer,
        WORKSPACE,
        AttestedCommand::new(DEVICE, "cmd-budget", "agent:ping", serde_json::json!({})),
    )
    .await;
    let reply = peer.reply(DEVICE, "cmd-budget", WAIT).await;
    assert_eq!(reply["type"], "command.succeeded", "{reply}");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );

    // Telemetry still flows, in batches at least 15 s apart (60 s once exhausted); a first
    // one may have been due already when the step changed.
    peer.forget(&telemetry);
    let batches = peer.collect(&telemetry, Duration::from_secs(16)).await;
    assert!(batches.len() <= 2, "{} batches in 16 s", batches.len());

    agent.signal("TERM");
    assert!(agent.wait_exit(Duration::from_secs(6)).success());
    let status = kit::agent_command(BIN, &config, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("data:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains("of a 100000-byte budget, step exhausted"),
        "{line}"
    );

    // A restart carries on from the saved count: exhausted from the start.
    let agent = Agent::spawn(BIN, &config);
    let first = agent.wait_for_log("data budget: telemetry adjusted", WAIT);
    assert_eq!(first["step"], "exhausted", "{first}");
}
