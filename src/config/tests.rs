//! Loading end to end: a file, environment overrides, validation and the redacted dump.

use super::*;

fn write(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("agent.toml");
    std::fs::write(&p, body).unwrap();
    p
}

fn minimal(dir: &Path) -> String {
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, "x").unwrap();
    format!(
        "[device]\nid = \"gw-1\"\n[broker]\nhost = \"localhost\"\nca_file = \"{}\"\n",
        ca.display()
    )
}

#[test]
fn environment_overrides_file() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), &minimal(d.path()));
    let s = load_from(
        &p,
        [(
            "TEXTURE_AGENT__BROKER__PORT".to_string(),
            "1884".to_string(),
        )],
    )
    .unwrap();
    assert_eq!(s.broker.port, 1884);
    assert_eq!(s.broker.host, "localhost");
}

#[test]
fn environment_values_keep_their_text() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), &minimal(d.path()));
    let s = load_from(
        &p,
        [
            ("TEXTURE_AGENT__DEVICE__ID".to_string(), "0123".to_string()),
            ("TEXTURE_AGENT__LOG__FORMAT".to_string(), "json".to_string()),
        ],
    )
    .unwrap();
    assert_eq!(s.device.id.as_str(), "0123");
    assert_eq!(s.log.format, LogFormat::Json);
}

#[test]
fn unknown_key_is_named() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), &(minimal(d.path()) + "ca_fle = \"x\"\n"));
    let e = load_from(&p, []).unwrap_err().to_string();
    assert!(e.contains("ca_fle"), "{e}");
    assert!(e.contains("broker"), "{e}");
}

#[test]
fn unknown_environment_key_is_named() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), &minimal(d.path()));
    let e = load_from(
        &p,
        [("TEXTURE_AGENT__BROKER__PROT".to_string(), "1".to_string())],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("prot"), "{e}");
}

#[test]
fn secret_key_path_is_redacted_in_dump_and_debug() {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("very-secret-key.pem");
    let cert = d.path().join("cert.pem");
    std::fs::write(&key, "k").unwrap();
    std::fs::write(&cert, "c").unwrap();
    let body = minimal(d.path())
        + &format!(
            "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            cert.display(),
            key.display()
        );
    let s = load_from(&write(d.path(), &body), []).unwrap();
    assert!(!s.redacted_dump().contains("very-secret-key"));
    assert!(s.redacted_dump().contains("<redacted>"));
    assert!(!format!("{s:?}").contains("very-secret-key"));
}

#[test]
fn plaintext_requires_explicit_opt_in() {
    let d = tempfile::tempdir().unwrap();
    let body = "[device]\nid = \"gw-1\"\n[broker]\nhost = \"localhost\"\n";
    let e = load_from(&write(d.path(), body), [])
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker.ca_file"), "{e}");
    let ok = format!("{body}allow_insecure_plaintext = true\n");
    assert!(load_from(&write(d.path(), &ok), []).is_ok());
}

#[test]
fn backoff_floor_prevents_tight_loops() {
    let d = tempfile::tempdir().unwrap();
    let body = minimal(d.path()) + "backoff_min_ms = 0\n";
    let e = load_from(&write(d.path(), &body), [])
        .unwrap_err()
        .to_string();
    assert!(e.contains("broker.backoff_min_ms"), "{e}");
}

fn with_battery(dir: &Path, limits: &str) -> PathBuf {
    let body = minimal(dir)
        + "[[drivers]]\nkind = \"simulated\"\ndevice_id = \"bat-1\"\ndevice_type = \"battery\"\n"
        + limits;
    write(dir, &body)
}

#[test]
fn installer_limits_load_with_whole_numbers_and_fractions() {
    let d = tempfile::tempdir().unwrap();
    let p = with_battery(
        d.path(),
        "[[limits]]\ndevice_id = \"bat-1\"\ndevice_type = \"battery\"\nmin_backup_reserve = 20\n\
         min_operating_reserve = 10.5\nmax_operating_reserve = 90\n",
    );
    let s = load_from(&p, []).unwrap();
    assert_eq!(s.limits.len(), 1);
    assert_eq!(s.limits[0].min_backup_reserve, Some(20.0));
    assert_eq!(s.limits[0].min_operating_reserve, Some(10.5));
    assert_eq!(s.limits[0].max_operating_reserve, Some(90.0));
}

#[test]
fn bad_installer_limits_are_refused_at_load_naming_the_entry() {
    let d = tempfile::tempdir().unwrap();
    let refused = |limits: &str| {
        load_from(&with_battery(d.path(), limits), [])
            .unwrap_err()
            .to_string()
    };
    let entry = "[[limits]]\ndevice_id = \"bat-1\"\ndevice_type = \"battery\"\n";
    let e = refused(&format!(
        "{entry}min_operating_reserve = 80\nmax_operating_reserve = 30\n"
    ));
    assert!(
        e.contains(
            "limits #1 (bat-1): min_operating_reserve (80) is above max_operating_reserve (30)"
        ),
        "{e}"
    );
    let e = refused(&format!("{entry}min_backup_reserve = -5\n"));
    assert!(
        e.contains("min_backup_reserve must be from 0 to 100, found -5"),
        "{e}"
    );
    let e = refused(&format!("{entry}max_current_a = 32\n"));
    assert!(
        e.contains("max_current_a"),
        "an unknown limit is named: {e}"
    );
    let e = refused(
        "[[limits]]\ndevice_id = \"bat-9\"\ndevice_type = \"battery\"\nmin_backup_reserve = 20\n",
    );
    assert!(
        e.contains("limits #1: no device \"bat-9\" behind this gateway"),
        "{e}"
    );
    let e = refused(
        "[[limits]]\ndevice_id = \"bat-1\"\ndevice_type = \"vehicle\"\nmin_charge_limit = 20\n",
    );
    assert!(
        e.contains("limits #1 (bat-1): expected battery, the type [[drivers]] simulates under that id, found vehicle"),
        "{e}"
    );
    let e = refused(&format!(
        "{entry}min_backup_reserve = 20\n{entry}min_backup_reserve = 30\n"
    ));
    assert!(e.contains("limits #2: \"bat-1\" has limits already"), "{e}");
}

#[test]
fn limits_for_a_device_a_process_driver_may_report_are_accepted() {
    let d = tempfile::tempdir().unwrap();
    let body = minimal(d.path())
        + "[[drivers]]\nkind = \"process\"\nname = \"modbus\"\ncommand = [\"/usr/bin/true\"]\n\
           [[limits]]\ndevice_id = \"car-1\"\ndevice_type = \"vehicle\"\nmax_charge_limit = 90\n";
    let s = load_from(&write(d.path(), &body), []).unwrap();
    assert_eq!(s.limits[0].max_charge_limit, Some(90.0));
}

#[test]
fn sunspec_drivers_load_with_defaults_and_one_endpoint_per_entry() {
    let d = tempfile::tempdir().unwrap();
    let entry = |name: &str, tcp: &str| {
        format!("[[drivers]]\nkind = \"sunspec\"\nname = \"{name}\"\ntcp = \"{tcp}\"\n\n")
    };
    let body = minimal(d.path())
        + &entry("roof", "192.0.2.10")
        + &entry("garage", "192.0.2.11:1502")
        + "[[limits]]\ndevice_id = \"sunspec-HYB-1-battery\"\ndevice_type = \"battery\"\n\
           min_backup_reserve = 20\n";
    let s = load_from(&write(d.path(), &body), []).unwrap();
    let crate::drivers::DriverSettings::Sunspec(roof) = &s.drivers[0] else {
        panic!("{:?}", s.drivers[0])
    };
    let quirks = roof.quirks();
    assert_eq!(
        (
            roof.units.as_slice(),
            roof.poll_ms,
            quirks.link.timeout.as_millis(),
            quirks.link.max_read
        ),
        (&[1u16][..], 5_000, 1_000, 125)
    );
    assert_eq!(roof.link_key(), "192.0.2.10:502");

    // The same endpoint twice, written differently, is one link: refused.
    let body = minimal(d.path()) + &entry("a", "192.0.2.10") + &entry("b", "192.0.2.10:502");
    let e = load_from(&write(d.path(), &body), [])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("driver #2 (b): 192.0.2.10:502 is the endpoint of another sunspec driver"),
        "{e}"
    );
    let body = minimal(d.path())
        + "[[drivers]]\nkind = \"sunspec\"\nname = \"x\"\ntcp = \"192.0.2.10\"\nunits = [1, 300]\n";
    let e = load_from(&write(d.path(), &body), [])
        .unwrap_err()
        .to_string();
    assert!(e.contains("drivers.units"), "{e}");
    assert!(
        e.contains("driver #1 (x): 300 is not a unit id from 1 to 255"),
        "{e}"
    );
    let body = minimal(d.path())
        + "[[drivers]]\nkind = \"sunspec\"\nname = \"x\"\ntcp = \"192.0.2.10\"\nbaud = 9600\n";
    let e = load_from(&write(d.path(), &body), [])
        .unwrap_err()
        .to_string();
    assert!(e.contains("baud"), "{e}");
}

#[test]
fn ocpp_drivers_load_with_defaults_keep_passwords_out_of_the_dump_and_listen_apart() {
    let d = tempfile::tempdir().unwrap();
    let entry = |name: &str, listen: &str, cp: &str| {
        format!(
            "[[drivers]]\nkind = \"ocpp\"\nname = \"{name}\"\nlisten = \"{listen}\"\n\
             authorize = \"accept-all\"\n\
             charge_points = [{{ id = \"{cp}\", password = \"garage-door-1234\", max_current_a = 16 }}]\n\n"
        )
    };
    let body = minimal(d.path()) + &entry("garage", "0.0.0.0:8887", "CP-1");
    let s = load_from(&write(d.path(), &body), []).unwrap();
    let crate::drivers::DriverSettings::Ocpp(garage) = &s.drivers[0] else {
        panic!("{:?}", s.drivers[0])
    };
    assert_eq!(
        (
            garage.path.as_str(),
            garage.heartbeat_secs,
            garage.max_message_bytes,
            garage.max_messages_per_sec
        ),
        ("/ocpp", 300, 65_536, 10)
    );
    assert_eq!(
        garage.charge_points[0].password.as_ref().unwrap().expose(),
        "garage-door-1234"
    );
    let dump = s.redacted_dump();
    assert!(
        dump.contains("CP-1") && dump.contains("<redacted>"),
        "{dump}"
    );
    assert!(!dump.contains("garage-door-1234"), "{dump}");
    assert!(!format!("{s:?}").contains("garage-door-1234"));

    let body = minimal(d.path())
        + &entry("a", "0.0.0.0:8887", "CP-1")
        + &entry("b", "0.0.0.0:8887", "CP-2");
    let e = load_from(&write(d.path(), &body), [])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("driver #2 (b): 0.0.0.0:8887 is where another ocpp driver listens"),
        "{e}"
    );
    let body = minimal(d.path())
        + &entry("a", "0.0.0.0:8887", "CP-1")
        + &entry("b", "0.0.0.0:8888", "CP-1");
    let e = load_from(&write(d.path(), &body), [])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("\"CP-1\" is a charge point of another ocpp driver"),
        "{e}"
    );
    let body =
        minimal(d.path()) + &entry("a", "0.0.0.0:8887", "CP-1").replace("16 }", "16, pin = 1 }");
    let e = load_from(&write(d.path(), &body), [])
        .unwrap_err()
        .to_string();
    assert!(e.contains("pin"), "{e}");

    // [[limits]] of a charge point's device: one unit, and within the charge point's own limit.
    let limits = |keys: &str| {
        minimal(d.path())
            + &entry("a", "0.0.0.0:8887", "CP-1")
            + &format!("[[limits]]\ndevice_id = \"ocpp-CP-1\"\ndevice_type = \"charger\"\n{keys}")
    };
    let refused = |keys: &str| {
        load_from(&write(d.path(), &limits(keys)), [])
            .unwrap_err()
            .to_string()
    };
    let e = refused("max_current_a = 16\nmax_power_w = 7400\n");
    assert!(
        e.contains("limits #1 (ocpp-CP-1): an OCPP charger takes a limit in amperes or in watts"),
        "{e}"
    );
    let e = refused("max_current_a = 20\n");
    assert!(
        e.contains(
            "limits #1 (ocpp-CP-1): max_current_a (20) is above the charge point's own \
             max_current_a (16)"
        ),
        "{e}"
    );
    assert!(load_from(&write(d.path(), &limits("max_current_a = 10\n")), []).is_ok());

    // Connector 2 of "A" and connector 1 of "A-2" would both be the device ocpp-A-2.
    let body = minimal(d.path())
        + &entry("a", "0.0.0.0:8887", "A").replace("16 }", "16, connectors = 2 }")
        + &entry("b", "0.0.0.0:8888", "A-2");
    let e = load_from(&write(d.path(), &body), [])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("driver #2 (b): ocpp-A-2, the device of \"A-2\"'s connector 1, is another charge point's device"),
        "{e}"
    );
}

#[test]
fn report_by_exception_loads_camel_case_members_and_whole_numbers() {
    let d = tempfile::tempdir().unwrap();
    let body = format!(
        "{}[telemetry]\nreport = \"on-change\"\nheartbeat_secs = 120\n\
         [telemetry.deadbands.battery]\nchargeRate = 25\nchargePercentage = 0.25\n\
         [telemetry.device_deadbands.\"pv-1\"]\npower = 10.5\n",
        minimal(d.path())
    );
    let s = load_from(&write(d.path(), &body), []).unwrap();
    assert_eq!(
        s.telemetry.report,
        crate::telemetry::settings::ReportMode::OnChange
    );
    assert_eq!(s.telemetry.heartbeat_secs, 120);
    assert_eq!(s.telemetry.deadbands["battery"]["chargeRate"], 25.0);
    assert_eq!(s.telemetry.deadbands["battery"]["chargePercentage"], 0.25);
    assert_eq!(s.telemetry.device_deadbands["pv-1"]["power"], 10.5);
    // Every sample is a point unless the installer asks otherwise.
    let s = load_from(&write(d.path(), &minimal(d.path())), []).unwrap();
    assert_eq!(
        s.telemetry.report,
        crate::telemetry::settings::ReportMode::EverySample
    );
}

#[test]
fn bad_reporting_settings_are_refused_at_load_naming_them() {
    let d = tempfile::tempdir().unwrap();
    let refused = |telemetry: &str| {
        let body = format!("{}[telemetry]\n{telemetry}", minimal(d.path()));
        load_from(&write(d.path(), &body), [])
            .unwrap_err()
            .to_string()
    };
    let e = refused("[telemetry.deadbands.battery]\nchargeRate = -5\n");
    assert!(
        e.contains("telemetry.deadbands")
            && e.contains("battery.chargeRate: expected a number of 0 or more, found -5"),
        "{e}"
    );
    let e = refused("[telemetry.deadbands.boiler]\npower = 5\n");
    assert!(e.contains("unknown device type \"boiler\""), "{e}");
    let e = refused("[telemetry.deadbands.inverter]\nchargeRate = 5\n");
    assert!(
        e.contains("inverter.chargeRate: not a numeric member of type inverter; expected one of power, gridPower"),
        "{e}"
    );
    let e = refused("[telemetry.device_deadbands.\"bat-1\"]\nchargingState = 1\n");
    assert!(
        e.contains("telemetry.device_deadbands")
            && e.contains("\"bat-1\".chargingState: not a numeric member"),
        "{e}"
    );
    let e = refused("report = \"sometimes\"\n");
    assert!(e.contains("sometimes") && e.contains("on-change"), "{e}");
    let e = refused("encoding = \"cbor\"\n");
    assert!(
        e.contains("telemetry.encoding")
            && e.contains("expected \"json\" or \"compact\", found \"cbor\""),
        "{e}"
    );
    let e = refused("compression = \"zstd\"\n");
    assert!(
        e.contains("telemetry.compression")
            && e.contains("expected \"deflate\" or \"none\", found \"zstd\""),
        "{e}"
    );
    let e = refused("monthly_budget_bytes = 100\n");
    assert!(e.contains("expected at least 1024 bytes, found 100"), "{e}");
    let e = refused("heartbeat_secs = 0\n");
    assert!(
        e.contains("`telemetry.heartbeat_secs`") && e.contains("expected 1..=86400, found 0"),
        "{e}"
    );
}
