//! The one wall clock: every timestamp the agent signs or reports is read from a [`Clock`].
//!
//! A gateway's clock can be wrong: a board without a battery-backed RTC boots in 1970 until NTP
//! answers, and a misconfigured one can run days ahead. The agent cannot fix that, but it can
//! refuse to go backwards past what the platform itself has signed: the *time floor* (the latest
//! `iat` of an allowed attestation or an accepted trust bundle, and the build date;
//! docs/PROTOCOL.md 8). [`Clock::now`] is the later of the system clock and that floor, so
//! commands are judged, replies stamped (`executedAt`), presence and telemetry timestamped, and
//! pairing requests signed against the same time.
//!
//! The floor is *owned* by the replay journal (`inbound::auth::replay`), which persists it; the
//! authoriser mirrors every rise into its [`Clock`], and every other part of the agent holds a
//! clone of that one handle (`Clock` is an `Arc` inside), so nobody reads a copy that lags.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// The system clock in Unix milliseconds (0 if it reads before 1970).
pub fn system_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The system clock in Unix seconds. For what is not a timestamp the agent reports (the
/// simulated devices' time of day, the simulated platform's own clock); everything else reads a
/// [`Clock`].
pub fn system_secs() -> u64 {
    system_millis() / 1000
}

/// Where a [`Clock`] reads the time before the floor applies.
#[derive(Clone, Copy)]
enum Source {
    System,
    /// A replacement in Unix seconds, for tests of gateways whose clock is wrong.
    Seconds(fn() -> u64),
}

/// The agent's clock: the system clock, never earlier than the time floor. Cheap to clone;
/// clones share the floor.
#[derive(Clone)]
pub struct Clock {
    source: Source,
    /// Unix seconds; only ever raised.
    floor: Arc<AtomicU64>,
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("floor", &self.floor())
            .finish_non_exhaustive()
    }
}

impl Default for Clock {
    fn default() -> Clock {
        Clock::system()
    }
}

impl Clock {
    /// The system clock with no floor yet.
    pub fn system() -> Clock {
        Clock {
            source: Source::System,
            floor: Arc::new(AtomicU64::new(0)),
        }
    }

    /// This clock (and its floor) reading `seconds` instead of the system clock.
    pub fn with_source(&self, seconds: fn() -> u64) -> Clock {
        Clock {
            source: Source::Seconds(seconds),
            floor: Arc::clone(&self.floor),
        }
    }

    /// The effective time in Unix seconds: the later of the source and the floor.
    pub fn now(&self) -> u64 {
        (self.source_millis() / 1000).max(self.floor())
    }

    /// The effective time in Unix milliseconds (telemetry's resolution).
    pub fn now_millis(&self) -> u64 {
        self.source_millis().max(self.floor().saturating_mul(1000))
    }

    /// The time floor, Unix seconds.
    pub fn floor(&self) -> u64 {
        self.floor.load(Ordering::Relaxed)
    }

    /// Raises the floor to `at` (Unix seconds); a lower value changes nothing.
    pub fn raise_floor(&self, at: u64) {
        self.floor.fetch_max(at, Ordering::Relaxed);
    }

    fn source_millis(&self) -> u64 {
        match self.source {
            Source::System => system_millis(),
            Source::Seconds(f) => f().saturating_mul(1000),
        }
    }
}

/// Formats Unix seconds as RFC 3339 UTC (`2026-11-27T13:45:00Z`), as the platform's API does.
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3_600,
        secs % 3_600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_1970() -> u64 {
        60
    }

    #[test]
    fn a_clock_behind_the_floor_reads_the_floor_in_every_unit() {
        let clock = Clock::system().with_source(in_1970);
        assert_eq!(clock.now(), 60);
        clock.raise_floor(1_800_000_000);
        assert_eq!(clock.now(), 1_800_000_000);
        assert_eq!(clock.now_millis(), 1_800_000_000_000);
    }

    #[test]
    fn the_floor_only_rises_and_every_clone_sees_it() {
        let clock = Clock::system().with_source(in_1970);
        let other = clock.clone();
        clock.raise_floor(1_000);
        clock.raise_floor(900);
        assert_eq!(other.floor(), 1_000);
        assert_eq!(other.now(), 1_000);
    }

    #[test]
    fn a_synchronised_clock_is_the_system_clock() {
        let clock = Clock::system();
        clock.raise_floor(1_000);
        let before = system_millis();
        let now = clock.now_millis();
        assert!(now >= before && now <= system_millis());
    }
}
