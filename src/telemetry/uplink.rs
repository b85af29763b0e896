//! The uplink's decisions: when to send a batch, what to acknowledge, where to resume after a
//! lost connection. A plain state machine with no I/O, so that every rule below is a unit test
//! rather than something only an outage against a real broker shows.
//!
//! The telemetry task ([`super::Telemetry::run`]) tells the [`Uplink`] what happened (points were
//! appended, a batch was handed to the link, its PUBACK arrived or it was lost, the link went up
//! or down, the batch timer fired, shutdown) and asks it what to do next ([`Uplink::next`]): send
//! the batch after a given sequence number, wait (with or without the batch timer), or stop.
//! The task does the reading, publishing and acknowledging; the uplink never touches the outbox
//! or the network.
//!
//! **Two facts, one mode.** The uplink stores two independent facts: the link ([`Connection`])
//! and how long the points not yet handed to the link have waited ([`Backlog`]). The mode a
//! reader wants to know ([`Status`]: idle, batching, draining, awaiting an ack, link down,
//! stopped) is derived from them and the number of batches in flight, so it can never disagree
//! with them. The backlog's age keeps running while the link is down: points that waited out
//! their batch age during an outage are due the moment the link is back.
//!
//! **What it guarantees** (docs/PROTOCOL.md 14.2):
//! - a batch is due when `batch_max_points` points wait, or when the oldest waiting point has
//!   waited `batch_max_ms`; points of unknown age (left by a previous run, or rewound after a
//!   lost delivery) are due at once, and stay due when new points arrive;
//! - at most [`MAX_BATCHES_IN_FLIGHT`] batches are in flight, and with the window full no timer
//!   runs (the task sleeps until a PUBACK or a loss);
//! - acknowledgements are taken in publish order: the oldest batch in flight is the only one
//!   awaited, and each acknowledges everything up to its last point;
//! - a lost delivery drops every batch in flight and rewinds to the oldest unacknowledged point,
//!   so after an outage sending resumes exactly there, in order, with the same numbers;
//! - after shutdown nothing more is sent; batches in flight are abandoned unacknowledged and go
//!   out again with the next run.
//!
//! **A known approximation.** The uplink keeps the age of the oldest waiting point only. When a
//! batch leaves and fewer than a batch of points remain, their age is counted from that moment,
//! so they may wait up to one batch age longer than their own. Keeping an arrival time per
//! point would make it exact at the cost of a queue that grows during an outage.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::{TelemetrySettings, MAX_BATCHES_IN_FLIGHT};

/// Whether the uplink may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Connection {
    Up,
    Down,
    /// Shut down, or the link is gone for good: nothing more is sent.
    Stopped,
}

/// The points numbered but not yet handed to the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backlog {
    /// Every numbered point has been handed to the link.
    Empty,
    /// Fewer than a batch of points, due at `due` (the oldest's age limit).
    Waiting { due: Instant },
    /// Every point up to `through` is due now: a full batch, points that waited out their batch
    /// age, or points of unknown age.
    Due { through: u64 },
}

/// The uplink's mode, as a reader (or a test) wants to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    /// Connected, and every point has been handed to the link (some may await their PUBACK).
    Idle,
    /// Connected; fewer than a batch of points wait, at most until `due`.
    Batching { due: Instant },
    /// Connected, and a batch is due: batches go out as fast as the window allows.
    Draining,
    /// Connected and a batch is waiting, but [`MAX_BATCHES_IN_FLIGHT`] batches await their
    /// PUBACK; sending resumes with the next one.
    AwaitingAck,
    /// Not connected: points are numbered and stored, none is sent.
    LinkDown,
    /// Nothing more is sent.
    Stopped,
}

/// What the telemetry task does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Read the next batch after `after` from the outbox and publish it, then report the
    /// outcome with [`Uplink::sent`], [`Uplink::caught_up`], [`Uplink::read_failed`] or
    /// [`Uplink::refused`].
    Send { after: u64 },
    /// Wait for the next event; `timer`: when to report [`Uplink::batch_timer_fired`].
    Wait { timer: Option<Instant> },
    /// Stop: make the outbox durable and return it.
    Stop,
}

/// One batch handed to the link: its last sequence number and its delivery (whatever the
/// publisher returns; the uplink only keeps it, in order, for the task to await).
#[derive(Debug)]
struct InFlight<D> {
    last_seq: u64,
    delivery: D,
}

/// The uplink's state. `D` is the publisher's delivery type.
#[derive(Debug)]
pub(crate) struct Uplink<D> {
    batch_points: u64,
    batch_age: Duration,
    connection: Connection,
    backlog: Backlog,
    /// Every point up to here has been handed to the link (or was found missing from the
    /// outbox); the next batch starts after it.
    sent: u64,
    /// The newest numbered point.
    newest: u64,
    /// Oldest first.
    in_flight: VecDeque<InFlight<D>>,
}

impl<D> Uplink<D> {
    /// An uplink for an outbox whose every point up to `acked` is acknowledged and whose newest
    /// point is `newest`. Points in between are left by a previous run: due at once.
    pub(crate) fn new(settings: &TelemetrySettings, acked: u64, newest: u64, up: bool) -> Self {
        Uplink {
            batch_points: settings.batch_max_points.max(1) as u64,
            batch_age: Duration::from_millis(settings.batch_max_ms),
            connection: if up { Connection::Up } else { Connection::Down },
            backlog: if newest > acked {
                Backlog::Due { through: newest }
            } else {
                Backlog::Empty
            },
            sent: acked,
            newest: newest.max(acked),
            in_flight: VecDeque::new(),
        }
    }

    pub(crate) fn status(&self) -> Status {
        match self.connection {
            Connection::Stopped => Status::Stopped,
            Connection::Down => Status::LinkDown,
            Connection::Up => match self.backlog {
                Backlog::Empty => Status::Idle,
                _ if self.in_flight.len() >= MAX_BATCHES_IN_FLIGHT => Status::AwaitingAck,
                Backlog::Waiting { due } => Status::Batching { due },
                Backlog::Due { .. } => Status::Draining,
            },
        }
    }

    pub(crate) fn next(&self) -> Next {
        match self.status() {
            Status::Stopped => Next::Stop,
            Status::Draining => Next::Send { after: self.sent },
            Status::Batching { due } => Next::Wait { timer: Some(due) },
            Status::Idle | Status::AwaitingAck | Status::LinkDown => Next::Wait { timer: None },
        }
    }

    /// Points not yet handed to the link.
    fn unsent(&self) -> u64 {
        self.newest.saturating_sub(self.sent)
    }

    /// How long a partial batch waits from now on (the data budget lengthens it); a backlog
    /// already waiting keeps its deadline.
    pub(crate) fn set_batch_age(&mut self, age: Duration) {
        self.batch_age = age;
    }

    /// Points were numbered, up to `newest`, at `now`.
    pub(crate) fn appended(&mut self, newest: u64, now: Instant) {
        self.newest = self.newest.max(newest);
        let due = match self.backlog {
            Backlog::Due { through } => Some(through),
            _ => None,
        };
        self.backlog = match due.max(self.full_through()) {
            Some(through) => Backlog::Due { through },
            None if self.backlog == Backlog::Empty && self.unsent() > 0 => Backlog::Waiting {
                due: now + self.batch_age,
            },
            // A waiting backlog keeps its oldest point's age.
            None => self.backlog,
        };
    }

    /// The batch ending at `last_seq` was handed to the link at `now`.
    pub(crate) fn sent(&mut self, last_seq: u64, delivery: D, now: Instant) {
        self.sent = self.sent.max(last_seq);
        self.newest = self.newest.max(last_seq);
        self.in_flight.push_back(InFlight { last_seq, delivery });
        let still_due = match self.backlog {
            Backlog::Due { through } if through > self.sent => Some(through),
            _ => None,
        };
        self.backlog = match still_due.max(self.full_through()) {
            _ if self.unsent() == 0 => Backlog::Empty,
            Some(through) => Backlog::Due { through },
            // The approximation in the module docs: the rest's age starts now.
            None => Backlog::Waiting {
                due: now + self.batch_age,
            },
        };
    }

    /// The last point of the last full batch waiting, if at least one full batch waits.
    fn full_through(&self) -> Option<u64> {
        let unsent = self.unsent();
        (unsent >= self.batch_points).then(|| self.newest - unsent % self.batch_points)
    }

    /// The outbox holds nothing after the uplink's position (its points were lost before they
    /// reached the disk): there is nothing to send until new points arrive.
    pub(crate) fn caught_up(&mut self) {
        self.sent = self.newest;
        self.backlog = Backlog::Empty;
    }

    /// Reading the outbox failed: try again after a batch age (or when a full batch waits).
    pub(crate) fn read_failed(&mut self, now: Instant) {
        self.backlog = Backlog::Waiting {
            due: now + self.batch_age,
        };
    }

    /// The link refused a publish: it has shut down. Nothing is sent until it is up again.
    pub(crate) fn refused(&mut self) {
        if self.connection == Connection::Up {
            self.connection = Connection::Down;
        }
    }

    /// The batch timer set by [`Next::Wait`] fired at `now`.
    pub(crate) fn batch_timer_fired(&mut self, now: Instant) {
        if let Backlog::Waiting { due } = self.backlog {
            if due <= now {
                self.backlog = Backlog::Due {
                    through: self.newest,
                };
            }
        }
    }

    pub(crate) fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// The delivery of the oldest batch in flight, which the task awaits.
    pub(crate) fn oldest_delivery(&mut self) -> Option<&mut D> {
        self.in_flight.front_mut().map(|b| &mut b.delivery)
    }

    /// The oldest batch in flight was acknowledged; returns the sequence number up to which the
    /// outbox may acknowledge (None when nothing was in flight).
    pub(crate) fn acked(&mut self) -> Option<u64> {
        self.in_flight.pop_front().map(|b| b.last_seq)
    }

    /// The oldest batch in flight was lost with its connection, and with it every later one (the
    /// link fails them all). Everything after `acked`, the outbox's acknowledged position, is due
    /// again.
    pub(crate) fn delivery_failed(&mut self, acked: u64) {
        self.in_flight.clear();
        self.sent = acked;
        self.newest = self.newest.max(acked);
        self.backlog = if self.unsent() > 0 {
            Backlog::Due {
                through: self.newest,
            }
        } else {
            Backlog::Empty
        };
    }

    /// The link went up or down.
    pub(crate) fn link_changed(&mut self, up: bool) {
        if self.connection != Connection::Stopped {
            self.connection = if up { Connection::Up } else { Connection::Down };
        }
    }

    /// Shutdown, or the link is gone for good: stop at once. Batches in flight are not awaited;
    /// their points stay unacknowledged in the outbox and go out with the next run.
    pub(crate) fn shutdown(&mut self) {
        self.connection = Connection::Stopped;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGE: Duration = Duration::from_millis(1_000);

    fn settings(batch: usize) -> TelemetrySettings {
        TelemetrySettings {
            batch_max_points: batch,
            batch_max_ms: AGE.as_millis() as u64,
            ..TelemetrySettings::default()
        }
    }

    /// A connected uplink over an empty outbox, batches of `batch` points.
    fn connected(batch: usize) -> Uplink<&'static str> {
        Uplink::new(&settings(batch), 0, 0, true)
    }

    fn send(u: &mut Uplink<&'static str>, last_seq: u64, now: Instant) {
        assert!(
            matches!(u.next(), Next::Send { .. }),
            "{:?} {:?}",
            u.status(),
            u.next()
        );
        u.sent(last_seq, "delivery", now);
    }

    #[test]
    fn nothing_to_send_is_idle_without_a_timer() {
        let u = connected(100);
        assert_eq!(u.status(), Status::Idle);
        assert_eq!(u.next(), Next::Wait { timer: None });
    }

    #[test]
    fn points_left_by_a_previous_run_are_due_at_once() {
        let t = Instant::now();
        let mut u: Uplink<()> = Uplink::new(&settings(100), 40, 45, true);
        assert_eq!(u.status(), Status::Draining);
        assert_eq!(u.next(), Next::Send { after: 40 });
        // New points do not make them wait for a batch age.
        u.appended(46, t);
        assert_eq!(u.next(), Next::Send { after: 40 });
    }

    #[test]
    fn a_full_batch_is_sent_without_waiting_for_the_timer() {
        let t = Instant::now();
        let mut u = connected(100);
        u.appended(99, t);
        assert_eq!(u.status(), Status::Batching { due: t + AGE });
        u.appended(100, t + Duration::from_millis(10));
        assert_eq!(u.status(), Status::Draining);
        assert_eq!(u.next(), Next::Send { after: 0 });
    }

    #[test]
    fn fewer_points_than_a_batch_wait_until_the_oldest_reaches_the_batch_age() {
        let t = Instant::now();
        let mut u = connected(100);
        u.appended(1, t);
        // Later points do not push the deadline back.
        u.appended(5, t + AGE / 2);
        assert_eq!(
            u.next(),
            Next::Wait {
                timer: Some(t + AGE)
            }
        );
        // A timer that fires early changes nothing.
        u.batch_timer_fired(t + AGE / 2);
        assert_eq!(u.status(), Status::Batching { due: t + AGE });
        u.batch_timer_fired(t + AGE);
        assert_eq!(u.next(), Next::Send { after: 0 });
        send(&mut u, 5, t + AGE);
        assert_eq!(u.status(), Status::Idle);
    }

    #[test]
    fn points_left_after_a_batch_wait_a_batch_age_from_the_send() {
        let t = Instant::now();
        let mut u = connected(100);
        u.appended(130, t);
        send(&mut u, 100, t + AGE / 4);
        assert_eq!(
            u.status(),
            Status::Batching {
                due: t + AGE / 4 + AGE
            }
        );
    }

    #[test]
    fn a_due_backlog_larger_than_a_batch_goes_out_back_to_back() {
        let t = Instant::now();
        let mut u: Uplink<()> = Uplink::new(&settings(100), 0, 250, true);
        for (after, last) in [(0, 100), (100, 200), (200, 250)] {
            assert_eq!(u.next(), Next::Send { after });
            u.sent(last, (), t);
        }
        assert_eq!(u.status(), Status::Idle);
        // A batch cut short by its byte limit leaves the rest of a due backlog due.
        let mut u: Uplink<()> = Uplink::new(&settings(100), 0, 60, true);
        u.sent(30, (), t);
        assert_eq!(u.next(), Next::Send { after: 30 });
    }

    #[test]
    fn at_most_four_batches_are_in_flight_and_an_ack_reopens_the_window() {
        let t = Instant::now();
        let mut u = connected(10);
        u.appended(1_000, t);
        for i in 1..=MAX_BATCHES_IN_FLIGHT as u64 {
            send(&mut u, i * 10, t);
        }
        assert_eq!(u.status(), Status::AwaitingAck);
        // No timer either: with the window full there is nothing to wake up for.
        assert_eq!(u.next(), Next::Wait { timer: None });
        assert_eq!(u.acked(), Some(10));
        assert_eq!(u.next(), Next::Send { after: 40 });
    }

    #[test]
    fn the_batch_timer_is_not_armed_while_the_window_is_full() {
        let t = Instant::now();
        let mut u = connected(100);
        for i in 1..=MAX_BATCHES_IN_FLIGHT as u64 {
            u.appended(i, t);
            u.batch_timer_fired(t + AGE);
            send(&mut u, i, t + AGE);
        }
        u.appended(5, t + AGE);
        assert_eq!(u.next(), Next::Wait { timer: None });
        u.acked();
        assert_eq!(
            u.next(),
            Next::Wait {
                timer: Some(t + AGE + AGE)
            }
        );
    }

    #[test]
    fn acknowledgements_are_taken_in_publish_order() {
        let t = Instant::now();
        let mut u = connected(10);
        u.appended(30, t);
        for (last, name) in [(10, "first"), (20, "second"), (30, "third")] {
            u.sent(last, name, t);
        }
        assert_eq!(u.oldest_delivery(), Some(&mut "first"));
        assert_eq!(u.acked(), Some(10));
        assert_eq!(u.oldest_delivery(), Some(&mut "second"));
        assert_eq!(u.acked(), Some(20));
        assert_eq!(u.acked(), Some(30));
        assert_eq!((u.acked(), u.oldest_delivery()), (None, None));
    }

    #[test]
    fn a_failed_delivery_rewinds_to_the_first_unacknowledged_point() {
        let t = Instant::now();
        let mut u = connected(10);
        u.appended(35, t);
        send(&mut u, 10, t);
        send(&mut u, 20, t);
        send(&mut u, 30, t);
        assert_eq!(u.acked(), Some(10));
        u.delivery_failed(10);
        assert!(!u.has_in_flight(), "every batch in flight is dropped");
        assert_eq!(u.next(), Next::Send { after: 10 });
    }

    #[test]
    fn a_rewound_backlog_stays_due_when_new_points_arrive() {
        let t = Instant::now();
        let mut u = connected(100);
        u.appended(5, t);
        u.batch_timer_fired(t + AGE);
        send(&mut u, 5, t + AGE);
        u.delivery_failed(0);
        u.appended(6, t + AGE);
        assert_eq!(u.next(), Next::Send { after: 0 });
        send(&mut u, 6, t + AGE);
        assert_eq!(u.status(), Status::Idle);
    }

    #[test]
    fn points_keep_their_numbers_across_a_link_outage() {
        let t = Instant::now();
        let mut u = connected(10);
        u.appended(15, t);
        send(&mut u, 10, t);
        u.link_changed(false);
        u.delivery_failed(0);
        assert_eq!(u.status(), Status::LinkDown);
        // Points numbered during the outage are kept, and their age runs on.
        u.appended(18, t + AGE);
        assert_eq!(u.next(), Next::Wait { timer: None });
        u.link_changed(true);
        // Resumes from the oldest unacknowledged point, with the numbers it had.
        assert_eq!(u.next(), Next::Send { after: 0 });
        send(&mut u, 10, t + 2 * AGE);
        assert_eq!(u.next(), Next::Send { after: 10 });
        send(&mut u, 18, t + 2 * AGE);
        assert_eq!(u.status(), Status::Idle);
    }

    #[test]
    fn a_backlog_that_aged_during_an_outage_is_due_once_the_link_is_back() {
        let t = Instant::now();
        let mut u = connected(100);
        u.link_changed(false);
        u.appended(3, t);
        assert_eq!(u.next(), Next::Wait { timer: None });
        u.link_changed(true);
        // The timer is already past: it fires at once.
        assert_eq!(
            u.next(),
            Next::Wait {
                timer: Some(t + AGE)
            }
        );
        u.batch_timer_fired(t + 30 * AGE);
        assert_eq!(u.next(), Next::Send { after: 0 });
    }

    #[test]
    fn a_refused_publish_stops_sending_until_the_link_is_up_again() {
        let t = Instant::now();
        let mut u = connected(1);
        u.appended(1, t);
        u.refused();
        assert_eq!(u.status(), Status::LinkDown);
        u.link_changed(true);
        assert_eq!(u.next(), Next::Send { after: 0 });
    }

    #[test]
    fn a_failed_read_is_retried_after_a_batch_age() {
        let t = Instant::now();
        let mut u = connected(100);
        u.appended(3, t);
        u.batch_timer_fired(t + AGE);
        u.read_failed(t + AGE);
        assert_eq!(
            u.next(),
            Next::Wait {
                timer: Some(t + 2 * AGE)
            }
        );
    }

    #[test]
    fn points_missing_from_the_outbox_are_skipped() {
        let t = Instant::now();
        let mut u = connected(1);
        u.appended(4, t);
        u.caught_up();
        assert_eq!(u.status(), Status::Idle);
        u.appended(5, t);
        assert_eq!(u.next(), Next::Send { after: 4 });
    }

    #[test]
    fn shutdown_stops_at_once_even_with_points_due_and_batches_in_flight() {
        let t = Instant::now();
        let mut u = connected(10);
        u.appended(25, t);
        send(&mut u, 10, t);
        u.shutdown();
        assert_eq!(u.next(), Next::Stop);
        // Nothing brings it back.
        u.link_changed(true);
        u.delivery_failed(0);
        assert_eq!(u.next(), Next::Stop);
    }
}
