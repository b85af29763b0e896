//! texture-agent: the device-side agent of the Texture energy platform.
//!
//! Data path, inbound: [`link`] (MQTT over TLS) → [`dispatch`] → [`auth`] (attestation, trust,
//! policy, replay) → [`commands`] → reply via [`link`]. [`pairing`] sits beside `auth` and is
//! driven from the [`control`] socket. [`platform`] is the platform's signing side, used by
//! tests and tooling, never by the daemon.
//! [`agent`] wires the pieces together (the one composition root, also used by the fleet
//! bench); [`daemon`] runs it as the host's service; [`service`] speaks to systemd; [`storage`]
//! is the only way state reaches the disk. docs/PROTOCOL.md is the wire contract.

pub mod agent;
pub mod auth;
pub mod cli;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod device;
pub mod dispatch;
pub mod drivers;
pub mod identity;
pub mod link;
pub mod logging;
pub mod outbox;
pub mod pairing;
pub mod platform;
pub mod reply;
pub mod service;
#[cfg(feature = "sim")]
pub mod sim;
pub mod status;
pub mod storage;
pub mod telemetry;
pub mod topics;
