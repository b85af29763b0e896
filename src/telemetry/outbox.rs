//! The durable store-and-forward outbox for telemetry: append, read, acknowledge.
//!
//! **Why a small segment log and not redb.** The access pattern is a FIFO queue: append at the
//! head, read and delete from the tail, never update in place. A log of segment files does that
//! with sequential writes only, costs no B-tree pages or write amplification on flash, needs no
//! extra crate, and its failure mode after a power cut is simple to reason about: at worst a torn
//! last record, which the per-record CRC detects.
//!
//! **Layout.** `outbox/` in the state directory holds numbered segment files
//! (`00000000000000000001.seg`, ...) and `meta.json`. A record is
//! `len: u32 LE | crc32(seq ‖ payload): u32 LE | seq: u64 LE | payload`. Sequence numbers are
//! per gateway, start at 1 and never repeat, so the platform can detect gaps and drop duplicates.
//!
//! **Durability.** Appends go to the page cache at once (so a crash of the *process* loses
//! nothing) and are fsynced by [`Outbox::sync`] on a timer (default 1 s), sparing flash from an
//! fsync per sample; a power cut can lose at most that window. Acknowledgements are recorded in
//! `meta.json`, and a fully acknowledged segment is deleted only after that record is durable,
//! so a crash can cause re-sends (duplicates) but never reuse a sequence number.
//!
//! **Bounds.** Unacknowledged bytes are capped. When an append would exceed the cap the oldest
//! segment is dropped whole: exactly the oldest points go, their number is added to the persisted
//! `dropped` count, and the loss is reported in gateway health, never silent.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::{self, StorageError};

/// Bytes of a record header: length, CRC and sequence number.
pub const HEADER_BYTES: u64 = 16;
/// Largest payload accepted (a single sample is a few hundred bytes).
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
const META_FILE: &str = "meta.json";
/// Read buffer for [`Outbox::read_after`].
const READ_CHUNK: u64 = 64 * 1024;
/// Payload bytes of recent appends kept in memory for the uplink (see [`Outbox::read_after`]).
const TAIL_BYTES: usize = 128 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("record of {0} bytes exceeds the {MAX_RECORD_BYTES}-byte limit")]
    TooLarge(usize),
    /// A stored record ends before its header says it does: a torn write.
    #[error("record cut short")]
    Torn,
    /// A stored record's checksum does not match its contents.
    #[error("record {seq} fails its checksum")]
    Checksum { seq: u64 },
    /// Reading a segment failed (the caller knows which).
    #[error("segment read failed: {0}")]
    Read(#[source] io::Error),
}

/// One stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub payload: Vec<u8>,
}

/// What [`Outbox::open`] found, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Bytes cut from the end of a segment because the last record was torn.
    pub torn_bytes: u64,
    /// Records lost to corruption inside a segment (not at its end).
    pub corrupt_records: u64,
    /// Intact records found.
    pub records: u64,
}

/// Figures for gateway health and `status`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxStats {
    /// Records not yet acknowledged.
    pub depth: u64,
    /// Bytes of those records, headers included.
    pub bytes: u64,
    /// Records dropped because the outbox was full, since installation.
    pub dropped: u64,
    /// The sequence number the next record will get.
    pub next_seq: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct Meta {
    /// Every record with `seq <= acked` is acknowledged (or dropped).
    acked: u64,
    /// Sequence numbers below this were handed out; never hand them out again.
    next_seq: u64,
    dropped: u64,
}

#[derive(Debug)]
struct Segment {
    id: u64,
    path: PathBuf,
    first_seq: u64,
    last_seq: u64,
    records: u64,
    bytes: u64,
}

/// Where the next read continues: after `seq`, at `offset` in segment `id`.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    seq: u64,
    id: u64,
    offset: u64,
}

#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    head: Option<File>,
    /// Former head segments written since the last fsync. They are synced with everything
    /// else on the timer: an fsync at every rotation (every few hundred points under load) was
    /// the largest single cost of the append path.
    unsynced: Vec<(u64, File)>,
    meta: Meta,
    /// `meta` as last made durable.
    durable: Meta,
    /// Appends since the last fsync.
    dirty: bool,
    cursor: Option<Cursor>,
    /// Ids are never reused within a run, so a cached [`Cursor`] can never point into a
    /// different segment that happens to get the same name.
    next_segment_id: u64,
    /// The segment file the last read used, kept open: the uplink reads the same segment batch
    /// after batch, and an `open` per batch was a measurable share of the telemetry path.
    reader: Option<(u64, File)>,
    /// Records appended in this run and not read yet, oldest first, contiguous, each with where
    /// it ends on disk. Normally the uplink reads exactly what was just appended; handing it
    /// over from here skips reading it back, checking its CRC and allocating it a second time.
    /// Bounded by [`TAIL_BYTES`]: whatever did not fit, and every re-send, comes from disk.
    tail: VecDeque<Cached>,
    tail_bytes: usize,
}

#[derive(Debug)]
struct Cached {
    record: Record,
    /// The cursor just after this record.
    end: Cursor,
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}

fn crc(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Reads the next record from `r`. `Ok(None)` at a clean end; an error for a torn or bad record
/// ([`OutboxError::Torn`], [`OutboxError::TooLarge`], [`OutboxError::Checksum`]) or a failed read.
fn read_record(r: &mut impl Read) -> Result<Option<Record>, OutboxError> {
    let mut header = [0u8; HEADER_BYTES as usize];
    let mut got = 0;
    while got < header.len() {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(OutboxError::Torn),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(OutboxError::Read(e)),
        }
    }
    let len = u32::from_le_bytes(header[0..4].try_into().unwrap()) as usize;
    let sum = u32::from_le_bytes(header[4..8].try_into().unwrap());
    let seq = u64::from_le_bytes(header[8..16].try_into().unwrap());
    if len > MAX_RECORD_BYTES {
        return Err(OutboxError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => OutboxError::Torn,
        _ => OutboxError::Read(e),
    })?;
    if crc(seq, &payload) != sum {
        return Err(OutboxError::Checksum { seq });
    }
    Ok(Some(Record { seq, payload }))
}

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, recovering from a torn tail.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Outbox, Recovery), OutboxError> {
        storage::ensure_dir(dir)?;
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| StorageError::Io { path, source }
        };
        let meta: Meta = storage::read_json(&dir.join(META_FILE))?.unwrap_or_default();
        let mut ids: Vec<u64> = fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".seg")?.parse().ok())
            .collect();
        ids.sort_unstable();
        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        let last_id = ids.last().copied();
        for id in ids {
            let path = segment_path(dir, id);
            let file = File::open(&path).map_err(io_err(&path))?;
            let size = file.metadata().map_err(io_err(&path))?.len();
            let mut reader = BufReader::new(file);
            let (mut first, mut last, mut records, mut good_bytes) = (0, 0, 0, 0u64);
            loop {
                match read_record(&mut reader) {
                    Ok(Some(rec)) => {
                        if records == 0 {
                            first = rec.seq;
                        }
                        last = rec.seq;
                        records += 1;
                        good_bytes += HEADER_BYTES + rec.payload.len() as u64;
                    }
                    Ok(None) => break,
                    // Whatever the defect, the records after it cannot be located.
                    Err(_) => {
                        if Some(id) == last_id {
                            recovery.torn_bytes = size - good_bytes;
                        } else {
                            // Records after a bad one in an older segment cannot be located
                            // reliably; count what the sequence numbers say was lost later.
                            recovery.corrupt_records += 1;
                        }
                        break;
                    }
                }
            }
            if Some(id) == last_id && good_bytes < size {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                f.set_len(good_bytes).map_err(io_err(&path))?;
                f.sync_all().map_err(io_err(&path))?;
            }
            recovery.records += records;
            if records == 0 {
                let _ = fs::remove_file(&path);
                continue;
            }
            segments.push_back(Segment {
                id,
                path,
                first_seq: first,
                last_seq: last,
                records,
                bytes: good_bytes,
            });
        }
        let next_segment_id = segments.back().map_or(1, |s: &Segment| s.id + 1);
        let next_seq = segments
            .back()
            .map_or(1, |s| s.last_seq + 1)
            .max(meta.next_seq)
            .max(meta.acked + 1);
        let meta = Meta { next_seq, ..meta };
        let mut outbox = Outbox {
            dir: dir.to_owned(),
            max_bytes,
            segment_bytes: (max_bytes / 16).clamp(4 * 1024, 1024 * 1024),
            segments,
            head: None,
            unsynced: Vec::new(),
            meta,
            durable: meta,
            dirty: false,
            cursor: None,
            next_segment_id,
            reader: None,
            tail: VecDeque::new(),
            tail_bytes: 0,
        };
        outbox.delete_acked_segments();
        Ok((outbox, recovery))
    }

    pub fn stats(&self) -> OutboxStats {
        let (depth, bytes) = self.unacked();
        OutboxStats {
            depth,
            bytes,
            dropped: self.meta.dropped,
            next_seq: self.meta.next_seq,
        }
    }

    /// Records and bytes not yet acknowledged.
    fn unacked(&self) -> (u64, u64) {
        let mut depth = 0;
        let mut bytes = 0;
        for s in &self.segments {
            if s.last_seq > self.meta.acked {
                let dead = self
                    .meta
                    .acked
                    .saturating_sub(s.first_seq - 1)
                    .min(s.records);
                depth += s.records - dead;
                // Approximate per-record size for a partly acknowledged segment.
                bytes += s.bytes - s.bytes * dead / s.records.max(1);
            }
        }
        (depth, bytes)
    }

    /// The highest acknowledged sequence number.
    pub fn acked(&self) -> u64 {
        self.meta.acked
    }

    /// The sequence number of the newest record, 0 if none was ever written.
    pub fn last_seq(&self) -> u64 {
        self.meta.next_seq - 1
    }

    /// Appends a record, dropping the oldest segment(s) first if the cap would be exceeded.
    pub fn append(&mut self, payload: &[u8]) -> Result<u64, OutboxError> {
        self.append_all(&[payload])
    }

    /// Appends several records with as few writes as possible (one per segment touched) and
    /// returns the last sequence number. Each record is in the page cache when this returns,
    /// exactly as with [`Outbox::append`]; only the number of system calls differs.
    pub fn append_all<P: AsRef<[u8]>>(&mut self, payloads: &[P]) -> Result<u64, OutboxError> {
        if let Some(p) = payloads
            .iter()
            .find(|p| p.as_ref().len() > MAX_RECORD_BYTES)
        {
            return Err(OutboxError::TooLarge(p.as_ref().len()));
        }
        let total: usize = payloads
            .iter()
            .map(|p| HEADER_BYTES as usize + p.as_ref().len())
            .sum();
        let mut buf = Vec::with_capacity(total.min(self.segment_bytes as usize));
        // Unacknowledged bytes including `buf`; recomputed only when a segment is dropped.
        let mut unacked = self.unacked().1;
        // Room in the in-memory tail for this call's records. The tail must stay one contiguous
        // run, so it takes records only if it ends just before them, and only until the first
        // that does not fit. When it is full (the link is down or slow) nothing is copied at
        // all: no allocation churn during an outage, and the reader meets the tail again once
        // it has caught up.
        let mut tail_room = if self
            .tail
            .back()
            .is_none_or(|last| last.record.seq + 1 == self.meta.next_seq)
        {
            TAIL_BYTES - self.tail_bytes
        } else {
            0
        };
        let mut cached = Vec::new();
        for payload in payloads {
            let payload = payload.as_ref();
            let size = HEADER_BYTES + payload.len() as u64;
            // `unacked > 0`: with nothing left to drop a record larger than the whole cap is
            // kept rather than looping forever.
            while unacked > 0 && unacked + size > self.max_bytes {
                self.write_head(&mut buf)?;
                self.drop_oldest_segment()?;
                unacked = self.unacked().1;
            }
            let needs_new = self
                .segments
                .back()
                .is_none_or(|s| s.bytes + buf.len() as u64 + size > self.segment_bytes)
                || self.head.is_none();
            if needs_new {
                self.write_head(&mut buf)?;
                self.start_segment()?;
            }
            let seq = self.meta.next_seq;
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc(seq, payload).to_le_bytes());
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(payload);
            self.meta.next_seq = seq + 1;
            let seg = self.segments.back_mut().expect("a head segment");
            if payload.len() <= tail_room {
                tail_room -= payload.len();
                cached.push(Cached {
                    record: Record {
                        seq,
                        payload: payload.to_vec(),
                    },
                    end: Cursor {
                        seq,
                        id: seg.id,
                        offset: seg.bytes + buf.len() as u64,
                    },
                });
            } else {
                tail_room = 0;
            }
            if seg.records == 0 {
                seg.first_seq = seq;
            }
            seg.last_seq = seq;
            seg.records += 1;
            unacked += size;
        }
        self.write_head(&mut buf)?;
        // Only records known to be written join the tail.
        self.tail_bytes += cached.iter().map(|c| c.record.payload.len()).sum::<usize>();
        self.tail.extend(cached);
        Ok(self.meta.next_seq - 1)
    }

    /// Writes the pending bytes of the head segment (records already counted in it).
    fn write_head(&mut self, buf: &mut Vec<u8>) -> Result<(), OutboxError> {
        if buf.is_empty() {
            return Ok(());
        }
        let seg = self.segments.back_mut().expect("a head segment");
        let head = self.head.as_mut().expect("head open");
        head.write_all(buf).map_err(|source| StorageError::Io {
            path: seg.path.clone(),
            source,
        })?;
        seg.bytes += buf.len() as u64;
        buf.clear();
        self.dirty = true;
        Ok(())
    }

    fn start_segment(&mut self) -> Result<(), OutboxError> {
        // A segment left over from a previous run is never appended to: its end may be where a
        // torn write was cut off, and starting fresh keeps recovery simple.
        let id = self.next_segment_id;
        self.next_segment_id += 1;
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| StorageError::Io {
                path: path.clone(),
                source,
            })?;
        let old_id = self.segments.back().map(|s| s.id);
        if let (Some(old), Some(old_id)) = (self.head.replace(file), old_id) {
            // Synced by the next `sync`, together with the new head: nothing counts as durable
            // before then, so the order in which the kernel writes them back does not matter
            // (recovery keeps every intact record of every segment).
            self.unsynced.push((old_id, old));
        }
        self.segments.push_back(Segment {
            id,
            path,
            first_seq: self.meta.next_seq,
            last_seq: self.meta.next_seq - 1,
            records: 0,
            bytes: 0,
        });
        Ok(())
    }

    fn drop_oldest_segment(&mut self) -> Result<(), OutboxError> {
        let Some(seg) = self.segments.front() else {
            return Ok(());
        };
        let lost = seg
            .last_seq
            .saturating_sub(self.meta.acked.max(seg.first_seq - 1));
        self.meta.dropped += lost;
        self.meta.acked = self.meta.acked.max(seg.last_seq);
        tracing::warn!(
            dropped = lost,
            dropped_total = self.meta.dropped,
            "outbox full: oldest points dropped"
        );
        // Dropping is an acknowledgement by another name: make it durable before deleting.
        self.sync()?;
        Ok(())
    }

    /// Reads up to `max_records` records (and about `max_bytes`) with `seq > after`, in order.
    pub fn read_after(
        &mut self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        let after = after.max(self.meta.acked);
        let mut out = Vec::new();
        let mut bytes = 0;
        // Cached records up to `after` were read already or acknowledged.
        while self.tail.front().is_some_and(|c| c.record.seq <= after) {
            self.pop_tail();
        }
        if self.tail.front().is_some_and(|c| c.record.seq == after + 1) {
            while out.len() < max_records && bytes < max_bytes {
                let Some(c) = self.pop_tail() else { break };
                bytes += c.record.payload.len();
                self.cursor = Some(c.end);
                out.push(c.record);
            }
            return Ok(out);
        }
        let Some(start) = self.segments.iter().position(|s| s.last_seq > after) else {
            return Ok(out);
        };
        let mut end_cursor = None;
        let mut reader_file = self.reader.take();
        'segments: for seg in self.segments.iter().skip(start) {
            let offset = match self.cursor {
                Some(c) if c.seq == after && c.id == seg.id && c.offset <= seg.bytes => c.offset,
                _ => 0,
            };
            let mut file = match reader_file.take() {
                Some((id, file)) if id == seg.id => file,
                _ => File::open(&seg.path).map_err(|source| StorageError::Io {
                    path: seg.path.clone(),
                    source,
                })?,
            };
            file.seek(SeekFrom::Start(offset))
                .map_err(|source| StorageError::Io {
                    path: seg.path.clone(),
                    source,
                })?;
            // One read for a typical batch (100 points ≈ 28 KiB) rather than 8 KiB at a time.
            let left = seg.bytes - offset;
            let mut reader =
                BufReader::with_capacity(left.min(READ_CHUNK) as usize, (&file).take(left));
            let mut pos = offset;
            loop {
                let rec = match read_record(&mut reader) {
                    Ok(Some(rec)) => rec,
                    Ok(None) => break,
                    Err(error) => {
                        // Only a damaged file (or a bug) gets here: open() cut torn tails. The
                        // records after this one cannot be located; say so rather than skip
                        // them in silence.
                        tracing::error!(
                            segment = %seg.path.display(),
                            position = pos,
                            %error,
                            "outbox record unreadable; the rest of this segment is skipped"
                        );
                        break;
                    }
                };
                pos += HEADER_BYTES + rec.payload.len() as u64;
                if rec.seq <= after {
                    continue;
                }
                bytes += rec.payload.len();
                end_cursor = Some(Cursor {
                    seq: rec.seq,
                    id: seg.id,
                    offset: pos,
                });
                out.push(rec);
                if out.len() >= max_records || bytes >= max_bytes {
                    drop(reader);
                    reader_file = Some((seg.id, file));
                    break 'segments;
                }
            }
            drop(reader);
            reader_file = Some((seg.id, file));
        }
        self.reader = reader_file;
        if end_cursor.is_some() {
            self.cursor = end_cursor;
        }
        Ok(out)
    }

    fn pop_tail(&mut self) -> Option<Cached> {
        let c = self.tail.pop_front()?;
        self.tail_bytes -= c.record.payload.len();
        Some(c)
    }

    /// Acknowledges every record with `seq <= up_to` (they were delivered).
    pub fn ack(&mut self, up_to: u64) {
        self.meta.acked = self.meta.acked.max(up_to.min(self.meta.next_seq - 1));
    }

    /// Makes appends and acknowledgements durable and deletes fully acknowledged segments.
    /// Call on a timer (the fsync interval) and at shutdown.
    ///
    /// Acknowledgements go first, then the deletions, and only then are the remaining appends
    /// fsynced: points delivered within the interval are deleted before they were ever forced
    /// to flash. Under a steady stream that is nearly all of them, which spares the storage the
    /// writes (and the CPU the writeback). A power cut loses the same window either way.
    pub fn sync(&mut self) -> Result<(), OutboxError> {
        if self.meta.acked != self.durable.acked
            || self.meta.dropped != self.durable.dropped
            || self.meta.next_seq != self.durable.next_seq && self.segments.is_empty()
        {
            storage::write_json(&self.dir.join(META_FILE), &self.meta, 0o600)?;
            self.durable = self.meta;
        }
        self.delete_acked_segments();
        if self.dirty {
            for (id, old) in &self.unsynced {
                old.sync_data().map_err(|source| StorageError::Io {
                    path: segment_path(&self.dir, *id),
                    source,
                })?;
            }
            self.unsynced.clear();
            if let (Some(head), Some(seg)) = (self.head.as_ref(), self.segments.back()) {
                head.sync_data().map_err(|source| StorageError::Io {
                    path: seg.path.clone(),
                    source,
                })?;
            }
            self.dirty = false;
        }
        Ok(())
    }

    /// Deletes segments whose every record is acknowledged *durably*.
    fn delete_acked_segments(&mut self) {
        while let Some(seg) = self.segments.front() {
            if seg.last_seq > self.durable.acked || seg.records == 0 {
                break;
            }
            // The head segment is kept open for appends; it is replaced on the next append.
            // Nothing in a deleted segment needs to reach the disk.
            if self.segments.len() == 1 {
                self.head = None;
            }
            let id = seg.id;
            self.unsynced.retain(|(old, _)| *old != id);
            let _ = fs::remove_file(&seg.path);
            if self.reader.as_ref().is_some_and(|(id, _)| *id == seg.id) {
                // Let go of the deleted file so its blocks are freed now.
                self.reader = None;
            }
            self.segments.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
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
        let big =
            |i: u64| format!("{{\"point\":{i},\"pad\":\"{}\"}}", "x".repeat(1000)).into_bytes();
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
    fn a_damaged_record_is_named_by_what_is_wrong_with_it() {
        let record = |seq: u64, payload: &[u8]| {
            let mut r = (payload.len() as u32).to_le_bytes().to_vec();
            r.extend_from_slice(&crc(seq, payload).to_le_bytes());
            r.extend_from_slice(&seq.to_le_bytes());
            r.extend_from_slice(payload);
            r
        };
        let good = record(7, b"{}");
        assert_eq!(
            read_record(&mut &good[..]).unwrap(),
            Some(Record {
                seq: 7,
                payload: b"{}".to_vec()
            })
        );
        assert!(matches!(read_record(&mut &[][..]), Ok(None)));
        for cut in [3, HEADER_BYTES as usize + 1] {
            assert!(
                matches!(read_record(&mut &good[..cut]), Err(OutboxError::Torn)),
                "cut at {cut}"
            );
        }
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            read_record(&mut &flipped[..]),
            Err(OutboxError::Checksum { seq: 7 })
        ));
        let mut huge = good.clone();
        huge[0..4].copy_from_slice(&(MAX_RECORD_BYTES as u32 + 1).to_le_bytes());
        assert!(matches!(
            read_record(&mut &huge[..]),
            Err(OutboxError::TooLarge(n)) if n == MAX_RECORD_BYTES + 1
        ));
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
}
