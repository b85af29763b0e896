//! Report by exception (docs/PROTOCOL.md 14.8): which device states are worth a point.
//!
//! On a metered cellular link most of a device's samples repeat the last one within the noise
//! of its meter, and each one costs a publish, a PUBACK and two TLS records. With
//! `telemetry.report = "on-change"`, a sample becomes a point only when it differs from the
//! last state *sent* for that device: a discrete member (a mode, a status, a unit, whether an
//! optional member is there at all) changed, or a number moved by more than its deadband. A
//! sample that repeats is still sent once `heartbeat_secs` have passed since the device's last
//! point, so the platform can tell "unchanged" (a heartbeat keeps arriving) from "no fresh
//! data" (nothing for longer than the heartbeat): the gateway never makes a heartbeat up from a
//! stale state, only from a sample the driver has just reported.
//!
//! Comparing with the last state sent, not the last sampled, keeps a slow drift from hiding
//! forever behind a deadband: the drift accumulates until it crosses it.
//!
//! Pure: [`ReportFilter`] is fed samples and instants and answers send or skip; the telemetry
//! task does the I/O.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::model::device::{DeviceState, DeviceType, Temperature};
use crate::telemetry::points::thousandths;

/// The numeric members of each type, by their wire names (PROTOCOL 14.4), in the order
/// [`numbers`] yields them, with the default deadband of each (in the member's unit).
pub(crate) fn numeric_members(kind: DeviceType) -> &'static [(&'static str, f64)] {
    match kind {
        DeviceType::Battery => &[
            ("charge", 50.0),
            ("chargePercentage", 0.5),
            ("chargeRate", 50.0),
            ("backupReserve", 0.0),
            ("gridPower", 50.0),
        ],
        DeviceType::Charger => &[
            ("chargerVoltage", 2.0),
            ("chargerCurrent", 0.5),
            ("chargerWattage", 100.0),
        ],
        DeviceType::Inverter => &[("power", 50.0), ("gridPower", 50.0)],
        DeviceType::Thermostat => &[
            ("ambientTemperature", 0.2),
            ("heatTarget", 0.0),
            ("coolTarget", 0.0),
        ],
        DeviceType::Vehicle => &[
            ("chargePercentage", 0.5),
            ("chargeLimit", 0.0),
            ("range", 1.0),
            ("chargerVoltage", 2.0),
            ("chargerCurrent", 0.5),
            ("chargerWattage", 100.0),
        ],
    }
}

/// The type named `name` as the wire spells it.
pub(crate) fn device_type(name: &str) -> Option<DeviceType> {
    DeviceType::ALL.into_iter().find(|t| t.as_str() == name)
}

/// Whether `member` is a numeric member of any type (a device's type is known only once it
/// reports, so a per-device deadband is checked against all of them).
pub(crate) fn is_numeric_member_of_any(member: &str) -> bool {
    DeviceType::ALL
        .into_iter()
        .any(|t| numeric_members(t).iter().any(|(m, _)| *m == member))
}

/// A state's numbers, in the order of [`numeric_members`]; `None` for an absent optional
/// member. A temperature's number is its `value` (its unit is a discrete member).
fn numbers(state: &DeviceState) -> [Option<f64>; 6] {
    match state {
        DeviceState::Battery(b) => [
            b.charge,
            Some(b.charge_percentage),
            b.charge_rate,
            b.backup_reserve,
            b.grid_power,
            None,
        ],
        DeviceState::Charger(c) => [
            Some(c.charger_voltage),
            Some(c.charger_current),
            Some(c.charger_wattage),
            None,
            None,
            None,
        ],
        DeviceState::Inverter(i) => [Some(i.power), i.grid_power, None, None, None, None],
        DeviceState::Thermostat(t) => [
            Some(t.ambient_temperature.value),
            Some(t.heat_target.value),
            Some(t.cool_target.value),
            None,
            None,
            None,
        ],
        DeviceState::Vehicle(v) => [
            Some(v.charge_percentage),
            Some(v.charge_limit),
            Some(v.range),
            Some(v.charger_voltage),
            Some(v.charger_current),
            Some(v.charger_wattage),
        ],
    }
}

/// Whether the members that are not numbers are all equal (the type included).
fn same_discrete(a: &DeviceState, b: &DeviceState) -> bool {
    let unit = |t: &Temperature| t.unit;
    match (a, b) {
        (DeviceState::Battery(a), DeviceState::Battery(b)) => {
            a.charging_state == b.charging_state
                && a.grid_status == b.grid_status
                && a.strategy == b.strategy
        }
        (DeviceState::Charger(a), DeviceState::Charger(b)) => {
            a.charging_state == b.charging_state && a.is_plugged_in == b.is_plugged_in
        }
        (DeviceState::Inverter(a), DeviceState::Inverter(b)) => a.grid_status == b.grid_status,
        (DeviceState::Thermostat(a), DeviceState::Thermostat(b)) => {
            a.operating_mode == b.operating_mode
                && a.fan_mode == b.fan_mode
                && unit(&a.ambient_temperature) == unit(&b.ambient_temperature)
                && unit(&a.heat_target) == unit(&b.heat_target)
                && unit(&a.cool_target) == unit(&b.cool_target)
        }
        (DeviceState::Vehicle(a), DeviceState::Vehicle(b)) => {
            a.charging_state == b.charging_state && a.is_plugged_in == b.is_plugged_in
        }
        _ => false,
    }
}

/// Deadbands by member name: `[telemetry.deadbands.<type>]` and
/// `[telemetry.device_deadbands.<device id>]`.
pub(crate) type DeadbandTable = BTreeMap<String, BTreeMap<String, f64>>;

/// What the filter needs of the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Reporting {
    pub(crate) heartbeat: Duration,
    pub(crate) by_type: DeadbandTable,
    pub(crate) by_device: DeadbandTable,
}

impl Reporting {
    /// The deadbands of `device_id` as a device of `kind`, in the order of
    /// [`numeric_members`]: its own override, else its type's, else the default.
    fn bands(&self, device_id: &str, kind: DeviceType) -> [f64; 6] {
        let mut bands = [0.0; 6];
        let by_type = self.by_type.get(kind.as_str());
        let by_device = self.by_device.get(device_id);
        for (band, (member, default)) in bands.iter_mut().zip(numeric_members(kind)) {
            *band = by_device
                .and_then(|m| m.get(*member))
                .or_else(|| by_type.and_then(|m| m.get(*member)))
                .copied()
                .unwrap_or(*default);
        }
        bands
    }
}

/// What was last sent for one device.
#[derive(Debug)]
struct Sent {
    state: DeviceState,
    at: Instant,
    bands: [f64; 6],
}

/// The per-device memory of report by exception.
#[derive(Debug)]
pub(crate) struct ReportFilter {
    reporting: Reporting,
    sent: HashMap<String, Sent>,
    /// Samples not sent because they repeated the last point (for health).
    skipped: u64,
    /// The data budget's widening of every deadband (1 when it saves nothing).
    band_factor: f64,
    /// The data budget's lengthening of the heartbeat.
    heartbeat_factor: u32,
}

impl ReportFilter {
    pub(crate) fn new(reporting: Reporting) -> ReportFilter {
        ReportFilter {
            reporting,
            sent: HashMap::new(),
            skipped: 0,
            band_factor: 1.0,
            heartbeat_factor: 1,
        }
    }

    /// Widens every deadband by `band` and lengthens the heartbeat by `heartbeat` (at most a
    /// day): the data budget's degradation steps (14.10). `(1.0, 1)` restores the
    /// configuration.
    pub(crate) fn degrade(&mut self, band: f64, heartbeat: u32) {
        self.band_factor = band;
        self.heartbeat_factor = heartbeat;
    }

    /// The heartbeat in force.
    pub(crate) fn heartbeat(&self) -> Duration {
        (self.reporting.heartbeat * self.heartbeat_factor).min(Duration::from_secs(86_400))
    }

    /// Whether `state`, sampled from `device_id` at `now`, becomes a point; if so it is
    /// remembered as the device's last point.
    pub(crate) fn admit(&mut self, device_id: &str, state: &DeviceState, now: Instant) -> bool {
        let heartbeat = self.heartbeat();
        if let Some(sent) = self.sent.get_mut(device_id) {
            let due = now.saturating_duration_since(sent.at) >= heartbeat;
            if !due && !changed(&sent.state, state, &sent.bands, self.band_factor) {
                self.skipped += 1;
                return false;
            }
            if sent.state.device_type() == state.device_type() {
                sent.state.clone_from(state);
                sent.at = now;
                return true;
            }
        }
        let bands = self.reporting.bands(device_id, state.device_type());
        self.sent.insert(
            device_id.to_owned(),
            Sent {
                state: state.clone(),
                at: now,
                bands,
            },
        );
        true
    }

    /// Forgets `device_id`'s last point, so its next sample is sent whatever it holds: after
    /// the device went offline or came back, the platform must not read on from a state
    /// that came before.
    pub(crate) fn forget(&mut self, device_id: &str) {
        self.sent.remove(device_id);
    }

    /// Samples not sent since the agent started.
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped
    }
}

/// Whether `next` differs from `sent` by more than the deadbands.
fn changed(sent: &DeviceState, next: &DeviceState, bands: &[f64; 6], factor: f64) -> bool {
    if !same_discrete(sent, next) {
        return true;
    }
    numbers(sent)
        .iter()
        .zip(numbers(next).iter())
        .zip(bands)
        .any(|((a, b), band)| match (a, b) {
            // Compared as the wire carries them, in thousandths (PROTOCOL 14.4), so noise
            // below that cannot make a point that repeats the last one. NaN never equals
            // itself, so it always counts as a change.
            (Some(a), Some(b)) => {
                let moved = (thousandths(*a) - thousandths(*b)).abs();
                moved > *band * factor || moved.is_nan()
            }
            (None, None) => false,
            _ => true,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::device::*;

    fn reporting(heartbeat: u64) -> Reporting {
        Reporting {
            heartbeat: Duration::from_secs(heartbeat),
            by_type: DeadbandTable::new(),
            by_device: DeadbandTable::new(),
        }
    }

    fn battery(rate: f64) -> DeviceState {
        DeviceState::Battery(BatteryState {
            charge: Some(8100.0),
            charge_percentage: 60.0,
            charging_state: ChargingState::Discharging,
            charge_rate: Some(rate),
            backup_reserve: Some(20.0),
            grid_status: GridStatus::Idle,
            grid_power: Some(0.0),
            strategy: None,
        })
    }

    #[test]
    fn the_first_sample_a_change_beyond_the_deadband_and_the_heartbeat_are_sent() {
        let t0 = Instant::now();
        let mut f = ReportFilter::new(reporting(300));
        assert!(f.admit("bat-1", &battery(600.0), t0));
        // Within chargeRate's 50 W of the last point: skipped, however many times.
        assert!(!f.admit("bat-1", &battery(640.0), t0 + Duration::from_secs(1)));
        assert!(!f.admit("bat-1", &battery(560.0), t0 + Duration::from_secs(2)));
        // Compared with the point sent (600), not the last sample (560).
        assert!(f.admit("bat-1", &battery(650.5), t0 + Duration::from_secs(3)));
        assert!(!f.admit("bat-1", &battery(650.5), t0 + Duration::from_secs(302)));
        assert!(f.admit("bat-1", &battery(650.5), t0 + Duration::from_secs(303)));
        assert_eq!(f.skipped(), 3);
        // Another device has its own memory.
        assert!(f.admit("bat-2", &battery(650.5), t0 + Duration::from_secs(303)));
    }

    #[test]
    fn a_discrete_change_a_member_appearing_and_a_new_type_are_changes() {
        let t0 = Instant::now();
        let mut f = ReportFilter::new(reporting(300));
        assert!(f.admit("bat-1", &battery(600.0), t0));
        let DeviceState::Battery(mut b) = battery(600.0) else {
            unreachable!()
        };
        b.charging_state = ChargingState::Charging;
        assert!(f.admit("bat-1", &DeviceState::Battery(b.clone()), t0));
        b.grid_power = None;
        assert!(f.admit("bat-1", &DeviceState::Battery(b.clone()), t0));
        b.strategy = Some("self-consumption".into());
        assert!(f.admit("bat-1", &DeviceState::Battery(b), t0));
        let inverter = DeviceState::Inverter(InverterState {
            power: 1.0,
            grid_status: GridStatus::Idle,
            grid_power: None,
        });
        assert!(f.admit("bat-1", &inverter, t0));
        assert!(!f.admit("bat-1", &inverter, t0));
    }

    #[test]
    fn a_zero_deadband_sends_any_change_and_overrides_take_precedence() {
        let t0 = Instant::now();
        let mut r = reporting(300);
        r.by_type.insert(
            "battery".into(),
            BTreeMap::from([("chargeRate".into(), 0.0)]),
        );
        r.by_device.insert(
            "bat-2".into(),
            BTreeMap::from([("chargeRate".into(), 1000.0)]),
        );
        let mut f = ReportFilter::new(r);
        assert!(f.admit("bat-1", &battery(600.0), t0));
        assert!(f.admit("bat-1", &battery(600.001), t0));
        assert!(!f.admit("bat-1", &battery(600.001), t0));
        // Noise below a thousandth is not a change: the wire would carry the same number.
        assert!(!f.admit("bat-1", &battery(600.0010000001), t0));
        assert!(f.admit("bat-2", &battery(600.0), t0));
        assert!(!f.admit("bat-2", &battery(1500.0), t0));
        assert!(f.admit("bat-2", &battery(1600.5), t0));
    }

    #[test]
    fn the_budget_widens_deadbands_and_lengthens_the_heartbeat_until_restored() {
        let t0 = Instant::now();
        let mut f = ReportFilter::new(reporting(300));
        assert!(f.admit("bat-1", &battery(600.0), t0));
        f.degrade(5.0, 4);
        assert_eq!(f.heartbeat(), Duration::from_secs(1200));
        // 200 W is within 5 x 50 W.
        assert!(!f.admit("bat-1", &battery(800.0), t0 + Duration::from_secs(1)));
        assert!(!f.admit("bat-1", &battery(800.0), t0 + Duration::from_secs(1199)));
        assert!(f.admit("bat-1", &battery(800.0), t0 + Duration::from_secs(1200)));
        f.degrade(1.0, 1);
        assert!(f.admit("bat-1", &battery(851.0), t0 + Duration::from_secs(1201)));
        f.degrade(10.0, 1_000);
        assert_eq!(f.heartbeat(), Duration::from_secs(86_400), "at most a day");
    }

    #[test]
    fn a_forgotten_device_sends_its_next_sample() {
        let t0 = Instant::now();
        let mut f = ReportFilter::new(reporting(300));
        assert!(f.admit("bat-1", &battery(600.0), t0));
        f.forget("bat-1");
        assert!(f.admit("bat-1", &battery(600.0), t0));
    }

    #[test]
    fn the_member_tables_match_the_numbers_each_type_yields() {
        let states = [
            battery(1.0),
            DeviceState::Charger(ChargerState {
                charging_state: ChargingState::Idle,
                is_plugged_in: false,
                charger_voltage: 1.0,
                charger_current: 1.0,
                charger_wattage: 1.0,
            }),
            DeviceState::Inverter(InverterState {
                power: 1.0,
                grid_status: GridStatus::Idle,
                grid_power: Some(1.0),
            }),
            DeviceState::Thermostat(ThermostatState {
                ambient_temperature: Temperature::celsius(1.0),
                heat_target: Temperature::celsius(1.0),
                cool_target: Temperature::celsius(1.0),
                operating_mode: ThermostatMode::Auto,
                fan_mode: FanMode::Auto,
            }),
            DeviceState::Vehicle(VehicleState {
                charge_percentage: 1.0,
                charge_limit: 1.0,
                range: 1.0,
                charging_state: ChargingState::Idle,
                is_plugged_in: false,
                charger_voltage: 1.0,
                charger_current: 1.0,
                charger_wattage: 1.0,
            }),
        ];
        for state in &states {
            let json = serde_json::to_value(state).unwrap();
            let members = numeric_members(state.device_type());
            let yielded = numbers(state).iter().filter(|n| n.is_some()).count();
            assert_eq!(yielded, members.len(), "{:?}", state.device_type());
            for (member, _) in members {
                assert!(json.get(member).is_some(), "{member} is not a member");
            }
        }
    }
}
