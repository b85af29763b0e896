//! The safety envelope: limits no command can cross (docs/PROTOCOL.md 4.7).
//!
//! Authorisation decides *who* may command a device; the envelope bounds *what* a command may do
//! to it. A genuine, correctly signed command that would set a home battery's backup reserve to
//! 0 % the night before a storm is refused here, whoever signed it.
//!
//! The check runs after a command's input has been validated and normalised by the catalog and
//! its device found, and before the runner hands it to any driver, so every driver kind
//! (simulated, process, and the protocol drivers to come) sits behind the same check.
//!
//! - [`limits`]: the installer's `[[limits]]` entries and their validation.
//! - [`envelope`]: the pure check of a planned command against the limits in force.
//! - [`policy`]: the platform's signed site policy, which may narrow the installer's limits and
//!   never widen them.

pub(crate) mod envelope;
pub(crate) mod limits;
// Not read by the router yet: it is being wired to `SitePolicy::accept` on another branch.
#[allow(dead_code)]
pub(crate) mod policy;

pub(crate) use envelope::Envelope;
pub(crate) use limits::DeviceLimits;
