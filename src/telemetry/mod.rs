//! Telemetry: drivers → **telemetry** → outbox → link.
//!
//! One task owns the [`Outbox`]. Every sample is appended (and so numbered) the moment it
//! arrives, whether or not the link is up: sampling never waits for the network. Independently,
//! while the link is connected, the uplink reads the oldest unsent points, publishes them in
//! batches (N points or T ms, whichever first) with QoS 1, and acknowledges a batch in the outbox
//! only when *its own* PUBACK arrives (`link::Delivery`). A failed delivery rewinds the uplink
//! to the oldest unacknowledged point, so after an outage sending resumes exactly there, in
//! order. Up to [`MAX_BATCHES_IN_FLIGHT`] batches are in flight at once to keep the pipe full.
//!
//! The decisions (when a batch is due, what to acknowledge, where to resume) are
//! [`uplink::Uplink`]'s, a state machine without I/O; [`Telemetry::run`] only moves messages
//! between it, the sample channel, the outbox and the link. The link is reached through
//! [`Publish`], so the task can be tested against a stand-in with no broker.

pub(crate) mod budget;
mod compact;
mod exception;
pub(crate) mod health;
pub mod outbox;
mod points;
pub(crate) mod settings;
mod uplink;

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::agent::service::Shutdown;
use crate::drivers::Sample;
use crate::link::topics::Topics;
use crate::link::{LinkState, LinkStatus, Publisher};
use crate::model::clock::Clock;
use crate::telemetry::outbox::{Outbox, OutboxStats};
use uplink::{Next, Uplink};

pub(crate) use compact::deflate_json;
pub use compact::{decode as decode_batch, decode_capabilities, DecodeError};

/// The compact batch (PROTOCOL 14.9) of `records`, for the benches; `None` for a point the
/// encoder cannot read (the agent then sends JSON).
pub fn compact_batch(
    gateway_id: &str,
    records: &[outbox::Record],
    deflate: bool,
) -> Option<Vec<u8>> {
    compact::encode(gateway_id, records, deflate).ok()
}
pub use points::{batch_message, encode_state};
pub use settings::TelemetrySettings;

pub const MAX_BATCHES_IN_FLIGHT: usize = 4;
/// How often the broker connection's bytes are counted (a lost connection's last interval is
/// missed, PROTOCOL 14.10).
const COUNT_EVERY: Duration = Duration::from_secs(5);
/// How often the month's count is saved: a power cut forgets at most this much of it, and a
/// tiny atomic write every 5 minutes spares the flash.
const SAVE_EVERY: Duration = Duration::from_secs(300);
/// Payload bytes per batch, far below the link's outbound packet limit.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Samples taken off the channel for one outbox write.
const SAMPLES_PER_APPEND: usize = 256;

/// The link shut down and accepts nothing more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkClosed;

/// What telemetry needs of the link: a QoS 1 publish whose delivery resolves `Ok` on its own
/// PUBACK and `Err` if its connection ended first (the guarantee `link::Publisher` documents).
pub trait Publish: Send + Sync {
    type Delivery: Future<Output = Result<(), Self::Lost>> + Send + Unpin;
    type Lost;
    /// Queues `payload` on `topic` (not retained); may wait while the link's queue is full.
    fn publish(
        &self,
        topic: String,
        payload: Vec<u8>,
    ) -> impl Future<Output = Result<Self::Delivery, LinkClosed>> + Send;
}

impl Publish for Publisher {
    type Delivery = crate::link::Delivery;
    type Lost = tokio::sync::oneshot::error::RecvError;

    async fn publish(&self, topic: String, payload: Vec<u8>) -> Result<Self::Delivery, LinkClosed> {
        Publisher::publish(self, topic, payload, false)
            .await
            .map_err(|_| LinkClosed)
    }
}

/// The telemetry task's state.
pub struct Telemetry<P = Publisher> {
    pub gateway_id: String,
    pub topics: Topics,
    pub publisher: P,
    pub link: watch::Receiver<LinkStatus>,
    pub outbox: Outbox,
    pub settings: TelemetrySettings,
    pub health: health::HealthProbe,
    /// Outbox figures, for `status` and health (refreshed on every change).
    pub stats: watch::Sender<OutboxStats>,
    /// Stamps every point.
    pub clock: Clock,
    /// The safety stage's audit events, stored as `safety` points (PROTOCOL 14.6).
    pub safety_events: Option<mpsc::Receiver<crate::model::safety::SafetyPoint>>,
    /// The drivers' availability changes, stored as `availability` points (PROTOCOL 14.7).
    pub availability: Option<mpsc::Receiver<crate::drivers::Availability>>,
    /// Counts the broker connection's bytes for the monthly data budget; `None`: not counted.
    pub(crate) meter: Option<crate::link::traffic::Meter>,
}

impl Telemetry {
    /// Wires the telemetry task of gateway `gateway_id` to `link` as the daemon does, with
    /// health figures taken for `state_dir`'s filesystem. Also returns the feed of outbox
    /// figures. It takes its own `[telemetry]` section, not the whole configuration, so that
    /// `config` (which holds that section's type) and `telemetry` do not import each other.
    pub fn new(
        gateway_id: &str,
        settings: &TelemetrySettings,
        link: &crate::link::Link,
        outbox: Outbox,
        state_dir: &std::path::Path,
        clock: Clock,
    ) -> (Telemetry, watch::Receiver<OutboxStats>) {
        let (stats, stats_rx) = watch::channel(outbox.stats());
        let telemetry = Telemetry {
            gateway_id: gateway_id.to_owned(),
            topics: link.topics().clone(),
            publisher: link.publisher(),
            link: link.status(),
            outbox,
            settings: settings.clone(),
            health: health::HealthProbe {
                state_dir: state_dir.to_owned(),
                drivers: Vec::new(),
            },
            stats,
            clock,
            safety_events: None,
            availability: None,
            meter: None,
        };
        (telemetry, stats_rx)
    }
}

/// The batch message of `records` in the encoding `settings` choose. A point the compact
/// encoder cannot read (none the agent stores) sends its batch as JSON, which the platform
/// decodes as well (PROTOCOL 14.9), rather than holding the outbox up.
pub(crate) fn encode_batch(
    gateway_id: &str,
    records: &[outbox::Record],
    settings: &TelemetrySettings,
) -> Vec<u8> {
    if settings.encoding == settings::Encoding::Compact {
        let deflate = settings.compression == settings::Compression::Deflate;
        match compact::encode(gateway_id, records, deflate) {
            Ok(message) => return message,
            Err(error) => tracing::error!(?error, "batch sent as JSON"),
        }
    }
    batch_message(gateway_id, records)
}

fn is_up(link: &LinkStatus) -> bool {
    matches!(link.state, LinkState::Connected)
}

impl<P: Publish> Telemetry<P> {
    /// Reports `drivers`' counters in every health point. A setter rather than an argument of
    /// [`Telemetry::new`], so that callers without process drivers (the benches) need not care.
    pub fn with_driver_health(mut self, drivers: Vec<crate::drivers::DriverHealthSource>) -> Self {
        self.health.drivers = drivers;
        self
    }

    /// Counts the bytes of the connection to the broker at `port` (the data budget, 14.10).
    pub(crate) fn with_meter(mut self, port: u16) -> Self {
        self.meter = Some(crate::link::traffic::Meter::new(port));
        self
    }

    /// Stores the safety stage's `events` as points, in order with the samples.
    pub(crate) fn with_safety_events(
        mut self,
        events: mpsc::Receiver<crate::model::safety::SafetyPoint>,
    ) -> Self {
        self.safety_events = Some(events);
        self
    }

    /// Stores the drivers' `changes` of availability as points, in order with the samples.
    pub(crate) fn with_availability(
        mut self,
        changes: mpsc::Receiver<crate::drivers::Availability>,
    ) -> Self {
        self.availability = Some(changes);
        self
    }

    /// Runs until shutdown (or until the link is gone); then makes the outbox durable and
    /// returns it. Batches still in flight are not awaited: their points stay in the outbox.
    pub async fn run(
        mut self,
        mut samples: mpsc::Receiver<Sample>,
        mut shutdown: Shutdown,
    ) -> Outbox {
        let mut fsync =
            tokio::time::interval(Duration::from_millis(self.settings.fsync_interval_ms));
        let health_every = Duration::from_secs(self.settings.health_interval_secs);
        let mut health = tokio::time::interval_at(Instant::now() + health_every, health_every);
        let mut uplink = Uplink::new(
            &self.settings,
            self.outbox.acked(),
            self.outbox.last_seq(),
            false,
        );
        // With no drivers configured the channel is closed from the start; the outbox still
        // has to be drained.
        let mut filter = self.settings.reporting().map(exception::ReportFilter::new);
        let mut budget = self.open_budget();
        let mut count = tokio::time::interval(COUNT_EVERY);
        let mut save = tokio::time::interval_at(Instant::now() + SAVE_EVERY, SAVE_EVERY);
        let mut saved = budget.usage().clone();
        // A restart late in the month starts as sparse as the count says.
        if budget.step() != budget::Step::Normal {
            self.degrade(
                budget.step(),
                &budget,
                &mut uplink,
                &mut filter,
                &mut health,
            );
        }
        let mut samples_open = true;
        let mut safety_events = self.safety_events.take();
        let mut availability = self.availability.take();
        loop {
            // The link's state is read afresh every turn, not only when its watch is polled: the
            // link reports a lost connection and fails its deliveries in one step, and a rewind
            // must not be sent into the connection that just failed.
            uplink.link_changed(is_up(&self.link.borrow_and_update()));
            let timer = match uplink.next() {
                Next::Send { after } => {
                    self.send_batch(&mut uplink, after).await;
                    continue;
                }
                Next::Wait { timer } => timer,
                Next::Stop => break,
            };
            // Samples come last: they can be ready on every turn, and must not starve the
            // timers or the link's news.
            tokio::select! {
                biased;
                _ = shutdown.wait() => uplink.shutdown(),
                delivered = async { uplink.oldest_delivery().expect("guarded").await }, if uplink.has_in_flight() => {
                    match delivered {
                        Ok(()) => {
                            if let Some(up_to) = uplink.acked() {
                                self.outbox.ack(up_to);
                                self.publish_stats();
                            }
                        }
                        Err(_) => uplink.delivery_failed(self.outbox.acked()),
                    }
                }
                changed = self.link.changed() => if changed.is_err() {
                    // The link is gone for good.
                    uplink.shutdown();
                },
                _ = fsync.tick() => {
                    if let Err(error) = self.outbox.sync() {
                        tracing::error!(%error, "outbox fsync failed");
                    }
                }
                _ = count.tick(), if self.meter.is_some() => {
                    if self.count(&mut budget) {
                        self.degrade(budget.step(), &budget, &mut uplink, &mut filter, &mut health);
                    }
                }
                _ = save.tick() => self.save_usage(&budget, &mut saved),
                _ = health.tick() => {
                    self.append_health(filter.as_ref(), &budget);
                    uplink.appended(self.outbox.last_seq(), Instant::now());
                }
                _ = async { tokio::time::sleep_until(timer.expect("guarded")).await }, if timer.is_some() => {
                    uplink.batch_timer_fired(Instant::now());
                }
                point = async { safety_events.as_mut().expect("guarded").recv().await }, if safety_events.is_some() => match point {
                    Some(point) => {
                        self.append_safety(&point);
                        uplink.appended(self.outbox.last_seq(), Instant::now());
                    }
                    None => safety_events = None,
                },
                change = async { availability.as_mut().expect("guarded").recv().await }, if availability.is_some() => match change {
                    Some(change) => {
                        if let Some(filter) = filter.as_mut() {
                            filter.forget(&change.device_id);
                        }
                        self.append_availability(&change);
                        uplink.appended(self.outbox.last_seq(), Instant::now());
                    }
                    None => availability = None,
                },
                sample = samples.recv(), if samples_open => match sample {
                    Some(sample) => {
                        self.append_states(sample, &mut samples, filter.as_mut());
                        uplink.appended(self.outbox.last_seq(), Instant::now());
                    }
                    None => samples_open = false,
                },
            }
        }
        if let Err(error) = self.outbox.sync() {
            tracing::error!(%error, "outbox fsync at shutdown failed");
        }
        self.count(&mut budget);
        self.save_usage(&budget, &mut saved);
        self.outbox
    }

    /// The month's count as the last run left it, and the configured budget.
    fn open_budget(&self) -> budget::Budget {
        let stored = budget::load(&self.health.state_dir).unwrap_or_else(|error| {
            tracing::warn!(%error, "data usage unreadable: this month counts from 0");
            None
        });
        let month = budget::month_of(self.clock.now());
        budget::Budget::new(self.settings.monthly_budget_bytes, stored, &month)
    }

    /// Adds what the broker connection carried since the last count; whether the step changed.
    fn count(&mut self, budget: &mut budget::Budget) -> bool {
        let Some(meter) = self.meter.as_mut() else {
            return false;
        };
        let (sent, received) = meter.take();
        budget.add(sent, received, &budget::month_of(self.clock.now()))
    }

    fn save_usage(&self, budget: &budget::Budget, saved: &mut budget::Usage) {
        if budget.usage() == saved {
            return;
        }
        match budget::save(&self.health.state_dir, budget.usage()) {
            Ok(()) => *saved = budget.usage().clone(),
            Err(error) => tracing::warn!(%error, "data usage not saved"),
        }
    }

    /// Applies the budget's `step` (14.10): batches wait longer, deadbands widen (reporting by
    /// exception even when every sample is configured), the heartbeat and health points come
    /// less often; `Normal` restores the configuration. Never a reply or a command.
    fn degrade(
        &self,
        step: budget::Step,
        budget: &budget::Budget,
        uplink: &mut Uplink<P::Delivery>,
        filter: &mut Option<exception::ReportFilter>,
        health: &mut tokio::time::Interval,
    ) {
        let configured = &self.settings;
        let d = step.degradation();
        let batch_ms = d.map_or(configured.batch_max_ms, |d| {
            configured.batch_max_ms.max(d.batch_ms)
        });
        uplink.set_batch_age(Duration::from_millis(batch_ms));
        match d {
            Some(d) => filter
                .get_or_insert_with(|| {
                    exception::ReportFilter::new(configured.exception_reporting())
                })
                .degrade(d.deadband_factor, d.heartbeat_factor),
            None if configured.report == settings::ReportMode::EverySample => *filter = None,
            None => {
                if let Some(f) = filter.as_mut() {
                    f.degrade(1.0, 1);
                }
            }
        }
        let health_secs = d.map_or(configured.health_interval_secs, |d| {
            configured.health_interval_secs.max(d.health_secs)
        });
        let every = Duration::from_secs(health_secs);
        if health.period() != every {
            *health = tokio::time::interval_at(Instant::now() + every, every);
        }
        tracing::warn!(
            step = step.name(),
            used_bytes = budget.usage().total(),
            budget_bytes = budget.limit(),
            batch_ms,
            health_secs,
            "data budget: telemetry adjusted"
        );
    }

    /// Appends `first` and whatever else is already queued (up to [`SAMPLES_PER_APPEND`]): one
    /// outbox write for the lot. With report by exception, only the samples `filter` admits.
    fn append_states(
        &mut self,
        first: Sample,
        queued: &mut mpsc::Receiver<Sample>,
        mut filter: Option<&mut exception::ReportFilter>,
    ) {
        let mut samples = vec![first];
        while samples.len() < SAMPLES_PER_APPEND {
            match queued.try_recv() {
                Ok(more) => samples.push(more),
                Err(_) => break,
            }
        }
        if let Some(filter) = filter.as_mut() {
            let now = Instant::now();
            samples.retain(|s| filter.admit(&s.device_id, &s.state, now));
            if samples.is_empty() {
                return;
            }
        }
        let now = self.clock.now_millis();
        // All points serialised into one buffer: one allocation for the lot, not one each.
        let mut buf = Vec::with_capacity(samples.len() * 320);
        let mut ends = Vec::with_capacity(samples.len());
        for sample in &samples {
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

    fn append_health(&mut self, filter: Option<&exception::ReportFilter>, budget: &budget::Budget) {
        let stats = self.outbox.stats();
        let reconnects = self.link.borrow().reconnects();
        let mut health = self.health.sample(reconnects, stats);
        let usage = budget.usage();
        health.data_usage = self
            .meter
            .is_some()
            .then(|| crate::model::device::DataUsageHealth {
                month: usage.month.clone(),
                sent_bytes: usage.sent_bytes,
                received_bytes: usage.received_bytes,
                budget_bytes: budget.limit(),
                step: budget.step().name().to_owned(),
            });
        health.reporting = filter.map(|f| crate::model::device::ReportingHealth {
            heartbeat_secs: f.heartbeat().as_secs(),
            samples_unchanged: f.skipped(),
        });
        let point = points::encode_health(self.clock.now_millis(), &self.gateway_id, &health);
        self.append_point(&point, "health");
    }

    fn append_safety(&mut self, point: &crate::model::safety::SafetyPoint) {
        let stored = points::encode_safety(self.clock.now_millis(), point);
        self.append_point(&stored, "safety");
    }

    fn append_availability(&mut self, change: &crate::drivers::Availability) {
        let stored = points::encode_availability(self.clock.now_millis(), change);
        self.append_point(&stored, "availability");
    }

    /// Stores one encoded point of `kind` (for the log when it cannot be stored).
    fn append_point(&mut self, stored: &[u8], kind: &'static str) {
        match self.outbox.append(stored) {
            Ok(_) => self.publish_stats(),
            Err(error) => tracing::error!(%error, kind, "point not stored"),
        }
    }

    fn publish_stats(&self) {
        self.stats.send_replace(self.outbox.stats());
    }

    /// Reads the next batch after `after` and hands it to the link; tells `uplink` how it went.
    async fn send_batch(&mut self, uplink: &mut Uplink<P::Delivery>, after: u64) {
        let records =
            match self
                .outbox
                .read_after(after, self.settings.batch_max_points, MAX_BATCH_BYTES)
            {
                Ok(r) if r.is_empty() => return uplink.caught_up(),
                Ok(r) => r,
                Err(error) => {
                    tracing::error!(%error, "outbox read failed");
                    return uplink.read_failed(Instant::now());
                }
            };
        let last_seq = records.last().expect("non-empty").seq;
        let message = encode_batch(&self.gateway_id, &records, &self.settings);
        match self
            .publisher
            .publish(self.topics.telemetry(), message)
            .await
        {
            Ok(delivery) => uplink.sent(last_seq, delivery, Instant::now()),
            // The link is closing; shutdown ends the loop.
            Err(LinkClosed) => uplink.refused(),
        }
    }
}

#[cfg(test)]
mod tests;
