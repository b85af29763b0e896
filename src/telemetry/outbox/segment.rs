//! One segment file of the outbox, and what is left of it after a crash.
//!
//! Recovery trusts nothing it cannot check: it keeps each segment's records up to the first
//! that fails to read. Whatever follows is cut off the newest segment (a torn last write) and
//! counted as corrupt in an older one; a segment left with no intact record is deleted.

use std::fs::{self, File, OpenOptions};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use super::record::{read_record, HEADER_BYTES};
use super::{OutboxError, Recovery};
use crate::storage::io_err;

/// A segment file: where it is and which records it holds.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) id: u64,
    /// The epoch of the run that wrote it (every record in it has this epoch): a run never
    /// appends to a segment an earlier run left.
    pub(super) epoch: u64,
    pub(super) path: PathBuf,
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) records: u64,
    pub(super) bytes: u64,
}

/// Where segment `id` of `epoch` lives in `dir`: `{id:020}-{epoch}.seg`, zero-padded so names
/// sort as ids do. The epoch is in the name because the name is created with the file: a segment
/// that survives a power cut keeps the epoch it was written in, with no record format of its
/// own to migrate. Epoch 0 is an outbox written before epochs existed, named `{id:020}.seg`.
pub(super) fn segment_path(dir: &Path, id: u64, epoch: u64) -> PathBuf {
    if epoch == 0 {
        dir.join(format!("{id:020}.seg"))
    } else {
        dir.join(format!("{id:020}-{epoch}.seg"))
    }
}

/// The id and epoch a segment file's name gives, `None` for any other file.
pub(super) fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(".seg")?;
    let (id, epoch) = match stem.split_once('-') {
        Some((id, epoch)) => (id, epoch.parse().ok().filter(|e| *e > 0)?),
        None => (stem, 0),
    };
    if id.len() != 20 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((id.parse().ok()?, epoch))
}

impl Segment {
    /// Reads segment `id` of `epoch` in `dir` through, adding what it found to `recovery`. The
    /// newest segment (`is_last`) is cut back to its last intact record. `None` when no record
    /// is intact: the file is then deleted.
    pub(super) fn recover(
        dir: &Path,
        (id, epoch): (u64, u64),
        is_last: bool,
        recovery: &mut Recovery,
    ) -> Result<Option<Segment>, OutboxError> {
        let path = segment_path(dir, id, epoch);
        let file = File::open(&path).map_err(io_err(&path))?;
        let size = file.metadata().map_err(io_err(&path))?.len();
        let mut reader = BufReader::new(file);
        let (mut first, mut last, mut records, mut good_bytes) = (0, 0, 0, 0u64);
        loop {
            match read_record(&mut reader, epoch) {
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
                    if is_last {
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
        if is_last && good_bytes < size {
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
            return Ok(None);
        }
        Ok(Some(Segment {
            id,
            epoch,
            path,
            first_seq: first,
            last_seq: last,
            records,
            bytes: good_bytes,
        }))
    }
}
