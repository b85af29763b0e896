//! The SunSpec information models the agent reads and writes, and within each only the points
//! it uses: offsets, types, scale factors and units as the official model definitions give them
//! (the JSON files of github.com/sunspec/models, which pysunspec2 ships; `tests/sunspec.rs`
//! serves every point here from those definitions and checks what the agent reads). Offsets count from the model's first register, its
//! `ID`; the data starts at offset 2, after `ID` and `L`.
//!
//! Models of one family share a layout: 101, 102 and 103 (single, split and three phase) differ
//! only in which phase points are implemented, as do 111 to 113 and the meters 201 to 204 and
//! 211 to 214. So the tables below are per layout, and [`model`] maps each id onto one.

use super::points::PointType::{self, *};

/// One point of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PointDef {
    pub(crate) name: &'static str,
    pub(crate) offset: u16,
    pub(crate) ty: PointType,
    /// The name of the `sunssf` point that scales it, in the same model.
    pub(crate) sf: Option<&'static str>,
    pub(crate) unit: &'static str,
}

/// A model the agent knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ModelDef {
    pub(crate) id: u16,
    pub(crate) name: &'static str,
    /// `L` as the definition gives it. A device may declare another length (E3DC's irregular
    /// 803, a common model of 65 without its pad): the walk follows the declared one, and a
    /// point beyond the declared end is absent.
    pub(crate) length: u16,
    pub(crate) points: &'static [PointDef],
}

impl ModelDef {
    pub(crate) fn point(&self, name: &str) -> Option<&'static PointDef> {
        self.points.iter().find(|p| p.name == name)
    }
}

const fn p(
    name: &'static str,
    offset: u16,
    ty: PointType,
    sf: Option<&'static str>,
    unit: &'static str,
) -> PointDef {
    PointDef {
        name,
        offset,
        ty,
        sf,
        unit,
    }
}

const COMMON: &[PointDef] = &[
    p("Mn", 2, String(16), None, ""),
    p("Md", 18, String(16), None, ""),
    p("Opt", 34, String(8), None, ""),
    p("Vr", 42, String(8), None, ""),
    p("SN", 50, String(16), None, ""),
    p("DA", 66, Uint16, None, ""),
];

const INVERTER: &[PointDef] = &[
    p("A", 2, Uint16, Some("A_SF"), "A"),
    p("A_SF", 6, Sunssf, None, ""),
    p("PhVphA", 10, Uint16, Some("V_SF"), "V"),
    p("V_SF", 13, Sunssf, None, ""),
    p("W", 14, Int16, Some("W_SF"), "W"),
    p("W_SF", 15, Sunssf, None, ""),
    p("Hz", 16, Uint16, Some("Hz_SF"), "Hz"),
    p("Hz_SF", 17, Sunssf, None, ""),
    p("WH", 24, Acc32, Some("WH_SF"), "Wh"),
    p("WH_SF", 26, Sunssf, None, ""),
    p("DCW", 31, Int16, Some("DCW_SF"), "W"),
    p("DCW_SF", 32, Sunssf, None, ""),
    p("St", 38, Enum16, None, ""),
];

const INVERTER_FLOAT: &[PointDef] = &[
    p("A", 2, Float32, None, "A"),
    p("PhVphA", 16, Float32, None, "V"),
    p("W", 22, Float32, None, "W"),
    p("Hz", 24, Float32, None, "Hz"),
    p("WH", 32, Float32, None, "Wh"),
    p("DCW", 38, Float32, None, "W"),
    p("St", 48, Enum16, None, ""),
];

const NAMEPLATE: &[PointDef] = &[
    p("DERTyp", 2, Enum16, None, ""),
    p("WRtg", 3, Uint16, Some("WRtg_SF"), "W"),
    p("WRtg_SF", 4, Sunssf, None, ""),
];

const SETTINGS: &[PointDef] = &[
    p("WMax", 2, Uint16, Some("WMax_SF"), "W"),
    p("WMax_SF", 22, Sunssf, None, ""),
];

const STATUS: &[PointDef] = &[
    p("PVConn", 2, Bitfield16, None, ""),
    p("StorConn", 3, Bitfield16, None, ""),
];

const CONTROLS: &[PointDef] = &[
    p("WMaxLimPct", 5, Uint16, Some("WMaxLimPct_SF"), "%"),
    p("WMaxLimPct_WinTms", 6, Uint16, None, "s"),
    p("WMaxLimPct_RvrtTms", 7, Uint16, None, "s"),
    p("WMaxLim_Ena", 9, Enum16, None, ""),
    p("WMaxLimPct_SF", 23, Sunssf, None, ""),
];

const STORAGE: &[PointDef] = &[
    p("WChaMax", 2, Uint16, Some("WChaMax_SF"), "W"),
    p("StorCtl_Mod", 5, Bitfield16, None, ""),
    p("MinRsvPct", 7, Uint16, Some("MinRsvPct_SF"), "%"),
    p("ChaState", 8, Uint16, Some("ChaState_SF"), "%"),
    p("ChaSt", 11, Enum16, None, ""),
    p("OutWRte", 12, Int16, Some("InOutWRte_SF"), "%"),
    p("InWRte", 13, Int16, Some("InOutWRte_SF"), "%"),
    p("InOutWRte_RvrtTms", 15, Uint16, None, "s"),
    p("ChaGriSet", 17, Enum16, None, ""),
    p("WChaMax_SF", 18, Sunssf, None, ""),
    p("MinRsvPct_SF", 21, Sunssf, None, ""),
    p("ChaState_SF", 22, Sunssf, None, ""),
    p("InOutWRte_SF", 25, Sunssf, None, ""),
];

const METER: &[PointDef] = &[
    p("A", 2, Int16, Some("A_SF"), "A"),
    p("A_SF", 6, Sunssf, None, ""),
    p("PhV", 7, Int16, Some("V_SF"), "V"),
    p("V_SF", 15, Sunssf, None, ""),
    p("Hz", 16, Int16, Some("Hz_SF"), "Hz"),
    p("Hz_SF", 17, Sunssf, None, ""),
    p("W", 18, Int16, Some("W_SF"), "W"),
    p("W_SF", 22, Sunssf, None, ""),
    p("TotWhExp", 38, Acc32, Some("TotWh_SF"), "Wh"),
    p("TotWhImp", 46, Acc32, Some("TotWh_SF"), "Wh"),
    p("TotWh_SF", 54, Sunssf, None, ""),
];

const METER_FLOAT: &[PointDef] = &[
    p("A", 2, Float32, None, "A"),
    p("PhV", 10, Float32, None, "V"),
    p("Hz", 26, Float32, None, "Hz"),
    p("W", 28, Float32, None, "W"),
    p("TotWhExp", 60, Float32, None, "Wh"),
    p("TotWhImp", 68, Float32, None, "Wh"),
];

const BATTERY: &[PointDef] = &[
    p("WHRtg", 3, Uint16, Some("WHRtg_SF"), "Wh"),
    p("SoCMax", 7, Uint16, Some("SoC_SF"), "%"),
    p("SoCMin", 8, Uint16, Some("SoC_SF"), "%"),
    p("SocRsvMax", 9, Uint16, Some("SoC_SF"), "%"),
    p("SoCRsvMin", 10, Uint16, Some("SoC_SF"), "%"),
    p("SoC", 11, Uint16, Some("SoC_SF"), "%"),
    p("NCyc", 14, Uint32, None, ""),
    p("ChaSt", 16, Enum16, None, ""),
    p("Evt1", 26, Bitfield32, None, ""),
    p("W", 47, Int16, Some("W_SF"), "W"),
    p("WHRtg_SF", 53, Sunssf, None, ""),
    p("SoC_SF", 56, Sunssf, None, ""),
    p("W_SF", 63, Sunssf, None, ""),
];

/// Model 803's fixed part; its repeating string groups follow and are not read.
const LITHIUM_ION_BANK: &[PointDef] = &[p("NStr", 2, Uint16, None, "")];

const MODELS: &[ModelDef] = &[
    ModelDef {
        id: 1,
        name: "common",
        length: 66,
        points: COMMON,
    },
    ModelDef {
        id: 101,
        name: "inverter (single phase)",
        length: 50,
        points: INVERTER,
    },
    ModelDef {
        id: 102,
        name: "inverter (split phase)",
        length: 50,
        points: INVERTER,
    },
    ModelDef {
        id: 103,
        name: "inverter (three phase)",
        length: 50,
        points: INVERTER,
    },
    ModelDef {
        id: 111,
        name: "inverter (single phase, float)",
        length: 60,
        points: INVERTER_FLOAT,
    },
    ModelDef {
        id: 112,
        name: "inverter (split phase, float)",
        length: 60,
        points: INVERTER_FLOAT,
    },
    ModelDef {
        id: 113,
        name: "inverter (three phase, float)",
        length: 60,
        points: INVERTER_FLOAT,
    },
    ModelDef {
        id: 120,
        name: "nameplate",
        length: 26,
        points: NAMEPLATE,
    },
    ModelDef {
        id: 121,
        name: "basic settings",
        length: 30,
        points: SETTINGS,
    },
    ModelDef {
        id: 122,
        name: "status",
        length: 44,
        points: STATUS,
    },
    ModelDef {
        id: 123,
        name: "immediate controls",
        length: 24,
        points: CONTROLS,
    },
    ModelDef {
        id: 124,
        name: "storage",
        length: 24,
        points: STORAGE,
    },
    ModelDef {
        id: 201,
        name: "meter (single phase)",
        length: 105,
        points: METER,
    },
    ModelDef {
        id: 202,
        name: "meter (split phase)",
        length: 105,
        points: METER,
    },
    ModelDef {
        id: 203,
        name: "meter (three phase, wye)",
        length: 105,
        points: METER,
    },
    ModelDef {
        id: 204,
        name: "meter (three phase, delta)",
        length: 105,
        points: METER,
    },
    ModelDef {
        id: 211,
        name: "meter (single phase, float)",
        length: 124,
        points: METER_FLOAT,
    },
    ModelDef {
        id: 212,
        name: "meter (split phase, float)",
        length: 124,
        points: METER_FLOAT,
    },
    ModelDef {
        id: 213,
        name: "meter (three phase wye, float)",
        length: 124,
        points: METER_FLOAT,
    },
    ModelDef {
        id: 214,
        name: "meter (three phase delta, float)",
        length: 124,
        points: METER_FLOAT,
    },
    ModelDef {
        id: 802,
        name: "battery",
        length: 62,
        points: BATTERY,
    },
    ModelDef {
        id: 803,
        name: "lithium-ion battery bank",
        length: 26,
        points: LITHIUM_ION_BANK,
    },
];

/// The definition of model `id`, if the agent knows it.
pub(crate) fn model(id: u16) -> Option<&'static ModelDef> {
    MODELS.iter().find(|m| m.id == id)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tables are consistent on their own: no two points overlap, every point lies within
    /// the model's length, and every scale factor named exists as a `sunssf` point.
    #[test]
    fn every_table_is_consistent() {
        for m in MODELS {
            for p in m.points {
                assert!(p.offset >= 2, "{} {}: inside ID/L", m.id, p.name);
                assert!(
                    p.offset + p.ty.size() <= m.length + 2,
                    "{} {}: beyond L = {}",
                    m.id,
                    p.name,
                    m.length
                );
                if let Some(sf) = p.sf {
                    let sf = m
                        .point(sf)
                        .unwrap_or_else(|| panic!("{} {}: no {sf}", m.id, p.name));
                    assert_eq!(sf.ty, Sunssf, "{} {}", m.id, sf.name);
                }
                for q in m.points {
                    let overlap = p.name != q.name
                        && p.offset < q.offset + q.ty.size()
                        && q.offset < p.offset + p.ty.size();
                    assert!(!overlap, "{}: {} overlaps {}", m.id, p.name, q.name);
                }
            }
        }
    }
}
