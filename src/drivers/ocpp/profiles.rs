//! Charging profiles (OCPP 1.6 Smart Charging): the installer's current limit as a
//! `ChargePointMaxProfile`, and each `charger:set-charge-rate-limit` as a `TxDefaultProfile`
//! that expires by itself (docs/PROTOCOL.md 17.6). Pure: payloads in, payloads out.
//!
//! Why a `TxDefaultProfile` and not a `TxProfile`: a `TxProfile` ends with its transaction, so
//! a limit set between sessions would not apply to the next vehicle, and one set during a
//! session would lapse when it ends. A `TxDefaultProfile` applies to every transaction on the
//! connector, current and future, until its `validTo`. The charger takes the lower of it and the
//! `ChargePointMaxProfile` at every moment (1.6, 3.13.2), so a command can never lift the
//! installer's limit, whatever it asks for.
//!
//! Why the installer's profile has no `validTo`: it is the limit the house's wiring needs. A
//! gateway that has gone must leave it in force, not lift it.

use serde_json::{json, Map, Value};

use crate::model::clock::rfc3339;

/// Our `chargingProfileId`s. A profile with the same id replaces ours on the charger (1.6,
/// 5.16.2), so a new limit never stacks on an old one.
pub(crate) const MAX_PROFILE_ID: u32 = 1;
/// Connector `n`'s limit is profile `LIMIT_PROFILE_BASE + n` at stack level `n`: 1.6 also
/// replaces a profile of the same stack level and purpose, and a charger that applies that rule
/// across connectors must not let one connector's limit replace another's.
pub(crate) const LIMIT_PROFILE_BASE: u32 = 10;

/// The unit of a charging schedule: a 1.6 schedule has exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RateUnit {
    Amps,
    Watts,
}

impl RateUnit {
    fn as_str(self) -> &'static str {
        match self {
            RateUnit::Amps => "A",
            RateUnit::Watts => "W",
        }
    }
}

/// A `charger:set-charge-rate-limit` as one schedule: its unit and its limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct ChargeLimit {
    pub(crate) unit: RateUnit,
    /// Rounded to 0.1, the schedule's resolution (`limit` is a multiple of 0.1).
    pub(crate) value: f64,
}

impl ChargeLimit {
    /// Reads a command's input (already checked against the command set and the installer's
    /// limits): `currentLimit` in A or `powerLimit` in W. Both at once cannot be one 1.6
    /// schedule and are refused rather than one of them dropped; a current above the charge
    /// point's `max_current_a` is refused rather than silently capped by the charger.
    pub(crate) fn parse(
        input: &Map<String, Value>,
        max_current_a: Option<u32>,
    ) -> Result<ChargeLimit, String> {
        let number = |name: &str| input.get(name).and_then(Value::as_f64);
        let limit = match (number("currentLimit"), number("powerLimit")) {
            (Some(_), Some(_)) => {
                return Err(
                    "currentLimit and powerLimit: an OCPP 1.6 charging schedule has one \
                            unit; send one of them"
                        .into(),
                )
            }
            (Some(a), None) => ChargeLimit {
                unit: RateUnit::Amps,
                value: a,
            },
            (None, Some(w)) => ChargeLimit {
                unit: RateUnit::Watts,
                value: w,
            },
            (None, None) => return Err("currentLimit or powerLimit: missing".into()),
        };
        if !limit.value.is_finite() || limit.value < 0.0 {
            return Err(format!("{}: not a limit", limit.value));
        }
        if let (RateUnit::Amps, Some(max)) = (limit.unit, max_current_a) {
            if limit.value > f64::from(max) {
                return Err(format!(
                    "currentLimit: {} A is above the charge point's max_current_a, {max} A",
                    limit.value
                ));
            }
        }
        Ok(ChargeLimit {
            value: (limit.value * 10.0).round() / 10.0,
            ..limit
        })
    }

    /// The command's result once the charger has accepted the profile.
    pub(crate) fn result(&self, valid_to: u64) -> Value {
        json!({
            "status": "Accepted",
            "chargingRateUnit": self.unit.as_str(),
            "limit": self.value,
            "validTo": rfc3339(valid_to),
        })
    }
}

/// A charge limit the driver keeps in force: sent again when its profile's lease runs low, and
/// at each new connection of its charge point.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Standing {
    /// The connector it limits.
    pub(crate) connector: u32,
    pub(crate) limit: ChargeLimit,
    /// When the command's hold ends (the device's default control then follows, from the
    /// safety stage); none: until another command replaces it.
    pub(crate) hold_until: Option<u64>,
    /// The `validTo` it was last sent with.
    pub(crate) valid_to: u64,
    /// After a refused renewal: not renewed again before then.
    pub(crate) retry_at: Option<u64>,
}

impl Standing {
    /// A limit from a command at `now`.
    pub(crate) fn new(
        connector: u32,
        limit: ChargeLimit,
        hold_until: Option<u64>,
        now: u64,
        lease: u64,
    ) -> Standing {
        Standing {
            connector,
            limit,
            hold_until,
            valid_to: valid_to(now, lease, hold_until),
            retry_at: None,
        }
    }

    /// Whether it still applies at `now` (its hold, if any, has not ended).
    pub(crate) fn live(&self, now: u64) -> bool {
        self.hold_until.is_none_or(|until| until > now)
    }

    /// Whether it must be sent again at `now`: live, its lease two thirds gone (or a refused
    /// renewal's retry time come), and its `validTo` not already the end of its hold.
    pub(crate) fn due(&self, now: u64, lease: u64) -> bool {
        self.live(now)
            && self.hold_until.is_none_or(|until| until > self.valid_to)
            && now >= renew_at(self.valid_to, lease)
            && self.retry_at.is_none_or(|at| now >= at)
    }

    /// The same limit, after the charger refused (or did not answer) its renewal at `now`:
    /// tried again a tenth of the lease later (at least 5 s), not at every check, while the
    /// profile already on the charger runs out.
    pub(crate) fn retry_later(&self, now: u64, lease: u64) -> Standing {
        Standing {
            retry_at: Some(now + (lease / 10).max(5)),
            ..*self
        }
    }

    /// The same limit, leased again from `now`.
    pub(crate) fn renewed(&self, now: u64, lease: u64) -> Standing {
        Standing::new(self.connector, self.limit, self.hold_until, now, lease)
    }

    /// Its SetChargingProfile.req, sent at `now`.
    pub(crate) fn profile(&self, now: u64) -> Value {
        limit_profile(self.limit, self.connector, now, self.valid_to)
    }
}

/// SetChargingProfile.req: the installer's limit for the whole charge point (connector 0),
/// from `now` on, with no end.
pub(crate) fn max_profile(amps: u32, now: u64) -> Value {
    json!({
        "connectorId": 0,
        "csChargingProfiles": {
            "chargingProfileId": MAX_PROFILE_ID,
            "stackLevel": 0,
            "chargingProfilePurpose": "ChargePointMaxProfile",
            "chargingProfileKind": "Absolute",
            "chargingSchedule": schedule(RateUnit::Amps, f64::from(amps), now),
        },
    })
}

/// SetChargingProfile.req: `limit` on `connector` from `now` until `valid_to`, when the charger
/// drops it by itself.
fn limit_profile(limit: ChargeLimit, connector: u32, now: u64, valid_to: u64) -> Value {
    json!({
        "connectorId": connector,
        "csChargingProfiles": {
            "chargingProfileId": LIMIT_PROFILE_BASE + connector,
            "stackLevel": connector,
            "chargingProfilePurpose": "TxDefaultProfile",
            "chargingProfileKind": "Absolute",
            "validFrom": rfc3339(now),
            "validTo": rfc3339(valid_to),
            "chargingSchedule": schedule(limit.unit, limit.value, now),
        },
    })
}

/// ClearChargingProfile.req for our `ChargePointMaxProfile`: sent when the configuration no
/// longer gives the charge point a `max_current_a`, so a limit the installer removed does not
/// live on in the charger's memory.
pub(crate) fn clear_max_profile() -> Value {
    json!({"id": MAX_PROFILE_ID})
}

/// ChangeAvailability.req for the whole charge point (connector 0).
pub(crate) fn change_availability(operative: bool) -> Value {
    let kind = if operative {
        "Operative"
    } else {
        "Inoperative"
    };
    json!({"connectorId": 0, "type": kind})
}

/// TriggerMessage.req for `message` on `connector`.
pub(crate) fn trigger(message: &str, connector: u32) -> Value {
    json!({"requestedMessage": message, "connectorId": connector})
}

fn schedule(unit: RateUnit, limit: f64, start: u64) -> Value {
    json!({
        "chargingRateUnit": unit.as_str(),
        "startSchedule": rfc3339(start),
        "chargingSchedulePeriod": [{"startPeriod": 0, "limit": limit}],
    })
}

/// When a standing limit's profile is renewed: once two thirds of `lease` have passed since it
/// was sent, so one lost or slow renewal still leaves a third of the lease to try again.
pub(crate) fn renew_at(valid_to: u64, lease: u64) -> u64 {
    valid_to.saturating_sub(lease / 3)
}

/// The `validTo` of a limit sent at `now`: the end of the command's hold, or one lease, whichever
/// comes first.
pub(crate) fn valid_to(now: u64, lease: u64, hold_until: Option<u64>) -> u64 {
    let leased = now + lease;
    // A hold that has already ended still gets a profile that is valid for a moment, never
    // one that ends before it starts.
    hold_until.map_or(leased, |until| until.clamp(now + 1, leased))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_limit_is_one_unit_within_the_charge_points_maximum() {
        assert_eq!(
            ChargeLimit::parse(&input(json!({"currentLimit": 10.04})), Some(16)),
            Ok(ChargeLimit {
                unit: RateUnit::Amps,
                value: 10.0
            })
        );
        assert_eq!(
            ChargeLimit::parse(&input(json!({"powerLimit": 7400})), Some(16)),
            Ok(ChargeLimit {
                unit: RateUnit::Watts,
                value: 7400.0
            })
        );
        let both = ChargeLimit::parse(
            &input(json!({"currentLimit": 10, "powerLimit": 7400})),
            None,
        );
        assert!(both.unwrap_err().contains("one unit"));
        assert_eq!(
            ChargeLimit::parse(&input(json!({"currentLimit": 20})), Some(16)),
            Err("currentLimit: 20 A is above the charge point's max_current_a, 16 A".into())
        );
        assert!(ChargeLimit::parse(&input(json!({"currentLimit": 20})), None).is_ok());
        assert!(ChargeLimit::parse(&input(json!({})), None).is_err());
    }

    #[test]
    fn the_limit_profile_expires_and_the_installers_does_not() {
        let now = 1_764_700_000;
        let limit = ChargeLimit {
            unit: RateUnit::Amps,
            value: 10.0,
        };
        let p = limit_profile(limit, 1, now, now + 900);
        assert_eq!(
            (
                &limit_profile(limit, 2, now, now + 900)["csChargingProfiles"]["chargingProfileId"],
                &p["csChargingProfiles"]["chargingProfileId"]
            ),
            (&json!(12), &json!(11)),
            "each connector's limit is a profile of its own"
        );
        let profile = &p["csChargingProfiles"];
        assert_eq!(p["connectorId"], 1);
        assert_eq!(profile["chargingProfilePurpose"], "TxDefaultProfile");
        assert_eq!(profile["validTo"], "2025-12-02T18:41:40Z");
        assert_eq!(
            profile["chargingSchedule"]["chargingSchedulePeriod"],
            json!([{"startPeriod": 0, "limit": 10.0}])
        );
        let m = max_profile(16, now);
        assert_eq!(m["connectorId"], 0);
        assert_eq!(
            m["csChargingProfiles"]["chargingProfilePurpose"],
            "ChargePointMaxProfile"
        );
        assert!(m["csChargingProfiles"].get("validTo").is_none());
        assert_eq!(
            m["csChargingProfiles"]["chargingSchedule"]["chargingRateUnit"],
            "A"
        );
    }

    #[test]
    fn a_lease_ends_at_the_hold_and_is_renewed_a_third_before_it_ends() {
        assert_eq!(valid_to(1000, 900, None), 1900);
        assert_eq!(valid_to(1000, 900, Some(1120)), 1120);
        assert_eq!(valid_to(1000, 900, Some(5000)), 1900);
        assert_eq!(renew_at(1900, 900), 1600);
        let limit = ChargeLimit {
            unit: RateUnit::Watts,
            value: 3680.0,
        };
        let open = Standing::new(2, limit, None, 1000, 900);
        assert_eq!(open.profile(1000)["connectorId"], 2);
        assert!(!open.due(1599, 900) && open.due(1600, 900));
        assert_eq!(open.renewed(1600, 900).valid_to, 2500);
        let held = Standing::new(1, limit, Some(1120), 1000, 900);
        assert_eq!(held.valid_to, 1120);
        assert!(
            !held.due(1110, 900),
            "its validTo is the end of its hold already"
        );
        assert!(held.live(1119) && !held.live(1120));
        let refused = open.retry_later(1600, 900);
        assert!(
            !refused.due(1689, 900) && refused.due(1690, 900),
            "a tenth of the lease later"
        );
        let long = Standing::new(1, limit, Some(3000), 1000, 900);
        assert!(long.due(1600, 900));
        assert_eq!(long.renewed(2700, 900).valid_to, 3000);
    }
}
