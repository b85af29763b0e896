//! `pair`: asks the running daemon for a pairing session over its control socket and follows
//! the session's events to the end.
//!
//! The daemon owns the pairing state and the link; this command only shows what it is told.
//! Every text in an event can come from the network, so it is shown through [`printable`].

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;

use super::{load_or_report, printable};
use crate::inbound::pairing::control::{socket_path, ControlEvent, ControlRequest};

pub(crate) fn pair(path: &Path) -> ExitCode {
    let Some(settings) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    let Some(stream) = request_pairing(&settings.state.runtime_dir) else {
        return ExitCode::FAILURE;
    };
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
        if let Some(outcome) = show_event(event, tty) {
            return outcome;
        }
    }
    eprintln!("error: the daemon closed the connection");
    ExitCode::FAILURE
}

/// Connects to the daemon's control socket and sends the pairing request; `None` once the
/// failure has been reported.
fn request_pairing(runtime_dir: &Path) -> Option<UnixStream> {
    let socket = socket_path(runtime_dir);
    let mut stream = match UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(error) => {
            eprintln!(
                "error: cannot reach the daemon at {}: {error} (is texture-agent running?)",
                socket.display()
            );
            return None;
        }
    };
    let mut request = serde_json::to_string(&ControlRequest::Pair).expect("serialises");
    request.push('\n');
    if let Err(error) = stream.write_all(request.as_bytes()) {
        eprintln!("error: {error}");
        return None;
    }
    Some(stream)
}

/// Prints one event; returns the exit code when the event ends the session. On a terminal the
/// countdown rewrites its own line, so whatever follows it starts on a new one.
fn show_event(event: ControlEvent, tty: bool) -> Option<ExitCode> {
    let fresh_line = if tty { "\n" } else { "" };
    match event {
        ControlEvent::Code {
            code,
            device_id,
            expires_at,
            qr_uri,
        } => show_code(&code, &device_id, expires_at, &qr_uri),
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
        ControlEvent::Rejected { reason } => {
            println!("{fresh_line}binding refused: {}", printable(&reason))
        }
        ControlEvent::Paired {
            reference_id,
            version,
        } => {
            println!(
                "{fresh_line}paired to {} (binding version {version})",
                printable(&reference_id)
            );
            return Some(ExitCode::SUCCESS);
        }
        ControlEvent::Expired => {
            println!("{fresh_line}the pairing code expired; run `texture-agent pair` again");
            return Some(ExitCode::FAILURE);
        }
        ControlEvent::Error { message } => {
            eprintln!("{fresh_line}error: {}", printable(&message));
            return Some(ExitCode::FAILURE);
        }
    }
    None
}

/// The code to type on the Connect page, and the same as a QR code to scan.
fn show_code(code: &str, device_id: &str, expires_at: u64, qr_uri: &str) {
    let (code, device_id) = (printable(code), printable(device_id));
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
