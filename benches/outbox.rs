//! The outbox on its own: append and acknowledge rates with fsync batching as the daemon does
//! it, and the cost of one fsync.
//!
//!     cargo bench --bench outbox
//!     OUTBOX_RECORDS=1000000 OUTBOX_SYNC_EVERY=100 cargo bench --bench outbox
//!
//! - `append`: records appended with `sync()` every `OUTBOX_SYNC_EVERY` appends or every
//!   `OUTBOX_SYNC_MS` (default 1000, the daemon's `fsync_interval_ms`), whichever comes first.
//! - `append at cap`: the same into an outbox at its 4 MiB cap (the daemon's default), where
//!   every append that crosses a segment boundary drops the oldest segment (a durable step).
//! - `read + ack`: the telemetry task's drain loop: read 100 records (`batch_max_points`),
//!   acknowledge them, `sync()` on the same schedule.
//! - `fsync after one append` and `sync after one ack` (`meta.json` written durably).
//!
//! The payload is a stored battery point as the telemetry task writes it (about 280 bytes).
//! Files go under `OUTBOX_DIR` (default: Cargo's target tmp dir, on the build disk); the
//! figures measure that disk as much as the code.

use std::time::{Duration, Instant};

use texture_agent::model::device::DeviceType;
use texture_agent::telemetry::outbox::{Outbox, HEADER_BYTES};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A point as `Telemetry` stores it: `{"ts":..,"deviceId":..,"state":{...}}`.
fn stored_point(i: u64) -> Vec<u8> {
    let mut device = texture_agent::drivers::simulated::SimDevice::new(DeviceType::Battery, i);
    let state = device.step(5.0, 43_200).clone();
    let mut point = Vec::new();
    texture_agent::telemetry::encode_state(1_800_000_000_000 + i, "bat-1", &state, &mut point);
    point
}

/// When to call `sync()`: every `every` operations or every `interval`, whichever first.
struct SyncSchedule {
    every: u64,
    interval: Duration,
    since: u64,
    last: Instant,
    syncs: u64,
}

impl SyncSchedule {
    fn new(every: u64, interval: Duration) -> Self {
        SyncSchedule {
            every,
            interval,
            since: 0,
            last: Instant::now(),
            syncs: 0,
        }
    }

    fn tick(&mut self, outbox: &mut Outbox, ops: u64) {
        self.since += ops;
        if self.since >= self.every || self.last.elapsed() >= self.interval {
            outbox.sync().unwrap();
            self.since = 0;
            self.last = Instant::now();
            self.syncs += 1;
        }
    }
}

/// Appends `records` records one at a time, cycling through `payloads`, on `schedule`; returns
/// the bytes written, headers included.
fn append_timed(
    outbox: &mut Outbox,
    payloads: &[Vec<u8>],
    records: u64,
    schedule: &mut SyncSchedule,
) -> u64 {
    let mut bytes = 0;
    for i in 0..records {
        let payload = &payloads[i as usize % payloads.len()];
        outbox.append(payload).unwrap();
        bytes += payload.len() as u64 + HEADER_BYTES;
        schedule.tick(outbox, 1);
    }
    bytes
}

fn report(name: &str, records: u64, bytes: u64, elapsed: Duration, syncs: u64) {
    let s = elapsed.as_secs_f64();
    println!(
        "{name:<22} {:>10.0} records/s  {:>7.1} MB/s  ({records} records in {:.2} s, {syncs} syncs)",
        records as f64 / s,
        bytes as f64 / s / 1e6,
        s
    );
}

fn mean_us(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let mean = samples.iter().sum::<Duration>().as_secs_f64() / samples.len() as f64;
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    (mean * 1e6, p99.as_secs_f64() * 1e6)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let records: u64 = env_or("OUTBOX_RECORDS", 200_000);
    let every: u64 = env_or("OUTBOX_SYNC_EVERY", 1_000);
    let interval = Duration::from_millis(env_or("OUTBOX_SYNC_MS", 1_000));
    let fsyncs: usize = env_or("OUTBOX_FSYNC_REPS", 200);
    let root = std::env::var("OUTBOX_DIR").unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").into());
    std::fs::create_dir_all(&root).unwrap();
    let payloads: Vec<Vec<u8>> = (0..64).map(stored_point).collect();
    println!(
        "outbox in {root}; payload ≈ {} bytes + {HEADER_BYTES} header; sync every {every} records or {} ms",
        payloads[0].len(),
        interval.as_millis()
    );

    // Append, then drain, an outbox large enough to hold everything.
    let dir = tempfile::tempdir_in(&root).unwrap();
    let (mut outbox, _) = Outbox::open(dir.path(), 1 << 30).unwrap();
    let mut schedule = SyncSchedule::new(every, interval);
    let t = Instant::now();
    let bytes = append_timed(&mut outbox, &payloads, records, &mut schedule);
    outbox.sync().unwrap();
    report("append", records, bytes, t.elapsed(), schedule.syncs + 1);

    let mut schedule = SyncSchedule::new(every, interval);
    let (mut read, mut bytes) = (0u64, 0u64);
    let t = Instant::now();
    let mut after = 0;
    loop {
        let batch = outbox.read_after(after, 100, 256 * 1024).unwrap();
        let Some(last) = batch.last() else { break };
        after = last.seq;
        read += batch.len() as u64;
        bytes += batch
            .iter()
            .map(|r| r.payload.len() as u64 + HEADER_BYTES)
            .sum::<u64>();
        outbox.ack(after);
        schedule.tick(&mut outbox, batch.len() as u64);
    }
    outbox.sync().unwrap();
    assert_eq!(read, records);
    assert_eq!(outbox.stats().depth, 0);
    report("read + ack", read, bytes, t.elapsed(), schedule.syncs + 1);
    drop(outbox);

    // Appending into a full outbox: the daemon's 4 MiB cap, filled first.
    let dir_cap = tempfile::tempdir_in(&root).unwrap();
    let cap = 4 * 1024 * 1024;
    let (mut outbox, _) = Outbox::open(dir_cap.path(), cap).unwrap();
    let mut i = 0;
    while outbox.stats().dropped == 0 {
        outbox.append(&payloads[(i % 64) as usize]).unwrap();
        i += 1;
    }
    let mut schedule = SyncSchedule::new(every, interval);
    let t = Instant::now();
    let bytes = append_timed(&mut outbox, &payloads, records, &mut schedule);
    let elapsed = t.elapsed();
    assert!(outbox.stats().bytes <= cap);
    report("append at cap", records, bytes, elapsed, schedule.syncs);
    drop(outbox);

    // One fsync: after a single append (the data), and after a single ack (meta.json).
    let dir_sync = tempfile::tempdir_in(&root).unwrap();
    let (mut outbox, _) = Outbox::open(dir_sync.path(), 1 << 30).unwrap();
    let (mut data, mut meta) = (Vec::new(), Vec::new());
    for i in 0..fsyncs as u64 {
        let seq = outbox.append(&payloads[(i % 64) as usize]).unwrap();
        let t = Instant::now();
        outbox.sync().unwrap();
        data.push(t.elapsed());
        outbox.ack(seq);
        let t = Instant::now();
        outbox.sync().unwrap();
        meta.push(t.elapsed());
    }
    let (mean, p99) = mean_us(&mut data);
    println!("fsync after one append {mean:>10.1} µs mean, {p99:.1} µs p99 ({fsyncs} samples)");
    let (mean, p99) = mean_us(&mut meta);
    println!(
        "sync after one ack     {mean:>10.1} µs mean, {p99:.1} µs p99 (meta.json written durably, drained segment deleted)"
    );
}
