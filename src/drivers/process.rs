//! External driver processes: a child program that speaks JSON lines on stdin and stdout.
//!
//! Integrators write drivers in whatever language talks to their hardware, so the agent treats a
//! driver as untrusted and unreliable: it may print garbage, print without end, hang, crash or
//! exit. None of that may take the agent down or make it grow without bound. This module is the
//! wall between the two:
//!
//! - **Bounded input.** Lines are read with [`LineReader`], which never holds more than
//!   `max_line_bytes` of one line. A longer line is counted and skipped, not buffered.
//! - **Bad lines are skipped, never fatal.** Malformed JSON, an unknown `type` or an invalid
//!   state is counted in [`DriverStats`], logged with its length and the reason (never its
//!   content, which may be huge or sensitive) and dropped.
//! - **Supervision.** When the driver exits, every command it still owed an answer fails with
//!   [`CommandFailure::DriverExited`] and the driver is restarted after a jittered
//!   [`Backoff`] delay, so a driver that crashes at start-up cannot spin the CPU and a fleet of
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

use std::collections::HashMap;
use std::io;
use std::ops::ControlFlow;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, Command};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant, MissedTickBehavior};

use super::{DriverCommand, DriverSettings, Sample, SampleSender};
use crate::link::backoff::Backoff;
use crate::service::Shutdown;
use crate::telemetry::model::DeviceState;

/// First restart delay. Long enough that a driver failing at start-up costs little CPU, short
/// enough that a one-off crash is barely noticed.
const RESTART_MIN: Duration = Duration::from_millis(500);
/// Restart delays grow to this ceiling while a driver keeps failing.
const RESTART_MAX: Duration = Duration::from_secs(30);
/// A driver that ran at least this long counts as healthy: its next failure restarts quickly
/// again, instead of inheriting the long delay of some crash loop hours ago.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// stderr lines are for humans; anything longer is truncated so the log stays bounded.
const STDERR_LINE_BYTES: usize = 1024;
/// Commands sent to the driver and not yet answered. A driver that never answers would
/// otherwise accumulate answer channels for ever.
const MAX_IN_FLIGHT: usize = 64;
/// Encoded lines waiting to be written to the driver's stdin.
const STDIN_QUEUE: usize = 16;
/// How often to look for commands whose caller stopped waiting, to send `cancel`.
const CANCEL_SWEEP: Duration = Duration::from_secs(1);
/// After stdout closes, how long the driver gets to exit on its own before it is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);
/// After the driver exits, how long its last stderr lines (often the crash message) get to
/// reach the log.
const STDERR_DRAIN: Duration = Duration::from_secs(1);
/// Longest parse-error reason logged; serde's messages can quote the offending value.
const REASON_CHARS: usize = 160;

/// Why the agent failed a command on the driver's behalf. Sent as the `Err` text of
/// [`DriverCommand::done`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandFailure {
    /// The driver exited (or closed its stdout) before answering.
    #[error("driver exited")]
    DriverExited,
    /// No driver process is running: it is between restarts or cannot be started.
    #[error("driver not running")]
    DriverNotRunning,
    /// The driver is not reading its stdin, or has [`MAX_IN_FLIGHT`] commands unanswered.
    #[error("driver busy")]
    DriverBusy,
    /// A command with the same id is already in flight at this driver.
    #[error("duplicate command id")]
    DuplicateCommandId,
    /// The agent is stopping.
    #[error("agent shutting down")]
    ShuttingDown,
}

/// Counters for one driver, shared with whoever reports health. Monotonic since the agent
/// started; read them with `load(Ordering::Relaxed)`.
#[derive(Debug, Default)]
pub struct DriverStats {
    /// Child processes started.
    pub spawns: AtomicU64,
    /// Child processes that ended (not counting the kill at shutdown).
    pub exits: AtomicU64,
    /// Lines skipped as malformed JSON, unknown `type` or invalid state.
    pub malformed_lines: AtomicU64,
    /// Lines skipped for being longer than `max_line_bytes`.
    pub oversized_lines: AtomicU64,
    /// Samples handed to telemetry.
    pub samples: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// One configured external driver: what to run and how much of a line to accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessDriver {
    /// For logs and status; not sent to the driver.
    pub name: String,
    /// argv, run without a shell.
    pub command: Vec<String>,
    pub max_line_bytes: usize,
}

impl ProcessDriver {
    /// The process driver described by `settings`, or `None` for other kinds.
    pub fn from_settings(settings: &DriverSettings) -> Option<ProcessDriver> {
        match settings {
            DriverSettings::Process {
                name,
                command,
                max_line_bytes,
            } => Some(ProcessDriver {
                name: name.clone(),
                command: command.clone(),
                max_line_bytes: *max_line_bytes,
            }),
            DriverSettings::Simulated { .. } => None,
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
        Supervisor {
            driver: self,
            samples,
            commands,
            commands_open: true,
            shutdown,
            stats,
        }
        .run()
        .await
    }
}

/// [`ProcessDriver::supervise`] for callers that hold the settings' fields rather than a
/// [`ProcessDriver`].
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
    }
    .supervise(samples, commands, shutdown, stats)
    .await
}

/// The answer channel of a command sent to the driver.
type Answer = oneshot::Sender<Result<Value, String>>;

fn fail(answer: Answer, failure: CommandFailure) {
    // The caller may have stopped waiting; then there is nobody to tell.
    let _ = answer.send(Err(failure.to_string()));
}

/// The supervision loop's state, alive for as long as the driver is configured.
struct Supervisor {
    driver: ProcessDriver,
    samples: SampleSender,
    commands: mpsc::Receiver<DriverCommand>,
    /// False once every command sender is gone, so the loop stops polling a closed channel
    /// (which would be ready, with `None`, for ever).
    commands_open: bool,
    shutdown: Shutdown,
    stats: Arc<DriverStats>,
}

/// What woke up the loop around a running child.
enum Event {
    Shutdown,
    Stdout(io::Result<ReadLine>),
    Command(Option<DriverCommand>),
    Sweep,
}

/// How one run of the child ended.
enum Ended {
    /// The driver exited; the text is its exit status, for the log.
    Exited(String),
    Shutdown,
}

impl Supervisor {
    async fn run(mut self) {
        let mut backoff = Backoff::new(RESTART_MIN, RESTART_MAX);
        while !self.shutdown.is_triggered() {
            let started = Instant::now();
            let outcome = match self.spawn() {
                Ok(child) => {
                    bump(&self.stats.spawns);
                    tracing::info!(driver = %self.driver.name, pid = child.id(), "driver started");
                    match self.run_child(child).await {
                        Ended::Shutdown => return,
                        Ended::Exited(status) => {
                            bump(&self.stats.exits);
                            Ok(status)
                        }
                    }
                }
                Err(error) => Err(error),
            };

            let ran_for = started.elapsed();
            if ran_for >= STABLE_RUN {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            let restart_in_ms = delay.as_millis() as u64;
            match outcome {
                Ok(status) => tracing::warn!(
                    driver = %self.driver.name,
                    %status,
                    ran_for_ms = ran_for.as_millis() as u64,
                    restart_in_ms,
                    "driver exited"
                ),
                Err(error) => tracing::warn!(
                    driver = %self.driver.name,
                    %error,
                    restart_in_ms,
                    "driver could not be started"
                ),
            }
            if self.wait_to_restart(delay).await.is_break() {
                return;
            }
        }
    }

    fn spawn(&self) -> io::Result<Child> {
        let Some((program, args)) = self.driver.command.split_first() else {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "empty command"));
        };
        Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // If this future is dropped (the daemon's task aborted) the child must not outlive it.
            .kill_on_drop(true)
            .spawn()
    }

    /// Runs one incarnation of the driver until its stdout closes or shutdown begins.
    ///
    /// stdout is the driver's lifeline: its end, not the process's exit, ends the run. That way
    /// every line the driver wrote before dying is still read (a last state, a last result), and
    /// a driver that closes stdout but lingers is useless and gets killed.
    async fn run_child(&mut self, mut child: Child) -> Ended {
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            // Unreachable with the piped Stdio above; fail the run rather than panic.
            let _ = child.kill().await;
            return Ended::Exited("stdio not captured".into());
        };
        // stdin gets its own task so a driver that stops reading its stdin blocks only that
        // task, never the reading of its stdout. Commands reach it through a bounded queue.
        let (to_driver, queue) = mpsc::channel(STDIN_QUEUE);
        let writer = tokio::spawn(write_to_driver(stdin, queue));
        let mut stderr_task = tokio::spawn(forward_stderr(self.driver.name.clone(), stderr));
        let mut stdout = LineReader::new(BufReader::new(stdout), self.driver.max_line_bytes);
        let mut in_flight: HashMap<String, Answer> = HashMap::new();
        let mut sweep = tokio::time::interval(CANCEL_SWEEP);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);

        let shutting_down = loop {
            let event = tokio::select! {
                _ = self.shutdown.wait() => Event::Shutdown,
                read = stdout.next_line() => Event::Stdout(read),
                command = self.commands.recv(), if self.commands_open => Event::Command(command),
                _ = sweep.tick() => Event::Sweep,
            };
            match event {
                Event::Shutdown => break true,
                Event::Stdout(Ok(ReadLine::Complete)) => {
                    if self
                        .handle_line(stdout.line(), &mut in_flight)
                        .await
                        .is_break()
                    {
                        break true;
                    }
                }
                Event::Stdout(Ok(ReadLine::Oversized { len })) => {
                    bump(&self.stats.oversized_lines);
                    tracing::warn!(
                        driver = %self.driver.name,
                        line_bytes = len,
                        max_line_bytes = self.driver.max_line_bytes,
                        "skipping oversized driver line"
                    );
                }
                Event::Stdout(Ok(ReadLine::Eof)) => break false,
                Event::Stdout(Err(error)) => {
                    tracing::warn!(driver = %self.driver.name, %error, "driver stdout unreadable");
                    break false;
                }
                Event::Command(Some(command)) => send_command(command, &to_driver, &mut in_flight),
                Event::Command(None) => self.commands_open = false,
                Event::Sweep => cancel_abandoned(&mut in_flight, &to_driver),
            }
        };

        if shutting_down {
            // The agent is stopping (PROTOCOL 15.5): a `cancel` for each command in flight, then
            // the end of stdin, then until the grace runs out to exit on its own; then SIGKILL.
            let deadline = Instant::now() + super::STOP_GRACE;
            for (command_id, answer) in in_flight.drain() {
                let cancel = encode(&ToDriver::Cancel {
                    command_id: &command_id,
                });
                let _ = tokio::time::timeout_at(deadline, to_driver.send(cancel)).await;
                fail(answer, CommandFailure::ShuttingDown);
            }
            // The writer ends once the queue is written, and closes the driver's stdin as it does.
            drop(to_driver);
            let mut writer = writer;
            if tokio::time::timeout_at(deadline, &mut writer)
                .await
                .is_err()
            {
                writer.abort();
            }
            stderr_task.abort();
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                if let Err(error) = child.kill().await {
                    tracing::warn!(driver = %self.driver.name, %error, "could not kill driver");
                }
            }
            return Ended::Shutdown;
        }
        writer.abort();

        // Nobody is left to answer these; tell their callers now rather than at their deadline.
        for (_, answer) in in_flight.drain() {
            fail(answer, CommandFailure::DriverExited);
        }
        let status = match timeout(EXIT_GRACE, child.wait()).await {
            Ok(status) => status,
            Err(_) => {
                tracing::warn!(
                    driver = %self.driver.name,
                    "driver closed stdout but kept running; killing it"
                );
                let _ = child.kill().await;
                child.wait().await
            }
        };
        if timeout(STDERR_DRAIN, &mut stderr_task).await.is_err() {
            // Something (a grandchild?) still holds stderr open; stop listening to it.
            stderr_task.abort();
        }
        Ended::Exited(match status {
            Ok(status) => status.to_string(),
            Err(error) => format!("unknown ({error})"),
        })
    }

    /// Acts on one complete stdout line. Breaks only if shutdown begins while waiting for room
    /// in the sample queue.
    async fn handle_line(
        &mut self,
        line: &[u8],
        in_flight: &mut HashMap<String, Answer>,
    ) -> ControlFlow<()> {
        if line.iter().all(u8::is_ascii_whitespace) {
            // A blank line carries nothing; not worth a warning.
            return ControlFlow::Continue(());
        }
        match parse_line(line) {
            Err(reason) => {
                bump(&self.stats.malformed_lines);
                tracing::warn!(
                    driver = %self.driver.name,
                    reason = %clip(&reason.to_string(), REASON_CHARS),
                    line_bytes = line.len(),
                    "skipping malformed driver line"
                );
            }
            Ok(FromDriver::State(sample)) => {
                // A full queue is back-pressure from telemetry: wait for room, but not past
                // shutdown.
                tokio::select! {
                    sent = self.samples.send(sample) => {
                        // An Err means telemetry has stopped, which only happens at shutdown.
                        if sent.is_ok() {
                            bump(&self.stats.samples);
                        }
                    }
                    _ = self.shutdown.wait() => return ControlFlow::Break(()),
                }
            }
            Ok(FromDriver::Result {
                command_id,
                outcome,
            }) => match in_flight.remove(&command_id) {
                Some(answer) => {
                    let _ = answer.send(outcome);
                }
                None => tracing::warn!(
                    driver = %self.driver.name,
                    command_id = %clip(&command_id, REASON_CHARS),
                    "result for a command not in flight (unknown, cancelled or answered twice)"
                ),
            },
        }
        ControlFlow::Continue(())
    }

    /// Waits out the restart delay. Commands arriving meanwhile are refused at once: holding
    /// them until the driver is back would make their callers' deadlines our problem.
    async fn wait_to_restart(&mut self, delay: Duration) -> ControlFlow<()> {
        let restart = tokio::time::sleep(delay);
        tokio::pin!(restart);
        loop {
            tokio::select! {
                _ = &mut restart => return ControlFlow::Continue(()),
                _ = self.shutdown.wait() => return ControlFlow::Break(()),
                command = self.commands.recv(), if self.commands_open => match command {
                    Some(command) => fail(command.done, CommandFailure::DriverNotRunning),
                    None => self.commands_open = false,
                },
            }
        }
    }
}

/// Queues `command` for the driver's stdin and remembers where its answer goes.
fn send_command(
    command: DriverCommand,
    to_driver: &mpsc::Sender<Vec<u8>>,
    in_flight: &mut HashMap<String, Answer>,
) {
    if in_flight.contains_key(&command.command_id) {
        return fail(command.done, CommandFailure::DuplicateCommandId);
    }
    if in_flight.len() >= MAX_IN_FLIGHT {
        return fail(command.done, CommandFailure::DriverBusy);
    }
    let line = encode(&ToDriver::Command {
        command_id: &command.command_id,
        device_id: &command.device_id,
        slug: &command.slug,
        input: &command.input,
    });
    // try_send: a full queue means the driver is not reading its stdin, and a closed one that
    // it closed stdin; either way waiting would only stall the driver's stdout.
    match to_driver.try_send(line) {
        Ok(()) => {
            in_flight.insert(command.command_id, command.done);
        }
        Err(_) => fail(command.done, CommandFailure::DriverBusy),
    }
}

/// Forgets commands whose caller has stopped waiting (dropped its receiver, typically at its
/// deadline) and tells the driver to `cancel` them. Best effort: if the stdin queue is full the
/// cancel is skipped, and a late result is ignored anyway.
fn cancel_abandoned(in_flight: &mut HashMap<String, Answer>, to_driver: &mpsc::Sender<Vec<u8>>) {
    in_flight.retain(|command_id, answer| {
        if !answer.is_closed() {
            return true;
        }
        let _ = to_driver.try_send(encode(&ToDriver::Cancel { command_id }));
        false
    });
}

async fn write_to_driver(mut stdin: ChildStdin, mut lines: mpsc::Receiver<Vec<u8>>) {
    while let Some(line) = lines.recv().await {
        if stdin.write_all(&line).await.is_err() {
            // The driver closed its stdin or died; its stdout closing will tell the supervisor.
            return;
        }
    }
}

/// Copies the driver's stderr to the log, one event per line, each cut to [`STDERR_LINE_BYTES`].
async fn forward_stderr(driver: String, stderr: ChildStderr) {
    let mut lines = LineReader::new(BufReader::new(stderr), STDERR_LINE_BYTES);
    loop {
        match lines.next_line().await {
            Ok(ReadLine::Complete) => {
                tracing::info!(driver = %driver, "{}", String::from_utf8_lossy(lines.line()))
            }
            Ok(ReadLine::Oversized { len }) => tracing::info!(
                driver = %driver,
                truncated = true,
                line_bytes = len,
                "{}",
                String::from_utf8_lossy(lines.line())
            ),
            Ok(ReadLine::Eof) | Err(_) => return,
        }
    }
}

/// Agent → driver messages, as they appear on the driver's stdin.
#[derive(Debug, Serialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
enum ToDriver<'a> {
    Command {
        command_id: &'a str,
        device_id: &'a str,
        slug: &'a str,
        input: &'a Map<String, Value>,
    },
    Cancel {
        command_id: &'a str,
    },
}

fn encode(message: &ToDriver) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("strings and a JSON object always serialise");
    line.push(b'\n');
    line
}

/// Driver → agent messages as they appear on the wire. Unknown fields are ignored so that
/// drivers written against a newer protocol still work.
#[derive(Debug, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "lowercase",
    rename_all_fields = "camelCase"
)]
enum WireMessage {
    State {
        device_id: String,
        state: DeviceState,
    },
    Result {
        command_id: String,
        ok: bool,
        #[serde(default)]
        result: Value,
        #[serde(default)]
        error: Option<String>,
    },
}

/// A driver line, checked and in the agent's terms.
#[derive(Debug, PartialEq)]
enum FromDriver {
    State(Sample),
    Result {
        command_id: String,
        outcome: Result<Value, String>,
    },
}

/// Why a driver line was skipped.
#[derive(Debug, thiserror::Error)]
enum MalformedLine {
    /// Not JSON, an unknown `type`, or a state that does not match the device model.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    #[error("empty deviceId")]
    EmptyDeviceId,
    #[error("empty commandId")]
    EmptyCommandId,
}

/// Parses one stdout line. Pure, so every way a driver can get it wrong is unit-testable.
fn parse_line(line: &[u8]) -> Result<FromDriver, MalformedLine> {
    Ok(match serde_json::from_slice(line)? {
        WireMessage::State { device_id, state } => {
            if device_id.is_empty() {
                return Err(MalformedLine::EmptyDeviceId);
            }
            FromDriver::State(Sample { device_id, state })
        }
        WireMessage::Result {
            command_id,
            ok,
            result,
            error,
        } => {
            if command_id.is_empty() {
                return Err(MalformedLine::EmptyCommandId);
            }
            let outcome = if ok {
                Ok(result)
            } else {
                Err(error.unwrap_or_else(|| "driver gave no reason".into()))
            };
            FromDriver::Result {
                command_id,
                outcome,
            }
        }
    })
}

/// `s` cut to at most `max` characters, so a log field cannot grow with a driver's output.
fn clip(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

/// What [`LineReader::next_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadLine {
    /// A whole line, now in [`LineReader::line`] (without its `\n`).
    Complete,
    /// A line of `len` bytes, more than the limit: only its first `max` bytes were kept.
    Oversized { len: usize },
    /// The stream ended; a final line without `\n` was returned before this.
    Eof,
}

/// Reads `\n`-terminated lines while holding at most `max` bytes of any one of them.
///
/// tokio's `read_until` and `lines` grow their buffer until a newline arrives, so a driver that
/// writes a gigabyte without a newline would take the agent's memory with it. This reader keeps
/// a line's first `max` bytes, skips the rest as it streams past, and reports the full length so
/// the caller can tell an oversized line from a complete one.
///
/// It is cancel safe, so it can lose a `select!` race without losing bytes: the only await is
/// `fill_buf`, which consumes nothing, and all progress through a line lives in `self`.
struct LineReader<R> {
    reader: R,
    max: usize,
    /// The first `max` bytes of the current line.
    line: Vec<u8>,
    /// Bytes of the current line seen so far, kept or not.
    len: usize,
    /// The last call returned a line: the next one starts afresh.
    returned: bool,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    fn new(reader: R, max: usize) -> Self {
        LineReader {
            reader,
            max,
            line: Vec::new(),
            len: 0,
            returned: false,
        }
    }

    /// Reads up to the end of the next line. Its kept bytes are then in [`LineReader::line`].
    async fn next_line(&mut self) -> io::Result<ReadLine> {
        if self.returned {
            self.line.clear();
            self.len = 0;
            self.returned = false;
        }
        loop {
            let available = self.reader.fill_buf().await?;
            if available.is_empty() {
                if self.len == 0 {
                    return Ok(ReadLine::Eof);
                }
                // The stream ended mid-line: the partial line is still a line.
                return Ok(self.finish_line());
            }
            let newline = available.iter().position(|&b| b == b'\n');
            let chunk = &available[..newline.unwrap_or(available.len())];
            let keep = chunk.len().min(self.max - self.line.len());
            // reserve_exact, so the buffer's capacity never exceeds `max`.
            self.line.reserve_exact(keep);
            self.line.extend_from_slice(&chunk[..keep]);
            self.len += chunk.len();
            let consumed = chunk.len() + usize::from(newline.is_some());
            self.reader.consume(consumed);
            if newline.is_some() {
                return Ok(self.finish_line());
            }
        }
    }

    fn finish_line(&mut self) -> ReadLine {
        self.returned = true;
        if self.len > self.max {
            ReadLine::Oversized { len: self.len }
        } else {
            ReadLine::Complete
        }
    }

    /// The kept bytes of the line last returned.
    fn line(&self) -> &[u8] {
        &self.line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    async fn read_all(input: &[u8], max: usize) -> Vec<(ReadLine, Vec<u8>)> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        loop {
            let read = reader.next_line().await.unwrap();
            if read == ReadLine::Eof {
                return out;
            }
            out.push((read, reader.line().to_vec()));
        }
    }

    #[tokio::test]
    async fn lines_are_split_on_newlines_and_a_final_partial_line_counts() {
        let lines = read_all(b"one\n\ntwo\nthree", 16).await;
        assert_eq!(
            lines,
            vec![
                (ReadLine::Complete, b"one".to_vec()),
                (ReadLine::Complete, b"".to_vec()),
                (ReadLine::Complete, b"two".to_vec()),
                (ReadLine::Complete, b"three".to_vec()),
            ]
        );
    }

    #[tokio::test]
    async fn an_oversized_line_is_reported_and_the_next_line_is_intact() {
        let mut input = vec![b'x'; 5000];
        input.extend_from_slice(b"\nafter\n");
        // A tiny BufReader makes the long line arrive in many pieces.
        let mut reader = LineReader::new(BufReader::with_capacity(64, &input[..]), 1024);
        assert_eq!(
            reader.next_line().await.unwrap(),
            ReadLine::Oversized { len: 5000 }
        );
        assert_eq!(reader.line(), &[b'x'; 1024][..]);
        assert!(reader.line.capacity() <= 1024, "buffer grew past the cap");
        assert_eq!(reader.next_line().await.unwrap(), ReadLine::Complete);
        assert_eq!(reader.line(), b"after");
        assert_eq!(reader.next_line().await.unwrap(), ReadLine::Eof);
    }

    #[tokio::test]
    async fn a_line_of_exactly_the_limit_is_complete() {
        let lines = read_all(b"abcd\nabcde\n", 4).await;
        assert_eq!(lines[0], (ReadLine::Complete, b"abcd".to_vec()));
        assert_eq!(lines[1], (ReadLine::Oversized { len: 5 }, b"abcd".to_vec()));
    }

    fn battery_json(reserve: f64) -> Value {
        json!({
            "type": "battery", "charge": 5000.0, "chargePercentage": 50.0,
            "chargingState": "idle", "chargeRate": 0.0, "backupReserve": reserve,
            "gridStatus": "idle", "gridPower": 0.0, "strategy": "self-consumption"
        })
    }

    #[test]
    fn a_state_line_becomes_a_sample() {
        let line = json!({"type": "state", "deviceId": "bat-1", "state": battery_json(20.0)});
        let parsed = parse_line(line.to_string().as_bytes()).unwrap();
        let FromDriver::State(sample) = parsed else {
            panic!("not a state: {parsed:?}")
        };
        assert_eq!(sample.device_id, "bat-1");
        assert_eq!(
            sample.state,
            serde_json::from_value::<DeviceState>(battery_json(20.0)).unwrap()
        );
    }

    #[test]
    fn results_carry_their_outcome() {
        let ok = br#"{"type":"result","commandId":"c1","ok":true,"result":{"backupReserve":42}}"#;
        assert_eq!(
            parse_line(ok).unwrap(),
            FromDriver::Result {
                command_id: "c1".into(),
                outcome: Ok(json!({"backupReserve": 42}))
            }
        );
        let refused = br#"{"type":"result","commandId":"c2","ok":false,"error":"no such slug"}"#;
        assert_eq!(
            parse_line(refused).unwrap(),
            FromDriver::Result {
                command_id: "c2".into(),
                outcome: Err("no such slug".into())
            }
        );
        let silent = br#"{"type":"result","commandId":"c3","ok":false}"#;
        assert!(matches!(
            parse_line(silent).unwrap(),
            FromDriver::Result {
                outcome: Err(_),
                ..
            }
        ));
    }

    #[test]
    fn unusable_lines_are_malformed() {
        let mut bad_state = battery_json(20.0);
        bad_state["chargingState"] = json!("exploding");
        let mut extra_field = battery_json(20.0);
        extra_field["colour"] = json!("red");
        let cases = [
            b"not json".to_vec(),
            br#"{"type":"mystery"}"#.to_vec(),
            br#"{"deviceId":"bat-1"}"#.to_vec(),
            json!({"type": "state", "deviceId": "bat-1", "state": bad_state})
                .to_string()
                .into_bytes(),
            json!({"type": "state", "deviceId": "bat-1", "state": extra_field})
                .to_string()
                .into_bytes(),
            json!({"type": "state", "deviceId": "", "state": battery_json(1.0)})
                .to_string()
                .into_bytes(),
            br#"{"type":"result","commandId":"","ok":true}"#.to_vec(),
            b"\xff\xfe".to_vec(),
        ];
        for line in cases {
            assert!(
                parse_line(&line).is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(&line)
            );
        }
    }

    #[test]
    fn commands_are_encoded_as_the_protocol_says() {
        let input = json!({"chargePercentage": 42}).as_object().unwrap().clone();
        let line = encode(&ToDriver::Command {
            command_id: "c1",
            device_id: "bat-1",
            slug: "battery:set-reserve",
            input: &input,
        });
        assert_eq!(line.last(), Some(&b'\n'));
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v,
            json!({"type": "command", "commandId": "c1", "deviceId": "bat-1",
                   "slug": "battery:set-reserve", "input": {"chargePercentage": 42}})
        );
        let cancel: Value =
            serde_json::from_slice(&encode(&ToDriver::Cancel { command_id: "c1" })).unwrap();
        assert_eq!(cancel, json!({"type": "cancel", "commandId": "c1"}));
    }

    #[test]
    fn clipped_reasons_respect_char_boundaries() {
        assert_eq!(clip("héllo", 2), "hé");
        assert_eq!(clip("short", 160), "short");
    }

    #[tokio::test]
    async fn the_reader_survives_cancellation_mid_line() {
        // A duplex pipe delivers the line in two writes; the first read is cancelled in between.
        let (mut tx, rx) = tokio::io::duplex(64);
        let mut reader = LineReader::new(BufReader::new(rx), 64);
        tx.write_all(b"hel").await.unwrap();
        let cancelled = timeout(Duration::from_millis(50), reader.next_line()).await;
        assert!(cancelled.is_err(), "returned before the newline");
        tx.write_all(b"lo\n").await.unwrap();
        assert_eq!(reader.next_line().await.unwrap(), ReadLine::Complete);
        assert_eq!(reader.line(), b"hello");
    }
}
