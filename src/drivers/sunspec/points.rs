//! SunSpec point types and their decoding from Modbus registers: pure functions, no I/O. Only
//! the types of the points in [`super::models`] are here.
//!
//! Two rules decide what a gateway reports, and both are where field devices go wrong:
//! - **"Not implemented" is absent, never 0.** Every SunSpec type reserves one value (0xFFFF for
//!   `uint16`, 0x8000 for `int16` and `sunssf`, NaN for `float32`, 0 for accumulators, ...) that
//!   a device stores for a point it does not have. [`decode`] returns `None` for it, so a missing
//!   reading can never reach telemetry as a real 0 W.
//! - **Scale factors are signed powers of ten.** A value is `raw × 10^sf`, with `sf` from its own
//!   `sunssf` register (-10 to 10). An `sf` that is not implemented or out of range makes every
//!   value it scales absent ([`scaled`]).

/// A point's SunSpec type, as the model definitions name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PointType {
    Uint16,
    Int16,
    Uint32,
    Acc32,
    Enum16,
    Bitfield16,
    Bitfield32,
    Float32,
    Sunssf,
    /// A string of this many registers (two bytes each, NUL-padded).
    String(u16),
}

impl PointType {
    /// How many registers the point takes.
    pub(crate) fn size(self) -> u16 {
        match self {
            PointType::Uint16
            | PointType::Int16
            | PointType::Enum16
            | PointType::Bitfield16
            | PointType::Sunssf => 1,
            PointType::Uint32 | PointType::Acc32 | PointType::Bitfield32 | PointType::Float32 => 2,
            PointType::String(n) => n,
        }
    }
}

/// A decoded point: a number (an integer type's value, exact in an f64, or a float), or text.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Number(f64),
    Text(String),
}

impl Value {
    pub(crate) fn number(&self) -> Option<f64> {
        match self {
            Value::Number(n) => Some(*n),
            Value::Text(_) => None,
        }
    }
}

/// The point of type `ty` stored in `regs` (exactly [`PointType::size`] registers, big-endian
/// words, high word first); `None` for SunSpec's "not implemented" value, for a non-finite
/// float, for a string that is empty or not UTF-8, and for too few registers.
pub(crate) fn decode(ty: PointType, regs: &[u16]) -> Option<Value> {
    let regs = regs.get(..usize::from(ty.size()))?;
    let u32_of = |r: &[u16]| (u32::from(r[0]) << 16) | u32::from(r[1]);
    let n = |x: f64| Some(Value::Number(x));
    match ty {
        PointType::Uint16 | PointType::Enum16 | PointType::Bitfield16 => match regs[0] {
            0xFFFF => None,
            v => n(f64::from(v)),
        },
        PointType::Int16 => match regs[0] as i16 {
            i16::MIN => None,
            v => n(f64::from(v)),
        },
        PointType::Sunssf => match regs[0] as i16 {
            v @ -10..=10 => n(f64::from(v)),
            // 0x8000 is "not implemented"; anything else beyond ±10 is not a scale factor.
            _ => None,
        },
        PointType::Uint32 | PointType::Bitfield32 => match u32_of(regs) {
            0xFFFF_FFFF => None,
            v => n(f64::from(v)),
        },
        PointType::Acc32 => match u32_of(regs) {
            0 => None,
            v => n(f64::from(v)),
        },
        PointType::Float32 => {
            let v = f32::from_bits(u32_of(regs));
            v.is_finite().then(|| Value::Number(f64::from(v)))
        }
        PointType::String(_) => {
            let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_be_bytes()).collect();
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            let text = std::str::from_utf8(&bytes[..end]).ok()?.trim();
            (!text.is_empty()).then(|| Value::Text(text.to_owned()))
        }
    }
}

/// `raw × 10^sf`, or `None` when either is absent. A negative `sf` divides by `10^-sf` (exact
/// powers of ten up to 10^22), so the result is the double nearest the true value: 4521 with
/// `sf` -1 is 452.1, where multiplying by 0.1 would give 452.09999999999997.
pub(crate) fn scaled(raw: Option<f64>, sf: Option<f64>) -> Option<f64> {
    let (raw, sf) = (raw?, sf?);
    if !(-10.0..=10.0).contains(&sf) {
        return None;
    }
    let sf = sf as i32;
    let value = if sf < 0 {
        raw / 10f64.powi(-sf)
    } else {
        raw * 10f64.powi(sf)
    };
    value.is_finite().then_some(value)
}

/// The registers that store `value` in a point of type `ty` scaled by `sf` (for a write);
/// `None` when it does not fit: out of the type's range once scaled, the "not implemented"
/// value itself, or a type the agent never writes.
pub(crate) fn encode(ty: PointType, value: f64, sf: Option<f64>) -> Option<Vec<u16>> {
    let sf = sf.unwrap_or(0.0);
    if !value.is_finite() || !(-10.0..=10.0).contains(&sf) {
        return None;
    }
    let sf = sf as i32;
    let raw = if sf < 0 {
        value * 10f64.powi(-sf)
    } else {
        value / 10f64.powi(sf)
    }
    .round();
    match ty {
        PointType::Uint16 | PointType::Enum16 | PointType::Bitfield16
            if (0.0..65_535.0).contains(&raw) =>
        {
            Some(vec![raw as u16])
        }
        PointType::Int16 if (-32_767.0..=32_767.0).contains(&raw) => Some(vec![raw as i16 as u16]),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(ty: PointType, regs: &[u16]) -> Option<f64> {
        decode(ty, regs).and_then(|v| v.number())
    }

    #[test]
    fn not_implemented_values_are_absent_never_zero() {
        assert_eq!(num(PointType::Uint16, &[0xFFFF]), None);
        assert_eq!(num(PointType::Enum16, &[0xFFFF]), None);
        assert_eq!(num(PointType::Int16, &[0x8000]), None);
        assert_eq!(num(PointType::Sunssf, &[0x8000]), None);
        assert_eq!(num(PointType::Uint32, &[0xFFFF, 0xFFFF]), None);
        assert_eq!(num(PointType::Bitfield32, &[0xFFFF, 0xFFFF]), None);
        assert_eq!(num(PointType::Acc32, &[0, 0]), None);
        assert_eq!(num(PointType::Float32, &[0x7FC0, 0x0000]), None, "NaN");
        assert_eq!(num(PointType::Float32, &[0x7F80, 0x0000]), None, "+inf");
        assert_eq!(decode(PointType::String(4), &[0, 0, 0, 0]), None);
        // And real zeros are zeros.
        assert_eq!(num(PointType::Uint16, &[0]), Some(0.0));
        assert_eq!(num(PointType::Int16, &[0]), Some(0.0));
        assert_eq!(num(PointType::Float32, &[0, 0]), Some(0.0));
    }

    #[test]
    fn values_decode_big_endian_high_word_first() {
        assert_eq!(num(PointType::Int16, &[0xFFFE]), Some(-2.0));
        assert_eq!(num(PointType::Uint32, &[0x0001, 0x0002]), Some(65_538.0));
        assert_eq!(
            num(PointType::Bitfield32, &[0x8000, 0x0001]),
            Some(2_147_483_649.0)
        );
        assert_eq!(num(PointType::Acc32, &[0x0001, 0x0000]), Some(65_536.0));
        // 452.5 as an IEEE 754 single.
        assert_eq!(num(PointType::Float32, &[0x43E2, 0x4000]), Some(452.5));
        let text = [u16::from_be_bytes(*b"Te"), u16::from_be_bytes(*b"xt"), 0, 0];
        assert_eq!(
            decode(PointType::String(4), &text),
            Some(Value::Text("Text".into()))
        );
        assert_eq!(decode(PointType::Uint32, &[1]), None, "too few registers");
    }

    #[test]
    fn scale_factors_apply_with_both_signs_and_an_absent_one_makes_the_value_absent() {
        assert_eq!(scaled(Some(4521.0), Some(-1.0)), Some(452.1));
        assert_eq!(scaled(Some(123.0), Some(-2.0)), Some(1.23));
        assert_eq!(scaled(Some(52.0), Some(2.0)), Some(5_200.0));
        assert_eq!(scaled(Some(-7.0), Some(0.0)), Some(-7.0));
        assert_eq!(scaled(Some(10.0), None), None);
        assert_eq!(scaled(None, Some(1.0)), None);
        assert_eq!(num(PointType::Sunssf, &[11]), None, "beyond ±10");
        assert_eq!(num(PointType::Sunssf, &[(-3i16) as u16]), Some(-3.0));
    }

    #[test]
    fn encode_is_the_inverse_of_decode_and_refuses_what_does_not_fit() {
        let regs = encode(PointType::Uint16, 45.5, Some(-1.0)).unwrap();
        assert_eq!(regs, vec![455]);
        assert_eq!(
            scaled(num(PointType::Uint16, &regs), Some(-1.0)),
            Some(45.5)
        );
        assert_eq!(encode(PointType::Uint16, 300.0, Some(2.0)), Some(vec![3]));
        assert_eq!(
            encode(PointType::Int16, -12.0, None),
            Some(vec![(-12i16) as u16])
        );
        assert_eq!(
            encode(PointType::Uint16, 6_553.5, Some(-1.0)),
            None,
            "0xFFFF is NI"
        );
        assert_eq!(encode(PointType::Uint16, -1.0, None), None);
        assert_eq!(encode(PointType::Float32, 1.0, None), None, "never written");
    }

    /// Arbitrary register contents, as a broken or hostile device may hold them: decoding never
    /// panics, and every value lies within its type's range, with the reserved values excluded
    /// (a violation shows as the failing type and registers).
    #[test]
    fn arbitrary_registers_decode_within_their_types_range() {
        let types = [
            (PointType::Uint16, 0.0, 65_534.0),
            (PointType::Int16, -32_767.0, 32_767.0),
            (PointType::Uint32, 0.0, 4_294_967_294.0),
            (PointType::Bitfield32, 0.0, 4_294_967_294.0),
            (PointType::Acc32, 1.0, 4_294_967_295.0),
            (PointType::Enum16, 0.0, 65_534.0),
            (PointType::Sunssf, -10.0, 10.0),
            (PointType::Float32, f64::from(f32::MIN), f64::from(f32::MAX)),
        ];
        let mut rng = fastrand::Rng::with_seed(21);
        for _ in 0..100_000 {
            // Bias towards the edges, where the reserved values are.
            let mut reg = || match rng.u8(0..4) {
                0 => [0, 0x7FFF, 0x8000, 0xFFFF][rng.usize(0..4)],
                _ => rng.u16(..),
            };
            let regs = [reg(), reg(), reg(), reg()];
            for (ty, lo, hi) in types {
                if let Some(v) = num(ty, &regs) {
                    assert!(v >= lo && v <= hi, "{ty:?} {regs:04x?} -> {v}");
                    let sf = f64::from(rng.i8(-12..=12));
                    if let Some(s) = scaled(Some(v), Some(sf)) {
                        assert!(s.is_finite(), "{ty:?} {regs:04x?} sf {sf} -> {s}");
                    }
                }
            }
            let _ = decode(PointType::String(4), &regs);
        }
    }
}
