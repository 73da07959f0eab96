#!/usr/bin/env bash
# Builds a static libzstd 1.5.7 for the codec (Debian's zstd-sys links whatever
# pkg-config's `libzstd` names; Debian's own libzstd here is 1.5.4, which packs
# bf16 weights about 16 % slower per CPU second: see docs/codec.md).
#
# Source: zstd's official single-file amalgamation (zstd/zstd.c, zstd.h,
# zstd_errors.h, zdict.h; BSD licence) shipped in the python-zstandard sdist,
# pinned by version AND sha256, fetched with pip (or taken from
# $FL_SIDECAR_ZSTANDARD_SDIST, a local copy of that very file, for offline
# machines). Built into the ignored target/libzstd-1.5.7/ with
# gcc -O3 -fPIC, without ZSTD_MULTITHREAD (the codec parallelises itself) and
# without legacy formats.
#
# Prints the pkg-config directory to put first in PKG_CONFIG_PATH on stdout,
# or nothing when the system libzstd is to be used: FL_SIDECAR_SYSTEM_ZSTD=1,
# or the sdist could not be fetched (a warning on stderr). A sdist whose
# sha256 differs, or a compile error, fails the script.
set -euo pipefail
cd "$(dirname "$0")/.."

ZSTANDARD_VERSION=0.25.0
ZSTANDARD_SHA256=7713e1179d162cf5c7906da876ec2ccb9c3a9dcbdffef0cc7f70c3667a205f0b
ZSTD_VERSION=1.5.7
prefix="$PWD/target/libzstd-$ZSTD_VERSION"
pcdir="$prefix/lib/pkgconfig"

warn() { echo "build-libzstd: $*" >&2; }

if [ "${FL_SIDECAR_SYSTEM_ZSTD:-}" = "1" ]; then
  warn "FL_SIDECAR_SYSTEM_ZSTD=1: linking the system libzstd"
  exit 0
fi
stamp="$prefix/.built-from-$ZSTANDARD_SHA256"
built() { [ -f "$stamp" ] && [ -f "$prefix/lib/libzstd.a" ] && [ -f "$pcdir/libzstd.pc" ]; }
if built; then
  echo "$pcdir"
  exit 0
fi
# Two builds started together (make -j, two shells) must not both rebuild the folder.
mkdir -p target
exec 9>"target/libzstd-$ZSTD_VERSION.lock"
if command -v flock >/dev/null; then flock 9; fi
if built; then
  echo "$pcdir"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sdist="$work/zstandard-$ZSTANDARD_VERSION.tar.gz"
if [ -n "${FL_SIDECAR_ZSTANDARD_SDIST:-}" ]; then
  cp "$FL_SIDECAR_ZSTANDARD_SDIST" "$sdist"
else
  pip_python=""
  for py in .venv/bin/python /opt/maturin/bin/python python3; do
    if "$py" -m pip --version >/dev/null 2>&1; then pip_python=$py; break; fi
  done
  if [ -z "$pip_python" ] || ! "$pip_python" -m pip download -q --no-deps --no-binary :all: \
       -d "$work" "zstandard==$ZSTANDARD_VERSION" >&2 \
     || [ ! -f "$sdist" ]; then
    warn "WARNING: could not download the zstandard $ZSTANDARD_VERSION sdist;" \
         "linking the system libzstd ($(pkg-config --modversion libzstd 2>/dev/null || echo '?'))," \
         "which packs bf16 weights more slowly (set FL_SIDECAR_ZSTANDARD_SDIST to a local copy)"
    exit 0
  fi
fi
actual=$(sha256sum "$sdist" | cut -d' ' -f1)
if [ "$actual" != "$ZSTANDARD_SHA256" ]; then
  warn "ERROR: zstandard-$ZSTANDARD_VERSION.tar.gz has sha256 $actual, expected $ZSTANDARD_SHA256"
  exit 1
fi

top="zstandard-$ZSTANDARD_VERSION/zstd"
tar -xzf "$sdist" -C "$work" \
  "$top/zstd.c" "$top/zstd.h" "$top/zstd_errors.h" "$top/zdict.h" "$top/LICENSE" "$top/COPYING"
src="$work/$top"
grep -q "^#define ZSTD_VERSION_RELEASE  ${ZSTD_VERSION##*.}$" "$src/zstd.h" \
  || { warn "ERROR: $top/zstd.h is not libzstd $ZSTD_VERSION"; exit 1; }
# The amalgamation turns multithreading on itself; the codec runs one frame per worker
# thread, so zstd's own pool would only add a pthread dependency.
sed -i 's|^#define ZSTD_MULTITHREAD$|/* ZSTD_MULTITHREAD left off by fl-sidecar */|' "$src/zstd.c"
if grep -q '^#define ZSTD_MULTITHREAD' "$src/zstd.c"; then
  warn "ERROR: could not turn ZSTD_MULTITHREAD off in $top/zstd.c"; exit 1
fi

rm -rf "$prefix"
mkdir -p "$prefix/include" "$pcdir"
warn "compiling libzstd $ZSTD_VERSION (zstd.c, gcc -O3; about half a minute)"
${CC:-gcc} -O3 -fPIC -DZSTD_LEGACY_SUPPORT=0 -c "$src/zstd.c" -I "$src" -o "$work/zstd.o"
ar rcs "$prefix/lib/libzstd.a" "$work/zstd.o"
cp "$src/zstd.h" "$src/zstd_errors.h" "$src/zdict.h" "$prefix/include/"
cp "$src/LICENSE" "$src/COPYING" "$prefix/"
cat > "$pcdir/libzstd.pc" <<PC
# Written by scripts/build-libzstd.sh from zstandard-$ZSTANDARD_VERSION.tar.gz (sha256 $ZSTANDARD_SHA256)
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include

Name: zstd
Description: fast lossless compression algorithm library (static, single-threaded)
URL: https://facebook.github.io/zstd/
Version: $ZSTD_VERSION
Libs: -L\${libdir} -lzstd
Cflags: -I\${includedir}
PC
touch "$stamp"
echo "$pcdir"
