//! SunSpec devices over Modbus: the information models, how their registers decode, and how a
//! device's model chain is found.
//!
//! Everything here is pure: registers in, values out. The Modbus I/O that feeds it lives in
//! [`crate::drivers::modbus`].

pub(crate) mod chain;
pub(crate) mod mapping;
pub(crate) mod models;
pub(crate) mod points;
