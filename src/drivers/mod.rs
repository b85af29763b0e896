//! Drivers: where device state comes from and where commands go.
//!
//! drivers → telemetry → outbox → link (state), and dispatch → commands → drivers (commands).
//!
//! Two kinds: [`sim`] devices built into the agent (deterministic given a seed, for the demo
//! and tests), and external [`process`] drivers that integrators write in any language and that
//! speak JSON lines over stdin/stdout (docs/PROTOCOL.md, "Driver protocol").

pub mod process;
pub mod sim;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::telemetry::model::{DeviceState, DeviceType};

/// Samples waiting for the telemetry task. Drivers block (back-pressure) when it is full.
pub const SAMPLE_QUEUE: usize = 256;

/// A state update from a driver.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub device_id: String,
    pub state: DeviceState,
}

/// A command for one device, with the channel its outcome goes back on.
#[derive(Debug)]
pub struct DriverCommand {
    pub command_id: String,
    pub device_id: String,
    pub slug: String,
    pub input: serde_json::Map<String, serde_json::Value>,
    /// `Ok(result)` or `Err(reason)`; dropping it without an answer means the driver died.
    pub done: oneshot::Sender<Result<serde_json::Value, String>>,
}

/// One `[[drivers]]` entry in the configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum DriverSettings {
    /// A built-in simulated device.
    Simulated {
        device_id: String,
        device_type: DeviceType,
        #[serde(default = "default_interval_ms")]
        interval_ms: u64,
        #[serde(default)]
        seed: u64,
    },
    /// An external driver process (argv, no shell).
    Process {
        name: String,
        command: Vec<String>,
        /// Longest line accepted from the driver; longer lines are counted and skipped.
        #[serde(default = "default_max_line_bytes")]
        max_line_bytes: usize,
    },
}

fn default_interval_ms() -> u64 {
    5_000
}
fn default_max_line_bytes() -> usize {
    64 * 1024
}

/// Sends samples from every driver to telemetry, and routes commands to the right driver.
pub type SampleSender = mpsc::Sender<Sample>;

/// Where commands for each device go.
#[derive(Debug, Default, Clone)]
pub struct DriverRegistry {
    routes: std::collections::HashMap<String, mpsc::Sender<DriverCommand>>,
}

impl DriverRegistry {
    /// The command channel of the driver behind `device_id`.
    pub fn route(&self, device_id: &str) -> Option<&mpsc::Sender<DriverCommand>> {
        self.routes.get(device_id)
    }

    pub fn device_ids(&self) -> impl Iterator<Item = &str> {
        self.routes.keys().map(String::as_str)
    }
}

/// Starts every configured driver; their samples go to `samples`.
pub fn start(
    settings: &[DriverSettings],
    samples: &SampleSender,
    shutdown: &crate::service::Shutdown,
) -> (DriverRegistry, Vec<tokio::task::JoinHandle<()>>) {
    let mut registry = DriverRegistry::default();
    let mut tasks = Vec::new();
    for d in settings {
        match d {
            DriverSettings::Simulated {
                device_id,
                device_type,
                interval_ms,
                seed,
            } => {
                let (tx, rx) = mpsc::channel(8);
                registry.routes.insert(device_id.clone(), tx);
                tasks.push(tokio::spawn(sim::run(
                    device_id.clone(),
                    *device_type,
                    std::time::Duration::from_millis(*interval_ms),
                    *seed,
                    samples.clone(),
                    rx,
                )));
            }
            DriverSettings::Process { name, .. } => {
                // Wired in with the process supervisor.
                let _ = (name, shutdown);
            }
        }
    }
    (registry, tasks)
}
