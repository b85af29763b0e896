//! The built-in OCPP 1.6J central system (`[[drivers]] kind = "ocpp"`): charge points connect to
//! the gateway over WebSocket, and connector 1 of each is a `charger` device (docs/PROTOCOL.md
//! 17).
//!
//! One task, [`run`], owns every charge point's [`session::Session`] and the transaction ids, so
//! no state is shared between connections; the server's tasks (`server.rs`) only carry frames.
//! Per concern: [`settings`] (the entry and its checks), [`frame`] (the OCPP-J codec),
//! [`messages`] (the 1.6 payloads), [`session`] (answers and the device state, pure), `server`
//! (sockets). A charge point is online from its upgrade until its socket closes or it has been
//! silent for `2 × heartbeat_secs` and a margin; offline, it reports nothing.
//!
//! `charger:set-operating-mode` is a CALL to the charger (RemoteStartTransaction or
//! RemoteStopTransaction), and the command's outcome waits for its answer.

pub(crate) mod frame;
pub(crate) mod messages;
pub(crate) mod server;
pub(crate) mod session;
pub(crate) mod settings;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::drivers::{Availability, CommandFailure, DriverCommand, Sample};
use crate::model::device::DeviceState;
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
}

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
        path = %settings.path, "ocpp: central system listening");
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    let accept = tokio::spawn(server::serve(listener, settings.clone(), events_tx));
    let mut driver = Driver {
        connected: (0..settings.charge_points.len()).map(|_| None).collect(),
        // Seeded from the clock so a restarted agent does not hand out the ids of transactions
        // a charger may still be stopping.
        next_transaction: i64::try_from(crate::model::clock::system_secs() % (1 << 30))
            .unwrap_or(1)
            .max(1),
        pending: Vec::new(),
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
            _ = silence.tick() => driver.check_silence().await,
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
    next_transaction: i64,
    /// Commands sent to a charge point as a CALL, waiting for its answer.
    pending: Vec<Pending>,
    next_call: u64,
}

/// A command waiting for a charge point's answer to its CALL.
struct Pending {
    unique_id: String,
    cp: usize,
    action: &'static str,
    done: tokio::sync::oneshot::Sender<Result<serde_json::Value, CommandFailure>>,
}

/// CALLs one charge point may have unanswered at once; more commands fail at once.
const MAX_PENDING: usize = 4;

/// The commands the devices carry out.
const COMMANDS: [&str; 1] = ["charger:set-operating-mode"];

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
                if let Some(old) = self.connected[id.cp].take() {
                    self.fail_pending(id.cp, "the charge point connected again");
                    let _ = old.outgoing.try_send(Outgoing::Close(
                        CloseCode::Normal,
                        "replaced by a new connection",
                    ));
                }
                self.connected[id.cp] = Some(Connected {
                    conn: id.conn,
                    outgoing,
                    session: Session::default(),
                    last_seen: Instant::now(),
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
                    self.connected[id.cp] = None;
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
            // A charger that does not read its answers is not waited for: it is closed.
            if outgoing.try_send(Outgoing::Text(reply)).is_err() {
                let _ = outgoing.try_send(Outgoing::Close(CloseCode::Policy, "not reading"));
            }
        }
        if let Some((unique_id, answer)) = reaction.answered {
            self.resolve(id.cp, &unique_id, answer);
        }
        if let Some(state) = reaction.state {
            let sample = Sample {
                device_id: settings::device_id(cp),
                state: DeviceState::Charger(state),
                commands: Some(Arc::from(COMMANDS.as_slice())),
            };
            let _ = self.samples.send(sample).await;
        }
    }

    /// Charge points silent for longer than the settings allow are closed and offline.
    async fn check_silence(&mut self) {
        let limit = self.settings.silence_limit();
        for cp in 0..self.connected.len() {
            let silent = self.connected[cp]
                .as_ref()
                .is_some_and(|c| c.last_seen.elapsed() > limit);
            if silent {
                if let Some(c) = self.connected[cp].take() {
                    let _ = c
                        .outgoing
                        .try_send(Outgoing::Close(CloseCode::Away, "missed heartbeats"));
                }
                let why = format!("silent for more than {} s", limit.as_secs());
                self.gone(cp, &why).await;
            }
        }
    }

    /// Sends a `charger:set-operating-mode` to its charge point as a CALL; the command's
    /// outcome waits for the charger's answer ([`Driver::resolve`]).
    async fn command(&mut self, command: DriverCommand) {
        let fail = |command: DriverCommand, why: String| {
            let _ = command.done.send(Err(CommandFailure::Reported(why)));
        };
        let Some(cp) = self
            .settings
            .charge_points
            .iter()
            .position(|c| settings::device_id(&c.id) == command.device_id)
        else {
            let why = format!("no charge point is {}", command.device_id);
            return fail(command, why);
        };
        if command.slug != COMMANDS[0] {
            let why = format!("the ocpp driver does not carry out {}", command.slug);
            return fail(command, why);
        }
        let mode = match session::OperatingMode::parse(&command.input) {
            Ok(mode) => mode,
            Err(why) => return fail(command, why),
        };
        self.pending.retain(|p| !p.done.is_closed());
        if self.pending.iter().filter(|p| p.cp == cp).count() >= MAX_PENDING {
            let why = format!("{MAX_PENDING} commands are already waiting for the charge point");
            return fail(command, why);
        }
        self.next_call += 1;
        let unique_id = format!("ta-{}", self.next_call);
        let settings = self.settings.clone();
        let Some(c) = self.connected[cp].as_mut() else {
            return fail(command, "the charge point is not connected".into());
        };
        let frame = match c.session.operating_mode_call(mode, &unique_id, &settings) {
            Ok(frame) => frame,
            Err(why) => return fail(command, why),
        };
        if c.outgoing.try_send(Outgoing::Text(frame)).is_err() {
            return fail(command, "the charge point is not reading".into());
        }
        tracing::info!(driver = %settings.name, charge_point = %settings.charge_points[cp].id,
            command_id = %command.command_id, action = mode.action(), unique_id, "ocpp: call sent");
        self.pending.push(Pending {
            unique_id,
            cp,
            action: mode.action(),
            done: command.done,
        });
    }

    /// The charge point's answer to a CALL of ours becomes its command's outcome: `Accepted`
    /// succeeds, any other status or a CALLERROR fails with what the charger said.
    fn resolve(&mut self, cp: usize, unique_id: &str, answer: session::CallAnswer) {
        let Some(i) = self
            .pending
            .iter()
            .position(|p| p.cp == cp && p.unique_id == unique_id)
        else {
            tracing::warn!(driver = %self.settings.name, unique_id, "ocpp: an answer to no pending CALL");
            return;
        };
        let pending = self.pending.swap_remove(i);
        let id = &self.settings.charge_points[cp].id;
        let outcome = match answer {
            Ok(payload) => match payload["status"].as_str() {
                Some("Accepted") => Ok(serde_json::json!({"status": "Accepted"})),
                Some(status) => Err(format!("{id} answered {} with {status}", pending.action)),
                None => Err(format!("{id} answered {} without a status", pending.action)),
            },
            Err((code, description)) => Err(format!(
                "{id} answered {} with CALLERROR {code}: {description}",
                pending.action
            )),
        };
        let _ = pending.done.send(outcome.map_err(CommandFailure::Reported));
    }

    /// Fails the commands waiting for an answer on `cp`'s connection, which has ended: they
    /// fail now, not at their timeout.
    fn fail_pending(&mut self, cp: usize, why: &str) {
        let (lost, kept) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|p| p.cp == cp);
        self.pending = kept;
        for p in lost {
            let _ = p.done.send(Err(CommandFailure::Reported(format!(
                "the charge point went offline before answering {}: {why}",
                p.action
            ))));
        }
    }

    async fn gone(&mut self, cp: usize, why: &str) {
        self.fail_pending(cp, why);
        tracing::warn!(driver = %self.settings.name,
            charge_point = %self.settings.charge_points[cp].id, why, "ocpp: charge point offline");
        self.announce(cp, false, Some(why.to_owned())).await;
    }

    async fn announce(&mut self, cp: usize, online: bool, reason: Option<String>) {
        let change = Availability {
            device_id: settings::device_id(&self.settings.charge_points[cp].id),
            online,
            reason,
        };
        let _ = self.availability.send(change).await;
    }
}
