//! Commands end to end over mosquitto with mutual TLS: which attestations execute when a
//! peer with full broker access publishes them (forged and replayed ones included); and how an
//! authorised command runs: the right driver, the device's new state in telemetry, the reply,
//! timeouts, interruption by a stop or a kill, superseding, duplicates and bursts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use texture_agent::link::topics::Topics;
use texture_agent::model::clock::system_secs;
use texture_agent::sim::platform::{ApiKey, AttestedCommand, PlatformSigner};
use texture_agent_testkit as kit;

use kit::{device_topic, Agent, AgentConfig, Mosquitto, Peer, Pki, Testbed};

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

// ---------------------------------------------------------------------------------------------
// End to end over mosquitto with mutual TLS: a peer with full broker access (as a compromised
// broker would have) publishes attestations for every kind of key, forged and replayed ones
// included, straight onto the device's command topic. Only the allowed ones execute.

const PEER_WAIT: Duration = Duration::from_secs(15);
const DEVICE: &str = "gw-e2e";
const HOME_WORKSPACE: &str = "ws-home";

fn ping(signer: &PlatformSigner, key: &ApiKey, id: &str) -> String {
    let claims = signer.claims(
        key,
        AttestedCommand::new(DEVICE, id, "agent:ping", serde_json::json!({})),
        system_secs(),
        300,
    );
    signer.attest(&claims)
}

/// Publishes `token` and returns the next reply whose commandId is `id` (or null for `None`).
async fn send(peer: &mut Peer, token: &str, id: Option<&str>) -> serde_json::Value {
    let replies = device_topic(DEVICE, "replies");
    peer.publish(
        &device_topic(DEVICE, "commands"),
        token.as_bytes().to_vec(),
        false,
    )
    .await;
    let expected = id.map_or(serde_json::Value::Null, serde_json::Value::from);
    peer.expect(&replies, PEER_WAIT, |m| m.json()["commandId"] == expected)
        .await
        .json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_server_and_owner_attestations_execute_over_a_hostile_broker() {
    let Testbed {
        pki,
        broker,
        signer,
        mut peer,
    } = Testbed::start(
        PlatformSigner::generate("platform-1"),
        &[&device_topic(DEVICE, "replies")],
    )
    .await;

    let mut cfg = AgentConfig::new(&pki, broker.port, DEVICE).trusting(&signer, HOME_WORKSPACE);
    cfg.owner = Some("user-a".into());
    let agent = Agent::spawn(BIN, &cfg.write(pki.path()));
    agent.wait_for_log("trust bundle accepted", PEER_WAIT);

    let server = ApiKey::server("key-server", HOME_WORKSPACE);
    let owner = ApiKey::scoped("key-scoped-a", HOME_WORKSPACE, "user-a");
    let stranger = ApiKey::scoped("key-scoped-b", HOME_WORKSPACE, "user-b");
    let connect = ApiKey::connect("key-connect", HOME_WORKSPACE);

    let r = send(
        &mut peer,
        &ping(&signer, &server, "cmd-server"),
        Some("cmd-server"),
    )
    .await;
    assert_eq!(r["type"], "command.succeeded", "{r}");
    assert_eq!(r["result"]["pong"], true);

    let r = send(
        &mut peer,
        &ping(&signer, &owner, "cmd-owner"),
        Some("cmd-owner"),
    )
    .await;
    assert_eq!(r["type"], "command.succeeded", "{r}");

    let r = send(
        &mut peer,
        &ping(&signer, &stranger, "cmd-stranger"),
        Some("cmd-stranger"),
    )
    .await;
    assert_eq!(
        (r["status"].as_u64(), r["code"].as_str()),
        (Some(403), Some("FORBIDDEN")),
        "{r}"
    );

    let r = send(
        &mut peer,
        &ping(&signer, &connect, "cmd-connect"),
        Some("cmd-connect"),
    )
    .await;
    assert_eq!(r["status"], 403, "{r}");

    // A forger with broker access but not the platform's key: same kid, own key.
    let forger = PlatformSigner::generate("platform-1");
    let r = send(&mut peer, &ping(&forger, &server, "cmd-forged"), None).await;
    assert_eq!(
        (r["status"].as_u64(), r["code"].as_str()),
        (Some(401), Some("UNAUTHENTICATED")),
        "{r}"
    );

    // A replay gets the recorded reply again and does not run again.
    let token = ping(&signer, &server, "cmd-server");
    let again = send(&mut peer, &token, Some("cmd-server")).await;
    assert_eq!(again["type"], "command.succeeded");
    let decisions = |decision: &str| {
        agent
            .logs_with_message("command decision")
            .into_iter()
            .filter(|l| l["command_id"] == "cmd-server" && l["decision"] == decision)
            .count()
    };
    // The agent's log is read by a thread of its own, so the line of the decision behind a
    // reply can trail the reply by a moment.
    let deadline = Instant::now() + WAIT;
    while decisions("duplicate") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(decisions("allowed"), 1, "{}", agent.log_dump());
    assert_eq!(decisions("duplicate"), 1, "{}", agent.log_dump());

    // Revoking one key leaves the others working.
    let revoked = ApiKey::server("key-leaked", HOME_WORKSPACE);
    peer.publish(
        &Topics::trust_bundle(),
        signer.trust_bundle(
            2,
            system_secs(),
            system_secs() + 3_600,
            &["key-leaked".into()],
        ),
        true,
    )
    .await;
    let deadline = std::time::Instant::now() + PEER_WAIT;
    while agent.logs_with_message("trust bundle accepted").len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "bundle v2 not accepted:\n{}",
            agent.log_dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = send(
        &mut peer,
        &ping(&signer, &revoked, "cmd-revoked"),
        Some("cmd-revoked"),
    )
    .await;
    assert_eq!(r["status"], 403, "{r}");
    assert!(r["message"].as_str().unwrap().contains("revoked"), "{r}");
    let r = send(
        &mut peer,
        &ping(&signer, &server, "cmd-after-revoke"),
        Some("cmd-after-revoke"),
    )
    .await;
    assert_eq!(r["type"], "command.succeeded", "{r}");

    // An old bundle replayed by the broker does not undo the revocation.
    peer.publish(
        &Topics::trust_bundle(),
        signer.trust_bundle(1, system_secs(), system_secs() + 3_600, &[]),
        true,
    )
    .await;
    let r = send(
        &mut peer,
        &ping(&signer, &revoked, "cmd-revoked-2"),
        Some("cmd-revoked-2"),
    )
    .await;
    assert_eq!(r["status"], 403, "{r}");
}

// ---------------------------------------------------------------------------------------------
// Command execution end to end over mosquitto with TLS: authorised commands reach the right
// driver, change the device, show in telemetry and are reported; timeouts, restarts,
// concurrency, superseding and duplicates behave as docs/PROTOCOL.md says.

const GATEWAY: &str = "gw-run";
const WORKSPACE: &str = "ws-run";
const WAIT: Duration = Duration::from_secs(20);
/// The platform signing key, known so a test can sign payloads the signer's types cannot hold.
const KID: &str = "platform-1";
const KEY_SEED: [u8; 32] = [7; 32];

/// A driver for two batteries, `slow-1` and `slow-2`. `set-reserve` answers at once, except
/// chargePercentage 11 (never answers) and 22 (answers after 1.5 s). Every command and cancel it
/// receives is appended to `log`.
const SLOW_DRIVER: &str = r#"
import json, sys, threading, time
log = open(sys.argv[1], "a")
lock = threading.Lock()
reserve = {"slow-1": 20, "slow-2": 20}
def emit(obj):
    with lock:
        sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
def state(dev):
    return {"type": "battery", "charge": 5000.0, "chargePercentage": 40.0, "chargingState": "idle",
            "chargeRate": 0.0, "backupReserve": reserve[dev], "gridStatus": "idle", "gridPower": 0.0,
            "strategy": "test"}
def ticker():
    while True:
        for dev in reserve: emit({"type": "state", "deviceId": dev, "state": state(dev)})
        time.sleep(0.3)
threading.Thread(target=ticker, daemon=True).start()
def answer(cmd, delay):
    time.sleep(delay)
    reserve[cmd["deviceId"]] = cmd["input"]["chargePercentage"]
    emit({"type": "result", "commandId": cmd["commandId"], "ok": True, "result": {"backupReserve": reserve[cmd["deviceId"]]}})
for line in sys.stdin:
    msg = json.loads(line)
    log.write(json.dumps(msg) + "\n"); log.flush()
    if msg["type"] != "command": continue
    pct = msg["input"].get("chargePercentage")
    if pct == 11: continue
    threading.Thread(target=answer, args=(msg, 1.5 if pct == 22 else 0), daemon=True).start()
"#;

struct Bed {
    pki: Pki,
    _broker: Mosquitto,
    signer: PlatformSigner,
    peer: Peer,
    cfg: AgentConfig,
    config: PathBuf,
    driver_log: PathBuf,
    next: u32,
}

impl Bed {
    async fn new(extra_toml: &str) -> Bed {
        let Testbed {
            pki,
            broker,
            signer,
            peer,
        } = Testbed::start(
            PlatformSigner::from_seeds([3; 32], KID, KEY_SEED),
            &[
                &device_topic(GATEWAY, "replies"),
                &device_topic(GATEWAY, "telemetry"),
                &device_topic(GATEWAY, "capabilities"),
                &device_topic(GATEWAY, "status"),
            ],
        )
        .await;
        let script = pki.path().join("slow_driver.py");
        std::fs::write(&script, SLOW_DRIVER).unwrap();
        let driver_log = pki.path().join("driver.log");
        let example =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/drivers/example-battery.py");
        let mut cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, WORKSPACE);
        cfg.extra_toml = format!(
            "{extra_toml}\n[telemetry]\nbatch_max_ms = 100\nhealth_interval_secs = 3600\n\n\
             [[drivers]]\nkind = \"simulated\"\ndevice_id = \"bat-1\"\ndevice_type = \"battery\"\ninterval_ms = 200\n\n\
             [[drivers]]\nkind = \"process\"\nname = \"slow\"\ncommand = [\"python3\", \"-u\", \"{}\", \"{}\"]\n\n\
             [[drivers]]\nkind = \"process\"\nname = \"example\"\ncommand = [\"env\", \"EXAMPLE_INTERVAL_SECS=0.3\", \"python3\", \"{}\"]\n",
            script.display(),
            driver_log.display(),
            example.display(),
        );
        let config = cfg.write(pki.path());
        Bed {
            pki,
            _broker: broker,
            signer,
            peer,
            cfg,
            config,
            driver_log,
            next: 0,
        }
    }

    /// Starts the agent and waits for its birth and until its retained capabilities list every
    /// device.
    async fn start_agent(&mut self) -> Agent {
        self.start_agent_listing(&[]).await
    }

    /// [`Bed::start_agent`], waiting until the capabilities list `also` as well.
    async fn start_agent_listing(&mut self, also: &[&str]) -> Agent {
        // The birth is published after the subscriptions, on the same connection, so a command
        // published once it has arrived is delivered (capabilities alone do not prove that: they
        // may be queued before the subscriptions, and a restart finds the last run's retained).
        // The retained trust bundle is delivered on subscription, so it is handled first too.
        let status = device_topic(GATEWAY, "status");
        self.peer.forget(&status);
        let agent = Agent::spawn(BIN, &self.config);
        self.peer
            .expect(&status, WAIT, |m| m.json()["state"] == "online")
            .await;
        let wanted: Vec<&str> = ["bat-1", "slow-1", "slow-2", "bat-ext-1"]
            .iter()
            .chain(also)
            .copied()
            .collect();
        self.peer
            .expect(&device_topic(GATEWAY, "capabilities"), WAIT, |m| {
                let listed: Vec<String> = m.json()["devices"]
                    .as_array()
                    .map(|d| {
                        d.iter()
                            .filter_map(|x| x["deviceId"].as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                wanted.iter().all(|w| listed.iter().any(|l| l == w))
            })
            .await;
        agent
    }

    /// A signed set-reserve (or any `slug`) for `device`, from a server key.
    fn token(&mut self, device: &str, slug: &str, input: serde_json::Value) -> (String, String) {
        self.next += 1;
        let id = format!("cmd-{}", self.next);
        let key = ApiKey::server("key-server", WORKSPACE);
        let claims = self.signer.claims(
            &key,
            AttestedCommand::new(GATEWAY, &id, slug, input).for_device(device),
            system_secs(),
            300,
        );
        (id, self.signer.attest(&claims))
    }

    async fn publish(&self, token: &str) {
        self.peer
            .publish(
                &device_topic(GATEWAY, "commands"),
                token.as_bytes().to_vec(),
                false,
            )
            .await;
    }

    async fn reply(&mut self, id: &str) -> serde_json::Value {
        self.peer
            .expect(&device_topic(GATEWAY, "replies"), WAIT, |m| {
                m.json()["commandId"] == id
            })
            .await
            .json()
    }

    /// Waits for a telemetry point of `device` whose state satisfies `pred`.
    async fn telemetry(
        &mut self,
        device: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(
                Instant::now() < deadline,
                "no matching telemetry for {device}"
            );
            let batch = self
                .peer
                .expect(&device_topic(GATEWAY, "telemetry"), WAIT, |_| true)
                .await
                .json();
            for p in batch["points"].as_array().unwrap() {
                if p["deviceId"] == device && pred(&p["state"]) {
                    return p.clone();
                }
            }
        }
    }

    fn driver_log(&self) -> String {
        std::fs::read_to_string(&self.driver_log).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorised_command_changes_the_device_and_shows_in_telemetry() {
    let mut bed = Bed::new("").await;
    let _agent = bed.start_agent().await;
    let (id, token) = bed.token(
        "bat-1",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 42}),
    );
    bed.publish(&token).await;
    let r = bed.reply(&id).await;
    assert_eq!(r["type"], "command.succeeded", "{r}");
    assert_eq!(r["deviceId"], "bat-1");
    assert!(r["executedAt"].as_str().unwrap().ends_with('Z'));
    let point = bed.telemetry("bat-1", |s| s["backupReserve"] == 42.0).await;
    assert_eq!(point["state"]["type"], "battery");

    // The example driver shipped in the repository speaks the same protocol.
    let (id, token) = bed.token(
        "bat-ext-1",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 33}),
    );
    bed.publish(&token).await;
    let r = bed.reply(&id).await;
    assert_eq!(r["type"], "command.succeeded", "{r}");
    bed.telemetry("bat-ext-1", |s| s["backupReserve"] == 33.0)
        .await;

    // Invalid input never reaches a driver, and the reply names the field.
    let (id, token) = bed.token(
        "bat-1",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 150}),
    );
    bed.publish(&token).await;
    let r = bed.reply(&id).await;
    assert_eq!(
        (r["type"].as_str(), r["status"].as_u64()),
        (Some("command.failed"), Some(400)),
        "{r}"
    );
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("chargePercentage"),
        "{r}"
    );

    // A device the gateway does not have.
    let (id, token) = bed.token(
        "bat-404",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 10}),
    );
    bed.publish(&token).await;
    assert_eq!(bed.reply(&id).await["status"], 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_running_when_the_agent_is_killed_is_reported_interrupted() {
    let mut bed = Bed::new("").await;
    let agent = bed.start_agent().await;
    let (id, token) = bed.token(
        "slow-1",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 22}),
    );
    bed.publish(&token).await;
    let deadline = Instant::now() + WAIT;
    while !bed.driver_log().contains(&id) {
        assert!(Instant::now() < deadline, "driver never got the command");
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.signal("KILL");
    drop(agent);
    let _agent = bed.start_agent().await;
    let r = bed.reply(&id).await;
    assert_eq!(r["type"], "command.failed", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("interrupted"),
        "{r}"
    );
    assert_eq!(r["deviceId"], "slow-1");
    // And a redelivery of the same attestation gets that recorded answer, not a second run.
    bed.publish(&token).await;
    let again = bed.reply(&id).await;
    assert_eq!(again, r);
    assert_eq!(
        bed.driver_log().matches(&id).count(),
        1,
        "{}",
        bed.driver_log()
    );
}

/// Waits for the agent's clean-shutdown presence message. The agent publishes it after every
/// reply it publishes (QoS 1, one connection, delivered in order), so once it has arrived every
/// reply of that run is in the peer's hands.
async fn wait_for_shutdown_status(bed: &mut Bed) {
    bed.peer
        .expect(&device_topic(GATEWAY, "status"), WAIT, |m| {
            m.json()["state"] == "offline" && m.json()["reason"] == "shutdown"
        })
        .await;
}

/// Every reply for `id` the peer has received so far, as published (bytes).
async fn replies_for(bed: &mut Bed, id: &str) -> Vec<Vec<u8>> {
    bed.peer
        .collect(&device_topic(GATEWAY, "replies"), Duration::ZERO)
        .await
        .into_iter()
        .filter(|m| m.json()["commandId"] == id)
        .map(|m| m.payload)
        .collect()
}

/// A stop of the agent is not a driver failure (PROTOCOL 4.6, 15.5): the running command is
/// neither answered nor recorded as completed when the agent is told to stop, the driver gets a
/// `cancel` for it, and after the restart it is answered once, `interrupted`, and a redelivery
/// gets that same reply byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_running_when_the_agent_is_stopped_is_reported_interrupted_after_the_restart() {
    let mut bed = Bed::new("").await;
    let mut agent = bed.start_agent().await;
    let (id, token) = bed.token(
        "slow-1",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 11}),
    );
    bed.publish(&token).await;
    let deadline = Instant::now() + WAIT;
    while !bed.driver_log().contains(&id) {
        assert!(Instant::now() < deadline, "driver never got the command");
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.signal("TERM");
    assert!(agent.wait_exit(WAIT).success(), "{}", agent.log_dump());
    wait_for_shutdown_status(&mut bed).await;
    let during_stop = replies_for(&mut bed, &id).await;
    assert!(
        during_stop.is_empty(),
        "the stop was answered as a failure: {:?}",
        during_stop
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect::<Vec<_>>()
    );
    let driver_saw: Vec<serde_json::Value> = bed
        .driver_log()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|m: &serde_json::Value| m["commandId"] == id.as_str())
        .collect();
    assert_eq!(
        driver_saw
            .iter()
            .map(|m| m["type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["command", "cancel"],
        "the driver is told to cancel before it is stopped"
    );
    drop(agent);

    let mut agent = bed.start_agent().await;
    let announced = bed
        .peer
        .expect(&device_topic(GATEWAY, "replies"), WAIT, |m| {
            m.json()["commandId"] == id.as_str()
        })
        .await;
    let r = announced.json();
    assert_eq!(
        (
            r["type"].as_str(),
            r["status"].as_u64(),
            r["error"]["code"].as_str(),
            r["error"]["message"].as_str(),
            r["deviceId"].as_str()
        ),
        (
            Some("command.failed"),
            Some(500),
            Some("COMMAND_FAILED"),
            Some("interrupted: the agent stopped while the command was running"),
            Some("slow-1")
        ),
        "{r}"
    );
    bed.publish(&token).await;
    let again = bed
        .peer
        .expect(&device_topic(GATEWAY, "replies"), WAIT, |m| {
            m.json()["commandId"] == id.as_str()
        })
        .await;
    assert_eq!(
        String::from_utf8_lossy(&again.payload),
        String::from_utf8_lossy(&announced.payload),
        "a redelivery gets the recorded reply byte for byte"
    );
    // Nothing else for this command in the second run: one announcement, one redelivery answer.
    agent.signal("TERM");
    assert!(agent.wait_exit(WAIT).success(), "{}", agent.log_dump());
    wait_for_shutdown_status(&mut bed).await;
    assert_eq!(replies_for(&mut bed, &id).await, Vec::<Vec<u8>>::new());
    assert_eq!(
        bed.driver_log()
            .lines()
            .filter(|l| l.contains(&id) && l.contains("\"command\""))
            .count(),
        1,
        "the command ran once:\n{}",
        bed.driver_log()
    );
}

/// Signs `slug` with `input` from a server key, for `device` behind the gateway or (`None`) for
/// the gateway itself, publishes it and returns its reply.
async fn ask(
    bed: &mut Bed,
    device: Option<&str>,
    slug: &str,
    input: serde_json::Value,
) -> serde_json::Value {
    bed.next += 1;
    let id = format!("cmd-{}", bed.next);
    let key = ApiKey::server("key-server", WORKSPACE);
    let claims = match device {
        Some(d) => bed.signer.claims(
            &key,
            AttestedCommand::new(GATEWAY, &id, slug, input).for_device(d),
            system_secs(),
            300,
        ),
        None => bed.signer.claims(
            &key,
            AttestedCommand::new(GATEWAY, &id, slug, input),
            system_secs(),
            300,
        ),
    };
    let token = bed.signer.attest(&claims);
    bed.publish(&token).await;
    bed.reply(&id).await
}

/// PROTOCOL 4.1: an `agent:*` command that carries `command.deviceId` is refused 400 (check 3),
/// after the slug and input checks, and every `command.failed` names `command.deviceId` when
/// the attestation has one and the gateway when it has none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_command_with_a_device_id_is_refused_and_replies_name_the_signed_device() {
    let mut bed = Bed::new("").await;
    let _agent = bed.start_agent().await;
    let summary = |r: &serde_json::Value| {
        (
            r["type"].as_str().unwrap_or_default().to_owned(),
            r["status"].as_u64().unwrap_or_default(),
            r["deviceId"].as_str().unwrap_or_default().to_owned(),
            r["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    let failed = |device: &str, message: &str| {
        (
            "command.failed".to_owned(),
            400,
            device.to_owned(),
            message.to_owned(),
        )
    };

    let r = ask(&mut bed, Some("bat-1"), "agent:ping", serde_json::json!({})).await;
    assert_eq!(
        summary(&r),
        failed(
            "bat-1",
            "deviceId: agent:ping addresses the gateway itself and takes no deviceId"
        ),
        "{r}"
    );
    // The input is checked first (check 2 before check 3), still naming the signed device.
    let r = ask(
        &mut bed,
        Some("bat-1"),
        "agent:get-state",
        serde_json::json!({"x": 1}),
    )
    .await;
    assert_eq!(summary(&r).2, "bat-1", "{r}");
    assert!(summary(&r).3.contains("unknown field `x`"), "{r}");
    // An unknown slug with a device names it; without one, the gateway.
    let r = ask(&mut bed, Some("bat-1"), "vendor:x", serde_json::json!({})).await;
    assert_eq!(
        summary(&r),
        failed("bat-1", "unknown command slug `vendor:x`"),
        "{r}"
    );
    let r = ask(&mut bed, None, "vendor:x", serde_json::json!({})).await;
    assert_eq!(
        summary(&r),
        failed(GATEWAY, "unknown command slug `vendor:x`"),
        "{r}"
    );
    // A device command without a device (check 5) names the gateway.
    let r = ask(
        &mut bed,
        None,
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 5}),
    )
    .await;
    assert_eq!(
        summary(&r),
        failed(GATEWAY, "deviceId: required for battery:set-reserve"),
        "{r}"
    );
    // agent:unpair with a device id does not unpair (a scoped key would still be judged on the
    // pairing); the agent's own command without one runs and names the gateway.
    let r = ask(
        &mut bed,
        Some("bat-1"),
        "agent:unpair",
        serde_json::json!({}),
    )
    .await;
    assert_eq!(summary(&r).1, 400, "{r}");
    let r = ask(&mut bed, None, "agent:ping", serde_json::json!({})).await;
    assert_eq!(
        (r["type"].as_str(), r["deviceId"].as_str(), &r["result"]),
        (
            Some("command.succeeded"),
            Some(GATEWAY),
            &serde_json::json!({"pong": true})
        ),
        "{r}"
    );
}

/// PROTOCOL 5.2: a signed payload whose `command.input` is not a JSON object (or is missing)
/// does not parse as the claims: `401 UNAUTHENTICATED` with a null `commandId` (7.1, check 13),
/// nothing recorded, so a well-formed attestation with the same `jti` still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_that_is_not_an_object_is_401_and_not_recorded() {
    let mut bed = Bed::new("").await;
    let _agent = bed.start_agent().await;
    let key = ApiKey::server("key-server", WORKSPACE);
    let claims = bed.signer.claims(
        &key,
        AttestedCommand::new(GATEWAY, "cmd-input", "agent:ping", serde_json::json!({})),
        system_secs(),
        300,
    );
    let good = serde_json::to_value(&claims).unwrap();
    let signing_key = ed25519_dalek::SigningKey::from_bytes(&KEY_SEED);
    for input in [
        Some(serde_json::Value::Null),
        Some(serde_json::json!([])),
        Some(serde_json::json!("{}")),
        Some(serde_json::json!(0)),
        None,
    ] {
        let mut payload = good.clone();
        match &input {
            Some(v) => payload["command"]["input"] = v.clone(),
            None => {
                payload["command"].as_object_mut().unwrap().remove("input");
            }
        }
        let token = texture_agent::inbound::auth::jws::sign(
            &signing_key,
            Some(KID),
            texture_agent::inbound::auth::claims::ATTESTATION_TYP,
            &serde_json::to_vec(&payload).unwrap(),
        );
        for _delivery in 0..2 {
            bed.publish(&token).await;
            let r = bed
                .peer
                .expect(&device_topic(GATEWAY, "replies"), WAIT, |m| {
                    m.json()["commandId"].is_null()
                })
                .await
                .json();
            assert_eq!(
                (
                    r["type"].as_str(),
                    r["status"].as_u64(),
                    r["code"].as_str(),
                    r["deviceId"].as_str()
                ),
                (
                    Some("command.refused"),
                    Some(401),
                    Some("UNAUTHENTICATED"),
                    Some(GATEWAY)
                ),
                "input {input:?}: {r}"
            );
        }
    }
    bed.publish(&bed.signer.attest(&claims)).await;
    let r = bed.reply("cmd-input").await;
    assert_eq!(r["type"], "command.succeeded", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_fails_the_command_and_tells_the_driver_to_cancel() {
    let mut bed = Bed::new("[commands]\ntimeouts = { \"battery:set-reserve\" = 2 }\n").await;
    let _agent = bed.start_agent().await;
    let (id, token) = bed.token(
        "slow-1",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 11}),
    );
    let sent = Instant::now();
    bed.publish(&token).await;
    let r = bed.reply(&id).await;
    assert_eq!(
        (r["status"].as_u64(), r["error"]["code"].as_str()),
        (Some(504), Some("COMMAND_TIMEOUT")),
        "{r}"
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(1_900),
        "failed before its timeout"
    );
    let deadline = Instant::now() + WAIT;
    while !bed.driver_log().contains("\"cancel\"") {
        assert!(
            Instant::now() < deadline,
            "driver was not told to cancel:\n{}",
            bed.driver_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_run_in_parallel_and_a_newer_command_supersedes_the_running_one() {
    let mut bed = Bed::new("").await;
    let _agent = bed.start_agent().await;
    // A slow command on slow-1 does not hold up slow-2.
    let (slow, slow_token) = bed.token(
        "slow-1",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 22}),
    );
    let (quick, quick_token) = bed.token(
        "slow-2",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 30}),
    );
    bed.publish(&slow_token).await;
    bed.publish(&quick_token).await;
    let first = bed
        .peer
        .expect(&device_topic(GATEWAY, "replies"), WAIT, |m| {
            m.json()["commandId"] == slow.as_str() || m.json()["commandId"] == quick.as_str()
        })
        .await
        .json();
    assert_eq!(
        first["commandId"],
        quick.as_str(),
        "the other device's command waited: {first}"
    );
    assert_eq!(bed.reply(&slow).await["type"], "command.succeeded");

    // On one device, the newer command wins and the running one is reported superseded.
    let (stuck, stuck_token) = bed.token(
        "slow-1",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 11}),
    );
    let (newer, newer_token) = bed.token(
        "slow-1",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 55}),
    );
    bed.publish(&stuck_token).await;
    bed.publish(&newer_token).await;
    let r = bed.reply(&stuck).await;
    assert_eq!(
        (r["status"].as_u64(), r["error"]["code"].as_str()),
        (Some(409), Some("SUPERSEDED")),
        "{r}"
    );
    assert!(r["error"]["message"].as_str().unwrap().contains(&newer));
    assert_eq!(bed.reply(&newer).await["type"], "command.succeeded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_command_id_never_runs_twice() {
    let mut bed = Bed::new("").await;
    let _agent = bed.start_agent().await;
    let (id, token) = bed.token(
        "slow-2",
        "battery:set-reserve",
        serde_json::json!({"chargePercentage": 60}),
    );
    bed.publish(&token).await;
    let first = bed.reply(&id).await;
    bed.publish(&token).await;
    let second = bed.reply(&id).await;
    assert_eq!(first, second);
    assert_eq!(
        bed.driver_log().matches(&id).count(),
        1,
        "{}",
        bed.driver_log()
    );
    let _ = &bed.pki;
    let _ = &bed.cfg;
}

/// A burst far larger than the inbound queue: every command is answered exactly once, run,
/// superseded (409) or shed unread with 503 and `retryAfter`, none lost without an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_commands_is_answered_in_full() {
    let mut bed = Bed::new("").await;
    let agent = bed.start_agent().await;
    const BURST: usize = 300;
    let mut ids = std::collections::BTreeSet::new();
    let mut tokens = Vec::new();
    for i in 0..BURST {
        let (id, token) = bed.token(
            "bat-1",
            "battery:set-reserve",
            serde_json::json!({"chargePercentage": 20 + i % 50}),
        );
        ids.insert(id);
        tokens.push(token);
    }
    for token in &tokens {
        bed.publish(token).await;
    }
    let kinds = bed.peer.burst_replies(GATEWAY, &mut ids, WAIT).await;
    assert!(
        ids.is_empty(),
        "{} of {BURST} commands never answered ({kinds:?}); dropped: {}",
        ids.len(),
        agent
            .logs_with_message("inbound queue full; message dropped")
            .len()
    );
    println!("{kinds:?}");
}

/// The safety envelope's `[[limits]]` for the test bed's devices, and a simulated vehicle and
/// thermostat to carry two of them (PROTOCOL 4.7).
const LIMITS: &str = "[[drivers]]\nkind = \"simulated\"\ndevice_id = \"car-1\"\ndevice_type = \"vehicle\"\ninterval_ms = 200\n\n\
[[drivers]]\nkind = \"simulated\"\ndevice_id = \"th-1\"\ndevice_type = \"thermostat\"\ninterval_ms = 200\n\n\
[[limits]]\ndevice_id = \"bat-1\"\ndevice_type = \"battery\"\nmin_backup_reserve = 20\n\n\
[[limits]]\ndevice_id = \"slow-1\"\ndevice_type = \"battery\"\nmin_backup_reserve = 30\n\n\
[[limits]]\ndevice_id = \"car-1\"\ndevice_type = \"vehicle\"\nmax_charge_limit = 90\n\n\
[[limits]]\ndevice_id = \"th-1\"\ndevice_type = \"thermostat\"\nmax_target_c = 26\n";

/// PROTOCOL 4.7: a command beyond an installer limit fails `422 LIMIT_EXCEEDED`, naming the
/// limit, and never reaches its driver (simulated or process); one at the limit runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_beyond_the_installers_limits_fail_422_and_never_reach_the_device() {
    let mut bed = Bed::new(LIMITS).await;
    let _agent = bed.start_agent_listing(&["car-1", "th-1"]).await;
    let cases = [
        (
            "bat-1",
            "battery:set-reserve",
            serde_json::json!({"chargePercentage": 5}),
            serde_json::json!({"chargePercentage": 20}),
            "chargePercentage: 5 % is below the installer limit min_backup_reserve = 20 % for bat-1",
        ),
        (
            "slow-1",
            "battery:set-reserve",
            serde_json::json!({"chargePercentage": 29}),
            serde_json::json!({"chargePercentage": 30}),
            "chargePercentage: 29 % is below the installer limit min_backup_reserve = 30 % for slow-1",
        ),
        (
            "car-1",
            "vehicle:set-charge-limit",
            serde_json::json!({"chargeLimit": 95}),
            serde_json::json!({"chargeLimit": "90"}),
            "chargeLimit: 95 % is above the installer limit max_charge_limit = 90 % for car-1",
        ),
        (
            "th-1",
            "thermostat:set-operating-mode",
            // 86 °F is 30 °C.
            serde_json::json!({"operatingMode": "heat", "heatTarget": 86, "unit": "F"}),
            serde_json::json!({"operatingMode": "heat", "heatTarget": 26}),
            "heatTarget: 30 °C is above the installer limit max_target_c = 26 °C for th-1",
        ),
    ];
    for (device, slug, outside, inside, message) in cases {
        let refused = ask(&mut bed, Some(device), slug, outside).await;
        assert_eq!(refused["type"], "command.failed", "{refused}");
        assert_eq!(refused["status"], 422, "{refused}");
        assert_eq!(refused["error"]["code"], "LIMIT_EXCEEDED", "{refused}");
        assert_eq!(refused["error"]["message"], message, "{refused}");
        assert_eq!(refused["deviceId"], device);
        let ran = ask(&mut bed, Some(device), slug, inside).await;
        assert_eq!(ran["type"], "command.succeeded", "{device}: {ran}");
    }
    // The process driver saw the command at its limit and never the one beyond it.
    let log = bed.driver_log();
    assert!(log.contains("\"chargePercentage\": 30"), "{log}");
    assert!(!log.contains("\"chargePercentage\": 29"), "{log}");
    // Nor did the simulated battery: its reserve is the one at the limit.
    let state = ask(&mut bed, None, "agent:get-state", serde_json::json!({})).await;
    let battery = state["result"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["deviceId"] == "bat-1")
        .unwrap()
        .clone();
    assert_eq!(battery["state"]["backupReserve"], 20.0, "{battery}");
}
