//! Real OCPP 1.6J charge points for testing the agent's central system without mocks:
//! `tests/ocpp/charge_point.py` (mobilityhouse's `ocpp` over `websockets`, pinned in
//! [`crate::pyenv`]) as a child process that a test drives with JSON control lines on its stdin and
//! reads through its JSON-lines log.
//!
//! The script's docstring is the reference for the SPEC, the control ops and the log lines. The
//! rule it is built on: a test asserts on the raw frames in the log ([`ChargePoint::frames_received`],
//! [`ChargePoint::frames_sent`]) and on each op's outcome line (which carries the raw answer),
//! never on what the `ocpp` library made of a frame, because that library's defects (listed in the
//! docstring) would otherwise hide an agent's fault. [`ChargePoint::violations`] lists every
//! received frame the script found not to be valid OCPP-J 1.6, so a test can require none.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::pyenv::{pyenv_python, workspace_root};

/// How long the script may take to make its first connection attempt (importing `ocpp` and
/// jsonschema is slow on a cold cache, and parallel tests share the CPU; the connect itself has
/// the script's own 10 s open timeout).
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the log is re-read while waiting for a line.
const POLL: Duration = Duration::from_millis(10);

/// `tests/ocpp/`: the charge point script and the harness's own central system.
pub fn ocpp_script_dir() -> PathBuf {
    workspace_root().join("tests/ocpp")
}

/// Every complete line of a JSON-lines file, oldest first; empty while the file does not exist. A
/// last line without its newline is still being written and is left for the next call.
pub fn json_lines(path: &Path) -> Vec<Value> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("{}: {e}", path.display()),
    };
    let complete = text.rfind('\n').map_or("", |end| &text[..end]);
    complete
        .lines()
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{}: log line {line:?}: {e}", path.display()))
        })
        .collect()
}

/// Polls `lines` until one satisfies `pred` and returns it; panics after `timeout` with `what()`
/// (evaluated then, so it can read a stderr written meanwhile) and the last lines, so a failing
/// test shows what happened instead.
pub fn wait_for_line(
    what: impl Fn() -> String,
    timeout: Duration,
    lines: impl Fn() -> Vec<Value>,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = lines();
        if let Some(line) = seen.iter().find(|l| pred(l)) {
            return line.clone();
        }
        if Instant::now() > deadline {
            let tail: Vec<String> = seen
                .iter()
                .rev()
                .take(30)
                .rev()
                .map(Value::to_string)
                .collect();
            panic!(
                "{}: no matching log line after {timeout:?}; last lines:\n{}",
                what(),
                tail.join("\n")
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Numbers the files of the charge points that share one test directory.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// A running `charge_point.py`. Dropping it kills the process (a charger losing power: its socket
/// dies without a close frame).
pub struct ChargePoint {
    /// The charge point id, from the SPEC.
    pub id: String,
    log: PathBuf,
    stderr: PathBuf,
    ready: PathBuf,
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Option<Child>>,
    /// Control lines written so far: the script numbers them the same way.
    seq: AtomicU64,
}

impl ChargePoint {
    /// Writes `spec` (the SPEC format of `tests/ocpp/charge_point.py`) into `dir`, starts the charge
    /// point and returns once its first connection attempt is over, whatever its result (see
    /// [`ChargePoint::ready_state`]).
    ///
    /// Panics, with the script's stderr, if it exits or is not ready within 30 s.
    pub fn start(dir: &Path, spec: &Value) -> ChargePoint {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = |ext: &str| dir.join(format!("charge-point-{n}.{ext}"));
        let spec_file = name("spec.json");
        std::fs::write(&spec_file, serde_json::to_vec_pretty(spec).unwrap()).unwrap();
        let (log, stderr, ready) = (name("log"), name("stderr"), name("ready"));
        let mut child = Command::new(pyenv_python())
            .arg(ocpp_script_dir().join("charge_point.py"))
            .arg("--spec")
            .arg(&spec_file)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--log")
            .arg(&log)
            // No __pycache__ in the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&stderr)
                    .unwrap(),
            )
            .spawn()
            .expect("spawn charge_point.py");
        let stdin = child.stdin.take();
        let cp = ChargePoint {
            id: spec["id"].as_str().unwrap_or_default().to_string(),
            log,
            stderr,
            ready,
            stdin: Mutex::new(stdin),
            child: Mutex::new(Some(child)),
            seq: AtomicU64::new(0),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        // The script renames the ready file into place complete.
        while !cp.ready.exists() {
            if !cp.is_running() {
                panic!(
                    "charge_point.py exited before it was ready:\n{}",
                    cp.stderr_text()
                );
            }
            if Instant::now() > deadline {
                cp.kill();
                panic!(
                    "charge_point.py not ready after {START_TIMEOUT:?}:\n{}",
                    cp.stderr_text()
                );
            }
            std::thread::sleep(POLL);
        }
        cp
    }

    /// How the first connection attempt ended: `connected`, `refused` (an HTTP status instead of
    /// the upgrade), `handshake_failed`, `connect_failed`, or `idle` (the SPEC said not to connect).
    pub fn ready_state(&self) -> String {
        let ready: Value = serde_json::from_slice(&std::fs::read(&self.ready).unwrap()).unwrap();
        ready["state"].as_str().unwrap().to_string()
    }

    /// Writes one control line (an op of the script's docstring) and returns its sequence number,
    /// which the op's outcome line carries as `seq` (see [`ChargePoint::outcome`]).
    pub fn send(&self, op: Value) -> u64 {
        let mut stdin = self.stdin.lock().unwrap();
        let pipe = stdin.as_mut().expect("the charge point's stdin is open");
        let mut line = serde_json::to_vec(&op).unwrap();
        line.push(b'\n');
        pipe.write_all(&line)
            .and_then(|()| pipe.flush())
            .unwrap_or_else(|e| {
                panic!(
                    "write to charge_point.py: {e}; stderr:\n{}",
                    self.stderr_text()
                )
            });
        self.seq.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The outcome line of the op numbered `seq`, waiting up to `timeout` for it.
    pub fn outcome(&self, seq: u64, timeout: Duration) -> Value {
        self.wait_for(|l| l["event"] == "op" && l["seq"] == seq, timeout)
    }

    /// Sends `op` and waits up to `timeout` for its outcome line (for a CALL: its answer, its own
    /// timeout or the connection's close).
    pub fn call(&self, op: Value, timeout: Duration) -> Value {
        let seq = self.send(op);
        self.outcome(seq, timeout)
    }

    /// Connector `connector` charging: a StatusNotification `Charging` and a MeterValues with
    /// all three measurands the agent maps (230 V, 16 A, 3680 W), each answered with a
    /// CALLRESULT, so the agent reports (and lists) the connector's device.
    pub fn report_charging(&self, connector: u32, timeout: Duration) {
        for op in [
            serde_json::json!({"op": "status", "connector": connector, "status": "Charging"}),
            serde_json::json!({"op": "meter_values", "connector": connector, "sampled": [
                {"measurand": "Voltage", "value": "230"},
                {"measurand": "Current.Import", "value": "16"},
                {"measurand": "Power.Active.Import", "value": "3680"}]}),
        ] {
            let outcome = self.call(op.clone(), timeout);
            assert_eq!(outcome["outcome"], "result", "{op}: {outcome}");
        }
    }

    /// From now on, answers the central system's `action` CALLs with `answer` (the SPEC's
    /// `answers` format: `{"status": ...}`, `{"error": ...}`, `{"silent": true}`, ...).
    pub fn set_answer(&self, action: &str, answer: Value, timeout: Duration) {
        let op = serde_json::json!({"op": "set_answer", "action": action, "answer": answer});
        let outcome = self.call(op.clone(), timeout);
        assert_eq!(outcome["outcome"], "done", "{op}: {outcome}");
    }

    /// The CALLs received on connection `conn` (1 for the first), parsed, oldest first.
    pub fn calls_on(&self, conn: u64) -> Vec<Value> {
        self.log()
            .iter()
            .filter(|l| l["event"] == "frame" && l["dir"] == "received" && l["conn"] == conn)
            .filter_map(|l| serde_json::from_str::<Value>(l["text"].as_str()?).ok())
            .filter(|f| f[0] == 2)
            .collect()
    }

    /// Every line of the log so far, oldest first.
    pub fn log(&self) -> Vec<Value> {
        json_lines(&self.log)
    }

    /// The first log line, from the start of the log, that satisfies `pred`, polling until one
    /// does; panics after `timeout` with the log's last lines and the script's stderr.
    pub fn wait_for(&self, pred: impl Fn(&Value) -> bool, timeout: Duration) -> Value {
        let what = || {
            format!(
                "charge point {} (stderr: {})",
                self.id,
                self.stderr_text().trim_end()
            )
        };
        wait_for_line(what, timeout, || self.log(), pred)
    }

    /// The raw text of every frame received from the central system, in order.
    pub fn frames_received(&self) -> Vec<String> {
        self.frames("received")
    }

    /// The raw text of every frame sent to the central system, in order.
    pub fn frames_sent(&self) -> Vec<String> {
        self.frames("sent")
    }

    fn frames(&self, dir: &str) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|l| l["event"] == "frame" && l["dir"] == dir)
            .map(|l| l["text"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The received frames that are not valid OCPP-J 1.6 (their `violations` not empty), and any
    /// `internal_error` line of the script: what a test of a correct central system expects to be
    /// empty.
    pub fn violations(&self) -> Vec<Value> {
        self.log()
            .into_iter()
            .filter(|l| {
                l["event"] == "internal_error"
                    || (l["event"] == "frame"
                        && l["violations"].as_array().is_some_and(|v| !v.is_empty()))
            })
            .collect()
    }

    /// What the script wrote to stderr (Python tracebacks, the `ocpp` library's own logging).
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Whether the script is still running.
    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .unwrap()
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Stops the script the way it stops by itself: closes its stdin, so it closes its connection
    /// (code 1001) and exits; SIGKILLs it if it has not exited within `timeout`. Idempotent.
    pub fn stop(&self, timeout: Duration) {
        self.stdin.lock().unwrap().take();
        let deadline = Instant::now() + timeout;
        while self.is_running() && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        self.kill();
    }

    /// SIGKILLs the script and reaps it. Idempotent.
    pub fn kill(&self) {
        self.stdin.lock().unwrap().take();
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChargePoint {
    fn drop(&mut self) {
        self.kill();
    }
}
