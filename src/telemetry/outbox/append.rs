//! The append path: records framed into one buffer and written with as few system calls as
//! possible, the cap enforced by dropping whole segments, and recent records kept in memory.
//!
//! Appends are the hot path of telemetry (every sample of every device), so a call writes once
//! per segment it touches rather than once per record, and never fsyncs: durability comes from
//! [`Outbox::sync`] on a timer (see the module docs of `outbox`).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use super::record::{self, HEADER_BYTES, MAX_RECORD_BYTES};
use super::segment::{segment_path, Segment};
use super::{Cached, Cursor, Outbox, OutboxError, Record, TAIL_BYTES};
use crate::storage::StorageError;

impl Outbox {
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
        let mut tail_room = self.tail_room();
        let mut cached = Vec::new();
        for payload in payloads {
            let payload = payload.as_ref();
            let size = HEADER_BYTES + payload.len() as u64;
            self.make_room(&mut buf, size, &mut unacked)?;
            let end = self.buffer_record(&mut buf, payload)?;
            if payload.len() <= tail_room {
                tail_room -= payload.len();
                cached.push(Cached {
                    record: Record {
                        epoch: self.meta.epoch,
                        seq: end.seq,
                        payload: payload.to_vec(),
                    },
                    end,
                });
            } else {
                tail_room = 0;
            }
            unacked += size;
        }
        self.write_head(&mut buf)?;
        // Only records known to be written join the tail.
        self.tail_bytes += cached.iter().map(|c| c.record.payload.len()).sum::<usize>();
        self.tail.extend(cached);
        Ok(self.meta.next_seq - 1)
    }

    /// Room in the in-memory tail for the records of one append call.
    ///
    /// The tail must stay one contiguous run, so it takes records only if it ends just before
    /// them, and only until the first that does not fit. When it is full (the link is down or
    /// slow) nothing is copied at all: no allocation churn during an outage, and the reader
    /// meets the tail again once it has caught up.
    fn tail_room(&self) -> usize {
        if self
            .tail
            .back()
            .is_none_or(|last| last.record.seq + 1 == self.meta.next_seq)
        {
            TAIL_BYTES - self.tail_bytes
        } else {
            0
        }
    }

    /// Drops the oldest segments until a record of `size` more bytes fits under the cap,
    /// writing `buf` out first. `unacked` counts the unacknowledged bytes, `buf` included.
    fn make_room(
        &mut self,
        buf: &mut Vec<u8>,
        size: u64,
        unacked: &mut u64,
    ) -> Result<(), OutboxError> {
        // `unacked > 0`: with nothing left to drop a record larger than the whole cap is
        // kept rather than looping forever.
        while *unacked > 0 && *unacked + size > self.max_bytes {
            self.write_head(buf)?;
            self.drop_oldest_segment()?;
            *unacked = self.unacked().1;
        }
        Ok(())
    }

    /// Gives `payload` the next sequence number and adds it to `buf`, counted in the head
    /// segment (started first if the record would not fit in the current one). Returns the
    /// cursor just after the record.
    fn buffer_record(&mut self, buf: &mut Vec<u8>, payload: &[u8]) -> Result<Cursor, OutboxError> {
        let size = HEADER_BYTES + payload.len() as u64;
        let needs_new = self
            .segments
            .back()
            .is_none_or(|s| s.bytes + buf.len() as u64 + size > self.segment_bytes)
            || self.head.is_none();
        if needs_new {
            self.write_head(buf)?;
            self.start_segment()?;
        }
        let seq = self.meta.next_seq;
        record::encode(buf, seq, payload);
        self.meta.next_seq = seq + 1;
        let seg = self.segments.back_mut().expect("a head segment");
        if seg.records == 0 {
            seg.first_seq = seq;
        }
        seg.last_seq = seq;
        seg.records += 1;
        Ok(Cursor {
            seq,
            id: seg.id,
            offset: seg.bytes + buf.len() as u64,
        })
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
        let path = segment_path(&self.dir, id, self.meta.epoch);
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
        self.dir_dirty = true;
        self.segments.push_back(Segment {
            id,
            epoch: self.meta.epoch,
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
}
