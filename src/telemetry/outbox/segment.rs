//! One segment file of the outbox: which records it holds and where it lives.

use std::path::{Path, PathBuf};

/// A segment file: where it is and which records it holds.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) id: u64,
    pub(super) path: PathBuf,
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) records: u64,
    pub(super) bytes: u64,
}

/// Where segment `id` lives in `dir`. Zero-padded, so names sort as ids do.
pub(super) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.seg"))
}
