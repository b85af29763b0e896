//! Holds and fail-safe: when the agent itself puts a device back under a safe control
//! (docs/PROTOCOL.md 4.8 and 4.9).
//!
//! - **Hold.** A device command may carry `holdSecs`. Its deadline is kept here (and persisted),
//!   and when it lapses the device's **default control** from the configuration is applied.
//! - **Fail-safe.** When the link has been down for longer than `safety.failsafe_after_secs`,
//!   every device with a fail-safe control (its `failsafe_control`, else its `default_control`)
//!   gets it, and stays in fail-safe until a platform command runs on it after the link is back.
//!
//! [`Controls`] is the pure state machine: plain data, methods that take the time as an
//! argument, and [`Action`]s for the caller to carry out. The inbound router owns it, calls
//! [`Controls::due`] when [`Controls::next_due`] says (checking at least once per
//! [`MAX_SLEEP`]), runs the actions through the command runner
//! (so a control and a platform command never run on a device at once, and the newer one
//! supersedes), and reports each outcome back ([`Controls::on_action_done`]). What must survive
//! a restart or a power cut ([`Persisted`]: deadlines, who is in fail-safe) is written by the
//! router whenever [`Controls::take_dirty`] says it changed.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::envelope::Envelope;
use super::limits::DeviceLimits;
use crate::inbound::commands::catalog;
use crate::model::rejection::Rejection;
use crate::model::safety::{Control, ControlReason, DriverSafety, Failsafe, Hold, SafetyEvent};

/// The longest the router sleeps without asking [`Controls::due`], even with nothing due: the
/// deadlines are wall-clock times, and a gateway's clock may be stepped (NTP after a boot
/// without a real-time clock) while the router sleeps on the monotonic clock.
pub(crate) const MAX_SLEEP: Duration = Duration::from_secs(10);

/// How long after a failed control the agent tries it again, seconds.
pub(crate) const RETRY_SECS: u64 = 5;

/// `[safety]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetySettings {
    /// How long the link may be down before devices go to their fail-safe control, seconds.
    #[serde(default = "default_failsafe_after_secs")]
    pub failsafe_after_secs: u64,
}

fn default_failsafe_after_secs() -> u64 {
    900
}

impl Default for SafetySettings {
    fn default() -> Self {
        SafetySettings {
            failsafe_after_secs: default_failsafe_after_secs(),
        }
    }
}

/// `safety.failsafe_after_secs`: allowed range.
pub(crate) const FAILSAFE_AFTER_SECS: (u64, u64) = (5, 86_400);

impl SafetySettings {
    pub(crate) fn validate(&self) -> Result<(), Rejection> {
        let (lo, hi) = FAILSAFE_AFTER_SECS;
        if !(lo..=hi).contains(&self.failsafe_after_secs) {
            return Err(Rejection::new(
                "safety.failsafe_after_secs",
                format!(
                    "must be from {lo} to {hi} seconds, found {}",
                    self.failsafe_after_secs
                ),
            ));
        }
        Ok(())
    }
}

/// What survives a restart: per device, a hold's deadline and whether it is in fail-safe.
/// Stored as `safety-state.json` in `state.dir`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Persisted {
    #[serde(default)]
    pub(crate) devices: BTreeMap<String, PersistedDevice>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct PersistedDevice {
    /// Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) hold_until: Option<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) failsafe: bool,
}

/// Checks the `default_control` and `failsafe_control` of `[[limits]]` entry number `n`: each a
/// device command for the entry's type, with a valid input and no `holdSecs`, inside the
/// entry's own limits. A control that the envelope would refuse could never be applied.
pub(crate) fn validate_controls(entry: &DeviceLimits, n: usize) -> Result<(), Rejection> {
    let id = &entry.device_id;
    let controls = [
        ("default_control", &entry.default_control),
        ("failsafe_control", &entry.failsafe_control),
    ];
    for (key, control) in controls {
        let Some(control) = control else { continue };
        let bad = |problem: String| {
            Rejection::new("limits", format!("limits #{n} ({id}): {key}: {problem}"))
        };
        if control.input.contains_key("holdSecs") {
            return Err(bad(
                "holdSecs: a control holds until the next command".into()
            ));
        }
        let validated =
            catalog::validate(&control.command, &control.input).map_err(|e| bad(e.message))?;
        let kind = entry.device_type;
        if validated.slug.device_type() != Some(kind) {
            return Err(bad(format!(
                "{} is not a command for a {}",
                validated.slug,
                kind.as_str()
            )));
        }
        Envelope::new(std::slice::from_ref(entry))
            .check(id, kind, validated.slug, &validated.input)
            .map_err(|e| bad(e.message(id)))?;
    }
    Ok(())
}

/// `control` as the driver gets it: its input normalised by the catalog (°F in °C, defaults
/// filled in), like a platform command's. `None` for a control that does not validate, which
/// [`validate_controls`] refused at load time.
fn normalised(control: &Option<Control>) -> Option<Control> {
    let control = control.as_ref()?;
    let validated = catalog::validate(&control.command, &control.input).ok()?;
    Some(Control {
        command: control.command.clone(),
        input: validated.input,
    })
}

/// A control for the router to run on a device now.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Action {
    /// Unique while the agent runs; the command id the driver sees (`safety-<n>`).
    pub(crate) id: String,
    pub(crate) device_id: String,
    pub(crate) reason: ControlReason,
    pub(crate) control: Control,
}

/// A control waiting to be carried out, or being carried out.
#[derive(Debug, Clone, PartialEq)]
struct Pending {
    reason: ControlReason,
    /// The action id while it runs; `None` while it waits for `retry_at`.
    running: Option<String>,
    retry_at: u64,
    /// Whether a failure of it was already reported (one `control-failed` event per pending
    /// control, however often it is retried).
    failure_reported: bool,
}

/// One device's safety state.
#[derive(Debug, Clone, Default, PartialEq)]
struct DeviceControl {
    default: Option<Control>,
    failsafe_control: Option<Control>,
    hold_until: Option<u64>,
    in_failsafe: bool,
    /// The platform command dispatched while in fail-safe whose success ends it.
    leaving_with: Option<String>,
    pending: Option<Pending>,
}

impl DeviceControl {
    /// The control fail-safe applies: the fail-safe control, else the default one.
    fn failsafe(&self) -> Option<&Control> {
        self.failsafe_control.as_ref().or(self.default.as_ref())
    }
}

/// Why a hold cannot be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HoldRefused {
    #[error(
        "holdSecs: {device_id} has no default_control in its [[limits]] entry to return to when \
         the hold lapses"
    )]
    NoDefaultControl { device_id: String },
}

/// The holds and fail-safe state of every device (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct Controls {
    devices: BTreeMap<String, DeviceControl>,
    failsafe_after: u64,
    /// Since when the link has been down (Unix seconds); `None` while it is up.
    link_down_since: Option<u64>,
    /// Whether fail-safe was already entered for this outage.
    entered: bool,
    next_id: u64,
    dirty: bool,
}

impl Controls {
    /// The controls of `entries` (validated `[[limits]]`), resuming `persisted`, at `now` with
    /// the link not yet up. A device that was in fail-safe gets its fail-safe control again
    /// (the device may have lost it in the same power cut); a hold past its deadline lapses at
    /// the first [`Controls::due`].
    pub(crate) fn new(
        entries: &[DeviceLimits],
        settings: &SafetySettings,
        persisted: Persisted,
        now: u64,
    ) -> Controls {
        let mut devices: BTreeMap<String, DeviceControl> = entries
            .iter()
            .map(|e| {
                let control = DeviceControl {
                    default: normalised(&e.default_control),
                    failsafe_control: normalised(&e.failsafe_control),
                    ..DeviceControl::default()
                };
                (e.device_id.clone(), control)
            })
            .collect();
        for (id, saved) in persisted.devices {
            // A device whose entry (and so its controls) left the configuration keeps nothing.
            let Some(device) = devices.get_mut(&id) else {
                continue;
            };
            device.hold_until = saved.hold_until.filter(|_| device.default.is_some());
            device.in_failsafe = saved.failsafe && device.failsafe().is_some();
            if device.in_failsafe {
                device.pending = Some(Pending::now(ControlReason::Failsafe, now));
            }
        }
        Controls {
            devices,
            failsafe_after: settings.failsafe_after_secs,
            link_down_since: Some(now),
            entered: false,
            next_id: 1,
            dirty: false,
        }
    }

    /// Whether a command to `device_id` may carry a hold: only when there is a default control
    /// to return to.
    pub(crate) fn check_hold(&self, device_id: &str) -> Result<(), HoldRefused> {
        match self.devices.get(device_id) {
            Some(d) if d.default.is_some() => Ok(()),
            _ => Err(HoldRefused::NoDefaultControl {
                device_id: device_id.to_owned(),
            }),
        }
    }

    /// What a driver is told with a command for `device_id` dispatched at `now`, holding for
    /// `hold_secs` (PROTOCOL 15.3).
    pub(crate) fn driver_safety(
        &self,
        device_id: &str,
        hold_secs: Option<u64>,
        now: u64,
    ) -> DriverSafety {
        let Some(device) = self.devices.get(device_id) else {
            return DriverSafety::default();
        };
        DriverSafety {
            hold: hold_secs
                .zip(device.default.clone())
                .map(|(secs, then)| Hold {
                    until: now.saturating_add(secs),
                    then,
                }),
            failsafe: device.failsafe().cloned().map(|control| Failsafe {
                after_secs: self.failsafe_after,
                control,
            }),
        }
    }

    /// A platform command (`command_id`) passed the envelope and goes to `device_id` at `now`.
    /// The latest instruction wins: its hold (or none) replaces the device's, and a control
    /// waiting or running for the device is dropped (the runner supersedes a running one).
    /// Call [`Controls::check_hold`] first.
    pub(crate) fn on_dispatch(
        &mut self,
        device_id: &str,
        command_id: &str,
        hold_secs: Option<u64>,
        now: u64,
    ) {
        let Some(device) = self.devices.get_mut(device_id) else {
            return;
        };
        let hold_until = hold_secs
            .filter(|_| device.default.is_some())
            .map(|secs| now.saturating_add(secs));
        if device.hold_until != hold_until {
            device.hold_until = hold_until;
            self.dirty = true;
        }
        device.pending = None;
        if device.in_failsafe {
            device.leaving_with = Some(command_id.to_owned());
        }
    }

    /// A platform command ran successfully on `device_id`. If it was dispatched in fail-safe,
    /// after the link came back, the device leaves fail-safe.
    pub(crate) fn on_platform_success(
        &mut self,
        device_id: &str,
        command_id: &str,
    ) -> Option<SafetyEvent> {
        let device = self.devices.get_mut(device_id)?;
        if !device.in_failsafe || device.leaving_with.as_deref() != Some(command_id) {
            return None;
        }
        device.in_failsafe = false;
        device.leaving_with = None;
        self.dirty = true;
        Some(SafetyEvent::FailsafeLeft {
            command_id: command_id.to_owned(),
        })
    }

    /// The link came up (`true`) or went down (`false`) at `now`. Coming back does not end
    /// fail-safe; a command does.
    pub(crate) fn on_link(&mut self, connected: bool, now: u64) {
        if connected {
            self.link_down_since = None;
            self.entered = false;
        } else if self.link_down_since.is_none() {
            self.link_down_since = Some(now);
        }
    }

    /// At `now`: enters fail-safe if the link has been down for the window, lapses holds past
    /// their deadline, and returns the controls to run now, with the events to report.
    pub(crate) fn due(&mut self, now: u64) -> (Vec<Action>, Vec<(String, SafetyEvent)>) {
        let mut events = Vec::new();
        if let Some(since) = self.link_down_since {
            if !self.entered && now.saturating_sub(since) >= self.failsafe_after {
                self.entered = true;
                for (id, device) in &mut self.devices {
                    let Some(control) = device.failsafe() else {
                        continue;
                    };
                    if device.in_failsafe {
                        continue;
                    }
                    events.push((
                        id.clone(),
                        SafetyEvent::FailsafeEntered {
                            link_down_since: since,
                            command: control.command.clone(),
                        },
                    ));
                    device.in_failsafe = true;
                    device.hold_until = None;
                    device.leaving_with = None;
                    device.pending = Some(Pending::now(ControlReason::Failsafe, now));
                    self.dirty = true;
                }
            }
        }
        for (id, device) in &mut self.devices {
            let Some(deadline) = device.hold_until else {
                continue;
            };
            if deadline > now || device.pending.is_some() {
                continue;
            }
            let command = device.default.as_ref().map(|c| c.command.clone());
            events.push((
                id.clone(),
                SafetyEvent::HoldExpired {
                    deadline,
                    command: command.unwrap_or_default(),
                },
            ));
            device.pending = Some(Pending::now(ControlReason::HoldExpired, now));
        }
        let mut actions = Vec::new();
        for (id, device) in &mut self.devices {
            let control = match &device.pending {
                Some(p) if p.running.is_none() && p.retry_at <= now => match p.reason {
                    ControlReason::HoldExpired => device.default.clone(),
                    ControlReason::Failsafe => device.failsafe().cloned(),
                },
                _ => continue,
            };
            let (Some(control), Some(pending)) = (control, device.pending.as_mut()) else {
                // Nothing to apply (no constructor leaves a hold without a default control):
                // forget the hold too, or `next_due` would name it forever.
                if device.pending.as_ref().map(|p| p.reason) == Some(ControlReason::HoldExpired) {
                    device.hold_until = None;
                }
                device.pending = None;
                continue;
            };
            let action_id = format!("safety-{}", self.next_id);
            self.next_id += 1;
            pending.running = Some(action_id.clone());
            actions.push(Action {
                id: action_id,
                device_id: id.clone(),
                reason: pending.reason,
                control,
            });
        }
        (actions, events)
    }

    /// When [`Controls::due`] next has something to do, Unix seconds; `None` when nothing is
    /// due until a new event (a dispatch, a link change, an outcome). Calling `due` earlier
    /// does nothing, so the router sleeps until then instead of waking every second: an idle
    /// gateway's CPU budget has no room for a tick a second. Times are whole seconds, so a
    /// control comes at most 1 s (one control period) after its moment.
    pub(crate) fn next_due(&self) -> Option<u64> {
        let failsafe = self
            .link_down_since
            .filter(|_| !self.entered)
            .filter(|_| {
                self.devices
                    .values()
                    .any(|d| !d.in_failsafe && d.failsafe().is_some())
            })
            .map(|since| since.saturating_add(self.failsafe_after));
        let devices = self.devices.values().filter_map(|d| match &d.pending {
            None => d.hold_until,
            Some(p) if p.running.is_none() => Some(p.retry_at),
            Some(_) => None,
        });
        failsafe.into_iter().chain(devices).min()
    }

    /// The outcome of action `action_id` on `device_id` at `now`: `Err` with the reason it
    /// could not be applied (it is tried again after [`RETRY_SECS`]). The outcome of an action
    /// no longer pending (a platform command replaced it) changes nothing.
    pub(crate) fn on_action_done(
        &mut self,
        device_id: &str,
        action_id: &str,
        outcome: Result<(), String>,
        now: u64,
    ) -> Option<SafetyEvent> {
        let device = self.devices.get_mut(device_id)?;
        let reason = match &device.pending {
            Some(p) if p.running.as_deref() == Some(action_id) => p.reason,
            _ => return None,
        };
        let command = match reason {
            ControlReason::HoldExpired => device.default.as_ref(),
            ControlReason::Failsafe => device.failsafe(),
        }
        .map(|c| c.command.clone())
        .unwrap_or_default();
        let pending = device.pending.as_mut()?;
        match outcome {
            Ok(()) => {
                device.pending = None;
                if reason == ControlReason::HoldExpired {
                    device.hold_until = None;
                    self.dirty = true;
                }
                Some(SafetyEvent::ControlApplied { reason, command })
            }
            Err(message) => {
                pending.running = None;
                pending.retry_at = now.saturating_add(RETRY_SECS);
                let first = !std::mem::replace(&mut pending.failure_reported, true);
                first.then_some(SafetyEvent::ControlFailed {
                    reason,
                    command,
                    message,
                    retry_secs: RETRY_SECS,
                })
            }
        }
    }

    /// Whether [`Controls::persisted`] changed since the last call; clears the flag.
    pub(crate) fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// Marks the persisted state as changed again (its write failed).
    pub(crate) fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// What must survive a restart.
    pub(crate) fn persisted(&self) -> Persisted {
        Persisted {
            devices: self
                .devices
                .iter()
                .filter(|(_, d)| d.hold_until.is_some() || d.in_failsafe)
                .map(|(id, d)| {
                    let saved = PersistedDevice {
                        hold_until: d.hold_until,
                        failsafe: d.in_failsafe,
                    };
                    (id.clone(), saved)
                })
                .collect(),
        }
    }

    /// The hold deadline of `device_id`, if one is running.
    #[cfg(test)]
    pub(crate) fn hold_until(&self, device_id: &str) -> Option<u64> {
        self.devices.get(device_id)?.hold_until
    }

    /// Whether `device_id` is in fail-safe.
    #[cfg(test)]
    pub(crate) fn in_failsafe(&self, device_id: &str) -> bool {
        self.devices.get(device_id).is_some_and(|d| d.in_failsafe)
    }
}

impl Pending {
    fn now(reason: ControlReason, now: u64) -> Pending {
        Pending {
            reason,
            running: None,
            retry_at: now,
            failure_reported: false,
        }
    }
}

#[cfg(test)]
mod tests;
