//! The `[telemetry]` section of the configuration.
//!
//! It lives with the telemetry task rather than in `config` because its bounds are the task's:
//! how big a batch may get, how often the outbox is fsynced, how much it may hold.

use serde::{Deserialize, Serialize};

use crate::model::rejection::Rejection;

/// `[telemetry]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// A batch is sent when it has this many points…
    #[serde(default = "default_batch_max_points")]
    pub batch_max_points: usize,
    /// …or when its oldest point has waited this long.
    #[serde(default = "default_batch_max_ms")]
    pub batch_max_ms: u64,
    /// How often appended points are fsynced.
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// Cap on unacknowledged bytes; beyond it the oldest points are dropped (and counted).
    #[serde(default = "default_outbox_max_bytes")]
    pub outbox_max_bytes: u64,
    /// How often a gateway health point is recorded.
    #[serde(default = "default_health_interval_secs")]
    pub health_interval_secs: u64,
}

fn default_batch_max_points() -> usize {
    100
}
fn default_batch_max_ms() -> u64 {
    1_000
}
fn default_fsync_interval_ms() -> u64 {
    1_000
}
fn default_outbox_max_bytes() -> u64 {
    4 * 1024 * 1024
}
fn default_health_interval_secs() -> u64 {
    60
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            batch_max_points: default_batch_max_points(),
            batch_max_ms: default_batch_max_ms(),
            fsync_interval_ms: default_fsync_interval_ms(),
            outbox_max_bytes: default_outbox_max_bytes(),
            health_interval_secs: default_health_interval_secs(),
        }
    }
}

impl TelemetrySettings {
    /// Each bound in the order of the fields; the first one out of range is reported.
    pub(crate) fn validate(&self) -> Result<(), Rejection> {
        if !(1..=1_000).contains(&self.batch_max_points) {
            return Err(Rejection::new(
                "telemetry.batch_max_points",
                format!("expected 1..=1000, found {}", self.batch_max_points),
            ));
        }
        if !(10..=60_000).contains(&self.batch_max_ms) {
            return Err(Rejection::new(
                "telemetry.batch_max_ms",
                format!("expected 10..=60000, found {}", self.batch_max_ms),
            ));
        }
        if !(10..=60_000).contains(&self.fsync_interval_ms) {
            return Err(Rejection::new(
                "telemetry.fsync_interval_ms",
                format!("expected 10..=60000, found {}", self.fsync_interval_ms),
            ));
        }
        if !(64 * 1024..=1 << 30).contains(&self.outbox_max_bytes) {
            return Err(Rejection::new(
                "telemetry.outbox_max_bytes",
                format!(
                    "expected 65536..=1073741824, found {}",
                    self.outbox_max_bytes
                ),
            ));
        }
        if !(1..=86_400).contains(&self.health_interval_secs) {
            return Err(Rejection::new(
                "telemetry.health_interval_secs",
                format!("expected 1..=86400, found {}", self.health_interval_secs),
            ));
        }
        Ok(())
    }
}
