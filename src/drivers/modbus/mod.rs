//! Modbus: the links to devices, and what runs over them.
//!
//! - [`link`]: one connection per physical link, every request through it one at a time, a
//!   timeout on each, and a fresh connection after any error.
//! - [`discover`]: a unit's SunSpec models, found and read over a link (the decoding itself is
//!   pure, in [`crate::drivers::sunspec`]).
//! - [`driver`]: the `sunspec` driver kind: discovery, polling and commands over one link.

pub(crate) mod discover;
pub mod driver;
pub(crate) mod link;
pub(crate) mod profiles;
pub(crate) mod serial;
