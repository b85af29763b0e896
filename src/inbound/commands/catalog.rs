//! The platform's public command set, typed: every slug the agent knows, what each one takes,
//! and the validator that turns a signed command's raw `input` into the normalised input the
//! drivers consume (`drivers::simulated::SimDevice::apply` trusts it and does not check again).
//!
//! Each slug's input is described once, as a table of [`Field`]s. Both [`validate`] and
//! [`Slug::input_schema`] read that table, so the JSON Schema shown to the platform in
//! `availableCommands` and the checks the agent runs cannot drift apart. Rules that involve two
//! fields are written out per slug, in both places where JSON Schema can express them
//! (`if`/`then`: which thermostat targets a mode needs, and their range in the given unit;
//! `anyOf`: `charger:set-charge-rate-limit` needs `currentLimit`, `powerLimit` or both).
//! JSON Schema cannot compare two fields, so two orderings live only in [`validate`] and in
//! the slug's `description`: `minimumBatteryReserve <= maximumBatteryReserve` and
//! `heatTarget < coolTarget`. A platform validating with stock tools passes such inputs, and the
//! agent refuses them with a `VALIDATION_ERROR`.
//!
//! Choices the platform's documentation leaves open:
//! - `executionPriority` (battery:set-operating-mode) is an **integer from 0 to 100**. The docs
//!   give no type. A number orders and bounds priorities; a free-form string would have to be
//!   guessed at by every driver, so strings (even `"5"`) are refused rather than interpreted.
//!   As in JSON Schema's `integer`, `5.0` counts as 5; it is normalised to `5`.
//! - Thermostat temperatures are in **°C** (the agent's thermostat model works in °C), range 5 to
//!   35. Because the platform's own docs give temperatures in °F only, an optional
//!   `"unit": "F"` is accepted; the range is then 41 to 95 °F (the same range) and the targets
//!   are converted to °C in the normalised input, unrounded. The two ranges do not overlap,
//!   so a target sent in °F without `"unit": "F"` (say 68) is refused, never misread as 68 °C.
//!   The normalised input carries `"unit": "C"` whenever it carries a target.
//! - `chargeLimit` (vehicle:set-charge-limit) accepts a number, or a string of a plain decimal
//!   number as the platform's examples send it (`"80"`, `"80.5"`; no sign, exponent, spaces or
//!   leading zeros). It is normalised to a JSON number, an integer when it has no fraction.
//!
//! Every device slug (not the `agent:*` ones) also takes `holdSecs`, validated like any member
//! but handed back in [`Validated::hold_secs`] rather than in the input: the drivers never see
//! it.

use std::fmt;

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::model::device::DeviceType;

/// A command slug, `type:action` as the platform writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slug {
    BatterySetReserve,
    BatterySetOperatingMode,
    ThermostatSetOperatingMode,
    ThermostatSetFanMode,
    ChargerSetOperatingMode,
    ChargerSetChargeRateLimit,
    InverterSetExportLimit,
    VehicleSetOperatingMode,
    VehicleSetChargeLimit,
    AgentPing,
    AgentGetState,
    AgentUnpair,
}

/// A refused input. `field` is the offending input member, `None` only for an unknown slug;
/// `message` always names the field when there is one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub field: Option<String>,
    pub message: String,
}

/// A command whose input passed [`validate`]: known members only, each of the right type and in
/// range, defaults filled in, numeric strings turned into numbers, temperatures in °C.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub slug: Slug,
    /// The input for the driver: every member but `holdSecs`.
    pub input: Map<String, Value>,
    /// `holdSecs`, when sent: how long the setpoint holds (README, "Safety envelope"). Taken out
    /// of [`Validated::input`] because it tells the agent what to do later, not the device what
    /// to do now.
    pub hold_secs: Option<u64>,
}

/// One entry of a device's `availableCommands`, as the platform lists it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AvailableCommand {
    pub slug: &'static str,
    pub description: &'static str,
    pub input_schema: Value,
}

impl Slug {
    pub const ALL: [Slug; 12] = [
        Slug::BatterySetReserve,
        Slug::BatterySetOperatingMode,
        Slug::ThermostatSetOperatingMode,
        Slug::ThermostatSetFanMode,
        Slug::ChargerSetOperatingMode,
        Slug::ChargerSetChargeRateLimit,
        Slug::InverterSetExportLimit,
        Slug::VehicleSetOperatingMode,
        Slug::VehicleSetChargeLimit,
        Slug::AgentPing,
        Slug::AgentGetState,
        Slug::AgentUnpair,
    ];

    /// The slug written exactly as [`Slug::as_str`] gives it; anything else is `None`.
    pub fn parse(s: &str) -> Option<Slug> {
        Slug::ALL.into_iter().find(|slug| slug.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Slug::BatterySetReserve => "battery:set-reserve",
            Slug::BatterySetOperatingMode => "battery:set-operating-mode",
            Slug::ThermostatSetOperatingMode => "thermostat:set-operating-mode",
            Slug::ThermostatSetFanMode => "thermostat:set-fan-mode",
            Slug::ChargerSetOperatingMode => "charger:set-operating-mode",
            Slug::ChargerSetChargeRateLimit => "charger:set-charge-rate-limit",
            Slug::InverterSetExportLimit => "inverter:set-export-limit",
            Slug::VehicleSetOperatingMode => "vehicle:set-operating-mode",
            Slug::VehicleSetChargeLimit => "vehicle:set-charge-limit",
            Slug::AgentPing => "agent:ping",
            Slug::AgentGetState => "agent:get-state",
            Slug::AgentUnpair => "agent:unpair",
        }
    }

    /// The device type the command is for; `None` for the agent's own `agent:*` built-ins,
    /// which address the gateway itself.
    pub fn device_type(self) -> Option<DeviceType> {
        match self {
            Slug::BatterySetReserve | Slug::BatterySetOperatingMode => Some(DeviceType::Battery),
            Slug::ThermostatSetOperatingMode | Slug::ThermostatSetFanMode => {
                Some(DeviceType::Thermostat)
            }
            Slug::ChargerSetOperatingMode | Slug::ChargerSetChargeRateLimit => {
                Some(DeviceType::Charger)
            }
            Slug::InverterSetExportLimit => Some(DeviceType::Inverter),
            Slug::VehicleSetOperatingMode | Slug::VehicleSetChargeLimit => {
                Some(DeviceType::Vehicle)
            }
            Slug::AgentPing | Slug::AgentGetState | Slug::AgentUnpair => None,
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Slug::BatterySetReserve => {
                "Set the share of the battery's capacity kept in reserve for backup, in percent."
            }
            Slug::BatterySetOperatingMode => {
                "Set the battery's operating mode: charge, discharge, idle or reset. \
                 minimumBatteryReserve must not exceed maximumBatteryReserve."
            }
            Slug::ThermostatSetOperatingMode => {
                "Set the thermostat's operating mode and targets. heat needs heatTarget, cool \
                 needs coolTarget, auto needs both; off and eco need neither. Temperatures are \
                 in °C (5 to 35), or in °F (41 to 95) with unit \"F\"; heatTarget must be below \
                 coolTarget."
            }
            Slug::ThermostatSetFanMode => "Set the thermostat's fan mode.",
            Slug::ChargerSetOperatingMode => "Start or stop charging at the charger.",
            Slug::ChargerSetChargeRateLimit => {
                "Limit how fast the charger charges: currentLimit in A (0 to 80), powerLimit in W \
                 (0 to 50000). At least one of currentLimit and powerLimit is required; given \
                 both, the charger draws at most the lower of the two."
            }
            Slug::InverterSetExportLimit => {
                "Set the most power, in W (0 to 100000), that the site may export to the grid."
            }
            Slug::VehicleSetOperatingMode => "Start or stop charging the vehicle.",
            Slug::VehicleSetChargeLimit => {
                "Set the state of charge, in percent, at which the vehicle stops charging."
            }
            Slug::AgentPing => "Check that the agent receives and runs commands. No input.",
            Slug::AgentGetState => "Ask the agent for its current state. No input.",
            Slug::AgentUnpair => {
                "Remove the gateway's owner; scoped keys are refused until it is paired again. \
                 Server keys only. No input."
            }
        }
    }

    /// The members the slug's input may have: its own, then [`HOLD_SECS`] on a device slug.
    fn fields(self) -> impl Iterator<Item = &'static Field> {
        let hold: &'static [Field] = match self.device_type() {
            Some(_) => std::slice::from_ref(&HOLD_SECS),
            None => &[],
        };
        self.own_fields().iter().chain(hold)
    }

    /// The members particular to the slug.
    fn own_fields(self) -> &'static [Field] {
        match self {
            Slug::BatterySetReserve => BATTERY_SET_RESERVE,
            Slug::BatterySetOperatingMode => BATTERY_SET_OPERATING_MODE,
            Slug::ThermostatSetOperatingMode => THERMOSTAT_SET_OPERATING_MODE,
            Slug::ThermostatSetFanMode => THERMOSTAT_SET_FAN_MODE,
            Slug::ChargerSetOperatingMode | Slug::VehicleSetOperatingMode => START_OR_STOP_CHARGING,
            Slug::ChargerSetChargeRateLimit => CHARGER_SET_CHARGE_RATE_LIMIT,
            Slug::InverterSetExportLimit => INVERTER_SET_EXPORT_LIMIT,
            Slug::VehicleSetChargeLimit => VEHICLE_SET_CHARGE_LIMIT,
            Slug::AgentPing | Slug::AgentGetState | Slug::AgentUnpair => &[],
        }
    }

    /// The JSON Schema (draft 2020-12) of the slug's input: a closed object whose members,
    /// types, enums, ranges and required members are those [`validate`] enforces.
    pub fn input_schema(self) -> Value {
        let properties: Map<String, Value> = self
            .fields()
            .map(|field| (field.name.to_owned(), field.schema()))
            .collect();
        let mut schema = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": self.as_str(),
            "description": self.description(),
            "type": "object",
            "properties": properties,
            "additionalProperties": false,
        });
        let required: Vec<&str> = self
            .fields()
            .filter(|field| field.required)
            .map(|field| field.name)
            .collect();
        // Left out when empty: older drafts (and some tools) insist on a non-empty array.
        if !required.is_empty() {
            schema["required"] = json!(required);
        }
        match self {
            Slug::ThermostatSetOperatingMode => schema["allOf"] = thermostat_rules_schema(),
            Slug::ChargerSetChargeRateLimit => {
                schema["anyOf"] = json!(RATE_LIMITS.map(|name| json!({ "required": [name] })));
            }
            _ => {}
        }
        schema
    }
}

impl fmt::Display for Slug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks `input` against the rules of `slug` and returns it normalised (see [`Validated`]).
/// The first problem found is reported: unknown members, then each member in the order the
/// slug lists them, then the rules between members.
pub fn validate(slug: &str, input: &Map<String, Value>) -> Result<Validated, ValidationError> {
    let Some(slug) = Slug::parse(slug) else {
        return Err(ValidationError {
            field: None,
            message: format!("unknown command slug `{slug}`"),
        });
    };
    // Unknown members first: a misspelt optional member must not be silently dropped.
    if let Some(name) = input
        .keys()
        .find(|name| !slug.fields().any(|field| field.name == name.as_str()))
    {
        return Err(refusal(name, format!("unknown field `{name}` for {slug}")));
    }
    let mut normalised = Map::new();
    for field in slug.fields() {
        match (input.get(field.name), field.kind) {
            (Some(value), kind) => {
                normalised.insert(field.name.to_owned(), kind.check(field.name, value)?);
            }
            (None, _) if field.required => {
                return Err(refusal(
                    field.name,
                    format!("{}: missing; {slug} requires it", field.name),
                ));
            }
            (None, Kind::Flag { default }) => {
                normalised.insert(field.name.to_owned(), Value::Bool(default));
            }
            (None, _) => {}
        }
    }
    match slug {
        Slug::BatterySetOperatingMode => check_reserve_order(&normalised)?,
        Slug::ThermostatSetOperatingMode => check_thermostat_targets(&mut normalised)?,
        Slug::ChargerSetChargeRateLimit => check_some_rate_limit(&normalised)?,
        _ => {}
    }
    // Checked like any member, but it is the runner's business, not the driver's.
    let hold_secs = normalised
        .remove(HOLD_SECS.name)
        .and_then(|secs| secs.as_u64());
    Ok(Validated {
        slug,
        input: normalised,
        hold_secs,
    })
}

/// The commands a device of `device_type` takes, for its `availableCommands`. The agent's own
/// `agent:*` built-ins belong to the gateway, not to any device, and are never listed.
pub fn available_commands(device_type: DeviceType) -> Vec<AvailableCommand> {
    Slug::ALL
        .into_iter()
        .filter(|slug| slug.device_type() == Some(device_type))
        .map(|slug| AvailableCommand {
            slug: slug.as_str(),
            description: slug.description(),
            input_schema: slug.input_schema(),
        })
        .collect()
}

/// One member of a slug's input.
#[derive(Debug)]
struct Field {
    name: &'static str,
    kind: Kind,
    required: bool,
    description: &'static str,
}

/// What one input member accepts.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// A JSON number, integer or not, from 0 to 100.
    Percent,
    /// A [`Kind::Percent`], or the same written as a string matching [`PERCENT_STRING_PATTERN`];
    /// normalised to a number.
    PercentOrNumericString,
    /// A JSON number with no fraction, from `min` to `max`; normalised to an integer.
    Integer { min: i64, max: i64 },
    /// A JSON number, integer or not, from `min` to `max`: a quantity in a unit other than %.
    Number { min: i64, max: i64 },
    /// Exactly one of these strings.
    OneOf(&'static [&'static str]),
    /// `true` or `false`; `default` is filled in when the member is absent.
    Flag { default: bool },
    /// A JSON number. Its range depends on the sibling `unit`, so [`check_thermostat_targets`]
    /// checks it, and the schema states it in the slug's `allOf`.
    Temperature,
}

const fn required(name: &'static str, kind: Kind, description: &'static str) -> Field {
    Field {
        name,
        kind,
        required: true,
        description,
    }
}

const fn optional(name: &'static str, kind: Kind, description: &'static str) -> Field {
    Field {
        name,
        kind,
        required: false,
        description,
    }
}

const BATTERY_SET_RESERVE: &[Field] = &[required(
    "chargePercentage",
    Kind::Percent,
    "Share of capacity kept in reserve, percent (0 to 100).",
)];

const BATTERY_SET_OPERATING_MODE: &[Field] = &[
    required(
        "operatingMode",
        Kind::OneOf(&["charge", "discharge", "idle", "reset"]),
        "The battery's operating mode.",
    ),
    optional(
        "minimumBatteryReserve",
        Kind::Percent,
        "Lowest state of charge to keep, percent (0 to 100); at most maximumBatteryReserve.",
    ),
    optional(
        "maximumBatteryReserve",
        Kind::Percent,
        "Highest state of charge to reach, percent (0 to 100); at least minimumBatteryReserve.",
    ),
    optional(
        "enableGridInteraction",
        Kind::Flag { default: false },
        "Whether the battery may exchange energy with the grid; false when absent.",
    ),
    optional(
        "executionPriority",
        Kind::Integer { min: 0, max: 100 },
        "Priority of this mode, an integer from 0 to 100.",
    ),
];

const THERMOSTAT_SET_OPERATING_MODE: &[Field] = &[
    required(
        "operatingMode",
        Kind::OneOf(&["off", "heat", "cool", "auto", "eco"]),
        "The thermostat's operating mode.",
    ),
    optional(
        "heatTarget",
        Kind::Temperature,
        "Heat up to this temperature, in `unit`. Required for heat and auto.",
    ),
    optional(
        "coolTarget",
        Kind::Temperature,
        "Cool down to this temperature, in `unit`. Required for cool and auto.",
    ),
    optional(
        "unit",
        Kind::OneOf(&["C", "F"]),
        "Unit of heatTarget and coolTarget; C when absent. F is converted to C.",
    ),
];

const THERMOSTAT_SET_FAN_MODE: &[Field] = &[required(
    "fanMode",
    Kind::OneOf(&["auto", "on", "off", "circulate"]),
    "The thermostat's fan mode.",
)];

const START_OR_STOP_CHARGING: &[Field] = &[required(
    "operatingMode",
    Kind::OneOf(&["start-charging", "stop-charging"]),
    "Start or stop charging.",
)];

const VEHICLE_SET_CHARGE_LIMIT: &[Field] = &[required(
    "chargeLimit",
    Kind::PercentOrNumericString,
    "State of charge to stop charging at, percent (0 to 100): a number or a string such as \"80\".",
)];

const CHARGER_SET_CHARGE_RATE_LIMIT: &[Field] = &[
    optional(
        "currentLimit",
        Kind::Number { min: 0, max: 80 },
        "Most current to draw, A (0 to 80). currentLimit, powerLimit or both.",
    ),
    optional(
        "powerLimit",
        Kind::Number {
            min: 0,
            max: 50_000,
        },
        "Most power to draw, W (0 to 50000). currentLimit, powerLimit or both.",
    ),
];

/// The members of `charger:set-charge-rate-limit` of which at least one must be sent.
const RATE_LIMITS: [&str; 2] = ["currentLimit", "powerLimit"];

const INVERTER_SET_EXPORT_LIMIT: &[Field] = &[required(
    "exportLimit",
    Kind::Number {
        min: 0,
        max: 100_000,
    },
    "Most power the site may export to the grid, W (0 to 100000).",
)];

/// `holdSecs`, a member of every device slug (none of the agent's own).
const HOLD_SECS: Field = optional(
    "holdSecs",
    Kind::Integer {
        min: 1,
        max: 86_400,
    },
    "Seconds this setpoint holds; when they lapse the device returns to its default control \
     (README, Safety envelope). Absent: until the next command.",
);

/// The strings [`Kind::PercentOrNumericString`] accepts: "0" to "100" in plain decimal, with an
/// optional fraction ("80.5", "100.0", but not "100.5", "080", "-0", "8e1" or " 80").
/// [`parse_percent_string`] accepts exactly this set.
pub const PERCENT_STRING_PATTERN: &str = r"^(100(\.0+)?|[1-9]?[0-9](\.[0-9]+)?)$";

/// The thermostat's target range, °C; and the same range in °F (the conversion is exact at
/// both ends, so a value is in one range exactly when its conversion is in the other).
const TARGET_RANGE_C: (i64, i64) = (5, 35);
const TARGET_RANGE_F: (i64, i64) = (41, 95);
const TARGETS: [&str; 2] = ["heatTarget", "coolTarget"];

impl Field {
    fn schema(&self) -> Value {
        let mut schema = self.kind.schema();
        schema["description"] = json!(self.description);
        schema
    }
}

impl Kind {
    /// The normalised `value`, or the refusal naming `name`.
    fn check(self, name: &str, value: &Value) -> Result<Value, ValidationError> {
        let percent = |x: &f64| (0.0..=100.0).contains(x);
        let normalised = match self {
            Kind::Percent => value.as_f64().filter(percent).map(|_| value.clone()),
            Kind::PercentOrNumericString => match value {
                Value::String(s) => parse_percent_string(s),
                _ => value.as_f64().filter(percent).map(|_| value.clone()),
            },
            Kind::Integer { min, max } => value
                .as_f64()
                .filter(|x| x.fract() == 0.0 && (min as f64..=max as f64).contains(x))
                .map(|x| Value::from(x as i64)),
            Kind::Number { min, max } => value
                .as_f64()
                .filter(|x| (min as f64..=max as f64).contains(x))
                .map(|_| value.clone()),
            Kind::OneOf(allowed) => value
                .as_str()
                .filter(|s| allowed.contains(s))
                .map(|_| value.clone()),
            Kind::Flag { .. } => value.is_boolean().then(|| value.clone()),
            Kind::Temperature => value.is_number().then(|| value.clone()),
        };
        normalised.ok_or_else(|| {
            refusal(
                name,
                format!(
                    "{name}: expected {}, found {}",
                    self.expected(),
                    shown(value)
                ),
            )
        })
    }

    /// What the kind accepts, in words, for refusals.
    fn expected(self) -> String {
        match self {
            Kind::Percent => "a number from 0 to 100".into(),
            Kind::PercentOrNumericString => {
                "a number from 0 to 100, as a number or a string such as \"80\"".into()
            }
            Kind::Integer { min, max } => format!("an integer from {min} to {max}"),
            Kind::Number { min, max } => format!("a number from {min} to {max}"),
            Kind::OneOf(allowed) => {
                let quoted: Vec<String> = allowed.iter().map(|s| format!("\"{s}\"")).collect();
                format!("one of {}", quoted.join(", "))
            }
            Kind::Flag { .. } => "true or false".into(),
            Kind::Temperature => "a number".into(),
        }
    }

    fn schema(self) -> Value {
        let percent = json!({"type": "number", "minimum": 0, "maximum": 100});
        match self {
            Kind::Percent => percent,
            Kind::PercentOrNumericString => json!({
                "anyOf": [percent, {"type": "string", "pattern": PERCENT_STRING_PATTERN}],
            }),
            Kind::Integer { min, max } => {
                json!({"type": "integer", "minimum": min, "maximum": max})
            }
            Kind::Number { min, max } => {
                json!({"type": "number", "minimum": min, "maximum": max})
            }
            Kind::OneOf(allowed) => json!({"type": "string", "enum": allowed}),
            Kind::Flag { default } => json!({"type": "boolean", "default": default}),
            Kind::Temperature => json!({"type": "number"}),
        }
    }
}

/// Reads a percentage written as a string: exactly the strings [`PERCENT_STRING_PATTERN`]
/// matches. The checks follow the pattern's shape rather than parsing first, so that no float
/// rounding ("100.0000000000000000001" parses as 100) lets in a string the schema refuses.
fn parse_percent_string(s: &str) -> Option<Value> {
    let (whole, fraction) = match s.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || fraction.is_some_and(|f| !digits(f)) {
        return None;
    }
    let whole_number = fraction.is_none_or(|f| f.bytes().all(|b| b == b'0'));
    let in_range = match whole.len() {
        1 => true,
        2 => !whole.starts_with('0'),
        3 => whole == "100" && whole_number,
        _ => false,
    };
    if !in_range {
        return None;
    }
    if whole_number {
        whole.parse::<u64>().ok().map(Value::from)
    } else {
        s.parse::<f64>().ok().map(Value::from)
    }
}

/// battery:set-operating-mode: the reserve bounds, when both are given, must not cross.
fn check_reserve_order(input: &Map<String, Value>) -> Result<(), ValidationError> {
    let get = |name: &str| input.get(name).and_then(Value::as_f64);
    if let (Some(min), Some(max)) = (get("minimumBatteryReserve"), get("maximumBatteryReserve")) {
        if min > max {
            return Err(refusal(
                "minimumBatteryReserve",
                format!(
                    "minimumBatteryReserve: must not exceed maximumBatteryReserve, found {} and {}",
                    shown(&input["minimumBatteryReserve"]),
                    shown(&input["maximumBatteryReserve"])
                ),
            ));
        }
    }
    Ok(())
}

/// charger:set-charge-rate-limit: a limit on at least one quantity; a command bounding
/// nothing would be a no-op that reads like a setpoint.
fn check_some_rate_limit(input: &Map<String, Value>) -> Result<(), ValidationError> {
    if RATE_LIMITS.iter().any(|name| input.contains_key(*name)) {
        return Ok(());
    }
    Err(refusal(
        RATE_LIMITS[0],
        format!(
            "{}: missing; {} requires {}, {} or both",
            RATE_LIMITS[0],
            Slug::ChargerSetChargeRateLimit,
            RATE_LIMITS[0],
            RATE_LIMITS[1]
        ),
    ))
}

/// thermostat:set-operating-mode: the targets the mode needs, their range in the unit given,
/// heat below cool, then the conversion to °C.
fn check_thermostat_targets(input: &mut Map<String, Value>) -> Result<(), ValidationError> {
    let mode = input
        .get("operatingMode")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let needed: &[&str] = match mode.as_str() {
        "heat" => &["heatTarget"],
        "cool" => &["coolTarget"],
        "auto" => &TARGETS,
        _ => &[],
    };
    if let Some(name) = needed.iter().find(|name| !input.contains_key(**name)) {
        return Err(refusal(
            name,
            format!("{name}: missing; operatingMode \"{mode}\" requires it"),
        ));
    }
    // `unit` is replaced below by the unit of the normalised targets.
    let fahrenheit = input.remove("unit").is_some_and(|unit| unit == "F");
    let ((min, max), symbol) = if fahrenheit {
        (TARGET_RANGE_F, "°F")
    } else {
        (TARGET_RANGE_C, "°C")
    };
    for name in TARGETS {
        let Some(value) = input.get(name) else {
            continue;
        };
        if !value
            .as_f64()
            .is_some_and(|x| (min as f64..=max as f64).contains(&x))
        {
            return Err(refusal(
                name,
                format!(
                    "{name}: expected a temperature from {min} to {max} {symbol}, found {}",
                    shown(value)
                ),
            ));
        }
    }
    let get = |name: &str| input.get(name).and_then(Value::as_f64);
    if let (Some(heat), Some(cool)) = (get("heatTarget"), get("coolTarget")) {
        if heat >= cool {
            return Err(refusal(
                "heatTarget",
                format!(
                    "heatTarget: must be below coolTarget, found {} and {}",
                    shown(&input["heatTarget"]),
                    shown(&input["coolTarget"])
                ),
            ));
        }
    }
    let mut any_target = false;
    for name in TARGETS {
        if let Some(value) = input.get_mut(name) {
            any_target = true;
            if fahrenheit {
                let f = value.as_f64().unwrap_or_default();
                *value = Value::from(celsius(f));
            }
        }
    }
    if any_target {
        input.insert("unit".into(), json!("C"));
    }
    Ok(())
}

/// °F in °C, rounded to a millionth of a degree: far below any thermostat's resolution, and
/// enough to drop binary noise, so that 78.8 °F is 26 °C exactly and meets an installer's
/// `max_target_c = 26` instead of exceeding it as 26.000000000000004 (PROTOCOL 4.3).
fn celsius(fahrenheit: f64) -> f64 {
    ((fahrenheit - 32.0) * 5.0 / 9.0 * 1e6).round() / 1e6
}

/// The thermostat rules a field table cannot say: which targets each mode requires, and the
/// targets' range in the unit given. (heatTarget < coolTarget is beyond JSON Schema.)
fn thermostat_rules_schema() -> Value {
    let mode_requires = |mode: &str, names: &[&str]| {
        json!({
            "if": {"properties": {"operatingMode": {"const": mode}}, "required": ["operatingMode"]},
            "then": {"required": names},
        })
    };
    let targets_in = |(min, max): (i64, i64)| {
        let range = json!({"minimum": min, "maximum": max});
        json!({"properties": {"heatTarget": range, "coolTarget": range}})
    };
    json!([
        mode_requires("heat", &["heatTarget"]),
        mode_requires("cool", &["coolTarget"]),
        mode_requires("auto", &TARGETS),
        {
            "if": {"properties": {"unit": {"const": "F"}}, "required": ["unit"]},
            "then": targets_in(TARGET_RANGE_F),
            "else": targets_in(TARGET_RANGE_C),
        },
    ])
}

fn refusal(field: &str, message: String) -> ValidationError {
    ValidationError {
        field: Some(field.to_owned()),
        message,
    }
}

/// `value` as JSON for a refusal, cut to a bounded length.
fn shown(value: &Value) -> String {
    const MAX_CHARS: usize = 40;
    let text = value.to_string();
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("an object")
    }

    #[test]
    fn every_slug_parses_back_from_its_string() {
        for slug in Slug::ALL {
            assert_eq!(Slug::parse(slug.as_str()), Some(slug));
            assert_eq!(slug.to_string(), slug.as_str());
        }
        let mut names: Vec<&str> = Slug::ALL.iter().map(|s| s.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Slug::ALL.len());
        for near_miss in [
            "",
            "battery",
            "Battery:set-reserve",
            "battery:set-reserve ",
            "agent:",
        ] {
            assert_eq!(Slug::parse(near_miss), None, "{near_miss:?}");
        }
    }

    #[test]
    fn refusal_names_field_and_value() {
        let err = validate(
            "battery:set-reserve",
            &input(json!({"chargePercentage": 150})),
        )
        .unwrap_err();
        assert_eq!(err.field.as_deref(), Some("chargePercentage"));
        assert_eq!(
            err.message,
            "chargePercentage: expected a number from 0 to 100, found 150"
        );
        assert_eq!(err.to_string(), err.message);
    }

    #[test]
    fn unknown_field_and_slug_messages() {
        let err = validate("battery:set-reserve", &input(json!({"foo": 1}))).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("foo"));
        assert_eq!(err.message, "unknown field `foo` for battery:set-reserve");
        let err = validate("x", &Map::new()).unwrap_err();
        assert_eq!(err.field, None);
        assert_eq!(err.message, "unknown command slug `x`");
    }

    #[test]
    fn long_values_are_cut_in_refusals() {
        let long = "é".repeat(10_000);
        let err =
            validate("thermostat:set-fan-mode", &input(json!({"fanMode": long}))).unwrap_err();
        assert!(err.message.len() < 200, "{}", err.message);
        assert!(err.message.ends_with('…'));
    }

    #[test]
    fn percent_strings_follow_the_pattern_by_hand() {
        // Derived by reading PERCENT_STRING_PATTERN; the integration tests also sweep every
        // short string through a regex matcher.
        for (s, expected) in [
            ("0", Some(json!(0))),
            ("7", Some(json!(7))),
            ("80", Some(json!(80))),
            ("80.5", Some(json!(80.5))),
            ("99.999", Some(json!(99.999))),
            ("100", Some(json!(100))),
            ("100.000", Some(json!(100))),
            ("0.0", Some(json!(0))),
        ] {
            assert_eq!(parse_percent_string(s), expected, "{s:?}");
        }
        for s in [
            "",
            "080",
            "00",
            "100.5",
            "101",
            "1000",
            "-0",
            "-5",
            "+5",
            "8e1",
            " 80",
            "80 ",
            "80.",
            ".5",
            "NaN",
            "inf",
            "Infinity",
            "0x50",
            "100.0000000000000000001",
            "1_0",
            "８０",
        ] {
            assert_eq!(parse_percent_string(s), None, "{s:?}");
        }
    }

    #[test]
    fn fahrenheit_bounds_convert_exactly_to_celsius_bounds() {
        let to_c = |f: i64| (f as f64 - 32.0) * 5.0 / 9.0;
        assert_eq!(to_c(TARGET_RANGE_F.0), TARGET_RANGE_C.0 as f64);
        assert_eq!(to_c(TARGET_RANGE_F.1), TARGET_RANGE_C.1 as f64);
    }

    #[test]
    fn fahrenheit_targets_are_normalised_to_celsius() {
        let v = validate(
            "thermostat:set-operating-mode",
            &input(
                json!({"operatingMode": "auto", "heatTarget": 68, "coolTarget": 77, "unit": "F"}),
            ),
        )
        .unwrap();
        assert_eq!(
            Value::Object(v.input),
            json!({"operatingMode": "auto", "heatTarget": 20.0, "coolTarget": 25.0, "unit": "C"})
        );
    }

    #[test]
    fn fahrenheit_targets_convert_without_binary_noise() {
        for (f, c) in [
            (78.8, 26.0),
            (64.4, 18.0),
            (70.7, 21.5),
            (41.0, 5.0),
            (95.0, 35.0),
        ] {
            let v = validate(
                "thermostat:set-operating-mode",
                &input(json!({"operatingMode": "heat", "heatTarget": f, "unit": "F"})),
            )
            .unwrap();
            assert_eq!(v.input["heatTarget"], json!(c), "{f} °F");
        }
        assert_eq!(celsius(68.1), 20.055556);
    }

    #[test]
    fn priority_written_as_a_whole_float_becomes_an_integer() {
        let v = validate(
            "battery:set-operating-mode",
            &input(json!({"operatingMode": "idle", "executionPriority": 5.0})),
        )
        .unwrap();
        assert_eq!(v.input["executionPriority"], json!(5));
    }

    #[test]
    fn validated_input_drives_the_simulator() {
        use crate::drivers::simulated::SimDevice;
        use crate::model::device::DeviceState;
        let v = validate(
            "thermostat:set-operating-mode",
            &input(json!({"operatingMode": "heat", "heatTarget": 71.6, "unit": "F"})),
        )
        .unwrap();
        let mut device = SimDevice::new(DeviceType::Thermostat, 1);
        device.apply(v.slug.as_str(), &v.input).unwrap();
        let DeviceState::Thermostat(t) = device.state() else {
            unreachable!()
        };
        assert!((t.heat_target.value - 22.0).abs() < 1e-9, "{t:?}");
    }

    #[test]
    fn hold_secs_is_checked_then_taken_out_of_the_drivers_input() {
        let v = validate(
            "inverter:set-export-limit",
            &input(json!({"exportLimit": 3000, "holdSecs": 900.0})),
        )
        .unwrap();
        assert_eq!(v.hold_secs, Some(900));
        assert_eq!(Value::Object(v.input), json!({"exportLimit": 3000}));
        let v = validate(
            "battery:set-reserve",
            &input(json!({"chargePercentage": 30})),
        )
        .unwrap();
        assert_eq!(v.hold_secs, None, "absent: until the next command");
        for (secs, shown) in [
            (json!(0), "0"),
            (json!(86_401), "86401"),
            (json!("60"), "\"60\""),
        ] {
            let err = validate(
                "battery:set-reserve",
                &input(json!({"chargePercentage": 30, "holdSecs": secs})),
            )
            .unwrap_err();
            assert_eq!(err.field.as_deref(), Some("holdSecs"));
            assert_eq!(
                err.message,
                format!("holdSecs: expected an integer from 1 to 86400, found {shown}")
            );
        }
    }

    #[test]
    fn hold_secs_is_a_member_of_every_device_slug_and_of_no_agent_slug() {
        for slug in Slug::ALL {
            let schema = slug.input_schema();
            let hold = &schema["properties"]["holdSecs"];
            match slug.device_type() {
                Some(_) => {
                    assert_eq!(hold["type"], "integer", "{slug}");
                    assert_eq!(
                        (&hold["minimum"], &hold["maximum"]),
                        (&json!(1), &json!(86_400))
                    );
                }
                None => {
                    assert!(hold.is_null(), "{slug}");
                    let err = validate(slug.as_str(), &input(json!({"holdSecs": 60}))).unwrap_err();
                    assert_eq!(err.message, format!("unknown field `holdSecs` for {slug}"));
                }
            }
        }
    }

    #[test]
    fn a_charge_rate_limit_needs_a_current_a_power_or_both() {
        let slug = "charger:set-charge-rate-limit";
        let err = validate(slug, &input(json!({"holdSecs": 60}))).unwrap_err();
        assert_eq!(err.field.as_deref(), Some("currentLimit"));
        assert_eq!(
            err.message,
            "currentLimit: missing; charger:set-charge-rate-limit requires currentLimit, \
             powerLimit or both"
        );
        for ok in [
            json!({"currentLimit": 16}),
            json!({"powerLimit": 3680.5}),
            json!({"currentLimit": 0, "powerLimit": 50_000}),
        ] {
            assert_eq!(
                Value::Object(validate(slug, &input(ok.clone())).unwrap().input),
                ok
            );
        }
        let err = validate(slug, &input(json!({"currentLimit": 80.5}))).unwrap_err();
        assert_eq!(
            err.message,
            "currentLimit: expected a number from 0 to 80, found 80.5"
        );
    }
}
