#!/usr/bin/env bash
# The Debian package under a real systemd: builds the .deb for this machine, installs it into a
# minimal Debian bookworm container (systemd-nspawn, no Docker), boots the container and checks
# what the unit promises (packaging/test/container-checks.sh): Type=notify readiness, the
# unprivileged user without capabilities, a process driver (the example) that runs in its sandbox
# and cannot see the agent's state, a Modbus RTU device on a serial port reached through the
# documented drop-in, watchdog restart of a hung agent, graceful stop with
# the offline status published and no telemetry lost, structured journald fields, and a
# `systemd-analyze security` exposure of at most 1.6. The agent talks mutual TLS to a mosquitto
# this script runs on the host (127.0.0.1, a free port; nspawn shares the host's network) with
# certificates generated for this run.
#
#   scripts/test-container.sh
#
# Needs root (debootstrap, nspawn). Installs debootstrap, systemd-container, mosquitto,
# mosquitto-clients and openssl with apt, and cargo-deb with cargo, when missing. The root file
# system is cached in target/nspawn-rootfs (rebuilt when missing or invalid: delete it to force
# a rebuild); each run boots a fresh copy of it, removed afterwards.
# Environment: TEXTURE_DEBIAN_MIRROR (default: the first Debian mirror in apt's sources),
# TEXTURE_ROOTFS_CACHE (default target/nspawn-rootfs; a directory outside the clone survives
# fresh CI clones), TEXTURE_BOOT_TIMEOUT (seconds, default 240), TEXTURE_KEEP=1 keeps the run's
# copy and work directory for inspection.
# Prints one PASS/FAIL line per check and exits non-zero if any failed or none ran. The results,
# the console log, the agent's journal (JSON) and systemd-analyze's table are left in
# target/container-report/.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
t_start=$(date +%s)
elapsed() { echo $(($(date +%s) - t_start)); }
say() { echo "==> [$(elapsed)s] $*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "scripts/test-container.sh needs root (debootstrap, systemd-nspawn)" >&2
  exit 2
fi

# --- tools -----------------------------------------------------------------------------------
missing=()
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
[ -x /usr/sbin/mosquitto ] || [ -x /usr/bin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
command -v openssl >/dev/null || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)

# --- the package -----------------------------------------------------------------------------
say "building the .deb (packaging/build-deb.sh)"
t0=$(date +%s)
deb=$(packaging/build-deb.sh 2> >(sed 's/^/    /' >&2) | tail -1)
t_deb=$(($(date +%s) - t0))
say "built $deb in ${t_deb}s"

# --- the cached root file system ---------------------------------------------------------------
suite=bookworm
include=systemd,systemd-sysv,dbus,python3
recipe="debootstrap --variant=minbase --include=$include $suite (v2)"
cache=${TEXTURE_ROOTFS_CACHE:-target/nspawn-rootfs}
rootfs_ok() {
  [ "$(cat "$cache/recipe" 2>/dev/null)" = "$recipe" ] &&
    [ -x "$cache/rootfs/usr/lib/systemd/systemd" ] && [ -x "$cache/rootfs/usr/bin/dpkg" ] &&
    [ -x "$cache/rootfs/usr/bin/systemd-analyze" ] && [ -e "$cache/rootfs/etc/os-release" ]
}
debian_mirror() {
  if [ -n "${TEXTURE_DEBIAN_MIRROR:-}" ]; then echo "$TEXTURE_DEBIAN_MIRROR"; return; fi
  # deb822 "URIs: ..." and one-line "deb URI suite ..." sources alike; not the security archive.
  local found
  found=$({ grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}'
    grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list |
      sed 's/\[[^]]*\] //' | awk '{print $2}'
  } | grep -E '/debian/?$' || true)
  found=${found%%$'\n'*}
  echo "${found:-http://deb.debian.org/debian}"
}
t0=$(date +%s)
if rootfs_ok; then
  say "reusing the cached rootfs in $cache"
else
  mirror=$(debian_mirror)
  say "debootstrap $suite ($include) from $mirror into $cache"
  rm -rf "$cache" "$cache.new"
  mkdir -p "$cache.new"
  if ! nice -n 10 debootstrap --variant=minbase --include="$include" "$suite" \
    "$cache.new/rootfs" "$mirror" >"$cache.new/debootstrap.log" 2>&1; then
    tail -20 "$cache.new/debootstrap.log" >&2
    echo "debootstrap failed (log in $cache.new/debootstrap.log)" >&2
    exit 1
  fi
  # No apt lists, caches or docs needed at test time.
  rm -rf "$cache.new/rootfs/var/cache/apt/archives/"*.deb "$cache.new/rootfs/var/lib/apt/lists/"*
  echo "$recipe" >"$cache.new/recipe"
  mv "$cache.new" "$cache"
  rootfs_ok || { echo "the new rootfs in $cache looks incomplete" >&2; exit 1; }
fi
t_rootfs=$(($(date +%s) - t0))

# --- this run: a copy of the rootfs, a work directory, certificates, the broker --------------
run=$(mktemp -d "$repo/target/nspawn-run.XXXXXX")
work=$(mktemp -d /tmp/texture-container.XXXXXX)
pids=()
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  # If nspawn had to be killed (timeout), whatever still runs in the container goes too: the
  # processes whose root directory is this run's copy.
  local root
  root=$(realpath "$run/rootfs" 2>/dev/null || echo "$run/rootfs")
  for proc in /proc/[0-9]*; do
    if [ "$(readlink "$proc/root" 2>/dev/null)" = "$root" ]; then
      kill -9 "${proc#/proc/}" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  if [ "${TEXTURE_KEEP:-0}" = 1 ]; then
    echo "kept: $run (rootfs) and $work (work directory)"
  else
    rm -rf "$run" "$work"
  fi
  exit $rc
}
trap cleanup EXIT
t0=$(date +%s)
cp -a --reflink=auto "$cache/rootfs" "$run/rootfs"
rootfs=$run/rootfs
say "fresh rootfs copy in $(($(date +%s) - t0))s"

shared=$work/shared # bound into the container at /texture-test
mkdir -p "$shared/pki" "$shared/test"
device=gw-nspawn
pki=$work/pki
mkdir -p "$pki"
# A CA, the broker's certificate (127.0.0.1 and localhost), the gateway's (CN = device id, which
# mosquitto takes as the user name for its ACL) and the platform subscriber's. EC P-256 keys.
(
  cd "$pki"
  ossl() { openssl "$@" 2>/dev/null; }
  ossl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.pem \
    -days 2 -subj "/CN=texture test CA" -addext basicConstraints=critical,CA:TRUE \
    -addext keyUsage=critical,keyCertSign,cRLSign
  leaf() { # NAME CN EXTENSIONS
    ossl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" -out "$1.csr" \
      -subj "/CN=$2"
    printf '%s\n' "$3" >"$1.ext"
    ossl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
      -extfile "$1.ext" -out "$1.crt"
  }
  leaf server broker.texture.test "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:broker.texture.test
extendedKeyUsage=serverAuth"
  leaf device "$device" "extendedKeyUsage=clientAuth"
  leaf platform platform "extendedKeyUsage=clientAuth"
)
cp "$pki/ca.pem" "$pki/device.crt" "$pki/device.key" "$shared/pki/"

free_port() {
  local p
  for _ in $(seq 50); do
    p=$((20000 + RANDOM % 40000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
  echo "no free port found" >&2
  return 1
}
port=$(free_port)
cat >"$work/acl" <<EOF
user platform
topic readwrite #

pattern read texture/v1/trust/bundle
pattern read texture/v1/devices/%u/commands
pattern read texture/v1/devices/%u/pairing/binding
pattern read texture/v1/devices/%u/safety/policy
pattern write texture/v1/devices/%u/status
pattern write texture/v1/devices/%u/replies
pattern write texture/v1/devices/%u/capabilities
pattern write texture/v1/devices/%u/telemetry
pattern write texture/v1/devices/%u/pairing/request
EOF
# As root, mosquitto drops to its own user unless told otherwise, and could then no longer read
# the keys in this private directory.
cat >"$work/mosquitto.conf" <<EOF
user root
per_listener_settings false
persistence false
log_dest file $work/mosquitto.log
log_type error
log_type warning
log_type notice
connection_messages true
listener $port 127.0.0.1
cafile $pki/ca.pem
certfile $pki/server.crt
keyfile $pki/server.key
require_certificate true
use_identity_as_username true
acl_file $work/acl
EOF
"$mosquitto" -c "$work/mosquitto.conf" >/dev/null 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
(exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || {
  cat "$work/mosquitto.log" >&2
  echo "mosquitto did not start on 127.0.0.1:$port" >&2
  exit 1
}
# The platform's view: everything under the device's topics, as "topic payload" lines.
mosquitto_sub -h 127.0.0.1 -p "$port" --cafile "$pki/ca.pem" --cert "$pki/platform.crt" \
  --key "$pki/platform.key" -i platform-observer -q 1 -v \
  -t "texture/v1/devices/$device/#" >"$shared/mqtt.log" 2>"$work/mosquitto_sub.err" &
pids+=($!)
say "mosquitto with mutual TLS on 127.0.0.1:$port; platform subscriber attached"

# --- a Modbus RTU battery on a simulated RS-485 bus, for the serial-port drop-in ------------
# A socat pty pair is the bus; the pymodbus SunSpec server of the integration tests
# (tests/modbus/sunspec_server.py, in the virtualenv scripts/test.sh makes) serves a battery on
# one end, and the other end's pty node goes into the container as /dev/ttyRTU0, owned by
# root:dialout 0660 like a USB serial adapter, so only the documented drop-in (OPERATIONS.md 7:
# BindPaths=, DeviceAllow=, SupplementaryGroups=dialout) lets the hardened service open it.
pyenv_python=target/pyenv/bin/python
if ! "$pyenv_python" -c 'import pymodbus, serial, sunspec2' 2>/dev/null; then
  echo "scripts/test-container.sh needs target/pyenv with pymodbus (scripts/test.sh creates it)" >&2
  exit 1
fi
command -v socat >/dev/null || { echo "scripts/test-container.sh needs socat" >&2; exit 1; }
socat pty,raw,echo=0,link="$work/bus-agent" pty,raw,echo=0,link="$work/bus-device" \
  2>"$work/socat.log" &
pids+=($!)
for _ in $(seq 100); do
  [ -e "$work/bus-agent" ] && [ -e "$work/bus-device" ] && break
  sleep 0.1
done
bus_pty=$(readlink -f "$work/bus-agent")
[ -c "$bus_pty" ] || { echo "socat made no pty pair: $(cat "$work/socat.log")" >&2; exit 1; }
chgrp dialout "$bus_pty"
chmod 0660 "$bus_pty"
cat >"$work/rtu-spec.json" <<'SPEC'
{"units": {"1": {"models": [
  {"id": 1, "points": {"Mn": "Texture", "SN": "NSPAWN-RTU"}},
  {"id": 802, "points": {"SoC": 64, "SoC_SF": 0, "SoCRsvMin": 15, "ChaSt": 3}}]}}}
SPEC
PYTHONDONTWRITEBYTECODE=1 "$pyenv_python" tests/modbus/sunspec_server.py \
  --spec "$work/rtu-spec.json" --port-file "$work/rtu.ready" --serial "$work/bus-device" \
  --log "$work/rtu-requests.log" 2>"$work/rtu-server.log" &
pids+=($!)
for _ in $(seq 150); do
  [ -e "$work/rtu.ready" ] && break
  sleep 0.1
done
[ -e "$work/rtu.ready" ] || { echo "the RTU server did not start: $(cat "$work/rtu-server.log")" >&2; exit 1; }
say "Modbus RTU battery on a pty bus ($bus_pty, root:dialout 0660)"

printf 'BROKER_PORT=%s\nDEVICE_ID=%s\n' "$port" "$device" >"$shared/env"
cp "$deb" "$shared/texture-agent.deb"
cp packaging/test/setup.sh packaging/test/container-checks.sh packaging/test/texture-test.service \
  packaging/test/texture-agent-test.conf packaging/test/texture-agent-serial.conf \
  packaging/test/sandbox-probe.sh \
  examples/drivers/example-battery.py "$shared/test/"
: >"$shared/results"

nspawn=(systemd-nspawn --quiet --register=no --keep-unit -D "$rootfs" --bind="$shared:/texture-test"
  --bind="$bus_pty:/dev/ttyRTU0")

# --- install the package (no boot), then boot and run the checks ------------------------------
say "installing the package into the container"
t0=$(date +%s)
"${nspawn[@]}" /bin/bash /texture-test/test/setup.sh </dev/null >"$work/setup.log" 2>&1 ||
  true
t_install=$(($(date +%s) - t0))

boot_timeout=${TEXTURE_BOOT_TIMEOUT:-240}
say "booting the container (timeout ${boot_timeout}s)"
t0=$(date +%s)
boot_rc=0
timeout -k 15 "$boot_timeout" "${nspawn[@]}" --boot --console=read-only </dev/null \
  >"$work/boot.log" 2>&1 || boot_rc=$?
t_boot=$(($(date +%s) - t0))
say "container powered off after ${t_boot}s (exit $boot_rc)"

# --- purge: the state directory goes, the user stays -----------------------------------------
if grep -q '^PASS package-install' "$shared/results"; then
  "${nspawn[@]}" /bin/bash -c '
    dpkg --purge texture-agent >/texture-test/purge.log 2>&1 || { echo "FAIL package-purge dpkg --purge failed"; exit; }
    if [ -e /var/lib/texture-agent ]; then echo "FAIL package-purge /var/lib/texture-agent still there"
    elif [ -e /usr/bin/texture-agent ] || [ -e /etc/texture-agent/agent.toml ]; then echo "FAIL package-purge files left behind"
    else echo "PASS package-purge /var/lib/texture-agent and the conffile removed"; fi' \
    </dev/null >>"$shared/results" 2>"$work/purge.err" || true
fi

# --- verdict ---------------------------------------------------------------------------------
report=target/container-report
rm -rf "$report"
mkdir -p "$report"
cp "$shared"/results "$shared"/*.txt "$shared"/*.json "$shared"/*.log "$work"/*.log "$report/" 2>/dev/null || true
expected=(package-install check-config ready ready-gated connected unprivileged journald-fields
  driver-sandbox serial-port exposure watchdog-pings watchdog-restart graceful-stop outbox-no-loss package-upgrade
  package-purge)
results=$shared/results
echo
echo "---- results (texture-agent in a booted Debian $suite container) ----"
grep -E '^(PASS|FAIL) ' "$results" || true
failed=$(grep -c '^FAIL ' "$results" || true)
for name in "${expected[@]}"; do
  if ! grep -Eq "^(PASS|FAIL) $name( |\$)" "$results"; then
    echo "FAIL $name not run"
    failed=$((failed + 1))
  fi
done
grep -qx DONE "$results" || { echo "FAIL checks did not finish (no DONE line)"; failed=$((failed + 1)); }
passed=$(grep -c '^PASS ' "$results" || true)
if [ "$failed" -gt 0 ] || [ "$boot_rc" -ne 0 ]; then
  echo
  [ "$boot_rc" -ne 124 ] || echo "FAIL the container did not power off within ${boot_timeout}s"
  echo "---- setup log ----"; grep -Ev '^(PASS|FAIL) ' "$work/setup.log" | tail -30
  echo "---- container console (last 60 lines) ----"; tail -60 "$work/boot.log"
  echo "---- mosquitto log (last 20 lines) ----"; tail -20 "$work/mosquitto.log"
fi
echo
echo "timings: deb ${t_deb}s, rootfs ${t_rootfs}s, install ${t_install}s, boot+checks ${t_boot}s, total $(elapsed)s"
echo "container: $passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$boot_rc" -eq 0 ]
