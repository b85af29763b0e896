//! External driver processes: a child program that speaks JSON lines on stdin and stdout.
//!
//! Integrators write drivers in whatever language talks to their hardware, so the agent treats a
//! driver as untrusted and unreliable: it may print garbage, print without end, hang, crash or
//! exit. None of that may take the agent down or make it grow without bound. This module is the
//! wall between the two:
//!
//! - **Bounded input.** Lines are read with [`LineReader`](line_reader::LineReader), which never holds more than
//!   `max_line_bytes` of one line. A longer line is counted and skipped, not buffered.
//! - **Bad lines are skipped, never fatal.** Malformed JSON, an unknown `type` or an invalid
//!   state is counted in [`DriverStats`], logged with its length and the reason (never its
//!   content, which may be huge or sensitive) and dropped.
//! - **Supervision.** When the driver exits, every command it still owed an answer fails with
//!   [`CommandFailure::DriverExited`] and the driver is restarted after a jittered
//!   [`Backoff`](crate::model::backoff::Backoff) delay, so a driver that crashes at start-up cannot spin the CPU and a fleet of
//!   gateways does not restart drivers in lock-step.
//!
//! # Protocol
//!
//! One JSON object per line, UTF-8, `\n`-terminated. A driver must flush stdout after each line
//! (most runtimes buffer a pipe). Driver → agent, on the driver's stdout:
//!
//! ```text
//! {"type":"state","deviceId":"bat-1","state":{"type":"battery","charge":5000,...}}
//! {"type":"result","commandId":"c1","ok":true,"result":{...}}
//! {"type":"result","commandId":"c1","ok":false,"error":"reason"}
//! ```
//!
//! Agent → driver, on the driver's stdin:
//!
//! ```text
//! {"type":"command","commandId":"c1","deviceId":"bat-1","slug":"battery:set-reserve","input":{...}}
//! {"type":"cancel","commandId":"c1"}
//! ```
//!
//! `state` carries a [`DeviceState`] with the platform's field names. A `cancel` means nobody is
//! waiting for that command's result any more; the driver may stop working on it, and any result
//! it still sends is ignored. stderr is free-form text for humans and goes to the agent's log.
//! On agent shutdown the driver gets a `cancel` for each command in flight, then the end of its
//! stdin, and [`super::STOP_GRACE`] to exit on its own; then it is killed (SIGKILL). A driver
//! must still tolerate dying at any point, exactly as it must tolerate a power cut.
//!
//! # Layout
//!
//! This file is the public surface: what a driver is ([`ProcessDriver`]) and how to run one.
//! Each part of the wall has a file of its own: `supervisor` (spawn, serve, restart with
//! backoff, stop), `protocol` (the JSON-lines messages), `line_reader` (the bounded
//! `LineReader`), `in_flight` (the commands the driver owes an answer), `stats`
//! ([`DriverStats`]) and `sandbox` ([`DriverSandbox`] and the confinement run between fork and
//! exec).

mod in_flight;
mod line_reader;
mod protocol;
mod sandbox;
mod stats;
mod supervisor;

use std::sync::Arc;

use tokio::sync::mpsc;

use super::{DriverCommand, DriverSettings, SampleSender};
use crate::agent::service::Shutdown;

/// Why the agent failed a command on the driver's behalf (or the driver reported failure).
pub use super::CommandFailure;
pub use sandbox::DriverSandbox;
pub use stats::DriverStats;

/// One configured external driver: what to run and how much of a line to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessDriver {
    /// For logs and status; passed to the driver as `TEXTURE_DRIVER_NAME`.
    pub name: String,
    /// argv, run without a shell.
    pub command: Vec<String>,
    pub max_line_bytes: usize,
    /// What the driver is kept from; `None` runs it unconfined (`sandbox = false`), with only
    /// its environment cleared.
    pub sandbox: Option<Arc<DriverSandbox>>,
}

impl ProcessDriver {
    /// The process driver described by `settings`, or `None` for other kinds.
    pub fn from_settings(
        settings: &DriverSettings,
        sandbox: &Arc<DriverSandbox>,
    ) -> Option<ProcessDriver> {
        match settings {
            DriverSettings::Process {
                name,
                command,
                max_line_bytes,
                sandbox: confined,
            } => Some(ProcessDriver {
                name: name.clone(),
                command: command.clone(),
                max_line_bytes: *max_line_bytes,
                sandbox: confined.then(|| sandbox.clone()),
            }),
            DriverSettings::Simulated { .. }
            | DriverSettings::Sunspec(_)
            | DriverSettings::Ocpp(_) => None,
        }
    }

    /// Runs the driver until `shutdown`: starts it, forwards its states to `samples` and the
    /// `commands` routed to it, and restarts it whenever it exits. Never returns early, whatever
    /// the driver does; on shutdown the child is stopped (cancels, end of stdin, then killed
    /// after [`super::STOP_GRACE`]) before this returns.
    pub async fn supervise(
        self,
        samples: SampleSender,
        commands: mpsc::Receiver<DriverCommand>,
        shutdown: Shutdown,
        stats: Arc<DriverStats>,
    ) {
        supervisor::Supervisor::new(self, samples, commands, shutdown, stats)
            .run()
            .await
    }
}

/// [`ProcessDriver::supervise`] for callers that hold the settings' fields rather than a
/// [`ProcessDriver`]. The driver is sandboxed, with nothing hidden: its own namespaces and an
/// empty environment, but the whole file system in view.
pub async fn supervise(
    name: String,
    command: Vec<String>,
    max_line_bytes: usize,
    samples: SampleSender,
    commands: mpsc::Receiver<DriverCommand>,
    shutdown: Shutdown,
    stats: Arc<DriverStats>,
) {
    ProcessDriver {
        name,
        command,
        max_line_bytes,
        sandbox: Some(Arc::new(DriverSandbox::default())),
    }
    .supervise(samples, commands, shutdown, stats)
    .await
}

/// The variables a process driver's environment holds, and nothing else: the agent's own
/// environment (which under systemd includes `NOTIFY_SOCKET`, and when run by hand whatever the
/// shell exported) is not passed on. PROTOCOL 15.1 documents this list for driver authors.
pub const DRIVER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
