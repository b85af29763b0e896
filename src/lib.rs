//! texture-agent: the device-side agent of the Texture energy platform.
//!
//! Data path, inbound: [`link`] (MQTT over TLS) → command pipeline → reply via [`link`].
//! [`daemon`] wires the pieces together; [`service`] speaks to systemd; [`storage`] is the only
//! way state reaches the disk. docs/PROTOCOL.md is the wire contract.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod device;
pub mod link;
pub mod logging;
pub mod reply;
pub mod service;
pub mod status;
pub mod storage;
pub mod topics;
