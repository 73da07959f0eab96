#!/usr/bin/env bash
# Builds the release abi3 wheel (one wheel for every CPython >= 3.8) into the
# given directory (default dist/), with crates from CARGO_SOURCE (see cargo.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/cargo-debian-config.sh
source scripts/cargo-debian-config.sh
out=${1:-dist}
if [ -z "${CARGO_SOURCE:-}" ]; then
  if compgen -G "/usr/share/cargo/registry/pyo3-*" >/dev/null; then CARGO_SOURCE=debian; else CARGO_SOURCE=crates-io; fi
fi
if [ "$CARGO_SOURCE" = "debian" ]; then
  # Debian's zstd-sys links pkg-config's `libzstd`, statically when that names a libzstd.a:
  # ours is libzstd 1.5.7 (see build-libzstd.sh); empty output means the system one.
  zstd_pc=$(bash scripts/build-libzstd.sh)
  if [ -n "$zstd_pc" ]; then export PKG_CONFIG_PATH="$zstd_pc${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"; fi
fi
args=(--release --out "$out")
if [ "$CARGO_SOURCE" = "debian" ]; then
  write_debian_cargo_config
  args+=(--offline
         --config 'source.crates-io.replace-with="debian"'
         --config 'source.debian.directory="/usr/share/cargo/registry"')
fi
MATURIN=${MATURIN:-$(command -v maturin || echo /opt/maturin/bin/maturin)}
if [ -x .venv/bin/maturin ] && [ -z "${MATURIN_FORCE:-}" ]; then MATURIN=.venv/bin/maturin; fi
"$MATURIN" build "${args[@]}"
