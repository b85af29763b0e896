//! `texture-agent discover` against real Modbus TCP servers (pymodbus, tests/modbus) whose
//! register maps come from the official SunSpec model definitions: every point the agent reads,
//! of every model it knows, decoded and scaled as those definitions say (an offset or type
//! wrong in the agent's tables shows as a wrong value here); "not implemented" markers absent,
//! never 0; and the field faults: a chain with a wrong length or no end marker, a marker at
//! another base, an unconfigured unit, a single-client server, a slow device.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};
use texture_agent_testkit::{sunspec_model_json, SunSpecServer};

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

/// Every model the agent knows (src/drivers/sunspec/models.rs).
const KNOWN: [u16; 22] = [
    1, 101, 102, 103, 111, 112, 113, 120, 121, 122, 123, 124, 201, 202, 203, 204, 211, 212, 213,
    214, 802, 803,
];

/// Runs `texture-agent discover --tcp 127.0.0.1:PORT ARGS... --json`: exit code and output.
fn discover(port: u16, args: &[&str]) -> (Option<i32>, Value, String) {
    discover_on(&["--tcp", &format!("127.0.0.1:{port}")], args)
}

/// Runs `texture-agent discover LINK... ARGS... --json` (LINK: `--tcp HOST:PORT` or
/// `--serial PATH`): exit code and output.
fn discover_on(link: &[&str], args: &[&str]) -> (Option<i32>, Value, String) {
    let out = Command::new(BIN)
        .arg("discover")
        .args(link)
        .args(args)
        .arg("--json")
        .output()
        .expect("run texture-agent discover");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.code(), json, stderr)
}

/// The text form, for what an installer reads.
fn discover_text(port: u16, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(BIN)
        .arg("discover")
        .arg("--tcp")
        .arg(format!("127.0.0.1:{port}"))
        .args(args)
        .output()
        .expect("run texture-agent discover");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Model `id`'s top-level point definitions, from the official JSON.
fn definition(id: u16) -> Vec<Value> {
    sunspec_model_json(id)["group"]["points"]
        .as_array()
        .unwrap()
        .clone()
}

/// A raw value for every point of model `id` (the scale factors between -3 and 3, so both
/// signs), and what each numeric point must read as once scaled: `raw × 10^sf`.
fn every_point(id: u16) -> (serde_json::Map<String, Value>, BTreeMap<String, f64>) {
    let defs = definition(id);
    let mut raw = serde_json::Map::new();
    let mut offset = 0u64;
    for (i, p) in defs.iter().enumerate() {
        let name = p["name"].as_str().unwrap();
        let size = p["size"].as_u64().unwrap();
        let k = offset + u64::from(id);
        let value = match p["type"].as_str().unwrap() {
            _ if name == "ID" || name == "L" => None,
            "sunssf" => Some(json!([-3i64, -2, -1, 1, 2, 3, 0][i % 7])),
            "uint16" | "enum16" | "bitfield16" => Some(json!(k * 37 % 60_000 + 1)),
            "int16" => Some(json!(if i % 2 == 0 {
                -((k % 30_000) as i64) - 1
            } else {
                (k % 30_000) as i64 + 1
            })),
            "uint32" | "acc32" | "bitfield32" | "enum32" => Some(json!(k * 100_003 + 7)),
            "float32" => Some(json!(k as f64 * 1.5 + 0.25)),
            "string" => Some(json!(format!("S{id}-{offset}"))),
            "count" => Some(json!(0)),
            _ => None,
        };
        if let Some(v) = value {
            raw.insert(name.to_owned(), v);
        }
        offset += size;
    }
    let mut expected = BTreeMap::new();
    for p in &defs {
        let name = p["name"].as_str().unwrap();
        let Some(r) = raw.get(name).and_then(Value::as_f64) else {
            continue;
        };
        let value = match &p["sf"] {
            Value::String(sf) => {
                let sf = raw[sf.as_str()].as_i64().unwrap() as i32;
                if sf < 0 {
                    r / 10f64.powi(-sf)
                } else {
                    r * 10f64.powi(sf)
                }
            }
            Value::Number(n) => {
                let sf = n.as_i64().unwrap() as i32;
                r * 10f64.powi(sf)
            }
            _ if p["type"] == "float32" => f64::from(r as f32),
            _ => r,
        };
        expected.insert(name.to_owned(), value);
    }
    (raw, expected)
}

/// The unit `unit` in discover's JSON.
fn unit(found: &Value, unit: u64) -> &Value {
    found["units"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["unit"] == unit)
        .unwrap_or_else(|| panic!("no unit {unit}: {found:#}"))
}

fn model(unit: &Value, id: u64) -> &Value {
    unit["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("no model {id}: {unit:#}"))
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn start(dir: &Path, spec: Value) -> SunSpecServer {
    SunSpecServer::start(dir, &spec)
}

/// Every point of every model the agent knows, one device holding them all: each value the
/// agent reports is the official definition's raw value scaled by its own scale factor, with
/// both signs of scale factor; and every model is listed at its address and length.
#[test]
fn every_known_point_of_every_known_model_reads_as_the_definition_says() {
    let dir = tmp();
    let mut models = Vec::new();
    let mut expected = BTreeMap::new();
    for id in KNOWN {
        let (points, values) = every_point(id);
        models.push(json!({"id": id, "points": points}));
        expected.insert(id, values);
    }
    let server = start(dir.path(), json!({"units": {"1": {"models": models}}}));
    let (code, found, stderr) = discover(server.port, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let u = unit(&found, 1);
    assert_eq!(u["base"], 40_000);
    assert_eq!(u["manufacturer"], "S1-2");
    assert_eq!(u["model"], "S1-18");
    assert_eq!(u["version"], "S1-42");
    assert_eq!(u["serial"], "S1-50");
    assert_eq!(u["problems"], json!([]), "{u:#}");
    let mut address = 40_002u64;
    let mut checked = 0;
    for id in KNOWN {
        let m = model(u, u64::from(id));
        let length: u64 = definition(id)
            .iter()
            .map(|p| p["size"].as_u64().unwrap())
            .sum::<u64>()
            - 2;
        assert_eq!(m["address"], address, "model {id}");
        assert_eq!(m["length"], length, "model {id}");
        address += length + 2;
        let points = m["points"].as_object().unwrap();
        if id != 1 {
            assert!(!points.is_empty(), "model {id} shows no readings");
        }
        for (name, shown) in points {
            let want = expected[&id]
                .get(name)
                .unwrap_or_else(|| panic!("model {id}: {name} is not a numeric point"));
            assert_eq!(
                shown["value"].as_f64(),
                Some(*want),
                "model {id} point {name}: {shown}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 100, "only {checked} points checked");
    // One connection, one request at a time.
    let requests = server.requests();
    for pair in requests.windows(2) {
        assert_eq!(pair[0]["conn"], pair[1]["conn"], "a second connection");
        assert!(
            pair[1]["start"].as_f64() >= pair[0]["end"].as_f64(),
            "overlapping requests: {pair:?}"
        );
    }
}

/// What a device has not implemented is absent, never 0: a point left out, and a point whose
/// scale factor is left out.
#[test]
fn not_implemented_points_are_absent_never_zero() {
    let dir = tmp();
    let server = start(
        dir.path(),
        json!({"units": {"1": {"models": [
            {"id": 1, "points": {"Mn": "Texture", "SN": "HYB-7"}},
            {"id": 103, "points": {"W": 4521, "W_SF": -1, "A": 1234}},
            {"id": 124, "points": {"ChaState": 655, "ChaState_SF": -1, "MinRsvPct": 20, "MinRsvPct_SF": 0}},
        ]}}}),
    );
    let (code, found, stderr) = discover(server.port, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let u = unit(&found, 1);
    assert_eq!(u["manufacturer"], "Texture");
    assert_eq!(u["model"], Value::Null, "Md was left out");
    let inverter = &model(u, 103)["points"];
    assert_eq!(inverter["W"], json!({"value": 452.1, "unit": "W"}));
    assert_eq!(inverter["A"], Value::Null, "its A_SF is not implemented");
    assert_eq!(inverter["Hz"], Value::Null);
    assert_eq!(inverter["WH"], Value::Null, "acc32 0 is not implemented");
    let storage = &model(u, 124)["points"];
    assert_eq!(storage["ChaState"], json!({"value": 65.5, "unit": "%"}));
    assert_eq!(storage["MinRsvPct"], json!({"value": 20.0, "unit": "%"}));
    assert_eq!(storage["WChaMax"], Value::Null);

    let (_, text) = discover_text(server.port, &[]);
    assert!(
        text.contains("manufacturer Texture, model (not given)"),
        "{text}"
    );
    assert!(text.contains("W = 452.1 W"), "{text}");
    assert!(text.contains("A not implemented"), "{text}");
}

/// A model that declares a wrong length breaks the chain after it; no end marker ends it at
/// the first register the device does not have. Either way what was found is reported, with
/// the problem.
#[test]
fn a_broken_chain_or_one_without_end_marker_keeps_what_was_found() {
    let dir = tmp();
    let server = start(
        dir.path(),
        json!({"units": {
            "1": {"models": [
                {"id": 1, "points": {"SN": "A-1"}},
                {"id": 103, "points": {"W": 100, "W_SF": 0}, "length": 40},
                {"id": 123, "points": {}},
            ]},
            "2": {"models": [
                {"id": 1, "points": {"SN": "B-2"}},
                {"id": 802, "points": {"SoC": 50, "SoC_SF": 0}},
            ], "end_marker": false},
        }}),
    );
    let (code, found, stderr) = discover(server.port, &["--units", "1-2"]);
    assert_eq!(code, Some(0), "{stderr}");
    let broken = unit(&found, 1);
    let ids: Vec<u64> = broken["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(&ids[..2], &[1, 103], "{broken:#}");
    assert!(
        !ids.contains(&123),
        "123 lies beyond the broken length: {broken:#}"
    );
    let problems = broken["problems"].to_string();
    assert!(
        problems.contains("model 103 at 40070 declares length 40, its definition 50"),
        "{problems}"
    );
    let open = unit(&found, 2);
    assert_eq!(model(open, 802)["points"]["SoC"]["value"], 50.0);
    assert!(
        open["problems"].to_string().contains("no end marker"),
        "{open:#}"
    );
}

/// The marker at 50000 is found after 40000 and 0 answer with exceptions; `--base` goes
/// straight to a given one; a unit id the server does not have is reported and the others
/// still are.
#[test]
fn bases_are_tried_in_turn_and_an_absent_unit_does_not_hide_the_others() {
    let dir = tmp();
    let server = start(
        dir.path(),
        json!({"units": {"3": {"base": 50000, "models": [{"id": 1, "points": {"SN": "FAR-3"}}]}}}),
    );
    let (code, found, stderr) = discover(server.port, &["--units", "2-3"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(unit(&found, 3)["base"], 50_000);
    assert_eq!(unit(&found, 3)["serial"], "FAR-3");
    let errors = found["errors"].to_string();
    assert!(errors.contains("\"unit\":2"), "{errors}");
    let before = server.requests().len();
    let (code, found, _) = discover(server.port, &["--units", "3", "--base", "50000"]);
    assert_eq!(code, Some(0));
    assert_eq!(unit(&found, 3)["serial"], "FAR-3");
    let first = &server.requests()[before];
    assert_eq!(first["address"], 50_000, "--base goes there first: {first}");

    let (code, found, stderr) = discover(server.port, &["--units", "3", "--base", "40000"]);
    assert_eq!(code, Some(1), "{found}");
    assert!(
        found["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("unit 3: no SunSpec marker (\"SunS\") at 40000"),
        "{found}"
    );
    assert!(stderr.contains("no SunSpec device answered"), "{stderr}");
}

/// A single-client inverter: every unit is discovered over the one connection it allows; while
/// another client holds it, discover fails saying so instead of hanging.
#[test]
fn a_single_client_server_is_discovered_over_one_connection() {
    let dir = tmp();
    let server = start(
        dir.path(),
        json!({"single_client": true, "units": {
            "1": {"models": [{"id": 1, "points": {"SN": "U1"}}, {"id": 103, "points": {}}]},
            "2": {"models": [{"id": 1, "points": {"SN": "U2"}}, {"id": 802, "points": {}}]},
        }}),
    );
    let (code, found, stderr) = discover(server.port, &["--units", "1,2"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(unit(&found, 1)["serial"], "U1");
    assert_eq!(unit(&found, 2)["serial"], "U2");

    let _holder = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    // The holder's connection is the one the server serves from now on.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (code, found, _) = discover(server.port, &["--timeout-ms", "500"]);
        if code == Some(1) {
            let error = found["errors"][0]["error"].as_str().unwrap().to_owned();
            assert!(error.contains("unit 1"), "{error}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "discover kept succeeding while another client held the connection"
        );
    }
}

/// A slow device answers within a long enough timeout; with a shorter one discover says no
/// answer came, and how long it waited.
#[test]
fn a_slow_device_needs_a_long_enough_timeout() {
    let dir = tmp();
    let server = start(
        dir.path(),
        json!({"delay_ms": 300, "units": {"1": {"models": [{"id": 1, "points": {"SN": "SLOW"}}]}}}),
    );
    let (code, found, stderr) = discover(server.port, &["--timeout-ms", "2000"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(unit(&found, 1)["serial"], "SLOW");
    let (code, found, _) = discover(server.port, &["--timeout-ms", "100"]);
    assert_eq!(code, Some(1), "{found}");
    let error = found["errors"][0]["error"].as_str().unwrap();
    assert!(error.contains("no answer within 100 ms"), "{error}");
}

/// Modbus RTU: two units on one simulated RS-485 bus (a socat pty pair) are found over the one
/// serial port, an absent third unit is reported without hiding them, and no request ever
/// overlaps another on the bus; with the devices gone, discover fails saying so.
#[test]
fn discover_over_a_serial_bus_finds_every_unit_on_it() {
    let dir = tmp();
    let mut server = SunSpecServer::start_serial(
        dir.path(),
        &json!({"units": {
            "1": {"models": [{"id": 1, "points": {"Mn": "Texture", "SN": "RTU-1"}},
                             {"id": 103, "points": {"W": 2500, "W_SF": 0}}]},
            "2": {"models": [{"id": 1, "points": {"SN": "RTU-2"}},
                             {"id": 203, "points": {"W": 1500, "W_SF": 0}}]},
        }}),
    );
    let path = server.serial_path().unwrap();
    let link = ["--serial", path.to_str().unwrap(), "--baud", "19200"];
    let (code, found, stderr) = discover_on(&link, &["--units", "1-3", "--timeout-ms", "300"]);
    assert_eq!(code, Some(0), "{stderr}\n{found}");
    assert_eq!(unit(&found, 1)["serial"], "RTU-1");
    assert_eq!(unit(&found, 1)["manufacturer"], "Texture");
    assert_eq!(unit(&found, 2)["serial"], "RTU-2");
    assert!(model(unit(&found, 2), 203).is_object(), "{found}");
    let errors = found["errors"].as_array().unwrap();
    assert_eq!(errors.len(), 1, "{found}");
    assert_eq!(errors[0]["unit"], 3);
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("no answer within 300 ms"),
        "{found}"
    );
    let units: std::collections::BTreeSet<u64> = server
        .requests()
        .iter()
        .map(|r| r["unit"].as_u64().unwrap())
        .collect();
    assert_eq!(units, [1, 2].into(), "requests answered per unit");
    assert_eq!(server.overlaps(), Vec::<Value>::new());

    server.kill();
    let (code, found, stderr) = discover_on(&link, &["--units", "1-2", "--timeout-ms", "200"]);
    assert_eq!(code, Some(1), "{found}");
    assert!(stderr.contains("no SunSpec device answered"), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// The `sunspec` driver end to end: a real agent, mosquitto with mutual TLS, the platform peer,
// and pymodbus SunSpec devices.

mod driver {
    use std::time::{Duration, Instant};

    use serde_json::{json, Value};
    use texture_agent::sim::platform::{AttestedCommand, PlatformSigner};
    use texture_agent_testkit as kit;

    use kit::{device_topic, Agent, AgentConfig, Testbed};

    use super::{SunSpecServer, BIN};

    const GATEWAY: &str = "gw-sunspec";
    const WORKSPACE: &str = "ws-sunspec";
    const WAIT: Duration = Duration::from_secs(20);

    /// A hybrid inverter (1, 103, 124, with settings 121 and controls 123) on unit 1, a grid
    /// meter (1, 203) on unit 2, and a battery (1, 802) on unit 3 whose reserve register refuses
    /// writes, behind one single-client endpoint: a second connection from the agent (for a
    /// command, say) would be refused, and its reads and commands would fail.
    fn site() -> Value {
        json!({"single_client": true, "units": {
            "1": {"models": [
                {"id": 1, "points": {"Mn": "Texture", "Md": "HY-10", "SN": "HYB-1"}},
                {"id": 103, "points": {"W": 4521, "W_SF": -1}},
                {"id": 124, "points": {"ChaState": 655, "ChaState_SF": -1, "MinRsvPct": 20,
                                       "MinRsvPct_SF": 0, "ChaSt": 4, "StorCtl_Mod": 0,
                                       "InWRte": 100, "OutWRte": 100, "InOutWRte_SF": 0,
                                       "InOutWRte_RvrtTms": 0}},
                {"id": 121, "points": {"WMax": 5000, "WMax_SF": 0}},
                {"id": 123, "points": {"WMaxLimPct": 1000, "WMaxLimPct_SF": -1,
                                       "WMaxLimPct_RvrtTms": 0, "WMaxLim_Ena": 0}},
            ]},
            "2": {"models": [
                {"id": 1, "points": {"SN": "MTR-2"}},
                {"id": 203, "points": {"W": -1200, "W_SF": 0}},
            ]},
            "3": {"models": [
                {"id": 1, "points": {"SN": "BAT-3"}},
                {"id": 802, "points": {"SoC": 50, "SoC_SF": 0, "SoCRsvMin": 10, "WHRtg": 100,
                                       "WHRtg_SF": 2, "W": -800, "W_SF": 0, "ChaSt": 4}},
            ], "read_only": [40080]},
        }})
    }

    /// The next state point of `device` satisfying `pred`.
    async fn state_of(peer: &mut kit::Peer, device: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            assert!(Instant::now() < deadline, "no matching state of {device}");
            let batch = peer
                .expect(&device_topic(GATEWAY, "telemetry"), WAIT, |_| true)
                .await
                .json();
            for p in batch["points"].as_array().unwrap() {
                if p["deviceId"] == device && p.get("state").is_some() && pred(&p["state"]) {
                    return p["state"].clone();
                }
            }
        }
    }

    /// The devices of the next `n` availability points in telemetry, sorted; each must say
    /// offline, with a reason.
    async fn offline(peer: &mut kit::Peer, n: usize) -> Vec<String> {
        let mut offline = Vec::new();
        let deadline = Instant::now() + WAIT;
        while offline.len() < n {
            assert!(Instant::now() < deadline, "offline: only {offline:?}");
            let batch = peer
                .expect(&device_topic(GATEWAY, "telemetry"), WAIT, |_| true)
                .await
                .json();
            for p in batch["points"].as_array().unwrap() {
                if let Some(a) = p.get("availability") {
                    assert_eq!(a["online"], false, "{p}");
                    assert!(!a["reason"].as_str().unwrap().is_empty(), "{p}");
                    offline.push(p["deviceId"].as_str().unwrap().to_owned());
                }
            }
        }
        offline.sort();
        offline
    }

    /// Publishes a server-key command `id` for `device`, signed by the platform.
    async fn send(
        peer: &mut kit::Peer,
        signer: &PlatformSigner,
        id: &str,
        device: &str,
        slug: &str,
        input: Value,
    ) {
        let command = AttestedCommand::new(GATEWAY, id, slug, input).for_device(device);
        peer.send_server_command(signer, WORKSPACE, command).await;
    }

    /// The reply to command `id`.
    async fn reply(peer: &mut kit::Peer, id: &str) -> Value {
        peer.reply(GATEWAY, id, WAIT).await
    }

    /// [`send`], then its [`reply`].
    async fn ask(
        peer: &mut kit::Peer,
        signer: &PlatformSigner,
        id: &str,
        device: &str,
        slug: &str,
        input: Value,
    ) -> Value {
        send(peer, signer, id, device, slug, input).await;
        reply(peer, id).await
    }

    /// Discovery, then telemetry in the device model with the meter's grid reading; a signed
    /// `battery:set-reserve` changes the register, is read back, and shows in the next
    /// telemetry; a write the device refuses fails with its Modbus exception; the server dying
    /// silences the devices (no zeros) until it is back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn discovered_devices_report_telemetry_and_take_a_signed_reserve_command() {
        let Testbed {
            pki,
            broker,
            signer,
            mut peer,
        } = Testbed::start(
            PlatformSigner::generate("platform-sunspec"),
            &[
                &device_topic(GATEWAY, "replies"),
                &device_topic(GATEWAY, "telemetry"),
                &device_topic(GATEWAY, "capabilities"),
            ],
        )
        .await;
        let mut server = SunSpecServer::start(pki.path(), &site());
        let mut cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, WORKSPACE);
        cfg.extra_toml = format!(
            "[telemetry]\nbatch_max_ms = 100\nhealth_interval_secs = 3600\n\n\
             [[drivers]]\nkind = \"sunspec\"\nname = \"site\"\ntcp = \"127.0.0.1:{}\"\n\
             units = [1, 2, 3]\npoll_ms = 500\ntimeout_ms = 500\n\n\
             [[limits]]\ndevice_id = \"sunspec-HYB-1\"\ndevice_type = \"inverter\"\n\
             max_export_w = 4000\n\
             default_control = {{ command = \"inverter:set-export-limit\", input = {{ exportLimit = 4000 }} }}\n",
            server.port
        );
        let agent = Agent::spawn(BIN, &cfg.write(pki.path()));

        // Each device lists the commands its models carry: the battery bank (802 alone) has
        // no storage controls for an operating mode.
        let listed = peer
            .expect(&device_topic(GATEWAY, "capabilities"), WAIT, |m| {
                m.json()["devices"].as_array().unwrap().len() == 3
            })
            .await
            .json();
        let slugs = |device: &str| -> Vec<String> {
            let d = listed["devices"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["deviceId"] == device)
                .unwrap_or_else(|| panic!("{device} not listed: {listed}"));
            d["availableCommands"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["slug"].as_str().unwrap().to_owned())
                .collect()
        };
        assert_eq!(slugs("sunspec-HYB-1"), ["inverter:set-export-limit"]);
        assert_eq!(
            slugs("sunspec-HYB-1-battery"),
            ["battery:set-reserve", "battery:set-operating-mode"]
        );
        assert_eq!(slugs("sunspec-BAT-3-battery"), ["battery:set-reserve"]);

        let inverter = state_of(&mut peer, "sunspec-HYB-1", |_| true).await;
        assert_eq!(
            inverter,
            json!({"type": "inverter", "power": 452.1, "gridStatus": "exporting", "gridPower": -1200.0})
        );
        let battery = state_of(&mut peer, "sunspec-HYB-1-battery", |_| true).await;
        assert_eq!(
            battery,
            json!({"type": "battery", "chargePercentage": 65.5, "chargingState": "charging",
                   "backupReserve": 20.0, "gridStatus": "exporting", "gridPower": -1200.0})
        );
        let bank = state_of(&mut peer, "sunspec-BAT-3-battery", |_| true).await;
        assert_eq!(
            bank,
            json!({"type": "battery", "charge": 5000.0, "chargePercentage": 50.0,
                   "chargingState": "charging", "chargeRate": -800.0, "backupReserve": 10.0,
                   "gridStatus": "exporting", "gridPower": -1200.0})
        );

        let reply = ask(
            &mut peer,
            &signer,
            "cmd-reserve",
            "sunspec-HYB-1-battery",
            "battery:set-reserve",
            json!({"chargePercentage": 35}),
        )
        .await;
        assert_eq!(reply["type"], "command.succeeded", "{reply}");
        assert_eq!(reply["result"], json!({"backupReserve": 35.0}));
        // MinRsvPct: model 124 at 40122, offset 7.
        let writes: Vec<Value> = server
            .requests()
            .into_iter()
            .filter(|r| r["function"] == 6 || r["function"] == 16)
            .collect();
        assert_eq!(writes.len(), 1, "{writes:?}");
        assert_eq!(writes[0]["unit"], 1);
        assert_eq!(writes[0]["address"], 40_129);
        state_of(&mut peer, "sunspec-HYB-1-battery", |s| {
            s["backupReserve"] == 35.0
        })
        .await;

        let refused = ask(
            &mut peer,
            &signer,
            "cmd-refused",
            "sunspec-BAT-3-battery",
            "battery:set-reserve",
            json!({"chargePercentage": 30}),
        )
        .await;
        assert_eq!(refused["type"], "command.failed", "{refused}");
        assert_eq!(
            refused["error"]["message"],
            "SoCRsvMin at 40080: unit 3 answered a write at 40080 with Modbus exception 4 \
             (Server device failure)",
        );
        let unsupported = ask(
            &mut peer,
            &signer,
            "cmd-unsupported",
            "sunspec-BAT-3-battery",
            "battery:set-operating-mode",
            json!({"operatingMode": "idle"}),
        )
        .await;
        assert_eq!(unsupported["status"], 400, "{unsupported}");
        assert_eq!(
            unsupported["error"]["message"],
            "deviceId: \"sunspec-BAT-3-battery\" does not carry out battery:set-operating-mode; \
             its availableCommands: battery:set-reserve",
        );

        // A forced charge on the hybrid's storage controls (124 at 40122): the revert timer
        // (+15), then OutWRte -100 % (+12) and InWRte 100 % (+13), and StorCtl_Mod (+5) last,
        // which puts both limits in force.
        let before = server.requests().len();
        let charging = ask(
            &mut peer,
            &signer,
            "cmd-mode",
            "sunspec-HYB-1-battery",
            "battery:set-operating-mode",
            json!({"operatingMode": "charge", "enableGridInteraction": true}),
        )
        .await;
        assert_eq!(charging["type"], "command.succeeded", "{charging}");
        assert_eq!(
            charging["result"],
            json!({"operatingMode": "charge", "storCtlMod": 3.0, "inWRte": 100.0,
                   "outWRte": -100.0, "revertSecs": 0})
        );
        let writes: Vec<(Value, Value)> = server.requests()[before..]
            .iter()
            .filter(|r| r["function"] == 6 || r["function"] == 16)
            .map(|r| (r["address"].clone(), r["unit"].clone()))
            .collect();
        assert_eq!(
            writes,
            [40_137, 40_134, 40_135, 40_127].map(|a| (json!(a), json!(1))),
        );

        // An export limit: 3000 W of the inverter's 5000 W is WMaxLimPct 60 %, with the revert
        // timer set to the hold, so the inverter lifts it by itself if the agent is gone.
        let before = server.requests().len();
        let limited = ask(
            &mut peer,
            &signer,
            "cmd-export",
            "sunspec-HYB-1",
            "inverter:set-export-limit",
            json!({"exportLimit": 3000, "holdSecs": 120}),
        )
        .await;
        assert_eq!(limited["type"], "command.succeeded", "{limited}");
        assert_eq!(limited["result"]["exportLimit"], 3000.0);
        assert_eq!(limited["result"]["wMaxLimPct"], 60.0);
        let revert = limited["result"]["revertSecs"].as_u64().unwrap();
        assert!((118..=120).contains(&revert), "{limited}");
        // Model 123 at 40180 (after 1, 103, 124 and 121 of 32 registers): WMaxLimPct +5,
        // RvrtTms +7, Ena +9.
        let written: Vec<u64> = server.requests()[before..]
            .iter()
            .filter(|r| r["function"] == 6 || r["function"] == 16)
            .map(|r| r["address"].as_u64().unwrap())
            .collect();
        assert_eq!(written, vec![40_185, 40_187, 40_189]);
        // Beyond the installer's limit it never reaches the inverter.
        let before = server.requests().len();
        let beyond = ask(
            &mut peer,
            &signer,
            "cmd-export-beyond",
            "sunspec-HYB-1",
            "inverter:set-export-limit",
            json!({"exportLimit": 4500}),
        )
        .await;
        assert_eq!(beyond["status"], 422, "{beyond}");
        assert!(
            server.requests()[before..]
                .iter()
                .all(|r| r["function"] == 3),
            "a write for a refused command"
        );

        // The device goes away: it is reported offline, and nothing else is reported for it,
        // not zeros; then it is back.
        let devices = [
            "sunspec-BAT-3-battery",
            "sunspec-HYB-1",
            "sunspec-HYB-1-battery",
        ];
        // Discovery, polling and every command so far went over the one connection.
        let conns: std::collections::BTreeSet<u64> = server
            .requests()
            .iter()
            .map(|r| r["conn"].as_u64().unwrap())
            .collect();
        assert_eq!(conns.len(), 1, "connections {conns:?}");

        peer.forget(&device_topic(GATEWAY, "capabilities"));
        server.kill();
        assert_eq!(offline(&mut peer, devices.len()).await, devices);
        let online_in = |m: &kit::Seen| -> Vec<(String, bool)> {
            m.json()["devices"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    (
                        d["deviceId"].as_str().unwrap().to_owned(),
                        d["online"] == true,
                    )
                })
                .collect()
        };
        peer.expect(&device_topic(GATEWAY, "capabilities"), WAIT, |m| {
            online_in(m).iter().all(|(_, online)| !online)
        })
        .await;
        agent.wait_for_log(
            "sunspec: unit not answering; its devices report nothing until it does",
            WAIT,
        );
        peer.forget(&device_topic(GATEWAY, "telemetry"));
        let quiet = peer
            .collect(
                &device_topic(GATEWAY, "telemetry"),
                Duration::from_millis(1_500),
            )
            .await;
        for batch in &quiet {
            for p in batch.json()["points"].as_array().unwrap() {
                assert!(
                    p.get("state").is_none(),
                    "a state while the device is gone: {p}"
                );
            }
        }
        server.restart();
        // A restarted device has its registers as configured again.
        state_of(&mut peer, "sunspec-HYB-1-battery", |s| {
            s["backupReserve"] == 20.0
        })
        .await;
        peer.expect(&device_topic(GATEWAY, "capabilities"), WAIT, |m| {
            let all = online_in(m);
            all.len() == devices.len() && all.iter().all(|(_, online)| *online)
        })
        .await;
    }

    /// An inverter whose model 123 declares 5 registers: too short for the limit's points, so
    /// the command fails naming it and nothing is written (no write lands in whatever follows).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_export_limit_on_a_too_short_controls_model_is_refused_unwritten() {
        let Testbed {
            pki,
            broker,
            signer,
            mut peer,
        } = Testbed::start(
            PlatformSigner::generate("platform-short"),
            &[
                &device_topic(GATEWAY, "replies"),
                &device_topic(GATEWAY, "capabilities"),
            ],
        )
        .await;
        let server = SunSpecServer::start(
            pki.path(),
            &json!({"units": {"1": {"models": [
                {"id": 1, "points": {"SN": "SHORT"}},
                {"id": 103, "points": {"W": 100, "W_SF": 0}},
                {"id": 121, "points": {"WMax": 5000, "WMax_SF": 0}},
                {"id": 123, "points": {"WMaxLimPct_SF": 0}, "length": 5},
            ]}}}),
        );
        let mut cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, WORKSPACE);
        cfg.extra_toml = format!(
            "[[drivers]]\nkind = \"sunspec\"\nname = \"s\"\ntcp = \"127.0.0.1:{}\"\npoll_ms = 500\n",
            server.port
        );
        let _agent = Agent::spawn(BIN, &cfg.write(pki.path()));
        peer.expect(&device_topic(GATEWAY, "capabilities"), WAIT, |m| {
            m.json()["devices"].to_string().contains("sunspec-SHORT")
        })
        .await;
        let reply = ask(
            &mut peer,
            &signer,
            "cmd-1",
            "sunspec-SHORT",
            "inverter:set-export-limit",
            json!({"exportLimit": 1000}),
        )
        .await;
        assert_eq!(reply["type"], "command.failed", "{reply}");
        assert_eq!(
            reply["error"]["message"],
            "unit 1: model 123 declares length 5, which ends before WMaxLimPct_RvrtTms"
        );
        assert!(
            server.requests().iter().all(|r| r["function"] == 3),
            "a write reached the device"
        );
    }

    /// Modbus RTU end to end: a hybrid inverter (unit 1) and a battery (unit 2) on one RS-485
    /// bus, polled every 500 ms (the shortest poll the configuration allows) while a burst of
    /// signed reserve commands for both arrives. Every command is answered, and each one run is
    /// written once and read back; the bus never carries two requests at once
    /// (the server logs any byte that arrives before its previous response is out, and the test
    /// fails on one); and when the devices fall silent they are reported offline, then back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_units_on_one_serial_bus_take_commands_under_polling_without_overlap() {
        let Testbed {
            pki,
            broker,
            signer,
            mut peer,
        } = Testbed::start(
            PlatformSigner::generate("platform-rtu"),
            &[
                &device_topic(GATEWAY, "replies"),
                &device_topic(GATEWAY, "telemetry"),
            ],
        )
        .await;
        let mut server = SunSpecServer::start_serial(
            pki.path(),
            &json!({"units": {
                "1": {"models": [
                    {"id": 1, "points": {"SN": "RTU-1"}},
                    {"id": 103, "points": {"W": 3000, "W_SF": 0}},
                    {"id": 124, "points": {"ChaState": 40, "ChaState_SF": 0, "MinRsvPct": 20,
                                           "MinRsvPct_SF": 0, "ChaSt": 3}},
                ]},
                "2": {"models": [
                    {"id": 1, "points": {"SN": "RTU-2"}},
                    {"id": 802, "points": {"SoC": 70, "SoC_SF": 0, "SoCRsvMin": 10,
                                           "ChaSt": 3}},
                ]},
            }}),
        );
        let mut cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, WORKSPACE);
        cfg.extra_toml = format!(
            "[telemetry]\nbatch_max_ms = 100\nhealth_interval_secs = 3600\n\n\
             [[drivers]]\nkind = \"sunspec\"\nname = \"bus\"\nserial = \"{}\"\n\
             baud = 115200\nparity = \"even\"\nunits = [1, 2]\npoll_ms = 500\ntimeout_ms = 500\n",
            server.serial_path().unwrap().display()
        );
        let agent = Agent::spawn(BIN, &cfg.write(pki.path()));
        let devices = ["sunspec-RTU-1-battery", "sunspec-RTU-2-battery"];
        for device in devices {
            state_of(&mut peer, device, |s| s["chargePercentage"].is_number()).await;
        }

        // Six commands at once, alternating between the units, while polling goes on.
        for i in 0..6u32 {
            let device = devices[i as usize % 2];
            let reserve = 21 + i;
            send(
                &mut peer,
                &signer,
                &format!("cmd-{i}"),
                device,
                "battery:set-reserve",
                json!({"chargePercentage": reserve}),
            )
            .await;
        }
        // Each is run, or superseded (409) by a later one for the same device while it waited;
        // the last of each device runs.
        let mut ran = [0usize; 2];
        for i in 0..6u32 {
            let answer = reply(&mut peer, &format!("cmd-{i}")).await;
            if answer["type"] == "command.succeeded" {
                assert_eq!(
                    answer["result"],
                    json!({"backupReserve": f64::from(21 + i)})
                );
                ran[i as usize % 2] += 1;
            } else {
                assert!(i < 4, "the last command of its device: {answer}");
                assert_eq!(answer["status"], 409, "{answer}");
                assert_eq!(answer["error"]["code"], "SUPERSEDED", "{answer}");
            }
        }
        // The last write of each unit stands: 25 % on unit 1, 26 % on unit 2.
        state_of(&mut peer, devices[0], |s| s["backupReserve"] == 25.0).await;
        state_of(&mut peer, devices[1], |s| s["backupReserve"] == 26.0).await;
        let requests = server.requests();
        let writes = |unit: u64| {
            requests
                .iter()
                .filter(|r| r["unit"] == unit && (r["function"] == 6 || r["function"] == 16))
                .count()
        };
        // A command superseded while it waited behind a poll is dropped unwritten; one
        // superseded after its write started still wrote. Every command is one or the other.
        let dropped = |device: &str| {
            agent
                .logs_with_message(
                    "sunspec: command answered before its turn on the link; nothing written",
                )
                .iter()
                .filter(|l| l["device_id"] == device)
                .count()
        };
        for (unit, device) in [(1, devices[0]), (2, devices[1])] {
            let (w, d, r) = (writes(unit), dropped(device), ran[unit as usize - 1]);
            assert_eq!(w + d, 3, "unit {unit}: {w} written, {d} dropped");
            assert!(w >= r, "unit {unit}: {w} written, {r} run");
        }
        let reads = requests.iter().filter(|r| r["function"] == 3).count();
        assert!(reads > 20, "only {reads} reads: the bus was hardly loaded");
        assert_eq!(
            server.overlaps(),
            Vec::<Value>::new(),
            "requests overlapped"
        );

        // Silence on the bus: both units offline (the hybrid's inverter too); then back.
        server.kill();
        let gone = ["sunspec-RTU-1", devices[0], devices[1]];
        assert_eq!(offline(&mut peer, gone.len()).await, gone);
        agent.wait_for_log(
            "sunspec: unit not answering; its devices report nothing until it does",
            WAIT,
        );
        server.restart();
        for device in devices {
            state_of(&mut peer, device, |s| s["chargePercentage"].is_number()).await;
        }
        assert_eq!(
            server.overlaps(),
            Vec::<Value>::new(),
            "requests overlapped"
        );
    }

    /// A device answering "busy" (exception 6) while its neighbour on the same link answers:
    /// its readings are skipped (no state, so no zeros and no stale repeat) for two rounds, it
    /// is reported offline with the exception on the third, the neighbour reports throughout,
    /// and it is back once it answers again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_device_is_skipped_then_offline_and_never_freezes_its_neighbour() {
        let Testbed {
            pki,
            broker,
            signer,
            mut peer,
        } = Testbed::start(
            PlatformSigner::generate("platform-busy"),
            &[&device_topic(GATEWAY, "telemetry")],
        )
        .await;
        let busy = pki.path().join("unit-1-busy");
        let server = SunSpecServer::start(
            pki.path(),
            &json!({"units": {
                "1": {"busy_file": busy, "models": [
                    {"id": 1, "points": {"SN": "BUSY-1"}},
                    {"id": 103, "points": {"W": 1000, "W_SF": 0}},
                ]},
                "2": {"models": [
                    {"id": 1, "points": {"SN": "CALM-2"}},
                    {"id": 103, "points": {"W": 2000, "W_SF": 0}},
                ]},
            }}),
        );
        let mut cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, WORKSPACE);
        cfg.extra_toml = format!(
            "[telemetry]\nbatch_max_ms = 100\nhealth_interval_secs = 3600\n\n\
             [[drivers]]\nkind = \"sunspec\"\nname = \"pair\"\ntcp = \"127.0.0.1:{}\"\n\
             units = [1, 2]\npoll_ms = 500\ntimeout_ms = 500\n",
            server.port
        );
        let agent = Agent::spawn(BIN, &cfg.write(pki.path()));
        for device in ["sunspec-BUSY-1", "sunspec-CALM-2"] {
            state_of(&mut peer, device, |s| s["power"].is_number()).await;
        }

        std::fs::write(&busy, b"").unwrap();
        // Until BUSY-1 is reported offline: every state of it has its real power, and CALM-2
        // keeps reporting.
        let mut calm = 0;
        let deadline = Instant::now() + WAIT;
        let offline = loop {
            assert!(Instant::now() < deadline, "BUSY-1 never reported offline");
            let batch = peer
                .expect(&device_topic(GATEWAY, "telemetry"), WAIT, |_| true)
                .await
                .json();
            let mut gone = None;
            for p in batch["points"].as_array().unwrap() {
                match (p["deviceId"].as_str().unwrap(), p.get("state")) {
                    ("sunspec-BUSY-1", Some(state)) => assert_eq!(state["power"], 1000.0, "{p}"),
                    ("sunspec-CALM-2", Some(_)) => calm += 1,
                    ("sunspec-BUSY-1", None) => gone = p.get("availability").cloned(),
                    _ => {}
                }
            }
            if let Some(availability) = gone {
                break availability;
            }
        };
        assert_eq!(offline["online"], false, "{offline}");
        let reason = offline["reason"].as_str().unwrap();
        assert!(
            reason.contains("Modbus exception 6 (Server device busy)"),
            "{reason}"
        );
        // Two rounds skipped, the third reports it: CALM-2 was read in each.
        let skipped =
            agent.logs_with_message("sunspec: unit busy; its reading is skipped this round");
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(
            calm >= 2,
            "CALM-2 reported {calm} times while BUSY-1 was busy"
        );
        // Each round stops at the unit's first busy answer (and more rounds may have run since).
        let answered_busy = server
            .requests()
            .iter()
            .filter(|r| r["unit"] == 1 && r["exception"] == 6)
            .count();
        assert!(answered_busy >= 3, "{answered_busy} busy answers");

        std::fs::remove_file(&busy).unwrap();
        state_of(&mut peer, "sunspec-BUSY-1", |s| s["power"] == 1000.0).await;
    }
}
