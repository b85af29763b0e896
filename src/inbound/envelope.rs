//! The safety envelope: limits set by the installer, on the gateway, that no command can cross.
//!
//! Authorisation decides *who* may command a device; the envelope bounds *what* a command may do
//! to it. A genuine, correctly signed command that would set a home battery's backup reserve to
//! 0 % the night before a storm is refused here, whoever signed it.
//!
//! The limits come only from the local configuration (`[[limits]]`, root-owned like the rest of
//! `agent.toml`); nothing received over the network can loosen them. The check runs after a
//! command's input has been validated and normalised by the catalog and its device found, and
//! before the runner hands it to any driver, so every driver kind (simulated, process, and the
//! protocol drivers to come) sits behind the same check (docs/PROTOCOL.md 4.7).
//!
//! **Refused, never clamped.** A command outside the envelope fails `422 LIMIT_EXCEEDED` and does
//! not reach the device. Clamping would run something the caller did not ask for and report
//! success; a refusal names the limit, so the caller can decide.
//!
//! [`DeviceLimits`] is the `[[limits]]` entry and validates itself ([`DeviceLimits::validate`]);
//! [`Envelope::check`] is the pure decision.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::inbound::commands::catalog::Slug;
use crate::model::device::DeviceType;
use crate::model::rejection::Rejection;

/// Thermostat targets an installer may allow, °C: the catalog's own range (4.3).
const TARGET_C: (f64, f64) = (5.0, 35.0);

/// One `[[limits]]` entry: the installer's limits for one device.
///
/// Each limit is optional; a device without an entry, or a limit left out, is bounded only by
/// the command set's own ranges (docs/PROTOCOL.md 4.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceLimits {
    /// The device (as its driver reports it) these limits apply to.
    pub device_id: String,
    /// What the device must be. A device reporting another type gets no command at all: the
    /// installer's limits were written for other equipment.
    pub device_type: DeviceType,
    /// battery: the lowest backup reserve `battery:set-reserve` may set, %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_backup_reserve: Option<f64>,
    /// battery: the range `battery:set-operating-mode` may ask for, %: both
    /// `minimumBatteryReserve` and `maximumBatteryReserve` must lie within it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_operating_reserve: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_operating_reserve: Option<f64>,
    /// vehicle: the range of `vehicle:set-charge-limit`'s `chargeLimit`, %.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_charge_limit: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_charge_limit: Option<f64>,
    /// thermostat: the range of `heatTarget` and `coolTarget`, °C (targets sent in °F are
    /// compared after conversion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_target_c: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_target_c: Option<f64>,
}

/// Which limits apply to which device type: (key, lowest allowed value, highest).
fn keys_of(device_type: DeviceType) -> &'static [(&'static str, f64, f64)] {
    match device_type {
        DeviceType::Battery => &[
            ("min_backup_reserve", 0.0, 100.0),
            ("min_operating_reserve", 0.0, 100.0),
            ("max_operating_reserve", 0.0, 100.0),
        ],
        DeviceType::Vehicle => &[
            ("min_charge_limit", 0.0, 100.0),
            ("max_charge_limit", 0.0, 100.0),
        ],
        DeviceType::Thermostat => &[
            ("min_target_c", TARGET_C.0, TARGET_C.1),
            ("max_target_c", TARGET_C.0, TARGET_C.1),
        ],
        DeviceType::Charger | DeviceType::Inverter => &[],
    }
}

/// A limit key's unit, as messages show it: `_c` keys are °C, every other one is a percentage.
fn unit(key: &str) -> &'static str {
    if key.ends_with("_c") {
        " °C"
    } else {
        " %"
    }
}

impl DeviceLimits {
    /// Every limit with its key, set or not, in the order of [`keys_of`] for any type. A `min_`
    /// key is a lower bound, a `max_` key an upper one; `min_X` and `max_X` are a pair.
    fn values(&self) -> [(&'static str, Option<f64>); 7] {
        [
            ("min_backup_reserve", self.min_backup_reserve),
            ("min_operating_reserve", self.min_operating_reserve),
            ("max_operating_reserve", self.max_operating_reserve),
            ("min_charge_limit", self.min_charge_limit),
            ("max_charge_limit", self.max_charge_limit),
            ("min_target_c", self.min_target_c),
            ("max_target_c", self.max_target_c),
        ]
    }

    /// One line for `texture-agent status`: the device, its type, and each limit set, with its
    /// unit and source.
    pub(crate) fn describe(&self) -> String {
        let set: Vec<String> = self
            .values()
            .into_iter()
            .filter_map(|(key, value)| Some(format!("{key} {}{}", value?, unit(key))))
            .collect();
        format!(
            "{} ({}): {} [installer]",
            self.device_id,
            self.device_type.as_str(),
            set.join(", ")
        )
    }

    /// Checks entry number `n` (1-based, as an installer counts them) on its own: a device id of
    /// the right grammar, only limits that apply to its type, each a finite number in its range,
    /// at least one of them, and no minimum above its maximum.
    pub(crate) fn validate(&self, n: usize) -> Result<(), Rejection> {
        let id = &self.device_id;
        crate::model::gateway::GatewayId::parse(id)
            .map_err(|e| Rejection::new("limits.device_id", format!("limits #{n}: {e}")))?;
        let kind = self.device_type.as_str();
        let allowed = keys_of(self.device_type);
        if allowed.is_empty() {
            return Err(Rejection::new(
                "limits.device_type",
                format!("limits #{n} ({id}): a {kind} has no limits the agent can enforce yet"),
            ));
        }
        let mut any = false;
        for (key, value) in self.values() {
            let Some(value) = value else { continue };
            any = true;
            let Some(&(_, lo, hi)) = allowed.iter().find(|(k, ..)| *k == key) else {
                let names: Vec<&str> = allowed.iter().map(|(k, ..)| *k).collect();
                return Err(Rejection::new(
                    "limits",
                    format!(
                        "limits #{n} ({id}): {key} does not apply to a {kind}; a {kind} takes {}",
                        names.join(", ")
                    ),
                ));
            };
            if !(value.is_finite() && (lo..=hi).contains(&value)) {
                return Err(Rejection::new(
                    "limits",
                    format!("limits #{n} ({id}): {key} must be from {lo} to {hi}, found {value}"),
                ));
            }
        }
        if !any {
            return Err(Rejection::new(
                "limits",
                format!("limits #{n} ({id}): no limit given for this {kind}"),
            ));
        }
        let values = self.values();
        for (lo_key, lo) in values {
            let Some(bound) = lo_key.strip_prefix("min_") else {
                continue;
            };
            let hi = values
                .iter()
                .find(|(k, _)| k.strip_prefix("max_") == Some(bound));
            if let (Some(lo), Some(&(hi_key, Some(hi)))) = (lo, hi) {
                if lo > hi {
                    return Err(Rejection::new(
                        "limits",
                        format!("limits #{n} ({id}): {lo_key} ({lo}) is above {hi_key} ({hi})"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Where a limit came from. Only the installer today; a platform policy may later narrow the
/// installer's limits, never widen them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Installer,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Installer => f.write_str("installer"),
        }
    }
}

/// Why a command is outside the envelope.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum LimitExceeded {
    /// An input member is beyond a limit.
    Beyond {
        member: &'static str,
        value: f64,
        /// The limit's configuration key, e.g. `min_backup_reserve`.
        limit: &'static str,
        bound: f64,
        source: Source,
    },
    /// The device reports another type than its `[[limits]]` entry says.
    WrongType {
        configured: DeviceType,
        reported: DeviceType,
    },
}

impl LimitExceeded {
    /// The reply's message, naming the limit, its value and where it came from.
    pub(crate) fn message(&self, device_id: &str) -> String {
        match self {
            LimitExceeded::Beyond {
                member,
                value,
                limit,
                bound,
                source,
            } => {
                let unit = unit(limit);
                let side = if limit.starts_with("min_") {
                    "below"
                } else {
                    "above"
                };
                format!(
                    "{member}: {value}{unit} is {side} the {source} limit {limit} = {bound}{unit} \
                     for {device_id}"
                )
            }
            LimitExceeded::WrongType {
                configured,
                reported,
            } => format!(
                "{device_id}: its installer limits are for a {}, but it reports as a {}; \
                 no command runs until the configuration matches",
                configured.as_str(),
                reported.as_str()
            ),
        }
    }
}

/// The limits in force, by device id.
#[derive(Debug, Clone, Default)]
pub(crate) struct Envelope {
    limits: BTreeMap<String, DeviceLimits>,
}

impl Envelope {
    /// The envelope of validated `[[limits]]` entries (device ids are unique by then).
    pub(crate) fn new(limits: &[DeviceLimits]) -> Envelope {
        Envelope {
            limits: limits
                .iter()
                .map(|l| (l.device_id.clone(), l.clone()))
                .collect(),
        }
    }

    /// Whether `slug` with its validated, normalised `input` keeps `device_id` (a device of
    /// `device_type`) inside its limits. Equal to a limit is inside. Pure.
    pub(crate) fn check(
        &self,
        device_id: &str,
        device_type: DeviceType,
        slug: Slug,
        input: &Map<String, Value>,
    ) -> Result<(), LimitExceeded> {
        let Some(limits) = self.limits.get(device_id) else {
            return Ok(());
        };
        if limits.device_type != device_type {
            return Err(LimitExceeded::WrongType {
                configured: limits.device_type,
                reported: device_type,
            });
        }
        // (input member, the limit key bounding it); `min_` keys bound from below.
        let rules: &[(&'static str, &'static str)] = match slug {
            Slug::BatterySetReserve => &[("chargePercentage", "min_backup_reserve")],
            Slug::BatterySetOperatingMode => &[
                ("minimumBatteryReserve", "min_operating_reserve"),
                ("minimumBatteryReserve", "max_operating_reserve"),
                ("maximumBatteryReserve", "min_operating_reserve"),
                ("maximumBatteryReserve", "max_operating_reserve"),
            ],
            Slug::VehicleSetChargeLimit => &[
                ("chargeLimit", "min_charge_limit"),
                ("chargeLimit", "max_charge_limit"),
            ],
            Slug::ThermostatSetOperatingMode => &[
                ("heatTarget", "min_target_c"),
                ("heatTarget", "max_target_c"),
                ("coolTarget", "min_target_c"),
                ("coolTarget", "max_target_c"),
            ],
            _ => &[],
        };
        let values = limits.values();
        for &(member, limit) in rules {
            let bound = values
                .iter()
                .find(|(k, _)| *k == limit)
                .and_then(|(_, v)| *v);
            let (Some(bound), Some(value)) = (bound, input.get(member).and_then(Value::as_f64))
            else {
                continue;
            };
            let outside = if limit.starts_with("min_") {
                value < bound
            } else {
                value > bound
            };
            if outside {
                return Err(LimitExceeded::Beyond {
                    member,
                    value,
                    limit,
                    bound,
                    source: Source::Installer,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn limits(device_id: &str, device_type: DeviceType) -> DeviceLimits {
        DeviceLimits {
            device_id: device_id.into(),
            device_type,
            min_backup_reserve: None,
            min_operating_reserve: None,
            max_operating_reserve: None,
            min_charge_limit: None,
            max_charge_limit: None,
            min_target_c: None,
            max_target_c: None,
        }
    }

    fn input(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn battery() -> Envelope {
        Envelope::new(&[DeviceLimits {
            min_backup_reserve: Some(20.0),
            min_operating_reserve: Some(10.0),
            max_operating_reserve: Some(90.0),
            ..limits("bat-1", DeviceType::Battery)
        }])
    }

    #[test]
    fn a_reserve_below_the_installers_minimum_is_refused_and_the_message_names_the_limit() {
        let refusal = battery()
            .check(
                "bat-1",
                DeviceType::Battery,
                Slug::BatterySetReserve,
                &input(json!({"chargePercentage": 5})),
            )
            .unwrap_err();
        assert_eq!(
            refusal.message("bat-1"),
            "chargePercentage: 5 % is below the installer limit min_backup_reserve = 20 % for bat-1"
        );
    }

    #[test]
    fn a_value_equal_to_a_limit_is_inside() {
        let e = battery();
        let ok = |slug, v: Value| e.check("bat-1", DeviceType::Battery, slug, &input(v));
        assert_eq!(
            ok(Slug::BatterySetReserve, json!({"chargePercentage": 20})),
            Ok(())
        );
        assert_eq!(
            ok(
                Slug::BatterySetOperatingMode,
                json!({"operatingMode": "charge", "minimumBatteryReserve": 10, "maximumBatteryReserve": 90})
            ),
            Ok(())
        );
    }

    #[test]
    fn both_reserves_of_an_operating_mode_must_lie_in_the_installers_range() {
        let e = battery();
        let check = |v: Value| {
            e.check(
                "bat-1",
                DeviceType::Battery,
                Slug::BatterySetOperatingMode,
                &input(v),
            )
        };
        let below = check(json!({"operatingMode": "discharge", "minimumBatteryReserve": 5}));
        assert!(
            matches!(
                below,
                Err(LimitExceeded::Beyond {
                    member: "minimumBatteryReserve",
                    limit: "min_operating_reserve",
                    ..
                })
            ),
            "{below:?}"
        );
        let above = check(json!({"operatingMode": "charge", "maximumBatteryReserve": 95}));
        assert!(
            matches!(
                above,
                Err(LimitExceeded::Beyond {
                    member: "maximumBatteryReserve",
                    limit: "max_operating_reserve",
                    ..
                })
            ),
            "{above:?}"
        );
        assert_eq!(
            above.unwrap_err().message("bat-1"),
            "maximumBatteryReserve: 95 % is above the installer limit max_operating_reserve = 90 % for bat-1"
        );
        assert_eq!(
            check(json!({"operatingMode": "idle"})),
            Ok(()),
            "no reserve asked for"
        );
    }

    #[test]
    fn vehicle_and_thermostat_limits_bound_their_setpoints() {
        let e = Envelope::new(&[
            DeviceLimits {
                min_charge_limit: Some(50.0),
                max_charge_limit: Some(90.0),
                ..limits("car-1", DeviceType::Vehicle)
            },
            DeviceLimits {
                min_target_c: Some(16.0),
                max_target_c: Some(26.0),
                ..limits("th-1", DeviceType::Thermostat)
            },
        ]);
        let car = |v: f64| {
            e.check(
                "car-1",
                DeviceType::Vehicle,
                Slug::VehicleSetChargeLimit,
                &input(json!({ "chargeLimit": v })),
            )
        };
        assert!(car(95.0).is_err());
        assert!(car(40.0).is_err());
        assert_eq!(car(80.0), Ok(()));
        let th = |v: Value| {
            e.check(
                "th-1",
                DeviceType::Thermostat,
                Slug::ThermostatSetOperatingMode,
                &input(v),
            )
        };
        // 30 °C, as the catalog normalises 86 °F.
        let hot =
            th(json!({"operatingMode": "cool", "coolTarget": 30.0, "unit": "C"})).unwrap_err();
        assert_eq!(
            hot.message("th-1"),
            "coolTarget: 30 °C is above the installer limit max_target_c = 26 °C for th-1"
        );
        assert!(th(json!({"operatingMode": "heat", "heatTarget": 12, "unit": "C"})).is_err());
        assert_eq!(
            th(json!({"operatingMode": "auto", "heatTarget": 18, "coolTarget": 24, "unit": "C"})),
            Ok(())
        );
    }

    #[test]
    fn a_device_without_limits_and_a_command_without_a_setpoint_pass() {
        let e = battery();
        let free = e.check(
            "bat-2",
            DeviceType::Battery,
            Slug::BatterySetReserve,
            &input(json!({"chargePercentage": 0})),
        );
        assert_eq!(
            free,
            Ok(()),
            "no [[limits]] entry: only the catalog's ranges"
        );
        let on = e.check(
            "bat-1",
            DeviceType::Battery,
            Slug::BatterySetOperatingMode,
            &input(json!({"operatingMode": "reset"})),
        );
        assert_eq!(on, Ok(()));
    }

    #[test]
    fn a_device_that_reports_another_type_than_its_limits_gets_no_command() {
        let refusal = battery()
            .check(
                "bat-1",
                DeviceType::Charger,
                Slug::ChargerSetOperatingMode,
                &input(json!({"operatingMode": "start"})),
            )
            .unwrap_err();
        assert_eq!(
            refusal.message("bat-1"),
            "bat-1: its installer limits are for a battery, but it reports as a charger; \
             no command runs until the configuration matches"
        );
    }

    fn rejected(l: DeviceLimits) -> String {
        let r = l.validate(2).unwrap_err();
        format!("{}: {}", r.key, r.problem)
    }

    #[test]
    fn status_describes_each_limit_set_with_its_unit_and_source() {
        let l = DeviceLimits {
            min_target_c: Some(16.5),
            max_target_c: Some(26.0),
            ..limits("th-1", DeviceType::Thermostat)
        };
        assert_eq!(
            l.describe(),
            "th-1 (thermostat): min_target_c 16.5 °C, max_target_c 26 °C [installer]"
        );
    }

    #[test]
    fn bad_limits_are_refused_naming_the_entry_and_the_limit() {
        let bat = || limits("bat-1", DeviceType::Battery);
        assert_eq!(
            rejected(DeviceLimits {
                min_operating_reserve: Some(80.0),
                max_operating_reserve: Some(30.0),
                ..bat()
            }),
            "limits: limits #2 (bat-1): min_operating_reserve (80) is above max_operating_reserve (30)"
        );
        assert_eq!(
            rejected(DeviceLimits {
                min_backup_reserve: Some(-5.0),
                ..bat()
            }),
            "limits: limits #2 (bat-1): min_backup_reserve must be from 0 to 100, found -5"
        );
        assert_eq!(
            rejected(DeviceLimits {
                min_backup_reserve: Some(f64::INFINITY),
                ..bat()
            }),
            "limits: limits #2 (bat-1): min_backup_reserve must be from 0 to 100, found inf"
        );
        assert_eq!(
            rejected(DeviceLimits {
                min_target_c: Some(18.0),
                ..bat()
            }),
            "limits: limits #2 (bat-1): min_target_c does not apply to a battery; a battery takes \
             min_backup_reserve, min_operating_reserve, max_operating_reserve"
        );
        assert_eq!(
            rejected(bat()),
            "limits: limits #2 (bat-1): no limit given for this battery"
        );
        assert_eq!(
            rejected(DeviceLimits {
                max_target_c: Some(60.0),
                ..limits("th-1", DeviceType::Thermostat)
            }),
            "limits: limits #2 (th-1): max_target_c must be from 5 to 35, found 60"
        );
        assert_eq!(
            rejected(limits("ev-1", DeviceType::Charger)),
            "limits.device_type: limits #2 (ev-1): a charger has no limits the agent can enforce yet"
        );
        assert_eq!(
            rejected(DeviceLimits {
                min_backup_reserve: Some(10.0),
                ..limits("bat/1", DeviceType::Battery)
            }),
            "limits.device_id: limits #2: device id contains '/'; only letters, digits, '.', '_' and '-' are allowed"
        );
    }
}
