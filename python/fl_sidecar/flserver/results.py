"""What the FL server client's calls return, and the value and callback types they take."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Union

__all__ = [
    "BodyCallback",
    "MetricValue",
    "PartFileCallback",
    "PathLike",
    "ProgressCallback",
    "TransferResult",
]

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[int, Optional[int]], None]
"""``progress(bytes_done, bytes_total_or_None)``: bytes on the wire for this transfer."""
PartFileCallback = Callable[[Path, str, Optional[int]], None]
"""``on_part_file(part_file, coding, wire_total_or_None)``: a download's body begins.

Called once per attempt (a retry starts a new part file), before a byte of the body
is written to ``part_file``; the file holds the decoded bytes as they arrive and is
renamed to the destination when complete (an open descriptor keeps reading it).
"""
MetricValue = Union[float, str]
"""A metric's value: a number (posted as its shortest round-trip form) or text (posted as is)."""
BodyCallback = Callable[[], None]
"""Called once, just before the last byte of an upload's body is handed to the socket."""


@dataclass
class TransferResult:
    """What one call moved.

    Attributes:
        status: the HTTP status of the final answer.
        detail: the server's message (``detail`` field), or ``""``.
        raw_bytes: bytes of the model (or request body) before any content coding.
        wire_bytes: bytes of the body as they crossed the network.
        content_encoding: ``"zstd"`` or ``"identity"``: the coding on the wire.
        seconds: wall time of the whole call, retries included.
        sha256: hex SHA-256 of the raw model bytes (``""`` for metrics).
        response: the server's JSON answer (empty when it sent none).
    """

    status: int
    detail: str
    raw_bytes: int
    wire_bytes: int
    content_encoding: str
    seconds: float
    sha256: str
    response: Optional[Dict[str, Any]] = None
