//! The envelope check: whether a planned device command keeps its device inside the limits in
//! force. A pure decision ([`Envelope::check`]) with no I/O.
//!
//! **Refused, never clamped.** A command outside the envelope fails `422 LIMIT_EXCEEDED` and does
//! not reach the device. Clamping would run something the caller did not ask for and report
//! success; a refusal names the limit, so the caller can decide.

use std::collections::BTreeMap;
use std::fmt;

use serde_json::{Map, Value};

use super::limits::{unit, DeviceLimits};
use crate::inbound::commands::catalog::Slug;
use crate::model::device::DeviceType;

/// Where a limit came from: the installer's `[[limits]]`, or a signed site policy, which may
/// narrow the installer's limits and never widen them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    Installer,
    /// The signed site policy of that version (docs/PROTOCOL.md 4.10).
    Policy {
        version: u64,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Installer => f.write_str("installer"),
            Source::Policy { version } => write!(f, "policy v{version}"),
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
    /// An installer limit bounds a quantity the command leaves unbounded: a charge rate limit
    /// without `powerLimit` would let the charger draw its full power, past `max_power_w`.
    Unbounded {
        member: &'static str,
        /// The limit's configuration key, e.g. `max_power_w`.
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
            LimitExceeded::Unbounded {
                member,
                limit,
                bound,
                source,
            } => format!(
                "{member}: missing; the {source} limit {limit} = {bound}{} for {device_id} \
                 requires it",
                unit(limit)
            ),
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
    /// The installer's limits, then the site policy's: a command must keep inside both.
    layers: Vec<(Source, BTreeMap<String, DeviceLimits>)>,
}

fn by_device(limits: &[DeviceLimits]) -> BTreeMap<String, DeviceLimits> {
    limits
        .iter()
        .map(|l| (l.device_id.clone(), l.clone()))
        .collect()
}

impl Envelope {
    /// The envelope of validated `[[limits]]` entries (device ids are unique by then).
    pub(crate) fn new(limits: &[DeviceLimits]) -> Envelope {
        Envelope {
            layers: vec![(Source::Installer, by_device(limits))],
        }
    }

    /// The same installer limits, narrowed by the site policy `version` with `limits` (an
    /// accepted policy only narrows them; see `policy`), replacing any earlier policy.
    pub(crate) fn with_policy(mut self, version: u64, limits: &[DeviceLimits]) -> Envelope {
        self.layers.truncate(1);
        if !limits.is_empty() {
            self.layers
                .push((Source::Policy { version }, by_device(limits)));
        }
        self
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
        for (source, entries) in &self.layers {
            if let Some(limits) = entries.get(device_id) {
                check_entry(limits, *source, device_type, slug, input)?;
            }
        }
        Ok(())
    }
}

/// [`Envelope::check`] against one layer's entry for the device.
fn check_entry(
    limits: &DeviceLimits,
    source: Source,
    device_type: DeviceType,
    slug: Slug,
    input: &Map<String, Value>,
) -> Result<(), LimitExceeded> {
    {
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
            Slug::ChargerSetChargeRateLimit => &[
                ("currentLimit", "max_current_a"),
                ("powerLimit", "max_power_w"),
            ],
            Slug::InverterSetExportLimit => &[("exportLimit", "max_export_w")],
            _ => &[],
        };
        let values = limits.values();
        for &(member, limit) in rules {
            let bound = values
                .iter()
                .find(|(k, _)| *k == limit)
                .and_then(|(_, v)| *v);
            let Some(bound) = bound else { continue };
            let Some(value) = input.get(member).and_then(Value::as_f64) else {
                // A charge rate limit may leave out one quantity, and the charger then draws as
                // much of it as it can: past the installer's limit, unless the command bounds it.
                if slug == Slug::ChargerSetChargeRateLimit {
                    return Err(LimitExceeded::Unbounded {
                        member,
                        limit,
                        bound,
                        source,
                    });
                }
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
                    source,
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
        DeviceLimits::new(device_id, device_type)
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

    fn charger() -> Envelope {
        Envelope::new(&[DeviceLimits {
            max_current_a: Some(16.0),
            max_power_w: Some(7_400.0),
            ..limits("ch-1", DeviceType::Charger)
        }])
    }

    fn rate(e: &Envelope, v: Value) -> Result<(), LimitExceeded> {
        e.check(
            "ch-1",
            DeviceType::Charger,
            Slug::ChargerSetChargeRateLimit,
            &input(v),
        )
    }

    #[test]
    fn a_charge_rate_limit_stays_within_the_installers_current_and_power() {
        let e = charger();
        assert_eq!(
            rate(&e, json!({"currentLimit": 16, "powerLimit": 7400})),
            Ok(()),
            "equal to both limits"
        );
        assert_eq!(
            rate(&e, json!({"currentLimit": 6, "powerLimit": 1380.5})),
            Ok(())
        );
        let over = rate(&e, json!({"currentLimit": 16.5, "powerLimit": 3000})).unwrap_err();
        assert_eq!(
            over.message("ch-1"),
            "currentLimit: 16.5 A is above the installer limit max_current_a = 16 A for ch-1"
        );
        let over = rate(&e, json!({"currentLimit": 10, "powerLimit": 7401})).unwrap_err();
        assert_eq!(
            over.message("ch-1"),
            "powerLimit: 7401 W is above the installer limit max_power_w = 7400 W for ch-1"
        );
    }

    #[test]
    fn an_installer_limit_on_a_quantity_requires_the_command_to_bound_it() {
        let e = charger();
        let unbounded = rate(&e, json!({"currentLimit": 10})).unwrap_err();
        assert_eq!(
            unbounded,
            LimitExceeded::Unbounded {
                member: "powerLimit",
                limit: "max_power_w",
                bound: 7_400.0,
                source: Source::Installer,
            }
        );
        assert_eq!(
            unbounded.message("ch-1"),
            "powerLimit: missing; the installer limit max_power_w = 7400 W for ch-1 requires it"
        );
        assert_eq!(
            rate(&e, json!({"powerLimit": 3000}))
                .unwrap_err()
                .message("ch-1"),
            "currentLimit: missing; the installer limit max_current_a = 16 A for ch-1 requires it"
        );
        // Only the quantities the installer bounds must be bounded by the command.
        let current_only = Envelope::new(&[DeviceLimits {
            max_current_a: Some(16.0),
            ..limits("ch-1", DeviceType::Charger)
        }]);
        assert_eq!(rate(&current_only, json!({"currentLimit": 16})), Ok(()));
        assert!(matches!(
            rate(&current_only, json!({"powerLimit": 3000})),
            Err(LimitExceeded::Unbounded {
                member: "currentLimit",
                ..
            })
        ));
        // Starting or stopping changes no limit: the last rate limit still holds.
        assert_eq!(
            e.check(
                "ch-1",
                DeviceType::Charger,
                Slug::ChargerSetOperatingMode,
                &input(json!({"operatingMode": "start-charging"})),
            ),
            Ok(())
        );
    }

    #[test]
    fn an_export_limit_stays_within_the_installers() {
        let e = Envelope::new(&[DeviceLimits {
            max_export_w: Some(3_680.0),
            ..limits("pv-1", DeviceType::Inverter)
        }]);
        let export = |w: f64| {
            e.check(
                "pv-1",
                DeviceType::Inverter,
                Slug::InverterSetExportLimit,
                &input(json!({ "exportLimit": w })),
            )
        };
        assert_eq!(export(3_680.0), Ok(()), "equal to the limit");
        assert_eq!(export(0.0), Ok(()));
        assert_eq!(
            export(5_000.0).unwrap_err().message("pv-1"),
            "exportLimit: 5000 W is above the installer limit max_export_w = 3680 W for pv-1"
        );
    }
}
