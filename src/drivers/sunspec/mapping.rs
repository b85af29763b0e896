//! SunSpec models onto the Texture device model (docs/PROTOCOL.md 14.4 and 16.3): pure, one
//! poll's registers in, device states out.
//!
//! - An inverter model (101–103, 111–113) is an `inverter`: `power` is its AC output `W`.
//! - A battery model (802), or else a storage model (124), is a `battery`.
//! - A meter (201–204, 211–214) is not a device of its own: the platform's model has none. Its
//!   total real power `W` (positive while importing, as SunSpec's meters count it) is the site's
//!   grid reading, and becomes the `gridPower` and `gridStatus` of every inverter and battery on
//!   the same link. Without a meter they have no `gridPower` and `gridStatus` is `"unknown"`:
//!   an inverter does not measure the grid, and a made-up 0 would read as "balanced".
//!
//! A member whose registers are not implemented is left out where the device model allows it,
//! and where it does not (`power`, `chargePercentage`), the device is not reported this poll:
//! a missing reading is never sent as 0.
//!
//! Device ids are stable across restarts, re-discovery and re-cabling: derived from the
//! serial number of the common model (`sunspec-<serial>`, `sunspec-<serial>-battery`), or,
//! without one, from the driver's name and the unit id.

use std::sync::Arc;

use super::chain::{Block, Common};
use crate::model::device::{
    BatteryState, ChargingState, DeviceState, DeviceType, GridStatus, InverterState,
};

/// Model ids by role.
pub(crate) const INVERTERS: [u16; 6] = [101, 102, 103, 111, 112, 113];
pub(crate) const BATTERY: u16 = 802;
pub(crate) const STORAGE: u16 = 124;
pub(crate) const METERS: [u16; 8] = [201, 202, 203, 204, 211, 212, 213, 214];
pub(crate) const NAMEPLATE: u16 = 120;
pub(crate) const SETTINGS: u16 = 121;
pub(crate) const CONTROLS: u16 = 123;

/// Below this many watts either way the grid counts as idle.
const IDLE_W: f64 = 10.0;

/// One unit's models as one poll read them.
#[derive(Debug, Clone)]
pub(crate) struct Unit {
    pub(crate) unit: u8,
    pub(crate) common: Common,
    pub(crate) blocks: Vec<Block>,
}

impl Unit {
    pub(crate) fn block(&self, ids: &[u16]) -> Option<&Block> {
        self.blocks.iter().find(|b| ids.contains(&b.header.id))
    }
}

/// A device a unit provides: what it is, its id, and which model carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceSpec {
    pub(crate) device_id: String,
    pub(crate) device_type: DeviceType,
    pub(crate) unit: u8,
    /// The slugs it carries out: those whose models its unit has (PROTOCOL 16.4).
    pub(crate) commands: Arc<[&'static str]>,
}

/// The devices `unit` provides, from the models it has (known after discovery, before any
/// reading): an inverter and a battery at most.
pub(crate) fn devices(driver: &str, unit: &Unit) -> Vec<DeviceSpec> {
    let base = base_id(driver, unit);
    let has = |ids: &[u16]| unit.blocks.iter().any(|b| ids.contains(&b.header.id));
    // Which slugs: each needs the models its writes go to (its points, lengths and scale
    // factors are checked again when it runs).
    let only = |slugs: &[(&'static str, bool)]| -> Arc<[&'static str]> {
        slugs
            .iter()
            .filter(|(_, ok)| *ok)
            .map(|(slug, _)| *slug)
            .collect()
    };
    let mut devices = Vec::new();
    if has(&INVERTERS) {
        devices.push(DeviceSpec {
            device_id: base.clone(),
            device_type: DeviceType::Inverter,
            unit: unit.unit,
            commands: only(&[(
                "inverter:set-export-limit",
                has(&[CONTROLS]) && has(&[SETTINGS, NAMEPLATE]),
            )]),
        });
    }
    if has(&[BATTERY, STORAGE]) {
        devices.push(DeviceSpec {
            device_id: format!("{base}-battery"),
            device_type: DeviceType::Battery,
            unit: unit.unit,
            commands: only(&[
                ("battery:set-reserve", true),
                ("battery:set-operating-mode", has(&[STORAGE])),
            ]),
        });
    }
    devices
}

/// `sunspec-<serial>`, the serial reduced to the device-id grammar (PROTOCOL 1.1); without a
/// serial, `<driver>-u<unit>`.
fn base_id(driver: &str, unit: &Unit) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '-'
                }
            })
            .collect()
    };
    let id = match unit.common.serial.as_deref().map(clean) {
        Some(serial) if !serial.trim_matches('-').is_empty() => format!("sunspec-{serial}"),
        _ => format!("{}-u{}", clean(driver), unit.unit),
    };
    // Room for "-battery" within the 64-character limit.
    id.chars().take(55).collect()
}

/// The grid reading of the link's first meter that has one: `(gridStatus, gridPower)`.
pub(crate) fn grid(units: &[Unit]) -> (GridStatus, Option<f64>) {
    let power = units
        .iter()
        .filter_map(|u| u.block(&METERS))
        .find_map(|b| b.number("W"));
    match power {
        Some(w) if w > IDLE_W => (GridStatus::Importing, Some(w)),
        Some(w) if w < -IDLE_W => (GridStatus::Exporting, Some(w)),
        Some(w) => (GridStatus::Idle, Some(w)),
        None => (GridStatus::Unknown, None),
    }
}

/// The state of `device` from this poll's `units`; `None` when a required member is not
/// available this time.
pub(crate) fn state(device: &DeviceSpec, units: &[Unit]) -> Option<DeviceState> {
    let unit = units.iter().find(|u| u.unit == device.unit)?;
    let (grid_status, grid_power) = grid(units);
    match device.device_type {
        DeviceType::Inverter => {
            let inverter = unit.block(&INVERTERS)?;
            Some(DeviceState::Inverter(InverterState {
                power: inverter.number("W")?,
                grid_status,
                grid_power,
            }))
        }
        DeviceType::Battery => {
            let state = if let Some(b) = unit.block(&[BATTERY]) {
                let soc = b.number("SoC")?;
                BatteryState {
                    charge: b.number("WHRtg").map(|wh| wh * soc / 100.0),
                    charge_percentage: soc,
                    charging_state: charging_state(b.number("ChaSt")),
                    charge_rate: b.number("W"),
                    backup_reserve: b.number("SoCRsvMin"),
                    grid_status,
                    grid_power,
                    strategy: None,
                }
            } else {
                let s = unit.block(&[STORAGE])?;
                BatteryState {
                    charge: None,
                    charge_percentage: s.number("ChaState")?,
                    charging_state: charging_state(s.number("ChaSt")),
                    charge_rate: None,
                    backup_reserve: s.number("MinRsvPct"),
                    grid_status,
                    grid_power,
                    strategy: None,
                }
            };
            Some(DeviceState::Battery(state))
        }
        _ => None,
    }
}

/// `ChaSt` of models 124 and 802: 3 discharging, 4 charging; off, empty, full and holding
/// are idle; testing or not implemented is unknown.
fn charging_state(cha_st: Option<f64>) -> ChargingState {
    match cha_st.map(|v| v as u16) {
        Some(3) => ChargingState::Discharging,
        Some(4) => ChargingState::Charging,
        Some(1 | 2 | 5 | 6) => ChargingState::Idle,
        _ => ChargingState::Unknown,
    }
}

/// Where `battery:set-reserve` writes for `unit`: the block and point, model 802's `SoCRsvMin`
/// first, else model 124's `MinRsvPct`; a point `writable` refuses is passed over (Kostal's
/// 802 rejects writes to `SoCRsvMin`, evcc #10912).
pub(crate) fn reserve_point(
    unit: &Unit,
    writable: impl Fn(u16, &str) -> bool,
) -> Option<(&Block, &'static str)> {
    unit.block(&[BATTERY])
        .filter(|b| b.point("SoCRsvMin").is_some() && writable(BATTERY, "SoCRsvMin"))
        .map(|b| (b, "SoCRsvMin"))
        .or_else(|| {
            unit.block(&[STORAGE])
                .filter(|_| writable(STORAGE, "MinRsvPct"))
                .map(|b| (b, "MinRsvPct"))
        })
}

/// `StorCtl_Mod` bits: bit 0 puts the charge rate limit `InWRte` in force, bit 1 the
/// discharge rate limit `OutWRte`.
const CHARGE_LIMIT: f64 = 1.0;
const DISCHARGE_LIMIT: f64 = 2.0;
const BOTH_LIMITS: f64 = 3.0;

/// What `battery:set-operating-mode` writes to the storage controls (model 124), in order:
/// the rates first and `StorCtl_Mod`, which puts them in force, last (first for `reset`, which
/// lifts them). Rates are percentages of the maximum rate; a negative `OutWRte` is a charge
/// and a negative `InWRte` a discharge, as SunSpec 124 and the devices that implement it
/// (Fronius, SMA) define them.
///
/// - `charge`: without grid interaction the battery may not discharge and charges from what
///   the site produces; with it, it is charged at full rate (from the grid too, where the
///   device's own `ChaGriSet` allows: the agent leaves that installer setting alone).
/// - `discharge`: without grid interaction the battery may not charge and covers the house;
///   with it, it is discharged at full rate (exporting what the house does not use).
/// - `idle`: neither charge nor discharge.
/// - `reset`: no limits; the device's own control.
pub(crate) fn storage_mode(mode: &str, grid: bool) -> Result<[(&'static str, f64); 3], String> {
    Ok(match (mode, grid) {
        ("charge", false) => [
            ("OutWRte", 0.0),
            ("InWRte", 100.0),
            ("StorCtl_Mod", DISCHARGE_LIMIT),
        ],
        ("charge", true) => [
            ("OutWRte", -100.0),
            ("InWRte", 100.0),
            ("StorCtl_Mod", BOTH_LIMITS),
        ],
        ("discharge", false) => [
            ("InWRte", 0.0),
            ("OutWRte", 100.0),
            ("StorCtl_Mod", CHARGE_LIMIT),
        ],
        ("discharge", true) => [
            ("InWRte", -100.0),
            ("OutWRte", 100.0),
            ("StorCtl_Mod", BOTH_LIMITS),
        ],
        ("idle", _) => [
            ("InWRte", 0.0),
            ("OutWRte", 0.0),
            ("StorCtl_Mod", BOTH_LIMITS),
        ],
        ("reset", _) => [("StorCtl_Mod", 0.0), ("InWRte", 100.0), ("OutWRte", 100.0)],
        (other, _) => return Err(format!("operatingMode {other:?} has no storage control")),
    })
}

/// Where `inverter:set-export-limit` writes for `unit`: the immediate controls (123), and the
/// maximum power a percentage of `WMaxLimPct` is of, in W: 121's `WMax`, else 120's `WRtg`.
pub(crate) fn output_limit(unit: &Unit) -> Result<(&Block, f64), String> {
    let controls = unit.block(&[CONTROLS]).ok_or_else(|| {
        format!(
            "unit {} has no immediate controls model (123): it cannot limit its output",
            unit.unit
        )
    })?;
    let wmax = unit
        .block(&[SETTINGS])
        .and_then(|b| b.number("WMax"))
        .or_else(|| unit.block(&[NAMEPLATE]).and_then(|b| b.number("WRtg")))
        .filter(|w| *w > 0.0)
        .ok_or_else(|| {
            format!(
                "unit {} gives no maximum power (121 WMax or 120 WRtg): a limit in W cannot \
                 be turned into its WMaxLimPct",
                unit.unit
            )
        })?;
    Ok((controls, wmax))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::sunspec::chain::ModelHeader;

    /// A block of model `id` with every register "not implemented" but `set` (offset, value).
    fn block(id: u16, length: u16, set: &[(usize, u16)]) -> Block {
        let mut regs = vec![0xFFFF; usize::from(length) + 2];
        regs[0] = id;
        regs[1] = length;
        for &(at, v) in set {
            regs[at] = v;
        }
        Block {
            header: ModelHeader {
                id,
                address: 40_000,
                length,
            },
            regs,
        }
    }

    fn common(serial: &str) -> Common {
        Common {
            serial: Some(serial.into()),
            ..Common::default()
        }
    }

    #[test]
    fn an_inverter_with_storage_is_two_devices_named_after_its_serial() {
        let unit = Unit {
            unit: 1,
            common: common("HY 42/7"),
            blocks: vec![block(103, 50, &[]), block(124, 24, &[])],
        };
        let ids: Vec<(String, DeviceType)> = devices("roof", &unit)
            .into_iter()
            .map(|d| (d.device_id, d.device_type))
            .collect();
        assert_eq!(
            ids,
            vec![
                ("sunspec-HY-42-7".into(), DeviceType::Inverter),
                ("sunspec-HY-42-7-battery".into(), DeviceType::Battery)
            ]
        );
        let nameless = Unit {
            common: Common::default(),
            ..unit
        };
        assert_eq!(devices("roof", &nameless)[0].device_id, "roof-u1");
    }

    #[test]
    fn a_meter_gives_the_grid_and_without_one_it_is_unknown_not_zero() {
        // Inverter W 4521 × 10^-1; meter W -1200 × 10^0 (exporting).
        let inverter = block(103, 50, &[(14, 4521), (15, (-1i16) as u16)]);
        let meter = block(203, 105, &[(18, (-1200i16) as u16), (22, 0)]);
        let units = vec![
            Unit {
                unit: 1,
                common: common("INV"),
                blocks: vec![inverter.clone()],
            },
            Unit {
                unit: 2,
                common: common("MTR"),
                blocks: vec![meter],
            },
        ];
        let device = &devices("x", &units[0])[0];
        assert_eq!(
            state(device, &units),
            Some(DeviceState::Inverter(InverterState {
                power: 452.1,
                grid_status: GridStatus::Exporting,
                grid_power: Some(-1200.0),
            }))
        );
        let alone = &units[..1];
        assert_eq!(
            state(device, alone),
            Some(DeviceState::Inverter(InverterState {
                power: 452.1,
                grid_status: GridStatus::Unknown,
                grid_power: None,
            }))
        );
        // W not implemented: no state at all this poll, never power 0.
        let dark = vec![Unit {
            unit: 1,
            common: common("INV"),
            blocks: vec![block(103, 50, &[(14, 0x8000), (15, 0)])],
        }];
        assert_eq!(state(device, &dark), None);
    }

    #[test]
    fn a_battery_model_gives_charge_rate_and_reserve_and_storage_what_it_has() {
        // 802: WHRtg 10000 (sf 0), SoC 655 (sf -1), SoCRsvMin 200, ChaSt 3, W 1500 (sf 0).
        let battery = block(
            802,
            62,
            &[
                (3, 10_000),
                (53, 0),
                (11, 655),
                (10, 200),
                (56, (-1i16) as u16),
                (16, 3),
                (47, 1500),
                (63, 0),
            ],
        );
        let units = vec![Unit {
            unit: 1,
            common: common("BAT"),
            blocks: vec![battery],
        }];
        let device = &devices("x", &units[0])[0];
        assert_eq!(device.device_id, "sunspec-BAT-battery");
        let Some(DeviceState::Battery(b)) = state(device, &units) else {
            panic!("no battery state")
        };
        assert_eq!(b.charge_percentage, 65.5);
        assert_eq!(b.charge, Some(6_550.0));
        assert_eq!(b.backup_reserve, Some(20.0));
        assert_eq!(b.charge_rate, Some(1_500.0));
        assert_eq!(b.charging_state, ChargingState::Discharging);
        assert_eq!(b.grid_power, None);

        // 124 only: ChaState 80 (sf 0), MinRsvPct not implemented, ChaSt testing.
        let storage = block(124, 24, &[(8, 80), (22, 0), (11, 7)]);
        let units = vec![Unit {
            unit: 1,
            common: common("HYB"),
            blocks: vec![block(103, 50, &[]), storage],
        }];
        let device = &devices("x", &units[0])[1];
        let Some(DeviceState::Battery(b)) = state(device, &units) else {
            panic!("no battery state")
        };
        assert_eq!(b.charge_percentage, 80.0);
        assert_eq!(b.backup_reserve, None);
        assert_eq!(b.charge, None);
        assert_eq!(b.charging_state, ChargingState::Unknown);
        assert_eq!(
            reserve_point(&units[0], |_, _| true).map(|(_, p)| p),
            Some("MinRsvPct")
        );
    }

    #[test]
    fn the_reserve_goes_to_802_unless_it_refuses_writes_then_to_124_if_there_is_one() {
        let mut unit = Unit {
            unit: 71,
            common: common("KOSTAL"),
            blocks: vec![block(802, 62, &[]), block(124, 24, &[])],
        };
        let all = |_: u16, _: &str| true;
        let kostal = |m: u16, p: &str| !(m == 802 && p == "SoCRsvMin");
        assert_eq!(
            reserve_point(&unit, all).map(|(b, p)| (b.header.id, p)),
            Some((802, "SoCRsvMin"))
        );
        assert_eq!(
            reserve_point(&unit, kostal).map(|(b, p)| (b.header.id, p)),
            Some((124, "MinRsvPct"))
        );
        unit.blocks.pop();
        assert_eq!(reserve_point(&unit, kostal).map(|(_, p)| p), None);
    }

    #[test]
    fn operating_modes_put_the_rates_in_force_last_and_reset_lifts_them_first() {
        let bits = |mode, grid| storage_mode(mode, grid).unwrap();
        // The last write puts the limits in force; every mode ends on StorCtl_Mod but reset.
        for (mode, grid, ctl) in [
            ("charge", false, DISCHARGE_LIMIT),
            ("charge", true, BOTH_LIMITS),
            ("discharge", false, CHARGE_LIMIT),
            ("discharge", true, BOTH_LIMITS),
            ("idle", false, BOTH_LIMITS),
            ("idle", true, BOTH_LIMITS),
        ] {
            assert_eq!(bits(mode, grid)[2], ("StorCtl_Mod", ctl), "{mode} {grid}");
        }
        assert_eq!(bits("reset", false)[0], ("StorCtl_Mod", 0.0));
        // A forced charge is a negative discharge rate, a forced discharge a negative charge
        // rate; without grid interaction neither is forced.
        assert!(bits("charge", true).contains(&("OutWRte", -100.0)));
        assert!(bits("discharge", true).contains(&("InWRte", -100.0)));
        assert!(bits("charge", false).contains(&("OutWRte", 0.0)));
        assert!(bits("discharge", false).contains(&("InWRte", 0.0)));
        assert_eq!(
            storage_mode("boost", false).unwrap_err(),
            "operatingMode \"boost\" has no storage control"
        );
    }
}
