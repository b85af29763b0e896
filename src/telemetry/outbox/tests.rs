//! The outbox as a whole, through its public methods: appends, reads, acknowledgements, the cap
//! and recovery after reopening.

use std::fs::{self, OpenOptions};

use super::*;

fn payload(i: u64) -> Vec<u8> {
    format!("{{\"point\":{i}}}").into_bytes()
}

#[test]
fn records_come_back_in_order_and_survive_reopen() {
    let d = tempfile::tempdir().unwrap();
    let (mut o, _) = Outbox::open(d.path(), 1 << 20).unwrap();
    for i in 1..=50 {
        assert_eq!(o.append(&payload(i)).unwrap(), i);
    }
    o.sync().unwrap();
    drop(o);
    let (mut o, rec) = Outbox::open(d.path(), 1 << 20).unwrap();
    assert_eq!(rec.records, 50);
    let got = o.read_after(0, 1000, 1 << 20).unwrap();
    assert_eq!(
        got.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=50).collect::<Vec<_>>()
    );
    assert_eq!(got[9].payload, payload(10));
    assert_eq!(o.append(b"{}").unwrap(), 51);
}

#[test]
fn acked_records_are_not_read_again_and_segments_are_deleted() {
    let d = tempfile::tempdir().unwrap();
    let (mut o, _) = Outbox::open(d.path(), 64 * 1024).unwrap();
    for i in 1..=1000 {
        o.append(&payload(i)).unwrap();
    }
    let batch = o.read_after(0, 100, 1 << 20).unwrap();
    assert_eq!(batch.last().unwrap().seq, 100);
    o.ack(600);
    o.sync().unwrap();
    assert_eq!(o.read_after(0, 1, 1 << 20).unwrap()[0].seq, 601);
    assert_eq!(o.stats().depth, 400);
    drop(o);
    let (mut o, _) = Outbox::open(d.path(), 64 * 1024).unwrap();
    assert_eq!(o.read_after(0, 1, 1 << 20).unwrap()[0].seq, 601);
    o.ack(1000);
    o.sync().unwrap();
    assert_eq!(o.stats().depth, 0);
    // Sequence numbers continue, even with every segment gone.
    drop(o);
    let (mut o, _) = Outbox::open(d.path(), 64 * 1024).unwrap();
    assert_eq!(o.append(b"{}").unwrap(), 1001);
}

#[test]
fn a_full_outbox_drops_exactly_the_oldest_and_counts_them() {
    let d = tempfile::tempdir().unwrap();
    let cap = 16 * 1024;
    let (mut o, _) = Outbox::open(d.path(), cap).unwrap();
    for i in 1..=2_000 {
        o.append(&payload(i)).unwrap();
    }
    let s = o.stats();
    assert!(s.bytes <= cap, "{s:?}");
    let rest = o.read_after(0, 10_000, 1 << 30).unwrap();
    let first = rest[0].seq;
    // Exactly the oldest were dropped: what is left is contiguous up to the newest.
    assert_eq!(
        rest.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (first..=2_000).collect::<Vec<_>>()
    );
    assert_eq!(s.dropped, first - 1);
    drop(o);
    let (o, _) = Outbox::open(d.path(), cap).unwrap();
    assert_eq!(o.stats().dropped, first - 1, "dropped count is persisted");
}

#[test]
fn a_torn_tail_is_cut_and_intact_records_kept() {
    let d = tempfile::tempdir().unwrap();
    let (mut o, _) = Outbox::open(d.path(), 1 << 20).unwrap();
    for i in 1..=10 {
        o.append(&payload(i)).unwrap();
    }
    o.sync().unwrap();
    drop(o);
    let seg = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let len = fs::metadata(&seg).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(len - 5)
        .unwrap();
    let (mut o, rec) = Outbox::open(d.path(), 1 << 20).unwrap();
    assert_eq!(rec.records, 9);
    assert!(rec.torn_bytes > 0);
    let got = o.read_after(0, 100, 1 << 20).unwrap();
    assert_eq!(got.len(), 9);
    // The torn record's number is reused: it never reached anyone.
    assert_eq!(o.append(b"{}").unwrap(), 10);
}

#[test]
fn batched_appends_match_single_appends_across_segments_and_the_cap() {
    let d = tempfile::tempdir().unwrap();
    let (mut o, _) = Outbox::open(d.path(), 64 * 1024).unwrap();
    let batch: Vec<Vec<u8>> = (1..=3_000).map(payload).collect();
    for chunk in batch.chunks(250) {
        o.append_all(chunk).unwrap();
    }
    assert_eq!(o.last_seq(), 3_000);
    let s = o.stats();
    assert!(s.bytes <= 64 * 1024, "{s:?}");
    let rest = o.read_after(0, 10_000, 1 << 30).unwrap();
    let first = rest[0].seq;
    assert_eq!(s.dropped, first - 1);
    for r in &rest {
        assert_eq!(r.payload, payload(r.seq));
    }
    assert_eq!(rest.last().unwrap().seq, 3_000);
    drop(o);
    let (o, rec) = Outbox::open(d.path(), 64 * 1024).unwrap();
    assert_eq!((rec.torn_bytes, o.last_seq()), (0, 3_000));
}

#[test]
fn reading_after_every_segment_was_deleted_starts_afresh() {
    let d = tempfile::tempdir().unwrap();
    let (mut o, _) = Outbox::open(d.path(), 64 * 1024).unwrap();
    for round in 0..3u64 {
        for i in 0..50 {
            o.append(&payload(round * 50 + i)).unwrap();
        }
        let got = o.read_after(round * 50, 1000, 1 << 20).unwrap();
        assert_eq!(got.len(), 50, "round {round}");
        o.ack(got.last().unwrap().seq);
        o.sync().unwrap();
        assert_eq!(o.stats().depth, 0);
    }
}

/// Reads everything after `after` in batches of `n`, checking order and content.
fn drain(o: &mut Outbox, mut after: u64, n: usize, body: impl Fn(u64) -> Vec<u8>) -> u64 {
    loop {
        let got = o.read_after(after, n, 1 << 20).unwrap();
        if got.is_empty() {
            return after;
        }
        for r in got {
            assert_eq!(r.seq, after + 1, "contiguous");
            assert_eq!(r.payload, body(r.seq), "payload of {}", r.seq);
            after = r.seq;
        }
    }
}

#[test]
fn memory_and_disk_reads_agree_and_hand_over_at_any_point() {
    let d = tempfile::tempdir().unwrap();
    let big = |i: u64| format!("{{\"point\":{i},\"pad\":\"{}\"}}", "x".repeat(1000)).into_bytes();
    let (mut o, _) = Outbox::open(d.path(), 4 << 20).unwrap();
    // More than the in-memory tail holds: the first reads come from disk, the rest from
    // memory, and the hand-over must be seamless.
    let all: Vec<Vec<u8>> = (1..=400).map(big).collect();
    o.append_all(&all).unwrap();
    assert_eq!(drain(&mut o, 0, 37, big), 400);
    // Memory drained up to 400; then a burst larger than the tail: only its first part is
    // cached, so after it the read goes to disk from the cursor the memory reads left.
    let more: Vec<Vec<u8>> = (401..=700).map(big).collect();
    o.append_all(&more).unwrap();
    assert_eq!(drain(&mut o, 400, 50, big), 700);
    // A rewind (a lost connection) re-reads from disk what memory already handed out.
    assert_eq!(drain(&mut o, 350, 64, big), 700);
    o.ack(650);
    assert_eq!(
        o.read_after(0, 1, 1 << 20).unwrap()[0].seq,
        651,
        "acked are skipped"
    );
    assert_eq!(drain(&mut o, 650, 10, big), 700);
    // Small appends interleaved with reads, as in steady operation.
    let mut after = 700;
    for i in 701..=900 {
        o.append(&big(i)).unwrap();
        if i % 3 == 0 {
            after = drain(&mut o, after, 2, big);
        }
    }
    assert_eq!(drain(&mut o, after, 7, big), 900);
    o.sync().unwrap();
    drop(o);
    let (mut o, _) = Outbox::open(d.path(), 4 << 20).unwrap();
    assert_eq!(drain(&mut o, 650, 100, big), 900);
}
#[test]
fn reading_resumes_from_a_position_without_rescanning() {
    let d = tempfile::tempdir().unwrap();
    let (mut o, _) = Outbox::open(d.path(), 1 << 20).unwrap();
    for i in 1..=300 {
        o.append(&payload(i)).unwrap();
    }
    let a = o.read_after(0, 100, 1 << 20).unwrap();
    let b = o.read_after(100, 100, 1 << 20).unwrap();
    let c = o.read_after(200, 1000, 1 << 20).unwrap();
    assert_eq!(
        (a[0].seq, b[0].seq, c[0].seq, c.last().unwrap().seq),
        (1, 101, 201, 300)
    );
}

#[test]
fn every_run_has_a_new_epoch_and_a_read_never_mixes_two() {
    let d = tempfile::tempdir().unwrap();
    let (mut o, _) = Outbox::open(d.path(), 1 << 20).unwrap();
    assert_eq!(o.epoch(), 1);
    for i in 1..=5 {
        o.append(&payload(i)).unwrap();
    }
    drop(o);
    let (mut o, _) = Outbox::open(d.path(), 1 << 20).unwrap();
    assert_eq!(o.epoch(), 2);
    for i in 6..=8 {
        o.append(&payload(i)).unwrap();
    }
    let first = o.read_after(0, 100, 1 << 20).unwrap();
    assert_eq!(
        first.iter().map(|r| (r.epoch, r.seq)).collect::<Vec<_>>(),
        (1..=5).map(|s| (1, s)).collect::<Vec<_>>()
    );
    let second = o.read_after(5, 100, 1 << 20).unwrap();
    assert_eq!(
        second.iter().map(|r| (r.epoch, r.seq)).collect::<Vec<_>>(),
        (6..=8).map(|s| (2, s)).collect::<Vec<_>>()
    );
    // The epoch was durable before the run stored anything: a run that stores nothing still
    // uses one up.
    drop(o);
    let (o, _) = Outbox::open(d.path(), 1 << 20).unwrap();
    drop(o);
    let (o, _) = Outbox::open(d.path(), 1 << 20).unwrap();
    assert_eq!(o.epoch(), 4);
}

#[test]
fn numbers_a_power_cut_gives_again_come_with_a_higher_epoch() {
    let d = tempfile::tempdir().unwrap();
    let (mut o, _) = Outbox::open(d.path(), 1 << 20).unwrap();
    for i in 1..=10 {
        o.append(&payload(i)).unwrap();
    }
    o.sync().unwrap();
    let synced = fs::metadata(only_segment(d.path())).unwrap().len();
    for i in 11..=20 {
        o.append(&payload(i)).unwrap();
    }
    // Points 11 to 20 were sent; then the power went before they reached the disk.
    let sent = o.read_after(0, 100, 1 << 20).unwrap();
    assert_eq!(sent.last().map(|r| (r.epoch, r.seq)), Some((1, 20)));
    drop(o);
    OpenOptions::new()
        .write(true)
        .open(only_segment(d.path()))
        .unwrap()
        .set_len(synced)
        .unwrap();
    let (mut o, _) = Outbox::open(d.path(), 1 << 20).unwrap();
    assert_eq!(
        o.append(&payload(99)).unwrap(),
        11,
        "the number is given again"
    );
    let again = o.read_after(10, 100, 1 << 20).unwrap();
    assert_eq!(
        again.iter().map(|r| (r.epoch, r.seq)).collect::<Vec<_>>(),
        [(2, 11)],
        "but never with the same epoch"
    );
}

#[test]
fn an_outbox_from_before_epochs_is_read_as_epoch_zero() {
    let d = tempfile::tempdir().unwrap();
    let (mut o, _) = Outbox::open(d.path(), 1 << 20).unwrap();
    for i in 1..=3 {
        o.append(&payload(i)).unwrap();
    }
    o.sync().unwrap();
    drop(o);
    // What an agent before epochs left: its segment names carry no epoch, nor does meta.json.
    let old = only_segment(d.path());
    let name = old.file_name().unwrap().to_str().unwrap().to_owned();
    let (id, _) = name.split_once('-').unwrap();
    fs::rename(&old, d.path().join(format!("{id}.seg"))).unwrap();
    fs::write(
        d.path().join("meta.json"),
        r#"{"acked":0,"next_seq":4,"dropped":0}"#,
    )
    .unwrap();
    let (mut o, rec) = Outbox::open(d.path(), 1 << 20).unwrap();
    assert_eq!((rec.records, o.epoch()), (3, 1));
    o.append(&payload(4)).unwrap();
    let old = o.read_after(0, 100, 1 << 20).unwrap();
    assert_eq!(
        old.iter().map(|r| (r.epoch, r.seq)).collect::<Vec<_>>(),
        [(0, 1), (0, 2), (0, 3)]
    );
    assert_eq!(o.read_after(3, 100, 1 << 20).unwrap()[0].epoch, 1);
}

/// The one segment file in `dir`.
fn only_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert_eq!(segments.len(), 1, "{segments:?}");
    segments.pop().unwrap()
}
