#!/usr/bin/env bash
# The agent as it ships to ARM gateways (aarch64, static musl), tested on this x86_64 machine
# under QEMU user-mode emulation. binfmt_misc is not available here, so every aarch64 program
# runs explicitly through qemu-aarch64-static (cargo's target runner, and the integration
# harness's TEXTURE_AGENT_RUNNER).
#
#   scripts/test-qemu.sh
#
# Steps (each prints PASS or FAIL; the script exits non-zero if any failed):
#   1. build    scripts/cross-build.sh (release, aarch64-unknown-linux-musl); reports the
#               stripped size and runs `texture-agent version` under QEMU.
#   2. unit     the library's unit tests, cross-compiled and run under QEMU.
#   3. e2e      the host-built integration tests driving the aarch64 agent under QEMU against
#               mosquitto with mutual TLS (the harness starts private brokers on 127.0.0.1):
#               tests/link.rs and tests/telemetry.rs, less two tests (listed below with the
#               reason), and the hostile-broker test of tests/commands.rs: connect and retained
#               birth, graceful stop and last will, reconnect, TLS refusals and backoff,
#               authorised and forged commands, telemetry without gaps across SIGKILLs, a full
#               outbox, a torn outbox.
#   4. deb      the arm64 package of the binary tested above (cargo deb --no-build).
# Installs what it needs when missing: qemu-user-static, the cross gcc and libc headers, the
# rustup target, mosquitto (apt), cargo-deb (cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/cross-env.sh
source scripts/lib/cross-env.sh

target=aarch64-unknown-linux-musl
bin=target/$target/release/texture-agent
t_start=$(date +%s)
results=()
failed=0
record() { # STATUS NAME DETAIL
  results+=("$1 $2 $3")
  echo "$1 $2 $3"
  [ "$1" = PASS ] || failed=$((failed + 1))
}
# timed NAME COMMAND...: runs COMMAND with its output in target/qemu-logs/NAME.log; sets $took.
logs=target/qemu-logs
mkdir -p "$logs"
timed() {
  local name=$1 t0
  shift
  t0=$(date +%s)
  echo "==> $name: $*"
  if "$@" >"$logs/$name.log" 2>&1; then rc=0; else rc=$?; fi
  took=$(($(date +%s) - t0))
  return $rc
}
show_failure() { echo "---- last lines of $logs/$1.log ----"; tail -40 "$logs/$1.log"; }

missing=()
command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
[ -x /usr/sbin/mosquitto ] || [ -x /usr/bin/mosquitto ] || missing+=(mosquitto)
if [ ${#missing[@]} -gt 0 ]; then
  echo "==> installing ${missing[*]}"
  cross_apt_install "${missing[@]}"
fi
cross_env "$target" # cross gcc, libc headers, rustup target, linker and CC variables
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_RUNNER=qemu-aarch64-static

# --- 1. cross build ----------------------------------------------------------------------------
if timed build nice -n 10 scripts/cross-build.sh "$target"; then
  stripped=$(mktemp)
  "$CROSS_STRIP" -o "$stripped" "$bin" # already stripped by [profile.release]; this makes sure
  size=$(stat -c %s "$stripped")
  rm -f "$stripped"
  echo "aarch64-musl stripped binary: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f", s / 1048576 }') MiB)"
  machine=$(aarch64-linux-gnu-readelf -h "$bin" | awk -F: '/Machine/ { gsub(/^ +/, "", $2); print $2 }')
  static=$(aarch64-linux-gnu-readelf -l "$bin" | grep -c INTERP || true)
  version=$(qemu-aarch64-static "$bin" version 2>&1 || true)
  if [ "$machine" = AArch64 ] && [ "$static" = 0 ] && [[ $version == "texture-agent "* ]]; then
    record PASS build "${took}s; $machine, static, $size bytes stripped; under QEMU: $version"
  else
    record FAIL build "machine '$machine', INTERP headers $static, version '$version'"
  fi
else
  record FAIL build "scripts/cross-build.sh failed after ${took}s"
  show_failure build
  echo "qemu: 0 passed, $failed failed"
  exit 1
fi

# --- 2. unit tests under QEMU ------------------------------------------------------------------
if timed unit nice -n 10 cargo test --locked --lib --target "$target"; then
  record PASS unit "${took}s; $(grep -h '^test result:' "$logs/unit.log" | tail -1)"
else
  record FAIL unit "cargo test --lib --target $target failed after ${took}s"
  show_failure unit
fi

# --- 3. end to end: host-built integration tests, aarch64 agent under QEMU ---------------------
# Every test of tests/link.rs and tests/telemetry.rs but two, and the tests of tests/commands.rs
# named in `commands` (the driver-facing command tests there run natively only). These must be
# among those that ran and passed: they show the ARM build working as a gateway.
must_pass=(
  connects_with_mutual_tls_and_publishes_retained_birth            # mutual TLS, retained birth
  only_server_and_owner_attestations_execute_over_a_hostile_broker # authorised runs, forged refused
  no_gaps_after_five_sigkills_mid_stream                           # telemetry delivered, no gap
  sigterm_publishes_offline_and_exits_zero_within_five_seconds     # graceful stop
)
# Excluded, and why:
#   every_point_arrives_in_order_across_a_twenty_second_broker_outage: 20 s of sleeping, and its
#     throughput floor (> 2,000 points in 28 s) would measure the emulator rather than the
#     agent; the SIGKILL and torn-tail tests cover the outbox on aarch64, and scripts/test.sh
#     runs it natively.
#   acl_confines_device_to_its_own_subtree: tests the broker's ACL; no agent takes part.
#   a_small_data_budget_degrades_telemetry_in_steps_and_never_the_replies: qemu-user does not
#     pass getsockopt(TCP_INFO) through, so the emulated agent counts no bytes (it says so in its
#     log); an ARM kernel counts them, and scripts/test.sh runs the test natively.
# Kept although timing-sensitive: the three backoff tests (refuses_broker_certificate_from_
# another_ca, untrusted_client_certificate_fails_cleanly_with_backoff, no_tight_loop_while_
# broker_is_down) assert the spacing of reconnect attempts as seen from the agent's log lines
# (no two closer than backoff_min - 50 ms). Under QEMU they passed 3 runs out of 3 with the
# machine's load at 4.8 on 2 cores; if they ever flake here, they are the ones to --skip.
skip=(every_point_arrives_in_order_across_a_twenty_second_broker_outage
  acl_confines_device_to_its_own_subtree
  a_small_data_budget_degrades_telemetry_in_steps_and_never_the_replies)
skip_args=()
for t in "${skip[@]}"; do skip_args+=(--skip "$t"); done
commands=(only_server_and_owner_attestations_execute_over_a_hostile_broker)
e2e_tests() {
  TEXTURE_AGENT_BIN="$PWD/$bin" TEXTURE_AGENT_RUNNER=qemu-aarch64-static \
    nice -n 10 cargo test --locked --test link --test telemetry -- --exact "${skip_args[@]}" &&
    TEXTURE_AGENT_BIN="$PWD/$bin" TEXTURE_AGENT_RUNNER=qemu-aarch64-static \
      nice -n 10 cargo test --locked --test commands -- --exact "${commands[@]}"
}
if timed e2e e2e_tests; then
  ran=$(grep -c '^test .* ok$' "$logs/e2e.log" || true)
  absent=()
  for t in "${must_pass[@]}"; do grep -qx "test $t ... ok" "$logs/e2e.log" || absent+=("$t"); done
  if [ ${#absent[@]} -eq 0 ]; then
    record PASS e2e "${took}s; $ran integration tests passed with the aarch64 agent under QEMU"
  else
    record FAIL e2e "did not run (renamed?): ${absent[*]}"
  fi
else
  record FAIL e2e "failed after ${took}s: $(grep -E '^test .* FAILED$' "$logs/e2e.log" | tr '\n' ' ')"
  show_failure e2e
fi

# --- 4. the arm64 package --------------------------------------------------------------------
if timed deb packaging/build-deb.sh "$target" --no-build; then
  deb=$(tail -1 "$logs/deb.log")
  arch=$(dpkg-deb -f "$deb" Architecture)
  x=$(mktemp -d)
  dpkg-deb -x "$deb" "$x"
  machine=$(aarch64-linux-gnu-readelf -h "$x/usr/bin/texture-agent" | awk -F: '/Machine/ { gsub(/^ +/, "", $2); print $2 }')
  rm -rf "$x"
  if [ "$arch" = arm64 ] && [ "$machine" = AArch64 ]; then
    record PASS deb "${took}s; $deb ($(stat -c %s "$deb") bytes, Architecture: arm64)"
  else
    record FAIL deb "$deb: Architecture '$arch', binary machine '$machine'"
  fi
else
  record FAIL deb "packaging/build-deb.sh $target failed after ${took}s"
  show_failure deb
fi

echo
echo "---- QEMU (aarch64-unknown-linux-musl) results, $(($(date +%s) - t_start))s ----"
printf '%s\n' "${results[@]}"
echo "qemu: $((${#results[@]} - failed)) passed, $failed failed"
[ "$failed" -eq 0 ]
