//! `texture-agent demo` end to end: the simulated platform, a real agent process, pairing and
//! the full tour, checked through its exit code and its results table.

mod common;

#[test]
fn demo_runs_every_step_and_exits_zero() {
    let out = common::agent_process()
        .arg("demo")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("INVOCATION_ID")
        .env_remove("JOURNAL_STREAM")
        .output()
        .expect("run texture-agent demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    for step in [
        "server key: battery:set-reserve 35",
        "owner's scoped key: thermostat:set-fan-mode",
        "another user's scoped key (on MQTT)",
        "connect key (API, then signed on MQTT)",
        "revoked server key (new trust bundle)",
        "forged signature (on MQTT)",
        "replayed command",
        "live telemetry (GET /v1/devices)",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(step))
            .unwrap_or_else(|| panic!("no row for {step:?}:\n{stdout}"));
        assert!(line.trim_end().ends_with(" ok"), "{line}");
    }
    assert!(!stdout.contains("FAILED"));
    assert!(stdout.contains("demo: every step behaved as expected"));
    // Not a terminal: plain text, no colour codes.
    assert!(!stdout.contains('\x1b'), "escape codes in non-TTY output");
}
