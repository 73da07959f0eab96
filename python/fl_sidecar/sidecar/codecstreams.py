"""Pack and Unpack as streams of messages: the codec's side of the servicer.

Output is gathered into messages of 1-4 MiB (fewer, larger messages are
cheaper; none over :data:`~fl_sidecar.wire.MAX_CHUNK_SIZE`), and Unpack decodes
in bounded steps, so that neither call holds more than a few MiB whatever the
stream's size. The codec is imported on first use.

The zstd format streams. The tensor format (docs/tensor-codec.md) does not: its
input is spooled first (a private file of the spool directory, at most
``--max-model-size`` bytes), then packed in memory, or unpacked one block at a
time into a second spool file that is streamed back. A reference model
(:class:`~fl_sidecar.v1.sidecar_pb2.CodecReference`) comes from one of three
places: the global model the sidecar holds for (model id, round), the trainer's
stream (``reference_chunk`` messages, spooled), or a file on the sidecar's machine
that the trainer names with its SHA-256 (copied into the spool while it is hashed,
and used only when the digest matches, so a caller learns nothing of a file whose
bytes it does not already know). The codec maps only spool files and held archives,
private files nobody else writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import mmap
import os
import re
import stat
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, List, Optional, Tuple, Union

from fl_sidecar.errors import (
    ModelFormatError,
    ReferenceMismatchError,
    SidecarError,
    SizeLimitExceededError,
)
from fl_sidecar.sidecar.spool import spool_space, unlink_quietly
from fl_sidecar.sidecar.templates import Template, TemplateCache
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.wire import MAX_CHUNK_SIZE

__all__ = [
    "FORMAT_TENSOR",
    "FORMAT_ZSTD",
    "MAX_PACK_CHUNK_SIZE",
    "CodecResources",
    "codec_defaults",
    "pack_stream",
    "tensor_blob_limit",
    "unpack_stream",
]

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

FORMAT_ZSTD = "zstd"
"""``PackSummary.format`` / ``UnpackSummary.format`` of the zstd seekable format."""
FORMAT_TENSOR = "tensor"
"""``PackSummary.format`` / ``UnpackSummary.format`` of the tensor codec's format."""

_INDEX_ROOM = 32 * (1 << 20) + 64 * (1 << 22) + 56
"""Bytes: the largest index a tensor blob may have (2^20 segments, 2^22 blocks)."""

_READ_STEP = 1024 * 1024  # bytes read from a reference file per step
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def tensor_blob_limit(max_output_size: int) -> int:
    """Bytes: the largest tensor blob Unpack spools for an output of ``max_output_size``.

    The output, 1/64 of it for planes that zstd could not shrink, and the largest
    index the format allows: no honest blob is larger.
    """
    return max_output_size + max_output_size // 64 + _INDEX_ROOM


@dataclass(frozen=True)
class CodecResources:
    """What Pack and Unpack need beside their messages for the tensor format and references.

    Attributes:
        spool_dir: the sidecar's private spool directory (inputs and references go there).
        max_size: bytes: the most a spooled input, a reference or an output may have
            (``--max-model-size``).
        templates: the global models the sidecar holds (``CodecReference.held``).
    """

    spool_dir: Path
    max_size: int
    templates: Optional[TemplateCache] = None


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


# --- the messages -------------------------------------------------------------


def _options(messages: Iterator[Any]) -> Tuple[Any, Iterator[Any]]:
    """The options message (or None) and the messages after it."""
    first = next(messages, None)
    if first is None:
        return None, iter(())
    if first.WhichOneof("kind") == "options":
        return first.options, messages
    return None, itertools.chain([first], messages)


def _chunks(messages: Iterator[Any], call: str) -> Iterator[bytes]:
    """The data chunks; options or reference chunks among them are refused."""
    started = False
    for message in messages:
        kind = message.WhichOneof("kind")
        if kind == "chunk":
            started = True
            yield message.chunk
        elif kind == "options":
            raise _invalid(f"{call} options must be the first message")
        elif kind == "reference_chunk" and not started:
            raise _invalid(f"{call}: reference_chunk without reference.streamed")
        elif kind == "reference_chunk":
            raise _invalid(
                f"{call}: a reference_chunk after the first chunk (the reference's bytes "
                "go between the options and the first chunk)"
            )


def _peek(chunks: Iterator[bytes], size: int) -> Tuple[bytes, Iterator[bytes]]:
    """The first ``size`` bytes of the stream (fewer if it is shorter), and the whole stream."""
    taken: List[bytes] = []
    head = b""
    for chunk in chunks:
        taken.append(chunk)
        head += chunk[: size - len(head)]
        if len(head) >= size:
            break
    return head, itertools.chain(taken, chunks)


class _SpoolFile:
    """A private spool file (mode 0600) that counts, optionally hashes, and stops at a limit."""

    def __init__(self, spool_dir: Path, limit: int, what: str, *, hashed: bool = False) -> None:
        self.path = spool_dir / f"{uuid.uuid4().hex}.codec"
        self.size = 0
        self._limit = limit
        self._what = what
        self._spool_dir = spool_dir
        self._hash = hashlib.sha256() if hashed else None
        with spool_space(spool_dir):
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file: Optional[IO[bytes]] = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        if self._file is None:
            raise ValueError("the spool file is closed")
        if self.size + len(data) > self._limit:
            raise SizeLimitExceededError(
                f"{self._what} exceeds the sidecar's limit of {self._limit} bytes"
            )
        with spool_space(self._spool_dir):
            self._file.write(data)
        if self._hash is not None:
            self._hash.update(data)
        self.size += len(data)

    def close(self) -> str:
        """Close the file; returns the hex SHA-256 of its bytes ("" unless hashed)."""
        if self._file is not None:
            file, self._file = self._file, None
            with spool_space(self._spool_dir):
                file.close()
        return self._hash.hexdigest() if self._hash is not None else ""

    def discard(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):
                file.close()
        unlink_quietly(self.path)


class _Mapped:
    """A private file mapped read-only (an empty one is ``b""``); :meth:`close` unmaps it."""

    def __init__(self, path: Path) -> None:
        self._map: Optional[mmap.mmap] = None
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    @property
    def buffer(self) -> Union[bytes, mmap.mmap]:
        return b"" if self._map is None else self._map

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(BufferError):  # a view still alive: the GC unmaps it
                self._map.close()
            self._map = None


class _Reference:
    """The reference of one call: checked up front, received or loaded, let go by :meth:`close`."""

    def __init__(self, spec: Optional[pb.CodecReference], resources: Optional[CodecResources]):
        self.source = "" if spec is None else (spec.WhichOneof("source") or "")
        self.expected = "" if spec is None else spec.sha256.lower()
        self.sha256 = ""
        self.size = 0
        self._spec = spec
        self._resources = resources
        self._spool: Optional[_SpoolFile] = None
        self._mapped: Optional[_Mapped] = None
        self._held: Optional[Tuple[Tuple[str, int], Template]] = None
        if spec is None:
            return
        if not self.source:
            raise _invalid("reference: give one of held, streamed or path")
        if self.expected and not _SHA256_HEX.fullmatch(self.expected):
            raise _invalid("reference.sha256 must be 64 hex digits")
        if resources is None:
            raise SidecarError("this sidecar takes no references", code="FAILED_PRECONDITION")
        if self.source == "held" and not spec.held.model_id:
            raise _invalid("reference.held.model_id is required")
        if self.source == "path":
            if not self.expected:
                raise _invalid(
                    "reference.path needs reference.sha256: the sidecar uses a file of its "
                    "own machine only when its bytes have the digest the caller gives"
                )
            if not os.path.isabs(spec.path) or "\0" in spec.path:
                raise _invalid("reference.path must be an absolute path")

    @property
    def given(self) -> bool:
        return bool(self.source)

    def receive(self, messages: Iterator[Any], call: str) -> Iterator[Any]:
        """Spool the streamed reference's chunks; returns the messages from the first chunk on."""
        for message in messages:
            kind = message.WhichOneof("kind")
            if kind == "reference_chunk":
                if self.source != "streamed":
                    raise _invalid(f"{call}: reference_chunk without reference.streamed")
                self._streamed().write(message.reference_chunk)
            elif kind == "options":
                raise _invalid(f"{call} options must be the first message")
            elif kind == "chunk":
                return itertools.chain([message], messages)
        return iter(())

    def buffer(self) -> Union[bytes, mmap.mmap]:
        """The reference's bytes, mapped (loaded on first use; checked against its sha256).

        Raises:
            SidecarError: FAILED_PRECONDITION: the held model is not held, or the
                file at the path does not have the digest given (or cannot be read).
            ReferenceMismatchError: a held or streamed reference whose sha256 is not
                the one given.
        """
        if self._mapped is None:
            self._mapped = _Mapped(self._load())
        return self._mapped.buffer

    def _streamed(self) -> _SpoolFile:
        if self._spool is None:
            assert self._resources is not None
            self._spool = _SpoolFile(
                self._resources.spool_dir, self._resources.max_size, "the reference", hashed=True
            )
        return self._spool

    def _load(self) -> Path:
        assert self._spec is not None and self._resources is not None
        if self.source == "held":
            return self._load_held(self._spec.held, self._resources)
        if self.source == "path":
            return self._load_path(self._spec.path, self._resources)
        spool = self._streamed()  # streamed: a reference of no bytes is one too
        self.sha256 = spool.close()
        self.size = spool.size
        self._check(self.sha256, "the streamed reference")
        return spool.path

    def _load_held(self, held: Any, resources: CodecResources) -> Path:
        key = (held.model_id, int(held.round))
        template = resources.templates.lookup(key) if resources.templates is not None else None
        if template is None:
            raise SidecarError(
                f"this sidecar holds no global model {held.model_id} for round {held.round} "
                "(it keeps the archive of a round it downloaded or uploaded for, the two "
                "most recent ones); stream the reference instead",
                code="FAILED_PRECONDITION",
            )
        self._held = (key, template)
        facts = template.facts
        self.sha256 = facts.sha256 if facts is not None else _file_sha256(template.path)
        self.size = template.path.stat().st_size
        self._check(self.sha256, f"the global model held for round {held.round}")
        return template.path

    def _load_path(self, path: str, resources: CodecResources) -> Path:
        refused = SidecarError(
            f"reference.path: the sidecar has no readable regular file of at most "
            f"{resources.max_size} bytes with SHA-256 {self.expected} at {path} "
            "(missing, unreadable, too large, or other bytes)",
            code="FAILED_PRECONDITION",
        )
        spool = _SpoolFile(resources.spool_dir, resources.max_size, "the reference", hashed=True)
        self._spool = spool
        try:
            # O_NONBLOCK: a FIFO put at the path must not hang the call.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except (OSError, ValueError):
            raise refused from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > resources.max_size:
                raise refused
            while True:
                try:
                    block = os.read(fd, _READ_STEP)
                except OSError:
                    raise refused from None
                if not block:
                    break
                try:
                    spool.write(block)
                except SizeLimitExceededError:
                    raise refused from None  # it grew while read
        finally:
            os.close(fd)
        self.sha256 = spool.close()
        self.size = spool.size
        if self.sha256 != self.expected:
            raise refused
        return spool.path

    def _check(self, actual: str, what: str) -> None:
        if self.expected and actual != self.expected:
            raise ReferenceMismatchError(
                f"{what} has SHA-256 {actual}, not the {self.expected} given"
            )

    def close(self) -> None:
        if self._mapped is not None:
            self._mapped.close()
            self._mapped = None
        if self._spool is not None:
            self._spool.discard()
            self._spool = None
        if self._held is not None:
            key, template = self._held
            self._held = None
            assert self._resources is not None and self._resources.templates is not None
            self._resources.templates.release(key, template)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_STEP), b""):
            digest.update(block)
    return digest.hexdigest()


# --- Pack ---------------------------------------------------------------------


def pack_stream(
    messages: Iterator[pb.PackRequest], resources: Optional[CodecResources] = None
) -> Iterator[pb.PackResponse]:
    """Pack the streamed chunks; yield packed bytes as they are produced, then a summary.

    The zstd format streams; the tensor format (``PackOptions.format``, or a
    reference) spools the input into ``resources.spool_dir`` first.

    Raises:
        SidecarError: INVALID_ARGUMENT for options that are not first or are out of
            range (``chunk_size`` over 8 MiB, a level the codec refuses, a zstd pack
            with a reference, a malformed reference); FAILED_PRECONDITION for a
            reference the sidecar does not have.
        ModelFormatError: the tensor format, and the input or reference is no model.
        ReferenceMismatchError: the reference's sha256 is not the one given.
        SizeLimitExceededError: a tensor pack's input or reference over ``max_size``.
    """
    codec = _codec_module()
    options, rest = _options(iter(messages))
    level, chunk_size = 0, 0
    fmt = pb.PACK_FORMAT_UNSPECIFIED
    spec: Optional[pb.CodecReference] = None
    if options is not None:
        level, chunk_size, fmt = options.level, options.chunk_size, options.format
        if options.HasField("reference"):
            spec = options.reference
        if chunk_size > MAX_PACK_CHUNK_SIZE:
            raise _invalid(
                f"chunk_size {chunk_size} exceeds the maximum of {MAX_PACK_CHUNK_SIZE} bytes"
            )
    if fmt not in (
        pb.PACK_FORMAT_UNSPECIFIED,
        pb.PACK_FORMAT_ZSTD,
        pb.PACK_FORMAT_TENSOR,
        pb.PACK_FORMAT_AUTO,
    ):
        raise _invalid(f"unknown PackOptions.format {fmt}")
    if fmt == pb.PACK_FORMAT_ZSTD and spec is not None:
        raise _invalid("a reference needs PACK_FORMAT_TENSOR (or AUTO), not PACK_FORMAT_ZSTD")
    if fmt == pb.PACK_FORMAT_UNSPECIFIED:
        fmt = pb.PACK_FORMAT_ZSTD if spec is None else pb.PACK_FORMAT_TENSOR
    if fmt == pb.PACK_FORMAT_ZSTD:
        yield from _pack_zstd(codec, _chunks(rest, "Pack"), level, chunk_size)
        return
    if resources is None:
        raise SidecarError("this sidecar packs only zstd", code="FAILED_PRECONDITION")
    if level and not codec.MIN_LEVEL <= level <= codec.MAX_LEVEL:
        raise _invalid(f"level {level} is outside {codec.MIN_LEVEL}..{codec.MAX_LEVEL}")
    reference = _Reference(spec, resources)
    data = _SpoolFile(resources.spool_dir, resources.max_size, "the input")
    try:
        rest = reference.receive(rest, "Pack")
        for chunk in _chunks(rest, "Pack"):
            data.write(chunk)
        data.close()
        packed = _pack_tensor_file(codec, data.path, reference, level, fmt == pb.PACK_FORMAT_AUTO)
        if packed is None:  # AUTO, and not a model: zstd from the spooled file
            with open(data.path, "rb") as f:
                file_chunks = iter(lambda: f.read(_READ_STEP), b"")
                yield from _pack_zstd(codec, file_chunks, level, chunk_size)
            return
        blob, uses_reference = packed
    finally:
        reference.close()
        data.discard()
    for block in _split(blob):
        yield pb.PackResponse(chunk=block)
    yield pb.PackResponse(
        summary=pb.PackSummary(
            raw_bytes=data.size,
            packed_bytes=len(blob),
            frames=0,
            format=FORMAT_TENSOR,
            reference_sha256=reference.sha256 if uses_reference else "",
        )
    )


def _pack_tensor_file(
    codec: Any, path: Path, reference: _Reference, level: int, auto: bool
) -> Optional[Tuple[bytes, bool]]:
    """The tensor blob of the spooled input and whether it uses the reference; None when
    ``auto`` and the input is no model file."""
    mapped = _Mapped(path)
    try:
        data = mapped.buffer
        try:
            layout = codec.layout_of(data)
        except ModelFormatError as exc:
            if auto:
                return None
            raise ModelFormatError(
                f"PACK_FORMAT_TENSOR needs a model file (safetensors or a torch archive): {exc}"
            ) from None
        ref_buffer = reference_layout = None
        if reference.given:
            ref_buffer = reference.buffer()
            try:
                reference_layout = codec.layout_of(ref_buffer)
            except ModelFormatError as exc:
                raise ModelFormatError(f"the reference is not a model file: {exc}") from None
        blob: bytes = codec.pack_tensors(
            data,
            layout,
            reference=ref_buffer,
            reference_layout=reference_layout,
            level=level or codec.DEFAULT_TENSOR_LEVEL,
        )
        return blob, bool(codec.tensor_info(blob).uses_reference)
    finally:
        mapped.close()


def _pack_zstd(
    codec: Any, chunks: Iterator[bytes], level: int, chunk_size: int
) -> Iterator[pb.PackResponse]:
    packer = _new_packer(codec, level or int(codec.DEFAULT_LEVEL), chunk_size or None)
    raw = 0
    output = _OutputBuffer()
    for chunk in chunks:
        raw += len(chunk)
        for block in output.add(packer.write(chunk)):
            yield pb.PackResponse(chunk=block)
    for block in output.add(packer.finish()):
        yield pb.PackResponse(chunk=block)
    for block in output.flush():
        yield pb.PackResponse(chunk=block)
    yield pb.PackResponse(
        summary=pb.PackSummary(
            raw_bytes=raw,
            packed_bytes=output.total,
            frames=packer.stats.frames,
            format=FORMAT_ZSTD,
        )
    )


# --- Unpack -------------------------------------------------------------------


def unpack_stream(
    messages: Iterator[pb.UnpackRequest],
    max_output_size: int,
    resources: Optional[CodecResources] = None,
) -> Iterator[pb.UnpackResponse]:
    """Unpack a zstd stream or a tensor blob; yield the original bytes, then a summary.

    Args:
        messages: the request messages (optional options first, then a streamed
            reference's chunks if any, then chunks).
        max_output_size: the most bytes produced in all; the trainer's
            ``max_output_size`` may lower it, never raise it.
        resources: the spool and held models, for tensor blobs and references.

    Raises:
        SidecarError: INVALID_ARGUMENT for options that are not first or a malformed
            reference; FAILED_PRECONDITION for a reference the sidecar does not have.
        SizeLimitExceededError: more than the limit would be produced.
        ReferenceMismatchError: a tensor blob that needs another reference (or one).
        CodecError / CorruptDataError: the stream is not valid zstd or a valid blob.
    """
    options, rest = _options(iter(messages))
    limit = max_output_size
    spec: Optional[pb.CodecReference] = None
    if options is not None:
        if options.max_output_size:
            # The sidecar's --max-model-size is the ceiling: a trainer may only
            # ask for less, never lift it.
            limit = min(limit, options.max_output_size)
        if options.HasField("reference"):
            spec = options.reference
    reference = _Reference(spec, resources)
    try:
        rest = reference.receive(rest, "Unpack")
        head, chunks = _peek(_chunks(rest, "Unpack"), 4)
        if _codec_module().is_tensor_blob(head):
            if resources is None:
                raise SidecarError("this sidecar unpacks only zstd", code="FAILED_PRECONDITION")
            yield from _unpack_tensor(chunks, limit, reference, resources)
        else:
            yield from _unpack_zstd(chunks, limit)
    finally:
        reference.close()


def _unpack_zstd(chunks: Iterator[bytes], limit: int) -> Iterator[pb.UnpackResponse]:
    unpacker = _bounded_unpacker(limit)
    packed = 0
    output = _OutputBuffer()
    for chunk in chunks:
        packed += len(chunk)
        for produced in unpacker.write_iter(chunk):
            for block in output.add(produced):
                yield pb.UnpackResponse(chunk=block)
    unpacker.finish()
    for block in output.flush():
        yield pb.UnpackResponse(chunk=block)
    yield pb.UnpackResponse(
        summary=pb.UnpackSummary(packed_bytes=packed, raw_bytes=output.total, format=FORMAT_ZSTD)
    )


def _unpack_tensor(
    chunks: Iterator[bytes], limit: int, reference: _Reference, resources: CodecResources
) -> Iterator[pb.UnpackResponse]:
    codec = _codec_module()
    coded = _SpoolFile(resources.spool_dir, tensor_blob_limit(limit), "the tensor blob")
    decoded = resources.spool_dir / f"{uuid.uuid4().hex}.codec"
    try:
        for chunk in chunks:
            coded.write(chunk)
        coded.close()
        with open(coded.path, "rb") as f:
            header = f.read(8)
        # Header flag bit 0: coded against a reference. The decoder checks the header
        # (the index checksum covers it); here it only spares loading an unneeded one.
        uses_reference = len(header) == 8 and bool(struct.unpack_from("<H", header, 6)[0] & 1)
        ref_buffer = reference.buffer() if reference.given and uses_reference else None
        with spool_space(resources.spool_dir):
            size = codec.unpack_tensors_file(
                coded.path, decoded, reference=ref_buffer, max_output_size=limit
            )
        coded.discard()
        with open(decoded, "rb") as f:
            for block in iter(lambda: f.read(MAX_CHUNK_SIZE), b""):
                yield pb.UnpackResponse(chunk=block)
    finally:
        coded.discard()
        unlink_quietly(decoded)
    yield pb.UnpackResponse(
        summary=pb.UnpackSummary(
            packed_bytes=coded.size,
            raw_bytes=size,
            format=FORMAT_TENSOR,
            reference_sha256=reference.sha256 if uses_reference else "",
        )
    )


def _new_packer(codec: Any, level: int, chunk_size: Optional[int]) -> Any:
    try:
        if chunk_size is None:
            return codec.Packer(level=level)
        return codec.Packer(level=level, chunk_size=chunk_size)
    except (ValueError, TypeError) as exc:
        raise _invalid(f"invalid pack options: {exc}") from None


def _invalid(message: str) -> SidecarError:
    return SidecarError(message, code="INVALID_ARGUMENT")
