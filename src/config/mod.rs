//! Configuration: one TOML file, then `TEXTURE_AGENT__SECTION__KEY` environment overrides.
//!
//! Loading is strict on purpose. A gateway is configured once, often by someone copying a file
//! onto it, and a misspelt key that is silently ignored (say `ca_fle`) would quietly fall back
//! to a default and only show up as a mysterious connection failure weeks later. So unknown keys
//! are errors, and every error names the key, the source it came from and what was expected.
//!
//! The loaded [`Settings`] are then *validated* (files exist, bounds make sense, TLS is either
//! configured or explicitly waived) so that `check-config` and `run` reject the same things.
//! Each section owned here has its type, defaults and checks in a file named after it; the
//! types of `[telemetry]`, `[commands]` and `[[drivers]]` live with the stages that use them.
//! `validate` holds the order in which the checks run; `redact` keeps secrets out of the dump.

mod broker;
mod device;
mod log;
mod pairing;
mod redact;
mod state;
mod trust;
mod validate;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub(crate) use crate::model::rejection::Rejection;
pub use broker::BrokerSettings;
pub use device::DeviceSettings;
pub use log::{LogFormat, LogLevel, LogSettings};
pub use pairing::PairingSettings;
pub use redact::Secret;
pub use state::StateSettings;
pub use trust::TrustSettings;

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
    /// The installer's limits (the safety envelope), one `[[limits]]` table per device.
    #[serde(default)]
    pub limits: Vec<crate::inbound::safety::DeviceLimits>,
    /// Holds and fail-safe (`[safety]`).
    #[serde(default)]
    pub safety: crate::inbound::safety::SafetySettings,
    #[serde(default)]
    pub state: StateSettings,
    #[serde(default)]
    pub log: LogSettings,
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
    settings.validate().map_err(|r| r.in_file(path))?;
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

#[cfg(test)]
mod tests;
