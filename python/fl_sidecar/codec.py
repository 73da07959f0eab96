"""The codec: pack bytes into the zstd seekable format and unpack any zstd stream.

A packed blob is a run of independent zstd frames of at most ``chunk_size``
uncompressed bytes each (each with its content size and content checksum, each
needing a window of at most 8 MiB as RFC 9659 requires for HTTP content coding
``zstd``), followed by the seek table of zstd's contrib/seekable_format as a
skippable frame. Any zstd decoder reads it as ordinary concatenated frames; ours
packs and unpacks the frames in parallel in native code with the GIL released,
and unpacks straight into one ``bytes`` object of its final size.

Inputs are read through the buffer protocol without copying: ``bytes``,
``bytearray``, ``memoryview`` and numpy arrays all work, as long as they are
C-contiguous (anything else is a :class:`ValueError`; a non-buffer is a
:class:`TypeError`). Do not resize or mutate a buffer while a call reads it.

Errors are the classes of :mod:`fl_sidecar.errors`:
:class:`~fl_sidecar.errors.CorruptDataError` (not zstd, bad header or block),
:class:`~fl_sidecar.errors.TruncatedDataError` (the data ends inside a frame),
:class:`~fl_sidecar.errors.ChecksumMismatchError` (content does not match its checksum),
:class:`~fl_sidecar.errors.SeekTableError` (the seek table is malformed or lies), and
:class:`~fl_sidecar.errors.SizeLimitExceededError` (the output would exceed
``max_output_size``, raised before allocating whenever the sizes are known up front;
or a blob has, or packing would make, more than :data:`MAX_FRAMES` frames).
The first four are all :class:`~fl_sidecar.errors.CorruptDataError`. A frame
whose window zstd cannot allocate (this process's memory, not the data) raises
:class:`MemoryError`.

The tensor codec (:mod:`fl_sidecar.tensorcodec`, its names re-exported here:
:func:`pack_tensors`, :func:`unpack_tensors`, :func:`unpack_tensors_into`,
:func:`tensor_info`, :func:`layout_of`) is a second, separate format for model
files: float tensors split into byte planes, each plane coded with zstd or rANS
or stored raw, optionally XORed with the same tensor of a
reference model first. Its format is specified in docs/tensor-codec.md; a blob coded
against a reference that is missing or differs raises
:class:`~fl_sidecar.errors.ReferenceMismatchError`.

:func:`pack`, :func:`unpack`, :func:`pack_file` and :func:`unpack_file` reach it too:
given a ``reference`` (the reference model's bytes or path) or ``format="tensor"``,
:func:`pack` and :func:`pack_file` write a tensor blob (``format="auto"``: a tensor blob
for a model file, the zstd format for anything else); without either they write the
zstd seekable format, as always. :func:`unpack` and :func:`unpack_file` tell the two
formats apart by their magic and read both; a tensor blob coded against a reference
needs that reference (``reference=``), a zstd blob ignores one.

Warning -- decoding our blobs elsewhere:
    python-zstandard's one-shot ``zstandard.ZstdDecompressor().decompress(blob)``
    returns only the FIRST frame of a multi-frame blob, silently. Use
    ``ZstdDecompressor().stream_reader(blob, read_across_frames=True).read()``,
    the ``zstd`` command-line tool, ``backports.zstd`` / ``compression.zstd``, or
    :func:`unpack` here. A blob cut exactly at a frame boundary is itself a valid
    zstd stream; only the seek table (``inspect(blob).has_seek_table``) or the
    expected size tells that frames are missing.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import (
    TYPE_CHECKING,
    Any,
    Iterator,
    List,
    NamedTuple,
    Optional,
    Tuple,
    Union,
)

from fl_sidecar import _codec
from fl_sidecar._buffers import check_count as _check_count
from fl_sidecar._buffers import contiguous as _contiguous
from fl_sidecar.errors import ModelFormatError

# The tensor codec is its own module (fl_sidecar.tensorcodec); its names stay here too.
from fl_sidecar.tensorcodec import (
    DEFAULT_TENSOR_BLOCK_SIZE,
    DEFAULT_TENSOR_LEVEL,
    MAX_TENSOR_BLOCK_SIZE,
    MIN_TENSOR_BLOCK_SIZE,
    TENSOR_FORMAT_VERSION,
    TensorBlobInfo,
    TensorSegment,
    is_tensor_blob,
    layout_of,
    pack_tensors,
    tensor_info,
    unpack_tensors,
    unpack_tensors_file,
    unpack_tensors_into,
)

if TYPE_CHECKING:
    import numpy.typing
    from typing_extensions import Buffer as _Buffer

    # numpy arrays export the buffer protocol, but numpy's stubs only say so for 3.12+.
    Buffer = Union[_Buffer, "numpy.typing.NDArray[Any]"]

    PathLike = Union[str, "os.PathLike[str]"]

    # A reference model for the tensor codec: its bytes, or its path.
    Reference = Union[Buffer, PathLike]

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_LEVEL",
    "DEFAULT_MAX_OUTPUT_SIZE",
    "DEFAULT_PIECE_SIZE",
    "DEFAULT_TENSOR_BLOCK_SIZE",
    "DEFAULT_TENSOR_LEVEL",
    "FORMAT_AUTO",
    "FORMAT_TENSOR",
    "FORMAT_ZSTD",
    "MAX_CHUNK_SIZE",
    "MAX_FRAMES",
    "MAX_LEVEL",
    "MAX_TENSOR_BLOCK_SIZE",
    "MIN_LEVEL",
    "MIN_PIECE_SIZE",
    "MIN_TENSOR_BLOCK_SIZE",
    "PACK_FORMATS",
    "TENSOR_FORMAT_VERSION",
    "BlobInfo",
    "PackStats",
    "Packer",
    "TensorBlobInfo",
    "TensorSegment",
    "Unpacker",
    "blob_format",
    "inspect",
    "is_tensor_blob",
    "is_zstd",
    "layout_of",
    "pack",
    "pack_file",
    "pack_tensors",
    "tensor_info",
    "unpack",
    "unpack_file",
    "unpack_tensors",
    "unpack_tensors_file",
    "unpack_tensors_into",
    "zstd_version",
]

#: Default zstd compression level (chosen by measurement; see docs/codec.md).
DEFAULT_LEVEL: int = _codec.DEFAULT_LEVEL
#: Default uncompressed bytes per frame (chosen by measurement; see docs/codec.md).
DEFAULT_CHUNK_SIZE: int = _codec.DEFAULT_CHUNK_SIZE
#: Largest chunk size, in bytes: frames must not need a window above 8 MiB (RFC 9659).
MAX_CHUNK_SIZE: int = _codec.MAX_CHUNK_SIZE
#: Default limit on the decompressed size, in bytes (4 GiB).
DEFAULT_MAX_OUTPUT_SIZE: int = _codec.DEFAULT_MAX_OUTPUT_SIZE
#: The compression levels zstd accepts (negative levels are its fast modes; 0 means 3).
MIN_LEVEL: int = _codec.MIN_LEVEL
MAX_LEVEL: int = _codec.MAX_LEVEL
#: Smallest ``max_piece_size`` of :class:`Unpacker`, in bytes: one zstd block (128 KiB).
MIN_PIECE_SIZE: int = _codec.MIN_PIECE_SIZE
#: Default ``max_piece_size`` of :class:`Unpacker`, in bytes (4 MiB); also the step in
#: which :func:`unpack_file` and :func:`unpack` (frames without sizes) decode.
DEFAULT_PIECE_SIZE: int = _codec.DEFAULT_PIECE_SIZE
#: The most zstd frames one blob may have (2^20), packing and unpacking alike: more is a
#: :class:`~fl_sidecar.errors.SizeLimitExceededError` (2 MiB frames reach it at 2 TiB).
MAX_FRAMES: int = _codec.MAX_FRAMES

#: The zstd seekable format (this module's own; any zstd decoder reads it).
FORMAT_ZSTD = "zstd"
#: The tensor codec's format (docs/tensor-codec.md; the HTTP content coding ``fltc``).
FORMAT_TENSOR = "tensor"
#: :func:`pack`'s choice by the input: a tensor blob for a model file, zstd otherwise.
FORMAT_AUTO = "auto"
#: The ``format`` values :func:`pack` and :func:`pack_file` take.
PACK_FORMATS: Tuple[str, ...] = (FORMAT_ZSTD, FORMAT_TENSOR, FORMAT_AUTO)


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class PackStats(NamedTuple):
    """Sizes of a finished packing."""

    raw_size: int
    """Uncompressed bytes read."""
    packed_size: int
    """Bytes of the packed blob, seek table included."""
    frames: int
    """Number of zstd frames."""


class BlobInfo(NamedTuple):
    """What a blob says about itself, read without decompressing."""

    frames: int
    """Number of zstd frames."""
    compressed_size: int
    """Size of the blob, in bytes."""
    decompressed_size: Optional[int]
    """Total decompressed size in bytes, or None when some frame does not record it."""
    has_checksums: bool
    """Whether every frame carries its content checksum."""
    has_seek_table: bool
    """Whether the blob ends with a seek table (checked against its frames)."""

    @property
    def ratio(self) -> Optional[float]:
        """Decompressed size / compressed size, or None when the decompressed size is unknown."""
        if self.decompressed_size is None or self.compressed_size == 0:
            return None
        return self.decompressed_size / self.compressed_size


def pack(
    data: Buffer,
    *,
    level: Optional[int] = None,
    chunk_size: Optional[int] = None,
    threads: int = 0,
    reference: Optional[Reference] = None,
    format: Optional[str] = None,
) -> bytes:
    """Packs ``data`` into a seekable zstd blob, or a tensor blob (with a reference).

    Without ``reference`` and ``format`` this is the zstd seekable format, its frames
    compressed in parallel. With ``reference`` (the model ``data`` was trained from,
    e.g. the global model) it is a tensor blob (:func:`pack_tensors`): every tensor
    with a twin in the reference (same name, dtype and shape) is coded as its
    difference from it, so :func:`unpack` needs the same reference back.

    Args:
        data: any C-contiguous buffer; read in place, never copied.
        level: zstd level, ``MIN_LEVEL`` to ``MAX_LEVEL``; None for the format's
            default (:data:`DEFAULT_LEVEL` for zstd, :data:`DEFAULT_TENSOR_LEVEL` for
            a tensor blob).
        chunk_size: uncompressed bytes per frame, 1 to ``MAX_CHUNK_SIZE`` (8 MiB); None
            for :data:`DEFAULT_CHUNK_SIZE`. The zstd format's only: a tensor blob
            has its own blocks (:data:`DEFAULT_TENSOR_BLOCK_SIZE`) and ignores it.
        threads: worker threads, 0 for one per core.
        reference: the reference model's bytes or path (safetensors or a torch
            archive); None for none.
        format: :data:`FORMAT_ZSTD`, :data:`FORMAT_TENSOR`, :data:`FORMAT_AUTO` (a
            tensor blob when ``data`` is a model file, else zstd), or None: tensor
            with a reference, zstd without.

    Returns:
        The blob. Empty input gives one empty frame plus the seek table (zstd).

    Raises:
        TypeError: ``data`` is not a buffer.
        ValueError: ``data`` is not C-contiguous, a parameter is out of range, an
            unknown ``format``, or ``format="zstd"`` with a reference.
        SizeLimitExceededError: ``data`` would make more than :data:`MAX_FRAMES` frames
            (refused before compressing; use a larger ``chunk_size``).
        ModelFormatError: a tensor blob was asked for and ``data`` or the reference
            is not a model file.
        OSError: the reference's path cannot be read.
    """
    chosen = _pack_format(format, reference)
    layout = None
    if chosen == FORMAT_AUTO:
        layout = _layout_or_none(data)
        chosen = FORMAT_ZSTD if layout is None else FORMAT_TENSOR
    if chosen == FORMAT_TENSOR:
        return pack_tensors(
            data,
            layout,
            reference=reference,
            level=DEFAULT_TENSOR_LEVEL if level is None else level,
            threads=threads,
        )
    return _codec.pack(
        _contiguous(data),
        DEFAULT_LEVEL if level is None else level,
        _check_count("chunk_size", DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size),
        _check_count("threads", threads),
    )


def unpack(
    blob: Buffer,
    *,
    max_output_size: int = DEFAULT_MAX_OUTPUT_SIZE,
    threads: int = 0,
    reference: Optional[Reference] = None,
) -> bytes:
    """Unpacks any zstd stream (ours, or plain single- or multi-frame zstd) or a tensor blob.

    The format is told by the blob's first bytes: the tensor format's magic (``FLTC``)
    goes to :func:`unpack_tensors`, with ``reference``; anything else is read as zstd,
    and ``reference`` is not needed there (it is ignored).

    For zstd, when every frame's size is known (frame headers or seek table) the
    result is allocated once at its final size and the frames are decoded into it
    in parallel. Otherwise (foreign frames without sizes) the stream is decoded
    twice in :data:`DEFAULT_PIECE_SIZE` steps: once to measure it, dropping the
    output, then into a result of that size. Memory is the result's size plus
    one step and one window either way: a bomb is refused at
    ``max_output_size`` without ever holding its output. A tensor blob's size is
    checked against ``max_output_size`` from its header, before allocating.

    Args:
        blob: any C-contiguous buffer holding the compressed bytes; never copied.
        max_output_size: the most decompressed bytes to accept.
        threads: worker threads, 0 for one per core.
        reference: the model a tensor blob was coded against (bytes or path).

    Returns:
        The decompressed bytes.

    Raises:
        CorruptDataError: not a zstd stream, or a bad header or block.
        TruncatedDataError: the data ends inside a frame (or is empty).
        ChecksumMismatchError: a frame's content does not match its checksum.
        SeekTableError: the seek table is malformed or disagrees with the frames.
        SizeLimitExceededError: the output would exceed ``max_output_size``, or the
            blob has more than :data:`MAX_FRAMES` frames.
        ReferenceMismatchError: a tensor blob coded against a reference, and none or
            another one was given.
        TypeError / ValueError: ``blob`` is not a C-contiguous buffer, bad parameter.
        OSError: the reference's path cannot be read.
    """
    data = _contiguous(blob)
    if is_tensor_blob(_head(data)):
        return unpack_tensors(
            data, reference=reference, max_output_size=max_output_size, threads=threads
        )
    return _codec.unpack(
        data,
        _check_count("max_output_size", max_output_size),
        _check_count("threads", threads),
    )


def pack_file(
    src: PathLike,
    dst: PathLike,
    *,
    level: Optional[int] = None,
    chunk_size: Optional[int] = None,
    threads: int = 0,
    reference: Optional[Reference] = None,
    format: Optional[str] = None,
) -> PackStats:
    """Packs the file ``src`` into the file ``dst``: zstd seekable, or a tensor blob.

    The zstd format streams with memory of about ``threads x chunk_size``. A tensor
    blob (with ``reference``, ``format="tensor"``, or ``format="auto"`` and a model
    file) is built in memory: it holds ``src``, the reference and the blob.
    ``level``, ``chunk_size``, ``reference`` and ``format`` are as for :func:`pack`.

    ``dst`` is written through a temporary file in the same folder and renamed into
    place, so a failure leaves no partial ``dst`` (and an existing one untouched).

    Returns:
        The sizes (bytes) and the frame count (0 for a tensor blob).

    Raises:
        OSError: ``src`` or the reference cannot be read, or ``dst`` cannot be written.
        ValueError: a parameter is out of range, or as for :func:`pack`.
        SizeLimitExceededError: ``src`` would make more than :data:`MAX_FRAMES` frames
            (refused before writing when ``src`` is a regular file).
        ModelFormatError: a tensor blob was asked for and ``src`` or the reference is
            not a model file.
    """
    chosen = _pack_format(format, reference)
    layout = None
    if chosen == FORMAT_AUTO:
        layout = _layout_or_none(os.fspath(src))
        chosen = FORMAT_ZSTD if layout is None else FORMAT_TENSOR
    if chosen == FORMAT_TENSOR:
        with open(src, "rb") as f:
            data = f.read()
        blob = pack_tensors(
            data,
            layout,
            reference=reference,
            level=DEFAULT_TENSOR_LEVEL if level is None else level,
            threads=threads,
        )
        _write_atomically(dst, blob)
        return PackStats(len(data), len(blob), 0)
    raw, packed, frames = _codec.pack_file(
        os.fspath(src),
        os.fspath(dst),
        DEFAULT_LEVEL if level is None else level,
        _check_count("chunk_size", DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size),
        _check_count("threads", threads),
    )
    return PackStats(raw, packed, frames)


def unpack_file(
    src: PathLike,
    dst: PathLike,
    *,
    max_output_size: int = DEFAULT_MAX_OUTPUT_SIZE,
    threads: int = 0,
    reference: Optional[Reference] = None,
) -> int:
    """Unpacks the zstd file or tensor blob ``src`` into ``dst`` with bounded memory.

    A tensor blob (told by its magic) goes to :func:`unpack_tensors_file`, with
    ``reference``: one block at a time, memory its index, one block and the
    reference. For zstd (``reference`` ignored): a file ending with a seek table that
    lists all its frames, none above ``MAX_CHUNK_SIZE`` (ours), is decoded
    ``threads`` frames at a time in parallel (memory about 2 x threads x chunk_size);
    any other zstd file is streamed on one thread in :data:`DEFAULT_PIECE_SIZE`
    steps (memory one step, one 1 MiB read and the frame's window: at most 8 MiB, or
    128 MiB when ``max_output_size`` is that large), whatever it expands to. The
    total size is checked against ``max_output_size`` before anything is written
    when the seek table (or the tensor blob's header) gives it. ``dst`` is written
    through a temporary file and renamed into place only when the whole stream
    decoded and verified, so a failure leaves an existing ``dst`` untouched.

    Returns:
        The number of bytes written.

    Raises:
        The errors of :func:`unpack`, and OSError for file problems.
    """
    with open(src, "rb") as f:
        head = f.read(4)
    if is_tensor_blob(head):
        return unpack_tensors_file(src, dst, reference=reference, max_output_size=max_output_size)
    written: int = _codec.unpack_file(
        os.fspath(src),
        os.fspath(dst),
        _check_count("max_output_size", max_output_size),
        _check_count("threads", threads),
    )
    return written


def blob_format(prefix: bytes) -> Optional[str]:
    """The format a blob's first bytes say: :data:`FORMAT_TENSOR`, :data:`FORMAT_ZSTD`, or None.

    Only the first 4 bytes are looked at (the magics of :func:`is_tensor_blob` and
    :func:`is_zstd`).
    """
    if is_tensor_blob(prefix):
        return FORMAT_TENSOR
    if is_zstd(prefix):
        return FORMAT_ZSTD
    return None


def _pack_format(format: Optional[str], reference: Optional[Reference]) -> str:
    if format is None:
        return FORMAT_ZSTD if reference is None else FORMAT_TENSOR
    if format not in PACK_FORMATS:
        raise ValueError(f"unknown format {format!r}; choose from {', '.join(PACK_FORMATS)}")
    if format == FORMAT_ZSTD and reference is not None:
        raise ValueError(
            'a reference needs the tensor format: format="tensor" (or "auto"), not "zstd"'
        )
    return format


def _layout_or_none(source: Union[Buffer, str]) -> Optional[List[TensorSegment]]:
    """The model's layout, or None when ``source`` is no model file (``format="auto"``)."""
    try:
        return layout_of(source)
    except ModelFormatError:
        return None


def _head(data: _Buffer) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data[:4])
    return bytes(memoryview(data).cast("B")[:4])


def _write_atomically(dst: PathLike, data: bytes) -> None:
    target = os.fspath(dst)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".fl-sidecar-", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def inspect(blob: Buffer) -> BlobInfo:
    """Reads a blob's facts from its frame headers and seek table without decompressing.

    The walk checks the structure: every frame and block header, and the seek table
    against the frames it describes.

    Raises:
        CorruptDataError, TruncatedDataError, SeekTableError: as for :func:`unpack`.
    """
    frames, compressed, decompressed, checksums, seek_table = _codec.inspect(_contiguous(blob))
    return BlobInfo(frames, compressed, decompressed, checksums, seek_table)


def is_zstd(prefix: bytes) -> bool:
    """True when ``prefix`` starts with the zstd frame magic (or a skippable-frame magic).

    Only the first 4 bytes are looked at; fewer than 4 bytes is False.
    """
    head = bytes(prefix[:4])
    if len(head) < 4:
        return False
    if head == _ZSTD_MAGIC:
        return True
    # Skippable frames (magic 0x184D2A50..0x184D2A5F, little-endian) also start valid streams.
    return head[1:] == b"\x2a\x4d\x18" and head[0] & 0xF0 == 0x50


class Packer:
    """Streaming encoder: memory stays at about ``threads x chunk_size``.

    Feed pieces with :meth:`write` (each returns the compressed bytes ready now,
    possibly ``b""``), then call :meth:`finish` once for the rest and the seek table.
    Concatenating every returned piece gives the same blob as :func:`pack`.
    """

    def __init__(
        self,
        *,
        level: int = DEFAULT_LEVEL,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        threads: int = 0,
    ) -> None:
        """Raises ValueError for a parameter out of range."""
        self._inner = _codec.Packer(
            level, _check_count("chunk_size", chunk_size), _check_count("threads", threads)
        )

    def write(self, data: Buffer) -> bytes:
        """Feeds ``data`` (any C-contiguous buffer); returns compressed bytes ready now.

        Raises:
            TypeError / ValueError: not a C-contiguous buffer, or the packer is finished.
            SizeLimitExceededError: the blob would get more than :data:`MAX_FRAMES`
                frames (raised before compressing the batch that would cross it; use
                a larger ``chunk_size``).
        """
        return self._inner.write(_contiguous(data))

    def finish(self) -> bytes:
        """Returns the remaining frames and the seek table; the packer is then closed.

        Raises:
            ValueError: called twice.
        """
        return self._inner.finish()

    @property
    def stats(self) -> PackStats:
        """Sizes (bytes) and frames emitted so far."""
        return PackStats(*self._inner.stats())


class Unpacker:
    """Streaming decoder for any zstd stream (ours, or plain single/multi-frame zstd).

    Feed compressed pieces of any size with :meth:`write`, then call
    :meth:`finish`. Frame checksums and seek tables are verified as they pass.
    After an error the decoder is spent.

    Every call returns at most ``max_piece_size`` bytes (default
    :data:`DEFAULT_PIECE_SIZE`, 4 MiB), so a few bytes of a decompression bomb
    never come back as one huge object: what a :meth:`write` could not decode
    yet is held (copied, so the caller may reuse its buffer) and comes out
    through :meth:`drain`, piece by piece. :meth:`write_iter` does both::

        unpacker = Unpacker(max_output_size=limit)
        for message in messages:
            for piece in unpacker.write_iter(message):  # each <= 4 MiB
                send(piece)
        unpacker.finish()

    Memory is one piece, the frame's window (at most 8 MiB, or 128 MiB when
    ``max_output_size`` is that large) and the held input, whatever the
    expansion.
    """

    def __init__(
        self,
        *,
        max_output_size: int = DEFAULT_MAX_OUTPUT_SIZE,
        max_piece_size: Optional[int] = None,
    ) -> None:
        """``max_output_size``: the most decompressed bytes to produce in total.
        ``max_piece_size``: the most decompressed bytes one call returns (None:
        :data:`DEFAULT_PIECE_SIZE`; at least :data:`MIN_PIECE_SIZE`; pieces come out
        between it minus 128 KiB and it).

        Raises:
            ValueError: ``max_piece_size`` below :data:`MIN_PIECE_SIZE`, or a negative size.
        """
        piece = None if max_piece_size is None else _check_count("max_piece_size", max_piece_size)
        self._inner = _codec.Unpacker(_check_count("max_output_size", max_output_size), piece)

    def write(self, data: Buffer) -> bytes:
        """Feeds compressed bytes; returns the decompressed bytes ready now (at most
        ``max_piece_size`` bytes; input not yet decoded is held for :meth:`drain`).

        Raises:
            The errors of :func:`unpack` (TruncatedDataError only from :meth:`finish`);
            ValueError after :meth:`finish`, after an earlier error, or while input is
            still held (:attr:`pending_input` > 0: :meth:`drain` first).
        """
        return self._inner.write(_contiguous(data))

    def drain(self) -> bytes:
        """Decodes more of the held input; returns at most ``max_piece_size`` bytes, and
        ``b""`` once nothing is held.

        Raises:
            The errors of :func:`unpack`; ValueError after :meth:`finish` or an earlier error.
        """
        return self._inner.drain()

    def write_iter(self, data: Buffer) -> Iterator[bytes]:
        """Feeds ``data`` and yields its decompressed bytes in pieces of at most
        ``max_piece_size`` bytes (empty pieces are skipped), draining all held input.
        Each piece is decoded only when the previous one has been taken, so a slow
        consumer holds one piece at a time. Stopping early leaves the rest held
        (:attr:`pending_input`): :meth:`drain` it before the next :meth:`write`.
        The held input is a copy of ``data``'s undecoded tail, so feed pieces of
        bounded size (say 1 MiB) to keep that copy small too.

        Raises:
            The errors of :meth:`write`, as the pieces are pulled.
        """
        piece = self.write(data)
        while True:
            if piece:
                yield piece
            if not self.pending_input:
                return
            piece = self.drain()

    def finish(self) -> None:
        """Declares the end of the input.

        Raises:
            TruncatedDataError: the stream stopped inside a frame, or nothing was fed.
            SeekTableError: it ends with a seek table that does not match its frames.
            ValueError: called twice, after an error, or while input is still held.
        """
        self._inner.finish()

    @property
    def produced(self) -> int:
        """Decompressed bytes produced so far."""
        return self._inner.produced

    @property
    def pending_input(self) -> int:
        """Bytes of compressed input held for :meth:`drain`."""
        return self._inner.pending_input


def zstd_version() -> str:
    """The version of the libzstd the native module is linked with, e.g. ``"1.5.7"``."""
    return _codec.zstd_version()
