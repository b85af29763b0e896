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
pub(super) fn unit(key: &str) -> &'static str {
    if key.ends_with("_c") {
        " °C"
    } else {
        " %"
    }
}

impl DeviceLimits {
    /// An entry for `device_id` with no limit set yet.
    #[cfg(test)]
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
        }
    }

    /// Every limit with its key, set or not, in the order of [`keys_of`] for any type. A `min_`
    /// key is a lower bound, a `max_` key an upper one; `min_X` and `max_X` are a pair.
    pub(super) fn values(&self) -> [(&'static str, Option<f64>); 7] {
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
        if !any && self.default_control.is_none() && self.failsafe_control.is_none() {
            return Err(Rejection::new(
                "limits",
                format!("limits #{n} ({id}): no limit or control given for this {kind}"),
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
            "limits: limits #2 (bat-1): no limit or control given for this battery"
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
