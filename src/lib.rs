//! texture-agent: the device-side agent of the Texture energy platform.
//!
//! The two data paths are the two folders in the middle of the tree:
//!
//! ```text
//! inbound:  link ──► inbound::router ──► inbound::auth ──► inbound::commands ──► drivers
//!                                                               └── reply ──► link
//! outbound: drivers ──► telemetry (uplink state machine) ──► telemetry::outbox ──► link
//! ```
//!
//! [`agent`] is the one composition root (`Agent::build`, used by the daemon and the fleet
//! bench) plus the host glue (service, status, identity, logging). [`model`] is the shared
//! vocabulary with no I/O; [`storage`] is the only way state reaches the disk; [`config`] loads
//! and validates the settings. [`sim`] (feature `sim`) is the platform's side: the signer and
//! the one platform peer used by the simulator, the tests and the benches; never in the gateway
//! build. docs/PROTOCOL.md is the wire contract.
//!
//! **The surface.** The binary (`src/main.rs`), the integration tests, the `testkit` crate, the
//! benches and the fuzz target are the only users outside this crate. A module is `pub` here,
//! or in its parent, only when one of them needs it; everything else (the router, the runner,
//! the pairing session, storage, the daemon's host glue, status, logging, health, backoff, the
//! simulator's API and demo) is `pub(crate)`, so the compiler reports what nothing uses.

pub mod agent;
pub mod cli;
pub mod config;
pub mod drivers;
pub mod inbound;
pub mod link;
pub mod model;
#[cfg(feature = "sim")]
pub mod sim;
pub(crate) mod storage;
pub mod telemetry;
