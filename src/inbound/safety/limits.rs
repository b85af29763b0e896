//! The installer's limits: one `[[limits]]` entry per device, from the local configuration.
//!
//! The limits come only from `agent.toml` (root-owned, like the rest of the configuration);
//! nothing received over the network can loosen them. A signed site policy may narrow them
//! ([`super::policy`]), never widen them. [`DeviceLimits::validate`] checks one entry on its own;
//! `config::validate` checks the entries against each other and the drivers.

use serde::{Deserialize, Serialize};

use crate::model::device::DeviceType;
use crate::model::rejection::Rejection;
use crate::model::safety::Control;

/// Thermostat targets an installer may allow, °C: the catalog's own range (4.3).
const TARGET_C: (f64, f64) = (5.0, 35.0);
/// Charger limits an installer may set, A and W: the ranges of `charger:set-charge-rate-limit`.
const CURRENT_A: (f64, f64) = (0.0, 80.0);
const POWER_W: (f64, f64) = (0.0, 50_000.0);
/// Export limits an installer may set, W: the range of `inverter:set-export-limit`.
const EXPORT_W: (f64, f64) = (0.0, 100_000.0);

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
    /// The control the device returns to when a command's `holdSecs` lapse (and in fail-safe,
    /// unless `failsafe_control` is set). Without it, commands to the device cannot hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_control: Option<Control>,
    /// The control the device goes to when the link has been down for
    /// `safety.failsafe_after_secs`. Without it (and without `default_control`) the device
    /// stays as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failsafe_control: Option<Control>,
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
    /// charger: the highest `currentLimit` of `charger:set-charge-rate-limit`, A. Once set, every
    /// such command must carry a `currentLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_current_a: Option<f64>,
    /// charger: the highest `powerLimit` of `charger:set-charge-rate-limit`, W. Once set, every
    /// such command must carry a `powerLimit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_power_w: Option<f64>,
    /// inverter: the highest `exportLimit` of `inverter:set-export-limit`, W.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_export_w: Option<f64>,
}

/// How many limit keys there are: the length of [`DeviceLimits::values`].
const KEYS: usize = 10;

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
        DeviceType::Charger => &[
            ("max_current_a", CURRENT_A.0, CURRENT_A.1),
            ("max_power_w", POWER_W.0, POWER_W.1),
        ],
        DeviceType::Inverter => &[("max_export_w", EXPORT_W.0, EXPORT_W.1)],
    }
}

/// A limit key's unit, as messages show it, from the key's suffix: `_c` °C, `_a` A, `_w` W;
/// every other key is a percentage.
pub(super) fn unit(key: &str) -> &'static str {
    match key.rsplit_once('_').map(|(_, suffix)| suffix) {
        Some("c") => " °C",
        Some("a") => " A",
        Some("w") => " W",
        _ => " %",
    }
}

/// `kind` with its indefinite article, for messages: "a battery", "an inverter".
fn a(kind: &str) -> String {
    let article = if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {kind}")
}

impl DeviceLimits {
    /// An entry for `device_id` with no limit set yet, to fill in with [`DeviceLimits::set`].
    pub(crate) fn new(device_id: &str, device_type: DeviceType) -> DeviceLimits {
        DeviceLimits {
            device_id: device_id.to_owned(),
            device_type,
            default_control: None,
            failsafe_control: None,
            min_backup_reserve: None,
            min_operating_reserve: None,
            max_operating_reserve: None,
            min_charge_limit: None,
            max_charge_limit: None,
            min_target_c: None,
            max_target_c: None,
            max_current_a: None,
            max_power_w: None,
            max_export_w: None,
        }
    }

    /// Sets the limit `key` (a `[[limits]]` key, e.g. `max_power_w`) to `value`, unchecked: an
    /// entry built this way still goes through [`DeviceLimits::validate`]. Err names an unknown
    /// key.
    pub(crate) fn set(&mut self, key: &str, value: f64) -> Result<(), String> {
        let slot = match key {
            "min_backup_reserve" => &mut self.min_backup_reserve,
            "min_operating_reserve" => &mut self.min_operating_reserve,
            "max_operating_reserve" => &mut self.max_operating_reserve,
            "min_charge_limit" => &mut self.min_charge_limit,
            "max_charge_limit" => &mut self.max_charge_limit,
            "min_target_c" => &mut self.min_target_c,
            "max_target_c" => &mut self.max_target_c,
            "max_current_a" => &mut self.max_current_a,
            "max_power_w" => &mut self.max_power_w,
            "max_export_w" => &mut self.max_export_w,
            _ => {
                let known: Vec<&str> = self.values().iter().map(|(k, _)| *k).collect();
                return Err(format!(
                    "unknown limit `{key}`; the limits are {}",
                    known.join(", ")
                ));
            }
        };
        *slot = Some(value);
        Ok(())
    }

    /// Every limit with its key, set or not, in the order of [`keys_of`] for any type. A `min_`
    /// key is a lower bound, a `max_` key an upper one; `min_X` and `max_X` are a pair.
    pub(crate) fn values(&self) -> [(&'static str, Option<f64>); KEYS] {
        [
            ("min_backup_reserve", self.min_backup_reserve),
            ("min_operating_reserve", self.min_operating_reserve),
            ("max_operating_reserve", self.max_operating_reserve),
            ("min_charge_limit", self.min_charge_limit),
            ("max_charge_limit", self.max_charge_limit),
            ("min_target_c", self.min_target_c),
            ("max_target_c", self.max_target_c),
            ("max_current_a", self.max_current_a),
            ("max_power_w", self.max_power_w),
            ("max_export_w", self.max_export_w),
        ]
    }

    /// One line for `texture-agent status`: the device, its type, and each limit set, with its
    /// unit and source.
    /// `source` names where the entry came from (`installer`, `policy v3`); the controls the
    /// agent applies on its own follow the limits.
    pub(crate) fn describe(&self, source: &str) -> String {
        let mut set: Vec<String> = self
            .values()
            .into_iter()
            .filter_map(|(key, value)| Some(format!("{key} {}{}", value?, unit(key))))
            .collect();
        for (key, control) in [
            ("default_control", &self.default_control),
            ("failsafe_control", &self.failsafe_control),
        ] {
            if let Some(c) = control {
                let input = serde_json::Value::Object(c.input.clone());
                set.push(format!("{key} {} {input}", c.command));
            }
        }
        format!(
            "{} ({}): {} [{source}]",
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
        let mut any = false;
        for (key, value) in self.values() {
            let Some(value) = value else { continue };
            any = true;
            let Some(&(_, lo, hi)) = allowed.iter().find(|(k, ..)| *k == key) else {
                let names: Vec<&str> = allowed.iter().map(|(k, ..)| *k).collect();
                return Err(Rejection::new(
                    "limits",
                    format!(
                        "limits #{n} ({id}): {key} does not apply to {}; {} takes {}",
                        a(kind),
                        a(kind),
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
        if !any && self.default_control.is_none() && self.failsafe_control.is_none() {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(device_id: &str, device_type: DeviceType) -> DeviceLimits {
        DeviceLimits::new(device_id, device_type)
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
            l.describe("installer"),
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
            "limits: limits #2 (ev-1): no limit given for this charger"
        );
        assert_eq!(
            rejected(DeviceLimits {
                min_backup_reserve: Some(10.0),
                ..limits("bat/1", DeviceType::Battery)
            }),
            "limits.device_id: limits #2: device id contains '/'; only letters, digits, '.', '_' and '-' are allowed"
        );
    }

    #[test]
    fn a_limits_unit_comes_from_its_key() {
        assert_eq!(unit("min_target_c"), " °C");
        assert_eq!(unit("max_current_a"), " A");
        assert_eq!(unit("max_power_w"), " W");
        assert_eq!(unit("max_export_w"), " W");
        assert_eq!(unit("min_backup_reserve"), " %");
        assert_eq!(unit("max_charge_limit"), " %");
    }

    #[test]
    fn chargers_and_inverters_take_current_power_and_export_limits() {
        let charger = DeviceLimits {
            max_current_a: Some(16.0),
            max_power_w: Some(7_400.0),
            ..limits("ch-1", DeviceType::Charger)
        };
        assert!(charger.validate(1).is_ok());
        assert_eq!(
            charger.describe("installer"),
            "ch-1 (charger): max_current_a 16 A, max_power_w 7400 W [installer]"
        );
        let inverter = DeviceLimits {
            max_export_w: Some(0.0),
            ..limits("pv-1", DeviceType::Inverter)
        };
        assert!(inverter.validate(1).is_ok());
        assert_eq!(
            inverter.describe("installer"),
            "pv-1 (inverter): max_export_w 0 W [installer]"
        );
        let top = DeviceLimits {
            max_current_a: Some(80.0),
            max_power_w: Some(50_000.0),
            ..limits("ch-1", DeviceType::Charger)
        };
        assert!(top.validate(1).is_ok(), "the ends of a range are allowed");
    }

    #[test]
    fn bad_charger_and_inverter_limits_are_refused_naming_the_entry_and_the_limit() {
        let ch = || limits("ch-1", DeviceType::Charger);
        assert_eq!(
            rejected(DeviceLimits {
                max_current_a: Some(-1.0),
                ..ch()
            }),
            "limits: limits #2 (ch-1): max_current_a must be from 0 to 80, found -1"
        );
        assert_eq!(
            rejected(DeviceLimits {
                max_power_w: Some(50_000.5),
                ..ch()
            }),
            "limits: limits #2 (ch-1): max_power_w must be from 0 to 50000, found 50000.5"
        );
        assert_eq!(
            rejected(DeviceLimits {
                max_power_w: Some(f64::NAN),
                ..ch()
            }),
            "limits: limits #2 (ch-1): max_power_w must be from 0 to 50000, found NaN"
        );
        assert_eq!(
            rejected(DeviceLimits {
                max_export_w: Some(5_000.0),
                ..ch()
            }),
            "limits: limits #2 (ch-1): max_export_w does not apply to a charger; a charger takes \
             max_current_a, max_power_w"
        );
        assert_eq!(
            rejected(DeviceLimits {
                max_export_w: Some(100_001.0),
                ..limits("pv-1", DeviceType::Inverter)
            }),
            "limits: limits #2 (pv-1): max_export_w must be from 0 to 100000, found 100001"
        );
        assert_eq!(
            rejected(DeviceLimits {
                max_current_a: Some(16.0),
                ..limits("pv-1", DeviceType::Inverter)
            }),
            "limits: limits #2 (pv-1): max_current_a does not apply to an inverter; an inverter \
             takes max_export_w"
        );
        assert_eq!(
            rejected(limits("pv-1", DeviceType::Inverter)),
            "limits: limits #2 (pv-1): no limit given for this inverter"
        );
    }

    #[test]
    fn set_fills_in_a_limit_by_its_key_and_names_an_unknown_one() {
        let mut l = limits("ch-1", DeviceType::Charger);
        l.set("max_power_w", 7_400.0).unwrap();
        l.set("max_current_a", 32.0).unwrap();
        assert_eq!(
            l,
            DeviceLimits {
                max_current_a: Some(32.0),
                max_power_w: Some(7_400.0),
                ..limits("ch-1", DeviceType::Charger)
            }
        );
        for (key, _) in l.clone().values() {
            l.set(key, 1.0).unwrap();
        }
        assert!(l.values().iter().all(|(_, v)| *v == Some(1.0)), "{l:?}");
        assert_eq!(
            l.set("max_current", 1.0).unwrap_err(),
            "unknown limit `max_current`; the limits are min_backup_reserve, \
             min_operating_reserve, max_operating_reserve, min_charge_limit, max_charge_limit, \
             min_target_c, max_target_c, max_current_a, max_power_w, max_export_w"
        );
    }
}
