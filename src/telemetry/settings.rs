//! The `[telemetry]` section of the configuration.

use serde::{Deserialize, Serialize};

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
