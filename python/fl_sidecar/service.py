"""Old import path of the gRPC servicer.

The code lives in :mod:`fl_sidecar.sidecar.servicer` now;
this module only re-exports its names,
so that existing imports keep working.
"""

from __future__ import annotations

from fl_sidecar.sidecar.servicer import (
    SERVICE_NAME,
    UPLOAD_ID_METADATA_KEY,
    UPLOAD_STATE_METADATA_KEY,
    SidecarService,
    error_trailers,
    status_for,
)

__all__ = [
    "SERVICE_NAME",
    "UPLOAD_ID_METADATA_KEY",
    "UPLOAD_STATE_METADATA_KEY",
    "SidecarService",
    "error_trailers",
    "status_for",
]
