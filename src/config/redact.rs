//! Keeping secrets out of logs and out of `check-config`'s dump of the effective settings.
//!
//! Redaction is done by the type, not by the printer: a [`Secret`] prints `<redacted>` however
//! it is printed, so a new log line or a new dump format cannot leak one by forgetting a filter.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::Settings;

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
