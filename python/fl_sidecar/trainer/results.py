"""What the trainer's calls return: plain frozen dataclasses (sizes in bytes, times in seconds)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

__all__ = [
    "DownloadResult",
    "MetricsResult",
    "PackResult",
    "SidecarInfo",
    "TrainingStatus",
    "UnpackResult",
    "UploadResult",
    "UploadStatus",
]


@dataclass(frozen=True)
class SidecarInfo:
    """What ``GetInfo`` reports (sizes in bytes)."""

    version: str
    codec: str
    codec_level: int
    codec_chunk_size: int
    server_url: str
    negotiated_coding: str
    notification_url: str
    max_message_size: int
    trusts_pickles: bool


@dataclass(frozen=True)
class DownloadResult:
    """Facts of a downloaded model.

    Attributes:
        model_id: the global model's id.
        format: ``"torch"`` or ``"safetensors"``.
        size: bytes delivered to the trainer.
        sha256: hex digest of those bytes (computed and checked by the client unless
            it was created with ``verify=False``; then as the sidecar announced it).
        content_encoding: how the model crossed the network, ``"zstd"`` or ``"identity"``.
        wire_bytes: bytes that took on the network.
    """

    model_id: str
    format: str
    size: int
    sha256: str
    content_encoding: str
    wire_bytes: int


@dataclass(frozen=True)
class UploadResult:
    """The FL server's answer to an upload, with the transfer's sizes (bytes) and time (s)."""

    http_status: int
    detail: str
    raw_bytes: int
    wire_bytes: int
    content_encoding: str
    seconds: float
    upload_id: str = ""


@dataclass(frozen=True)
class UploadStatus:
    """What became of an upload (:meth:`SidecarClient.get_upload`).

    Attributes:
        upload_id: the upload's id.
        state: ``"not_sent"`` (nothing reached the FL server: safe to send again),
            ``"sending"``, ``"accepted"``, ``"rejected"`` (refused, nothing stored) or
            ``"unknown"`` (the whole request went out, no answer came: it may have arrived).
        http_status: the FL server's answer; 0 when none came.
        detail: the server's message, or why the state is what it is.
        model_id, round: what it was uploaded for.
        updated_at: unix time of the last change, seconds.
    """

    upload_id: str
    state: str
    http_status: int
    detail: str
    model_id: str
    round: int
    updated_at: float


@dataclass(frozen=True)
class MetricsResult:
    """The FL server's answer to a metrics upload."""

    http_status: int
    detail: str


@dataclass(frozen=True)
class TrainingStatus:
    """A training's state: ``state`` is I (initial), O (ongoing), C (completed) or E (error)."""

    state: str
    data: Dict[str, Any]


@dataclass(frozen=True)
class PackResult:
    """Sizes (bytes) and frame count of a pack, and its format.

    Attributes:
        frames: zstd frames; 0 for a tensor blob.
        format: ``"zstd"`` (the zstd seekable format) or ``"tensor"`` (the tensor codec).
        reference_sha256: hex SHA-256 of the reference model the blob was coded
            against (unpacking needs it); ``""`` when it needs none.
    """

    raw_bytes: int
    packed_bytes: int
    frames: int
    format: str = "zstd"
    reference_sha256: str = ""


@dataclass(frozen=True)
class UnpackResult:
    """Sizes (bytes) of an unpack, what the input was, and the reference it needed.

    Attributes:
        format: ``"zstd"`` or ``"tensor"``.
        reference_sha256: hex SHA-256 of the reference the blob was decoded against;
            ``""`` when it needed none.
    """

    packed_bytes: int
    raw_bytes: int
    format: str = "zstd"
    reference_sha256: str = ""
