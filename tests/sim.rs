//! The simulated platform: its HTTP API called for each key kind and each error code, and
//! `texture-agent demo` end to end (the simulator, a real agent process, pairing, the tour).

use serde_json::json;

use texture_agent::sim::http::request;
use texture_agent::sim::Simulator;
use texture_agent_testkit as kit;

/// The agent binary cargo built for these tests.
const BIN: &str = env!("CARGO_BIN_EXE_texture-agent");

// ---------------------------------------------------------------------------------------------
// The simulated platform's HTTP API, called over HTTP for each key kind and each error code.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_each_key_kind_with_the_platforms_error_shape() {
    let dir = tempfile::tempdir().unwrap();
    let sim = Simulator::start(dir.path()).await.unwrap();
    let api = sim.api_addr;
    let server = sim.server_key.key.clone();
    let connect = sim.connect_key.key.clone();
    let cmd = json!({"deviceId": "battery-1", "input": {"chargePercentage": 10}});

    // 401: missing or unknown key.
    let (status, body) = request(
        api,
        "POST",
        "/v1/commands/battery/set-reserve",
        None,
        Some(&cmd),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHENTICATED")),
        "{body}"
    );
    assert!(body["message"].is_string());
    let (status, _) = request(api, "GET", "/v1/devices/x", Some("api_nope"), None)
        .await
        .unwrap();
    assert_eq!(status, 401);

    // 403: a connect key cannot command or read devices; a server key cannot make Connect links.
    let (status, body) = request(
        api,
        "POST",
        "/v1/commands/battery/set-reserve",
        Some(&connect),
        Some(&cmd),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("FORBIDDEN")),
        "{body}"
    );
    let (status, _) = request(api, "GET", "/v1/devices/battery-1", Some(&connect), None)
        .await
        .unwrap();
    assert_eq!(status, 403);
    let link = json!({"redirectUrl": "https://app.example/done"});
    let (status, _) = request(api, "POST", "/v1/connections", Some(&server), Some(&link))
        .await
        .unwrap();
    assert_eq!(status, 403);

    // 400: validation, naming the field.
    let (status, body) = request(
        api,
        "POST",
        "/v1/connections",
        Some(&connect),
        Some(&json!({})),
    )
    .await
    .unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("VALIDATION_ERROR"))
    );
    assert!(body["message"].as_str().unwrap().contains("redirectUrl"));
    let (status, body) = request(
        api,
        "POST",
        "/v1/commands/battery/set-reserve",
        Some(&server),
        Some(&json!({"input": {}})),
    )
    .await
    .unwrap();
    assert_eq!(status, 400);
    assert!(body["message"].as_str().unwrap().contains("deviceId"));
    let (status, _) = request(
        api,
        "POST",
        "/v1/api-keys",
        Some(&server),
        Some(&json!({"type": "ROOT"})),
    )
    .await
    .unwrap();
    assert_eq!(status, 400);

    // 404: unknown device or command.
    let (status, body) = request(api, "GET", "/v1/devices/battery-9", Some(&server), None)
        .await
        .unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("DEVICE_NOT_FOUND"))
    );
    let (status, _) = request(api, "GET", "/v1/commands/cmd_none", Some(&server), None)
        .await
        .unwrap();
    assert_eq!(status, 404);

    // Connect flow: a connect key makes a link; completing it "redirects" with a scoped key.
    let (status, made) = request(
        api,
        "POST",
        "/v1/connections",
        Some(&connect),
        Some(&json!({"redirectUrl": "https://app.example/done", "referenceId": "user-1"})),
    )
    .await
    .unwrap();
    assert_eq!(status, 201, "{made}");
    let (status, done) = request(
        api,
        "POST",
        &format!("/v1/connections/{}/complete", made["id"].as_str().unwrap()),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let scoped = done["scopedKey"].as_str().unwrap();
    assert!(scoped.starts_with("scoped_"));
    assert!(done["redirect"]
        .as_str()
        .unwrap()
        .ends_with(&format!("texture_scoped_key={scoped}")));
    // A scoped key may not manage keys.
    let (status, _) = request(
        api,
        "POST",
        "/v1/api-keys",
        Some(scoped),
        Some(&json!({"type": "SERVER"})),
    )
    .await
    .unwrap();
    assert_eq!(status, 403);

    // Key management: a new server key works until revoked; revoking publishes a new bundle.
    let (status, key) = request(
        api,
        "POST",
        "/v1/api-keys",
        Some(&server),
        Some(&json!({"name": "ci", "type": "SERVER"})),
    )
    .await
    .unwrap();
    assert_eq!(status, 201);
    let before = sim.state.lock().unwrap().bundle_version;
    let (status, _) = request(
        api,
        "DELETE",
        &format!("/v1/api-keys/{}", key["id"].as_str().unwrap()),
        Some(&server),
        None,
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    assert_eq!(sim.state.lock().unwrap().bundle_version, before + 1);
    let (status, body) = request(
        api,
        "GET",
        "/v1/devices/battery-1",
        Some(key["key"].as_str().unwrap()),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (401, Some("UNAUTHENTICATED"))
    );
}

// ---------------------------------------------------------------------------------------------
// `texture-agent demo` end to end: the simulated platform, a real agent process, pairing and
// the full tour, checked through its exit code and its results table.

#[test]
fn demo_runs_every_step_and_exits_zero() {
    let out = kit::agent_process(BIN)
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
        "server key: reserve 5 % (installer min 10)",
        "server key: reserve 60 % for holdSecs 3",
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
