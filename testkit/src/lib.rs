//! The test kit that texture-agent's integration tests and benches share, one module per
//! concern:
//!
//! | module | what |
//! |---|---|
//! | [`pki`] | a CA made at test time, and the broker's certificate |
//! | [`mosquitto`] | a private mosquitto per test, mutual TLS and a per-device ACL |
//! | [`agent`] | the agent binary as a child process, its configuration and its JSON log |
//! | [`platform`] | the MQTT peer that plays the platform (the simulator's own peer), and the [`Testbed`] most end-to-end tests start from |
//! | [`schema`], [`regex`] | a small JSON Schema evaluator for the catalog's schemas |
//! | [`procfs`] | RSS and CPU time of a process, from /proc |
//! | [`fleet`] | a fleet of in-process agent sessions against one broker |
//! | [`modbus`] | real Modbus TCP servers (pymodbus) that look like SunSpec devices, maps generated from the official model definitions |
//! | [`ocpp`] | real OCPP 1.6J charge points (mobilityhouse's `ocpp`), driven by JSON control lines, every frame logged raw |
//! | [`crashfs`] | a directory that loses at a power cut what POSIX lets a cut take (FUSE, `tests/powercut/crashfs.py`) |
//! | [`pyenv`] | the pinned Python environment in `target/pyenv` that they run in |
//! | [`relay`] | a TCP relay that counts the bytes on the gateway's socket, and can cut it |
//!
//! Nothing here touches a fixed port or a file outside the test's temporary directory, so tests
//! run in parallel and leave nothing behind. What only the agent's own test targets know (the
//! binary's path, `CARGO_TARGET_TMPDIR`) is passed in by the caller.

pub mod agent;
pub mod crashfs;
pub mod fleet;
pub mod modbus;
pub mod mosquitto;
pub mod ocpp;
pub mod pki;
pub mod platform;
pub mod procfs;
pub mod pyenv;
pub mod regex;
pub mod relay;
pub mod schema;

pub use agent::{
    agent_binary, agent_command, agent_process, counting_driver, firehose_script, Agent,
    AgentConfig,
};
pub use crashfs::CrashFs;
pub use modbus::{sunspec_model_json, SunSpecServer};
pub use mosquitto::{free_port, Mosquitto, PLATFORM_CLIENT};
pub use ocpp::ChargePoint;
pub use pki::{Ca, CertFiles, Pki, BROKER_NAME};
pub use platform::{device_topic, platform_peer, Peer, Seen, Testbed};
pub use procfs::{cpu_seconds, proc_status_kib};
pub use pyenv::pyenv_python;
pub use relay::ByteRelay;
