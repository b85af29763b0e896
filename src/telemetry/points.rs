//! Points as the outbox stores them and batches as the platform receives them
//! (docs/PROTOCOL.md 14.1).
//!
//! A point is stored without its sequence number (the outbox record carries it) and the number
//! is spliced in when a batch is built, so a re-sent point is byte for byte the point first sent
//! and no point is parsed again on the hot path.

use serde::Serialize;
use serde_json::ser::{CompactFormatter, Formatter};

use crate::model::device as model;
use crate::telemetry::outbox::Record;

/// A point as stored in the outbox (the sequence number is the record's, added when sending).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StoredPoint<'a, T: Serialize> {
    /// Unix milliseconds.
    pub(crate) ts: u64,
    pub(crate) device_id: &'a str,
    #[serde(flatten)]
    pub(crate) body: T,
}

#[derive(Debug, Serialize)]
struct StateBody<'a> {
    state: &'a model::DeviceState,
}

#[derive(Debug, Serialize)]
pub(crate) struct HealthBody<'a> {
    pub(crate) health: &'a model::GatewayHealth,
}

/// Numbers rounded to the nearest thousandth of their unit (PROTOCOL 14.4), so that a driver's
/// arithmetic (`662.8000000000001` from a scale factor or a sum) costs no bytes on the wire. A
/// thousandth of a W, Wh, V, A, % or degree is far below what any meter here resolves.
struct Thousandths;

/// `x` rounded to the nearest thousandth of its unit: the rule of PROTOCOL 14.4, for writing
/// points and for report by exception's comparisons alike. Beyond 2^53 / 1000 the product is no
/// longer exact; such values are whole anyway.
pub(crate) fn thousandths(x: f64) -> f64 {
    if x.abs() < 1e12 {
        (x * 1000.0).round() / 1000.0
    } else {
        x
    }
}

impl Formatter for Thousandths {
    fn write_f64<W: ?Sized + std::io::Write>(
        &mut self,
        out: &mut W,
        value: f64,
    ) -> std::io::Result<()> {
        let rounded = thousandths(value);
        // -0.0004 rounds to -0.0, which says nothing 0.0 does not.
        let rounded = if rounded == 0.0 { 0.0 } else { rounded };
        CompactFormatter.write_f64(out, rounded)
    }
}

/// Serialises `point` compactly, with [`Thousandths`], onto `out`.
fn write_point(point: &impl Serialize, out: &mut Vec<u8>) {
    let mut serializer = serde_json::Serializer::with_formatter(out, Thousandths);
    point.serialize(&mut serializer).expect("points serialise");
}

/// Appends a device state point as the outbox stores it (`{"ts":…,"deviceId":…,"state":…}`,
/// without its sequence number) to `out`.
pub fn encode_state(ts: u64, device_id: &str, state: &model::DeviceState, out: &mut Vec<u8>) {
    let point = StoredPoint {
        ts,
        device_id,
        body: StateBody { state },
    };
    write_point(&point, out);
}

/// A gateway health point as the outbox stores it.
pub(crate) fn encode_health(ts: u64, gateway_id: &str, health: &model::GatewayHealth) -> Vec<u8> {
    let point = StoredPoint {
        ts,
        device_id: gateway_id,
        body: HealthBody { health },
    };
    let mut out = Vec::with_capacity(256);
    write_point(&point, &mut out);
    out
}

#[derive(Debug, Serialize)]
struct SafetyBody<'a> {
    safety: &'a crate::model::safety::SafetyEvent,
}

/// A safety event point as the outbox stores it (`{"ts":…,"deviceId":…,"safety":…}`).
pub(crate) fn encode_safety(ts: u64, point: &crate::model::safety::SafetyPoint) -> Vec<u8> {
    let point = StoredPoint {
        ts,
        device_id: &point.device_id,
        body: SafetyBody {
            safety: &point.event,
        },
    };
    let mut out = Vec::with_capacity(256);
    write_point(&point, &mut out);
    out
}

#[derive(Debug, Serialize)]
struct AvailabilityBody<'a> {
    availability: &'a crate::drivers::Availability,
}

/// An availability point as the outbox stores it (`{"ts":…,"deviceId":…,"availability":…}`).
pub(crate) fn encode_availability(ts: u64, change: &crate::drivers::Availability) -> Vec<u8> {
    let point = StoredPoint {
        ts,
        device_id: &change.device_id,
        body: AvailabilityBody {
            availability: change,
        },
    };
    let mut out = Vec::with_capacity(256);
    write_point(&point, &mut out);
    out
}

/// `{"gatewayId": "...", "epoch": E, "points": [{"seq": N, ...stored point...}, ...]}`.
///
/// Stored points are JSON objects; the sequence number is spliced in front rather than parsing
/// and re-serialising every point on the hot path. `records` are of one epoch, as every outbox
/// read is: the batch states it once.
pub fn batch_message(gateway_id: &str, records: &[Record]) -> Vec<u8> {
    let epoch = batch_epoch(records);
    let size: usize = records.iter().map(|r| r.payload.len() + 24).sum();
    let mut out = Vec::with_capacity(size + 64);
    out.extend_from_slice(b"{\"gatewayId\":");
    out.extend_from_slice(&serde_json::to_vec(gateway_id).expect("string serialises"));
    let _ = std::io::Write::write_fmt(&mut out, format_args!(",\"epoch\":{epoch}"));
    out.extend_from_slice(b",\"points\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // `write!` into the Vec itself: no temporary String per point.
        let _ = std::io::Write::write_fmt(&mut out, format_args!("{{\"seq\":{},", r.seq));
        out.extend_from_slice(&r.payload[1..]);
    }
    out.extend_from_slice(b"]}");
    out
}

/// The one epoch of a batch's `records` (0 for none).
pub(crate) fn batch_epoch(records: &[Record]) -> u64 {
    let epoch = records.first().map_or(0, |r| r.epoch);
    debug_assert!(
        records.iter().all(|r| r.epoch == epoch),
        "a batch mixes epochs"
    );
    epoch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_rounded_to_thousandths_and_whole_numbers_keep_their_form() {
        let state: model::DeviceState = serde_json::from_str(
            r#"{"type":"inverter","power":662.8000000000001,"gridStatus":"idle","gridPower":-0.00049}"#,
        )
        .unwrap();
        let mut out = Vec::new();
        encode_state(5, "pv-1", &state, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"ts":5,"deviceId":"pv-1","state":{"type":"inverter","power":662.8,"gridStatus":"idle","gridPower":0.0}}"#
        );
        let mut big = Vec::new();
        let state: model::DeviceState = serde_json::from_str(
            r#"{"type":"inverter","power":12345678901234.5,"gridStatus":"idle"}"#,
        )
        .unwrap();
        encode_state(5, "pv-1", &state, &mut big);
        assert!(std::str::from_utf8(&big)
            .unwrap()
            .contains("12345678901234.5"));
    }

    #[test]
    fn batch_message_is_valid_json_with_sequence_numbers() {
        let records = vec![
            Record {
                epoch: 4,
                seq: 7,
                payload: br#"{"ts":1,"deviceId":"bat-1","state":{"type":"battery"}}"#.to_vec(),
            },
            Record {
                epoch: 4,
                seq: 8,
                payload: br#"{"ts":2,"deviceId":"gw","health":{}}"#.to_vec(),
            },
        ];
        let v: serde_json::Value =
            serde_json::from_slice(&batch_message("gw\"1", &records)).unwrap();
        assert_eq!(v["gatewayId"], "gw\"1");
        assert_eq!(v["epoch"], 4);
        assert_eq!(v["points"][0]["seq"], 7);
        assert_eq!(v["points"][0]["deviceId"], "bat-1");
        assert_eq!(v["points"][1]["seq"], 8);
    }
}
