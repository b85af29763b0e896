//! The monthly data budget (docs/PROTOCOL.md 14.10): bytes counted per calendar month, and
//! how telemetry saves bytes as the month's use nears `telemetry.monthly_budget_bytes`.
//!
//! Only telemetry degrades. Command replies, the capabilities message, pairing and the link's
//! own traffic are never held back: a gateway that stops answering commands to save a few
//! kilobytes is broken, not frugal. Degrading never drops a point either: batches wait longer
//! (a longer batch costs the same framing for more points), more samples fall within wider
//! deadbands, and health points come less often.
//!
//! Pure, except [`load`] and [`save`]: the telemetry task feeds the counts and the time, and
//! applies what [`Step::degradation`] says.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::StorageError;

/// The file in `state.dir` that keeps the month's count across restarts.
pub(crate) const FILE: &str = "data-usage.json";

/// This month's traffic, as `data-usage.json`, health and `status` report it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Usage {
    /// `YYYY-MM`, UTC, of the gateway's effective clock.
    pub month: String,
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.sent_bytes.saturating_add(self.received_bytes)
    }
}

/// How far telemetry saves bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// Under 75 % of the budget, or no budget: as configured.
    #[default]
    Normal,
    /// From 75 %.
    Saving,
    /// From 90 %.
    Strict,
    /// From 100 %: the budget is spent; telemetry still flows, as sparsely as it can.
    Exhausted,
}

/// What a step changes. Each figure is a floor or a factor over the configuration, so an
/// installer's sparser setting is never made denser.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Degradation {
    /// Batches wait at least this long (`telemetry.batch_max_ms`, at most 60 s).
    pub(crate) batch_ms: u64,
    /// Deadbands (14.8) times this; with `report = "every-sample"` the defaults times this.
    pub(crate) deadband_factor: f64,
    /// `heartbeat_secs` times this (at most 86400).
    pub(crate) heartbeat_factor: u32,
    /// Health points at most this often.
    pub(crate) health_secs: u64,
}

impl Step {
    /// As health and the log spell it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Step::Normal => "normal",
            Step::Saving => "saving",
            Step::Strict => "strict",
            Step::Exhausted => "exhausted",
        }
    }

    /// The step for `used` bytes of a `budget`.
    pub(crate) fn of(used: u64, budget: u64) -> Step {
        // In percent, without overflow for any u64.
        let percent = (u128::from(used) * 100 / u128::from(budget.max(1))) as u64;
        match percent {
            0..75 => Step::Normal,
            75..90 => Step::Saving,
            90..100 => Step::Strict,
            _ => Step::Exhausted,
        }
    }

    pub(crate) fn degradation(self) -> Option<Degradation> {
        match self {
            Step::Normal => None,
            Step::Saving => Some(Degradation {
                batch_ms: 15_000,
                deadband_factor: 2.0,
                heartbeat_factor: 2,
                health_secs: 900,
            }),
            Step::Strict => Some(Degradation {
                batch_ms: 60_000,
                deadband_factor: 5.0,
                heartbeat_factor: 4,
                health_secs: 3_600,
            }),
            Step::Exhausted => Some(Degradation {
                batch_ms: 60_000,
                deadband_factor: 10.0,
                heartbeat_factor: 12,
                health_secs: 21_600,
            }),
        }
    }
}

/// The month's count and, when configured, its budget.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: Option<u64>,
    usage: Usage,
}

impl Budget {
    /// Carries on from `stored` if it is of `month`; a new month starts from 0.
    pub(crate) fn new(limit: Option<u64>, stored: Option<Usage>, month: &str) -> Budget {
        let usage = match stored {
            Some(u) if u.month == month => u,
            _ => Usage {
                month: month.to_owned(),
                ..Usage::default()
            },
        };
        Budget { limit, usage }
    }

    /// Counts `sent` and `received` bytes in `month` (the month of now). The first bytes of a
    /// new month start its count from 0. Answers whether the step changed.
    pub(crate) fn add(&mut self, sent: u64, received: u64, month: &str) -> bool {
        let before = self.step();
        if self.usage.month != month {
            self.usage = Usage {
                month: month.to_owned(),
                ..Usage::default()
            };
        }
        self.usage.sent_bytes = self.usage.sent_bytes.saturating_add(sent);
        self.usage.received_bytes = self.usage.received_bytes.saturating_add(received);
        self.step() != before
    }

    pub(crate) fn step(&self) -> Step {
        self.limit
            .map_or(Step::Normal, |limit| Step::of(self.usage.total(), limit))
    }

    pub(crate) fn usage(&self) -> &Usage {
        &self.usage
    }

    pub(crate) fn limit(&self) -> Option<u64> {
        self.limit
    }
}

/// `YYYY-MM` of Unix time `secs`, UTC.
pub(crate) fn month_of(secs: u64) -> String {
    crate::model::clock::rfc3339(secs)[..7].to_owned()
}

pub(crate) fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE)
}

/// The stored count; `None` when there is none yet. A damaged file is an error for the caller
/// to log: the month then starts again from 0, which errs on the side of sending.
pub(crate) fn load(state_dir: &Path) -> Result<Option<Usage>, StorageError> {
    crate::storage::read_json(&path(state_dir))
}

/// Replaces the stored count atomically (a power cut leaves the old count or the new one).
pub(crate) fn save(state_dir: &Path, usage: &Usage) -> Result<(), StorageError> {
    crate::storage::write_json(&path(state_dir), usage, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_start_at_75_90_and_100_percent() {
        assert_eq!(Step::of(0, 1000), Step::Normal);
        assert_eq!(Step::of(749, 1000), Step::Normal);
        assert_eq!(Step::of(750, 1000), Step::Saving);
        assert_eq!(Step::of(899, 1000), Step::Saving);
        assert_eq!(Step::of(900, 1000), Step::Strict);
        assert_eq!(Step::of(999, 1000), Step::Strict);
        assert_eq!(Step::of(1000, 1000), Step::Exhausted);
        assert_eq!(Step::of(u64::MAX, u64::MAX), Step::Exhausted);
        assert_eq!(Step::of(u64::MAX, 1), Step::Exhausted);
        // Each step saves at least as much as the one before.
        let steps = [Step::Saving, Step::Strict, Step::Exhausted];
        for w in steps.windows(2) {
            let (a, b) = (w[0].degradation().unwrap(), w[1].degradation().unwrap());
            assert!(b.batch_ms >= a.batch_ms && b.deadband_factor >= a.deadband_factor);
            assert!(b.heartbeat_factor >= a.heartbeat_factor && b.health_secs >= a.health_secs);
        }
    }

    #[test]
    fn counts_carry_on_within_a_month_and_start_again_in_the_next() {
        let stored = Usage {
            month: "2026-12".into(),
            sent_bytes: 700,
            received_bytes: 40,
        };
        let mut b = Budget::new(Some(1000), Some(stored.clone()), "2026-12");
        assert_eq!(b.step(), Step::Normal);
        assert!(b.add(10, 0, "2026-12"), "750: saving");
        assert_eq!(b.step(), Step::Saving);
        assert!(!b.add(100, 0, "2026-12"));
        assert!(b.add(300, 0, "2026-12"));
        assert_eq!(b.step(), Step::Exhausted);
        assert!(b.add(5, 5, "2027-01"), "a new month");
        assert_eq!(
            b.usage(),
            &Usage {
                month: "2027-01".into(),
                sent_bytes: 5,
                received_bytes: 5
            }
        );
        // A count from another month is not carried on.
        let b = Budget::new(Some(1000), Some(stored), "2027-02");
        assert_eq!(b.usage().total(), 0);
        // Without a budget nothing degrades, however much is counted.
        let mut b = Budget::new(None, None, "2026-12");
        assert!(!b.add(u64::MAX, u64::MAX, "2026-12"));
        assert_eq!(b.step(), Step::Normal);
    }

    #[test]
    fn months_are_utc_calendar_months() {
        assert_eq!(month_of(1_795_786_201), "2026-11");
        assert_eq!(month_of(1_798_761_599), "2026-12");
        assert_eq!(month_of(1_798_761_600), "2027-01");
    }

    #[test]
    fn the_count_survives_a_restart_and_a_damaged_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()).unwrap(), None);
        let usage = Usage {
            month: "2026-12".into(),
            sent_bytes: 12,
            received_bytes: 34,
        };
        save(dir.path(), &usage).unwrap();
        assert_eq!(load(dir.path()).unwrap(), Some(usage));
        std::fs::write(path(dir.path()), b"{\"month\":").unwrap();
        assert!(load(dir.path()).is_err());
    }
}
