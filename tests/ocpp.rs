//! The OCPP 1.6J central system (`[[drivers]] kind = "ocpp"`, docs/PROTOCOL.md 17) end to end:
//! the agent as a process, mosquitto and the platform peer, and real charge points
//! (testkit::ocpp, the mobilityhouse `ocpp` package) as its clients. Every assertion on what the
//! agent said reads the raw frames the charge point logged, never what the library made of them
//! (tests/ocpp/charge_point.py lists the library's defects that this guards against).

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use texture_agent::sim::platform::{AttestedCommand, PlatformSigner};
use texture_agent_testkit as kit;

use kit::{device_topic, free_port, Agent, AgentConfig, ChargePoint, Testbed};

const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");
const GATEWAY: &str = "gw-ocpp";
const WORKSPACE: &str = "ws-ocpp";
const WAIT: Duration = Duration::from_secs(20);
const PASSWORD: &str = "garage-door-1234";

/// Runs a blocking charge point call without starving the test's async peer.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// An agent whose ocpp driver listens on `port` for CP-1 (with [`PASSWORD`]), CP-2 (none, two
/// connectors) and CP-3 (none, its installer's limit required).
struct Site {
    agent: Agent,
    port: u16,
    peer: kit::Peer,
    signer: PlatformSigner,
    // Kept alive for the agent: the broker and the PKI's files.
    _broker: kit::Mosquitto,
    pki: kit::Pki,
}

async fn site(heartbeat_secs: u64) -> Site {
    site_with(heartbeat_secs, "").await
}

/// [`site`], with `extra` appended to the driver entry (driver keys, then any tables).
async fn site_with(heartbeat_secs: u64, extra: &str) -> Site {
    let Testbed {
        pki,
        broker,
        signer,
        peer,
    } = Testbed::start(
        PlatformSigner::generate("platform-ocpp"),
        &[
            &device_topic(GATEWAY, "telemetry"),
            &device_topic(GATEWAY, "capabilities"),
            &device_topic(GATEWAY, "replies"),
        ],
    )
    .await;
    let port = free_port();
    let mut cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, WORKSPACE);
    cfg.extra_toml = format!(
        "[telemetry]\nbatch_max_ms = 100\nhealth_interval_secs = 3600\n\n\
         [[drivers]]\nkind = \"ocpp\"\nname = \"garage\"\nlisten = \"127.0.0.1:{port}\"\n\
         id_tags = [\"GOOD-TAG\"]\nheartbeat_secs = {heartbeat_secs}\nmax_message_bytes = 4096\n\
         charge_points = [{{ id = \"CP-1\", password = \"{PASSWORD}\", max_current_a = 16 }}, \
         {{ id = \"CP-2\", connectors = 2 }}, \
         {{ id = \"CP-3\", max_current_a = 10, require_max_profile = true }}]\n{extra}"
    );
    let agent = Agent::spawn(BIN, &cfg.write(pki.path()));
    blocking(|| agent.wait_for_log("ocpp: central system listening", WAIT));
    Site {
        agent,
        port,
        peer,
        signer,
        _broker: broker,
        pki,
    }
}

impl Site {
    fn dir(&self) -> &Path {
        self.pki.path()
    }

    /// A charge point SPEC for `id` on this site, with heartbeats off unless a test turns them on.
    fn spec(&self, id: &str) -> Value {
        json!({
            "url": format!("ws://127.0.0.1:{}/ocpp/{id}", self.port),
            "id": id,
            "password": if id == "CP-1" { json!(PASSWORD) } else { Value::Null },
            "subprotocols": ["ocpp1.6"],
            "heartbeat": "off",
        })
    }

    fn connect(&self, spec: &Value) -> ChargePoint {
        let cp = blocking(|| ChargePoint::start(self.dir(), spec));
        assert_eq!(cp.ready_state(), "connected", "{}", cp.stderr_text());
        let connected = cp.wait_for(|l| l["event"] == "connected", WAIT);
        assert_eq!(connected["subprotocol"], "ocpp1.6");
        cp
    }

    /// The next telemetry point of `device` satisfying `pred`.
    async fn point(&mut self, device: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no matching point of {device}");
            let batch = self
                .peer
                .expect(&device_topic(GATEWAY, "telemetry"), WAIT, |_| true)
                .await
                .json();
            for p in batch["points"].as_array().unwrap() {
                if p["deviceId"] == device && pred(p) {
                    return p.clone();
                }
            }
        }
    }
}

impl Site {
    /// Publishes a server-key command for `device`, signed by the platform, and returns its
    /// reply.
    async fn ask(&mut self, id: &str, device: &str, slug: &str, input: Value) -> Value {
        self.send(id, device, slug, input).await;
        self.reply(id).await
    }

    /// Publishes a server-key command for `device`, signed by the platform.
    async fn send(&mut self, id: &str, device: &str, slug: &str, input: Value) {
        let command = AttestedCommand::new(GATEWAY, id, slug, input).for_device(device);
        self.peer
            .send_server_command(&self.signer, WORKSPACE, command)
            .await;
    }

    /// The reply to command `id`.
    async fn reply(&mut self, id: &str) -> Value {
        self.peer.reply(GATEWAY, id, WAIT).await
    }
}

fn parse(frame: &str) -> Value {
    serde_json::from_str(frame).unwrap_or_else(|e| panic!("{frame:?}: {e}"))
}

/// The raw frame the charge point received with unique id `id`, parsed.
fn received(cp: &ChargePoint, id: &str) -> Value {
    let frame = cp.wait_for(
        |l| {
            l["event"] == "frame"
                && l["dir"] == "received"
                && l["text"]
                    .as_str()
                    .and_then(|t| serde_json::from_str::<Value>(t).ok())
                    .is_some_and(|f| f[1] == id)
        },
        WAIT,
    );
    parse(frame["text"].as_str().unwrap())
}

/// The op's answer, as the raw frame the agent sent.
fn answer(cp: &ChargePoint, op: Value) -> Value {
    let outcome = blocking(|| cp.call(op.clone(), WAIT));
    assert!(
        outcome["outcome"] == "result" || outcome["outcome"] == "error",
        "{op}: {outcome}"
    );
    parse(outcome["frame"].as_str().unwrap())
}

/// The TCP ports process `pid` listens on (its sockets in /proc/net/tcp{,6} in state LISTEN).
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        for line in std::fs::read_to_string(table).unwrap().lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address is ADDR:PORT in hex, st 0A is LISTEN, the inode is column 10.
            if cols[3] == "0A" && inodes.iter().any(|i| i == cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap();
                ports.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    ports
}

/// BootNotification, Heartbeat, Authorize and a transaction are answered as PROTOCOL 17.2
/// says, with every answer valid 1.6 and the heartbeats at the interval the boot gave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_heartbeat_authorize_and_a_transaction_are_answered() {
    let site = site(2).await;
    let mut spec = site.spec("CP-1");
    spec["heartbeat"] = json!("boot");
    let cp = site.connect(&spec);

    let boot = answer(&cp, json!({"op": "boot"}));
    assert_eq!(
        (&boot[0], &boot[2]["status"], &boot[2]["interval"]),
        (&json!(3), &json!("Accepted"), &json!(2))
    );
    assert!(
        boot[2]["currentTime"].as_str().unwrap().ends_with('Z'),
        "{boot}"
    );
    let beat = answer(&cp, json!({"op": "heartbeat"}));
    assert_eq!(beat[0], 3);
    assert!(beat[2]["currentTime"].is_string(), "{beat}");
    // The charge point's own heartbeats, every 2 s after the Accepted boot, are answered too.
    eventually(
        || "no heartbeats answered".into(),
        || {
            let beats = cp
                .frames_received()
                .iter()
                .filter(|f| f.contains("currentTime") && !f.contains("interval"))
                .count();
            (beats >= 3).then_some(())
        },
    );

    let good = answer(&cp, json!({"op": "authorize", "id_tag": "good-tag"}));
    assert_eq!(good[2], json!({"idTagInfo": {"status": "Accepted"}}));
    let bad = answer(&cp, json!({"op": "authorize", "id_tag": "STOLEN"}));
    assert_eq!(bad[2], json!({"idTagInfo": {"status": "Invalid"}}));
    let start = answer(
        &cp,
        json!({"op": "start_transaction", "connector": 1, "id_tag": "GOOD-TAG", "meter_start": 100}),
    );
    assert_eq!(start[2]["idTagInfo"], json!({"status": "Accepted"}));
    let transaction = start[2]["transactionId"].as_i64().unwrap();
    assert!(transaction > 0, "{start}");
    let second = answer(
        &cp,
        json!({"op": "start_transaction", "connector": 1, "id_tag": "STOLEN", "meter_start": 0}),
    );
    assert_eq!(second[2]["idTagInfo"], json!({"status": "Invalid"}));
    assert_ne!(second[2]["transactionId"].as_i64().unwrap(), transaction);
    let stop = answer(
        &cp,
        json!({"op": "stop_transaction", "transaction_id": transaction, "meter_stop": 2100, "id_tag": "GOOD-TAG"}),
    );
    assert_eq!(stop[2], json!({"idTagInfo": {"status": "Accepted"}}));
    let status = answer(
        &cp,
        json!({"op": "status", "connector": 1, "status": "Available"}),
    );
    assert_eq!(status, json!([3, status[1], {}]));

    assert_eq!(cp.violations(), Vec::<Value>::new());
    // The agent listens on the one port of its ocpp driver.
    assert_eq!(listening_ports(site.agent.pid()), vec![site.port]);
}

/// Status and meter values become the `charger` device's telemetry with the values the charge
/// point sent (kW as W); a disconnect is an offline availability point, a reconnect an online
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_meter_values_are_charger_telemetry_and_a_disconnect_takes_it_offline() {
    let mut site = site(300).await;
    let cp = site.connect(&site.spec("CP-1"));
    answer(&cp, json!({"op": "boot"}));
    answer(
        &cp,
        json!({"op": "status", "connector": 1, "status": "Charging"}),
    );
    let meter = answer(
        &cp,
        json!({"op": "meter_values", "connector": 1, "transaction_id": 7, "sampled": [
        {"measurand": "Voltage", "value": "231.5", "unit": "V"},
        {"measurand": "Current.Import", "value": "15.5", "unit": "A"},
        {"measurand": "Power.Active.Import", "value": "3.58", "unit": "kW"},
        {"measurand": "Energy.Active.Import.Register", "value": "1200", "unit": "Wh"}]}),
    );
    assert_eq!(meter[2], json!({}));
    let charging = site.point("ocpp-CP-1", |p| p.get("state").is_some()).await;
    assert_eq!(
        charging["state"],
        json!({"type": "charger", "chargingState": "charging", "isPluggedIn": true,
               "chargerVoltage": 231.5, "chargerCurrent": 15.5, "chargerWattage": 3580.0})
    );
    answer(
        &cp,
        json!({"op": "status", "connector": 1, "status": "SuspendedEV"}),
    );
    let suspended = site
        .point("ocpp-CP-1", |p| p["state"]["chargingState"] == "idle")
        .await;
    assert_eq!(suspended["state"]["isPluggedIn"], true);
    answer(
        &cp,
        json!({"op": "status", "connector": 1, "status": "Available"}),
    );
    let unplugged = site
        .point("ocpp-CP-1", |p| p["state"]["isPluggedIn"] == false)
        .await;
    assert_eq!(
        unplugged["state"],
        json!({"type": "charger", "chargingState": "idle", "isPluggedIn": false,
               "chargerVoltage": 231.5, "chargerCurrent": 0.0, "chargerWattage": 0.0})
    );

    blocking(|| cp.call(json!({"op": "disconnect", "code": 1000}), WAIT));
    let offline = site
        .point("ocpp-CP-1", |p| p.get("availability").is_some())
        .await;
    assert_eq!(offline["availability"]["online"], false, "{offline}");
    assert!(
        offline["availability"]["reason"]
            .as_str()
            .unwrap()
            .contains("closed"),
        "{offline}"
    );
    blocking(|| cp.call(json!({"op": "connect"}), WAIT));
    let online = site
        .point("ocpp-CP-1", |p| p.get("availability").is_some())
        .await;
    assert_eq!(online["availability"], json!({"online": true}));
    assert_eq!(cp.violations(), Vec::<Value>::new());
}

/// A wrong or missing password, an unknown id or path, and a missing subprotocol are refused at
/// the upgrade with 401, 404 and 400; the refused charge point never connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_unknown_id_and_missing_subprotocol_are_refused() {
    let site = site(300).await;
    let refused = |spec: &Value| {
        let cp = blocking(|| ChargePoint::start(site.dir(), spec));
        assert_eq!(cp.ready_state(), "refused", "{spec}");
        assert!(cp.log().iter().all(|l| l["event"] != "connected"));
        cp.wait_for(|l| l["event"] == "refused", WAIT)["status"].clone()
    };
    let mut wrong = site.spec("CP-1");
    wrong["password"] = json!("garage-door-1235");
    assert_eq!(refused(&wrong), 401);
    let mut missing = site.spec("CP-1");
    missing["password"] = Value::Null;
    assert_eq!(refused(&missing), 401);
    // CP-2's password is not CP-1's: the Basic user must be the charge point's own id.
    let mut other_user = site.spec("CP-1");
    other_user["auth_user"] = json!("CP-2");
    assert_eq!(refused(&other_user), 401);
    let mut unknown = site.spec("CP-9");
    unknown["password"] = json!(PASSWORD);
    assert_eq!(refused(&unknown), 404);
    let mut path = site.spec("CP-1");
    path["url"] = json!(format!("ws://127.0.0.1:{}/other/CP-1", site.port));
    assert_eq!(refused(&path), 404);
    for offered in [json!([]), json!(["ocpp2.0.1"])] {
        let mut spec = site.spec("CP-1");
        spec["subprotocols"] = offered;
        assert_eq!(refused(&spec), 400);
    }
    // And the right credentials with 1.6 among other versions connect.
    let mut right = site.spec("CP-1");
    right["subprotocols"] = json!(["ocpp2.0.1", "ocpp1.6"]);
    site.connect(&right);
    let connected = site.agent.wait_for_logs("ocpp: connected", 1, WAIT);
    assert_eq!(connected.len(), 1, "{}", site.agent.log_dump());
}

/// Malformed JSON is answered FormationViolation (1.6's spelling) under the unique id it
/// carries, an unknown action NotImplemented, a 1.6 action the gateway does not take
/// NotSupported; the connection stays up. An oversized frame closes its connection (1009). The
/// other charge point is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_and_unknown_actions_get_1_6_callerrors_and_the_other_charger_is_served() {
    let site = site(300).await;
    let bad = site.connect(&site.spec("CP-1"));
    let other = site.connect(&site.spec("CP-2"));

    blocking(|| bad.send(json!({"op": "send_raw", "text": "[2, \"broken-1\", \"Heartbeat\", {"})));
    let formation = received(&bad, "broken-1");
    assert_eq!(
        (&formation[0], &formation[2]),
        (&json!(4), &json!("FormationViolation")),
        "{formation}"
    );
    assert_eq!(
        (formation.as_array().unwrap().len(), &formation[4]),
        (5, &json!({}))
    );
    blocking(|| {
        bad.send(json!({"op": "send_raw", "text": "[2, \"unknown-1\", \"FlyToTheMoon\", {}]"}))
    });
    assert_eq!(received(&bad, "unknown-1")[2], "NotImplemented");
    let data = answer(
        &bad,
        json!({"op": "call", "action": "DataTransfer", "payload": {"vendorId": "Texture"}}),
    );
    assert_eq!(data[2], "NotSupported", "{data}");
    blocking(|| {
        bad.send(json!({"op": "send_raw", "text": "[2, \"missing-1\", \"Authorize\", {}]"}))
    });
    assert_eq!(
        received(&bad, "missing-1")[2],
        "OccurenceConstraintViolation"
    );
    // Text that is not even a CALL gets no answer, and the connection carries on.
    blocking(|| bad.send(json!({"op": "send_raw", "text": "}{"})));
    assert_eq!(answer(&bad, json!({"op": "heartbeat"}))[0], 3);
    assert_eq!(answer(&other, json!({"op": "heartbeat"}))[0], 3);

    // 5000 bytes, over the site's max_message_bytes of 4096.
    let huge = format!(
        "[2, \"huge-1\", \"DataTransfer\", {{\"vendorId\": \"{}\"}}]",
        "x".repeat(5000)
    );
    blocking(|| bad.send(json!({"op": "send_raw", "text": huge})));
    let closed = bad.wait_for(|l| l["event"] == "closed", WAIT);
    assert_eq!(
        (closed["code"].clone(), closed["local"].clone()),
        (json!(1009), json!(false)),
        "{closed}"
    );
    assert_eq!(answer(&other, json!({"op": "heartbeat"}))[0], 3);
    // The script cannot tell a CALL whose JSON it sent broken from no CALL at all, so the answer
    // to broken-1 is flagged as answering nothing; any other violation is the agent's.
    let violations: Vec<Value> = bad
        .violations()
        .into_iter()
        .filter(|v| {
            v["unique_id"] != "broken-1"
                || v["violations"] != json!(["answers no CALL this charge point sent"])
        })
        .collect();
    assert_eq!(violations, Vec::<Value>::new());
    assert_eq!(other.violations(), Vec::<Value>::new());
    // The agent logged each frame it could not take.
    assert!(
        site.agent.logs_with_message("ocpp: frame").len() >= 4,
        "{}",
        site.agent.log_dump()
    );
}

/// A charge point whose socket stays open but that sends nothing for `2 × heartbeat_secs + 10`
/// seconds is closed (1001) and reported offline, with silence as the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_charge_point_is_closed_and_reported_offline() {
    let mut site = site(1).await;
    let cp = site.connect(&site.spec("CP-2"));
    answer(
        &cp,
        json!({"op": "status", "connector": 1, "status": "Preparing"}),
    );
    answer(
        &cp,
        json!({"op": "meter_values", "connector": 1, "sampled": [
        {"measurand": "Voltage", "value": "230"},
        {"measurand": "Current.Import", "value": "0"},
        {"measurand": "Power.Active.Import", "value": "0"}]}),
    );
    let silent_from = Instant::now();
    let preparing = site.point("ocpp-CP-2", |p| p.get("state").is_some()).await;
    assert_eq!(preparing["state"]["isPluggedIn"], true);
    let offline = site
        .point("ocpp-CP-2", |p| p.get("availability").is_some())
        .await;
    assert_eq!(
        offline["availability"],
        json!({"online": false, "reason": "silent for more than 12 s"})
    );
    assert!(
        silent_from.elapsed() >= Duration::from_secs(12),
        "{:?}",
        silent_from.elapsed()
    );
    let closed = cp.wait_for(|l| l["event"] == "closed", WAIT);
    assert_eq!(
        (closed["code"].clone(), closed["local"].clone()),
        (json!(1001), json!(false))
    );
}

/// The CALL the charge point received with action `action`, the `n`th (from 0) over all its
/// connections, parsed.
fn call_received(cp: &ChargePoint, action: &str, n: usize) -> Value {
    eventually(
        || format!("no CALL {action} #{n}: {:?}", cp.frames_received()),
        || {
            cp.frames_received()
                .iter()
                .map(|f| parse(f))
                .filter(|f| f[0] == 2 && f[2] == action)
                .nth(n)
        },
    )
}

/// `found`'s value once it has one, polled every 20 ms for up to [`WAIT`]; then the test fails
/// with `missing`.
fn eventually<T>(missing: impl Fn() -> String, mut found: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(value) = found() {
            return value;
        }
        assert!(Instant::now() < deadline, "{}", missing());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `charger:set-operating-mode` reaches the charge point as RemoteStartTransaction (connector
/// 1, the local list's first tag) and RemoteStopTransaction (the transaction it started); the
/// reply waits for the charger's answer, and a Rejected start fails the command with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_operating_mode_is_a_remote_start_or_stop_answered_by_the_charger() {
    let mut site = site(300).await;
    let mut spec = site.spec("CP-1");
    spec["answers"] = json!({"RemoteStartTransaction": {"status": "Accepted", "delay_ms": 300,
        "then": [{"op": "start_transaction", "connector": 1, "id_tag": "GOOD-TAG", "meter_start": 0}]}});
    let cp = site.connect(&spec);
    answer(
        &cp,
        json!({"op": "status", "connector": 1, "status": "Preparing"}),
    );
    answer(
        &cp,
        json!({"op": "meter_values", "connector": 1, "sampled": [
        {"measurand": "Voltage", "value": "230"},
        {"measurand": "Current.Import", "value": "0"},
        {"measurand": "Power.Active.Import", "value": "0"}]}),
    );
    site.point("ocpp-CP-1", |p| p.get("state").is_some()).await;

    let start_mode = json!({"operatingMode": "start-charging"});
    let asked = Instant::now();
    let started = site
        .ask(
            "cmd-start",
            "ocpp-CP-1",
            "charger:set-operating-mode",
            start_mode.clone(),
        )
        .await;
    assert_eq!(started["type"], "command.succeeded", "{started}");
    assert_eq!(started["result"], json!({"status": "Accepted"}));
    let remote_start = call_received(&cp, "RemoteStartTransaction", 0);
    assert_eq!(
        remote_start[3],
        json!({"connectorId": 1, "idTag": "GOOD-TAG"})
    );
    // The charger answers 300 ms after the CALL, and the reply waited for it.
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "{:?}",
        asked.elapsed()
    );
    let transaction = cp.wait_for(
        |l| l["event"] == "op" && l["op"] == "start_transaction",
        WAIT,
    );
    let transaction_id = transaction["payload"]["transactionId"].as_i64().unwrap();

    let stopped = site
        .ask(
            "cmd-stop",
            "ocpp-CP-1",
            "charger:set-operating-mode",
            json!({"operatingMode": "stop-charging"}),
        )
        .await;
    assert_eq!(stopped["type"], "command.succeeded", "{stopped}");
    let remote_stop = call_received(&cp, "RemoteStopTransaction", 0);
    assert_eq!(remote_stop[3], json!({"transactionId": transaction_id}));

    blocking(|| {
        cp.set_answer(
            "RemoteStartTransaction",
            json!({"status": "Rejected"}),
            WAIT,
        )
    });
    let rejected = site
        .ask(
            "cmd-rejected",
            "ocpp-CP-1",
            "charger:set-operating-mode",
            start_mode,
        )
        .await;
    assert_eq!(rejected["type"], "command.failed", "{rejected}");
    assert_eq!(rejected["status"], 500, "{rejected}");
    assert_eq!(
        rejected["error"]["message"], "CP-1 answered RemoteStartTransaction with Rejected",
        "{rejected}"
    );
    call_received(&cp, "RemoteStartTransaction", 1);
    assert_eq!(cp.violations(), Vec::<Value>::new());

    // A charger that never answers and then drops its socket fails the command at once.
    blocking(|| cp.set_answer("RemoteStopTransaction", json!({"silent": true}), WAIT));
    site.send(
        "cmd-lost",
        "ocpp-CP-1",
        "charger:set-operating-mode",
        json!({"operatingMode": "stop-charging"}),
    )
    .await;
    call_received(&cp, "RemoteStopTransaction", 1);
    blocking(|| cp.call(json!({"op": "disconnect", "abrupt": true}), WAIT));
    let lost = site.reply("cmd-lost").await;
    assert_eq!(lost["type"], "command.failed", "{lost}");
    assert!(
        lost["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("the charge point went offline before answering RemoteStopTransaction"),
        "{lost}"
    );
}

/// More than `max_messages_per_sec` (10 by default) messages within a second close the
/// connection (1008) before all of 40 sent at once are answered; the charger may reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charge_point_over_the_message_rate_is_closed() {
    let site = site(300).await;
    let cp = site.connect(&site.spec("CP-2"));
    for i in 0..40 {
        let text = format!("[2, \"beat-{i}\", \"Heartbeat\", {{}}]");
        blocking(|| cp.send(json!({"op": "send_raw", "text": text})));
    }
    let closed = cp.wait_for(|l| l["event"] == "closed", WAIT);
    assert_eq!(
        (closed["code"].clone(), closed["local"].clone()),
        (json!(1008), json!(false)),
        "{closed}"
    );
    assert_eq!(received(&cp, "beat-0")[0], 3);
    let answered = cp.frames_received().len();
    // The 10 admitted in the first second are all answered before the close; the rest are not.
    assert!((10..40).contains(&answered), "{answered} answers");
    assert_eq!(
        blocking(|| cp.call(json!({"op": "connect"}), WAIT))["outcome"],
        "connected"
    );
}

/// An agent without an ocpp driver listens on no TCP port at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_without_an_ocpp_driver_opens_no_port() {
    let Testbed {
        pki,
        broker,
        signer,
        mut peer,
    } = Testbed::start(
        PlatformSigner::generate("platform-ocpp"),
        &[&device_topic(GATEWAY, "capabilities")],
    )
    .await;
    let cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, WORKSPACE);
    let agent = Agent::spawn(BIN, &cfg.write(pki.path()));
    // Connected and running: it has published its capabilities.
    peer.expect(&device_topic(GATEWAY, "capabilities"), WAIT, |_| true)
        .await;
    assert_eq!(listening_ports(agent.pid()), Vec::<u16>::new());
}

/// The position in `cp`'s log of the first line satisfying `pred`.
fn position(cp: &ChargePoint, what: &str, pred: impl Fn(&Value) -> bool) -> usize {
    let log = cp.log();
    log.iter()
        .position(pred)
        .unwrap_or_else(|| panic!("no {what} in the charge point's log: {log:?}"))
}

/// Whether log line `l` is a frame in direction `dir` whose parsed text satisfies `pred`.
fn is_frame(l: &Value, dir: &str, pred: impl Fn(&Value) -> bool) -> bool {
    l["event"] == "frame"
        && l["dir"] == dir
        && l["text"]
            .as_str()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
            .is_some_and(|f| pred(&f))
}

/// Unix seconds as the agent writes them in a profile (RFC 3339, UTC, whole seconds): fixed
/// width, so two of them compare as the times do.
fn at(unix: u64) -> String {
    texture_agent::model::clock::rfc3339(unix)
}

fn now() -> u64 {
    texture_agent::model::clock::system_secs()
}

/// Status and all three measurands of connector 1, so the agent reports (and lists) its device.
fn report_charging(cp: &ChargePoint) {
    report_connector(cp, 1);
}

/// [`report_charging`] for connector `n`.
fn report_connector(cp: &ChargePoint, n: u32) {
    blocking(|| cp.report_charging(n, WAIT));
}

/// The CALLs received on connection `conn`, once `ready` holds for them.
fn calls_on(cp: &ChargePoint, conn: u64, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    eventually(
        || format!("connection {conn}: {:?}", cp.calls_on(conn)),
        || Some(cp.calls_on(conn)).filter(|calls| ready(calls)),
    )
}

/// When (the charge point's clock, Unix seconds) it received the CALL with unique id `id`.
fn received_at(cp: &ChargePoint, id: &Value) -> f64 {
    let line = cp.wait_for(
        |l| is_frame(l, "received", |f| f[0] == 2 && f[1] == *id),
        WAIT,
    );
    line["t"].as_f64().unwrap()
}

/// The installer's limit reaches the charger at each connection, after its BootNotification
/// is answered, as a ChargePointMaxProfile with no end; a `charger:set-charge-rate-limit`
/// becomes a TxDefaultProfile whose `validTo` is at most `limit_valid_secs` ahead and never past
/// the command's hold, and the agent renews it before it lapses and sends it again when the
/// charger reconnects. Every CALL the charger receives validates against the 1.6 schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_installers_limit_is_a_max_profile_and_every_charge_limit_expires_on_the_charger() {
    let lease = 12;
    let mut site = site_with(
        300,
        &format!(
            "limit_valid_secs = {lease}\n\n[[limits]]\ndevice_id = \"ocpp-CP-1\"\n\
             device_type = \"charger\"\nmax_current_a = 16\ndefault_control = \
             {{ command = \"charger:set-charge-rate-limit\", input = {{ currentLimit = 6 }} }}\n"
        ),
    )
    .await;
    let mut spec = site.spec("CP-1");
    spec["boot_on_connect"] = json!(true);
    let cp = site.connect(&spec);

    // After the boot's answer: the max profile, then the triggers, one CALL at a time.
    let max = call_received(&cp, "SetChargingProfile", 0);
    assert_eq!(max[3]["connectorId"], 0, "{max}");
    let profile = &max[3]["csChargingProfiles"];
    assert_eq!(profile["chargingProfilePurpose"], "ChargePointMaxProfile");
    assert_eq!(profile["chargingSchedule"]["chargingRateUnit"], "A");
    assert_eq!(
        profile["chargingSchedule"]["chargingSchedulePeriod"],
        json!([{"startPeriod": 0, "limit": 16.0}])
    );
    assert!(profile.get("validTo").is_none(), "{max}");
    let boot_answered = position(&cp, "the boot's answer", |l| {
        is_frame(l, "received", |f| f[0] == 3 && f[2]["status"] == "Accepted")
    });
    let max_sent = position(&cp, "the max profile", |l| {
        is_frame(l, "received", |f| f[2] == "SetChargingProfile")
    });
    assert!(boot_answered < max_sent, "{:?}", cp.log());
    let triggers: Vec<Value> = (0..2)
        .map(|n| call_received(&cp, "TriggerMessage", n)[3].clone())
        .collect();
    assert_eq!(
        triggers,
        [
            json!({"requestedMessage": "StatusNotification", "connectorId": 1}),
            json!({"requestedMessage": "MeterValues", "connectorId": 1})
        ]
    );
    report_charging(&cp);
    site.point("ocpp-CP-1", |p| p.get("state").is_some()).await;

    // A held limit: the lease is shorter than the hold, so validTo is one lease ahead.
    let before = now();
    let held = site
        .ask(
            "cmd-limit",
            "ocpp-CP-1",
            "charger:set-charge-rate-limit",
            json!({"currentLimit": 10, "holdSecs": 120}),
        )
        .await;
    let after = now();
    assert_eq!(held["type"], "command.succeeded", "{held}");
    let set = call_received(&cp, "SetChargingProfile", 1);
    let profile = &set[3]["csChargingProfiles"];
    assert_eq!(set[3]["connectorId"], 1, "{set}");
    assert_eq!(profile["chargingProfilePurpose"], "TxDefaultProfile");
    assert_eq!(
        profile["chargingSchedule"]["chargingSchedulePeriod"],
        json!([{"startPeriod": 0, "limit": 10.0}])
    );
    let valid_to = profile["validTo"].as_str().unwrap().to_owned();
    assert!(
        at(before + lease) <= valid_to && valid_to <= at(after + lease),
        "{valid_to} is not {lease} s after {}",
        at(before)
    );
    assert_eq!(
        held["result"],
        json!({"status": "Accepted", "chargingRateUnit": "A", "limit": 10.0, "validTo": valid_to})
    );

    // Renewed before it lapses, once, two thirds into the lease: the same limit, a later validTo.
    let renewed = call_received(&cp, "SetChargingProfile", 2);
    let gap = received_at(&cp, &renewed[1]) - received_at(&cp, &set[1]);
    let two_thirds = (lease * 2 / 3) as f64;
    assert!(
        (two_thirds - 1.5..lease as f64).contains(&gap),
        "renewed {gap:.1} s after the profile, not about {two_thirds} s"
    );
    let again = &renewed[3]["csChargingProfiles"];
    assert_eq!(
        again["chargingSchedule"],
        profile["chargingSchedule"]
            .as_object()
            .map(|s| {
                let mut s = s.clone();
                s["startSchedule"] = again["chargingSchedule"]["startSchedule"].clone();
                Value::Object(s)
            })
            .unwrap()
    );
    let renewed_to = again["validTo"].as_str().unwrap();
    assert!(
        renewed_to > valid_to.as_str(),
        "{renewed_to} after {valid_to}"
    );
    assert!(
        renewed_to < at(now() + lease + 1).as_str(),
        "the renewal is also one lease: {renewed_to}"
    );

    // A refused profile fails its command with the charger's status.
    blocking(|| cp.set_answer("SetChargingProfile", json!({"status": "Rejected"}), WAIT));
    let rejected = site
        .ask(
            "cmd-rejected",
            "ocpp-CP-1",
            "charger:set-charge-rate-limit",
            json!({"currentLimit": 12}),
        )
        .await;
    assert_eq!(rejected["type"], "command.failed", "{rejected}");
    assert_eq!(
        rejected["error"]["message"], "CP-1 answered SetChargingProfile with Rejected",
        "{rejected}"
    );
    blocking(|| cp.set_answer("SetChargingProfile", json!({"status": "Accepted"}), WAIT));

    // Reconnected, the charger gets the installer's profile and the standing limit (10 A,
    // not the refused 12 A) again.
    let reconnected_at = now();
    blocking(|| cp.call(json!({"op": "reconnect"}), WAIT));
    let again = calls_on(&cp, 2, |calls| calls.len() >= 2);
    assert_eq!(
        (again[0][2].clone(), again[1][2].clone()),
        (json!("SetChargingProfile"), json!("SetChargingProfile")),
        "{again:?}"
    );
    assert_eq!(
        again[0][3]["csChargingProfiles"]["chargingProfilePurpose"],
        "ChargePointMaxProfile"
    );
    let profile = &again[1][3]["csChargingProfiles"];
    assert_eq!(profile["chargingProfilePurpose"], "TxDefaultProfile");
    assert_eq!(
        profile["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"],
        10.0
    );
    assert!(
        profile["validTo"].as_str().unwrap() >= at(reconnected_at + lease).as_str(),
        "leased again from the reconnection: {profile}"
    );
    assert_eq!(cp.violations(), Vec::<Value>::new());
}

/// Two charge points at once, two commands for each: each charger gets its own CALLs and no
/// other's, and each command the answer of its own charger. A charger with a CALL unanswered
/// gets no second one until it answers (OCPP-J 4.1.1): here the profile sent at connection is
/// answered slowly, and the triggers behind it wait. A charge point without `max_current_a` has
/// our ChargePointMaxProfile cleared instead, and takes a limit in watts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_charge_points_at_once_get_their_own_commands_one_call_at_a_time() {
    let mut site = site(300).await;
    let slow = json!({"SetChargingProfile": {"status": "Accepted", "delay_ms": 700}});
    let mut one = site.spec("CP-1");
    one["boot_on_connect"] = json!(true);
    one["answers"] = slow.clone();
    let mut two = site.spec("CP-2");
    two["boot_on_connect"] = json!(true);
    two["answers"] = slow;
    let cp1 = site.connect(&one);
    let cp2 = site.connect(&two);
    call_received(&cp1, "TriggerMessage", 1);
    call_received(&cp2, "TriggerMessage", 1);
    let max = call_received(&cp1, "SetChargingProfile", 0);
    let max_id = max[1].clone();
    let answered = position(&cp1, "the max profile's answer", |l| {
        is_frame(l, "sent", |f| f[0] == 3 && f[1] == max_id)
    });
    let triggered = position(&cp1, "the first TriggerMessage", |l| {
        is_frame(l, "received", |f| f[2] == "TriggerMessage")
    });
    assert!(answered < triggered, "{:?}", cp1.log());
    let clear = call_received(&cp2, "ClearChargingProfile", 0);
    assert_eq!(clear[3], json!({"id": 1}));
    // One at a time: a batch holding both devices' points is read once.
    report_charging(&cp1);
    site.point("ocpp-CP-1", |p| p.get("state").is_some()).await;
    report_charging(&cp2);
    site.point("ocpp-CP-2", |p| p.get("state").is_some()).await;

    // A newer command for a device supersedes its older one (PROTOCOL 4.4), so the two
    // chargers are commanded at once, one command each at a time.
    site.send(
        "cmd-1-limit",
        "ocpp-CP-1",
        "charger:set-charge-rate-limit",
        json!({"currentLimit": 8}),
    )
    .await;
    site.send(
        "cmd-2-limit",
        "ocpp-CP-2",
        "charger:set-charge-rate-limit",
        json!({"powerLimit": 3680}),
    )
    .await;
    let limited = [
        site.reply("cmd-1-limit").await,
        site.reply("cmd-2-limit").await,
    ];
    let start = json!({"operatingMode": "start-charging"});
    site.send(
        "cmd-1-start",
        "ocpp-CP-1",
        "charger:set-operating-mode",
        start.clone(),
    )
    .await;
    site.send(
        "cmd-2-start",
        "ocpp-CP-2",
        "charger:set-operating-mode",
        start,
    )
    .await;
    let started = [
        site.reply("cmd-1-start").await,
        site.reply("cmd-2-start").await,
    ];
    for r in limited.iter().chain(&started) {
        assert_eq!(r["type"], "command.succeeded", "{r}");
    }
    assert_eq!(limited[0]["result"]["chargingRateUnit"], "A");
    assert_eq!(limited[0]["result"]["limit"], 8.0);
    assert_eq!(limited[1]["result"]["chargingRateUnit"], "W");
    assert_eq!(limited[1]["result"]["limit"], 3680.0);
    assert_eq!(started[1]["result"], json!({"status": "Accepted"}));

    for (cp, unit, limit) in [(&cp1, "A", 8.0), (&cp2, "W", 3680.0)] {
        let calls = cp.calls_on(1);
        let profiles: Vec<&Value> = calls
            .iter()
            .filter(|f| {
                f[2] == "SetChargingProfile"
                    && f[3]["csChargingProfiles"]["chargingProfilePurpose"] == "TxDefaultProfile"
            })
            .collect();
        assert_eq!(profiles.len(), 1, "{calls:?}");
        let schedule = &profiles[0][3]["csChargingProfiles"]["chargingSchedule"];
        assert_eq!(
            (
                schedule["chargingRateUnit"].clone(),
                schedule["chargingSchedulePeriod"][0]["limit"].clone()
            ),
            (json!(unit), json!(limit)),
            "{calls:?}"
        );
        let starts = calls
            .iter()
            .filter(|f| f[2] == "RemoteStartTransaction")
            .count();
        assert_eq!(starts, 1, "{calls:?}");
        assert_eq!(cp.violations(), Vec::<Value>::new());
    }
    // No unique id was sent to both chargers.
    let ids =
        |cp: &ChargePoint| -> Vec<Value> { cp.calls_on(1).iter().map(|f| f[1].clone()).collect() };
    let (ids1, ids2) = (ids(&cp1), ids(&cp2));
    assert!(
        ids1.iter().all(|id| !ids2.contains(id)),
        "{ids1:?} {ids2:?}"
    );
}

/// A charge point with two connectors is two devices: connector 2 is `ocpp-CP-2-2`, with its
/// own state, its own triggers at connection, and commands that name connector 2; when the
/// charger leaves, the device says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_connector_is_a_device_of_its_own() {
    let mut site = site(300).await;
    let mut spec = site.spec("CP-2");
    spec["boot_on_connect"] = json!(true);
    spec["connectors"] = json!(2);
    spec["answers"] = json!({"RemoteStartTransaction": {"status": "Accepted",
        "then": [{"op": "start_transaction", "connector": 2, "id_tag": "GOOD-TAG", "meter_start": 0}]}});
    let cp = site.connect(&spec);
    let triggers: Vec<Value> = (0..4)
        .map(|n| call_received(&cp, "TriggerMessage", n)[3].clone())
        .collect();
    assert_eq!(
        triggers,
        [
            json!({"requestedMessage": "StatusNotification", "connectorId": 1}),
            json!({"requestedMessage": "MeterValues", "connectorId": 1}),
            json!({"requestedMessage": "StatusNotification", "connectorId": 2}),
            json!({"requestedMessage": "MeterValues", "connectorId": 2}),
        ]
    );
    report_connector(&cp, 2);
    let point = site
        .point("ocpp-CP-2-2", |p| p.get("state").is_some())
        .await;
    assert_eq!(point["state"]["chargingState"], "charging", "{point}");

    let limited = site
        .ask(
            "cmd-2-2-limit",
            "ocpp-CP-2-2",
            "charger:set-charge-rate-limit",
            json!({"powerLimit": 7400}),
        )
        .await;
    assert_eq!(limited["type"], "command.succeeded", "{limited}");
    let set = call_received(&cp, "SetChargingProfile", 0);
    assert_eq!(set[3]["connectorId"], 2, "{set}");
    let started = site
        .ask(
            "cmd-2-2-start",
            "ocpp-CP-2-2",
            "charger:set-operating-mode",
            json!({"operatingMode": "start-charging"}),
        )
        .await;
    assert_eq!(started["type"], "command.succeeded", "{started}");
    let start = call_received(&cp, "RemoteStartTransaction", 0);
    assert_eq!(start[3]["connectorId"], 2, "{start}");
    let transaction = cp.wait_for(
        |l| l["event"] == "op" && l["op"] == "start_transaction",
        WAIT,
    );
    let stopped = site
        .ask(
            "cmd-2-2-stop",
            "ocpp-CP-2-2",
            "charger:set-operating-mode",
            json!({"operatingMode": "stop-charging"}),
        )
        .await;
    assert_eq!(stopped["type"], "command.succeeded", "{stopped}");
    let stop = call_received(&cp, "RemoteStopTransaction", 0);
    assert_eq!(
        stop[3]["transactionId"], transaction["payload"]["transactionId"],
        "connector 2's transaction: {stop}"
    );
    // Connector 1 has no transaction of its own: nothing to stop.
    report_charging(&cp);
    site.point("ocpp-CP-2", |p| p.get("state").is_some()).await;
    let nothing = site
        .ask(
            "cmd-2-1-stop",
            "ocpp-CP-2",
            "charger:set-operating-mode",
            json!({"operatingMode": "stop-charging"}),
        )
        .await;
    assert_eq!(
        nothing["error"]["message"], "no transaction is running on connector 1",
        "{nothing}"
    );
    assert_eq!(cp.violations(), Vec::<Value>::new());

    blocking(|| cp.call(json!({"op": "disconnect", "code": 1000}), WAIT));
    let offline = site
        .point("ocpp-CP-2-2", |p| p.get("availability").is_some())
        .await;
    assert_eq!(offline["availability"]["online"], false, "{offline}");
}

/// OCPP security profile 2: with `tls_cert_file` and `tls_key_file` the port speaks TLS only.
/// A charger that trusts the gateway's certificate connects over `wss://` and is served, with
/// its HTTP Basic password checked inside the TLS session; a charger set to plain `ws://`, or
/// one that does not trust the certificate, does not get in, and the agent says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_profile_2_serves_wss_only() {
    let certs = tempfile::tempdir().unwrap();
    let ca = kit::Ca::new(certs.path(), "ocpp-hub");
    let hub = ca.server("hub", &["localhost", "127.0.0.1"]);
    let site = site_with(
        300,
        &format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            hub.cert.display(),
            hub.key.display()
        ),
    )
    .await;
    let wss = |id: &str, ca_file: &Path| {
        let mut spec = site.spec(id);
        spec["url"] = json!(format!("wss://127.0.0.1:{}/ocpp/{id}", site.port));
        spec["ca_file"] = json!(ca_file.display().to_string());
        spec
    };

    let plain = blocking(|| ChargePoint::start(site.dir(), &site.spec("CP-2")));
    assert_ne!(plain.ready_state(), "connected");
    blocking(|| site.agent.wait_for_log("ocpp: TLS handshake failed", WAIT));
    let untrusting =
        blocking(|| ChargePoint::start(site.dir(), &wss("CP-2", &site.pki.ca.cert_path())));
    assert_eq!(untrusting.ready_state(), "connect_failed");
    let failed = untrusting.wait_for(|l| l["event"] == "connect_failed", WAIT);
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("CERTIFICATE_VERIFY_FAILED"),
        "{failed}"
    );

    let mut wrong = wss("CP-1", &ca.cert_path());
    wrong["password"] = json!("not-the-password");
    let refused = blocking(|| ChargePoint::start(site.dir(), &wrong));
    assert_eq!(refused.ready_state(), "refused");
    let refusal = refused.wait_for(|l| l["event"] == "refused", WAIT);
    assert_eq!(refusal["status"], 401);

    let cp = site.connect(&wss("CP-1", &ca.cert_path()));
    let boot = answer(&cp, json!({"op": "boot"}));
    assert_eq!(boot[2]["status"], "Accepted", "{boot}");
    call_received(&cp, "SetChargingProfile", 0);
    assert_eq!(cp.violations(), Vec::<Value>::new());
}

/// With `require_max_profile`, a charger that refuses the installer's ChargePointMaxProfile is
/// made Inoperative by the very next CALL, ahead of the triggers, and made Operative again once
/// it takes the profile (here after it reconnects).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_charger_that_refuses_the_installers_limit_is_made_inoperative_until_it_takes_it() {
    let site = site(300).await;
    let mut spec = site.spec("CP-3");
    spec["boot_on_connect"] = json!(true);
    spec["answers"] = json!({"SetChargingProfile": {"status": "Rejected"}});
    let cp = site.connect(&spec);
    let inoperative = call_received(&cp, "ChangeAvailability", 0);
    assert_eq!(
        inoperative[3],
        json!({"connectorId": 0, "type": "Inoperative"})
    );
    let sent = cp.calls_on(1);
    assert_eq!(
        (sent[0][2].as_str(), sent[1][2].as_str()),
        (Some("SetChargingProfile"), Some("ChangeAvailability")),
        "{sent:?}"
    );
    assert_eq!(
        sent[0][3]["csChargingProfiles"]["chargingSchedule"]["chargingSchedulePeriod"][0]["limit"],
        10.0
    );
    blocking(|| {
        site.agent.wait_for_log(
            "ocpp: the charger refused the installer's limit; making it inoperative",
            WAIT,
        )
    });

    blocking(|| cp.set_answer("SetChargingProfile", json!({"status": "Accepted"}), WAIT));
    blocking(|| cp.call(json!({"op": "reconnect"}), WAIT));
    let again = calls_on(&cp, 2, |calls| calls.len() >= 2);
    assert_eq!(again[0][2], "SetChargingProfile", "{again:?}");
    assert_eq!(
        again[1],
        json!([2, again[1][1].clone(), "ChangeAvailability", {"connectorId": 0, "type": "Operative"}]),
        "right after the profile is taken"
    );
    assert_eq!(cp.violations(), Vec::<Value>::new());
}

/// Answers are not counted by the message rate (the gateway sends one CALL at a time), so a
/// burst of 16 answers to no CALL, faster than `max_messages_per_sec`, leaves the charger
/// connected and served; more than 16 in a row close it (1008), whether they read or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_to_no_call_are_not_rated_but_more_than_16_close_the_connection() {
    let site = site(300).await;
    let cp = site.connect(&site.spec("CP-2"));
    for i in 0..16 {
        let text = format!("[3, \"nobody-{i}\", {{}}]");
        blocking(|| cp.send(json!({"op": "send_raw", "text": text})));
    }
    let beat = answer(&cp, json!({"op": "heartbeat"}));
    assert_eq!(beat[0], 3, "still served after 16 stray answers: {beat}");
    // The gateway's CALLs that follow are answered in turn, which resets the count; the last
    // is connector 2's MeterValues trigger, and once it is answered nothing else is asked.
    let last = call_received(&cp, "TriggerMessage", 3);
    assert_eq!(
        last[3],
        json!({"requestedMessage": "MeterValues", "connectorId": 2})
    );
    let last_id = last[1].clone();
    cp.wait_for(
        |l| is_frame(l, "sent", |f| f[0] == 3 && f[1] == last_id),
        WAIT,
    );
    for i in 0..17 {
        // Every other one does not even read as an answer.
        let text = if i % 2 == 0 {
            format!("[3, \"late-{i}\", {{}}]")
        } else {
            format!("[4, \"late-{i}\"")
        };
        blocking(|| cp.send(json!({"op": "send_raw", "text": text})));
    }
    let closed = cp.wait_for(|l| l["event"] == "closed", WAIT);
    assert_eq!(
        (closed["code"].clone(), closed["reason"].clone()),
        (json!(1008), json!("answers to no CALL")),
        "{closed}"
    );
}
