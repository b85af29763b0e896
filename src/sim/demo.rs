//! `texture-agent demo`: the whole key model, end to end, in one command.
//!
//! Starts the simulated platform and a real agent (this same binary in `run` mode, with a
//! generated configuration in a temporary directory), pairs them through the Connect flow, then
//! walks through every kind of key and attack and prints a table. It exits 0 only if every step
//! behaved as expected. Attestations for the wrong keys are published straight onto the
//! device's topic, so what the table shows is the *device* refusing, not the simulator.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::http::request;
use super::{Simulator, WORKSPACE};
use crate::sim::platform::{ApiKey, AttestedCommand, PlatformSigner};

const GATEWAY: &str = "gw-demo";
const BATTERY: &str = "battery-1";
const THERMOSTAT: &str = "thermostat-1";
const WAIT: Duration = Duration::from_secs(30);

/// Progress lines: marked up on a terminal, plain otherwise.
struct Narrator {
    tty: bool,
}

impl Narrator {
    fn step(&self, text: &str) {
        if self.tty {
            println!("\x1b[1m==>\x1b[0m {text}");
        } else {
            println!("==> {text}");
        }
        let _ = std::io::stdout().flush();
    }
    fn note(&self, text: &str) {
        println!("    {text}");
    }
}

struct Row {
    step: &'static str,
    expected: &'static str,
    observed: String,
    ok: bool,
}

/// The agent child process, stopped gracefully when dropped.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(6);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> anyhow::Result<T> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn write_config(sim: &Simulator, dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    let device = sim.ca.client(GATEWAY);
    let root = sim.state.lock().expect("state").signer.root_public_key();
    let text = format!(
        r#"[device]
id = "{GATEWAY}"
workspace_id = "{WORKSPACE}"

[broker]
host = "127.0.0.1"
port = {port}
tls_server_name = "localhost"
ca_file = "{ca}"
client_cert_file = "{cert}"
client_key_file = "{key}"
backoff_min_ms = 200
backoff_max_ms = 2000

[trust]
root_public_key = "{root}"

[telemetry]
batch_max_ms = 500

[state]
dir = "{state}"
runtime_dir = "{run}"

[log]
format = "json"

[[drivers]]
kind = "simulated"
device_id = "{BATTERY}"
device_type = "battery"
interval_ms = 1000
seed = 1

[[drivers]]
kind = "simulated"
device_id = "{THERMOSTAT}"
device_type = "thermostat"
interval_ms = 1000
seed = 2
"#,
        port = sim.broker_port,
        ca = sim.ca.cert_path().display(),
        cert = device.cert.display(),
        key = device.key.display(),
        state = dir.join("state").display(),
        run = dir.join("run").display(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Publishes `token` on the gateway's command topic and waits for the reply with `command_id`
/// (or, for `None`, the next reply with a null command id).
async fn inject_and_wait(
    sim: &Simulator,
    token: &str,
    command_id: Option<&str>,
) -> anyhow::Result<Value> {
    let seen_before = sim.state.lock().expect("state").replies.len();
    sim.inject(GATEWAY, token).await?;
    wait_for("the device's reply", || {
        let s = sim.state.lock().expect("state");
        s.replies[seen_before.min(s.replies.len())..]
            .iter()
            .find(|r| match command_id {
                Some(id) => r["commandId"] == id,
                None => r["commandId"].is_null(),
            })
            .cloned()
    })
    .await
}

/// Sends a command through the API and waits until the platform has its outcome.
async fn api_command(
    sim: &Simulator,
    key: &str,
    device: &str,
    slug: &str,
    input: Value,
) -> anyhow::Result<Value> {
    let (kind, action) = slug.split_once(':').context("slug")?;
    let (status, created) = request(
        sim.api_addr,
        "POST",
        &format!("/v1/commands/{kind}/{action}"),
        Some(key),
        Some(&json!({ "deviceId": device, "input": input })),
    )
    .await?;
    if status != 201 {
        return Ok(json!({ "httpStatus": status, "body": created }));
    }
    let id = created["id"].as_str().context("command id")?.to_owned();
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, c) = request(
            sim.api_addr,
            "GET",
            &format!("/v1/commands/{id}"),
            Some(key),
            None,
        )
        .await?;
        if c["status"] != "pending" || Instant::now() > deadline {
            return Ok(c);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn signed(
    sim: &Simulator,
    key: &ApiKey,
    id: &str,
    device: &str,
    slug: &str,
    input: Value,
) -> String {
    let s = sim.state.lock().expect("state");
    let claims = s.signer.claims(
        key,
        AttestedCommand::new(GATEWAY, id, slug, input).for_device(device),
        crate::model::clock::system_secs(),
        300,
    );
    s.signer.attest(&claims)
}

fn refused(reply: &Value, status: u64) -> bool {
    reply["type"] == "command.refused" && reply["status"] == status
}

/// Runs the demo. Returns whether every step behaved as expected.
pub async fn run(keep_running: bool) -> anyhow::Result<bool> {
    let say = Narrator {
        tty: std::io::stdout().is_terminal(),
    };
    let dir = tempfile::Builder::new().prefix("texture-demo-").tempdir()?;
    say.step("starting the simulated platform (MQTT broker with TLS, HTTP API, signing keys)");
    let sim = Simulator::start(dir.path()).await?;
    say.note(&format!(
        "broker  127.0.0.1:{} (TLS, ephemeral CA)",
        sim.broker_port
    ));
    say.note(&format!("API     http://{}", sim.api_addr));
    say.note(&format!("server key   {}", sim.server_key.key));
    say.note(&format!("connect key  {}", sim.connect_key.key));

    say.step(&format!(
        "starting texture-agent as gateway {GATEWAY} with a simulated battery and thermostat"
    ));
    let config = write_config(&sim, dir.path())?;
    let exe = std::env::current_exe()?;
    let log = std::fs::File::create(dir.path().join("agent.log"))?;
    let _agent = AgentProcess(
        Command::new(&exe)
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(log)
            .env_remove("NOTIFY_SOCKET")
            .spawn()
            .context("starting the agent")?,
    );
    wait_for("the gateway to come online with its devices", || {
        let s = sim.state.lock().expect("state");
        (s.online.get(GATEWAY) == Some(&true)
            && [BATTERY, THERMOSTAT].iter().all(|d| {
                s.devices
                    .get(*d)
                    .is_some_and(|d| !d.available_commands.is_empty())
            }))
        .then_some(())
    })
    .await?;
    say.note("gateway online; devices advertised their commands");

    say.step("pairing through the Connect flow (connect key → link → code entered → scoped key)");
    let (_, alice_link) = request(
        sim.api_addr,
        "POST",
        "/v1/connections",
        Some(&sim.connect_key.key),
        Some(&json!({ "redirectUrl": "https://app.example/done", "referenceId": "user-alice" })),
    )
    .await?;
    let mut pair = Command::new(&exe)
        .arg("--config")
        .arg(&config)
        .arg("pair")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(pair.stdout.take().context("pair output")?).lines();
    let code = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            let t = l.trim();
            (l.starts_with("    ") && t.len() == 14 && t.as_bytes()[4] == b'-')
                .then(|| t.to_owned())
        })
        .context("texture-agent pair printed no code")?;
    say.note(&format!(
        "the gateway shows code {code}; the user types it on the Connect page"
    ));
    wait_for("the gateway's pairing request", || {
        sim.state
            .lock()
            .expect("state")
            .pairing_requests
            .contains_key(GATEWAY)
            .then_some(())
    })
    .await?;
    let link_id = alice_link["id"].as_str().context("connection id")?;
    let (status, done) = request(
        sim.api_addr,
        "POST",
        &format!("/v1/connections/{link_id}/complete"),
        None,
        Some(&json!({ "pairingCode": code })),
    )
    .await?;
    if status != 200 {
        bail!("Connect completion failed: {status} {done}");
    }
    let alice = done["scopedKey"].as_str().context("scoped key")?.to_owned();
    say.note(&format!(
        "redirect: {}",
        done["redirect"].as_str().unwrap_or("")
    ));
    let paired = tokio::task::spawn_blocking(move || {
        let rest: Vec<String> = lines.map_while(Result::ok).collect();
        (pair.wait().map(|s| s.success()).unwrap_or(false), rest)
    })
    .await?;
    if !paired.0 {
        bail!("texture-agent pair did not complete: {:?}", paired.1);
    }
    say.note("gateway paired to user-alice");
    // Another end user of the same customer, with a scoped key but not this gateway.
    let (_, bob_link) = request(
        sim.api_addr,
        "POST",
        "/v1/connections",
        Some(&sim.connect_key.key),
        Some(&json!({ "redirectUrl": "https://app.example/done", "referenceId": "user-bob" })),
    )
    .await?;
    let (_, bob) = request(
        sim.api_addr,
        "POST",
        &format!(
            "/v1/connections/{}/complete",
            bob_link["id"].as_str().unwrap_or("")
        ),
        None,
        None,
    )
    .await?;
    let bob_key = {
        let s = sim.state.lock().expect("state");
        let record = s
            .key(bob["scopedKey"].as_str().unwrap_or(""))
            .context("bob's key")?
            .clone();
        s.api_key(&record)
    };

    say.step("the tour");
    let mut rows = Vec::new();

    let r = api_command(
        &sim,
        &sim.server_key.key,
        BATTERY,
        "battery:set-reserve",
        json!({"chargePercentage": 35}),
    )
    .await?;
    rows.push(Row {
        step: "server key: battery:set-reserve 35",
        expected: "success",
        observed: r["status"].as_str().unwrap_or("?").to_string(),
        ok: r["status"] == "success",
    });

    let r = api_command(
        &sim,
        &alice,
        THERMOSTAT,
        "thermostat:set-fan-mode",
        json!({"fanMode": "on"}),
    )
    .await?;
    rows.push(Row {
        step: "owner's scoped key: thermostat:set-fan-mode",
        expected: "success",
        observed: r["status"].as_str().unwrap_or("?").to_string(),
        ok: r["status"] == "success",
    });

    let token = signed(
        &sim,
        &bob_key,
        "cmd_demo_bob",
        BATTERY,
        "battery:set-reserve",
        json!({"chargePercentage": 5}),
    );
    let r = inject_and_wait(&sim, &token, Some("cmd_demo_bob")).await?;
    rows.push(Row {
        step: "another user's scoped key (on MQTT)",
        expected: "403 from the device",
        observed: format!("{} {}", r["status"], r["code"].as_str().unwrap_or("")),
        ok: refused(&r, 403),
    });

    let (api_status, _) = request(
        sim.api_addr,
        "POST",
        "/v1/commands/battery/set-reserve",
        Some(&sim.connect_key.key),
        Some(&json!({"deviceId": BATTERY, "input": {"chargePercentage": 5}})),
    )
    .await?;
    let connect = ApiKey::connect(&sim.connect_key.id, WORKSPACE);
    let token = signed(
        &sim,
        &connect,
        "cmd_demo_connect",
        BATTERY,
        "battery:set-reserve",
        json!({"chargePercentage": 5}),
    );
    let r = inject_and_wait(&sim, &token, Some("cmd_demo_connect")).await?;
    rows.push(Row {
        step: "connect key (API, then signed on MQTT)",
        expected: "403 at the API and 403 from the device",
        observed: format!(
            "API {api_status}, device {} {}",
            r["status"],
            r["code"].as_str().unwrap_or("")
        ),
        ok: api_status == 403 && refused(&r, 403),
    });

    let (_, new_key) = request(
        sim.api_addr,
        "POST",
        "/v1/api-keys",
        Some(&sim.server_key.key),
        Some(&json!({"name": "leaked", "type": "SERVER"})),
    )
    .await?;
    let leaked_id = new_key["id"].as_str().context("new key id")?.to_owned();
    let (revoke_status, _) = request(
        sim.api_addr,
        "DELETE",
        &format!("/v1/api-keys/{leaked_id}"),
        Some(&sim.server_key.key),
        None,
    )
    .await?;
    let leaked = ApiKey::server(&leaked_id, WORKSPACE);
    let token = signed(
        &sim,
        &leaked,
        "cmd_demo_revoked",
        BATTERY,
        "battery:set-reserve",
        json!({"chargePercentage": 5}),
    );
    let r = inject_and_wait(&sim, &token, Some("cmd_demo_revoked")).await?;
    rows.push(Row {
        step: "revoked server key (new trust bundle)",
        expected: "refused by the device",
        observed: format!(
            "revoke {revoke_status}, device {} {}",
            r["status"],
            r["code"].as_str().unwrap_or("")
        ),
        ok: revoke_status == 200 && refused(&r, 403),
    });

    let forger = PlatformSigner::generate("platform-1");
    let server = ApiKey::server(&sim.server_key.id, WORKSPACE);
    let forged = forger.attest(
        &forger.claims(
            &server,
            AttestedCommand::new(
                GATEWAY,
                "cmd_demo_forged",
                "battery:set-reserve",
                json!({"chargePercentage": 1}),
            )
            .for_device(BATTERY),
            crate::model::clock::system_secs(),
            300,
        ),
    );
    let r = inject_and_wait(&sim, &forged, None).await?;
    rows.push(Row {
        step: "forged signature (on MQTT)",
        expected: "401 from the device",
        observed: format!("{} {}", r["status"], r["code"].as_str().unwrap_or("")),
        ok: refused(&r, 401),
    });

    let token = signed(
        &sim,
        &server,
        "cmd_demo_replay",
        BATTERY,
        "battery:set-reserve",
        json!({"chargePercentage": 40}),
    );
    let first = inject_and_wait(&sim, &token, Some("cmd_demo_replay")).await?;
    let again = inject_and_wait(&sim, &token, Some("cmd_demo_replay")).await?;
    let runs = std::fs::read_to_string(dir.path().join("agent.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("\"command_id\":\"cmd_demo_replay\"")
                && l.contains("\"decision\":\"allowed\"")
        })
        .count();
    rows.push(Row {
        step: "replayed command",
        expected: "same reply, executed once",
        observed: format!(
            "{} then {}, executed {runs}x",
            first["type"].as_str().unwrap_or("?"),
            again["type"].as_str().unwrap_or("?")
        ),
        ok: first["type"] == "command.succeeded" && first == again && runs == 1,
    });

    let observed = wait_for("telemetry showing the new reserve", || {
        let s = sim.state.lock().expect("state");
        let reserve = s.devices.get(BATTERY)?.state.as_ref()?["backupReserve"].as_f64()?;
        (reserve == 40.0).then_some(reserve)
    })
    .await;
    let (_, device) = request(
        sim.api_addr,
        "GET",
        &format!("/v1/devices/{BATTERY}"),
        Some(&sim.server_key.key),
        None,
    )
    .await?;
    rows.push(Row {
        step: "live telemetry (GET /v1/devices)",
        expected: "backupReserve 40",
        observed: format!(
            "backupReserve {}, charge {} Wh",
            device["state"]["backupReserve"], device["state"]["charge"]
        ),
        ok: observed.is_ok() && device["state"]["backupReserve"] == 40.0,
    });

    println!();
    println!(
        "{:<44} {:<40} {:<40} result",
        "step", "expected", "observed"
    );
    for r in &rows {
        let mark = match (r.ok, say.tty) {
            (true, true) => "\x1b[32mok\x1b[0m",
            (false, true) => "\x1b[31mFAILED\x1b[0m",
            (true, false) => "ok",
            (false, false) => "FAILED",
        };
        println!(
            "{:<44} {:<40} {:<40} {mark}",
            r.step, r.expected, r.observed
        );
    }
    let all_ok = rows.iter().all(|r| r.ok);
    println!();
    println!(
        "{}",
        if all_ok {
            "demo: every step behaved as expected"
        } else {
            "demo: some steps did NOT behave as expected"
        }
    );

    if keep_running {
        let api = sim.api_addr;
        let key = &sim.server_key.key;
        println!("\nEverything stays up. Try the API (Ctrl-C to stop):\n");
        println!("  curl -s -X POST http://{api}/v1/commands/battery/set-reserve \\");
        println!("       -H 'Texture-Api-Key: {key}' -H 'Content-Type: application/json' \\");
        println!(
            "       -d '{{\"deviceId\":\"{BATTERY}\",\"input\":{{\"chargePercentage\":50}}}}'"
        );
        println!("  curl -s http://{api}/v1/commands/<id> -H 'Texture-Api-Key: {key}'");
        println!("  curl -s http://{api}/v1/devices/{BATTERY} -H 'Texture-Api-Key: {key}'");
        println!(
            "  curl -s -X POST http://{api}/v1/connections -H 'Texture-Api-Key: {}' \\",
            sim.connect_key.key
        );
        println!("       -H 'Content-Type: application/json' -d '{{\"redirectUrl\":\"https://app.example/done\"}}'");
        println!("\nAgent log: {}", dir.path().join("agent.log").display());
        let _ = crate::agent::service::termination_signal().await;
    }
    Ok(all_ok)
}
