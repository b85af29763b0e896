//! `texture-agent run`: the agent (built by the composition root, [`crate::agent`]) plus what
//! belongs to the host: the control socket, `status.json`, systemd's notifications and
//! watchdog, and the termination signals.

use std::time::Duration;

use anyhow::Context;
use tokio::sync::{mpsc, watch};

use crate::agent::service::{self, notify_or_log};
use crate::agent::status::{self, RuntimeStatus};
use crate::agent::Agent;
use crate::config::Settings;
use crate::inbound::pairing::control;
use crate::link::{LinkState, LinkStatus};
use crate::telemetry::outbox::OutboxStats;

/// Runs the daemon until SIGTERM/SIGINT. Returns `Ok` on a graceful stop.
pub async fn run(settings: Settings) -> anyhow::Result<()> {
    make_non_dumpable();
    crate::link::tls::install_default_provider();
    let state = crate::agent::AgentState::open(&settings)?;
    let started_at_unix = state.clock().now();
    let control =
        control::bind(&settings.state.runtime_dir).context("binding the control socket")?;
    let (trigger, shutdown) = service::shutdown_channel();
    let (calls_tx, calls_rx) = mpsc::channel(8);
    let mut agent = Agent::start(&settings, state, shutdown, calls_rx)?;
    let control_task = tokio::spawn(control::serve(control, calls_tx));
    let status = StatusFile {
        device_id: settings.device.id.to_string(),
        runtime_dir: settings.state.runtime_dir.clone(),
        started_at_unix,
        outbox_stats: agent.outbox_stats(),
    };

    // Configuration and state are loaded: ready, whether or not the network is up.
    let mut link_status = agent.link_status();
    status.publish(&link_status.borrow_and_update());
    notify_or_log("READY=1");
    tracing::info!(device_id = %settings.device.id, "texture-agent started");
    serve(&mut agent, &mut link_status, &status).await?;

    notify_or_log("STOPPING=1");
    trigger.trigger();
    let mut last = agent.stop().await;
    control_task.abort();
    let _ = std::fs::remove_file(control::socket_path(&settings.state.runtime_dir));
    // Report "stopped" even if the event loop had to be abandoned mid-state.
    last.state = LinkState::Stopped;
    last.connected_since_unix = None;
    status.publish(&last);
    tracing::info!("stopped");
    Ok(())
}

/// Before any secret is loaded: a non-dumpable process cannot be ptraced, and its
/// /proc/<pid>/{mem,fd,root,environ} cannot be opened, by other processes of its uid (only by
/// root with CAP_SYS_PTRACE), and it leaves no core dump. Drivers are kept out of it by their
/// namespaces already (drivers::process::DriverSandbox); this also covers a driver run with
/// `sandbox = false` by a non-root agent, and any other process of the agent's user.
fn make_non_dumpable() {
    // SAFETY: prctl(PR_SET_DUMPABLE) has no memory-safety preconditions.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "could not make the agent non-dumpable");
    }
}

/// Runs until a termination signal (`Ok`) or a core task's failure (`Err`), republishing the
/// status on every link change and pinging systemd's watchdog.
async fn serve(
    agent: &mut Agent,
    link_status: &mut watch::Receiver<LinkStatus>,
    status: &StatusFile,
) -> anyhow::Result<()> {
    let watchdog = service::watchdog_interval();
    let mut watchdog_tick = tokio::time::interval(watchdog.unwrap_or(Duration::from_secs(3600)));
    let terminated = service::termination_signal();
    tokio::pin!(terminated);
    loop {
        tokio::select! {
            error = agent.failed() => return Err(error),
            signal = &mut terminated => {
                let signal = signal.context("installing signal handlers")?;
                tracing::info!(signal, "shutting down");
                return Ok(());
            }
            changed = link_status.changed() => {
                if changed.is_err() { return Ok(()); }
                status.publish(&link_status.borrow_and_update());
            }
            // Pinged from this loop, on the runtime's only thread: if anything wedges the
            // runtime, the pings stop and systemd restarts us.
            _ = watchdog_tick.tick(), if watchdog.is_some() => notify_or_log("WATCHDOG=1"),
        }
    }
}

/// `status.json` and systemd's `STATUS=` line, rewritten on every link change.
struct StatusFile {
    device_id: String,
    runtime_dir: std::path::PathBuf,
    started_at_unix: u64,
    outbox_stats: watch::Receiver<OutboxStats>,
}

impl StatusFile {
    fn publish(&self, link: &LinkStatus) {
        let snapshot = RuntimeStatus {
            pid: std::process::id(),
            device_id: self.device_id.clone(),
            started_at_unix: self.started_at_unix,
            link: link.clone(),
            outbox: Some(*self.outbox_stats.borrow()),
        };
        if let Err(error) = status::write(&self.runtime_dir, &snapshot) {
            tracing::warn!(%error, "could not write runtime status");
        }
        notify_or_log(&format!("STATUS={}", describe(link)));
    }
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
