//! The `[telemetry]` section of the configuration.
//!
//! It lives with the telemetry task rather than in `config` because its bounds are the task's:
//! how big a batch may get, how often the outbox is fsynced, how much it may hold.

use serde::{Deserialize, Serialize};

use crate::model::rejection::Rejection;
use crate::telemetry::exception::{self, DeadbandTable};

/// `[telemetry]` settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// How batches are written on the wire (PROTOCOL 14.1, 14.9).
    #[serde(default)]
    pub encoding: Encoding,
    /// With `compact`: whether batches are DEFLATE-compressed (when that makes them smaller).
    #[serde(default)]
    pub compression: Compression,
    /// Which device samples become points (PROTOCOL 14.8).
    #[serde(default)]
    pub report: ReportMode,
    /// With `on-change`: an unchanged device still sends a point this often.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// With `on-change`: deadbands by type (`[telemetry.deadbands.battery]`), by wire member
    /// name, overriding the defaults of PROTOCOL 14.8.
    #[serde(default)]
    pub deadbands: DeadbandTable,
    /// With `on-change`: deadbands of one device (`[telemetry.device_deadbands."bat-1"]`),
    /// overriding its type's.
    #[serde(default)]
    pub device_deadbands: DeadbandTable,
    /// Bytes per calendar month (UTC) the broker connection may carry before telemetry
    /// degrades (PROTOCOL 14.10); none: counted, never degraded.
    #[serde(default)]
    pub monthly_budget_bytes: Option<u64>,
}

/// `telemetry.encoding`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum Encoding {
    /// The JSON batch of PROTOCOL 14.1.
    #[default]
    Json,
    /// Columns of deltas, PROTOCOL 14.9.
    Compact,
}

/// `telemetry.compression`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum Compression {
    #[default]
    Deflate,
    None,
}

/// The value of `key` among `choices` (as the configuration spells them), or an error that
/// lists them: by hand rather than derived, so a wrong value is answered with the right ones.
fn one_of<T: Copy>(value: &str, choices: &[(&str, T)]) -> Result<T, String> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("{n:?}")).collect();
            format!("expected {}, found {value:?}", names.join(" or "))
        })
}

impl TryFrom<String> for Encoding {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        one_of(
            &value,
            &[("json", Encoding::Json), ("compact", Encoding::Compact)],
        )
    }
}

impl TryFrom<String> for Compression {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        one_of(
            &value,
            &[
                ("deflate", Compression::Deflate),
                ("none", Compression::None),
            ],
        )
    }
}

/// `telemetry.report`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum ReportMode {
    /// Every sample a driver reports is a point.
    #[default]
    EverySample,
    /// A sample is a point when it changed beyond its deadbands, or as a heartbeat.
    OnChange,
}

impl TryFrom<String> for ReportMode {
    type Error = String;
    fn try_from(value: String) -> Result<Self, String> {
        one_of(
            &value,
            &[
                ("every-sample", ReportMode::EverySample),
                ("on-change", ReportMode::OnChange),
            ],
        )
    }
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
fn default_heartbeat_secs() -> u64 {
    300
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            batch_max_points: default_batch_max_points(),
            batch_max_ms: default_batch_max_ms(),
            fsync_interval_ms: default_fsync_interval_ms(),
            outbox_max_bytes: default_outbox_max_bytes(),
            health_interval_secs: default_health_interval_secs(),
            encoding: Encoding::default(),
            compression: Compression::default(),
            report: ReportMode::default(),
            heartbeat_secs: default_heartbeat_secs(),
            deadbands: DeadbandTable::new(),
            device_deadbands: DeadbandTable::new(),
            monthly_budget_bytes: None,
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
        if !(1..=86_400).contains(&self.heartbeat_secs) {
            return Err(Rejection::new(
                "telemetry.heartbeat_secs",
                format!("expected 1..=86400, found {}", self.heartbeat_secs),
            ));
        }
        if let Some(budget) = self.monthly_budget_bytes {
            if budget < 1024 {
                return Err(Rejection::new(
                    "telemetry.monthly_budget_bytes",
                    format!("expected at least 1024 bytes, found {budget}"),
                ));
            }
        }
        for (kind, members) in &self.deadbands {
            let Some(device_type) = exception::device_type(kind) else {
                return Err(Rejection::new(
                    "telemetry.deadbands",
                    format!(
                        "unknown device type {kind:?}; expected battery, charger, inverter, \
                         thermostat or vehicle"
                    ),
                ));
            };
            let known = exception::numeric_members(device_type);
            for (member, band) in members {
                if !known.iter().any(|(m, _)| m == member) {
                    let names: Vec<&str> = known.iter().map(|(m, _)| *m).collect();
                    return Err(Rejection::new(
                        "telemetry.deadbands",
                        format!(
                            "{kind}.{member}: not a numeric member of type {kind}; expected one \
                             of {}",
                            names.join(", ")
                        ),
                    ));
                }
                check_band("telemetry.deadbands", kind, member, *band)?;
            }
        }
        for (device, members) in &self.device_deadbands {
            for (member, band) in members {
                if !exception::is_numeric_member_of_any(member) {
                    return Err(Rejection::new(
                        "telemetry.device_deadbands",
                        format!(
                            "{device:?}.{member}: not a numeric member of any device type \
                             (PROTOCOL 14.8 lists them)"
                        ),
                    ));
                }
                check_band("telemetry.device_deadbands", device, member, *band)?;
            }
        }
        Ok(())
    }

    /// What report by exception needs, or `None` when every sample is a point.
    pub(crate) fn reporting(&self) -> Option<exception::Reporting> {
        (self.report == ReportMode::OnChange).then(|| self.exception_reporting())
    }

    /// What report by exception needs, whatever `report` says: the data budget reports by
    /// exception from its first step even when every sample is configured (14.10).
    pub(crate) fn exception_reporting(&self) -> exception::Reporting {
        exception::Reporting {
            heartbeat: std::time::Duration::from_secs(self.heartbeat_secs),
            by_type: self.deadbands.clone(),
            by_device: self.device_deadbands.clone(),
        }
    }
}

/// A deadband is a finite number, 0 or more, in the member's unit.
fn check_band(key: &'static str, table: &str, member: &str, band: f64) -> Result<(), Rejection> {
    if band.is_finite() && band >= 0.0 {
        return Ok(());
    }
    Err(Rejection::new(
        key,
        format!("{table}.{member}: expected a number of 0 or more, found {band}"),
    ))
}
