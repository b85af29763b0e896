//! The durable store-and-forward outbox for telemetry: append, read, acknowledge.
//!
//! **Why a small segment log and not redb.** The access pattern is a FIFO queue: append at the
//! head, read and delete from the tail, never update in place. A log of segment files does that
//! with sequential writes only, costs no B-tree pages or write amplification on flash, needs no
//! extra crate, and its failure mode after a power cut is simple to reason about: at worst a torn
//! last record, which the per-record CRC detects.
//!
//! **Layout.** `outbox/` in the state directory holds numbered segment files
//! (`00000000000000000001-7.seg`, ...: id, then the epoch that wrote it) and `meta.json`. A
//! record is `len: u32 LE | crc32(seq ‖ payload): u32 LE | seq: u64 LE | payload`. Sequence
//! numbers are per gateway and start at 1, so the platform can detect gaps and drop duplicates.
//!
//! **Durability.** Appends go to the page cache at once (so a crash of the *process* loses
//! nothing) and are fsynced by [`Outbox::sync`] on a timer (default 1 s), sparing flash from an
//! fsync per sample; a power cut can lose at most that window. Acknowledgements are recorded in
//! `meta.json`, and a fully acknowledged segment is deleted only after that record is durable,
//! so a crash of the process can cause re-sends (duplicates) but never reuse a sequence number.
//!
//! **Epochs.** A power cut is different: points numbered and *sent* within the last interval
//! may never have reached the disk, and the next run numbers new points from the last one that
//! did, so a sequence number the platform already holds is given again. Every run therefore
//! takes a new **epoch**, made durable in `meta.json` when the outbox opens, before it can store
//! a point. A record carries the epoch of the run that stored it (its segment's), a batch never
//! mixes epochs, and the platform tells points apart by `(epoch, seq)` (PROTOCOL 14.3).
//!
//! **Bounds.** Unacknowledged bytes are capped. When an append would exceed the cap the oldest
//! segment is dropped whole: exactly the oldest points go, their number is added to the persisted
//! `dropped` count, and the loss is reported in gateway health, never silent.
//!
//! **Where things are.** This file holds the types and the bookkeeping that ties them together
//! (opening, statistics, acknowledgement, sync); the record framing is in `record`, a segment
//! and its recovery after a crash in `segment`, the append path in `append` and the read path
//! (the in-memory tail, then the segment files) in `read`.

mod append;
mod read;
mod record;
mod segment;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::{self, StorageError};
pub use record::{HEADER_BYTES, MAX_RECORD_BYTES};
use segment::{segment_path, Segment};

const META_FILE: &str = "meta.json";
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
    /// The epoch of the run that stored it (see the module docs).
    pub epoch: u64,
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
    /// The epoch of the run that last opened the outbox (0 for an outbox from before epochs).
    #[serde(default)]
    epoch: u64,
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
    /// Segment files created since the directory was last fsynced. Until it is, a power cut
    /// may take a new file's name away with every record in it, fsynced or not.
    dir_dirty: bool,
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

impl Outbox {
    /// Opens (or creates) the outbox in `dir`, recovering from a torn tail, and starts a new
    /// epoch: durable when this returns, so no point of this run can be stored without it.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Outbox, Recovery), OutboxError> {
        storage::ensure_dir(dir)?;
        let meta: Meta = storage::read_json(&dir.join(META_FILE))?.unwrap_or_default();
        let ids = segment_ids(dir)?;
        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        let last_id = ids.last().map(|(id, _)| *id);
        for (id, epoch) in ids {
            let is_last = Some(id) == last_id;
            if let Some(segment) = Segment::recover(dir, (id, epoch), is_last, &mut recovery)? {
                segments.push_back(segment);
            }
        }
        let next_segment_id = segments.back().map_or(1, |s: &Segment| s.id + 1);
        let next_seq = segments
            .back()
            .map_or(1, |s| s.last_seq + 1)
            .max(meta.next_seq)
            .max(meta.acked + 1);
        // Above every epoch on disk too, in case `meta.json` was lost while segments were not.
        let epoch = segments
            .iter()
            .map(|s| s.epoch)
            .max()
            .unwrap_or(0)
            .max(meta.epoch)
            + 1;
        let meta = Meta {
            next_seq,
            epoch,
            ..meta
        };
        storage::write_json(&dir.join(META_FILE), &meta, 0o600)?;
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
            dir_dirty: false,
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

    /// The epoch of this run: every record it appends has it.
    pub fn epoch(&self) -> u64 {
        self.meta.epoch
    }

    /// The highest acknowledged sequence number.
    pub fn acked(&self) -> u64 {
        self.meta.acked
    }

    /// The sequence number of the newest record, 0 if none was ever written.
    pub fn last_seq(&self) -> u64 {
        self.meta.next_seq - 1
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
                    // Former heads are this run's segments, so of this run's epoch.
                    path: segment_path(&self.dir, *id, self.meta.epoch),
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
        if self.dir_dirty {
            storage::sync_dir(&self.dir)?;
            self.dir_dirty = false;
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

/// The ids and epochs of the segment files in `dir`, oldest first.
fn segment_ids(dir: &Path) -> Result<Vec<(u64, u64)>, OutboxError> {
    let mut ids: Vec<(u64, u64)> = fs::read_dir(dir)
        .map_err(storage::io_err(dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| segment::parse_name(e.file_name().to_str()?))
        .collect();
    ids.sort_unstable();
    Ok(ids)
}
