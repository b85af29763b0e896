//! Gateway health: the figures an operator needs to tell a sick gateway from a sick link.
//!
//! System figures are read from `/proc` and `statvfs(3)`; a figure that cannot be read is
//! reported as 0 rather than failing the point, since health must keep flowing precisely when
//! things go wrong. Each external driver's counters come from its supervisor, so an operator can
//! also tell a sick gateway from a sick driver.

use std::path::PathBuf;

use crate::drivers::DriverHealthSource;
use crate::model::device::GatewayHealth;
use crate::telemetry::outbox::OutboxStats;

pub struct HealthProbe {
    pub state_dir: PathBuf,
    /// The process drivers to report, in configuration order; empty when there are none.
    pub drivers: Vec<DriverHealthSource>,
}

fn first_number(text: &str) -> Option<f64> {
    text.split_whitespace().next()?.parse().ok()
}

fn meminfo_kib(key: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Free bytes for unprivileged users on the filesystem holding `path`.
pub fn disk_free_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` a valid out-pointer.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

impl HealthProbe {
    pub fn sample(&self, link_reconnects: u64, outbox: OutboxStats) -> GatewayHealth {
        let read = |p: &str| std::fs::read_to_string(p).ok();
        GatewayHealth {
            uptime_secs: read("/proc/uptime")
                .and_then(|t| first_number(&t))
                .unwrap_or(0.0) as u64,
            load1: read("/proc/loadavg")
                .and_then(|t| first_number(&t))
                .unwrap_or(0.0),
            mem_available_kib: meminfo_kib("MemAvailable:").unwrap_or(0),
            disk_free_bytes: disk_free_bytes(&self.state_dir).unwrap_or(0),
            link_reconnects,
            outbox_depth: outbox.depth,
            outbox_bytes: outbox.bytes,
            points_dropped: outbox.dropped,
            drivers: self.drivers.iter().map(DriverHealthSource::read).collect(),
            reporting: None,
            data_usage: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use serde_json::json;

    use super::*;
    use crate::drivers::process::DriverStats;

    #[test]
    fn health_reads_real_figures() {
        let probe = HealthProbe {
            state_dir: std::env::temp_dir(),
            drivers: Vec::new(),
        };
        let h = probe.sample(
            3,
            OutboxStats {
                depth: 5,
                bytes: 100,
                dropped: 2,
                next_seq: 9,
            },
        );
        assert!(h.uptime_secs > 0);
        assert!(h.mem_available_kib > 0);
        assert!(h.disk_free_bytes > 0);
        assert_eq!(
            (h.link_reconnects, h.outbox_depth, h.points_dropped),
            (3, 5, 2)
        );
        assert!(h.drivers.is_empty());
    }

    fn driver(
        name: &str,
        spawns: u64,
        exits: u64,
        malformed: u64,
        oversized: u64,
        samples: u64,
    ) -> DriverHealthSource {
        let stats = DriverStats::default();
        stats.spawns.store(spawns, Ordering::Relaxed);
        stats.exits.store(exits, Ordering::Relaxed);
        stats.malformed_lines.store(malformed, Ordering::Relaxed);
        stats.oversized_lines.store(oversized, Ordering::Relaxed);
        stats.samples.store(samples, Ordering::Relaxed);
        DriverHealthSource {
            name: name.into(),
            stats: Arc::new(stats),
        }
    }

    #[test]
    fn process_driver_counters_appear_under_the_platforms_names() {
        let probe = HealthProbe {
            state_dir: std::env::temp_dir(),
            drivers: vec![
                // Started four times, the fourth run still going.
                driver("modbus", 4, 3, 7, 2, 120),
                // Never started: the program is missing.
                driver("broken", 0, 0, 0, 0, 0),
            ],
        };
        let health = probe.sample(0, OutboxStats::default());
        // Compared as text, so the members' order (docs/PROTOCOL.md, 14.5) is pinned too.
        assert_eq!(
            serde_json::to_string(&health.drivers).unwrap(),
            concat!(
                r#"[{"name":"modbus","running":true,"restarts":3,"#,
                r#""malformedLines":7,"oversizedLines":2,"samples":120},"#,
                r#"{"name":"broken","running":false,"restarts":0,"#,
                r#""malformedLines":0,"oversizedLines":0,"samples":0}]"#,
            )
        );
        // And the list is the health object's last member.
        let point = serde_json::to_string(&health).unwrap();
        assert!(
            point.contains(r#""pointsDropped":0,"drivers":[{"name":"modbus","#)
                && point.ends_with("}]}"),
            "{point}"
        );
    }

    #[test]
    fn a_driver_between_restarts_is_not_running() {
        let probe = HealthProbe {
            state_dir: std::env::temp_dir(),
            drivers: vec![driver("modbus", 2, 2, 0, 0, 0)],
        };
        let health = probe.sample(0, OutboxStats::default());
        assert!(!health.drivers[0].running);
        assert_eq!(health.drivers[0].restarts, 1);
    }

    #[test]
    fn without_process_drivers_the_list_is_empty_not_missing() {
        let probe = HealthProbe {
            state_dir: std::env::temp_dir(),
            drivers: Vec::new(),
        };
        let health = serde_json::to_value(probe.sample(0, OutboxStats::default())).unwrap();
        assert_eq!(health["drivers"], json!([]));
    }
}
