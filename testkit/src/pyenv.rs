//! The private Python environment of the tests' real peers: the SunSpec servers
//! ([`crate::modbus`], pymodbus), the OCPP charge points ([`crate::ocpp`], mobilityhouse's
//! `ocpp`) and the power-cut filesystem ([`crate::crashfs`], mfusepy). Every package is pinned to one version, here and in `scripts/test.sh`, so a fresh
//! machine and a developer's run the same peers.
//!
//! It lives at `<workspace>/target/pyenv` (`scripts/test.sh` creates it before `cargo test`;
//! [`pyenv_python`] creates it when a test runs first), so it survives `cargo clean -p` but not
//! `rm -rf target`, and never touches the system's Python.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// The pinned pymodbus; `scripts/test.sh` installs the same version.
pub const PYMODBUS_VERSION: &str = "3.16.1";
/// The pinned pysunspec2 (the model definitions and the reference client); as in `scripts/test.sh`.
pub const PYSUNSPEC2_VERSION: &str = "1.3.7";
/// The pinned pyserial: pymodbus' serial (RTU) server needs it and does not depend on it itself;
/// as in `scripts/test.sh`.
pub const PYSERIAL_VERSION: &str = "3.5";
/// The pinned `ocpp` (mobilityhouse): the charge points of the OCPP tests. Its defects that a test
/// must not trust are listed in `tests/ocpp/charge_point.py`; as in `scripts/test.sh`.
pub const OCPP_VERSION: &str = "2.1.0";
/// The pinned websockets: `ocpp` depends on no WebSocket library, so the charge point brings its
/// own. 15.0.1 is the release current when ocpp 2.1.0 came out (its examples use this new
/// asyncio API); as in `scripts/test.sh`.
pub const WEBSOCKETS_VERSION: &str = "15.0.1";

/// The pinned mfusepy: `tests/powercut/crashfs.py`'s binding to libfuse 3 (fusepy's maintained
/// successor; fusepy itself speaks only libfuse 2); as in `scripts/test.sh`.
pub const MFUSEPY_VERSION: &str = "3.1.1";

/// (distribution, version, module to import): what `target/pyenv` must hold.
const PINS: &[(&str, &str, &str)] = &[
    ("pymodbus", PYMODBUS_VERSION, "pymodbus"),
    ("pysunspec2", PYSUNSPEC2_VERSION, "sunspec2"),
    ("pyserial", PYSERIAL_VERSION, "serial"),
    ("ocpp", OCPP_VERSION, "ocpp"),
    ("websockets", WEBSOCKETS_VERSION, "websockets"),
    ("mfusepy", MFUSEPY_VERSION, "mfusepy"),
];

/// The workspace root: the testkit's manifest directory's parent, so each worktree or clone uses
/// its own environment and scripts.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ has a parent")
        .to_path_buf()
}

/// Whether `python` imports every pinned package, each at exactly its pinned version (by its
/// distribution's metadata, which pip wrote).
fn pyenv_ready(python: &Path) -> bool {
    let imports: Vec<&str> = PINS.iter().map(|(_, _, module)| *module).collect();
    let checks: Vec<String> = PINS
        .iter()
        .map(|(dist, version, _)| format!("m.version('{dist}') == '{version}'"))
        .collect();
    let check = format!(
        "import importlib.metadata as m, sys, {}\nsys.exit(0 if {} else 1)",
        imports.join(", "),
        checks.join(" and ")
    );
    Command::new(python)
        .args(["-c", &check])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` to completion, panicking with its output when it fails: a broken environment
/// should say what broke, not surface later as a server that never starts.
fn run_or_panic(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {cmd:?}\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The Python of `<workspace>/target/pyenv`, created with every pinned package when missing or
/// different.
///
/// An exclusive `flock` on `target/pyenv.lock` serialises the check-and-install across the
/// parallel test binaries and threads that call this at once, so pip never runs twice into the
/// same venv; the answer is then cached for the process.
pub fn pyenv_python() -> PathBuf {
    static PYTHON: OnceLock<PathBuf> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let target = workspace_root().join("target");
            let venv = target.join("pyenv");
            let python = venv.join("bin/python");
            std::fs::create_dir_all(&target).unwrap();
            let lock = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(target.join("pyenv.lock"))
                .expect("open target/pyenv.lock");
            // Held until `lock` is dropped at the end of this closure.
            // SAFETY: flock on a file descriptor we own, for the lifetime of `lock`.
            if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
                panic!(
                    "flock target/pyenv.lock: {}",
                    std::io::Error::last_os_error()
                );
            }
            let pins: Vec<String> = PINS
                .iter()
                .map(|(dist, version, _)| format!("{dist}=={version}"))
                .collect();
            if !pyenv_ready(&python) {
                if !python.exists() {
                    run_or_panic(
                        Command::new("python3").arg("-m").arg("venv").arg(&venv),
                        "creating the Python test environment (is python3-venv installed?)",
                    );
                }
                run_or_panic(
                    Command::new(&python)
                        .args([
                            "-m",
                            "pip",
                            "install",
                            "--quiet",
                            "--disable-pip-version-check",
                        ])
                        .args(&pins),
                    &format!("installing {} into target/pyenv", pins.join(" ")),
                );
                if !pyenv_ready(&python) {
                    panic!(
                        "target/pyenv still lacks one of {} after pip install; \
                         remove target/pyenv and retry",
                        pins.join(" ")
                    );
                }
            }
            drop(lock);
            python
        })
        .clone()
}
