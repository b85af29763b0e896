//! A small fleet in one process against one broker with mutual TLS: every gateway connects,
//! reports, answers a signed ping, comes back by itself after the broker is killed and loses no
//! telemetry point on the way. benches/fleet.rs runs the same scenario with 1000 gateways and
//! reports figures; the scenario itself lives in testkit/src/fleet.rs.

use texture_agent_testkit::fleet::{self, FleetConfig};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_survives_a_broker_kill_without_losing_a_point() {
    // Production link settings except a shorter backoff ceiling, so the test stays short.
    let cfg = FleetConfig {
        steady_secs: 4,
        pings: 20,
        outage_ms: 2_000,
        after_secs: 1,
        backoff_max_ms: 4_000,
        timeout_secs: 60,
        ..FleetConfig::production(50)
    }
    .with_env_overrides();
    let size = cfg.size;
    let pings = cfg.pings.min(size);
    let report = fleet::run(cfg, |line| eprintln!("{line}")).await;
    let summary = fleet::summary(&report);
    eprintln!("{summary}");

    assert_eq!(report.startup.connects, size, "{summary}");
    assert_eq!(report.steady.ping_round_trip_ms.count, pings, "{summary}");
    assert_eq!(report.steady.pings_failed, 0, "{summary}");
    assert!(report.restart.connects >= size, "{summary}");
    assert_eq!(report.sessions_connected_at_end, size, "{summary}");
    let d = &report.delivery;
    assert!(d.points_assigned >= size as u64 * 5, "{summary}");
    assert_eq!(d.gaps, 0, "{summary}");
    assert_eq!(d.dropped_by_outbox, 0, "{summary}");
    assert_eq!(d.points_received, d.points_assigned, "{summary}");
}
