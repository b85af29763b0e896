//! `[[drivers]] kind = "ocpp"`: where the central system listens, which charge points may
//! connect and with what password, how their id tags are authorized, and the limits every
//! connection lives within (README, "Configuration"; docs/PROTOCOL.md 17).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::Secret;
use crate::model::gateway::{GatewayId, InvalidGatewayId};
use crate::model::rejection::Rejection;

/// The longest charge point id: `ocpp-` and the id must fit a device id (64 characters).
pub(crate) const MAX_ID_LEN: usize = 48;

/// The most charge points one entry may list: each is a connection and a device.
pub(crate) const MAX_CHARGE_POINTS: usize = 32;

/// OCPP 1.6 `IdToken` is a CiString20.
const MAX_ID_TAG_LEN: usize = 20;

/// One `[[drivers]] kind = "ocpp"` entry: one listening socket, the charge points it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OcppSettings {
    /// Names the driver in logs.
    pub name: String,
    /// `ADDRESS:PORT` the WebSocket server listens on (`0.0.0.0:8887`, `[::]:8887`).
    pub listen: String,
    /// The URL path before the charge point id: charge points connect to
    /// `ws://HOST:PORT<path>/<chargePointId>`.
    #[serde(default = "default_path")]
    pub path: String,
    /// The only charge points accepted; their number is the connection limit.
    pub charge_points: Vec<ChargePointSettings>,
    /// `"accept-all"`: every id tag is accepted. Exactly one of `authorize` and `id_tags`.
    #[serde(default)]
    pub authorize: Option<Authorize>,
    /// The id tags accepted (a local list); any other is `Invalid`.
    #[serde(default)]
    pub id_tags: Option<Vec<String>>,
    /// The heartbeat interval given in the BootNotification answer, seconds (1 to 86400). A
    /// charge point silent for twice this and [`SILENCE_MARGIN_SECS`] is reported offline.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: u64,
    /// The largest WebSocket message accepted, bytes (1024 to 1048576); a larger one closes
    /// the connection (1009).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Messages per second one connection may send (1 to 1000); more closes it (1008).
    #[serde(default = "default_max_messages_per_sec")]
    pub max_messages_per_sec: u32,
    /// How long a charge limit the gateway sets stays valid on the charger, seconds (10 to
    /// 86400): its profile's `validTo` is at most this far ahead, and the gateway renews it while
    /// the limit stands. A charger that loses the gateway drops the limit within this time.
    #[serde(default = "default_limit_valid_secs")]
    pub limit_valid_secs: u64,
    /// PEM certificate chain the port presents: with it (and `tls_key_file`) the port speaks
    /// TLS only, `wss://` (OCPP security profile 2).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    /// The certificate's PEM private key. Its path is redacted like the broker's key's.
    #[serde(default)]
    pub tls_key_file: Option<Secret<PathBuf>>,
}

/// One charge point allowed to connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChargePointSettings {
    /// Its OCPP identity, the last path segment of its URL: letters, digits, `.`, `_`, `-`.
    pub id: String,
    /// HTTP Basic password (OCPP security profile 1); none: the charge point connects without
    /// one. Redacted in `check-config` and logs.
    #[serde(default)]
    pub password: Option<Secret<String>>,
    /// The installer's current limit for this charge point, amperes (6 to 80): programmed as
    /// its `ChargePointMaxProfile` at every connection, with no expiry, and the highest
    /// `currentLimit` a command may set.
    #[serde(default)]
    pub max_current_a: Option<u32>,
    /// How many connectors it has (1 to [`MAX_CONNECTORS`]): each is a `charger` device.
    #[serde(default = "default_connectors")]
    pub connectors: u32,
    /// Whether the charger may charge only under the installer's limit: one that refuses its
    /// `ChargePointMaxProfile` is made `Inoperative` (ChangeAvailability) until it takes it,
    /// when it is made `Operative` again. Needs `max_current_a`.
    #[serde(default)]
    pub require_max_profile: bool,
}

/// The most connectors one charge point may have: each is a device.
pub(crate) const MAX_CONNECTORS: u32 = 8;

fn default_connectors() -> u32 {
    1
}

impl ChargePointSettings {
    /// The messages it sends in the second after its boot (docs/PROTOCOL.md 17.6).
    pub(crate) fn boot_burst(&self) -> u32 {
        let statuses = if self.require_max_profile { 2 } else { 1 };
        (statuses + 2) * self.connectors + statuses + 1
    }

    /// Its connectors' device ids, connector 1 first.
    pub(crate) fn device_ids(&self) -> impl Iterator<Item = (u32, String)> + '_ {
        (1..=self.connectors).map(|n| (n, device_id(&self.id, n)))
    }
}

/// How id tags are authorized when no local list is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Authorize {
    AcceptAll,
}

/// Added to `2 × heartbeat_secs` before a silent charge point is offline: a heartbeat sent
/// right on time still crosses a slow Wi-Fi link.
pub(crate) const SILENCE_MARGIN_SECS: u64 = 10;

fn default_path() -> String {
    "/ocpp".into()
}
fn default_heartbeat_secs() -> u64 {
    300
}
fn default_max_message_bytes() -> usize {
    64 * 1024
}
fn default_max_messages_per_sec() -> u32 {
    10
}
fn default_limit_valid_secs() -> u64 {
    900
}

impl OcppSettings {
    /// Checks entry `n` (1-based) of `[[drivers]]`; the message names the entry and the key.
    pub(crate) fn validate(&self, n: usize) -> Result<(), Rejection> {
        let bad = |key: &'static str, problem: String| {
            Rejection::new(key, format!("driver #{n} ({}): {problem}", self.name))
        };
        if self.name.is_empty() {
            return Err(bad("drivers.name", "must not be empty".into()));
        }
        self.listen_addr()
            .map_err(|problem| bad("drivers.listen", problem))?;
        check_path(&self.path).map_err(|problem| bad("drivers.path", problem))?;
        if self.charge_points.is_empty() {
            return Err(bad(
                "drivers.charge_points",
                "list at least one charge point".into(),
            ));
        }
        if self.charge_points.len() > MAX_CHARGE_POINTS {
            return Err(bad(
                "drivers.charge_points",
                format!(
                    "{} charge points; at most {MAX_CHARGE_POINTS}",
                    self.charge_points.len()
                ),
            ));
        }
        let mut ids = HashSet::new();
        for cp in &self.charge_points {
            check_id(&cp.id).map_err(|problem| bad("drivers.charge_points.id", problem))?;
            if !ids.insert(cp.id.as_str()) {
                return Err(bad(
                    "drivers.charge_points.id",
                    format!("{:?} is listed twice", cp.id),
                ));
            }
            if let Some(password) = &cp.password {
                let len = password.expose().chars().count();
                // The message names the charge point, never the password.
                if !(8..=64).contains(&len) || password.expose().contains(char::is_control) {
                    return Err(bad(
                        "drivers.charge_points.password",
                        format!("{}: expected 8 to 64 printable characters", cp.id),
                    ));
                }
            }
            if !(1..=MAX_CONNECTORS).contains(&cp.connectors) {
                return Err(bad(
                    "drivers.charge_points.connectors",
                    format!(
                        "{}: expected 1 to {MAX_CONNECTORS}, found {}",
                        cp.id, cp.connectors
                    ),
                ));
            }
            if cp.require_max_profile && cp.max_current_a.is_none() {
                return Err(bad(
                    "drivers.charge_points.require_max_profile",
                    format!("{}: needs max_current_a, the limit to require", cp.id),
                ));
            }
            if let Some(amps) = cp.max_current_a {
                if !(6..=80).contains(&amps) {
                    return Err(bad(
                        "drivers.charge_points.max_current_a",
                        format!("{}: expected 6 to 80, found {amps}", cp.id),
                    ));
                }
            }
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(_), None) => {
                return Err(bad(
                    "drivers.tls_key_file",
                    "required when tls_cert_file is set".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(bad(
                    "drivers.tls_cert_file",
                    "required when tls_key_file is set".into(),
                ))
            }
            _ => {}
        }
        match (&self.authorize, &self.id_tags) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "drivers.id_tags",
                    "give authorize = \"accept-all\" or id_tags, not both".into(),
                ))
            }
            (None, None) => {
                return Err(bad(
                    "drivers.authorize",
                    "give authorize = \"accept-all\" or a local list id_tags = [...]".into(),
                ))
            }
            (None, Some(tags)) => {
                let mut seen = HashSet::new();
                for tag in tags {
                    if tag.is_empty() || tag.len() > MAX_ID_TAG_LEN || !tag.is_ascii() {
                        return Err(bad(
                            "drivers.id_tags",
                            format!("{tag:?}: expected 1 to 20 ASCII characters (IdToken)"),
                        ));
                    }
                    // IdToken is case-insensitive (CiString20).
                    if !seen.insert(tag.to_ascii_lowercase()) {
                        return Err(bad("drivers.id_tags", format!("{tag:?} is listed twice")));
                    }
                }
            }
            (Some(_), None) => {}
        }
        let ranges: [(&'static str, u64, u64, u64); 4] = [
            ("drivers.heartbeat_secs", self.heartbeat_secs, 1, 86_400),
            (
                "drivers.limit_valid_secs",
                self.limit_valid_secs,
                10,
                86_400,
            ),
            (
                "drivers.max_message_bytes",
                self.max_message_bytes as u64,
                1024,
                1 << 20,
            ),
            (
                "drivers.max_messages_per_sec",
                u64::from(self.max_messages_per_sec),
                1,
                1000,
            ),
        ];
        for (key, value, lo, hi) in ranges {
            if !(lo..=hi).contains(&value) {
                return Err(bad(key, format!("expected {lo} to {hi}, found {value}")));
            }
        }
        for cp in &self.charge_points {
            // At its boot a charger sends its BootNotification, a StatusNotification for
            // connector 0 and each connector, and what the gateway's TriggerMessages ask for
            // (two per connector, 17.6): all in about a second; with require_max_profile, a
            // ChangeAvailability makes it send its statuses once more.
            let burst = cp.boot_burst();
            if self.max_messages_per_sec < burst {
                return Err(bad(
                    "drivers.max_messages_per_sec",
                    format!(
                        "{}: with {} a charger sends up to {burst} messages in the \
                             second after it boots; set max_messages_per_sec to at least {burst}, \
                             found {}",
                        cp.id,
                        if cp.connectors == 1 {
                            "1 connector".to_owned()
                        } else {
                            format!("{} connectors", cp.connectors)
                        },
                        self.max_messages_per_sec
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The charge point (its index) and connector of device `device_id`, if it is one of ours.
    pub(crate) fn connector_of(&self, device_id: &str) -> Option<(usize, u32)> {
        self.charge_points.iter().enumerate().find_map(|(i, cp)| {
            cp.device_ids()
                .find(|(_, device)| device == device_id)
                .map(|(n, _)| (i, n))
        })
    }

    /// The socket address to bind.
    pub(crate) fn listen_addr(&self) -> Result<SocketAddr, String> {
        self.listen.parse().map_err(|_| {
            format!(
                "{:?}: expected ADDRESS:PORT, such as 0.0.0.0:8887 or [::]:8887",
                self.listen
            )
        })
    }

    /// Whether `tag` is accepted (a local list compares case-insensitively, as IdToken is).
    pub(crate) fn accepts(&self, tag: &str) -> bool {
        match (&self.authorize, &self.id_tags) {
            (Some(Authorize::AcceptAll), _) => true,
            (None, Some(tags)) => tags.iter().any(|t| t.eq_ignore_ascii_case(tag)),
            (None, None) => false,
        }
    }

    /// The id tag a RemoteStartTransaction names: the first of the local list (so the
    /// transaction it starts is accepted like a card's), or `texture-agent` with accept-all.
    pub(crate) fn remote_id_tag(&self) -> &str {
        self.id_tags
            .as_ref()
            .and_then(|tags| tags.first())
            .map_or("texture-agent", String::as_str)
    }

    /// How long a connected charge point may stay silent before it is offline.
    pub(crate) fn silence_limit(&self) -> std::time::Duration {
        std::time::Duration::from_secs(2 * self.heartbeat_secs + SILENCE_MARGIN_SECS)
    }
}

/// The device id of a charge point's connector: `ocpp-<id>` for connector 1 (so a charger
/// keeps its device when a second connector is configured), `ocpp-<id>-<n>` for the others.
pub(crate) fn device_id(charge_point: &str, connector: u32) -> String {
    match connector {
        1 => format!("ocpp-{charge_point}"),
        n => format!("ocpp-{charge_point}-{n}"),
    }
}

fn check_path(path: &str) -> Result<(), String> {
    let ok = path.starts_with('/')
        && path.len() > 1
        && !path.ends_with('/')
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{path:?}: expected an absolute URL path without a trailing /, such as /ocpp"
        ))
    }
}

/// A charge point id must make a device id (`ocpp-<id>`, PROTOCOL 1.1) with room for a
/// connector suffix: the device-id grammar of [`GatewayId`], within [`MAX_ID_LEN`].
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("{id:?}: expected 1 to {MAX_ID_LEN} characters"));
    }
    match GatewayId::parse(&device_id(id, 1)) {
        Err(InvalidGatewayId::BadCharacter(c)) => Err(format!(
            "{id:?}: {c:?} is not a letter, a digit, '.', '_' or '-'"
        )),
        // Length was checked above, and the prefix makes it non-empty.
        _ => Ok(()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn settings() -> OcppSettings {
        OcppSettings {
            name: "garage".into(),
            listen: "0.0.0.0:8887".into(),
            path: default_path(),
            charge_points: vec![ChargePointSettings {
                id: "CP-1".into(),
                password: Some(Secret::new("correct-horse".into())),
                max_current_a: Some(16),
                connectors: 1,
                require_max_profile: false,
            }],
            authorize: Some(Authorize::AcceptAll),
            id_tags: None,
            heartbeat_secs: 300,
            max_message_bytes: 65_536,
            max_messages_per_sec: 10,
            limit_valid_secs: 900,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }

    #[test]
    fn bad_settings_are_refused_naming_the_entry_and_the_key() {
        assert!(settings().validate(1).is_ok());
        type Case = (fn(&mut OcppSettings), &'static str, &'static str);
        let cases: [Case; 21] = [
            (|s| s.name.clear(), "drivers.name", "driver #2 (): must not be empty"),
            (
                |s| s.listen = "0.0.0.0".into(),
                "drivers.listen",
                "driver #2 (garage): \"0.0.0.0\": expected ADDRESS:PORT, such as 0.0.0.0:8887 or [::]:8887",
            ),
            (
                |s| s.path = "/ocpp/".into(),
                "drivers.path",
                "driver #2 (garage): \"/ocpp/\": expected an absolute URL path without a trailing /, such as /ocpp",
            ),
            (
                |s| s.charge_points.clear(),
                "drivers.charge_points",
                "driver #2 (garage): list at least one charge point",
            ),
            (
                |s| {
                    let cp = s.charge_points[0].clone();
                    s.charge_points = (0..33)
                        .map(|i| ChargePointSettings { id: format!("CP{i}"), ..cp.clone() })
                        .collect();
                },
                "drivers.charge_points",
                "driver #2 (garage): 33 charge points; at most 32",
            ),
            (
                |s| s.charge_points[0].id = "CP 1".into(),
                "drivers.charge_points.id",
                "driver #2 (garage): \"CP 1\": ' ' is not a letter, a digit, '.', '_' or '-'",
            ),
            (
                |s| {
                    let cp = s.charge_points[0].clone();
                    s.charge_points.push(cp);
                },
                "drivers.charge_points.id",
                "driver #2 (garage): \"CP-1\" is listed twice",
            ),
            (
                |s| s.charge_points[0].password = Some(Secret::new("short".into())),
                "drivers.charge_points.password",
                "driver #2 (garage): CP-1: expected 8 to 64 printable characters",
            ),
            (
                |s| s.charge_points[0].max_current_a = Some(100),
                "drivers.charge_points.max_current_a",
                "driver #2 (garage): CP-1: expected 6 to 80, found 100",
            ),
            (
                |s| {
                    s.charge_points[0].max_current_a = None;
                    s.charge_points[0].require_max_profile = true;
                },
                "drivers.charge_points.require_max_profile",
                "driver #2 (garage): CP-1: needs max_current_a, the limit to require",
            ),
            (
                |s| s.charge_points[0].connectors = 9,
                "drivers.charge_points.connectors",
                "driver #2 (garage): CP-1: expected 1 to 8, found 9",
            ),
            (
                |s| {
                    s.charge_points[0].connectors = 2;
                    s.charge_points[0].require_max_profile = true;
                },
                "drivers.max_messages_per_sec",
                "driver #2 (garage): CP-1: with 2 connectors a charger sends up to 11 messages \
                 in the second after it boots; set max_messages_per_sec to at least 11, found 10",
            ),
            (
                |s| s.charge_points[0].connectors = 4,
                "drivers.max_messages_per_sec",
                "driver #2 (garage): CP-1: with 4 connectors a charger sends up to 14 messages \
                 in the second after it boots; set max_messages_per_sec to at least 14, found 10",
            ),
            (
                |s| s.authorize = None,
                "drivers.authorize",
                "driver #2 (garage): give authorize = \"accept-all\" or a local list id_tags = [...]",
            ),
            (
                |s| s.id_tags = Some(vec!["TAG".into()]),
                "drivers.id_tags",
                "driver #2 (garage): give authorize = \"accept-all\" or id_tags, not both",
            ),
            (
                |s| {
                    s.authorize = None;
                    s.id_tags = Some(vec!["tag-1".into(), "TAG-1".into()]);
                },
                "drivers.id_tags",
                "driver #2 (garage): \"TAG-1\" is listed twice",
            ),
            (
                |s| s.heartbeat_secs = 0,
                "drivers.heartbeat_secs",
                "driver #2 (garage): expected 1 to 86400, found 0",
            ),
            (
                |s| s.max_message_bytes = 100,
                "drivers.max_message_bytes",
                "driver #2 (garage): expected 1024 to 1048576, found 100",
            ),
            (
                |s| s.max_messages_per_sec = 0,
                "drivers.max_messages_per_sec",
                "driver #2 (garage): expected 1 to 1000, found 0",
            ),
            (
                |s| s.tls_cert_file = Some("/etc/texture-agent/ocpp.pem".into()),
                "drivers.tls_key_file",
                "driver #2 (garage): required when tls_cert_file is set",
            ),
            (
                |s| s.limit_valid_secs = 5,
                "drivers.limit_valid_secs",
                "driver #2 (garage): expected 10 to 86400, found 5",
            ),
        ];
        for (change, key, problem) in cases {
            let mut s = settings();
            change(&mut s);
            let e = s.validate(2).expect_err(problem);
            assert_eq!((e.key, e.problem.as_str()), (key, problem));
        }
    }

    #[test]
    fn a_password_never_reaches_the_rejection_or_the_debug_output() {
        let mut s = settings();
        s.charge_points[0].password = Some(Secret::new("tiny\u{7}pw".into()));
        let e = s.validate(1).unwrap_err();
        assert!(!e.problem.contains("tiny"), "{}", e.problem);
        assert!(!format!("{s:?}").contains("correct-horse"));
        assert!(!serde_json::to_string(&settings())
            .unwrap()
            .contains("correct-horse"));
    }

    #[test]
    fn id_tags_are_a_case_insensitive_local_list_or_everything_is_accepted() {
        let mut s = settings();
        assert!(s.accepts("ANY-TAG"));
        s.authorize = None;
        s.id_tags = Some(vec!["Tag-1".into()]);
        assert!(s.validate(1).is_ok());
        assert!(s.accepts("TAG-1") && s.accepts("tag-1"));
        assert!(!s.accepts("TAG-2"));
    }

    #[test]
    fn the_silence_limit_is_two_heartbeats_and_a_margin() {
        let s = OcppSettings {
            heartbeat_secs: 30,
            ..settings()
        };
        assert_eq!(s.silence_limit().as_secs(), 70);
        assert_eq!(device_id("CP-1", 1), "ocpp-CP-1");
        assert_eq!(device_id("CP-1", 2), "ocpp-CP-1-2");
    }
}
