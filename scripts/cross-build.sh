#!/usr/bin/env bash
# Docker-free cross build for gateways: rustup's target plus Debian's cross gcc as linker and
# C compiler (ring has a little C and assembly). Usage:
#   scripts/cross-build.sh [TARGET] [cargo build args...]
# TARGET defaults to aarch64-unknown-linux-musl; also armv7-unknown-linux-musleabihf,
# aarch64-unknown-linux-gnu, armv7-unknown-linux-gnueabihf and x86_64-unknown-linux-musl. The environment set-up is shared
# with scripts/test-qemu.sh through scripts/lib/cross-env.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/cross-env.sh
source scripts/lib/cross-env.sh
cross_env "${1:-aarch64-unknown-linux-musl}"
shift || true
exec cargo build --release --locked --target "$CROSS_TARGET" "$@"
