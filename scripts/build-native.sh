#!/usr/bin/env bash
# Builds the native extension fl_sidecar._codec (release, abi3) with maturin
# and installs the package into ./.venv in development mode (python/ is used
# in place; the compiled module is copied next to it).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cargo-debian-config.sh
source scripts/cargo-debian-config.sh
if [ -z "${CARGO_SOURCE:-}" ]; then
  if compgen -G "/usr/share/cargo/registry/pyo3-*" >/dev/null; then CARGO_SOURCE=debian; else CARGO_SOURCE=crates-io; fi
fi
if [ "$CARGO_SOURCE" = "debian" ]; then
  # Debian's zstd-sys links pkg-config's `libzstd`, statically when that names a libzstd.a:
  # ours is libzstd 1.5.7 (see build-libzstd.sh); empty output means the system one.
  zstd_pc=$(bash scripts/build-libzstd.sh)
  if [ -n "$zstd_pc" ]; then export PKG_CONFIG_PATH="$zstd_pc${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"; fi
fi
args=(--release)
if [ "$CARGO_SOURCE" = "debian" ]; then
  write_debian_cargo_config
  args+=(--offline)
elif [ -f .cargo/config.toml ] && grep -q 'scripts/cargo-debian-config.sh\|scripts/build-native.sh' .cargo/config.toml; then
  rm .cargo/config.toml
fi
if [ "$CARGO_SOURCE" = "crates-io" ] && grep -q 'Could not get crate checksum' Cargo.lock 2>/dev/null; then
  # The committed Cargo.lock is resolved against Debian's crate packages, some of which
  # carry placeholder checksums that crates.io rejects: resolve afresh (same semver ranges).
  echo "Cargo.lock holds Debian checksums; regenerating it for crates.io" >&2
  cargo generate-lockfile
fi
export VIRTUAL_ENV="$PWD/.venv"
export PATH="$VIRTUAL_ENV/bin:$PATH"
# Installs the package in development mode (metadata, the fl-sidecar script);
# its dependencies are already in the venv from requirements-dev.txt.
maturin develop "${args[@]}"
python -c "import fl_sidecar._codec as c; print('built fl_sidecar._codec', c.__file__)"
