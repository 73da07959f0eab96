#!/usr/bin/env bash
# Puts what the image installs into build/image/wheels/ (git-ignored): the
# project's abi3 wheel (scripts/build-wheel.sh) and binary wheels of its runtime
# dependencies for the image's Python (3.11, Debian bookworm's and the default
# base image's), at the versions requirements-dev.txt pins for the tests.
#
# The dependencies come from pip's configured index on this machine, where
# pip can verify certificates; the image build then installs from this folder
# only (--no-index). Once a run has fetched them, later runs find every wheel
# in the folder and need no network.
#
# Environment: IMAGE_PYTHON_VERSION (3.11), WHEELS_DIR (build/image/wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${WHEELS_DIR:-build/image/wheels}
python_version=${IMAGE_PYTHON_VERSION:-3.11}
PIP=(.venv/bin/python -m pip)

mkdir -p "$wheels"
staging=$(mktemp -d "${TMPDIR:-/tmp}/fl-sidecar-wheels.XXXXXX")
trap 'rm -rf "$staging"' EXIT
bash scripts/build-wheel.sh "$staging/own" >&2
own=$(find "$staging/own" -name 'fl_sidecar-*.whl' | head -n 1)
[ -n "$own" ] || { echo "image-wheels: build-wheel.sh made no wheel" >&2; exit 1; }

# pip does not widen --platform to older manylinux tags by itself: list every
# tag from our wheel's glibc down to manylinux2014's (2.17), plus the legacy aliases.
arch=$(uname -m)
glibc_minor=$(basename "$own" | sed -n 's/.*manylinux_2_\([0-9][0-9]*\)_.*/\1/p')
platforms=()
for ((minor = ${glibc_minor:-17}; minor >= 17; minor--)); do
  platforms+=(--platform "manylinux_2_${minor}_${arch}")
done
platforms+=(--platform "manylinux2014_${arch}" --platform "manylinux_2_12_${arch}"
            --platform "manylinux2010_${arch}" --platform "manylinux_2_5_${arch}"
            --platform "manylinux1_${arch}")
download=("${PIP[@]}" download --quiet --disable-pip-version-check --only-binary=:all:
          "${platforms[@]}" --python-version "$python_version" --implementation cp
          -c requirements-dev.txt --dest "$staging/wheels" "$own")
quiet_pip() {
  # This machine's pip configuration may name local indexes that do not exist;
  # pip warns about each on every call: keep the log readable, keep the status.
  "$@" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; } >&2
}
# The folder then holds exactly this set (pip copies what it takes from the
# previous set): the build installs whatever it finds there.
if ! quiet_pip "${download[@]}" --no-index --find-links "$wheels" 2>/dev/null; then
  echo "image-wheels: fetching the runtime dependencies' wheels" >&2
  quiet_pip "${download[@]}" --find-links "$wheels"
fi
rm -rf "$wheels"
mv "$staging/wheels" "$wheels"
echo "$wheels"
