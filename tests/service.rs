//! systemd integration seen from outside: READY=1 without waiting for the network, STATUS=
//! lines, and watchdog pings that stop when the process stops making progress.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kit::{AgentConfig, Pki};
use texture_agent_testkit as kit;

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

/// Reads datagrams from the notify socket until `until` returns true or `timeout` passes.
fn read_until(
    sock: &UnixDatagram,
    timeout: Duration,
    mut until: impl FnMut(&str) -> bool,
) -> Vec<(Instant, String)> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(deadline - Instant::now()))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                let done = until(&msg);
                seen.push((Instant::now(), msg));
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    seen
}

#[test]
fn ready_status_and_watchdog_follow_the_notify_protocol() {
    let pki = Pki::new();
    // Nothing listens on this port: READY=1 must not wait for the network.
    let config = AgentConfig::new(&pki, kit::free_port(), "gw-notify").write(pki.path());
    let socket_path = pki.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    let mut child = kit::agent_process(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .env_remove("INVOCATION_ID")
        .env_remove("JOURNAL_STREAM")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id().to_string();

    let start = read_until(&sock, Duration::from_secs(10), |m| m == "READY=1");
    assert!(
        start.iter().any(|(_, m)| m == "READY=1"),
        "no READY=1: {start:?}"
    );
    let running = read_until(&sock, Duration::from_secs(3), |m| {
        m.starts_with("STATUS=reconnecting")
    });
    assert!(
        running
            .iter()
            .any(|(_, m)| m.starts_with("STATUS=reconnecting to 127.0.0.1")),
        "no reconnecting status: {running:?}"
    );

    // Pings every WATCHDOG_USEC/2 = 200 ms while healthy.
    let pings = read_until(&sock, Duration::from_millis(1_500), |_| false);
    let count = pings.iter().filter(|(_, m)| m == "WATCHDOG=1").count();
    assert!(count >= 4, "only {count} pings in 1.5 s: {pings:?}");

    // A stopped process must fall silent, so systemd's watchdog can act.
    Command::new("kill").args(["-STOP", &pid]).status().unwrap();
    let _ = read_until(&sock, Duration::from_millis(100), |_| false); // drain in-flight
    let silent = read_until(&sock, Duration::from_secs(1), |_| false);
    assert!(
        silent.iter().all(|(_, m)| m != "WATCHDOG=1"),
        "pinged while stopped: {silent:?}"
    );
    Command::new("kill").args(["-CONT", &pid]).status().unwrap();
    let resumed = read_until(&sock, Duration::from_secs(2), |m| m == "WATCHDOG=1");
    assert!(
        resumed.iter().any(|(_, m)| m == "WATCHDOG=1"),
        "no ping after SIGCONT"
    );

    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let stop = read_until(&sock, Duration::from_secs(5), |m| m == "STOPPING=1");
    assert!(
        stop.iter().any(|(_, m)| m == "STOPPING=1"),
        "no STOPPING=1: {stop:?}"
    );
    assert!(child.wait().unwrap().success());
}
