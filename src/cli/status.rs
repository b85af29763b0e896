//! `status`: the daemon's persisted state (pairing, trust) and its live state (`status.json`).
//!
//! It reads the files the daemon writes rather than asking the daemon, so it also answers when
//! the daemon is stopped or wedged, which is when someone runs it. Each part is printed on its
//! own: an unreadable pairing record does not hide the trust bundle or the link.

use std::path::Path;
use std::process::ExitCode;

use super::{load_or_report, printable};
use crate::agent::status;
use crate::config::{Settings, TrustSettings};
use crate::inbound::auth::trust::TrustStore;
use crate::inbound::reply::rfc3339;

pub(crate) fn show_status(path: &Path) -> ExitCode {
    let Some(settings) = load_or_report(path) else {
        return ExitCode::FAILURE;
    };
    println!("device:      {}", settings.device.id);
    println!("state dir:   {}", settings.state.dir.display());
    print_pairing(&settings);
    match &settings.trust {
        None => println!("trust:       not configured ([trust] section missing)"),
        Some(trust) => print_trust(trust, &settings.state.dir),
    }
    print_limits(&settings);
    print_safety(&settings);
    print_data_usage(&settings);
    print_daemon(&settings.state.runtime_dir)
}

/// This month's bytes on the broker connection and the budget, as the daemon last saved them
/// (`data-usage.json`, every 5 minutes and at stop; health carries the live figure).
fn print_data_usage(settings: &Settings) {
    use crate::telemetry::budget;
    let limit = settings.telemetry.monthly_budget_bytes;
    let usage = match budget::load(&settings.state.dir) {
        Ok(Some(usage)) => usage,
        Ok(None) => return println!("data:        nothing counted yet"),
        Err(error) => {
            return println!("data:        unreadable: {}", printable(&error.to_string()));
        }
    };
    let of_budget = match limit {
        None => "no budget".to_owned(),
        Some(limit) => format!(
            "{} % of a {limit}-byte budget, step {}",
            u128::from(usage.total()) * 100 / u128::from(limit),
            budget::Step::of(usage.total(), limit).name()
        ),
    };
    println!(
        "data:        {}: {} bytes sent, {} received ({of_budget})",
        printable(&usage.month),
        usage.sent_bytes,
        usage.received_bytes
    );
}

/// The safety envelope in force: the installer's `[[limits]]`, from the configuration.
fn print_limits(settings: &Settings) {
    match settings.limits.as_slice() {
        [] => println!("limits:      none (devices are bounded only by the command set's ranges)"),
        [first, rest @ ..] => {
            println!("limits:      {}", printable(&first.describe("installer")));
            for l in rest {
                println!("             {}", printable(&l.describe("installer")));
            }
        }
    }
}

/// Holds and fail-safe, as the daemon last stored them (`safety-state.json`): so they show
/// while the daemon is stopped too, which is when an installer asks what a device will do.
fn print_safety(settings: &Settings) {
    let state = match crate::inbound::safety::SafetyState::open(&settings.state.dir) {
        Ok(state) => state,
        Err(error) => {
            return println!("safety:      unreadable: {}", printable(&error.to_string()));
        }
    };
    let policy = state.policy();
    match policy.limits() {
        [] if policy.version() == 0 => println!("policy:      none (the installer's limits alone)"),
        [] => println!(
            "policy:      v{} (issued {}): no limits beyond the installer's",
            policy.version(),
            rfc3339(policy.issued_at())
        ),
        entries => {
            let source = format!("policy v{}", policy.version());
            println!(
                "policy:      v{} (issued {})",
                policy.version(),
                rfc3339(policy.issued_at())
            );
            for l in entries {
                println!("             {}", printable(&l.describe(&source)));
            }
        }
    }
    let window = settings.safety.failsafe_after_secs;
    println!("safety:      fail-safe after {window} s without the platform");
    let devices = state.devices();
    if devices.is_empty() {
        return println!("             no hold running, no device in fail-safe");
    }
    for (device_id, saved) in devices {
        let mut parts = Vec::new();
        if let Some(until) = saved.hold_until {
            parts.push(format!(
                "hold until {} (then its default control)",
                rfc3339(until)
            ));
        }
        if saved.failsafe {
            parts.push("in fail-safe until the platform commands it again".to_owned());
        }
        println!(
            "             {}: {}",
            printable(device_id),
            parts.join("; ")
        );
    }
}

fn print_pairing(settings: &Settings) {
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
                    rfc3339(b.issued_at)
                ),
                None if b.version > 0 => {
                    println!("pairing:     unpaired (binding version {})", b.version)
                }
                None => println!("pairing:     unpaired"),
            }
        }
        Err(error) => println!("pairing:     unreadable: {}", printable(&error.to_string())),
    }
}

fn print_trust(trust: &TrustSettings, state_dir: &Path) {
    let root = match crate::inbound::auth::jws::public_key_from_base64(&trust.root_public_key) {
        Ok(root) => root,
        Err(problem) => return println!("trust:       root key invalid: {problem}"),
    };
    let store = TrustStore::open(root, &trust.issuer, state_dir);
    match store.current() {
        Some(bundle) => {
            let mut kids: Vec<_> = bundle.key_ids().collect();
            kids.sort();
            println!(
                "trust:       bundle version {} (expires {}), keys: {}",
                bundle.version,
                rfc3339(bundle.expires_at),
                printable(&kids.join(", "))
            )
        }
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

/// The daemon's live state; failing to read it is the one error that fails the command.
fn print_daemon(runtime_dir: &Path) -> ExitCode {
    match status::read(runtime_dir) {
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
            runtime_dir.display()
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
