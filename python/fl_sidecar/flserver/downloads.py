"""Model downloads: streamed to a temp file beside the destination, decoded as they arrive.

A zstd body is decoded by the codec's streaming decoder while it is received
(urllib3 decodes nothing: the raw stream is read), hashed, and renamed into
place only when complete. Every size limit holds before a byte is written
whenever the size is declared, and as the bytes come otherwise.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Optional

from fl_sidecar.cancel import Cancellation
from fl_sidecar.errors import (
    ServerError,
    ServerUnavailableError,
    SizeLimitExceededError,
    TruncatedDataError,
)
from fl_sidecar.flserver.bodies import IO_CHUNK, unlink_quietly
from fl_sidecar.flserver.coding import codec
from fl_sidecar.flserver.failures import Retryable, cancelled, describe
from fl_sidecar.flserver.results import PartFileCallback, ProgressCallback, TransferResult
from fl_sidecar.flserver.transport import BODY_READ_ERRORS, Transport

if TYPE_CHECKING:
    import requests

__all__ = ["DEFAULT_MAX_DOWNLOAD_SIZE", "ModelDownloads"]

DEFAULT_MAX_DOWNLOAD_SIZE = 4 * 1024**3
"""Largest decoded download accepted by default, in bytes (4 GiB).

A zstd body can hide a bomb: what it decodes to is written to disk until this
limit stops it, so the default is what one model may reasonably be, not what
the disk holds.
"""

_DECODE_STEP = 4 * 1024 * 1024  # most bytes one decoding step may return (bombs)


def _max_wire(limit: int) -> int:
    """The longest zstd body that can decode to at most ``limit`` bytes (bytes).

    zstd's worst case for incompressible input is 1/256 more plus frame headers;
    twice that is allowed.
    """
    return limit + limit // 128 + 64 * 1024


def _over_limit(operation: str, limit: int, why: str) -> SizeLimitExceededError:
    """The error for a download over ``max_download_size``: a limit reached, not corruption."""
    return SizeLimitExceededError(
        f"{operation}: the model exceeds the download limit of {limit} bytes "
        f"(max_download_size; the sidecar's --max-model-size): {why}"
    )


class _DecodingSink:
    """Writes a download to a file as it arrives, decoding zstd on the fly.

    Decoding while receiving overlaps the decoder with the network: decoding a
    spooled body afterwards (``codec.unpack_file``) added about 10% to a
    100 Mbit/s download of a 43 MB model. Memory stays bounded: each decoding
    step returns at most 4 MiB (``max_piece_size``), so a bomb cannot become one
    huge allocation under a large limit. Hashes the decoded bytes.
    """

    def __init__(
        self, out: IO[bytes], hasher: Any, coding: str, limit: int, operation: str
    ) -> None:
        self._out = out
        self._hasher = hasher
        self._limit = limit
        self._operation = operation
        self._unpacker = (
            codec().Unpacker(max_output_size=limit, max_piece_size=_DECODE_STEP)
            if coding == "zstd"
            else None
        )
        self.raw_bytes = 0

    def write(self, block: bytes) -> None:
        if self._unpacker is None:
            self._emit(block)
            return
        pieces = self._unpacker.write_iter(block)
        while True:
            try:
                # A frame whose header declares more than the rest of the limit is
                # refused here, before any of it is decoded or written.
                data = next(pieces, None)
            except SizeLimitExceededError as exc:
                raise _over_limit(
                    self._operation, self._limit, f"the zstd body decodes to more ({exc})"
                ) from None
            if data is None:
                return
            self._emit(data)

    def finish(self) -> None:
        if self._unpacker is not None:
            self._unpacker.finish()

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self.raw_bytes += len(data)
        if self.raw_bytes > self._limit:
            raise _over_limit(self._operation, self._limit, f"over {self._limit} bytes arrived")
        self._hasher.update(data)
        self._out.write(data)


class ModelDownloads(Transport):
    """The download half of the client's model transfers (a base class).

    ``max_download_size`` is set by the client's constructor.
    """

    max_download_size: int

    def _receive_model(
        self,
        resp: requests.Response,
        dest: Path,
        operation: str,
        progress: Optional[ProgressCallback],
        started: float,
        cancel: Optional[Cancellation] = None,
        on_part_file: Optional[PartFileCallback] = None,
    ) -> TransferResult:
        """Stream an answer's body into ``dest`` (via a temp file beside it), decoding zstd.

        Raises Retryable when the body broke off or ended short (the download may be
        repeated from the start), SizeLimitExceededError over ``max_download_size``.
        """
        coding = resp.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
        if coding not in ("identity", "zstd"):
            raise ServerError(
                f"{operation}: the server sent Content-Encoding {coding!r}, not asked for",
                status=resp.status_code,
                operation=operation,
            )
        total_header = resp.headers.get("Content-Length")
        total = int(total_header) if total_header and total_header.isdigit() else None
        limit = self.max_download_size
        # Refused before a byte is written whenever the size is declared: by the
        # Content-Length of an identity body, by a zstd body too long to decode to
        # less than the limit, and (in _DecodingSink) by each zstd frame's header.
        if total is not None and total > (limit if coding == "identity" else _max_wire(limit)):
            raise _over_limit(operation, limit, f"the server declares {total} bytes on the wire")
        dest.parent.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                if on_part_file is not None:
                    on_part_file(tmp, coding, total)
                sink = _DecodingSink(out, hasher, coding, self.max_download_size, operation)
                wire = self._copy_raw(resp, sink, total, progress, operation, cancel)
                try:
                    sink.finish()
                except TruncatedDataError:
                    # A body that stops mid-frame is a broken connection, not bad data.
                    raise Retryable(
                        ServerUnavailableError(
                            f"{operation}: the zstd body ended mid-stream after {wire} bytes",
                            operation=operation,
                        )
                    ) from None
            if total is not None and wire != total:
                raise Retryable(
                    ServerUnavailableError(
                        f"{operation}: the body ended after {wire} of {total} bytes",
                        operation=operation,
                    )
                )
            os.replace(tmp, dest)
        except BaseException:
            unlink_quietly(tmp)
            raise
        return TransferResult(
            status=resp.status_code,
            detail="",
            raw_bytes=sink.raw_bytes,
            wire_bytes=wire,
            content_encoding=coding,
            seconds=time.monotonic() - started,
            sha256=hasher.hexdigest(),
        )

    def _copy_raw(
        self,
        resp: requests.Response,
        sink: _DecodingSink,
        total: Optional[int],
        progress: Optional[ProgressCallback],
        operation: str,
        cancel: Optional[Cancellation] = None,
    ) -> int:
        """Feed the body as it is on the wire (urllib3 decodes nothing) into ``sink``."""
        wire = 0
        while True:
            if cancel is not None and cancel.is_set():
                raise cancelled(cancel, operation, f"stopped after {wire} bytes")
            try:
                block = resp.raw.read(IO_CHUNK, decode_content=False)
            except BODY_READ_ERRORS as exc:
                if cancel is not None and cancel.is_set():
                    raise cancelled(cancel, operation, f"stopped after {wire} bytes") from None
                raise Retryable(
                    ServerUnavailableError(
                        f"{operation}: the body broke off after {wire} bytes ({describe(exc)})",
                        operation=operation,
                    )
                ) from None
            if not block:
                if cancel is not None and cancel.is_set():
                    # A shut-down socket reads as the end of the body.
                    raise cancelled(cancel, operation, f"stopped after {wire} bytes")
                return wire
            wire += len(block)
            sink.write(block)
            if progress is not None:
                progress(wire, total)
