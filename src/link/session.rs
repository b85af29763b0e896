//! The link's bookkeeping across its connections, apart from any I/O.
//!
//! The outbox trusts the link with one promise: a [`Delivery`](super::Delivery) resolves only on
//! the PUBACK of *its own* PUBLISH, and fails when the connection it was queued on ends. rumqttc
//! assigns packet ids inside its event loop, out of sight of whoever published, so keeping that
//! promise takes bookkeeping: the order in which requests entered rumqttc's channel, which packet
//! id each one went out with, and which are still waiting for an acknowledgement. The same
//! events also drive the reconnect backoff and the status everyone watches.
//!
//! Following rumqttc's own `state.rs`, [`Session`] does no I/O: the event-loop task polls
//! rumqttc, then calls exactly one method for the event it got, and does what the answer says
//! (sleep, log, publish the new status). So every guarantee above is a unit test here, with no
//! broker, no socket and no runtime; the tests over mosquitto (tests/link.rs) only check the
//! wiring.
//!
//! [`Session`] is shared, under one mutex, with the publishers: a publisher records its request
//! under the same lock in which it hands the request to rumqttc, and the event loop discards
//! rumqttc's queue under the same lock in which it fails the recorded requests, so no request can
//! slip in between (see the module docs of [`super`]).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::{LinkState, LinkStatus};
use crate::model::backoff::Backoff;

/// The sending half of a [`Delivery`](super::Delivery): sending resolves it, dropping fails it.
pub(crate) type Resolver = oneshot::Sender<()>;

/// Delivery and connection bookkeeping of one link, from start to stop.
#[derive(Debug)]
pub(crate) struct Session {
    status: LinkStatus,
    backoff: Backoff,
    /// Requests in rumqttc's channel, in the order they entered it; not yet sent.
    recorded: VecDeque<Resolver>,
    /// Requests whose PUBLISH went out, by packet id, waiting for their PUBACK.
    in_flight: HashMap<u16, Resolver>,
    /// Set once the event loop has stopped: nothing recorded from now on would ever leave.
    stopped: bool,
    /// Whether the broker's session holds our subscriptions.
    subscriptions: Subscriptions,
}

/// What the link knows of the broker's copy of our subscriptions (PROTOCOL 1.2).
///
/// With a persistent session the broker keeps them across connections, and subscribing again
/// would only make it re-send the retained trust bundle and site policy, the largest part of a
/// reconnect. But the link may skip the SUBSCRIBE only when it *knows* they are held: its one
/// SUBSCRIBE (all four filters) was granted at QoS 1 for every filter on a connection of this
/// process, and the broker said at CONNACK that it still has that session. A refused or
/// downgraded filter, a broker that forgot the session, or a new process (whose topics may
/// differ from the last version's) all mean subscribing again.
///
/// Subscribing again is also how a clean session heals a lost update: every reconnect delivers
/// the current bundle and policy. A persistent session keeps that healing in two ways: an inbound
/// message the link had to drop (it may have been a bundle behind a burst of queued commands)
/// forgets the subscriptions, and so does their age passing [`RESUBSCRIBE_AFTER`].
#[derive(Debug)]
struct Subscriptions {
    /// `broker.persistent_session`: without it nothing is ever held, whatever a broker answers.
    persistent: bool,
    /// When the broker last granted all of them; `None` until then and once forgotten.
    granted_at: Option<Instant>,
}

/// A reconnect with a persistent session subscribes again once the last grant is this old, so
/// the retained bundle and policy reach the gateway at least this often across reconnects even
/// if a queued update was lost (a broker drops new messages from a full queue): a revocation is
/// then late by an hour at most, for at most one SUBSCRIBE and bundle (about 700 B) an hour.
const RESUBSCRIBE_AFTER: Duration = Duration::from_secs(3600);

/// Why a publisher may not record a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Stopped;

impl Session {
    /// `persistent` is `broker.persistent_session`: whether subscriptions can ever be held.
    pub(crate) fn new(broker: String, backoff: Backoff, persistent: bool) -> Self {
        Session {
            status: LinkStatus {
                state: LinkState::Connecting { attempt: 1 },
                broker,
                connects: 0,
                failures: 0,
                last_error: None,
                connected_since_unix: None,
            },
            backoff,
            recorded: VecDeque::new(),
            in_flight: HashMap::new(),
            stopped: false,
            subscriptions: Subscriptions {
                persistent,
                granted_at: None,
            },
        }
    }

    /// What the link reports about itself: publish it after every connection event.
    pub(crate) fn status(&self) -> &LinkStatus {
        &self.status
    }

    pub(crate) fn is_connected(&self) -> bool {
        self.status.state == LinkState::Connected
    }

    /// Publisher side, before handing a request to rumqttc: whether it could ever leave.
    pub(crate) fn accepting(&self) -> Result<(), Stopped> {
        if self.stopped {
            Err(Stopped)
        } else {
            Ok(())
        }
    }

    /// Publisher side, once rumqttc has taken the request (under the same lock as
    /// [`Session::accepting`]): it will be the next PUBLISH after those recorded before it.
    pub(crate) fn record(&mut self, resolver: Resolver) {
        self.recorded.push_back(resolver);
    }

    /// A connection attempt is about to start; returns its number (1 for the first, and again
    /// for the first after a stable connection).
    pub(crate) fn connecting(&mut self) -> u32 {
        let attempt = self.backoff.attempt() + 1;
        self.status.state = LinkState::Connecting { attempt };
        attempt
    }

    /// CONNACK at `at` (`unix` on the wall clock), with the broker's session-present flag.
    /// Counting the connect in the status is what makes the announcer publish the birth again,
    /// and subscribe unless [`Session::subscriptions_held`] (see [`Announcements`]).
    pub(crate) fn on_connack(&mut self, at: Instant, unix: u64, session_present: bool) {
        let subs = &mut self.subscriptions;
        let held = subs.persistent
            && session_present
            && subs
                .granted_at
                .is_some_and(|t| at.saturating_duration_since(t) < RESUBSCRIBE_AFTER);
        if !held {
            subs.granted_at = None;
        }
        // Not a reset: only a connection that lasts counts (see `Backoff`).
        self.backoff.connected(at);
        self.status.state = LinkState::Connected;
        self.status.connects += 1;
        self.status.connected_since_unix = Some(unix);
    }

    /// rumqttc sent a PUBLISH with `pkid`: it is the oldest recorded request.
    pub(crate) fn on_outgoing_publish(&mut self, pkid: u16) {
        if let Some(resolver) = self.recorded.pop_front() {
            self.in_flight.insert(pkid, resolver);
        }
    }

    /// A PUBACK for `pkid`: resolves that delivery, and only that one. Returns whether one was
    /// waiting (a PUBACK for an id we never sent, or already acknowledged, changes nothing).
    pub(crate) fn on_puback(&mut self, pkid: u16) -> bool {
        match self.in_flight.remove(&pkid) {
            Some(resolver) => {
                let _ = resolver.send(());
                true
            }
            None => false,
        }
    }

    /// The SUBACK of our SUBSCRIBE at `at`: `granted` when every filter was granted at QoS 1.
    pub(crate) fn on_suback(&mut self, at: Instant, granted: bool) {
        let subs = &mut self.subscriptions;
        subs.granted_at = (subs.persistent && granted).then_some(at);
    }

    /// The link dropped an inbound message (a full queue): whatever it was, the next
    /// connection subscribes again so a retained one comes back.
    pub(crate) fn on_inbound_dropped(&mut self) {
        self.subscriptions.granted_at = None;
    }

    /// Whether the broker's session is known to hold every subscription, so the connection
    /// that just started needs no SUBSCRIBE.
    pub(crate) fn subscriptions_held(&self) -> bool {
        self.subscriptions.granted_at.is_some()
    }

    /// The connection failed (or an attempt did) at `at`. Every recorded or unacknowledged
    /// publish is given up, so each of their deliveries fails; the caller empties rumqttc's queue
    /// under the same lock. MQTT would have a persistent session resend them, but a QoS 1
    /// publish leaves no state at the broker to resume, and telemetry, the one kind that must
    /// arrive, is sent again from the outbox; resending here would also break the pairing of
    /// PUBLISHes with recorded requests. Returns the delay before the next attempt.
    pub(crate) fn on_connection_lost(&mut self, at: Instant, error: String) -> Duration {
        self.fail_outstanding();
        let delay = self.backoff.next_delay_after(at);
        self.status.state = LinkState::WaitingToRetry {
            retry_in_ms: delay.as_millis() as u64,
            error: error.clone(),
        };
        self.status.failures += 1;
        self.status.last_error = Some(error);
        self.status.connected_since_unix = None;
        delay
    }

    /// The event loop stopped (or was abandoned): every outstanding delivery fails, and so does
    /// every later publish.
    pub(crate) fn on_stop(&mut self) {
        self.stopped = true;
        self.fail_outstanding();
        self.status.state = LinkState::Stopped;
        self.status.connected_since_unix = None;
    }

    fn fail_outstanding(&mut self) {
        // Dropping a resolver fails its delivery.
        self.recorded.clear();
        self.in_flight.clear();
    }
}

/// When the announcer must act on a new connection: once after every CONNACK, to publish the
/// birth and, unless the broker's session holds them ([`Session::subscriptions_held`]), to
/// subscribe.
///
/// The count of connects in the status, not the `Connected` state (which a watcher may see only
/// once across a quick drop and reconnect), is what says a connection is new.
#[derive(Debug, Default)]
pub(crate) struct Announcements {
    served: u64,
}

impl Announcements {
    /// Whether the connection `status` describes still needs its subscriptions and birth; true
    /// at most once per connect.
    pub(crate) fn due(&mut self, status: &LinkStatus) -> bool {
        let due = status.state == LinkState::Connected && status.connects != self.served;
        if due {
            self.served = status.connects;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::oneshot::error::TryRecvError;

    use super::*;
    use crate::link::Delivery;
    use crate::model::backoff::STABLE_AFTER;

    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    fn session() -> Session {
        persistent_session(false)
    }

    fn persistent_session(persistent: bool) -> Session {
        Session::new(
            "broker:8883".into(),
            Backoff::with_seed(MIN, MAX, 11),
            persistent,
        )
    }

    /// What a publisher does: record a request and keep its delivery.
    fn publish(s: &mut Session) -> Delivery {
        let (tx, rx) = oneshot::channel();
        s.accepting().expect("accepting");
        s.record(tx);
        rx
    }

    fn resolved(d: &mut Delivery) -> bool {
        d.try_recv().is_ok()
    }

    fn failed(d: &mut Delivery) -> bool {
        matches!(d.try_recv(), Err(TryRecvError::Closed))
    }

    fn pending(d: &mut Delivery) -> bool {
        matches!(d.try_recv(), Err(TryRecvError::Empty))
    }

    fn connected() -> Session {
        connected_at(false, Instant::now(), false)
    }

    /// A first connection at `at`, `persistent` or not, the broker answering `session_present`.
    fn connected_at(persistent: bool, at: Instant, session_present: bool) -> Session {
        let mut s = persistent_session(persistent);
        s.connecting();
        s.on_connack(at, 1_700_000_000, session_present);
        s
    }

    #[test]
    fn the_nth_publish_resolves_on_its_own_puback() {
        let mut s = connected();
        let mut d: Vec<Delivery> = (0..3).map(|_| publish(&mut s)).collect();
        for pkid in [7, 8, 9] {
            s.on_outgoing_publish(pkid);
        }
        // Acknowledged out of order: each PUBACK resolves the request that went out with its id.
        assert!(s.on_puback(8));
        assert!(pending(&mut d[0]) && resolved(&mut d[1]) && pending(&mut d[2]));
        assert!(s.on_puback(9));
        assert!(pending(&mut d[0]) && resolved(&mut d[2]));
        assert!(s.on_puback(7));
        assert!(resolved(&mut d[0]));
    }

    #[test]
    fn a_delivery_stays_pending_until_its_publish_is_acknowledged() {
        let mut s = connected();
        let mut first = publish(&mut s);
        let mut second = publish(&mut s);
        s.on_outgoing_publish(1);
        // The second request is still in rumqttc's channel: no PUBACK can be its own yet.
        assert!(s.on_puback(1));
        assert!(resolved(&mut first));
        assert!(!s.on_puback(2), "nothing went out with packet id 2");
        assert!(pending(&mut second));
    }

    #[test]
    fn a_puback_for_an_unknown_packet_id_is_ignored() {
        let mut s = connected();
        let mut d = publish(&mut s);
        s.on_outgoing_publish(4);
        assert!(!s.on_puback(5));
        assert!(pending(&mut d));
        assert!(s.on_puback(4));
        // A duplicate PUBACK for an id already acknowledged changes nothing either.
        assert!(!s.on_puback(4));
        assert!(resolved(&mut d));
    }

    #[test]
    fn an_outgoing_publish_nobody_recorded_resolves_nothing() {
        let mut s = connected();
        s.on_outgoing_publish(3);
        assert!(!s.on_puback(3));
        // A request recorded afterwards pairs with the next PUBLISH, not with the earlier one.
        let mut d = publish(&mut s);
        s.on_outgoing_publish(4);
        assert!(!s.on_puback(3));
        assert!(s.on_puback(4));
        assert!(resolved(&mut d));
    }

    #[test]
    fn a_lost_connection_fails_every_outstanding_delivery() {
        let mut s = connected();
        let mut acked = publish(&mut s);
        let mut in_flight = publish(&mut s);
        let mut queued = publish(&mut s);
        s.on_outgoing_publish(1);
        s.on_outgoing_publish(2);
        s.on_puback(1);
        s.on_connection_lost(Instant::now(), "connection reset".into());
        assert!(resolved(&mut acked));
        assert!(failed(&mut in_flight), "sent, never acknowledged");
        assert!(failed(&mut queued), "still in rumqttc's channel");
        // A PUBACK arriving late for the old connection's packet id resolves nothing.
        assert!(!s.on_puback(2));
    }

    #[test]
    fn packet_ids_of_a_lost_connection_do_not_resolve_the_next_ones() {
        let mut s = connected();
        let mut old = publish(&mut s);
        s.on_outgoing_publish(1);
        s.on_connection_lost(Instant::now(), "timeout".into());
        s.connecting();
        s.on_connack(Instant::now(), 1_700_000_010, false);
        // The new session numbers from 1 again.
        let mut new = publish(&mut s);
        s.on_outgoing_publish(1);
        assert!(failed(&mut old));
        assert!(pending(&mut new));
        assert!(s.on_puback(1));
        assert!(resolved(&mut new));
    }

    #[test]
    fn after_the_stop_every_delivery_fails_and_nothing_more_is_accepted() {
        let mut s = connected();
        let mut acked = publish(&mut s);
        let mut in_flight = publish(&mut s);
        let mut queued = publish(&mut s);
        s.on_outgoing_publish(1);
        s.on_outgoing_publish(2);
        s.on_puback(1);
        s.on_stop();
        assert!(resolved(&mut acked));
        assert!(failed(&mut in_flight) && failed(&mut queued));
        assert_eq!(s.accepting(), Err(Stopped));
        assert_eq!(s.status().state, LinkState::Stopped);
        assert_eq!(s.status().connected_since_unix, None);
    }

    #[test]
    fn the_status_counts_connects_and_failures() {
        let mut s = session();
        assert_eq!(s.status().state, LinkState::Connecting { attempt: 1 });
        assert_eq!(s.connecting(), 1);
        let delay = s.on_connection_lost(Instant::now(), "refused".into());
        assert_eq!(
            s.status().state,
            LinkState::WaitingToRetry {
                retry_in_ms: delay.as_millis() as u64,
                error: "refused".into()
            }
        );
        assert!(!s.is_connected());
        assert_eq!(s.connecting(), 2);
        assert_eq!(s.status().state, LinkState::Connecting { attempt: 2 });
        s.on_connack(Instant::now(), 1_700_000_000, false);
        assert!(s.is_connected());
        let st = s.status();
        assert_eq!((st.connects, st.failures), (1, 1));
        assert_eq!(st.reconnects(), 0);
        assert_eq!(st.last_error.as_deref(), Some("refused"));
        assert_eq!(st.connected_since_unix, Some(1_700_000_000));
        s.on_connection_lost(Instant::now(), "reset".into());
        assert_eq!(s.status().connected_since_unix, None);
        assert_eq!(s.status().last_error.as_deref(), Some("reset"));
        s.connecting();
        s.on_connack(Instant::now(), 1_700_000_100, false);
        assert_eq!((s.status().connects, s.status().failures), (2, 2));
        assert_eq!(s.status().reconnects(), 1);
    }

    #[test]
    fn every_retry_waits_at_least_the_backoff_floor() {
        let mut s = session();
        let t0 = Instant::now();
        for n in 0..20u64 {
            s.connecting();
            let delay = s.on_connection_lost(t0 + Duration::from_secs(n), "down".into());
            assert!(delay >= MIN && delay <= MAX, "retry {n}: {delay:?}");
        }
    }

    #[test]
    fn a_connection_that_drops_at_once_keeps_counting_attempts() {
        let mut s = session();
        let t0 = Instant::now();
        for n in 1..=6u32 {
            assert_eq!(s.connecting(), n);
            let up = t0 + Duration::from_secs(u64::from(n) * 60);
            s.on_connack(up, 1_700_000_000, false);
            s.on_connection_lost(up + Duration::from_millis(50), "packet too large".into());
        }
        assert_eq!(s.connecting(), 7);
    }

    #[test]
    fn a_connection_up_for_30_s_starts_the_backoff_again_from_the_floor() {
        let widened = |up_for: Duration| {
            let mut s = session();
            let t0 = Instant::now();
            for _ in 0..8 {
                s.connecting();
                s.on_connection_lost(t0, "refused".into());
            }
            assert_eq!(s.connecting(), 9);
            s.on_connack(t0, 1_700_000_000, false);
            let delay = s.on_connection_lost(t0 + up_for, "reset".into());
            (s.connecting(), delay)
        };
        assert_eq!(STABLE_AFTER, Duration::from_secs(30));
        let (attempt, _) = widened(STABLE_AFTER - Duration::from_millis(1));
        assert_eq!(attempt, 10, "a shorter connection is one more failure");
        let (attempt, delay) = widened(STABLE_AFTER);
        assert_eq!(
            attempt, 2,
            "a stable connection starts again from the first retry"
        );
        assert!(delay >= MIN && delay <= MIN * 2, "{delay:?}");
    }

    #[test]
    fn subscriptions_and_birth_follow_every_connack() {
        let mut s = session();
        let mut a = Announcements::default();
        s.connecting();
        assert!(!a.due(s.status()), "not before the CONNACK");
        s.on_connack(Instant::now(), 1_700_000_000, false);
        assert!(a.due(s.status()));
        assert!(!a.due(s.status()), "once per connection");
        s.on_connection_lost(Instant::now(), "reset".into());
        assert!(!a.due(s.status()));
        s.connecting();
        s.on_connack(Instant::now(), 1_700_000_001, false);
        assert!(a.due(s.status()), "again after the reconnect");
        // A watcher that missed the drop in between (it sees only the latest status) still
        // sees a new connection: the count moved.
        s.on_connection_lost(Instant::now(), "reset".into());
        s.connecting();
        s.on_connack(Instant::now(), 1_700_000_002, false);
        assert!(a.due(s.status()));
        s.on_stop();
        assert!(!a.due(s.status()));
    }

    /// Loses the connection and connects again `after` the start, the broker answering
    /// `session_present`; says whether the announcer would skip the SUBSCRIBE.
    fn reconnect(s: &mut Session, at: Instant, session_present: bool) -> bool {
        s.on_connection_lost(at, "cut".into());
        s.connecting();
        s.on_connack(at, 1_700_000_000, session_present);
        s.subscriptions_held()
    }

    #[test]
    fn a_subscription_is_skipped_only_once_granted_in_this_process_with_the_session_present() {
        let t0 = Instant::now();
        // A new process always subscribes, whatever the broker kept from the last one.
        let mut s = connected_at(true, t0, true);
        assert!(!s.subscriptions_held());
        assert!(!reconnect(&mut s, t0, true), "nothing granted yet");
        s.on_suback(t0, true);
        assert!(s.subscriptions_held());
        assert!(reconnect(&mut s, t0, true), "granted, session present");
        assert!(
            reconnect(&mut s, t0, true),
            "still held on the next reconnect"
        );
        // The broker forgot the session (restarted without persistence).
        assert!(!reconnect(&mut s, t0, false));
        assert!(
            !reconnect(&mut s, t0, true),
            "held again only by a new grant"
        );
    }

    #[test]
    fn a_refused_subscription_or_a_dropped_message_means_subscribing_again() {
        let t0 = Instant::now();
        let mut s = connected_at(true, t0, false);
        s.on_suback(t0, false);
        assert!(!reconnect(&mut s, t0, true), "a filter was refused");
        s.on_suback(t0, true);
        assert!(reconnect(&mut s, t0, true));
        // A message dropped on a full queue may have been a bundle update.
        s.on_inbound_dropped();
        assert!(!reconnect(&mut s, t0, true));
    }

    #[test]
    fn an_old_grant_is_renewed_on_the_next_reconnect() {
        let t0 = Instant::now();
        let mut s = connected_at(true, t0, false);
        s.on_suback(t0, true);
        let just_before = t0 + RESUBSCRIBE_AFTER - Duration::from_secs(1);
        assert!(reconnect(&mut s, just_before, true));
        assert!(!reconnect(&mut s, t0 + RESUBSCRIBE_AFTER, true));
    }

    #[test]
    fn a_clean_session_never_skips_the_subscription_whatever_the_broker_answers() {
        let t0 = Instant::now();
        let mut s = connected_at(false, t0, false);
        s.on_suback(t0, true);
        // A broker (or proxy) wrongly answering session present = 1 to a clean session.
        assert!(!reconnect(&mut s, t0, true));
    }
}
