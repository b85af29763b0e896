//! The built-in SunSpec driver (`[[drivers]] kind = "sunspec"`): one Modbus TCP link, the
//! SunSpec devices behind its unit ids found by discovery, polled at a fixed interval, their
//! states sent as samples, and their commands carried out over the same link.
//!
//! One task owns the link, so polls and commands are one queue: no two requests are ever in
//! flight to a device, and a single-client inverter sees a single client. A unit that stops
//! answering is skipped (its devices report nothing, never zeros) and the link is retried with
//! backoff; the other units on the link carry on. A write is read back and compared before the
//! command succeeds; a device that refuses it answers the command with its Modbus exception.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::discover::{discover, Discovered};
use super::link::{LinkSettings, ModbusError, TcpLink, MAX_READ};
use crate::drivers::sunspec::chain::{Block, ModelHeader};
use crate::drivers::sunspec::mapping::{self, DeviceSpec, Unit};
use crate::drivers::sunspec::points;
use crate::drivers::{Availability, CommandFailure, DriverCommand, Sample};
use crate::model::backoff::Backoff;
use crate::model::device::DeviceType;
use crate::model::rejection::Rejection;

/// The Modbus TCP port when `tcp` names none.
pub(crate) const MODBUS_PORT: u16 = 502;

/// `[[drivers]] kind = "sunspec"`: one Modbus TCP endpoint and the unit ids behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SunSpecSettings {
    /// Names the link in logs.
    pub name: String,
    /// `HOST` or `HOST:PORT` (502 if left out); resolved at each connect, so a name works
    /// before the network is up.
    pub tcp: String,
    /// The unit ids to discover on it, 1 to 255.
    #[serde(default = "default_units")]
    pub units: Vec<u16>,
    /// The SunSpec base address, if not 40000, 0 or 50000.
    #[serde(default)]
    pub base: Option<u16>,
    /// How often every device is read, milliseconds (500 to 3600000).
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// How long one answer may take, milliseconds (50 to 60000).
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// A pause after connecting, for devices that drop the first request (0 to 30000 ms).
    #[serde(default)]
    pub delay_after_connect_ms: u64,
    /// The largest read, registers (1 to 125).
    #[serde(default = "default_max_read")]
    pub max_read: u16,
    /// Write one register per request (function 6) for devices that refuse function 16.
    #[serde(default)]
    pub single_register_writes: bool,
}

fn default_units() -> Vec<u16> {
    vec![1]
}
fn default_poll_ms() -> u64 {
    5_000
}
fn default_timeout_ms() -> u64 {
    1_000
}
fn default_max_read() -> u16 {
    MAX_READ
}

impl SunSpecSettings {
    /// Checks entry `n` (1-based) of `[[drivers]]`; the message names the entry and the key.
    pub(crate) fn validate(&self, n: usize) -> Result<(), Rejection> {
        let bad = |key: &'static str, problem: String| {
            Rejection::new(key, format!("driver #{n} ({}): {problem}", self.name))
        };
        if self.name.is_empty() {
            return Err(bad("drivers.name", "must not be empty".into()));
        }
        endpoint(&self.tcp).map_err(|problem| bad("drivers.tcp", problem))?;
        if self.units.is_empty() {
            return Err(bad("drivers.units", "list at least one unit id".into()));
        }
        for (i, &u) in self.units.iter().enumerate() {
            if !(1..=255).contains(&u) {
                return Err(bad(
                    "drivers.units",
                    format!("{u} is not a unit id from 1 to 255"),
                ));
            }
            if self.units[..i].contains(&u) {
                return Err(bad("drivers.units", format!("unit {u} is listed twice")));
            }
        }
        let ranges: [(&'static str, u64, u64, u64); 4] = [
            ("drivers.poll_ms", self.poll_ms, 500, 3_600_000),
            ("drivers.timeout_ms", self.timeout_ms, 50, 60_000),
            (
                "drivers.delay_after_connect_ms",
                self.delay_after_connect_ms,
                0,
                30_000,
            ),
            (
                "drivers.max_read",
                u64::from(self.max_read),
                1,
                u64::from(MAX_READ),
            ),
        ];
        for (key, value, lo, hi) in ranges {
            if !(lo..=hi).contains(&value) {
                return Err(bad(key, format!("expected {lo} to {hi}, found {value}")));
            }
        }
        Ok(())
    }

    fn link_settings(&self) -> LinkSettings {
        LinkSettings {
            timeout: Duration::from_millis(self.timeout_ms),
            delay_after_connect: Duration::from_millis(self.delay_after_connect_ms),
            max_read: self.max_read,
        }
    }

    /// The endpoint as `(host, port)`; the configuration was validated.
    pub(crate) fn endpoint(&self) -> (String, u16) {
        endpoint(&self.tcp).unwrap_or_else(|_| (self.tcp.clone(), MODBUS_PORT))
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
}

/// Runs the driver until `stop` or until the agent drops its command channel.
pub(crate) async fn run(
    settings: SunSpecSettings,
    samples: mpsc::Sender<Sample>,
    availability: mpsc::Sender<Availability>,
    mut commands: mpsc::Receiver<DriverCommand>,
    mut stop: crate::agent::service::Shutdown,
) {
    let mut driver = Driver {
        availability,
        link: None,
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
    link: Option<TcpLink>,
    units: Vec<Known>,
    devices: Vec<DeviceSpec>,
    backoff: Backoff,
}

impl Driver {
    /// The link, resolving the endpoint if there is none yet.
    async fn link(&mut self) -> Result<&mut TcpLink, ModbusError> {
        if self.link.is_none() {
            let (host, port) = self.settings.endpoint();
            let unresolved = |problem: String| ModbusError::Resolve {
                endpoint: format!("{host}:{port}"),
                problem,
            };
            let addr: SocketAddr = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| unresolved(e.to_string()))?
                .next()
                .ok_or_else(|| unresolved("no address".into()))?;
            self.link = Some(TcpLink::new(addr, self.settings.link_settings()));
        }
        Ok(self.link.as_mut().expect("set above"))
    }

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
            let link = self.link().await.map_err(|e| e.to_string())?;
            match discover(link, unit, base).await {
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
        let link = self.link().await?;
        let mut blocks = Vec::new();
        for header in headers.iter().filter(|h| used(h.id)) {
            let regs = link.read(unit, header.address, header.read_len()).await?;
            blocks.push(Block {
                header: *header,
                regs,
            });
        }
        Ok(blocks)
    }

    async fn command(&mut self, command: DriverCommand) {
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
        match (device.device_type, command.slug.as_str()) {
            (DeviceType::Battery, "battery:set-reserve") => {
                let percent = command
                    .input
                    .get("chargePercentage")
                    .and_then(serde_json::Value::as_f64)
                    .ok_or("chargePercentage missing")?;
                let now = self.set_reserve(device.unit, percent).await?;
                Ok(json!({"backupReserve": now}))
            }
            (DeviceType::Inverter, "inverter:set-export-limit") => {
                let limit = command
                    .input
                    .get("exportLimit")
                    .and_then(serde_json::Value::as_f64)
                    .ok_or("exportLimit missing")?;
                // The hardware reverts by itself when the hold lapses, even if the agent is
                // gone. A hold longer than the timer holds gets no timer: reverting early
                // would lift the limit while the hold is still meant to be in force.
                let revert = command.safety.hold.as_ref().map_or(0, |h| {
                    match h.until.saturating_sub(crate::model::clock::system_secs()) {
                        secs if secs > MAX_REVERT_SECS => 0,
                        secs => secs.max(1),
                    }
                });
                self.set_export_limit(device.unit, limit, revert).await
            }
            (kind, slug) => Err(format!(
                "the SunSpec driver does not carry out {slug} for {} ({})",
                device.device_id,
                kind.as_str()
            )),
        }
    }

    /// Writes the reserve of `unit` and reads it back; the value now in force.
    async fn set_reserve(&mut self, unit: u8, percent: f64) -> Result<f64, String> {
        let known = self.reading(unit)?;
        let (block, point) = mapping::reserve_point(&known)
            .ok_or_else(|| format!("unit {unit} has no reserve setting (model 802 or 124)"))?;
        self.write_point(unit, block, point, percent).await
    }

    /// The last reading of `unit`, for a command.
    fn reading(&self, unit: u8) -> Result<Unit, String> {
        self.units
            .iter()
            .find(|k| k.unit == unit)
            .and_then(|k| k.last.clone())
            .ok_or_else(|| format!("unit {unit} is not answering"))
    }

    /// Writes `value` to `point` of `block` on `unit`, scaled by the point's scale factor, then
    /// reads the registers back: the value now in force (scaled) when they are exactly the
    /// ones written. Refused before anything is written when the device's declared length
    /// ends before the point, or its scale factor is not implemented.
    async fn write_point(
        &mut self,
        unit: u8,
        block: &Block,
        point: &'static str,
        value: f64,
    ) -> Result<f64, String> {
        let def = block.point(point).expect("a point of the model");
        let id = block.header.id;
        declared(unit, block, point)?;
        let sf = match def.sf {
            None => None,
            Some(name) => Some(block.raw(name).and_then(|v| v.number()).ok_or_else(|| {
                format!(
                    "unit {unit}: {point}'s scale factor {name} is not implemented; the value \
                     cannot be written"
                )
            })?),
        };
        let regs = points::encode(def.ty, value, sf)
            .ok_or_else(|| format!("{value} cannot be stored in {point} (model {id})"))?;
        let address = block.header.address + def.offset;
        let single = self.settings.single_register_writes;
        let link = self.link().await.map_err(|e| e.to_string())?;
        link.write(unit, address, &regs, single)
            .await
            .map_err(|e| format!("{point} at {address}: {e}"))?;
        let back = link
            .read(unit, address, def.ty.size())
            .await
            .map_err(|e| format!("reading {point} back at {address}: {e}"))?;
        let read = |r: &[u16]| {
            let raw = points::decode(def.ty, r).and_then(|v| v.number());
            points::scaled(raw, sf.or(Some(0.0)))
        };
        if back != regs {
            return Err(format!(
                "unit {unit} accepted {point} = {value} but reads back {}",
                read(&back).map_or("nothing".into(), |v| v.to_string())
            ));
        }
        read(&back).ok_or_else(|| format!("{point} reads back as not implemented"))
    }
}

/// `Err` naming `point` when `block`'s declared length ends before it: a write there would land
/// in whatever the device keeps next.
fn declared(unit: u8, block: &Block, point: &str) -> Result<(), String> {
    if block.declares(point) {
        return Ok(());
    }
    Err(format!(
        "unit {unit}: model {} declares length {}, which ends before {point}",
        block.header.id, block.header.length
    ))
}

/// The longest revert timer a `uint16` of seconds holds (0xFFFF is "not implemented").
const MAX_REVERT_SECS: u64 = 65_534;

impl Driver {
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
        // Checked before the first write, so a device that cannot take all three gets none.
        for point in ["WMaxLimPct", "WMaxLimPct_RvrtTms", "WMaxLim_Ena"] {
            declared(unit, controls, point)?;
        }
        if controls.raw("WMaxLimPct_SF").is_none() {
            return Err(format!(
                "unit {unit}: WMaxLimPct's scale factor WMaxLimPct_SF is not implemented; the \
                 limit cannot be written"
            ));
        }
        let pct = (limit / wmax * 100.0).clamp(0.0, 100.0);
        let pct_now = self.write_point(unit, controls, "WMaxLimPct", pct).await?;
        let revert_now = self
            .write_point(unit, controls, "WMaxLimPct_RvrtTms", revert as f64)
            .await?;
        self.write_point(unit, controls, "WMaxLim_Ena", 1.0).await?;
        Ok(json!({
            "exportLimit": limit,
            "wMaxLimPct": pct_now,
            "revertSecs": revert_now as u64,
        }))
    }
}

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
            tcp: "192.0.2.10".into(),
            units: vec![1, 2],
            base: None,
            poll_ms: 5_000,
            timeout_ms: 1_000,
            delay_after_connect_ms: 0,
            max_read: 125,
            single_register_writes: false,
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
        let cases: [Case; 6] = [
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
                |s| s.max_read = 126,
                "drivers.max_read",
                "driver #3 (roof): expected 1 to 125, found 126",
            ),
            (
                |s| s.tcp = "a b".into(),
                "drivers.tcp",
                "driver #3 (roof): \"a b\": expected HOST or HOST:PORT",
            ),
        ];
        for (change, key, message) in cases {
            let mut s = settings();
            change(&mut s);
            let e = s.validate(3).unwrap_err();
            assert_eq!((e.key, e.problem.as_str()), (key, message));
        }
    }
}
