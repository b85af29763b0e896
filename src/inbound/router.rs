//! The inbound router: one task that owns the authorisation and pairing state and handles, in
//! order, everything that can change it.
//!
//! broker → link → **router** → auth → command runner → drivers; replies go back via the link.
//!
//! A single owner means no locks: trust bundles, owner bindings, commands and `pair` requests
//! from the control socket are serialised through this task's select loop. The router decides
//! where a message goes ([`route`]) and hands commands on: to auth, then to the
//! [`Runner`], which owns a device command from its start to its recorded reply. Under a burst
//! it sheds commands unread instead, and answers those the link shed because its queue was
//! full (`crate::link::Shed`), so a burst is answered "busy" rather than dropped.

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::agent::service::Shutdown;
use crate::drivers::DriverRegistry;
use crate::inbound::auth::claims::AttestationClaims;
use crate::inbound::auth::{peek_command_id, Authorization, Authorizer};
use crate::inbound::commands::runner::{Completion, Finished, Journal, Runner};
use crate::inbound::commands::{CommandSettings, Plan};
use crate::inbound::pairing::control::{ControlCall, ControlEvent, ControlRequest};
use crate::inbound::pairing::session::{PairingSession, WAITING_EVERY};
use crate::inbound::reply::{ErrorCode, Reply};
use crate::inbound::safety::Safety;
use crate::link::topics::{InboundTopic, Topics};
use crate::link::{Inbound, LinkState, LinkStatus, Publisher, Shed};
use crate::model::clock::Clock;

/// Inbound messages waiting behind the one in hand from which commands are shed: refused at
/// once with 503 and `retryAfter` instead of being verified. Below the link's queue size, so
/// most of a burst is shed here and only what arrives faster still is shed by the link.
const SHED_AT: usize = crate::link::INBOUND_QUEUE / 2;
/// `retryAfter` of a shed command, seconds.
const SHED_RETRY_AFTER: u64 = 1;

/// What the inbound task is built from (the composition root fills it in).
pub(crate) struct RouterParts {
    pub gateway_id: String,
    pub topics: Topics,
    pub publisher: Publisher,
    pub link: watch::Receiver<LinkStatus>,
    /// `None` without a `[trust]` section: every command is refused.
    pub authorizer: Option<Authorizer>,
    /// The one owner of the pairing state.
    pub pairing: PairingSession,
    pub registry: DriverRegistry,
    pub command_settings: CommandSettings,
    /// Whether the capabilities message goes out deflated (`telemetry.encoding = "compact"`,
    /// PROTOCOL 13).
    pub compact_capabilities: bool,
    /// The safety stage: limits checked before any device command reaches its driver, holds
    /// and fail-safe.
    pub safety: Safety,
    /// The agent's one clock (its floor kept by the authorizer).
    pub clock: Clock,
    /// The command ids the replay journal held at start; those left unanswered by the last
    /// run are reported `interrupted` once the link is up.
    pub interrupted: Vec<String>,
    /// The agent's stop: from then on a running device command has no outcome to report
    /// (PROTOCOL 4.6).
    pub stop: Shutdown,
}

/// The inbound task's state (see the module docs).
pub(crate) struct Router {
    gateway_id: String,
    topics: Topics,
    publisher: Publisher,
    link: watch::Receiver<LinkStatus>,
    authorizer: Option<Authorizer>,
    pairing: PairingSession,
    registry: DriverRegistry,
    command_settings: CommandSettings,
    safety: Safety,
    clock: Clock,
    /// Device commands, from their start to their recorded reply.
    runner: Runner,
    /// When the capabilities message is due.
    advertiser: crate::inbound::advertise::Advertiser,
    compact_capabilities: bool,
}

/// Where an inbound message goes. Decided from its topic's kind (parsed once by the link) and
/// the queue behind it alone, so the overload rule is testable without a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    TrustBundle,
    Binding,
    SitePolicy,
    Command,
    /// A command refused unread: [`SHED_AT`] or more messages wait behind it.
    Shed,
    /// A topic the agent does not subscribe to.
    Ignored,
}

/// Routes a message on a topic of `kind` with `waiting` more messages queued behind it.
fn route(kind: Option<InboundTopic>, waiting: usize) -> Route {
    match kind {
        Some(InboundTopic::TrustBundle) => Route::TrustBundle,
        Some(InboundTopic::PairingBinding) => Route::Binding,
        Some(InboundTopic::SitePolicy) => Route::SitePolicy,
        Some(InboundTopic::Commands) if waiting >= SHED_AT => Route::Shed,
        Some(InboundTopic::Commands) => Route::Command,
        None => Route::Ignored,
    }
}

/// The refusal of the command `jti` shed unread because `waiting` more messages are queued
/// behind it (shed by the router) or in front of it (by the link, its queue full). It carries
/// the command's (unverified) id, when well-formed, so the platform can match it and retry; it
/// is never recorded in the replay journal, so the retry is judged afresh.
fn shed_reply(jti: Option<String>, gateway_id: &str, waiting: usize, by: &str) -> Reply {
    tracing::warn!(
        command_id = jti.as_deref().unwrap_or("?"),
        waiting,
        by,
        "gateway busy: command shed unread"
    );
    Reply::Refused {
        command_id: jti,
        device_id: gateway_id.to_owned(),
        status: ErrorCode::Unavailable.status(),
        code: ErrorCode::Unavailable,
        message: format!("gateway busy: {waiting} messages waiting; command not read, retry"),
        retry_after: Some(SHED_RETRY_AFTER),
    }
}

impl Router {
    pub(crate) fn new(parts: RouterParts) -> Router {
        let RouterParts {
            gateway_id,
            topics,
            publisher,
            link,
            mut authorizer,
            pairing,
            registry,
            command_settings,
            compact_capabilities,
            safety,
            clock,
            interrupted,
            stop,
        } = parts;
        let mut runner = Runner::new(stop, clock.clone());
        if let Some(a) = authorizer.as_mut() {
            runner.report_interrupted(a, &gateway_id, &interrupted);
        }
        Router {
            gateway_id,
            topics,
            publisher,
            link,
            authorizer,
            pairing,
            registry,
            command_settings,
            safety,
            clock,
            runner,
            advertiser: Default::default(),
            compact_capabilities,
        }
    }

    /// Runs until the inbound stream ends (link shut down).
    pub(crate) async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut shed: mpsc::Receiver<Shed>,
        mut calls: mpsc::Receiver<ControlCall>,
    ) {
        let mut waiting = tokio::time::interval(WAITING_EVERY);
        let mut devices = self.registry.subscribe();
        let mut link = self.link.clone();
        loop {
            // Recomputed after every event: a dispatch, a link change or an outcome may move
            // the next hold deadline, fail-safe entry or retry.
            let control = tokio::time::sleep(self.safety.sleep_for(self.clock.now_millis()));
            let advertise = self.advertiser.due();
            tokio::select! {
                message = inbound.recv() => match message {
                    Some(m) => {
                        // These include every command the link shed before it queued `m`:
                        // answering them first keeps a command's "busy" ahead of whatever a
                        // redelivery of it, queued later, gets.
                        while let Ok(command) = shed.try_recv() {
                            if !self.answer_shed(command).await { return }
                        }
                        if !self.on_message(m, inbound.len()).await { return }
                    }
                    None => return,
                },
                // Commands the link could not queue: answered busy as they come, with no
                // priority over the other branches, so the shed queue drains while a burst lasts.
                Some(command) = shed.recv() => if !self.answer_shed(command).await { return },
                done = self.runner.completed() => self.on_completion(done).await,
                Some(call) = calls.recv() => self.on_call(call).await,
                _ = waiting.tick(), if self.pairing.is_watched() => {
                    let link = self.link.borrow().state.name();
                    self.pairing.tick(self.clock.now(), link);
                }
                () = control => self.on_control_tick(),
                changed = link.changed() => {
                    if changed.is_err() { return }
                    let connected = matches!(link.borrow_and_update().state, LinkState::Connected);
                    self.safety.on_link(connected, self.clock.now());
                    if connected {
                        self.on_connected().await;
                    }
                }
                Ok(()) = devices.changed() => self.advertiser.devices_changed(Instant::now()),
                _ = async { tokio::time::sleep_until(advertise.expect("guarded")).await }, if advertise.is_some() => {
                    self.advertise().await;
                }
            }
        }
    }

    /// After every CONNACK (the broker forgot nothing retained, but a restarted one may have):
    /// advertise what can be commanded, send the pending pairing request again, and report the
    /// commands the last run left interrupted.
    async fn on_connected(&mut self) {
        self.advertiser.connected(Instant::now());
        if let Some(request) = self.pairing.pending_request(self.clock.now()) {
            self.publish(self.topics.pairing_request(), request).await;
        }
        for reply in self.runner.take_interrupted() {
            self.publish(self.topics.replies(), reply).await;
        }
    }

    /// Answers a command the link shed, its queue full; false when the link is gone for good.
    async fn answer_shed(&self, command: Shed) -> bool {
        let reply = shed_reply(
            command.command_id,
            &self.gateway_id,
            crate::link::INBOUND_QUEUE,
            "link",
        );
        self.publish(self.topics.replies(), reply.to_bytes()).await
    }

    /// Publishes (not retained); returns false when the link is gone for good.
    async fn publish(&self, topic: String, payload: Vec<u8>) -> bool {
        self.publisher.publish(topic, payload, false).await.is_ok()
    }

    /// Publishes the capabilities message, if the advertiser says it is due and new.
    async fn advertise(&mut self) {
        let message = crate::inbound::commands::capabilities(&self.gateway_id, &self.registry);
        let connection = {
            let link = self.link.borrow();
            matches!(link.state, LinkState::Connected).then_some(link.connects)
        };
        let Some(mut message) = self.advertiser.fire(message, connection) else {
            return;
        };
        if self.compact_capabilities {
            message = crate::telemetry::deflate_json(&message);
        }
        if self
            .publisher
            .publish(self.topics.capabilities(), message, true)
            .await
            .is_err()
        {
            tracing::debug!("capabilities not published: link closed");
        }
    }

    async fn on_completion(&mut self, done: Completion) {
        let journal = self.authorizer.as_mut().map(|a| a as &mut dyn Journal);
        match self.runner.finish(done, journal) {
            Finished::Reply {
                device_id,
                command_id,
                reply,
                succeeded,
            } => {
                self.safety
                    .on_platform_result(&device_id, &command_id, succeeded);
                self.publish(self.topics.replies(), reply).await;
            }
            Finished::Safety {
                device_id,
                action_id,
                outcome,
            } => {
                let now = self.clock.now();
                self.safety
                    .on_control_done(&device_id, &action_id, outcome, now);
            }
        }
    }

    /// When the next deadline has come: lapsed holds and fail-safe, run through the runner like
    /// any device command.
    fn on_control_tick(&mut self) {
        for run in self.safety.due(&self.registry, self.clock.now()) {
            self.runner.start_local(run);
        }
    }

    /// Handles `message`, with `waiting` more queued behind it. Returns false when the link is
    /// gone for good.
    async fn on_message(&mut self, message: Inbound, waiting: usize) -> bool {
        let reply = match route(message.kind, waiting) {
            Route::TrustBundle => {
                if let Some(a) = self.authorizer.as_mut() {
                    let _ = a.offer_trust_bundle(&message.payload);
                }
                return true;
            }
            Route::Binding => {
                match &self.authorizer {
                    Some(a) => self
                        .pairing
                        .on_binding(&message.payload, a, self.clock.now()),
                    None => {
                        tracing::warn!("owner binding ignored: no [trust] configured to verify it")
                    }
                }
                return true;
            }
            Route::SitePolicy => {
                match &self.authorizer {
                    Some(a) => self.safety.on_policy(
                        &message.payload,
                        a.trust_bundle(),
                        a.issuer(),
                        &self.gateway_id,
                        self.clock.now(),
                    ),
                    None => {
                        tracing::warn!("site policy ignored: no [trust] configured to verify it")
                    }
                }
                return true;
            }
            Route::Ignored => {
                tracing::debug!(topic = %message.topic, "message on unexpected topic ignored");
                return true;
            }
            // Verifying costs a signature check and a durable replay record each; a burst
            // larger than the queue would otherwise overflow it and lose commands unanswered.
            Route::Shed => shed_reply(
                peek_command_id(&message.payload),
                &self.gateway_id,
                waiting,
                "router",
            )
            .to_bytes(),
            Route::Command => match self.on_command(&message.payload) {
                Some(reply) => reply,
                None => return true,
            },
        };
        self.publish(self.topics.replies(), reply).await
    }

    /// Authorises a command against the pairing state in force and hands it on: the reply to
    /// publish now, or `None` when there is nothing to say yet (a device command started, or a
    /// redelivery of one still running).
    fn on_command(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        let Some(a) = self.authorizer.as_mut() else {
            return Some(
                Reply::refused(
                    None,
                    &self.gateway_id,
                    ErrorCode::Unauthenticated,
                    "no platform trust root is configured; commands cannot be verified",
                )
                .to_bytes(),
            );
        };
        let claims = match a.authorize(payload, self.pairing.owner()) {
            Authorization::Reply(reply) => return Some(reply),
            Authorization::InProgress => return None,
            Authorization::Execute(claims) => claims,
        };
        let now = self.clock.now();
        let reply = match crate::inbound::commands::plan(
            &claims,
            &self.gateway_id,
            &self.registry,
            &self.command_settings,
            now,
        ) {
            Plan::Reply(reply) => reply.to_bytes(),
            Plan::Unpair => self.unpair(&claims, now).to_bytes(),
            Plan::Device(run) => match self.safety.admit(&claims.jti, &run, now) {
                Ok(safety) => {
                    self.runner.start(claims, run, safety);
                    return None;
                }
                Err(refusal) => {
                    crate::inbound::commands::reply_for(&claims, &run.device_id, now, Err(refusal))
                        .to_bytes()
                }
            },
        };
        if let Some(a) = self.authorizer.as_mut() {
            a.complete(&claims.jti, &reply);
        }
        Some(reply)
    }

    /// `agent:unpair` (server keys only, enforced by the policy): forget the owner.
    fn unpair(&mut self, claims: &AttestationClaims, now: u64) -> Reply {
        let result = self.pairing.unpair(now).map_err(|e| e.to_string());
        if result.is_ok() {
            tracing::warn!(command_id = %claims.jti, "unpaired: every scoped key is refused from now on");
        }
        crate::inbound::commands::reply_for(
            claims,
            &self.gateway_id,
            now,
            result
                .map(|()| serde_json::json!({ "paired": false }))
                .map_err(|e| (ErrorCode::CommandFailed, e)),
        )
    }

    async fn on_call(&mut self, call: ControlCall) {
        match call.request {
            ControlRequest::Pair if self.authorizer.is_none() => {
                let message =
                    "pairing needs a [trust] section: the owner binding could not be verified"
                        .into();
                // A fresh queue: room for this one event unless the client already left.
                let _ = call.events.try_send(ControlEvent::Error { message });
            }
            ControlRequest::Pair => {
                let link = self.link.borrow().state.name();
                let started = self.pairing.start(call.events, self.clock.now(), link);
                if let Some(request) = started {
                    if !self.publish(self.topics.pairing_request(), request).await {
                        tracing::warn!("pairing request not published: link closed");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_behind_sixteen_waiting_messages_is_shed_unread_with_503() {
        let commands = Some(InboundTopic::Commands);
        assert_eq!(SHED_AT, 16);
        assert_eq!(route(commands, 15), Route::Command);
        assert_eq!(route(commands, 16), Route::Shed);
        assert_eq!(route(commands, 31), Route::Shed);

        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let payload = br#"{"jti":"cmd_01JDX3WQ4E7Z"}"#;
        let token = crate::inbound::auth::jws::sign(
            &key,
            Some("k1"),
            crate::inbound::auth::claims::ATTESTATION_TYP,
            payload,
        );
        let reply: serde_json::Value = serde_json::from_slice(
            &shed_reply(peek_command_id(token.as_bytes()), "gw-1", 16, "router").to_bytes(),
        )
        .unwrap();
        assert_eq!(reply["type"], "command.refused");
        assert_eq!(
            reply["commandId"], "cmd_01JDX3WQ4E7Z",
            "unverified, but well-formed"
        );
        assert_eq!(reply["deviceId"], "gw-1");
        assert_eq!(reply["status"], 503);
        assert_eq!(reply["code"], "UNAVAILABLE");
        assert_eq!(reply["retryAfter"], 1);
        assert_eq!(
            reply["message"],
            "gateway busy: 16 messages waiting; command not read, retry"
        );

        let garbage: serde_json::Value = serde_json::from_slice(
            &shed_reply(peek_command_id(b"not a token"), "gw-1", 20, "router").to_bytes(),
        )
        .unwrap();
        assert_eq!(garbage["commandId"], serde_json::Value::Null);
    }

    #[test]
    fn only_commands_are_ever_shed() {
        let full = crate::link::INBOUND_QUEUE - 1;
        assert_eq!(
            route(Some(InboundTopic::TrustBundle), full),
            Route::TrustBundle
        );
        assert_eq!(
            route(Some(InboundTopic::PairingBinding), full),
            Route::Binding
        );
        assert_eq!(route(None, 0), Route::Ignored);
    }
}
