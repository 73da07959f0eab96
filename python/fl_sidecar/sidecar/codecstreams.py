"""Pack and Unpack as streams of messages: the codec's side of the servicer.

Output is gathered into messages of 1-4 MiB (fewer, larger messages are
cheaper; none over :data:`~fl_sidecar.wire.MAX_CHUNK_SIZE`), and Unpack decodes
in bounded steps, so that neither call holds more than a few MiB whatever the
stream's size. The codec is imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterator, List, Tuple

from fl_sidecar.errors import SidecarError
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.wire import MAX_CHUNK_SIZE

__all__ = ["MAX_PACK_CHUNK_SIZE", "codec_defaults", "pack_stream", "unpack_stream"]

_MIN_OUTPUT_MESSAGE = 1024 * 1024  # bytes gathered at least per output message
MAX_PACK_CHUNK_SIZE = 8 * 1024 * 1024
"""Bytes: the largest ``PackOptions.chunk_size`` (input bytes per zstd frame) accepted."""

_UNPACK_PIECE = 4 * 1024 * 1024
"""Most bytes one Unpack decoding step may produce (bytes).

A decompression bomb turns a few bytes into gigabytes (zstd RLE blocks reach
about 32000:1), even hidden behind ordinary data; the codec's bounded decoder
stops at this many bytes per step and decodes on only as the stream is read,
so one Unpack call holds about one piece, one frame window and one message.
"""


def _bounded_unpacker(limit: int) -> Any:
    """A streaming decoder that refuses more than ``limit`` bytes in all, 4 MiB per step."""
    return _codec_module().Unpacker(max_output_size=limit, max_piece_size=_UNPACK_PIECE)


def _codec_module() -> Any:
    return importlib.import_module("fl_sidecar.codec")


def _split(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), MAX_CHUNK_SIZE):
        yield bytes(view[start : start + MAX_CHUNK_SIZE])


class _OutputBuffer:
    """Gathers produced bytes into messages of 1-4 MiB."""

    def __init__(self) -> None:
        self._parts: List[bytes] = []
        self._size = 0
        self.total = 0

    def add(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        self._parts.append(data)
        self._size += len(data)
        self.total += len(data)
        if self._size >= _MIN_OUTPUT_MESSAGE:
            yield from self.flush()

    def flush(self) -> Iterator[bytes]:
        if not self._parts:
            return
        joined = b"".join(self._parts)
        self._parts, self._size = [], 0
        yield from _split(joined)


def codec_defaults() -> Tuple[int, int]:
    """The codec's default (level, input bytes per frame); ``(0, 0)`` without the codec."""
    try:
        codec = _codec_module()
    except ImportError:
        return 0, 0
    return int(codec.DEFAULT_LEVEL), int(codec.DEFAULT_CHUNK_SIZE)


def pack_stream(messages: Iterator[pb.PackRequest]) -> Iterator[pb.PackResponse]:
    """Pack the streamed chunks; yield packed bytes as they are produced, then a summary.

    Raises:
        SidecarError: INVALID_ARGUMENT for options that are not first or are out of
        range (``chunk_size`` over 8 MiB, a level the codec refuses).
    """
    codec = _codec_module()
    level, chunk_size = int(codec.DEFAULT_LEVEL), int(codec.DEFAULT_CHUNK_SIZE)
    packer: Any = None
    raw = 0
    output = _OutputBuffer()
    for index, message in enumerate(messages):
        kind = message.WhichOneof("kind")
        if kind == "options":
            if index != 0:
                raise _invalid("Pack options must be the first message")
            if message.options.level:
                level = message.options.level
            if message.options.chunk_size:
                chunk_size = message.options.chunk_size
            if chunk_size > MAX_PACK_CHUNK_SIZE:
                raise _invalid(
                    f"chunk_size {chunk_size} exceeds the maximum of {MAX_PACK_CHUNK_SIZE} bytes"
                )
            continue
        if kind != "chunk":
            continue
        if packer is None:
            packer = _new_packer(codec, level, chunk_size)
        raw += len(message.chunk)
        for block in output.add(packer.write(message.chunk)):
            yield pb.PackResponse(chunk=block)
    if packer is None:
        packer = _new_packer(codec, level, chunk_size)
    for block in output.add(packer.finish()):
        yield pb.PackResponse(chunk=block)
    for block in output.flush():
        yield pb.PackResponse(chunk=block)
    stats = packer.stats
    yield pb.PackResponse(
        summary=pb.PackSummary(raw_bytes=raw, packed_bytes=output.total, frames=stats.frames)
    )


def unpack_stream(
    messages: Iterator[pb.UnpackRequest], max_output_size: int
) -> Iterator[pb.UnpackResponse]:
    """Unpack a zstd stream; yield the original bytes as they are produced, then a summary.

    Args:
        messages: the request messages (optional options first, then chunks).
        max_output_size: the most bytes produced in all; the trainer's
            ``max_output_size`` may lower it, never raise it.

    Raises:
        SidecarError: INVALID_ARGUMENT for options that are not first.
        SizeLimitExceededError: more than the limit would be produced.
        CodecError / CorruptDataError: the stream is not valid zstd.
    """
    limit = max_output_size
    unpacker: Any = None
    packed = 0
    output = _OutputBuffer()
    for index, message in enumerate(messages):
        kind = message.WhichOneof("kind")
        if kind == "options":
            if index != 0:
                raise _invalid("Unpack options must be the first message")
            if message.options.max_output_size:
                # The sidecar's --max-model-size is the ceiling: a trainer may only
                # ask for less, never lift it.
                limit = min(limit, message.options.max_output_size)
            continue
        if kind != "chunk":
            continue
        if unpacker is None:
            unpacker = _bounded_unpacker(limit)
        packed += len(message.chunk)
        for produced in unpacker.write_iter(message.chunk):
            for block in output.add(produced):
                yield pb.UnpackResponse(chunk=block)
    if unpacker is None:
        unpacker = _bounded_unpacker(limit)
    unpacker.finish()
    for block in output.flush():
        yield pb.UnpackResponse(chunk=block)
    yield pb.UnpackResponse(summary=pb.UnpackSummary(packed_bytes=packed, raw_bytes=output.total))


def _new_packer(codec: Any, level: int, chunk_size: int) -> Any:
    try:
        return codec.Packer(level=level, chunk_size=chunk_size)
    except (ValueError, TypeError) as exc:
        raise _invalid(f"invalid pack options: {exc}") from None


def _invalid(message: str) -> SidecarError:
    return SidecarError(message, code="INVALID_ARGUMENT")
