//! External driver processes under supervision: the protocol, and the promise that no driver,
//! however broken, takes the agent down.
//!
//! Each test runs real child processes (python3 and sh) and bounds every wait with a timeout,
//! so a regression fails the test instead of hanging it. Most drive a supervisor in-process;
//! the last runs the agent binary against mosquitto to check what the platform sees.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use texture_agent::agent::service::{shutdown_channel, ShutdownTrigger};
use texture_agent::drivers::process::{supervise, CommandFailure, DriverStats};
use texture_agent::drivers::{DriverCommand, Sample, SAMPLE_QUEUE};
use texture_agent::model::device::DeviceState;
use texture_agent_testkit as kit;

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

/// Generous for a loaded CI machine; a healthy run needs a fraction of it.
const PATIENCE: Duration = Duration::from_secs(10);

/// One supervised driver and the handles a test needs to talk to it.
struct Harness {
    samples: mpsc::Receiver<Sample>,
    commands: mpsc::Sender<DriverCommand>,
    stats: Arc<DriverStats>,
    trigger: ShutdownTrigger,
    task: JoinHandle<()>,
}

fn start(command: Vec<String>, max_line_bytes: usize) -> Harness {
    let (samples_tx, samples) = mpsc::channel(SAMPLE_QUEUE);
    let (commands, commands_rx) = mpsc::channel(8);
    let (trigger, shutdown) = shutdown_channel();
    let stats = Arc::new(DriverStats::default());
    let task = tokio::spawn(supervise(
        "test-driver".into(),
        command,
        max_line_bytes,
        samples_tx,
        commands_rx,
        shutdown,
        stats.clone(),
    ));
    Harness {
        samples,
        commands,
        stats,
        trigger,
        task,
    }
}

impl Harness {
    async fn next_sample(&mut self) -> Sample {
        timeout(PATIENCE, self.samples.recv())
            .await
            .expect("no sample in time")
            .expect("sample channel closed")
    }

    /// Sends a command and returns the receiver its outcome will arrive on.
    async fn command(
        &self,
        command_id: &str,
        device_id: &str,
        slug: &str,
        input: serde_json::Value,
    ) -> oneshot::Receiver<Result<serde_json::Value, CommandFailure>> {
        let (done, outcome) = oneshot::channel();
        let command = DriverCommand {
            command_id: command_id.into(),
            device_id: device_id.into(),
            slug: slug.into(),
            input: input.as_object().expect("input is an object").clone(),
            safety: Default::default(),
            done,
        };
        timeout(PATIENCE, self.commands.send(command))
            .await
            .expect("command queue full")
            .expect("supervisor gone");
        outcome
    }

    /// Shuts the supervisor down and checks that it returns promptly.
    async fn stop(self) {
        self.trigger.trigger();
        timeout(Duration::from_secs(2), self.task)
            .await
            .expect("supervise did not return within 2 s of shutdown")
            .expect("supervise panicked");
    }
}

fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

fn battery_reserve(sample: &Sample) -> f64 {
    match &sample.state {
        DeviceState::Battery(b) => b.backup_reserve.expect("a simulated battery has a reserve"),
        other => panic!("expected a battery, got {other:?}"),
    }
}

#[tokio::test]
async fn example_driver_reports_state_and_runs_a_command() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/drivers/example-battery.py");
    let mut h = start(
        vec![
            "env".into(),
            "EXAMPLE_INTERVAL_SECS=0.2".into(),
            "python3".into(),
            example.display().to_string(),
        ],
        64 * 1024,
    );

    let first = h.next_sample().await;
    assert_eq!(first.device_id, "bat-ext-1");
    assert!(matches!(first.state, DeviceState::Battery(_)), "{first:?}");

    let outcome = h
        .command(
            "c1",
            "bat-ext-1",
            "battery:set-reserve",
            json!({"chargePercentage": 42}),
        )
        .await;
    let result = timeout(PATIENCE, outcome).await.expect("no answer in time");
    assert_eq!(result, Ok(Ok(json!({"backupReserve": 42.0}))));

    // Samples reported before the command may still be queued; the new reserve must follow.
    timeout(PATIENCE, async {
        while battery_reserve(&h.next_sample().await) != 42.0 {}
    })
    .await
    .expect("no sample with backupReserve 42");

    let outcome = h
        .command("c2", "bat-ext-1", "battery:explode", json!({}))
        .await;
    let refused = timeout(PATIENCE, outcome).await.expect("no answer in time");
    assert!(
        matches!(refused, Ok(Err(_))),
        "unknown slug accepted: {refused:?}"
    );

    assert_eq!(h.stats.spawns.load(Ordering::Relaxed), 1);
    assert_eq!(h.stats.malformed_lines.load(Ordering::Relaxed), 0);
    h.stop().await;
}

/// A driver that, on every run, prints two malformed lines, a 5000-byte line (oversized at a
/// 1024-byte limit), one valid state for `bad-1`, and exits with status 1.
fn bad_driver(dir: &Path) -> PathBuf {
    let valid = json!({
        "type": "state", "deviceId": "bad-1",
        "state": {
            "type": "battery", "charge": 1000.0, "chargePercentage": 10.0,
            "chargingState": "idle", "chargeRate": 0.0, "backupReserve": 5.0,
            "gridStatus": "idle", "gridPower": 0.0, "strategy": "backup"
        }
    });
    script(
        dir,
        "bad-driver.sh",
        &format!(
            "echo 'this is not json'\n\
             echo '{{\"type\":\"mystery\"}}'\n\
             echo 'a line on stderr' >&2\n\
             head -c 5000 /dev/zero | tr '\\0' x; echo\n\
             echo '{valid}'\n\
             exit 1\n"
        ),
    )
}

#[tokio::test]
async fn bad_driver_is_restarted_and_never_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let bad = bad_driver(dir.path());
    let mut h = start(vec!["sh".into(), bad.display().to_string()], 1024);

    // One valid line per incarnation: a second sample means the driver was restarted.
    for _ in 0..2 {
        let sample = h.next_sample().await;
        assert_eq!(sample.device_id, "bad-1");
        assert_eq!(battery_reserve(&sample), 5.0);
    }

    let stats = &h.stats;
    assert!(stats.spawns.load(Ordering::Relaxed) >= 2);
    assert!(stats.exits.load(Ordering::Relaxed) >= 1);
    // Two per incarnation: the garbage and the unknown type.
    assert!(stats.malformed_lines.load(Ordering::Relaxed) >= 2);
    assert!(stats.oversized_lines.load(Ordering::Relaxed) >= 1);
    assert!(stats.samples.load(Ordering::Relaxed) >= 2);
    assert!(
        !h.task.is_finished(),
        "the supervisor gave up on a bad driver"
    );
    h.stop().await;
}

#[tokio::test]
async fn driver_dying_mid_command_fails_that_command() {
    let dir = tempfile::tempdir().unwrap();
    let quitter = script(dir.path(), "quitter.sh", "read command\nexit 0\n");
    let h = start(vec!["sh".into(), quitter.display().to_string()], 1024);

    let outcome = h
        .command(
            "c1",
            "dev-1",
            "battery:set-reserve",
            json!({"chargePercentage": 50}),
        )
        .await;
    let answer = timeout(Duration::from_secs(2), outcome)
        .await
        .expect("the command was left hanging after its driver died");
    match answer {
        Ok(Err(reason)) => assert_eq!(reason, CommandFailure::DriverExited),
        Err(_dropped) => {}
        Ok(Ok(value)) => panic!("a dead driver's command succeeded: {value}"),
    }
    h.stop().await;
}

#[tokio::test]
async fn abandoned_command_is_cancelled_at_the_driver() {
    let dir = tempfile::tempdir().unwrap();
    // Never answers a command; reports a state as its receipt for a cancel.
    let receipt = json!({
        "type": "state", "deviceId": "cancel-seen",
        "state": {
            "type": "inverter", "power": 0.0, "gridStatus": "idle", "gridPower": 0.0
        }
    });
    let slow = script(
        dir.path(),
        "slow.sh",
        &format!(
            "while read -r line; do\n\
               case \"$line\" in\n\
                 *'\"type\":\"cancel\"'*) echo '{receipt}' ;;\n\
               esac\n\
             done\n"
        ),
    );
    let mut h = start(vec!["sh".into(), slow.display().to_string()], 1024);

    let outcome = h
        .command("c1", "dev-1", "battery:set-reserve", json!({}))
        .await;
    // The caller gives up, as the command layer does at its deadline.
    drop(outcome);

    let sample = h.next_sample().await;
    assert_eq!(sample.device_id, "cancel-seen");
    h.stop().await;
}

/// Polls `path` until it holds `needle`; panics after [`PATIENCE`].
async fn wait_for_text(path: &Path, needle: &str) -> String {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(Instant::now() < deadline, "{needle:?} never in:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// At the agent's stop (PROTOCOL 15.5) a driver gets a `cancel` for each command in flight,
/// then the end of its stdin; one that exits then is not killed, and is not waited for longer.
#[tokio::test]
async fn at_shutdown_the_driver_is_told_to_cancel_and_its_stdin_ends() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stdin.log");
    let driver = script(
        dir.path(),
        "polite.sh",
        &format!(
            "while read -r line; do echo \"$line\" >> '{log}'; done\necho EOF >> '{log}'\n",
            log = log.display()
        ),
    );
    let h = start(vec!["sh".into(), driver.display().to_string()], 1024);
    let outcome = h
        .command("c1", "dev-1", "battery:set-reserve", json!({}))
        .await;
    wait_for_text(&log, "\"c1\"").await;
    let stopping = Instant::now();
    h.stop().await;
    let took = stopping.elapsed();
    let text = wait_for_text(&log, "EOF").await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].contains("\"type\":\"command\""), "{text}");
    assert_eq!(lines[1], r#"{"type":"cancel","commandId":"c1"}"#, "{text}");
    assert_eq!(lines[2], "EOF");
    assert!(
        took < texture_agent::drivers::STOP_GRACE,
        "a driver that exits at the end of its stdin is not held for the grace: {took:?}"
    );
    assert_eq!(outcome.await, Ok(Err(CommandFailure::ShuttingDown)));
}

/// A driver that does not exit when its stdin ends is killed once the stop grace is over.
#[tokio::test]
async fn at_shutdown_a_driver_that_lingers_is_killed_after_the_grace() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("stdin.log");
    let pid_file = dir.path().join("pid");
    let driver = script(
        dir.path(),
        "stubborn.sh",
        &format!(
            "echo $$ > '{pid}'\nwhile read -r line; do echo \"$line\" >> '{log}'; done\nexec sleep 60\n",
            pid = pid_file.display(),
            log = log.display()
        ),
    );
    let h = start(vec!["sh".into(), driver.display().to_string()], 1024);
    let _outcome = h
        .command("c1", "dev-1", "battery:set-reserve", json!({}))
        .await;
    wait_for_text(&log, "\"c1\"").await;
    let pid = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .to_owned();
    let stopping = Instant::now();
    h.stop().await;
    let took = stopping.elapsed();
    assert!(
        took >= texture_agent::drivers::STOP_GRACE,
        "killed before its grace was over: {took:?}"
    );
    wait_for_text(&log, "\"cancel\"").await;
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the driver (pid {pid}) outlived the stop"
    );
}

#[tokio::test]
async fn commands_without_a_running_driver_are_refused() {
    let h = start(vec!["/nonexistent/texture-driver".into()], 1024);

    let outcome = h
        .command("c1", "dev-1", "battery:set-reserve", json!({}))
        .await;
    let answer = timeout(PATIENCE, outcome).await.expect("no answer in time");
    let answer = answer.map(|outcome| outcome.map_err(|failure| failure.to_string()));
    assert_eq!(answer, Ok(Err("driver not running".to_string())));
    assert_eq!(h.stats.spawns.load(Ordering::Relaxed), 0);
    h.stop().await;
}

/// The `drivers` entry named `name` in a gateway health point, if the point has one.
fn driver_health<'a>(health: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    health["drivers"]
        .as_array()?
        .iter()
        .find(|d| d["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_driver_counters_reach_the_platform_in_the_health_point() {
    const GATEWAY: &str = "gw-drivers";
    let pki = kit::Pki::new();
    let broker = kit::Mosquitto::start(&pki);
    let telemetry = kit::device_topic(GATEWAY, "telemetry");
    let mut platform =
        kit::Peer::connect(&pki, broker.port, kit::PLATFORM_CLIENT, &[&telemetry]).await;
    let bad = bad_driver(pki.path());
    let mut cfg = kit::AgentConfig::new(&pki, broker.port, GATEWAY);
    // A simulated driver beside the bad one: it must not be listed in the health point.
    cfg.extra_toml = format!(
        "[telemetry]\nbatch_max_ms = 50\nhealth_interval_secs = 1\n\n\
         [[drivers]]\nkind = \"process\"\nname = \"bad\"\ncommand = [\"sh\", \"{}\"]\n\
         max_line_bytes = 1024\n\n\
         [[drivers]]\nkind = \"simulated\"\ndevice_id = \"sim-1\"\ndevice_type = \"battery\"\n",
        bad.display()
    );
    let agent = kit::Agent::spawn(BIN, &cfg.write(pki.path()));

    // Health points come every second; the counters grow with each run of the driver, so wait
    // for the first point that shows a restart and both kinds of skipped line.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_health = serde_json::Value::Null;
    let bad_health = 'found: loop {
        assert!(
            Instant::now() < deadline,
            "no health point showed the bad driver's restarts and skipped lines; \
             last health point: {last_health}\nagent log:\n{}",
            agent.log_dump()
        );
        for batch in platform
            .collect(&telemetry, Duration::from_millis(300))
            .await
        {
            for point in batch.json()["points"].as_array().into_iter().flatten() {
                if point.get("health").is_none() {
                    continue;
                }
                assert_eq!(point["deviceId"], GATEWAY, "{point}");
                last_health = point["health"].clone();
                let Some(bad) = driver_health(&last_health, "bad") else {
                    continue;
                };
                if bad["restarts"].as_u64() >= Some(1)
                    && bad["malformedLines"].as_u64() > Some(0)
                    && bad["oversizedLines"].as_u64() > Some(0)
                {
                    break 'found bad.clone();
                }
            }
        }
    };

    assert_eq!(
        last_health["drivers"].as_array().map(Vec::len),
        Some(1),
        "only process drivers are listed: {last_health}"
    );
    // Two malformed lines and one oversized line per run, and the runs so far include a restart.
    let restarts = bad_health["restarts"].as_u64().unwrap();
    assert!(
        bad_health["malformedLines"].as_u64().unwrap() >= 2 * restarts,
        "{bad_health}"
    );
    assert!(bad_health["samples"].as_u64().unwrap() >= 1, "{bad_health}");
    assert!(bad_health["running"].is_boolean(), "{bad_health}");
}

// --- The sandbox: what a hostile process driver can reach (issue 13, item 3) ---------------

/// A hostile driver, standard-library Python: waits for `<out>/go`, tries every way at the
/// agent's secrets it knows, writes what each attempt got to `<out>/results.json` (a
/// directory it is allowed to write), then behaves like a normal driver for device `<device>`.
/// An attempt "succeeds" only if it revealed or changed something.
const HOSTILE_DRIVER: &str = r#"
import ctypes, json, os, socket, sys, time
out, device, state_dir, runtime_dir, key_file, mode = sys.argv[1:7]
libc = ctypes.CDLL(None, use_errno=True)
deadline = time.time() + 30
while not os.path.exists(os.path.join(out, "go")) and time.time() < deadline:
    time.sleep(0.02)
results = {}
def attempt(name, fn):
    try:
        results[name] = {"ok": True, "got": repr(fn())[:200]}
    except Exception as e:
        results[name] = {"ok": False, "error": "%s: %s" % (type(e).__name__, e)}
def read(path):
    with open(path, "rb") as f:
        return f.read()
def nonempty(listing):
    if not listing:
        raise FileNotFoundError("nothing there")
    return listing
def sys_ok(result, what):
    if result != 0:
        raise OSError(ctypes.get_errno(), "%s: %s" % (what, os.strerror(ctypes.get_errno())))
    return "done"
secrets = ["device-key", "owner-binding.json", "replay.journal", "trust-bundle.jws"]
# 1. Read the agent's state.
for name in secrets:
    attempt("read " + name, lambda name=name: read(os.path.join(state_dir, name)))
attempt("list state.dir", lambda: nonempty(os.listdir(state_dir)))
attempt("list runtime_dir", lambda: nonempty(os.listdir(runtime_dir)))
# 2. Rewrite the owner binding.
def write_binding():
    with open(os.path.join(state_dir, "owner-binding.json"), "w") as f:
        f.write('{"version":99,"referenceId":"attacker"}')
    return "written"
if mode == "attack":
    attempt("write owner-binding.json", write_binding)
# 3. The TLS client key.
attempt("read client key", lambda: read(key_file))
# 4. Pair the gateway through the control socket.
def pair():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(os.path.join(runtime_dir, "control.sock"))
    s.sendall(b'{"op":"pair"}\n')
    reply = s.recv(4096)
    if b'"event":"code"' not in reply:
        raise ValueError("no code: %r" % reply)
    return reply
attempt("pair through control.sock", pair)
# 5. Around the mounts, through the agent's /proc entries and ptrace.
agent = os.getppid()
attempt("/proc/agent/root", lambda: read("/proc/%d/root%s/device-key" % (agent, state_dir)))
attempt("/proc/agent/cwd", lambda: nonempty(os.listdir("/proc/%d/cwd" % agent)))
def agent_fds():
    # Listing the numbers may work (as root); resolving or opening one must not.
    got = []
    for fd in os.listdir("/proc/%d/fd" % agent):
        for how in (os.readlink, lambda p: open(p, "rb").close()):
            try:
                got.append((fd, how("/proc/%d/fd/%s" % (agent, fd))))
            except OSError:
                pass
    if not got:
        raise PermissionError("no descriptor of the agent resolved or opened")
    return got
attempt("/proc/agent/fd", agent_fds)
attempt("/proc/agent/environ", lambda: read("/proc/%d/environ" % agent))
attempt("/proc/agent/mem", lambda: open("/proc/%d/mem" % agent, "rb").close())
def ptrace():
    # In a child, so that its exit detaches at once; PTRACE_SEIZE does not stop the agent.
    pid = os.fork()
    if pid == 0:
        os._exit(0 if libc.ptrace(0x4206, agent, 0, 0) == 0 else 1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise PermissionError("PTRACE_SEIZE refused")
    return "attached"
attempt("ptrace agent", ptrace)
# 6. Secrets in the environment: reported whole, for the test to compare.
results["environment"] = dict(os.environ)
# 7. Take the mounts away, or look under them. Only from a mount namespace of its own: a bind
# of / that succeeded on the host would put the whole file system under the test's temporary
# directory, for its clean-up to delete. Not attempted, they count as got through.
def own_namespace():
    try:
        return os.readlink("/proc/self/ns/mnt") != os.readlink("/proc/%d/ns/mnt" % agent)
    except OSError:
        return True
mount_attacks = ["umount state.dir", "umount -l state.dir", "umount client key",
    "remount state.dir rw", "bind / to look under", "read after the mount attacks",
    "read under a bind of /"]
if mode == "attack" and own_namespace():
    attempt("umount state.dir", lambda: sys_ok(libc.umount2(state_dir.encode(), 0), "umount"))
    attempt("umount -l state.dir", lambda: sys_ok(libc.umount2(state_dir.encode(), 2), "umount -l"))
    attempt("umount client key", lambda: sys_ok(libc.umount2(key_file.encode(), 2), "umount -l"))
    attempt("remount state.dir rw", lambda: sys_ok(libc.mount(None, state_dir.encode(), None, 32, None), "remount"))
    peek = os.path.join(out, "peek")
    os.makedirs(peek, exist_ok=True)
    attempt("bind / to look under", lambda: sys_ok(libc.mount(b"/", peek.encode(), None, 4096, None), "bind"))
    attempt("read after the mount attacks", lambda: read(os.path.join(state_dir, "device-key")))
    attempt("read under a bind of /", lambda: read(peek + state_dir + "/device-key"))
else:
    for name in mount_attacks:
        results[name] = {"ok": "not attempted: no mount namespace of its own"}
# What a driver needs keeps working.
attempt("benign: world-readable file", lambda: read("/etc/passwd"))
attempt("benign: /dev/null", lambda: open("/dev/null", "r+b").close() or "opened")
with open(os.path.join(out, "results.tmp"), "w") as f:
    json.dump(results, f)
os.rename(os.path.join(out, "results.tmp"), os.path.join(out, "results.json"))
state = {"type": "state", "deviceId": device, "state": {"type": "inverter", "power": 1.0,
         "gridStatus": "idle", "gridPower": 0.0}}
while True:
    print(json.dumps(state), flush=True)
    time.sleep(0.2)
"#;

/// Polls `path` until it exists and parses as JSON; panics after `patience`.
fn wait_for_json(
    path: &Path,
    patience: Duration,
    context: impl Fn() -> String,
) -> serde_json::Value {
    let deadline = Instant::now() + patience;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if let Ok(value) = serde_json::from_str(&text) {
                return value;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no {} within {patience:?}\n{}",
            path.display(),
            context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every attack of issue 13 item 3, by a driver of the real agent: reading the device key,
/// owner binding, replay journal and trust bundle, rewriting the binding, reading the TLS key,
/// pairing through the control socket, going through `/proc/<agent>` or ptrace, finding
/// anything of the agent's in its environment, and removing or looking under the mounts that
/// hide them. A sandboxed driver fails at each and still works as a driver. The same script
/// with `sandbox = false` is the control: it succeeds at the file and socket attacks, which
/// shows the attacks are real (and is what every driver could do before the sandbox).
///
/// The tests run as root, so this also covers an agent run as root: the driver is root in its
/// namespace, with every capability there and none outside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_driver_reaches_none_of_the_agents_secrets() {
    const GATEWAY: &str = "gw-hostile";
    let telemetry = kit::device_topic(GATEWAY, "telemetry");
    let kit::Testbed {
        pki,
        broker,
        signer,
        peer: mut platform,
    } = kit::Testbed::start(
        texture_agent::sim::platform::PlatformSigner::generate("platform-1"),
        &[&telemetry],
    )
    .await;
    let mut cfg = kit::AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, "ws-hostile");
    cfg.owner = Some("owner-1".into());
    let state_dir = cfg.state_dir(pki.path());
    let runtime_dir = pki.path().join(format!("run-{GATEWAY}"));
    let key_file = cfg.client.as_ref().unwrap().key.clone();
    let script = script(pki.path(), "hostile.py", HOSTILE_DRIVER);
    let driver = |name: &str, sandbox: bool, mode: &str| {
        let out = pki.path().join(format!("out-{name}"));
        std::fs::create_dir_all(&out).unwrap();
        // Writable by the driver whatever uid the agent runs as.
        std::fs::set_permissions(&out, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let argv = [
            "python3".to_string(),
            script.display().to_string(),
            out.display().to_string(),
            format!("dev-{name}"),
            state_dir.display().to_string(),
            runtime_dir.display().to_string(),
            key_file.display().to_string(),
            mode.to_string(),
        ];
        let toml = format!(
            "[[drivers]]\nkind = \"process\"\nname = \"{name}\"\ncommand = {}\nsandbox = {sandbox}\n\n",
            serde_json::to_string(&argv).unwrap()
        );
        (out, toml)
    };
    let (confined, confined_toml) = driver("confined", true, "attack");
    let (control, control_toml) = driver("control", false, "control");
    cfg.extra_toml = format!("[telemetry]\nbatch_max_ms = 50\n\n{confined_toml}{control_toml}");
    let agent = kit::Agent::spawn(BIN, &cfg.write(pki.path()));

    // Every secret the attacks aim at exists, and its path is the one the driver was given.
    let deadline = Instant::now() + Duration::from_secs(20);
    let secrets = [
        "device-key",
        "owner-binding.json",
        "replay.journal",
        "trust-bundle.jws",
    ];
    while !secrets.iter().all(|s| state_dir.join(s).exists())
        || !runtime_dir.join("control.sock").exists()
    {
        assert!(
            Instant::now() < deadline,
            "the agent's state never appeared in full: {:?}\nagent log:\n{}",
            std::fs::read_dir(&state_dir).map(|d| d.count()),
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let binding_before = std::fs::read(state_dir.join("owner-binding.json")).unwrap();
    for out in [&confined, &control] {
        std::fs::write(out.join("go"), b"").unwrap();
    }
    let results = |out: &Path| {
        wait_for_json(&out.join("results.json"), Duration::from_secs(20), || {
            format!("agent log:\n{}", agent.log_dump())
        })
    };
    let confined_results = results(&confined);
    let control_results = results(&control);

    let attacks = [
        "read device-key",
        "read owner-binding.json",
        "read replay.journal",
        "read trust-bundle.jws",
        "list state.dir",
        "list runtime_dir",
        "write owner-binding.json",
        "read client key",
        "pair through control.sock",
        "/proc/agent/root",
        "/proc/agent/cwd",
        "/proc/agent/fd",
        "/proc/agent/environ",
        "/proc/agent/mem",
        "ptrace agent",
        "umount state.dir",
        "umount -l state.dir",
        "umount client key",
        "remount state.dir rw",
        "bind / to look under",
        "read after the mount attacks",
        "read under a bind of /",
    ];
    let succeeded: Vec<String> = attacks
        .iter()
        .filter(|a| confined_results[**a]["ok"] != false)
        .map(|a| format!("{a}: {}", confined_results[*a]))
        .collect();
    assert!(
        succeeded.is_empty(),
        "a sandboxed driver got through:\n{}",
        succeeded.join("\n")
    );
    for benign in ["benign: world-readable file", "benign: /dev/null"] {
        assert_eq!(
            confined_results[benign]["ok"], true,
            "{benign}: {}",
            confined_results[benign]
        );
    }
    // Exactly the environment PROTOCOL 15.1 promises, whatever the agent's own held.
    assert_eq!(
        confined_results["environment"],
        json!({
            "PATH": texture_agent::drivers::process::DRIVER_PATH,
            "LANG": "C.UTF-8",
            "HOME": "/",
            "TEXTURE_DRIVER_NAME": "confined",
        })
    );
    assert_eq!(
        std::fs::read(state_dir.join("owner-binding.json")).unwrap(),
        binding_before,
        "the owner binding changed"
    );

    // The control shows the attacks work on a driver without the sandbox: the read and socket
    // attacks are exactly what any driver could do before (it skips the writes and mounts).
    for attack in [
        "read device-key",
        "read owner-binding.json",
        "read replay.journal",
        "read trust-bundle.jws",
        "read client key",
        "pair through control.sock",
    ] {
        assert_eq!(
            control_results[attack]["ok"], true,
            "the unconfined control failed at {attack:?}, so the attack itself is broken: {}",
            control_results[attack]
        );
    }
    assert_eq!(
        control_results["environment"]["TEXTURE_DRIVER_NAME"], "control",
        "sandbox = false still gets the empty environment"
    );

    // And the confined driver is still a driver: its states reach the platform.
    let deadline = Instant::now() + Duration::from_secs(20);
    'seen: loop {
        assert!(
            Instant::now() < deadline,
            "no telemetry from the sandboxed driver's device; agent log:\n{}",
            agent.log_dump()
        );
        for batch in platform
            .collect(&telemetry, Duration::from_millis(300))
            .await
        {
            let points = batch.json()["points"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if points.iter().any(|p| p["deviceId"] == "dev-confined") {
                break 'seen;
            }
        }
    }
}

/// A control-socket client: connects to `argv[1]`, asks to pair, prints the first line back.
const CONTROL_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
s.sendall(b'{"op":"pair"}\n')
print(s.makefile().readline().strip())
"#;

/// The control socket's peer check (`SO_PEERCRED`): root and the agent's own user in the
/// agent's user namespace are served; root inside a nested user namespace (where drivers run)
/// and any other uid are refused with one `error` event, even when the socket's permissions
/// would let them connect. The permissions are opened up here to test the check on its own.
#[tokio::test]
async fn the_control_socket_serves_only_root_and_the_agents_user_in_its_namespace() {
    use texture_agent::inbound::pairing::control::{self, ControlEvent};
    let dir = tempfile::tempdir().unwrap();
    let runtime = dir.path().join("run");
    std::fs::create_dir(&runtime).unwrap();
    let listener = control::bind(&runtime).unwrap();
    let socket = control::socket_path(&runtime);
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        (dir.path(), 0o755),
        (runtime.as_path(), 0o755),
        (socket.as_path(), 0o666),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let client = script(dir.path(), "client.py", CONTROL_CLIENT);
    let (calls_tx, mut calls) = mpsc::channel(8);
    let server = tokio::spawn(control::serve(listener, calls_tx));
    // Admitted clients get an `expired` event from this stand-in for the dispatcher.
    let dispatcher = tokio::spawn(async move {
        let mut served = 0;
        while let Some(call) = calls.recv().await {
            served += 1;
            let _ = call.events.send(ControlEvent::Expired).await;
        }
        served
    });
    let ask = |wrapper: &[&str]| {
        let mut argv: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        argv.extend([
            "python3".into(),
            client.display().to_string(),
            socket.display().to_string(),
        ]);
        async move {
            let output = tokio::task::spawn_blocking(move || {
                std::process::Command::new(&argv[0])
                    .args(&argv[1..])
                    .output()
                    .expect("run the client")
            });
            let output = timeout(PATIENCE, output)
                .await
                .expect("client hung")
                .unwrap();
            assert!(
                output.status.success(),
                "client failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap().trim().to_owned()
        }
    };

    let me = unsafe { libc::geteuid() };
    assert_eq!(
        ask(&[]).await,
        r#"{"event":"expired"}"#,
        "the agent's own user"
    );
    let nested = ask(&[
        "unshare",
        "--user",
        &format!("--map-user={me}"),
        &format!("--map-group={}", unsafe { libc::getegid() }),
        "--",
    ])
    .await;
    assert!(
        nested.contains(r#""event":"error""#) && nested.contains("another user namespace"),
        "a client in a nested user namespace (uid {me} mapped to itself) was not refused: {nested}"
    );
    if me == 0 {
        let stranger = ask(&[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "env",
            &format!("PATH={}", texture_agent::drivers::process::DRIVER_PATH),
        ])
        .await;
        assert!(
            stranger.contains(r#""event":"error""#) && stranger.contains("uid 65534"),
            "uid 65534 was not refused: {stranger}"
        );
    }
    server.abort();
    let _ = server.await;
    assert_eq!(
        dispatcher.await.unwrap(),
        1,
        "only the admitted client reached the dispatcher"
    );
}

/// A sandbox that cannot be set up does not fall back to running the driver unconfined: the
/// driver is not started (a mount that fails stands in for a kernel without user namespaces),
/// its commands fail `driver not running`, and the supervisor keeps retrying.
#[tokio::test]
async fn a_driver_whose_sandbox_fails_is_not_run_unconfined() {
    use texture_agent::drivers::process::{DriverSandbox, ProcessDriver};
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let (samples_tx, _samples) = mpsc::channel(SAMPLE_QUEUE);
    let (commands, commands_rx) = mpsc::channel(8);
    let (trigger, shutdown) = shutdown_channel();
    let stats = Arc::new(DriverStats::default());
    let driver = ProcessDriver {
        name: "unsandboxable".into(),
        command: vec!["touch".into(), marker.display().to_string()],
        max_line_bytes: 1024,
        sandbox: Some(Arc::new(DriverSandbox {
            hidden_dirs: vec![dir.path().join("no-such-directory")],
            hidden_files: vec![],
        })),
    };
    let task = tokio::spawn(driver.supervise(samples_tx, commands_rx, shutdown, stats.clone()));
    let (done, outcome) = oneshot::channel();
    commands
        .send(DriverCommand {
            command_id: "c1".into(),
            device_id: "dev-1".into(),
            slug: "battery:set-reserve".into(),
            input: serde_json::Map::new(),
            safety: Default::default(),
            done,
        })
        .await
        .unwrap();
    let answer = timeout(PATIENCE, outcome).await.expect("no answer in time");
    assert_eq!(answer, Ok(Err(CommandFailure::DriverNotRunning)));
    // The command was refused between attempts, so one attempt to start the driver is over.
    assert!(!marker.exists(), "the driver ran without its sandbox");
    assert_eq!(stats.spawns.load(Ordering::Relaxed), 0);
    trigger.trigger();
    timeout(Duration::from_secs(2), task)
        .await
        .unwrap()
        .unwrap();
}
