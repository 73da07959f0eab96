#!/usr/bin/env bash
# Generates the Python protobuf/gRPC code and mypy stubs from proto/ into
# python/ (the proto path mirrors the import path: proto/fl_sidecar/v1/x.proto
# -> fl_sidecar.v1.x_pb2). With --check, generates into a temporary folder and
# fails if the committed code differs (CI runs this).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=python
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
fi
mkdir -p "$out/fl_sidecar/v1"
"$PY" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  --plugin=protoc-gen-mypy="$(dirname "$PY")/protoc-gen-mypy" \
  --plugin=protoc-gen-mypy_grpc="$(dirname "$PY")/protoc-gen-mypy_grpc" \
  proto/fl_sidecar/v1/*.proto
[ -f "$out/fl_sidecar/v1/__init__.py" ] || printf '"""Generated protobuf and gRPC code (make proto). Never edit by hand."""\n' > "$out/fl_sidecar/v1/__init__.py"
if [ "${1:-}" = "--check" ]; then
  if ! diff -r -x __pycache__ "$out/fl_sidecar/v1" python/fl_sidecar/v1; then
    echo "proto-check: generated code is stale; run 'make proto' and commit" >&2
    exit 1
  fi
  echo "proto-check: generated code is up to date"
fi
