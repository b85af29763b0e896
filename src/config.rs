//! Configuration: one TOML file, then `TEXTURE_AGENT__SECTION__KEY` environment overrides.
//!
//! Loading is strict on purpose. A gateway is configured once, often by someone copying a file
//! onto it, and a misspelt key that is silently ignored (say `ca_fle`) would quietly fall back
//! to a default and only show up as a mysterious connection failure weeks later. So unknown keys
//! are errors, and every error names the key, the source it came from and what was expected.
//!
//! The loaded [`Settings`] are then *validated* (files exist, bounds make sense, TLS is either
//! configured or explicitly waived) so that `check-config` and `run` reject the same things.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::gateway::GatewayId;

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/texture-agent/agent.toml";

/// Prefix of environment overrides: `TEXTURE_AGENT__BROKER__PORT=8883`.
pub const ENV_PREFIX: &str = "TEXTURE_AGENT";

/// Everything the daemon needs to know, as loaded and validated.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub device: DeviceSettings,
    pub broker: BrokerSettings,
    /// Command authorisation. Without it every command is refused: nothing can be verified.
    #[serde(default)]
    pub trust: Option<TrustSettings>,
    #[serde(default)]
    pub pairing: PairingSettings,
    #[serde(default)]
    pub telemetry: crate::telemetry::settings::TelemetrySettings,
    #[serde(default)]
    pub commands: crate::inbound::commands::CommandSettings,
    /// The devices behind this gateway, one `[[drivers]]` table each.
    #[serde(default)]
    pub drivers: Vec<crate::drivers::DriverSettings>,
    #[serde(default)]
    pub state: StateSettings,
    #[serde(default)]
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PairingSettings {
    /// How long a pairing code stays valid.
    #[serde(default = "default_code_ttl_secs")]
    pub code_ttl_secs: u64,
    /// What `texture-agent pair` encodes in its QR code, for the Connect page to scan.
    /// `{device_id}` and `{code}` are substituted.
    #[serde(default = "default_qr_uri")]
    pub qr_uri: String,
}

impl Default for PairingSettings {
    fn default() -> Self {
        PairingSettings {
            code_ttl_secs: default_code_ttl_secs(),
            qr_uri: default_qr_uri(),
        }
    }
}

fn default_code_ttl_secs() -> u64 {
    600
}
fn default_qr_uri() -> String {
    "texture-pair:{device_id}:{code}".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSettings {
    /// The platform's root public key (Ed25519, 32 bytes, unpadded base64url), pinned at
    /// install time. It signs the trust bundles that list the platform's signing keys.
    pub root_public_key: String,
    /// The `iss` every attestation and trust bundle must carry.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// How far the device's and the platform's clocks may disagree.
    #[serde(default = "default_skew_secs")]
    pub max_clock_skew_secs: u64,
    /// Live command ids remembered for replay protection; when full, new commands are refused.
    #[serde(default = "default_replay_capacity")]
    pub replay_capacity: usize,
}

fn default_issuer() -> String {
    "texture-platform".into()
}
fn default_skew_secs() -> u64 {
    60
}
fn default_replay_capacity() -> usize {
    10_000
}

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

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerSettings {
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Name the server certificate must carry, when it differs from `host` (for example when
    /// `host` is an IP address or a load balancer's name).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// CA bundle (PEM) the broker's certificate must chain to. Only these CAs are trusted: the
    /// system store is never consulted, so a mis-issued public certificate cannot impersonate
    /// the platform.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Device certificate chain (PEM) for mutual TLS.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Device private key (PEM). Treated as a secret: never logged or printed.
    #[serde(default)]
    pub client_key_file: Option<Secret<PathBuf>>,
    /// ALPN protocol names, for brokers that share port 443 with HTTPS (AWS IoT uses
    /// `x-amzn-mqtt-ca`, most others `mqtt`). Empty means no ALPN extension.
    #[serde(default)]
    pub alpn: Vec<String>,
    #[serde(default = "default_keepalive_secs")]
    pub keepalive_secs: u64,
    #[serde(default = "default_connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    #[serde(default = "default_backoff_min_ms")]
    pub backoff_min_ms: u64,
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Plain TCP without TLS. Only for lab set-ups; every connect then logs a warning.
    #[serde(default)]
    pub allow_insecure_plaintext: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateSettings {
    /// Durable state: survives reboots (systemd `StateDirectory=`).
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
    /// Volatile state: the live status file and, later, the control socket
    /// (systemd `RuntimeDirectory=`, a tmpfs, so frequent updates cost no flash wear).
    #[serde(default = "default_runtime_dir")]
    pub runtime_dir: PathBuf,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    #[serde(default)]
    pub format: LogFormat,
    #[serde(default)]
    pub level: LogLevel,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    #[default]
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    pub fn as_tracing(self) -> tracing::Level {
        match self {
            LogLevel::Error => tracing::Level::ERROR,
            LogLevel::Warn => tracing::Level::WARN,
            LogLevel::Info => tracing::Level::INFO,
            LogLevel::Debug => tracing::Level::DEBUG,
            LogLevel::Trace => tracing::Level::TRACE,
        }
    }
}

fn default_port() -> u16 {
    8883
}
fn default_keepalive_secs() -> u64 {
    30
}
fn default_connect_timeout_secs() -> u64 {
    10
}
fn default_backoff_min_ms() -> u64 {
    1_000
}
fn default_backoff_max_ms() -> u64 {
    60_000
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/texture-agent")
}
fn default_runtime_dir() -> PathBuf {
    PathBuf::from("/run/texture-agent")
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            dir: default_state_dir(),
            runtime_dir: default_runtime_dir(),
        }
    }
}

impl BrokerSettings {
    pub fn keepalive(&self) -> Duration {
        Duration::from_secs(self.keepalive_secs)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout_secs)
    }
    pub fn backoff_min(&self) -> Duration {
        Duration::from_millis(self.backoff_min_ms)
    }
    pub fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }
    /// The name the broker's certificate is checked against.
    pub fn server_name(&self) -> &str {
        self.tls_server_name.as_deref().unwrap_or(&self.host)
    }
}

/// A value that must never reach a log line or `check-config` output.
///
/// Both `Debug` and `Serialize` print `<redacted>`, so a secret cannot leak through
/// `?settings` in a tracing call or through the effective-settings dump.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }
    /// Explicit, greppable access to the secret value.
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl<T> Serialize for Secret<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Why the configuration could not be used. Each message names the offending key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration file {path}: not found")]
    FileNotFound { path: PathBuf },
    #[error("configuration file {path}: cannot be read: {source}")]
    FileUnreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{message} (sources: {path}, then {ENV_PREFIX}__* environment variables)")]
    Invalid { path: PathBuf, message: String },
    #[error("configuration key `{key}` ({path}): {problem}")]
    Rejected {
        key: &'static str,
        path: PathBuf,
        problem: String,
    },
}

/// Loads the file at `path`, applies environment overrides from `env`, and validates the result.
///
/// `env` is passed in rather than read from the process so tests can exercise overrides without
/// mutating global state.
pub fn load_from(
    path: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Settings, ConfigError> {
    // Checked here, before the config crate, so that the two most common mistakes get a
    // message that says exactly that rather than a generic parse error.
    match std::fs::File::open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ConfigError::FileNotFound {
                path: path.to_owned(),
            })
        }
        Err(source) => {
            return Err(ConfigError::FileUnreadable {
                path: path.to_owned(),
                source,
            })
        }
    }
    let env_source = config::Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        // Values stay strings and are converted to the field's type on deserialisation, so
        // `TEXTURE_AGENT__DEVICE__ID=0123` keeps its leading zero instead of becoming 123.
        .try_parsing(false)
        .source(Some(env.into_iter().collect()));
    let built = config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(env_source)
        .build()
        .map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    let settings: Settings = built.try_deserialize().map_err(|e| ConfigError::Invalid {
        path: path.to_owned(),
        message: name_unknown_key(&e.to_string()),
    })?;
    validate(&settings, path)?;
    Ok(settings)
}

/// serde reports an unknown key as "unknown field `x`, expected one of ... for key `section`";
/// rewrite it so the full dotted key comes first, which is what a person searches their file for.
fn name_unknown_key(message: &str) -> String {
    let field = message
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
        .map(|(field, _)| field);
    let section = message
        .rsplit_once(" for key `")
        .and_then(|(_, rest)| rest.split_once('`'))
        .map(|(section, _)| section);
    match (field, section) {
        (Some(field), Some(section)) => format!("unknown key `{section}.{field}`: {message}"),
        (Some(field), None) => format!("unknown key `{field}`: {message}"),
        _ => message.to_owned(),
    }
}

/// Loads from `path` with the process environment.
pub fn load(path: &Path) -> Result<Settings, ConfigError> {
    load_from(
        path,
        std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)),
    )
}

fn validate(s: &Settings, path: &Path) -> Result<(), ConfigError> {
    let reject = |key: &'static str, problem: String| ConfigError::Rejected {
        key,
        path: path.to_owned(),
        problem,
    };
    let b = &s.broker;
    if b.host.trim().is_empty() {
        return Err(reject(
            "broker.host",
            "expected a host name or address, found an empty string".into(),
        ));
    }
    if b.port == 0 {
        return Err(reject(
            "broker.port",
            "expected a port between 1 and 65535, found 0".into(),
        ));
    }
    if b.keepalive_secs < 5 || b.keepalive_secs > 3_600 {
        return Err(reject(
            "broker.keepalive_secs",
            format!("expected 5..=3600 seconds, found {}", b.keepalive_secs),
        ));
    }
    if b.connect_timeout_secs == 0 || b.connect_timeout_secs > 300 {
        return Err(reject(
            "broker.connect_timeout_secs",
            format!("expected 1..=300 seconds, found {}", b.connect_timeout_secs),
        ));
    }
    // A floor on the minimum backoff is what rules out a tight reconnect loop.
    if b.backoff_min_ms < 100 {
        return Err(reject(
            "broker.backoff_min_ms",
            format!("expected at least 100 ms, found {}", b.backoff_min_ms),
        ));
    }
    if b.backoff_max_ms < b.backoff_min_ms || b.backoff_max_ms > 3_600_000 {
        return Err(reject(
            "broker.backoff_max_ms",
            format!(
                "expected between backoff_min_ms ({}) and 3600000, found {}",
                b.backoff_min_ms, b.backoff_max_ms
            ),
        ));
    }
    for name in &b.alpn {
        if name.is_empty() || name.len() > 255 {
            return Err(reject(
                "broker.alpn",
                format!("expected protocol names of 1..=255 bytes, found {name:?}"),
            ));
        }
    }
    match (&b.client_cert_file, &b.client_key_file) {
        (Some(_), None) => {
            return Err(reject(
                "broker.client_key_file",
                "required when broker.client_cert_file is set".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(reject(
                "broker.client_cert_file",
                "required when broker.client_key_file is set".into(),
            ))
        }
        _ => {}
    }
    if b.allow_insecure_plaintext {
        if b.ca_file.is_some()
            || b.client_cert_file.is_some()
            || b.tls_server_name.is_some()
            || !b.alpn.is_empty()
        {
            return Err(reject(
                "broker.allow_insecure_plaintext",
                "TLS files are configured too; remove them or set allow_insecure_plaintext = false"
                    .into(),
            ));
        }
    } else {
        let Some(ca) = &b.ca_file else {
            return Err(reject(
                "broker.ca_file",
                "required: the CA bundle that the broker's certificate must chain to (plaintext needs allow_insecure_plaintext = true)".into(),
            ));
        };
        require_readable_file("broker.ca_file", ca, path)?;
        if let Some(cert) = &b.client_cert_file {
            require_readable_file("broker.client_cert_file", cert, path)?;
        }
        if let Some(key) = &b.client_key_file {
            // The message must not name the key's path: it is a secret.
            if std::fs::File::open(key.expose()).is_err() {
                return Err(reject(
                    "broker.client_key_file",
                    "file is missing or unreadable".into(),
                ));
            }
        }
    }
    if let Some(ws) = &s.device.workspace_id {
        if ws.trim().is_empty() || ws.len() > 128 {
            return Err(reject(
                "device.workspace_id",
                format!("expected 1..=128 characters, found {ws:?}"),
            ));
        }
    }
    if let Some(t) = &s.trust {
        if let Err(problem) = crate::inbound::auth::jws::public_key_from_base64(&t.root_public_key)
        {
            return Err(reject(
                "trust.root_public_key",
                format!("expected an Ed25519 public key, found {problem}"),
            ));
        }
        if t.max_clock_skew_secs > 3_600 {
            return Err(reject(
                "trust.max_clock_skew_secs",
                format!("expected 0..=3600 seconds, found {}", t.max_clock_skew_secs),
            ));
        }
        if !(1..=1_000_000).contains(&t.replay_capacity) {
            return Err(reject(
                "trust.replay_capacity",
                format!("expected 1..=1000000 entries, found {}", t.replay_capacity),
            ));
        }
        if t.issuer.is_empty() {
            return Err(reject(
                "trust.issuer",
                "expected a non-empty issuer name".into(),
            ));
        }
    }
    validate_telemetry(s, path)?;
    let c = &s.commands;
    if !(1..=3_600).contains(&c.timeout_secs) {
        return Err(reject(
            "commands.timeout_secs",
            format!("expected 1..=3600 seconds, found {}", c.timeout_secs),
        ));
    }
    for (slug, secs) in &c.timeouts {
        if crate::inbound::commands::catalog::Slug::parse(slug).is_none() {
            return Err(reject(
                "commands.timeouts",
                format!("unknown command slug `{slug}`"),
            ));
        }
        if !(1..=3_600).contains(secs) {
            return Err(reject(
                "commands.timeouts",
                format!("{slug}: expected 1..=3600 seconds, found {secs}"),
            ));
        }
    }
    if !(60..=3_600).contains(&s.pairing.code_ttl_secs) {
        return Err(reject(
            "pairing.code_ttl_secs",
            format!(
                "expected 60..=3600 seconds, found {}",
                s.pairing.code_ttl_secs
            ),
        ));
    }
    if !s.pairing.qr_uri.contains("{code}") {
        return Err(reject(
            "pairing.qr_uri",
            "must contain the {code} placeholder".into(),
        ));
    }
    if s.state.dir.as_os_str().is_empty() || !s.state.dir.is_absolute() {
        return Err(reject(
            "state.dir",
            format!("expected an absolute path, found {:?}", s.state.dir),
        ));
    }
    if s.state.runtime_dir.as_os_str().is_empty() || !s.state.runtime_dir.is_absolute() {
        return Err(reject(
            "state.runtime_dir",
            format!("expected an absolute path, found {:?}", s.state.runtime_dir),
        ));
    }
    Ok(())
}

fn validate_telemetry(s: &Settings, path: &Path) -> Result<(), ConfigError> {
    let reject = |key: &'static str, problem: String| ConfigError::Rejected {
        key,
        path: path.to_owned(),
        problem,
    };
    let t = &s.telemetry;
    if !(1..=1_000).contains(&t.batch_max_points) {
        return Err(reject(
            "telemetry.batch_max_points",
            format!("expected 1..=1000, found {}", t.batch_max_points),
        ));
    }
    if !(10..=60_000).contains(&t.batch_max_ms) {
        return Err(reject(
            "telemetry.batch_max_ms",
            format!("expected 10..=60000, found {}", t.batch_max_ms),
        ));
    }
    if !(10..=60_000).contains(&t.fsync_interval_ms) {
        return Err(reject(
            "telemetry.fsync_interval_ms",
            format!("expected 10..=60000, found {}", t.fsync_interval_ms),
        ));
    }
    if !(64 * 1024..=1 << 30).contains(&t.outbox_max_bytes) {
        return Err(reject(
            "telemetry.outbox_max_bytes",
            format!("expected 65536..=1073741824, found {}", t.outbox_max_bytes),
        ));
    }
    if !(1..=86_400).contains(&t.health_interval_secs) {
        return Err(reject(
            "telemetry.health_interval_secs",
            format!("expected 1..=86400, found {}", t.health_interval_secs),
        ));
    }
    let mut names = std::collections::HashSet::new();
    for (i, d) in s.drivers.iter().enumerate() {
        match d {
            crate::drivers::DriverSettings::Simulated {
                device_id,
                interval_ms,
                ..
            } => {
                if let Err(e) = GatewayId::parse(device_id) {
                    return Err(reject(
                        "drivers.device_id",
                        format!("driver #{}: {e}", i + 1),
                    ));
                }
                if *interval_ms < 100 {
                    return Err(reject(
                        "drivers.interval_ms",
                        format!(
                            "driver #{}: expected at least 100, found {interval_ms}",
                            i + 1
                        ),
                    ));
                }
                if !names.insert(device_id.clone()) {
                    return Err(reject(
                        "drivers.device_id",
                        format!("driver #{}: {device_id:?} is used twice", i + 1),
                    ));
                }
            }
            crate::drivers::DriverSettings::Process {
                name,
                command,
                max_line_bytes,
                ..
            } => {
                if command.is_empty() {
                    return Err(reject(
                        "drivers.command",
                        format!(
                            "driver #{} ({name}): expected a program and its arguments",
                            i + 1
                        ),
                    ));
                }
                if !(1024..=1 << 20).contains(max_line_bytes) {
                    return Err(reject(
                        "drivers.max_line_bytes",
                        format!("driver #{} ({name}): expected 1024..=1048576", i + 1),
                    ));
                }
                if !names.insert(name.clone()) {
                    return Err(reject(
                        "drivers.name",
                        format!("driver #{}: {name:?} is used twice", i + 1),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn require_readable_file(key: &'static str, file: &Path, path: &Path) -> Result<(), ConfigError> {
    match std::fs::File::open(file).and_then(|f| f.metadata()) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::Rejected {
            key,
            path: path.to_owned(),
            problem: format!("{} is not a regular file", file.display()),
        }),
        Err(e) => Err(ConfigError::Rejected {
            key,
            path: path.to_owned(),
            problem: format!("{}: {e}", file.display()),
        }),
    }
}

impl Settings {
    /// The effective settings as TOML-like text with secrets redacted, for `check-config`.
    pub fn redacted_dump(&self) -> String {
        let value = serde_json::to_value(self).expect("settings serialise");
        let mut out = String::new();
        if let serde_json::Value::Object(sections) = value {
            for (section, body) in sections {
                match body {
                    serde_json::Value::Object(fields) => {
                        out.push_str(&format!("[{section}]\n"));
                        for (k, v) in fields {
                            if !v.is_null() {
                                out.push_str(&format!("{k} = {v}\n"));
                            }
                        }
                    }
                    serde_json::Value::Null => continue,
                    other => out.push_str(&format!("{section} = {other}\n")),
                }
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, body: &str) -> PathBuf {
        let p = dir.join("agent.toml");
        std::fs::write(&p, body).unwrap();
        p
    }

    fn minimal(dir: &Path) -> String {
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        format!(
            "[device]\nid = \"gw-1\"\n[broker]\nhost = \"localhost\"\nca_file = \"{}\"\n",
            ca.display()
        )
    }

    #[test]
    fn environment_overrides_file() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &minimal(d.path()));
        let s = load_from(
            &p,
            [(
                "TEXTURE_AGENT__BROKER__PORT".to_string(),
                "1884".to_string(),
            )],
        )
        .unwrap();
        assert_eq!(s.broker.port, 1884);
        assert_eq!(s.broker.host, "localhost");
    }

    #[test]
    fn environment_values_keep_their_text() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &minimal(d.path()));
        let s = load_from(
            &p,
            [
                ("TEXTURE_AGENT__DEVICE__ID".to_string(), "0123".to_string()),
                ("TEXTURE_AGENT__LOG__FORMAT".to_string(), "json".to_string()),
            ],
        )
        .unwrap();
        assert_eq!(s.device.id.as_str(), "0123");
        assert_eq!(s.log.format, LogFormat::Json);
    }

    #[test]
    fn unknown_key_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &(minimal(d.path()) + "ca_fle = \"x\"\n"));
        let e = load_from(&p, []).unwrap_err().to_string();
        assert!(e.contains("ca_fle"), "{e}");
        assert!(e.contains("broker"), "{e}");
    }

    #[test]
    fn unknown_environment_key_is_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), &minimal(d.path()));
        let e = load_from(
            &p,
            [("TEXTURE_AGENT__BROKER__PROT".to_string(), "1".to_string())],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("prot"), "{e}");
    }

    #[test]
    fn secret_key_path_is_redacted_in_dump_and_debug() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("very-secret-key.pem");
        let cert = d.path().join("cert.pem");
        std::fs::write(&key, "k").unwrap();
        std::fs::write(&cert, "c").unwrap();
        let body = minimal(d.path())
            + &format!(
                "client_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
                cert.display(),
                key.display()
            );
        let s = load_from(&write(d.path(), &body), []).unwrap();
        assert!(!s.redacted_dump().contains("very-secret-key"));
        assert!(s.redacted_dump().contains("<redacted>"));
        assert!(!format!("{s:?}").contains("very-secret-key"));
    }

    #[test]
    fn plaintext_requires_explicit_opt_in() {
        let d = tempfile::tempdir().unwrap();
        let body = "[device]\nid = \"gw-1\"\n[broker]\nhost = \"localhost\"\n";
        let e = load_from(&write(d.path(), body), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker.ca_file"), "{e}");
        let ok = format!("{body}allow_insecure_plaintext = true\n");
        assert!(load_from(&write(d.path(), &ok), []).is_ok());
    }

    #[test]
    fn backoff_floor_prevents_tight_loops() {
        let d = tempfile::tempdir().unwrap();
        let body = minimal(d.path()) + "backoff_min_ms = 0\n";
        let e = load_from(&write(d.path(), &body), [])
            .unwrap_err()
            .to_string();
        assert!(e.contains("broker.backoff_min_ms"), "{e}");
    }
}
