"""The trainer's client of the sidecar, at its old import path.

The code lives in :mod:`fl_sidecar.trainer` now (:mod:`fl_sidecar.trainer.client`
and its parts); this module re-exports its public names, so
``from fl_sidecar.client import SidecarClient`` keeps working.
"""

from __future__ import annotations

from fl_sidecar.trainer.client import (
    DEFAULT_CHUNK_SIZE,
    MAX_MESSAGE_SIZE,
    SOCKET_OWNER_VARIABLE,
    TOKEN_METADATA_KEY,
    CallCredentials,
    DownloadResult,
    EventStream,
    HeldModel,
    MetricsResult,
    PackResult,
    SidecarClient,
    SidecarFile,
    SidecarInfo,
    TrainingStatus,
    UnpackResult,
    UploadResult,
    UploadStatus,
    default_target,
    normalize_target,
    unix_socket_path,
)
from fl_sidecar.trainer.streams import Buffer, MetricsArg, PathLike, ProgressCallback

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_MESSAGE_SIZE",
    "SOCKET_OWNER_VARIABLE",
    "TOKEN_METADATA_KEY",
    "Buffer",
    "CallCredentials",
    "DownloadResult",
    "EventStream",
    "HeldModel",
    "MetricsArg",
    "MetricsResult",
    "PackResult",
    "PathLike",
    "ProgressCallback",
    "SidecarClient",
    "SidecarFile",
    "SidecarInfo",
    "TrainingStatus",
    "UnpackResult",
    "UploadResult",
    "UploadStatus",
    "default_target",
    "normalize_target",
    "unix_socket_path",
]
