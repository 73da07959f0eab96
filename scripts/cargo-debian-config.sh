#!/usr/bin/env bash
# Sourced by build-native.sh and build-wheel.sh: with CARGO_SOURCE=debian, write
# the (git-ignored) project cargo config that replaces crates.io with Debian's
# crate packages. maturin runs `cargo metadata` without our --config flags, so the
# source replacement has to live in the config every cargo call reads.
write_debian_cargo_config() {
  mkdir -p .cargo
  cat > .cargo/config.toml <<'TOML'
# Written by scripts/cargo-debian-config.sh (CARGO_SOURCE=debian): crates from Debian's packages.
[source.crates-io]
replace-with = "debian"
[source.debian]
directory = "/usr/share/cargo/registry"
[net]
offline = true
TOML
}
