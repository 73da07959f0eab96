#!/usr/bin/env bash
# Runs cargo with the crate source chosen by CARGO_SOURCE:
#   debian    (default when /usr/share/cargo/registry has pyo3): Debian's
#             librust-*-dev packages as a directory source, fully offline;
#   crates-io: the network, cargo's default.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${CARGO_SOURCE:-}" ]; then
  if compgen -G "/usr/share/cargo/registry/pyo3-*" >/dev/null; then CARGO_SOURCE=debian; else CARGO_SOURCE=crates-io; fi
fi
if [ "$CARGO_SOURCE" = "crates-io" ] && [ -f .cargo/config.toml ] \
   && grep -q 'scripts/cargo-debian-config.sh\|scripts/build-native.sh' .cargo/config.toml; then
  rm .cargo/config.toml  # the Debian source replacement build-native.sh wrote
fi
if [ "$CARGO_SOURCE" = "crates-io" ] && grep -q 'Could not get crate checksum' Cargo.lock 2>/dev/null; then
  # The committed Cargo.lock is resolved against Debian's crate packages, some of which
  # carry placeholder checksums that crates.io rejects: resolve afresh (same semver ranges).
  echo "Cargo.lock holds Debian checksums; regenerating it for crates.io" >&2
  cargo generate-lockfile
fi
if [ "$CARGO_SOURCE" = "debian" ]; then
  # Debian's zstd-sys links pkg-config's `libzstd`, statically when that names a libzstd.a:
  # ours is libzstd 1.5.7 (see build-libzstd.sh); empty output means the system one.
  zstd_pc=$(bash scripts/build-libzstd.sh)
  if [ -n "$zstd_pc" ]; then export PKG_CONFIG_PATH="$zstd_pc${PKG_CONFIG_PATH:+:$PKG_CONFIG_PATH}"; fi
fi
args=()
if [ "$CARGO_SOURCE" = "debian" ]; then
  args+=(--config 'source.crates-io.replace-with="debian"'
         --config 'source.debian.directory="/usr/share/cargo/registry"'
         --config 'net.offline=true')
fi
cmd=$1; shift
# Global options go before the subcommand, so external ones (cargo fmt) accept them too.
exec cargo "${args[@]}" "$cmd" "$@"
