//! The shared vocabulary: what every part of the agent speaks about, with no I/O.
//!
//! - [`gateway`]: the gateway's id on the platform (the thing this daemon runs on).
//! - [`device`]: the platform's device model for the appliances behind the gateway (batteries,
//!   inverters, chargers, thermostats, vehicles, meters): their types, states and health.
//! - [`clock`]: the one wall clock every timestamp the agent signs or reports comes from.
//! - [`backoff`]: the retry schedule shared by the link's reconnects and driver restarts.
//! - [`rejection`]: how a settings section names the key it cannot use.
//!
//! Nothing here imports another part of the agent, so any module may depend on it without
//! creating a cycle.

pub(crate) mod backoff;
pub mod clock;
pub mod device;
pub(crate) mod gateway;
pub(crate) mod rejection;
pub mod safety;
