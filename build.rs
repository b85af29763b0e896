//! Build script: fixes the gateway's initial time floor (docs/PROTOCOL.md 8).
//!
//! A gateway without a real-time clock can boot at 1970. The floor is the earliest time it will
//! believe, before any platform-signed time has raised it, so an expired trust bundle or
//! attestation from years ago is never taken as current. It is the build's
//! `SOURCE_DATE_EPOCH` (the reproducible-builds convention; packaging/build-deb.sh sets it to
//! the commit time) or, without one, the date this default was last moved.

/// 2026-12-01T00:00:00Z. Move it forward now and then; never past a release's build date.
const DEFAULT_FLOOR: u64 = 1_796_083_200;

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=build.rs");
    let floor = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(text) => match text.trim().parse::<u64>() {
            Ok(t) => t.max(DEFAULT_FLOOR),
            Err(_) => panic!("SOURCE_DATE_EPOCH must be Unix seconds, not {text:?}"),
        },
        Err(_) => DEFAULT_FLOOR,
    };
    println!("cargo:rustc-env=TEXTURE_AGENT_TIME_FLOOR={floor}");
}
