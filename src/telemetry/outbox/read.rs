//! The read path: records after a sequence number, from memory when the uplink has kept up,
//! from the segment files otherwise.
//!
//! Normally the uplink reads exactly what was just appended, so the in-memory tail answers
//! without a system call. A re-send after a lost connection, or a reader that fell behind the
//! tail, reads the files, resuming at the [`Cursor`] the previous read left rather than scanning
//! the segment from its start.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::ops::ControlFlow;

use super::record::{read_record, HEADER_BYTES};
use super::segment::Segment;
use super::{Cached, Cursor, Outbox, OutboxError, Record};
use crate::storage::StorageError;

/// Read buffer for [`Outbox::read_after`].
const READ_CHUNK: u64 = 64 * 1024;

/// The records one read returns, and its limits.
struct Batch {
    records: Vec<Record>,
    /// Payload bytes of `records`.
    bytes: usize,
    max_records: usize,
    max_bytes: usize,
    /// The cursor just after the last record read from disk.
    end: Option<Cursor>,
}

impl Batch {
    /// Adds `record`, read from disk and ending at `end`. Breaks once the batch is full.
    fn push(&mut self, record: Record, end: Cursor) -> ControlFlow<()> {
        self.bytes += record.payload.len();
        self.end = Some(end);
        self.records.push(record);
        if self.records.len() >= self.max_records || self.bytes >= self.max_bytes {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    }
}

impl Outbox {
    /// Reads up to `max_records` records (and about `max_bytes`) with `seq > after`, in order,
    /// all of one epoch: a read stops where the records of a later run begin, so the batch it
    /// becomes can state its epoch once.
    pub fn read_after(
        &mut self,
        after: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, OutboxError> {
        let after = after.max(self.meta.acked);
        // Cached records up to `after` were read already or acknowledged.
        while self.tail.front().is_some_and(|c| c.record.seq <= after) {
            self.pop_tail();
        }
        if self.tail.front().is_some_and(|c| c.record.seq == after + 1) {
            return Ok(self.read_tail(max_records, max_bytes));
        }
        let mut batch = Batch {
            records: Vec::new(),
            bytes: 0,
            max_records,
            max_bytes,
            end: None,
        };
        self.read_segments(after, &mut batch)?;
        if batch.end.is_some() {
            self.cursor = batch.end;
        }
        Ok(batch.records)
    }

    /// Takes records from the in-memory tail, which starts just after the last one read.
    fn read_tail(&mut self, max_records: usize, max_bytes: usize) -> Vec<Record> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max_records && bytes < max_bytes {
            let Some(c) = self.pop_tail() else { break };
            bytes += c.record.payload.len();
            self.cursor = Some(c.end);
            out.push(c.record);
        }
        out
    }

    /// Reads records with `seq > after` from the segment files into `batch` until it is full,
    /// keeping the last file used open for the next read.
    fn read_segments(&mut self, after: u64, batch: &mut Batch) -> Result<(), OutboxError> {
        let Some(start) = self.segments.iter().position(|s| s.last_seq > after) else {
            return Ok(());
        };
        let mut reader_file = self.reader.take();
        for seg in self.segments.iter().skip(start) {
            if batch.records.first().is_some_and(|r| r.epoch != seg.epoch) {
                break;
            }
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
            let full = read_segment(seg, &mut file, offset, after, batch)?;
            reader_file = Some((seg.id, file));
            if full.is_break() {
                break;
            }
        }
        self.reader = reader_file;
        Ok(())
    }

    fn pop_tail(&mut self) -> Option<Cached> {
        let c = self.tail.pop_front()?;
        self.tail_bytes -= c.record.payload.len();
        Some(c)
    }
}

/// Reads the records of `seg` with `seq > after`, from `offset` in its open `file`, into
/// `batch`. Breaks once the batch is full.
fn read_segment(
    seg: &Segment,
    file: &mut File,
    offset: u64,
    after: u64,
    batch: &mut Batch,
) -> Result<ControlFlow<()>, OutboxError> {
    file.seek(SeekFrom::Start(offset))
        .map_err(|source| StorageError::Io {
            path: seg.path.clone(),
            source,
        })?;
    // One read for a typical batch (100 points ≈ 28 KiB) rather than 8 KiB at a time.
    let left = seg.bytes - offset;
    let mut reader = BufReader::with_capacity(left.min(READ_CHUNK) as usize, (&*file).take(left));
    let mut pos = offset;
    loop {
        let rec = match read_record(&mut reader, seg.epoch) {
            Ok(Some(rec)) => rec,
            Ok(None) => return Ok(ControlFlow::Continue(())),
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
                return Ok(ControlFlow::Continue(()));
            }
        };
        pos += HEADER_BYTES + rec.payload.len() as u64;
        if rec.seq <= after {
            continue;
        }
        let end = Cursor {
            seq: rec.seq,
            id: seg.id,
            offset: pos,
        };
        if batch.push(rec, end).is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
}
