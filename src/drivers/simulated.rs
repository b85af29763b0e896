//! Simulated devices: a battery, a solar inverter, an EV charger and a thermostat.
//!
//! They exist for the demo and the tests, so they are deterministic: given the same seed, the
//! same steps and the same times of day, they produce the same states. Randomness comes only from
//! a seeded generator; the time of day is an input rather than read from the clock.

use serde_json::{Map, Value};

use crate::model::device::{
    BatteryState, ChargerState, ChargingState, DeviceState, DeviceType, FanMode, GridStatus,
    InverterState, Temperature, ThermostatMode, ThermostatState, VehicleState,
};

/// Battery capacity, Wh.
pub const BATTERY_CAPACITY_WH: f64 = 13_500.0;
/// Inverter peak output, W.
pub const SOLAR_PEAK_W: f64 = 5_000.0;
/// Charger power when charging, W (32 A at 230 V).
pub const CHARGER_POWER_W: f64 = 7_360.0;

/// A simulated device: its state and how it evolves.
#[derive(Debug, Clone)]
pub struct SimDevice {
    rng: fastrand::Rng,
    state: DeviceState,
    /// Setpoints the device model has no member for (the model is the platform's, a wire
    /// contract), kept here so the simulation obeys them.
    limits: Setpoints,
}

/// A charger's rate limit and an inverter's export limit, as the last command set them.
#[derive(Debug, Clone, Default, PartialEq)]
struct Setpoints {
    /// A; `None` draws up to the charger's own 32 A.
    current_limit: Option<f64>,
    /// W; `None` draws up to [`CHARGER_POWER_W`].
    power_limit: Option<f64>,
    /// W exported at most; `None` exports whatever the house does not use.
    export_limit: Option<f64>,
}

/// Rounds `x` up to a multiple of `step`.
fn round_up(x: f64, step: f64) -> f64 {
    (x / step - 1e-9).ceil() * step
}

/// Rounds `x` down to a multiple of `step`: a reading shown at a limit never shows above it.
fn round_down(x: f64, step: f64) -> f64 {
    (x / step + 1e-9).floor() * step
}

/// Solar output at `time_of_day` seconds after midnight: a half sine from 06:00 to 18:00.
pub fn solar_curve(time_of_day: u64) -> f64 {
    let hours = (time_of_day % 86_400) as f64 / 3_600.0;
    if !(6.0..18.0).contains(&hours) {
        return 0.0;
    }
    SOLAR_PEAK_W * (std::f64::consts::PI * (hours - 6.0) / 12.0).sin()
}

fn round(x: f64, step: f64) -> f64 {
    (x / step).round() * step
}

impl SimDevice {
    pub fn new(device_type: DeviceType, seed: u64) -> SimDevice {
        let state = match device_type {
            DeviceType::Battery => DeviceState::Battery(BatteryState {
                charge: Some(BATTERY_CAPACITY_WH * 0.6),
                charge_percentage: 60.0,
                charging_state: ChargingState::Idle,
                charge_rate: Some(0.0),
                backup_reserve: Some(20.0),
                grid_status: GridStatus::Idle,
                grid_power: Some(0.0),
                strategy: Some("self-consumption".into()),
            }),
            DeviceType::Inverter => DeviceState::Inverter(InverterState {
                power: 0.0,
                grid_status: GridStatus::Idle,
                grid_power: Some(0.0),
            }),
            DeviceType::Vehicle => DeviceState::Vehicle(VehicleState {
                charge_percentage: 55.0,
                charge_limit: 80.0,
                range: 210.0,
                charging_state: ChargingState::Idle,
                is_plugged_in: true,
                charger_voltage: 230.0,
                charger_current: 0.0,
                charger_wattage: 0.0,
            }),
            DeviceType::Charger => DeviceState::Charger(ChargerState {
                charging_state: ChargingState::Idle,
                is_plugged_in: true,
                charger_voltage: 230.0,
                charger_current: 0.0,
                charger_wattage: 0.0,
            }),
            DeviceType::Thermostat => DeviceState::Thermostat(ThermostatState {
                ambient_temperature: Temperature::celsius(19.0),
                heat_target: Temperature::celsius(20.0),
                cool_target: Temperature::celsius(25.0),
                operating_mode: ThermostatMode::Auto,
                fan_mode: FanMode::Auto,
            }),
        };
        SimDevice {
            rng: fastrand::Rng::with_seed(seed),
            state,
            limits: Setpoints::default(),
        }
    }

    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    /// Advances the simulation by `dt` seconds, ending at `time_of_day` (seconds after midnight).
    pub fn step(&mut self, dt: f64, time_of_day: u64) -> &DeviceState {
        let noise = self.rng.f64() - 0.5;
        match &mut self.state {
            DeviceState::Battery(b) => step_battery(b, dt, time_of_day, noise),
            DeviceState::Inverter(i) => step_inverter(i, time_of_day, noise, &self.limits),
            DeviceState::Charger(c) => step_charger(c, noise, &self.limits),
            DeviceState::Thermostat(t) => step_thermostat(t, dt, noise),
            DeviceState::Vehicle(v) => step_vehicle(v, dt, noise),
        }
        &self.state
    }

    /// Applies a validated command's input (see `commands`) to the simulated state.
    pub fn apply(&mut self, slug: &str, input: &Map<String, Value>) -> Result<Value, String> {
        let num = |k: &str| input.get(k).and_then(Value::as_f64);
        let text = |k: &str| input.get(k).and_then(Value::as_str);
        match (&mut self.state, slug) {
            (DeviceState::Battery(b), "battery:set-reserve") => {
                b.backup_reserve = Some(num("chargePercentage").ok_or("chargePercentage missing")?);
            }
            (DeviceState::Battery(b), "battery:set-operating-mode") => {
                b.strategy = Some(
                    text("operatingMode")
                        .ok_or("operatingMode missing")?
                        .to_owned(),
                );
            }
            (DeviceState::Charger(c), "charger:set-operating-mode") => {
                c.charging_state = match text("operatingMode") {
                    Some("start-charging") => ChargingState::Charging,
                    Some("stop-charging") => ChargingState::Idle,
                    other => return Err(format!("unsupported operatingMode {other:?}")),
                };
            }
            (DeviceState::Charger(_), "charger:set-charge-rate-limit") => {
                self.limits.current_limit = num("currentLimit");
                self.limits.power_limit = num("powerLimit");
            }
            (DeviceState::Inverter(_), "inverter:set-export-limit") => {
                self.limits.export_limit = Some(num("exportLimit").ok_or("exportLimit missing")?);
            }
            (DeviceState::Vehicle(v), "vehicle:set-operating-mode") => {
                v.charging_state = match text("operatingMode") {
                    Some("start-charging") => ChargingState::Charging,
                    Some("stop-charging") => ChargingState::Idle,
                    other => return Err(format!("unsupported operatingMode {other:?}")),
                };
            }
            (DeviceState::Vehicle(v), "vehicle:set-charge-limit") => {
                v.charge_limit = num("chargeLimit").ok_or("chargeLimit missing")?;
            }
            (DeviceState::Thermostat(t), "thermostat:set-operating-mode") => {
                t.operating_mode =
                    serde_json::from_value(input.get("operatingMode").cloned().unwrap_or_default())
                        .map_err(|e| format!("operatingMode: {e}"))?;
                if let Some(v) = num("heatTarget") {
                    t.heat_target.value = v;
                }
                if let Some(v) = num("coolTarget") {
                    t.cool_target.value = v;
                }
            }
            (DeviceState::Thermostat(t), "thermostat:set-fan-mode") => {
                t.fan_mode =
                    serde_json::from_value(input.get("fanMode").cloned().unwrap_or_default())
                        .map_err(|e| format!("fanMode: {e}"))?;
            }
            (state, slug) => {
                return Err(format!(
                    "{slug} is not supported by a simulated {:?}",
                    state.device_type()
                ));
            }
        }
        Ok(serde_json::to_value(&self.state).unwrap_or_default())
    }
}

/// Household load minus solar decides the rate; the battery covers the difference down to its
/// reserve and soaks up surplus up to full.
fn step_battery(b: &mut BatteryState, dt: f64, time_of_day: u64, noise: f64) {
    let load = 600.0 + 400.0 * noise;
    let wanted = load - solar_curve(time_of_day);
    // A simulated battery always has every member; the options are for real devices.
    let charge = b.charge.unwrap_or_default();
    let floor = BATTERY_CAPACITY_WH * b.backup_reserve.unwrap_or_default() / 100.0;
    let empty = wanted > 0.0 && charge <= floor;
    let full = wanted < 0.0 && charge >= BATTERY_CAPACITY_WH;
    let rate = if empty || full {
        0.0
    } else {
        // Never below the reserve, however long the step: discharge only what lies above it.
        let above_floor = (charge - floor).max(0.0) * 3_600.0 / dt.max(f64::EPSILON);
        wanted.clamp(-5_000.0, 5_000.0).min(above_floor)
    };
    let charge = (charge - rate * dt / 3_600.0).clamp(0.0, BATTERY_CAPACITY_WH);
    b.charge_rate = Some(round(rate, 0.1));
    // While discharging, rounded up: a battery at its reserve never reads below it.
    let discharging = rate > 0.0;
    let settle = |x: f64| {
        if discharging {
            round_up(x, 0.1)
        } else {
            round(x, 0.1)
        }
    };
    let charge = settle(charge);
    b.charge = Some(charge);
    b.charge_percentage = settle(100.0 * charge / BATTERY_CAPACITY_WH);
    b.charging_state = match rate {
        r if r > 1.0 => ChargingState::Discharging,
        r if r < -1.0 => ChargingState::Charging,
        _ => ChargingState::Idle,
    };
    let grid = round(wanted - rate, 0.1);
    b.grid_power = Some(grid);
    b.grid_status = grid_status(grid);
}

/// The solar curve with a little noise, against a 700 W house load: any surplus is exported,
/// up to the export limit; the rest is curtailed.
fn step_inverter(i: &mut InverterState, time_of_day: u64, noise: f64, limits: &Setpoints) {
    let mut power = (solar_curve(time_of_day) * (1.0 + 0.1 * noise)).max(0.0);
    if let Some(export) = limits.export_limit {
        power = round_down(power.min(700.0 + export), 0.1);
    }
    i.power = round(power, 0.1);
    let grid = round(700.0 - power, 0.1);
    i.grid_power = Some(grid);
    i.grid_status = grid_status(grid);
}

/// A noisy mains voltage, and [`CHARGER_POWER_W`] drawn while plugged in and charging, or
/// less under a rate limit: never more current than its `currentLimit` nor more power than
/// its `powerLimit`.
fn step_charger(c: &mut ChargerState, noise: f64, limits: &Setpoints) {
    let charging = c.is_plugged_in && c.charging_state == ChargingState::Charging;
    c.charger_voltage = round(230.0 + 4.0 * noise, 0.1);
    let power = limits
        .power_limit
        .map_or(CHARGER_POWER_W, |p| p.min(CHARGER_POWER_W));
    let current = (power / c.charger_voltage).min(limits.current_limit.unwrap_or(f64::MAX));
    c.charger_current = if charging {
        round_down(current, 0.01)
    } else {
        0.0
    };
    c.charger_wattage = round_down(c.charger_voltage * c.charger_current, 0.1);
}

/// The room drifts towards the target its mode sets, fully within ten minutes.
fn step_thermostat(t: &mut ThermostatState, dt: f64, noise: f64) {
    let target = match t.operating_mode {
        ThermostatMode::Off => 15.0,
        ThermostatMode::Heat => t.heat_target.value,
        ThermostatMode::Cool => t.cool_target.value,
        ThermostatMode::Auto | ThermostatMode::Eco => t
            .ambient_temperature
            .value
            .clamp(t.heat_target.value, t.cool_target.value),
    };
    let drift = (target - t.ambient_temperature.value) * (dt / 600.0).min(1.0);
    t.ambient_temperature.value = round(t.ambient_temperature.value + drift + 0.05 * noise, 0.01);
}

/// Charges like [`step_charger`] while plugged in and below its charge limit; reaching the
/// limit (or unplugging) ends the charging.
fn step_vehicle(v: &mut VehicleState, dt: f64, noise: f64) {
    let charging = v.is_plugged_in
        && v.charging_state == ChargingState::Charging
        && v.charge_percentage < v.charge_limit;
    if !charging && v.charging_state == ChargingState::Charging {
        v.charging_state = ChargingState::Idle;
    }
    v.charger_voltage = round(230.0 + 4.0 * noise, 0.1);
    v.charger_current = if charging {
        round(CHARGER_POWER_W / v.charger_voltage, 0.01)
    } else {
        0.0
    };
    v.charger_wattage = round(v.charger_voltage * v.charger_current, 0.1);
    // A 75 kWh pack: percentage gained = energy / capacity.
    // Charging stops at the charge limit, however long the step.
    let ceiling = if charging { v.charge_limit } else { 100.0 };
    let gained = v.charge_percentage + v.charger_wattage * dt / 3_600.0 / 750.0;
    v.charge_percentage = round(
        gained.min(ceiling.max(v.charge_percentage)).min(100.0),
        0.01,
    );
    v.range = round(v.charge_percentage * 4.0, 0.1);
}

fn grid_status(grid_power: f64) -> GridStatus {
    match grid_power {
        p if p > 1.0 => GridStatus::Importing,
        p if p < -1.0 => GridStatus::Exporting,
        _ => GridStatus::Idle,
    }
}

/// Runs one simulated device: a sample every `interval`, commands applied as they come.
pub async fn run(
    device_id: String,
    device_type: DeviceType,
    interval: std::time::Duration,
    seed: u64,
    samples: super::SampleSender,
    mut commands: tokio::sync::mpsc::Receiver<super::DriverCommand>,
) {
    let mut device = SimDevice::new(device_type, seed);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let time_of_day = crate::model::clock::system_secs() % 86_400;
                let state = device.step(interval.as_secs_f64(), time_of_day).clone();
                let sample = super::Sample { device_id: device_id.clone(), state, commands: None };
                if samples.send(sample).await.is_err() {
                    return;
                }
            }
            Some(command) = commands.recv() => {
                let outcome = device.apply(&command.slug, &command.input);
                let _ = command.done.send(outcome.map_err(super::CommandFailure::Reported));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_states() {
        for t in [
            DeviceType::Battery,
            DeviceType::Inverter,
            DeviceType::Charger,
            DeviceType::Thermostat,
        ] {
            let (mut a, mut b) = (SimDevice::new(t, 7), SimDevice::new(t, 7));
            for step in 0..100u64 {
                assert_eq!(
                    a.step(5.0, 36_000 + step * 5),
                    b.step(5.0, 36_000 + step * 5)
                );
            }
        }
    }

    #[test]
    fn battery_charge_follows_its_rate() {
        let mut b = SimDevice::new(DeviceType::Battery, 1);
        let DeviceState::Battery(before) = b.state().clone() else {
            unreachable!()
        };
        // At night there is no solar: the battery discharges to cover the load.
        let DeviceState::Battery(after) = b.step(3_600.0, 0).clone() else {
            unreachable!()
        };
        let (rate, charge) = (after.charge_rate.unwrap(), after.charge.unwrap());
        assert!(rate > 0.0, "{after:?}");
        let expected = before.charge.unwrap() - rate;
        assert!((charge - expected).abs() < 0.2, "{before:?} -> {after:?}");
        assert_eq!(after.charging_state, ChargingState::Discharging);
    }

    #[test]
    fn inverter_follows_the_sun() {
        let mut i = SimDevice::new(DeviceType::Inverter, 1);
        let power = |s: &DeviceState| match s {
            DeviceState::Inverter(i) => i.power,
            _ => unreachable!(),
        };
        assert_eq!(power(i.step(5.0, 3 * 3_600)), 0.0);
        assert!(power(i.step(5.0, 12 * 3_600)) > 4_000.0);
    }

    #[test]
    fn set_reserve_changes_the_next_sample() {
        let mut b = SimDevice::new(DeviceType::Battery, 1);
        let input = serde_json::json!({"chargePercentage": 42})
            .as_object()
            .unwrap()
            .clone();
        b.apply("battery:set-reserve", &input).unwrap();
        match b.step(5.0, 0) {
            DeviceState::Battery(s) => assert_eq!(s.backup_reserve, Some(42.0)),
            _ => unreachable!(),
        }
    }

    fn input(v: serde_json::Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_battery_never_discharges_below_its_reserve_however_long_the_step() {
        let mut b = SimDevice::new(DeviceType::Battery, 3);
        b.apply(
            "battery:set-reserve",
            &input(serde_json::json!({"chargePercentage": 33.3})),
        )
        .unwrap();
        for dt in [5.0, 600.0, 86_400.0, 3_600.0] {
            let DeviceState::Battery(s) = b.step(dt, 0).clone() else {
                unreachable!()
            };
            assert!(s.charge_percentage >= 33.3, "{dt} s: {s:?}");
            assert!(
                s.charge.unwrap() >= BATTERY_CAPACITY_WH * 0.333 - 1e-6,
                "{dt} s: {s:?}"
            );
        }
        // At the reserve it no longer discharges: the grid covers the load.
        let DeviceState::Battery(s) = b.step(5.0, 0).clone() else {
            unreachable!()
        };
        assert_eq!(s.charge_rate, Some(0.0), "{s:?}");
        assert!(s.grid_power.unwrap() > 0.0, "{s:?}");
    }

    #[test]
    fn a_charger_never_draws_more_than_its_rate_limit() {
        let mut c = SimDevice::new(DeviceType::Charger, 4);
        c.apply(
            "charger:set-operating-mode",
            &input(serde_json::json!({"operatingMode": "start-charging"})),
        )
        .unwrap();
        let reading = |c: &mut SimDevice| match c.step(5.0, 0).clone() {
            DeviceState::Charger(s) => s,
            _ => unreachable!(),
        };
        assert!(
            reading(&mut c).charger_wattage > 7_000.0,
            "unlimited: its own 32 A"
        );
        c.apply(
            "charger:set-charge-rate-limit",
            &input(serde_json::json!({"currentLimit": 16})),
        )
        .unwrap();
        for _ in 0..50 {
            let s = reading(&mut c);
            assert!(
                s.charger_current <= 16.0 && s.charger_current > 15.0,
                "{s:?}"
            );
        }
        c.apply(
            "charger:set-charge-rate-limit",
            &input(serde_json::json!({"currentLimit": 16, "powerLimit": 1_400})),
        )
        .unwrap();
        for _ in 0..50 {
            let s = reading(&mut c);
            assert!(
                s.charger_wattage <= 1_400.0 && s.charger_wattage > 1_300.0,
                "{s:?}"
            );
        }
    }

    #[test]
    fn an_inverter_never_exports_more_than_its_export_limit() {
        let mut i = SimDevice::new(DeviceType::Inverter, 5);
        let at_noon = |i: &mut SimDevice| match i.step(5.0, 12 * 3_600).clone() {
            DeviceState::Inverter(s) => s,
            _ => unreachable!(),
        };
        assert!(
            -at_noon(&mut i).grid_power.unwrap() > 3_000.0,
            "unlimited, it exports"
        );
        i.apply(
            "inverter:set-export-limit",
            &input(serde_json::json!({"exportLimit": 500})),
        )
        .unwrap();
        for _ in 0..50 {
            let s = at_noon(&mut i);
            let export = -s.grid_power.unwrap();
            assert!(export <= 500.0 && export > 400.0, "{s:?}");
        }
    }

    #[test]
    fn a_vehicle_stops_charging_at_its_charge_limit() {
        let mut v = SimDevice::new(DeviceType::Vehicle, 6);
        v.apply(
            "vehicle:set-charge-limit",
            &input(serde_json::json!({"chargeLimit": 56})),
        )
        .unwrap();
        v.apply(
            "vehicle:set-operating-mode",
            &input(serde_json::json!({"operatingMode": "start-charging"})),
        )
        .unwrap();
        for _ in 0..5 {
            let DeviceState::Vehicle(s) = v.step(3_600.0, 0).clone() else {
                unreachable!()
            };
            assert!(s.charge_percentage <= 56.0, "{s:?}");
        }
    }
}
