//! The built-in OCPP 1.6J central system (`[[drivers]] kind = "ocpp"`): charge points connect to
//! the gateway over WebSocket (or TLS, [`tls`]), and each connector of each is a `charger`
//! device (docs/PROTOCOL.md 17).
//!
//! One task, [`run`], owns every charge point's [`session::Session`] and the transaction ids, so
//! no state is shared between connections; the server's tasks (`server.rs`) only carry frames.
//! Per concern: [`settings`] (the entry and its checks), [`frame`] (the OCPP-J codec),
//! [`messages`] (the 1.6 payloads), [`session`] (answers and the device state, pure), [`calls`]
//! (our CALLs, one at a time, pure), [`profiles`] (charging profiles and their leases, pure),
//! `server` (sockets), [`tls`] (profile 2). A charge point is online from its upgrade until its
//! socket closes or it has been silent for `2 × heartbeat_secs` and a margin; offline, it
//! reports nothing.
//!
//! Each command is a CALL to the charger (RemoteStart/StopTransaction, SetChargingProfile), and
//! its outcome waits for the answer. An accepted charge limit *stands*: the driver renews its
//! profile before the charger's `validTo` ends it, and sends it again when the charger comes
//! back, until the command's hold ends; if the gateway dies, the charger drops it by itself.

pub(crate) mod calls;
pub(crate) mod frame;
pub(crate) mod messages;
pub(crate) mod profiles;
pub(crate) mod server;
pub(crate) mod session;
pub(crate) mod settings;
pub(crate) mod tls;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::drivers::{Availability, CommandFailure, DriverCommand, Sample};
use crate::model::device::DeviceState;
use calls::{Call, Calls};
use profiles::Standing;
use server::{ConnId, Event, Outgoing};
use session::{Context, Session};
pub use settings::OcppSettings;

/// Events from all connections waiting for the driver task.
const EVENT_QUEUE: usize = 64;

/// How often silence is looked for.
const SILENCE_CHECK: Duration = Duration::from_secs(1);

/// One charge point's connection, while it has one.
struct Connected {
    conn: u64,
    outgoing: mpsc::Sender<Outgoing>,
    session: Session,
    last_seen: Instant,
    /// Our CALLs to it, one at a time.
    calls: Calls,
    /// Whether the CALLs every connection starts with have been queued: after the charger's
    /// first CALL is answered, so they follow its BootNotification. Nothing is sent before.
    set_up: bool,
    /// Answers it sent to no CALL of ours (late ones, after [`CALL_TIMEOUT`], among them).
    strays: u32,
}

/// Answers to no CALL one connection may send before it is closed: they are not counted by
/// the message rate (`frame::is_answer`), so they are counted here.
const MAX_STRAYS: u32 = 16;

/// Runs the central system until `stop` or until the agent drops its command channel. A port
/// that cannot be bound (another program has it) is retried every 5 s and logged.
pub(crate) async fn run(
    settings: OcppSettings,
    samples: mpsc::Sender<Sample>,
    availability: mpsc::Sender<Availability>,
    mut commands: mpsc::Receiver<DriverCommand>,
    mut stop: crate::agent::service::Shutdown,
) {
    let settings = Arc::new(settings);
    let addr = settings.listen_addr().expect("validated");
    // check-config has loaded it too; a file changed since is reported here.
    let tls = match tls::acceptor(&settings) {
        Ok(tls) => tls,
        Err(e) => {
            tracing::error!(driver = %settings.name, error = %e, "ocpp: cannot start");
            return;
        }
    };
    let listener = loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => break listener,
            Err(e) => {
                tracing::error!(driver = %settings.name, %addr, error = %e,
                    "ocpp: cannot listen; retrying in 5 s");
                tokio::select! {
                    () = stop.wait() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
            }
        }
    };
    tracing::info!(driver = %settings.name, addr = %listener.local_addr().map_or(addr, |a| a),
        path = %settings.path, tls = settings.tls_cert_file.is_some(),
        "ocpp: central system listening");
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let accept = tokio::spawn(server::serve(listener, tls, settings.clone(), events_tx));
    let mut driver = Driver {
        connected: (0..settings.charge_points.len()).map(|_| None).collect(),
        standing: settings
            .charge_points
            .iter()
            .map(|cp| vec![None; cp.connectors as usize])
            .collect(),
        // Seeded from the clock so a restarted agent does not hand out the ids of transactions
        // a charger may still be stopping.
        next_transaction: i64::try_from(crate::model::clock::system_secs() % (1 << 30))
            .unwrap_or(1)
            .max(1),
        next_call: 0,
        settings,
        samples,
        availability,
    };
    let mut silence = tokio::time::interval(SILENCE_CHECK);
    loop {
        tokio::select! {
            () = stop.wait() => break,
            event = events.recv() => match event {
                Some(event) => driver.on_event(event).await,
                None => break,
            },
            _ = silence.tick() => {
                driver.check_silence().await;
                driver.check_calls();
            }
            command = commands.recv() => match command {
                Some(command) => driver.command(command).await,
                None => break,
            },
        }
    }
    accept.abort();
    for c in driver.connected.iter().flatten() {
        let _ = c
            .outgoing
            .try_send(Outgoing::Close(CloseCode::Away, "the gateway is stopping"));
    }
}

struct Driver {
    settings: Arc<OcppSettings>,
    samples: mpsc::Sender<Sample>,
    availability: mpsc::Sender<Availability>,
    /// By the index of the charge point in the settings.
    connected: Vec<Option<Connected>>,
    /// The charge limit each connector keeps (connector `n` at `n - 1`), across its charge
    /// point's reconnections (not across agent restarts: the charger's own `validTo` covers
    /// those).
    standing: Vec<Vec<Option<Standing>>>,
    next_transaction: i64,
    next_call: u64,
}

/// Commands one charge point may have waiting or in flight at once; more fail at once.
const MAX_PENDING: usize = 4;

/// How long a CALL waits for the charger's answer before the next one may go.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Queues `text` to a connection; a charger that does not read its frames (16 unsent) is not
/// waited for but closed.
fn send(outgoing: &mpsc::Sender<Outgoing>, text: String) {
    if outgoing.try_send(Outgoing::Text(text)).is_err() {
        let _ = outgoing.try_send(Outgoing::Close(CloseCode::Policy, "not reading"));
    }
}

/// Whether `status` is a good answer to `action`: `Accepted`, or the answers that mean the same
/// for our own CALLs (no profile of ours to clear; availability changed once the running
/// transaction ends).
fn fine(action: &str, status: &str) -> bool {
    matches!(
        (action, status),
        (_, "Accepted") | ("ClearChargingProfile", "Unknown") | ("ChangeAvailability", "Scheduled")
    )
}

/// The commands the devices carry out.
const COMMANDS: [&str; 2] = [
    "charger:set-operating-mode",
    "charger:set-charge-rate-limit",
];

impl Driver {
    fn current(&mut self, id: ConnId) -> Option<&mut Connected> {
        self.connected[id.cp].as_mut().filter(|c| c.conn == id.conn)
    }

    async fn on_event(&mut self, event: Event) {
        match event {
            Event::Connected { id, outgoing } => {
                let cp = &self.settings.charge_points[id.cp].id;
                tracing::info!(driver = %self.settings.name, charge_point = %cp, "ocpp: connected");
                // One connection per charge point: the newer one is the charger after a
                // restart; the old socket is most likely dead already.
                self.disconnect(
                    id.cp,
                    "the charge point connected again",
                    Some((CloseCode::Normal, "replaced by a new connection")),
                );
                let connectors = self.settings.charge_points[id.cp].connectors;
                self.connected[id.cp] = Some(Connected {
                    conn: id.conn,
                    outgoing,
                    session: Session::new(connectors),
                    last_seen: Instant::now(),
                    calls: Calls::default(),
                    set_up: false,
                    strays: 0,
                });
                self.announce(id.cp, true, None).await;
            }
            Event::Text { id, text } => self.on_text(id, &text).await,
            Event::OverRate { id } => {
                let name = self.settings.name.clone();
                if let Some(c) = self.current(id) {
                    tracing::warn!(driver = %name, "ocpp: over the message rate; closing");
                    // Queued behind the answers already sent, which the charger still gets.
                    let _ = c.outgoing.try_send(Outgoing::Close(
                        CloseCode::Policy,
                        "more messages per second than allowed",
                    ));
                }
            }
            Event::Alive { id } => {
                if let Some(c) = self.current(id) {
                    c.last_seen = Instant::now();
                }
            }
            Event::Closed { id, why } => {
                if self.current(id).is_some() {
                    self.disconnect(id.cp, &why, None);
                    self.gone(id.cp, &why).await;
                }
            }
        }
    }

    async fn on_text(&mut self, id: ConnId, text: &str) {
        let settings = self.settings.clone();
        let mut next = self.next_transaction;
        let Some(c) = self.current(id) else { return };
        c.last_seen = Instant::now();
        let mut cx = Context {
            settings: &settings,
            now_unix: crate::model::clock::system_secs(),
            next_transaction: &mut next,
        };
        let reaction = c.session.on_text(text, &mut cx);
        let outgoing = c.outgoing.clone();
        self.next_transaction = next;
        let cp = &settings.charge_points[id.cp].id;
        if let Some(problem) = &reaction.problem {
            tracing::warn!(driver = %settings.name, charge_point = %cp, problem, "ocpp: frame");
        }
        if let Some(reply) = reaction.reply {
            send(&outgoing, reply);
            // Its first CALL answered (a BootNotification, or whatever a charger that stayed
            // up sends first), the connection's own CALLs follow.
            self.set_up(id.cp);
        }
        match reaction.answered {
            Some((unique_id, answer)) => self.resolve(id.cp, &unique_id, answer),
            // An answer that does not even read is as much a stray as one to no CALL.
            None if frame::is_answer(text) => self.stray(id.cp, "unreadable"),
            None => {}
        }
        if let Some((connector, state)) = reaction.state {
            let sample = Sample {
                device_id: settings::device_id(cp, connector),
                state: DeviceState::Charger(state),
                commands: Some(Arc::from(COMMANDS.as_slice())),
            };
            let _ = self.samples.send(sample).await;
        }
    }

    /// Queues what every connection starts with, once, ahead of any command that came before
    /// it: the installer's `ChargePointMaxProfile` (or the clearing of ours, when the
    /// configuration no longer has one), each connector's standing limit if it has one and no
    /// newer one is on its way, and TriggerMessages for each connector's status and meter
    /// values, so the devices are reported without waiting for the charger's own MeterValues.
    fn set_up(&mut self, cp: usize) {
        let now = crate::model::clock::system_secs();
        let lease = self.settings.limit_valid_secs;
        let standing: Vec<Standing> = self.standing[cp]
            .iter()
            .flatten()
            .filter(|s| s.live(now))
            .map(|s| s.renewed(now, lease))
            .collect();
        let max = self.settings.charge_points[cp].max_current_a;
        let connectors = self.settings.charge_points[cp].connectors;
        let Some(c) = self.connected[cp].as_mut().filter(|c| !c.set_up) else {
            return;
        };
        c.set_up = true;
        let mut first = vec![match max {
            Some(amps) => Call {
                installer_max: true,
                ..Call::own("SetChargingProfile", profiles::max_profile(amps, now))
            },
            None => Call::own("ClearChargingProfile", profiles::clear_max_profile()),
        }];
        for standing in standing {
            if !c.calls.has_limit(standing.connector) {
                first.push(Call::limit(standing, now));
            }
        }
        for connector in 1..=connectors {
            for message in ["StatusNotification", "MeterValues"] {
                first.push(Call::own(
                    "TriggerMessage",
                    profiles::trigger(message, connector),
                ));
            }
        }
        c.calls.prepend(first);
        self.pump(cp);
    }

    /// Sends `cp`'s next CALL if none is in flight.
    fn pump(&mut self, cp: usize) {
        let next_call = &mut self.next_call;
        let (now, lease) = (
            crate::model::clock::system_secs(),
            self.settings.limit_valid_secs,
        );
        // Nothing goes before the charger's first CALL has been answered (its BootNotification).
        let Some(c) = self.connected[cp].as_mut().filter(|c| c.set_up) else {
            return;
        };
        let Some((text, call)) = c.calls.next(
            || {
                *next_call += 1;
                format!("ta-{next_call}")
            },
            // A limit that waited behind other CALLs is leased from now.
            |call| {
                if let Some(standing) = call.limit {
                    *call = Call {
                        done: call.done.take(),
                        ..Call::limit(standing.renewed(now, lease), now)
                    };
                }
            },
            Instant::now(),
        ) else {
            return;
        };
        tracing::info!(driver = %self.settings.name, charge_point = %self.settings.charge_points[cp].id,
            action = call.action, "ocpp: call sent");
        // A charger that does not read is closed, and its CALLs fail when it is gone.
        send(&c.outgoing, text);
    }

    /// Charge points silent for longer than the settings allow are closed and offline.
    async fn check_silence(&mut self) {
        let limit = self.settings.silence_limit();
        for cp in 0..self.connected.len() {
            let silent = self.connected[cp]
                .as_ref()
                .is_some_and(|c| c.last_seen.elapsed() > limit);
            if silent {
                let why = format!("silent for more than {} s", limit.as_secs());
                self.disconnect(cp, &why, Some((CloseCode::Away, "missed heartbeats")));
                self.gone(cp, &why).await;
            }
        }
    }

    /// CALLs left unanswered for [`CALL_TIMEOUT`] fail, so the next may go; standing limits
    /// whose lease runs low are sent again; limits whose hold has ended are forgotten.
    fn check_calls(&mut self) {
        let now = crate::model::clock::system_secs();
        let lease = self.settings.limit_valid_secs;
        for cp in 0..self.connected.len() {
            for standing in &mut self.standing[cp] {
                if standing.is_some_and(|s| !s.live(now)) {
                    *standing = None;
                }
            }
            let Some(c) = self.connected[cp].as_mut() else {
                continue;
            };
            if let Some(call) = c.calls.timed_out(Instant::now(), CALL_TIMEOUT) {
                let why = format!(
                    "no answer to {} in {} s",
                    call.action,
                    CALL_TIMEOUT.as_secs()
                );
                self.finish(cp, call, Err(why));
                self.pump(cp);
            }
            // Renewed only when nothing is waiting, so a renewal never follows a newer limit
            // to the charger; a third of the lease is left for the queue to empty.
            let Some(c) = self.connected[cp]
                .as_mut()
                .filter(|c| c.set_up && c.calls.idle())
            else {
                continue;
            };
            let due = self.standing[cp]
                .iter()
                .flatten()
                .find(|s| s.due(now, lease));
            if let Some(standing) = due {
                c.calls.push(Call::limit(standing.renewed(now, lease), now));
                self.pump(cp);
            }
        }
    }

    /// Queues a command for its charge point as a CALL; the command's outcome waits for the
    /// charger's answer ([`Driver::resolve`]).
    async fn command(&mut self, command: DriverCommand) {
        let fail = |command: DriverCommand, why: String| {
            let _ = command.done.send(Err(CommandFailure::Reported(why)));
        };
        let Some((cp, connector)) = self.settings.connector_of(&command.device_id) else {
            let why = format!("no charge point is {}", command.device_id);
            return fail(command, why);
        };
        let settings = self.settings.clone();
        let Some(c) = self.connected[cp].as_mut() else {
            return fail(command, "the charge point is not connected".into());
        };
        if c.calls.commands() >= MAX_PENDING {
            let why = format!("{MAX_PENDING} commands are already waiting for the charge point");
            return fail(command, why);
        }
        let now = crate::model::clock::system_secs();
        let call = match command.slug.as_str() {
            "charger:set-operating-mode" => {
                session::OperatingMode::parse(&command.input).and_then(|mode| {
                    let payload = c.session.operating_mode_call(mode, connector, &settings)?;
                    Ok(Call::own(mode.action(), payload))
                })
            }
            "charger:set-charge-rate-limit" => {
                let max = settings.charge_points[cp].max_current_a;
                profiles::ChargeLimit::parse(&command.input, max).map(|limit| {
                    let hold = command.safety.hold.as_ref().map(|h| h.until);
                    let lease = settings.limit_valid_secs;
                    Call::limit(Standing::new(connector, limit, hold, now, lease), now)
                })
            }
            slug => Err(format!("the ocpp driver does not carry out {slug}")),
        };
        let call = match call {
            Ok(call) => call,
            Err(why) => return fail(command, why),
        };
        tracing::info!(driver = %settings.name, charge_point = %settings.charge_points[cp].id,
            command_id = %command.command_id, action = call.action, "ocpp: command queued");
        c.calls.push(Call {
            done: Some(command.done),
            ..call
        });
        self.pump(cp);
    }

    /// The charge point's answer to the CALL in flight: `Accepted` succeeds, any other status
    /// or a CALLERROR fails with what the charger said. Then the next CALL goes.
    fn resolve(&mut self, cp: usize, unique_id: &str, answer: session::CallAnswer) {
        let Some(c) = self.connected[cp].as_mut() else {
            return;
        };
        let Some(call) = c.calls.answered(unique_id) else {
            return self.stray(cp, unique_id);
        };
        c.strays = 0;
        let id = &self.settings.charge_points[cp].id;
        let outcome = match answer {
            Ok(payload) => match payload["status"].as_str() {
                Some(status) if fine(call.action, status) => Ok(()),
                Some(status) => Err(format!("{id} answered {} with {status}", call.action)),
                None => Err(format!("{id} answered {} without a status", call.action)),
            },
            Err((code, description)) => Err(format!(
                "{id} answered {} with CALLERROR {code}: {description}",
                call.action
            )),
        };
        self.finish(cp, call, outcome);
        self.pump(cp);
    }

    /// Ends one CALL: an accepted limit stands, and a command gets its outcome.
    fn finish(&mut self, cp: usize, call: Call, outcome: Result<(), String>) {
        if call.installer_max && self.settings.charge_points[cp].require_max_profile {
            self.require_max_profile(cp, outcome.is_ok());
        }
        let slot = |standing: &Standing| {
            let connector = usize::try_from(standing.connector.checked_sub(1)?).ok()?;
            Some((cp, connector))
        };
        if outcome.is_err() {
            match (&call.limit, &call.done) {
                // A refused renewal is tried again later, not at every check.
                (Some(standing), None) => {
                    if let Some((cp, n)) = slot(standing) {
                        let lease = self.settings.limit_valid_secs;
                        let now = crate::model::clock::system_secs();
                        if let Some(s) = self.standing[cp].get_mut(n).and_then(Option::as_mut) {
                            *s = s.retry_later(now, lease);
                        }
                    }
                }
                // A charger that will not take one TriggerMessage will not take the others;
                // each would hold the queue for up to 30 s.
                _ if call.action == "TriggerMessage" => {
                    if let Some(c) = self.connected[cp].as_mut() {
                        c.calls.drop_own("TriggerMessage");
                    }
                }
                _ => {}
            }
        }
        let result = match (&outcome, call.limit) {
            (Ok(()), Some(standing)) => {
                if let Some(slot) =
                    slot(&standing).and_then(|(cp, n)| self.standing.get_mut(cp)?.get_mut(n))
                {
                    *slot = Some(standing);
                }
                Ok(standing.limit.result(standing.valid_to))
            }
            (Ok(()), None) => Ok(serde_json::json!({"status": "Accepted"})),
            (Err(why), _) => Err(why.clone()),
        };
        match call.done {
            Some(done) => {
                let _ = done.send(result.map_err(CommandFailure::Reported));
            }
            None => {
                if let Err(why) = &outcome {
                    // A charger without Smart Charging or TriggerMessage says so here.
                    tracing::warn!(driver = %self.settings.name, why, "ocpp: own call refused");
                }
            }
        }
    }

    /// With `require_max_profile`: a charger that took the installer's limit is made (or kept)
    /// `Operative`, one that refused it (or did not answer) `Inoperative`, next, ahead of any
    /// other CALL. OCPP keeps the availability across the charger's reboots, so a charger that
    /// refuses the limit stays unable to charge until it takes it.
    fn require_max_profile(&mut self, cp: usize, accepted: bool) {
        let Some(c) = self.connected[cp].as_mut() else {
            return;
        };
        if !accepted {
            tracing::warn!(driver = %self.settings.name,
                charge_point = %self.settings.charge_points[cp].id,
                "ocpp: the charger refused the installer's limit; making it inoperative");
        }
        c.calls.push_front(Call::own(
            "ChangeAvailability",
            profiles::change_availability(accepted),
        ));
    }

    /// An answer to no CALL waiting (late, unknown, or unreadable): logged, and counted, since
    /// the message rate does not count answers; more than [`MAX_STRAYS`] in a row close the
    /// connection.
    fn stray(&mut self, cp: usize, unique_id: &str) {
        let Some(c) = self.connected[cp].as_mut() else {
            return;
        };
        c.strays += 1;
        tracing::warn!(driver = %self.settings.name, unique_id, "ocpp: an answer to no pending CALL");
        if c.strays > MAX_STRAYS {
            let _ = c
                .outgoing
                .try_send(Outgoing::Close(CloseCode::Policy, "answers to no CALL"));
        }
    }

    /// Ends `cp`'s connection, if it has one: its CALLs fail with `why`, and it is sent `close`.
    /// (Reporting it offline is the caller's: a replaced connection is not offline.)
    fn disconnect(&mut self, cp: usize, why: &str, close: Option<(CloseCode, &'static str)>) {
        let Some(mut c) = self.connected[cp].take() else {
            return;
        };
        Self::fail_calls(&mut c, why);
        if let Some((code, reason)) = close {
            let _ = c.outgoing.try_send(Outgoing::Close(code, reason));
        }
    }

    /// Fails the CALLs of a connection that has ended: the commands among them fail now, not
    /// at their timeout.
    fn fail_calls(c: &mut Connected, why: &str) {
        for call in c.calls.drain() {
            if let Some(done) = call.done {
                let _ = done.send(Err(CommandFailure::Reported(format!(
                    "the charge point went offline before answering {}: {why}",
                    call.action
                ))));
            }
        }
    }

    async fn gone(&mut self, cp: usize, why: &str) {
        tracing::warn!(driver = %self.settings.name,
            charge_point = %self.settings.charge_points[cp].id, why, "ocpp: charge point offline");
        self.announce(cp, false, Some(why.to_owned())).await;
    }

    /// Availability of every connector's device of `cp`.
    async fn announce(&mut self, cp: usize, online: bool, reason: Option<String>) {
        for (_, device_id) in self.settings.charge_points[cp].device_ids() {
            let change = Availability {
                device_id,
                online,
                reason: reason.clone(),
            };
            let _ = self.availability.send(change).await;
        }
    }
}
