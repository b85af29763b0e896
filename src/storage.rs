//! Everything that must survive a restart or a power cut goes through here.
//!
//! The one primitive is [`write_atomic`]: write a temporary file in the same directory, fsync it,
//! rename it over the target and fsync the directory. A reader (or the next boot) therefore sees
//! either the old contents or the new ones, never a torn mix, and once the call returns the new
//! contents are on stable storage.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};

/// A storage failure, naming the file involved.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not valid JSON for this record: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// Wraps an I/O error on `path` as [`StorageError::Io`], for `map_err`.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Creates `dir` (and parents) with owner-only permissions if it does not exist.
///
/// A directory it creates is made durable in its parent (the parent is fsynced), as a file's
/// name would be: otherwise a power cut could take the new directory, and every file fsynced
/// into it, with it.
pub fn ensure_dir(dir: &Path) -> Result<(), StorageError> {
    use std::os::unix::fs::DirBuilderExt;
    let created: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))?;
    for new in created.iter().rev() {
        match new.parent() {
            Some(parent) if parent.as_os_str().is_empty() => sync_dir(Path::new("."))?,
            Some(parent) => sync_dir(parent)?,
            None => {}
        }
    }
    Ok(())
}

/// Fsyncs `dir`, which makes the names created, renamed or removed in it durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Atomically replaces `path` with `bytes`, created with `mode` (for example `0o600`).
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StorageError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Only the daemon writes its state, so one fixed temporary name suffices, and a leftover
    // from a crash is simply overwritten by the next write.
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    // The new contents are in place from here on, so this is not reported as a failure (the
    // caller must not believe the old contents are still current). If it fails, the rename may
    // not survive a power cut; the old contents would then come back, which is still whole.
    if let Err(error) = sync_dir(dir) {
        tracing::warn!(%error, path = %path.display(), "directory fsync failed after replace");
    }
    Ok(())
}

/// Serialises `value` as JSON and writes it with [`write_atomic`].
pub fn write_json<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), StorageError> {
    let mut bytes = serde_json::to_vec_pretty(value).expect("state records serialise");
    bytes.push(b'\n');
    write_atomic(path, &bytes, mode)
}

/// Reads a JSON record; `Ok(None)` when the file does not exist yet.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StorageError> {
    match fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StorageError::Corrupt {
                    path: path.to_owned(),
                    source,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_write_replaces_contents_with_requested_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_json(&p, &vec![1, 2, 3], 0o600).unwrap();
        write_json(&p, &vec![4], 0o600).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&p).unwrap(), Some(vec![4]));
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_file_reads_as_none_and_garbage_as_corrupt() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.json");
        assert_eq!(read_json::<u32>(&p).unwrap(), None);
        fs::write(&p, b"{not json").unwrap();
        let e = read_json::<u32>(&p).unwrap_err().to_string();
        assert!(e.contains("x.json"), "{e}");
    }
}
