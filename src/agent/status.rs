//! The daemon's live status, shared with `texture-agent status` through the runtime directory.
//!
//! The runtime directory is a tmpfs under systemd (`RuntimeDirectory=`), so the file can be
//! rewritten on every link change without wearing the gateway's flash, and it disappears on
//! reboot instead of showing a stale "connected".
//!
//! The file format is documented (README, "status"), so it is pinned byte for byte by the tests
//! below. Round 1 wrote `link` through a `serde_json::Value`, whose map sorts its keys; the
//! typed [`LinkStatus`] is therefore written through [`LinkRecord`], which lists its fields in
//! that alphabetical order, and not through its own derive (which puts the state first).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::link::{LinkState, LinkStatus};
use crate::storage::{self, StorageError};

pub const STATUS_FILE: &str = "status.json";

/// What the running daemon reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeStatus {
    pub pid: u32,
    pub device_id: String,
    pub started_at_unix: u64,
    #[serde(serialize_with = "link_in_key_order")]
    pub link: LinkStatus,
    #[serde(default)]
    pub outbox: Option<crate::telemetry::outbox::OutboxStats>,
}

/// `link` as status.json holds it: the keys of [`LinkStatus`] and of its state, alphabetically.
#[derive(Serialize)]
struct LinkRecord<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<u32>,
    broker: &'a str,
    connected_since_unix: Option<u64>,
    connects: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    failures: u64,
    last_error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_in_ms: Option<u64>,
    state: &'static str,
}

fn link_in_key_order<S: serde::Serializer>(link: &LinkStatus, s: S) -> Result<S::Ok, S::Error> {
    let (attempt, retry_in_ms, error) = match &link.state {
        LinkState::Connecting { attempt } => (Some(*attempt), None, None),
        LinkState::WaitingToRetry { retry_in_ms, error } => {
            (None, Some(*retry_in_ms), Some(error.as_str()))
        }
        LinkState::Connected | LinkState::Stopped => (None, None, None),
    };
    LinkRecord {
        attempt,
        broker: &link.broker,
        connected_since_unix: link.connected_since_unix,
        connects: link.connects,
        error,
        failures: link.failures,
        last_error: link.last_error.as_deref(),
        retry_in_ms,
        state: link.state.name(),
    }
    .serialize(s)
}

pub fn status_path(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join(STATUS_FILE)
}

pub fn write(runtime_dir: &Path, status: &RuntimeStatus) -> Result<(), StorageError> {
    storage::write_json(&status_path(runtime_dir), status, 0o600)
}

pub fn read(runtime_dir: &Path) -> Result<Option<RuntimeStatus>, StorageError> {
    storage::read_json(&status_path(runtime_dir))
}

/// Whether the process that wrote a status file is still alive.
pub fn is_running(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::outbox::OutboxStats;

    fn link(state: LinkState) -> LinkStatus {
        LinkStatus {
            state,
            broker: "mqtt.texture.test:8883".into(),
            connects: 3,
            failures: 2,
            last_error: Some("TLS: \"bad\" \u{1b}".into()),
            connected_since_unix: Some(1_700_000_100),
        }
    }

    fn snapshot(link: LinkStatus) -> RuntimeStatus {
        RuntimeStatus {
            pid: 4242,
            device_id: "gw-7".into(),
            started_at_unix: 1_700_000_000,
            link,
            outbox: Some(OutboxStats {
                depth: 3,
                bytes: 1184,
                dropped: 0,
                next_seq: 10452,
            }),
        }
    }

    fn file_bytes(status: &RuntimeStatus) -> String {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), status).unwrap();
        std::fs::read_to_string(status_path(dir.path())).unwrap()
    }

    fn every_state() -> Vec<LinkState> {
        vec![
            LinkState::Connecting { attempt: 7 },
            LinkState::Connected,
            LinkState::WaitingToRetry {
                retry_in_ms: 1_500,
                error: "connection refused".into(),
            },
            LinkState::Stopped,
        ]
    }

    #[test]
    fn the_file_format_is_unchanged() {
        let mut waiting = link(LinkState::WaitingToRetry {
            retry_in_ms: 1_500,
            error: "connection refused".into(),
        });
        waiting.connected_since_unix = None;
        assert_eq!(
            file_bytes(&snapshot(waiting)),
            r#"{
  "pid": 4242,
  "device_id": "gw-7",
  "started_at_unix": 1700000000,
  "link": {
    "broker": "mqtt.texture.test:8883",
    "connected_since_unix": null,
    "connects": 3,
    "error": "connection refused",
    "failures": 2,
    "last_error": "TLS: \"bad\" \u001b",
    "retry_in_ms": 1500,
    "state": "waiting_to_retry"
  },
  "outbox": {
    "depth": 3,
    "bytes": 1184,
    "dropped": 0,
    "next_seq": 10452
  }
}
"#
        );
    }

    #[test]
    fn every_link_state_is_written_as_round_1_wrote_it() {
        // Round 1 wrote `link` as `serde_json::to_value(&LinkStatus)`, keys sorted by the map.
        #[derive(Serialize)]
        struct Round1 {
            pid: u32,
            device_id: String,
            started_at_unix: u64,
            link: serde_json::Value,
            outbox: Option<OutboxStats>,
        }
        for state in every_state() {
            for last_error in [None, Some("boom".to_string())] {
                let mut l = link(state.clone());
                l.last_error = last_error;
                let typed = snapshot(l.clone());
                let round1 = Round1 {
                    pid: typed.pid,
                    device_id: typed.device_id.clone(),
                    started_at_unix: typed.started_at_unix,
                    link: serde_json::to_value(&l).unwrap(),
                    outbox: typed.outbox,
                };
                let mut expected = serde_json::to_vec_pretty(&round1).unwrap();
                expected.push(b'\n');
                assert_eq!(
                    file_bytes(&typed),
                    String::from_utf8(expected).unwrap(),
                    "{state:?}"
                );
            }
        }
    }

    #[test]
    fn the_file_reads_back_as_the_status_written() {
        for state in every_state() {
            let dir = tempfile::tempdir().unwrap();
            let written = snapshot(link(state));
            write(dir.path(), &written).unwrap();
            let read = read(dir.path()).unwrap().expect("a status file");
            assert_eq!(read.link, written.link);
            assert_eq!(read.outbox, written.outbox);
            assert_eq!(
                (read.pid, read.device_id, read.started_at_unix),
                (4242, "gw-7".to_string(), 1_700_000_000)
            );
        }
    }
}
