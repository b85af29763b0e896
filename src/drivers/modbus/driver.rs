//! The built-in SunSpec driver (`[[drivers]] kind = "sunspec"`): one Modbus TCP link, the
//! SunSpec devices behind its unit ids found by discovery, polled at a fixed interval, their
//! states sent as samples, and their commands carried out over the same link.
//!
//! One task owns the link, so polls and commands are one queue: no two requests are ever in
//! flight to a device, and a single-client inverter sees a single client. A unit that stops
//! answering is skipped (its devices report nothing, never zeros) and the link is retried with
//! backoff; the other units on the link carry on. A write is read back and compared before the
//! command succeeds; a device that refuses it answers the command with its Modbus exception.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::discover::{discover, Discovered};
use super::link::{Link, ModbusError, Target, WriteMode, MAX_READ};
use super::profiles::{self, Overrides, Quirks};
use super::serial::{self, Parity, SerialSettings};
use crate::drivers::sunspec::chain::{Block, ModelHeader};
use crate::drivers::sunspec::mapping::{self, DeviceSpec, Unit};
use crate::drivers::sunspec::points;
use crate::drivers::{Availability, CommandFailure, DriverCommand, Sample};
use crate::model::backoff::Backoff;
use crate::model::device::DeviceType;
use crate::model::rejection::Rejection;

/// The Modbus TCP port when `tcp` names none.
pub(crate) const MODBUS_PORT: u16 = 502;

/// `[[drivers]] kind = "sunspec"`: one physical link (a Modbus TCP endpoint, or an RS-485 bus
/// on a serial port) and the unit ids behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SunSpecSettings {
    /// Names the link in logs.
    pub name: String,
    /// `HOST` or `HOST:PORT` (502 if left out); resolved at each connect, so a name works
    /// before the network is up. Exactly one of `tcp` and `serial`.
    #[serde(default)]
    pub tcp: Option<String>,
    /// The serial port of an RS-485 bus (Modbus RTU), such as `/dev/ttyUSB0`.
    #[serde(default)]
    pub serial: Option<PathBuf>,
    /// The bus's baud rate (serial only; 9600 if left out).
    #[serde(default)]
    pub baud: Option<u32>,
    /// The bus's parity: `none`, `even` or `odd` (serial only; `none` if left out).
    #[serde(default)]
    pub parity: Option<Parity>,
    /// 1 or 2 (serial only; 1 if left out).
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// The unit ids to discover on it, 1 to 247 on a serial bus, 1 to 255 over TCP.
    #[serde(default = "default_units")]
    pub units: Vec<u16>,
    /// The SunSpec base address, if not 40000, 0 or 50000.
    #[serde(default)]
    pub base: Option<u16>,
    /// How often every device is read, milliseconds (500 to 3600000).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// A shipped quirk profile ([`profiles::PROFILES`]); the keys below override it.
    #[serde(default)]
    pub profile: Option<String>,
    /// How long one answer may take, milliseconds (50 to 60000; 1000 if left out).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// A pause after connecting, for devices that drop the first request (0 to 30000 ms).
    #[serde(default)]
    pub delay_after_connect_ms: Option<u64>,
    /// The largest read, registers (1 to 125).
    #[serde(default)]
    pub max_read: Option<u16>,
    /// The least time between an answer and the next request, milliseconds (0 to 10000).
    #[serde(default)]
    pub pause_ms: Option<u64>,
    /// The write function: `auto` (6 for one register, 16 for more), `single` or `multiple`.
    #[serde(default)]
    pub writes: Option<WriteMode>,
    /// Points the devices refuse to be written, as `MODEL.POINT` (`"802.SoCRsvMin"`).
    #[serde(default)]
    pub no_write: Option<Vec<String>>,
}

fn default_units() -> Vec<u16> {
    vec![1]
}
fn default_poll_ms() -> u64 {
    5_000
}

/// A serial bus's baud rate when the entry names none.
pub(crate) const DEFAULT_BAUD: u32 = 9_600;

impl SunSpecSettings {
    /// Checks entry `n` (1-based) of `[[drivers]]`; the message names the entry and the key.
    pub(crate) fn validate(&self, n: usize) -> Result<(), Rejection> {
        let bad = |key: &'static str, problem: String| {
            Rejection::new(key, format!("driver #{n} ({}): {problem}", self.name))
        };
        if self.name.is_empty() {
            return Err(bad("drivers.name", "must not be empty".into()));
        }
        let top_unit = match (&self.tcp, &self.serial) {
            (Some(tcp), None) => {
                endpoint(tcp).map_err(|problem| bad("drivers.tcp", problem))?;
                for (key, set) in [
                    ("drivers.baud", self.baud.is_some()),
                    ("drivers.parity", self.parity.is_some()),
                    ("drivers.stop_bits", self.stop_bits.is_some()),
                ] {
                    if set {
                        return Err(bad(key, "applies to a serial port, not to tcp".into()));
                    }
                }
                255
            }
            (None, Some(path)) => {
                if !path.is_absolute() {
                    return Err(bad(
                        "drivers.serial",
                        format!(
                            "{}: expected an absolute path, such as /dev/ttyUSB0",
                            path.display()
                        ),
                    ));
                }
                if let Some(baud) = self.baud {
                    serial::check_baud(baud).map_err(|problem| bad("drivers.baud", problem))?;
                }
                if let Some(bits) = self.stop_bits {
                    serial::check_stop_bits(bits)
                        .map_err(|problem| bad("drivers.stop_bits", problem))?;
                }
                // 248 to 255 are reserved on a serial line, 0 is broadcast.
                247
            }
            (Some(_), Some(_)) => {
                return Err(bad(
                    "drivers.serial",
                    "give tcp or serial, not both: one entry is one link".into(),
                ))
            }
            (None, None) => {
                return Err(bad(
                    "drivers.tcp",
                    "give tcp (HOST[:PORT]) or serial (a serial port such as /dev/ttyUSB0)".into(),
                ))
            }
        };
        if self.units.is_empty() {
            return Err(bad("drivers.units", "list at least one unit id".into()));
        }
        for (i, &u) in self.units.iter().enumerate() {
            if !(1..=top_unit).contains(&u) {
                return Err(bad(
                    "drivers.units",
                    format!("{u} is not a unit id from 1 to {top_unit}"),
                ));
            }
            if self.units[..i].contains(&u) {
                return Err(bad("drivers.units", format!("unit {u} is listed twice")));
            }
        }
        if let Some(name) = &self.profile {
            profiles::profile(name).map_err(|problem| bad("drivers.profile", problem))?;
        }
        for text in self.no_write.iter().flatten() {
            profiles::point_ref(text).map_err(|problem| bad("drivers.no_write", problem))?;
        }
        let ranges: [(&'static str, Option<u64>, u64, u64); 5] = [
            ("drivers.poll_ms", Some(self.poll_ms), 500, 3_600_000),
            ("drivers.timeout_ms", self.timeout_ms, 50, 60_000),
            (
                "drivers.delay_after_connect_ms",
                self.delay_after_connect_ms,
                0,
                30_000,
            ),
            (
                "drivers.max_read",
                self.max_read.map(u64::from),
                1,
                u64::from(MAX_READ),
            ),
            ("drivers.pause_ms", self.pause_ms, 0, 10_000),
        ];
        for (key, value, lo, hi) in ranges {
            match value {
                Some(value) if !(lo..=hi).contains(&value) => {
                    return Err(bad(key, format!("expected {lo} to {hi}, found {value}")));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The link's quirks: the entry's own keys over its profile over the defaults. The
    /// configuration was validated.
    pub(crate) fn quirks(&self) -> Quirks {
        let profile = self
            .profile
            .as_deref()
            .and_then(|p| profiles::profile(p).ok());
        let own = Overrides {
            timeout_ms: self.timeout_ms,
            delay_after_connect_ms: self.delay_after_connect_ms,
            max_read: self.max_read,
            pause_ms: self.pause_ms,
            writes: self.writes,
            no_write: self.no_write.as_ref().map(|list| {
                list.iter()
                    .filter_map(|t| profiles::point_ref(t).ok())
                    .collect()
            }),
        };
        profiles::resolve(profile, &own)
    }

    /// Where the link goes. The configuration was validated.
    pub(crate) fn target(&self) -> Target {
        match (&self.tcp, &self.serial) {
            (_, Some(path)) => Target::Serial(SerialSettings {
                path: path.clone(),
                baud: self.baud.unwrap_or(DEFAULT_BAUD),
                parity: self.parity.unwrap_or_default(),
                stop_bits: self.stop_bits.unwrap_or(1),
            }),
            (Some(tcp), None) => {
                let (host, port) = endpoint(tcp).unwrap_or_else(|_| (tcp.clone(), MODBUS_PORT));
                Target::Tcp { host, port }
            }
            (None, None) => Target::Tcp {
                host: String::new(),
                port: MODBUS_PORT,
            },
        }
    }

    /// What makes two entries one physical link: the endpoint, or the serial port's path.
    pub(crate) fn link_key(&self) -> String {
        match self.target() {
            Target::Tcp { host, port } => format!("{}:{port}", host.to_ascii_lowercase()),
            Target::Serial(s) => s.path.display().to_string(),
        }
    }
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT` as host and port; a message naming what is wrong.
pub(crate) fn endpoint(tcp: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = tcp.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{tcp:?}: an IPv6 address needs its closing ]"))?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(format!("{tcp:?}: expected ]:PORT after the address")),
        }
    } else {
        match tcp.rsplit_once(':') {
            Some((host, port)) if !host.contains(':') => (host, Some(port)),
            Some(_) => return Err(format!("{tcp:?}: write an IPv6 address as [ADDRESS]:PORT")),
            None => (tcp, None),
        }
    };
    if host.is_empty() || host.chars().any(char::is_whitespace) {
        return Err(format!("{tcp:?}: expected HOST or HOST:PORT"));
    }
    let port = match port {
        None => MODBUS_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => return Err(format!("{tcp:?}: {p:?} is not a port from 1 to 65535")),
        },
    };
    Ok((host.to_owned(), port))
}

/// A unit found by discovery: its models and identity, kept for every later poll.
struct Known {
    unit: u8,
    discovered: Discovered,
    /// The last poll's reading, for commands (scale factors, addresses).
    last: Option<Unit>,
    answering: bool,
    /// Rounds in a row the unit answered busy ([`BUSY_ROUNDS`]).
    busy_rounds: u32,
}

/// Rounds in a row a unit may answer busy (Modbus exception 5 or 6) before its devices are
/// reported offline. A device busy with its own work for a moment (an inverter changing mode)
/// is still there, and reporting it offline at once would flap its availability and republish
/// the capabilities each time. Meanwhile its reading is skipped: never reported as 0, nor as
/// the last value again.
const BUSY_ROUNDS: u32 = 3;

/// Runs the driver until `stop` or until the agent drops its command channel.
pub(crate) async fn run(
    settings: SunSpecSettings,
    samples: mpsc::Sender<Sample>,
    availability: mpsc::Sender<Availability>,
    mut commands: mpsc::Receiver<DriverCommand>,
    mut stop: crate::agent::service::Shutdown,
) {
    let quirks = settings.quirks();
    let mut driver = Driver {
        availability,
        link: Link::new(settings.target(), quirks.link.clone()),
        quirks,
        units: Vec::new(),
        devices: Vec::new(),
        backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)),
        settings,
    };
    let mut next_poll = Instant::now();
    loop {
        tokio::select! {
            () = stop.wait() => return,
            () = tokio::time::sleep_until(next_poll) => {
                let healthy = driver.poll(&samples).await;
                let wait = if healthy {
                    driver.backoff.reset();
                    Duration::from_millis(driver.settings.poll_ms)
                } else {
                    driver.backoff.next_delay().max(Duration::from_millis(driver.settings.poll_ms))
                };
                next_poll = Instant::now() + wait;
                if samples.is_closed() {
                    return;
                }
            }
            command = commands.recv() => match command {
                Some(command) => driver.command(command).await,
                None => return,
            },
        }
    }
}

struct Driver {
    settings: SunSpecSettings,
    availability: mpsc::Sender<Availability>,
    /// The one link: every request of this driver goes through it.
    link: Link,
    quirks: Quirks,
    units: Vec<Known>,
    devices: Vec<DeviceSpec>,
    backoff: Backoff,
}

impl Driver {
    /// One round: discovers the units not found yet, then reads every found one and sends its
    /// devices' states. `false` when no unit answered (the caller backs off).
    async fn poll(&mut self, samples: &mpsc::Sender<Sample>) -> bool {
        let name = self.settings.name.clone();
        if let Err(problem) = self.discover_missing().await {
            tracing::warn!(driver = %name, problem, "sunspec: discovery failed");
            return false;
        }
        // Only what this round read is reported: a unit that was not read (the link failed
        // before it) has no state now; its last reading is kept only for commands.
        let mut round: Vec<Unit> = Vec::new();
        for i in 0..self.units.len() {
            let unit = self.units[i].unit;
            // The models discovery could read: one that answered it with an exception (some
            // devices list models they refuse to serve) would fail every round.
            let headers: Vec<ModelHeader> = self.units[i]
                .discovered
                .blocks
                .iter()
                .map(|b| b.header)
                .collect();
            match self.read_unit(unit, &headers).await {
                Ok(blocks) => {
                    self.units[i].busy_rounds = 0;
                    if !self.units[i].answering {
                        tracing::info!(driver = %name, unit, "sunspec: unit answering");
                        self.units[i].answering = true;
                        self.announce(unit, true, None).await;
                    }
                    let known = &mut self.units[i];
                    let reading = Unit {
                        unit,
                        common: known.discovered.common.clone(),
                        blocks,
                    };
                    known.last = Some(reading.clone());
                    round.push(reading);
                }
                Err(e) if e.is_unreachable() => {
                    // The endpoint cannot be reached: every unit behind it is offline until
                    // the next round gets through.
                    let reason = e.to_string();
                    for j in i..self.units.len() {
                        self.not_answering(j, &reason).await;
                    }
                    break;
                }
                Err(e)
                    if e.is_busy()
                        && self.units[i].answering
                        && self.units[i].busy_rounds + 1 < BUSY_ROUNDS =>
                {
                    self.units[i].busy_rounds += 1;
                    tracing::debug!(driver = %name, unit, error = %e,
                        rounds = self.units[i].busy_rounds,
                        "sunspec: unit busy; its reading is skipped this round");
                }
                // This unit: an exception, or a timeout or broken answer (the link closed the
                // connection; the next unit connects again), so one silent unit behind a
                // gateway does not silence the others.
                Err(e) => self.not_answering(i, &e.to_string()).await,
            }
        }
        for device in &self.devices {
            let Some(state) = mapping::state(device, &round) else {
                continue;
            };
            let sample = Sample {
                device_id: device.device_id.clone(),
                state,
                commands: Some(device.commands.clone()),
            };
            if samples.send(sample).await.is_err() {
                break;
            }
        }
        !round.is_empty()
    }

    /// Unit `self.units[i]` did not answer (`reason`): logged and announced once, when it
    /// stops.
    async fn not_answering(&mut self, i: usize, reason: &str) {
        let known = &mut self.units[i];
        if !known.answering {
            return;
        }
        known.answering = false;
        let unit = known.unit;
        tracing::warn!(driver = %self.settings.name, unit, error = reason, "sunspec: unit not answering; its devices report nothing until it does");
        self.announce(unit, false, Some(reason.to_owned())).await;
    }

    /// Tells the agent that `unit`'s devices are online or not.
    async fn announce(&mut self, unit: u8, online: bool, reason: Option<String>) {
        for device in self.devices.iter().filter(|d| d.unit == unit) {
            let change = Availability {
                device_id: device.device_id.clone(),
                online,
                reason: reason.clone(),
            };
            if self.availability.send(change).await.is_err() {
                return;
            }
        }
    }

    /// Discovers each configured unit not found yet. `Err` when none is known after it.
    async fn discover_missing(&mut self) -> Result<(), String> {
        let name = self.settings.name.clone();
        let base = self.settings.base;
        let wanted: Vec<u8> = self
            .settings
            .units
            .iter()
            .map(|&u| u as u8)
            .filter(|u| !self.units.iter().any(|k| k.unit == *u))
            .collect();
        let mut last = None;
        for unit in wanted {
            match discover(&mut self.link, unit, base).await {
                Ok(found) => {
                    let reading = Unit {
                        unit,
                        common: found.common.clone(),
                        blocks: found.blocks.clone(),
                    };
                    let devices = mapping::devices(&name, &reading);
                    let models: Vec<u16> = found.models.iter().map(|m| m.id).collect();
                    let ids: Vec<&str> = devices.iter().map(|d| d.device_id.as_str()).collect();
                    tracing::info!(
                        driver = %name, unit, base = found.base, ?models, devices = ?ids,
                        serial = found.common.serial.as_deref().unwrap_or(""),
                        "sunspec: unit discovered"
                    );
                    for problem in &found.problems {
                        tracing::warn!(driver = %name, unit, problem, "sunspec: discovery problem");
                    }
                    for d in devices {
                        if self.devices.iter().any(|e| e.device_id == d.device_id) {
                            tracing::warn!(driver = %name, unit, device_id = %d.device_id, "sunspec: two units report the same serial number; the second is ignored");
                            continue;
                        }
                        self.devices.push(d);
                    }
                    self.units.push(Known {
                        unit,
                        discovered: found,
                        last: None,
                        answering: false,
                        busy_rounds: 0,
                    });
                }
                Err(e) => {
                    tracing::debug!(driver = %name, unit, error = %e, "sunspec: unit not discovered");
                    last = Some(e.to_string());
                }
            }
        }
        if self.units.is_empty() {
            return Err(last.unwrap_or_else(|| "no unit configured".into()));
        }
        Ok(())
    }

    /// Reads the blocks of `unit`'s known models that the device model uses.
    async fn read_unit(
        &mut self,
        unit: u8,
        headers: &[ModelHeader],
    ) -> Result<Vec<Block>, ModbusError> {
        let mut blocks = Vec::new();
        for header in headers.iter().filter(|h| used(h.id)) {
            let regs = self
                .link
                .read(unit, header.address, header.read_len())
                .await?;
            blocks.push(Block {
                header: *header,
                regs,
            });
        }
        Ok(blocks)
    }

    async fn command(&mut self, command: DriverCommand) {
        // Commands wait here behind a poll round or an earlier command. One the runner has
        // already answered while it waited (superseded by a newer one for its device, or timed
        // out) has its answer channel dropped: it must not reach the device, or an older
        // setpoint would land after the platform was told it did not. One whose writes have
        // started is carried to the end: half a plan is worse than an older one.
        if command.done.is_closed() {
            tracing::info!(command_id = %command.command_id, device_id = %command.device_id,
                "sunspec: command answered before its turn on the link; nothing written");
            return;
        }
        let outcome = self.execute(&command).await;
        let _ = command.done.send(outcome.map_err(CommandFailure::Reported));
    }

    async fn execute(&mut self, command: &DriverCommand) -> Result<serde_json::Value, String> {
        let device = self
            .devices
            .iter()
            .find(|d| d.device_id == command.device_id)
            .cloned()
            .ok_or_else(|| format!("{} is not a device of this driver", command.device_id))?;
        let number = |member: &str| {
            command
                .input
                .get(member)
                .and_then(serde_json::Value::as_f64)
        };
        // The hardware reverts by itself when the hold lapses, even if the agent is gone. A
        // hold longer than the timer holds gets no timer: reverting early would lift the
        // setpoint while the hold is still meant to be in force.
        let revert = command.safety.hold.as_ref().map_or(0, |h| {
            match h.until.saturating_sub(crate::model::clock::system_secs()) {
                secs if secs > MAX_REVERT_SECS => 0,
                secs => secs.max(1),
            }
        });
        let unit = device.unit;
        match (device.device_type, command.slug.as_str()) {
            (DeviceType::Battery, "battery:set-reserve") => {
                let percent = number("chargePercentage").ok_or("chargePercentage missing")?;
                let reading = self.reading(unit)?;
                let (block, point) = self.reserve(&reading)?;
                let plan = [Write::new(block, point, percent)];
                let now = self.write_all(unit, &plan).await?;
                Ok(json!({"backupReserve": now[0]}))
            }
            (DeviceType::Battery, "battery:set-operating-mode") => {
                let mode = command
                    .input
                    .get("operatingMode")
                    .and_then(serde_json::Value::as_str)
                    .ok_or("operatingMode missing")?;
                let grid = command
                    .input
                    .get("enableGridInteraction")
                    .and_then(serde_json::Value::as_bool)
                    .unwrap_or(false);
                let reading = self.reading(unit)?;
                let storage = reading.block(&[mapping::STORAGE]).ok_or_else(|| {
                    format!(
                        "unit {unit} has no storage controls (model 124): \
                         battery:set-operating-mode needs its StorCtl_Mod, InWRte and OutWRte"
                    )
                })?;
                let mut plan: Vec<Write> = Vec::new();
                // The reserves first: the mode then runs within them.
                if let Some(min) = number("minimumBatteryReserve") {
                    let (block, point) = self.reserve(&reading)?;
                    plan.push(Write::new(block, point, min));
                }
                if let Some(max) = number("maximumBatteryReserve") {
                    let battery = reading
                        .block(&[mapping::BATTERY])
                        .filter(|b| b.point("SocRsvMax").is_some())
                        .ok_or_else(|| {
                            format!(
                                "unit {unit} has no battery model (802) with SocRsvMax: \
                                 maximumBatteryReserve cannot be set"
                            )
                        })?;
                    plan.push(Write::new(battery, "SocRsvMax", max));
                }
                let rates = mapping::storage_mode(mode, grid)?;
                // A device without the timer ("not implemented") may refuse its write; the
                // agent's own hold still reverts it.
                if storage.raw("InOutWRte_RvrtTms").is_some() {
                    let timer = if mode == "reset" { 0 } else { revert };
                    plan.push(Write::new(storage, "InOutWRte_RvrtTms", timer as f64));
                }
                plan.extend(
                    rates
                        .iter()
                        .map(|&(point, v)| Write::new(storage, point, v)),
                );
                let now = self.write_all(unit, &plan).await?;
                let got = |point: &str| {
                    plan.iter()
                        .zip(&now)
                        .rfind(|(w, _)| w.point == point)
                        .map(|(_, v)| *v)
                };
                let mut result = json!({
                    "operatingMode": mode,
                    "storCtlMod": got("StorCtl_Mod"),
                    "inWRte": got("InWRte"),
                    "outWRte": got("OutWRte"),
                    "revertSecs": got("InOutWRte_RvrtTms").map(|v| v as u64),
                });
                if let Some(v) = got("MinRsvPct").or(got("SoCRsvMin")) {
                    result["minimumBatteryReserve"] = json!(v);
                }
                if let Some(v) = got("SocRsvMax") {
                    result["maximumBatteryReserve"] = json!(v);
                }
                Ok(result)
            }
            (DeviceType::Inverter, "inverter:set-export-limit") => {
                let limit = number("exportLimit").ok_or("exportLimit missing")?;
                self.set_export_limit(unit, limit, revert).await
            }
            (kind, slug) => Err(format!(
                "the SunSpec driver does not carry out {slug} for {} ({})",
                device.device_id,
                kind.as_str()
            )),
        }
    }

    /// Where `unit`'s reserve is written, or why it cannot be.
    fn reserve<'u>(&self, reading: &'u Unit) -> Result<(&'u Block, &'static str), String> {
        mapping::reserve_point(reading, |m, p| self.quirks.writable(m, p)).ok_or_else(|| {
            let unit = reading.unit;
            if reading.block(&[mapping::BATTERY]).is_some() {
                format!(
                    "unit {unit}: the configuration says it refuses writes to 802 SoCRsvMin \
                     (its profile or no_write), and it has no storage controls (model 124) \
                     with MinRsvPct"
                )
            } else {
                format!("unit {unit} has no reserve setting (model 802 or 124)")
            }
        })
    }

    /// The last reading of `unit`, for a command.
    fn reading(&self, unit: u8) -> Result<Unit, String> {
        self.units
            .iter()
            .find(|k| k.unit == unit)
            .and_then(|k| k.last.clone())
            .ok_or_else(|| format!("unit {unit} is not answering"))
    }

    /// Carries out `plan` on `unit`: every write is checked before the first is made, so a
    /// device that cannot take all of them gets none; then each is written and read back.
    /// The values now in force, in the plan's order.
    async fn write_all(&mut self, unit: u8, plan: &[Write<'_>]) -> Result<Vec<f64>, String> {
        // Where each write may go first, for all of them, then what each would write.
        for w in plan {
            self.allowed(unit, w)?;
        }
        let mut encoded = Vec::with_capacity(plan.len());
        for w in plan {
            encoded.push(self.check(unit, w)?);
        }
        let mut now = Vec::with_capacity(plan.len());
        for (w, (address, regs, sf)) in plan.iter().zip(encoded) {
            now.push(self.write_checked(unit, w, address, &regs, sf).await?);
        }
        Ok(now)
    }

    /// Refuses a write the device cannot take, before anything is written: a point the
    /// configuration marks as refusing writes, one beyond the model's declared length (it would
    /// land in whatever the device keeps next), one whose scale factor is not implemented, or a
    /// value the point cannot hold. Otherwise its address, registers and scale factor.
    fn check(&self, unit: u8, w: &Write<'_>) -> Result<(u16, Vec<u16>, Option<f64>), String> {
        let (block, point) = (w.block, w.point);
        let id = block.header.id;
        let def = block.point(point).expect("a point of the model");
        let sf = match def.sf {
            None => None,
            Some(name) => Some(block.raw(name).and_then(|v| v.number()).ok_or_else(|| {
                format!(
                    "unit {unit}: {point}'s scale factor {name} is not implemented; the value \
                     cannot be written"
                )
            })?),
        };
        let regs = points::encode(def.ty, w.value, sf)
            .ok_or_else(|| format!("{} cannot be stored in {point} (model {id})", w.value))?;
        Ok((block.header.address + def.offset, regs, sf))
    }

    /// `Err` when the configuration marks `w`'s point as refusing writes, or the model's
    /// declared length ends before it.
    fn allowed(&self, unit: u8, w: &Write<'_>) -> Result<(), String> {
        let (block, point) = (w.block, w.point);
        let id = block.header.id;
        if !self.quirks.writable(id, point) {
            return Err(format!(
                "unit {unit}: the configuration says it refuses writes to {id} {point} (its \
                 profile or no_write)"
            ));
        }
        if !block.declares(point) {
            return Err(format!(
                "unit {unit}: model {id} declares length {}, which ends before {point}",
                block.header.length
            ));
        }
        Ok(())
    }

    /// Writes one checked point and reads its registers back: the value now in force (scaled)
    /// when they are exactly the ones written.
    async fn write_checked(
        &mut self,
        unit: u8,
        w: &Write<'_>,
        address: u16,
        regs: &[u16],
        sf: Option<f64>,
    ) -> Result<f64, String> {
        let point = w.point;
        let def = w.block.point(point).expect("a point of the model");
        self.link
            .write(unit, address, regs)
            .await
            .map_err(|e| format!("{point} at {address}: {e}"))?;
        let back = self
            .link
            .read(unit, address, def.ty.size())
            .await
            .map_err(|e| format!("reading {point} back at {address}: {e}"))?;
        let read = |r: &[u16]| {
            let raw = points::decode(def.ty, r).and_then(|v| v.number());
            points::scaled(raw, sf.or(Some(0.0)))
        };
        if back != regs {
            return Err(format!(
                "unit {unit} accepted {point} = {} but reads back {}",
                w.value,
                read(&back).map_or("nothing".into(), |v| v.to_string())
            ));
        }
        read(&back).ok_or_else(|| format!("{point} reads back as not implemented"))
    }

    /// Limits `unit`'s output to `limit` W through model 123: `WMaxLimPct` as a share of its
    /// maximum power, the revert timer (`revert` seconds, or none), then `WMaxLim_Ena` on; each
    /// written and read back. Limiting output limits export: what the house uses comes off the
    /// output first, so export never exceeds it (it may stay below it).
    async fn set_export_limit(
        &mut self,
        unit: u8,
        limit: f64,
        revert: u64,
    ) -> Result<serde_json::Value, String> {
        let known = self.reading(unit)?;
        let (controls, wmax) = mapping::output_limit(&known)?;
        let pct = (limit / wmax * 100.0).clamp(0.0, 100.0);
        let plan = [
            Write::new(controls, "WMaxLimPct", pct),
            Write::new(controls, "WMaxLimPct_RvrtTms", revert as f64),
            Write::new(controls, "WMaxLim_Ena", 1.0),
        ];
        let now = self.write_all(unit, &plan).await?;
        Ok(json!({
            "exportLimit": limit,
            "wMaxLimPct": now[0],
            "revertSecs": now[1] as u64,
        }))
    }
}

/// One point to write: `value` before scaling.
struct Write<'b> {
    block: &'b Block,
    point: &'static str,
    value: f64,
}

impl<'b> Write<'b> {
    fn new(block: &'b Block, point: &'static str, value: f64) -> Write<'b> {
        Write {
            block,
            point,
            value,
        }
    }
}

/// The longest revert timer a `uint16` of seconds holds (0xFFFF is "not implemented").
const MAX_REVERT_SECS: u64 = 65_534;

/// Whether a poll reads model `id`: the ones the device model maps, and those commands need.
fn used(id: u16) -> bool {
    mapping::INVERTERS.contains(&id)
        || mapping::METERS.contains(&id)
        || [
            mapping::BATTERY,
            mapping::STORAGE,
            mapping::NAMEPLATE,
            mapping::SETTINGS,
            mapping::CONTROLS,
        ]
        .contains(&id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> SunSpecSettings {
        SunSpecSettings {
            name: "roof".into(),
            tcp: Some("192.0.2.10".into()),
            serial: None,
            baud: None,
            parity: None,
            stop_bits: None,
            units: vec![1, 2],
            base: None,
            poll_ms: 5_000,
            profile: None,
            timeout_ms: None,
            delay_after_connect_ms: None,
            max_read: None,
            pause_ms: None,
            writes: None,
            no_write: None,
        }
    }

    fn serial() -> SunSpecSettings {
        SunSpecSettings {
            tcp: None,
            serial: Some("/dev/ttyUSB0".into()),
            ..settings()
        }
    }

    #[test]
    fn endpoints_take_a_host_a_port_and_bracketed_ipv6_and_name_what_is_wrong() {
        assert_eq!(endpoint("10.0.0.5"), Ok(("10.0.0.5".into(), 502)));
        assert_eq!(
            endpoint("inverter.local:1502"),
            Ok(("inverter.local".into(), 1502))
        );
        assert_eq!(endpoint("[fd00::5]"), Ok(("fd00::5".into(), 502)));
        assert_eq!(endpoint("[fd00::5]:503"), Ok(("fd00::5".into(), 503)));
        assert_eq!(
            endpoint("fd00::5"),
            Err("\"fd00::5\": write an IPv6 address as [ADDRESS]:PORT".into())
        );
        assert_eq!(
            endpoint("10.0.0.5:0"),
            Err("\"10.0.0.5:0\": \"0\" is not a port from 1 to 65535".into())
        );
        assert_eq!(
            endpoint(":502"),
            Err("\":502\": expected HOST or HOST:PORT".into())
        );
    }

    #[test]
    fn bad_settings_are_refused_naming_the_entry_and_the_key() {
        assert!(settings().validate(1).is_ok());
        type Case = (fn(&mut SunSpecSettings), &'static str, &'static str);
        let cases: [Case; 16] = [
            (
                |s| s.units = vec![],
                "drivers.units",
                "driver #3 (roof): list at least one unit id",
            ),
            (
                |s| s.units = vec![1, 1],
                "drivers.units",
                "driver #3 (roof): unit 1 is listed twice",
            ),
            (
                |s| s.units = vec![0],
                "drivers.units",
                "driver #3 (roof): 0 is not a unit id from 1 to 255",
            ),
            (
                |s| s.poll_ms = 10,
                "drivers.poll_ms",
                "driver #3 (roof): expected 500 to 3600000, found 10",
            ),
            (
                |s| s.max_read = Some(126),
                "drivers.max_read",
                "driver #3 (roof): expected 1 to 125, found 126",
            ),
            (
                |s| s.tcp = Some("a b".into()),
                "drivers.tcp",
                "driver #3 (roof): \"a b\": expected HOST or HOST:PORT",
            ),
            (
                |s| s.baud = Some(9_600),
                "drivers.baud",
                "driver #3 (roof): applies to a serial port, not to tcp",
            ),
            (
                |s| s.serial = Some("/dev/ttyUSB0".into()),
                "drivers.serial",
                "driver #3 (roof): give tcp or serial, not both: one entry is one link",
            ),
            (
                |s| s.tcp = None,
                "drivers.tcp",
                "driver #3 (roof): give tcp (HOST[:PORT]) or serial (a serial port such as \
                 /dev/ttyUSB0)",
            ),
            (
                |s| {
                    *s = SunSpecSettings {
                        serial: Some("ttyUSB0".into()),
                        ..serial()
                    }
                },
                "drivers.serial",
                "driver #3 (roof): ttyUSB0: expected an absolute path, such as /dev/ttyUSB0",
            ),
            (
                |s| {
                    *s = SunSpecSettings {
                        baud: Some(9_000),
                        ..serial()
                    }
                },
                "drivers.baud",
                "driver #3 (roof): 9000 is not one of 1200, 2400, 4800, 9600, 19200, 38400, \
                 57600, 115200, 230400",
            ),
            (
                |s| {
                    *s = SunSpecSettings {
                        stop_bits: Some(3),
                        ..serial()
                    }
                },
                "drivers.stop_bits",
                "driver #3 (roof): expected 1 or 2, found 3",
            ),
            (
                |s| {
                    *s = SunSpecSettings {
                        units: vec![248],
                        ..serial()
                    }
                },
                "drivers.units",
                "driver #3 (roof): 248 is not a unit id from 1 to 247",
            ),
            (
                |s| s.profile = Some("sma".into()),
                "drivers.profile",
                "driver #3 (roof): \"sma\" is not a profile; the profiles are \
                 kostal-plenticore, apsystems-ecu",
            ),
            (
                |s| s.no_write = Some(vec!["802".into()]),
                "drivers.no_write",
                "driver #3 (roof): \"802\": expected MODEL.POINT, as in \"802.SoCRsvMin\"",
            ),
            (
                |s| s.pause_ms = Some(20_000),
                "drivers.pause_ms",
                "driver #3 (roof): expected 0 to 10000, found 20000",
            ),
        ];
        for (change, key, message) in cases {
            let mut s = settings();
            change(&mut s);
            let e = s.validate(3).unwrap_err();
            assert_eq!((e.key, e.problem.as_str()), (key, message));
        }
        assert!(serial().validate(1).is_ok());
    }

    #[test]
    fn a_serial_entry_is_a_bus_with_its_line_settings_and_quirks_resolve_over_the_profile() {
        let s = SunSpecSettings {
            baud: Some(19_200),
            parity: Some(Parity::Even),
            profile: Some("kostal-plenticore".into()),
            max_read: Some(60),
            ..serial()
        };
        assert_eq!(
            s.target(),
            Target::Serial(SerialSettings {
                path: "/dev/ttyUSB0".into(),
                baud: 19_200,
                parity: Parity::Even,
                stop_bits: 1,
            })
        );
        assert_eq!(s.link_key(), "/dev/ttyUSB0");
        let q = s.quirks();
        assert_eq!((q.link.writes, q.link.max_read), (WriteMode::Single, 60));
        assert!(!q.writable(802, "SoCRsvMin"));
        assert_eq!(
            serial().target(),
            Target::Serial(SerialSettings {
                path: "/dev/ttyUSB0".into(),
                baud: DEFAULT_BAUD,
                parity: Parity::None,
                stop_bits: 1,
            })
        );
        assert_eq!(
            SunSpecSettings {
                tcp: Some("Inverter.LOCAL".into()),
                ..settings()
            }
            .link_key(),
            "inverter.local:502"
        );
    }
}
