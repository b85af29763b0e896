//! The agent under test as a child process: its configuration file, the binary (the one cargo
//! built for the calling test, or `TEXTURE_AGENT_BIN`), and a running `texture-agent run` whose
//! JSON log lines are collected as they arrive.
//!
//! `CARGO_BIN_EXE_texture-agent` exists only while cargo builds the agent's own integration
//! tests and benches, so every function that starts the agent takes the caller's
//! `env!("CARGO_BIN_EXE_texture-agent")` as `bin`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use texture_agent::sim::platform::PlatformSigner;

use crate::pki::{CertFiles, Pki, BROKER_NAME};

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

    /// `self` pinning `signer`'s root key, in `workspace`.
    pub fn trusting(self, signer: &PlatformSigner, workspace: &str) -> AgentConfig {
        AgentConfig {
            trust_root: Some(signer.root_public_key()),
            workspace_id: Some(workspace.to_owned()),
            ..self
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

    /// [`AgentConfig::write`], but as a gateway runs in production rather than in a test: the
    /// default keepalive (30 s, not the tests' 5 s) and `info` logging. For benches that
    /// measure what a real gateway costs.
    pub fn write_production(&self, dir: &Path) -> PathBuf {
        let path = self.write(dir);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace("keepalive_secs = 5\n", "")
            .replace("level = \"debug\"", "level = \"info\"");
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn state_dir(&self, dir: &Path) -> PathBuf {
        dir.join(format!("state-{}", self.device_id))
    }
}

/// A process driver's script (`sh firehose.sh`, written under `dir`) that prints `line`, a
/// driver protocol line, as fast as the shell can: the driver at full rate of the saturation
/// tests and benches.
pub fn firehose_script(dir: &Path, line: &str) -> PathBuf {
    let script = dir.join("firehose.sh");
    std::fs::write(
        &script,
        format!("line='{line}'\nwhile :; do printf '%s\\n' \"$line\"; done\n"),
    )
    .unwrap();
    script
}

/// The `[[drivers]]` entry of a process driver (its script written under `dir`) with one
/// battery, `bat-count`, that appends the `commandId` of every command it runs to `log`, one
/// per line, and answers it succeeded: the device's own record of what it was made to do,
/// which survives the agent (a test counts executions there, not in the agent's replies).
/// Each command takes `takes` between the record and the answer, as a device's does.
pub fn counting_driver(dir: &Path, log: &Path, takes: Duration) -> String {
    let script = dir.join("counting_driver.py");
    std::fs::write(&script, COUNTING_DRIVER).unwrap();
    format!(
        "[[drivers]]\nkind = \"process\"\nname = \"counting\"\n\
         command = [\"python3\", \"-u\", \"{}\", \"{}\", \"{}\"]\n",
        script.display(),
        log.display(),
        takes.as_secs_f64()
    )
}

const COUNTING_DRIVER: &str = r#"
import json, sys, time
log = open(sys.argv[1], "a")
takes = float(sys.argv[2])
state = {"type": "battery", "charge": 5000.0, "chargePercentage": 40.0, "chargingState": "idle",
         "chargeRate": 0.0, "backupReserve": 20, "gridStatus": "idle", "gridPower": 0.0,
         "strategy": "test"}
def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
emit({"type": "state", "deviceId": "bat-count", "state": state})
for line in sys.stdin:
    msg = json.loads(line)
    if msg["type"] != "command": continue
    log.write(msg["commandId"] + "\n"); log.flush()
    time.sleep(takes)
    emit({"type": "result", "commandId": msg["commandId"], "ok": True, "result": {}})
"#;

/// The texture-agent binary under test: `bin` (the one cargo built for this run), or another
/// build named by `TEXTURE_AGENT_BIN` (the cross-compiled ARM binary in the QEMU tests).
pub fn agent_binary(bin: &str) -> String {
    std::env::var("TEXTURE_AGENT_BIN").unwrap_or_else(|_| bin.to_string())
}

/// A command that runs the agent binary, through `TEXTURE_AGENT_RUNNER` when set (for example
/// `qemu-aarch64-static`, since binfmt_misc is not available to run foreign binaries directly).
pub fn agent_process(bin: &str) -> Command {
    match std::env::var("TEXTURE_AGENT_RUNNER") {
        Ok(runner) if !runner.is_empty() => {
            let mut c = Command::new(runner);
            c.arg(agent_binary(bin));
            c
        }
        _ => Command::new(agent_binary(bin)),
    }
}

/// Runs `texture-agent --config PATH ARGS...` to completion.
pub fn agent_command(bin: &str, config: &Path, args: &[&str]) -> std::process::Output {
    agent_process(bin)
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
    pub fn spawn(bin: &str, config: &Path) -> Agent {
        Agent::spawn_with_env(bin, config, &[])
    }

    /// [`Agent::spawn`] with extra environment variables (for example libfaketime's).
    pub fn spawn_with_env(bin: &str, config: &Path, env: &[(&str, &str)]) -> Agent {
        let mut child = agent_process(bin)
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

    /// The first `n` log lines whose `message` equals `message`, waiting for them. The agent's
    /// stderr is read by a thread, so a line can arrive after what the agent did next was
    /// already seen on the broker: a test that saw the effect waits for the line, never reads
    /// it once.
    pub fn wait_for_logs(
        &self,
        message: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.logs_with_message(message);
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{} of {n} log lines {message:?} within {timeout:?}; log:\n{}",
                lines.len(),
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
