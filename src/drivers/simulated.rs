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
                charge: BATTERY_CAPACITY_WH * 0.6,
                charge_percentage: 60.0,
                charging_state: ChargingState::Idle,
                charge_rate: 0.0,
                backup_reserve: 20.0,
                grid_status: GridStatus::Idle,
                grid_power: 0.0,
                strategy: "self-consumption".into(),
            }),
            DeviceType::Inverter => DeviceState::Inverter(InverterState {
                power: 0.0,
                grid_status: GridStatus::Idle,
                grid_power: 0.0,
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
            DeviceState::Inverter(i) => step_inverter(i, time_of_day, noise),
            DeviceState::Charger(c) => step_charger(c, noise),
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
                b.backup_reserve = num("chargePercentage").ok_or("chargePercentage missing")?;
            }
            (DeviceState::Battery(b), "battery:set-operating-mode") => {
                b.strategy = text("operatingMode")
                    .ok_or("operatingMode missing")?
                    .to_owned();
            }
            (DeviceState::Charger(c), "charger:set-operating-mode") => {
                c.charging_state = match text("operatingMode") {
                    Some("start-charging") => ChargingState::Charging,
                    Some("stop-charging") => ChargingState::Idle,
                    other => return Err(format!("unsupported operatingMode {other:?}")),
                };
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
    let floor = BATTERY_CAPACITY_WH * b.backup_reserve / 100.0;
    let empty = wanted > 0.0 && b.charge <= floor;
    let full = wanted < 0.0 && b.charge >= BATTERY_CAPACITY_WH;
    let rate = if empty || full {
        0.0
    } else {
        wanted.clamp(-5_000.0, 5_000.0)
    };
    b.charge = (b.charge - rate * dt / 3_600.0).clamp(0.0, BATTERY_CAPACITY_WH);
    b.charge_rate = round(rate, 0.1);
    b.charge = round(b.charge, 0.1);
    b.charge_percentage = round(100.0 * b.charge / BATTERY_CAPACITY_WH, 0.1);
    b.charging_state = match rate {
        r if r > 1.0 => ChargingState::Discharging,
        r if r < -1.0 => ChargingState::Charging,
        _ => ChargingState::Idle,
    };
    b.grid_power = round(wanted - rate, 0.1);
    b.grid_status = grid_status(b.grid_power);
}

/// The solar curve with a little noise, against a 700 W house load: any surplus is exported.
fn step_inverter(i: &mut InverterState, time_of_day: u64, noise: f64) {
    let power = (solar_curve(time_of_day) * (1.0 + 0.1 * noise)).max(0.0);
    i.power = round(power, 0.1);
    i.grid_power = round(700.0 - power, 0.1);
    i.grid_status = grid_status(i.grid_power);
}

/// A noisy mains voltage, and [`CHARGER_POWER_W`] drawn while plugged in and charging.
fn step_charger(c: &mut ChargerState, noise: f64) {
    let charging = c.is_plugged_in && c.charging_state == ChargingState::Charging;
    c.charger_voltage = round(230.0 + 4.0 * noise, 0.1);
    c.charger_current = if charging {
        round(CHARGER_POWER_W / c.charger_voltage, 0.01)
    } else {
        0.0
    };
    c.charger_wattage = round(c.charger_voltage * c.charger_current, 0.1);
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
    v.charge_percentage = round(
        (v.charge_percentage + v.charger_wattage * dt / 3_600.0 / 750.0).min(100.0),
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
                let sample = super::Sample { device_id: device_id.clone(), state };
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
        assert!(after.charge_rate > 0.0, "{after:?}");
        let expected = before.charge - after.charge_rate;
        assert!(
            (after.charge - expected).abs() < 0.2,
            "{before:?} -> {after:?}"
        );
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
            DeviceState::Battery(s) => assert_eq!(s.backup_reserve, 42.0),
            _ => unreachable!(),
        }
    }
}
