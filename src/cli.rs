//! The command line: `run`, `check-config`, `status`, `pair`, `version`.
//!
//! Everything printed that came from the network or from the daemon (pairing events, refusal
//! reasons, the owner's reference id, the link's last error) goes through [`printable`] first:
//! `pair` is run as root on a terminal, and a terminal obeys escape sequences.

use std::borrow::Cow;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::agent::status;
use crate::config::{self, Settings, DEFAULT_CONFIG_PATH};

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

/// `text` with every character a terminal could act on written as an escape in Rust's form
/// (`\u{1b}`): the C0 controls (newline and tab included), DEL, the C1 controls U+0080 to
/// U+009F (among them U+009B, a one-character CSI), and the bidirectional marks, embeddings,
/// overrides and isolates (U+061C, U+200E, U+200F, U+202A to U+202E, U+2066 to U+2069), which
/// can make a line read differently from what it holds. Anything else is kept, so names in any
/// script print as they are; borrowed when there is nothing to escape.
pub fn printable(text: &str) -> Cow<'_, str> {
    fn unsafe_char(c: char) -> bool {
        c.is_control()
            || matches!(
                c,
                '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
            )
    }
    if !text.chars().any(unsafe_char) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if unsafe_char(c) {
            out.push_str(&format!("\\u{{{:x}}}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
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
    match crate::inbound::pairing::PairingState::open(
        &settings.state.dir,
        settings.device.id.as_str(),
        600,
    ) {
        Ok(p) => {
            let b = p.binding();
            match &b.reference_id {
                Some(owner) => println!(
                    "pairing:     paired to {} (binding version {}, issued {})",
                    printable(owner),
                    b.version,
                    crate::inbound::reply::rfc3339(b.issued_at)
                ),
                None if b.version > 0 => {
                    println!("pairing:     unpaired (binding version {})", b.version)
                }
                None => println!("pairing:     unpaired"),
            }
        }
        Err(error) => println!("pairing:     unreadable: {}", printable(&error.to_string())),
    }
    match &settings.trust {
        None => println!("trust:       not configured ([trust] section missing)"),
        Some(t) => match crate::inbound::auth::jws::public_key_from_base64(&t.root_public_key) {
            Ok(root) => {
                let store = crate::inbound::auth::trust::TrustStore::open(
                    root,
                    &t.issuer,
                    &settings.state.dir,
                );
                match store.current() {
                    Some(bundle) => println!(
                        "trust:       bundle version {} (expires {}), keys: {}",
                        bundle.version,
                        crate::inbound::reply::rfc3339(bundle.expires_at),
                        {
                            let mut kids: Vec<_> = bundle.key_ids().collect();
                            kids.sort();
                            printable(&kids.join(", ")).into_owned()
                        }
                    ),
                    None => match store.problem() {
                        Some(problem) => println!(
                            "trust:       no bundle in force (highest accepted version {}): {}",
                            store.highest_version(),
                            printable(problem)
                        ),
                        None => println!("trust:       no trust bundle received yet"),
                    },
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
            eprintln!("error: {}", printable(&error.to_string()));
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn print_outbox(outbox: Option<&crate::telemetry::outbox::OutboxStats>) {
    if let Some(o) = outbox {
        println!(
            "outbox:      {} points waiting ({} bytes), {} dropped since install, next seq {}",
            o.depth, o.bytes, o.dropped, o.next_seq
        );
    }
}

/// The link as the daemon's status file says (`last_error` can quote the broker or the network).
fn print_link(link: &crate::link::LinkStatus) {
    println!(
        "link:        {} ({})",
        link.state.name(),
        printable(&link.broker)
    );
    println!("connects:    {}", link.connects);
    println!("failures:    {}", link.failures);
    if let Some(e) = &link.last_error {
        println!("last error:  {}", printable(e));
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

    use crate::inbound::pairing::control::{socket_path, ControlEvent, ControlRequest};

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
            eprintln!(
                "error: unexpected message from the daemon: {}",
                printable(&line)
            );
            return ExitCode::FAILURE;
        };
        match event {
            ControlEvent::Code {
                code,
                device_id,
                expires_at,
                qr_uri,
            } => {
                let (code, device_id) = (printable(&code), printable(&device_id));
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
                println!(
                    "The code expires at {}.",
                    crate::inbound::reply::rfc3339(expires_at)
                );
            }
            ControlEvent::Waiting {
                remaining_secs,
                link,
            } => {
                let text = format!(
                    "waiting for the owner… {remaining_secs:>4} s left (link: {})",
                    printable(&link)
                );
                if tty {
                    print!("\r{text}");
                    let _ = std::io::stdout().flush();
                } else {
                    println!("{text}");
                }
            }
            ControlEvent::Rejected { reason } => println!(
                "{}binding refused: {}",
                if tty { "\n" } else { "" },
                printable(&reason)
            ),
            ControlEvent::Paired {
                reference_id,
                version,
            } => {
                println!(
                    "{}paired to {} (binding version {version})",
                    if tty { "\n" } else { "" },
                    printable(&reference_id)
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
                eprintln!(
                    "{}error: {}",
                    if tty { "\n" } else { "" },
                    printable(&message)
                );
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

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn printable_escapes_every_character_a_terminal_acts_on() {
        let evil = "\u{1b}[2J\u{1b}[Hpaired to mallory\r\n\u{7}\u{7f}\u{9b}31m\u{85}\u{202e}x\u{2066}\u{200f}\u{61c}\t";
        let shown = printable(evil);
        assert_eq!(
            shown,
            "\\u{1b}[2J\\u{1b}[Hpaired to mallory\\u{d}\\u{a}\\u{7}\\u{7f}\\u{9b}31m\\u{85}\\u{202e}x\\u{2066}\\u{200f}\\u{61c}\\u{9}"
        );
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
    }

    #[test]
    fn printable_keeps_plain_text_of_any_script_borrowed() {
        for plain in [
            "user_42",
            "Zoë Müller",
            "用户",
            "gw-0001 (link: connected) …",
            "",
        ] {
            assert!(matches!(printable(plain), std::borrow::Cow::Borrowed(p) if p == plain));
        }
    }
}
