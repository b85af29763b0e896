//! Pairing end to end over mosquitto with TLS: `texture-agent pair` shows a code, the platform
//! (a peer here) checks the typed code against the device's commitment and answers with a signed
//! owner binding, and from then on exactly the owner's scoped keys run commands.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use common::{device_topic, Agent, AgentConfig, Mosquitto, Peer, Pki};
use texture_agent::inbound::pairing::code::commitment;
use texture_agent::sim::platform::{ApiKey, PlatformSigner};

const WAIT: Duration = Duration::from_secs(15);
const DEVICE: &str = "gw-pair";
const WORKSPACE: &str = "ws-home";

fn now() -> u64 {
    common::unix_now()
}

struct Platform {
    signer: PlatformSigner,
    peer: Peer,
    next_id: u32,
}

impl Platform {
    /// Sends `slug` as `key` and returns the reply.
    async fn command(&mut self, key: &ApiKey, slug: &str) -> serde_json::Value {
        self.next_id += 1;
        let id = format!("cmd-{}", self.next_id);
        let claims = self
            .signer
            .claims(key, DEVICE, &id, slug, serde_json::json!({}), now(), 300);
        self.peer
            .publish(
                &device_topic(DEVICE, "commands"),
                self.signer.attest(&claims),
                false,
            )
            .await;
        self.peer
            .expect(&device_topic(DEVICE, "replies"), WAIT, |m| {
                m.json()["commandId"] == id.as_str()
            })
            .await
            .json()
    }

    async fn runs(&mut self, key: &ApiKey) -> bool {
        let r = self.command(key, "agent:ping").await;
        match r["type"].as_str() {
            Some("command.succeeded") => true,
            Some("command.refused") if r["status"] == 403 => false,
            _ => panic!("unexpected reply {r}"),
        }
    }

    /// Runs `texture-agent pair`, plays the Connect page for `owner`, and checks it completes.
    async fn pair(&mut self, config: &std::path::Path, owner: &str, version: u64) {
        let mut pair = common::agent_process()
            .arg("--config")
            .arg(config)
            .arg("pair")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(pair.stdout.take().unwrap()).lines();
        // The code is printed alone on an indented line: what the person would type.
        let code = lines
            .by_ref()
            .map(Result::unwrap)
            .find_map(|l| {
                let t = l.trim();
                (l.starts_with("    ") && t.len() == 14 && t.as_bytes()[4] == b'-')
                    .then(|| t.to_string())
            })
            .expect("pair printed a code");
        let request = self
            .peer
            .expect(&device_topic(DEVICE, "pairing/request"), WAIT, |_| true)
            .await
            .json();
        assert!(
            !request.to_string().contains(&code),
            "the code must not travel in clear"
        );
        assert!(request["publicKey"].as_str().unwrap().len() >= 43);
        // The platform's check: the typed code (lower case, as people type) matches the commitment.
        let typed = code.to_lowercase();
        let expected = commitment(DEVICE, &typed).unwrap();
        assert_eq!(request["codeCommitment"], expected.as_str());
        let binding =
            self.signer
                .owner_binding(DEVICE, WORKSPACE, owner, version, now(), &expected);
        self.peer
            .publish(&device_topic(DEVICE, "pairing/binding"), binding, false)
            .await;
        let rest: Vec<String> = lines.map(Result::unwrap).collect();
        let status = pair.wait().unwrap();
        assert!(status.success(), "pair failed: {rest:?}");
        assert!(
            rest.iter()
                .any(|l| l.contains(&format!("paired to {owner} (binding version {version})"))),
            "{rest:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_paired_owners_scoped_keys_run_through_repairing_and_unpairing() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki);
    let signer = PlatformSigner::generate("platform-1");
    let peer = common::platform_peer(
        &pki,
        broker.port,
        &signer,
        &[
            &device_topic(DEVICE, "replies"),
            &device_topic(DEVICE, "pairing/request"),
        ],
    )
    .await;
    let mut platform = Platform {
        signer,
        peer,
        next_id: 0,
    };

    let mut cfg = AgentConfig::new(&pki, broker.port, DEVICE);
    cfg.trust_root = Some(platform.signer.root_public_key());
    cfg.workspace_id = Some(WORKSPACE.into());
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(&config);
    agent.wait_for_log("trust bundle accepted", WAIT);

    let server = ApiKey::server("key-server", WORKSPACE);
    let alice = ApiKey::scoped("key-alice", WORKSPACE, "user-a");
    let bob = ApiKey::scoped("key-bob", WORKSPACE, "user-b");

    // 1. Unpaired: no scoped key runs.
    assert!(!platform.runs(&alice).await);

    // 2. Paired to A.
    platform.pair(&config, "user-a", 1).await;
    assert!(platform.runs(&alice).await);
    assert!(!platform.runs(&bob).await);

    // 3. The home is sold: re-paired to B with a higher version.
    platform.pair(&config, "user-b", 2).await;
    assert!(platform.runs(&bob).await);
    assert!(!platform.runs(&alice).await);

    // 4. Only a server key may unpair; afterwards no scoped key runs.
    let r = platform.command(&bob, "agent:unpair").await;
    assert_eq!(r["status"], 403, "{r}");
    let r = platform.command(&server, "agent:unpair").await;
    assert_eq!(r["type"], "command.succeeded", "{r}");
    assert!(!platform.runs(&alice).await);
    assert!(!platform.runs(&bob).await);
    assert!(platform.runs(&server).await);

    // status reports the unpaired state with the version kept.
    let out = common::agent_command(&config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("unpaired (binding version 2)"), "{text}");
    assert!(text.contains("bundle version 1"), "{text}");
}

/// A junk owner binding whose JWS header has an unknown member named with terminal escapes:
/// clear the screen, home the cursor, print a fake "paired to" line and a fake code. Anyone who
/// can publish on the device's `pairing/binding` topic can send it; the header is unverified.
fn junk_binding_with_escapes() -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let name =
        r"\u001b[2J\u001b[Hpaired to mallory (binding version 9)\n\n    AAAA-BBBB-CCCC\n\u009b32m";
    let header = format!(
        r#"{{"alg":"EdDSA","kid":"platform-1","typ":"texture-owner-binding+jws","{name}":1}}"#
    );
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(b"{}"),
        URL_SAFE_NO_PAD.encode([0u8; 64])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_output_never_carries_escapes_from_a_junk_binding() {
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki);
    let signer = PlatformSigner::generate("platform-1");
    let mut peer = common::platform_peer(
        &pki,
        broker.port,
        &signer,
        &[&device_topic(DEVICE, "pairing/request")],
    )
    .await;
    let mut cfg = AgentConfig::new(&pki, broker.port, DEVICE);
    cfg.trust_root = Some(signer.root_public_key());
    cfg.workspace_id = Some(WORKSPACE.into());
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(&config);
    agent.wait_for_log("trust bundle accepted", WAIT);

    let mut pair = common::agent_process()
        .arg("--config")
        .arg(&config)
        .arg("pair")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Everything `pair` writes, as bytes: an escape must not hide in a lossy conversion.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let stdout = pair.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        loop {
            let mut line = Vec::new();
            match std::io::BufRead::read_until(&mut reader, b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut output: Vec<Vec<u8>> = Vec::new();
    let next_line = |output: &mut Vec<Vec<u8>>| {
        let line = rx.recv_timeout(WAIT).expect("pair kept printing");
        output.push(line.clone());
        String::from_utf8_lossy(&line).into_owned()
    };
    let code = loop {
        let l = next_line(&mut output);
        let t = l.trim();
        if l.starts_with("    ") && t.len() == 14 && t.as_bytes()[4] == b'-' {
            break t.to_string();
        }
    };
    let request = peer
        .expect(&device_topic(DEVICE, "pairing/request"), WAIT, |_| true)
        .await
        .json();
    let binding_topic = device_topic(DEVICE, "pairing/binding");
    peer.publish(&binding_topic, junk_binding_with_escapes(), false)
        .await;
    // The refusal reached `pair` ...
    while !next_line(&mut output).contains("binding refused") {}
    // ... and the session goes on: the genuine binding still pairs.
    let commitment = commitment(DEVICE, &code).unwrap();
    assert_eq!(request["codeCommitment"], commitment.as_str());
    let binding = signer.owner_binding(DEVICE, WORKSPACE, "user-a", 1, now(), &commitment);
    peer.publish(&binding_topic, binding, false).await;
    while let Ok(line) = rx.recv_timeout(WAIT) {
        output.push(line);
    }
    let status = pair.wait().unwrap();
    let mut stderr = Vec::new();
    std::io::Read::read_to_end(&mut pair.stderr.take().unwrap(), &mut stderr).unwrap();
    let all: Vec<u8> = output.concat();
    let text = String::from_utf8_lossy(&all);
    assert!(
        status.success(),
        "pair failed:\n{text}\n{}",
        String::from_utf8_lossy(&stderr)
    );
    for (name, bytes) in [("stdout", &all), ("stderr", &stderr)] {
        assert!(
            !bytes.contains(&0x1b) && !String::from_utf8_lossy(bytes).contains('\u{9b}'),
            "an escape reached pair's {name}:\n{text:?}"
        );
    }
    let paired: Vec<&str> = text.lines().filter(|l| l.contains("paired to")).collect();
    assert_eq!(
        paired,
        ["paired to user-a (binding version 1)"],
        "a fake line reached pair's output:\n{text}"
    );
    // The agent's own log of the refusal does not carry it either.
    let refused = agent.logs_with_message("owner binding refused");
    assert!(!refused.is_empty(), "{}", agent.log_dump());
    for line in refused {
        let error = line["error"].as_str().unwrap_or_default();
        assert!(!error.chars().any(char::is_control), "{error:?}");
        assert!(!error.contains("mallory"), "{error:?}");
    }
}

/// A junk owner binding whose header carries an unknown member with a `len`-byte name.
fn junk_binding_of(len: usize) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let header = format!(
        r#"{{"alg":"EdDSA","kid":"platform-1","typ":"texture-owner-binding+jws","{}":1}}"#,
        "x".repeat(len)
    );
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(b"{}"),
        URL_SAFE_NO_PAD.encode([0u8; 64])
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_client_that_stops_reading_does_not_stop_commands() {
    use std::io::Write;
    let pki = Pki::new();
    let broker = Mosquitto::start(&pki);
    let signer = PlatformSigner::generate("platform-1");
    let replies = device_topic(DEVICE, "replies");
    let mut peer = common::platform_peer(&pki, broker.port, &signer, &[&replies]).await;
    let mut cfg = AgentConfig::new(&pki, broker.port, DEVICE);
    cfg.trust_root = Some(signer.root_public_key());
    cfg.workspace_id = Some(WORKSPACE.into());
    let config = cfg.write(pki.path());
    let agent = Agent::spawn(&config);
    agent.wait_for_log("trust bundle accepted", WAIT);

    // A local client asks for a pairing session, then never reads a byte of what it is sent.
    let socket = pki
        .path()
        .join(format!("run-{DEVICE}"))
        .join("control.sock");
    let mut stalled = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    stalled.write_all(b"{\"op\":\"pair\"}\n").unwrap();
    agent.wait_for_log("pairing session started", WAIT);

    // A flood of junk bindings: each is refused and the refusal offered to that client, far
    // more than its queue of 8 events and its socket's buffer (a few hundred short writes) hold.
    // The refusals are short (they quote nothing from the junk, issue 13 item 4), so it takes
    // this many; with the long quoted names of before, a few dozen were enough.
    let binding_topic = device_topic(DEVICE, "pairing/binding");
    let flood = 2_000;
    for _ in 0..flood {
        peer.publish(&binding_topic, junk_binding_of(16), false)
            .await;
    }

    // A signed command must still be answered. It is re-sent (the same attestation, so it runs
    // at most once) until answered, since the flood may have it shed (503) or dropped.
    let server = ApiKey::server("key-server", WORKSPACE);
    let claims = signer.claims(
        &server,
        DEVICE,
        "cmd-after-flood",
        "agent:ping",
        serde_json::json!({}),
        now(),
        300,
    );
    let attestation = signer.attest(&claims);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let answered = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no answer to a signed command within 20 s of a flood while a pair client stalls; \
             {} bindings refused so far",
            agent.logs_with_message("owner binding refused").len()
        );
        peer.publish(
            &device_topic(DEVICE, "commands"),
            attestation.clone(),
            false,
        )
        .await;
        let got = peer.collect(&replies, Duration::from_secs(1)).await;
        if let Some(r) = got
            .iter()
            .map(|m| m.json())
            .find(|r| r["commandId"] == "cmd-after-flood" && r["type"] == "command.succeeded")
        {
            break r;
        }
    };
    assert_eq!(answered["status"], 200, "{answered}");
    // The stalled client is still connected (it was skipped, not waited for), and the agent
    // handled the whole flood.
    let refused = agent.logs_with_message("owner binding refused").len();
    eprintln!("{refused} of {flood} junk bindings refused; the rest overflowed the inbound queue");
    assert!(refused >= 100, "only {refused} bindings refused");
    drop(stalled);
}
