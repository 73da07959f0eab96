"""Old import path of the transfer layer behind the servicer.

The code lives in :mod:`fl_sidecar.sidecar.transfers` now;
this module only re-exports its names,
so that existing imports keep working.
"""

from __future__ import annotations

from fl_sidecar.sidecar.transfers import (
    FORMAT_SAFETENSORS,
    FORMAT_TORCH,
    SPOOL_PREFIX,
    DownloadCancelledError,
    DownloadHandoff,
    SpooledModel,
    TransferManager,
    UploadSpool,
    is_sha256_hex,
    raise_if_spool_full,
    remove_stale_spools,
    round_seconds,
    spool_space,
)

__all__ = [
    "FORMAT_SAFETENSORS",
    "FORMAT_TORCH",
    "SPOOL_PREFIX",
    "DownloadCancelledError",
    "DownloadHandoff",
    "SpooledModel",
    "TransferManager",
    "UploadSpool",
    "is_sha256_hex",
    "raise_if_spool_full",
    "remove_stale_spools",
    "round_seconds",
    "spool_space",
]
