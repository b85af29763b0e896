#!/bin/bash
# Runs inside the test container's root file system before it boots (systemd-nspawn -D, no
# boot), from scripts/test-container.sh: installs the package the way an operator would, checks
# what the package did, and gives the gateway its identity. Appends PASS/FAIL lines to
# /texture-test/results like container-checks.sh.
set -u
shared=/texture-test
out=$shared/results
pass() { echo "PASS $*" >>"$out"; echo "PASS $*"; }
fail() { echo "FAIL $*" >>"$out"; echo "FAIL $*"; }
# shellcheck source=/dev/null
. "$shared/env"

if ! dpkg -i "$shared/texture-agent.deb" >"$shared/dpkg.log" 2>&1; then
  fail package-install "dpkg -i failed: $(tail -5 "$shared/dpkg.log" | tr '\n' ' ')"
  exit 0
fi
problems=""
uid=$(id -u texture-agent 2>/dev/null) || problems="$problems no-user"
[ "${uid:-0}" -ne 0 ] && [ "$(getent passwd texture-agent | cut -d: -f7)" = /usr/sbin/nologin ] ||
  problems="$problems user=$(getent passwd texture-agent)"
[ "$(stat -c '%a %U %G' /var/lib/texture-agent 2>&1)" = "700 texture-agent texture-agent" ] ||
  problems="$problems state-dir=$(stat -c '%a %U %G' /var/lib/texture-agent 2>&1)"
[ "$(stat -c '%a %U %G' /etc/texture-agent)" = "750 root texture-agent" ] ||
  problems="$problems etc-dir=$(stat -c '%a %U %G' /etc/texture-agent)"
[ "$(systemctl is-enabled texture-agent.service 2>&1)" = enabled ] ||
  problems="$problems is-enabled=$(systemctl is-enabled texture-agent.service 2>&1)"
grep -qx /etc/texture-agent/agent.toml /var/lib/dpkg/info/texture-agent.conffiles ||
  problems="$problems agent.toml-not-a-conffile"
for f in /usr/bin/texture-agent /usr/lib/systemd/system/texture-agent.service \
  /usr/lib/sysusers.d/texture-agent.conf /usr/lib/tmpfiles.d/texture-agent.conf \
  /usr/share/doc/texture-agent/README.md; do
  [ -f "$f" ] || problems="$problems missing:$f"
done
# The packaged binary is the gateway build: no simulator (`demo`, cargo feature sim).
if texture-agent --help 2>&1 | grep -qw demo; then
  problems="$problems packaged-binary-has-demo"
fi
# The postinst may enable the unit but must never start it (nor restart it on a first install).
if grep -Eq 'deb-systemd-invoke (start|restart)|systemctl (--[a-z-]+ )*(start|restart)' \
  /var/lib/dpkg/info/texture-agent.postinst; then
  problems="$problems postinst-starts-the-service"
fi
if [ -z "$problems" ]; then
  pass package-install "user texture-agent (uid $uid), /var/lib/texture-agent 0700, /etc/texture-agent 0750 root:texture-agent, unit enabled and not started, agent.toml a conffile, no simulator in the binary"
else
  fail package-install "$problems"
fi

# The gateway's identity: certificates from the host's test CA, and the packaged configuration
# edited the way the operator would (its comments say how), plus test-only telemetry settings.
install -m 0644 "$shared/pki/ca.pem" /etc/texture-agent/ca.pem
install -m 0644 "$shared/pki/device.crt" /etc/texture-agent/device.crt
install -m 0640 -g texture-agent "$shared/pki/device.key" /etc/texture-agent/device.key
sed -i -e "s/^id = .*/id = \"$DEVICE_ID\"/" -e 's/^host = .*/host = "127.0.0.1"/' \
  -e "s/^port = .*/port = $BROKER_PORT/" /etc/texture-agent/agent.toml
cat >>/etc/texture-agent/agent.toml <<'TOML'

# Test only: two simulated devices at 10 Hz, batches every 200 ms.
[telemetry]
batch_max_ms = 200
fsync_interval_ms = 200
health_interval_secs = 3600

[[drivers]]
kind = "simulated"
device_id = "sim-battery"
device_type = "battery"
interval_ms = 100

[[drivers]]
kind = "simulated"
device_id = "sim-charger"
device_type = "charger"
interval_ms = 100
seed = 1

# A SunSpec battery over Modbus RTU: the host's simulated bus, at /dev/ttyRTU0 (root:dialout
# 0660), reached through the serial-port drop-in of docs/OPERATIONS.md 7.
[[drivers]]
kind = "sunspec"
name = "rtu-bus"
serial = "/dev/ttyRTU0"
baud = 19200
units = [1]
poll_ms = 1000

# The example process driver, behind a probe that reports on stderr (the journal) what of the
# agent's state it can see from inside the driver sandbox.
[[drivers]]
kind = "process"
name = "example-battery"
command = ["/usr/local/lib/texture-test/sandbox-probe.sh", "python3", "/usr/local/lib/texture-test/example-battery.py"]
TOML
mkdir -p /usr/local/lib/texture-test
install -m 0755 "$shared/test/sandbox-probe.sh" /usr/local/lib/texture-test/sandbox-probe.sh
install -m 0644 "$shared/test/example-battery.py" /usr/local/lib/texture-test/example-battery.py
if check=$(setpriv --reuid=texture-agent --regid=texture-agent --clear-groups \
  texture-agent --config /etc/texture-agent/agent.toml check-config 2>&1); then
  pass check-config "the packaged agent.toml, edited, is valid and readable by texture-agent"
else
  fail check-config "$(echo "$check" | tail -3 | tr '\n' ' ')"
fi

mkdir -p /etc/systemd/system/texture-agent.service.d /usr/local/lib/texture-test
install -m 0644 "$shared/test/texture-agent-test.conf" /etc/systemd/system/texture-agent.service.d/50-test.conf
install -m 0644 "$shared/test/texture-agent-serial.conf" /etc/systemd/system/texture-agent.service.d/60-serial.conf
install -m 0755 "$shared/test/container-checks.sh" /usr/local/lib/texture-test/container-checks.sh
install -m 0644 "$shared/test/texture-test.service" /etc/systemd/system/texture-test.service
systemctl enable texture-test.service >/dev/null 2>&1
