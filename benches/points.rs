//! CPU per point on the agent's own telemetry path, with no network: a stable figure to set
//! beside the telemetry bench's throughput ratio, which the machine's noise swings from 0.12 to
//! 0.58 between rounds (docs/PERFORMANCE.md, "CPU per point").
//!
//!     cargo bench --bench points                          # JSON, 100,000 points
//!     POINTS_ENCODING=compact cargo bench --bench points  # compact, DEFLATE
//!     POINTS=20000 valgrind --tool=callgrind target/release/deps/points-* --bench
//!
//! The path is the telemetry task's for every batch of 100 samples: serialise each state as the
//! outbox stores it, append them to a real outbox on disk (no fsync: the task fsyncs on a timer,
//! not per point), read them back as a batch, encode the batch, acknowledge it. Under callgrind
//! the instructions of two runs with different `POINTS` give instructions per point without the
//! set-up: (I(40000) - I(20000)) / 20000.

use std::hint::black_box;

use texture_agent::drivers::simulated::SimDevice;
use texture_agent::model::device::{DeviceState, DeviceType};
use texture_agent::telemetry::outbox::Outbox;
use texture_agent::telemetry::{batch_message, encode_state};

const BATCH: usize = 100;

fn cpu_secs() -> f64 {
    // SAFETY: a zeroed rusage is a valid out-buffer.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is valid for writes.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let points: usize = std::env::var("POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let encoding = std::env::var("POINTS_ENCODING").unwrap_or_else(|_| "json".into());
    // 64 states of each of four types, stepped as the simulated drivers step them.
    let mut states: Vec<(String, DeviceState)> = Vec::new();
    for (i, kind) in [
        DeviceType::Battery,
        DeviceType::Inverter,
        DeviceType::Charger,
        DeviceType::Thermostat,
    ]
    .into_iter()
    .enumerate()
    {
        let mut device = SimDevice::new(kind, i as u64);
        for step in 0..64u64 {
            states.push((format!("sim-{i}"), device.step(1.0, 43_200 + step).clone()));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut outbox, _) = Outbox::open(&dir.path().join("outbox"), 1 << 30).unwrap();
    let mut ts = 1_795_786_201_123u64;
    let mut wire_bytes = 0usize;
    let start = cpu_secs();
    for batch in 0..points / BATCH {
        let mut buf = Vec::with_capacity(BATCH * 320);
        let mut ends = Vec::with_capacity(BATCH);
        for i in 0..BATCH {
            ts += 10;
            let (id, state) = &states[(batch * BATCH + i) % states.len()];
            encode_state(ts, id, state, &mut buf);
            ends.push(buf.len());
        }
        let mut begin = 0;
        let stored: Vec<&[u8]> = ends
            .iter()
            .map(|&end| {
                let point = &buf[begin..end];
                begin = end;
                point
            })
            .collect();
        outbox.append_all(&stored).unwrap();
        let after = outbox.acked();
        let records = outbox.read_after(after, BATCH, 256 * 1024).unwrap();
        let message = match encoding.as_str() {
            "compact" => texture_agent::telemetry::compact_batch("gw-bench", &records, true)
                .expect("the agent's own points"),
            _ => batch_message("gw-bench", &records),
        };
        wire_bytes += message.len();
        black_box(&message);
        outbox.ack(records.last().unwrap().seq);
    }
    let secs = cpu_secs() - start;
    println!(
        "encoding {encoding}: {points} points, {:.3} CPU s per 100,000 points, {:.1} payload bytes per point",
        secs * 100_000.0 / points as f64,
        wire_bytes as f64 / points as f64
    );
}
