//! The replay table: every verified command id, kept until its attestation can no longer verify.
//!
//! It is a small append-only journal in the state directory rather than a database: one line per
//! event, each line prefixed with its CRC-32 so a line torn by a power cut is recognised and
//! skipped instead of being half-trusted. An entry is written and fsynced *before* the command
//! runs, so a crash between the two can never let the same command run twice; the reply is
//! appended when it is known, so a duplicate delivery gets the very same reply again.
//!
//! The table is bounded. An entry is needed only until its attestation expires (plus the allowed
//! clock skew), and is pruned after that. If the table is still full, new commands are refused:
//! forgetting a live entry would re-open the door to replaying it.
//!
//! The journal also carries the *time floor*: the highest issued-at of any attestation the
//! gateway allowed (and, through [`ReplayWindow::raise_floor`], of any trust bundle it accepted).
//! Only platform-signed times raise it. A gateway that boots with its clock in 1970 still knows
//! time has passed at least that far, so stale attestations stay expired.
//!
//! Entries are forgotten against the floor, **never** against the system clock: a clock that
//! runs ahead (a bad RTC, a modem giving local time as UTC, a hostile NTP server) must not be able
//! to prune an entry whose attestation the platform still considers live, or a broker could
//! replay the command once the clock is corrected. Since the effective time used for decisions
//! is never below the floor, an entry is dropped only once its attestation is expired for every
//! later decision too.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::storage::{self, StorageError};

pub const JOURNAL_FILE: &str = "replay.journal";

/// One command id's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub issued_at: u64,
    /// The device the command was for, when it names one (so an interrupted command can be
    /// reported for the right device after a restart).
    pub target: Option<String>,
    /// When the entry may be forgotten: the attestation's `exp` plus the allowed skew.
    pub forget_after: u64,
    /// The reply sent for this command, once known.
    pub reply: Option<Vec<u8>>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
enum Record {
    Floor {
        floor: u64,
    },
    Seen {
        jti: String,
        iat: u64,
        forget_after: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<String>,
    },
    Done {
        jti: String,
        reply: String,
    },
}

/// What opening the journal found, for the log and for `status`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadReport {
    /// Lines skipped because their checksum or JSON was bad (a torn write).
    pub damaged_lines: usize,
    /// Commands recorded as seen but never given a reply: the agent stopped mid-command.
    pub interrupted: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("replay table is full ({capacity} live entries); retry after {retry_after_secs} s")]
    Full {
        capacity: usize,
        retry_after_secs: u64,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

#[derive(Debug)]
pub struct ReplayWindow {
    path: PathBuf,
    file: File,
    entries: HashMap<String, Entry>,
    capacity: usize,
    floor: u64,
    lines: usize,
}

fn encode(record: &Record) -> String {
    let json = serde_json::to_string(record).expect("records serialise");
    format!("{:08x} {json}\n", crc32fast::hash(json.as_bytes()))
}

fn decode(line: &str) -> Option<Record> {
    let (crc, json) = line.split_once(' ')?;
    let crc = u32::from_str_radix(crc, 16).ok()?;
    (crc32fast::hash(json.as_bytes()) == crc).then(|| serde_json::from_str(json).ok())?
}

fn open_append(path: &Path) -> Result<File, StorageError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| StorageError::Io {
            path: path.to_owned(),
            source,
        })
}

impl ReplayWindow {
    /// Opens (or creates) the journal in `state_dir` and replays it into memory.
    ///
    /// `floor_at_least` is a time the caller knows has passed from platform-signed evidence of
    /// its own (the build's time floor, the accepted trust bundle's `iat`); it is *not* the system
    /// clock, which never decides what is forgotten (see the module docs).
    pub fn open(
        state_dir: &Path,
        capacity: usize,
        floor_at_least: u64,
    ) -> Result<(Self, LoadReport), StorageError> {
        let path = state_dir.join(JOURNAL_FILE);
        let mut report = LoadReport::default();
        let mut entries: HashMap<String, Entry> = HashMap::new();
        let mut floor = floor_at_least;
        let mut lines = 0;
        if let Ok(file) = File::open(&path) {
            for line in BufReader::new(file).split(b'\n') {
                let line = line.map_err(|source| StorageError::Io {
                    path: path.clone(),
                    source,
                })?;
                lines += 1;
                match std::str::from_utf8(&line).ok().and_then(decode) {
                    Some(Record::Floor { floor: f }) => floor = floor.max(f),
                    Some(Record::Seen {
                        jti,
                        iat,
                        forget_after,
                        target,
                    }) => {
                        floor = floor.max(iat);
                        entries.insert(
                            jti,
                            Entry {
                                issued_at: iat,
                                target,
                                forget_after,
                                reply: None,
                            },
                        );
                    }
                    Some(Record::Done { jti, reply }) => {
                        if let Some(e) = entries.get_mut(&jti) {
                            e.reply = Some(reply.into_bytes());
                        }
                    }
                    None => report.damaged_lines += 1,
                }
            }
        }
        report.interrupted = entries
            .iter()
            .filter(|(_, e)| e.reply.is_none())
            .map(|(jti, _)| jti.clone())
            .collect();
        report.interrupted.sort();
        let created = !path.exists();
        let file = open_append(&path)?;
        if created {
            // The journal's name must be as durable as the records fsynced into it.
            storage::sync_dir(state_dir)?;
        }
        let mut window = ReplayWindow {
            path,
            file,
            entries,
            capacity,
            floor,
            lines,
        };
        window.prune();
        if report.damaged_lines > 0 || window.lines > 2 * window.entries.len() + 64 {
            window.compact()?;
        }
        Ok((window, report))
    }

    pub fn get(&self, jti: &str) -> Option<&Entry> {
        self.entries.get(jti)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The highest platform-signed time seen (see the module docs).
    pub fn time_floor(&self) -> u64 {
        self.floor
    }

    /// Raises the time floor to `t`, a platform-signed time (an accepted trust bundle's `iat`).
    /// In memory only: the caller persists its own evidence, and the floor reaches the journal
    /// with the next compaction.
    pub fn raise_floor(&mut self, t: u64) {
        self.floor = self.floor.max(t);
    }

    /// Forgets the entries whose attestations are expired even at the floor.
    fn prune(&mut self) {
        let floor = self.floor;
        self.entries.retain(|_, e| e.forget_after > floor);
    }

    /// Durably records a newly verified command id, before anything acts on it.
    pub fn record(
        &mut self,
        jti: &str,
        issued_at: u64,
        forget_after: u64,
        now: u64,
    ) -> Result<(), ReplayError> {
        self.record_for(jti, None, issued_at, forget_after, now)
    }

    /// [`ReplayWindow::record`] for a command addressed to `target`.
    ///
    /// `issued_at` must be the verified, allowed attestation's `iat`: it raises the time floor
    /// (even when the table turns out to be full, since it is platform-signed all the same).
    /// `now` is the effective time, used only to say when to retry.
    pub fn record_for(
        &mut self,
        jti: &str,
        target: Option<&str>,
        issued_at: u64,
        forget_after: u64,
        now: u64,
    ) -> Result<(), ReplayError> {
        self.raise_floor(issued_at);
        if self.entries.len() >= self.capacity {
            self.prune();
            if self.entries.len() >= self.capacity {
                let soonest = self
                    .entries
                    .values()
                    .map(|e| e.forget_after)
                    .min()
                    .unwrap_or(now);
                return Err(ReplayError::Full {
                    capacity: self.capacity,
                    retry_after_secs: soonest.saturating_sub(now).max(1),
                });
            }
        }
        self.append(&Record::Seen {
            jti: jti.to_owned(),
            iat: issued_at,
            forget_after,
            target: target.map(str::to_owned),
        })?;
        self.floor = self.floor.max(issued_at);
        self.entries.insert(
            jti.to_owned(),
            Entry {
                issued_at,
                target: target.map(str::to_owned),
                forget_after,
                reply: None,
            },
        );
        Ok(())
    }

    /// Durably attaches the reply to a recorded command id.
    pub fn complete(&mut self, jti: &str, reply: &[u8]) -> Result<(), ReplayError> {
        let Some(entry) = self.entries.get_mut(jti) else {
            return Ok(());
        };
        entry.reply = Some(reply.to_vec());
        let reply = String::from_utf8_lossy(reply).into_owned();
        self.append(&Record::Done {
            jti: jti.to_owned(),
            reply,
        })?;
        if self.lines > 2 * self.entries.len() + 1024 {
            self.compact()?;
        }
        Ok(())
    }

    fn append(&mut self, record: &Record) -> Result<(), StorageError> {
        let line = encode(record);
        let io = |source| StorageError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(|source| StorageError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.lines += 1;
        Ok(())
    }

    /// Rewrites the journal with only the live entries, atomically.
    fn compact(&mut self) -> Result<(), StorageError> {
        let mut text = encode(&Record::Floor { floor: self.floor });
        let mut lines = 1;
        for (jti, e) in &self.entries {
            text.push_str(&encode(&Record::Seen {
                jti: jti.clone(),
                iat: e.issued_at,
                forget_after: e.forget_after,
                target: e.target.clone(),
            }));
            lines += 1;
            if let Some(reply) = &e.reply {
                text.push_str(&encode(&Record::Done {
                    jti: jti.clone(),
                    reply: String::from_utf8_lossy(reply).into_owned(),
                }));
                lines += 1;
            }
        }
        storage::write_atomic(&self.path, text.as_bytes(), 0o600)?;
        self.file = open_append(&self.path)?;
        self.lines = lines;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_and_replies_survive_a_restart() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, _) = ReplayWindow::open(d.path(), 10, 0).unwrap();
        w.record("c1", 90, 500, 100).unwrap();
        w.complete("c1", br#"{"ok":true}"#).unwrap();
        w.record("c2", 95, 500, 100).unwrap();
        drop(w);
        let (w, report) = ReplayWindow::open(d.path(), 10, 0).unwrap();
        assert_eq!(
            w.get("c1").unwrap().reply.as_deref(),
            Some(&br#"{"ok":true}"#[..])
        );
        assert_eq!(report.interrupted, vec!["c2".to_string()]);
        assert_eq!(w.time_floor(), 95);
    }

    #[test]
    fn expired_entries_are_forgotten_and_a_full_table_refuses() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, _) = ReplayWindow::open(d.path(), 2, 100).unwrap();
        w.record("a", 100, 150, 100).unwrap();
        w.record("b", 100, 300, 100).unwrap();
        match w.record("c", 100, 300, 120) {
            Err(ReplayError::Full {
                retry_after_secs, ..
            }) => assert_eq!(retry_after_secs, 30),
            other => panic!("expected Full, got {other:?}"),
        }
        // Once a platform-signed time past "a"'s expiry arrives there is room again, and "b" is
        // still remembered.
        w.record("c", 151, 300, 151).unwrap();
        assert!(w.get("a").is_none() && w.get("b").is_some() && w.get("c").is_some());
    }

    #[test]
    fn the_clock_alone_never_makes_an_entry_forgettable() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, _) = ReplayWindow::open(d.path(), 2, 0).unwrap();
        w.record("a", 100, 150, 100).unwrap();
        w.record("b", 100, 300, 100).unwrap();
        // A clock a day ahead is no evidence: the table stays full and "a" stays known...
        assert!(matches!(
            w.record("c", 100, 300, 100 + 86_400),
            Err(ReplayError::Full { .. })
        ));
        assert!(w.get("a").is_some());
        drop(w);
        // ...and so does reopening it (the old code pruned at open with the system clock).
        let (w, _) = ReplayWindow::open(d.path(), 2, 0).unwrap();
        assert!(w.get("a").is_some() && w.get("b").is_some());
        assert_eq!(w.time_floor(), 100);
    }

    #[test]
    fn a_raised_floor_forgets_expired_entries_and_survives_compaction() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, _) = ReplayWindow::open(d.path(), 2, 0).unwrap();
        w.record("a", 100, 150, 100).unwrap();
        w.record("b", 100, 300, 100).unwrap();
        w.raise_floor(200);
        w.record("c", 120, 400, 200).unwrap();
        assert!(w.get("a").is_none(), "expired at the floor");
        assert_eq!(w.time_floor(), 200, "an older iat never lowers the floor");
        drop(w);
        // The floor given at open counts too.
        let (w, _) = ReplayWindow::open(d.path(), 2, 350).unwrap();
        assert!(w.get("b").is_none() && w.get("c").is_some());
        assert_eq!(w.time_floor(), 350);
    }

    #[test]
    fn a_torn_tail_is_skipped_and_intact_lines_kept() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, _) = ReplayWindow::open(d.path(), 10, 100).unwrap();
        w.record("keep", 90, 500, 100).unwrap();
        w.record("torn", 91, 500, 100).unwrap();
        drop(w);
        let path = d.path().join(JOURNAL_FILE);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        let (w, report) = ReplayWindow::open(d.path(), 10, 100).unwrap();
        assert_eq!(report.damaged_lines, 1);
        assert!(w.get("keep").is_some());
        assert!(w.get("torn").is_none());
    }

    #[test]
    fn a_flipped_bit_fails_the_checksum() {
        let line = encode(&Record::Seen {
            jti: "x".into(),
            iat: 1,
            forget_after: 2,
            target: None,
        });
        assert!(decode(line.trim_end()).is_some());
        let flipped = line.trim_end().replace("\"iat\":1", "\"iat\":3");
        assert!(decode(&flipped).is_none());
    }

    #[test]
    fn compaction_keeps_live_entries_and_the_floor() {
        let d = tempfile::tempdir().unwrap();
        let (mut w, _) = ReplayWindow::open(d.path(), 10_000, 0).unwrap();
        for i in 0..2_000u64 {
            w.record(&format!("c{i}"), 1_000 + i, 1_010 + i, 0).unwrap();
            w.complete(&format!("c{i}"), b"{}").unwrap();
        }
        drop(w);
        // At the floor 2999 only c1990.. are still live (forget_after = 1010 + i > 2999).
        let (w, _) = ReplayWindow::open(d.path(), 10_000, 0).unwrap();
        assert_eq!(w.len(), 10);
        assert_eq!(w.time_floor(), 2_999);
        let lines = std::fs::read_to_string(d.path().join(JOURNAL_FILE))
            .unwrap()
            .lines()
            .count();
        assert!(lines <= 1 + 2 * 10, "journal not compacted: {lines} lines");
    }
}
