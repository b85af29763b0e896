//! The inbound router: one task that owns the authorisation and pairing state and handles, in
//! order, everything that can change it.
//!
//! broker → link → **router** → auth → command runner → drivers; replies go back via the link.
//!
//! A single owner means no locks: trust bundles, owner bindings, commands and `pair` requests
//! from the control socket are serialised through this task's select loop. The router decides
//! where a message goes ([`route`]) and hands commands on: to auth, then to the
//! [`Runner`], which owns a device command from its start to its recorded reply. Under a burst
//! it sheds commands unread instead, so the link's queue never overflows unanswered.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, watch};

use crate::auth::{Authorization, Authorizer};
use crate::commands::runner::{Completion, Journal, Runner};
use crate::commands::{CommandSettings, Plan};
use crate::control::{ControlCall, ControlEvent, ControlRequest};
use crate::drivers::DriverRegistry;
use crate::link::{Inbound, LinkState, LinkStatus, Publisher};
use crate::pairing::PairingState;
use crate::reply::{ErrorCode, Reply};
use crate::service::Shutdown;
use crate::topics::{InboundTopic, Topics};

/// How often a pairing client is told the session is still waiting.
const WAITING_EVERY: Duration = Duration::from_secs(5);
/// How long a final event that found a pairing client's queue full is retried (at each waiting
/// tick) before that client is dropped (docs/PROTOCOL.md 12, "Slow clients").
const FINAL_GRACE: Duration = Duration::from_secs(30);
/// Inbound messages waiting behind the one in hand from which commands are shed: refused at
/// once with 503 and `retryAfter` instead of being verified. Below the link's queue size, so
/// a burst is answered "busy" rather than dropped unanswered when the queue overflows.
const SHED_AT: usize = crate::link::INBOUND_QUEUE / 2;
/// `retryAfter` of a shed command, seconds.
const SHED_RETRY_AFTER: u64 = 1;

/// What the inbound task is built from (the composition root fills it in).
pub struct DispatcherParts {
    pub device_id: String,
    pub topics: Topics,
    pub publisher: Publisher,
    pub link: watch::Receiver<LinkStatus>,
    /// `None` without a `[trust]` section: every command is refused.
    pub authorizer: Option<Authorizer>,
    pub pairing: PairingState,
    pub device_key: SigningKey,
    /// `{device_id}` and `{code}` are substituted; shown as a QR code by `pair`.
    pub qr_template: String,
    pub registry: DriverRegistry,
    pub command_settings: CommandSettings,
    /// The command ids the replay journal held at start; those left unanswered by the last
    /// run are reported `interrupted` once the link is up.
    pub interrupted: Vec<String>,
    /// The agent's stop: from then on a running device command has no outcome to report
    /// (PROTOCOL 4.6).
    pub stop: Shutdown,
}

pub struct Dispatcher {
    device_id: String,
    topics: Topics,
    publisher: Publisher,
    link: watch::Receiver<LinkStatus>,
    authorizer: Option<Authorizer>,
    pairing: PairingState,
    device_key: SigningKey,
    qr_template: String,
    registry: DriverRegistry,
    command_settings: CommandSettings,
    /// Clients following the current pairing session. Never awaited: see [`Watcher`].
    watchers: Vec<Watcher>,
    /// Device commands, from their start to their recorded reply.
    runner: Runner,
    /// The pending pairing request, sent again after a reconnect so the platform has it.
    pairing_request: Option<Vec<u8>>,
}

/// Where an inbound message goes. Decided from its topic's kind (parsed once by the link) and
/// the queue behind it alone, so the overload rule is testable without a broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    TrustBundle,
    Binding,
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
        Some(InboundTopic::Commands) if waiting >= SHED_AT => Route::Shed,
        Some(InboundTopic::Commands) => Route::Command,
        None => Route::Ignored,
    }
}

/// The refusal of a command shed unread because `waiting` more messages are queued behind it.
/// It carries the command's (unverified) id, when well-formed, so the platform can match it and
/// retry; it is never recorded in the replay journal, so the retry is judged afresh.
fn shed_reply(payload: &[u8], gateway_id: &str, waiting: usize) -> Reply {
    let jti = crate::auth::jws::peek_jti(payload, crate::auth::MAX_ATTESTATION_BYTES);
    tracing::warn!(
        command_id = jti.as_deref().unwrap_or("?"),
        waiting,
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

/// A `pair` client. Its events go into a bounded queue that the control socket drains into the
/// client's socket; the dispatcher only ever *tries* to queue, so a client that stops reading
/// can never hold up the inbound task (and with it every command).
struct Watcher {
    events: mpsc::Sender<ControlEvent>,
    /// A final event that found the queue full, and until when to keep retrying it.
    pending_final: Option<(ControlEvent, tokio::time::Instant)>,
}

impl Watcher {
    fn new(events: mpsc::Sender<ControlEvent>) -> Watcher {
        Watcher {
            events,
            pending_final: None,
        }
    }

    /// Offers `event` without waiting; returns whether the client is still followed.
    ///
    /// A non-final event that does not fit is skipped: `waiting` comes again 5 s later with
    /// fresh figures, and a skipped `rejected` is only lost. A final event that does not fit is
    /// kept and retried first at every later offer (a tick comes every 5 s) for
    /// [`FINAL_GRACE`]; after it, or once delivered, the client is dropped and its connection
    /// closes when the control socket has written what was queued.
    fn offer(&mut self, event: &ControlEvent, now: tokio::time::Instant) -> bool {
        use mpsc::error::TrySendError;
        if let Some((last, give_up_at)) = self.pending_final.take() {
            return match self.events.try_send(last) {
                Err(TrySendError::Full(last)) if now < give_up_at => {
                    self.pending_final = Some((last, give_up_at));
                    true
                }
                Ok(()) | Err(_) => false,
            };
        }
        match self.events.try_send(event.clone()) {
            Ok(()) => !event.is_final(),
            Err(TrySendError::Closed(_)) => false,
            Err(TrySendError::Full(last)) if last.is_final() => {
                self.pending_final = Some((last, now + FINAL_GRACE));
                true
            }
            Err(TrySendError::Full(_)) => true,
        }
    }
}

impl Dispatcher {
    pub fn new(parts: DispatcherParts) -> Dispatcher {
        let DispatcherParts {
            device_id,
            topics,
            publisher,
            link,
            mut authorizer,
            pairing,
            device_key,
            qr_template,
            registry,
            command_settings,
            interrupted,
            stop,
        } = parts;
        let mut runner = Runner::new(stop);
        if let Some(a) = authorizer.as_mut() {
            runner.report_interrupted(a, &device_id, &interrupted);
            let b = pairing.binding();
            a.set_pairing(b.reference_id.clone(), b.workspace_id.clone());
        }
        Dispatcher {
            device_id,
            topics,
            publisher,
            link,
            authorizer,
            pairing,
            device_key,
            qr_template,
            registry,
            command_settings,
            watchers: Vec::new(),
            runner,
            pairing_request: None,
        }
    }

    fn now(&self) -> u64 {
        match &self.authorizer {
            Some(a) => a.now(),
            None => crate::link::unix_now(),
        }
    }

    /// Runs until the inbound stream ends (link shut down).
    pub async fn run(
        mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut calls: mpsc::Receiver<ControlCall>,
    ) {
        let mut waiting = tokio::time::interval(WAITING_EVERY);
        let mut devices = self.registry.subscribe();
        let mut link = self.link.clone();
        loop {
            tokio::select! {
                message = inbound.recv() => match message {
                    Some(m) => if !self.on_message(m, inbound.len()).await { return },
                    None => return,
                },
                done = self.runner.completed() => self.on_completion(done).await,
                Some(call) = calls.recv() => self.on_call(call).await,
                _ = waiting.tick(), if !self.watchers.is_empty() => self.on_waiting_tick(),
                // After every CONNACK (the broker forgot nothing retained, but a restarted one
                // may have) and whenever a device appears: advertise what can be commanded.
                changed = link.changed() => {
                    if changed.is_err() { return }
                    let connected = matches!(link.borrow_and_update().state, LinkState::Connected);
                    if connected {
                        self.advertise().await;
                        if let Some(request) = self.pairing_request.clone().filter(|_| self.pairing.is_pending(self.now())) {
                            let _ = self.publisher.publish(self.topics.pairing_request(), request, false).await;
                        }
                        for reply in self.runner.take_interrupted() {
                            let _ = self.publisher.publish(self.topics.replies(), reply, false).await;
                        }
                    }
                }
                Ok(()) = devices.changed() => self.advertise().await,
            }
        }
    }

    async fn advertise(&self) {
        let message = crate::commands::capabilities(&self.device_id, &self.registry);
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
        let reply = self.runner.finish(done, journal);
        let _ = self
            .publisher
            .publish(self.topics.replies(), reply, false)
            .await;
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
                self.on_binding(&message.payload).await;
                return true;
            }
            Route::Ignored => {
                tracing::debug!(topic = %message.topic, "message on unexpected topic ignored");
                return true;
            }
            // Verifying costs a signature check and a durable replay record each; a burst
            // larger than the queue would otherwise overflow it and lose commands unanswered.
            Route::Shed => shed_reply(&message.payload, &self.device_id, waiting).to_bytes(),
            Route::Command => match self.on_command(&message.payload) {
                Some(reply) => reply,
                None => return true,
            },
        };
        self.publisher
            .publish(self.topics.replies(), reply, false)
            .await
            .is_ok()
    }

    /// Authorises a command and hands it on: the reply to publish now, or `None` when there is
    /// nothing to say yet (a device command started, or a redelivery of one still running).
    fn on_command(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        Some(match self.authorizer.as_mut() {
            None => Reply::refused(
                None,
                &self.device_id,
                ErrorCode::Unauthenticated,
                "no platform trust root is configured; commands cannot be verified",
            )
            .to_bytes(),
            Some(a) => match a.authorize(payload) {
                Authorization::Reply(reply) => reply,
                Authorization::InProgress => return None,
                Authorization::Execute(claims) => {
                    let now = a.now();
                    match crate::commands::plan(
                        &claims,
                        &self.device_id,
                        &self.registry,
                        &self.command_settings,
                        now,
                    ) {
                        Plan::Reply(reply) => {
                            let reply = reply.to_bytes();
                            a.complete(&claims.jti, &reply);
                            reply
                        }
                        Plan::Unpair => {
                            let reply = self.unpair(&claims, now).to_bytes();
                            if let Some(a) = self.authorizer.as_mut() {
                                a.complete(&claims.jti, &reply);
                            }
                            reply
                        }
                        Plan::Device(run) => {
                            self.runner.start(claims, run);
                            return None;
                        }
                    }
                }
            },
        })
    }

    /// `agent:unpair` (server keys only, enforced by the policy): forget the owner.
    fn unpair(&mut self, claims: &crate::auth::claims::AttestationClaims, now: u64) -> Reply {
        let result = self.pairing.unpair(now).map_err(|e| e.to_string());
        if result.is_ok() {
            if let Some(a) = self.authorizer.as_mut() {
                a.set_pairing(None, self.pairing.binding().workspace_id.clone());
            }
            tracing::warn!(command_id = %claims.jti, "unpaired: every scoped key is refused from now on");
        }
        crate::commands::reply_for(
            claims,
            &self.device_id,
            now,
            result
                .map(|()| serde_json::json!({ "paired": false }))
                .map_err(|e| (ErrorCode::CommandFailed, e)),
        )
    }

    async fn on_binding(&mut self, token: &[u8]) {
        let now = self.now();
        let Some(a) = self.authorizer.as_mut() else {
            tracing::warn!("owner binding ignored: no [trust] configured to verify it");
            return;
        };
        let trust = a.trust_bundle().cloned();
        let issuer = a.issuer().to_owned();
        let configured = a.configured_workspace().map(str::to_owned);
        match self.pairing.accept_binding(
            token,
            trust.as_ref(),
            &issuer,
            configured.as_deref(),
            now,
        ) {
            Ok(binding) => {
                let (owner, workspace, version) = (
                    binding.reference_id.clone(),
                    binding.workspace_id.clone(),
                    binding.version,
                );
                tracing::info!(reference_id = ?owner, version, "paired: owner binding accepted");
                a.set_pairing(owner.clone(), workspace);
                self.notify(ControlEvent::Paired {
                    reference_id: owner.unwrap_or_default(),
                    version,
                });
            }
            Err(error) => {
                tracing::warn!(%error, "owner binding refused");
                self.notify(ControlEvent::Rejected {
                    reason: error.to_string(),
                });
            }
        }
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
                let now = self.now();
                let public_key = crate::identity::public_key(&self.device_key);
                match self.pairing.start(&public_key, now) {
                    Err(e) => {
                        tracing::warn!(error = %e, "pairing refused");
                        let _ = call.events.try_send(ControlEvent::Error {
                            message: e.to_string(),
                        });
                    }
                    Ok((code, request)) => {
                        tracing::info!(expires_at = request.expires_at, "pairing session started");
                        let qr_uri = self
                            .qr_template
                            .replace("{device_id}", &self.device_id)
                            .replace("{code}", &code.display());
                        let event = ControlEvent::Code {
                            code: code.display(),
                            device_id: self.device_id.clone(),
                            expires_at: request.expires_at,
                            qr_uri,
                        };
                        // A new session supersedes the old one: its clients are told it ended.
                        self.notify(ControlEvent::Error {
                            message: "superseded by a newer pairing session".into(),
                        });
                        if call.events.try_send(event).is_ok() {
                            self.watchers.push(Watcher::new(call.events));
                        }
                        let payload = serde_json::to_vec(&request).expect("request serialises");
                        self.pairing_request = Some(payload.clone());
                        if self
                            .publisher
                            .publish(self.topics.pairing_request(), payload, false)
                            .await
                            .is_err()
                        {
                            tracing::warn!("pairing request not published: link closed");
                        }
                        self.on_waiting_tick();
                    }
                }
            }
        }
    }

    fn on_waiting_tick(&mut self) {
        let now = self.now();
        if !self.pairing.is_pending(now) {
            self.notify(ControlEvent::Expired);
            return;
        }
        let remaining = self
            .pairing
            .pending_expires_at()
            .unwrap_or(now)
            .saturating_sub(now);
        let link = match &self.link.borrow().state {
            LinkState::Connected => "connected".to_string(),
            other => serde_json::to_value(other)
                .ok()
                .and_then(|v| v["state"].as_str().map(str::to_owned))
                .unwrap_or_default(),
        };
        self.notify(ControlEvent::Waiting {
            remaining_secs: remaining,
            link,
        });
    }

    /// Offers `event` to every pairing client without waiting ([`Watcher::offer`]); final
    /// events end their sessions.
    fn notify(&mut self, event: ControlEvent) {
        let now = tokio::time::Instant::now();
        self.watchers.retain_mut(|w| w.offer(&event, now));
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

        let key = SigningKey::from_bytes(&[7; 32]);
        let payload = br#"{"jti":"cmd_01JDX3WQ4E7Z"}"#;
        let token = crate::auth::jws::sign(
            &key,
            Some("k1"),
            crate::auth::claims::ATTESTATION_TYP,
            payload,
        );
        let reply: serde_json::Value =
            serde_json::from_slice(&shed_reply(token.as_bytes(), "gw-1", 16).to_bytes()).unwrap();
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

        let garbage: serde_json::Value =
            serde_json::from_slice(&shed_reply(b"not a token", "gw-1", 20).to_bytes()).unwrap();
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

    fn waiting(n: u64) -> ControlEvent {
        ControlEvent::Waiting {
            remaining_secs: n,
            link: "connected".into(),
        }
    }

    fn paired() -> ControlEvent {
        ControlEvent::Paired {
            reference_id: "user-a".into(),
            version: 1,
        }
    }

    #[test]
    fn a_full_queue_skips_progress_events_without_dropping_the_client() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut w = Watcher::new(tx);
        let now = tokio::time::Instant::now();
        for n in 0..10 {
            assert!(w.offer(&waiting(n), now), "event {n}");
        }
        // The first two fitted; the rest were skipped, not queued behind them.
        assert_eq!(rx.try_recv().unwrap(), waiting(0));
        assert_eq!(rx.try_recv().unwrap(), waiting(1));
        assert!(rx.try_recv().is_err());
        assert!(w.offer(&waiting(10), now));
        assert_eq!(rx.try_recv().unwrap(), waiting(10));
    }

    #[test]
    fn a_final_event_that_does_not_fit_is_delivered_once_there_is_room() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut w = Watcher::new(tx);
        let now = tokio::time::Instant::now();
        assert!(w.offer(&waiting(1), now));
        assert!(w.offer(&paired(), now), "kept to retry the final event");
        assert!(
            w.offer(&waiting(2), now + Duration::from_secs(5)),
            "still full"
        );
        assert_eq!(rx.try_recv().unwrap(), waiting(1));
        // The next offer (the 5 s tick) delivers the final event, not the newer one, and ends
        // the client.
        assert!(!w.offer(&waiting(3), now + Duration::from_secs(10)));
        assert_eq!(rx.try_recv().unwrap(), paired());
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_client_that_never_reads_is_dropped_after_the_grace_period() {
        let (tx, _rx) = mpsc::channel(1);
        let mut w = Watcher::new(tx);
        let now = tokio::time::Instant::now();
        assert!(w.offer(&waiting(1), now));
        assert!(w.offer(&ControlEvent::Expired, now));
        assert!(w.offer(&waiting(2), now + FINAL_GRACE - Duration::from_secs(1)));
        assert!(!w.offer(&waiting(3), now + FINAL_GRACE));
    }

    #[test]
    fn a_client_that_left_is_dropped_at_once() {
        let (tx, rx) = mpsc::channel(8);
        let mut w = Watcher::new(tx);
        drop(rx);
        assert!(!w.offer(&waiting(1), tokio::time::Instant::now()));
    }

    #[test]
    fn a_delivered_final_event_ends_the_client() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut w = Watcher::new(tx);
        assert!(!w.offer(&paired(), tokio::time::Instant::now()));
        assert_eq!(rx.try_recv().unwrap(), paired());
    }
}
