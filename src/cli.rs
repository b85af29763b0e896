//! The command line: `run`, `check-config`, `status`, `version`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Settings, DEFAULT_CONFIG_PATH};
use crate::status;

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
    /// Print the version.
    Version,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("texture-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::CheckConfig => check_config(&cli.config),
        Command::Status => show_status(&cli.config),
        Command::Run => run(&cli.config),
    }
}

fn load_or_report(path: &std::path::Path) -> Option<Settings> {
    match config::load(path) {
        Ok(settings) => Some(settings),
        Err(error) => {
            eprintln!("error: {error}");
            None
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    let Some(settings) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    // Parse the TLS material too: a file that exists but holds no usable certificate is as
    // fatal as a missing one, and is better found now than at the first connect.
    if !settings.broker.allow_insecure_plaintext {
        if let Err(error) = crate::link::tls::client_config(&settings.broker) {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    }
    println!("# configuration OK: {}", path.display());
    print!("{}", settings.redacted_dump());
    ExitCode::SUCCESS
}

fn show_status(path: &std::path::Path) -> ExitCode {
    let Some(settings) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    println!("device:      {}", settings.device.id);
    println!("state dir:   {}", settings.state.dir.display());
    match status::read(&settings.state.runtime_dir) {
        Ok(Some(s)) if status::is_running(s.pid) => {
            println!("daemon:      running (pid {})", s.pid);
            print_link(&s.link);
        }
        Ok(Some(s)) => {
            println!("daemon:      not running (last pid {})", s.pid);
            print_link(&s.link);
        }
        Ok(None) => println!(
            "daemon:      not running (no status in {})",
            settings.state.runtime_dir.display()
        ),
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn print_link(link: &serde_json::Value) {
    let field = |k: &str| link.get(k).cloned().unwrap_or_default();
    println!(
        "link:        {} ({})",
        field("state").as_str().unwrap_or("unknown"),
        field("broker").as_str().unwrap_or("?")
    );
    println!("connects:    {}", field("connects"));
    println!("failures:    {}", field("failures"));
    if let Some(e) = link.get("last_error").and_then(|e| e.as_str()) {
        println!("last error:  {e}");
    }
}

fn run(path: &std::path::Path) -> ExitCode {
    let Some(settings) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    crate::logging::init(&settings.log);
    // One thread: the agent's work is I/O-bound and small, a single thread keeps memory low,
    // and it makes the systemd watchdog meaningful (a wedged thread stops the pings).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(crate::daemon::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "texture-agent failed");
            ExitCode::FAILURE
        }
    }
}
