//! The OCPP 1.6 payloads this central system reads and writes, as serde types.
//!
//! Hand-written rather than taken from `rust-ocpp`: every 3.x release of that crate pulls in
//! `validator` (and with it `idna` and the ICU tables) or `jsonschema`, about 110 crates in
//! all, and its `rust_decimal` turns on serde_json's `arbitrary_precision` for the whole agent,
//! which changes how every JSON number of the command path is parsed. The few messages a home
//! charger needs are small; their field names and enumerations are the 1.6 JSON schemas'.
//! Fields the driver does not use are not modelled and are ignored when present.

use serde::{Deserialize, Serialize};

/// `ChargePointStatus` (StatusNotification.req `status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub(crate) enum ChargePointStatus {
    Available,
    Preparing,
    Charging,
    SuspendedEVSE,
    SuspendedEV,
    Finishing,
    Reserved,
    Unavailable,
    Faulted,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BootNotification {
    pub(crate) charge_point_vendor: String,
    pub(crate) charge_point_model: String,
    #[serde(default)]
    pub(crate) firmware_version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatusNotification {
    pub(crate) connector_id: u32,
    #[allow(dead_code)] // required by the schema; read so a frame without it is refused
    pub(crate) error_code: String,
    pub(crate) status: ChargePointStatus,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MeterValues {
    pub(crate) connector_id: u32,
    pub(crate) meter_value: Vec<MeterValue>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct MeterValue {
    #[allow(dead_code)] // required by the schema; the latest frame's values are the state
    pub(crate) timestamp: String,
    pub(crate) sampled_value: Vec<SampledValue>,
}

/// One `sampledValue`; its defaults are the schema's (measurand
/// `Energy.Active.Import.Register`, format `Raw`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SampledValue {
    pub(crate) value: String,
    #[serde(default)]
    pub(crate) measurand: Option<String>,
    #[serde(default)]
    pub(crate) phase: Option<String>,
    #[serde(default)]
    pub(crate) unit: Option<String>,
    #[serde(default)]
    pub(crate) format: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StartTransaction {
    pub(crate) connector_id: u32,
    pub(crate) id_tag: String,
    #[allow(dead_code)] // required by the schema
    pub(crate) meter_start: i64,
    #[allow(dead_code)] // required by the schema
    pub(crate) timestamp: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StopTransaction {
    pub(crate) transaction_id: i64,
    #[allow(dead_code)] // required by the schema
    pub(crate) meter_stop: i64,
    #[allow(dead_code)] // required by the schema
    pub(crate) timestamp: String,
    #[serde(default)]
    pub(crate) id_tag: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Authorize {
    pub(crate) id_tag: String,
}

/// `AuthorizationStatus`, the part of `IdTagInfo` this central system sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) enum AuthorizationStatus {
    Accepted,
    Invalid,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IdTagInfo {
    pub(crate) status: AuthorizationStatus,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct BootNotificationConf {
    pub(crate) status: &'static str,
    pub(crate) current_time: String,
    pub(crate) interval: u64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct HeartbeatConf {
    pub(crate) current_time: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StartTransactionConf {
    pub(crate) id_tag_info: IdTagInfo,
    pub(crate) transaction_id: i64,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct IdTagInfoConf {
    pub(crate) id_tag_info: IdTagInfo,
}

/// The actions of OCPP 1.6 (both directions, and the security whitepaper's): an action not
/// among them is `NotImplemented`, one among them this central system does not take from a
/// charge point is `NotSupported` (OCPP-J 1.6, 4.2.3).
pub(crate) const KNOWN_ACTIONS: &[&str] = &[
    "Authorize",
    "BootNotification",
    "CancelReservation",
    "CertificateSigned",
    "ChangeAvailability",
    "ChangeConfiguration",
    "ClearCache",
    "ClearChargingProfile",
    "DataTransfer",
    "DeleteCertificate",
    "DiagnosticsStatusNotification",
    "ExtendedTriggerMessage",
    "FirmwareStatusNotification",
    "GetCompositeSchedule",
    "GetConfiguration",
    "GetDiagnostics",
    "GetInstalledCertificateIds",
    "GetLocalListVersion",
    "GetLog",
    "Heartbeat",
    "InstallCertificate",
    "LogStatusNotification",
    "MeterValues",
    "RemoteStartTransaction",
    "RemoteStopTransaction",
    "ReserveNow",
    "Reset",
    "SecurityEventNotification",
    "SendLocalList",
    "SetChargingProfile",
    "SignCertificate",
    "SignedFirmwareStatusNotification",
    "SignedUpdateFirmware",
    "StartTransaction",
    "StatusNotification",
    "StopTransaction",
    "TriggerMessage",
    "UnlockConnector",
    "UpdateFirmware",
];
