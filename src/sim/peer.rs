//! The platform's MQTT client: the one peer that plays the platform against gateways, used by the
//! simulator, the integration tests (through the test kit) and the fleet benchmark.
//!
//! It authenticates with its own client certificate, subscribes to its filters on every
//! CONNACK that did not restore a session (so a broker restart never leaves it deaf), and hands
//! every incoming packet to a handler that runs **inside the event-loop task**: the handler must
//! not await the client (a full request queue would deadlock the loop, see `link`'s module docs).
//! Consumers that need to await, or to wait for one message among many, take the messages
//! through an [`Inbox`] instead ([`PlatformPeer::connect_inbox`]).
//!
//! The fleet benchmark counts thousands of deliveries per second in its handler, so the handler
//! path does no more than move the packet's topic and payload into a [`Seen`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::sim::pki::CertFiles;

/// How to connect, and what to subscribe to.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    /// MQTT client id; brokers with `use_identity_as_username` take the certificate's CN.
    pub client_id: String,
    pub port: u16,
    /// The CA the broker's certificate must chain to.
    pub ca_file: PathBuf,
    /// The peer's own client certificate.
    pub client: CertFiles,
    pub subscriptions: Vec<String>,
    /// With `false` the broker keeps the subscriptions and queues QoS 1 messages while the peer
    /// is away.
    pub clean_session: bool,
    pub keep_alive: Duration,
    /// The client's request queue (publishes and subscriptions not yet written).
    pub queue: usize,
}

impl PeerOptions {
    /// A clean session with a 30 s keepalive, no subscriptions yet.
    pub fn new(client_id: &str, port: u16, ca_file: &Path, client: CertFiles) -> PeerOptions {
        PeerOptions {
            client_id: client_id.to_owned(),
            port,
            ca_file: ca_file.to_owned(),
            client,
            subscriptions: Vec::new(),
            clean_session: true,
            keep_alive: Duration::from_secs(30),
            queue: 256,
        }
    }

    pub fn subscribe(mut self, filter: impl Into<String>) -> PeerOptions {
        self.subscriptions.push(filter.into());
        self
    }
}

/// A message the peer received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
}

impl Seen {
    /// The payload as JSON, `Null` when it is not JSON. A telemetry batch in the compact
    /// encoding (PROTOCOL 14.9) is decoded to the JSON batch it stands for, and a deflated
    /// capabilities message (13) to its JSON.
    pub fn json(&self) -> serde_json::Value {
        if self.topic.ends_with("/telemetry") {
            return crate::telemetry::decode_batch(&self.payload)
                .unwrap_or(serde_json::Value::Null);
        }
        if self.topic.ends_with("/capabilities") {
            return crate::telemetry::decode_capabilities(&self.payload)
                .unwrap_or(serde_json::Value::Null);
        }
        serde_json::from_slice(&self.payload).unwrap_or(serde_json::Value::Null)
    }
}

/// What the handler is told, in the order the broker sent it.
#[derive(Debug)]
pub enum PeerEvent {
    /// A CONNACK; without a restored session the peer has just (re)subscribed.
    Connected {
        session_present: bool,
    },
    /// A SUBACK.
    Subscribed,
    /// A PUBACK for one of the peer's QoS 1 publishes.
    Acknowledged,
    Message(Seen),
}

/// A connected platform peer. Dropping it ends its event loop.
pub struct PlatformPeer {
    client: AsyncClient,
    task: JoinHandle<()>,
}

impl PlatformPeer {
    /// Connects and returns once the broker has acknowledged the subscriptions (or, without
    /// any, the connection). `on_event` runs in the event-loop task for every packet.
    pub async fn connect(
        options: PeerOptions,
        on_event: impl FnMut(PeerEvent) + Send + 'static,
    ) -> anyhow::Result<PlatformPeer> {
        let (client, mut eventloop) = AsyncClient::new(mqtt_options(&options)?, options.queue);
        // A platform backend sends without Nagle's delay; with it a command's round trip would
        // measure the peer's socket (40 ms delayed-ACK stalls), not the gateway.
        let mut net = eventloop.network_options();
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);

        let (ready_tx, ready_rx) = oneshot::channel();
        let task = tokio::spawn(pump(
            eventloop,
            client.clone(),
            options.subscriptions,
            ready_tx,
            on_event,
        ));
        let peer = PlatformPeer { client, task };
        tokio::time::timeout(Duration::from_secs(10), ready_rx)
            .await
            .context("the broker did not acknowledge the platform peer within 10 s")??;
        Ok(peer)
    }

    /// [`PlatformPeer::connect`] with every message kept in an [`Inbox`].
    pub async fn connect_inbox(options: PeerOptions) -> anyhow::Result<(PlatformPeer, Inbox)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let peer = PlatformPeer::connect(options, move |event| {
            if let PeerEvent::Message(seen) = event {
                let _ = tx.send(seen);
            }
        })
        .await?;
        Ok((peer, Inbox::new(rx)))
    }

    pub fn client(&self) -> &AsyncClient {
        &self.client
    }

    /// Publishes at QoS 1 (queued until the client writes it).
    pub async fn publish(
        &self,
        topic: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        retain: bool,
    ) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, retain, payload.into())
            .await?;
        Ok(())
    }

    /// Publishes a signed trust bundle, retained, on the bundle topic.
    pub async fn publish_trust_bundle(&self, bundle: String) -> anyhow::Result<()> {
        self.publish(crate::link::topics::Topics::trust_bundle(), bundle, true)
            .await
    }

    /// Publishes a signed site policy, retained, on `gateway`'s `safety/policy` topic.
    pub async fn publish_site_policy(&self, gateway: &str, policy: String) -> anyhow::Result<()> {
        let gateway = crate::model::gateway::GatewayId::parse(gateway)
            .map_err(|e| anyhow::anyhow!("gateway {gateway:?}: {e}"))?;
        let topic = crate::link::topics::Topics::new(&gateway).site_policy();
        self.publish(topic, policy, true).await
    }
}

/// The peer's MQTT options: mutual TLS to the broker on 127.0.0.1, as the platform's backend
/// would connect, with the agent's own TLS configuration code.
fn mqtt_options(options: &PeerOptions) -> anyhow::Result<MqttOptions> {
    let broker = crate::config::BrokerSettings {
        host: "127.0.0.1".into(),
        port: options.port,
        tls_server_name: Some("localhost".into()),
        ca_file: Some(options.ca_file.clone()),
        client_cert_file: Some(options.client.cert.clone()),
        client_key_file: Some(crate::config::Secret::new(options.client.key.clone())),
        alpn: vec![],
        tls_resumption: true,
        persistent_session: false,
        keepalive_secs: options.keep_alive.as_secs(),
        connect_timeout_secs: 5,
        backoff_min_ms: 200,
        backoff_max_ms: 1_000,
        allow_insecure_plaintext: false,
    };
    crate::link::tls::install_default_provider();
    let tls = crate::link::tls::client_config(&broker)?;
    let mut mqtt = MqttOptions::new(options.client_id.clone(), "127.0.0.1", options.port);
    mqtt.set_keep_alive(options.keep_alive)
        .set_clean_session(options.clean_session)
        .set_max_packet_size(4 << 20, 4 << 20)
        .set_transport(Transport::Tls(TlsConfiguration::Rustls(tls)));
    Ok(mqtt)
}

/// The peer's event-loop task: polls for ever (retrying a lost connection after 100 ms),
/// subscribes after every CONNACK that did not restore a session, signals `ready` once the
/// broker has acknowledged the subscriptions (or, without any, the connection), and hands
/// every packet of interest to `on_event`.
async fn pump(
    mut eventloop: rumqttc::EventLoop,
    subscriber: AsyncClient,
    subscriptions: Vec<String>,
    ready: oneshot::Sender<()>,
    mut on_event: impl FnMut(PeerEvent) + Send + 'static,
) {
    let mut ready = Some(ready);
    let mut signal_ready = move || {
        if let Some(tx) = ready.take() {
            let _ = tx.send(());
        }
    };
    loop {
        let packet = match eventloop.poll().await {
            Ok(Event::Incoming(packet)) => packet,
            Ok(Event::Outgoing(_)) => continue,
            Err(error) => {
                tracing::warn!(%error, "platform peer's MQTT connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let event = match packet {
            Packet::ConnAck(ack) => {
                if ack.session_present || subscriptions.is_empty() {
                    signal_ready();
                } else {
                    let filters = subscriptions
                        .iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f.clone(), QoS::AtLeastOnce));
                    if let Err(error) = subscriber.try_subscribe_many(filters) {
                        tracing::warn!(%error, "platform peer could not subscribe");
                    }
                }
                PeerEvent::Connected {
                    session_present: ack.session_present,
                }
            }
            Packet::SubAck(_) => {
                signal_ready();
                PeerEvent::Subscribed
            }
            Packet::PubAck(_) => PeerEvent::Acknowledged,
            Packet::Publish(p) => PeerEvent::Message(Seen {
                topic: p.topic,
                payload: p.payload.to_vec(),
                retain: p.retain,
            }),
            _ => continue,
        };
        on_event(event);
    }
}

impl Drop for PlatformPeer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The messages a peer received, for consumers that wait for them.
pub struct Inbox {
    rx: mpsc::UnboundedReceiver<Seen>,
    /// Messages received while waiting for something else, kept for later calls so that
    /// waiting on one topic never loses a message on another.
    backlog: VecDeque<Seen>,
}

impl Inbox {
    fn new(rx: mpsc::UnboundedReceiver<Seen>) -> Inbox {
        Inbox {
            rx,
            backlog: VecDeque::new(),
        }
    }

    /// The next message on any topic; `None` once the peer is gone.
    pub async fn recv(&mut self) -> Option<Seen> {
        match self.backlog.pop_front() {
            Some(seen) => Some(seen),
            None => self.rx.recv().await,
        }
    }

    /// Waits for the next message on `topic` that satisfies `pred`, keeping the others.
    /// `None` when none arrived within `timeout`; panics if the peer is gone.
    pub async fn expect(
        &mut self,
        topic: &str,
        timeout: Duration,
        pred: impl Fn(&Seen) -> bool,
    ) -> Option<Seen> {
        if let Some(i) = self
            .backlog
            .iter()
            .position(|m| m.topic == topic && pred(m))
        {
            return self.backlog.remove(i);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(seen)) if seen.topic == topic && pred(&seen) => return Some(seen),
                Ok(Some(other)) => self.backlog.push_back(other),
                Ok(None) => panic!("peer connection ended"),
                Err(_) => return None,
            }
        }
    }

    /// Forgets every message on `topic` received so far, so that the next
    /// [`Inbox::expect`] on it sees only later ones.
    pub fn forget(&mut self, topic: &str) {
        while let Ok(seen) = self.rx.try_recv() {
            self.backlog.push_back(seen);
        }
        self.backlog.retain(|m| m.topic != topic);
    }

    /// Collects everything that arrives on `topic` during `window` (and any kept before).
    pub async fn collect(&mut self, topic: &str, window: Duration) -> Vec<Seen> {
        let deadline = tokio::time::Instant::now() + window;
        let (mut out, rest): (Vec<Seen>, Vec<Seen>) =
            self.backlog.drain(..).partition(|m| m.topic == topic);
        self.backlog.extend(rest);
        while let Ok(Some(seen)) = tokio::time::timeout_at(deadline, self.rx.recv()).await {
            if seen.topic == topic {
                out.push(seen);
            } else {
                self.backlog.push_back(seen);
            }
        }
        out
    }
}
