//! texture-agent: the device-side agent of the Texture energy platform.
//!
//! Data path, inbound: [`link`] (MQTT over TLS) → auth → commands → drivers → reply via [`link`].
//! Outbound: drivers → telemetry → outbox → [`link`]. [`daemon`] wires these together;
//! [`service`] speaks to systemd; [`storage`] is the only way state reaches the disk.

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
