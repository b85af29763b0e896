//! Supervision of one driver: start it, serve it while it runs, restart it when it exits, stop
//! it at shutdown.
//!
//! The supervisor is the only owner of the child and of its pipes. Its loop moves messages
//! between the driver's stdout ([`LineReader`]), the command channel and the sample queue; the
//! decisions live elsewhere (the protocol's parsing, the commands in flight), so this file is
//! the order of events around a child: spawn, run, drain, reap, back off, again.

use std::collections::HashMap;
use std::io;
use std::ops::ControlFlow;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant, MissedTickBehavior};

use super::in_flight::{cancel_abandoned, fail, send_command, Answer};
use super::line_reader::{LineReader, ReadLine};
use super::protocol::{encode, parse_line, FromDriver, ToDriver};
use super::stats::{bump, DriverStats};
use super::{sandbox, ProcessDriver, DRIVER_PATH};
use crate::agent::service::Shutdown;
use crate::drivers::{CommandFailure, DriverCommand, SampleSender};
use crate::model::backoff::Backoff;

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

/// The supervision loop's state, alive for as long as the driver is configured.
pub(super) struct Supervisor {
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

/// The pipes of one running child, and the tasks that serve its stdin and stderr.
struct ChildPipes {
    /// The driver's stdout, read by the supervisor itself.
    stdout: LineReader<BufReader<ChildStdout>>,
    /// Lines queued for the driver's stdin.
    to_driver: mpsc::Sender<Vec<u8>>,
    /// Writes `to_driver`'s lines to the driver's stdin.
    writer: JoinHandle<()>,
    /// Copies the driver's stderr to the log.
    stderr: JoinHandle<()>,
}

/// How one run of the child ended.
enum Ended {
    /// The driver exited; the text is its exit status, for the log.
    Exited(String),
    Shutdown,
}

impl Supervisor {
    /// The supervisor of `driver`, before its first start.
    pub(super) fn new(
        driver: ProcessDriver,
        samples: SampleSender,
        commands: mpsc::Receiver<DriverCommand>,
        shutdown: Shutdown,
        stats: Arc<DriverStats>,
    ) -> Supervisor {
        Supervisor {
            driver,
            samples,
            commands,
            commands_open: true,
            shutdown,
            stats,
        }
    }

    /// Starts the driver and restarts it after each exit, with a backoff, until shutdown.
    pub(super) async fn run(mut self) {
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
        let mut command = Command::new(program);
        command
            .args(args)
            // Nothing of the agent's environment: only what PROTOCOL 15.1 lists.
            .env_clear()
            .env("PATH", DRIVER_PATH)
            .env("LANG", "C.UTF-8")
            .env("HOME", "/")
            .env("TEXTURE_DRIVER_NAME", &self.driver.name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // If this future is dropped (the daemon's task aborted) the child must not outlive it.
            .kill_on_drop(true);
        let Some(sandbox) = &self.driver.sandbox else {
            return command.spawn();
        };
        sandbox::spawn_confined(&mut command, sandbox)
    }

    /// Runs one incarnation of the driver until its stdout closes or shutdown begins.
    ///
    /// stdout is the driver's lifeline: its end, not the process's exit, ends the run. That way
    /// every line the driver wrote before dying is still read (a last state, a last result), and
    /// a driver that closes stdout but lingers is useless and gets killed.
    async fn run_child(&mut self, mut child: Child) -> Ended {
        let Some(mut pipes) = self.attach(&mut child) else {
            // Unreachable with the piped Stdio above; fail the run rather than panic.
            let _ = child.kill().await;
            return Ended::Exited("stdio not captured".into());
        };
        let mut in_flight: HashMap<String, Answer> = HashMap::new();
        if self.serve(&mut pipes, &mut in_flight).await.is_break() {
            self.stop_for_shutdown(child, pipes, in_flight).await;
            return Ended::Shutdown;
        }
        self.reap_exited(child, pipes, in_flight).await
    }

    /// Takes the child's pipes and starts the tasks that write its stdin and log its stderr.
    /// `None` if a pipe is missing.
    fn attach(&self, child: &mut Child) -> Option<ChildPipes> {
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return None;
        };
        // stdin gets its own task so a driver that stops reading its stdin blocks only that
        // task, never the reading of its stdout. Commands reach it through a bounded queue.
        let (to_driver, queue) = mpsc::channel(STDIN_QUEUE);
        let writer = tokio::spawn(write_to_driver(stdin, queue));
        let stderr = tokio::spawn(forward_stderr(self.driver.name.clone(), stderr));
        let stdout = LineReader::new(BufReader::new(stdout), self.driver.max_line_bytes);
        Some(ChildPipes {
            stdout,
            to_driver,
            writer,
            stderr,
        })
    }

    /// Serves the running child: its stdout lines, the commands routed to it and the sweep of
    /// abandoned ones. Continues when its stdout ends (or fails); breaks when shutdown begins.
    async fn serve(
        &mut self,
        pipes: &mut ChildPipes,
        in_flight: &mut HashMap<String, Answer>,
    ) -> ControlFlow<()> {
        let mut sweep = tokio::time::interval(CANCEL_SWEEP);
        sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let event = tokio::select! {
                _ = self.shutdown.wait() => Event::Shutdown,
                read = pipes.stdout.next_line() => Event::Stdout(read),
                command = self.commands.recv(), if self.commands_open => Event::Command(command),
                _ = sweep.tick() => Event::Sweep,
            };
            match event {
                Event::Shutdown => return ControlFlow::Break(()),
                Event::Stdout(Ok(ReadLine::Complete)) => {
                    if self
                        .handle_line(pipes.stdout.line(), in_flight)
                        .await
                        .is_break()
                    {
                        return ControlFlow::Break(());
                    }
                }
                Event::Stdout(Ok(ReadLine::Oversized { len })) => self.skip_oversized(len),
                Event::Stdout(Ok(ReadLine::Eof)) => return ControlFlow::Continue(()),
                Event::Stdout(Err(error)) => {
                    tracing::warn!(driver = %self.driver.name, %error, "driver stdout unreadable");
                    return ControlFlow::Continue(());
                }
                Event::Command(Some(command)) => send_command(command, &pipes.to_driver, in_flight),
                Event::Command(None) => self.commands_open = false,
                Event::Sweep => cancel_abandoned(in_flight, &pipes.to_driver),
            }
        }
    }

    /// Counts and logs a stdout line longer than `max_line_bytes`, which was skipped.
    fn skip_oversized(&self, len: usize) {
        bump(&self.stats.oversized_lines);
        tracing::warn!(
            driver = %self.driver.name,
            line_bytes = len,
            max_line_bytes = self.driver.max_line_bytes,
            "skipping oversized driver line"
        );
    }

    /// Stops a child that is still running because the agent is stopping (PROTOCOL 15.5): a
    /// `cancel` for each command in flight, then the end of stdin, then until the grace runs
    /// out to exit on its own; then SIGKILL.
    async fn stop_for_shutdown(
        &self,
        mut child: Child,
        pipes: ChildPipes,
        mut in_flight: HashMap<String, Answer>,
    ) {
        // The stdout reader stays open until the child is gone, as the rest of `pipes` does.
        let ChildPipes {
            to_driver,
            mut writer,
            stderr,
            ..
        } = pipes;
        let deadline = Instant::now() + crate::drivers::STOP_GRACE;
        for (command_id, answer) in in_flight.drain() {
            let cancel = encode(&ToDriver::Cancel {
                command_id: &command_id,
            });
            let _ = tokio::time::timeout_at(deadline, to_driver.send(cancel)).await;
            fail(answer, CommandFailure::ShuttingDown);
        }
        // The writer ends once the queue is written, and closes the driver's stdin as it does.
        drop(to_driver);
        if tokio::time::timeout_at(deadline, &mut writer)
            .await
            .is_err()
        {
            writer.abort();
        }
        stderr.abort();
        if tokio::time::timeout_at(deadline, child.wait())
            .await
            .is_err()
        {
            if let Err(error) = child.kill().await {
                tracing::warn!(driver = %self.driver.name, %error, "could not kill driver");
            }
        }
    }

    /// Ends the run of a child whose stdout closed: fails what it still owed, waits for it to
    /// exit (killing it after [`EXIT_GRACE`]) and for its last stderr lines.
    async fn reap_exited(
        &self,
        mut child: Child,
        pipes: ChildPipes,
        mut in_flight: HashMap<String, Answer>,
    ) -> Ended {
        // The stdout reader and the stdin queue stay open until the child is reaped.
        let ChildPipes {
            writer,
            stderr: mut stderr_task,
            ..
        } = pipes;
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
                    let _ = answer.send(outcome.map_err(CommandFailure::Reported));
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

/// `s` cut to at most `max` characters, so a log field cannot grow with a driver's output.
fn clip(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::process::DriverSandbox;

    #[test]
    fn clipped_reasons_respect_char_boundaries() {
        assert_eq!(clip("héllo", 2), "hé");
        assert_eq!(clip("short", 160), "short");
    }
    fn supervisor_for(driver: ProcessDriver) -> Supervisor {
        let (samples, _) = mpsc::channel(1);
        let (_, commands) = mpsc::channel(1);
        Supervisor {
            driver,
            samples,
            commands,
            commands_open: true,
            shutdown: crate::agent::service::shutdown_channel().1,
            stats: Arc::default(),
        }
    }

    #[tokio::test]
    async fn a_failed_sandbox_step_is_named_in_the_spawn_error() {
        let dir = tempfile::tempdir().unwrap();
        let driver = ProcessDriver {
            name: "d".into(),
            command: vec!["true".into()],
            max_line_bytes: 1024,
            sandbox: Some(Arc::new(DriverSandbox {
                hidden_dirs: vec![dir.path().join("missing")],
                hidden_files: vec![],
            })),
        };
        let error = supervisor_for(driver).spawn().unwrap_err().to_string();
        assert!(error.contains("sandbox = false"), "{error}");
        // Where user namespaces cannot be made at all (user-mode QEMU, whose own threads make
        // unshare(CLONE_NEWUSER) fail with EINVAL; a kernel with them disabled), the first step
        // is the one that fails, and it is named; everywhere else it is the mount.
        let here = DriverSandbox {
            hidden_dirs: vec![dir.path().to_owned()],
            hidden_files: vec![],
        };
        let probe = ProcessDriver {
            name: "probe".into(),
            command: vec!["true".into()],
            max_line_bytes: 1024,
            sandbox: Some(Arc::new(here)),
        };
        match supervisor_for(probe).spawn() {
            Ok(mut child) => {
                child.wait().await.unwrap();
                assert!(
                    error.starts_with("driver sandbox: mounting a tmpfs over state.dir"),
                    "{error}"
                );
            }
            Err(unavailable) => {
                let unavailable = unavailable.to_string();
                assert!(
                    unavailable.starts_with("driver sandbox: unshare(CLONE_NEWUSER|CLONE_NEWNS)"),
                    "{unavailable}"
                );
                assert!(
                    error.starts_with("driver sandbox: unshare(CLONE_NEWUSER|CLONE_NEWNS)"),
                    "{error}"
                );
            }
        }
    }

    #[tokio::test]
    async fn an_unsandboxed_driver_still_gets_only_the_documented_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let driver = ProcessDriver {
            name: "plain".into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                format!("env > '{}'", out.display()),
            ],
            max_line_bytes: 1024,
            sandbox: None,
        };
        let mut child = supervisor_for(driver).spawn().unwrap();
        child.wait().await.unwrap();
        let mut env: Vec<String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.starts_with("PWD=") && !l.starts_with("SHLVL=") && !l.starts_with("_="))
            .collect();
        env.sort();
        assert_eq!(
            env,
            [
                "HOME=/".to_string(),
                "LANG=C.UTF-8".into(),
                format!("PATH={DRIVER_PATH}"),
                "TEXTURE_DRIVER_NAME=plain".into(),
            ]
        );
    }
}
