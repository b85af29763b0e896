//! `texture-agent run`: wires the pieces together and supervises them.
//!
//! Only wiring lives here: build each component, connect their channels, spawn them, and then
//! wait for a termination signal while relaying status to systemd.

use std::time::Duration;

use anyhow::Context;
use tokio::sync::mpsc;

use crate::auth::{Authorizer, AuthorizerConfig};
use crate::config::Settings;
use crate::control;
use crate::dispatch::Dispatcher;
use crate::link::{Link, LinkState, LinkStatus};
use crate::outbox::Outbox;
use crate::pairing::PairingState;
use crate::service::{self, notify_or_log};
use crate::status::{self, RuntimeStatus};
use crate::storage;
use crate::telemetry::Telemetry;

/// How long a graceful shutdown may take in total; systemd's `TimeoutStopSec` must be larger.
pub const SHUTDOWN_BUDGET: Duration = Duration::from_secs(4);

/// Runs the daemon until SIGTERM/SIGINT. Returns `Ok` on a graceful stop.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    // Before any secret is loaded: a non-dumpable process cannot be ptraced, and its
    // /proc/<pid>/{mem,fd,root,environ} cannot be opened, by other processes of its uid (only
    // by root with CAP_SYS_PTRACE), and it leaves no core dump. Drivers are kept out of it by
    // their namespaces already (drivers::process::DriverSandbox); this also covers a driver run
    // with `sandbox = false` by a non-root agent, and any other process of the agent's user.
    // SAFETY: prctl(PR_SET_DUMPABLE) has no memory-safety preconditions.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not make the agent non-dumpable");
    }
    crate::link::tls::install_default_provider();
    storage::ensure_dir(&settings.state.dir).context("state.dir")?;
    storage::ensure_dir(&settings.state.runtime_dir).context("state.runtime_dir")?;

    let (authorizer, interrupted) = open_authorizer(&settings)?;
    let device_key = crate::identity::load_or_create(&settings.state.dir).context("device key")?;
    let pairing = PairingState::open(
        &settings.state.dir,
        settings.device.id.as_str(),
        settings.pairing.code_ttl_secs,
    )
    .context("reading the pairing state")?;
    let control =
        control::bind(&settings.state.runtime_dir).context("binding the control socket")?;

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

    let (trigger, shutdown) = service::shutdown_channel();
    let mut link = Link::start(&settings, shutdown.clone())?;
    let (samples_tx, samples_rx) = mpsc::channel(crate::drivers::SAMPLE_QUEUE);
    let sandbox = crate::drivers::process::DriverSandbox::from_settings(&settings);
    let (drivers, driver_health, driver_tasks) =
        crate::drivers::start(&settings.drivers, &sandbox, &samples_tx, &shutdown);
    drop(samples_tx);
    let (telemetry, outbox_stats) = Telemetry::new(&settings, &link, outbox, &settings.state.dir);
    let telemetry = telemetry.with_driver_health(driver_health);
    let mut telemetry_task = tokio::spawn(telemetry.run(samples_rx, shutdown.clone()));
    let inbound = link.take_inbound().expect("inbound taken once");
    let (calls_tx, calls_rx) = mpsc::channel(8);
    let control_task = tokio::spawn(control::serve(control, calls_tx));
    let dispatcher = Dispatcher::new(
        settings.device.id.to_string(),
        link.topics().clone(),
        link.publisher(),
        link.status(),
        authorizer,
        pairing,
        device_key,
        settings.pairing.qr_uri.clone(),
        drivers,
        settings.commands.clone(),
        &interrupted,
        shutdown.clone(),
    );
    let mut pipeline = tokio::spawn(dispatcher.run(inbound, calls_rx));

    let started_at_unix = crate::link::unix_now();
    let device_id = settings.device.id.to_string();
    let runtime_dir = settings.state.runtime_dir.clone();
    let publish_status = |link: &LinkStatus| {
        let snapshot = RuntimeStatus {
            pid: std::process::id(),
            device_id: device_id.clone(),
            started_at_unix,
            link: link.clone(),
            outbox: Some(*outbox_stats.borrow()),
        };
        if let Err(error) = status::write(&runtime_dir, &snapshot) {
            tracing::warn!(%error, "could not write runtime status");
        }
        notify_or_log(&format!("STATUS={}", describe(link)));
    };

    // Configuration and state are loaded: ready, whether or not the network is up.
    let mut link_status = link.status();
    publish_status(&link_status.borrow_and_update());
    notify_or_log("READY=1");
    tracing::info!(device_id = %settings.device.id, "texture-agent started");

    let watchdog = service::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let terminated = service::termination_signal();
    tokio::pin!(terminated);
    loop {
        tokio::select! {
            // A core task that ends on its own is a bug or a broken invariant: exit non-zero
            // so systemd restarts the agent from its durable state.
            _ = &mut telemetry_task => anyhow::bail!("the telemetry task stopped unexpectedly"),
            _ = &mut pipeline => anyhow::bail!("the command dispatcher stopped unexpectedly"),
            signal = &mut terminated => {
                let signal = signal.context("installing signal handlers")?;
                tracing::info!(signal, "shutting down");
                break;
            }
            changed = link_status.changed() => {
                if changed.is_err() { break; }
                publish_status(&link_status.borrow_and_update());
            }
            // Pinged from this loop, on the runtime's only thread: if anything wedges the
            // runtime, the pings stop and systemd restarts us.
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify_or_log("WATCHDOG=1"),
        }
    }

    notify_or_log("STOPPING=1");
    // From here a device command still running is cut short, neither answered nor recorded: the
    // next start reports it `interrupted` (PROTOCOL 4.6). Process drivers get a `cancel` for it
    // and a moment to exit (15.5) while the outbox is flushed.
    trigger.trigger();
    let drivers_stopped = async {
        let deadline = tokio::time::Instant::now() + crate::drivers::STOP_BUDGET;
        let mut driver_tasks = driver_tasks;
        for task in &mut driver_tasks {
            if tokio::time::timeout_at(deadline, task).await.is_err() {
                tracing::warn!("a driver did not stop in time");
                break;
            }
        }
        for task in driver_tasks {
            task.abort();
        }
    };
    // The outbox is made durable before the link goes: nothing appended is lost.
    let telemetry_stopped = tokio::time::timeout(Duration::from_secs(1), telemetry_task);
    match tokio::join!(drivers_stopped, telemetry_stopped).1 {
        Ok(Ok(outbox)) => tracing::info!(depth = outbox.stats().depth, "outbox flushed"),
        _ => tracing::warn!("telemetry did not stop in time"),
    }
    link.shutdown(SHUTDOWN_BUDGET).await;
    pipeline.abort();
    control_task.abort();
    let _ = std::fs::remove_file(control::socket_path(&settings.state.runtime_dir));
    // Report "stopped" even if the event loop had to be abandoned mid-state.
    let mut last = link_status.borrow().clone();
    last.state = LinkState::Stopped;
    last.connected_since_unix = None;
    publish_status(&last);
    tracing::info!("stopped");
    Ok(())
}

/// A human-readable one-liner for systemd's `STATUS=`.
fn describe(s: &LinkStatus) -> String {
    match &s.state {
        LinkState::Connecting { attempt } => {
            format!("connecting to {} (attempt {attempt})", s.broker)
        }
        LinkState::Connected => format!("connected to {}", s.broker),
        LinkState::WaitingToRetry { retry_in_ms, error } => format!(
            "reconnecting to {} in {:.1}s: {error}",
            s.broker,
            *retry_in_ms as f64 / 1000.0
        ),
        LinkState::Stopped => "stopped".to_string(),
    }
}

/// Builds the authorizer from the `[trust]` settings; `None` when trust is not configured.
/// Also returns the ids of commands the last run left unfinished.
fn open_authorizer(settings: &Settings) -> anyhow::Result<(Option<Authorizer>, Vec<String>)> {
    let Some(trust) = &settings.trust else {
        tracing::warn!("no [trust] section: every command will be refused as unverifiable");
        return Ok((None, Vec::new()));
    };
    let root = crate::auth::jws::public_key_from_base64(&trust.root_public_key)
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
