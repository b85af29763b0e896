//! The inbound side of the agent: one task that owns the authorisation and pairing state and
//! handles, in order, everything that can change it.
//!
//! broker → link → **dispatch** → auth → commands → reply via link.
//!
//! A single owner means no locks: trust bundles, owner bindings, commands and `pair` requests
//! from the control socket are serialised through this task's select loop.

use std::collections::HashMap;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, oneshot, watch};

use crate::auth::{Authorization, Authorizer};
use crate::commands::{CommandSettings, DeviceRun, Plan};
use crate::control::{ControlCall, ControlEvent, ControlRequest};
use crate::drivers::DriverRegistry;
use crate::link::{Inbound, LinkState, LinkStatus, Publisher};
use crate::pairing::PairingState;
use crate::reply::{ErrorCode, Reply};
use crate::service::Shutdown;
use crate::topics::Topics;

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

pub struct Dispatcher {
    pub device_id: String,
    pub topics: Topics,
    pub publisher: Publisher,
    pub link: watch::Receiver<LinkStatus>,
    pub authorizer: Option<Authorizer>,
    pub pairing: PairingState,
    pub device_key: SigningKey,
    /// `{device_id}` and `{code}` are substituted; shown as a QR code by `pair`.
    pub qr_template: String,
    pub registry: DriverRegistry,
    pub command_settings: CommandSettings,
    /// Clients following the current pairing session. Never awaited: see [`Watcher`].
    watchers: Vec<Watcher>,
    /// The command running on each device, with the way to supersede it.
    running: HashMap<String, Running>,
    completions_tx: mpsc::Sender<Completion>,
    completions_rx: Option<mpsc::Receiver<Completion>>,
    /// Replies to publish once the link is up (interrupted commands found at start).
    announcements: Vec<Vec<u8>>,
    /// The pending pairing request, sent again after a reconnect so the platform has it.
    pairing_request: Option<Vec<u8>>,
    /// The agent's stop: from then on a running device command has no outcome to report
    /// (PROTOCOL 4.6).
    stop: Shutdown,
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

struct Running {
    command_id: String,
    cancel: oneshot::Sender<(ErrorCode, String)>,
}

/// A device command that finished, from its task back to the dispatcher.
struct Completion {
    command_id: String,
    device_id: String,
    reply: Vec<u8>,
}

impl Dispatcher {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        device_id: String,
        topics: Topics,
        publisher: Publisher,
        link: watch::Receiver<LinkStatus>,
        mut authorizer: Option<Authorizer>,
        pairing: PairingState,
        device_key: SigningKey,
        qr_template: String,
        registry: DriverRegistry,
        command_settings: CommandSettings,
        interrupted: &[String],
        stop: Shutdown,
    ) -> Dispatcher {
        let mut announcements = Vec::new();
        if let Some(a) = authorizer.as_mut() {
            let now = a.now();
            for (id, issued_at, target) in a.interrupted(interrupted) {
                let reply = crate::commands::interrupted_reply(
                    &id,
                    target.as_deref().unwrap_or(&device_id),
                    issued_at,
                    now,
                )
                .to_bytes();
                tracing::warn!(command_id = %id, "command interrupted by the last stop; reporting it failed");
                a.complete(&id, &reply);
                announcements.push(reply);
            }
        }
        let (completions_tx, completions_rx) = mpsc::channel(64);
        if let Some(a) = authorizer.as_mut() {
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
            running: HashMap::new(),
            completions_tx,
            completions_rx: Some(completions_rx),
            announcements,
            pairing_request: None,
            stop,
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
        let mut completions = self.completions_rx.take().expect("run once");
        let mut devices = self.registry.subscribe();
        let mut link = self.link.clone();
        loop {
            tokio::select! {
                message = inbound.recv() => match message {
                    Some(m) if inbound.len() >= SHED_AT && m.topic == self.topics.commands() => {
                        if !self.shed(&m, inbound.len()).await { return }
                    }
                    Some(m) => if !self.on_message(m).await { return },
                    None => return,
                },
                Some(done) = completions.recv() => self.on_completion(done).await,
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
                        for reply in std::mem::take(&mut self.announcements) {
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
        if self
            .running
            .get(&done.device_id)
            .is_some_and(|r| r.command_id == done.command_id)
        {
            self.running.remove(&done.device_id);
        }
        if let Some(a) = self.authorizer.as_mut() {
            a.complete(&done.command_id, &done.reply);
        }
        let _ = self
            .publisher
            .publish(self.topics.replies(), done.reply, false)
            .await;
    }

    /// Starts a device command in its own task, superseding whatever that device was running.
    fn start_on_device(
        &mut self,
        claims: Box<crate::auth::claims::AttestationClaims>,
        run: DeviceRun,
    ) {
        let (cancel_tx, cancel_rx) = oneshot::channel();
        let device_id = run.device_id.clone();
        if let Some(previous) = self.running.insert(
            device_id.clone(),
            Running {
                command_id: claims.jti.clone(),
                cancel: cancel_tx,
            },
        ) {
            tracing::info!(command_id = %previous.command_id, superseded_by = %claims.jti, "command superseded");
            let _ = previous.cancel.send((
                ErrorCode::Superseded,
                format!("superseded by command {}", claims.jti),
            ));
        }
        let completions = self.completions_tx.clone();
        let stop = self.stop.clone();
        tokio::spawn(async move {
            let Some(outcome) = crate::commands::run_on_device(&claims, run, cancel_rx, stop).await
            else {
                // Neither answered nor recorded: its replay entry stays "seen, no reply", so the
                // next start reports it `interrupted` (PROTOCOL 4.6).
                tracing::warn!(command_id = %claims.jti, device_id = %device_id, "agent stopping: command cut short; it is reported interrupted after the restart");
                return;
            };
            let now = crate::link::unix_now();
            if let Err((code, message)) = &outcome {
                tracing::warn!(command_id = %claims.jti, ?code, %message, "command failed");
            } else {
                tracing::info!(command_id = %claims.jti, device_id = %device_id, "command succeeded");
            }
            let reply = crate::commands::reply_for(&claims, &device_id, now, outcome).to_bytes();
            let _ = completions
                .send(Completion {
                    command_id: claims.jti.clone(),
                    device_id,
                    reply,
                })
                .await;
        });
    }

    /// Returns false when the link is gone for good.
    async fn on_message(&mut self, message: Inbound) -> bool {
        if message.topic == Topics::trust_bundle() {
            if let Some(a) = self.authorizer.as_mut() {
                let _ = a.offer_trust_bundle(&message.payload);
            }
            return true;
        }
        if message.topic == self.topics.pairing_binding() {
            self.on_binding(&message.payload).await;
            return true;
        }
        if message.topic != self.topics.commands() {
            tracing::debug!(topic = %message.topic, "message on unexpected topic ignored");
            return true;
        }
        let reply = match self.authorizer.as_mut() {
            None => Reply::refused(
                None,
                &self.device_id,
                ErrorCode::Unauthenticated,
                "no platform trust root is configured; commands cannot be verified",
            )
            .to_bytes(),
            Some(a) => match a.authorize(&message.payload) {
                Authorization::Reply(reply) => reply,
                Authorization::InProgress => return true,
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
                            self.start_on_device(claims, run);
                            return true;
                        }
                    }
                }
            },
        };
        self.publisher
            .publish(self.topics.replies(), reply, false)
            .await
            .is_ok()
    }

    /// Refuses a command unread because `waiting` more messages are queued behind it. Verifying
    /// costs a signature check and a durable replay record each; a burst larger than the queue
    /// would otherwise overflow it and lose commands without any answer. The refusal carries
    /// the command's (unverified) id so the platform can match it and retry; it is never
    /// recorded in the replay journal, so the retry is judged afresh.
    async fn shed(&mut self, message: &Inbound, waiting: usize) -> bool {
        let jti = crate::auth::jws::peek_jti(&message.payload, crate::auth::MAX_ATTESTATION_BYTES);
        tracing::warn!(
            command_id = jti.as_deref().unwrap_or("?"),
            waiting,
            "gateway busy: command shed unread"
        );
        let reply = Reply::Refused {
            command_id: jti,
            device_id: self.device_id.clone(),
            status: ErrorCode::Unavailable.status(),
            code: ErrorCode::Unavailable,
            message: format!("gateway busy: {waiting} messages waiting; command not read, retry"),
            retry_after: Some(SHED_RETRY_AFTER),
        };
        self.publisher
            .publish(self.topics.replies(), reply.to_bytes(), false)
            .await
            .is_ok()
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
