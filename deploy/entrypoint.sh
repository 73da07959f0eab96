#!/bin/sh
# Container entry point of the fl-sidecar image.
#   serve [FLAGS]   run the sidecar (default); settings from FL_* environment variables
#   healthcheck     exit 0 when the sidecar's gRPC health service says SERVING
#   anything else   passed to the fl-sidecar command line
set -eu
cmd=${1:-serve}
case "$cmd" in
  healthcheck)
    FL_SIDECAR_HEALTH_TARGET="unix://${FL_SIDECAR_SOCKET:-/run/fl-sidecar/sidecar.sock}" \
    exec python - <<'PY'
import os
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
channel = grpc.insecure_channel(os.environ["FL_SIDECAR_HEALTH_TARGET"])
try:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
except grpc.RpcError:
    sys.exit(1)
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
    ;;
  *)
    exec fl-sidecar "$@"
    ;;
esac
