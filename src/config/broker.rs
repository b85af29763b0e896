//! `[broker]`: where the MQTT broker is and how the link reaches it.
//!
//! Its checks are the strictest of any section because a mistake here is silent until the first
//! connect, or worse: a missing CA file must not quietly become a plaintext connection, so TLS
//! is either fully configured or explicitly waived with `allow_insecure_plaintext`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Rejection, Secret};

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
    /// TLS session resumption: a reconnect presents a ticket from the last session instead of
    /// the full handshake, so neither certificate chain crosses the link again (PROTOCOL 1).
    /// Off only for a broker that mishandles tickets.
    #[serde(default = "default_tls_resumption")]
    pub tls_resumption: bool,
    /// Connect with clean session = 0 so the broker keeps our subscriptions (and queues
    /// commands) between connections: a reconnect then sends no SUBSCRIBE and is not sent the
    /// retained trust bundle again, which is most of what a reconnect costs on a metered link
    /// (PROTOCOL 1.2). Off by default because it changes what the platform can expect of a
    /// command published while the gateway is offline: it is queued, not lost.
    #[serde(default)]
    pub persistent_session: bool,
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

fn default_port() -> u16 {
    8883
}
fn default_tls_resumption() -> bool {
    true
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

    /// The address, then the timing, then ALPN, then the TLS material: the first problem found
    /// is the one reported.
    pub(crate) fn validate(&self) -> Result<(), Rejection> {
        self.validate_address()?;
        self.validate_timing()?;
        self.validate_alpn()?;
        self.validate_client_identity()?;
        self.validate_transport()
    }

    fn validate_address(&self) -> Result<(), Rejection> {
        if self.host.trim().is_empty() {
            return Err(Rejection::new(
                "broker.host",
                "expected a host name or address, found an empty string",
            ));
        }
        if self.port == 0 {
            return Err(Rejection::new(
                "broker.port",
                "expected a port between 1 and 65535, found 0",
            ));
        }
        Ok(())
    }

    fn validate_timing(&self) -> Result<(), Rejection> {
        if self.keepalive_secs < 5 || self.keepalive_secs > 3_600 {
            return Err(Rejection::new(
                "broker.keepalive_secs",
                format!("expected 5..=3600 seconds, found {}", self.keepalive_secs),
            ));
        }
        if self.connect_timeout_secs == 0 || self.connect_timeout_secs > 300 {
            return Err(Rejection::new(
                "broker.connect_timeout_secs",
                format!(
                    "expected 1..=300 seconds, found {}",
                    self.connect_timeout_secs
                ),
            ));
        }
        // A floor on the minimum backoff is what rules out a tight reconnect loop.
        if self.backoff_min_ms < 100 {
            return Err(Rejection::new(
                "broker.backoff_min_ms",
                format!("expected at least 100 ms, found {}", self.backoff_min_ms),
            ));
        }
        if self.backoff_max_ms < self.backoff_min_ms || self.backoff_max_ms > 3_600_000 {
            return Err(Rejection::new(
                "broker.backoff_max_ms",
                format!(
                    "expected between backoff_min_ms ({}) and 3600000, found {}",
                    self.backoff_min_ms, self.backoff_max_ms
                ),
            ));
        }
        Ok(())
    }

    fn validate_alpn(&self) -> Result<(), Rejection> {
        for name in &self.alpn {
            if name.is_empty() || name.len() > 255 {
                return Err(Rejection::new(
                    "broker.alpn",
                    format!("expected protocol names of 1..=255 bytes, found {name:?}"),
                ));
            }
        }
        Ok(())
    }

    /// A client certificate is useless without its key, and the other way round.
    fn validate_client_identity(&self) -> Result<(), Rejection> {
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(_), None) => Err(Rejection::new(
                "broker.client_key_file",
                "required when broker.client_cert_file is set",
            )),
            (None, Some(_)) => Err(Rejection::new(
                "broker.client_cert_file",
                "required when broker.client_key_file is set",
            )),
            _ => Ok(()),
        }
    }

    /// Either plaintext with no TLS setting at all, or TLS with every named file readable.
    fn validate_transport(&self) -> Result<(), Rejection> {
        if self.allow_insecure_plaintext {
            if self.ca_file.is_some()
                || self.client_cert_file.is_some()
                || self.tls_server_name.is_some()
                || !self.alpn.is_empty()
            {
                return Err(Rejection::new(
                    "broker.allow_insecure_plaintext",
                    "TLS files are configured too; remove them or set allow_insecure_plaintext = false",
                ));
            }
            return Ok(());
        }
        let Some(ca) = &self.ca_file else {
            return Err(Rejection::new(
                "broker.ca_file",
                "required: the CA bundle that the broker's certificate must chain to (plaintext needs allow_insecure_plaintext = true)",
            ));
        };
        require_readable_file("broker.ca_file", ca)?;
        if let Some(cert) = &self.client_cert_file {
            require_readable_file("broker.client_cert_file", cert)?;
        }
        if let Some(key) = &self.client_key_file {
            // The message must not name the key's path: it is a secret.
            if std::fs::File::open(key.expose()).is_err() {
                return Err(Rejection::new(
                    "broker.client_key_file",
                    "file is missing or unreadable",
                ));
            }
        }
        Ok(())
    }
}

fn require_readable_file(key: &'static str, file: &Path) -> Result<(), Rejection> {
    match std::fs::File::open(file).and_then(|f| f.metadata()) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(Rejection::new(
            key,
            format!("{} is not a regular file", file.display()),
        )),
        Err(e) => Err(Rejection::new(key, format!("{}: {e}", file.display()))),
    }
}
