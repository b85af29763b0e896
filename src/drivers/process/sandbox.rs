//! The driver sandbox: what a process driver must not see, and the code that hides it.
//!
//! [`DriverSandbox`] is the policy, built once from the settings. Everything else here runs in
//! the forked child between `fork` and `exec` ([`confine`]), where only async-signal-safe
//! system calls are allowed: every buffer it needs is made beforehand ([`Confinement`]), and
//! a failing step is reported to the agent through a pipe as one byte, so the spawn error can
//! name it ([`spawn_confined`]).

use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use tokio::process::{Child, Command};

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

    /// Names `step` as the one that failed, on `report`, and returns the OS error it failed
    /// with (read first: the write may change `errno`). In the child: no allocation.
    fn fail(&self, step: Step) -> io::Error {
        let error = io::Error::last_os_error();
        let byte = step as u8;
        // SAFETY: write(2) on a pipe we own, from a valid one-byte buffer.
        unsafe { libc::write(self.report, (&byte as *const u8).cast(), 1) };
        error
    }

    /// A system call's `result`: `-1` fails `step` ([`Confinement::fail`]). In the child.
    fn check(&self, result: libc::c_int, step: Step) -> io::Result<()> {
        if result == -1 {
            Err(self.fail(step))
        } else {
            Ok(())
        }
    }
}

/// Runs in the forked child, between `fork` and `exec`: async-signal-safe system calls only.
/// On failure it writes the failing [`Step`] to `report` and returns the OS error, which std
/// hands to the parent as the spawn's error.
fn confine(c: &Confinement) -> io::Result<()> {
    // SAFETY: every call below is a raw system call on buffers built before the fork, each
    // NUL-terminated where the kernel expects a C string.
    unsafe {
        // The agent makes itself non-dumpable (agent::run), and a non-dumpable process's
        // /proc/self files belong to root, so this child could not write its own uid_map. The
        // child holds a copy of the agent's memory until exec, but dumpable only lets processes
        // of the agent's uid, in the agent's user namespace, reach it: those can read the state
        // directory directly anyway.
        c.check(
            libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0),
            Step::Dumpable,
        )?;
        enter_user_namespace(c, Step::UnshareOuter)?;
        hide_paths(c)?;
        // The nested namespace: the mounts above now belong to a more privileged mount
        // namespace than the one the driver runs in, so the kernel locks them.
        enter_user_namespace(c, Step::UnshareInner)?;
        reenter_working_dir(c)?;
        c.check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            Step::NoNewPrivs,
        )?;
        // Set after the namespaces: a change of credentials clears it.
        c.check(
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0),
            Step::DeathSignal,
        )?;
        if libc::getppid() != c.parent {
            // Already orphaned: the death signal will never come.
            *libc::__errno_location() = libc::ESRCH;
            return Err(c.fail(Step::ParentGone));
        }
    }
    Ok(())
}

/// Makes `/` private in the driver's mount namespace, then covers each hidden directory with
/// an empty read-only tmpfs and each hidden file with a read-only `/dev/null`. In the child.
///
/// # Safety
/// Only between fork and exec, as [`confine`].
unsafe fn hide_paths(c: &Confinement) -> io::Result<()> {
    c.check(
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
        c.check(
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
        c.check(
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
        c.check(
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
    Ok(())
}

/// Enters the agent's working directory again by name, or `/` when that fails. In the child.
///
/// A working directory inside a hidden directory would still reach what lies under the mount;
/// entering it again by name goes through the mounts.
///
/// # Safety
/// Only between fork and exec, as [`confine`].
unsafe fn reenter_working_dir(c: &Confinement) -> io::Result<()> {
    let entered = match &c.cwd {
        Some(cwd) => libc::chdir(cwd.as_ptr()) == 0,
        None => false,
    };
    if !entered {
        c.check(libc::chdir(c"/".as_ptr()), Step::Chdir)?;
    }
    Ok(())
}

/// Spawns `command` confined by `sandbox`: [`confine`] runs in the child before `exec`. When
/// it fails, the spawn's error names the failing [`Step`] and the likely reason.
pub(super) fn spawn_confined(command: &mut Command, sandbox: &DriverSandbox) -> io::Result<Child> {
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

/// `unshare(CLONE_NEWUSER | CLONE_NEWNS)`, then the one-to-one uid and gid maps. In the child.
///
/// # Safety
/// Only between fork and exec, as [`confine`].
unsafe fn enter_user_namespace(c: &Confinement, step: Step) -> io::Result<()> {
    if libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) == -1 {
        return Err(c.fail(step));
    }
    // setgroups must be denied before an unprivileged process may write gid_map; kernels
    // before 3.19 have no such file.
    if write_proc(c"/proc/self/setgroups", b"deny") == -1
        && *libc::__errno_location() != libc::ENOENT
    {
        return Err(c.fail(Step::Setgroups));
    }
    if write_proc(c"/proc/self/uid_map", &c.uid_map) == -1 {
        return Err(c.fail(Step::UidMap));
    }
    if write_proc(c"/proc/self/gid_map", &c.gid_map) == -1 {
        return Err(c.fail(Step::GidMap));
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
