"""Pack and unpack through the sidecar: the zstd codec runs there, bytes stream both ways."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, List, Optional

from fl_sidecar.errors import SidecarError
from fl_sidecar.trainer.connection import SidecarConnection
from fl_sidecar.trainer.results import PackResult, UnpackResult
from fl_sidecar.trainer.streams import (
    Buffer,
    PathLike,
    ProgressCallback,
    RequestStream,
    read_chunks,
    slice_chunks,
    write_atomically,
)
from fl_sidecar.v1 import sidecar_pb2 as pb

__all__ = ["CodecCalls"]

_CODEC_REQUESTS = {"Pack": pb.PackRequest, "Unpack": pb.UnpackRequest}
"""The request message of each codec RPC, by its name."""


class CodecCalls(SidecarConnection):
    """The pack/unpack calls of :class:`~fl_sidecar.trainer.client.SidecarClient`."""

    def _codec_call(
        self,
        action: str,
        options: Any,
        chunks: Iterable[bytes],
        sink: Callable[[bytes], object],
        *,
        progress: Optional[ProgressCallback],
        total: int,
        timeout: Optional[float],
    ) -> Any:
        """Run Pack or Unpack: output chunks go to ``sink``; returns the closing summary."""
        request_type = _CODEC_REQUESTS[action]
        source = RequestStream(
            request_type(options=options),
            lambda chunk: request_type(chunk=chunk),
            chunks,
            progress=progress,
            total=total,
        )
        rpc = getattr(self._stub, action)
        summary = None
        try:
            for message in rpc(source, timeout=timeout):
                if message.WhichOneof("kind") == "chunk":
                    sink(message.chunk)
                else:
                    summary = message.summary
        except SidecarError:
            source.reraise()  # the trainer's own exception while streaming is the cause
            raise
        if summary is None:
            raise SidecarError(f"{action}: the stream ended without its summary", code="DATA_LOSS")
        return summary

    def _codec_bytes(
        self,
        action: str,
        options: Any,
        data: Buffer,
        timeout: Optional[float],
    ) -> bytes:
        out: List[bytes] = []
        view = memoryview(data).cast("B")
        chunks = slice_chunks(view, self.chunk_size)
        self._codec_call(
            action,
            options,
            chunks,
            out.append,
            progress=None,
            total=view.nbytes,
            timeout=timeout,
        )
        return b"".join(out)

    def _codec_file(
        self,
        action: str,
        options: Any,
        src: PathLike,
        dst: PathLike,
        progress: Optional[ProgressCallback],
        timeout: Optional[float],
    ) -> Any:
        total = os.path.getsize(src)
        with open(src, "rb") as f:
            chunks = read_chunks(f, self.chunk_size)
            return write_atomically(
                dst,
                lambda sink: self._codec_call(
                    action,
                    options,
                    chunks,
                    sink,
                    progress=progress,
                    total=total,
                    timeout=timeout,
                ),
            )

    def pack(
        self,
        data: Buffer,
        *,
        level: int = 0,
        chunk_size: int = 0,
        timeout: Optional[float] = None,
    ) -> bytes:
        """Pack bytes into the zstd seekable format in the sidecar (0 = the sidecar's defaults).

        Raises:
            SidecarError: ``INVALID_ARGUMENT`` for bad options, and transport failures.
        """
        options = pb.PackOptions(level=level, chunk_size=chunk_size)
        return self._codec_bytes("Pack", options, data, timeout)

    def unpack(
        self, blob: Buffer, *, max_output_size: int = 0, timeout: Optional[float] = None
    ) -> bytes:
        """Unpack any zstd stream in the sidecar; ``max_output_size`` bytes (0 = its default).

        Raises:
            SidecarError: ``DATA_LOSS`` for corrupt/truncated data,
                ``RESOURCE_EXHAUSTED`` past the size limit.
        """
        options = pb.UnpackOptions(max_output_size=max_output_size)
        return self._codec_bytes("Unpack", options, blob, timeout)

    def pack_file(
        self,
        src: PathLike,
        dst: PathLike,
        *,
        level: int = 0,
        chunk_size: int = 0,
        progress: Optional[ProgressCallback] = None,
        timeout: Optional[float] = None,
    ) -> PackResult:
        """Pack the file ``src`` into ``dst`` through the sidecar (``dst`` replaced atomically).

        Raises:
            OSError: a file cannot be read or written.
            SidecarError: as :meth:`pack`.
        """
        options = pb.PackOptions(level=level, chunk_size=chunk_size)
        summary = self._codec_file("Pack", options, src, dst, progress, timeout)
        return PackResult(summary.raw_bytes, summary.packed_bytes, summary.frames)

    def unpack_file(
        self,
        src: PathLike,
        dst: PathLike,
        *,
        max_output_size: int = 0,
        progress: Optional[ProgressCallback] = None,
        timeout: Optional[float] = None,
    ) -> UnpackResult:
        """Unpack the file ``src`` into ``dst`` through the sidecar (``dst`` replaced atomically).

        Raises:
            OSError: a file cannot be read or written.
            SidecarError: as :meth:`unpack`.
        """
        options = pb.UnpackOptions(max_output_size=max_output_size)
        summary = self._codec_file("Unpack", options, src, dst, progress, timeout)
        return UnpackResult(summary.packed_bytes, summary.raw_bytes)
