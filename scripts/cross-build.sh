#!/usr/bin/env bash
# Docker-free cross build for gateways: rustup's target plus Debian's cross gcc as linker and
# C compiler (ring has a little C and assembly). Usage:
#   scripts/cross-build.sh [TARGET] [cargo build args...]
# TARGET defaults to aarch64-unknown-linux-musl; also armv7-unknown-linux-musleabihf,
# aarch64-unknown-linux-gnu and armv7-unknown-linux-gnueabihf.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-aarch64-unknown-linux-musl}
shift || true
case "$target" in
  aarch64-*) gcc=aarch64-linux-gnu-gcc; pkg=gcc-aarch64-linux-gnu ;;
  armv7-*)   gcc=arm-linux-gnueabihf-gcc; pkg=gcc-arm-linux-gnueabihf ;;
  *) echo "unsupported target: $target" >&2; exit 2 ;;
esac
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
if ! command -v "$gcc" >/dev/null; then
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
fi
rustup target list --installed | grep -qx "$target" || rustup target add "$target"
upper=$(echo "$target" | tr 'a-z-' 'A-Z_')
export "CARGO_TARGET_${upper}_LINKER=$gcc"
export "CC_${target//-/_}=$gcc"
exec cargo build --release --locked --target "$target" "$@"
