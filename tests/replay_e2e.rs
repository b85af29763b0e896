//! The replay journal against a wrong clock, end to end: the real binary, a private mosquitto,
//! and libfaketime moving the agent's clock (Debian's `faketime` package; scripts/test.sh
//! installs it).
//!
//! The attack (issue 13, item 1): the broker keeps a command the gateway ran; the gateway
//! restarts while its clock runs ahead (a power blip with a bad RTC, a modem giving local time
//! as UTC, fake NTP); the clock is corrected; the broker redelivers the command while its
//! attestation is still live. An agent that pruned its journal against the clock at start-up
//! lost the entry for good, and ran the command a second time.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{device_topic, Agent, AgentConfig, Mosquitto, Pki};
use texture_agent::sim::platform::{ApiKey, PlatformSigner};

const GATEWAY: &str = "gw-clock";
const WORKSPACE: &str = "ws-clock";
const WAIT: Duration = Duration::from_secs(20);

/// A driver for one battery that answers every command at once and appends each command it
/// receives to the file named by its first argument.
const COUNTING_DRIVER: &str = r#"
import json, sys
log = open(sys.argv[1], "a")
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
    emit({"type": "result", "commandId": msg["commandId"], "ok": True, "result": {}})
"#;

/// libfaketime's preload library, where Debian puts it.
fn libfaketime() -> PathBuf {
    let found = std::fs::read_dir("/usr/lib")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("faketime/libfaketime.so.1"))
        .chain([PathBuf::from("/usr/lib/faketime/libfaketime.so.1")])
        .find(|p| p.exists());
    found.expect(
        "libfaketime.so.1 not found: install Debian's faketime package (scripts/test.sh does)",
    )
}

fn stop(mut agent: Agent) {
    agent.signal("TERM");
    assert!(agent.wait_exit(WAIT).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_clock_ahead_does_not_let_the_broker_replay_an_executed_command() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki);
    let signer = PlatformSigner::generate("platform-1");
    let replies = device_topic(GATEWAY, "replies");
    let capabilities = device_topic(GATEWAY, "capabilities");
    let status = device_topic(GATEWAY, "status");
    let mut peer = common::platform_peer(
        &pki,
        broker.port,
        &signer,
        &[&replies, &capabilities, &status],
    )
    .await;
    let script = pki.path().join("counting_driver.py");
    std::fs::write(&script, COUNTING_DRIVER).unwrap();
    let driver_log = pki.path().join("commands.log");
    let mut cfg = AgentConfig::new(&pki, broker.port, GATEWAY);
    cfg.trust_root = Some(signer.root_public_key());
    cfg.workspace_id = Some(WORKSPACE.into());
    cfg.extra_toml = format!(
        "[[drivers]]\nkind = \"process\"\nname = \"counting\"\n\
         command = [\"python3\", \"-u\", \"{}\", \"{}\"]\n",
        script.display(),
        driver_log.display()
    );
    let config = cfg.write(pki.path());

    let key = ApiKey::server("key-server", WORKSPACE);
    let claims = signer.device_claims(
        &key,
        GATEWAY,
        "bat-count",
        "cmd-once",
        "battery:set-reserve",
        serde_json::json!({ "chargePercentage": 30 }),
        common::unix_now(),
        600,
    );
    let token = signer.attest(&claims);
    let commands = device_topic(GATEWAY, "commands");
    let is_reply = |m: &common::Seen| m.json()["commandId"] == "cmd-once";

    // The birth of a run whose clock is right. It follows the run's subscriptions on the same
    // connection, so once the platform sees it, a command published next is delivered.
    let birth = |m: &common::Seen| {
        let v = m.json();
        v["state"] == "online"
            && v["at"]
                .as_u64()
                .is_some_and(|at| at < common::unix_now() + 3_600)
    };

    // 1. The command runs once, with the clock right.
    let agent = Agent::spawn(&config);
    peer.expect(&status, WAIT, birth).await;
    // The driver's first state line makes the device known (and advertised) before the
    // command arrives.
    peer.expect(&capabilities, WAIT, |m| {
        m.json()["devices"]
            .as_array()
            .is_some_and(|d| d.iter().any(|x| x["deviceId"] == "bat-count"))
    })
    .await;
    peer.publish(&commands, token.clone().into_bytes(), false)
        .await;
    let first = peer.expect(&replies, WAIT, is_reply).await;
    assert_eq!(
        first.json()["type"],
        "command.succeeded",
        "{}",
        first.json()
    );
    stop(agent);

    // 2. A restart with the clock two days ahead.
    let ahead = Agent::spawn_with_env(
        &config,
        &[
            ("LD_PRELOAD", libfaketime().to_str().unwrap()),
            ("FAKETIME", "+2d"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ],
    );
    let started = ahead.wait_for_log("texture-agent started", WAIT);
    // The agent really ran two days ahead (its log is stamped with its own clock).
    let stamped = started["timestamp"].as_str().unwrap_or_default().to_owned();
    let today = texture_agent::inbound::reply::rfc3339(common::unix_now());
    assert!(
        stamped.get(..10).is_some() && stamped.get(..10) != today.get(..10),
        "libfaketime did not move the clock: log stamped {stamped:?}, today {today:?}"
    );
    stop(ahead);

    // 3. The clock is corrected, and 4. the broker redelivers the command, after this run's
    // birth (the births seen so far are the first run's and the run ahead's).
    peer.forget(&status);
    let agent = Agent::spawn(&config);
    peer.expect(&status, WAIT, birth).await;
    peer.publish(&commands, token.clone().into_bytes(), false)
        .await;
    let again = peer.expect(&replies, WAIT, is_reply).await;
    assert_eq!(
        again.payload, first.payload,
        "the redelivery must get the original reply byte for byte"
    );
    let runs = std::fs::read_to_string(&driver_log).unwrap();
    assert_eq!(
        runs.lines().filter(|l| *l == "cmd-once").count(),
        1,
        "the driver saw the command more than once:\n{runs}"
    );
    stop(agent);
}
