//! The command line: `run`, `check-config`, `status`, `pair`, `discover`, `version`.
//!
//! This file parses the arguments and dispatches; a subcommand with logic of its own has its
//! own file (`check_config`, `status`, `pair`, `discover`), and `run` and `demo` only hand over to the
//! agent and the simulator on a runtime. Whatever came from the network or the daemon is
//! printed through [`printable`] (in `terminal`).

mod check_config;
mod discover;
mod pair;
mod status;
mod terminal;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Settings, DEFAULT_CONFIG_PATH};
pub use terminal::printable;

#[derive(Debug, Parser)]
#[command(
    name = "texture-agent",
    about = "Device-side agent for the Texture energy platform"
)]
struct Cli {
    /// Configuration file (TOML). Environment variables TEXTURE_AGENT__SECTION__KEY override it.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (normally started by systemd).
    Run,
    /// Validate the configuration and print the effective settings, secrets redacted.
    CheckConfig,
    /// Print the daemon's persisted and live state.
    Status,
    /// Pair this gateway to its owner: shows a code and QR code for the Connect page.
    Pair,
    /// Print the version.
    Version,
    /// Find SunSpec devices on a Modbus TCP endpoint: models, identity and readings.
    Discover(discover::DiscoverArgs),
    /// Run the simulated platform and a real agent through the whole key model.
    #[cfg(feature = "sim")]
    Demo {
        /// Leave everything running afterwards and print curl examples for the API.
        #[arg(long)]
        keep_running: bool,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("texture-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig => check_config::check_config(&cli.config),
        Command::Status => status::show_status(&cli.config),
        Command::Pair => pair::pair(&cli.config),
        Command::Discover(args) => discover::discover_command(&args),
        #[cfg(feature = "sim")]
        Command::Demo { keep_running } => demo(keep_running),
        Command::Run => run(&cli.config),
    }
}

/// Builds a runtime, reporting failure on stderr.
fn runtime(mut builder: tokio::runtime::Builder) -> Option<tokio::runtime::Runtime> {
    builder
        .enable_all()
        .build()
        .map_err(|error| eprintln!("error: cannot start the async runtime: {error}"))
        .ok()
}

fn load_or_report(path: &Path) -> Option<Settings> {
    match config::load(path) {
        Ok(settings) => Some(settings),
        Err(error) => {
            eprintln!("error: {error}");
            None
        }
    }
}

#[cfg(feature = "sim")]
fn demo(keep_running: bool) -> ExitCode {
    // The simulator's broker and API share the process with the demo: use both cores.
    let Some(runtime) = runtime(tokio::runtime::Builder::new_multi_thread()) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(crate::sim::demo::run(keep_running)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &Path) -> ExitCode {
    let Some(settings) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    crate::agent::logging::init(&settings.log);
    // One thread: the agent's work is I/O-bound and small, a single thread keeps memory low,
    // and it makes the systemd watchdog meaningful (a wedged thread stops the pings).
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(crate::agent::run::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "texture-agent failed");
            ExitCode::FAILURE
        }
    }
}
