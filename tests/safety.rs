//! The safety envelope end to end over mosquitto with mutual TLS (docs/PROTOCOL.md 4.7 to 4.10,
//! 14.6), for each device type: commands beyond the installer's limits are refused
//! `422 LIMIT_EXCEEDED`; a setpoint with `holdSecs` returns to its device's default control on
//! time, also across an agent killed in the middle of the hold or stopped past its deadline; a
//! link loss longer than the window puts every device with a control into fail-safe, which only
//! a command after the reconnect ends; a site policy that widens a limit is refused and one that
//! narrows it is applied and survives a restart. Every event is checked where the platform sees
//! it: as a `safety` point in telemetry.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use texture_agent::link::topics::Topics;
use texture_agent::model::clock::system_secs;
use texture_agent::sim::platform::{ApiKey, AttestedCommand, PlatformSigner};
use texture_agent_testkit as kit;

use kit::{agent_command, device_topic, Agent, AgentConfig, Mosquitto, Peer, Pki, PLATFORM_CLIENT};

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

const GATEWAY: &str = "gw-safety";
const WORKSPACE: &str = "ws-safety";
const WAIT: Duration = Duration::from_secs(20);
/// The fail-safe window these tests configure (`[safety] failsafe_after_secs`; 5 is the least).
const WINDOW_SECS: u64 = 5;
/// PROTOCOL 4.8 and 4.9 promise an action within one control period (1 s) of its moment; the
/// points' `ts` may trail it by a batch (100 ms here) and the rounding of a whole second.
const LATE_MS: u64 = 2_500;

/// One simulated device of each type, each with installer limits and a default control (some
/// with a fail-safe control of their own), and `bat-free`, a battery with no `[[limits]]` at all.
const DEVICES: &str = "\
[[drivers]]\nkind = \"simulated\"\ndevice_id = \"bat-1\"\ndevice_type = \"battery\"\ninterval_ms = 200\n\n\
[[drivers]]\nkind = \"simulated\"\ndevice_id = \"ch-1\"\ndevice_type = \"charger\"\ninterval_ms = 200\n\n\
[[drivers]]\nkind = \"simulated\"\ndevice_id = \"car-1\"\ndevice_type = \"vehicle\"\ninterval_ms = 200\n\n\
[[drivers]]\nkind = \"simulated\"\ndevice_id = \"th-1\"\ndevice_type = \"thermostat\"\ninterval_ms = 200\n\n\
[[drivers]]\nkind = \"simulated\"\ndevice_id = \"pv-1\"\ndevice_type = \"inverter\"\ninterval_ms = 200\n\n\
[[drivers]]\nkind = \"simulated\"\ndevice_id = \"bat-free\"\ndevice_type = \"battery\"\ninterval_ms = 200\n\n\
[[limits]]\ndevice_id = \"bat-1\"\ndevice_type = \"battery\"\nmin_backup_reserve = 20\n\
min_operating_reserve = 10\nmax_operating_reserve = 90\n\
default_control = { command = \"battery:set-reserve\", input = { chargePercentage = 40 } }\n\
failsafe_control = { command = \"battery:set-reserve\", input = { chargePercentage = 50 } }\n\n\
[[limits]]\ndevice_id = \"ch-1\"\ndevice_type = \"charger\"\nmax_current_a = 16\nmax_power_w = 7400\n\
default_control = { command = \"charger:set-charge-rate-limit\", input = { currentLimit = 6, powerLimit = 1400 } }\n\n\
[[limits]]\ndevice_id = \"car-1\"\ndevice_type = \"vehicle\"\nmin_charge_limit = 50\nmax_charge_limit = 90\n\
default_control = { command = \"vehicle:set-charge-limit\", input = { chargeLimit = 80 } }\n\
failsafe_control = { command = \"vehicle:set-charge-limit\", input = { chargeLimit = 60 } }\n\n\
[[limits]]\ndevice_id = \"th-1\"\ndevice_type = \"thermostat\"\nmin_target_c = 16\nmax_target_c = 26\n\
default_control = { command = \"thermostat:set-operating-mode\", input = { operatingMode = \"heat\", heatTarget = 19 } }\n\n\
[[limits]]\ndevice_id = \"pv-1\"\ndevice_type = \"inverter\"\nmax_export_w = 5000\n\
default_control = { command = \"inverter:set-export-limit\", input = { exportLimit = 3000 } }\n\
failsafe_control = { command = \"inverter:set-export-limit\", input = { exportLimit = 0 } }\n";

/// Every device the agent must list before a test commands it.
const ALL: [&str; 6] = ["bat-1", "ch-1", "car-1", "th-1", "pv-1", "bat-free"];
/// The devices with a control, so the ones a hold can return and fail-safe can move.
const CONTROLLED: [&str; 5] = ["bat-1", "ch-1", "car-1", "th-1", "pv-1"];

/// A test's platform: broker, signer, peer, the agent's configuration, and every telemetry point
/// the peer has seen so far (so waiting for one event never loses another).
struct Bed {
    pki: Pki,
    broker: Mosquitto,
    signer: PlatformSigner,
    peer: Peer,
    cfg: AgentConfig,
    config: PathBuf,
    points: Vec<Value>,
    next: u32,
}

impl Bed {
    /// With `persistent`, the broker keeps the peer's session across a graceful restart, so
    /// the points the agent sends the moment it reconnects reach the peer.
    async fn new(persistent: bool) -> Bed {
        let pki = Pki::new();
        let broker = Mosquitto::start_with(&pki, persistent);
        let signer = PlatformSigner::generate("platform-safety");
        let topics = [
            device_topic(GATEWAY, "replies"),
            device_topic(GATEWAY, "telemetry"),
            device_topic(GATEWAY, "capabilities"),
            device_topic(GATEWAY, "status"),
        ];
        let topics: Vec<&str> = topics.iter().map(String::as_str).collect();
        let peer =
            Peer::connect_with(&pki, broker.port, PLATFORM_CLIENT, &topics, !persistent).await;
        let now = system_secs();
        peer.publish(
            &Topics::trust_bundle(),
            signer.trust_bundle(1, now, now + 3_600, &[]),
            true,
        )
        .await;
        let mut cfg = AgentConfig::new(&pki, broker.port, GATEWAY).trusting(&signer, WORKSPACE);
        cfg.extra_toml = format!(
            "[telemetry]\nbatch_max_ms = 100\nhealth_interval_secs = 3600\n\n\
             [safety]\nfailsafe_after_secs = {WINDOW_SECS}\n\n{DEVICES}"
        );
        let config = cfg.write(pki.path());
        Bed {
            pki,
            broker,
            signer,
            peer,
            cfg,
            config,
            points: Vec::new(),
            next: 0,
        }
    }

    /// Starts the agent; returns once it is online and lists every device.
    async fn start_agent(&mut self) -> Agent {
        let status = device_topic(GATEWAY, "status");
        self.peer.forget(&status);
        let agent = Agent::spawn(BIN, &self.config);
        self.peer
            .expect(&status, WAIT, |m| m.json()["state"] == "online")
            .await;
        self.peer
            .expect(&device_topic(GATEWAY, "capabilities"), WAIT, |m| {
                let listed = m.json()["devices"].to_string();
                ALL.iter().all(|d| listed.contains(&format!("\"{d}\"")))
            })
            .await;
        agent
    }

    /// A signed command from a server key: for `device`, or the gateway itself for `None`.
    fn token(&mut self, device: Option<&str>, slug: &str, input: Value) -> (String, String) {
        self.next += 1;
        let id = format!("cmd-{}", self.next);
        let key = ApiKey::server("key-server", WORKSPACE);
        let command = AttestedCommand::new(GATEWAY, &id, slug, input);
        let command = match device {
            Some(d) => command.for_device(d),
            None => command,
        };
        let claims = self.signer.claims(&key, command, system_secs(), 300);
        (id, self.signer.attest(&claims))
    }

    /// Sends a command and returns its reply.
    async fn ask(&mut self, device: Option<&str>, slug: &str, input: Value) -> Value {
        let (id, token) = self.token(device, slug, input);
        self.peer
            .publish(
                &device_topic(GATEWAY, "commands"),
                token.into_bytes(),
                false,
            )
            .await;
        self.peer
            .expect(&device_topic(GATEWAY, "replies"), WAIT, |m| {
                m.json()["commandId"] == id.as_str()
            })
            .await
            .json()
    }

    /// Sends a device command that must succeed.
    async fn command(&mut self, device: &str, slug: &str, input: Value) -> Value {
        let reply = self.ask(Some(device), slug, input).await;
        assert_eq!(
            reply["type"], "command.succeeded",
            "{device} {slug}: {reply}"
        );
        reply
    }

    /// Waits until `device`'s state, as `agent:get-state` reports it, satisfies `pred` (named
    /// `what` in the failure); returns that state. The agent reports a device's latest sample,
    /// so a setpoint shows there one sample period (200 ms) after it was applied.
    async fn reaches(&mut self, device: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let reply = self.ask(None, "agent:get-state", json!({})).await;
            assert_eq!(reply["type"], "command.succeeded", "{reply}");
            let state = reply["result"]["devices"]
                .as_array()
                .expect("devices")
                .iter()
                .find(|d| d["deviceId"] == device)
                .map(|d| d["state"].clone())
                .unwrap_or(Value::Null);
            if pred(&state) {
                return state;
            }
            assert!(
                Instant::now() < deadline,
                "{device} never reached {what}: {state}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// [`Bed::reaches`] for one member: `pointer` (a JSON pointer into the state) equals `value`.
    async fn reaches_value(&mut self, device: &str, pointer: &str, value: Value) {
        self.reaches_value_then(device, pointer, value).await;
    }

    /// [`Bed::reaches_value`], returning the whole state.
    async fn reaches_value_then(&mut self, device: &str, pointer: &str, value: Value) -> Value {
        let what = format!("{pointer} = {value}");
        self.reaches(device, &what, |s| s.pointer(pointer) == Some(&value))
            .await
    }

    /// Waits for the first safety point with `event` about `device` that satisfies `pred`
    /// (among the points seen so far, then the ones still to come); returns the whole point.
    async fn safety(&mut self, device: &str, event: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let matches = |p: &Value| {
            p["deviceId"] == device && p["safety"]["event"] == event && pred(&p["safety"])
        };
        let deadline = Instant::now() + WAIT;
        let telemetry = device_topic(GATEWAY, "telemetry");
        loop {
            if let Some(p) = self.points.iter().find(|p| matches(p)) {
                return p.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {event} point for {device} within {WAIT:?}; safety points seen: {:#?}",
                self.safety_points()
            );
            let batch = self.peer.expect(&telemetry, WAIT, |_| true).await.json();
            self.points
                .extend(batch["points"].as_array().expect("points").iter().cloned());
        }
    }

    /// Every safety point seen so far.
    fn safety_points(&self) -> Vec<&Value> {
        self.points
            .iter()
            .filter(|p| p.get("safety").is_some())
            .collect()
    }

    /// The number of `event` points about `device` seen so far.
    fn count(&self, device: &str, event: &str) -> usize {
        self.safety_points()
            .iter()
            .filter(|p| p["deviceId"] == device && p["safety"]["event"] == event)
            .count()
    }

    /// Publishes a site policy, retained, as the platform does.
    async fn publish_policy(&self, version: u64, limits: Value) {
        let policy = self
            .signer
            .site_policy(GATEWAY, version, system_secs(), limits);
        self.peer
            .publish(
                &device_topic(GATEWAY, "safety/policy"),
                policy.into_bytes(),
                true,
            )
            .await;
    }

    /// `texture-agent status`'s output.
    fn status(&self) -> String {
        let out = agent_command(BIN, &self.config, &["status"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("UTF-8")
    }
}

/// A safety point's `ts` in Unix milliseconds.
fn ts(point: &Value) -> u64 {
    point["ts"].as_u64().expect("ts")
}

/// The status line of `device` under "safety:", if it has one.
fn status_line<'a>(status: &'a str, device: &str) -> Option<&'a str> {
    let prefix = format!("{device}: ");
    status
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&prefix))
}

/// PROTOCOL 4.7 for every device type: a command beyond a limit is refused `422 LIMIT_EXCEEDED`
/// naming the limit, reported as a `command-refused` point, and never reaches the device; a
/// command at the limit runs. PROTOCOL 4.8: `holdSecs` for a device without a default control
/// is refused 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_beyond_the_envelope_are_refused_for_every_device_type() {
    let mut bed = Bed::new(false).await;
    let _agent = bed.start_agent().await;
    bed.command(
        "ch-1",
        "charger:set-operating-mode",
        json!({"operatingMode": "start-charging"}),
    )
    .await;
    let cases = [
        (
            "bat-1",
            "battery:set-reserve",
            json!({"chargePercentage": 19}),
            json!({"chargePercentage": 20}),
            "chargePercentage: 19 % is below the installer limit min_backup_reserve = 20 % for bat-1",
        ),
        (
            "bat-1",
            "battery:set-operating-mode",
            json!({"operatingMode": "discharge", "minimumBatteryReserve": 5}),
            json!({"operatingMode": "discharge", "minimumBatteryReserve": 10, "maximumBatteryReserve": 90}),
            "minimumBatteryReserve: 5 % is below the installer limit min_operating_reserve = 10 % for bat-1",
        ),
        (
            "ch-1",
            "charger:set-charge-rate-limit",
            json!({"currentLimit": 20, "powerLimit": 7400}),
            json!({"currentLimit": 16, "powerLimit": 7400}),
            "currentLimit: 20 A is above the installer limit max_current_a = 16 A for ch-1",
        ),
        (
            "ch-1",
            "charger:set-charge-rate-limit",
            json!({"currentLimit": 10}),
            json!({"currentLimit": 10, "powerLimit": 2000}),
            "powerLimit: missing; the installer limit max_power_w = 7400 W for ch-1 requires it",
        ),
        (
            "car-1",
            "vehicle:set-charge-limit",
            json!({"chargeLimit": 40}),
            json!({"chargeLimit": 50}),
            "chargeLimit: 40 % is below the installer limit min_charge_limit = 50 % for car-1",
        ),
        (
            "th-1",
            "thermostat:set-operating-mode",
            json!({"operatingMode": "heat", "heatTarget": 15}),
            json!({"operatingMode": "heat", "heatTarget": 16}),
            "heatTarget: 15 °C is below the installer limit min_target_c = 16 °C for th-1",
        ),
        (
            "pv-1",
            "inverter:set-export-limit",
            json!({"exportLimit": 6000}),
            json!({"exportLimit": 5000}),
            "exportLimit: 6000 W is above the installer limit max_export_w = 5000 W for pv-1",
        ),
    ];
    for (device, slug, outside, inside, message) in &cases {
        let refused = bed.ask(Some(device), slug, outside.clone()).await;
        assert_eq!(refused["type"], "command.failed", "{refused}");
        assert_eq!(refused["status"], 422, "{refused}");
        assert_eq!(refused["error"]["code"], "LIMIT_EXCEEDED", "{refused}");
        assert_eq!(refused["error"]["message"], *message, "{refused}");
        assert_eq!(refused["deviceId"], *device, "{refused}");
        let id = refused["commandId"].clone();
        let point = bed
            .safety(device, "command-refused", |s| s["commandId"] == id)
            .await;
        assert_eq!(
            point["safety"],
            json!({"event": "command-refused", "commandId": id, "slug": slug, "message": message}),
        );
        bed.command(device, slug, inside.clone()).await;
    }
    // The devices carry the commands at the limits, never the ones beyond them: the charger
    // draws at most its 10 A (it is charging), the battery keeps the reserve at its limit.
    bed.reaches_value("bat-1", "/backupReserve", json!(20.0))
        .await;
    bed.reaches_value("bat-1", "/strategy", json!("discharge"))
        .await;
    bed.reaches_value("car-1", "/chargeLimit", json!(50.0))
        .await;
    bed.reaches_value("th-1", "/heatTarget/value", json!(16.0))
        .await;
    bed.reaches("ch-1", "a current of at most 10 A", |s| {
        s["chargerCurrent"]
            .as_f64()
            .is_some_and(|a| a > 0.0 && a <= 10.0)
    })
    .await;

    // A hold needs a default control to return to.
    let held = bed
        .ask(
            Some("bat-free"),
            "battery:set-reserve",
            json!({"chargePercentage": 30, "holdSecs": 60}),
        )
        .await;
    assert_eq!(held["status"], 400, "{held}");
    assert_eq!(held["error"]["code"], "VALIDATION_ERROR", "{held}");
    assert_eq!(
        held["error"]["message"],
        "holdSecs: bat-free has no default_control in its [[limits]] entry to return to when the hold lapses",
    );
    // The refused hold never reached the battery: a later command shows its reserve unchanged.
    bed.command(
        "bat-free",
        "battery:set-operating-mode",
        json!({"operatingMode": "discharge"}),
    )
    .await;
    let battery = bed
        .reaches_value_then("bat-free", "/strategy", json!("discharge"))
        .await;
    assert_eq!(battery["backupReserve"], 20.0, "{battery}");
}

/// PROTOCOL 4.8 for every device type: a setpoint held for `holdSecs` returns to the device's
/// default control once the hold lapses, within one control period, reported as `hold-expired`
/// and `control-applied`; a later command without a hold ends the hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_setpoint_returns_to_the_default_control_on_time_for_every_device_type() {
    let mut bed = Bed::new(false).await;
    let _agent = bed.start_agent().await;
    bed.command(
        "ch-1",
        "charger:set-operating-mode",
        json!({"operatingMode": "start-charging"}),
    )
    .await;
    let hold = 4;
    let held = [
        (
            "bat-1",
            "battery:set-reserve",
            json!({"chargePercentage": 70}),
        ),
        (
            "ch-1",
            "charger:set-charge-rate-limit",
            json!({"currentLimit": 16, "powerLimit": 7400}),
        ),
        (
            "car-1",
            "vehicle:set-charge-limit",
            json!({"chargeLimit": 90}),
        ),
        (
            "th-1",
            "thermostat:set-operating-mode",
            json!({"operatingMode": "heat", "heatTarget": 24}),
        ),
        (
            "pv-1",
            "inverter:set-export-limit",
            json!({"exportLimit": 5000}),
        ),
    ];
    let mut sent = Vec::new();
    for (device, slug, input) in &held {
        let mut input = input.clone();
        input["holdSecs"] = json!(hold);
        let before = system_secs();
        bed.command(device, slug, input).await;
        sent.push((device, before, system_secs()));
    }
    // While held, the setpoints are in force.
    bed.reaches_value("bat-1", "/backupReserve", json!(70.0))
        .await;
    bed.reaches_value("car-1", "/chargeLimit", json!(90.0))
        .await;
    bed.reaches_value("th-1", "/heatTarget/value", json!(24.0))
        .await;
    bed.reaches("ch-1", "a current above 6 A", |s| {
        s["chargerCurrent"].as_f64().is_some_and(|a| a > 6.0)
    })
    .await;
    // A command without a hold ends car-1's hold: it must not revert.
    bed.command(
        "car-1",
        "vehicle:set-charge-limit",
        json!({"chargeLimit": 85}),
    )
    .await;

    let defaults = [
        ("bat-1", "battery:set-reserve"),
        ("ch-1", "charger:set-charge-rate-limit"),
        ("th-1", "thermostat:set-operating-mode"),
        ("pv-1", "inverter:set-export-limit"),
    ];
    for (device, command) in defaults {
        let (_, before, after) = sent.iter().find(|(d, ..)| **d == device).unwrap();
        let expired = bed.safety(device, "hold-expired", |_| true).await;
        let deadline = expired["safety"]["deadline"].as_u64().unwrap();
        assert!(
            deadline >= before + hold && deadline <= after + hold,
            "{device}: deadline {deadline} not {hold} s after the command ({before}..{after})"
        );
        assert_eq!(expired["safety"]["command"], command, "{expired}");
        // Not early, and within one control period of the deadline.
        assert!(
            ts(&expired) >= deadline * 1_000 && ts(&expired) <= deadline * 1_000 + LATE_MS,
            "{device}: hold-expired at {} ms for the deadline {deadline} s",
            ts(&expired)
        );
        let applied = bed
            .safety(device, "control-applied", |s| s["reason"] == "hold-expired")
            .await;
        assert_eq!(applied["safety"]["command"], command, "{applied}");
        assert!(ts(&applied) >= ts(&expired), "{applied} before {expired}");
    }
    bed.reaches_value("bat-1", "/backupReserve", json!(40.0))
        .await;
    bed.reaches_value("th-1", "/heatTarget/value", json!(19.0))
        .await;
    bed.reaches_value("th-1", "/operatingMode", json!("heat"))
        .await;
    // The charger's default control holds it to 6 A.
    bed.reaches("ch-1", "a current of at most 6 A", |s| {
        s["chargerCurrent"]
            .as_f64()
            .is_some_and(|a| a > 0.0 && a <= 6.0)
    })
    .await;
    // car-1's hold had ended with the command without one: it keeps that setpoint.
    bed.reaches_value("car-1", "/chargeLimit", json!(85.0))
        .await;
    assert_eq!(
        bed.count("car-1", "hold-expired"),
        0,
        "{:#?}",
        bed.safety_points()
    );
}

/// PROTOCOL 4.8: a hold's deadline is stored. An agent killed in the middle of a hold returns the
/// device to its default control at the deadline after it starts again; one that starts after
/// the deadline has passed applies the default control at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_survives_a_power_cut_in_its_middle_and_one_past_its_deadline() {
    let mut bed = Bed::new(false).await;
    let agent = bed.start_agent().await;
    bed.command(
        "bat-1",
        "battery:set-reserve",
        json!({"chargePercentage": 70, "holdSecs": 8}),
    )
    .await;
    bed.command(
        "th-1",
        "thermostat:set-operating-mode",
        json!({"operatingMode": "cool", "coolTarget": 22, "holdSecs": 1}),
    )
    .await;
    // A power cut: no goodbye, nothing flushed beyond what was already stored.
    agent.signal("KILL");
    drop(agent);
    let status = bed.status();
    let bat = status_line(&status, "bat-1").unwrap_or_else(|| panic!("{status}"));
    assert!(bat.contains("hold until"), "{status}");
    assert!(status_line(&status, "th-1").is_some(), "{status}");
    // th-1's deadline passes while the gateway is off.
    std::thread::sleep(Duration::from_millis(2_100));

    let started = system_secs();
    let _agent = bed.start_agent().await;
    let th = bed.safety("th-1", "hold-expired", |_| true).await;
    assert!(
        ts(&th) <= started * 1_000 + 1_000 + LATE_MS,
        "th-1's lapsed hold applied {} ms after the start at {started} s",
        ts(&th).saturating_sub(started * 1_000)
    );
    bed.safety("th-1", "control-applied", |s| s["reason"] == "hold-expired")
        .await;
    let bat = bed.safety("bat-1", "hold-expired", |_| true).await;
    let deadline = bat["safety"]["deadline"].as_u64().unwrap();
    assert!(
        ts(&bat) >= deadline * 1_000 && ts(&bat) <= deadline * 1_000 + LATE_MS,
        "bat-1's hold lapsed at {} ms for the deadline {deadline} s",
        ts(&bat)
    );
    assert!(
        deadline > started,
        "bat-1's hold should outlast the restart"
    );
    bed.safety("bat-1", "control-applied", |s| {
        s["reason"] == "hold-expired"
    })
    .await;
    bed.reaches_value("bat-1", "/backupReserve", json!(40.0))
        .await;
    bed.reaches_value("th-1", "/operatingMode", json!("heat"))
        .await;
    bed.reaches_value("th-1", "/heatTarget/value", json!(19.0))
        .await;
    let status = bed.status();
    assert!(
        status.contains("no hold running, no device in fail-safe"),
        "{status}"
    );
}

/// PROTOCOL 4.9: once the link has been down for the window, every device with a control enters
/// fail-safe (its hold ends, its fail-safe or else default control applies); a device with
/// neither is left alone. Reconnecting does not leave fail-safe, nor does a refused command;
/// a command that succeeds after the reconnect takes that device, and only it, out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_link_loss_puts_devices_in_failsafe_until_a_command_after_the_reconnect() {
    let mut bed = Bed::new(true).await;
    let agent = bed.start_agent().await;
    bed.command(
        "bat-1",
        "battery:set-reserve",
        json!({"chargePercentage": 70, "holdSecs": 3600}),
    )
    .await;
    bed.command(
        "bat-free",
        "battery:set-reserve",
        json!({"chargePercentage": 33}),
    )
    .await;

    bed.broker.stop_gracefully();
    let down = system_secs();
    for device in CONTROLLED {
        let deadline = Instant::now() + WAIT;
        while !agent
            .logs_with_message("safety: failsafe-entered")
            .iter()
            .any(|l| l["device_id"] == device)
        {
            assert!(
                Instant::now() < deadline,
                "{device} never entered fail-safe:\n{}",
                agent.log_dump()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // Stored, so `status` shows it while the link is still down.
    let status = bed.status();
    for device in CONTROLLED {
        let line = status_line(&status, device).unwrap_or_else(|| panic!("{device}: {status}"));
        assert!(line.contains("in fail-safe"), "{status}");
        assert!(
            !line.contains("hold until"),
            "the hold ends in fail-safe: {status}"
        );
    }
    assert!(status_line(&status, "bat-free").is_none(), "{status}");

    bed.broker.restart();
    let controls = [
        ("bat-1", "battery:set-reserve"),
        ("ch-1", "charger:set-charge-rate-limit"),
        ("car-1", "vehicle:set-charge-limit"),
        ("th-1", "thermostat:set-operating-mode"),
        ("pv-1", "inverter:set-export-limit"),
    ];
    for (device, command) in controls {
        let entered = bed.safety(device, "failsafe-entered", |_| true).await;
        let since = entered["safety"]["linkDownSince"].as_u64().unwrap();
        assert!(
            since + 1 >= down && since <= down + 1,
            "{entered}: the link went down at {down}"
        );
        assert_eq!(entered["safety"]["command"], command, "{entered}");
        assert!(
            ts(&entered) >= (since + WINDOW_SECS) * 1_000
                && ts(&entered) <= (since + WINDOW_SECS) * 1_000 + LATE_MS,
            "{device} entered fail-safe at {} ms, the link down since {since} s",
            ts(&entered)
        );
        let applied = bed
            .safety(device, "control-applied", |s| s["reason"] == "failsafe")
            .await;
        assert_eq!(applied["safety"]["command"], command, "{applied}");
    }
    assert_eq!(bed.count("bat-free", "failsafe-entered"), 0);
    // The fail-safe controls are in force: bat-1's and car-1's own, th-1's default.
    bed.reaches_value("bat-1", "/backupReserve", json!(50.0))
        .await;
    bed.reaches_value("car-1", "/chargeLimit", json!(60.0))
        .await;
    bed.reaches_value("th-1", "/heatTarget/value", json!(19.0))
        .await;
    bed.reaches("ch-1", "a current of at most 6 A", |s| {
        s["chargerCurrent"].as_f64().is_some_and(|a| a <= 6.0)
    })
    .await;
    let free = bed
        .reaches_value_then("bat-free", "/backupReserve", json!(33.0))
        .await;
    assert_eq!(free["strategy"], "self-consumption", "{free}");

    // Reconnected (the command above was answered), and still in fail-safe; a refused command
    // does not take car-1 out either.
    let refused = bed
        .ask(
            Some("car-1"),
            "vehicle:set-charge-limit",
            json!({"chargeLimit": 95}),
        )
        .await;
    assert_eq!(refused["status"], 422, "{refused}");
    let status = bed.status();
    for device in CONTROLLED {
        let line = status_line(&status, device).unwrap_or_else(|| panic!("{device}: {status}"));
        assert!(line.contains("in fail-safe"), "{status}");
    }

    let reply = bed
        .command(
            "bat-1",
            "battery:set-reserve",
            json!({"chargePercentage": 30}),
        )
        .await;
    let left = bed.safety("bat-1", "failsafe-left", |_| true).await;
    assert_eq!(
        left["safety"],
        json!({"event": "failsafe-left", "commandId": reply["commandId"]})
    );
    let status = bed.status();
    assert!(status_line(&status, "bat-1").is_none(), "{status}");
    for device in ["ch-1", "car-1", "th-1", "pv-1"] {
        let line = status_line(&status, device).unwrap_or_else(|| panic!("{device}: {status}"));
        assert!(line.contains("in fail-safe"), "{status}");
    }
    bed.reaches_value("bat-1", "/backupReserve", json!(30.0))
        .await;
    for device in ["ch-1", "car-1", "th-1", "pv-1"] {
        assert_eq!(
            bed.count(device, "failsafe-left"),
            0,
            "{:#?}",
            bed.safety_points()
        );
    }
    // One entry per outage.
    for device in CONTROLLED {
        assert_eq!(
            bed.count(device, "failsafe-entered"),
            1,
            "{:#?}",
            bed.safety_points()
        );
    }
}

/// PROTOCOL 4.10: a site policy that would widen an installer limit is refused whole and changes
/// nothing; one that narrows limits is applied to the next command, stored, and still in force
/// after a restart with nothing retained on the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_widening_policy_is_refused_and_a_narrowing_one_applies_and_survives_a_restart() {
    let mut bed = Bed::new(false).await;
    let mut agent = bed.start_agent().await;

    bed.publish_policy(
        1,
        json!([
            {"deviceId": "pv-1", "deviceType": "inverter", "limits": {"max_export_w": 4000}},
            {"deviceId": "bat-1", "deviceType": "battery", "limits": {"min_backup_reserve": 10}},
        ]),
    )
    .await;
    let refused = bed.safety(GATEWAY, "policy-refused", |_| true).await;
    assert_eq!(refused["safety"]["version"], 1, "{refused}");
    assert_eq!(
        refused["safety"]["message"],
        "policy v1: min_backup_reserve = 10 % for bat-1 is below the installer's min_backup_reserve = 20 %: a policy may only narrow the installer's limits",
    );
    // Nothing of it is in force, not even its narrowing entry.
    bed.command(
        "pv-1",
        "inverter:set-export-limit",
        json!({"exportLimit": 4500}),
    )
    .await;
    let below = bed
        .ask(
            Some("bat-1"),
            "battery:set-reserve",
            json!({"chargePercentage": 15}),
        )
        .await;
    assert_eq!(below["status"], 422, "{below}");

    bed.publish_policy(
        2,
        json!([
            {"deviceId": "pv-1", "deviceType": "inverter", "limits": {"max_export_w": 4000}},
            {"deviceId": "ch-1", "deviceType": "charger", "limits": {"max_current_a": 10}},
            {"deviceId": "bat-1", "deviceType": "battery", "limits": {"min_backup_reserve": 30}},
        ]),
    )
    .await;
    let applied = bed.safety(GATEWAY, "policy-applied", |_| true).await;
    assert_eq!(
        applied["safety"],
        json!({"event": "policy-applied", "version": 2})
    );

    // The commands the policy refuses, with the message naming its limit.
    let narrowed = [
        (
            "pv-1",
            "inverter:set-export-limit",
            json!({"exportLimit": 4500}),
            "exportLimit: 4500 W is above the policy v2 limit max_export_w = 4000 W for pv-1",
        ),
        (
            "ch-1",
            "charger:set-charge-rate-limit",
            json!({"currentLimit": 12, "powerLimit": 2000}),
            "currentLimit: 12 A is above the policy v2 limit max_current_a = 10 A for ch-1",
        ),
        (
            "bat-1",
            "battery:set-reserve",
            json!({"chargePercentage": 25}),
            "chargePercentage: 25 % is below the policy v2 limit min_backup_reserve = 30 % for bat-1",
        ),
    ];
    for (device, slug, input, message) in narrowed.clone() {
        let reply = bed.ask(Some(device), slug, input).await;
        assert_eq!(reply["status"], 422, "{reply}");
        assert_eq!(reply["error"]["message"], message, "{reply}");
    }
    // The installer's limits still apply beneath the policy.
    let beyond = bed
        .ask(
            Some("ch-1"),
            "charger:set-charge-rate-limit",
            json!({"currentLimit": 8}),
        )
        .await;
    assert_eq!(beyond["status"], 422, "{beyond}");
    bed.command(
        "bat-1",
        "battery:set-reserve",
        json!({"chargePercentage": 30}),
    )
    .await;

    // Stop the agent, take the retained policy off the broker, and start again: the stored
    // policy alone keeps the limits narrowed.
    agent.signal("TERM");
    agent.wait_exit(WAIT);
    bed.peer
        .publish(&device_topic(GATEWAY, "safety/policy"), Vec::new(), true)
        .await;
    let stored = bed.cfg.state_dir(bed.pki.path()).join("site-policy.json");
    assert!(stored.exists(), "no {}", stored.display());
    let status = bed.status();
    assert!(status.contains("policy:      v2"), "{status}");
    bed.points.clear();
    let _agent = bed.start_agent().await;
    for (device, slug, input, message) in narrowed {
        let reply = bed.ask(Some(device), slug, input).await;
        assert_eq!(reply["status"], 422, "after the restart: {reply}");
        assert_eq!(
            reply["error"]["message"], message,
            "after the restart: {reply}"
        );
    }
    bed.command(
        "pv-1",
        "inverter:set-export-limit",
        json!({"exportLimit": 4000}),
    )
    .await;
}
