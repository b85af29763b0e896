//! The daemon's live status, shared with `texture-agent status` through the runtime directory.
//!
//! The runtime directory is a tmpfs under systemd (`RuntimeDirectory=`), so the file can be
//! rewritten on every link change without wearing the gateway's flash, and it disappears on
//! reboot instead of showing a stale "connected".

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::{self, StorageError};

pub const STATUS_FILE: &str = "status.json";

/// What the running daemon reports about itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuntimeStatus {
    pub pid: u32,
    pub device_id: String,
    pub started_at_unix: u64,
    pub link: serde_json::Value,
    #[serde(default)]
    pub outbox: Option<crate::outbox::OutboxStats>,
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
