//! `[device]`: who this gateway is on the platform, and whose it is.

use serde::{Deserialize, Serialize};

use super::Rejection;
use crate::model::gateway::GatewayId;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSettings {
    /// The gateway's id on the platform. It is also the MQTT client id and the name of the
    /// device's topic subtree, so it is restricted to characters that are safe in both.
    pub id: GatewayId,
    /// The customer/workspace that owns this device on the platform. Attestations from any
    /// other workspace are refused (403), and so is every command while it is unset.
    #[serde(default)]
    pub workspace_id: Option<String>,
}

impl DeviceSettings {
    /// The id's grammar is already enforced by [`GatewayId`]'s deserialisation; only the
    /// workspace is left to check.
    pub(crate) fn validate(&self) -> Result<(), Rejection> {
        if let Some(ws) = &self.workspace_id {
            if ws.trim().is_empty() || ws.len() > 128 {
                return Err(Rejection::new(
                    "device.workspace_id",
                    format!("expected 1..=128 characters, found {ws:?}"),
                ));
            }
        }
        Ok(())
    }
}
