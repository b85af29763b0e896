# shellcheck shell=bash
# Shared set-up for Docker-free cross builds (sourced by scripts/cross-build.sh and
# scripts/test-qemu.sh; not meant to be run on its own):
#   source scripts/lib/cross-env.sh
#   cross_env TARGET
# Installs, when missing, Debian's cross gcc for TARGET and rustup's standard library for it,
# then exports the linker and C compiler cargo and the cc crate use (ring has a little C and
# assembly). Supported: aarch64-unknown-linux-musl (the default), aarch64-unknown-linux-gnu,
# armv7-unknown-linux-musleabihf, armv7-unknown-linux-gnueabihf, and x86_64-unknown-linux-musl
# (the x86-64 gateway build: the host gcc compiles ring's C, nothing to emulate).

# apt-get install PACKAGE... quietly (the caller decides what is missing).
cross_apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Sets CROSS_TARGET, CROSS_GCC, CROSS_STRIP and CROSS_QEMU, and exports
# CARGO_TARGET_<TARGET>_LINKER and CC_<target>.
cross_env() {
  CROSS_TARGET=${1:-aarch64-unknown-linux-musl}
  local pkg libc
  # The libc headers are only a Recommends of the cross gcc, and apt here runs without
  # recommends: without them ring's C falls back to the host's /usr/include and fails
  # (bits/libc-header-start.h). glibc's headers serve the musl targets too (ring's C needs only
  # stdint.h and friends; Rust's musl target links its own bundled musl).
  case "$CROSS_TARGET" in
    aarch64-*) CROSS_GCC=aarch64-linux-gnu-gcc; pkg=gcc-aarch64-linux-gnu; libc=libc6-dev-arm64-cross; CROSS_QEMU=qemu-aarch64-static ;;
    armv7-*)   CROSS_GCC=arm-linux-gnueabihf-gcc; pkg=gcc-arm-linux-gnueabihf; libc=libc6-dev-armhf-cross; CROSS_QEMU=qemu-arm-static ;;
    x86_64-unknown-linux-musl) CROSS_GCC=gcc; pkg=gcc; libc=libc6-dev; CROSS_QEMU= ;;
    *) echo "unsupported target: $CROSS_TARGET" >&2; return 2 ;;
  esac
  case "$CROSS_GCC" in
    *-gcc) CROSS_STRIP=${CROSS_GCC%-gcc}-strip ;;
    *) CROSS_STRIP=strip ;;
  esac
  if ! command -v "$CROSS_GCC" >/dev/null ||
    [ "$(dpkg-query -W -f='${Status}' "$libc" 2>/dev/null)" != "install ok installed" ]; then
    echo "==> installing $pkg $libc"
    cross_apt_install "$pkg" "$libc"
  fi
  # (Not `rustup ... | grep -q`: under pipefail grep's early exit can fail the pipeline.)
  local installed
  installed=$(rustup target list --installed)
  grep -qx "$CROSS_TARGET" <<<"$installed" || rustup target add "$CROSS_TARGET"
  local upper
  upper=$(echo "$CROSS_TARGET" | tr 'a-z-' 'A-Z_')
  export "CARGO_TARGET_${upper}_LINKER=$CROSS_GCC"
  export "CC_${CROSS_TARGET//-/_}=$CROSS_GCC"
  export CROSS_TARGET CROSS_GCC CROSS_STRIP CROSS_QEMU
}
