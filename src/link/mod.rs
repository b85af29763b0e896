//! The MQTT-over-TLS link to the platform's broker.
//!
//! rumqttc has three sharp edges this module exists to file down:
//!
//! 1. **Reconnect loops.** After `EventLoop::poll` returns an error, the next call reconnects at
//!    once. A broker that refuses us would be hammered in a tight loop, so every error is followed
//!    by a jittered [`backoff::Backoff`] sleep before the next poll. The backoff starts again from
//!    its floor only after a connection has stayed up for [`backoff::STABLE_AFTER`]: a broker
//!    that accepts us and then fails the connection at once (say, with a retained message above
//!    [`MAX_INBOUND_PACKET`], which rumqttc can only treat as a connection error) gets the same
//!    widening delays as one that refuses us.
//! 2. **Deadlocks.** `AsyncClient` requests go through a bounded channel that only the event loop
//!    drains. A task that polls the event loop and also awaits `publish` can block on a full
//!    channel that nobody will ever drain. So the [`run_event_loop`] task *only* polls; it hands
//!    inbound messages on with a non-blocking `try_send`, and everything that publishes (the
//!    [`announce`] task, command replies, shutdown) runs in other tasks.
//! 3. **Lost subscriptions.** With a clean session the broker forgets our subscriptions, and
//!    rumqttc never re-subscribes by itself. The [`announce`] task therefore publishes the
//!    retained birth message after *every* CONNACK, and subscribes after every one unless a
//!    persistent session is known to hold the subscriptions already
//!    ([`session::Session::subscriptions_held`]).
//!
//! 4. **Knowing what was delivered.** rumqttc reports PUBACKs by packet id, and packet ids are
//!    assigned inside the event loop, out of sight of whoever published. [`Publisher`] therefore
//!    records, under one lock with a non-blocking `try_publish`, the order in which requests
//!    enter rumqttc's channel; the event loop pairs the n-th outgoing PUBLISH with the n-th
//!    recorded request and resolves its [`Delivery`] on the matching PUBACK. When the connection
//!    drops, the event loop (under the same lock) discards rumqttc's queued requests and fails
//!    every outstanding delivery, so a delivery is reported only for a PUBACK that was really
//!    received and never for a message that was silently dropped. The outbox relies on this.
//!    The bookkeeping itself is [`session::Session`], a plain type with unit tests: the event
//!    loop polls, then calls exactly one of its methods per event.
//!
//! Presence uses the classic birth/will pattern: a retained `online` after each CONNACK, an MQTT
//! last will with a retained `offline` for when the link dies, and an explicit `offline` on a
//! clean shutdown (a clean DISCONNECT suppresses the will).

mod session;
pub mod tls;
pub mod topics;
pub(crate) mod traffic;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS,
    SubscribeFilter, TlsConfiguration, Transport,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::agent::service::Shutdown;
use crate::config::Settings;
use crate::link::topics::{InboundTopic, Topics};
use crate::model::backoff::Backoff;
use crate::model::clock::Clock;
use session::{Announcements, Session};

/// Largest inbound packet accepted. Commands and trust bundles are a few KiB; anything larger
/// is refused by rumqttc before it is buffered, which bounds what a hostile broker can make us
/// allocate. rumqttc 0.25 cannot skip such a packet: its codec fails on the fixed header and the
/// event loop returns an error, so the connection is dropped (docs/PROTOCOL.md 1.3).
/// Room is left above the largest trust bundle for the topic and packet header, so a bundle
/// at its size limit never trips this one (which would drop the connection on every connect).
pub const MAX_INBOUND_PACKET: usize = crate::inbound::auth::trust::MAX_BUNDLE_BYTES + 1024;
/// Largest outbound packet (a telemetry batch).
pub const MAX_OUTBOUND_PACKET: usize = 1024 * 1024;
/// Inbound messages waiting for the command pipeline. When full, further commands go to the
/// [`SHED_QUEUE`] and anything else is dropped and logged, rather than stalling the event loop
/// (which would stop keepalives).
pub const INBOUND_QUEUE: usize = 32;
/// Commands that found the inbound queue full, waiting to be answered "busy" (503) unread:
/// only their ids (at most 128 bytes each), so a full queue costs at most about 150 KiB, not the
/// 8 MiB of their attestations. Only when this is full too is a command dropped unanswered.
pub const SHED_QUEUE: usize = 1024;
/// Scheduler turns the event loop gives the consumer of a full inbound queue before shedding or
/// dropping a message; none for a command while a burst is overflowing the queue.
const INBOUND_TURNS: u32 = 8;
/// Capacity of rumqttc's request channel: how many publishes may wait for the event loop.
const REQUEST_QUEUE: usize = 512;

/// Where the link is in its life cycle; published through a `watch` channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LinkState {
    /// A TCP/TLS/MQTT connect is in progress.
    Connecting { attempt: u32 },
    /// CONNACK received; the announcer is publishing the birth (and subscribing, unless the
    /// broker's session holds the subscriptions).
    Connected,
    /// The last attempt or connection failed; the next attempt starts after `retry_in_ms`.
    WaitingToRetry { retry_in_ms: u64, error: String },
    /// Shut down; no further attempts.
    Stopped,
}

impl LinkState {
    /// The state's name, as in status.json's `state`.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            LinkState::Connecting { .. } => "connecting",
            LinkState::Connected => "connected",
            LinkState::WaitingToRetry { .. } => "waiting_to_retry",
            LinkState::Stopped => "stopped",
        }
    }
}

/// A snapshot of the link for `status`, systemd `STATUS=` lines and health telemetry.
///
/// status.json stores it with its keys in alphabetical order ([`crate::agent::status`]), not in the
/// order of this derive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    #[serde(flatten)]
    pub state: LinkState,
    pub broker: String,
    /// Successful CONNACKs since start; each one after the first is a reconnect.
    pub connects: u64,
    /// Failed attempts and dropped connections since start.
    pub failures: u64,
    pub last_error: Option<String>,
    pub connected_since_unix: Option<u64>,
}

impl LinkStatus {
    pub fn reconnects(&self) -> u64 {
        self.connects.saturating_sub(1)
    }
}

/// A command the link could not queue for the router: the router answers it `503` unread,
/// with the `jti` read from it unverified (PROTOCOL 7.1), so a burst larger than the queue is
/// answered rather than dropped.
#[derive(Debug)]
pub(crate) struct Shed {
    pub(crate) command_id: Option<String>,
}

/// A message received on one of our subscriptions.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub topic: String,
    /// Which of our inbound topics `topic` is, parsed once by the link; `None` for a topic we
    /// never subscribed to (a broker may still deliver one).
    pub kind: Option<InboundTopic>,
    pub payload: bytes::Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Tls(#[from] tls::TlsSetupError),
    #[error("the link is shut down")]
    Closed,
}

/// The result of one publish: resolves `Ok` on its PUBACK, `Err` if the connection it was
/// queued on ended first (the message may or may not have reached the broker).
pub type Delivery = oneshot::Receiver<()>;

/// The delivery bookkeeping, shared between publishers and the event loop; only ever locked for
/// a few instructions.
type Shared = Arc<Mutex<Session>>;

fn lock(session: &Shared) -> std::sync::MutexGuard<'_, Session> {
    session.lock().expect("link session lock")
}

/// A cloneable handle for publishing. Never used from the event-loop task.
#[derive(Clone)]
pub struct Publisher {
    client: AsyncClient,
    session: Shared,
}

impl Publisher {
    /// Queues a QoS 1 publish and returns its [`Delivery`]. Waits (briefly, repeatedly) while
    /// rumqttc's request channel is full; fails only once the link has shut down.
    pub async fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<Delivery, LinkError> {
        let mut payload = payload;
        loop {
            match self.try_publish(&topic, payload, retain) {
                Ok(delivery) => return Ok(delivery),
                Err(TryPublish::Full(back)) => {
                    payload = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(TryPublish::Closed) => return Err(LinkError::Closed),
            }
        }
    }

    /// Queues a QoS 1 publish without waiting.
    pub fn try_publish(
        &self,
        topic: &str,
        payload: Vec<u8>,
        retain: bool,
    ) -> Result<Delivery, TryPublish> {
        let (tx, rx) = oneshot::channel();
        // Holding the lock across the non-blocking send makes "recorded" and "in rumqttc's
        // channel" one atomic step with respect to the event loop (see the module docs).
        let mut session = lock(&self.session);
        if session.accepting().is_err() {
            return Err(TryPublish::Closed);
        }
        match self
            .client
            .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        {
            Ok(()) => {
                session.record(tx);
                Ok(rx)
            }
            Err(rumqttc::ClientError::TryRequest(rumqttc::Request::Publish(p))) => {
                Err(TryPublish::Full(p.payload.to_vec()))
            }
            Err(_) => Err(TryPublish::Closed),
        }
    }
}

/// Why [`Publisher::try_publish`] did not queue a message.
#[derive(Debug)]
pub enum TryPublish {
    /// rumqttc's request channel is full; the payload is handed back.
    Full(Vec<u8>),
    /// The link has shut down.
    Closed,
}

/// The running link: a publisher, the status feed and the inbound stream.
pub struct Link {
    publisher: Publisher,
    status: watch::Receiver<LinkStatus>,
    inbound: Option<mpsc::Receiver<Inbound>>,
    shed: Option<mpsc::Receiver<Shed>>,
    topics: Topics,
    event_loop: JoinHandle<()>,
    announcer: JoinHandle<()>,
    /// Stamps presence messages.
    clock: Clock,
}

/// The presence message on the retained status topic.
#[derive(Debug, Serialize)]
struct Presence<'a> {
    state: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(rename = "agentVersion")]
    agent_version: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    at: Option<u64>,
}

fn presence(state: &str, reason: Option<&str>, at: Option<u64>) -> Vec<u8> {
    serde_json::to_vec(&Presence {
        state,
        reason,
        agent_version: env!("CARGO_PKG_VERSION"),
        at,
    })
    .expect("presence serialises")
}

/// Builds rumqttc's options from the settings. Fails only on unusable TLS material.
fn mqtt_options(settings: &Settings, topics: &Topics) -> Result<MqttOptions, LinkError> {
    let b = &settings.broker;
    let mut o = MqttOptions::new(settings.device.id.as_str(), b.host.clone(), b.port);
    o.set_keep_alive(b.keepalive())
        .set_clean_session(!b.persistent_session)
        .set_max_packet_size(MAX_INBOUND_PACKET, MAX_OUTBOUND_PACKET)
        .set_last_will(LastWill::new(
            topics.status(),
            presence("offline", Some("connection-lost"), None),
            QoS::AtLeastOnce,
            true,
        ));
    if !b.allow_insecure_plaintext {
        let config = tls::client_config(b)?;
        o.set_transport(Transport::Tls(TlsConfiguration::Rustls(config)));
    }
    Ok(o)
}

impl Link {
    /// Validates the TLS material and starts the event-loop and session tasks.
    ///
    /// Returns immediately: connecting happens in the background, so a gateway that boots
    /// without network still starts (and tells systemd it is ready).
    pub fn start(settings: &Settings, shutdown: Shutdown, clock: Clock) -> Result<Link, LinkError> {
        let topics = Topics::new(&settings.device.id);
        let options = mqtt_options(settings, &topics)?;
        let (client, mut eventloop) = AsyncClient::new(options, REQUEST_QUEUE);
        let mut net = eventloop.network_options();
        net.set_connection_timeout(settings.broker.connect_timeout_secs);
        // Commands and their replies are small and latency-bound: Nagle's algorithm would hold
        // each one for up to 40 ms waiting for an ACK.
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);

        let b = &settings.broker;
        let broker = format!("{}:{}", b.host, b.port);
        let session = Session::new(
            broker.clone(),
            Backoff::new(b.backoff_min(), b.backoff_max()),
            b.persistent_session,
        );
        let (status_tx, status_rx) = watch::channel(session.status().clone());
        let session: Shared = Arc::new(Mutex::new(session));
        let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE);
        let (shed_tx, shed_rx) = mpsc::channel(SHED_QUEUE);
        let event_loop = tokio::spawn(run_event_loop(
            eventloop,
            EventLoopIo {
                plaintext: b.allow_insecure_plaintext,
                persistent: b.persistent_session,
                broker,
                topics: topics.clone(),
                status: status_tx,
                session: session.clone(),
                inbound: inbound_tx,
                shed: shed_tx,
                dropped_inbound: 0,
                overflowing: false,
                shutdown,
                clock: clock.clone(),
            },
        ));
        let publisher = Publisher { client, session };
        let announcer = tokio::spawn(announce(
            publisher.clone(),
            topics.clone(),
            status_rx.clone(),
            clock.clone(),
        ));
        Ok(Link {
            publisher,
            status: status_rx,
            inbound: Some(inbound_rx),
            shed: Some(shed_rx),
            topics,
            event_loop,
            announcer,
            clock,
        })
    }

    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    pub fn status(&self) -> watch::Receiver<LinkStatus> {
        self.status.clone()
    }

    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// The inbound stream; can be taken once, by the command pipeline.
    pub fn take_inbound(&mut self) -> Option<mpsc::Receiver<Inbound>> {
        self.inbound.take()
    }

    /// The commands to answer "busy" unread; can be taken once, by the command pipeline.
    pub(crate) fn take_shed(&mut self) -> Option<mpsc::Receiver<Shed>> {
        self.shed.take()
    }

    /// Clean shutdown within `budget`: publish a retained `offline`, wait for every in-flight
    /// QoS 1 publish to be acknowledged, send DISCONNECT, and stop the event loop.
    ///
    /// The caller must already have triggered the shared [`Shutdown`] so the event loop stops
    /// reconnecting. Whatever cannot finish within the budget is abandoned: the broker's last
    /// will then reports `offline` for us.
    pub async fn shutdown(mut self, budget: Duration) {
        self.announcer.abort();
        let deadline = tokio::time::Instant::now() + budget;
        let connected = matches!(self.status.borrow().state, LinkState::Connected);
        if connected {
            let offline = presence("offline", Some("shutdown"), Some(self.clock.now()));
            let goodbye = async {
                let delivery = self
                    .publisher
                    .publish(self.topics.status(), offline, true)
                    .await?;
                // Brokers acknowledge QoS 1 in order, so this PUBACK also covers everything
                // published before it (replies, telemetry).
                delivery.await.map_err(|_| LinkError::Closed)?;
                self.publisher
                    .client
                    .disconnect()
                    .await
                    .map_err(|_| LinkError::Closed)
            };
            match tokio::time::timeout_at(deadline, goodbye).await {
                Ok(Ok(())) => tracing::info!("offline status published; disconnecting"),
                Ok(Err(error)) => tracing::warn!(%error, "could not publish offline status"),
                Err(_) => tracing::warn!("timed out publishing offline status"),
            }
        }
        if tokio::time::timeout_at(deadline, &mut self.event_loop)
            .await
            .is_err()
        {
            tracing::warn!("event loop did not stop in time; abandoning the connection");
            self.event_loop.abort();
            lock(&self.publisher.session).on_stop();
        }
    }
}

/// The event-loop task's handles on the rest of the agent; the bookkeeping is in [`Session`].
struct EventLoopIo {
    plaintext: bool,
    /// `broker.persistent_session`.
    persistent: bool,
    broker: String,
    topics: Topics,
    status: watch::Sender<LinkStatus>,
    session: Shared,
    inbound: mpsc::Sender<Inbound>,
    shed: mpsc::Sender<Shed>,
    /// Inbound messages dropped on a full queue since start, for the log.
    dropped_inbound: u64,
    /// A message found the queue full and was shed or dropped, and none has been queued since:
    /// a burst is overflowing it (see [`EventLoopIo::hand_over`]).
    overflowing: bool,
    shutdown: Shutdown,
    clock: Clock,
}

impl EventLoopIo {
    /// Runs one [`Session`] method that moves the connection on, then tells the watchers the
    /// status it leaves (outside the lock: a watcher may hold its borrow while publishing).
    fn transition<T>(&self, event: impl FnOnce(&mut Session) -> T) -> T {
        let (out, status) = {
            let mut session = lock(&self.session);
            let out = event(&mut session);
            (out, session.status().clone())
        };
        self.status.send_replace(status);
        out
    }

    /// Hands an inbound message to the command pipeline. When the queue stays full, a command
    /// goes to the shed queue to be answered "busy", and anything else is dropped.
    async fn hand_over(&mut self, publish: rumqttc::Publish) {
        let mut inbound = Inbound {
            kind: self.topics.classify(&publish.topic),
            topic: publish.topic,
            payload: publish.payload,
        };
        // rumqttc hands over every packet of a burst it has already read without ever returning
        // Pending, so on the daemon's single thread the consumer cannot run while a burst is
        // being handed over: give it a few turns before shedding or dropping anything. Bounded,
        // so the event loop never waits on the consumer (point 2). Once a burst has overflowed
        // the queue, further commands are shed at once while it stays full: spending the turns
        // on each of them would hold up everything behind them in rumqttc's buffer, the
        // PINGRESP included, long enough to fail the keepalive under load.
        let is_command = inbound.kind == Some(InboundTopic::Commands);
        let mut turns = 0;
        loop {
            match self.inbound.try_send(inbound) {
                Err(mpsc::error::TrySendError::Full(m))
                    if turns < INBOUND_TURNS && !(self.overflowing && is_command) =>
                {
                    inbound = m;
                    turns += 1;
                    tokio::task::yield_now().await;
                }
                Err(mpsc::error::TrySendError::Full(m)) => {
                    self.overflowing = true;
                    if is_command {
                        let command_id = crate::inbound::auth::peek_command_id(&m.payload);
                        if self.shed.try_send(Shed { command_id }).is_ok() {
                            // The router logs the refusal when it sends it.
                            return;
                        }
                    }
                    lock(&self.session).on_inbound_dropped();
                    self.dropped_inbound += 1;
                    let dropped_inbound = self.dropped_inbound;
                    tracing::warn!(topic = %m.topic, dropped_inbound, "inbound queue full; message dropped");
                    return;
                }
                Ok(()) => {
                    self.overflowing = false;
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }
}

/// The event-loop task. It only polls: see the module docs for why it must never publish. Each
/// event goes to exactly one [`Session`] method; what is left here is logging, sleeping and
/// handing messages on.
async fn run_event_loop(mut eventloop: EventLoop, mut io: EventLoopIo) {
    loop {
        let connected = lock(&io.session).is_connected();
        let polled = if connected {
            // Keep polling through shutdown so the offline message and DISCONNECT go out.
            eventloop.poll().await
        } else {
            let attempt = io.transition(Session::connecting);
            tracing::info!(broker = %io.broker, attempt, "connecting");
            tokio::select! {
                polled = eventloop.poll() => polled,
                _ = io.shutdown.wait() => break,
            }
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let now = io.clock.now();
                let session_present = ack.session_present;
                // Back to the persistent session after a clean one that shed an unreadable
                // message (below).
                eventloop.mqtt_options.set_clean_session(!io.persistent);
                io.transition(|s| s.on_connack(std::time::Instant::now(), now, session_present));
                if io.plaintext {
                    tracing::warn!(broker = %io.broker, "connected WITHOUT TLS (allow_insecure_plaintext = true)");
                }
                tracing::info!(broker = %io.broker, session_present, "connected");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => io.hand_over(p).await,
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                lock(&io.session).on_outgoing_publish(pkid);
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                lock(&io.session).on_puback(ack.pkid);
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                // mosquitto grants a denied subscription with a failure code rather than
                // closing the connection; without this log an ACL mistake is silent.
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    tracing::error!(broker = %io.broker, "broker refused a subscription; check its ACL for this device");
                }
                // Our one SUBSCRIBE carries every filter: held only if each got QoS 1 (a
                // broker queues no QoS 0 message for an offline client).
                let granted = ack.return_codes.len() == InboundTopic::ALL.len()
                    && ack.return_codes.iter().all(|c| {
                        matches!(c, rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce))
                    });
                lock(&io.session).on_suback(std::time::Instant::now(), granted);
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => break,
            Ok(_) => {}
            Err(error) => {
                // A message we cannot read (above MAX_INBOUND_PACKET, or malformed) that a
                // persistent session holds would be sent again after every CONNACK, for as long
                // as the broker keeps the session: the next attempt asks for a clean session
                // once, which discards it with whatever else the session held (PROTOCOL 1.3).
                // (rumqttc reports a lost socket as a "deserialization" error too: only a
                // packet it read and could not take counts.)
                let unreadable = matches!(
                    &error,
                    ConnectionError::MqttState(rumqttc::StateError::Deserialization(e))
                        if !matches!(
                            e,
                            rumqttc::mqttbytes::Error::Io(_)
                                | rumqttc::mqttbytes::Error::OutgoingPacketTooLarge { .. }
                        )
                );
                if io.persistent && unreadable {
                    eventloop.mqtt_options.set_clean_session(true);
                    tracing::warn!(broker = %io.broker, "an unreadable message: the next connection starts a clean session");
                }
                let error = describe(&error);
                let (delay, stale) = io.transition(|s| {
                    // rumqttc's queue is emptied under the lock publishers take, so no request
                    // can slip in between it and the session failing the recorded ones. With a
                    // persistent session rumqttc would otherwise replay them after the next
                    // CONNACK, out of step with the recorded requests (see `on_connection_lost`).
                    eventloop.clean();
                    eventloop.pending.clear();
                    // rumqttc also keeps the events it read in the burst that ended in this error
                    // and hands them out after the next CONNACK, as if they came on the new
                    // connection: a stale SUBACK would then say the new session holds our
                    // subscriptions, and a stale outgoing PUBLISH would pair a new request
                    // with an old packet id. They are taken out here, with the connection: its
                    // PUBLISHes and PUBACKs still count, before its deliveries fail, and its
                    // messages go on below; a SUBACK of a lost connection proves nothing.
                    let mut messages = Vec::new();
                    for event in eventloop.state.events.drain(..) {
                        match event {
                            Event::Outgoing(Outgoing::Publish(pkid)) => s.on_outgoing_publish(pkid),
                            Event::Incoming(Packet::PubAck(ack)) => {
                                s.on_puback(ack.pkid);
                            }
                            Event::Incoming(Packet::Publish(p)) => messages.push(p),
                            _ => {}
                        }
                    }
                    (
                        s.on_connection_lost(std::time::Instant::now(), error.clone()),
                        messages,
                    )
                });
                // Received (and perhaps already acknowledged): on to the pipeline, as if read
                // a moment earlier.
                for publish in stale {
                    io.hand_over(publish).await;
                }
                tracing::warn!(broker = %io.broker, %error, retry_in_ms = delay.as_millis() as u64, "link down");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = io.shutdown.wait() => break,
                }
            }
        }
    }
    io.transition(Session::on_stop);
}

/// A one-line description of a connection error, with the TLS cause when there is one
/// (rumqttc's own `Display` hides it behind "TLS: I/O").
fn describe(error: &ConnectionError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// After every CONNACK: subscribe to our topics (unless the broker's session already holds
/// them) and publish the retained birth message.
///
/// All four filters go in one SUBSCRIBE, answered by one SUBACK: fewer bytes on every connect,
/// and one answer that says whether the broker holds them all. Runs apart from the event loop
/// (see the module docs). If the link drops half-way, the event loop discards these requests
/// and the next CONNACK starts the sequence again.
async fn announce(
    publisher: Publisher,
    topics: Topics,
    mut status: watch::Receiver<LinkStatus>,
    clock: Clock,
) {
    let mut announcements = Announcements::default();
    loop {
        let due = announcements.due(&status.borrow_and_update());
        if due {
            if lock(&publisher.session).subscriptions_held() {
                tracing::info!(
                    session_present = true,
                    "the broker's session holds our subscriptions; not subscribing"
                );
            } else {
                let subscriptions = topics.subscriptions();
                tracing::debug!(topics = ?subscriptions, "subscribing");
                let filters = subscriptions
                    .into_iter()
                    .map(|topic| SubscribeFilter::new(topic, QoS::AtLeastOnce));
                if publisher.client.subscribe_many(filters).await.is_err() {
                    return;
                }
            }
            let birth = presence("online", None, Some(clock.now()));
            if publisher
                .publish(topics.status(), birth, true)
                .await
                .is_err()
            {
                return;
            }
        }
        if status.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gateway::GatewayId;

    /// An event loop's handles with an inbound queue of one message and a shed queue of one.
    fn io() -> (EventLoopIo, mpsc::Receiver<Inbound>, mpsc::Receiver<Shed>) {
        let topics = Topics::new(&GatewayId::parse("gw-1").unwrap());
        let session = Session::new(
            "broker:8883".into(),
            Backoff::with_seed(Duration::from_millis(500), Duration::from_secs(30), 1),
            true,
        );
        let (status, _) = watch::channel(session.status().clone());
        let (inbound, inbound_rx) = mpsc::channel(1);
        let (shed, shed_rx) = mpsc::channel(1);
        let (_trigger, shutdown) = crate::agent::service::shutdown_channel();
        let io = EventLoopIo {
            plaintext: false,
            persistent: true,
            broker: "broker:8883".into(),
            topics,
            status,
            session: Arc::new(Mutex::new(session)),
            inbound,
            shed,
            dropped_inbound: 0,
            overflowing: false,
            shutdown,
            clock: Clock::system(),
        };
        (io, inbound_rx, shed_rx)
    }

    fn publish(topic: &str, payload: &[u8]) -> rumqttc::Publish {
        rumqttc::Publish::new(topic, QoS::AtLeastOnce, payload.to_vec())
    }

    /// A compact JWS whose payload carries `jti` (unsigned: only peeked at).
    fn token(jti: &str) -> Vec<u8> {
        use base64::Engine;
        let b64 = |v: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"EdDSA"}"#),
            b64(&format!(r#"{{"jti":"{jti}"}}"#))
        )
        .into_bytes()
    }

    /// Frees one slot of the inbound queue the next time the scheduler runs another task.
    fn consume_one(
        inbound: &mut Option<mpsc::Receiver<Inbound>>,
    ) -> tokio::task::JoinHandle<mpsc::Receiver<Inbound>> {
        let mut rx = inbound.take().unwrap();
        tokio::spawn(async move {
            rx.recv().await.unwrap();
            rx
        })
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_gets_turns_to_drain_except_for_commands_while_a_burst_overflows_it() {
        let (mut io, rx, mut shed) = io();
        let mut rx = Some(rx);
        let commands = "texture/v1/devices/gw-1/commands";
        io.hand_over(publish(commands, &token("cmd-1"))).await;
        // Full, but its consumer gets a turn: the command waits for it and is queued.
        let consumer = consume_one(&mut rx);
        io.hand_over(publish(commands, &token("cmd-2"))).await;
        rx = Some(consumer.await.unwrap());
        assert!(shed.try_recv().is_err(), "queued, not shed");
        assert!(!io.overflowing);

        // A burst overflowing it: a command is shed at once, before the consumer has run.
        io.overflowing = true;
        let consumer = consume_one(&mut rx);
        io.hand_over(publish(commands, &token("cmd-3"))).await;
        assert_eq!(
            shed.try_recv().unwrap().command_id.as_deref(),
            Some("cmd-3")
        );
        // Anything else still waits its turns, and once it is queued the burst is over.
        io.hand_over(publish("texture/v1/trust/bundle", b"bundle"))
            .await;
        let mut rx = consumer.await.unwrap();
        assert!(!io.overflowing);
        assert_eq!(io.dropped_inbound, 0);
        assert_eq!(rx.try_recv().unwrap().payload.as_ref(), b"bundle");
    }

    #[tokio::test]
    async fn a_command_that_finds_the_queue_full_is_shed_and_anything_else_dropped() {
        let (mut io, mut inbound, mut shed) = io();
        let commands = "texture/v1/devices/gw-1/commands";
        io.hand_over(publish(commands, &token("cmd-1"))).await;
        // The queue of one is full now: the next command goes to the shed queue, by its id.
        io.hand_over(publish(commands, &token("cmd-2"))).await;
        assert!(io.overflowing, "a shed command marks the burst");
        let first = inbound.try_recv().expect("queued");
        assert_eq!(first.kind, Some(InboundTopic::Commands));
        assert_eq!(
            shed.try_recv().unwrap().command_id.as_deref(),
            Some("cmd-2")
        );
        assert_eq!(io.dropped_inbound, 0);

        lock(&io.session).on_suback(std::time::Instant::now(), true);
        io.hand_over(publish(commands, &token("cmd-3"))).await;
        // A trust bundle that finds the queue full is dropped, and the subscriptions forgotten
        // so the next connection has it delivered again.
        io.hand_over(publish("texture/v1/trust/bundle", b"bundle"))
            .await;
        assert_eq!(io.dropped_inbound, 1);
        assert!(!lock(&io.session).subscriptions_held());
        // With the shed queue full as well, a command is dropped unanswered, and counted.
        io.hand_over(publish(commands, &token("cmd-4"))).await;
        io.hand_over(publish(commands, &token("cmd-5"))).await;
        assert_eq!(io.dropped_inbound, 2);
        assert_eq!(
            shed.try_recv().unwrap().command_id.as_deref(),
            Some("cmd-4")
        );
        assert!(shed.try_recv().is_err());
    }
}
