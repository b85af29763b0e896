//! Footprint of the daemon, measured the way a gateway owner would see it: start-up time to
//! READY=1 and to connected, RSS and CPU time after a period connected and idle, binary size.
//!
//!     cargo bench --bench footprint            # 60 s idle window, four simulated devices
//!     FOOTPRINT_SECS=10 cargo bench --bench footprint
//!     FOOTPRINT_DRIVERS=0 cargo bench --bench footprint   # the link alone
//!     FOOTPRINT_SMAPS=1 cargo bench --bench footprint     # and where the RSS is
//!     FOOTPRINT_LIMITS=0 cargo bench --bench footprint    # no [[limits]] (no safety controls)
//!     FOOTPRINT_SUNSPEC=1 cargo bench --bench footprint   # and a sunspec driver, two units
//!     FOOTPRINT_SUNSPEC=rtu cargo bench --bench footprint # the same over Modbus RTU (a pty bus)
//!     FOOTPRINT_OCPP=2 cargo bench --bench footprint      # and an ocpp driver, 2 chargers connected
//!
//! "Idle" is a gateway's normal state: `FOOTPRINT_DRIVERS` simulated devices (default 4) each
//! reporting every 5 s, telemetry batched and published as in production. Start-up times come
//! from the daemon's own systemd notifications (`READY=1`, then `STATUS=connected to ...`),
//! received on a private `NOTIFY_SOCKET`.
//!
//! Prints one figure per line; see docs/PERFORMANCE.md for recorded results.

use std::time::{Duration, Instant};

use std::os::unix::net::UnixDatagram;
use std::process::Stdio;

use kit::{AgentConfig, Mosquitto, Pki};
use texture_agent_testkit as kit;

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = std::env::var("FOOTPRINT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let drivers: usize = std::env::var("FOOTPRINT_DRIVERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki);
    let mut cfg = AgentConfig::new(&pki, broker.port, "gw-footprint");
    let limits = std::env::var("FOOTPRINT_LIMITS").map_or(true, |v| v != "0");
    for i in 0..drivers {
        let kind = ["battery", "inverter", "charger", "thermostat"][i % 4];
        cfg.extra_toml.push_str(&format!(
            "[[drivers]]\nkind = \"simulated\"\ndevice_id = \"sim-{i}\"\ndevice_type = \"{kind}\"\ninterval_ms = 5000\nseed = {i}\n\n"
        ));
        if limits {
            // An installer's envelope with a default control, as a production gateway has:
            // it keeps the safety stage's control period running.
            let (bounds, control) = [
                ("min_backup_reserve = 20", "battery:set-reserve\", input = { chargePercentage = 30 }"),
                ("max_export_w = 5000", "inverter:set-export-limit\", input = { exportLimit = 3000 }"),
                ("max_current_a = 16", "charger:set-charge-rate-limit\", input = { currentLimit = 6 }"),
                ("max_target_c = 26", "thermostat:set-operating-mode\", input = { operatingMode = \"heat\", heatTarget = 19 }"),
            ][i % 4];
            cfg.extra_toml.push_str(&format!(
                "[[limits]]\ndevice_id = \"sim-{i}\"\ndevice_type = \"{kind}\"\n{bounds}\n\
                 default_control = {{ command = \"{control} }}\n\n"
            ));
        }
    }
    // FOOTPRINT_SUNSPEC=1: and a sunspec driver polling a hybrid inverter and its meter (two
    // units of a pymodbus SunSpec server) every 5 s, for the driver's cost; =rtu: the same two
    // units on a simulated RS-485 bus (a socat pty pair), for the serial port's.
    let sunspec = match std::env::var("FOOTPRINT_SUNSPEC").as_deref() {
        Ok("1") => "tcp",
        Ok("rtu") => "rtu",
        _ => "none",
    };
    let _server = (sunspec != "none").then(|| {
        let spec = serde_json::json!({"units": {
            "1": {"models": [{"id": 1, "points": {"SN": "HYB-1"}},
                             {"id": 103, "points": {"W": 4521, "W_SF": -1}},
                             {"id": 124, "points": {"ChaState": 655, "ChaState_SF": -1}}]},
            "2": {"models": [{"id": 1, "points": {"SN": "MTR-2"}},
                             {"id": 203, "points": {"W": -1200, "W_SF": 0}}]},
        }});
        let (server, link) = if sunspec == "rtu" {
            let server = kit::SunSpecServer::start_serial(pki.path(), &spec);
            let path = server.serial_path().unwrap();
            (
                server,
                format!("serial = \"{}\"\nbaud = 19200", path.display()),
            )
        } else {
            let server = kit::SunSpecServer::start(pki.path(), &spec);
            let port = server.port;
            (server, format!("tcp = \"127.0.0.1:{port}\""))
        };
        cfg.extra_toml.push_str(&format!(
            "[[drivers]]\nkind = \"sunspec\"\nname = \"hybrid\"\n{link}\nunits = [1, 2]\n\n"
        ));
        server
    });
    // FOOTPRINT_OCPP=N: and an ocpp driver with N charge points (the mobilityhouse `ocpp`
    // package, as in tests/ocpp.rs), each connected, booted, reporting one connector charging,
    // then idle but for its heartbeat (60 s), for the central system's cost with chargers on it.
    let charge_points: usize = std::env::var("FOOTPRINT_OCPP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let ocpp_port = kit::free_port();
    if charge_points > 0 {
        let list: Vec<String> = (0..charge_points)
            .map(|i| format!("{{ id = \"CP-{i}\", max_current_a = 16 }}"))
            .collect();
        cfg.extra_toml.push_str(&format!(
            "[[drivers]]\nkind = \"ocpp\"\nname = \"garage\"\nlisten = \"127.0.0.1:{ocpp_port}\"\n\
             authorize = \"accept-all\"\nheartbeat_secs = 60\ncharge_points = [{}]\n\n",
            list.join(", ")
        ));
    }
    let config = cfg.write_production(pki.path());

    let notify_path = pki.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let started = Instant::now();
    let mut child = kit::agent_process(BIN)
        .arg("--config")
        .arg(&config)
        .arg("run")
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("WATCHDOG_USEC")
        .env_remove("INVOCATION_ID")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn texture-agent");
    let (mut ready, mut connected) = (None, None);
    let mut buf = [0u8; 512];
    while connected.is_none() {
        let n = notify.recv(&mut buf).expect("a notification within 15 s");
        let message = String::from_utf8_lossy(&buf[..n]);
        if message.lines().any(|l| l == "READY=1") {
            ready.get_or_insert(started.elapsed());
        }
        if message.lines().any(|l| l.starts_with("STATUS=connected")) {
            connected = Some(started.elapsed());
        }
    }
    let (ready, connected) = (ready.expect("READY=1 before connected"), connected.unwrap());
    let chargers: Vec<kit::ChargePoint> = (0..charge_points)
        .map(|i| connect_charge_point(pki.path(), ocpp_port, &format!("CP-{i}")))
        .collect();
    let pid = child.id();
    let cpu_at_connect = kit::cpu_seconds(&pid.to_string());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let idle = t0.elapsed();
    let binary = std::fs::metadata(kit::agent_binary(BIN)).unwrap().len();

    println!(
        "binary                 {} ({:.2} MiB)",
        kit::agent_binary(BIN),
        binary as f64 / 1048576.0
    );
    println!(
        "simulated_devices      {drivers} (every 5 s), limits with default controls: {limits}, \
         sunspec driver: {sunspec}, ocpp charge points connected: {}",
        chargers.len()
    );
    println!("start_to_ready_ms      {:.1}", ready.as_secs_f64() * 1000.0);
    println!(
        "start_to_connected_ms  {:.1}",
        connected.as_secs_f64() * 1000.0
    );
    println!("idle_window_s          {:.1}", idle.as_secs_f64());
    for (name, key) in [
        ("rss_kib", "VmRSS:"),
        ("rss_peak_kib", "VmHWM:"),
        ("rss_anon_kib", "RssAnon:"),
        ("threads", "Threads:"),
    ] {
        println!("{name:<22} {}", kit::proc_status_kib(&pid.to_string(), key));
    }
    println!(
        "cpu_s_total            {:.2}",
        kit::cpu_seconds(&pid.to_string())
    );
    println!(
        "cpu_s_idle_window      {:.2}",
        kit::cpu_seconds(&pid.to_string()) - cpu_at_connect
    );
    if std::env::var("FOOTPRINT_SMAPS").is_ok_and(|v| v == "1") {
        print_smaps(pid);
    }
    for cp in &chargers {
        assert!(
            cp.is_running(),
            "a charge point stopped: {}",
            cp.stderr_text()
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A charge point connected to the agent's ocpp driver on `port`, booted, its connector
/// charging with a meter reading, heartbeating as the boot's answer says.
fn connect_charge_point(dir: &std::path::Path, port: u16, id: &str) -> kit::ChargePoint {
    let spec = serde_json::json!({
        "url": format!("ws://127.0.0.1:{port}/ocpp/{id}"),
        "id": id,
        "subprotocols": ["ocpp1.6"],
        "boot_on_connect": true,
        "heartbeat": "boot",
    });
    let cp = kit::ChargePoint::start(dir, &spec);
    assert_eq!(cp.ready_state(), "connected", "{}", cp.stderr_text());
    cp.report_charging(1, Duration::from_secs(20));
    cp
}

/// Where the resident memory is: RSS and private (dirty + clean) KiB per mapping name.
fn print_smaps(pid: u32) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by_name: Vec<(String, u64, u64)> = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: address perms offset dev inode [name]
            current = fields.nth(4).unwrap_or("[anon]").to_string();
            if !by_name.iter().any(|(n, _, _)| *n == current) {
                by_name.push((current.clone(), 0, 0));
            }
            continue;
        }
        let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let entry = by_name.iter_mut().find(|(n, _, _)| *n == current);
        if let Some(entry) = entry {
            match first {
                "Rss:" => entry.1 += kib,
                "Private_Clean:" | "Private_Dirty:" => entry.2 += kib,
                _ => {}
            }
        }
    }
    by_name.sort_by_key(|e| std::cmp::Reverse(e.1));
    println!("smaps (rss KiB / private KiB per mapping):");
    for (name, rss, private) in by_name.iter().filter(|(_, rss, _)| *rss > 0) {
        println!("  {rss:>6} {private:>6}  {name}");
    }
}
