//! The counters each driver's supervisor keeps, for the health point.
//!
//! They are atomics rather than messages so that neither side ever waits for the other: the
//! supervisor bumps them as lines arrive and children come and go, and telemetry reads them
//! whenever it builds a health point ([`DriverHealthSource`](crate::drivers::DriverHealthSource)).

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters for one driver, shared with whoever reports health. Monotonic since the agent
/// started; read them with `load(Ordering::Relaxed)`.
#[derive(Debug, Default)]
pub struct DriverStats {
    /// Child processes started.
    pub spawns: AtomicU64,
    /// Child processes that ended (not counting the kill at shutdown).
    pub exits: AtomicU64,
    /// Lines skipped as malformed JSON, unknown `type` or invalid state.
    pub malformed_lines: AtomicU64,
    /// Lines skipped for being longer than `max_line_bytes`.
    pub oversized_lines: AtomicU64,
    /// Samples handed to telemetry.
    pub samples: AtomicU64,
}

/// Adds one to `counter`.
pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
