//! A fleet of agent sessions in one process, against one mosquitto with mutual TLS.
//!
//! Shared by `benches/fleet.rs` (1000 sessions, prints figures and writes JSON) and
//! `tests/fleet.rs` (50 sessions, asserts only).
//!
//! **A session** is one gateway built by the agent's composition root exactly as `agent::run`
//! builds it (`AgentState::open`, `Agent::start`), minus the control socket and systemd: its own
//! device id, client certificate, state directory (outbox, replay journal, trust bundle, device
//! key) and configuration loaded with `config::load_from`, so signed commands really execute and
//! one simulated battery reports every second through the real driver → telemetry → outbox →
//! link path.
//!
//! **The platform** is one MQTT peer with a persistent session (the simulator's
//! [`PlatformPeer`], counting in its event-loop handler): it publishes the retained trust
//! bundle, receives every session's telemetry and replies, and sends signed `agent:ping`s.
//!
//! **The run**: (1) every session starts at once and the fleet connects; (2) steady state at one
//! point per device per second, with sampled ping round trips; (3) the broker is killed
//! (SIGKILL), kept down for an outage and restarted, and the fleet reconnects; (4) the drivers
//! stop, the outboxes drain and every sequence number each gateway ever assigned is checked off
//! against what the platform received.
//!
//! **Why the peer's session survives a SIGKILL.** Before the fleet starts, the broker is stopped
//! gracefully once so that it persists the peer's subscriptions. After the kill it restores them,
//! so points that gateways re-send before the peer itself has reconnected are queued for it
//! rather than dropped: a gap then means the *agent* lost a point, never the test set-up.
//!
//! **Timings come from the agent's own log events.** A tracing subscriber records the link's
//! `connecting` (one per attempt) and `connected` (one per CONNACK) events as they are emitted.
//! The `LinkStatus` watch channels cannot count attempts: they keep only the latest state, and a
//! refused attempt on loopback lasts microseconds. They are used to check the end state.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use texture_agent::agent::service::{self, Shutdown};
use texture_agent::agent::{Agent, AgentState};
use texture_agent::config::Settings;
use texture_agent::inbound::pairing::control::ControlCall;
use texture_agent::link::{LinkState, LinkStatus};
use texture_agent::model::clock::system_millis;
use texture_agent::sim::peer::{PeerEvent, PeerOptions, PlatformPeer, Seen};
use texture_agent::sim::platform::{ApiKey, AttestedCommand, PlatformSigner};
use texture_agent::telemetry::outbox::OutboxStats;

use crate::agent::AgentConfig;
use crate::mosquitto::{Mosquitto, PLATFORM_CLIENT};
use crate::pki::Pki;
use crate::platform::device_topic;
use crate::procfs::{cpu_seconds, proc_status_kib};

const WORKSPACE: &str = "ws-fleet";

/// What to run. Every field has a `FLEET_*` environment override
/// (see [`FleetConfig::with_env_overrides`]).
#[derive(Debug, Clone, Serialize)]
pub struct FleetConfig {
    /// Sessions (gateways). `FLEET_SIZE`.
    pub size: usize,
    /// Steady-state window. `FLEET_STEADY_SECS`.
    pub steady_secs: u64,
    /// Pings sent, spread over the steady window, each to a different gateway. `FLEET_PINGS`.
    pub pings: usize,
    /// How long the broker stays down. `FLEET_OUTAGE_MS`.
    pub outage_ms: u64,
    /// Traffic kept running after the fleet has reconnected. `FLEET_AFTER_SECS`.
    pub after_secs: u64,
    /// `broker.backoff_min_ms` / `backoff_max_ms`. `FLEET_BACKOFF_MIN_MS`, `FLEET_BACKOFF_MAX_MS`.
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    /// `broker.keepalive_secs`. `FLEET_KEEPALIVE_SECS`.
    pub keepalive_secs: u64,
    /// `broker.connect_timeout_secs`. `FLEET_CONNECT_TIMEOUT_SECS`.
    pub connect_timeout_secs: u64,
    /// Where the sessions' state directories go. `FLEET_STATE_DIR`. Defaults to /dev/shm:
    /// a real gateway has its own flash, while 1000 simulated ones fsyncing their outboxes
    /// every second on one VM disk would measure that disk, not the agent or the broker.
    pub state_root: PathBuf,
    /// How long each phase may take before the run gives up. `FLEET_TIMEOUT_SECS`.
    pub timeout_secs: u64,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

impl FleetConfig {
    /// Production link settings (1 s … 60 s backoff, 30 s keepalive, 10 s connect timeout).
    pub fn production(size: usize) -> FleetConfig {
        let shm = Path::new("/dev/shm");
        FleetConfig {
            size,
            steady_secs: 20,
            pings: 200,
            outage_ms: 5_000,
            after_secs: 3,
            backoff_min_ms: 1_000,
            backoff_max_ms: 60_000,
            keepalive_secs: 30,
            connect_timeout_secs: 10,
            state_root: if shm.is_dir() {
                shm.to_owned()
            } else {
                std::env::temp_dir()
            },
            timeout_secs: 180,
        }
    }

    /// `self` with every `FLEET_*` variable that is set applied.
    pub fn with_env_overrides(self) -> FleetConfig {
        FleetConfig {
            size: env_or("FLEET_SIZE", self.size),
            steady_secs: env_or("FLEET_STEADY_SECS", self.steady_secs),
            pings: env_or("FLEET_PINGS", self.pings),
            outage_ms: env_or("FLEET_OUTAGE_MS", self.outage_ms),
            after_secs: env_or("FLEET_AFTER_SECS", self.after_secs),
            backoff_min_ms: env_or("FLEET_BACKOFF_MIN_MS", self.backoff_min_ms),
            backoff_max_ms: env_or("FLEET_BACKOFF_MAX_MS", self.backoff_max_ms),
            keepalive_secs: env_or("FLEET_KEEPALIVE_SECS", self.keepalive_secs),
            connect_timeout_secs: env_or("FLEET_CONNECT_TIMEOUT_SECS", self.connect_timeout_secs),
            state_root: env_or("FLEET_STATE_DIR", self.state_root),
            timeout_secs: env_or("FLEET_TIMEOUT_SECS", self.timeout_secs),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's log events, recorded.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkEvent {
    Connecting,
    Connected,
}

/// Records the link's `connecting`/`connected` events with their time, and counts every other
/// event at INFO or above by level and message (for the report: refusals, dropped messages...).
struct Recorder {
    link: Mutex<Vec<(Instant, LinkEvent)>>,
    counts: Mutex<BTreeMap<String, u64>>,
}

struct RecorderSubscriber(&'static Recorder);

struct MessageField(Option<String>);

impl tracing::field::Visit for MessageField {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = Some(value.to_owned());
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = Some(format!("{value:?}"));
        }
    }
}

impl tracing::Subscriber for RecorderSubscriber {
    fn register_callsite(
        &self,
        metadata: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        if self.enabled(metadata) {
            tracing::subscriber::Interest::always()
        } else {
            tracing::subscriber::Interest::never()
        }
    }
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        metadata.is_event() && *metadata.level() <= tracing::Level::INFO
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::INFO)
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let at = Instant::now();
        let mut message = MessageField(None);
        event.record(&mut message);
        let message = message.0.unwrap_or_default();
        let metadata = event.metadata();
        // The platform peer's own events are the test set-up's, not the agent's.
        if metadata.target().starts_with("texture_agent::sim") {
            return;
        }
        if metadata.target() == "texture_agent::link" {
            let kind = match message.as_str() {
                "connecting" => Some(LinkEvent::Connecting),
                "connected" => Some(LinkEvent::Connected),
                _ => None,
            };
            if let Some(kind) = kind {
                self.0.link.lock().unwrap().push((at, kind));
                return;
            }
        }
        *self
            .0
            .counts
            .lock()
            .unwrap()
            .entry(format!("{} {message}", metadata.level()))
            .or_default() += 1;
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// The process-wide recorder, installed as the global tracing subscriber on first use.
fn recorder() -> &'static Recorder {
    static RECORDER: OnceLock<&'static Recorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let r: &'static Recorder = Box::leak(Box::new(Recorder {
            link: Mutex::new(Vec::new()),
            counts: Mutex::new(BTreeMap::new()),
        }));
        tracing::subscriber::set_global_default(RecorderSubscriber(r))
            .expect("no other global tracing subscriber in the fleet process");
        r
    })
}

impl Recorder {
    /// Times (since `from`) of `kind` events at or after `from`.
    fn since(&self, from: Instant, kind: LinkEvent) -> Vec<Duration> {
        let mut out: Vec<Duration> = self
            .link
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, k)| *k == kind && *at >= from)
            .map(|(at, _)| *at - from)
            .collect();
        out.sort();
        out
    }

    fn count(&self, key: &str) -> u64 {
        self.counts.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

// ---------------------------------------------------------------------------------------------
// The platform peer.

#[derive(Deserialize)]
struct BatchMeta {
    #[serde(rename = "gatewayId")]
    gateway_id: String,
    points: Vec<PointMeta>,
}

#[derive(Deserialize)]
struct PointMeta {
    seq: u64,
    ts: u64,
}

#[derive(Deserialize)]
struct ReplyMeta {
    #[serde(rename = "type")]
    kind: String,
    #[serde(rename = "commandId")]
    command_id: Option<String>,
}

/// What the platform has heard.
#[derive(Default)]
struct Heard {
    /// Per gateway: how often each sequence number arrived (index = seq).
    seqs: HashMap<String, Vec<u32>>,
    points: u64,
    /// While set, each point's append → receipt latency is recorded.
    measuring: bool,
    latency_ms: Vec<f64>,
    /// Pings sent (command id → when) and their replies (command id → round trip, succeeded).
    pings_sent: HashMap<String, Instant>,
    replies: HashMap<String, (Duration, bool)>,
    connacks: u32,
    pubacks: u32,
}

/// The platform: a [`PlatformPeer`] whose handler counts what it hears.
struct Platform {
    peer: PlatformPeer,
    heard: Arc<Mutex<Heard>>,
}

/// The TLS settings of an agent configuration for `device_id`, built the agent's way.
fn settings_for(cfg: &AgentConfig, dir: &Path) -> Settings {
    let path = cfg.write(dir);
    texture_agent::config::load_from(&path, std::iter::empty()).expect("fleet configuration")
}

impl Platform {
    /// Connects with a persistent session and subscribes to every gateway's telemetry and
    /// replies; returns once the subscription is acknowledged.
    async fn connect(pki: &Pki, port: u16) -> Platform {
        let mut options = PeerOptions::new(
            PLATFORM_CLIENT,
            port,
            &pki.ca.cert_path(),
            pki.ca.client(PLATFORM_CLIENT),
        )
        .subscribe("texture/v1/devices/+/telemetry")
        .subscribe("texture/v1/devices/+/replies");
        options.clean_session = false;
        options.queue = 4096;
        let heard = Arc::new(Mutex::new(Heard::default()));
        let h = heard.clone();
        let peer = PlatformPeer::connect(options, move |event| on_event(&h, event))
            .await
            .expect("platform peer connects");
        Platform { peer, heard }
    }

    async fn wait_until(&self, timeout: Duration, done: impl Fn(&Heard) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(&self.heard.lock().unwrap()) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Sends a signed `agent:ping` to `gateway`, noting when.
    async fn ping(&self, signer: &PlatformSigner, gateway: &str, command_id: &str) {
        let now = system_millis() / 1000;
        let key = ApiKey::server("key-fleet", WORKSPACE);
        let claims = signer.claims(
            &key,
            AttestedCommand::new(gateway, command_id, "agent:ping", serde_json::json!({})),
            now,
            300,
        );
        let token = signer.attest(&claims);
        self.heard
            .lock()
            .unwrap()
            .pings_sent
            .insert(command_id.to_owned(), Instant::now());
        self.peer
            .publish(device_topic(gateway, "commands"), token, false)
            .await
            .unwrap();
    }
}

/// Runs in the peer's event-loop task, so it never awaits the client (see `link`'s module docs).
fn on_event(heard: &Mutex<Heard>, event: PeerEvent) {
    let mut h = heard.lock().unwrap();
    match event {
        PeerEvent::Connected { .. } => h.connacks += 1,
        PeerEvent::Acknowledged => h.pubacks += 1,
        PeerEvent::Message(p) if p.topic.ends_with("/telemetry") => on_telemetry(&mut h, &p),
        PeerEvent::Message(p) if p.topic.ends_with("/replies") => {
            let reply: ReplyMeta = serde_json::from_slice(&p.payload).expect("reply");
            let Some(id) = reply.command_id else { return };
            if let Some(sent) = h.pings_sent.get(&id).copied() {
                let ok = reply.kind == "command.succeeded";
                h.replies.entry(id).or_insert((sent.elapsed(), ok));
            }
        }
        PeerEvent::Subscribed | PeerEvent::Message(_) => {}
    }
}

fn on_telemetry(h: &mut Heard, p: &Seen) {
    let batch: BatchMeta = serde_json::from_slice(&p.payload).expect("telemetry batch");
    let now = system_millis();
    let measuring = h.measuring;
    let mut latencies = Vec::new();
    let seqs = h.seqs.entry(batch.gateway_id).or_default();
    for point in &batch.points {
        let seq = point.seq as usize;
        if seqs.len() <= seq {
            seqs.resize(seq + 1, 0);
        }
        seqs[seq] += 1;
        if measuring {
            latencies.push(now.saturating_sub(point.ts) as f64);
        }
    }
    h.points += batch.points.len() as u64;
    h.latency_ms.extend(latencies);
}

// ---------------------------------------------------------------------------------------------
// Sessions.

/// Everything a session needs before it connects, opened by the agent's own composition root.
struct Prepared {
    settings: Settings,
    state: AgentState,
}

/// A running session.
struct Session {
    id: String,
    agent: Agent,
    status: watch::Receiver<LinkStatus>,
    outbox: watch::Receiver<OutboxStats>,
    /// Kept so the router's control-call branch stays open, as the control socket keeps it.
    _calls: mpsc::Sender<ControlCall>,
}

fn gateway_id(i: usize) -> String {
    format!("fleet-{i:05}")
}

/// Issues the session's certificate, writes and loads its configuration, opens its state.
fn prepare(
    pki: &Pki,
    port: u16,
    i: usize,
    root_key: &str,
    dir: &Path,
    cfg: &FleetConfig,
) -> Prepared {
    let id = gateway_id(i);
    let mut agent = AgentConfig::new(pki, port, &id);
    agent.trust_root = Some(root_key.to_owned());
    agent.workspace_id = Some(WORKSPACE.into());
    agent.backoff_min_ms = cfg.backoff_min_ms;
    agent.backoff_max_ms = cfg.backoff_max_ms;
    agent.extra_toml = format!(
        "[[drivers]]\nkind = \"simulated\"\ndevice_id = \"{id}-bat\"\ndevice_type = \"battery\"\n\
         interval_ms = 1000\nseed = {i}\n"
    );
    let mut settings = settings_for(&agent, dir);
    // The harness's fast-test link settings, back to production (or the configured) values.
    settings.broker.keepalive_secs = cfg.keepalive_secs;
    settings.broker.connect_timeout_secs = cfg.connect_timeout_secs;

    let state = AgentState::open(&settings).expect("session state opens");
    Prepared { settings, state }
}

/// Starts one session with `Agent::start`, exactly as `agent::run` starts the daemon.
fn start(p: Prepared, shutdown: &Shutdown) -> Session {
    let (calls_tx, calls_rx) = mpsc::channel(8);
    let agent =
        Agent::start(&p.settings, p.state, shutdown.clone(), calls_rx).expect("session starts");
    Session {
        id: p.settings.device.id.to_string(),
        status: agent.link_status(),
        outbox: agent.outbox_stats(),
        agent,
        _calls: calls_tx,
    }
}

// ---------------------------------------------------------------------------------------------
// Figures.

/// p50/p99/max of a sample, in its unit.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Spread {
    pub count: usize,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        if values.is_empty() {
            return Spread::default();
        }
        values.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let at =
            |p: f64| values[((values.len() as f64 * p).ceil() as usize).clamp(1, values.len()) - 1];
        Spread {
            count: values.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: *values.last().unwrap(),
        }
    }
}

/// Connection attempts per 100 ms, and when given shares of the fleet had connected.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnectWave {
    /// `connecting` events (attempts) in each 100 ms bucket, from the phase's start.
    pub attempts_per_100ms: Vec<u32>,
    pub attempts: usize,
    pub connects: usize,
    /// From the phase's start until 50 %, 99 % and 100 % of the sessions had connected, ms.
    pub ms_to_50pct: f64,
    pub ms_to_99pct: f64,
    pub ms_to_100pct: f64,
}

impl ConnectWave {
    fn since(from: Instant, size: usize) -> ConnectWave {
        let r = recorder();
        let attempts = r.since(from, LinkEvent::Connecting);
        let connects = r.since(from, LinkEvent::Connected);
        let mut buckets = vec![
            0u32;
            attempts
                .last()
                .map_or(0, |d| d.as_millis() as usize / 100 + 1)
        ];
        for a in &attempts {
            buckets[a.as_millis() as usize / 100] += 1;
        }
        // The n-th CONNACK; with every session connecting once, the time n sessions were up.
        let nth = |share: f64| {
            let n = ((size as f64 * share).ceil() as usize).max(1);
            connects
                .get(n - 1)
                .map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
        };
        ConnectWave {
            attempts_per_100ms: buckets,
            attempts: attempts.len(),
            connects: connects.len(),
            ms_to_50pct: nth(0.50),
            ms_to_99pct: nth(0.99),
            ms_to_100pct: nth(1.0),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Steady {
    pub secs: f64,
    /// Points the platform received in the window, per device per second (goal: 1.0).
    pub points_per_device_per_s: f64,
    /// Signed `agent:ping`: platform publish → reply received by the platform, ms.
    pub ping_round_trip_ms: Spread,
    pub pings_unanswered: usize,
    pub pings_failed: usize,
    /// A point's append to the outbox → its receipt by the platform, ms (includes the
    /// `batch_max_ms` wait, 1 s by default).
    pub telemetry_latency_ms: Spread,
    /// CPU used by the whole fleet process (all sessions and the peer), % of one core.
    pub process_cpu_pct: f64,
    pub process_rss_kib: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Delivery {
    /// Sequence numbers assigned by all outboxes together.
    pub points_assigned: u64,
    pub points_received: u64,
    /// Assigned but never received, summed over gateways (must be 0).
    pub gaps: u64,
    pub gateways_with_gaps: usize,
    /// Received more than once (re-sends after the outage; allowed).
    pub duplicates: u64,
    /// Points the outboxes dropped for being full (must be 0).
    pub dropped_by_outbox: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetReport {
    pub agent_version: String,
    pub git_commit: String,
    pub unix_time: u64,
    pub cores: usize,
    pub config: Option<FleetConfig>,
    /// Certificates issued, configurations loaded and state opened for every session, ms.
    pub prepare_ms: f64,
    /// Every session started at once: connection attempts and time to connect.
    pub startup: ConnectWave,
    pub steady: Steady,
    /// From the SIGKILL: attempts per 100 ms and time until the fleet was back.
    pub restart: ConnectWave,
    /// When the restarted broker accepted connections again, ms after the kill.
    pub broker_back_ms: f64,
    /// Sessions connected once everything settled (must equal the size).
    pub sessions_connected_at_end: usize,
    pub delivery: Delivery,
    /// Time for every session's clean shutdown (offline status, DISCONNECT), ms.
    pub shutdown_ms: f64,
    pub process_peak_rss_kib: u64,
    /// Agent log events at INFO or above, by level and message (minus connecting/connected).
    pub log_events: BTreeMap<String, u64>,
}

/// Raises the open-file limit to its hard maximum: every session holds a socket, its outbox
/// segment and its replay journal, and the broker (a child) inherits the limit too.
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn git_commit() -> String {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = run(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty =
        run(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    if dirty {
        format!("{head}-dirty")
    } else {
        head
    }
}

async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "fleet: timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn connected(s: &Session) -> bool {
    matches!(s.status.borrow().state, LinkState::Connected)
}

/// Runs the whole scenario; `progress` receives one line per phase. Panics (with a reason) if a
/// phase does not complete within `cfg.timeout_secs`; the caller asserts on the report.
pub async fn run(cfg: FleetConfig, progress: impl Fn(&str)) -> FleetReport {
    let rec = recorder();
    raise_fd_limit();
    texture_agent::link::tls::install_default_provider();
    let timeout = Duration::from_secs(cfg.timeout_secs);
    let n = cfg.size;
    let mut report = FleetReport {
        agent_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: git_commit(),
        unix_time: system_millis() / 1000,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        config: Some(cfg.clone()),
        ..FleetReport::default()
    };

    // The broker, and a platform peer whose subscriptions the broker has persisted.
    let pki = Pki::new();
    let mut broker = Mosquitto::start_with(&pki, true);
    let signer = PlatformSigner::generate("platform-fleet");
    let peer = Platform::connect(&pki, broker.port).await;
    let now = system_millis() / 1000;
    peer.peer
        .publish_trust_bundle(signer.trust_bundle(1, now, now + 86_400, &[]))
        .await
        .unwrap();
    assert!(
        peer.wait_until(timeout, |h| h.pubacks >= 1).await,
        "trust bundle acknowledged"
    );
    tokio::task::block_in_place(|| {
        broker.stop_gracefully();
        broker.restart();
    });
    assert!(
        peer.wait_until(timeout, |h| h.connacks >= 2).await,
        "platform peer back after the broker's first restart"
    );

    // Prepare every session, then start them all at once.
    let dir = tempfile::Builder::new()
        .prefix("texture-fleet-")
        .tempdir_in(&cfg.state_root)
        .unwrap();
    let t = Instant::now();
    let root_key = signer.root_public_key();
    let prepared: Vec<Prepared> = tokio::task::block_in_place(|| {
        (0..n)
            .map(|i| prepare(&pki, broker.port, i, &root_key, dir.path(), &cfg))
            .collect()
    });
    report.prepare_ms = t.elapsed().as_secs_f64() * 1000.0;
    progress(&format!(
        "prepared {n} sessions in {:.1} s",
        report.prepare_ms / 1000.0
    ));

    let (trigger, shutdown) = service::shutdown_channel();
    let t_start = Instant::now();
    let sessions: Vec<Session> = prepared.into_iter().map(|p| start(p, &shutdown)).collect();
    wait_for("every session to connect", timeout, || {
        sessions.iter().all(connected)
    })
    .await;
    // CONNACK events are emitted before the status changes, so all N are recorded by now.
    report.startup = ConnectWave::since(t_start, n);
    progress(&format!(
        "startup: {} attempts, 100 % connected after {:.0} ms",
        report.startup.attempts, report.startup.ms_to_100pct
    ));
    wait_for("every session to accept the trust bundle", timeout, || {
        rec.count("INFO trust bundle accepted") >= n as u64
    })
    .await;

    // Steady state: one point per device per second, pings spread over the window.
    let steady = Duration::from_secs(cfg.steady_secs);
    let points_before = {
        let mut h = peer.heard.lock().unwrap();
        h.measuring = true;
        h.points
    };
    let cpu_before = cpu_seconds("self");
    let t_steady = Instant::now();
    let pings = cfg.pings.min(n);
    for k in 0..pings {
        let at = t_steady + steady.mul_f64(k as f64 / pings.max(1) as f64);
        tokio::time::sleep_until(at.into()).await;
        let gateway = &sessions[k * n / pings].id;
        peer.ping(&signer, gateway, &format!("ping-{k}")).await;
    }
    tokio::time::sleep_until((t_steady + steady).into()).await;
    let window = t_steady.elapsed().as_secs_f64();
    let cpu = cpu_seconds("self") - cpu_before;
    peer.wait_until(Duration::from_secs(10), |h| h.replies.len() >= pings)
        .await;
    {
        let mut h = peer.heard.lock().unwrap();
        h.measuring = false;
        report.steady = Steady {
            secs: window,
            points_per_device_per_s: (h.points - points_before) as f64 / n as f64 / window,
            ping_round_trip_ms: Spread::of(
                h.replies
                    .values()
                    .map(|(rtt, _)| rtt.as_secs_f64() * 1000.0)
                    .collect(),
            ),
            pings_unanswered: pings - h.replies.len(),
            pings_failed: h.replies.values().filter(|(_, ok)| !ok).count(),
            telemetry_latency_ms: Spread::of(std::mem::take(&mut h.latency_ms)),
            process_cpu_pct: cpu / window * 100.0,
            process_rss_kib: proc_status_kib("self", "VmRSS:"),
        };
    }
    progress(&format!(
        "steady: {:.2} points/device/s, ping p50 {:.1} ms p99 {:.1} ms",
        report.steady.points_per_device_per_s,
        report.steady.ping_round_trip_ms.p50,
        report.steady.ping_round_trip_ms.p99
    ));

    // Kill the broker, keep it down, restart it; the fleet must come back by itself.
    let connects_before: Vec<u64> = sessions
        .iter()
        .map(|s| s.status.borrow().connects)
        .collect();
    let t_kill = Instant::now();
    tokio::task::block_in_place(|| broker.stop());
    tokio::time::sleep(Duration::from_millis(cfg.outage_ms)).await;
    tokio::task::block_in_place(|| broker.restart());
    report.broker_back_ms = t_kill.elapsed().as_secs_f64() * 1000.0;
    wait_for(
        "every session to reconnect after the broker restart",
        timeout,
        || {
            sessions
                .iter()
                .zip(&connects_before)
                .all(|(s, &c)| connected(s) && s.status.borrow().connects > c)
        },
    )
    .await;
    report.restart = ConnectWave::since(t_kill, n);
    progress(&format!(
        "restart: broker back after {:.0} ms, {} attempts, 99 % after {:.0} ms, 100 % after {:.0} ms",
        report.broker_back_ms,
        report.restart.attempts,
        report.restart.ms_to_99pct,
        report.restart.ms_to_100pct
    ));
    tokio::time::sleep(Duration::from_secs(cfg.after_secs)).await;

    // Stop sampling, let every outbox drain, and check every sequence number off.
    for s in &sessions {
        s.agent.halt_drivers();
    }
    // A sample already in a channel is still appended; give it a moment to land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    wait_for("every outbox to drain", timeout, || {
        sessions.iter().all(|s| s.outbox.borrow().depth == 0)
    })
    .await;
    let last_seqs: Vec<(String, u64, u64)> = sessions
        .iter()
        .map(|s| {
            let o = *s.outbox.borrow();
            (s.id.clone(), o.next_seq - 1, o.dropped)
        })
        .collect();
    let complete = |h: &Heard| {
        last_seqs.iter().all(|(id, last, _)| {
            h.seqs.get(id).is_some_and(|seen| {
                (1..=*last as usize).all(|s| seen.get(s).is_some_and(|&c| c > 0))
            })
        })
    };
    peer.wait_until(Duration::from_secs(15), complete).await;
    {
        let h = peer.heard.lock().unwrap();
        let mut d = Delivery::default();
        for (id, last, dropped) in &last_seqs {
            let seen = h.seqs.get(id).map(Vec::as_slice).unwrap_or(&[]);
            let missing = (1..=*last as usize)
                .filter(|&s| seen.get(s).is_none_or(|&c| c == 0))
                .count() as u64;
            d.points_assigned += last;
            d.points_received += seen.iter().filter(|&&c| c > 0).count() as u64;
            d.duplicates += seen
                .iter()
                .map(|&c| c.saturating_sub(1) as u64)
                .sum::<u64>();
            d.gaps += missing;
            d.gateways_with_gaps += usize::from(missing > 0);
            d.dropped_by_outbox += dropped;
        }
        report.delivery = d;
    }
    report.sessions_connected_at_end = sessions.iter().filter(|s| connected(s)).count();
    progress(&format!(
        "delivery: {} points assigned, {} gaps, {} duplicates",
        report.delivery.points_assigned, report.delivery.gaps, report.delivery.duplicates
    ));

    // Clean shutdown, as the daemon does it: outbox made durable, then the link.
    let t_stop = Instant::now();
    trigger.trigger();
    let mut stopping = tokio::task::JoinSet::new();
    for s in sessions {
        stopping.spawn(async move {
            s.agent.stop().await;
        });
    }
    while stopping.join_next().await.is_some() {}
    report.shutdown_ms = t_stop.elapsed().as_secs_f64() * 1000.0;
    report.process_peak_rss_kib = proc_status_kib("self", "VmHWM:");
    report.log_events = rec
        .counts
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    drop(peer);
    drop(broker);
    report
}

/// The report as a table, for people.
pub fn summary(r: &FleetReport) -> String {
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<44} {v}\n"));
    let size = r.config.as_ref().map_or(0, |c| c.size);
    line("sessions", size.to_string());
    line("cores", r.cores.to_string());
    line("agent", format!("{} ({})", r.agent_version, r.git_commit));
    line(
        "prepare (certs, configs, state), s",
        format!("{:.1}", r.prepare_ms / 1000.0),
    );
    let wave = |w: &ConnectWave| {
        format!(
            "50 % {:.0} ms, 99 % {:.0} ms, 100 % {:.0} ms; {} attempts, peak {} per 100 ms",
            w.ms_to_50pct,
            w.ms_to_99pct,
            w.ms_to_100pct,
            w.attempts,
            w.attempts_per_100ms.iter().max().copied().unwrap_or(0)
        )
    };
    line("startup: all sessions at once", wave(&r.startup));
    let s = &r.steady;
    line(
        "steady: points per device per second",
        format!("{:.3} over {:.1} s", s.points_per_device_per_s, s.secs),
    );
    let spread = |x: &Spread| {
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n = {})",
            x.p50, x.p99, x.max, x.count
        )
    };
    line(
        "steady: agent:ping round trip",
        spread(&s.ping_round_trip_ms),
    );
    line(
        "steady: pings unanswered / failed",
        format!("{} / {}", s.pings_unanswered, s.pings_failed),
    );
    line(
        "steady: telemetry append → platform",
        spread(&s.telemetry_latency_ms),
    );
    line(
        "steady: fleet process CPU, RSS",
        format!(
            "{:.1} % of a core, {:.1} MiB ({:.0} KiB per session)",
            s.process_cpu_pct,
            s.process_rss_kib as f64 / 1024.0,
            s.process_rss_kib as f64 / size.max(1) as f64
        ),
    );
    line(
        "restart: broker accepting again after kill",
        format!("{:.0} ms", r.broker_back_ms),
    );
    line("restart: from the kill", wave(&r.restart));
    line(
        "restart: attempts per 100 ms (non-empty)",
        histogram(&r.restart.attempts_per_100ms),
    );
    line(
        "sessions connected at the end",
        format!("{} / {size}", r.sessions_connected_at_end),
    );
    let d = &r.delivery;
    line(
        "delivery: assigned / received / gaps / dups",
        format!(
            "{} / {} / {} (on {} gateways) / {}",
            d.points_assigned, d.points_received, d.gaps, d.gateways_with_gaps, d.duplicates
        ),
    );
    line(
        "delivery: dropped by full outboxes",
        d.dropped_by_outbox.to_string(),
    );
    line(
        "shutdown of every session, ms",
        format!("{:.0}", r.shutdown_ms),
    );
    line(
        "fleet process peak RSS",
        format!("{:.1} MiB", r.process_peak_rss_kib as f64 / 1024.0),
    );
    for (k, v) in &r.log_events {
        line(&format!("log: {k}"), v.to_string());
    }
    out
}

/// `t=1.0s:1000 t=2.3s:12 ...` for the non-empty 100 ms buckets.
pub fn histogram(buckets: &[u32]) -> String {
    buckets
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(i, c)| format!("{:.1}s:{c}", i as f64 / 10.0))
        .collect::<Vec<_>>()
        .join(" ")
}
