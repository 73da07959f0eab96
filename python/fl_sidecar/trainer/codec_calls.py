"""Pack and unpack through the sidecar: the codec runs there, bytes stream both ways.

Packing is the zstd seekable format unless a reference model or ``format`` asks
for the tensor codec (docs/tensor-codec.md); unpacking reads either. A reference
is given as

- bytes, or a path of the trainer's: its bytes are streamed to the sidecar
  before the data (works wherever the sidecar runs);
- :class:`HeldModel`: the global model the sidecar holds for (model id, round),
  the TORCH archive it served or used that round (nothing is sent);
- :class:`SidecarFile`: a file on the sidecar's machine, with its SHA-256 (the
  sidecar uses it only when the digest matches).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, List, Optional, Tuple, Union

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

__all__ = ["PACK_FORMATS", "CodecCalls", "HeldModel", "ReferenceArg", "SidecarFile"]

_CODEC_REQUESTS = {"Pack": pb.PackRequest, "Unpack": pb.UnpackRequest}
"""The request message of each codec RPC, by its name."""

PACK_FORMATS = {
    "zstd": pb.PACK_FORMAT_ZSTD,
    "tensor": pb.PACK_FORMAT_TENSOR,
    "auto": pb.PACK_FORMAT_AUTO,
}
"""The ``format`` names :meth:`CodecCalls.pack` takes, as ``PackOptions.format``."""


@dataclass(frozen=True)
class HeldModel:
    """The global model the sidecar holds for ``model_id`` and ``round``, as a reference.

    That is the TORCH archive the FL server served for that round, which the
    sidecar keeps after a download for a round it knew (from the round start) or
    an upload's conversion; the two most recent ones. It is never fetched for this:
    a model the sidecar does not hold is ``FAILED_PRECONDITION``.

    Attributes:
        sha256: when given (hex), the held model must have this digest (else
            :class:`~fl_sidecar.errors.ReferenceMismatchError`), e.g. the one the
            download reported.
    """

    model_id: str
    round: int
    sha256: str = ""


@dataclass(frozen=True)
class SidecarFile:
    """A file on the sidecar's machine as a reference: nothing is sent but its path and digest.

    The sidecar reads the file at ``path`` (its own file system's, made absolute
    here) and uses it only when its bytes have ``sha256``; otherwise, or when it
    cannot read the file, the call fails with ``FAILED_PRECONDITION``.

    Attributes:
        sha256: hex SHA-256 of the file; ``""`` hashes ``path`` here first, which
            needs this process to see the same file at the same path.
    """

    path: PathLike
    sha256: str = ""


ReferenceArg = Union[Buffer, PathLike, HeldModel, SidecarFile, None]
"""A reference model for :meth:`CodecCalls.pack` and :meth:`CodecCalls.unpack`."""


class _ReferenceChunk(bytes):
    """A chunk of a streamed reference (sent as ``reference_chunk``), not of the data."""


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

        def wrap(chunk: bytes) -> Any:
            if isinstance(chunk, _ReferenceChunk):
                return request_type(reference_chunk=bytes(chunk))
            return request_type(chunk=chunk)

        source = RequestStream(
            request_type(options=options), wrap, chunks, progress=progress, total=total
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

    def _reference_stream(
        self, reference: ReferenceArg
    ) -> Tuple[Optional[pb.CodecReference], Iterable[bytes], int]:
        """The ``CodecReference`` of ``reference``, the chunks to stream and their bytes."""
        if reference is None:
            return None, (), 0
        if isinstance(reference, HeldModel):
            held = pb.CodecReference.HeldModel(
                model_id=str(reference.model_id), round=int(reference.round)
            )
            return pb.CodecReference(held=held, sha256=reference.sha256), (), 0
        if isinstance(reference, SidecarFile):
            path = os.path.abspath(os.fspath(reference.path))
            sha256 = reference.sha256 or _file_sha256(path)
            return pb.CodecReference(path=path, sha256=sha256), (), 0
        spec = pb.CodecReference(streamed=True)
        if isinstance(reference, (str, os.PathLike)):
            size = os.path.getsize(reference)
            return spec, _file_reference_chunks(reference, self.chunk_size), size
        view = memoryview(reference).cast("B")
        return (
            spec,
            (_ReferenceChunk(block) for block in slice_chunks(view, self.chunk_size)),
            view.nbytes,
        )

    def _codec_bytes(
        self,
        action: str,
        options: Any,
        data: Buffer,
        reference: ReferenceArg,
        timeout: Optional[float],
    ) -> bytes:
        out: List[bytes] = []
        view = memoryview(data).cast("B")
        spec, ref_chunks, ref_size = self._reference_stream(reference)
        if spec is not None:
            options.reference.CopyFrom(spec)
        self._codec_call(
            action,
            options,
            _chained(ref_chunks, slice_chunks(view, self.chunk_size)),
            out.append,
            progress=None,
            total=ref_size + view.nbytes,
            timeout=timeout,
        )
        return b"".join(out)

    def _codec_file(
        self,
        action: str,
        options: Any,
        src: PathLike,
        dst: PathLike,
        reference: ReferenceArg,
        progress: Optional[ProgressCallback],
        timeout: Optional[float],
    ) -> Any:
        total = os.path.getsize(src)
        spec, ref_chunks, ref_size = self._reference_stream(reference)
        if spec is not None:
            options.reference.CopyFrom(spec)
        with open(src, "rb") as f:
            chunks = _chained(ref_chunks, read_chunks(f, self.chunk_size))
            return write_atomically(
                dst,
                lambda sink: self._codec_call(
                    action,
                    options,
                    chunks,
                    sink,
                    progress=progress,
                    total=ref_size + total,
                    timeout=timeout,
                ),
            )

    def pack(
        self,
        data: Buffer,
        *,
        level: int = 0,
        chunk_size: int = 0,
        format: Optional[str] = None,
        reference: ReferenceArg = None,
        timeout: Optional[float] = None,
    ) -> bytes:
        """Pack bytes in the sidecar: the zstd seekable format, or a tensor blob.

        Args:
            level, chunk_size: 0 = the sidecar's defaults (``chunk_size``: zstd only).
            format: ``"zstd"``, ``"tensor"`` (``data`` must be a model file) or
                ``"auto"`` (tensor for a model file); None: tensor with a
                reference, zstd without.
            reference: the model ``data`` is coded against (see the module's
                docstring): bytes or a path (streamed), :class:`HeldModel` or
                :class:`SidecarFile`.

        Raises:
            ValueError: an unknown ``format``.
            OSError: a reference path cannot be read.
            SidecarError: ``INVALID_ARGUMENT`` for bad options (and for a tensor pack
                of something that is no model file), ``FAILED_PRECONDITION`` for a
                reference the sidecar does not have, and transport failures.
        """
        options = pb.PackOptions(level=level, chunk_size=chunk_size, format=_format(format))
        return self._codec_bytes("Pack", options, data, reference, timeout)

    def unpack(
        self,
        blob: Buffer,
        *,
        max_output_size: int = 0,
        reference: ReferenceArg = None,
        timeout: Optional[float] = None,
    ) -> bytes:
        """Unpack any zstd stream or a tensor blob in the sidecar; ``max_output_size`` bytes
        (0 = its default).

        Args:
            reference: the model a tensor blob was coded against (as for :meth:`pack`);
                a blob that needs none ignores it.

        Raises:
            SidecarError: ``DATA_LOSS`` for corrupt/truncated data,
                ``RESOURCE_EXHAUSTED`` past the size limit, ``FAILED_PRECONDITION``
                for a blob that needs another reference (also a
                :class:`~fl_sidecar.errors.ReferenceMismatchError`) or a reference
                the sidecar does not have.
        """
        options = pb.UnpackOptions(max_output_size=max_output_size)
        return self._codec_bytes("Unpack", options, blob, reference, timeout)

    def pack_file(
        self,
        src: PathLike,
        dst: PathLike,
        *,
        level: int = 0,
        chunk_size: int = 0,
        format: Optional[str] = None,
        reference: ReferenceArg = None,
        progress: Optional[ProgressCallback] = None,
        timeout: Optional[float] = None,
    ) -> PackResult:
        """Pack the file ``src`` into ``dst`` through the sidecar (``dst`` replaced atomically).

        ``progress`` counts the bytes sent, a streamed reference's included.

        Raises:
            OSError: a file cannot be read or written.
            ValueError, SidecarError: as :meth:`pack`.
        """
        options = pb.PackOptions(level=level, chunk_size=chunk_size, format=_format(format))
        summary = self._codec_file("Pack", options, src, dst, reference, progress, timeout)
        return PackResult(
            summary.raw_bytes,
            summary.packed_bytes,
            summary.frames,
            summary.format or "zstd",
            summary.reference_sha256,
        )

    def unpack_file(
        self,
        src: PathLike,
        dst: PathLike,
        *,
        max_output_size: int = 0,
        reference: ReferenceArg = None,
        progress: Optional[ProgressCallback] = None,
        timeout: Optional[float] = None,
    ) -> UnpackResult:
        """Unpack the file ``src`` into ``dst`` through the sidecar (``dst`` replaced atomically).

        Raises:
            OSError: a file cannot be read or written.
            SidecarError: as :meth:`unpack`.
        """
        options = pb.UnpackOptions(max_output_size=max_output_size)
        summary = self._codec_file("Unpack", options, src, dst, reference, progress, timeout)
        return UnpackResult(
            summary.packed_bytes,
            summary.raw_bytes,
            summary.format or "zstd",
            summary.reference_sha256,
        )


def _format(name: Optional[str]) -> pb.PackFormat.ValueType:
    if name is None:
        return pb.PACK_FORMAT_UNSPECIFIED
    try:
        return PACK_FORMATS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown pack format {name!r}; choose from {', '.join(PACK_FORMATS)}"
        ) from None


def _file_reference_chunks(path: PathLike, size: int) -> Iterator[bytes]:
    with open(path, "rb") as f:
        for block in read_chunks(f, size):
            yield _ReferenceChunk(block)


def _chained(first: Iterable[bytes], second: Iterable[bytes]) -> Iterator[bytes]:
    yield from first
    yield from second


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()
