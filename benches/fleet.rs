//! A fleet of gateways against one broker, in one process: connection set-up, steady-state
//! telemetry and command round trips, and the reconnect wave after the broker is killed.
//!
//!     cargo bench --bench fleet                      # 1000 sessions
//!     FLEET_SIZE=100 FLEET_STEADY_SECS=5 cargo bench --bench fleet
//!
//! Every `FLEET_*` knob is listed on `FleetConfig` in testkit/src/fleet.rs, which also
//! explains the scenario. Prints a table and writes the figures as JSON to
//! `target/fleet-summary.json` (or `FLEET_JSON`) for comparison between versions.
//! docs/PERFORMANCE.md has recorded results.

use texture_agent_testkit::fleet;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let cfg = fleet::FleetConfig::production(1000).with_env_overrides();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    let report = runtime.block_on(fleet::run(cfg, |line| {
        eprintln!("[{:>6.1} s] {line}", started.elapsed().as_secs_f64())
    }));
    print!("{}", fleet::summary(&report));
    let path = std::env::var("FLEET_JSON").unwrap_or_else(|_| "target/fleet-summary.json".into());
    std::fs::write(&path, serde_json::to_string_pretty(&report).unwrap()).unwrap();
    println!("written to {path}");
}
