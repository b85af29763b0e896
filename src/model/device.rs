//! The platform's device model: the `state` of each device type, with the platform's field
//! names (docs/PROTOCOL.md, "Device model", gives units and sign conventions).
//!
//! Units: energy Wh, power W, voltage V, current A, percentages 0–100. Temperatures carry their
//! unit explicitly, because the platform's own docs give them in °F only.
//! Signs: battery `chargeRate` positive = discharging; `gridPower` positive = importing.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    Battery,
    Charger,
    Inverter,
    Thermostat,
    Vehicle,
}

impl DeviceType {
    /// Every type, in the order of PROTOCOL 14.4.
    pub const ALL: [DeviceType; 5] = [
        DeviceType::Battery,
        DeviceType::Charger,
        DeviceType::Inverter,
        DeviceType::Thermostat,
        DeviceType::Vehicle,
    ];

    /// The type's name, as the configuration and the wire spell it (`"battery"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceType::Battery => "battery",
            DeviceType::Charger => "charger",
            DeviceType::Inverter => "inverter",
            DeviceType::Thermostat => "thermostat",
            DeviceType::Vehicle => "vehicle",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChargingState {
    Charging,
    Discharging,
    Idle,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GridStatus {
    Importing,
    Exporting,
    Idle,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThermostatMode {
    Off,
    Heat,
    Cool,
    Auto,
    Eco,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FanMode {
    Auto,
    On,
    Off,
    Circulate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TemperatureUnit {
    #[serde(rename = "C")]
    Celsius,
    #[serde(rename = "F")]
    Fahrenheit,
}

/// A temperature with its unit, e.g. `{"value": 21.5, "unit": "C"}`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Temperature {
    pub value: f64,
    pub unit: TemperatureUnit,
}

impl Temperature {
    pub fn celsius(value: f64) -> Temperature {
        Temperature {
            value,
            unit: TemperatureUnit::Celsius,
        }
    }
}

/// An optional member (PROTOCOL 14.4): left out when the device does not measure it, so a
/// member that is there must hold a value; `null` is refused like any wrong type.
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BatteryState {
    /// Stored energy, Wh; `None` when the device does not say (no rated capacity).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub charge: Option<f64>,
    pub charge_percentage: f64,
    pub charging_state: ChargingState,
    /// W; positive = discharging; `None` when the device does not measure it.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub charge_rate: Option<f64>,
    /// % kept for backup; `None` when the device has no such setting.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub backup_reserve: Option<f64>,
    pub grid_status: GridStatus,
    /// W; positive = importing; `None` when nothing measures the grid.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub grid_power: Option<f64>,
    /// Free text; `None` when the device does not say.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub strategy: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChargerState {
    pub charging_state: ChargingState,
    pub is_plugged_in: bool,
    pub charger_voltage: f64,
    pub charger_current: f64,
    pub charger_wattage: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InverterState {
    /// Generation, W.
    pub power: f64,
    pub grid_status: GridStatus,
    /// W; positive = importing; `None` when nothing measures the grid (a SunSpec inverter
    /// without a meter).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub grid_power: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ThermostatState {
    pub ambient_temperature: Temperature,
    pub heat_target: Temperature,
    pub cool_target: Temperature,
    pub operating_mode: ThermostatMode,
    pub fan_mode: FanMode,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VehicleState {
    pub charge_percentage: f64,
    /// % the vehicle stops charging at.
    pub charge_limit: f64,
    /// Remaining range, km.
    pub range: f64,
    pub charging_state: ChargingState,
    pub is_plugged_in: bool,
    pub charger_voltage: f64,
    pub charger_current: f64,
    pub charger_wattage: f64,
}

/// One device's state, tagged with its type: `{"type": "battery", "charge": ..., ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum DeviceState {
    Battery(BatteryState),
    Charger(ChargerState),
    Inverter(InverterState),
    Thermostat(ThermostatState),
    Vehicle(VehicleState),
}

impl DeviceState {
    pub fn device_type(&self) -> DeviceType {
        match self {
            DeviceState::Battery(_) => DeviceType::Battery,
            DeviceState::Charger(_) => DeviceType::Charger,
            DeviceState::Inverter(_) => DeviceType::Inverter,
            DeviceState::Thermostat(_) => DeviceType::Thermostat,
            DeviceState::Vehicle(_) => DeviceType::Vehicle,
        }
    }
}

/// Gateway health, reported alongside device states.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayHealth {
    pub uptime_secs: u64,
    /// 1-minute load average.
    pub load1: f64,
    pub mem_available_kib: u64,
    /// Free bytes on the state directory's filesystem.
    pub disk_free_bytes: u64,
    pub link_reconnects: u64,
    pub outbox_depth: u64,
    pub outbox_bytes: u64,
    /// Points dropped because the outbox was full, since installation.
    pub points_dropped: u64,
    /// One entry per external process driver, in configuration order; `[]` when there are
    /// none. Simulated drivers are not listed: they run inside the agent and cannot crash,
    /// print garbage or stall the way an integrator's program can.
    #[serde(default)]
    pub drivers: Vec<DriverHealth>,
    /// Present when the gateway reports by exception (`telemetry.report = "on-change"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting: Option<ReportingHealth>,
    /// This month's traffic on the broker connection, and the budget's step (PROTOCOL 14.10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_usage: Option<DataUsageHealth>,
}

/// The month's bytes, as health reports them (docs/PROTOCOL.md 14.10).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DataUsageHealth {
    /// `YYYY-MM`, UTC.
    pub month: String,
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// `telemetry.monthly_budget_bytes`; absent without a budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_bytes: Option<u64>,
    /// `normal`, `saving`, `strict` or `exhausted`.
    pub step: String,
}

/// How report by exception is going (docs/PROTOCOL.md 14.8): what the platform needs to tell a
/// device that is unchanged from one that has gone quiet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportingHealth {
    /// A device whose driver keeps reporting sends a point at least this often.
    pub heartbeat_secs: u64,
    /// Samples not sent since the agent started, because they repeated the device's last point
    /// within its deadbands.
    pub samples_unchanged: u64,
}

/// How one external process driver has behaved since the agent started (docs/PROTOCOL.md,
/// 14.5). Counters start from 0 whenever the agent does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverHealth {
    /// The driver's `name` from the configuration.
    pub name: String,
    /// A driver process is alive when the point is made. False between restarts, and for ever
    /// when the program cannot be started at all (which `restarts` alone would not show).
    pub running: bool,
    /// Times the driver process was started again after the first start: a figure that keeps
    /// rising means the driver is crash-looping.
    pub restarts: u64,
    /// stdout lines skipped as malformed (not JSON, unknown `type`, invalid state).
    pub malformed_lines: u64,
    /// stdout lines skipped for being longer than the driver's `max_line_bytes`.
    pub oversized_lines: u64,
    /// `state` lines read and accepted from the driver. A state the agent drops afterwards,
    /// for a device id that is invalid or owned by another driver, is still counted here.
    pub samples: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn battery_state_uses_the_platforms_field_names() {
        let s = DeviceState::Battery(BatteryState {
            charge: Some(5000.0),
            charge_percentage: 50.0,
            charging_state: ChargingState::Discharging,
            charge_rate: Some(1200.0),
            backup_reserve: Some(20.0),
            grid_status: GridStatus::Importing,
            grid_power: Some(300.0),
            strategy: Some("self-consumption".into()),
        });
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["type"], "battery");
        for field in [
            "charge",
            "chargePercentage",
            "chargingState",
            "chargeRate",
            "backupReserve",
            "gridStatus",
            "gridPower",
            "strategy",
        ] {
            assert!(v.get(field).is_some(), "{field} missing from {v}");
        }
        assert_eq!(serde_json::from_value::<DeviceState>(v).unwrap(), s);
    }

    #[test]
    fn temperatures_carry_their_unit() {
        let v = serde_json::to_value(Temperature::celsius(21.5)).unwrap();
        assert_eq!(v, serde_json::json!({"value": 21.5, "unit": "C"}));
    }

    #[test]
    fn a_device_types_name_is_its_wire_spelling() {
        for t in DeviceType::ALL {
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
    }
}
