//! Real Modbus TCP servers that look like SunSpec devices, for testing the agent's Modbus and
//! SunSpec driver without mocks: `tests/modbus/sunspec_server.py` (pymodbus) run by a private
//! Python environment with pinned packages, its register maps generated from the official SunSpec
//! model definitions that pysunspec2 ships. The script's docstring documents the SPEC a test
//! passes to [`SunSpecServer::start`] and the pymodbus server defects the harness works around.
//!
//! The Python environment is [`crate::pyenv`]'s, shared with the OCPP charge points.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::pyenv::workspace_root;
pub use crate::pyenv::{pyenv_python, PYMODBUS_VERSION, PYSERIAL_VERSION, PYSUNSPEC2_VERSION};

/// How long a server may take to start listening (the first import of pymodbus is slow on a
/// cold cache, and parallel tests share the CPU).
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// `tests/modbus/`: the server script and the tests' Python helpers (such as `scan.py`).
pub fn modbus_script_dir() -> PathBuf {
    workspace_root().join("tests/modbus")
}

/// The installed `sunspec2` package directory.
fn sunspec2_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(pyenv_python())
            .args([
                "-c",
                "import sunspec2, os; print(os.path.dirname(sunspec2.__file__))",
            ])
            .output()
            .expect("run the test environment's python");
        assert!(out.status.success(), "cannot import sunspec2: {out:?}");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}

/// The official definition of SunSpec model `id` (the whole `model_<id>.json` that pysunspec2
/// ships, the same file the server builds its map from), so a test can cross-check offsets and
/// lengths against the standard rather than against numbers copied into the test.
pub fn sunspec_model_json(id: u16) -> serde_json::Value {
    let path = sunspec2_dir().join(format!("models/json/model_{id}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("SunSpec model {id}: {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A simulated RS-485 bus: a `socat` pty pair, the agent's end and the device's end.
struct Bus {
    agent: PathBuf,
    device: PathBuf,
    socat: Child,
}

/// A running `sunspec_server.py`: on 127.0.0.1 ([`SunSpecServer::start`]) or as Modbus RTU on a
/// simulated serial bus ([`SunSpecServer::start_serial`]). Dropping it kills the server (and the
/// bus).
pub struct SunSpecServer {
    /// The TCP port; 0 for a server on a serial bus.
    pub port: u16,
    spec: PathBuf,
    port_file: PathBuf,
    log: PathBuf,
    stderr: PathBuf,
    child: Option<Child>,
    bus: Option<Bus>,
}

/// Numbers the files of the servers (and buses) that share one test directory.
static NEXT: AtomicUsize = AtomicUsize::new(0);

impl SunSpecServer {
    /// Writes `spec` (the SPEC format of `tests/modbus/sunspec_server.py`) into `dir` and starts
    /// a server for it on an ephemeral port; returns once it accepts connections.
    ///
    /// Panics, with the server's stderr, if it exits or is not listening within 15 s.
    pub fn start(dir: &Path, spec: &serde_json::Value) -> SunSpecServer {
        let mut server = SunSpecServer::new(dir, spec);
        server.spawn(0);
        server
    }

    /// Like [`SunSpecServer::start`], but Modbus RTU on a simulated RS-485 bus: starts `socat`
    /// with a pty pair linked as `dir/bus-N-agent` (the end the agent opens,
    /// [`SunSpecServer::serial_path`]) and `dir/bus-N-device`, and the server, with every unit
    /// of `spec` on that one bus, on the device end; returns once it serves.
    ///
    /// Panics, with socat's or the server's stderr, if either fails to start within 15 s.
    pub fn start_serial(dir: &Path, spec: &serde_json::Value) -> SunSpecServer {
        let mut server = SunSpecServer::new(dir, spec);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let agent = dir.join(format!("bus-{n}-agent"));
        let device = dir.join(format!("bus-{n}-device"));
        let socat_stderr = dir.join(format!("bus-{n}.socat-stderr"));
        let end = |link: &Path| format!("pty,raw,echo=0,link={}", link.display());
        let socat = Command::new("socat")
            .arg(end(&agent))
            .arg(end(&device))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&socat_stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn socat (is it installed?): {e}"));
        server.bus = Some(Bus {
            agent: agent.clone(),
            device: device.clone(),
            socat,
        });
        let deadline = Instant::now() + START_TIMEOUT;
        while !(agent.exists() && device.exists()) {
            let socat = &mut server.bus.as_mut().unwrap().socat;
            let exited = socat.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                panic!(
                    "socat made no pty pair ({}):\n{}",
                    exited.map_or("timed out".to_string(), |s| s.to_string()),
                    std::fs::read_to_string(&socat_stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        server.spawn(0);
        server
    }

    /// Writes `spec` into `dir` under this server's names; nothing runs yet.
    fn new(dir: &Path, spec: &serde_json::Value) -> SunSpecServer {
        // Several servers may share one test directory.
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = |ext: &str| dir.join(format!("sunspec-server-{n}.{ext}"));
        let server = SunSpecServer {
            port: 0,
            spec: name("spec.json"),
            port_file: name("port"),
            log: name("log"),
            stderr: name("stderr"),
            child: None,
            bus: None,
        };
        std::fs::write(&server.spec, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
        server
    }

    /// The serial device the agent opens (the agent's end of the bus), for a server started by
    /// [`SunSpecServer::start_serial`]; `None` for a TCP server.
    pub fn serial_path(&self) -> Option<PathBuf> {
        self.bus.as_ref().map(|bus| bus.agent.clone())
    }

    /// Starts the script binding `port` (0: ephemeral), or on the bus's device end, and waits for
    /// its port file.
    fn spawn(&mut self, port: u16) {
        let _ = std::fs::remove_file(&self.port_file);
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr)
            .unwrap();
        let mut cmd = Command::new(pyenv_python());
        cmd.arg(modbus_script_dir().join("sunspec_server.py"))
            .arg("--spec")
            .arg(&self.spec)
            .arg("--port-file")
            .arg(&self.port_file);
        match &self.bus {
            Some(bus) => cmd.arg("--serial").arg(&bus.device),
            None => cmd.arg("--port").arg(port.to_string()),
        };
        let child = cmd
            .arg("--log")
            .arg(&self.log)
            // No __pycache__ in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn sunspec_server.py");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            // The script renames the file into place complete, so any content is the port (or,
            // on a bus, the device's path).
            if let Ok(text) = std::fs::read_to_string(&self.port_file) {
                if self.bus.is_none() {
                    self.port = text.trim().parse().expect("port file holds a port number");
                }
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "sunspec_server.py exited ({status}) before listening:\n{}",
                    self.stderr_text()
                );
            }
            if Instant::now() > deadline {
                self.kill();
                panic!(
                    "sunspec_server.py not listening after {START_TIMEOUT:?}:\n{}",
                    self.stderr_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the server wrote to stderr (Python tracebacks, pymodbus' warnings), across restarts.
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGKILLs the server (a device losing power: connections die without a FIN from a clean
    /// shutdown path) and reaps it. Idempotent. On a serial bus only the server dies: the bus
    /// stays, so the agent's port stays open and sees silence.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the server if running and starts it again on the same port (or the same bus) with the register map
    /// as the SPEC describes it (writes made before are lost, as on a device reboot). The
    /// request log continues in the same file.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port;
        self.spawn(port);
        assert_eq!(self.port, port, "restarted server bound another port");
    }

    /// Whether the server process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Every line of the server's JSON log so far, oldest first. Request lines carry `conn`,
    /// `unit`, `function`, `address`, `count`, `start`, `end` (seconds since the epoch) and
    /// `exception` (null or the Modbus exception code sent); event lines carry `event`.
    pub fn request_log(&self) -> Vec<serde_json::Value> {
        let text = match std::fs::read_to_string(&self.log) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(e) => panic!("{}: {e}", self.log.display()),
        };
        // A line still being written has no newline yet; it is left for the next call.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("server log line {line:?}: {e}"))
            })
            .collect()
    }

    /// The overlap event lines of a serial server's log (`{"event": "overlap", "at", "bytes",
    /// "during": {"unit", "function", "address"}}`): bytes of a new request arrived before the
    /// previous request's response was completely written. Empty for a client that never has two
    /// requests outstanding on the bus.
    pub fn overlaps(&self) -> Vec<serde_json::Value> {
        self.request_log()
            .into_iter()
            .filter(|r| r["event"] == "overlap")
            .collect()
    }

    /// Just the request lines of [`SunSpecServer::request_log`].
    pub fn requests(&self) -> Vec<serde_json::Value> {
        self.request_log()
            .into_iter()
            .filter(|r| r.get("function").is_some())
            .collect()
    }
}

impl Drop for SunSpecServer {
    fn drop(&mut self) {
        self.kill();
        if let Some(mut bus) = self.bus.take() {
            let _ = bus.socat.kill();
            let _ = bus.socat.wait();
            let _ = std::fs::remove_file(&bus.device);
            let _ = std::fs::remove_file(&bus.agent);
        }
    }
}
