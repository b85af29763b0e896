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
    /// Pair this gateway to its owner: shows a code and QR code for the Connect page.
    Pair,
    /// Print the version.
    Version,
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
        Command::CheckConfig => check_config(&cli.config),
        Command::Status => show_status(&cli.config),
        Command::Pair => pair(&cli.config),
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
    match crate::pairing::PairingState::open(&settings.state.dir, settings.device.id.as_str(), 600)
    {
        Ok(p) => {
            let b = p.binding();
            match &b.reference_id {
                Some(owner) => println!(
                    "pairing:     paired to {owner} (binding version {}, issued {})",
                    b.version,
                    crate::reply::rfc3339(b.issued_at)
                ),
                None if b.version > 0 => {
                    println!("pairing:     unpaired (binding version {})", b.version)
                }
                None => println!("pairing:     unpaired"),
            }
        }
        Err(error) => println!("pairing:     unreadable: {error}"),
    }
    match &settings.trust {
        None => println!("trust:       not configured ([trust] section missing)"),
        Some(t) => match crate::auth::jws::public_key_from_base64(&t.root_public_key) {
            Ok(root) => {
                match crate::auth::trust::TrustStore::open(root, &t.issuer, &settings.state.dir)
                    .current()
                {
                    Some(bundle) => println!(
                        "trust:       bundle version {} (expires {}), keys: {}",
                        bundle.version,
                        crate::reply::rfc3339(bundle.expires_at),
                        {
                            let mut kids: Vec<_> = bundle.key_ids().collect();
                            kids.sort();
                            kids.join(", ")
                        }
                    ),
                    None => println!("trust:       no trust bundle received yet"),
                }
            }
            Err(problem) => println!("trust:       root key invalid: {problem}"),
        },
    }
    match status::read(&settings.state.runtime_dir) {
        Ok(Some(s)) if status::is_running(s.pid) => {
            println!("daemon:      running (pid {})", s.pid);
            print_link(&s.link);
            print_outbox(s.outbox.as_ref());
        }
        Ok(Some(s)) => {
            println!("daemon:      not running (last pid {})", s.pid);
            print_link(&s.link);
            print_outbox(s.outbox.as_ref());
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

fn print_outbox(outbox: Option<&crate::outbox::OutboxStats>) {
    if let Some(o) = outbox {
        println!(
            "outbox:      {} points waiting ({} bytes), {} dropped since install, next seq {}",
            o.depth, o.bytes, o.dropped, o.next_seq
        );
    }
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

/// `pair`: asks the daemon to start a pairing session and follows it to the end.
fn pair(path: &std::path::Path) -> ExitCode {
    use std::io::{BufRead, BufReader, IsTerminal, Write};
    use std::os::unix::net::UnixStream;

    use crate::control::{socket_path, ControlEvent, ControlRequest};

    let Some(settings) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    let socket = socket_path(&settings.state.runtime_dir);
    let mut stream = match UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(error) => {
            eprintln!(
                "error: cannot reach the daemon at {}: {error} (is texture-agent running?)",
                socket.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let mut request = serde_json::to_string(&ControlRequest::Pair).expect("serialises");
    request.push('\n');
    if let Err(error) = stream.write_all(request.as_bytes()) {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    let tty = std::io::stdout().is_terminal();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let Ok(event) = serde_json::from_str::<ControlEvent>(&line) else {
            eprintln!("error: unexpected message from the daemon: {line}");
            return ExitCode::FAILURE;
        };
        match event {
            ControlEvent::Code {
                code,
                device_id,
                expires_at,
                qr_uri,
            } => {
                println!("Pairing code for {device_id}:\n\n    {code}\n");
                println!("Enter it on the Connect page, or scan:\n");
                match qrcode::QrCode::new(qr_uri.as_bytes()) {
                    Ok(qr) => println!(
                        "{}",
                        qr.render::<qrcode::render::unicode::Dense1x2>()
                            .quiet_zone(true)
                            .build()
                    ),
                    Err(error) => println!("(no QR code: {error})"),
                }
                println!("The code expires at {}.", crate::reply::rfc3339(expires_at));
            }
            ControlEvent::Waiting {
                remaining_secs,
                link,
            } => {
                let text =
                    format!("waiting for the owner… {remaining_secs:>4} s left (link: {link})");
                if tty {
                    print!("\r{text}");
                    let _ = std::io::stdout().flush();
                } else {
                    println!("{text}");
                }
            }
            ControlEvent::Rejected { reason } => {
                println!("{}binding refused: {reason}", if tty { "\n" } else { "" })
            }
            ControlEvent::Paired {
                reference_id,
                version,
            } => {
                println!(
                    "{}paired to {reference_id} (binding version {version})",
                    if tty { "\n" } else { "" }
                );
                return ExitCode::SUCCESS;
            }
            ControlEvent::Expired => {
                println!(
                    "{}the pairing code expired; run `texture-agent pair` again",
                    if tty { "\n" } else { "" }
                );
                return ExitCode::FAILURE;
            }
            ControlEvent::Error { message } => {
                eprintln!("{}error: {message}", if tty { "\n" } else { "" });
                return ExitCode::FAILURE;
            }
        }
    }
    eprintln!("error: the daemon closed the connection");
    ExitCode::FAILURE
}

fn run(path: &std::path::Path) -> ExitCode {
    let Some(settings) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    crate::logging::init(&settings.log);
    // One thread: the agent's work is I/O-bound and small, a single thread keeps memory low,
    // and it makes the systemd watchdog meaningful (a wedged thread stops the pings).
    let Some(runtime) = runtime(tokio::runtime::Builder::new_current_thread()) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(crate::daemon::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "texture-agent failed");
            ExitCode::FAILURE
        }
    }
}
