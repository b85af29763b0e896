//! Reconnect delays: exponential growth with full jitter, between a floor and a ceiling.
//!
//! Before retry `n` (counting from 1) the delay is drawn uniformly from
//! `[min, min(max, min * 2^n)]`, so even the first retry is spread over `[min, 2 * min]`. The jitter
//! is what keeps a fleet of gateways from reconnecting in lock-step when the platform's broker
//! restarts (AWS Architecture Blog, "Exponential Backoff and Jitter"). Unlike textbook full jitter
//! the draw never goes below `min`: a zero delay would let a broker that rejects us at once
//! (a bad certificate, a banned client id) drive a tight reconnect loop.

use std::time::Duration;

#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self::with_rng(min, max, fastrand::Rng::new())
    }

    /// A deterministic sequence, for tests and simulations.
    pub fn with_seed(min: Duration, max: Duration, seed: u64) -> Self {
        Self::with_rng(min, max, fastrand::Rng::with_seed(seed))
    }

    fn with_rng(min: Duration, max: Duration, rng: fastrand::Rng) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
            rng,
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

    /// Called after a successful CONNACK: the next failure starts again from `min`.
    pub fn reset(&mut self) {
        self.attempt = 0;
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
