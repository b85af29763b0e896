//! Data path 1, inbound: what the platform sends the gateway, and the answers it gets.
//!
//! ```text
//! link ──► router ──► auth ──► commands::plan ──► safety ──► commands::runner ──► drivers
//!            │                       │                    │
//!            └─► pairing             └─ reply ────────────┴──► link (replies topic)
//! ```
//!
//! - [`router`]: the one task that owns the authorisation and pairing state; routes each
//!   message by its topic kind and sheds commands under a burst.
//! - [`auth`]: who may command this gateway (attestation, trust bundle, policy, replay journal).
//! - [`pairing`]: the Connect flow: pairing code, session and its control-socket clients, and
//!   the owner binding that authorisation reads.
//! - [`commands`]: what a command does (catalog, agent commands, the runner that owns a device
//!   command from its start to its recorded reply).
//! - [`safety`]: the safety envelope: the installer's limits, checked after a device command is
//!   planned and before the runner hands it to a driver.
//! - [`reply`]: the reply shapes and error codes every stage answers with.
//! - [`advertise`]: when the capabilities message goes out (settled, once per connection).

pub(crate) mod advertise;
pub mod auth;
pub mod commands;
pub mod pairing;
pub mod reply;
pub(crate) mod router;
pub(crate) mod safety;
