//! The local control socket: how `texture-agent pair` talks to the running daemon.
//!
//! A Unix stream socket in the runtime directory, mode 0600 inside a 0700 directory, so only the
//! agent's own user (and root) can start a pairing session: being able to pair is being able to
//! hand the gateway to a new owner. Each client's credentials are checked too ([`admit`]): root
//! or the agent's user, and not from a namespace nested in the agent's, where drivers run. The protocol is JSON lines: one request from the client, then
//! a stream of [`ControlEvent`]s until the session ends (docs/PROTOCOL.md, "Control socket").

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

pub const SOCKET_FILE: &str = "control.sock";
/// Longest request line accepted.
const MAX_REQUEST: u64 = 1024;

pub fn socket_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(SOCKET_FILE)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Start a pairing session and stream its progress.
    Pair,
}

/// Progress of a pairing session, as streamed to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ControlEvent {
    /// The code to enter on the Connect page, and a URI for the QR code.
    #[serde(rename_all = "camelCase")]
    Code {
        code: String,
        device_id: String,
        expires_at: u64,
        qr_uri: String,
    },
    /// Still waiting for the platform's binding.
    #[serde(rename_all = "camelCase")]
    Waiting {
        remaining_secs: u64,
        link: String,
    },
    /// A binding arrived but was refused; the session goes on.
    Rejected {
        reason: String,
    },
    #[serde(rename_all = "camelCase")]
    Paired {
        reference_id: String,
        version: u64,
    },
    Expired,
    Error {
        message: String,
    },
}

impl ControlEvent {
    /// Whether the session is over after this event.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            ControlEvent::Paired { .. } | ControlEvent::Expired | ControlEvent::Error { .. }
        )
    }
}

/// A request from a client, with the channel its events go back on.
pub struct ControlCall {
    pub request: ControlRequest,
    pub events: mpsc::Sender<ControlEvent>,
}

/// Binds the socket (replacing a stale one) with owner-only permissions.
pub fn bind(runtime_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(runtime_dir);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// First wait after `accept` fails; it doubles while accepting keeps failing.
const ACCEPT_RETRY_MIN: Duration = Duration::from_millis(100);
/// Longest wait between failed accepts.
const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(5);

/// Accepts clients forever, forwarding each admitted client's request to the inbound router.
///
/// A failing `accept` (out of file descriptors, typically) is retried after a delay that
/// doubles up to [`ACCEPT_RETRY_MAX`], rather than at once: the error would otherwise repeat
/// in a loop that takes the runtime's only thread.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<ControlCall>) {
    let mut retry = ACCEPT_RETRY_MIN;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                retry = ACCEPT_RETRY_MIN;
                tokio::spawn(handle(stream, calls.clone()));
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = retry.as_millis() as u64, "control socket: accept failed");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(ACCEPT_RETRY_MAX);
            }
        }
    }
}

/// Why a client of the control socket was turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("its credentials cannot be read ({0})")]
    NoCredentials(String),
    #[error("uid {0} is neither root nor the agent's user")]
    Uid(u32),
    #[error("it runs in another user namespace than the agent (a process driver, or a container)")]
    UserNamespace,
    #[error("it exited before it could be checked")]
    Gone,
}

/// The peer check: the socket's mode already limits it to the agent's user and root, and a
/// process driver cannot reach its path (drivers::process::DriverSandbox); this is the second
/// wall, which holds even if the socket were reachable (a mode changed by hand, a descriptor
/// leaked to a child).
///
/// Admitted: uid 0 or the agent's effective uid (`SO_PEERCRED`, as seen from the agent's user
/// namespace), and not in a user namespace the agent can inspect other than its own. The agent
/// can inspect every namespace nested in its own (it owns them), which is where its drivers
/// run; a peer it cannot inspect (root outside the service's `PrivateUsers=` namespace, say) is
/// not one of them. The pid is checked to still be the peer's after `/proc` was read, so a
/// client that exits and leaves its pid to another process is refused, not mistaken for it.
pub fn admit(stream: &UnixStream) -> Result<(), Refusal> {
    let cred = stream
        .peer_cred()
        .map_err(|e| Refusal::NoCredentials(e.to_string()))?;
    // SAFETY: geteuid has no preconditions.
    let agent_uid = unsafe { libc::geteuid() };
    if cred.uid() != 0 && cred.uid() != agent_uid {
        return Err(Refusal::Uid(cred.uid()));
    }
    // 0 or none: the peer is in a pid namespace that is not the agent's nor nested in it, so
    // not one of the agent's drivers, which share the agent's.
    let Some(pid) = cred.pid().filter(|&pid| pid > 0) else {
        return Ok(());
    };
    let peer = PeerProcess::new(stream, pid);
    let theirs = std::fs::metadata(format!("/proc/{pid}/ns/user"));
    if !peer.still_alive() {
        return Err(Refusal::Gone);
    }
    match (theirs, std::fs::metadata("/proc/self/ns/user")) {
        (Ok(theirs), Ok(ours)) => {
            use std::os::unix::fs::MetadataExt;
            if (theirs.dev(), theirs.ino()) == (ours.dev(), ours.ino()) {
                Ok(())
            } else {
                Err(Refusal::UserNamespace)
            }
        }
        // Not inspectable from here: not a namespace of the agent's making.
        (Err(_), _) | (_, Err(_)) => Ok(()),
    }
}

/// The connecting process, pinned with a pidfd where the kernel gives one.
struct PeerProcess {
    pid: i32,
    pidfd: Option<std::os::fd::OwnedFd>,
}

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd for the process that connected. The asm-generic value,
/// which every architecture the agent is built for uses.
const SO_PEERPIDFD: libc::c_int = 77;

impl PeerProcess {
    fn new(stream: &UnixStream, pid: i32) -> PeerProcess {
        use std::os::fd::{AsRawFd, FromRawFd};
        let mut fd: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `fd`; pidfd_open returns a new
        // descriptor or -1. Either descriptor is then owned here.
        let pidfd = unsafe {
            let from_socket = libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERPIDFD,
                (&mut fd as *mut libc::c_int).cast(),
                &mut len,
            ) == 0
                && fd >= 0;
            if !from_socket {
                // Older kernels: a pidfd taken now, which at least pins the pid from here on.
                fd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as libc::c_int;
            }
            (fd >= 0).then(|| std::os::fd::OwnedFd::from_raw_fd(fd))
        };
        PeerProcess { pid, pidfd }
    }

    /// Whether the process has not exited (and so still owns its pid). Signal 0 checks
    /// existence only; EPERM means it exists but belongs to someone the agent cannot signal.
    fn still_alive(&self) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: signal 0 delivers nothing; the pidfd is ours.
        let result = unsafe {
            match &self.pidfd {
                Some(fd) => libc::syscall(
                    libc::SYS_pidfd_send_signal,
                    fd.as_raw_fd(),
                    0,
                    std::ptr::null::<libc::siginfo_t>(),
                    0,
                ) as libc::c_int,
                None => libc::kill(self.pid, 0),
            }
        };
        result == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
}

async fn handle(stream: UnixStream, calls: mpsc::Sender<ControlCall>) {
    let admitted = admit(&stream);
    let peer = stream.peer_cred().ok();
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_REQUEST));
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    // The request is read first even from a refused client, so that its write succeeds and it
    // reads the refusal rather than a broken pipe.
    if let Err(refusal) = admitted {
        let (uid, pid) = (peer.map(|c| c.uid()), peer.and_then(|c| c.pid()));
        tracing::warn!(?uid, ?pid, %refusal, "control socket: client refused");
        let mut text = serde_json::to_string(&ControlEvent::Error {
            message: format!("refused: {refusal}"),
        })
        .expect("events serialise");
        text.push('\n');
        let _ = write.write_all(text.as_bytes()).await;
        return;
    }
    let (tx, mut rx) = mpsc::channel(8);
    match serde_json::from_str::<ControlRequest>(line.trim()) {
        Ok(request) => {
            if calls
                .send(ControlCall {
                    request,
                    events: tx,
                })
                .await
                .is_err()
            {
                return;
            }
        }
        Err(e) => {
            let _ = tx
                .send(ControlEvent::Error {
                    message: format!("bad request: {e}"),
                })
                .await;
        }
    }
    while let Some(event) = rx.recv().await {
        let mut text = serde_json::to_string(&event).expect("events serialise");
        text.push('\n');
        if write.write_all(text.as_bytes()).await.is_err() || event.is_final() {
            return;
        }
    }
}
