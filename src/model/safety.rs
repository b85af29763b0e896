//! The safety envelope's shared vocabulary: the controls the agent applies on its own, what a
//! driver is told about them, and the audit events every stage reports.
//!
//! It lives below the stages because three of them meet here: the inbound safety stage decides
//! (`inbound::safety`), drivers may program a hardware revert timer from [`DriverSafety`], and
//! telemetry carries each [`SafetyEvent`] to the platform as a `safety` point (PROTOCOL 14.6).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A device command the agent runs on its own, written in the configuration: a device's
/// default control (when a hold lapses) or fail-safe control (when the platform is out of
/// reach). Validated against the command set and the installer's limits at load time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Control {
    /// A device slug for the device's type, e.g. `battery:set-operating-mode`.
    pub command: String,
    /// Its input, as a platform command would carry it (without `holdSecs`).
    #[serde(default)]
    pub input: Map<String, Value>,
}

/// What a driver is told, with a command, about the safety controls behind it (PROTOCOL
/// 15.3), so a driver whose hardware has its own revert timer (SunSpec `WMaxLimPct_RvrtTms`,
/// an OCPP charging profile's `validTo`) can program it and the hardware reverts even if the
/// agent itself is gone.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DriverSafety {
    /// The command's setpoint holds until then; then the device's default control applies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
    /// The device's fail-safe control and the link-down window after which the agent applies it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failsafe: Option<Failsafe>,
}

impl DriverSafety {
    pub fn is_empty(&self) -> bool {
        self.hold.is_none() && self.failsafe.is_none()
    }
}

/// A hold as a driver sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Hold {
    /// Unix seconds (the agent's effective now, PROTOCOL 8).
    pub until: u64,
    /// The default control applied then.
    pub then: Control,
}

/// A fail-safe control as a driver sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Failsafe {
    /// The link-down window, seconds (`safety.failsafe_after_secs`).
    pub after_secs: u64,
    pub control: Control,
}

/// Why the agent applies a control on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ControlReason {
    /// A command's `holdSecs` lapsed: the device's default control.
    HoldExpired,
    /// The link was down longer than the window: the device's fail-safe control.
    Failsafe,
}

impl ControlReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ControlReason::HoldExpired => "hold-expired",
            ControlReason::Failsafe => "failsafe",
        }
    }
}

/// An audit event of the safety envelope (PROTOCOL 14.6): logged with structured fields,
/// published as a `safety` telemetry point, and counted in `texture-agent status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(
    tag = "event",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum SafetyEvent {
    /// A command was refused `422 LIMIT_EXCEEDED`; it never reached the device.
    CommandRefused {
        command_id: String,
        slug: String,
        message: String,
    },
    /// A hold lapsed at `deadline` (Unix seconds); the default control is applied now.
    HoldExpired { deadline: u64, command: String },
    /// The link has been down since `link_down_since` (Unix seconds), longer than the window:
    /// the device enters fail-safe, its fail-safe control applied now.
    FailsafeEntered {
        link_down_since: u64,
        command: String,
    },
    /// A platform command (its id) ran after the link came back: the device leaves fail-safe.
    FailsafeLeft { command_id: String },
    /// A control the agent applied on its own was carried out by the driver.
    ControlApplied {
        reason: ControlReason,
        command: String,
    },
    /// A control could not be applied; it is tried again every `retry_secs`.
    ControlFailed {
        reason: ControlReason,
        command: String,
        message: String,
        retry_secs: u64,
    },
    /// A site policy (its version) is in force from now on.
    PolicyApplied { version: u64 },
    /// A site policy was refused; the limits in force did not change.
    PolicyRefused {
        #[serde(skip_serializing_if = "Option::is_none")]
        version: Option<u64>,
        message: String,
    },
}

impl SafetyEvent {
    /// The event's name, as in the point's `event` member.
    pub fn name(&self) -> &'static str {
        match self {
            SafetyEvent::CommandRefused { .. } => "command-refused",
            SafetyEvent::HoldExpired { .. } => "hold-expired",
            SafetyEvent::FailsafeEntered { .. } => "failsafe-entered",
            SafetyEvent::FailsafeLeft { .. } => "failsafe-left",
            SafetyEvent::ControlApplied { .. } => "control-applied",
            SafetyEvent::ControlFailed { .. } => "control-failed",
            SafetyEvent::PolicyApplied { .. } => "policy-applied",
            SafetyEvent::PolicyRefused { .. } => "policy-refused",
        }
    }
}

/// A safety event about one device (or, for policy events, the gateway itself), on its way to
/// telemetry.
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyPoint {
    pub device_id: String,
    pub event: SafetyEvent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialise_with_their_name_first_and_camel_case_members() {
        let event = SafetyEvent::FailsafeEntered {
            link_down_since: 1_795_786_200,
            command: "battery:set-operating-mode".into(),
        };
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"event":"failsafe-entered","linkDownSince":1795786200,"command":"battery:set-operating-mode"}"#
        );
        let failed = SafetyEvent::ControlFailed {
            reason: ControlReason::HoldExpired,
            command: "charger:set-charge-rate-limit".into(),
            message: "driver not running".into(),
            retry_secs: 5,
        };
        let value = serde_json::to_value(&failed).unwrap();
        assert_eq!(value["event"], failed.name());
        assert_eq!(value["reason"], "hold-expired");
        assert_eq!(value["retrySecs"], 5);
    }
}
