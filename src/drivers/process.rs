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
use std::ffi::CString;
use std::io::{self, Read};
use std::ops::ControlFlow;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
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
use crate::agent::service::Shutdown;
use crate::model::backoff::Backoff;
use crate::model::device::DeviceState;

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

/// Why the agent failed a command on the driver's behalf (or the driver reported failure).
pub use super::CommandFailure;

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

/// What a sandboxed process driver cannot see: the agent's state directories (device key, owner
/// binding, replay journal, trust bundle, outbox; control socket and status file) and its TLS
/// private key. Built once from the settings ([`DriverSandbox::from_settings`]).
///
/// A sandboxed driver starts in a user and mount namespace of its own, where an empty read-only
/// tmpfs covers each of `hidden_dirs` and `/dev/null` covers each of `hidden_files`. The agent
/// then nests a second user and mount namespace inside the first, which locks those mounts: the
/// driver, even as root (`uid 0` maps to itself), has capabilities only in the inner namespace
/// and cannot unmount, remount or bind around what the outer one mounted. Being in another user
/// namespace also keeps it from ptrace and from `/proc/<agent pid>/{root,fd,mem,environ}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverSandbox {
    /// Directories replaced by an empty read-only tmpfs.
    pub hidden_dirs: Vec<PathBuf>,
    /// Files replaced by a read-only `/dev/null` on a `nodev` mount: opening them fails.
    pub hidden_files: Vec<PathBuf>,
}

impl DriverSandbox {
    /// The agent's secrets as the settings place them: `state.dir`, `state.runtime_dir` and
    /// `broker.client_key_file`.
    pub fn from_settings(settings: &crate::config::Settings) -> DriverSandbox {
        let mut sandbox = DriverSandbox::default();
        for dir in [&settings.state.dir, &settings.state.runtime_dir] {
            sandbox.hide_dir(dir);
        }
        if let Some(key) = &settings.broker.client_key_file {
            sandbox.hide_file(key.expose());
        }
        sandbox
    }

    /// Adds `dir` (resolved through symlinks when it exists, since that is where the mount must
    /// go), unless an already hidden directory contains it.
    pub fn hide_dir(&mut self, dir: &Path) {
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        if self.covers(&dir) {
            return;
        }
        // A directory hidden earlier may lie inside this one: the new mount hides it anyway.
        self.hidden_dirs.retain(|d| !d.starts_with(&dir));
        self.hidden_files.retain(|f| !f.starts_with(&dir));
        self.hidden_dirs.push(dir);
    }

    /// Adds `file`, unless a hidden directory contains it (the file is then already out of
    /// sight, and the bind mount would have nothing to land on).
    pub fn hide_file(&mut self, file: &Path) {
        let file = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        if !self.covers(&file) && !self.hidden_files.contains(&file) {
            self.hidden_files.push(file);
        }
    }

    fn covers(&self, path: &Path) -> bool {
        self.hidden_dirs.iter().any(|d| path.starts_with(d))
    }
}

/// One step of [`confine`], reported to the agent when it fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Step {
    Dumpable = 1,
    UnshareOuter,
    UnshareInner,
    Setgroups,
    UidMap,
    GidMap,
    MakePrivate,
    HideDir,
    HideFile,
    Chdir,
    NoNewPrivs,
    DeathSignal,
    ParentGone,
}

impl Step {
    fn from_byte(byte: u8) -> Option<Step> {
        use Step::*;
        [
            Dumpable,
            UnshareOuter,
            UnshareInner,
            Setgroups,
            UidMap,
            GidMap,
            MakePrivate,
            HideDir,
            HideFile,
            Chdir,
            NoNewPrivs,
            DeathSignal,
            ParentGone,
        ]
        .into_iter()
        .find(|s| *s as u8 == byte)
    }

    /// What failed, and for a refusal by the kernel or the service, the likely reason.
    fn describe(self, error: &io::Error) -> String {
        let what = match self {
            Step::Dumpable => "prctl(PR_SET_DUMPABLE)",
            Step::UnshareOuter | Step::UnshareInner => "unshare(CLONE_NEWUSER|CLONE_NEWNS)",
            Step::Setgroups => "writing /proc/self/setgroups",
            Step::UidMap => "writing /proc/self/uid_map",
            Step::GidMap => "writing /proc/self/gid_map",
            Step::MakePrivate => "making / private in the driver's mount namespace",
            Step::HideDir => "mounting a tmpfs over state.dir or state.runtime_dir",
            Step::HideFile => "mounting /dev/null over broker.client_key_file",
            Step::Chdir => "chdir to the working directory",
            Step::NoNewPrivs => "prctl(PR_SET_NO_NEW_PRIVS)",
            Step::DeathSignal => "prctl(PR_SET_PDEATHSIG)",
            Step::ParentGone => "checking the agent is still there",
        };
        let refused = matches!(
            error.raw_os_error(),
            Some(libc::EPERM | libc::EACCES | libc::ENOSPC | libc::ENOSYS | libc::EINVAL)
        );
        let why = match self {
            Step::UnshareOuter | Step::UnshareInner if refused => {
                ": user namespaces are disabled (sysctl user.max_user_namespaces, \
                 kernel.unprivileged_userns_clone) or forbidden by the service \
                 (RestrictNamespaces= must allow user and mnt)"
            }
            Step::MakePrivate | Step::HideDir | Step::HideFile if refused => {
                ": the system call filter must allow mount, and the kernel must grant \
                 capabilities in a new user namespace (AppArmor's \
                 restrict_unprivileged_userns does not)"
            }
            _ => "",
        };
        format!("{what} failed{why}")
    }
}

/// Everything [`confine`] needs, made before the fork: the child may only make async-signal-safe
/// system calls, so no allocation, formatting or locking happens there.
struct Confinement {
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    hidden_dirs: Vec<CString>,
    hidden_files: Vec<CString>,
    /// The agent's working directory, re-entered after the mounts; `/` when it is hidden.
    cwd: Option<CString>,
    /// The agent's pid, to notice that it died before `PR_SET_PDEATHSIG` was in place.
    parent: libc::pid_t,
    /// Where the failing [`Step`] is written, one byte (a close-on-exec pipe).
    report: RawFd,
}

/// A close-on-exec pipe, (read end, write end), for [`confine`] to name the step that failed.
fn report_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array on success, which we then own.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

impl Confinement {
    fn new(sandbox: &DriverSandbox, report: RawFd) -> io::Result<Confinement> {
        // SAFETY: these calls have no preconditions and cannot fail.
        let (uid, gid, parent) = unsafe { (libc::getuid(), libc::getgid(), libc::getpid()) };
        Ok(Confinement {
            uid_map: format!("{uid} {uid} 1").into_bytes(),
            gid_map: format!("{gid} {gid} 1").into_bytes(),
            hidden_dirs: sandbox
                .hidden_dirs
                .iter()
                .map(|p| c_path(p))
                .collect::<Result<_, _>>()?,
            hidden_files: sandbox
                .hidden_files
                .iter()
                .map(|p| c_path(p))
                .collect::<Result<_, _>>()?,
            cwd: std::env::current_dir().ok().and_then(|d| c_path(&d).ok()),
            parent,
            report,
        })
    }
}

/// Runs in the forked child, between `fork` and `exec`: async-signal-safe system calls only.
/// On failure it writes the failing [`Step`] to `report` and returns the OS error, which std
/// hands to the parent as the spawn's error.
fn confine(c: &Confinement) -> io::Result<()> {
    let fail = |step: Step| -> io::Error {
        let error = io::Error::last_os_error();
        let byte = step as u8;
        // SAFETY: write(2) on a pipe we own, from a valid one-byte buffer.
        unsafe { libc::write(c.report, (&byte as *const u8).cast(), 1) };
        error
    };
    let check = |result: libc::c_int, step: Step| -> io::Result<()> {
        if result == -1 {
            Err(fail(step))
        } else {
            Ok(())
        }
    };
    // SAFETY: every call below is a raw system call on buffers built before the fork, each
    // NUL-terminated where the kernel expects a C string.
    unsafe {
        // The agent makes itself non-dumpable (daemon::run), and a non-dumpable process's
        // /proc/self files belong to root, so this child could not write its own uid_map. The
        // child holds a copy of the agent's memory until exec, but dumpable only lets processes
        // of the agent's uid, in the agent's user namespace, reach it: those can read the state
        // directory directly anyway.
        check(
            libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0),
            Step::Dumpable,
        )?;
        enter_user_namespace(c, Step::UnshareOuter, &fail)?;
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ),
            Step::MakePrivate,
        )?;
        let locked = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY;
        for dir in &c.hidden_dirs {
            check(
                libc::mount(
                    c"texture-driver-sandbox".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    locked,
                    c"mode=0755,size=4k,nr_inodes=1".as_ptr().cast(),
                ),
                Step::HideDir,
            )?;
        }
        for file in &c.hidden_files {
            check(
                libc::mount(
                    c"/dev/null".as_ptr(),
                    file.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ),
                Step::HideFile,
            )?;
            // A bind mount takes its flags only from a remount.
            check(
                libc::mount(
                    std::ptr::null(),
                    file.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_BIND | locked,
                    std::ptr::null(),
                ),
                Step::HideFile,
            )?;
        }
        // The nested namespace: the mounts above now belong to a more privileged mount
        // namespace than the one the driver runs in, so the kernel locks them.
        enter_user_namespace(c, Step::UnshareInner, &fail)?;
        // A working directory inside a hidden directory would still reach what lies under the
        // mount; entering it again by name goes through the mounts.
        let entered = match &c.cwd {
            Some(cwd) => libc::chdir(cwd.as_ptr()) == 0,
            None => false,
        };
        if !entered {
            check(libc::chdir(c"/".as_ptr()), Step::Chdir)?;
        }
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            Step::NoNewPrivs,
        )?;
        // Set after the namespaces: a change of credentials clears it.
        check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            Step::DeathSignal,
        )?;
        if libc::getppid() != c.parent {
            // Already orphaned: the death signal will never come.
            *libc::__errno_location() = libc::ESRCH;
            return Err(fail(Step::ParentGone));
        }
    }
    Ok(())
}

/// `unshare(CLONE_NEWUSER | CLONE_NEWNS)`, then the one-to-one uid and gid maps. In the child.
///
/// # Safety
/// Only between fork and exec, as [`confine`].
unsafe fn enter_user_namespace(
    c: &Confinement,
    step: Step,
    fail: &dyn Fn(Step) -> io::Error,
) -> io::Result<()> {
    if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) == -1 {
        return Err(fail(step));
    }
    // setgroups must be denied before an unprivileged process may write gid_map; kernels
    // before 3.19 have no such file.
    if write_proc(c"/proc/self/setgroups", b"deny") == -1
        && *libc::__errno_location() != libc::ENOENT
    {
        return Err(fail(Step::Setgroups));
    }
    if write_proc(c"/proc/self/uid_map", &c.uid_map) == -1 {
        return Err(fail(Step::UidMap));
    }
    if write_proc(c"/proc/self/gid_map", &c.gid_map) == -1 {
        return Err(fail(Step::GidMap));
    }
    Ok(())
}

/// Writes `data` to `path` in one write(2), as /proc's map files require. In the child.
///
/// # Safety
/// Only between fork and exec, as [`confine`].
unsafe fn write_proc(path: &std::ffi::CStr, data: &[u8]) -> libc::c_int {
    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
    if fd == -1 {
        return -1;
    }
    let written = libc::write(fd, data.as_ptr().cast(), data.len());
    // close(2) cannot clobber the errno of a failed write: save it across.
    let errno = *libc::__errno_location();
    libc::close(fd);
    *libc::__errno_location() = errno;
    if written == data.len() as isize {
        0
    } else {
        -1
    }
}

/// The answer channel of a command sent to the driver.
type Answer = oneshot::Sender<Result<Value, CommandFailure>>;

fn fail(answer: Answer, failure: CommandFailure) {
    // The caller may have stopped waiting; then there is nobody to tell.
    let _ = answer.send(Err(failure));
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
        let (report, report_tx) = report_pipe()?;
        let confinement = Confinement::new(sandbox, report_tx.as_raw_fd())?;
        // SAFETY: `confine` makes only async-signal-safe system calls on memory prepared above.
        unsafe {
            command.pre_exec(move || confine(&confinement));
        }
        let spawned = command.spawn();
        // The child's copy closed at exec (close-on-exec) or when it exited.
        drop(report_tx);
        spawned.map_err(|error| {
            // SAFETY: fcntl on a pipe we own; a non-blocking read returns at once.
            unsafe { libc::fcntl(report.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
            let mut step = [0u8];
            match std::fs::File::from(report).read(&mut step) {
                Ok(1) => match Step::from_byte(step[0]) {
                    Some(step) => io::Error::new(
                        error.kind(),
                        format!(
                            "driver sandbox: {}: {error}; the driver does not run unconfined \
                             unless its [[drivers]] table says sandbox = false",
                            step.describe(&error)
                        ),
                    ),
                    None => error,
                },
                _ => error,
            }
        })
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

    #[test]
    fn the_sandbox_hides_each_path_once() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let mut sandbox = DriverSandbox::default();
        sandbox.hide_file(&state.join("key.pem"));
        sandbox.hide_dir(&state.join("run"));
        sandbox.hide_dir(&state);
        sandbox.hide_dir(&state.join("run"));
        sandbox.hide_file(&state.join("key.pem"));
        let state = std::fs::canonicalize(&state).unwrap();
        assert_eq!(sandbox.hidden_dirs, vec![state]);
        assert!(sandbox.hidden_files.is_empty(), "{sandbox:?}");
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
