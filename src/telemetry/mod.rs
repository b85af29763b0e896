//! Telemetry: drivers → **telemetry** → outbox → link.
//!
//! One task owns the [`Outbox`]. Every sample is appended (and so numbered) the moment it
//! arrives, whether or not the link is up: sampling never waits for the network. Independently,
//! while the link is connected, the uplink reads the oldest unsent points, publishes them in
//! batches (N points or T ms, whichever first) with QoS 1, and acknowledges a batch in the outbox
//! only when *its own* PUBACK arrives (`link::Delivery`). A failed delivery rewinds the uplink
//! to the oldest unacknowledged point, so after an outage sending resumes exactly there, in
//! order. Up to [`MAX_BATCHES_IN_FLIGHT`] batches are in flight at once to keep the pipe full.

pub mod health;
pub mod model;

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::drivers::Sample;
use crate::link::{Delivery, LinkState, LinkStatus, Publisher};
use crate::outbox::{Outbox, OutboxStats};
use crate::service::Shutdown;
use crate::topics::Topics;

pub const MAX_BATCHES_IN_FLIGHT: usize = 4;
/// Payload bytes per batch, far below the link's outbound packet limit.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// `[telemetry]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    /// A batch is sent when it has this many points…
    #[serde(default = "default_batch_max_points")]
    pub batch_max_points: usize,
    /// …or when its oldest point has waited this long.
    #[serde(default = "default_batch_max_ms")]
    pub batch_max_ms: u64,
    /// How often appended points are fsynced.
    #[serde(default = "default_fsync_interval_ms")]
    pub fsync_interval_ms: u64,
    /// Cap on unacknowledged bytes; beyond it the oldest points are dropped (and counted).
    #[serde(default = "default_outbox_max_bytes")]
    pub outbox_max_bytes: u64,
    /// How often a gateway health point is recorded.
    #[serde(default = "default_health_interval_secs")]
    pub health_interval_secs: u64,
}

fn default_batch_max_points() -> usize {
    100
}
fn default_batch_max_ms() -> u64 {
    1_000
}
fn default_fsync_interval_ms() -> u64 {
    1_000
}
fn default_outbox_max_bytes() -> u64 {
    4 * 1024 * 1024
}
fn default_health_interval_secs() -> u64 {
    60
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            batch_max_points: default_batch_max_points(),
            batch_max_ms: default_batch_max_ms(),
            fsync_interval_ms: default_fsync_interval_ms(),
            outbox_max_bytes: default_outbox_max_bytes(),
            health_interval_secs: default_health_interval_secs(),
        }
    }
}

/// A point as stored in the outbox (the sequence number is the record's, added when sending).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StoredPoint<'a, T: Serialize> {
    /// Unix milliseconds.
    ts: u64,
    device_id: &'a str,
    #[serde(flatten)]
    body: T,
}

#[derive(Debug, Serialize)]
struct StateBody<'a> {
    state: &'a model::DeviceState,
}

#[derive(Debug, Serialize)]
struct HealthBody<'a> {
    health: &'a model::GatewayHealth,
}

pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One batch in flight: the last sequence number it carries and its delivery.
struct InFlight {
    last_seq: u64,
    delivery: Delivery,
}

/// The telemetry task's state.
pub struct Telemetry {
    pub gateway_id: String,
    pub topics: Topics,
    pub publisher: Publisher,
    pub link: watch::Receiver<LinkStatus>,
    pub outbox: Outbox,
    pub settings: TelemetrySettings,
    pub health: health::HealthProbe,
    /// Outbox figures, for `status` and health (refreshed on every change).
    pub stats: watch::Sender<OutboxStats>,
}

impl Telemetry {
    /// Wires the telemetry task to `link` as the daemon does, with health figures taken for
    /// `state_dir`'s filesystem. Also returns the feed of outbox figures.
    pub fn new(
        settings: &crate::config::Settings,
        link: &crate::link::Link,
        outbox: Outbox,
        state_dir: &std::path::Path,
    ) -> (Telemetry, watch::Receiver<OutboxStats>) {
        let (stats, stats_rx) = watch::channel(outbox.stats());
        let telemetry = Telemetry {
            gateway_id: settings.device.id.to_string(),
            topics: link.topics().clone(),
            publisher: link.publisher(),
            link: link.status(),
            outbox,
            settings: settings.telemetry.clone(),
            health: health::HealthProbe {
                state_dir: state_dir.to_owned(),
                drivers: Vec::new(),
            },
            stats,
        };
        (telemetry, stats_rx)
    }

    /// Reports `drivers`' counters in every health point. A setter rather than an argument of
    /// [`Telemetry::new`], so that callers without process drivers (the benches) need not care.
    pub fn with_driver_health(mut self, drivers: Vec<crate::drivers::DriverHealthSource>) -> Self {
        self.health.drivers = drivers;
        self
    }

    /// Runs until shutdown; then makes the outbox durable and returns it.
    pub async fn run(
        mut self,
        mut samples: mpsc::Receiver<Sample>,
        mut shutdown: Shutdown,
    ) -> Outbox {
        let mut fsync =
            tokio::time::interval(Duration::from_millis(self.settings.fsync_interval_ms));
        let health_every = Duration::from_secs(self.settings.health_interval_secs);
        let mut health = tokio::time::interval_at(Instant::now() + health_every, health_every);
        let batch_age = Duration::from_millis(self.settings.batch_max_ms);
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        // The highest sequence number handed to the link (acknowledged or not).
        let mut sent = self.outbox.acked();
        // When the oldest unsent point was appended (None: nothing unsent, or unknown age after
        // a restart, which makes it immediately due).
        let mut unsent_since: Option<Instant> = None;
        // With no drivers configured the channel is closed from the start; the outbox still
        // has to be drained.
        let mut samples_open = true;
        loop {
            let connected = matches!(self.link.borrow().state, LinkState::Connected);
            let unsent = self.outbox.last_seq().saturating_sub(sent);
            let due = unsent >= self.settings.batch_max_points as u64
                || (unsent > 0 && unsent_since.is_none_or(|t| t.elapsed() >= batch_age));
            if connected && due && in_flight.len() < MAX_BATCHES_IN_FLIGHT {
                match self.send_batch(sent).await {
                    Ok(Some(batch)) => {
                        sent = batch.last_seq;
                        in_flight.push_back(batch);
                        unsent_since = (self.outbox.last_seq() > sent).then(Instant::now);
                        continue;
                    }
                    Ok(None) => {}
                    Err(()) => {
                        // The link is closing; let shutdown end the loop.
                    }
                }
            }
            let wake_for_age = unsent_since.map(|t| t + batch_age);
            tokio::select! {
                biased;
                _ = shutdown.wait() => break,
                delivered = async { (&mut in_flight.front_mut().expect("guarded").delivery).await }, if !in_flight.is_empty() => {
                    let batch = in_flight.pop_front().expect("guarded");
                    match delivered {
                        Ok(()) => {
                            self.outbox.ack(batch.last_seq);
                            self.publish_stats();
                        }
                        Err(_) => {
                            // Lost with the connection: everything from the oldest unacknowledged
                            // point is sent again once the link is back.
                            in_flight.clear();
                            sent = self.outbox.acked();
                            unsent_since = None;
                        }
                    }
                }
                sample = samples.recv(), if samples_open => match sample {
                    Some(sample) => {
                        // Take whatever else is already queued too: one write for the lot.
                        let mut batch = vec![sample];
                        while batch.len() < 256 {
                            match samples.try_recv() {
                                Ok(more) => batch.push(more),
                                Err(_) => break,
                            }
                        }
                        self.append_states(&batch);
                        if unsent_since.is_none() && self.outbox.last_seq() > sent {
                            unsent_since = Some(Instant::now());
                        }
                    }
                    None => samples_open = false,
                },
                _ = fsync.tick() => {
                    if let Err(error) = self.outbox.sync() {
                        tracing::error!(%error, "outbox fsync failed");
                    }
                }
                _ = health.tick() => self.append_health(),
                changed = self.link.changed() => if changed.is_err() { break },
                _ = async { tokio::time::sleep_until(wake_for_age.expect("guarded")).await }, if wake_for_age.is_some() && connected => {}
            }
        }
        if let Err(error) = self.outbox.sync() {
            tracing::error!(%error, "outbox fsync at shutdown failed");
        }
        self.outbox
    }

    fn append(&mut self, payload: Vec<u8>) {
        match self.outbox.append(&payload) {
            Ok(_) => self.publish_stats(),
            Err(error) => tracing::error!(%error, "point not stored"),
        }
    }

    fn append_states(&mut self, samples: &[Sample]) {
        let now = unix_millis();
        // All points serialised into one buffer: one allocation for the lot, not one each.
        let mut buf = Vec::with_capacity(samples.len() * 320);
        let mut ends = Vec::with_capacity(samples.len());
        for sample in samples {
            encode_state(now, &sample.device_id, &sample.state, &mut buf);
            ends.push(buf.len());
        }
        let points: Vec<&[u8]> = ends
            .iter()
            .scan(0, |start, &end| {
                let point = &buf[*start..end];
                *start = end;
                Some(point)
            })
            .collect();
        match self.outbox.append_all(&points) {
            Ok(_) => self.publish_stats(),
            Err(error) => tracing::error!(%error, points = points.len(), "points not stored"),
        }
    }

    fn append_health(&mut self) {
        let stats = self.outbox.stats();
        let reconnects = self.link.borrow().reconnects();
        let health = self.health.sample(reconnects, stats);
        let point = StoredPoint {
            ts: unix_millis(),
            device_id: &self.gateway_id,
            body: HealthBody { health: &health },
        };
        self.append(serde_json::to_vec(&point).expect("points serialise"));
    }

    fn publish_stats(&self) {
        self.stats.send_replace(self.outbox.stats());
    }

    /// Publishes the next batch after `sent`. `Ok(None)`: nothing to send.
    async fn send_batch(&mut self, sent: u64) -> Result<Option<InFlight>, ()> {
        let records =
            match self
                .outbox
                .read_after(sent, self.settings.batch_max_points, MAX_BATCH_BYTES)
            {
                Ok(r) if r.is_empty() => return Ok(None),
                Ok(r) => r,
                Err(error) => {
                    tracing::error!(%error, "outbox read failed");
                    return Ok(None);
                }
            };
        let last_seq = records.last().expect("non-empty").seq;
        let message = batch_message(&self.gateway_id, &records);
        match self
            .publisher
            .publish(self.topics.telemetry(), message, false)
            .await
        {
            Ok(delivery) => Ok(Some(InFlight { last_seq, delivery })),
            Err(_) => Err(()),
        }
    }
}

/// Appends a device state point as the outbox stores it (`{"ts":…,"deviceId":…,"state":…}`,
/// without its sequence number) to `out`.
pub fn encode_state(ts: u64, device_id: &str, state: &model::DeviceState, out: &mut Vec<u8>) {
    let point = StoredPoint {
        ts,
        device_id,
        body: StateBody { state },
    };
    serde_json::to_writer(out, &point).expect("points serialise");
}

/// `{"gatewayId": "...", "points": [{"seq": N, ...stored point...}, ...]}`.
///
/// Stored points are JSON objects; the sequence number is spliced in front rather than parsing
/// and re-serialising every point on the hot path.
pub fn batch_message(gateway_id: &str, records: &[crate::outbox::Record]) -> Vec<u8> {
    let size: usize = records.iter().map(|r| r.payload.len() + 24).sum();
    let mut out = Vec::with_capacity(size + 64);
    out.extend_from_slice(b"{\"gatewayId\":");
    out.extend_from_slice(&serde_json::to_vec(gateway_id).expect("string serialises"));
    out.extend_from_slice(b",\"points\":[");
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        // `write!` into the Vec itself: no temporary String per point.
        let _ = std::io::Write::write_fmt(&mut out, format_args!("{{\"seq\":{},", r.seq));
        out.extend_from_slice(&r.payload[1..]);
    }
    out.extend_from_slice(b"]}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Record;

    #[test]
    fn batch_message_is_valid_json_with_sequence_numbers() {
        let records = vec![
            Record {
                seq: 7,
                payload: br#"{"ts":1,"deviceId":"bat-1","state":{"type":"battery"}}"#.to_vec(),
            },
            Record {
                seq: 8,
                payload: br#"{"ts":2,"deviceId":"gw","health":{}}"#.to_vec(),
            },
        ];
        let v: serde_json::Value =
            serde_json::from_slice(&batch_message("gw\"1", &records)).unwrap();
        assert_eq!(v["gatewayId"], "gw\"1");
        assert_eq!(v["points"][0]["seq"], 7);
        assert_eq!(v["points"][0]["deviceId"], "bat-1");
        assert_eq!(v["points"][1]["seq"], 8);
    }
}
