//! The command runner: the one owner of a device command's lifecycle, from its start on a
//! device to its one reply (docs/PROTOCOL.md 4.4 to 4.6).
//!
//! link → router → auth → plan → **runner** → drivers; the reply goes back via the link.
//!
//! A device command's replay entry goes from "seen, no reply" (recorded by auth before the
//! command runs) to "replied" exactly once, here: when the command ends ([`Runner::finish`]),
//! or, for a command the last run left unanswered, at the next start
//! ([`Runner::report_interrupted`]). Keeping start, supersession, timeout, completion and the
//! interrupted report in one place is what makes "one reply per command, recorded before it is
//! published" checkable in one file.
//!
//! **Concurrency.** At most one command runs per device. A newer command for a device
//! *supersedes* the running one, which fails with `409 SUPERSEDED`: that is what peer platforms
//! do, and it matches intent (the latest instruction wins) without an unbounded queue. Commands
//! for different devices run in parallel. [`RunSet`] keeps that bookkeeping as plain data; the
//! tokio side is one task per running command ([`run_on_device`]) racing the driver's answer
//! against the timeout, a superseding command and the agent's stop, and a bounded channel of
//! [`Completion`]s back to the inbound task.
//!
//! **Stop.** A command cut short by the agent's stop has no outcome: it is neither answered nor
//! recorded, so its entry stays "seen, no reply" and the next start reports it `interrupted`.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::{reply_for, DeviceRun};
use crate::agent::service::Shutdown;
use crate::drivers::{CommandFailure, DriverCommand};
use crate::inbound::auth::claims::AttestationClaims;
use crate::inbound::auth::Authorizer;
use crate::inbound::reply::{rfc3339, ErrorCode, FailedError, Reply};
use crate::model::clock::Clock;
use crate::model::safety::DriverSafety;

/// Completions waiting for the inbound task. A command task waits (it has nothing else to do)
/// when the queue is full.
const COMPLETION_QUEUE: usize = 64;

/// Where replies are recorded durably: the replay journal, behind [`Authorizer`]. A trait so
/// the runner's guarantees can be tested without a trust root and a journal on disk.
pub(crate) trait Journal {
    /// Of `ids`, the commands recorded as seen but never answered, as
    /// `(command id, issued-at, target device)`.
    fn unanswered(&self, ids: &[String]) -> Vec<(String, u64, Option<String>)>;
    /// Records `reply` as the command's one reply; a redelivery gets it byte for byte.
    fn record_reply(&mut self, command_id: &str, reply: &[u8]);
}

impl Journal for Authorizer {
    fn unanswered(&self, ids: &[String]) -> Vec<(String, u64, Option<String>)> {
        self.interrupted(ids)
    }
    fn record_reply(&mut self, command_id: &str, reply: &[u8]) {
        self.complete(command_id, reply);
    }
}

/// How a device command ended when the driver did not give it a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RunFailure {
    /// A newer command (its id) for the same device replaced it.
    Superseded { by: String },
    /// It outlived its timeout; the driver is told to cancel it.
    TimedOut(Duration),
    /// The driver's command channel is closed: its task has ended.
    RouteClosed,
    /// The driver dropped the command without answering.
    NoAnswer,
    /// The driver failed it, or the agent did on the driver's behalf.
    Driver(CommandFailure),
}

impl RunFailure {
    /// The reply's error code and message (docs/PROTOCOL.md 4.4, 7.3).
    pub(crate) fn code_and_message(&self) -> (ErrorCode, String) {
        match self {
            RunFailure::Superseded { by } => {
                (ErrorCode::Superseded, format!("superseded by command {by}"))
            }
            RunFailure::TimedOut(timeout) => (
                ErrorCode::CommandTimeout,
                format!(
                    "timed out after {} s; the driver was told to cancel",
                    timeout.as_secs()
                ),
            ),
            RunFailure::RouteClosed => (
                ErrorCode::DeviceUnavailable,
                "driver is not running".to_string(),
            ),
            RunFailure::NoAnswer => (
                ErrorCode::CommandFailed,
                "driver exited before answering".to_string(),
            ),
            RunFailure::Driver(failure) => (driver_code(failure), failure.to_string()),
        }
    }
}

/// Busy and not running are conditions of the driver, not of the command, and the platform may
/// want to act on them (wait for `running` in the health point, mint a new command); every other
/// failure means the command was tried and failed.
fn driver_code(failure: &CommandFailure) -> ErrorCode {
    match failure {
        CommandFailure::DriverBusy => ErrorCode::DeviceBusy,
        CommandFailure::DriverNotRunning => ErrorCode::DeviceUnavailable,
        CommandFailure::Reported(_)
        | CommandFailure::DriverExited
        | CommandFailure::DuplicateCommandId
        | CommandFailure::ShuttingDown => ErrorCode::CommandFailed,
    }
}

/// The command running on each device, with a handle `H` to stop it. Plain bookkeeping: the
/// runner acts on what its methods return.
#[derive(Debug)]
pub(crate) struct RunSet<H> {
    running: HashMap<String, (String, H)>,
}

impl<H> Default for RunSet<H> {
    fn default() -> Self {
        RunSet {
            running: HashMap::new(),
        }
    }
}

impl<H> RunSet<H> {
    /// `command_id` starts on `device_id`. Returns the command it supersedes, with its handle:
    /// that one must end `409 SUPERSEDED`.
    pub(crate) fn start(
        &mut self,
        device_id: &str,
        command_id: &str,
        handle: H,
    ) -> Option<(String, H)> {
        self.running
            .insert(device_id.to_owned(), (command_id.to_owned(), handle))
    }

    /// `command_id` on `device_id` ended. Returns whether it was the device's running command; a
    /// superseded command ending late leaves its successor in place.
    pub(crate) fn finish(&mut self, device_id: &str, command_id: &str) -> bool {
        let current = self
            .running
            .get(device_id)
            .is_some_and(|(running, _)| running == command_id);
        if current {
            self.running.remove(device_id);
        }
        current
    }

    /// The command running on `device_id`.
    #[cfg(test)]
    pub(crate) fn running(&self, device_id: &str) -> Option<&str> {
        self.running.get(device_id).map(|(id, _)| id.as_str())
    }
}

/// A device command that ended, from its task back to the inbound task.
#[derive(Debug)]
pub(crate) struct Completion {
    command_id: String,
    device_id: String,
    ended: Ended,
}

/// How a device command ended, by where it came from.
#[derive(Debug)]
pub(crate) enum Ended {
    /// A platform command: its reply, to record and publish.
    Platform { reply: Vec<u8>, succeeded: bool },
    /// A control the agent ran on its own (a lapsed hold, fail-safe): the outcome, for the
    /// safety controls. It has no reply: nobody asked for it.
    Safety(Result<(), RunFailure>),
}

/// What the router learns when a device command ends.
#[derive(Debug)]
pub(crate) enum Finished {
    /// A platform command's reply, recorded in the journal and to be published now.
    Reply {
        device_id: String,
        command_id: String,
        reply: Vec<u8>,
        succeeded: bool,
    },
    /// A safety control's outcome.
    Safety {
        device_id: String,
        action_id: String,
        outcome: Result<(), RunFailure>,
    },
}

/// A control the agent runs on a device on its own (see `inbound::safety::controls`).
#[derive(Debug)]
pub(crate) struct LocalRun {
    /// The action id, the command id its driver sees.
    pub(crate) id: String,
    pub(crate) device_id: String,
    pub(crate) slug: String,
    pub(crate) input: serde_json::Map<String, Value>,
    pub(crate) route: mpsc::Sender<DriverCommand>,
    pub(crate) timeout: Duration,
    pub(crate) safety: DriverSafety,
}

/// Runs device commands: the run set, the command tasks and the replies they end with.
pub(crate) struct Runner {
    runs: RunSet<oneshot::Sender<RunFailure>>,
    completions_tx: mpsc::Sender<Completion>,
    completions_rx: mpsc::Receiver<Completion>,
    /// Replies of commands the last run left unanswered, to publish once the link is up.
    interrupted: Vec<Vec<u8>>,
    /// The agent's stop: from then on a running device command has no outcome to report.
    stop: Shutdown,
    /// Stamps `executedAt`.
    clock: Clock,
}

impl Runner {
    pub(crate) fn new(stop: Shutdown, clock: Clock) -> Runner {
        let (completions_tx, completions_rx) = mpsc::channel(COMPLETION_QUEUE);
        Runner {
            runs: RunSet::default(),
            completions_tx,
            completions_rx,
            interrupted: Vec::new(),
            stop,
            clock,
        }
    }

    /// Answers, at start, each of `ids` (the commands the replay journal holds) that the last
    /// run left without a reply: `500 COMMAND_FAILED` `interrupted`, recorded now so a
    /// redelivery gets it and the next start does not report it again (PROTOCOL 4.6). The
    /// replies wait for [`Runner::take_interrupted`].
    pub(crate) fn report_interrupted(
        &mut self,
        journal: &mut dyn Journal,
        gateway_id: &str,
        ids: &[String],
    ) {
        let now = self.clock.now();
        for (id, issued_at, target) in journal.unanswered(ids) {
            let device_id = target.as_deref().unwrap_or(gateway_id);
            let reply = interrupted_reply(&id, device_id, issued_at, now).to_bytes();
            tracing::warn!(command_id = %id, "command interrupted by the last stop; reporting it failed");
            journal.record_reply(&id, &reply);
            self.interrupted.push(reply);
        }
    }

    /// The interrupted replies not yet published; each is handed out once.
    pub(crate) fn take_interrupted(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.interrupted)
    }

    /// Starts a device command in its own task, superseding whatever that device was running.
    /// `safety` is what its driver is told about the device's hold and fail-safe control.
    pub(crate) fn start(
        &mut self,
        claims: Box<AttestationClaims>,
        run: DeviceRun,
        safety: DriverSafety,
    ) {
        let device_id = run.device_id.clone();
        let cancel_rx = self.supersede(&device_id, &claims.jti);
        let completions = self.completions_tx.clone();
        let stop = self.stop.clone();
        let clock = self.clock.clone();
        tokio::spawn(async move {
            let command = DriverCommand {
                command_id: claims.jti.clone(),
                device_id: device_id.clone(),
                slug: claims.command.slug.clone(),
                input: run.input,
                safety,
                done: oneshot::channel().0,
            };
            let Some(outcome) =
                run_on_device(command, &run.route, run.timeout, cancel_rx, stop).await
            else {
                // Neither answered nor recorded: its replay entry stays "seen, no reply", so the
                // next start reports it `interrupted` (PROTOCOL 4.6).
                tracing::warn!(command_id = %claims.jti, device_id = %device_id, "agent stopping: command cut short; it is reported interrupted after the restart");
                return;
            };
            let succeeded = outcome.is_ok();
            let reply = device_reply(&claims, &device_id, clock.now(), outcome);
            let _ = completions
                .send(Completion {
                    command_id: claims.jti.clone(),
                    device_id,
                    ended: Ended::Platform { reply, succeeded },
                })
                .await;
        });
    }

    /// Starts a safety control on its device, like a platform command: it supersedes whatever
    /// the device was running, and a newer platform command supersedes it.
    pub(crate) fn start_local(&mut self, run: LocalRun) {
        let cancel_rx = self.supersede(&run.device_id, &run.id);
        let completions = self.completions_tx.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let command = DriverCommand {
                command_id: run.id.clone(),
                device_id: run.device_id.clone(),
                slug: run.slug,
                input: run.input,
                safety: run.safety,
                done: oneshot::channel().0,
            };
            // At a stop the control is simply not finished: the state that asked for it is
            // persisted, and the next start asks again.
            let Some(outcome) =
                run_on_device(command, &run.route, run.timeout, cancel_rx, stop).await
            else {
                return;
            };
            let _ = completions
                .send(Completion {
                    command_id: run.id,
                    device_id: run.device_id,
                    ended: Ended::Safety(outcome.map(|_| ())),
                })
                .await;
        });
    }

    /// Registers `command_id` as `device_id`'s running command, superseding the previous one;
    /// returns the channel on which the new one may itself be cancelled.
    fn supersede(&mut self, device_id: &str, command_id: &str) -> oneshot::Receiver<RunFailure> {
        let (cancel_tx, cancel_rx) = oneshot::channel();
        if let Some((previous, cancel)) = self.runs.start(device_id, command_id, cancel_tx) {
            tracing::info!(command_id = %previous, superseded_by = %command_id, "command superseded");
            let _ = cancel.send(RunFailure::Superseded {
                by: command_id.to_owned(),
            });
        }
        cancel_rx
    }

    /// The next command to end. Pending for ever while none runs (the runner keeps a sender).
    pub(crate) async fn completed(&mut self) -> Completion {
        self.completions_rx
            .recv()
            .await
            .expect("the runner holds a sender")
    }

    /// Ends `done`'s run. A platform command's reply is recorded in `journal` before it is
    /// returned for publishing: a reply is never published before it is recorded, so a
    /// redelivery racing the publish gets the same bytes.
    pub(crate) fn finish(
        &mut self,
        done: Completion,
        journal: Option<&mut dyn Journal>,
    ) -> Finished {
        self.runs.finish(&done.device_id, &done.command_id);
        match done.ended {
            Ended::Platform { reply, succeeded } => {
                if let Some(journal) = journal {
                    journal.record_reply(&done.command_id, &reply);
                }
                Finished::Reply {
                    device_id: done.device_id,
                    command_id: done.command_id,
                    reply,
                    succeeded,
                }
            }
            Ended::Safety(outcome) => Finished::Safety {
                device_id: done.device_id,
                action_id: done.command_id,
                outcome,
            },
        }
    }
}

/// A device command's reply, logged as it is made.
fn device_reply(
    claims: &AttestationClaims,
    device_id: &str,
    now: u64,
    outcome: Result<Value, RunFailure>,
) -> Vec<u8> {
    let outcome = match outcome {
        Ok(result) => {
            tracing::info!(command_id = %claims.jti, %device_id, "command succeeded");
            Ok(result)
        }
        Err(failure) => {
            let (code, message) = failure.code_and_message();
            tracing::warn!(command_id = %claims.jti, ?code, %message, "command failed");
            Err((code, message))
        }
    };
    reply_for(claims, device_id, now, outcome).to_bytes()
}

/// Runs a planned device command to its end: the driver's answer, the timeout, or a
/// cancellation (`cancel` carries the reason, e.g. a superseding command). Dropping the
/// driver's answer channel on timeout or cancellation is what tells the driver to cancel.
///
/// `None` when the agent began to stop (`stop`) before the command ended. A stop is not an
/// outcome of the command: whatever the driver does while the agent stops (it is told to
/// cancel, then stopped) is not reported, so the command's replay entry stays "seen, no reply"
/// and the next start answers it `interrupted` (PROTOCOL 4.6). The stop is checked first, so a
/// failure caused by the stop itself (the driver's channel closing as it is stopped) is never
/// mistaken for the command's outcome.
pub(crate) async fn run_on_device(
    mut command: DriverCommand,
    route: &mpsc::Sender<DriverCommand>,
    timeout: Duration,
    cancel: oneshot::Receiver<RunFailure>,
    mut stop: Shutdown,
) -> Option<Result<Value, RunFailure>> {
    let (done, answer) = oneshot::channel();
    command.done = done;
    let work = async {
        route
            .send(command)
            .await
            .map_err(|_| RunFailure::RouteClosed)?;
        match answer.await {
            Ok(outcome) => outcome.map_err(RunFailure::Driver),
            Err(_) => Err(RunFailure::NoAnswer),
        }
    };
    let outcome = tokio::select! {
        biased;
        () = stop.wait() => return None,
        outcome = work => outcome,
        _ = tokio::time::sleep(timeout) => Err(RunFailure::TimedOut(timeout)),
        Ok(reason) = cancel => Err(reason),
    };
    // An outcome that became ready in the same instant as the stop (the driver's channel closed
    // because the stop is tearing it down) belongs to the stop, not to the command.
    (!stop.is_triggered()).then_some(outcome)
}

/// The reply for a command found interrupted by a restart.
pub(crate) fn interrupted_reply(
    command_id: &str,
    device_id: &str,
    issued_at: u64,
    now: u64,
) -> Reply {
    Reply::Failed {
        command_id: command_id.to_owned(),
        device_id: device_id.to_owned(),
        issued_at: rfc3339(issued_at),
        executed_at: rfc3339(now),
        status: ErrorCode::CommandFailed.status(),
        error: FailedError {
            code: ErrorCode::CommandFailed,
            message: "interrupted: the agent stopped while the command was running".into(),
        },
    }
}

#[cfg(test)]
mod tests;
