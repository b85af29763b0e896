//! The inbound side of the agent: one task that owns the authorisation and pairing state and
//! handles, in order, everything that can change it.
//!
//! broker → link → **dispatch** → auth → commands → reply via link.
//!
//! A single owner means no locks: trust bundles, owner bindings, commands and `pair` requests
//! from the control socket are serialised through this task's select loop.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::sync::{mpsc, watch};

use crate::auth::{Authorization, Authorizer};
use crate::control::{ControlCall, ControlEvent, ControlRequest};
use crate::link::{Inbound, LinkState, LinkStatus, Publisher};
use crate::pairing::PairingState;
use crate::reply::{ErrorCode, Reply};
use crate::topics::Topics;

/// How often a pairing client is told the session is still waiting.
const WAITING_EVERY: Duration = Duration::from_secs(5);

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
    /// Clients following the current pairing session.
    watchers: Vec<mpsc::Sender<ControlEvent>>,
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
    ) -> Dispatcher {
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
            watchers: Vec::new(),
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
        loop {
            tokio::select! {
                message = inbound.recv() => match message {
                    Some(m) => if !self.on_message(m).await { return },
                    None => return,
                },
                Some(call) = calls.recv() => self.on_call(call).await,
                _ = waiting.tick(), if !self.watchers.is_empty() => self.on_waiting_tick().await,
            }
        }
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
                    let reply = if claims.command.slug == crate::auth::SERVER_ONLY_SLUG {
                        self.unpair(&claims, now)
                    } else {
                        crate::commands::execute(&claims, &self.device_id, now)
                    }
                    .to_bytes();
                    if let Some(a) = self.authorizer.as_mut() {
                        a.complete(&claims.jti, &reply);
                    }
                    reply
                }
            },
        };
        self.publisher
            .publish(self.topics.replies(), reply, false)
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
        crate::commands::builtin_reply(
            claims,
            &self.device_id,
            now,
            result.map(|()| serde_json::json!({ "paired": false })),
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
                })
                .await;
            }
            Err(error) => {
                tracing::warn!(%error, "owner binding refused");
                self.notify(ControlEvent::Rejected {
                    reason: error.to_string(),
                })
                .await;
            }
        }
    }

    async fn on_call(&mut self, call: ControlCall) {
        match call.request {
            ControlRequest::Pair => {
                let now = self.now();
                let public_key = crate::identity::public_key(&self.device_key);
                match self.pairing.start(&public_key, now) {
                    Err(e) => {
                        tracing::warn!(error = %e, "pairing refused");
                        let _ = call
                            .events
                            .send(ControlEvent::Error {
                                message: e.to_string(),
                            })
                            .await;
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
                        })
                        .await;
                        if call.events.send(event).await.is_ok() {
                            self.watchers.push(call.events);
                        }
                        let payload = serde_json::to_vec(&request).expect("request serialises");
                        if self
                            .publisher
                            .publish(self.topics.pairing_request(), payload, false)
                            .await
                            .is_err()
                        {
                            tracing::warn!("pairing request not published: link closed");
                        }
                        self.on_waiting_tick().await;
                    }
                }
            }
        }
    }

    async fn on_waiting_tick(&mut self) {
        let now = self.now();
        if !self.pairing.is_pending(now) {
            self.notify(ControlEvent::Expired).await;
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
        })
        .await;
    }

    /// Sends `event` to every pairing client; final events end their sessions.
    async fn notify(&mut self, event: ControlEvent) {
        let mut alive = Vec::with_capacity(self.watchers.len());
        for w in self.watchers.drain(..) {
            if w.send(event.clone()).await.is_ok() && !event.is_final() {
                alive.push(w);
            }
        }
        self.watchers = alive;
    }
}
