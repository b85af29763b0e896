//! How the daemon talks to its supervisor: systemd notifications, the watchdog and signals.
//!
//! The notify protocol is a single datagram to `$NOTIFY_SOCKET`, simple enough that a crate for
//! it would add more than it saves. Outside systemd the variable is unset and every call is a
//! cheap no-op, so the daemon behaves the same in a terminal, in tests and under systemd.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tokio::sync::watch;

/// Sends `state` (for example `"READY=1"` or `"STATUS=connected"`) to systemd.
///
/// Returns `Ok(false)` when not running under a notify-aware supervisor.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket: the name has no filesystem path.
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), &path)?;
    }
    Ok(true)
}

/// Best-effort notify: a failure is logged, never fatal, since the daemon's real work must not
/// depend on the supervisor's socket.
pub fn notify_or_log(state: &str) {
    if let Err(error) = notify(state) {
        tracing::warn!(%error, state, "sd_notify failed");
    }
}

/// How often to send `WATCHDOG=1`, when systemd asked for it (`WatchdogSec=`).
///
/// Half the configured timeout, as sd_watchdog_enabled(3) recommends, so one late tick does not
/// get the service killed. `None` when no watchdog is configured or it is meant for another pid.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Shutdown coordination: one [`ShutdownTrigger`], any number of cloned [`Shutdown`] listeners.
///
/// Every long-running task holds a `Shutdown` and selects on [`Shutdown::wait`], so a single
/// SIGTERM reaches all of them without each task owning a signal handler.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

pub struct ShutdownTrigger(watch::Sender<bool>);

pub fn shutdown_channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger(tx), Shutdown(rx))
}

impl ShutdownTrigger {
    pub fn trigger(&self) {
        self.0.send_replace(true);
    }
}

impl Shutdown {
    pub fn is_triggered(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves once shutdown has begun (immediately if it already has).
    pub async fn wait(&mut self) {
        // An Err means the trigger was dropped, which only happens as the process ends: treat it
        // as shutdown too.
        let _ = self.0.wait_for(|&down| down).await;
    }
}

/// Resolves on the first SIGTERM or SIGINT, returning the signal's name for the log.
pub async fn termination_signal() -> io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_reaches_a_listening_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        // Safe here: this is the only test in the crate that touches NOTIFY_SOCKET.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &path) };
        assert!(notify("READY=1").unwrap());
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        assert!(!notify("READY=1").unwrap());
    }

    #[tokio::test]
    async fn shutdown_reaches_every_listener() {
        let (trigger, shutdown) = shutdown_channel();
        let mut a = shutdown.clone();
        let mut b = shutdown;
        assert!(!a.is_triggered());
        trigger.trigger();
        a.wait().await;
        b.wait().await;
        assert!(b.is_triggered());
    }
}
