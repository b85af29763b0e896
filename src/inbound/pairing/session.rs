//! The pairing session: the one owner of the pairing state, and the `pair` clients following it.
//!
//! [`PairingSession`] holds the stored binding ([`PairingState`]), the pending request (sent
//! again after a reconnect, so a restarted broker or platform still has it) and the clients of
//! the control socket that watch the session. Authorisation borrows the owner from it at each
//! decision ([`PairingSession::owner`]); nothing copies it, so no command is ever judged against
//! a stale owner.
//!
//! It does no I/O of its own: each method returns what the router must publish (a pairing
//! request) and only ever *tries* to queue events to clients ([`Watcher`]), so a client that
//! stops reading can never hold up the inbound task.

use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio::sync::mpsc;

use super::control::ControlEvent;
use super::PairingState;
use crate::inbound::auth::{Authorizer, Owner};
use crate::storage::StorageError;

/// How often a pairing client is told the session is still waiting.
pub(crate) const WAITING_EVERY: Duration = Duration::from_secs(5);
/// How long a final event that found a pairing client's queue full is retried (at each waiting
/// tick) before that client is dropped (docs/PROTOCOL.md 12, "Slow clients").
const FINAL_GRACE: Duration = Duration::from_secs(30);

/// The pairing state and the session around it (see the module docs).
pub(crate) struct PairingSession {
    state: PairingState,
    gateway_id: String,
    device_key: SigningKey,
    /// `{device_id}` and `{code}` are substituted; shown as a QR code by `pair`.
    qr_template: String,
    /// Clients following the current session. Never awaited: see [`Watcher`].
    watchers: Vec<Watcher>,
    /// The pending pairing request as published.
    request: Option<Vec<u8>>,
}

impl PairingSession {
    pub(crate) fn new(
        state: PairingState,
        gateway_id: &str,
        device_key: SigningKey,
        qr_template: &str,
    ) -> PairingSession {
        PairingSession {
            state,
            gateway_id: gateway_id.to_owned(),
            device_key,
            qr_template: qr_template.to_owned(),
            watchers: Vec::new(),
            request: None,
        }
    }

    /// The owner in force, as authorisation reads it.
    pub(crate) fn owner(&self) -> Owner<'_> {
        let binding = self.state.binding();
        Owner {
            reference_id: binding.reference_id.as_deref(),
            workspace_id: binding.workspace_id.as_deref(),
        }
    }

    /// Whether any client follows the session (the router ticks only then).
    pub(crate) fn is_watched(&self) -> bool {
        !self.watchers.is_empty()
    }

    /// The pending request to publish again after a reconnect, while it is still pending.
    pub(crate) fn pending_request(&self, now: u64) -> Option<Vec<u8>> {
        self.request.clone().filter(|_| self.state.is_pending(now))
    }

    /// Starts a session for the client behind `events`; returns the pairing request to
    /// publish, or `None` when the session could not start (the client has been told why).
    pub(crate) fn start(
        &mut self,
        events: mpsc::Sender<ControlEvent>,
        now: u64,
        link: &str,
    ) -> Option<Vec<u8>> {
        let public_key = crate::agent::identity::public_key(&self.device_key);
        let (code, request) = match self.state.start(&public_key, now) {
            Ok(started) => started,
            Err(e) => {
                tracing::warn!(error = %e, "pairing refused");
                // A fresh queue: room for this one event unless the client already left.
                let _ = events.try_send(ControlEvent::Error {
                    message: e.to_string(),
                });
                return None;
            }
        };
        tracing::info!(expires_at = request.expires_at, "pairing session started");
        let qr_uri = self
            .qr_template
            .replace("{device_id}", &self.gateway_id)
            .replace("{code}", &code.display());
        let event = ControlEvent::Code {
            code: code.display(),
            device_id: self.gateway_id.clone(),
            expires_at: request.expires_at,
            qr_uri,
        };
        // A new session supersedes the old one: its clients are told it ended.
        self.notify(ControlEvent::Error {
            message: "superseded by a newer pairing session".into(),
        });
        if events.try_send(event).is_ok() {
            self.watchers.push(Watcher::new(events));
        }
        let payload = serde_json::to_vec(&request).expect("request serialises");
        self.request = Some(payload.clone());
        self.tick(now, link);
        Some(payload)
    }

    /// Tells the clients how long the session has left and how the link is (`link`, as in
    /// status.json's `state`), or that it expired.
    pub(crate) fn tick(&mut self, now: u64, link: &str) {
        if !self.state.is_pending(now) {
            self.notify(ControlEvent::Expired);
            return;
        }
        let remaining = self
            .state
            .pending_expires_at()
            .unwrap_or(now)
            .saturating_sub(now);
        self.notify(ControlEvent::Waiting {
            remaining_secs: remaining,
            link: link.to_owned(),
        });
    }

    /// Judges an owner binding from the platform against the trust `auth` holds; on success
    /// the new owner is in force for the very next command.
    pub(crate) fn on_binding(&mut self, token: &[u8], auth: &Authorizer, now: u64) {
        let accepted = self.state.accept_binding(
            token,
            auth.trust_bundle(),
            auth.issuer(),
            auth.configured_workspace(),
            now,
        );
        match accepted {
            Ok(binding) => {
                let (owner, version) = (binding.reference_id.clone(), binding.version);
                tracing::info!(reference_id = ?owner, version, "paired: owner binding accepted");
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

    /// Forgets the owner (`agent:unpair`): from the next command on, every scoped key is
    /// refused.
    pub(crate) fn unpair(&mut self, now: u64) -> Result<(), StorageError> {
        self.state.unpair(now)
    }

    /// Offers `event` to every client without waiting ([`Watcher::offer`]); final events end
    /// their sessions.
    fn notify(&mut self, event: ControlEvent) {
        let now = tokio::time::Instant::now();
        self.watchers.retain_mut(|w| w.offer(&event, now));
    }
}

/// A `pair` client. Its events go into a bounded queue that the control socket drains into the
/// client's socket; the session only ever *tries* to queue, so a client that stops reading
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

    fn session(dir: &std::path::Path) -> PairingSession {
        let state = PairingState::open(dir, "gw-1", 300).unwrap();
        PairingSession::new(
            state,
            "gw-1",
            SigningKey::from_bytes(&[3; 32]),
            "https://connect.example/pair?d={device_id}&c={code}",
        )
    }

    #[test]
    fn a_new_session_tells_its_client_the_code_then_waits_and_supersedes_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(dir.path());
        let (first_tx, mut first) = mpsc::channel(8);
        let published = s.start(first_tx, 1_000, "connected").expect("started");
        let request: serde_json::Value = serde_json::from_slice(&published).unwrap();
        assert_eq!(request["deviceId"], "gw-1");
        assert_eq!(request["expiresAt"], 1_300);
        let ControlEvent::Code { qr_uri, code, .. } = first.try_recv().unwrap() else {
            panic!("first event is the code")
        };
        assert_eq!(
            qr_uri,
            format!("https://connect.example/pair?d=gw-1&c={code}")
        );
        assert_eq!(
            first.try_recv().unwrap(),
            ControlEvent::Waiting {
                remaining_secs: 300,
                link: "connected".into()
            }
        );
        assert_eq!(
            s.pending_request(1_299),
            Some(published),
            "sent again byte for byte"
        );
        assert_eq!(s.pending_request(1_300), None, "expired: not sent again");

        let (second_tx, _second) = mpsc::channel(8);
        s.start(second_tx, 1_010, "connected").expect("started");
        assert_eq!(
            first.try_recv().unwrap(),
            ControlEvent::Error {
                message: "superseded by a newer pairing session".into()
            }
        );
        assert_eq!(
            s.watchers.len(),
            1,
            "the superseded client is no longer followed"
        );
    }

    #[test]
    fn an_expired_session_ends_its_clients_at_the_next_tick() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(dir.path());
        let (tx, mut rx) = mpsc::channel(8);
        s.start(tx, 1_000, "connecting").expect("started");
        while rx.try_recv().is_ok() {}
        s.tick(1_300, "connected");
        assert_eq!(rx.try_recv().unwrap(), ControlEvent::Expired);
        assert!(!s.is_watched());
    }

    #[test]
    fn the_owner_authorisation_reads_is_the_stored_binding_itself() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = session(dir.path());
        assert_eq!(s.owner(), Owner::UNPAIRED);
        s.state.binding = super::super::Binding {
            version: 2,
            reference_id: Some("user-a".into()),
            workspace_id: Some("ws-1".into()),
            issued_at: 1,
            token: None,
        };
        assert_eq!(
            s.owner(),
            Owner {
                reference_id: Some("user-a"),
                workspace_id: Some("ws-1")
            }
        );
        s.unpair(2_000).unwrap();
        assert_eq!(
            s.owner().reference_id,
            None,
            "unpairing takes effect at once"
        );
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
