//! A configuration value that cannot be used: the vocabulary in which every settings section
//! says what is wrong with itself.
//!
//! It lives here, not in `config`, because each section validates itself next to its type
//! (`telemetry::settings`, `config::broker`, ...): `config` imports those types, so they must
//! not import `config` back. `config` turns a rejection into its error once it knows the file.

/// One key with a value that cannot be used, and why.
#[derive(Debug)]
pub(crate) struct Rejection {
    pub(crate) key: &'static str,
    pub(crate) problem: String,
}

impl Rejection {
    pub(crate) fn new(key: &'static str, problem: impl Into<String>) -> Self {
        Rejection {
            key,
            problem: problem.into(),
        }
    }
}
