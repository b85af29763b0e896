//! A private mosquitto per test: a mutual-TLS listener on a free 127.0.0.1 port and a
//! per-device ACL keyed on the client certificate's CN, as the platform's broker has.
//!
//! Nothing here touches a fixed port or a file outside the test's temporary directory, so tests
//! run in parallel and leave nothing behind.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pki::Pki;

/// The peer that plays the platform; the ACL gives it the whole tree.
pub const PLATFORM_CLIENT: &str = "platform";

/// Installs mosquitto's absence as a clear failure rather than a confusing timeout.
fn mosquitto_binary() -> &'static str {
    for candidate in ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"] {
        if Path::new(candidate).exists() {
            return candidate;
        }
    }
    panic!("mosquitto is not installed: run ./scripts/test.sh, which installs it");
}

/// A free 127.0.0.1 port, chosen by the kernel.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private mosquitto with a mutual-TLS listener on 127.0.0.1 and a per-device ACL.
pub struct Mosquitto {
    pub port: u16,
    conf: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    pub fn start(pki: &Pki) -> Mosquitto {
        Self::start_with(pki, false)
    }

    /// With `persistent`, sessions and queued QoS 1 messages survive a graceful restart
    /// ([`Mosquitto::stop_gracefully`]), so a subscriber misses nothing across an outage.
    pub fn start_with(pki: &Pki, persistent: bool) -> Mosquitto {
        Self::start_at(pki, free_port(), persistent)
    }

    /// A broker on a given port (for an agent configured before the broker existed).
    pub fn start_on(pki: &Pki, port: u16) -> Mosquitto {
        Self::start_at(pki, port, false)
    }

    fn start_at(pki: &Pki, port: u16, persistent: bool) -> Mosquitto {
        let conf = pki.path().join(format!("mosquitto-{port}.conf"));
        let acl = pki.path().join(format!("mosquitto-{port}.acl"));
        let log = pki.path().join(format!("mosquitto-{port}.log"));
        std::fs::write(
            &acl,
            format!(
                "user {PLATFORM_CLIENT}\ntopic readwrite #\n\n\
                 pattern read texture/v1/trust/bundle\n\
                 pattern read texture/v1/devices/%u/commands\n\
                 pattern read texture/v1/devices/%u/pairing/binding\n\
                 pattern read texture/v1/devices/%u/safety/policy\n\
                 pattern write texture/v1/devices/%u/status\n\
                 pattern write texture/v1/devices/%u/replies\n\
                 pattern write texture/v1/devices/%u/capabilities\n\
                 pattern write texture/v1/devices/%u/telemetry\n\
                 pattern write texture/v1/devices/%u/pairing/request\n"
            ),
        )
        .unwrap();
        // As root, mosquitto drops to the `mosquitto` user unless told otherwise, and could no
        // longer read the key files in our temporary directory.
        let user = if is_root() { "user root\n" } else { "" };
        let persistence = if persistent {
            format!(
                "persistence true\npersistence_location {}/\npersistence_file mosquitto-{port}.db\n\
                 max_queued_messages 0\nmax_queued_bytes 0\n",
                pki.path().display()
            )
        } else {
            "persistence false\n".to_string()
        };
        std::fs::write(
            &conf,
            format!(
                "{user}per_listener_settings false\n{persistence}\
                 log_dest file {log}\nlog_type all\nconnection_messages true\n\
                 listener {port} 127.0.0.1\n\
                 cafile {ca}\ncertfile {cert}\nkeyfile {key}\n\
                 require_certificate true\nuse_identity_as_username true\nset_tcp_nodelay true\n\
                 acl_file {acl}\n",
                log = log.display(),
                ca = pki.ca.cert_path().display(),
                cert = pki.server.cert.display(),
                key = pki.server.key.display(),
                acl = acl.display(),
            ),
        )
        .unwrap();
        let mut m = Mosquitto {
            port,
            conf,
            log,
            child: None,
        };
        m.restart();
        m
    }

    /// (Re)starts the broker on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.stop();
        let child = Command::new(mosquitto_binary())
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("mosquitto exited with {status}; log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker with SIGTERM, letting it save persistent sessions.
    pub fn stop_gracefully(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    /// Kills the broker (SIGKILL): the harshest outage, no goodbye to clients.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}
