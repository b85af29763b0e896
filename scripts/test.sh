#!/usr/bin/env bash
# The one command that runs every test (README "Tests"; .ci/run calls exactly this).
# It installs what the tests need when it is missing, so a fresh Debian machine passes with
# nothing but a clone and this script.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

missing=()
[ -x /usr/sbin/mosquitto ] || [ -x /usr/bin/mosquitto ] || missing+=(mosquitto)
# libfaketime: tests/auth.rs runs the agent with its clock ahead (the replay journal case).
compgen -G '/usr/lib/*/faketime/libfaketime.so.1' >/dev/null || missing+=(faketime)
# socat: the simulated RS-485 bus (a pty pair) of the Modbus RTU tests (testkit/src/modbus.rs).
[ -x /usr/bin/socat ] || missing+=(socat)
# libfuse 3: the power-cut tests' filesystem (tests/powercut/crashfs.py, over /dev/fuse).
compgen -G '/usr/lib/*/libfuse3.so.3' >/dev/null || missing+=(libfuse3-3)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

# The Modbus/SunSpec tests' servers (tests/modbus/*.py) and the OCPP tests' charge points
# (tests/ocpp/*.py) run in a private venv with pinned packages; testkit/src/pyenv.rs pins the same
# versions and creates it too if a test runs first.
echo "==> python test environment (target/pyenv)"
pyenv=target/pyenv
pymodbus_version=3.16.1
pysunspec2_version=1.3.7
# pymodbus' serial (RTU) server needs pyserial but does not depend on it.
pyserial_version=3.5
# mobilityhouse's ocpp: the simulated charge points (its defects: tests/ocpp/charge_point.py).
ocpp_version=2.1.0
# ocpp depends on no WebSocket library; 15.0.1 was current when ocpp 2.1.0 came out.
websockets_version=15.0.1
# mfusepy: crashfs's libfuse 3 binding (tests/powercut/crashfs.py).
mfusepy_version=3.1.1
pins=("pymodbus==$pymodbus_version" "pysunspec2==$pysunspec2_version" "pyserial==$pyserial_version"
      "ocpp==$ocpp_version" "websockets==$websockets_version" "mfusepy==$mfusepy_version")
pyenv_ok() {
  "$pyenv/bin/python" -c "import importlib.metadata as m, pymodbus, serial, sunspec2, ocpp, websockets, mfusepy, sys
sys.exit(0 if m.version('pymodbus') == '$pymodbus_version' and m.version('pysunspec2') == '$pysunspec2_version' and m.version('pyserial') == '$pyserial_version' and m.version('ocpp') == '$ocpp_version' and m.version('websockets') == '$websockets_version' and m.version('mfusepy') == '$mfusepy_version' else 1)" 2>/dev/null
}
if ! pyenv_ok; then
  python3 -c 'import venv, ensurepip' 2>/dev/null || missing_venv=1
  if [ -n "${missing_venv:-}" ]; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
  fi
  mkdir -p target
  # The same lock the testkit takes, so a concurrent test run does not pip into it at once.
  (
    flock 9
    pyenv_ok || {
      [ -x "$pyenv/bin/python" ] || python3 -m venv "$pyenv"
      "$pyenv/bin/python" -m pip install --quiet --disable-pip-version-check "${pins[@]}"
    }
  ) 9>target/pyenv.lock
  pyenv_ok || { echo "FAIL: $pyenv lacks ${pins[*]}" >&2; exit 1; }
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy"
cargo clippy --locked --all-targets -- -D warnings
echo "==> cargo test"
test_log=$(mktemp)
trap 'rm -f "$test_log"' EXIT
cargo test --locked 2>&1 | tee "$test_log"

echo "==> the gateway build leaves the simulator out"
cargo build --release --locked
if ./target/release/texture-agent --help | grep -qw demo; then
  echo "FAIL: the release (gateway) binary contains the demo subcommand" >&2
  exit 1
fi
for crate in rumqttd axum rcgen; do
  if cargo tree --locked -e normal -i "$crate" 2>/dev/null | grep -q "^$crate "; then
    echo "FAIL: $crate is linked into the gateway build" >&2
    exit 1
  fi
done
echo "ok: no simulator code or crates in target/release/texture-agent ($(stat -c %s target/release/texture-agent) bytes)"

echo "==> deployment: aarch64 under QEMU, and the .deb in a booted systemd container"
./scripts/test-qemu.sh 2>&1 | tee -a "$test_log"
./scripts/test-container.sh 2>&1 | tee -a "$test_log"

# One closing line for the whole run, in the plain form CI reads.
awk '/^(test result|qemu|container):/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "summary: %d passed, %d failed\n", p, f }' "$test_log"

