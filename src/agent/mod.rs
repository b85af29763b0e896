//! The composition root: the one place that builds the agent's pieces from [`Settings`] and
//! connects their channels.
//!
//! ```text
//! inbound:  link ──► router ──► auth ──► commands ──► drivers ──► reply via link
//! outbound: drivers ──► telemetry ──► outbox ──► link
//! ```
//!
//! [`AgentState::open`] reads everything durable (trust store and replay journal, device key,
//! pairing state, outbox) and fails with a message naming what could not be opened;
//! [`Agent::start`] spawns the tasks on the current runtime; [`Agent::stop`] takes them down in
//! the order that loses nothing. `agent::run` adds only what belongs to the host (signals,
//! systemd, `status.json`, the control socket), and the fleet bench builds its thousand sessions
//! with the same two calls, so what it measures is what the daemon runs.

pub mod identity;
pub(crate) mod logging;
pub(crate) mod run;
pub mod service;
pub(crate) mod status;

use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::agent::service::Shutdown;
use crate::config::Settings;
use crate::inbound::auth::{Authorizer, AuthorizerConfig};
use crate::inbound::pairing::control::ControlCall;
use crate::inbound::pairing::session::PairingSession;
use crate::inbound::pairing::PairingState;
use crate::inbound::router::{Router, RouterParts};
use crate::inbound::safety::{Safety, SafetyState};
use crate::link::{Link, LinkStatus};
use crate::model::clock::Clock;
use crate::telemetry::outbox::{Outbox, OutboxStats};
use crate::telemetry::Telemetry;

/// How long a graceful shutdown may take in total; systemd's `TimeoutStopSec` must be larger.
pub const SHUTDOWN_BUDGET: Duration = Duration::from_secs(4);
/// How long the telemetry task may take to make the outbox durable at a stop.
const TELEMETRY_STOP_BUDGET: Duration = Duration::from_secs(1);

/// Everything durable the agent needs before it connects, opened from the state directory.
pub struct AgentState {
    /// `None` without a `[trust]` section: every command is then refused.
    authorizer: Option<Authorizer>,
    /// Commands the last run left unfinished, reported `interrupted` once the link is up.
    interrupted: Vec<String>,
    device_key: ed25519_dalek::SigningKey,
    pairing: PairingState,
    outbox: Outbox,
    /// Holds and fail-safe as the last run left them.
    safety: SafetyState,
    /// The one clock; its floor is raised by the authorizer from platform-signed times.
    clock: Clock,
}

impl AgentState {
    /// Creates the state directories if needed and opens what they hold.
    pub fn open(settings: &Settings) -> anyhow::Result<AgentState> {
        crate::storage::ensure_dir(&settings.state.dir).context("state.dir")?;
        crate::storage::ensure_dir(&settings.state.runtime_dir).context("state.runtime_dir")?;
        let (authorizer, interrupted) = open_authorizer(settings)?;
        let device_key =
            crate::agent::identity::load_or_create(&settings.state.dir).context("device key")?;
        let pairing = PairingState::open(
            &settings.state.dir,
            settings.device.id.as_str(),
            settings.pairing.code_ttl_secs,
        )
        .context("reading the pairing state")?;
        let (outbox, recovery) = Outbox::open(
            &settings.state.dir.join("outbox"),
            settings.telemetry.outbox_max_bytes,
        )
        .context("opening the outbox")?;
        if recovery.torn_bytes > 0 || recovery.corrupt_records > 0 {
            tracing::warn!(
                torn_bytes = recovery.torn_bytes,
                corrupt_records = recovery.corrupt_records,
                intact_records = recovery.records,
                "outbox recovered from an interrupted write"
            );
        }
        let safety = SafetyState::open(&settings.state.dir)
            .context("reading the holds and fail-safe state")?;
        let clock = authorizer
            .as_ref()
            .map(Authorizer::clock)
            .unwrap_or_default();
        Ok(AgentState {
            clock,
            authorizer,
            interrupted,
            device_key,
            pairing,
            outbox,
            safety,
        })
    }
}

impl AgentState {
    /// The agent's one clock (see `model::clock`).
    pub fn clock(&self) -> Clock {
        self.clock.clone()
    }
}

/// Builds the authorizer from the `[trust]` settings; `None` when trust is not configured.
/// Also returns the ids of commands the last run left unfinished.
fn open_authorizer(settings: &Settings) -> anyhow::Result<(Option<Authorizer>, Vec<String>)> {
    let Some(trust) = &settings.trust else {
        tracing::warn!("no [trust] section: every command will be refused as unverifiable");
        return Ok((None, Vec::new()));
    };
    let root = crate::inbound::auth::jws::public_key_from_base64(&trust.root_public_key)
        .map_err(|problem| anyhow::anyhow!("trust.root_public_key: {problem}"))?;
    let config = AuthorizerConfig {
        device_id: settings.device.id.to_string(),
        workspace_id: settings.device.workspace_id.clone(),
        root,
        issuer: trust.issuer.clone(),
        skew: trust.max_clock_skew_secs,
        replay_capacity: trust.replay_capacity,
    };
    let (authorizer, report) =
        Authorizer::open(config, &settings.state.dir).context("opening the replay journal")?;
    Ok((Some(authorizer), report.interrupted))
}

/// The running agent: its link and the tasks of both data paths.
pub struct Agent {
    link: Link,
    telemetry: JoinHandle<Outbox>,
    router: JoinHandle<()>,
    drivers: Vec<JoinHandle<()>>,
    outbox_stats: watch::Receiver<OutboxStats>,
}

impl Agent {
    /// Opens the state and starts the agent: [`AgentState::open`] then [`Agent::start`].
    pub fn build(
        settings: &Settings,
        shutdown: Shutdown,
        calls: mpsc::Receiver<ControlCall>,
    ) -> anyhow::Result<Agent> {
        let state = AgentState::open(settings)?;
        Agent::start(settings, state, shutdown, calls)
    }

    /// Starts the link, the drivers, telemetry and the inbound router on the current runtime.
    /// `calls` are the control socket's requests (`pair`); `shutdown` stops every task.
    pub fn start(
        settings: &Settings,
        state: AgentState,
        shutdown: Shutdown,
        calls: mpsc::Receiver<ControlCall>,
    ) -> anyhow::Result<Agent> {
        let mut link = Link::start(settings, shutdown.clone(), state.clock.clone())?;
        // Outbound path: drivers → telemetry → outbox → link.
        let (samples_tx, samples_rx) = mpsc::channel(crate::drivers::SAMPLE_QUEUE);
        let sandbox = crate::drivers::process::DriverSandbox::from_settings(settings);
        let (availability_tx, availability_rx) = mpsc::channel(crate::drivers::SAMPLE_QUEUE);
        let (registry, driver_health, drivers) = crate::drivers::start(
            &settings.drivers,
            &sandbox,
            &samples_tx,
            &availability_tx,
            &shutdown,
        );
        drop(samples_tx);
        drop(availability_tx);
        let (telemetry, outbox_stats) = Telemetry::new(
            settings.device.id.as_str(),
            &settings.telemetry,
            &link,
            state.outbox,
            &settings.state.dir,
            state.clock.clone(),
        );
        let (safety_tx, safety_rx) = mpsc::channel(crate::inbound::safety::EVENT_QUEUE);
        let telemetry = telemetry
            .with_meter(settings.broker.port)
            .with_driver_health(driver_health)
            .with_safety_events(safety_rx)
            .with_availability(availability_rx);
        let telemetry = tokio::spawn(telemetry.run(samples_rx, shutdown.clone()));
        // Inbound path: link → router → auth → commands → drivers → reply via link.
        let inbound = link.take_inbound().expect("inbound taken once");
        let shed = link.take_shed().expect("shed taken once");
        let gateway_id = settings.device.id.as_str();
        let pairing = PairingSession::new(
            state.pairing,
            gateway_id,
            state.device_key,
            &settings.pairing.qr_uri,
        );
        let router = Router::new(RouterParts {
            gateway_id: gateway_id.to_owned(),
            topics: link.topics().clone(),
            publisher: link.publisher(),
            link: link.status(),
            authorizer: state.authorizer,
            pairing,
            registry,
            command_settings: settings.commands.clone(),
            compact_capabilities: settings.telemetry.encoding
                == crate::telemetry::settings::Encoding::Compact,
            safety: Safety::new(
                &settings.limits,
                &settings.safety,
                state.safety,
                safety_tx,
                settings.commands.clone(),
                state.clock.now(),
            ),
            clock: state.clock,
            interrupted: state.interrupted,
            stop: shutdown,
        });
        let router = tokio::spawn(router.run(inbound, shed, calls));
        Ok(Agent {
            link,
            telemetry,
            router,
            drivers,
            outbox_stats,
        })
    }

    /// The link's state, updated on every change.
    pub fn link_status(&self) -> watch::Receiver<LinkStatus> {
        self.link.status()
    }

    /// The outbox's counters, updated as points are appended and acknowledged.
    pub fn outbox_stats(&self) -> watch::Receiver<OutboxStats> {
        self.outbox_stats.clone()
    }

    /// Stops the devices' sampling at once, leaving the rest running (the fleet bench uses it
    /// to let every outbox drain before it counts what arrived).
    pub fn halt_drivers(&self) {
        for task in &self.drivers {
            task.abort();
        }
    }

    /// Resolves if a core task ends on its own, which is a bug or a broken invariant: the
    /// daemon then exits non-zero so systemd restarts it from its durable state.
    pub async fn failed(&mut self) -> anyhow::Error {
        tokio::select! {
            _ = &mut self.telemetry => anyhow::anyhow!("the telemetry task stopped unexpectedly"),
            _ = &mut self.router => anyhow::anyhow!("the inbound router stopped unexpectedly"),
        }
    }

    /// Takes the agent down once `shutdown` has been triggered, in the order that loses
    /// nothing: a device command still running is cut short, neither answered nor recorded
    /// (the next start reports it `interrupted`, PROTOCOL 4.6); process drivers get a `cancel`
    /// and a moment to exit (15.5) while the outbox is made durable; then the link publishes
    /// `offline` and disconnects within [`SHUTDOWN_BUDGET`].
    pub async fn stop(self) -> LinkStatus {
        let drivers_stopped = async {
            let deadline = tokio::time::Instant::now() + crate::drivers::STOP_BUDGET;
            let mut drivers = self.drivers;
            for task in &mut drivers {
                if tokio::time::timeout_at(deadline, task).await.is_err() {
                    tracing::warn!("a driver did not stop in time");
                    break;
                }
            }
            for task in drivers {
                task.abort();
            }
        };
        let telemetry_stopped = tokio::time::timeout(TELEMETRY_STOP_BUDGET, self.telemetry);
        match tokio::join!(drivers_stopped, telemetry_stopped).1 {
            Ok(Ok(outbox)) => tracing::info!(depth = outbox.stats().depth, "outbox flushed"),
            _ => tracing::warn!("telemetry did not stop in time"),
        }
        let status = self.link.status();
        self.link.shutdown(SHUTDOWN_BUDGET).await;
        self.router.abort();
        let last = status.borrow().clone();
        last
    }
}
