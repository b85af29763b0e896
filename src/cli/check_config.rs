//! `check-config`: the checks `run` makes before it starts, then the effective settings, so a
//! bad configuration is found while someone is at the gateway rather than at the first connect.

use std::path::Path;
use std::process::ExitCode;

use super::load_or_report;

pub(crate) fn check_config(path: &Path) -> ExitCode {
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
    // The same for the certificate and key of each ocpp driver serving wss:// (profile 2).
    for driver in &settings.drivers {
        if let crate::drivers::DriverSettings::Ocpp(ocpp) = driver {
            if let Err(error) = crate::drivers::ocpp::tls::acceptor(ocpp) {
                eprintln!("error: {error}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("# configuration OK: {}", path.display());
    print!("{}", settings.redacted_dump());
    ExitCode::SUCCESS
}
