//! Authorised commands: auth → **commands** → drivers → reply.
//!
//! [`plan`] turns an authorised attestation into what must happen: an immediate reply (the
//! agent's own `agent:*` commands, or a validation failure naming the field), unpairing (done
//! by the inbound router, whose pairing session owns the pairing state), or a run on a device's
//! driver. The [`runner`] carries out the last kind: one command per device, supersession, the timeout,
//! the reply and its record in the replay journal, and the interrupted report after a restart.

pub mod catalog;
pub(crate) mod runner;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::drivers::{DriverCommand, DriverRegistry};
use crate::inbound::auth::claims::AttestationClaims;
use crate::inbound::reply::{rfc3339, ErrorCode, FailedError, Reply};
use crate::model::device::DeviceType;
use catalog::Slug;

/// `[commands]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandSettings {
    /// How long a device command may run before it fails and the driver is told to cancel.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Per-slug overrides, e.g. `"vehicle:set-charge-limit" = 120`.
    #[serde(default)]
    pub timeouts: BTreeMap<String, u64>,
}

fn default_timeout_secs() -> u64 {
    30
}

impl Default for CommandSettings {
    fn default() -> Self {
        CommandSettings {
            timeout_secs: default_timeout_secs(),
            timeouts: BTreeMap::new(),
        }
    }
}

impl CommandSettings {
    pub fn timeout(&self, slug: &str) -> Duration {
        Duration::from_secs(*self.timeouts.get(slug).unwrap_or(&self.timeout_secs))
    }
}

/// What an authorised command needs next.
#[derive(Debug)]
pub enum Plan {
    /// Answer now.
    Reply(Reply),
    /// `agent:unpair`: the router clears the owner binding.
    Unpair,
    /// Run on the driver behind `device_id`.
    Device(DeviceRun),
}

#[derive(Debug)]
pub struct DeviceRun {
    pub device_id: String,
    /// The device's type, as its driver reports it.
    pub device_type: DeviceType,
    pub slug: Slug,
    pub route: mpsc::Sender<DriverCommand>,
    pub timeout: Duration,
    /// The input as validated and normalised by the catalog (e.g. °F converted to °C), without
    /// `holdSecs`: that is for the agent, not for the driver.
    pub input: serde_json::Map<String, Value>,
    /// The command's `holdSecs`, taken out of its input: how long its setpoint holds; `None`
    /// until the next command.
    pub hold_secs: Option<u64>,
}

/// Decides what to do with an authorised command (validated against the platform's command
/// set). `gateway_id` answers for the agent's own commands.
pub fn plan(
    claims: &AttestationClaims,
    gateway_id: &str,
    registry: &DriverRegistry,
    settings: &CommandSettings,
    now: u64,
) -> Plan {
    let target = claims.command.device_id.as_deref().unwrap_or(gateway_id);
    let fail =
        |code, message: String| Plan::Reply(reply_for(claims, target, now, Err((code, message))));
    let validated = match catalog::validate(&claims.command.slug, &claims.command.input) {
        Ok(v) => v,
        Err(e) => return fail(ErrorCode::ValidationError, e.message),
    };
    if validated.slug.device_type().is_none() && claims.command.device_id.is_some() {
        return fail(
            ErrorCode::ValidationError,
            format!(
                "deviceId: {} addresses the gateway itself and takes no deviceId",
                validated.slug.as_str()
            ),
        );
    }
    match validated.slug {
        Slug::AgentPing => Plan::Reply(reply_for(
            claims,
            gateway_id,
            now,
            Ok(json!({ "pong": true })),
        )),
        Slug::AgentGetState => {
            let devices: Vec<Value> = registry
                .states()
                .into_iter()
                .map(|(id, state)| json!({ "deviceId": id, "state": state }))
                .collect();
            Plan::Reply(reply_for(
                claims,
                gateway_id,
                now,
                Ok(json!({ "devices": devices })),
            ))
        }
        Slug::AgentUnpair => Plan::Unpair,
        slug => {
            let Some(device_id) = claims.command.device_id.as_deref() else {
                return fail(
                    ErrorCode::ValidationError,
                    format!("deviceId: required for {}", slug.as_str()),
                );
            };
            let Some((route, device_type)) = registry.route(device_id) else {
                return fail(
                    ErrorCode::DeviceNotFound,
                    format!("deviceId: no device {device_id:?} behind this gateway"),
                );
            };
            if slug.device_type() != Some(device_type) {
                return fail(
                    ErrorCode::ValidationError,
                    format!(
                        "deviceId: {device_id:?} is a {device_type:?}, {} does not apply",
                        slug.as_str()
                    ),
                );
            }
            if let Some(device) = registry
                .device(device_id)
                .filter(|d| !d.takes(slug.as_str()))
            {
                let takes = device.commands.as_deref().unwrap_or_default().join(", ");
                return fail(
                    ErrorCode::ValidationError,
                    format!(
                        "deviceId: {device_id:?} does not carry out {}; its availableCommands: {}",
                        slug.as_str(),
                        if takes.is_empty() { "none" } else { &takes }
                    ),
                );
            }
            Plan::Device(DeviceRun {
                device_id: device_id.to_owned(),
                device_type,
                slug,
                route,
                timeout: settings.timeout(slug.as_str()),
                input: validated.input,
                hold_secs: validated.hold_secs,
            })
        }
    }
}

/// The reply for a command that ran (or could not), shaped like the platform's
/// `command.succeeded` / `command.failed` events.
pub fn reply_for(
    claims: &AttestationClaims,
    device_id: &str,
    now: u64,
    outcome: Result<Value, (ErrorCode, String)>,
) -> Reply {
    let (issued_at, executed_at) = (rfc3339(claims.iat), rfc3339(now));
    match outcome {
        Ok(result) => Reply::Succeeded {
            command_id: claims.jti.clone(),
            device_id: device_id.to_owned(),
            issued_at,
            executed_at,
            status: 200,
            result,
        },
        Err((code, message)) => Reply::Failed {
            command_id: claims.jti.clone(),
            device_id: device_id.to_owned(),
            issued_at,
            executed_at,
            status: code.status(),
            error: FailedError { code, message },
        },
    }
}

/// The retained capabilities message: every device and the commands it accepts, with a JSON
/// Schema of each input, like the platform's `availableCommands`.
pub fn capabilities(gateway_id: &str, registry: &DriverRegistry) -> Vec<u8> {
    let devices: Vec<Value> = registry
        .devices()
        .into_iter()
        .map(|d| {
            let commands: Vec<_> = catalog::available_commands(d.device_type)
                .into_iter()
                .filter(|c| d.takes(c.slug))
                .collect();
            json!({ "deviceId": d.device_id, "type": d.device_type, "online": d.online, "availableCommands": commands })
        })
        .collect();
    let agent: Vec<Value> = [Slug::AgentPing, Slug::AgentGetState, Slug::AgentUnpair]
        .iter()
        .map(|s| json!({ "slug": s.as_str(), "description": s.description(), "inputSchema": s.input_schema() }))
        .collect();
    serde_json::to_vec(
        &json!({ "gatewayId": gateway_id, "devices": devices, "agentCommands": agent }),
    )
    .expect("capabilities serialise")
}
