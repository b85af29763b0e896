//! Gateway health: the figures an operator needs to tell a sick gateway from a sick link.
//!
//! Read from `/proc` and `statvfs(3)`; a figure that cannot be read is reported as 0 rather than
//! failing the point, since health must keep flowing precisely when things go wrong.

use std::path::PathBuf;

use super::model::GatewayHealth;
use crate::outbox::OutboxStats;

pub struct HealthProbe {
    pub state_dir: PathBuf,
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_reads_real_figures() {
        let probe = HealthProbe {
            state_dir: std::env::temp_dir(),
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
    }
}
