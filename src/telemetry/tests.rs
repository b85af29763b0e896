//! The telemetry task against a stand-in link: samples in, batches out, acknowledgements back,
//! with a real outbox in a temporary directory and no broker.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::*;
use crate::drivers::simulated::SimDevice;
use crate::model::device::DeviceType;
use crate::telemetry::outbox::Record;

const GATEWAY: &str = "gw-test";
/// Bounds a test that would otherwise hang; never reached when the code is right.
const GUARD: Duration = Duration::from_secs(10);

/// What the stand-in link does with a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Hands the acknowledgement to the test.
    Hold,
    /// Acknowledges at once.
    Ack,
    /// Loses it, as a connection that drops does.
    Lose,
}

struct Published {
    /// When the task published it (the test's clock may be paused).
    at: Instant,
    mode: Mode,
    seqs: Vec<u64>,
    points: Vec<serde_json::Value>,
    ack: Option<oneshot::Sender<()>>,
}

#[derive(Clone)]
struct StandIn {
    mode: Arc<Mutex<Mode>>,
    log: mpsc::UnboundedSender<Published>,
}

impl StandIn {
    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }
}

impl Publish for StandIn {
    type Delivery = oneshot::Receiver<()>;
    type Lost = oneshot::error::RecvError;

    async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<Self::Delivery, LinkClosed> {
        assert!(topic.ends_with("/telemetry"), "{topic}");
        let batch: serde_json::Value = serde_json::from_slice(&payload).expect("batch is JSON");
        assert_eq!(batch["gatewayId"], GATEWAY);
        let points = batch["points"].as_array().expect("points").clone();
        let seqs = points.iter().map(|p| p["seq"].as_u64().unwrap()).collect();
        let mode = *self.mode.lock().unwrap();
        let (tx, rx) = oneshot::channel();
        let ack = match mode {
            Mode::Hold => Some(tx),
            Mode::Ack => {
                let _ = tx.send(());
                None
            }
            Mode::Lose => None,
        };
        let _ = self.log.send(Published {
            at: Instant::now(),
            mode,
            seqs,
            points,
            ack,
        });
        Ok(rx)
    }
}

fn link_status(state: LinkState) -> LinkStatus {
    LinkStatus {
        state,
        broker: "stand-in".into(),
        connects: 1,
        failures: 0,
        last_error: None,
        connected_since_unix: None,
    }
}

struct Harness {
    telemetry: Telemetry<StandIn>,
    link: StandIn,
    log: mpsc::UnboundedReceiver<Published>,
    link_status: watch::Sender<LinkStatus>,
    stats: watch::Receiver<OutboxStats>,
    dir: tempfile::TempDir,
}

fn harness(batch_max_points: usize) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let (outbox, _) = Outbox::open(&dir.path().join("outbox"), 1 << 20).unwrap();
    let (log_tx, log) = mpsc::unbounded_channel();
    let link = StandIn {
        mode: Arc::new(Mutex::new(Mode::Hold)),
        log: log_tx,
    };
    let (link_status, link_rx) = watch::channel(link_status(LinkState::Connected));
    let (stats_tx, stats) = watch::channel(outbox.stats());
    let telemetry = Telemetry {
        gateway_id: GATEWAY.into(),
        topics: Topics::new(&crate::model::gateway::GatewayId::parse(GATEWAY).unwrap()),
        publisher: link.clone(),
        link: link_rx,
        outbox,
        settings: TelemetrySettings {
            batch_max_points,
            // Long enough that only full batches are sent within a test.
            batch_max_ms: 60_000,
            health_interval_secs: 3_600,
            ..TelemetrySettings::default()
        },
        health: health::HealthProbe {
            state_dir: dir.path().to_owned(),
            drivers: Vec::new(),
        },
        stats: stats_tx,
        clock: crate::model::clock::Clock::system(),
        safety_events: None,
        availability: None,
        meter: None,
    };
    Harness {
        telemetry,
        link,
        log,
        link_status,
        stats,
        dir,
    }
}

fn sample(i: u64) -> Sample {
    let mut device = SimDevice::new(DeviceType::Battery, i);
    Sample {
        device_id: format!("bat-{i}"),
        state: device.step(1.0, 43_200).clone(),
        commands: None,
    }
}

async fn next_publish(log: &mut mpsc::UnboundedReceiver<Published>) -> Published {
    tokio::time::timeout(GUARD, log.recv())
        .await
        .expect("a batch is published")
        .expect("the task is running")
}

async fn wait_stats(stats: &mut watch::Receiver<OutboxStats>, f: impl FnMut(&OutboxStats) -> bool) {
    tokio::time::timeout(GUARD, stats.wait_for(f))
        .await
        .expect("the outbox reaches the expected figures")
        .expect("the task is running");
}

#[tokio::test]
async fn samples_are_numbered_sent_as_one_batch_and_acknowledged_in_the_outbox() {
    let mut h = harness(3);
    let (samples, rx) = mpsc::channel(8);
    for i in 1..=3 {
        samples.send(sample(i)).await.unwrap();
    }
    let (trigger, shutdown) = crate::agent::service::shutdown_channel();
    let task = tokio::spawn(h.telemetry.run(rx, shutdown));

    let batch = next_publish(&mut h.log).await;
    assert_eq!(batch.seqs, [1, 2, 3]);
    assert_eq!(batch.points[0]["deviceId"], "bat-1");
    assert!(batch.points[0]["ts"].is_u64() && batch.points[0]["state"].is_object());
    assert_eq!(h.stats.borrow().depth, 3, "unacknowledged until its PUBACK");
    batch.ack.unwrap().send(()).unwrap();
    wait_stats(&mut h.stats, |s| s.depth == 0).await;

    trigger.trigger();
    let outbox = task.await.unwrap();
    assert_eq!((outbox.acked(), outbox.last_seq()), (3, 3));
}

#[tokio::test]
async fn points_keep_their_numbers_across_a_link_outage() {
    let mut h = harness(2);
    let (samples, rx) = mpsc::channel(8);
    let (trigger, shutdown) = crate::agent::service::shutdown_channel();
    let task = tokio::spawn(h.telemetry.run(rx, shutdown));
    samples.send(sample(1)).await.unwrap();
    samples.send(sample(2)).await.unwrap();
    let first = next_publish(&mut h.log).await;
    assert_eq!(first.seqs, [1, 2]);

    // The connection drops: the batch in flight is lost and every later publish too, until the
    // link is back. Points keep being numbered meanwhile.
    h.link.set(Mode::Lose);
    h.link_status
        .send_replace(link_status(LinkState::WaitingToRetry {
            retry_in_ms: 1_000,
            error: "stand-in outage".into(),
        }));
    drop(first.ack);
    samples.send(sample(3)).await.unwrap();
    samples.send(sample(4)).await.unwrap();
    wait_stats(&mut h.stats, |s| s.next_seq == 5).await;

    h.link.set(Mode::Ack);
    h.link_status
        .send_replace(link_status(LinkState::Connected));
    wait_stats(&mut h.stats, |s| s.depth == 0).await;
    trigger.trigger();
    let outbox = task.await.unwrap();
    assert_eq!(outbox.acked(), 4);

    let mut published = vec![first.seqs.clone()];
    let mut copies: std::collections::BTreeMap<u64, Vec<serde_json::Value>> = Default::default();
    for (seq, point) in first.seqs.iter().zip(first.points) {
        copies.entry(*seq).or_default().push(point);
    }
    let mut first_after_outage = None;
    let mut during_outage = 0;
    while let Ok(p) = h.log.try_recv() {
        during_outage += usize::from(p.mode == Mode::Lose);
        if p.mode == Mode::Ack && first_after_outage.is_none() {
            first_after_outage = Some(p.seqs[0]);
        }
        for (seq, point) in p.seqs.iter().zip(p.points) {
            copies.entry(*seq).or_default().push(point);
        }
        published.push(p.seqs);
    }
    assert_eq!(
        during_outage, 0,
        "sent while the link was down: {published:?}"
    );
    assert_eq!(
        first_after_outage,
        Some(1),
        "resumes at the first unacknowledged point: {published:?}"
    );
    for seqs in &published {
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{published:?}");
    }
    assert_eq!(copies.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 4]);
    for (seq, points) in copies {
        assert!(
            points.iter().all(|p| *p == points[0]),
            "point {seq} changed between sends: {points:?}"
        );
    }
}

#[tokio::test]
async fn shutdown_makes_the_outbox_durable_and_keeps_unacknowledged_points() {
    let mut h = harness(2);
    let (samples, rx) = mpsc::channel(8);
    samples.send(sample(1)).await.unwrap();
    samples.send(sample(2)).await.unwrap();
    let (trigger, shutdown) = crate::agent::service::shutdown_channel();
    let task = tokio::spawn(h.telemetry.run(rx, shutdown));
    let in_flight = next_publish(&mut h.log).await;
    assert_eq!(in_flight.seqs, [1, 2]);

    trigger.trigger();
    let outbox = task.await.unwrap();
    assert_eq!((outbox.acked(), outbox.last_seq()), (0, 2));
    drop(outbox);
    assert!(
        h.log.try_recv().is_err(),
        "nothing more is published after shutdown"
    );
    // The batch that was in flight goes out with the next run.
    let (mut reopened, _) = Outbox::open(&h.dir.path().join("outbox"), 1 << 20).unwrap();
    let seqs: Vec<u64> = reopened
        .read_after(0, 10, 1 << 20)
        .unwrap()
        .iter()
        .map(|r: &Record| r.seq)
        .collect();
    assert_eq!(seqs, [1, 2]);
}

/// A battery state with `rate` W of charge rate, the same in every other member.
fn battery_at(rate: f64) -> Sample {
    let mut s = sample(1);
    let crate::model::device::DeviceState::Battery(b) = &mut s.state else {
        unreachable!("sample(1) is a battery")
    };
    b.charge_rate = Some(rate);
    s
}

/// Report by exception with the task's own clock paused, so the batch period and the
/// heartbeat are measured exactly: a change goes out within one batch period, repeats do not
/// go out at all, and an unchanged device still sends its heartbeat on time.
#[tokio::test(start_paused = true)]
async fn on_change_sends_changes_within_a_batch_period_and_a_heartbeat_when_unchanged() {
    let mut h = harness(100);
    h.link.set(Mode::Ack);
    h.telemetry.settings.batch_max_ms = 1_000;
    h.telemetry.settings.health_interval_secs = 32;
    h.telemetry.settings.report = settings::ReportMode::OnChange;
    h.telemetry.settings.heartbeat_secs = 60;
    let (samples, rx) = mpsc::channel(8);
    let (trigger, shutdown) = crate::agent::service::shutdown_channel();
    let task = tokio::spawn(h.telemetry.run(rx, shutdown));
    let start = Instant::now();
    // Device points published, with when; health points counted apart.
    let mut states = Vec::new();
    let mut unchanged_in_health = Vec::new();
    let mut drain = |log: &mut mpsc::UnboundedReceiver<Published>,
                     states: &mut Vec<(Duration, serde_json::Value)>| {
        while let Ok(p) = log.try_recv() {
            for point in p.points {
                if let Some(r) = point.get("health").and_then(|h| h.get("reporting")) {
                    unchanged_in_health.push(r["samplesUnchanged"].as_u64().unwrap());
                    assert_eq!(r["heartbeatSecs"], 60);
                } else {
                    states.push((p.at - start, point["state"]["chargeRate"].clone()));
                }
            }
        }
    };
    // One sample every 5 s: 600 W, then within chargeRate's 50 W deadband for a while.
    for (i, rate) in [600.0, 620.0, 580.0, 640.0, 700.0].into_iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_secs(5 * i as u64)).await;
        samples.send(battery_at(rate)).await.unwrap();
    }
    // 700 (sent at 20 s) is the last change; from then on the device repeats itself.
    for i in 5..=20u64 {
        tokio::time::sleep_until(start + Duration::from_secs(5 * i)).await;
        samples.send(battery_at(700.0)).await.unwrap();
    }
    tokio::time::sleep_until(start + Duration::from_secs(102)).await;
    drain(&mut h.log, &mut states);
    trigger.trigger();
    task.await.unwrap();

    // 600 at 0 s and 700 at 20 s, each published within the 1 s batch period; the repeats
    // at 5 to 75 s are not sent; the sample at 80 s is the heartbeat (60 s after 20 s).
    let rates: Vec<f64> = states.iter().map(|(_, r)| r.as_f64().unwrap()).collect();
    assert_eq!(rates, [600.0, 700.0, 700.0], "{states:?}");
    for ((at, _), sampled) in states.iter().zip([0, 20, 80]) {
        let sampled = Duration::from_secs(sampled);
        assert!(
            *at >= sampled && *at <= sampled + Duration::from_millis(1_000),
            "{states:?}"
        );
    }
    // Health at 32, 64 and 96 s counts the samples held back: 5 to 15 s and 25 to 30 s (5),
    // then 35 to 60 s (6 more: 11), then 65 to 75 s and 85 to 95 s (6 more: 17).
    assert_eq!(unchanged_in_health, [5, 11, 17]);
}
