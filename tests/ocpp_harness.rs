//! The OCPP charge point harness itself (testkit::ocpp, tests/ocpp/charge_point.py), proven
//! against a small central system of the same library (tests/ocpp/central_system.py) before any
//! agent test relies on it: that frames cross byte for byte and are logged raw on both sides, that
//! the charge point answers CALLs as its SPEC says (and in OCPP-J 1.6's terms where the library
//! would not), that refusals and closes are logged as they happened, and that a CALL op never
//! waits out its timeout on a closed connection.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use texture_agent_testkit::ocpp::{json_lines, ocpp_script_dir, wait_for_line};
use texture_agent_testkit::{pyenv_python, ChargePoint};

const WAIT: Duration = Duration::from_secs(10);

/// A running `central_system.py` on an ephemeral port of 127.0.0.1; killed on drop.
struct CentralSystem {
    port: u16,
    log: PathBuf,
    stderr: PathBuf,
    stdin: Mutex<ChildStdin>,
    child: Child,
}

impl CentralSystem {
    fn start(dir: &Path, spec: &Value) -> CentralSystem {
        let spec_file = dir.join("central-system.spec.json");
        std::fs::write(&spec_file, spec.to_string()).unwrap();
        let port_file = dir.join("central-system.port");
        let log = dir.join("central-system.log");
        let stderr = dir.join("central-system.stderr");
        let mut child = Command::new(pyenv_python())
            .arg(ocpp_script_dir().join("central_system.py"))
            .arg("--spec")
            .arg(&spec_file)
            .arg("--port-file")
            .arg(&port_file)
            .arg("--log")
            .arg(&log)
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn central_system.py");
        let stdin = Mutex::new(child.stdin.take().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            // Renamed into place complete, so any content is the port.
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                break text.trim().parse().expect("a port number");
            }
            let exited = child.try_wait().unwrap();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "central_system.py not listening ({exited:?}):\n{}",
                    std::fs::read_to_string(&stderr).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        CentralSystem {
            port,
            log,
            stderr,
            stdin,
            child,
        }
    }

    fn url(&self, id: &str) -> String {
        format!("ws://127.0.0.1:{}/ocpp/{id}", self.port)
    }

    fn send(&self, op: Value) {
        use std::io::Write;
        let mut stdin = self.stdin.lock().unwrap();
        writeln!(stdin, "{op}").unwrap();
        stdin.flush().unwrap();
    }

    fn log(&self) -> Vec<Value> {
        json_lines(&self.log)
    }

    fn wait_for(&self, pred: impl Fn(&Value) -> bool) -> Value {
        let what = || {
            format!(
                "central system (stderr: {})",
                std::fs::read_to_string(&self.stderr).unwrap_or_default()
            )
        };
        wait_for_line(what, WAIT, || self.log(), pred)
    }

    /// Sends a CALL to charge point `cp` and returns the op's outcome line (the raw answer).
    fn call(&self, cp: &str, action: &str, payload: Value, reference: &str) -> Value {
        self.send(
            json!({"op": "call", "cp": cp, "action": action, "payload": payload,
                         "ref": reference}),
        );
        self.wait_for(|l| l["event"] == "op" && l["ref"] == reference)
    }

    fn frames(&self, dir: &str) -> Vec<String> {
        self.log()
            .into_iter()
            .filter(|l| l["event"] == "frame" && l["dir"] == dir)
            .map(|l| l["text"].as_str().unwrap().to_string())
            .collect()
    }
}

impl Drop for CentralSystem {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn central_system(dir: &Path) -> CentralSystem {
    CentralSystem::start(
        dir,
        &json!({"path": "ocpp", "charge_points": {"CP1": "s3cret-password-16", "CP2": null},
                "heartbeat_interval": 1, "silent": ["Authorize"]}),
    )
}

/// A charge point spec for `CP1` on `cs` with the right password, no automatic heartbeat.
fn cp1_spec(cs: &CentralSystem) -> Value {
    json!({"url": cs.url("CP1"), "id": "CP1", "password": "s3cret-password-16",
           "heartbeat": "off", "vendor": "Texture", "model": "HarnessCharger"})
}

/// The JSON array of a raw frame.
fn parse(frame: &str) -> Value {
    serde_json::from_str(frame).unwrap_or_else(|e| panic!("frame {frame:?}: {e}"))
}

/// The frames among `frames` whose unique id is `id`.
fn with_id(frames: &[String], id: &str) -> Vec<String> {
    frames
        .iter()
        .filter(|f| serde_json::from_str::<Value>(f).is_ok_and(|v| v[1] == id))
        .cloned()
        .collect()
}

#[test]
fn boot_and_heartbeat_cross_as_the_same_raw_frames_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    let cp = ChargePoint::start(dir.path(), &cp1_spec(&cs));
    assert_eq!(cp.ready_state(), "connected");
    let connected = cp.wait_for(|l| l["event"] == "connected", WAIT);
    assert_eq!(connected["subprotocol"], "ocpp1.6");
    cs.wait_for(|l| l["event"] == "connected" && l["cp"] == "CP1" && l["subprotocol"] == "ocpp1.6");

    let boot = cp.call(json!({"op": "boot", "ref": "b"}), WAIT);
    assert_eq!(boot["outcome"], "result", "{boot}");
    assert_eq!(boot["ref"], "b");
    assert_eq!(boot["payload"]["status"], "Accepted");
    assert_eq!(boot["payload"]["interval"], 1);
    let id = boot["unique_id"].as_str().unwrap();
    // The CALL the charge point sent is the one the central system received, character for
    // character, and so is the answer the other way.
    let sent = with_id(&cp.frames_sent(), id);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(
        parse(&sent[0]),
        json!([2, id, "BootNotification",
               {"chargePointVendor": "Texture", "chargePointModel": "HarnessCharger"}])
    );
    assert_eq!(with_id(&cs.frames("received"), id), sent);
    let answer = with_id(&cs.frames("sent"), id);
    assert_eq!(answer.len(), 1);
    assert_eq!(with_id(&cp.frames_received(), id), answer);
    assert_eq!(boot["frame"], answer[0].as_str());

    let heartbeat = cp.call(json!({"op": "heartbeat"}), WAIT);
    assert_eq!(heartbeat["outcome"], "result", "{heartbeat}");
    let id = heartbeat["unique_id"].as_str().unwrap();
    assert_eq!(
        parse(&with_id(&cp.frames_sent(), id)[0]),
        json!([2, id, "Heartbeat", {}])
    );
    assert_eq!(
        with_id(&cs.frames("received"), id),
        with_id(&cp.frames_sent(), id)
    );
    assert!(heartbeat["payload"]["currentTime"].is_string());
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());
}

#[test]
fn heartbeat_boot_sends_heartbeats_at_the_interval_the_boot_result_gives() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    let mut spec = cp1_spec(&cs);
    spec["heartbeat"] = json!("boot");
    let cp = ChargePoint::start(dir.path(), &spec);
    let boot = cp.call(json!({"op": "boot"}), WAIT);
    assert_eq!(boot["payload"]["interval"], 1);
    let booted = boot["t"].as_f64().unwrap();
    // Two heartbeats nobody asked for, about a second apart (the central system says 1 s).
    let heartbeats = || {
        cs.log()
            .into_iter()
            .filter(|l| {
                l["dir"] == "received" && l["text"].as_str().unwrap().contains("\"Heartbeat\"")
            })
            .collect::<Vec<_>>()
    };
    cs.wait_for(|_| heartbeats().len() >= 2);
    let times: Vec<f64> = heartbeats()
        .iter()
        .map(|l| l["t"].as_f64().unwrap())
        .collect();
    assert!(
        times[0] - booted > 0.8,
        "first heartbeat too early: {times:?} after {booted}"
    );
    assert!(
        (times[1] - times[0] - 1.0).abs() < 0.5,
        "interval: {times:?}"
    );
    let auto = cp.wait_for(|l| l["event"] == "op" && l["ref"] == "auto", WAIT);
    assert_eq!(auto["outcome"], "result");
    assert_eq!(
        auto["seq"],
        Value::Null,
        "automatic ops have no sequence number"
    );
}

#[test]
fn calls_from_the_central_system_are_answered_with_the_configured_status() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    let mut spec = cp1_spec(&cs);
    spec["answers"] = json!({
        "RemoteStartTransaction": {"status": "Accepted"},
        "RemoteStopTransaction": {"status": "Rejected"},
        "ChangeAvailability": {"status": "Scheduled", "delay_ms": 400},
        "TriggerMessage": {"status": "Accepted"},
    });
    let cp = ChargePoint::start(dir.path(), &spec);
    cp.call(
        json!({"op": "status", "connector": 1, "status": "Preparing"}),
        WAIT,
    );

    for (action, payload, status) in [
        (
            "RemoteStartTransaction",
            json!({"idTag": "TAG1", "connectorId": 1}),
            "Accepted",
        ),
        (
            "RemoteStopTransaction",
            json!({"transactionId": 7}),
            "Rejected",
        ),
        (
            "ChangeAvailability",
            json!({"connectorId": 0, "type": "Inoperative"}),
            "Scheduled",
        ),
        // Not configured: Accepted by default.
        ("ClearChargingProfile", json!({}), "Accepted"),
    ] {
        let outcome = cs.call("CP1", action, payload.clone(), action);
        assert_eq!(outcome["outcome"], "result", "{outcome}");
        let id = outcome["unique_id"].as_str().unwrap();
        assert_eq!(
            parse(outcome["frame"].as_str().unwrap()),
            json!([3, id, {"status": status}]),
            "{action}"
        );
        // The charge point received the CALL as sent, and logged it as a valid 1.6 CALL.
        let received = cp.wait_for(|l| l["dir"] == "received" && l["unique_id"] == id, WAIT);
        assert_eq!(
            parse(received["text"].as_str().unwrap()),
            json!([2, id, action, payload])
        );
        assert_eq!(received["kind"], "call");
        assert_eq!(received["violations"], json!([]));
    }

    // The delay is real: ChangeAvailability's answer left at least 400 ms after its CALL came.
    let frame_time = |dir: &str, action: &str| {
        let log = cp.log();
        let call = log
            .iter()
            .find(|l| l["dir"] == "received" && l["action"] == action)
            .unwrap();
        let id = call["unique_id"].clone();
        let answer = log
            .iter()
            .find(|l| l["dir"] == dir && parse(l["text"].as_str().unwrap())[1] == id)
            .unwrap();
        answer["t"].as_f64().unwrap() - call["t"].as_f64().unwrap()
    };
    assert!(frame_time("sent", "ChangeAvailability") >= 0.4);
    assert!(frame_time("sent", "RemoteStartTransaction") < 0.4);

    // A decimal limit reaches the charge point exactly as the central system wrote it (the
    // library's handlers would see a Decimal; the log has the raw text).
    let profile = json!({"connectorId": 1, "csChargingProfiles": {
        "chargingProfileId": 1, "stackLevel": 0, "chargingProfilePurpose": "TxDefaultProfile",
        "chargingProfileKind": "Absolute", "validTo": "2030-01-01T00:00:00Z",
        "chargingSchedule": {"chargingRateUnit": "A",
                             "chargingSchedulePeriod": [{"startPeriod": 0, "limit": 6.5}]}}});
    let outcome = cs.call("CP1", "SetChargingProfile", profile.clone(), "profile");
    let id = outcome["unique_id"].as_str().unwrap();
    let received = cp.wait_for(|l| l["dir"] == "received" && l["unique_id"] == id, WAIT);
    let text = received["text"].as_str().unwrap();
    assert!(text.contains("\"limit\":6.5"), "{text}");
    assert_eq!(parse(text)[3], profile);

    // Changed at run time: the same action now Rejected.
    let set = cp.call(
        json!({"op": "set_answer", "action": "RemoteStartTransaction",
               "answer": {"status": "Rejected"}}),
        WAIT,
    );
    assert_eq!(set["outcome"], "done");
    let outcome = cs.call(
        "CP1",
        "RemoteStartTransaction",
        json!({"idTag": "T"}),
        "again",
    );
    assert_eq!(
        parse(outcome["frame"].as_str().unwrap())[2],
        json!({"status": "Rejected"})
    );

    // TriggerMessage Accepted is followed by the message asked for, with the connector's last
    // status.
    let outcome = cs.call(
        "CP1",
        "TriggerMessage",
        json!({"requestedMessage": "StatusNotification", "connectorId": 1}),
        "trigger",
    );
    assert_eq!(
        parse(outcome["frame"].as_str().unwrap())[2],
        json!({"status": "Accepted"})
    );
    let triggered = cp.wait_for(|l| l["event"] == "op" && l["ref"] == "trigger", WAIT);
    assert_eq!(triggered["outcome"], "result", "{triggered}");
    let sent = with_id(
        &cs.frames("received"),
        triggered["unique_id"].as_str().unwrap(),
    );
    let status = &parse(&sent[0])[3];
    assert_eq!(
        (status["connectorId"].clone(), status["status"].clone()),
        (json!(1), json!("Preparing"))
    );
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());
}

#[test]
fn the_charge_point_answers_errors_in_ocpp_j_1_6_terms_and_flags_the_frames() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    let mut spec = cp1_spec(&cs);
    spec["answers"] = json!({"ClearChargingProfile": {"error": "InternalError",
                                                      "description": "busy"},
                             "ChangeAvailability": {"silent": true}});
    let cp = ChargePoint::start(dir.path(), &spec);

    let answer = |id: &str| {
        cs.wait_for(|l| l["dir"] == "received" && parse(l["text"].as_str().unwrap())[1] == id)
            ["text"]
            .as_str()
            .map(parse)
            .unwrap()
    };
    // Configured CALLERROR.
    let outcome = cs.call("CP1", "ClearChargingProfile", json!({}), "clear");
    let frame = parse(outcome["frame"].as_str().unwrap());
    assert_eq!(
        (frame[0].clone(), frame[2].clone(), frame[3].clone()),
        (json!(4), json!("InternalError"), json!("busy"))
    );
    // A 1.6 action the charge point does not implement: NotSupported (the library would say
    // NotImplemented).
    let outcome = cs.call("CP1", "GetConfiguration", json!({}), "getconf");
    assert_eq!(parse(outcome["frame"].as_str().unwrap())[2], "NotSupported");
    // An action 1.6 does not have: NotImplemented, and flagged.
    cs.send(json!({"op": "send_raw", "cp": "CP1", "text": "[2,\"u1\",\"FlyToTheMoon\",{}]"}));
    assert_eq!(answer("u1")[2], "NotImplemented");
    // A schema error: 1.6's codes, not the library's FormatViolation.
    cs.send(json!({"op": "send_raw", "cp": "CP1",
                   "text": "[2,\"u2\",\"RemoteStartTransaction\",{}]"}));
    assert_eq!(answer("u2")[2], "OccurenceConstraintViolation");
    cs.send(json!({"op": "send_raw", "cp": "CP1",
                   "text": "[2,\"u3\",\"RemoteStopTransaction\",{\"transactionId\":\"7\"}]"}));
    assert_eq!(answer("u3")[2], "TypeConstraintViolation");
    // Malformed JSON: the library would drop it silently; the log shows it, flagged.
    cs.send(json!({"op": "send_raw", "cp": "CP1", "text": "[2,\"u4\",\"Heart"}));
    let malformed = cp.wait_for(|l| l["text"] == "[2,\"u4\",\"Heart", WAIT);
    assert_eq!(malformed["kind"], "malformed");
    // An error code from 2.0.1 in an answer to the charge point is flagged too.
    cs.send(json!({"op": "send_raw", "cp": "CP1",
                   "text": "[4,\"nobody\",\"FormatViolation\",\"\",{}]"}));
    cp.wait_for(|l| l["unique_id"] == "nobody", WAIT);
    // Silent: no answer at all, so the central system's CALL times out.
    cs.send(
        json!({"op": "call", "cp": "CP1", "action": "ChangeAvailability",
                   "payload": {"connectorId": 1, "type": "Operative"}, "ref": "silent",
                   "timeout": 1}),
    );
    assert_eq!(cs.wait_for(|l| l["ref"] == "silent")["outcome"], "timeout");

    // An answer to the charge point's own CALL that breaks the 1.6 schema: the op's outcome is
    // still the raw answer, flagged, and the library's own verdict is reported beside it.
    let seq = cp.send(json!({"op": "authorize", "id_tag": "TAG"}));
    let call = cs.wait_for(|l| {
        l["dir"] == "received" && l["text"].as_str().unwrap().contains("\"Authorize\"")
    });
    let id = parse(call["text"].as_str().unwrap())[1].clone();
    let bad = json!([3, id, {"idTagInfo": {"status": "Bogus"}}]).to_string();
    cs.send(json!({"op": "send_raw", "cp": "CP1", "text": bad}));
    let outcome = cp.outcome(seq, WAIT);
    assert_eq!(outcome["outcome"], "result", "{outcome}");
    assert_eq!(outcome["frame"], bad.as_str());
    assert_eq!(
        outcome["payload"],
        json!({"idTagInfo": {"status": "Bogus"}})
    );
    let why = outcome["violations"].to_string();
    assert!(
        why.contains("PropertyConstraintViolation") && why.contains("idTagInfo/status"),
        "{why}"
    );
    assert_ne!(outcome["library"], "ok");

    let flagged: Vec<String> = cp
        .violations()
        .iter()
        .map(|l| format!("{} {}", l["unique_id"], l["violations"]))
        .collect();
    assert_eq!(flagged.len(), 6, "{flagged:#?}");
    for (id, why) in [
        ("\"u1\"", "unknown action"),
        ("\"u2\"", "OccurenceConstraintViolation"),
        ("\"u3\"", "TypeConstraintViolation"),
        ("null", "not JSON"),
        ("\"nobody\"", "not in the OCPP-J 1.6 table"),
        (&id.to_string(), "schema: PropertyConstraintViolation"),
    ] {
        assert!(
            flagged.iter().any(|f| f.starts_with(id) && f.contains(why)),
            "{id}: {why} not in {flagged:#?}"
        );
    }
}

#[test]
fn a_wrong_or_missing_password_is_refused_and_the_charge_point_logs_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    for password in [json!("not-the-password"), Value::Null] {
        let mut spec = cp1_spec(&cs);
        spec["password"] = password.clone();
        let cp = ChargePoint::start(dir.path(), &spec);
        assert_eq!(cp.ready_state(), "refused", "password {password}");
        let refused = cp.wait_for(|l| l["event"] == "refused", WAIT);
        assert_eq!(refused["status"], 401);
        assert!(cp.log().iter().all(|l| l["event"] != "connected"));
        // No connection: a CALL op says so at once.
        let outcome = cp.call(json!({"op": "boot"}), WAIT);
        assert_eq!(outcome["outcome"], "not_connected");
    }
    let refusals: Vec<Value> = cs
        .log()
        .into_iter()
        .filter(|l| l["event"] == "refused")
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(refusals
        .iter()
        .all(|l| l["status"] == 401 && l["path"] == "/ocpp/CP1"));
    assert!(cs.log().iter().all(|l| l["event"] != "connected"));

    // An id the central system does not know: 404.
    let mut spec = cp1_spec(&cs);
    spec["url"] = json!(cs.url("CP9"));
    spec["id"] = json!("CP9");
    let cp = ChargePoint::start(dir.path(), &spec);
    assert_eq!(
        cp.wait_for(|l| l["event"] == "refused", WAIT)["status"],
        404
    );
}

#[test]
fn a_missing_or_wrong_subprotocol_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    for offered in [json!([]), json!(["ocpp2.0.1"])] {
        let mut spec = cp1_spec(&cs);
        spec["subprotocols"] = offered.clone();
        let cp = ChargePoint::start(dir.path(), &spec);
        assert_eq!(cp.ready_state(), "refused", "offering {offered}");
        assert_eq!(
            cp.wait_for(|l| l["event"] == "refused", WAIT)["status"],
            400
        );
        let connecting = cp.wait_for(|l| l["event"] == "connecting", WAIT);
        assert_eq!(connecting["subprotocols"], offered);
    }
    let refusals: Vec<Value> = cs
        .log()
        .into_iter()
        .filter(|l| l["event"] == "refused")
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(refusals.iter().all(|l| l["status"] == 400));

    // Offering 2.0.1 first and 1.6 second still connects with 1.6.
    let mut spec = cp1_spec(&cs);
    spec["subprotocols"] = json!(["ocpp2.0.1", "ocpp1.6"]);
    let cp = ChargePoint::start(dir.path(), &spec);
    assert_eq!(cp.ready_state(), "connected");
    assert_eq!(
        cp.wait_for(|l| l["event"] == "connected", WAIT)["subprotocol"],
        "ocpp1.6"
    );
}

#[test]
fn send_raw_reaches_the_central_system_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    let cp = ChargePoint::start(dir.path(), &cp1_spec(&cs));
    let big = format!(
        "[2,\"big\",\"DataTransfer\",{{\"vendorId\":\"x\",\"data\":\"{}\"}}]",
        "é".repeat(100_000)
    );
    let texts = [
        "{not json at all".to_string(),
        "[2, \"r1\" ,\"NoSuchAction\",{}]  ".to_string(),
        "[2,\"r2\",\"Heartbeat\",{\"extra\":1.50}]".to_string(),
        "\u{0}\t\"ü\"\u{1f50c}".to_string(),
        big,
    ];
    for text in &texts {
        let outcome = cp.call(json!({"op": "send_raw", "text": text}), WAIT);
        assert_eq!(outcome["outcome"], "sent");
    }
    cs.wait_for(|_| cs.frames("received").len() >= texts.len());
    assert_eq!(cs.frames("received"), texts);
    assert_eq!(cp.frames_sent(), texts);
    // The library central system answers the unknown action (with its swapped code: this is
    // the defect the agent must not copy), and the charge point logs the answer raw, unflagged
    // because it answers a CALL the charge point did send.
    let answer = cp.wait_for(|l| l["dir"] == "received" && l["unique_id"] == "r1", WAIT);
    assert_eq!(parse(answer["text"].as_str().unwrap())[2], "NotSupported");
    assert_eq!(answer["violations"], json!([]));

    // A frame over the central system's limit (websockets' default, 1 MiB) is sent whole, and
    // the close it earns (1009, message too big) is what the charge point logs.
    let oversized = "x".repeat(2 << 20);
    let outcome = cp.call(json!({"op": "send_raw", "text": oversized}), WAIT);
    assert_eq!(outcome["outcome"], "sent");
    let closed = cp.wait_for(|l| l["event"] == "closed", WAIT);
    assert_eq!(
        (closed["code"].clone(), closed["local"].clone()),
        (json!(1009), json!(false))
    );
    assert_eq!(cp.frames_sent().last().unwrap().len(), 2 << 20);
}

#[test]
fn disconnect_reconnect_and_a_call_raced_against_the_close() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    let cp = ChargePoint::start(dir.path(), &cp1_spec(&cs));
    assert_eq!(cp.call(json!({"op": "boot"}), WAIT)["outcome"], "result");

    // A clean close from the charge point.
    let outcome = cp.call(
        json!({"op": "disconnect", "code": 1000, "reason": "bye"}),
        WAIT,
    );
    assert_eq!(outcome["outcome"], "done");
    let closed = cp.wait_for(|l| l["event"] == "closed" && l["conn"] == 1, WAIT);
    assert_eq!(
        (closed["code"].clone(), closed["local"].clone()),
        (json!(1000), json!(true))
    );
    let cs_closed = cs.wait_for(|l| l["event"] == "closed");
    assert_eq!(
        (cs_closed["code"].clone(), cs_closed["reason"].clone()),
        (json!(1000), json!("bye"))
    );
    assert_eq!(
        cp.call(json!({"op": "heartbeat"}), WAIT)["outcome"],
        "not_connected"
    );

    // Reconnect: a second connection that works.
    let outcome = cp.call(json!({"op": "reconnect"}), WAIT);
    assert_eq!(
        (outcome["outcome"].clone(), outcome["conn"].clone()),
        (json!("connected"), json!(2))
    );
    let boot = cp.call(json!({"op": "boot"}), WAIT);
    assert_eq!(boot["outcome"], "result");
    let cs_connects = cs
        .log()
        .iter()
        .filter(|l| l["event"] == "connected")
        .count();
    assert_eq!(cs_connects, 2);

    // A CALL the central system never answers, and the central system closes the connection
    // meanwhile: the op ends with the close, long before its 30 s timeout.
    let seq = cp.send(json!({"op": "authorize", "id_tag": "TAG", "timeout": 30}));
    cs.wait_for(|l| l["dir"] == "received" && l["text"].as_str().unwrap().contains("Authorize"));
    let started = Instant::now();
    cs.send(json!({"op": "close", "cp": "CP1", "code": 4000, "reason": "going"}));
    let outcome = cp.outcome(seq, WAIT);
    assert_eq!(outcome["outcome"], "closed", "{outcome}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let closed = cp.wait_for(|l| l["event"] == "closed" && l["conn"] == 2, WAIT);
    assert_eq!(
        (
            closed["code"].clone(),
            closed["reason"].clone(),
            closed["local"].clone()
        ),
        (json!(4000), json!("going"), json!(false))
    );

    // An unanswered CALL on an open connection times out at its own timeout.
    assert_eq!(
        cp.call(json!({"op": "reconnect"}), WAIT)["outcome"],
        "connected"
    );
    let started = Instant::now();
    let outcome = cp.call(
        json!({"op": "authorize", "id_tag": "TAG", "timeout": 0.5}),
        WAIT,
    );
    assert_eq!(outcome["outcome"], "timeout");
    assert!(started.elapsed() >= Duration::from_millis(500));

    // An abrupt drop (no close frame): the central system sees 1006.
    cp.call(json!({"op": "disconnect", "abrupt": true}), WAIT);
    cs.wait_for(|l| l["event"] == "closed" && l["code"] == 1006);
    assert!(cp.is_running());
    // Closing its stdin stops it cleanly.
    cp.stop(WAIT);
    assert!(!cp.is_running());
    assert_eq!(cp.log().last().unwrap()["event"], "exit");
}

#[test]
fn a_remote_start_then_a_transaction_with_meter_values_and_its_stop() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    let mut spec = cp1_spec(&cs);
    // A charger that, once it accepted a remote start, plugs in and starts the transaction.
    spec["answers"] = json!({"RemoteStartTransaction": {"status": "Accepted", "then": [
        {"op": "status", "connector": 1, "status": "Preparing", "ref": "then-status"},
        {"op": "start_transaction", "connector": 1, "id_tag": "TAG7", "meter_start": 1000,
         "ref": "then-start"}]}});
    let cp = ChargePoint::start(dir.path(), &spec);
    let outcome = cs.call(
        "CP1",
        "RemoteStartTransaction",
        json!({"idTag": "TAG7", "connectorId": 1}),
        "rs",
    );
    assert_eq!(
        parse(outcome["frame"].as_str().unwrap())[2],
        json!({"status": "Accepted"})
    );
    let start = cp.wait_for(|l| l["event"] == "op" && l["ref"] == "then-start", WAIT);
    assert_eq!(start["outcome"], "result", "{start}");
    let transaction = start["payload"]["transactionId"].clone();
    assert!(transaction.is_u64(), "{start}");
    let status = cp.wait_for(|l| l["event"] == "op" && l["ref"] == "then-status", WAIT);
    assert!(
        status["t"].as_f64() < start["t"].as_f64(),
        "then-ops run in order"
    );

    // Meter values without a transaction id carry the one StartTransaction got; the sampled
    // values go out as given (values are strings in 1.6).
    let meter = cp.call(
        json!({"op": "meter_values", "connector": 1, "timestamp": "2026-12-03T10:00:00Z",
               "sampled": [{"measurand": "Power.Active.Import", "value": "7200", "unit": "W"},
                           {"measurand": "Current.Import", "value": 31.5, "unit": "A",
                            "phase": "L1"}]}),
        WAIT,
    );
    assert_eq!(meter["outcome"], "result", "{meter}");
    let id = meter["unique_id"].as_str().unwrap();
    let received = with_id(&cs.frames("received"), id);
    assert_eq!(
        parse(&received[0]),
        json!([2, id, "MeterValues", {"connectorId": 1, "transactionId": transaction,
               "meterValue": [{"timestamp": "2026-12-03T10:00:00Z", "sampledValue": [
                   {"value": "7200", "measurand": "Power.Active.Import", "unit": "W"},
                   {"value": "31.5", "measurand": "Current.Import", "unit": "A", "phase": "L1"}]}]}])
    );

    let stop = cp.call(
        json!({"op": "stop_transaction", "meter_stop": 8200, "reason": "Remote"}),
        WAIT,
    );
    assert_eq!(stop["outcome"], "result", "{stop}");
    let id = stop["unique_id"].as_str().unwrap();
    let sent = parse(&with_id(&cs.frames("received"), id)[0]);
    assert_eq!(sent[2], "StopTransaction");
    assert_eq!(
        (
            sent[3]["transactionId"].clone(),
            sent[3]["meterStop"].clone(),
            sent[3]["reason"].clone()
        ),
        (transaction, json!(8200), json!("Remote"))
    );
    // A field the library's dataclass lacks is refused before anything is sent.
    let bad = cp.call(
        json!({"op": "authorize", "id_tag": "T", "payload": {"colour": "red"}}),
        WAIT,
    );
    assert_eq!(bad["outcome"], "invalid_request", "{bad}");
    assert!(cp.violations().is_empty(), "{:?}", cp.violations());
}

#[test]
fn two_charge_points_at_once_each_answer_their_own_calls() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    let mut spec1 = cp1_spec(&cs);
    spec1["answers"] = json!({"RemoteStopTransaction": {"status": "Accepted"}});
    let cp1 = ChargePoint::start(dir.path(), &spec1);
    // CP2 has no password configured and sends none.
    let cp2 = ChargePoint::start(
        dir.path(),
        &json!({"url": cs.url("CP2"), "id": "CP2", "heartbeat": "off",
                "answers": {"RemoteStopTransaction": {"status": "Rejected"}}}),
    );
    assert_eq!(
        (cp1.ready_state(), cp2.ready_state()),
        ("connected".into(), "connected".into())
    );
    let one = cs.call(
        "CP1",
        "RemoteStopTransaction",
        json!({"transactionId": 1}),
        "one",
    );
    let two = cs.call(
        "CP2",
        "RemoteStopTransaction",
        json!({"transactionId": 2}),
        "two",
    );
    assert_eq!(
        parse(one["frame"].as_str().unwrap())[2]["status"],
        "Accepted"
    );
    assert_eq!(
        parse(two["frame"].as_str().unwrap())[2]["status"],
        "Rejected"
    );
    let id1 = one["unique_id"].as_str().unwrap();
    let id2 = two["unique_id"].as_str().unwrap();
    assert_eq!(with_id(&cp1.frames_received(), id1).len(), 1);
    assert!(with_id(&cp1.frames_received(), id2).is_empty());
    assert_eq!(with_id(&cp2.frames_received(), id2).len(), 1);
    assert!(with_id(&cp2.frames_received(), id1).is_empty());
}

#[test]
fn reconnect_ms_reconnects_after_a_remote_close_and_boot_on_connect_boots_each_time() {
    let dir = tempfile::tempdir().unwrap();
    let cs = central_system(dir.path());
    let mut spec = cp1_spec(&cs);
    spec["reconnect_ms"] = json!(200);
    spec["boot_on_connect"] = json!(true);
    let cp = ChargePoint::start(dir.path(), &spec);
    let boots = || {
        cp.log()
            .into_iter()
            .filter(|l| l["event"] == "op" && l["ref"] == "boot_on_connect")
            .collect::<Vec<_>>()
    };
    cp.wait_for(|_| boots().len() == 1, WAIT);
    assert_eq!(boots()[0]["outcome"], "result");

    cs.send(json!({"op": "close", "cp": "CP1", "code": 1012, "reason": "restart"}));
    let closed = cp.wait_for(|l| l["event"] == "closed", WAIT);
    assert_eq!(
        (closed["code"].clone(), closed["local"].clone()),
        (json!(1012), json!(false))
    );
    let again = cp.wait_for(|l| l["event"] == "connected" && l["conn"] == 2, WAIT);
    assert!(again["t"].as_f64().unwrap() - closed["t"].as_f64().unwrap() >= 0.2);
    cp.wait_for(|_| boots().len() == 2, WAIT);

    // A close the charge point asked for is not followed by a reconnect.
    cp.call(json!({"op": "disconnect"}), WAIT);
    let deadline = Instant::now() + Duration::from_millis(800);
    while Instant::now() < deadline {
        assert!(
            cp.log().iter().all(|l| l["conn"] != 3),
            "reconnected after a local close"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // "connect": false starts idle until told.
    let mut spec = cp1_spec(&cs);
    spec["connect"] = json!(false);
    let idle = ChargePoint::start(dir.path(), &spec);
    assert_eq!(idle.ready_state(), "idle");
    assert_eq!(
        idle.call(json!({"op": "connect"}), WAIT)["outcome"],
        "connected"
    );
}
