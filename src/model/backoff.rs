//! Reconnect delays: exponential growth with full jitter, between a floor and a ceiling.
//!
//! Before retry `n` (counting from 1) the delay is drawn uniformly from
//! `[min, min(max, min * 2^n)]`, so even the first retry is spread over `[min, 2 * min]`. The jitter
//! is what keeps a fleet of gateways from reconnecting in lock-step when the platform's broker
//! restarts (AWS Architecture Blog, "Exponential Backoff and Jitter"). Unlike textbook full jitter
//! the draw never goes below `min`: a zero delay would let a broker that rejects us at once
//! (a bad certificate, a banned client id) drive a tight reconnect loop.
//!
//! For the MQTT link a CONNACK alone does not count as success: a broker can accept the
//! connection and then have it fail at once, every time (a retained message larger than the
//! inbound packet limit, delivered right after the subscription, does exactly that). So the link
//! reports [`Backoff::connected`] at CONNACK and asks [`Backoff::next_delay_after`] when the
//! connection ends: the count goes back to zero only if the connection stayed up for
//! [`STABLE_AFTER`]; otherwise the windows keep widening as if the connect had failed.

use std::time::{Duration, Instant};

/// How long a connection must stay up before the next failure starts again from the floor.
pub const STABLE_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
    /// When the current connection came up, if one is up.
    up_since: Option<Instant>,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self::with_rng(min, max, fastrand::Rng::new())
    }

    /// A deterministic sequence, for tests.
    #[cfg(test)]
    pub(crate) fn with_seed(min: Duration, max: Duration, seed: u64) -> Self {
        Self::with_rng(min, max, fastrand::Rng::with_seed(seed))
    }

    fn with_rng(min: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
            rng,
            up_since: None,
        }
    }

    /// The upper bound of the next draw.
    pub fn ceiling(&self) -> Duration {
        // 2^16 * min is far beyond any sane max; capping the shift avoids overflow. The `+ 1`
        // gives the first retry a window too: a fleet dropped at the same instant would otherwise
        // all come back exactly `min` later (seen in the 1,000-gateway fleet bench).
        let factor = 1u32 << (self.attempt + 1).min(16);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before the next attempt; each call widens the window.
    pub fn next_delay(&mut self) -> Duration {
        let lo = self.min.as_millis() as u64;
        let hi = self.ceiling().as_millis() as u64;
        self.attempt = self.attempt.saturating_add(1);
        Duration::from_millis(self.rng.u64(lo..=hi))
    }

    /// Starts again from `min` now (for a success that is known to be one).
    pub fn reset(&mut self) {
        self.attempt = 0;
        self.up_since = None;
    }

    /// A connection came up at `at` (CONNACK). Does not reset anything yet: see
    /// [`Backoff::next_delay_after`].
    pub fn connected(&mut self, at: Instant) {
        self.up_since = Some(at);
    }

    /// The delay before the next attempt, after a failure at `now`. If a connection was up and
    /// lasted at least [`STABLE_AFTER`], the count first goes back to zero, so the delay is
    /// drawn from the first window; a shorter-lived connection counts as one more failure.
    pub fn next_delay_after(&mut self, now: Instant) -> Duration {
        if let Some(since) = self.up_since.take() {
            if now.saturating_duration_since(since) >= STABLE_AFTER {
                self.attempt = 0;
            }
        }
        self.next_delay()
    }

    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_millis(500);
    const MAX: Duration = Duration::from_secs(30);

    #[test]
    fn delays_stay_within_floor_and_growing_ceiling() {
        let mut b = Backoff::with_seed(MIN, MAX, 7);
        for n in 0..40u32 {
            let ceiling = MIN.saturating_mul(1 << (n + 1).min(16)).min(MAX);
            assert_eq!(b.ceiling(), ceiling);
            let d = b.next_delay();
            assert!(
                d >= MIN && d <= ceiling,
                "attempt {n}: {d:?} outside [{MIN:?}, {ceiling:?}]"
            );
        }
        assert_eq!(b.ceiling(), MAX);
    }

    #[test]
    fn reset_returns_to_the_floor() {
        let mut b = Backoff::with_seed(MIN, MAX, 1);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.ceiling(), MIN * 2);
        let first = b.next_delay();
        assert!(first >= MIN && first <= MIN * 2, "{first:?}");
    }

    #[test]
    fn a_connection_that_drops_at_once_keeps_the_windows_widening() {
        // CONNACK, then failure a moment later, over and over: the retained-oversized-message
        // loop. Each round must count as a failure, or the gateway reconnects at the floor forever.
        let mut b = Backoff::with_seed(MIN, MAX, 3);
        let t0 = Instant::now();
        for n in 0..12u32 {
            let up = t0 + Duration::from_secs(u64::from(n) * 60);
            b.connected(up);
            let ceiling = b.ceiling();
            assert_eq!(
                ceiling,
                MIN.saturating_mul(1 << (n + 1).min(16)).min(MAX),
                "round {n}"
            );
            let d = b.next_delay_after(up + Duration::from_millis(50));
            assert!(d >= MIN && d <= ceiling, "round {n}: {d:?}");
        }
        assert_eq!(b.ceiling(), MAX);
    }

    #[test]
    fn a_connection_that_stayed_up_long_enough_starts_again_from_the_floor() {
        let widened = || {
            let mut b = Backoff::with_seed(MIN, MAX, 4);
            for _ in 0..10 {
                b.next_delay();
            }
            b
        };
        let up = Instant::now();
        // Up for just under the threshold: one more failure, the window stays at its widest.
        let mut short = widened();
        short.connected(up);
        short.next_delay_after(up + STABLE_AFTER - Duration::from_millis(1));
        assert_eq!(short.attempt(), 11);
        assert_eq!(short.ceiling(), MAX);
        // Up for the threshold: back to the first window [min, 2 * min].
        let mut stable = widened();
        stable.connected(up);
        let d = stable.next_delay_after(up + STABLE_AFTER);
        assert!(d >= MIN && d <= MIN * 2, "{d:?}");
        assert_eq!(stable.attempt(), 1);
    }

    #[test]
    fn a_failed_connect_without_connack_is_a_plain_failure() {
        let mut b = Backoff::with_seed(MIN, MAX, 5);
        let now = Instant::now();
        b.next_delay_after(now);
        b.next_delay_after(now + STABLE_AFTER * 10);
        // No CONNACK in between, so however long the wait, nothing resets.
        assert_eq!(b.attempt(), 2);
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        // 1,000 gateways at their 5th attempt must not pile onto a few instants: count how many
        // distinct 100 ms buckets they land in over the [0.5 s, 8 s] window (75 buckets).
        let mut buckets = std::collections::HashSet::new();
        for seed in 0..1_000 {
            let mut b = Backoff::with_seed(MIN, MAX, seed);
            for _ in 0..4 {
                b.next_delay();
            }
            buckets.insert(b.next_delay().as_millis() / 100);
        }
        assert!(
            buckets.len() > 60,
            "only {} distinct buckets",
            buckets.len()
        );
    }
}
