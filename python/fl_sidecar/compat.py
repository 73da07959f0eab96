"""The reference client's ``Communication``, through the sidecar, at its old import path.

The code lives in :mod:`fl_sidecar.trainer.compat` now; this module re-exports
its names, so ``from fl_sidecar.compat import Communication`` keeps working.
"""

from __future__ import annotations

from fl_sidecar.trainer.compat import (
    Communication,
    CommunicationException,
    MetricsUploadException,
    ModelDownloadException,
    ModelUploadException,
    ServerResponse,
    Settings,
    T,
    is_torchscript_instance,
)

__all__ = [
    "Communication",
    "CommunicationException",
    "MetricsUploadException",
    "ModelDownloadException",
    "ModelUploadException",
    "ServerResponse",
    "Settings",
    "T",
    "is_torchscript_instance",
]
