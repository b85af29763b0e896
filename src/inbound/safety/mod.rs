//! The safety envelope: limits no command can cross (docs/PROTOCOL.md 4.7).
//!
//! Authorisation decides *who* may command a device; the envelope bounds *what* a command may do
//! to it. A genuine, correctly signed command that would set a home battery's backup reserve to
//! 0 % the night before a storm is refused here, whoever signed it.
//!
//! The check runs after a command's input has been validated and normalised by the catalog and
//! its device found, and before the runner hands it to any driver, so every driver kind
//! (simulated, process, and the protocol drivers to come) sits behind the same check.
//!
//! - [`limits`]: the installer's `[[limits]]` entries and their validation.
//! - [`envelope`]: the pure check of a planned command against the limits in force.
//! - [`controls`]: holds and fail-safe, the state machine that puts a device back under a safe
//!   control when a hold lapses or the platform is out of reach.
//! - [`policy`]: the platform's signed site policy, which may narrow the installer's limits and
//!   never widen them.

pub(crate) mod controls;
pub(crate) mod envelope;
pub(crate) mod limits;
pub(crate) mod policy;
#[cfg(test)]
mod property_tests;

pub use controls::SafetySettings;

pub(crate) use envelope::Envelope;
pub(crate) use limits::DeviceLimits;

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokio::sync::mpsc;

use crate::drivers::DriverRegistry;
use crate::inbound::commands::runner::{LocalRun, RunFailure};
use crate::inbound::commands::{CommandSettings, DeviceRun};
use crate::inbound::reply::ErrorCode;
use crate::model::safety::{DriverSafety, SafetyEvent, SafetyPoint};
use crate::storage::{self, StorageError};
use controls::{Action, Controls, Persisted};

/// The holds and fail-safe state, in `state.dir`.
pub const SAFETY_STATE_FILE: &str = "safety-state.json";

/// Safety events waiting for telemetry. Events are rare (a refusal, a lapse, an outage), so a
/// full queue means telemetry is stuck; the event is then logged, not queued.
pub(crate) const EVENT_QUEUE: usize = 256;

/// The safety stage, owned by the inbound router: the envelope in force, the holds and
/// fail-safe state machine, and where their events and durable state go.
pub(crate) struct Safety {
    /// The installer's limits, as configured; the envelope is these narrowed by the policy.
    installer: Vec<DeviceLimits>,
    policy: policy::SitePolicy,
    envelope: Envelope,
    controls: Controls,
    state_path: PathBuf,
    events: mpsc::Sender<SafetyPoint>,
    /// How long a control may run at its driver: as long as the same platform command.
    command_settings: CommandSettings,
}

/// What [`Safety::open`] reads from `state.dir`.
pub(crate) struct SafetyState {
    persisted: Persisted,
    state_path: PathBuf,
    policy: policy::SitePolicy,
}

/// Why the safety state could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SafetyStateError {
    #[error("holds and fail-safe: {0}")]
    Controls(#[from] StorageError),
    #[error("site policy: {0}")]
    Policy(#[from] policy::PolicyError),
}

impl SafetyState {
    /// Reads the holds and fail-safe state left by the last run (none on a first start).
    /// Also reads the site policy in force. A damaged file stops the start, naming it, like
    /// any other damaged state: guessing would either widen limits the platform narrowed or
    /// forget a hold.
    pub(crate) fn open(state_dir: &Path) -> Result<SafetyState, SafetyStateError> {
        let state_path = state_dir.join(SAFETY_STATE_FILE);
        let persisted = storage::read_json(&state_path)?.unwrap_or_default();
        Ok(SafetyState {
            persisted,
            state_path,
            policy: policy::SitePolicy::open(state_dir)?,
        })
    }

    /// The site policy's version and limits, for `status`.
    pub(crate) fn policy(&self) -> &policy::SitePolicy {
        &self.policy
    }
}

impl SafetyState {
    /// Per device, what the last run stored: a hold deadline, fail-safe.
    pub(crate) fn devices(&self) -> &std::collections::BTreeMap<String, controls::PersistedDevice> {
        &self.persisted.devices
    }
}

impl Safety {
    /// The stage for the installer's `limits` and `[safety]` settings, resuming `state`, at
    /// `now` (the link not up yet).
    pub(crate) fn new(
        limits: &[DeviceLimits],
        settings: &SafetySettings,
        state: SafetyState,
        events: mpsc::Sender<SafetyPoint>,
        command_settings: CommandSettings,
        now: u64,
    ) -> Safety {
        let envelope =
            Envelope::new(limits).with_policy(state.policy.version(), state.policy.limits());
        Safety {
            installer: limits.to_vec(),
            policy: state.policy,
            envelope,
            controls: Controls::new(limits, settings, state.persisted, now),
            state_path: state.state_path,
            events,
            command_settings,
        }
    }

    /// Admits a planned platform command (`command_id`) at `now`: inside the envelope, a hold
    /// only where there is a default control to return to, and the hold durably recorded
    /// before the command goes anywhere. Returns what its driver is told about the device's
    /// controls, or the refusal (code and message).
    pub(crate) fn admit(
        &mut self,
        command_id: &str,
        run: &DeviceRun,
        now: u64,
    ) -> Result<DriverSafety, (ErrorCode, String)> {
        let device_id = &run.device_id;
        if let Err(exceeded) = self
            .envelope
            .check(device_id, run.device_type, run.slug, &run.input)
        {
            let message = exceeded.message(device_id);
            self.emit(
                device_id,
                SafetyEvent::CommandRefused {
                    command_id: command_id.to_owned(),
                    slug: run.slug.as_str().to_owned(),
                    message: message.clone(),
                },
            );
            return Err((ErrorCode::LimitExceeded, message));
        }
        if run.hold_secs.is_some() {
            self.controls
                .check_hold(device_id)
                .map_err(|e| (ErrorCode::ValidationError, e.to_string()))?;
        }
        self.controls
            .on_dispatch(device_id, command_id, run.hold_secs, now);
        self.persist().map_err(|e| {
            (
                ErrorCode::CommandFailed,
                format!("could not store the hold deadline: {e}"),
            )
        })?;
        Ok(self.controls.driver_safety(device_id, run.hold_secs, now))
    }

    /// A platform command ended on `device_id`; a success may end the device's fail-safe.
    pub(crate) fn on_platform_result(&mut self, device_id: &str, command_id: &str, ok: bool) {
        if !ok {
            return;
        }
        if let Some(event) = self.controls.on_platform_success(device_id, command_id) {
            self.emit(device_id, event);
            self.persist_or_log();
        }
    }

    /// A site policy from the platform (PROTOCOL 4.10): in force from the next command if it
    /// passes every check and only narrows the installer's limits; otherwise refused, the
    /// limits in force unchanged. Either way it is audited, except an unchanged redelivery.
    pub(crate) fn on_policy(
        &mut self,
        token: &[u8],
        trust: Option<&crate::inbound::auth::trust::TrustBundle>,
        issuer: &str,
        gateway_id: &str,
        now: u64,
    ) {
        let accepted = self
            .policy
            .accept(token, trust, issuer, gateway_id, &self.installer, now);
        let event = match accepted {
            Ok(policy::Accepted::Unchanged) => return,
            Ok(policy::Accepted::Applied { version }) => {
                self.envelope =
                    Envelope::new(&self.installer).with_policy(version, self.policy.limits());
                SafetyEvent::PolicyApplied { version }
            }
            // The version only where the payload was verified and read that far.
            Err(refused) => SafetyEvent::PolicyRefused {
                version: refused.version(),
                message: refused.to_string(),
            },
        };
        self.emit(gateway_id, event);
    }

    /// The link came up or went down at `now`.
    pub(crate) fn on_link(&mut self, connected: bool, now: u64) {
        self.controls.on_link(connected, now);
    }

    /// How long the router may sleep, at `now_millis` (Unix ms), before [`Safety::due`] has
    /// something to do: until the next deadline, and never longer than [`controls::MAX_SLEEP`].
    pub(crate) fn sleep_for(&self, now_millis: u64) -> std::time::Duration {
        let max = controls::MAX_SLEEP;
        match self.controls.next_due() {
            // Due at the start of that second, when `now` (whole seconds) reaches it.
            Some(at) => {
                std::time::Duration::from_millis(at.saturating_mul(1000).saturating_sub(now_millis))
                    .min(max)
            }
            None => max,
        }
    }

    /// When [`Safety::sleep_for`] has passed: the controls to run now, each ready for the runner. A control
    /// for a device no driver has reported yet fails and is tried again.
    pub(crate) fn due(&mut self, registry: &DriverRegistry, now: u64) -> Vec<LocalRun> {
        let (actions, events) = self.controls.due(now);
        for (device_id, event) in events {
            self.emit(&device_id, event);
        }
        let mut runs = Vec::new();
        for action in actions {
            match registry.route(&action.device_id) {
                Some((route, _)) => runs.push(self.local_run(action, route, now)),
                None => {
                    let outcome = Err("no driver has reported the device yet".to_owned());
                    self.on_action_outcome(&action.device_id, &action.id, outcome, now);
                }
            }
        }
        self.persist_or_log();
        runs
    }

    fn local_run(
        &self,
        action: Action,
        route: mpsc::Sender<crate::drivers::DriverCommand>,
        now: u64,
    ) -> LocalRun {
        tracing::info!(
            safety_event = "control-started",
            device_id = %action.device_id,
            reason = action.reason.as_str(),
            command = %action.control.command,
            "applying the device's {} control",
            match action.reason {
                crate::model::safety::ControlReason::HoldExpired => "default",
                crate::model::safety::ControlReason::Failsafe => "fail-safe",
            }
        );
        LocalRun {
            safety: self.controls.driver_safety(&action.device_id, None, now),
            timeout: self.command_settings.timeout(&action.control.command),
            id: action.id,
            device_id: action.device_id,
            slug: action.control.command,
            input: action.control.input,
            route,
        }
    }

    /// A control started by [`Safety::due`] ended.
    pub(crate) fn on_control_done(
        &mut self,
        device_id: &str,
        action_id: &str,
        outcome: Result<(), RunFailure>,
        now: u64,
    ) {
        let outcome = outcome.map_err(|f| f.code_and_message().1);
        self.on_action_outcome(device_id, action_id, outcome, now);
        self.persist_or_log();
    }

    fn on_action_outcome(
        &mut self,
        device_id: &str,
        action_id: &str,
        outcome: Result<(), String>,
        now: u64,
    ) {
        if let Some(event) = self
            .controls
            .on_action_done(device_id, action_id, outcome, now)
        {
            self.emit(device_id, event);
        }
    }

    /// Logs `event` with structured fields (journald keeps each as a field: `SAFETY_EVENT`,
    /// `DEVICE_ID`, ...) and queues it for telemetry as a `safety` point.
    fn emit(&self, device_id: &str, event: SafetyEvent) {
        let detail = serde_json::to_value(&event).unwrap_or(Value::Null);
        tracing::warn!(
            safety_event = event.name(),
            device_id,
            detail = %detail,
            "safety: {}",
            event.name()
        );
        let point = SafetyPoint {
            device_id: device_id.to_owned(),
            event,
        };
        if self.events.try_send(point).is_err() {
            tracing::error!(
                device_id,
                "safety event not queued for telemetry: queue full or closed"
            );
        }
    }

    /// Writes the holds and fail-safe state if it changed.
    fn persist(&mut self) -> Result<(), StorageError> {
        if self.controls.take_dirty() {
            if let Err(e) = storage::write_json(&self.state_path, &self.controls.persisted(), 0o600)
            {
                // Still dirty: the next change or tick tries again.
                self.controls.mark_dirty();
                return Err(e);
            }
        }
        Ok(())
    }

    fn persist_or_log(&mut self) {
        if let Err(e) = self.persist() {
            tracing::error!(error = %e, "could not store the holds and fail-safe state");
        }
    }
}
