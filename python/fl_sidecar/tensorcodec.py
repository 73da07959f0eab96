"""The tensor codec: model files coded per tensor, in byte planes, optionally against a reference.

A second format beside the zstd seekable one of :mod:`fl_sidecar.codec`, for
model files: float tensors are split into byte planes (sign and exponent apart
from the mantissa), each plane coded with zstd or rANS or stored raw, optionally
XORed first with the same tensor of a reference model (the global model an
update started from). The format is specified in docs/tensor-codec.md; the
native core does the work in parallel with the GIL released. A blob coded
against a reference that is missing or differs raises
:class:`~fl_sidecar.errors.ReferenceMismatchError`. Every name here is also
importable from :mod:`fl_sidecar.codec`.
"""

from __future__ import annotations

import os
from typing import (
    TYPE_CHECKING,
    Any,
    Dict,
    List,
    NamedTuple,
    Optional,
    Sequence,
    Tuple,
    Union,
    cast,
)

from fl_sidecar import _codec
from fl_sidecar._buffers import check_count as _check_count
from fl_sidecar._buffers import contiguous as _contiguous

if TYPE_CHECKING:
    import numpy.typing
    from typing_extensions import Buffer as _Buffer

    # numpy arrays export the buffer protocol, but numpy's stubs only say so for 3.12+.
    Buffer = Union[_Buffer, "numpy.typing.NDArray[Any]"]

    PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "DEFAULT_TENSOR_BLOCK_SIZE",
    "DEFAULT_TENSOR_LEVEL",
    "MAX_TENSOR_BLOCK_SIZE",
    "MIN_TENSOR_BLOCK_SIZE",
    "TENSOR_FORMAT_VERSION",
    "TensorBlobInfo",
    "TensorSegment",
    "is_tensor_blob",
    "layout_of",
    "pack_tensors",
    "tensor_info",
    "unpack_tensors",
    "unpack_tensors_file",
    "unpack_tensors_into",
]

#: The version of the tensor format (docs/tensor-codec.md) this module writes and reads.
TENSOR_FORMAT_VERSION: int = _codec.TENSOR_FORMAT_VERSION
#: Default bytes of a tensor per block of :func:`pack_tensors` (1 MiB).
DEFAULT_TENSOR_BLOCK_SIZE: int = _codec.DEFAULT_TENSOR_BLOCK_SIZE
#: Default zstd level of :func:`pack_tensors`: 1, which beats 3 on byte planes (measured,
#: see docs/tensor-codec.md).
DEFAULT_TENSOR_LEVEL: int = _codec.DEFAULT_TENSOR_LEVEL
#: The block sizes a tensor blob may have, in bytes (a multiple of 8, 64 KiB to 8 MiB).
MIN_TENSOR_BLOCK_SIZE: int = _codec.MIN_TENSOR_BLOCK_SIZE
MAX_TENSOR_BLOCK_SIZE: int = _codec.MAX_TENSOR_BLOCK_SIZE

_TENSOR_MAGIC = b"FLTC"

# Byte widths of the float dtypes the tensor codec splits into byte planes (torch names).
_FLOAT_WIDTHS: Dict[str, int] = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


class TensorSegment(NamedTuple):
    """One tensor (or storage record) of a model file: where its bytes lie, and what they are.

    ``name``, ``dtype`` and ``shape`` say which tensor of a reference model it matches
    (see :func:`pack_tensors`); ``dtype`` (a torch name) also says how it is coded.
    """

    offset: int
    """Start in the file, in bytes."""
    length: int
    """Length, in bytes."""
    dtype: str
    """Torch dtype name (``"float32"``); anything but a float is coded as opaque bytes."""
    name: str = ""
    """The tensor's name (a torch storage: the first tensor that views it)."""
    shape: Tuple[int, ...] = ()
    """Its dimensions (a torch storage: its element count)."""
    little_endian: bool = True
    """False for the storages of an archive written on a big-endian machine (opaque)."""

    @property
    def float_width(self) -> int:
        """Bytes per element when split into byte planes; 0 when coded as opaque bytes."""
        return _FLOAT_WIDTHS.get(self.dtype, 0) if self.little_endian else 0


class TensorBlobInfo(NamedTuple):
    """What a tensor blob's header and index say (see :func:`tensor_info`)."""

    version: int
    """Format version."""
    total_size: int
    """Bytes it decodes to."""
    block_size: int
    """The encoder's bytes per block."""
    segments: int
    """Number of segments (tensors and the opaque bytes between them)."""
    blocks: int
    """Number of blocks in its index."""
    uses_reference: bool
    """Whether decoding needs the reference it was coded against."""
    reference_size: int
    """Bytes of that reference (0 when none)."""


def _model_source(source: Union[Buffer, PathLike]) -> Union[bytes, bytearray, memoryview, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return source
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return memoryview(cast("_Buffer", source)).cast("B")


def layout_of(source: Union[Buffer, PathLike]) -> List[TensorSegment]:
    """The tensors of a safetensors file or torch archive (bytes or a path), in file order.

    Reads only the safetensors header, or the archive's zip directory and pickle
    (restricted: nothing it names runs); no tensor data. A torch archive gives one
    segment per stored storage record (named after the first tensor viewing it);
    records stored compressed are left out (opaque).

    Raises:
        ModelFormatError: not a safetensors file or torch zip archive, or a malformed one
            (and the other errors of :func:`fl_sidecar.archive.describe`).
        OSError: the file cannot be read.
    """
    import zipfile

    from fl_sidecar.archive import (
        ModelFormat,
        detect_format,
        open_archive,
        read_safetensors_header,
    )

    model = _model_source(source)
    if detect_format(model) is ModelFormat.SAFETENSORS:
        entries, data_start = read_safetensors_header(model)
        layout = [
            TensorSegment(data_start + e.begin, e.end - e.begin, e.dtype, name, e.shape)
            for name, e in entries.items()
        ]
        return sorted(layout, key=lambda t: t.offset)
    with open_archive(model) as archive:
        names = {key: group[0][0] for key, group in archive.by_storage().items()}
        layout = []
        for key, storage in archive.storages.items():
            record = archive.records[f"data/{key}"]
            if record.compress_type != zipfile.ZIP_STORED:
                continue
            layout.append(
                TensorSegment(
                    archive.data_offset(record),
                    record.file_size,
                    archive.storage_dtypes.get(key, storage.dtype),
                    names.get(key, f"storage:{key}"),
                    (storage.numel,),
                    not archive.big_endian,
                )
            )
    return sorted(layout, key=lambda t: t.offset)


def _reference_offsets(
    layout: Sequence[TensorSegment], reference_layout: Sequence[TensorSegment]
) -> List[Optional[int]]:
    """For each segment, where the same tensor lies in the reference, or None.

    Same tensor: the same name (or, unnamed, the same offset), dtype, shape and length.
    """
    by_key: Dict[Union[str, int], TensorSegment] = {}
    for candidate in reference_layout:
        by_key.setdefault(candidate.name or candidate.offset, candidate)
    offsets: List[Optional[int]] = []
    for seg in layout:
        twin = by_key.get(seg.name or seg.offset)
        facts = (seg.dtype, tuple(seg.shape), seg.length, seg.little_endian)
        same = (
            twin is not None
            and (
                twin.dtype,
                tuple(twin.shape),
                twin.length,
                twin.little_endian,
            )
            == facts
        )
        offsets.append(twin.offset if twin is not None and same else None)
    return offsets


def pack_tensors(
    data: Union[Buffer, PathLike],
    layout: Optional[Sequence[TensorSegment]] = None,
    *,
    reference: Optional[Union[Buffer, PathLike]] = None,
    reference_layout: Optional[Sequence[TensorSegment]] = None,
    level: int = DEFAULT_TENSOR_LEVEL,
    block_size: int = DEFAULT_TENSOR_BLOCK_SIZE,
    threads: int = 0,
) -> bytes:
    """Packs a model file with the tensor codec (format: docs/tensor-codec.md).

    Float tensors (fp16, bf16, fp32, fp64) are split into byte planes, each plane
    zstd-compressed or stored raw where that does not pay; everything else (headers,
    pickle records, integer tensors) is plain zstd. With ``reference`` (the model the
    update started from, e.g. the global model), every tensor that has a twin in it
    (same name, dtype and shape) is first XORed with that twin; the others are coded
    alone. Blocks of ``block_size`` bytes are coded in parallel with the GIL released.

    Args:
        data: the model's bytes (any C-contiguous buffer) or a path to it.
        layout: its tensors; None reads them with :func:`layout_of`; ``[]`` codes
            everything as opaque bytes.
        reference: the reference model's bytes or path; None for none.
        reference_layout: the reference's tensors; None reads them with :func:`layout_of`.
        level: zstd level of the compressed planes, ``MIN_LEVEL`` to ``MAX_LEVEL``.
        block_size: bytes per block, a multiple of 8 from ``MIN_TENSOR_BLOCK_SIZE`` to
            ``MAX_TENSOR_BLOCK_SIZE``.
        threads: worker threads, 0 for one per core.

    Returns:
        The blob; :func:`unpack_tensors` (with the same reference) gives ``data`` back.

    Raises:
        ValueError: a segment lies outside ``data`` or overlaps another, a float
            segment is not a whole number of elements, or a parameter is out of range.
        ModelFormatError: a layout was to be read and the file is not a model.
        TypeError: ``data`` or ``reference`` is not a buffer or path.
        OSError: a path cannot be read.
    """
    payload = _read_model(data)
    if layout is None:
        layout = layout_of(payload)
    ref_bytes = None if reference is None else _read_model(reference)
    if ref_bytes is not None and reference_layout is None:
        reference_layout = layout_of(ref_bytes)
    ref_offsets = (
        _reference_offsets(layout, reference_layout or [])
        if ref_bytes is not None
        else [None] * len(layout)
    )
    segments = [
        (
            _check_count("segment offset", seg.offset),
            _check_count("segment length", seg.length),
            seg.float_width,
            at,
        )
        for seg, at in zip(layout, ref_offsets)
    ]
    return _codec.pack_tensors(
        payload,
        segments,
        ref_bytes,
        level,
        _check_count("block_size", block_size),
        _check_count("threads", threads),
    )


def _read_model(source: Union[Buffer, PathLike]) -> _Buffer:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return f.read()
    return _contiguous(source)


def unpack_tensors(
    blob: Buffer,
    *,
    reference: Optional[Union[Buffer, PathLike]] = None,
    max_output_size: int = _codec.DEFAULT_MAX_OUTPUT_SIZE,
    threads: int = 0,
) -> bytes:
    """Unpacks a tensor blob into a new ``bytes`` of its size, decoding blocks in parallel.

    The header and block index are checked (sizes, coverage, their checksum) before
    the output is allocated; every block is checked against its xxh64 checksum, and
    the whole output against the total one.

    Args:
        blob: the blob (any C-contiguous buffer).
        reference: the model it was coded against (bytes or path), when it was.
        max_output_size: the most bytes to accept, checked before allocating.
        threads: worker threads, 0 for one per core.

    Raises:
        ReferenceMismatchError: the blob needs a reference and none, one of another
            size, or one with other bytes where a tensor was coded against it was given.
        CorruptDataError: not a tensor blob, another format version, an index that
            lies, or a plane that does not decode.
        TruncatedDataError: the blob ends early.
        ChecksumMismatchError: the index, a block or the whole output does not match
            its checksum.
        SizeLimitExceededError: the output would exceed ``max_output_size``.
        TypeError / ValueError: ``blob`` is not a C-contiguous buffer, bad parameter.
    """
    return _codec.unpack_tensors(
        _contiguous(blob),
        None if reference is None else _read_model(reference),
        _check_count("max_output_size", max_output_size),
        _check_count("threads", threads),
    )


def unpack_tensors_into(
    blob: Buffer,
    out: Buffer,
    *,
    reference: Optional[Union[Buffer, PathLike]] = None,
    threads: int = 0,
) -> int:
    """Unpacks a tensor blob in place into ``out`` (a writable buffer of exactly its size).

    On an error ``out`` may hold part of the output. Returns the bytes written.

    Raises:
        TypeError: ``out`` is read-only (``bytes``) or not a buffer.
        SizeLimitExceededError: ``out`` is smaller than the output.
        ValueError: ``out`` is larger than the output, or not C-contiguous.
        ReferenceMismatchError, CorruptDataError, TruncatedDataError,
            ChecksumMismatchError: as :func:`unpack_tensors`.
    """
    writable = cast("_Buffer", out)
    view = memoryview(writable)
    if view.readonly:
        raise TypeError("out must be a writable buffer (bytearray, numpy array), not read-only")
    return int(
        _codec.unpack_tensors_into(
            _contiguous(blob),
            writable,
            None if reference is None else _read_model(reference),
            _check_count("threads", threads),
        )
    )


def unpack_tensors_file(
    src: PathLike,
    dst: PathLike,
    *,
    reference: Optional[Union[Buffer, PathLike]] = None,
    max_output_size: int = _codec.DEFAULT_MAX_OUTPUT_SIZE,
) -> int:
    """Unpacks the tensor blob in file ``src`` into file ``dst``, one block at a time.

    Memory is the blob's index plus one block (at most 8 MiB stored and 8 MiB decoded),
    whatever the model's size, and the reference when one is given. ``dst`` is written
    through a temporary file and renamed into place only once every check passed (the
    total checksum included), so on an error it is left as it was. Returns its size in
    bytes.

    Raises:
        ReferenceMismatchError, CorruptDataError, TruncatedDataError,
            ChecksumMismatchError, SizeLimitExceededError: as :func:`unpack_tensors`.
        OSError: a file cannot be read or written.
    """
    return int(
        _codec.unpack_tensors_file(
            os.fspath(src),
            os.fspath(dst),
            None if reference is None else _read_model(reference),
            _check_count("max_output_size", max_output_size),
        )
    )


def tensor_info(blob: Buffer) -> TensorBlobInfo:
    """Reads a tensor blob's header and checks its index, without decoding any block.

    Raises:
        CorruptDataError, TruncatedDataError, ChecksumMismatchError: as
            :func:`unpack_tensors`.
    """
    return TensorBlobInfo(*_codec.tensor_info(_contiguous(blob)))


def is_tensor_blob(prefix: bytes) -> bool:
    """True when ``prefix`` starts with the tensor format's magic (``FLTC``)."""
    return bytes(prefix[:4]) == _TENSOR_MAGIC
