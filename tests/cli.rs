//! The command line: `check-config` rejects each kind of bad configuration with a precise
//! message, and `version`/`status` work without a daemon.

use std::path::Path;

use kit::{agent_command, AgentConfig, Pki};
use texture_agent::model::clock::system_secs;
use texture_agent_testkit as kit;

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

fn write(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// Runs `check-config` and returns (success, stderr).
fn check(config: &Path) -> (bool, String) {
    let out = agent_command(BIN, config, &["check-config"]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn valid_config(pki: &Pki) -> std::path::PathBuf {
    AgentConfig::new(pki, 8883, "gw-cli").write(pki.path())
}

#[test]
fn check_config_accepts_valid_file_and_redacts_the_key_path() {
    let pki = Pki::new();
    let config = valid_config(&pki);
    let out = agent_command(BIN, &config, &["check-config"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("id = \"gw-cli\""), "{stdout}");
    assert!(
        stdout.contains("client_key_file = \"<redacted>\""),
        "{stdout}"
    );
    assert!(!stdout.contains(".key"), "key path leaked: {stdout}");
}

#[test]
fn check_config_rejects_missing_file() {
    let d = tempfile::tempdir().unwrap();
    let (ok, err) = check(&d.path().join("absent.toml"));
    assert!(!ok);
    assert!(
        err.contains("absent.toml") && err.contains("not found"),
        "{err}"
    );
}

#[test]
fn check_config_rejects_bad_toml_with_line_number() {
    let d = tempfile::tempdir().unwrap();
    let p = write(d.path(), "bad.toml", "[device]\nid = \"gw\"\n[broker\n");
    let (ok, err) = check(&p);
    assert!(!ok);
    assert!(err.contains("bad.toml") && err.contains("line 3"), "{err}");
}

#[test]
fn check_config_rejects_unknown_key_naming_it() {
    let pki = Pki::new();
    let body = std::fs::read_to_string(valid_config(&pki)).unwrap();
    let p = write(
        pki.path(),
        "typo.toml",
        &body.replace("[broker]\n", "[broker]\nca_fle = \"x\"\n"),
    );
    let (ok, err) = check(&p);
    assert!(!ok);
    assert!(
        err.contains("broker.ca_fle") && err.contains("typo.toml"),
        "{err}"
    );
}

#[test]
fn check_config_rejects_wrong_type_naming_key_and_expectation() {
    let pki = Pki::new();
    let body = std::fs::read_to_string(valid_config(&pki)).unwrap();
    let p = write(
        pki.path(),
        "type.toml",
        &body.replace("port = 8883", "port = \"eighty\""),
    );
    let (ok, err) = check(&p);
    assert!(!ok);
    assert!(
        err.contains("broker.port") && err.contains("expected an integer"),
        "{err}"
    );
}

#[test]
fn check_config_rejects_missing_ca_file() {
    let pki = Pki::new();
    let mut cfg = AgentConfig::new(&pki, 8883, "gw-cli");
    cfg.ca_file = pki.path().join("no-such-ca.pem");
    let (ok, err) = check(&cfg.write(pki.path()));
    assert!(!ok);
    assert!(
        err.contains("broker.ca_file") && err.contains("no-such-ca.pem"),
        "{err}"
    );
}

#[test]
fn check_config_rejects_ca_file_without_certificates() {
    let pki = Pki::new();
    let mut cfg = AgentConfig::new(&pki, 8883, "gw-cli");
    cfg.ca_file = write(pki.path(), "empty-ca.pem", "not a certificate\n");
    let (ok, err) = check(&cfg.write(pki.path()));
    assert!(!ok);
    assert!(
        err.contains("broker.ca_file") && err.contains("no PEM certificates"),
        "{err}"
    );
}

#[test]
fn environment_override_is_validated_too() {
    let pki = Pki::new();
    let out = kit::agent_process(BIN)
        .arg("--config")
        .arg(valid_config(&pki))
        .arg("check-config")
        .env("TEXTURE_AGENT__BROKER__BACKOFF_MIN_MS", "5")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("broker.backoff_min_ms"), "{err}");
}

#[test]
fn version_prints_the_crate_version() {
    let out = agent_command(BIN, Path::new("/nonexistent"), &["version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("texture-agent {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn status_without_a_daemon_says_not_running() {
    let pki = Pki::new();
    let out = agent_command(BIN, &valid_config(&pki), &["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        stdout.contains("gw-cli") && stdout.contains("not running"),
        "{stdout}"
    );
}

/// A damaged stored bundle is not in force, and `status` says so and why, with the version that
/// a new bundle must still beat (docs/PROTOCOL.md 6.4).
#[test]
fn status_names_a_damaged_trust_bundle_and_the_version_to_beat() {
    use texture_agent::inbound::auth::trust::{TrustStore, BUNDLE_FILE};
    use texture_agent::sim::platform::PlatformSigner;
    let pki = Pki::new();
    let signer = PlatformSigner::generate("k1");
    let mut cfg = AgentConfig::new(&pki, 8883, "gw-cli");
    cfg.trust_root = Some(signer.root_public_key());
    let config = cfg.write(pki.path());
    let state = cfg.state_dir(pki.path());
    std::fs::create_dir_all(&state).unwrap();
    let root = texture_agent::inbound::auth::jws::public_key_from_base64(&signer.root_public_key())
        .unwrap();
    let now = system_secs();
    TrustStore::open(root, &signer.issuer, &state)
        .offer(
            signer.trust_bundle(4, now, now + 3_600, &[]).as_bytes(),
            now,
        )
        .unwrap();
    std::fs::write(state.join(BUNDLE_FILE), "garbage").unwrap();

    let out = agent_command(BIN, &config, &["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "trust:       no bundle in force (highest accepted version 4): \
             stored trust bundle does not verify"
        ),
        "{stdout}"
    );
}

/// `status` shows the installer's limits in force, one device per line, and says when there are
/// none (README, "Safety envelope").
#[test]
fn status_shows_the_installers_limits() {
    let pki = Pki::new();
    let out = agent_command(BIN, &valid_config(&pki), &["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("limits:      none (devices are bounded only by the command set's ranges)"),
        "{stdout}"
    );

    let mut cfg = AgentConfig::new(&pki, 8883, "gw-cli");
    cfg.extra_toml = "[[drivers]]\nkind = \"simulated\"\ndevice_id = \"bat-1\"\ndevice_type = \"battery\"\n\n\
        [[drivers]]\nkind = \"simulated\"\ndevice_id = \"car-1\"\ndevice_type = \"vehicle\"\n\n\
        [[limits]]\ndevice_id = \"bat-1\"\ndevice_type = \"battery\"\nmin_backup_reserve = 20\n\n\
        [[limits]]\ndevice_id = \"car-1\"\ndevice_type = \"vehicle\"\nmin_charge_limit = 50\nmax_charge_limit = 90\n"
        .into();
    let out = agent_command(BIN, &cfg.write(pki.path()), &["status"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(
            "limits:      bat-1 (battery): min_backup_reserve 20 % [installer]\n             \
             car-1 (vehicle): min_charge_limit 50 %, max_charge_limit 90 % [installer]\n"
        ),
        "{stdout}"
    );
}

/// `discover` needs no configuration. A bad argument is named and exits 2; an endpoint where
/// nothing listens exits 1 saying so, for every form of `--tcp`.
#[test]
fn discover_names_a_bad_argument_and_an_endpoint_that_does_not_answer() {
    let missing = Path::new("/nonexistent/agent.toml");
    let run = |args: &[&str]| {
        let mut all = vec!["discover"];
        all.extend_from_slice(args);
        let out = agent_command(BIN, missing, &all);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, _, err) = run(&["--tcp", "127.0.0.1:1", "--units", "3-1"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--units 3-1: \"3-1\" runs backwards"), "{err}");
    let (code, _, err) = run(&["--tcp", "127.0.0.1:1", "--timeout-ms", "0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--timeout-ms 0: must be from 1 to 60000"),
        "{err}"
    );
    let (code, _, err) = run(&["--tcp", "no such host!"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("--tcp \"no such host!\": expected HOST or HOST:PORT"),
        "{err}"
    );
    let (code, _, err) = run(&["--tcp", "fd00::5"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("write an IPv6 address as [ADDRESS]:PORT"),
        "{err}"
    );
    // A name that does not resolve is the link's failure (exit 1), said for the unit tried.
    let (code, out, err) = run(&["--tcp", "gateway.invalid"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains(
            "unit 1 at gateway.invalid:502: nothing: gateway.invalid:502 does not resolve"
        ),
        "{out}"
    );
    assert!(
        err.contains("no SunSpec device answered at gateway.invalid:502"),
        "{err}"
    );

    let port = kit::free_port();
    let (code, out, err) = run(&["--tcp", &format!("127.0.0.1:{port}"), "--units", "1-5"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains(&format!(
            "unit 1 at 127.0.0.1:{port}: nothing: cannot connect"
        )),
        "{out}"
    );
    // A link that refuses the first unit is not asked for the other four.
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        err.contains(&format!("no SunSpec device answered at 127.0.0.1:{port}")),
        "{err}"
    );
}
