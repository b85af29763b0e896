//! The compact batch encoding (docs/PROTOCOL.md 14.9): the same points as the JSON batch of
//! 14.1, in columns of deltas, optionally DEFLATE-compressed.
//!
//! Why columns: a device's successive states share their shape and most of their values, and
//! differ by small amounts in the rest. Grouping a batch's points into *series* (one device,
//! one point kind, one shape) and writing each member as a column of deltas turns a battery's
//! 300-byte JSON point into a few bytes, and puts the structure in one place and the noise in
//! another, which is what DEFLATE compresses best. Nothing here knows the device model: any
//! JSON object a point carries (states, health, safety, availability) is flattened into
//! members, so a new member or point kind needs no new code on either side.
//!
//! The encoder reads the points as the outbox stores them (JSON) and runs once per batch on
//! the send path; [`decode`] is the platform's side, for the simulator, the tests and the
//! benches, and answers a JSON batch (14.1) as well, so a platform has one entry point.

use std::borrow::Cow;

use serde_json::{Map, Number, Value};

use crate::telemetry::outbox::Record;
use scan::{Event, Leaf};

mod scan;

/// First byte of a compact batch whose body follows as is.
pub(crate) const PLAIN: u8 = 0x03;
/// First byte of a compact batch whose body follows as raw DEFLATE (RFC 1951).
pub(crate) const DEFLATED: u8 = 0x04;
/// [`PLAIN`] and [`DEFLATED`] of a gateway from before epochs (PROTOCOL 14.3): the same body
/// without its epoch. Still decoded, so a platform takes batches from gateways not yet updated.
const PLAIN_V1: u8 = 0x01;
const DEFLATED_V1: u8 = 0x02;
/// First byte of a DEFLATE-compressed JSON capabilities message (PROTOCOL 13).
const DEFLATED_JSON: u8 = 0x02;
/// The largest body a decoder inflates: far above any batch (14.2), so a hostile payload
/// cannot make it allocate without bound.
const MAX_BODY: usize = 16 << 20;
/// The most points a decoder takes from one batch: far above the 1000 a gateway sends (14.2),
/// so that a small DEFLATE bomb of empty points cannot make it build millions of objects.
const MAX_POINTS: usize = 65_536;
/// The smallest body worth compressing (PROTOCOL 14.9).
const MIN_DEFLATE: usize = 256;
/// DEFLATE level: 6 is zlib's default; higher levels gain under 1 % here at twice the CPU.
const LEVEL: u8 = 6;

/// How a member's column is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Kind {
    /// A JSON number with a fraction: thousandths, as zigzag deltas.
    Thousandths = 0,
    /// A JSON integer: zigzag deltas.
    Integer = 1,
    Boolean = 2,
    String = 3,
    /// Anything else (arrays, `null`, empty objects, numbers out of range): its compact JSON
    /// text.
    Json = 4,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Thousandths,
            1 => Kind::Integer,
            2 => Kind::Boolean,
            3 => Kind::String,
            4 => Kind::Json,
            _ => return None,
        })
    }
}

/// One member's value, as its column holds it; text borrowed from the record.
#[derive(Debug, Clone, PartialEq)]
enum Cell<'a> {
    Int(i64),
    Bool(bool),
    Text(Cow<'a, str>),
}

/// A member: its path of object member names from the point's body, and its kind.
type Member<'a> = (Vec<Cow<'a, str>>, Kind);

/// Points of one device, one kind and one shape, in `seq` order.
#[derive(Debug)]
struct Series<'a> {
    device_id: Cow<'a, str>,
    kind: Cow<'a, str>,
    /// The first point's events: the series' shape.
    shape: Vec<Event<'a>>,
    members: Vec<Member<'a>>,
    seqs: Vec<u64>,
    ts: Vec<u64>,
    /// `columns[m][i]`: member `m` of the series' point `i`.
    columns: Vec<Vec<Cell<'a>>>,
}

/// Why a stored point cannot be put in columns (it is then sent as JSON, 14.9).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct NotAPoint(&'static str);

/// The compact batch of `records`, `deflate`d when that makes it smaller.
///
/// Each stored point is read as a list of events that borrow from the record ([`scan`]), and
/// joins the series whose shape its events match: nothing is allocated per member, and per
/// point only when a new series starts.
pub(crate) fn encode(
    gateway_id: &str,
    records: &[Record],
    deflate: bool,
) -> Result<Vec<u8>, NotAPoint> {
    let mut series: Vec<Series<'_>> = Vec::new();
    let mut events = Vec::new();
    for record in records {
        let point = scan::point(&record.payload, &mut events).map_err(NotAPoint)?;
        let at = series.iter().position(|s| {
            s.device_id == point.device_id && s.kind == point.kind && same_shape(&s.shape, &events)
        });
        let s = match at {
            Some(at) => &mut series[at],
            None => {
                let members = members_of(&events);
                series.push(Series {
                    device_id: point.device_id,
                    kind: point.kind,
                    shape: events.clone(),
                    columns: vec![Vec::new(); members.len()],
                    members,
                    seqs: Vec::new(),
                    ts: Vec::new(),
                });
                series.last_mut().expect("just pushed")
            }
        };
        s.seqs.push(record.seq);
        s.ts.push(point.ts);
        let leaves = events.drain(..).filter_map(|e| match e {
            Event::Leaf(_, leaf) => Some(leaf),
            _ => None,
        });
        for (column, leaf) in s.columns.iter_mut().zip(leaves) {
            column.push(cell_of(leaf));
        }
    }
    let mut body = Vec::with_capacity(64 + records.len() * 16);
    put_str(&mut body, gateway_id);
    put_uvarint(&mut body, crate::telemetry::points::batch_epoch(records));
    put_uvarint(&mut body, series.len() as u64);
    for s in &series {
        put_series(&mut body, s);
    }
    // DEFLATE's set-up (160 KB of tables to clear) costs more than it saves on a body of a
    // point or two, the batch of a 1 s batching.
    if deflate && body.len() >= MIN_DEFLATE {
        let packed = miniz_oxide::deflate::compress_to_vec(&body, LEVEL);
        if packed.len() < body.len() {
            let mut out = Vec::with_capacity(1 + packed.len());
            out.push(DEFLATED);
            out.extend_from_slice(&packed);
            return Ok(out);
        }
    }
    let mut out = Vec::with_capacity(1 + body.len());
    out.push(PLAIN);
    out.extend_from_slice(&body);
    Ok(out)
}

/// Whether two points' events have the same members of the same kinds, in the same order.
fn same_shape(a: &[Event<'_>], b: &[Event<'_>]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|pair| match pair {
            (Event::Open(x), Event::Open(y)) => x == y,
            (Event::Close, Event::Close) => true,
            (Event::Leaf(x, l), Event::Leaf(y, m)) => x == y && kind_of(l) == kind_of(m),
            _ => false,
        })
}

/// The members (leaf paths and kinds) that `events` describe, in order.
fn members_of<'a>(events: &[Event<'a>]) -> Vec<Member<'a>> {
    let mut path: Vec<Cow<'a, str>> = Vec::new();
    let mut members = Vec::new();
    for event in events {
        match event {
            Event::Open(name) => path.push(name.clone()),
            Event::Close => {
                path.pop();
            }
            Event::Leaf(name, leaf) => {
                let mut full = path.clone();
                full.push(name.clone());
                members.push((full, kind_of(leaf)));
            }
        }
    }
    members
}

fn kind_of(leaf: &Leaf<'_>) -> Kind {
    match leaf {
        Leaf::Bool(_) => Kind::Boolean,
        Leaf::Str(_) => Kind::String,
        Leaf::Fraction(_) => Kind::Thousandths,
        Leaf::Int(_) => Kind::Integer,
        Leaf::Raw(_) => Kind::Json,
    }
}

fn cell_of(leaf: Leaf<'_>) -> Cell<'_> {
    match leaf {
        Leaf::Bool(b) => Cell::Bool(b),
        Leaf::Str(s) => Cell::Text(s),
        // Exact: below 10^12 the product is an integer well within f64's 2^53.
        Leaf::Fraction(x) => Cell::Int((x * 1000.0).round() as i64),
        Leaf::Int(i) => Cell::Int(i),
        Leaf::Raw(text) => Cell::Text(Cow::Borrowed(text)),
    }
}

fn put_series(out: &mut Vec<u8>, s: &Series<'_>) {
    put_str(out, &s.device_id);
    put_str(out, &s.kind);
    put_uvarint(out, s.seqs.len() as u64);
    put_uvarint(out, s.members.len() as u64);
    for (path, kind) in &s.members {
        put_uvarint(out, path.len() as u64);
        for name in path {
            put_str(out, name);
        }
        out.push(*kind as u8);
    }
    put_uvarint(out, s.seqs[0]);
    // The outbox hands records over in increasing seq order.
    debug_assert!(s.seqs.windows(2).all(|w| w[0] < w[1]));
    for w in s.seqs.windows(2) {
        put_uvarint(out, w[1] - w[0]);
    }
    put_uvarint(out, s.ts[0]);
    for w in s.ts.windows(2) {
        put_svarint(out, w[1].wrapping_sub(w[0]) as i64);
    }
    for (column, (_, kind)) in s.columns.iter().zip(&s.members) {
        put_column(out, column, *kind);
    }
}

/// One member's cells. Numbers: zigzag deltas from the previous cell (the first from 0); a
/// fraction column starts with its decimals `d` (0 to 3), the most its cells need, and holds
/// the numbers times 10^d, so 0.1-resolution meters cost tenths, not thousandths. Text: 0
/// for "same as the cell before", else its length + 1 and its bytes.
fn put_column(out: &mut Vec<u8>, column: &[Cell<'_>], kind: Kind) {
    let mut step = 1;
    if kind == Kind::Thousandths {
        let decimals = (0..=3u32)
            .find(|d| {
                let unit = 10i64.pow(3 - d);
                column
                    .iter()
                    .all(|c| matches!(c, Cell::Int(x) if x % unit == 0))
            })
            .unwrap_or(3);
        out.push(decimals as u8);
        step = 10i64.pow(3 - decimals);
    }
    let mut previous_number = 0i64;
    let mut previous_text: Option<&str> = None;
    for cell in column {
        match cell {
            Cell::Int(x) => {
                let x = x / step;
                put_svarint(out, x.wrapping_sub(previous_number));
                previous_number = x;
            }
            Cell::Bool(b) => out.push(u8::from(*b)),
            Cell::Text(t) => {
                if previous_text == Some(t.as_ref()) {
                    out.push(0);
                } else {
                    put_uvarint(out, t.len() as u64 + 1);
                    out.extend_from_slice(t.as_bytes());
                }
                previous_text = Some(t);
            }
        }
    }
}

fn put_uvarint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8 & 0x7f) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn put_svarint(out: &mut Vec<u8>, x: i64) {
    put_uvarint(out, ((x << 1) ^ (x >> 63)) as u64);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_uvarint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

/// `json` as the capabilities message goes out from a compact gateway (PROTOCOL 13): raw
/// DEFLATE behind the byte [`DEFLATED_JSON`]. The message is mostly the commands' input schemas,
/// the same text over and over, which DEFLATE shrinks about fourfold; it goes out on every
/// connection, so on a metered link it is most of a reconnect's cost.
pub(crate) fn deflate_json(json: &[u8]) -> Vec<u8> {
    let packed = miniz_oxide::deflate::compress_to_vec(json, LEVEL);
    let mut out = Vec::with_capacity(1 + packed.len());
    out.push(DEFLATED_JSON);
    out.extend_from_slice(&packed);
    out
}

/// A capabilities message in either form (PROTOCOL 13): JSON, or [`deflate_json`]'s.
pub fn decode_capabilities(payload: &[u8]) -> Result<Value, DecodeError> {
    let json = match payload.first() {
        Some(b'{') => Cow::Borrowed(payload),
        Some(&DEFLATED_JSON) => Cow::Owned(
            miniz_oxide::inflate::decompress_to_vec_with_limit(&payload[1..], MAX_BODY)
                .map_err(|e| bad(format!("DEFLATE body: {e:?}")))?,
        ),
        Some(other) => return Err(bad(format!("unknown encoding byte 0x{other:02x}"))),
        None => return Err(bad("empty payload")),
    };
    serde_json::from_slice(&json).map_err(|e| bad(format!("JSON: {e}")))
}

/// Why a batch cannot be decoded, naming the first thing wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("telemetry batch: {0}")]
pub struct DecodeError(String);

fn bad(what: impl Into<String>) -> DecodeError {
    DecodeError(what.into())
}

/// A telemetry batch in any encoding, as the JSON batch of 14.1 (`{"gatewayId", "points"}`,
/// points in `seq` order): what a platform does with every message on a `telemetry` topic.
///
/// A batch from a gateway before epochs (JSON without `epoch`, compact `0x01` or `0x02`)
/// decodes without an `epoch` member, which a platform reads as epoch 0.
pub fn decode(payload: &[u8]) -> Result<Value, DecodeError> {
    let first = payload.first().copied();
    let body = match first {
        Some(b'{') => {
            return serde_json::from_slice(payload).map_err(|e| bad(format!("JSON: {e}")));
        }
        Some(PLAIN | PLAIN_V1) => Cow::Borrowed(&payload[1..]),
        Some(DEFLATED | DEFLATED_V1) => Cow::Owned(
            miniz_oxide::inflate::decompress_to_vec_with_limit(&payload[1..], MAX_BODY)
                .map_err(|e| bad(format!("DEFLATE body: {e:?}")))?,
        ),
        Some(other) => return Err(bad(format!("unknown encoding byte 0x{other:02x}"))),
        None => return Err(bad("empty payload")),
    };
    let mut r = Reader {
        bytes: &body,
        at: 0,
    };
    let gateway_id = r.string("gatewayId")?;
    let epoch = match first {
        Some(PLAIN | DEFLATED) => Some(r.uvarint("epoch")?),
        _ => None,
    };
    let series = r.count("series count")?;
    if series == 0 {
        return Err(bad("no series: a batch has at least one point"));
    }
    let mut points = Vec::new();
    for _ in 0..series {
        r.series(&mut points)?;
    }
    if r.at != body.len() {
        return Err(bad(format!(
            "{} bytes after the last series",
            body.len() - r.at
        )));
    }
    points.sort_by_key(|p: &Value| p["seq"].as_u64());
    if let Some(w) = points.windows(2).find(|w| w[0]["seq"] == w[1]["seq"]) {
        return Err(bad(format!("seq {} is in two series", w[0]["seq"])));
    }
    let mut batch = Map::new();
    batch.insert("gatewayId".into(), gateway_id.into());
    if let Some(epoch) = epoch {
        batch.insert("epoch".into(), epoch.into());
    }
    batch.insert("points".into(), points.into());
    Ok(Value::Object(batch))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self, what: &str) -> Result<u8, DecodeError> {
        let b = *self
            .bytes
            .get(self.at)
            .ok_or_else(|| bad(format!("ends inside {what} at byte {}", self.at)))?;
        self.at += 1;
        Ok(b)
    }

    fn uvarint(&mut self, what: &str) -> Result<u64, DecodeError> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte(what)?;
            // The tenth byte holds bit 63 only.
            if shift == 63 && b > 1 {
                return Err(bad(format!("{what}: varint beyond 64 bits")));
            }
            x |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(x);
            }
        }
        Err(bad(format!("{what}: varint longer than 10 bytes")))
    }

    fn svarint(&mut self, what: &str) -> Result<i64, DecodeError> {
        let z = self.uvarint(what)?;
        Ok((z >> 1) as i64 ^ -((z & 1) as i64))
    }

    /// A count of things that each take at least a byte: never more than the bytes left.
    fn count(&mut self, what: &str) -> Result<usize, DecodeError> {
        let n = self.uvarint(what)?;
        if n > (self.bytes.len() - self.at) as u64 {
            return Err(bad(format!("{what} {n} exceeds the bytes left")));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let len = self.count(what)?;
        let text = std::str::from_utf8(&self.bytes[self.at..self.at + len])
            .map_err(|_| bad(format!("{what}: not UTF-8")))?;
        self.at += len;
        Ok(text.to_owned())
    }

    /// A text cell: 0 repeats the cell before, else length + 1 and the bytes.
    fn text(&mut self, previous: &mut Option<String>) -> Result<String, DecodeError> {
        let tag = self.uvarint("text length")?;
        if tag == 0 {
            return previous
                .clone()
                .ok_or_else(|| bad("the first cell of a column repeats the one before"));
        }
        let len = usize::try_from(tag - 1)
            .ok()
            .filter(|len| *len <= self.bytes.len() - self.at)
            .ok_or_else(|| bad(format!("text length {} exceeds the bytes left", tag - 1)))?;
        let text = std::str::from_utf8(&self.bytes[self.at..self.at + len])
            .map_err(|_| bad("text: not UTF-8"))?
            .to_owned();
        self.at += len;
        *previous = Some(text.clone());
        Ok(text)
    }

    fn series(&mut self, points: &mut Vec<Value>) -> Result<(), DecodeError> {
        let device_id = self.string("deviceId")?;
        let kind = self.string("point kind")?;
        if ["seq", "ts", "deviceId"].contains(&kind.as_str()) {
            return Err(bad(format!(
                "point kind {kind:?} is a member of every point"
            )));
        }
        let n = self.count("point count")?;
        if n == 0 {
            return Err(bad(format!("series of {device_id} has no points")));
        }
        if points.len() + n > MAX_POINTS {
            return Err(bad(format!("more than {MAX_POINTS} points in a batch")));
        }
        let member_count = self.count("member count")?;
        // Not `with_capacity(member_count)`: a count read from the input reserves nothing.
        let mut members = Vec::new();
        for _ in 0..member_count {
            let depth = self.count("member path length")?;
            if depth == 0 {
                return Err(bad("a member with an empty path"));
            }
            let path = (0..depth)
                .map(|_| self.string("member name"))
                .collect::<Result<Vec<_>, _>>()?;
            let kind = self.byte("member kind")?;
            let kind =
                Kind::from_byte(kind).ok_or_else(|| bad(format!("unknown member kind {kind}")))?;
            members.push((path, kind));
        }
        let mut seqs = vec![self.uvarint("seq")?];
        for _ in 1..n {
            let delta = self.uvarint("seq delta")?;
            if delta == 0 {
                return Err(bad("seq does not increase within a series"));
            }
            let seq = seqs.last().expect("one").checked_add(delta);
            seqs.push(seq.ok_or_else(|| bad("seq beyond 2^64 - 1"))?);
        }
        let mut ts = vec![self.uvarint("ts")?];
        for _ in 1..n {
            let delta = self.svarint("ts delta")?;
            ts.push(ts.last().expect("one").wrapping_add(delta as u64));
        }
        let mut bodies = vec![Map::new(); n];
        for (path, kind) in &members {
            let scale = match kind {
                Kind::Thousandths => match self.byte("decimals")? {
                    d @ 0..=3 => 10f64.powi(i32::from(d)),
                    d => return Err(bad(format!("{} decimals in a number column", d))),
                },
                _ => 1.0,
            };
            let mut previous = 0i64;
            let mut previous_text: Option<String> = None;
            for body in bodies.iter_mut() {
                let value = match kind {
                    Kind::Thousandths | Kind::Integer => {
                        previous = previous.wrapping_add(self.svarint("number")?);
                        if *kind == Kind::Integer {
                            Value::from(previous)
                        } else {
                            Number::from_f64(previous as f64 / scale)
                                .map(Value::Number)
                                .expect("finite")
                        }
                    }
                    Kind::Boolean => match self.byte("boolean")? {
                        0 => Value::Bool(false),
                        1 => Value::Bool(true),
                        b => return Err(bad(format!("boolean byte {b}"))),
                    },
                    Kind::String | Kind::Json => {
                        let text = self.text(&mut previous_text)?;
                        if *kind == Kind::String {
                            Value::String(text)
                        } else {
                            serde_json::from_str(&text)
                                .map_err(|e| bad(format!("JSON member: {e}")))?
                        }
                    }
                };
                insert(body, path, value)?;
            }
        }
        for ((seq, ts), body) in seqs.into_iter().zip(ts).zip(bodies) {
            let mut point = Map::new();
            point.insert("seq".into(), seq.into());
            point.insert("ts".into(), ts.into());
            point.insert("deviceId".into(), device_id.clone().into());
            point.insert(kind.clone(), Value::Object(body));
            points.push(Value::Object(point));
        }
        Ok(())
    }
}

/// Sets `path` in `body` to `value`, making the objects on the way.
fn insert(body: &mut Map<String, Value>, path: &[String], value: Value) -> Result<(), DecodeError> {
    let (last, parents) = path.split_last().expect("not empty");
    let mut object = body;
    for name in parents {
        let entry = object
            .entry(name.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        object = match entry {
            Value::Object(o) => o,
            _ => return Err(bad(format!("member {name} is both a value and an object"))),
        };
    }
    if object.insert(last.clone(), value).is_some() {
        return Err(bad(format!("member {} given twice", path.join("."))));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
