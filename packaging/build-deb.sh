#!/usr/bin/env bash
# Builds the Debian package with cargo-deb ([package.metadata.deb] in Cargo.toml).
#   packaging/build-deb.sh            amd64 package: x86_64-unknown-linux-musl, static like the
#                                     ARM builds (no libc, libm or loader to map: about 2 MiB
#                                     less RSS than the glibc build; docs/PERFORMANCE.md)
#   packaging/build-deb.sh TARGET     cross package, e.g. aarch64-unknown-linux-musl (arm64):
#                                     scripts/cross-build.sh TARGET, then cargo deb --no-build
#   packaging/build-deb.sh TARGET --no-build
#                                     package target/TARGET/release/texture-agent as it is
# Installs cargo-deb (from crates.io) when it is missing. Prints the .deb's path on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-x86_64-unknown-linux-musl}
# The build's date becomes the agent's initial time floor (build.rs, docs/PROTOCOL.md 8): the
# commit time, so the same commit always builds the same binary.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$(dirname "$0")/.." log -1 --format=%ct 2>/dev/null || true)
  [ -n "$SOURCE_DATE_EPOCH" ] || unset SOURCE_DATE_EPOCH
fi
[ -z "${SOURCE_DATE_EPOCH:-}" ] || export SOURCE_DATE_EPOCH
build=yes
[ "${2:-}" = --no-build ] && build=no

if ! cargo deb --version >/dev/null 2>&1; then
  echo "==> cargo install cargo-deb" >&2
  nice -n 10 cargo install cargo-deb --locked --version '^3.8' >&2
fi

# packaging/agent.toml (the conffile) is examples/agent.toml with more comments: the keys that
# are set must stay the same, section by section.
keys() { awk '/^\[/{s=$0} /^[a-z_]+[ ]*=/{sub(/[ ]*=.*/, ""); print s, $0}' "$1"; }
if ! diff <(keys examples/agent.toml) <(keys packaging/agent.toml) >&2; then
  echo "packaging/agent.toml no longer matches examples/agent.toml (keys above): update it" >&2
  exit 1
fi

if [ "$build" = yes ]; then
  nice -n 10 scripts/cross-build.sh "$target" >&2
elif [ ! -x "target/$target/release/texture-agent" ]; then
  echo "--no-build: target/$target/release/texture-agent is missing" >&2
  exit 1
fi
# The binary is static (musl): cargo-deb finds no shared-library dependencies and says so.
cargo deb --locked --target "$target" --no-build >&2
case "$target" in
  aarch64-*) arch=arm64 ;;
  armv7-*) arch=armhf ;;
  x86_64-*) arch=amd64 ;;
  *) arch=$target ;;
esac
version=$(awk -F'"' '/^version =/{print $2; exit}' Cargo.toml)
deb=target/debian/texture-agent_${version}-1_${arch}.deb
[ -f "$deb" ] || { echo "expected $deb" >&2; exit 1; }
echo "$deb"
