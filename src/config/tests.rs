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
