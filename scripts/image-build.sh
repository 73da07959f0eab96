#!/usr/bin/env bash
# `make image`: builds the sidecar's container image offline from Debian
# packages, and the trainer base image the smoke test (make image-test) runs
# the Node.js example in. Everything lands in build/image/ (git-ignored):
#
#   base-<name>-<key>.tar   root filesystems made by mmdebstrap, cached: the key
#                           is a hash of the suite, the mirrors and the package
#                           list, so changing any of them builds a new one
#   wheels/                 what the image installs (scripts/image-wheels.sh)
#   fl-sidecar-<version>.oci.tar   the image, as an OCI archive
#   containers.conf         podman's settings for these scripts (CONTAINERS_CONF)
#   image.env               what the smoke test reads: image names, the archive
#   report.txt              the image's size and layers
#   unavailable             instead of image.env: why this machine cannot run containers
#
# A machine that cannot build or run containers (no root, no apt-get to install
# the tools, podman cannot start a container) is reported and skipped: the
# reason goes to build/image/unavailable and stderr, the script exits 0, and the
# smoke test reports a skip with that reason. FL_SIDECAR_REQUIRE_IMAGE=1 (CI)
# turns that into a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=build/image
SUITE=bookworm
MIRRORS=("deb http://deb.debian.org/debian $SUITE main"
         "deb http://deb.debian.org/debian $SUITE-updates main"
         "deb http://deb.debian.org/debian-security $SUITE-security main")
# libstdc++6 must be named: the essential variant lacks it and grpcio needs it.
SIDECAR_BASE_PACKAGES=(python3 python3-venv libzstd1 libstdc++6 passwd ca-certificates)
TRAINER_BASE_PACKAGES=(nodejs)
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
IMAGE=localhost/fl-sidecar:$VERSION
ARCHIVE=$OUT/fl-sidecar-$VERSION.oci.tar

mkdir -p "$OUT"
rm -f "$OUT/image.env" "$OUT/unavailable"

unavailable() {
  echo "$*" > "$OUT/unavailable"
  echo "image: SKIPPED: this machine cannot build or run containers: $*" >&2
  if [ "${FL_SIDECAR_REQUIRE_IMAGE:-}" = "1" ]; then
    echo "image: FL_SIDECAR_REQUIRE_IMAGE=1: failing instead of skipping" >&2
    exit 1
  fi
  exit 0
}

[ "$(id -u)" -eq 0 ] || unavailable "it needs root (rootful podman; mmdebstrap's root mode)"
if ! command -v apt-get >/dev/null; then
  for tool in mmdebstrap podman buildah slirp4netns runc; do
    command -v "$tool" >/dev/null || unavailable "$tool is missing and there is no apt-get to install it"
  done
fi
bash scripts/bootstrap.sh image-tools || unavailable "installing the container tools from Debian failed"

# Podman's settings for these scripts only, leaving /etc alone. Some machines
# of this kind refuse the rlimits podman sets by default, and Debian 12's crun
# cannot start containers on a hybrid cgroup hierarchy: runc can.
cat > "$OUT/containers.conf" <<'CONF'
# Written by scripts/image-build.sh; used through CONTAINERS_CONF.
[containers]
default_ulimits = []

[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$PWD/$OUT/containers.conf
info=$(podman info 2>&1) || unavailable "podman does not work here: $(echo "$info" | tail -n 1)"

# base NAME PACKAGE...: a local image made from a cached Debian root filesystem;
# prints its name.
base() {
  local name=$1; shift
  local packages key tar image
  packages=$(printf '%s\n' "$@" | sort -u | tr '\n' ' ')
  key=$( { echo "$SUITE"; printf '%s\n' "${MIRRORS[@]}"; echo "$packages"; echo v1; } \
         | sha256sum | cut -c1-12)
  tar=$OUT/base-$name-$key.tar
  image=localhost/fl-sidecar-$name-base:$key
  if [ ! -s "$tar" ]; then
    echo "image: making the $name base root filesystem ($packages) with mmdebstrap" >&2
    # The merged-usr hook keeps usrmerge (and with it perl) out; the docs,
    # manual pages and translations are left out to keep the image small.
    mmdebstrap --quiet --variant=essential \
      --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
      --include="$(echo "$packages" | tr ' ' ',' | sed 's/,$//')" \
      --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' \
      --dpkgopt='path-exclude=/usr/share/info/*' \
      --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --format=tar "$SUITE" "$tar.partial" "${MIRRORS[@]}" > "$OUT/mmdebstrap-$name.log" 2>&1 \
      || { tail -n 20 "$OUT/mmdebstrap-$name.log" >&2; rm -f "$tar.partial"; return 1; }
    mv "$tar.partial" "$tar" || return 1
    podman rmi --force "$image" >/dev/null 2>&1 || true
  fi
  if ! podman image exists "$image"; then
    podman import --quiet "$tar" "$image" >/dev/null || return 1
  fi
  echo "$image"
}

sidecar_base=$(base sidecar "${SIDECAR_BASE_PACKAGES[@]}") \
  || unavailable "could not make or import the sidecar's base image (see above)"
trainer_base=$(base trainer "${TRAINER_BASE_PACKAGES[@]}") \
  || unavailable "could not make or import the trainer's base image (see above)"

probe=$(podman run --rm --network none "$sidecar_base" true 2>&1) \
  || unavailable "podman cannot start a container: $(echo "$probe" | tail -n 1)"

bash scripts/image-wheels.sh >/dev/null

echo "image: building $IMAGE from $sidecar_base" >&2
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
started=$(date +%s.%N)
buildah bud --quiet --isolation chroot --format docker \
  --build-arg "BASE_IMAGE=$sidecar_base" -f deploy/Dockerfile -t "$IMAGE" . >/dev/null
built=$(date +%s.%N)
# The image this one replaces would stay behind untagged, one per build.
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true
fi
rm -f "$ARCHIVE"
podman save --quiet --format oci-archive -o "$ARCHIVE" "$IMAGE"

{
  echo "image $IMAGE (from $sidecar_base)"
  echo "size $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes," \
       "$(podman image inspect --format '{{len .RootFS.Layers}}' "$IMAGE") layers;" \
       "OCI archive $ARCHIVE $(stat -c %s "$ARCHIVE") bytes"
  echo "build $(awk "BEGIN { printf \"%.1f\", $built - $started }") s (buildah bud)"
  podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-110
} > "$OUT/report.txt"
cat "$OUT/report.txt" >&2

cat > "$OUT/image.env" <<ENV
IMAGE=$IMAGE
SIDECAR_BASE=$sidecar_base
TRAINER_BASE=$trainer_base
ARCHIVE=$PWD/$ARCHIVE
CONTAINERS_CONF=$CONTAINERS_CONF
ENV
echo "image: $IMAGE built; saved as $ARCHIVE" >&2
