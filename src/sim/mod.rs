//! A simulated Texture platform: development and test tooling (cargo feature `sim`), never part
//! of the gateway build.
//!
//! It runs, in one process: an MQTT broker (rumqttd) serving TLS on loopback with an ephemeral
//! CA; the platform's MQTT side (a [`peer::PlatformPeer`] that publishes the signed trust bundle,
//! relays attestations and records replies, telemetry, capabilities and pairing requests); and a
//! local HTTP API shaped like the platform's public one ([`api`]). All signing goes through
//! [`crate::sim::platform`], the same module the tests use.
//!
//! The simulator mints an attestation for whatever key calls it, with that key's kind and scope;
//! like the real platform it refuses obvious misuse at the API (a connect key cannot command), but
//! the **device** is the gatekeeper, and the demo proves it by publishing validly signed
//! attestations for the wrong keys straight onto the device's topic.

pub(crate) mod api;
pub(crate) mod demo;
pub mod http;
pub mod peer;
pub mod pki;
pub mod platform;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rumqttc::{AsyncClient, QoS};
use serde::Serialize;
use serde_json::Value;

use crate::inbound::auth::claims::KeyKind;
use crate::link::topics::Topics;
use crate::sim::peer::{PeerOptions, PlatformPeer};
use crate::sim::platform::{ApiKey, PlatformSigner};

/// The workspace (customer) the simulator's keys belong to.
pub const WORKSPACE: &str = "ws_demo";
const PLATFORM_CLIENT: &str = "texture-platform";

/// An API key the simulator knows.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KeyRecord {
    pub id: String,
    pub key: String,
    pub kind: KeyKind,
    pub reference_id: Option<String>,
    pub revoked: bool,
}

/// A command as the API tracks it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CommandRecord {
    pub id: String,
    pub status: String,
    pub device_id: String,
    pub command: String,
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceRecord {
    pub id: String,
    pub gateway_id: String,
    #[serde(rename = "type")]
    pub device_type: Option<Value>,
    pub state: Option<Value>,
    pub available_commands: Vec<Value>,
    pub updated_at: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Connection {
    pub id: String,
    pub reference_id: String,
    pub redirect_url: String,
}

/// Everything the simulated platform knows.
pub struct PlatformState {
    pub signer: PlatformSigner,
    pub bundle_version: u64,
    pub keys: Vec<KeyRecord>,
    pub connections: HashMap<String, Connection>,
    /// Pending pairing requests by gateway id.
    pub pairing_requests: HashMap<String, crate::inbound::pairing::PairingRequest>,
    pub binding_versions: HashMap<String, u64>,
    pub commands: HashMap<String, CommandRecord>,
    pub devices: HashMap<String, DeviceRecord>,
    pub online: HashMap<String, bool>,
    /// Every reply seen, in order (including refusals with a null command id).
    pub replies: Vec<Value>,
    next_id: u64,
}

impl PlatformState {
    /// A platform with no keys, gateways or devices yet, signing with `signer`; bundle 1.
    pub fn new(signer: PlatformSigner) -> PlatformState {
        PlatformState {
            signer,
            bundle_version: 1,
            keys: Vec::new(),
            connections: HashMap::new(),
            pairing_requests: HashMap::new(),
            binding_versions: HashMap::new(),
            commands: HashMap::new(),
            devices: HashMap::new(),
            online: HashMap::new(),
            replies: Vec::new(),
            next_id: 0,
        }
    }

    pub fn next_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        let mut random = [0u8; 6];
        getrandom::fill(&mut random).expect("OS RNG");
        let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
        format!("{prefix}{}{hex}", self.next_id)
    }

    pub fn key(&self, key: &str) -> Option<&KeyRecord> {
        self.keys.iter().find(|k| k.key == key)
    }

    pub fn add_key(&mut self, kind: KeyKind, reference_id: Option<String>) -> KeyRecord {
        let prefix = if kind == KeyKind::Scoped {
            "scoped_"
        } else {
            "api_"
        };
        let record = KeyRecord {
            id: self.next_id("key_"),
            key: self.next_id(prefix),
            kind,
            reference_id,
            revoked: false,
        };
        self.keys.push(record.clone());
        record
    }

    pub fn api_key(&self, record: &KeyRecord) -> ApiKey {
        ApiKey {
            id: record.id.clone(),
            kind: record.kind,
            workspace_id: WORKSPACE.into(),
            reference_id: record.reference_id.clone(),
        }
    }

    pub fn trust_bundle(&self) -> String {
        let revoked: Vec<String> = self
            .keys
            .iter()
            .filter(|k| k.revoked)
            .map(|k| k.id.clone())
            .collect();
        let now = crate::model::clock::system_secs();
        self.signer
            .trust_bundle(self.bundle_version, now, now + 7 * 86_400, &revoked)
    }

    /// The record of `id`, created on first sight as a device behind `gateway`.
    fn device(&mut self, id: &str, gateway: &str) -> &mut DeviceRecord {
        self.devices
            .entry(id.to_owned())
            .or_insert_with(|| DeviceRecord {
                id: id.to_owned(),
                gateway_id: gateway.to_owned(),
                ..Default::default()
            })
    }

    /// The gateway a device id is reached through (a gateway reaches itself).
    pub fn gateway_of(&self, device_id: &str) -> Option<String> {
        if self.online.contains_key(device_id) {
            return Some(device_id.to_owned());
        }
        self.devices.get(device_id).map(|d| d.gateway_id.clone())
    }
}

/// A running simulator.
pub struct Simulator {
    pub dir: PathBuf,
    pub broker_port: u16,
    pub api_addr: SocketAddr,
    pub ca: pki::Ca,
    pub state: Arc<Mutex<PlatformState>>,
    pub mqtt: AsyncClient,
    /// The platform's MQTT peer (`mqtt` is its client); dropping the simulator disconnects it.
    pub peer: PlatformPeer,
    /// The keys made at start-up: `server`, `connect`.
    pub server_key: KeyRecord,
    pub connect_key: KeyRecord,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn broker_config(port: u16, ca: &Path, cert: &Path, key: &Path) -> anyhow::Result<rumqttd::Config> {
    let toml = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-tls"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 1
    [v4.1.tls]
    capath = "{ca}"
    certpath = "{cert}"
    keypath = "{key}"
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 200
    dynamic_filters = true
"#,
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    );
    Ok(config::Config::builder()
        .add_source(config::File::from_str(&toml, config::FileFormat::Toml))
        .build()?
        .try_deserialize()?)
}

impl Simulator {
    /// Starts broker, platform client and API; files go into `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Simulator> {
        crate::link::tls::install_default_provider();
        let ca = pki::Ca::new(dir, "sim");
        let server = ca.server("sim-broker", &["localhost", "127.0.0.1"]);
        let broker_port = free_port()?;
        let config = broker_config(broker_port, &ca.cert_path(), &server.cert, &server.key)?;
        std::thread::Builder::new()
            .name("sim-broker".into())
            .spawn(move || {
                let mut broker = rumqttd::Broker::new(config);
                if let Err(error) = broker.start() {
                    tracing::error!(%error, "simulated broker stopped");
                }
            })
            .context("starting the broker thread")?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", broker_port)).is_err() {
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the simulated broker did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let mut state = PlatformState::new(PlatformSigner::generate("platform-1"));
        let server_key = state.add_key(KeyKind::Server, None);
        let connect_key = state.add_key(KeyKind::Connect, None);
        let state = Arc::new(Mutex::new(state));

        let peer = connect_platform(&ca, broker_port, state.clone()).await?;
        let mqtt = peer.client().clone();
        let api_addr = api::serve(state.clone(), mqtt.clone()).await?;
        Ok(Simulator {
            dir: dir.to_owned(),
            broker_port,
            api_addr,
            ca,
            state,
            mqtt,
            peer,
            server_key,
            connect_key,
        })
    }

    /// Publishes `token` straight onto a gateway's command topic, as a compromised broker (or
    /// anyone with broker access) could, bypassing the API.
    pub async fn inject(&self, gateway_id: &str, token: &str) -> anyhow::Result<()> {
        let topic = format!(
            "{}/devices/{gateway_id}/commands",
            crate::link::topics::ROOT
        );
        self.mqtt
            .publish(topic, QoS::AtLeastOnce, false, token.as_bytes().to_vec())
            .await?;
        Ok(())
    }

    /// Publishes the current trust bundle (after a key change), retained.
    pub async fn publish_bundle(&self) -> anyhow::Result<()> {
        publish_bundle(&self.mqtt, &self.state).await
    }
}

async fn publish_bundle(mqtt: &AsyncClient, state: &Mutex<PlatformState>) -> anyhow::Result<()> {
    let bundle = state.lock().expect("state").trust_bundle();
    mqtt.publish(
        Topics::trust_bundle(),
        QoS::AtLeastOnce,
        true,
        bundle.into_bytes(),
    )
    .await?;
    Ok(())
}

/// Connects the platform's own MQTT client and spawns the task that records what devices send.
async fn connect_platform(
    ca: &pki::Ca,
    port: u16,
    state: Arc<Mutex<PlatformState>>,
) -> anyhow::Result<PlatformPeer> {
    let mut options = PeerOptions::new(
        PLATFORM_CLIENT,
        port,
        &ca.cert_path(),
        ca.client(PLATFORM_CLIENT),
    );
    for leaf in [
        "status",
        "replies",
        "telemetry",
        "capabilities",
        "pairing/request",
    ] {
        options = options.subscribe(format!("{}/devices/+/{leaf}", crate::link::topics::ROOT));
    }
    let (peer, mut inbox) = PlatformPeer::connect_inbox(options)
        .await
        .context("connecting the platform client")?;
    // The platform side handles device messages in its own task, never in the polling one.
    let publisher = peer.client().clone();
    let recorder = state.clone();
    tokio::spawn(async move {
        while let Some(seen) = inbox.recv().await {
            if record(&recorder, &seen.topic, &seen.payload) == Some(true) {
                let _ = publish_bundle(&publisher, &recorder).await;
            }
        }
    });
    publish_bundle(peer.client(), &state).await?;
    Ok(peer)
}

/// Records one device message. Returns `Some(true)` when the trust bundle should be
/// (re)published, because a gateway just came online.
fn record(state: &Mutex<PlatformState>, topic: &str, payload: &[u8]) -> Option<bool> {
    let rest = topic.strip_prefix(&format!("{}/devices/", crate::link::topics::ROOT))?;
    let (gateway, leaf) = rest.split_once('/')?;
    // Telemetry comes in any encoding of PROTOCOL 14.1 and 14.9, capabilities as JSON or
    // deflated JSON (13); the rest is JSON.
    let value: Value = match leaf {
        "telemetry" => crate::telemetry::decode_batch(payload).ok()?,
        "capabilities" => crate::telemetry::decode_capabilities(payload).ok()?,
        _ => serde_json::from_slice(payload).ok()?,
    };
    let mut s = state.lock().expect("state");
    let now = crate::inbound::reply::rfc3339(crate::model::clock::system_secs());
    match leaf {
        "status" => {
            let online = value["state"] == "online";
            s.online.insert(gateway.to_owned(), online);
            return Some(online);
        }
        "replies" => {
            if let Some(id) = value["commandId"].as_str() {
                if let Some(c) = s.commands.get_mut(id) {
                    c.status = match value["type"].as_str() {
                        Some("command.succeeded") => "success".into(),
                        _ => "failed".into(),
                    };
                    c.result = value.get("result").cloned();
                    c.error = match value["type"].as_str() {
                        Some("command.refused") => Some(serde_json::json!({
                            "code": value["code"], "message": value["message"], "status": value["status"]
                        })),
                        _ => value.get("error").cloned(),
                    };
                }
            }
            s.replies.push(value);
        }
        "telemetry" => {
            for p in value["points"].as_array().into_iter().flatten() {
                let (Some(id), Some(st)) = (p["deviceId"].as_str(), p.get("state")) else {
                    continue;
                };
                let d = s.device(id, gateway);
                d.device_type = st.get("type").cloned();
                d.state = Some(st.clone());
                d.updated_at = Some(now.clone());
            }
        }
        "capabilities" => {
            for dev in value["devices"].as_array().into_iter().flatten() {
                let Some(id) = dev["deviceId"].as_str() else {
                    continue;
                };
                let d = s.device(id, gateway);
                d.device_type = dev.get("type").cloned();
                d.available_commands = dev["availableCommands"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
            }
        }
        "pairing/request" => {
            if let Ok(request) =
                serde_json::from_value::<crate::inbound::pairing::PairingRequest>(value)
            {
                s.pairing_requests.insert(gateway.to_owned(), request);
            }
        }
        _ => {}
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::settings::{Compression, Encoding};
    use crate::telemetry::TelemetrySettings;

    /// The simulator reads telemetry in every encoding the agent can be configured to send.
    #[test]
    fn device_state_is_recorded_from_every_encoding() {
        let mut device =
            crate::drivers::simulated::SimDevice::new(crate::model::device::DeviceType::Battery, 3);
        let modes = [
            (Encoding::Json, Compression::Deflate),
            (Encoding::Compact, Compression::None),
            (Encoding::Compact, Compression::Deflate),
        ];
        for (encoding, compression) in modes {
            let state = PlatformState::new(PlatformSigner::generate("platform-1"));
            let state = Mutex::new(state);
            let records: Vec<crate::telemetry::outbox::Record> = (1..=5)
                .map(|seq| {
                    let mut payload = Vec::new();
                    crate::telemetry::encode_state(
                        seq,
                        "bat-1",
                        device.step(1.0, 43_200),
                        &mut payload,
                    );
                    crate::telemetry::outbox::Record {
                        epoch: 1,
                        seq,
                        payload,
                    }
                })
                .collect();
            let settings = TelemetrySettings {
                encoding,
                compression,
                ..TelemetrySettings::default()
            };
            let batch = crate::telemetry::encode_batch("gw-1", &records, &settings);
            let topic = format!("{}/devices/gw-1/telemetry", crate::link::topics::ROOT);
            assert_eq!(record(&state, &topic, &batch), Some(false), "{encoding:?}");
            let last: Value = serde_json::from_slice(&records[4].payload).unwrap();
            let s = state.lock().unwrap();
            assert_eq!(
                s.devices["bat-1"].state.as_ref(),
                Some(&last["state"]),
                "{encoding:?} {compression:?}"
            );
        }
    }
}
