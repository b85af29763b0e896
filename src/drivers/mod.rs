//! Drivers: where device state comes from and where commands go.
//!
//! drivers → telemetry → outbox → link (state), and the command runner → drivers (commands).
//!
//! Two kinds: [`sim`] devices built into the agent (deterministic given a seed, for the demo
//! and tests), the built-in protocol drivers ([`modbus`] for SunSpec, [`ocpp`] for charge
//! points), and external [`process`] drivers that integrators write in any language and that
//! speak JSON lines over stdin/stdout (docs/PROTOCOL.md, "Driver protocol").

pub mod modbus;
pub(crate) mod ocpp;
pub mod process;
pub mod simulated;
pub(crate) mod sunspec;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::model::device::{DeviceState, DeviceType, DriverHealth};

/// Samples waiting for the telemetry task. Drivers block (back-pressure) when it is full.
pub const SAMPLE_QUEUE: usize = 256;

/// At the agent's stop, how long a process driver has, from the stop, to take its `cancel`
/// lines and the end of its stdin and exit on its own before it is killed (PROTOCOL 15.5).
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// How long the daemon waits for every driver task to end at a stop before it aborts them:
/// [`STOP_GRACE`] and the time to kill and reap a driver that used all of it.
pub const STOP_BUDGET: std::time::Duration = std::time::Duration::from_millis(1_000);

/// A state update from a driver.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub device_id: String,
    pub state: DeviceState,
    /// The slugs the device carries out, where its driver knows them to be fewer than its
    /// type's whole catalog (a SunSpec battery without storage controls has no
    /// `battery:set-operating-mode`): the capabilities list only these, and a command for any
    /// other is refused before it reaches the driver. `None`: every slug of its type.
    pub commands: Option<Arc<[&'static str]>>,
}

/// A driver lost a device, or has it back (PROTOCOL 14.7): reported in telemetry as an
/// `availability` point and in the capabilities message as the device's `online`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Availability {
    #[serde(skip)]
    pub device_id: String,
    pub online: bool,
    /// Why it is offline, for people.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Availability changes on their way to telemetry.
pub type AvailabilitySender = mpsc::Sender<Availability>;

/// A command for one device, with the channel its outcome goes back on.
#[derive(Debug)]
pub struct DriverCommand {
    pub command_id: String,
    pub device_id: String,
    pub slug: String,
    pub input: serde_json::Map<String, serde_json::Value>,
    /// The device's hold and fail-safe control, for a driver that can program a hardware
    /// revert timer (PROTOCOL 15.3).
    pub safety: crate::model::safety::DriverSafety,
    /// `Ok(result)` or why it failed; dropping it without an answer means the driver died.
    pub done: oneshot::Sender<Result<serde_json::Value, CommandFailure>>,
}

/// Why a driver command failed. Kept typed up to the reply, where the command runner gives each
/// kind its error code (docs/PROTOCOL.md 4.4): a driver that is busy or not running is told
/// apart from one that tried and failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandFailure {
    /// The driver answered the command with failure; its reason, as the driver gave it.
    #[error("{0}")]
    Reported(String),
    /// The driver exited (or closed its stdout) before answering.
    #[error("driver exited")]
    DriverExited,
    /// No driver process is running: it is between restarts or cannot be started.
    #[error("driver not running")]
    DriverNotRunning,
    /// The driver is not reading its stdin, or has 64 commands unanswered.
    #[error("driver busy")]
    DriverBusy,
    /// A command with the same id is already in flight at this driver.
    #[error("duplicate command id")]
    DuplicateCommandId,
    /// The agent is stopping.
    #[error("agent shutting down")]
    ShuttingDown,
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
    /// SunSpec devices over one Modbus TCP link, found by discovery.
    Sunspec(modbus::driver::SunSpecSettings),
    /// An OCPP 1.6J central system: the charge points that connect to it are chargers.
    Ocpp(ocpp::OcppSettings),
    /// An external driver process (argv, no shell).
    Process {
        name: String,
        command: Vec<String>,
        /// Longest line accepted from the driver; longer lines are counted and skipped.
        #[serde(default = "default_max_line_bytes")]
        max_line_bytes: usize,
        /// Run the driver in its own namespaces, with the agent's state and keys out of sight
        /// ([`process::DriverSandbox`]). `false` runs it with the agent's full access: only for
        /// a kernel without user namespaces, and only for a driver trusted as much as the agent.
        #[serde(default = "default_sandbox")]
        sandbox: bool,
    },
}

fn default_interval_ms() -> u64 {
    5_000
}
fn default_max_line_bytes() -> usize {
    64 * 1024
}
fn default_sandbox() -> bool {
    true
}

/// Sends samples from every driver to telemetry, and routes commands to the right driver.
pub type SampleSender = mpsc::Sender<Sample>;

/// What the agent knows about each device behind the gateway: where its commands go, its type
/// and its latest state. Shared (behind a mutex held only for map operations) between the
/// per-driver forwarders that learn it and the command executor that reads it.
#[derive(Debug, Clone, Default)]
pub struct DriverRegistry {
    inner: std::sync::Arc<std::sync::Mutex<Registry>>,
    /// Bumped whenever a device appears, so its capabilities can be re-advertised.
    changed: std::sync::Arc<tokio::sync::watch::Sender<u64>>,
}

#[derive(Debug, Default)]
struct Registry {
    devices: std::collections::BTreeMap<String, Device>,
}

#[derive(Debug, Clone)]
struct Device {
    route: mpsc::Sender<DriverCommand>,
    state: DeviceState,
    /// `false` from when its driver says it is not answering until it says it is back.
    online: bool,
    /// [`Sample::commands`], from its latest sample.
    commands: Option<Arc<[&'static str]>>,
}

/// One device as the capabilities message lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct KnownDevice {
    pub device_id: String,
    pub device_type: DeviceType,
    pub online: bool,
    /// [`Sample::commands`].
    pub commands: Option<Arc<[&'static str]>>,
}

impl KnownDevice {
    /// Whether the device carries out `slug` (one of its type's).
    pub fn takes(&self, slug: &str) -> bool {
        self.commands
            .as_ref()
            .is_none_or(|commands| commands.contains(&slug))
    }
}

impl DriverRegistry {
    /// The command channel of the driver behind `device_id`, and the device's type.
    pub fn route(&self, device_id: &str) -> Option<(mpsc::Sender<DriverCommand>, DeviceType)> {
        let inner = self.inner.lock().expect("registry lock");
        inner
            .devices
            .get(device_id)
            .map(|d| (d.route.clone(), d.state.device_type()))
    }

    /// `device_id` as the capabilities list it.
    pub fn device(&self, device_id: &str) -> Option<KnownDevice> {
        let inner = self.inner.lock().expect("registry lock");
        inner.devices.get(device_id).map(|d| known(device_id, d))
    }

    /// Every known device with its latest state, ordered by id.
    pub fn states(&self) -> Vec<(String, DeviceState)> {
        let inner = self.inner.lock().expect("registry lock");
        inner
            .devices
            .iter()
            .map(|(id, d)| (id.clone(), d.state.clone()))
            .collect()
    }

    /// Every known device with its type, whether it is online and the commands it takes,
    /// ordered by id.
    pub fn devices(&self) -> Vec<KnownDevice> {
        let inner = self.inner.lock().expect("registry lock");
        inner.devices.iter().map(|(id, d)| known(id, d)).collect()
    }

    /// Records that `device_id` is online or not; `true` when that changed for a known device
    /// (the capabilities message is then advertised again).
    fn set_online(&self, device_id: &str, online: bool) -> bool {
        let mut inner = self.inner.lock().expect("registry lock");
        let Some(device) = inner.devices.get_mut(device_id) else {
            return false;
        };
        if device.online == online {
            return false;
        }
        device.online = online;
        drop(inner);
        self.changed.send_modify(|n| *n += 1);
        true
    }

    /// Resolves whenever a new device has been seen, or one went offline or came back.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Records a sample; `false` when it must be dropped: an invalid device id, or one that
    /// another driver already owns (the first driver to report an id keeps it, so a buggy or
    /// hostile driver cannot take over another device's commands).
    fn observe(&self, sample: &Sample, route: &mpsc::Sender<DriverCommand>) -> bool {
        if crate::model::gateway::GatewayId::parse(&sample.device_id).is_err() {
            return false;
        }
        let mut inner = self.inner.lock().expect("registry lock");
        if inner
            .devices
            .get(&sample.device_id)
            .is_some_and(|d| !d.route.same_channel(route))
        {
            return false;
        }
        let known = inner
            .devices
            .get(&sample.device_id)
            .map(|d| (d.state.device_type(), d.online, d.commands.clone()));
        // Availability is the driver's to say (`set_online`): a state racing ahead of the
        // driver's "back online" must not swallow that point.
        let online = known.as_ref().is_none_or(|(_, online, _)| *online);
        inner.devices.insert(
            sample.device_id.clone(),
            Device {
                route: route.clone(),
                state: sample.state.clone(),
                online,
                commands: sample.commands.clone(),
            },
        );
        drop(inner);
        // What the capabilities message lists changed: a new device, another type, or other
        // commands (a SunSpec device rediscovered with other models).
        let listed = (sample.state.device_type(), &sample.commands);
        if known.as_ref().map(|(t, _, c)| (*t, c)) != Some(listed) {
            self.changed.send_modify(|n| *n += 1);
        }
        true
    }
}

fn known(device_id: &str, d: &Device) -> KnownDevice {
    KnownDevice {
        device_id: device_id.to_owned(),
        device_type: d.state.device_type(),
        online: d.online,
        commands: d.commands.clone(),
    }
}

/// Where the health point reads one process driver's counters.
///
/// The driver's supervisor bumps the counters; telemetry reads them when it makes a health
/// point. This handle is all the two share: telemetry needs neither the supervisor nor the
/// driver's settings, and neither side ever waits for the other (the counters are atomics).
#[derive(Debug, Clone)]
pub struct DriverHealthSource {
    /// The driver's configured `name`, which the platform sees.
    pub name: String,
    pub stats: Arc<process::DriverStats>,
}

impl DriverHealthSource {
    /// The driver's figures as the health point reports them.
    pub fn read(&self) -> DriverHealth {
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        // Two relaxed loads may see one counter a moment staler than the other. Around a
        // restart that only makes `running` flip a moment early or late, which is harmless in
        // a figure sampled every `health_interval_secs`.
        let (spawns, exits) = (load(&self.stats.spawns), load(&self.stats.exits));
        DriverHealth {
            name: self.name.clone(),
            running: spawns > exits,
            // Saturating: `spawns` stays 0 while the program cannot be started at all.
            restarts: spawns.saturating_sub(1),
            malformed_lines: load(&self.stats.malformed_lines),
            oversized_lines: load(&self.stats.oversized_lines),
            samples: load(&self.stats.samples),
        }
    }
}

/// Passes one driver's samples on to telemetry, learning its devices on the way.
async fn forward(
    mut from_driver: mpsc::Receiver<Sample>,
    to_telemetry: SampleSender,
    route: mpsc::Sender<DriverCommand>,
    registry: DriverRegistry,
) {
    let mut refused = 0u64;
    while let Some(sample) = from_driver.recv().await {
        if !registry.observe(&sample, &route) {
            refused += 1;
            tracing::warn!(device_id = %sample.device_id, refused, "sample dropped: invalid device id or one owned by another driver");
            continue;
        }
        if to_telemetry.send(sample).await.is_err() {
            return;
        }
    }
}

/// Passes one driver's availability changes on to telemetry, as far as they change what the
/// registry holds (a device not seen yet has nothing to lose).
async fn forward_availability(
    mut from_driver: mpsc::Receiver<Availability>,
    to_telemetry: AvailabilitySender,
    registry: DriverRegistry,
) {
    while let Some(change) = from_driver.recv().await {
        if registry.set_online(&change.device_id, change.online)
            && to_telemetry.send(change).await.is_err()
        {
            return;
        }
    }
}

/// Starts every configured driver; their samples go to `samples`, and their availability
/// changes (the sunspec and ocpp drivers have any) to `availability`. Process drivers run in
/// `sandbox` unless their settings say `sandbox = false`.
///
/// Returns the registry of their devices, the counters of each process driver in configuration
/// order (for the health point; simulated drivers keep none), and the drivers' tasks, which end
/// by themselves once `shutdown` triggers (the daemon gives them [`STOP_BUDGET`]).
pub fn start(
    settings: &[DriverSettings],
    sandbox: &process::DriverSandbox,
    samples: &SampleSender,
    availability: &AvailabilitySender,
    shutdown: &crate::agent::service::Shutdown,
) -> (
    DriverRegistry,
    Vec<DriverHealthSource>,
    Vec<tokio::task::JoinHandle<()>>,
) {
    let registry = DriverRegistry::default();
    let sandbox = Arc::new(sandbox.clone());
    let mut health = Vec::new();
    let mut tasks = Vec::new();
    for d in settings {
        let (command_tx, command_rx) = mpsc::channel(8);
        let (sample_tx, sample_rx) = mpsc::channel(SAMPLE_QUEUE);
        tasks.push(tokio::spawn(forward(
            sample_rx,
            samples.clone(),
            command_tx,
            registry.clone(),
        )));
        match d {
            DriverSettings::Simulated {
                device_id,
                device_type,
                interval_ms,
                seed,
            } => {
                let device = simulated::run(
                    device_id.clone(),
                    *device_type,
                    std::time::Duration::from_millis(*interval_ms),
                    *seed,
                    sample_tx,
                    command_rx,
                );
                // Ends at the stop, like a process driver's supervisor, so the daemon can wait
                // for every driver task instead of aborting them.
                let mut stop = shutdown.clone();
                tasks.push(tokio::spawn(async move {
                    tokio::select! {
                        () = device => {}
                        () = stop.wait() => {}
                    }
                }));
            }
            DriverSettings::Sunspec(settings) => {
                let (availability_tx, availability_rx) = mpsc::channel(SAMPLE_QUEUE);
                tasks.push(tokio::spawn(forward_availability(
                    availability_rx,
                    availability.clone(),
                    registry.clone(),
                )));
                tasks.push(tokio::spawn(modbus::driver::run(
                    settings.clone(),
                    sample_tx,
                    availability_tx,
                    command_rx,
                    shutdown.clone(),
                )));
            }
            DriverSettings::Ocpp(settings) => {
                let (availability_tx, availability_rx) = mpsc::channel(SAMPLE_QUEUE);
                tasks.push(tokio::spawn(forward_availability(
                    availability_rx,
                    availability.clone(),
                    registry.clone(),
                )));
                tasks.push(tokio::spawn(ocpp::run(
                    settings.clone(),
                    sample_tx,
                    availability_tx,
                    command_rx,
                    shutdown.clone(),
                )));
            }
            DriverSettings::Process { .. } => {
                let driver =
                    process::ProcessDriver::from_settings(d, &sandbox).expect("a process driver");
                let stats = Arc::new(process::DriverStats::default());
                health.push(DriverHealthSource {
                    name: driver.name.clone(),
                    stats: stats.clone(),
                });
                tasks.push(tokio::spawn(driver.supervise(
                    sample_tx,
                    command_rx,
                    shutdown.clone(),
                    stats,
                )));
            }
        }
    }
    (registry, health, tasks)
}
