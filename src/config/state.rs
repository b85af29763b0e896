//! `[state]`: where durable and volatile state live.
//!
//! Two directories because they wear differently: durable state is written rarely and must
//! survive a reboot; the live status is rewritten often and belongs on a tmpfs.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Rejection;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// Durable state: survives reboots (systemd `StateDirectory=`).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// Volatile state: the live status file and, later, the control socket
    /// (systemd `RuntimeDirectory=`, a tmpfs, so frequent updates cost no flash wear).
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/texture-agent")
}
fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/texture-agent")
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            dir: default_state_dir(),
            runtime_dir: default_runtime_dir(),
        }
    }
}

impl StateSettings {
    /// Absolute paths only: a relative one would depend on the daemon's working directory.
    pub(crate) fn validate(&self) -> Result<(), Rejection> {
        if self.dir.as_os_str().is_empty() || !self.dir.is_absolute() {
            return Err(Rejection::new(
                "state.dir",
                format!("expected an absolute path, found {:?}", self.dir),
            ));
        }
        if self.runtime_dir.as_os_str().is_empty() || !self.runtime_dir.is_absolute() {
            return Err(Rejection::new(
                "state.runtime_dir",
                format!("expected an absolute path, found {:?}", self.runtime_dir),
            ));
        }
        Ok(())
    }
}
