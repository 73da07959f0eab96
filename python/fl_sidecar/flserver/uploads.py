"""Model uploads: streamed ``multipart/form-data`` bodies, packed with zstd when it pays.

The body is sent from the file with a known ``Content-Length`` (a packed body
from a temp file in ``spool_dir``). It is packed only when the server
accepts zstd (:mod:`fl_sidecar.flserver.coding`) and samples of the model
shrink enough; a 415 is a certain non-arrival, answered by sending the same
body in identity. An upload changes the server's state, so it is never resent
once its body may have arrived (:mod:`fl_sidecar.flserver.transport`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from fl_sidecar import redaction
from fl_sidecar.cancel import Cancellation
from fl_sidecar.flserver.bodies import (
    FileSlice,
    StreamBody,
    json_or_empty,
    multipart_parts,
    unlink_quietly,
)
from fl_sidecar.flserver.coding import ZSTD, codec
from fl_sidecar.flserver.credentials import Credentials
from fl_sidecar.flserver.failures import cancelled
from fl_sidecar.flserver.results import BodyCallback, ProgressCallback, TransferResult
from fl_sidecar.flserver.transport import Transport

if TYPE_CHECKING:
    import requests

__all__ = ["ModelUploads"]

_log = logging.getLogger(__name__)

_SAMPLE_SIZE = 256 * 1024  # bytes per sample when estimating an upload's compressibility
_PACK_READ = 8 * 1024 * 1024  # bytes per read when packing: the codec's threads get work


class ModelUploads(Transport):
    """The upload half of the client's model transfers (a base class).

    The client's constructor sets these attributes.
    """

    compression: str
    level: Optional[int]
    chunk_size: Optional[int]
    threads: int
    spool_dir: Optional[Path]
    min_upload_saving: float

    def _worth_packing(self, source: Path) -> bool:
        """Whether samples of ``source`` shrink by at least ``min_upload_saving``.

        Packing is serial with sending (the body needs its length first), and the
        server decodes before it parses: measured at 100 Mbit/s, an fp32 MiniLM
        (9% saving) went up 4% slower with zstd, a bf16 one (22%) 12% faster.
        """
        if self.min_upload_saving <= 0:
            return True
        size = source.stat().st_size
        # Eight samples centred in eighths of the file: the start of a torch archive is
        # its (very compressible) pickle, which would flatter the estimate.
        count, sample = 8, _SAMPLE_SIZE
        if size <= count * sample:
            count, sample = 1, size
        raw = packed = 0
        with open(source, "rb") as fh:
            for i in range(count):
                fh.seek(max(0, (2 * i + 1) * size // (2 * count) - sample // 2))
                block = fh.read(sample)
                raw += len(block)
                packed += len(codec().pack(block, **self._codec_args(threads=True)))
        return raw == 0 or packed <= raw * (1.0 - self.min_upload_saving)

    def _codec_args(self, *, threads: bool) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"threads": self.threads} if threads else {}
        if self.level is not None:
            kwargs["level"] = self.level
        if self.chunk_size is not None:
            kwargs["chunk_size"] = self.chunk_size
        return kwargs

    def _upload_file(
        self,
        operation: str,
        path: str,
        fields: Sequence[Tuple[str, str]],
        source: Path,
        credentials: Optional[Credentials],
        progress: Optional[ProgressCallback],
        *,
        sha256: Optional[str] = None,
        cancel: Optional[Cancellation] = None,
        on_body_complete: Optional[BodyCallback] = None,
    ) -> TransferResult:
        """POST ``fields`` and the file ``source`` as ``multipart/form-data`` to ``path``.

        Packed with zstd when the coding and the model allow it; a 415 sends the
        same body again in identity (the only resend: a 415 stored nothing).
        """
        started = time.monotonic()
        if not source.is_file():
            raise FileNotFoundError(f"no such model file: {source}")
        boundary = "fl-sidecar-" + uuid.uuid4().hex
        parts = multipart_parts(fields, "model_file", source, boundary)
        content_type = f"multipart/form-data; boundary={boundary}"
        raw_model = source.stat().st_size
        coding = self._coding.upload_coding(self.compression)
        if coding == ZSTD and (self.compression == "always" or self._worth_packing(source)):
            spooled, digest = self._pack_body(
                parts, hash_file=sha256 is None, cancel=cancel, operation=operation
            )
            try:
                resp, wire, _ = self._send_body(
                    operation,
                    path,
                    [FileSlice(spooled, spooled.stat().st_size)],
                    {"Content-Type": content_type, "Content-Encoding": "zstd"},
                    credentials,
                    progress,
                    passthrough=frozenset({415}),
                    hash_file=False,  # the packed body's digest is of no use
                    cancel=cancel,
                    on_body_complete=on_body_complete,
                )
            finally:
                unlink_quietly(spooled)
            if resp.status_code != 415:
                return self._upload_result(resp, raw_model, "zstd", started, sha256 or digest, wire)
            # A 415 is a certain non-arrival: the coding was refused, nothing was stored.
            resp.close()
            _log.info("%s: the server refused zstd (415); using identity from now on", operation)
            self._coding.refuse_zstd()
        resp, wire, digest = self._send_body(
            operation,
            path,
            parts,
            {"Content-Type": content_type},
            credentials,
            progress,
            hash_file=sha256 is None,
            cancel=cancel,
            on_body_complete=on_body_complete,
        )
        return self._upload_result(resp, raw_model, "identity", started, sha256 or digest, wire)

    def _send_body(
        self,
        operation: str,
        path: str,
        parts: Sequence[Union[bytes, FileSlice]],
        headers: Mapping[str, str],
        credentials: Optional[Credentials],
        progress: Optional[ProgressCallback],
        *,
        passthrough: frozenset[int] = frozenset(),
        hash_file: bool = True,
        cancel: Optional[Cancellation] = None,
        on_body_complete: Optional[BodyCallback] = None,
    ) -> Tuple[requests.Response, int, str]:
        """POST a streamed body; returns the answer, the wire length and the file parts' sha256.

        With ``hash_file=False`` the digest is ``""`` (and costs no CPU).
        """
        last: Dict[str, Any] = {}

        def attempt() -> requests.Response:
            hasher = hashlib.sha256()
            body = StreamBody(
                parts,
                progress,
                hasher.update if hash_file else None,
                cancel=cancel,
                on_complete=on_body_complete,
                operation=operation,
            )
            last["body"], last["hasher"] = body, hasher
            return self._attempt(
                "POST",
                path,
                operation=operation,
                idempotent=False,
                data=body,
                headers=headers,
                credentials=credentials,
                passthrough=passthrough,
                cancel=cancel,
            )

        resp = self._with_retries(operation, attempt, cancel)
        digest = str(last["hasher"].hexdigest()) if hash_file else ""
        return resp, int(last["body"].length), digest

    def _pack_body(
        self,
        parts: Sequence[Union[bytes, FileSlice]],
        *,
        hash_file: bool = True,
        cancel: Optional[Cancellation] = None,
        operation: str = "upload",
    ) -> Tuple[Path, str]:
        """Pack the whole multipart body into a temp file; returns it and the model's sha256.

        With ``hash_file=False`` the digest is ``""``. A cancelled ``cancel`` stops it
        between 8 MiB blocks (TransferCancelledError; nothing was sent).
        """
        packer = codec().Packer(**self._codec_args(threads=True))
        hasher = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix="fl-sidecar-upload-", suffix=".zst", dir=self.spool_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    if isinstance(part, FileSlice):
                        for block in part.chunks(_PACK_READ):
                            if cancel is not None and cancel.is_set():
                                raise cancelled(
                                    cancel, operation, "stopped while packing: nothing was sent"
                                )
                            if hash_file:
                                hasher.update(block)
                            out.write(packer.write(block))
                    else:
                        out.write(packer.write(part))
                out.write(packer.finish())
        except BaseException:
            unlink_quietly(path)
            raise
        return path, hasher.hexdigest() if hash_file else ""

    def _upload_result(
        self,
        resp: requests.Response,
        raw_model: int,
        coding: str,
        started: float,
        digest: str,
        wire: int,
    ) -> TransferResult:
        payload = json_or_empty(resp)
        return TransferResult(
            status=resp.status_code,
            detail=redaction.redact(str(payload.get("detail", ""))),
            raw_bytes=raw_model,
            wire_bytes=wire,
            content_encoding=coding,
            seconds=time.monotonic() - started,
            sha256=digest,
            response=payload,
        )
