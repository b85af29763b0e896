//! The read path: records after a sequence number, from memory when the uplink has kept up,
//! from the segment files otherwise.
//!
//! Normally the uplink reads exactly what was just appended, so the in-memory tail answers
//! without a system call. A re-send after a lost connection, or a reader that fell behind the
//! tail, reads the files, resuming at the [`Cursor`] the previous read left rather than scanning
//! the segment from its start.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};

use super::record::{read_record, HEADER_BYTES};
use super::{Cached, Cursor, Outbox, OutboxError, Record};
use crate::storage::StorageError;

/// Read buffer for [`Outbox::read_after`].
const READ_CHUNK: u64 = 64 * 1024;

impl Outbox {
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
}
