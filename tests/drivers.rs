//! External driver processes under supervision: the protocol, and the promise that no driver,
//! however broken, takes the agent down.
//!
//! Each test runs real child processes (python3 and sh) and bounds every wait with a timeout,
//! so a regression fails the test instead of hanging it. Most drive a supervisor in-process;
//! the last runs the agent binary against mosquitto to check what the platform sees.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::timeout;

use texture_agent::drivers::process::{supervise, CommandFailure, DriverStats};
use texture_agent::drivers::{DriverCommand, Sample, SAMPLE_QUEUE};
use texture_agent::service::{shutdown_channel, ShutdownTrigger};
use texture_agent::telemetry::model::DeviceState;

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
    ) -> oneshot::Receiver<Result<serde_json::Value, String>> {
        let (done, outcome) = oneshot::channel();
        let command = DriverCommand {
            command_id: command_id.into(),
            device_id: device_id.into(),
            slug: slug.into(),
            input: input.as_object().expect("input is an object").clone(),
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
        DeviceState::Battery(b) => b.backup_reserve,
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
        Ok(Err(reason)) => assert_eq!(reason, CommandFailure::DriverExited.to_string()),
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
    assert_eq!(
        outcome.await,
        Ok(Err(CommandFailure::ShuttingDown.to_string()))
    );
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
    let pki = common::Pki::new();
    let broker = common::Mosquitto::start(&pki);
    let telemetry = common::device_topic(GATEWAY, "telemetry");
    let mut platform =
        common::Peer::connect(&pki, broker.port, common::PLATFORM_CLIENT, &[&telemetry]).await;
    let bad = bad_driver(pki.path());
    let mut cfg = common::AgentConfig::new(&pki, broker.port, GATEWAY);
    // A simulated driver beside the bad one: it must not be listed in the health point.
    cfg.extra_toml = format!(
        "[telemetry]\nbatch_max_ms = 50\nhealth_interval_secs = 1\n\n\
         [[drivers]]\nkind = \"process\"\nname = \"bad\"\ncommand = [\"sh\", \"{}\"]\n\
         max_line_bytes = 1024\n\n\
         [[drivers]]\nkind = \"simulated\"\ndevice_id = \"sim-1\"\ndevice_type = \"battery\"\n",
        bad.display()
    );
    let agent = common::Agent::spawn(&cfg.write(pki.path()));

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
