//! Log output: journald under systemd, otherwise stderr as text or JSON.
//!
//! Fields are always structured (`broker = %host`), never pre-formatted into the message, so
//! that `journalctl -o json` and the JSON format both carry them as separate keys that log
//! pipelines can filter on.

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::config::{LogFormat, LogSettings};

/// True when systemd started us with stdout/stderr connected to the journal.
///
/// `JOURNAL_STREAM` is set when stderr goes to the journal; `INVOCATION_ID` is set for every
/// unit. Either means the native journald protocol is the better channel (it keeps fields).
pub fn under_systemd() -> bool {
    std::env::var_os("JOURNAL_STREAM").is_some() || std::env::var_os("INVOCATION_ID").is_some()
}

/// Installs the global subscriber. Call once, before anything logs.
pub fn init(settings: &LogSettings) {
    let level = LevelFilter::from_level(settings.level.as_tracing());
    if under_systemd() {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(
                        layer
                            .with_syslog_identifier("texture-agent".into())
                            .with_filter(level),
                    )
                    .init();
                return;
            }
            Err(error) => {
                eprintln!("texture-agent: journald unavailable ({error}); logging to stderr")
            }
        }
    }
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match settings.format {
        LogFormat::Json => tracing_subscriber::registry()
            .with(fmt.json().flatten_event(true).with_filter(level))
            .init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(fmt.with_ansi(false).with_filter(level))
            .init(),
    }
}
