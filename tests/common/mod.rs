//! Shared test harness: certificates made at test time, a private mosquitto per test, the agent
//! binary as a child process, and an MQTT peer that plays the platform.
//!
//! Nothing here touches a fixed port or a file outside the test's temporary directory, so tests
//! run in parallel and leave nothing behind.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tempfile::TempDir;
use tokio::sync::mpsc;

/// The name on the broker's certificate.
pub const BROKER_NAME: &str = "broker.texture.test";
/// The peer that plays the platform; the ACL gives it the whole tree.
pub const PLATFORM_CLIENT: &str = "platform";

pub use texture_agent::sim::pki::{Ca, CertFiles};

/// Everything one test needs: a directory, the trusted CA, and the broker's certificate.
pub struct Pki {
    pub dir: TempDir,
    pub ca: Ca,
    pub server: CertFiles,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new(dir.path(), "trusted");
        let server = ca.server("broker", &[BROKER_NAME, "localhost", "127.0.0.1"]);
        Pki { dir, ca, server }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

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

/// What goes into the agent's TOML configuration for a test.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub device_id: String,
    pub port: u16,
    pub host: String,
    pub tls_server_name: Option<String>,
    pub ca_file: PathBuf,
    pub client: Option<CertFiles>,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    pub extra_broker: String,
    /// `trust.root_public_key`; `None` leaves the `[trust]` section out.
    pub trust_root: Option<String>,
    pub workspace_id: Option<String>,
    /// Stored as the accepted owner binding before the agent starts.
    pub owner: Option<String>,
    /// Appended verbatim at the end of the file (for `[telemetry]`, `[[drivers]]`, ...).
    pub extra_toml: String,
}

impl AgentConfig {
    /// An agent that trusts `pki`'s CA and authenticates as `device_id`.
    pub fn new(pki: &Pki, port: u16, device_id: &str) -> AgentConfig {
        AgentConfig {
            device_id: device_id.to_owned(),
            port,
            host: "127.0.0.1".into(),
            tls_server_name: Some(BROKER_NAME.into()),
            ca_file: pki.ca.cert_path(),
            client: Some(pki.ca.client(device_id)),
            backoff_min_ms: 200,
            backoff_max_ms: 1_000,
            extra_broker: String::new(),
            trust_root: None,
            workspace_id: None,
            owner: None,
            extra_toml: String::new(),
        }
    }

    /// Writes the configuration (and state directories) under `dir`; returns the file's path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let mut broker = format!(
            "host = \"{}\"\nport = {}\nca_file = \"{}\"\nkeepalive_secs = 5\nconnect_timeout_secs = 3\n\
             backoff_min_ms = {}\nbackoff_max_ms = {}\n",
            self.host,
            self.port,
            self.ca_file.display(),
            self.backoff_min_ms,
            self.backoff_max_ms
        );
        if let Some(name) = &self.tls_server_name {
            broker.push_str(&format!("tls_server_name = \"{name}\"\n"));
        }
        if let Some(c) = &self.client {
            broker.push_str(&format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                c.cert.display(),
                c.key.display()
            ));
        }
        broker.push_str(&self.extra_broker);
        let mut device = format!("id = \"{}\"\n", self.device_id);
        if let Some(ws) = &self.workspace_id {
            device.push_str(&format!("workspace_id = \"{ws}\"\n"));
        }
        let trust = match &self.trust_root {
            Some(root) => format!("[trust]\nroot_public_key = \"{root}\"\n\n"),
            None => String::new(),
        };
        let state_dir = self.state_dir(dir);
        if let Some(owner) = &self.owner {
            std::fs::create_dir_all(&state_dir).unwrap();
            // The stored form of an accepted owner binding (what pairing would have written).
            std::fs::write(
                state_dir.join("owner-binding.json"),
                serde_json::json!({
                    "version": 1,
                    "referenceId": owner,
                    "workspaceId": self.workspace_id,
                    "issuedAt": 0,
                })
                .to_string(),
            )
            .unwrap();
        }
        let path = dir.join(format!("agent-{}.toml", self.device_id));
        std::fs::write(
            &path,
            format!(
                "[device]\n{device}\n[broker]\n{broker}\n{trust}[state]\ndir = \"{}\"\nruntime_dir = \"{}\"\n\n[log]\nformat = \"json\"\nlevel = \"debug\"\n\n{}",
                state_dir.display(),
                dir.join(format!("run-{}", self.device_id)).display(),
                self.extra_toml,
            ),
        )
        .unwrap();
        path
    }

    pub fn state_dir(&self, dir: &Path) -> PathBuf {
        dir.join(format!("state-{}", self.device_id))
    }
}

/// The texture-agent binary under test: the one cargo built for this run, or another build
/// named by `TEXTURE_AGENT_BIN` (the cross-compiled ARM binary in the QEMU tests).
pub fn agent_binary() -> String {
    std::env::var("TEXTURE_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_texture-agent").to_string())
}

/// A command that runs the agent binary, through `TEXTURE_AGENT_RUNNER` when set (for example
/// `qemu-aarch64-static`, since binfmt_misc is not available to run foreign binaries directly).
pub fn agent_process() -> Command {
    match std::env::var("TEXTURE_AGENT_RUNNER") {
        Ok(runner) if !runner.is_empty() => {
            let mut c = Command::new(runner);
            c.arg(agent_binary());
            c
        }
        _ => Command::new(agent_binary()),
    }
}

/// Runs `texture-agent --config PATH ARGS...` to completion.
pub fn agent_command(config: &Path, args: &[&str]) -> std::process::Output {
    agent_process()
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("INVOCATION_ID")
        .env_remove("JOURNAL_STREAM")
        .output()
        .expect("run texture-agent")
}

/// A running `texture-agent run`, with its JSON log lines collected as they arrive.
pub struct Agent {
    child: Child,
    lines: Arc<Mutex<Vec<(Duration, serde_json::Value)>>>,
    pub started: Instant,
}

impl Agent {
    pub fn spawn(config: &Path) -> Agent {
        Agent::spawn_with_env(config, &[])
    }

    /// [`Agent::spawn`] with extra environment variables (for example libfaketime's).
    pub fn spawn_with_env(config: &Path, env: &[(&str, &str)]) -> Agent {
        let mut child = agent_process()
            .arg("--config")
            .arg(config)
            .arg("run")
            .envs(env.iter().copied())
            .env_remove("NOTIFY_SOCKET")
            .env_remove("INVOCATION_ID")
            .env_remove("JOURNAL_STREAM")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn texture-agent");
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let started = Instant::now();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line, "raw": true }));
                sink.lock().unwrap().push((started.elapsed(), value));
            }
        });
        Agent {
            child,
            lines,
            started,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Log lines whose `message` equals `message`.
    pub fn logs_with_message(&self, message: &str) -> Vec<serde_json::Value> {
        self.timed_logs(message)
            .into_iter()
            .map(|(_, l)| l)
            .collect()
    }

    /// Log lines whose `message` equals `message`, with when they arrived after spawn.
    pub fn timed_logs(&self, message: &str) -> Vec<(Duration, serde_json::Value)> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, l)| l["message"] == message)
            .cloned()
            .collect()
    }

    pub fn log_dump(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until a log line with `message` appears; returns it.
    pub fn wait_for_log(&self, message: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.logs_with_message(message).into_iter().next() {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no log line {message:?} within {timeout:?}; log:\n{}",
                self.log_dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit within {timeout:?}; log:\n{}",
                self.log_dump()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A message seen by the peer.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Seen {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// An MQTT client playing the platform, authenticated with its own client certificate.
pub struct Peer {
    pub client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Seen>,
    /// Messages received while waiting for something else, kept for later calls so that
    /// waiting on one topic never loses a message on another.
    backlog: std::collections::VecDeque<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Peer {
    /// Connects as `client_id` (certificate CN) and subscribes to `subscriptions`.
    pub async fn connect(pki: &Pki, port: u16, client_id: &str, subscriptions: &[&str]) -> Peer {
        Self::connect_with(pki, port, client_id, subscriptions, true).await
    }

    /// With `clean_session = false` the broker keeps the subscriptions and queues messages
    /// while the peer is away (see [`Mosquitto::start_with`]).
    pub async fn connect_with(
        pki: &Pki,
        port: u16,
        client_id: &str,
        subscriptions: &[&str],
        clean_session: bool,
    ) -> Peer {
        let files = pki.ca.client(client_id);
        let _ = rustls::crypto::ring::default_provider().install_default();
        let roots = {
            let mut store = rustls::RootCertStore::empty();
            let pem = std::fs::read(pki.ca.cert_path()).unwrap();
            use rustls::pki_types::pem::PemObject;
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                store.add(c.unwrap()).unwrap();
            }
            store
        };
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_file_iter(&files.cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&files.key).unwrap();
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let mut options = MqttOptions::new(client_id, "localhost", port);
        options.set_keep_alive(Duration::from_secs(5));
        options.set_clean_session(clean_session);
        options.set_max_packet_size(4 << 20, 4 << 20);
        options.set_transport(Transport::Tls(TlsConfiguration::Rustls(Arc::new(tls))));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        if let Some(tx) = ready_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Seen {
                            topic: p.topic,
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        for topic in subscriptions {
            client.subscribe(*topic, QoS::AtLeastOnce).await.unwrap();
        }
        if !subscriptions.is_empty() {
            tokio::time::timeout(Duration::from_secs(10), ready_rx)
                .await
                .expect("peer subscription acknowledged")
                .unwrap();
        }
        Peer {
            client,
            rx,
            backlog: std::collections::VecDeque::new(),
            task,
        }
    }

    pub async fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>, retain: bool) {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .await
            .unwrap();
    }

    /// Waits for the next message on `topic` that satisfies `pred`, skipping others.
    pub async fn expect(
        &mut self,
        topic: &str,
        timeout: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> Seen {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|m| m.topic == topic && pred(m))
        {
            return self.backlog.remove(i).expect("index in range");
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(seen)) if seen.topic == topic && pred(&seen) => return seen,
                Ok(Some(other)) => self.backlog.push_back(other),
                Ok(None) => panic!("peer connection ended"),
                Err(_) => panic!("no matching message on {topic} within {timeout:?}"),
            }
        }
    }

    /// Collects everything that arrives on `topic` during `window`.
    /// Forgets every message on `topic` received so far, so that the next [`Peer::expect`] on
    /// it sees only later ones.
    pub fn forget(&mut self, topic: &str) {
        while let Ok(seen) = self.rx.try_recv() {
            self.backlog.push_back(seen);
        }
        self.backlog.retain(|m| m.topic != topic);
    }

    pub async fn collect(&mut self, topic: &str, window: Duration) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + window;
        let (mut out, rest): (Vec<Seen>, Vec<Seen>) =
            self.backlog.drain(..).partition(|m| m.topic == topic);
        self.backlog.extend(rest);
        while let Ok(Some(seen)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if seen.topic == topic {
                out.push(seen);
            } else {
                self.backlog.push_back(seen);
            }
        }
        out
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The device topics, as the agent lays them out.
pub fn device_topic(device_id: &str, leaf: &str) -> String {
    format!("texture/v1/devices/{device_id}/{leaf}")
}

/// Unix seconds now, for minting attestations.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A `kB` figure from `/proc/<pid>/status` (`"self"` for this process), 0 when absent.
pub fn proc_status_kib(pid: &str, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process in seconds (`"self"` for this one).
pub fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(end) = stat.rfind(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = stat[end + 2..].split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

/// The platform's side of a test: a peer subscribed to `subscriptions` that has published
/// `signer`'s trust bundle (version 1, valid for an hour), retained.
pub async fn platform_peer(
    pki: &Pki,
    port: u16,
    signer: &texture_agent::sim::platform::PlatformSigner,
    subscriptions: &[&str],
) -> Peer {
    let peer = Peer::connect(pki, port, PLATFORM_CLIENT, subscriptions).await;
    let now = unix_now();
    peer.publish(
        &texture_agent::link::topics::Topics::trust_bundle(),
        signer.trust_bundle(1, now, now + 3_600, &[]),
        true,
    )
    .await;
    peer
}
