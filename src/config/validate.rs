//! Validation: what the loaded settings must satisfy before `check-config` accepts them or
//! `run` starts, so that both reject exactly the same things.
//!
//! Each section checks itself next to its type (`BrokerSettings::validate`,
//! `TelemetrySettings::validate`, ...) and [`Settings::validate`] calls them one after the other,
//! so the first problem found is always the one reported. The driver and command sections are
//! checked here instead, because their types belong to the stages that use them.

use std::collections::HashSet;
use std::path::Path;

use super::{ConfigError, Rejection, Settings};
use crate::drivers::DriverSettings;
use crate::inbound::commands::catalog::Slug;
use crate::inbound::commands::CommandSettings;
use crate::inbound::safety::DeviceLimits;
use crate::model::gateway::GatewayId;

/// Where a [`Rejection`] becomes a [`ConfigError`]: here, once the file it came from is known.
impl Rejection {
    pub(crate) fn in_file(self, path: &Path) -> ConfigError {
        ConfigError::Rejected {
            key: self.key,
            path: path.to_owned(),
            problem: self.problem,
        }
    }
}

impl Settings {
    /// Every section in a fixed order; the order decides which problem is reported first.
    pub(crate) fn validate(&self) -> Result<(), Rejection> {
        self.broker.validate()?;
        self.device.validate()?;
        if let Some(trust) = &self.trust {
            trust.validate()?;
        }
        self.telemetry.validate()?;
        validate_drivers(&self.drivers)?;
        validate_limits(&self.limits, &self.drivers)?;
        self.safety.validate()?;
        validate_commands(&self.commands)?;
        self.pairing.validate()?;
        self.state.validate()
    }
}

/// `[[drivers]]`: each driver usable on its own, and no two answering to the same name.
fn validate_drivers(drivers: &[DriverSettings]) -> Result<(), Rejection> {
    let mut names = HashSet::new();
    let mut endpoints = HashSet::new();
    let mut charge_points = HashSet::new();
    let mut ocpp_devices = HashSet::new();
    for (i, d) in drivers.iter().enumerate() {
        let n = i + 1;
        match d {
            DriverSettings::Simulated {
                device_id,
                interval_ms,
                ..
            } => {
                if let Err(e) = GatewayId::parse(device_id) {
                    return Err(Rejection::new(
                        "drivers.device_id",
                        format!("driver #{n}: {e}"),
                    ));
                }
                if *interval_ms < 100 {
                    return Err(Rejection::new(
                        "drivers.interval_ms",
                        format!("driver #{n}: expected at least 100, found {interval_ms}"),
                    ));
                }
                if !names.insert(device_id.clone()) {
                    return Err(Rejection::new(
                        "drivers.device_id",
                        format!("driver #{n}: {device_id:?} is used twice"),
                    ));
                }
            }
            DriverSettings::Sunspec(settings) => {
                settings.validate(n)?;
                if !names.insert(settings.name.clone()) {
                    return Err(Rejection::new(
                        "drivers.name",
                        format!("driver #{n}: {:?} is used twice", settings.name),
                    ));
                }
                // One link per endpoint or serial port: a second entry would open a second
                // connection, which single-client inverters refuse, and its requests could
                // overlap the first's on the bus.
                let key = settings.link_key();
                if !endpoints.insert(key.clone()) {
                    let what = if settings.serial.is_some() {
                        ("drivers.serial", "serial port")
                    } else {
                        ("drivers.tcp", "endpoint")
                    };
                    return Err(Rejection::new(
                        what.0,
                        format!(
                            "driver #{n} ({}): {key} is the {} of another sunspec driver; \
                             list all its unit ids in one entry",
                            settings.name, what.1
                        ),
                    ));
                }
            }
            DriverSettings::Ocpp(settings) => {
                settings.validate(n)?;
                if !names.insert(settings.name.clone()) {
                    return Err(Rejection::new(
                        "drivers.name",
                        format!("driver #{n}: {:?} is used twice", settings.name),
                    ));
                }
                // Validated just above.
                let addr = settings
                    .listen_addr()
                    .map_err(|p| Rejection::new("drivers.listen", p))?;
                if !endpoints.insert(format!("listen {addr}")) {
                    return Err(Rejection::new(
                        "drivers.listen",
                        format!(
                            "driver #{n} ({}): {addr} is where another ocpp driver listens",
                            settings.name
                        ),
                    ));
                }
                // Each charge point is a device per connector: two drivers may not both have
                // it, and no two connectors may make the same device id (connector 2 of "A"
                // and connector 1 of "A-2" are both ocpp-A-2).
                for cp in &settings.charge_points {
                    if !charge_points.insert(cp.id.clone()) {
                        return Err(Rejection::new(
                            "drivers.charge_points.id",
                            format!(
                                "driver #{n} ({}): {:?} is a charge point of another ocpp driver",
                                settings.name, cp.id
                            ),
                        ));
                    }
                    for (connector, device) in cp.device_ids() {
                        if !ocpp_devices.insert(device.clone()) {
                            return Err(Rejection::new(
                                "drivers.charge_points.connectors",
                                format!(
                                    "driver #{n} ({}): {device}, the device of {:?}'s connector \
                                     {connector}, is another charge point's device",
                                    settings.name, cp.id
                                ),
                            ));
                        }
                    }
                }
            }
            DriverSettings::Process {
                name,
                command,
                max_line_bytes,
                ..
            } => {
                if command.is_empty() {
                    return Err(Rejection::new(
                        "drivers.command",
                        format!("driver #{n} ({name}): expected a program and its arguments"),
                    ));
                }
                if !(1024..=1 << 20).contains(max_line_bytes) {
                    return Err(Rejection::new(
                        "drivers.max_line_bytes",
                        format!("driver #{n} ({name}): expected 1024..=1048576"),
                    ));
                }
                if !names.insert(name.clone()) {
                    return Err(Rejection::new(
                        "drivers.name",
                        format!("driver #{n}: {name:?} is used twice"),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// `[[limits]]`: each entry on its own ([`DeviceLimits::validate`]), one entry per device, and
/// every entry for a device this gateway can have: a simulated device of the same type, or any
/// device when a process driver (whose devices are only known once it reports them) is
/// configured.
fn validate_limits(limits: &[DeviceLimits], drivers: &[DriverSettings]) -> Result<(), Rejection> {
    let simulated = |id: &str| {
        drivers.iter().find_map(|d| match d {
            DriverSettings::Simulated {
                device_id,
                device_type,
                ..
            } if device_id == id => Some(*device_type),
            _ => None,
        })
    };
    // Process and SunSpec drivers name their devices at run time (from their state lines,
    // from the serial numbers discovery finds), so their ids cannot be checked here.
    let any_process = drivers.iter().any(|d| {
        matches!(
            d,
            DriverSettings::Process { .. } | DriverSettings::Sunspec(_) | DriverSettings::Ocpp(_)
        )
    });
    let charge_point = |id: &str| {
        drivers.iter().find_map(|d| match d {
            DriverSettings::Ocpp(o) => o.connector_of(id).map(|(i, _)| &o.charge_points[i]),
            _ => None,
        })
    };
    let mut seen = HashSet::new();
    for (i, l) in limits.iter().enumerate() {
        let n = i + 1;
        l.validate(n)?;
        crate::inbound::safety::controls::validate_controls(l, n)?;
        let id = &l.device_id;
        if !seen.insert(id.as_str()) {
            return Err(Rejection::new(
                "limits.device_id",
                format!("limits #{n}: {id:?} has limits already; give each device one entry"),
            ));
        }
        if let Some(cp) = charge_point(id) {
            check_charge_point_limits(l, n, cp)?;
        }
        match simulated(id) {
            Some(t) if t != l.device_type => {
                return Err(Rejection::new(
                    "limits.device_type",
                    format!(
                        "limits #{n} ({id}): expected {}, the type [[drivers]] simulates under \
                         that id, found {}",
                        t.as_str(),
                        l.device_type.as_str()
                    ),
                ))
            }
            Some(_) => {}
            None if any_process => {}
            None => {
                return Err(Rejection::new(
                    "limits.device_id",
                    format!(
                        "limits #{n}: no device {id:?} behind this gateway: no simulated driver \
                         has that id and no process, sunspec or ocpp driver is configured"
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// The `[[limits]]` of an OCPP charge point's device: one unit, as a 1.6 charging schedule
/// has, and a current no higher than the charge point's own `max_current_a`, which its
/// ChargePointMaxProfile enforces anyway (a limit above it would only read as a promise).
fn check_charge_point_limits(
    l: &DeviceLimits,
    n: usize,
    cp: &crate::drivers::ocpp::settings::ChargePointSettings,
) -> Result<(), Rejection> {
    let id = &l.device_id;
    if l.max_current_a.is_some() && l.max_power_w.is_some() {
        return Err(Rejection::new(
            "limits.max_power_w",
            format!(
                "limits #{n} ({id}): an OCPP charger takes a limit in amperes or in watts, not \
                 both; give max_current_a or max_power_w"
            ),
        ));
    }
    if let (Some(limit), Some(max)) = (l.max_current_a, cp.max_current_a) {
        if limit > f64::from(max) {
            return Err(Rejection::new(
                "limits.max_current_a",
                format!(
                    "limits #{n} ({id}): max_current_a ({limit}) is above the charge point's \
                     own max_current_a ({max})"
                ),
            ));
        }
    }
    Ok(())
}

/// `[commands]`: the default timeout and each per-slug override, for slugs that exist.
fn validate_commands(commands: &CommandSettings) -> Result<(), Rejection> {
    if !(1..=3_600).contains(&commands.timeout_secs) {
        return Err(Rejection::new(
            "commands.timeout_secs",
            format!("expected 1..=3600 seconds, found {}", commands.timeout_secs),
        ));
    }
    for (slug, secs) in &commands.timeouts {
        if Slug::parse(slug).is_none() {
            return Err(Rejection::new(
                "commands.timeouts",
                format!("unknown command slug `{slug}`"),
            ));
        }
        if !(1..=3_600).contains(secs) {
            return Err(Rejection::new(
                "commands.timeouts",
                format!("{slug}: expected 1..=3600 seconds, found {secs}"),
            ));
        }
    }
    Ok(())
}
