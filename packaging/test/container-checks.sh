#!/bin/bash
# The deployment checks that scripts/test-container.sh runs inside a booted Debian container
# (systemd-nspawn -b), as texture-test.service (Type=oneshot, After=texture-agent.service), with
# the host's work directory bound at /texture-test:
#   /texture-test/env       BROKER_PORT and DEVICE_ID, written by the host script
#   /texture-test/mqtt.log  what a platform subscriber on the host's mosquitto saw (mosquitto_sub
#                           -v on texture/v1/devices/<id>/#: "topic payload" per line)
#   /texture-test/results   where this script appends one line per check: "PASS name [detail]"
#                           or "FAIL name detail"; "DONE" last. The host reads it after poweroff.
# The unit powers the container off afterwards (ExecStopPost), whatever happened here.
set -u
shared=/texture-test
out=$shared/results
mqtt=$shared/mqtt.log
unit=texture-agent.service
# shellcheck source=/dev/null
. "$shared/env"

pass() { echo "PASS $*" >>"$out"; echo "PASS $*"; }
fail() { echo "FAIL $*" >>"$out"; echo "FAIL $*"; }
prop() { systemctl show -P "$1" "$unit"; }
# until_true SECONDS COMMAND...: polls COMMAND every 0.2 s; false if it never succeeded.
until_true() {
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }
agent_status() {
  # As the service's user, so that nothing in the state directory ends up owned by root.
  setpriv --reuid=texture-agent --regid=texture-agent --clear-groups \
    /usr/bin/texture-agent --config /etc/texture-agent/agent.toml status
}
is_active_running() { [ "$(prop ActiveState)" = active ] && [ "$(prop SubState)" = running ]; }
is_connected() { prop StatusText | grep -q "^connected to 127.0.0.1:$BROKER_PORT\$"; }
# The sequence numbers of every telemetry point the platform has seen, sorted, unique.
seen_seqs() {
  grep "^texture/v1/devices/$DEVICE_ID/telemetry " "$mqtt" | grep -o '"seq":[0-9]*' |
    cut -d: -f2 | sort -n -u
}
# all_seen_below N: every seq in 1..N-1 has arrived.
all_seen_below() { [ "$(seen_seqs | awk -v n="$1" '$1 >= 1 && $1 < n' | wc -l)" -eq $(($1 - 1)) ]; }

echo "# texture-agent deployment checks, $(date -u +%FT%TZ)" >>"$out"

# --- ready: Type=notify, active only once the agent said READY=1 ------------------------------
# This unit is ordered after texture-agent.service, so its start job has finished: a notify
# service is then active (READY=1 arrived from the main process) or failed (it never did).
type=$(prop Type) access=$(prop NotifyAccess) status_text=$(prop StatusText)
start=$(prop ExecMainStartTimestampMonotonic) active=$(prop ActiveEnterTimestampMonotonic)
if [ "$type" = notify ] && [ "$access" = main ] && is_active_running &&
  [ "$active" -ge "$start" ] && [[ $status_text =~ ^(connecting|connected|reconnecting) ]]; then
  pass ready "Type=notify reached active $(((active - start) / 1000)) ms after exec; StatusText=\"$status_text\""
else
  fail ready "Type=$type NotifyAccess=$access ActiveState=$(prop ActiveState)/$(prop SubState) StatusText=\"$status_text\""
fi

# The control: the same binary and unit type, but started with NOTIFY_SOCKET removed from its
# environment so that its READY=1 goes nowhere, never becomes active and fails on
# TimeoutStartSec. So activation above waited for the agent's READY=1 and did not happen on
# exec. (NotifyAccess=none cannot serve as the control: systemd forces it to main for
# Type=notify.) It runs as root against a closed port, so it cannot disturb the agent under test.
sed -e 's/^port = .*/port = 1/' -e '/^client_cert_file/d' -e '/^client_key_file/d' \
  -e 's|^dir = .*|dir = "/run/texture-notready/state"|' \
  -e 's|^runtime_dir = .*|runtime_dir = "/run/texture-notready/run"|' \
  /etc/texture-agent/agent.toml | sed '/^\[telemetry\]/,$d' >/run/texture-notready.toml
systemd-run --quiet --unit=texture-notready -p Type=notify -p TimeoutStartSec=3s \
  /usr/bin/env -u NOTIFY_SOCKET /usr/bin/texture-agent --config /run/texture-notready.toml run \
  >/dev/null 2>&1
result=$(systemctl show -P Result texture-notready.service)
if [ "$result" = timeout ]; then
  pass ready-gated "without its notifications the same agent never became active (Result=timeout after TimeoutStartSec=3s)"
else
  fail ready-gated "expected Result=timeout without notifications, got Result=$result"
fi
systemctl reset-failed texture-notready.service >/dev/null 2>&1 || true

# --- connected: mutual TLS to the host's mosquitto, retained birth seen by the platform -------
if until_true 30 is_connected &&
  until_true 10 grep -q "^texture/v1/devices/$DEVICE_ID/status .*\"state\":\"online\"" "$mqtt"; then
  pass connected "StatusText=\"$(prop StatusText)\"; birth seen by the platform"
else
  fail connected "StatusText=\"$(prop StatusText)\"; mqtt.log: $(tail -c 300 "$mqtt" | tr '\n' ' ')"
fi

# --- unprivileged: the service user, no capabilities, no new privileges, seccomp --------------
pid=$(prop MainPID)
uid=$(id -u texture-agent)
st=/proc/$pid/status
field() { awk -v k="$1:" '$1 == k { $1 = ""; sub(/^ /, ""); print }' "$st"; }
uids=$(field Uid) caps="$(field CapEff) $(field CapPrm) $(field CapBnd) $(field CapAmb)"
if [ "$pid" -gt 0 ] && [ "$uid" -ne 0 ] && [ "$(echo "$uids" | tr -s '\t ' '\n' | sort -u)" = "$uid" ] &&
  [ "$(echo "$caps" | tr ' ' '\n' | sort -u)" = 0000000000000000 ] &&
  [ "$(field NoNewPrivs)" = 1 ] && [ "$(field Seccomp)" = 2 ]; then
  pass unprivileged "pid $pid uid $uid (texture-agent), CapEff/CapPrm/CapBnd/CapAmb 0, NoNewPrivs 1, seccomp filter"
else
  fail unprivileged "pid $pid Uid=[$uids] (texture-agent is $uid) caps=[$caps] NoNewPrivs=$(field NoNewPrivs) Seccomp=$(field Seccomp)"
fi

# --- journald: structured fields (tracing-journald upper-cases them and prefixes F_) ----------
journal=$(journalctl -u "$unit" -o json --no-pager)
missing=""
for want in "\"SYSLOG_IDENTIFIER\":\"texture-agent\"" "\"F_DEVICE_ID\":\"$DEVICE_ID\"" \
  "\"F_BROKER\":\"127.0.0.1:$BROKER_PORT\"" '"MESSAGE":"connected"' '"TARGET":"texture_agent::link"'; do
  grep -qF "$want" <<<"$journal" || missing="$missing $want"
done
if [ -z "$missing" ]; then
  pass journald-fields "SYSLOG_IDENTIFIER, F_DEVICE_ID, F_BROKER, TARGET, MESSAGE as separate fields"
else
  fail journald-fields "missing:$missing; sample: $(grep -m1 F_ <<<"$journal" | head -c 400)"
fi

# --- driver sandbox: the example process driver runs under the unit, blind to the agent's state
# sandbox-probe.sh reports on stderr (so in the agent's journal) what it could see, then execs
# the example driver, whose battery must reach the platform.
probe_logged() { journalctl -u "$unit" --no-pager -o cat | grep -q 'sandbox-probe: '; }
battery_seen() { grep "^texture/v1/devices/$DEVICE_ID/telemetry " "$mqtt" | grep -q '"deviceId":"bat-ext-1"'; }
if until_true 30 probe_logged && until_true 30 battery_seen; then
  probe=$(journalctl -u "$unit" --no-pager -o cat | grep -m1 'sandbox-probe: ')
  if [[ $probe == *"sandbox-probe: held; environment: HOME LANG PATH TEXTURE_DRIVER_NAME "* ]] &&
    ! journalctl -u "$unit" --no-pager -o cat | grep -q 'driver could not be started'; then
    pass driver-sandbox "example driver reports bat-ext-1 to the platform; ${probe#*sandbox-probe: }: /var/lib/texture-agent empty, keys unreadable, no control socket"
  else
    fail driver-sandbox "$probe; $(journalctl -u "$unit" --no-pager -o cat | grep -m1 'driver could not be started')"
  fi
else
  fail driver-sandbox "probe logged: $(probe_logged && echo yes || echo no), bat-ext-1 seen: $(battery_seen && echo yes || echo no); $(journalctl -u "$unit" --no-pager -o cat | grep -m2 -i 'driver' | tr '\n' ' ' | head -c 400)"
fi

# --- serial port: a Modbus RTU battery through the drop-in of OPERATIONS.md 7 ---------------
# The host's pty bus is /dev/ttyRTU0 here (root:dialout 0660); 60-serial.conf is the documented
# drop-in. The battery's state reaching the platform proves the service opened the port, with
# the device cgroup still closed to everything else.
rtu_seen() {
  grep "^texture/v1/devices/$DEVICE_ID/telemetry " "$mqtt" |
    grep -q '"deviceId":"sunspec-NSPAWN-RTU-battery","state":{"type":"battery","chargePercentage":64'
}
policy=$(prop DevicePolicy) groups=$(prop SupplementaryGroups)
if until_true 30 rtu_seen && [ "$policy" = closed ]; then
  pass serial-port "sunspec-NSPAWN-RTU-battery read over Modbus RTU from /dev/ttyRTU0 (root:dialout 0660) with DevicePolicy=closed, SupplementaryGroups=$groups"
else
  fail serial-port "seen: $(rtu_seen && echo yes || echo no), DevicePolicy=$policy; $(journalctl -u "$unit" --no-pager -o json | grep -m1 'sunspec' | head -c 700)"
fi

# --- exposure: systemd-analyze security -----------------------------------------------------
# 1.1 before the driver sandbox; user and mnt namespaces and mount(2), which the sandbox needs
# (systemd/texture-agent.service), cost 0.5 on systemd's scale, which counts what the service
# may do, not that drivers lose the agent's keys and state by it. The bound is the new figure.
line=$(systemd-analyze security --no-pager "$unit" 2>&1 | grep 'Overall exposure level')
score=$(echo "$line" | grep -o 'level for [^:]*: [0-9.]*' | awk '{print $NF}')
if [ -n "$score" ] && awk -v s="$score" 'BEGIN { exit !(s <= 1.6) }'; then
  pass exposure "$score (${line##*: })"
else
  fail exposure "score '$score' > 1.6: $line"
fi

# --- watchdog: pings keep a healthy agent alive; a hung one is killed and restarted -----------
# The host installed a drop-in with WatchdogSec=3s (and RestartSec=1s).
wd=$(prop WatchdogUSec)
# At least two watchdog periods after activation (this script started right after it).
[ "$SECONDS" -ge 7 ] || sleep $((7 - SECONDS))
if [ "$wd" = 3s ] && [ "$(prop NRestarts)" = 0 ] && is_active_running; then
  pass watchdog-pings "WatchdogSec=3s, no restart after two periods"
else
  fail watchdog-pings "WatchdogUSec=$wd NRestarts=$(prop NRestarts) ActiveState=$(prop ActiveState)"
fi
restarts=$(prop NRestarts)
hung=$(prop MainPID)
t0=$(now_ms)
kill -STOP "$hung"
restarted() { [ "$(prop NRestarts)" -gt "$restarts" ] && [ "$(prop MainPID)" != "$hung" ] && is_active_running; }
if until_true 40 restarted; then
  took=$(($(now_ms) - t0))
  if journalctl -u "$unit" --no-pager | grep -q "Watchdog timeout" &&
    journalctl -u "$unit" --no-pager | grep -q "Failed with result 'watchdog'"; then
    pass watchdog-restart "SIGSTOPped pid $hung killed by the watchdog, restarted as pid $(prop MainPID) after $took ms (NRestarts $restarts -> $(prop NRestarts))"
  else
    fail watchdog-restart "restarted, but the journal does not show a watchdog timeout"
  fi
else
  fail watchdog-restart "pid $hung still there: NRestarts=$(prop NRestarts) MainPID=$(prop MainPID) ActiveState=$(prop ActiveState) Result=$(prop Result)"
  kill -CONT "$hung" 2>/dev/null
fi

# --- graceful stop: exit 0, offline published, within TimeoutStopSec --------------------------
until_true 30 is_connected
offline_pattern="^texture/v1/devices/$DEVICE_ID/status .*\"state\":\"offline\".*\"reason\":\"shutdown\""
offline_before=$(grep -c "$offline_pattern" "$mqtt")
points_before=$(seen_seqs | wc -l)
t0=$(now_ms)
systemctl stop "$unit"
took=$(($(now_ms) - t0))
code=$(prop ExecMainCode) status=$(prop ExecMainStatus) result=$(prop Result)
offline_published() { [ "$(grep -c "$offline_pattern" "$mqtt")" -gt "$offline_before" ]; }
if [ "$code" = 1 ] && [ "$status" = 0 ] && [ "$result" = success ] && [ "$took" -lt 10000 ] &&
  until_true 5 offline_published &&
  journalctl -u "$unit" --no-pager | grep -q "offline status published"; then
  pass graceful-stop "systemctl stop took $took ms, exit status 0, retained offline (reason shutdown) seen by the platform"
else
  fail graceful-stop "took $took ms, ExecMainCode=$code ExecMainStatus=$status Result=$result, offline seen: $(grep -c "$offline_pattern" "$mqtt") (before $offline_before)"
fi

# --- outbox: nothing appended is lost across the watchdog kill and the stop -------------------
# The final status.json survives the stop (test drop-in: RuntimeDirectoryPreserve=yes). Every
# point numbered before it must reach the platform once the agent runs again, with no gap.
status_out=$(agent_status 2>&1)
next=$(echo "$status_out" | sed -n 's/^outbox:.*next seq \([0-9]*\).*/\1/p')
if [ -z "$next" ] || [ "$next" -le 1 ]; then
  fail outbox-no-loss "no outbox line with points in texture-agent status: $(echo "$status_out" | tr '\n' ' ')"
else
  systemctl start "$unit"
  if until_true 60 all_seen_below "$next"; then
    # One snapshot for both figures: the agent keeps publishing, and a second read taken
    # later can hold more points than the first one's maximum.
    seqs=$(seen_seqs)
    max=$(echo "$seqs" | tail -1)
    count=$(echo "$seqs" | wc -l)
    dups=$(($(grep "^texture/v1/devices/$DEVICE_ID/telemetry " "$mqtt" | grep -o '"seq":[0-9]*' | wc -l) - count))
    if [ "$count" -eq "$max" ]; then
      pass outbox-no-loss "points 1..$((next - 1)) all delivered after restart ($points_before before the stop; $count so far, no gap, $dups re-sent)"
    else
      fail outbox-no-loss "gaps: $count distinct points up to $max"
    fi
  else
    fail outbox-no-loss "after the restart, missing below $next: $(seen_seqs | awk -v n="$next" 'BEGIN{e=1} $1<n{while(e<$1){printf "%d ", e; e++} e=$1+1} END{while(e<n){printf "%d ", e; e++}}' | head -c 300)"
  fi
fi

# --- upgrade: reinstalling the package restarts a running agent and keeps the edited config ---
until_true 30 is_connected
before=$(prop MainPID)
if DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold "$shared/texture-agent.deb" \
  >"$shared/upgrade.log" 2>&1; then
  if until_true 20 is_connected && [ "$(prop MainPID)" != "$before" ] &&
    grep -q "^id = \"$DEVICE_ID\"" /etc/texture-agent/agent.toml &&
    [ ! -e /etc/texture-agent/agent.toml.dpkg-new ]; then
    pass package-upgrade "dpkg -i over the running agent: restarted (pid $before -> $(prop MainPID)) and reconnected, agent.toml kept"
  else
    fail package-upgrade "MainPID $before -> $(prop MainPID), StatusText=\"$(prop StatusText)\", agent.toml id: $(grep '^id' /etc/texture-agent/agent.toml)"
  fi
else
  fail package-upgrade "dpkg -i failed: $(tail -3 "$shared/upgrade.log" | tr '\n' ' ')"
fi

# For the record (scripts/test-container.sh copies these to target/container-report/).
systemd-analyze security --no-pager "$unit" >"$shared/security.txt" 2>&1
journalctl -u "$unit" -o json --no-pager >"$shared/journal.json" 2>&1

echo DONE >>"$out"
