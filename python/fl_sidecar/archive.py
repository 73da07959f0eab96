"""Torch-free model files: format detection, describing, and archive <-> safetensors conversion.

The sidecar vets and converts models without importing torch (about 200 MiB of RSS and
seconds of start-up): none of it needs torch. A torch archive (``torch.save`` of a
module or state_dict, ``torch.jit.save``) is a zip file holding one pickle
(``<prefix>/data.pkl``) that rebuilds the object graph and one record per tensor
storage (``<prefix>/data/<key>``). This module

- reads the pickle with the restricted unpickler of :mod:`fl_sidecar._pickle`, which
  imports and calls nothing, and names the tensors as ``module.state_dict()`` would;
- converts an archive into safetensors by copying each tensor's bytes out of its storage
  record, and writes the tensors of a safetensors file into a copy of an archive by
  replacing storage records only, with torch's zip layout (records aligned to 64 bytes,
  so ``torch.load(mmap=True)`` works), leaving the pickle untouched.

Memory is bounded by a fixed copy buffer (:data:`CHUNK_BYTES`) whatever the model's size,
with two documented exceptions that hold one storage in memory: a non-contiguous tensor
view (its storage span), and new values for tensors that share a storage in some other
way than as identical views (e.g. an expanded view, or two slices of one buffer).

It needs nothing beyond the standard library (strided views are gathered and
scattered through strided ``memoryview`` slices), so the sidecar runs it with its core
dependencies. :mod:`fl_sidecar.models` builds its torch API on this module.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import io
import itertools
import json
import math
import os
import re
import struct
import tempfile
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Literal,
    Mapping,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    Union,
)

from fl_sidecar._pickle import (
    DEFAULT_LIMITS,
    STOP_CHECK_INTERVAL,
    Placeholder,
    ReadLimits,
    SafeOrderedDict,
    StopCheck,
    TensorRef,
    check_stop,
    restricted_loads,
)
from fl_sidecar.errors import (
    AmbiguousArchiveError,
    ModelFormatError,
    ModelLimitExceededError,
    TensorMismatchError,
)

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_LIMITS",
    "SAFETENSORS_DTYPES",
    "ArchiveDescription",
    "ModelFormat",
    "NewValues",
    "ReadLimits",
    "SafetensorsEntry",
    "TensorInfo",
    "WrittenFile",
    "archive_to_safetensors",
    "atomic_write",
    "check_against",
    "describe",
    "detect_format",
    "dtype_itemsize",
    "list_tensors",
    "open_archive",
    "open_source",
    "read_exact",
    "read_safetensors_header",
    "rewrite_archive",
    "safetensors_header",
    "safetensors_into_archive",
]

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[bytes, bytearray, memoryview, PathLike]

CHUNK_BYTES = 8 * 1024 * 1024
"""Size of the copy buffer, in bytes: what converting a model holds of its data at a time."""

_ZIP_MAGIC = b"PK\x03\x04"
# The pre-1.6 torch.save format: a bare pickle stream starting with a magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_MAX_PICKLE_SIZE = 256 * 1024 * 1024  # bytes; the pickle of a 1 GiB model is a few MiB
_MAX_CODE_SIZE = 16 * 1024 * 1024  # bytes, one TorchScript code file
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes, as the safetensors library allows
# Converted data may exceed the storages it comes from (tied weights are written once per
# name, expanded views element by element) by this factor plus this many bytes, no more.
_MAX_EXPANSION = 8
_EXPANSION_SLACK = 256 * 1024 * 1024
_ALIGNMENT = 64  # bytes: torch's writer aligns every record's data to this (mmap loading)
_ZIP32_LIMIT = 0xFFFFFFFF  # bytes: sizes and offsets from here on take zip64 fields
_ZIP64_MARK = 0xFFFFFFFF  # what a 32-bit field holds when its zip64 field has the value


class _Dtype(NamedTuple):
    itemsize: int  # bytes per element
    swap_unit: int  # bytes swapped as one number on a byte-order change (complex: a part)
    safetensors: Optional[str]  # the safetensors name, or None when it has none


# Canonical torch dtype names (as fl_sidecar._pickle gives them) -> facts.
_DTYPES: Dict[str, _Dtype] = {
    "float64": _Dtype(8, 8, "F64"),
    "float32": _Dtype(4, 4, "F32"),
    "float16": _Dtype(2, 2, "F16"),
    "bfloat16": _Dtype(2, 2, "BF16"),
    "int64": _Dtype(8, 8, "I64"),
    "int32": _Dtype(4, 4, "I32"),
    "int16": _Dtype(2, 2, "I16"),
    "int8": _Dtype(1, 1, "I8"),
    "uint8": _Dtype(1, 1, "U8"),
    "bool": _Dtype(1, 1, "BOOL"),
    "uint16": _Dtype(2, 2, "U16"),
    "uint32": _Dtype(4, 4, "U32"),
    "uint64": _Dtype(8, 8, "U64"),
    "float8_e4m3fn": _Dtype(1, 1, "F8_E4M3"),
    "float8_e5m2": _Dtype(1, 1, "F8_E5M2"),
    "float8_e4m3fnuz": _Dtype(1, 1, "F8_E4M3FNUZ"),
    "float8_e5m2fnuz": _Dtype(1, 1, "F8_E5M2FNUZ"),
    "complex64": _Dtype(8, 4, "C64"),
    "complex128": _Dtype(16, 8, None),
}
# safetensors name -> canonical torch dtype name.
SAFETENSORS_DTYPES: Dict[str, str] = {
    d.safetensors: name for name, d in _DTYPES.items() if d.safetensors is not None
}


def _dtype(name: str) -> _Dtype:
    found = _DTYPES.get(name)
    if found is None:
        raise ModelFormatError(f"unknown dtype {name}")
    return found


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a dtype named as torch names it (``"bfloat16"`` -> 2).

    Raises:
        ModelFormatError: not a dtype this module knows.
    """
    return _dtype(name).itemsize


class ModelFormat(enum.Enum):
    """How a model file is serialized."""

    TORCH_PICKLE = "torch"
    """``torch.save`` zip archive (pickled module or state_dict)."""
    TORCHSCRIPT = "torchscript"
    """``torch.jit.save`` zip archive."""
    SAFETENSORS = "safetensors"
    """safetensors: an 8-byte header length, a JSON header, raw little-endian data."""


@dataclass(frozen=True)
class TensorInfo:
    """A named tensor of a torch archive, as a view of one storage record; no data read.

    Attributes:
        name: state_dict name (``fc1.weight``).
        dtype: torch dtype name (``"float32"``, ``"bfloat16"``).
        shape: dimensions.
        stride: strides, in elements.
        storage_offset: where the view starts in its storage, in elements.
        storage_key: the storage record (``<prefix>/data/<key>``); tied tensors share one.
    """

    name: str
    dtype: str
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    storage_offset: int
    storage_key: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.numel * dtype_itemsize(self.dtype)

    @property
    def is_contiguous(self) -> bool:
        """Whether the view's elements lie row-major one after another in its storage."""
        return _contiguous(self.shape, self.stride)


@dataclass(frozen=True)
class ArchiveDescription:
    """What a torch archive holds, read without running its pickle.

    Attributes:
        format: TORCH_PICKLE or TORCHSCRIPT.
        root_class: the pickled root object's class as ``module.Name`` (``__main__.Net``,
            ``collections.OrderedDict`` for a state_dict, ``__torch__.Net`` for TorchScript).
        is_module: the root is an ``nn.Module`` (pickled or scripted), not a bare state_dict.
        big_endian: the storages were written by a big-endian machine.
        tensors: the named tensors, in state_dict order.
    """

    format: ModelFormat
    root_class: str
    is_module: bool
    big_endian: bool
    tensors: Dict[str, TensorInfo]


# --------------------------------------------------------------------------- sources


def _is_bytes(source: object) -> bool:
    return isinstance(source, (bytes, bytearray, memoryview))


def open_source(source: Source) -> IO[bytes]:
    """Opens bytes or a file path for binary reading.

    Raises:
        OSError: the file cannot be opened.
    """
    if _is_bytes(source):
        return io.BytesIO(source)  # type: ignore[arg-type]
    return open(os.fspath(source), "rb")  # type: ignore[arg-type]


def _head(source: Source, size: int) -> bytes:
    if _is_bytes(source):
        return bytes(memoryview(source).cast("B")[:size])  # type: ignore[arg-type]
    with open(os.fspath(source), "rb") as f:  # type: ignore[arg-type]
        head: bytes = f.read(size)
    return head


def _source_size(source: Source) -> int:
    if _is_bytes(source):
        return memoryview(source).nbytes  # type: ignore[arg-type]
    return os.stat(os.fspath(source)).st_size  # type: ignore[arg-type]


def _readinto(f: Any, view: memoryview) -> int:
    # zipfile's and open()'s readers both have readinto; IO[bytes] does not declare it.
    n = f.readinto(view)
    return int(n or 0)


def read_exact(f: Any, out: memoryview, what: str) -> None:
    """Fills ``out`` from the reader ``f`` (a file or zipfile reader with ``readinto``).

    Raises:
        ModelFormatError: ``f`` ends first (``"<what> is truncated"``).
    """
    done = 0
    while done < len(out):
        n = _readinto(f, out[done:])
        if not n:
            raise ModelFormatError(f"{what} is truncated")
        done += n


def _safetensors_header_length(head: bytes, total: Optional[int]) -> Optional[int]:
    if len(head) < 9:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if length < 2 or length > _MAX_SAFETENSORS_HEADER or head[8:9] != b"{":
        return None
    if total is not None and 8 + length > total:
        return None
    return int(length)


def detect_format(source: Source) -> ModelFormat:
    """Tells how a model (bytes or a file path) is serialized, from its bytes, not its name.

    Reads the zip directory of an archive, not its pickle or data.

    Raises:
        ModelFormatError: it is none of the supported formats: not a zip, a truncated zip,
            a zip without ``data.pkl``, the legacy (pre-1.6) torch format, anything else.
        OSError: the file cannot be read.
    """
    head = _head(source, 16)
    if head.startswith(_ZIP_MAGIC):
        with _Archive(source, parse=False) as archive:
            return archive.format
    if _safetensors_header_length(head, _source_size(source)) is not None:
        return ModelFormat.SAFETENSORS
    if head.startswith(_LEGACY_MAGIC[:4]):
        raise ModelFormatError(
            "this is a legacy (pre-1.6) torch file or a bare pickle; only zip archives are"
            " supported (re-save it with a current torch)"
        )
    raise ModelFormatError("not a model file: neither a torch zip archive nor safetensors")


# --------------------------------------------------------------------------- views


def _contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def _may_overlap(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether a view may address one element twice (an expanded tensor, stride 0)."""
    extent = 1
    for size, step in sorted((d for d in zip(shape, stride) if d[0] > 1), key=lambda d: d[1]):
        if step < extent:
            return True
        extent = step * size
    return False


def _span(ref: TensorRef) -> Tuple[int, int]:
    """The elements [first, last + 1) of its storage that a non-empty view touches."""
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    return ref.offset, last + 1


# memoryview formats of 1-8 byte elements
_FORMATS: Dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _elements(buf: Any, itemsize: int) -> memoryview:
    """A 1-D view of a buffer's elements (opaque numbers: nothing is interpreted)."""
    view: memoryview = memoryview(buf).cast("B").cast(_FORMATS[itemsize])
    return view


def _row_starts(shape: Sequence[int], stride: Sequence[int], offset: int) -> Iterator[int]:
    """The first element of every innermost row of a view, in row-major order."""
    for index in itertools.product(*(range(n) for n in shape)):
        yield offset + sum(i * s for i, s in zip(index, stride))


def _gather(buf: Any, itemsize: int, ref: TensorRef, first: int) -> Iterator[bytes]:
    """The elements of a (non-empty) view, row-major, from ``buf`` holding its storage's
    elements from ``first`` on; one innermost row at a time."""
    shape, stride = ref.size, ref.stride
    offset = ref.offset - first
    if itemsize not in _FORMATS:  # 16-byte complex128: element by element
        raw = memoryview(buf).cast("B")
        for start in _row_starts(shape, stride, offset):
            yield raw[start * itemsize : (start + 1) * itemsize].tobytes()
        return
    elements = _elements(buf, itemsize)
    if not shape:
        yield elements[offset : offset + 1].tobytes()
        return
    n, step = shape[-1], stride[-1]
    for start in _row_starts(shape[:-1], stride[:-1], offset):
        if step == 0:
            yield elements[start : start + 1].tobytes() * n
        else:
            yield elements[start : start + (n - 1) * step + 1 : step].tobytes()


def _scatter(buf: Any, itemsize: int, ref: TensorRef, new: Any) -> None:
    """Writes a view's new elements (row-major in ``new``) into its storage's ``buf``.

    Where the view addresses one element more than once (stride 0), the last value
    written wins; the caller checks that they all agreed.
    """
    shape, stride = ref.size, ref.stride
    if itemsize not in _FORMATS:
        raw, src = memoryview(buf).cast("B"), memoryview(new).cast("B")
        for i, start in enumerate(_row_starts(shape, stride, ref.offset)):
            raw[start * itemsize : (start + 1) * itemsize] = src[i * itemsize : (i + 1) * itemsize]
        return
    elements, values = _elements(buf, itemsize), _elements(new, itemsize)
    if not shape:
        elements[ref.offset] = values[0]
        return
    n, step = shape[-1], stride[-1]
    pos = 0
    for start in _row_starts(shape[:-1], stride[:-1], ref.offset):
        if step == 0:
            elements[start] = values[pos + n - 1]
        else:
            elements[start : start + (n - 1) * step + 1 : step] = values[pos : pos + n]
        pos += n


def _swap(buf: Any, unit: int) -> None:
    """Reverses the byte order of every ``unit``-byte number of a writable buffer, in place."""
    if unit <= 1:
        return
    raw = memoryview(buf).cast("B")
    if not len(raw):
        return
    original = raw.tobytes()  # one copy: at most a copy buffer or one storage
    for k in range(unit):
        raw[k::unit] = original[unit - 1 - k :: unit]


# --------------------------------------------------------------------------- zip layout

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # 30 bytes
_CENTRAL_HEADER = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_END_RECORD = struct.Struct("<4sHHHHIIH")  # 22 bytes
_ZIP64_END_RECORD = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes, without extensible data
_ZIP64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
_CENTRAL_MAGIC = b"PK\x01\x02"
_END_MAGIC = b"PK\x05\x06"
_ZIP64_END_MAGIC = b"PK\x06\x06"
_LOCATOR_MAGIC = b"PK\x06\x07"
_DESCRIPTOR_MAGIC = b"PK\x07\x08"
_MAX_RECORDS = 1_000_000  # records in one archive; torch writes one per storage
_MAX_DIRECTORY_BYTES = 256 * 1024 * 1024  # the central directory, read whole
_FLAG_ENCRYPTED = 0x0001
_FLAG_DESCRIPTOR = 0x0008
_FLAG_STRONG_ENCRYPTION = 0x0040
_FLAG_PATCHED = 0x0020
_FLAG_UTF8 = 0x0800
_DOS_DIRECTORY = 0x10  # in a directory entry's external attributes
_FLAG_MASKED_DIRECTORY = 0x2000
# Flags that change how a record is read; the local header must agree on them.
_READING_FLAGS = _FLAG_ENCRYPTED | _FLAG_DESCRIPTOR | _FLAG_UTF8
_ZIP64_EXTRA = 0x0001


@dataclass(frozen=True)
class _ZipEntry:
    """One record as the central directory and its local header both describe it."""

    name: str
    flags: int
    method: int
    crc: int
    compress_size: int
    file_size: int
    header_offset: int
    data_offset: int  # where its data starts, after the local header, name and extra
    end: int  # where it ends: after its data and data descriptor


def _ambiguous(message: str) -> AmbiguousArchiveError:
    return AmbiguousArchiveError(
        f"{message}: another zip or torch reader could read this archive differently; refused"
    )


def _read_at(f: IO[bytes], offset: int, size: int) -> bytes:
    f.seek(offset)
    data: bytes = f.read(size)
    if len(data) != size:
        raise ModelFormatError("the zip archive is truncated")
    return data


def _extra_fields(extra: bytes, where: str) -> Dict[int, bytes]:
    """A zip extra field's blocks by id; malformed or repeated blocks are ambiguous."""
    fields: Dict[int, bytes] = {}
    pos = 0
    while pos < len(extra):
        if pos + 4 > len(extra):
            raise _ambiguous(f"{where} has a malformed extra field")
        tag, size = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + size > len(extra):
            raise _ambiguous(f"{where} has a malformed extra field")
        if tag in fields:
            raise _ambiguous(f"{where} repeats extra field {tag:#06x}")
        fields[tag] = extra[pos + 4 : pos + 4 + size]
        pos += 4 + size
    return fields


def _zip64_values(fields: Dict[int, bytes], marked: Sequence[bool], where: str) -> List[int]:
    """The 64-bit values a zip64 extra block gives for the fields marked 0xFFFFFFFF."""
    data = fields.get(_ZIP64_EXTRA, b"")
    wanted = sum(marked)
    if len(data) != 8 * wanted:
        raise _ambiguous(f"{where} has a zip64 extra field that does not match its marked sizes")
    return list(struct.unpack(f"<{wanted}Q", data)) if wanted else []


def _check_name(raw: bytes, flags: int, seen: Dict[str, str]) -> str:
    """Decodes a record name the way every reader does, or refuses it."""
    if flags & _FLAG_UTF8:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _ambiguous(f"record name {raw!r} is not UTF-8 although flagged so") from None
    else:
        if any(b >= 0x80 for b in raw):
            # zipfile decodes it as cp437, torch compares raw bytes: they disagree.
            raise _ambiguous(f"record name {raw!r} is not ASCII and not flagged UTF-8")
        name = raw.decode("ascii")
    shown = repr(name)
    if not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise _ambiguous(f"record name {shown} is empty or holds control characters")
    if "\\" in name or name.startswith("/"):
        raise _ambiguous(f"record name {shown} has a backslash or a leading slash")
    parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise _ambiguous(f"record name {shown} has an empty, '.' or '..' component")
    # Readers on case-insensitive file systems, or that fold case or normalise Unicode
    # (macOS writes NFD), would see one record.
    key = unicodedata.normalize("NFC", name.rstrip("/")).casefold()
    if key in seen:
        raise _ambiguous(f"records {seen[key]} and {shown} have the same name")
    seen[key] = shown
    return name


def _end_records(f: IO[bytes], total: int) -> Tuple[int, int, int, int]:
    """(record count, directory offset, directory size, where the directory must end)."""
    if total < _END_RECORD.size + _LOCAL_HEADER.size:
        raise ModelFormatError("not a readable zip archive: too short")
    end = _read_at(f, total - _END_RECORD.size, _END_RECORD.size)
    magic, disk, cd_disk, disk_count, count, cd_size, cd_offset, comment = _END_RECORD.unpack(end)
    if magic != _END_MAGIC:
        f.seek(max(0, total - 65557))
        if _END_MAGIC in f.read():
            raise _ambiguous("data or a comment follows the end of the archive")
        raise ModelFormatError("not a readable zip archive: no end of central directory")
    if comment:
        raise _ambiguous("the end record announces a comment the file does not hold")
    if disk or cd_disk or disk_count != count:
        raise _ambiguous("the archive claims to span several disks")
    directory_end = total - _END_RECORD.size
    locator_at = directory_end - _ZIP64_LOCATOR.size
    has_zip64 = locator_at >= 0 and _read_at(f, locator_at, 4) == _LOCATOR_MAGIC
    if not has_zip64:
        if _ZIP64_MARK in (cd_size, cd_offset) or count == 0xFFFF:
            raise _ambiguous("the end record marks zip64 fields but there is no zip64 record")
        return count, cd_offset, cd_size, directory_end
    magic, locator_disk, end64_at, disks = _ZIP64_LOCATOR.unpack(
        _read_at(f, locator_at, _ZIP64_LOCATOR.size)
    )
    if locator_disk != 0 or disks != 1:
        raise _ambiguous("the zip64 locator claims several disks")
    if end64_at != locator_at - _ZIP64_END_RECORD.size:
        raise _ambiguous("the zip64 end record is not where its locator says")
    (
        magic,
        record_size,
        _made,
        _needed,
        disk,
        cd_disk,
        disk_count,
        count64,
        cd_size64,
        cd_offset64,
    ) = _ZIP64_END_RECORD.unpack(_read_at(f, end64_at, _ZIP64_END_RECORD.size))
    if magic != _ZIP64_END_MAGIC or record_size != _ZIP64_END_RECORD.size - 12:
        raise _ambiguous("the zip64 end record is malformed or has extensible data")
    if disk or cd_disk or disk_count != count64:
        raise _ambiguous("the zip64 end record claims several disks")
    for narrow, wide, mark in (
        (count, count64, 0xFFFF),
        (cd_size, cd_size64, _ZIP64_MARK),
        (cd_offset, cd_offset64, _ZIP64_MARK),
    ):
        if narrow != wide and narrow != mark:
            raise _ambiguous("the end record and the zip64 end record disagree")
    return count64, cd_offset64, cd_size64, end64_at


def _central_directory(f: IO[bytes], total: int) -> List[_ZipEntry]:
    """Parses and cross-checks a zip's directory and local headers; see :func:`_check_layout`."""
    count, cd_offset, cd_size, directory_end = _end_records(f, total)
    if cd_offset + cd_size != directory_end:
        raise _ambiguous("the central directory does not end where the end record starts")
    if not count:
        raise ModelFormatError("the zip archive is empty")
    if count > _MAX_RECORDS or cd_size > _MAX_DIRECTORY_BYTES:
        raise ModelLimitExceededError(
            f"the zip archive has more than {_MAX_RECORDS} records or a directory over"
            f" {_MAX_DIRECTORY_BYTES} bytes"
        )
    directory = _read_at(f, cd_offset, cd_size)
    pos = 0
    seen: Dict[str, str] = {}
    entries: List[_ZipEntry] = []
    for _ in range(count):
        if pos + _CENTRAL_HEADER.size > len(directory):
            raise _ambiguous("the central directory holds fewer records than it says")
        (
            magic,
            _made,
            _needed,
            flags,
            method,
            _time,
            _date,
            crc,
            csize,
            usize,
            name_len,
            extra_len,
            comment_len,
            disk,
            _internal,
            external,
            offset,
        ) = _CENTRAL_HEADER.unpack_from(directory, pos)
        if magic != _CENTRAL_MAGIC:
            raise _ambiguous("the central directory is malformed")
        start = pos + _CENTRAL_HEADER.size
        pos = start + name_len + extra_len + comment_len
        if pos > len(directory):
            raise _ambiguous("a central directory record runs past the directory")
        raw = directory[start : start + name_len]
        name = _check_name(raw, flags, seen)
        where = f"record {name!r}"
        if flags & (_FLAG_ENCRYPTED | _FLAG_STRONG_ENCRYPTION | _FLAG_MASKED_DIRECTORY):
            raise ModelFormatError(f"{where} is encrypted")
        if flags & _FLAG_PATCHED:
            raise ModelFormatError(f"{where} holds patch data, which no torch reader applies")
        if external & _DOS_DIRECTORY and not name.endswith("/"):
            # miniz (torch's reader) takes the DOS directory attribute for a directory
            # and reads no data; zipfile goes by the name and reads the record.
            raise _ambiguous(f"{where} is marked as a directory but named as a file")
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ModelFormatError(f"{where} uses compression method {method}")
        if disk == 0xFFFF or disk:
            raise _ambiguous(f"{where} claims another disk")
        fields = _extra_fields(directory[start + name_len : start + name_len + extra_len], where)
        marked = [usize == _ZIP64_MARK, csize == _ZIP64_MARK, offset == _ZIP64_MARK]
        wide = iter(_zip64_values(fields, marked, where))
        usize = next(wide) if marked[0] else usize
        csize = next(wide) if marked[1] else csize
        offset = next(wide) if marked[2] else offset
        if method == zipfile.ZIP_STORED and csize != usize:
            raise _ambiguous(f"{where} is stored but its compressed and real sizes differ")
        if name.endswith("/") and usize:
            raise _ambiguous(f"{where} is a directory that holds data")
        entries.append(_local_header(f, raw, name, flags, method, crc, csize, usize, offset))
    if pos != len(directory):
        raise _ambiguous("the central directory holds more than its records")
    _check_tiling(f, entries, cd_offset)
    return entries


def _local_header(
    f: IO[bytes],
    raw: bytes,
    name: str,
    flags: int,
    method: int,
    crc: int,
    csize: int,
    usize: int,
    offset: int,
) -> _ZipEntry:
    """Checks a record's local header against its central directory record."""
    where = f"record {name!r}"
    (
        magic,
        _needed,
        local_flags,
        local_method,
        _time,
        _date,
        local_crc,
        local_csize,
        local_usize,
        name_len,
        extra_len,
    ) = _LOCAL_HEADER.unpack(_read_at(f, offset, _LOCAL_HEADER.size))
    if magic != _ZIP_MAGIC:
        raise _ambiguous(f"{where} has no local header where the directory says")
    if (local_flags ^ flags) & _READING_FLAGS or local_method != method:
        raise _ambiguous(f"{where}: the local header's flags or method differ from the directory's")
    if _read_at(f, offset + _LOCAL_HEADER.size, name_len) != raw:
        raise _ambiguous(f"{where}: the local header names another record")
    fields = _extra_fields(
        _read_at(f, offset + _LOCAL_HEADER.size + name_len, extra_len), f"{where}'s local header"
    )
    if _ZIP64_EXTRA in fields:
        # A local zip64 block holds both sizes, whichever are marked.
        if len(fields[_ZIP64_EXTRA]) != 16 or _ZIP64_MARK not in (local_csize, local_usize):
            raise _ambiguous(f"{where}: the local header's zip64 field is malformed")
        wide_usize, wide_csize = struct.unpack("<QQ", fields[_ZIP64_EXTRA])
        local_usize = wide_usize if local_usize == _ZIP64_MARK else local_usize
        local_csize = wide_csize if local_csize == _ZIP64_MARK else local_csize
    # With a data descriptor the local header may leave CRC and sizes zero (miniz, our
    # writer); every value it does give must be the directory's.
    for given, expected in ((local_crc, crc), (local_csize, csize), (local_usize, usize)):
        if given != expected and not (flags & _FLAG_DESCRIPTOR and given == 0):
            raise _ambiguous(
                f"{where}: the local header's sizes or CRC differ from the directory's"
            )
    data_offset = offset + _LOCAL_HEADER.size + name_len + extra_len
    return _ZipEntry(
        name, flags, method, crc, csize, usize, offset, data_offset, data_offset + csize
    )


def _check_tiling(f: IO[bytes], entries: Sequence[_ZipEntry], cd_offset: int) -> None:
    """Records must follow each other from byte 0 to the directory: no gaps, no overlaps."""
    ordered = sorted(entries, key=lambda e: e.header_offset)
    if ordered[0].header_offset != 0:
        raise _ambiguous("data precedes the first record")
    for i, entry in enumerate(ordered):
        boundary = ordered[i + 1].header_offset if i + 1 < len(ordered) else cd_offset
        end = entry.end
        if end > boundary:
            raise _ambiguous(f"record {entry.name!r} overlaps what follows it")
        if entry.flags & _FLAG_DESCRIPTOR:
            end = _descriptor_end(f, entry, boundary)
        if end != boundary:
            raise _ambiguous(f"unaccounted bytes follow record {entry.name!r}")


def _descriptor_end(f: IO[bytes], entry: _ZipEntry, boundary: int) -> int:
    """Where a record's data descriptor ends, if exactly one layout of it fits and agrees."""
    gap = _read_at(f, entry.end, min(boundary - entry.end, 24))
    fits = []
    for magic in (True, False):
        for wide in (False, True):
            size = (4 if magic else 0) + 4 + (16 if wide else 8)
            if len(gap) != size or (magic and gap[:4] != _DESCRIPTOR_MAGIC):
                continue
            body = gap[4:] if magic else gap
            crc, csize, usize = struct.unpack("<IQQ" if wide else "<III", body)
            if (crc, csize, usize) == (entry.crc, entry.compress_size, entry.file_size):
                fits.append(size)
    if len(fits) != 1:
        raise _ambiguous(f"record {entry.name!r}'s data descriptor is missing or disagrees")
    return entry.end + fits[0]


def _check_layout(f: IO[bytes], total: int) -> Dict[str, _ZipEntry]:
    """Parses a zip strictly: the records by name, or AmbiguousArchiveError.

    Refused, because some reader would see a different archive: data before the first
    record or after the end record (a prepended pickle, an appended zip, a comment),
    gaps between or overlaps of records, local headers whose name, flags, method,
    CRC or sizes differ from the directory's, a stored record whose sizes differ,
    zip64 records that disagree with the end record, several disks, duplicate names
    (also when they differ only in case), names that readers normalise (``./``,
    ``..``, backslashes, a leading slash), and non-ASCII names not flagged UTF-8.

    Raises:
        AmbiguousArchiveError: as above.
        ModelFormatError: not a zip, truncated, encrypted, an unknown compression.
        ModelLimitExceededError: over a million records, or a huge directory.
    """
    head = _read_at(f, 0, min(total, 16))
    if not head.startswith(_ZIP_MAGIC):
        _refuse_non_zip(f, head, total)
    return {entry.name: entry for entry in _central_directory(f, total)}


def _refuse_non_zip(f: IO[bytes], head: bytes, total: int) -> None:
    """Says why a file that does not start with a zip record is no torch archive."""
    f.seek(max(0, total - 65557))
    if _END_MAGIC in f.read():
        # torch.load takes a file that does not start with a local header for a legacy
        # pickle and runs it: a zip directory at the end must not make it look vetted.
        raise _ambiguous("the file ends as a zip archive but does not start as one")
    if _safetensors_header_length(head, None) is not None:
        raise ModelFormatError("this is safetensors, not a torch archive: use from_safetensors")
    if head.startswith(_LEGACY_MAGIC[:4]):
        raise ModelFormatError(
            "this is a legacy (pre-1.6) torch file or a bare pickle; only zip archives are"
            " supported (re-save it with a current torch)"
        )
    raise ModelFormatError("not a readable zip archive: it does not start with a zip record")


# --------------------------------------------------------------------------- archive


class _Archive:
    """A torch zip archive opened for restricted reading (the pickle never runs).

    ``opened``: an open binary file to read instead of opening ``source`` (it is left
    open on close), so that a caller can vet and then load the very same file.
    """

    def __init__(
        self,
        source: Source,
        *,
        parse: bool = True,
        limits: ReadLimits = DEFAULT_LIMITS,
        should_stop: Optional[StopCheck] = None,
        opened: Optional[IO[bytes]] = None,
    ) -> None:
        self._owns_file = opened is None
        self._file = open_source(source) if opened is None else opened
        self.limits = limits
        self.should_stop = should_stop
        try:
            self._open(parse)
        except BaseException:
            if self._owns_file:
                self._file.close()
            raise

    def _open(self, parse: bool) -> None:
        self._total = self._file.seek(0, os.SEEK_END)  # bytes
        self._file.seek(0)
        head = self._file.read(16)
        if not head.startswith(_ZIP_MAGIC):
            _refuse_non_zip(self._file, head, self._total)
        self._entries = _check_layout(self._file, self._total)
        try:
            self._file.seek(0)
            self.zip = zipfile.ZipFile(self._file)
            infos = self.zip.infolist()
        except (
            zipfile.BadZipFile,
            zipfile.LargeZipFile,
            EOFError,
            ValueError,
            NotImplementedError,
        ) as exc:  # NotImplementedError: a "version needed" beyond zipfile's
            raise ModelFormatError(f"not a readable zip archive: {exc}") from exc
        try:
            self._check_zipfile_agrees(infos)
        except BaseException:
            self.zip.close()
            raise
        # torch names the archive after its first record's directory, as does its reader.
        first = infos[0].filename
        if "/" not in first:
            raise ModelFormatError("not a torch archive: records are not in a directory")
        self.prefix = first.split("/", 1)[0]
        self.records: Dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if not info.filename.startswith(self.prefix + "/"):
                raise _ambiguous(
                    f"record {info.filename!r} lies outside the archive's folder {self.prefix!r}"
                )
            self.records[info.filename[len(self.prefix) + 1 :]] = info
        pkl = self.records.get("data.pkl")
        if pkl is None:
            raise ModelFormatError("not a torch archive: it has no data.pkl")
        if pkl.file_size > _MAX_PICKLE_SIZE:
            raise ModelFormatError(f"data.pkl is implausibly large ({pkl.file_size} bytes)")
        for info in self.records.values():
            _check_plausible_size(info, self._total)
        self.format = (
            ModelFormat.TORCHSCRIPT
            if "constants.pkl" in self.records or any(r.startswith("code/") for r in self.records)
            else ModelFormat.TORCH_PICKLE
        )
        order = self._read_small("byteorder", 16)
        self.big_endian = order == b"big"
        if order is not None and order not in (b"little", b"big"):
            raise ModelFormatError(f"unknown byte order {order!r}")
        self._code_cache: Dict[str, Optional[str]] = {}
        self.script_classes: Dict[str, Dict[str, _ScriptClass]] = {}  # by code module
        self.walk_steps = 0  # how much work naming the tensors took (see _Collector)
        if not parse:
            return
        self.root, self.storages = restricted_loads(
            self.read_record(pkl), limits=self.limits, should_stop=self.should_stop
        )
        self.tensors = _collect_tensors(self)
        self.storage_dtypes = self._check_storages()

    def _check_zipfile_agrees(self, infos: Sequence[zipfile.ZipInfo]) -> None:
        """zipfile (which inflates records) must see exactly the records we checked."""
        ours = list(self._entries.values())
        if len(infos) != len(ours):
            raise _ambiguous("zipfile sees a different number of records")
        for info, entry in zip(infos, ours):
            if (
                info.filename,
                info.header_offset,
                info.compress_size,
                info.file_size,
                info.compress_type,
                info.CRC,
            ) != (
                entry.name,
                entry.header_offset,
                entry.compress_size,
                entry.file_size,
                entry.method,
                entry.crc,
            ):
                raise _ambiguous(f"zipfile reads record {entry.name!r} differently")

    @property
    def record_names(self) -> List[str]:
        """Every record's name (prefix included), in directory order."""
        return list(self._entries)

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.zip.close()
        if self._owns_file:
            self._file.close()

    def read_record(self, info: zipfile.ZipInfo) -> bytes:
        """A whole record's bytes (only for small records: the pickle, code, flags)."""
        with _corrupt_as_format_error(info):
            return self.zip.read(info)

    def _read_small(self, name: str, limit: int) -> Optional[bytes]:
        info = self.records.get(name)
        if info is None:
            return None
        if info.file_size > limit:
            raise ModelFormatError(f"record {name} is implausibly large")
        return self.read_record(info).strip()

    def code(self, module: str) -> Optional[str]:
        """The TorchScript source of a ``__torch__`` module, or None."""
        if module in self._code_cache:
            return self._code_cache[module]
        text: Optional[str] = None
        info = self.records.get("code/" + module.replace(".", "/") + ".py")
        if info is not None and info.file_size <= _MAX_CODE_SIZE:
            text = self.read_record(info).decode("utf-8", errors="replace")
        self._code_cache[module] = text
        return text

    def _check_storages(self) -> Dict[str, str]:
        """Validates every named tensor's view against its storage; returns element dtypes."""
        element: Dict[str, str] = {}
        for name, ref in self.tensors.items():
            itemsize = _dtype(ref.dtype).itemsize
            storage = ref.storage
            nbytes = storage.numel * _dtype(storage.dtype).itemsize
            if storage.dtype != ref.dtype and storage.dtype != "uint8":
                raise ModelFormatError(f"tensor {name} has a dtype other than its storage's")
            unit = storage.dtype if storage.dtype != "uint8" else ref.dtype
            if element.setdefault(storage.key, unit) != unit:
                raise ModelFormatError(f"storage {storage.key} is viewed as different dtypes")
            if ref.size and min(ref.size) == 0:
                continue
            if _span(ref)[1] > nbytes // itemsize:
                raise ModelFormatError(f"tensor {name} reaches past the end of its storage")
        # Every storage the pickle refers to must be a record of exactly its declared
        # size, so declared sizes never exceed what the file holds.
        for key, storage in self.storages.items():
            info = self.records.get(f"data/{key}")
            if info is None:
                raise ModelFormatError(f"storage record data/{key} is missing")
            expected = storage.numel * _dtype(storage.dtype).itemsize
            if info.file_size != expected:
                raise ModelFormatError(
                    f"storage record data/{key} holds {info.file_size} bytes, expected {expected}"
                )
        return element

    def swap_unit(self, key: str) -> int:
        """Bytes per number to swap when this storage's byte order is not little-endian."""
        return _dtype(self.storage_dtypes[key]).swap_unit if self.big_endian else 1

    def data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a record's data starts in the file: after its local header, name and extra."""
        return self._entries[info.filename].data_offset

    def iter_record(
        self, info: zipfile.ZipInfo, start: int = 0, length: Optional[int] = None
    ) -> Iterator[memoryview]:
        """Streams bytes [start, start + length) of a record, as stored, in buffer-sized pieces.

        Each piece is valid until the next is asked for. A stored record is read straight
        from the file, skipping the CRC as torch's reader does; a deflated one through
        zipfile, which checks it.

        Raises:
            ModelFormatError: the record is shorter than it says, or corrupt.
        """
        end = info.file_size if length is None else start + length
        _check_range(info, start, end)
        buf = memoryview(bytearray(min(CHUNK_BYTES, end - start)))
        with _corrupt_as_format_error(info):
            if info.compress_type == zipfile.ZIP_STORED:
                self._file.seek(self.data_offset(info) + start)
                yield from _pieces(self._file, buf, end - start, info.filename)
            else:
                with self.zip.open(info) as reader:
                    skipped = 0
                    scratch = memoryview(bytearray(min(CHUNK_BYTES, max(start, 1))))
                    while skipped < start:
                        n = _readinto(reader, scratch[: min(len(scratch), start - skipped)])
                        if not n:
                            raise ModelFormatError(f"record {info.filename} is truncated")
                        skipped += n
                    yield from _pieces(reader, buf, end - start, info.filename)

    def read_range(self, info: zipfile.ZipInfo, start: int, out: memoryview) -> None:
        """Fills ``out`` with the record's bytes from ``start`` (as stored, no byte swap).

        Raises:
            ModelFormatError: the record is truncated or corrupt.
        """
        if info.compress_type == zipfile.ZIP_STORED:
            # Straight from the file into ``out``: no second copy through a buffer.
            _check_range(info, start, start + len(out))
            with _corrupt_as_format_error(info):
                self._file.seek(self.data_offset(info) + start)
                read_exact(self._file, out, f"record {info.filename}")
            return
        done = 0
        for piece in self.iter_record(info, start, len(out)):
            out[done : done + len(piece)] = piece
            done += len(piece)

    def read_storage_into(self, key: str, out: memoryview) -> None:
        """Fills ``out`` (the record's size) with a storage's bytes in little-endian order.

        Raises:
            ModelFormatError: the record is truncated or corrupt.
        """
        self.read_range(self.records[f"data/{key}"], 0, out)
        _swap(out, self.swap_unit(key))

    def by_storage(self) -> Dict[str, List[Tuple[str, TensorRef]]]:
        groups: Dict[str, List[Tuple[str, TensorRef]]] = {}
        for name, ref in self.tensors.items():
            groups.setdefault(ref.storage.key, []).append((name, ref))
        return groups

    def info(self, name: str) -> TensorInfo:
        ref = self.tensors[name]
        return TensorInfo(name, ref.dtype, ref.size, ref.stride, ref.offset, ref.storage.key)


def _check_plausible_size(info: zipfile.ZipInfo, total: int) -> None:
    """Refuses a record whose sizes cannot be true, before anything is allocated for it.

    torch stores records uncompressed; another tool may deflate them, but never past
    deflate's own ratio limit (about 1032:1): beyond it is a zip bomb. The layout check
    has already made every record's stored bytes lie within the file.
    """
    if info.compress_type == zipfile.ZIP_STORED:
        plausible = info.compress_size == info.file_size
    else:
        plausible = info.file_size <= 1032 * info.compress_size + 1024
    if not plausible or info.header_offset + info.compress_size > total:
        raise ModelFormatError(f"record {info.filename} declares an implausible size")


def _check_range(info: zipfile.ZipInfo, start: int, end: int) -> None:
    if start < 0 or end > info.file_size or start > end:
        raise ModelFormatError(f"record {info.filename}: range outside the record")


@contextlib.contextmanager
def _corrupt_as_format_error(info: zipfile.ZipInfo) -> Iterator[None]:
    """Reading a record: BadZipFile, EOFError, zlib.error... all mean it is corrupt."""
    try:
        yield
    except ModelFormatError:
        raise
    except Exception as exc:
        raise ModelFormatError(f"record {info.filename} is corrupt: {exc}") from exc


def _pieces(reader: Any, buf: memoryview, remaining: int, what: str) -> Iterator[memoryview]:
    while remaining > 0:
        want = min(len(buf), remaining)
        read_exact(reader, buf[:want], f"record {what}")
        remaining -= want
        yield buf[:want]


# --------------------------------------------------------------------------- naming


_CLASS_LINE = re.compile(r"^class (\w+)\((\w*)\):[ \t]*$", re.MULTILINE)
_NAME_LIST = re.compile(r"^[ \t]+(__parameters__|__buffers__) = \[([^\]\n]*)\]", re.MULTILINE)
_QUOTED = re.compile(r"\"([^\"\n]*)\"")


_ScriptClass = Tuple[List[str], List[str], bool]  # parameters, buffers, is_module


def _parse_script_classes(text: str) -> Dict[str, _ScriptClass]:
    """Every class of a TorchScript code file, parsed once (text, never run).

    The first definition of a name wins, as a reader scanning for it would find.
    """
    classes: Dict[str, _ScriptClass] = {}
    matches = list(_CLASS_LINE.finditer(text))
    for i, match in enumerate(matches):
        if match.group(1) in classes:
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : end]
        lists: Dict[str, List[str]] = {"__parameters__": [], "__buffers__": []}
        for found in _NAME_LIST.finditer(body):
            lists[found.group(1)] = _QUOTED.findall(found.group(2))
        classes[match.group(1)] = (
            lists["__parameters__"],
            lists["__buffers__"],
            match.group(2) == "Module",
        )
    return classes


def _script_class(archive: _Archive, obj: Placeholder) -> Optional[_ScriptClass]:
    """(parameters, buffers, is_module) of a TorchScript class, parsed from its code, not run.

    Each code file is parsed once per archive, however many objects of its classes the
    pickle holds (scanning a 16 MiB file once per object would be a CPU sink).
    """
    cls = type(obj)
    classes = archive.script_classes.get(cls.pickle_module)
    if classes is None:
        text = archive.code(cls.pickle_module)
        classes = _parse_script_classes(text) if text is not None else {}
        archive.script_classes[cls.pickle_module] = classes
    return classes.get(cls.pickle_name)


# (name relative to the object, tensor) pairs an object holds, in state_dict order
_Named = List[Tuple[str, TensorRef]]


def _join(key: object, name: str) -> str:
    return f"{key}.{name}" if name else str(key)


class _Collector:
    """Names the tensors under the pickle's root, as ``state_dict()`` would.

    Memoised by object identity: a sub-object shared by several containers (a DAG, as
    a tied submodule makes, or a hostile pickle repeating one list 2**40 times over) is
    walked once, and its names are reused under each of its parents. Every step counts
    against :attr:`ReadLimits.max_walk_steps`; ``steps`` tells how many were taken.
    """

    def __init__(self, archive: _Archive) -> None:
        self.archive = archive
        self.limits: ReadLimits = archive.limits
        self.should_stop: Optional[StopCheck] = archive.should_stop
        self.memo: Dict[int, _Named] = {}
        self.path: set[int] = set()
        self.steps = 0
        self._next_check = STOP_CHECK_INTERVAL

    def step(self, units: int = 1) -> None:
        self.steps += units
        if self.steps > self.limits.max_walk_steps:
            raise ModelLimitExceededError(
                f"naming the model's tensors exceeds the reader's limit of"
                f" {self.limits.max_walk_steps} walk steps (objects visited and names made)"
            )
        if self.steps >= self._next_check:
            self._next_check = self.steps + STOP_CHECK_INTERVAL
            check_stop(self.should_stop)

    def adopt(self, out: _Named, key: str, named: _Named) -> None:
        """Appends a child's names under ``key``, paying for each name made."""
        if len(out) + len(named) > self.limits.max_tensors:
            raise ModelLimitExceededError(
                f"the model names more than the reader's limit of {self.limits.max_tensors} tensors"
            )
        for name, ref in named:
            full = _join(key, name)
            self.step(1 + len(full) // 64)
            out.append((full, ref))

    def any(self, obj: object, depth: int) -> _Named:
        self.step()
        if isinstance(obj, TensorRef):
            return [("", obj)]
        if not isinstance(obj, (Placeholder, dict, list, tuple)):
            return []
        known = self.memo.get(id(obj))
        if known is not None:
            return known
        if depth > self.limits.max_depth:
            raise ModelLimitExceededError(
                f"the model nests too deeply (the reader's limit is {self.limits.max_depth} levels)"
            )
        if id(obj) in self.path:
            raise ModelFormatError("the model contains itself")
        self.path.add(id(obj))
        out: _Named = []
        try:
            if isinstance(obj, Placeholder):
                state = obj.state_dict_view()
                if state is not None and isinstance(state.get("_parameters"), dict):
                    self.module(state, out, depth)
                elif type(obj).pickle_module.startswith("__torch__"):
                    self.script(obj, out, depth)
                elif state is not None:
                    self.mapping(state, out, depth)
            elif isinstance(obj, dict):
                self.mapping(obj, out, depth)
            else:
                for i, item in enumerate(obj):
                    self.adopt(out, str(i), self.any(item, depth + 1))
        finally:
            self.path.discard(id(obj))
        self.memo[id(obj)] = out
        return out

    def mapping(self, state: Dict[Any, Any], out: _Named, depth: int) -> None:
        for key, value in state.items():
            if isinstance(key, str):
                self.adopt(out, key, self.any(value, depth + 1))

    def tensor(self, out: _Named, key: str, value: object) -> None:
        if isinstance(value, TensorRef):
            self.adopt(out, key, [("", value)])

    def module(self, state: Dict[Any, Any], out: _Named, depth: int) -> None:
        # nn.Module.state_dict order: own parameters, own persistent buffers, children.
        for key, value in state["_parameters"].items():
            self.tensor(out, key, value)
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        buffers = state.get("_buffers")
        if isinstance(buffers, dict):
            for key, value in buffers.items():
                if key not in skip:
                    self.tensor(out, key, value)
        children = state.get("_modules")
        if isinstance(children, dict):
            for key, child in children.items():
                if isinstance(child, Placeholder):
                    self.adopt(out, key, self.any(child, depth + 1))

    def script(self, obj: Placeholder, out: _Named, depth: int) -> None:
        # A TorchScript object keeps parameters and buffers as plain attributes; its
        # class code lists which are which, as RecursiveScriptModule.state_dict() uses.
        state = obj.state_dict_view() or {}
        info = _script_class(self.archive, obj)
        if info is None:
            names = [k for k, v in state.items() if isinstance(v, TensorRef)]
        else:
            names = info[0] + info[1]
        for key in names:
            self.tensor(out, key, state.get(key))
        for key, value in state.items():
            if isinstance(value, Placeholder) and isinstance(key, str):
                child = _script_class(self.archive, value)
                if child is None or child[2]:
                    self.adopt(out, key, self.any(value, depth + 1))


def _collect_tensors(archive: _Archive) -> Dict[str, TensorRef]:
    collector = _Collector(archive)
    try:
        named = collector.any(archive.root, 0)
    except RecursionError as exc:  # a deep stack on entry; the depth limit covers the rest
        raise ModelLimitExceededError("the model nests too deeply") from exc
    archive.walk_steps = collector.steps
    out: Dict[str, TensorRef] = {}
    for name, ref in named:
        if out.setdefault(name, ref) is not ref:
            raise ModelFormatError(f"two different tensors are named {name!r}")
    for ref in out.values():
        _dtype(ref.dtype)  # an allow-listed name this module has no facts for is refused
    return out


def _root_facts(archive: _Archive) -> Tuple[str, bool]:
    root = archive.root
    if isinstance(root, Placeholder):
        state = root.state_dict_view()
        is_module = archive.format is ModelFormat.TORCHSCRIPT or (
            state is not None and isinstance(state.get("_parameters"), dict)
        )
        return root.qualified_name, is_module
    if isinstance(root, dict):
        return ("collections.OrderedDict" if isinstance(root, SafeOrderedDict) else "dict"), False
    return type(root).__name__, False


def describe(
    source: Source,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
    should_stop: Optional[StopCheck] = None,
) -> ArchiveDescription:
    """Reads what a torch archive (bytes or path) holds, without its tensor data.

    Only the zip directory and the pickle are read (restricted: nothing it names is
    imported or called), so memory is about the pickle's size, a few MiB for a 1 GiB
    model. This is the vetting step: an archive it accepts is read by ``torch.load``
    as the same records (see :class:`~fl_sidecar.errors.AmbiguousArchiveError`).

    Args:
        source: the archive's bytes, or a path.
        limits: budgets on the reader's work and memory.
        should_stop: called every few thousand steps; True stops the reading.

    Raises:
        AmbiguousArchiveError: another zip or torch reader could read it differently.
        ModelLimitExceededError: reading it would exceed one of ``limits``.
        ModelFormatError: not a torch zip archive, or a malformed one.
        UnsafePickleError: its pickle asks for more than rebuilding tensors; nothing ran.
        ModelReadCancelledError: ``should_stop`` returned True.
        OSError: the file cannot be read.
    """
    with _Archive(source, limits=limits, should_stop=should_stop) as archive:
        root_class, is_module = _root_facts(archive)
        tensors = {name: archive.info(name) for name in archive.tensors}
        return ArchiveDescription(
            archive.format, root_class, is_module, archive.big_endian, tensors
        )


def list_tensors(source: Source) -> Dict[str, TensorInfo]:
    """The named tensors of an archive (bytes or path), in state_dict order, without data.

    Raises:
        ModelFormatError, UnsafePickleError, OSError: as :func:`describe`.
    """
    return describe(source).tensors


# --------------------------------------------------------------------------- safetensors


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file.

    Attributes:
        dtype: torch dtype name (``"float32"``).
        shape: dimensions.
        begin, end: its bytes, relative to the start of the data (after the header).
    """

    dtype: str
    shape: Tuple[int, ...]
    begin: int
    end: int


def read_safetensors_header(source: Source) -> Tuple[Dict[str, SafetensorsEntry], int]:
    """Parses and checks a safetensors header (bytes or a path), reading no tensor data.

    Returns:
        the entries by name (``__metadata__`` left out), and where the data starts in
        the file, in bytes.

    Raises:
        ModelFormatError: not valid safetensors (a header that does not fit, is not JSON,
            an unknown dtype, an entry outside the data or of the wrong size).
        OSError: the file cannot be read.
    """
    total = _source_size(source)
    with open_source(source) as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError("not safetensors: shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_SAFETENSORS_HEADER or 8 + length > total:
            raise ModelFormatError(f"not safetensors: header length {length} does not fit")
        raw = f.read(length)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ModelFormatError(f"not safetensors: the header is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ModelFormatError("not safetensors: the header is not a JSON object")
    data_size = total - 8 - length
    header: Dict[str, SafetensorsEntry] = {}
    for name, entry in parsed.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"safetensors entry {name!r} is malformed") from exc
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelFormatError(f"safetensors entry {name!r} has an invalid shape")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise ModelFormatError(f"safetensors entry {name!r} points outside the data")
        if end - begin != math.prod(shape) * _dtype(dtype).itemsize:
            raise ModelFormatError(f"safetensors entry {name!r} has the wrong data size")
        header[name] = SafetensorsEntry(dtype, shape, begin, end)
    return header, 8 + length


def safetensors_header(specs: Mapping[str, Tuple[Sequence[int], str]]) -> Tuple[bytes, List[str]]:
    """The safetensors header for named (shape, torch dtype name) tensors, and the data order.

    Data go in order of decreasing element size, as the safetensors library lays them
    out: with the header padded to 8 bytes, every tensor starts aligned to its element
    size. The header includes its 8-byte length.

    Raises:
        TensorMismatchError: a dtype has no safetensors name.
    """
    for name, (_shape, dtype) in specs.items():
        if _DTYPES.get(dtype, _Dtype(0, 0, None)).safetensors is None:
            raise TensorMismatchError(f"safetensors cannot hold tensor {name!r} of torch.{dtype}")
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    order = sorted(specs, key=lambda n: -_DTYPES[specs[n][1]].itemsize)
    offset = 0
    for name in order:
        shape, dtype = specs[name]
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        header[name] = {
            "dtype": _DTYPES[dtype].safetensors,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order


def atomic_write(dest: PathLike, produce: Callable[[IO[bytes]], None]) -> None:
    """Writes a file through a temporary sibling and a rename: never a half-written dest.

    ``produce`` writes the content to the open temporary file; if it raises, the
    temporary file is removed and ``dest`` is left as it was.

    Raises:
        OSError: the file cannot be written; whatever ``produce`` raises.
    """
    path = os.fspath(dest)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fl-sidecar-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            produce(f)
        # No fsync: these files are derived and can be made again; the rename alone keeps
        # a reader from ever seeing a half-written file.
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class _Sink(Protocol):
    def write(self, __data: Union[bytes, bytearray, memoryview]) -> int: ...


def _write_view(archive: _Archive, ref: TensorRef, out: _Sink) -> None:
    """Writes a tensor view's bytes, row-major and little-endian, to ``out``."""
    itemsize = _dtype(ref.dtype).itemsize
    numel = math.prod(ref.size)
    if numel == 0:
        return
    info = archive.records[f"data/{ref.storage.key}"]
    unit = archive.swap_unit(ref.storage.key)
    if _contiguous(ref.size, ref.stride):
        for piece in archive.iter_record(info, ref.offset * itemsize, numel * itemsize):
            _swap(piece, unit)  # pieces are whole numbers: the buffer is a multiple of 16
            out.write(piece)
        return
    # A strided view (a transpose, a column slice) is gathered from its storage span:
    # rare in saved models, and bounded by that one storage.
    first, end = _span(ref)
    span = bytearray((end - first) * itemsize)
    archive.read_range(info, first * itemsize, memoryview(span))
    _swap(span, unit)
    pending: List[bytes] = []
    size = 0
    for row in _gather(span, itemsize, ref, first):
        pending.append(row)
        size += len(row)
        if size >= CHUNK_BYTES:
            out.write(b"".join(pending))
            pending, size = [], 0
    out.write(b"".join(pending))


def _check_expansion(archive: _Archive) -> None:
    """Refuses tensors that would write far more than their storages hold.

    Tied names each get their own copy and an expanded view (stride 0) writes every
    element it repeats: a tiny hostile archive could otherwise fill the disk.
    """
    stored = sum(
        archive.records[f"data/{key}"].file_size
        for key in {ref.storage.key for ref in archive.tensors.values()}
    )
    total = sum(
        math.prod(ref.size) * _dtype(ref.dtype).itemsize for ref in archive.tensors.values()
    )
    if total > _MAX_EXPANSION * stored + _EXPANSION_SLACK:
        raise ModelFormatError(
            f"the archive's tensors would make {total} bytes of data from {stored} bytes of"
            " storage (many names for one storage, or expanded views); refused"
        )


class WrittenFile(NamedTuple):
    """What a converter wrote: the file's size and SHA-256, counted as it was written."""

    size: int
    sha256: str


class _HashingWriter:
    """Passes writes to ``out`` while counting and hashing them (spares a second read)."""

    def __init__(self, out: _Sink) -> None:
        self._out = out
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Union[bytes, bytearray, memoryview]) -> int:
        self._digest.update(data)
        self.size += memoryview(data).nbytes
        return self._out.write(data)

    def result(self) -> WrittenFile:
        return WrittenFile(self.size, self._digest.hexdigest())


def _atomic_write_hashed(dest: PathLike, produce: Callable[[_Sink], None]) -> WrittenFile:
    """:func:`atomic_write`, returning the size and SHA-256 of what ``produce`` wrote."""
    written: List[WrittenFile] = []

    def hashed(out: IO[bytes]) -> None:
        writer = _HashingWriter(out)
        produce(writer)
        written.append(writer.result())

    atomic_write(dest, hashed)
    return written[0]


def archive_to_safetensors(
    src: PathLike,
    dst: PathLike,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
    should_stop: Optional[StopCheck] = None,
) -> WrittenFile:
    """Converts a torch archive file into a safetensors file, without running its pickle.

    Each tensor's bytes are copied from its storage record; tied tensors become separate
    entries with the same values, as ``safetensors.torch`` writes them; big-endian
    archives are converted to little-endian. The output is byte-identical to
    :func:`fl_sidecar.models.to_safetensors` of the archive's state_dict.

    Memory: one :data:`CHUNK_BYTES` buffer for contiguous tensors (the usual case); a
    non-contiguous view is gathered from its storage span. ``dst`` is written atomically.

    Returns:
        The size and SHA-256 of what was written to ``dst``.

    Raises:
        ModelFormatError: not a torch archive, or a malformed one (truncated or corrupt
            records included), or tensors that would write more than 8 times their
            storages' bytes plus 256 MiB (tied many times over, or expanded views).
        UnsafePickleError: the pickle asks for more than rebuilding tensors; nothing ran.
        TensorMismatchError: a dtype has no safetensors name (complex128).
        ModelLimitExceededError: reading it would exceed one of ``limits``.
        ModelReadCancelledError: ``should_stop`` returned True (checked between tensors
            too); ``dst`` is left as it was.
        OSError: a file cannot be read or written.
    """
    with _Archive(src, limits=limits, should_stop=should_stop) as archive:
        specs = {n: (ref.size, ref.dtype) for n, ref in archive.tensors.items()}
        header, order = safetensors_header(specs)
        _check_expansion(archive)

        def produce(out: _Sink) -> None:
            out.write(header)
            for name in order:
                check_stop(should_stop)
                _write_view(archive, archive.tensors[name], out)

        return _atomic_write_hashed(dst, produce)


# --------------------------------------------------------------------------- writing


class NewValues:
    """New tensor values to write into an archive, as little-endian row-major bytes."""

    def read(self, name: str, start: int, out: memoryview) -> None:
        """Fills ``out`` with the bytes of tensor ``name`` from byte ``start``."""
        raise NotImplementedError


class _SafetensorsValues(NewValues):
    def __init__(self, f: IO[bytes], header: Mapping[str, SafetensorsEntry], start: int) -> None:
        self._f = f
        self._header = header
        self._start = start

    def read(self, name: str, start: int, out: memoryview) -> None:
        self._f.seek(self._start + self._header[name].begin + start)
        read_exact(self._f, out, "the safetensors data")


def check_against(
    specs: Mapping[str, Tuple[Tuple[int, ...], str]],
    given: Mapping[str, Tuple[Tuple[int, ...], str]],
) -> None:
    """Checks that ``given`` (name -> (shape, dtype name)) matches ``specs`` exactly.

    Raises:
        TensorMismatchError: a name is missing or extra, or a shape or dtype differs.
    """
    missing = [n for n in specs if n not in given]
    extra = [n for n in given if n not in specs]
    if missing or extra:
        raise TensorMismatchError(
            "tensor names differ from the template: "
            + (f"missing {_few(missing)}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {_few(extra)}" if extra else "")
        )
    for name, (shape, dtype) in specs.items():
        new_shape, new_dtype = given[name]
        if tuple(new_shape) != tuple(shape):
            raise TensorMismatchError(
                f"tensor {name!r} has shape {tuple(new_shape)}, the template {tuple(shape)}"
            )
        if new_dtype != dtype:
            raise TensorMismatchError(
                f"tensor {name!r} has dtype torch.{new_dtype}, the template torch.{dtype}"
            )


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


class _ZipWriter:
    """Writes a zip as torch's ``PyTorchFileWriter`` does, streaming each record.

    Records are stored (not compressed); each local header carries an ``FB`` extra field
    padded so that the data starts at a multiple of 64 bytes (what ``torch.load(mmap=True)``
    needs), sizes and CRC follow the data in a descriptor, and the directory ends with a
    zip64 end record. Record sizes must be known when a record starts.
    """

    def __init__(self, out: _Sink) -> None:
        self._out = out
        self._pos = 0
        self._entries: List[Tuple[bytes, int, int, int]] = []  # name, crc, size, offset
        self._name = b""
        self._offset = 0
        self._size = 0
        self._written = 0
        self._crc = 0
        self.names: List[str] = []
        self.crcs: List[int] = []

    def _emit(self, data: Union[bytes, memoryview]) -> None:
        self._out.write(data)
        self._pos += len(data)

    @staticmethod
    def _flags(size: int) -> int:
        # UTF-8 names; sizes and CRC in a data descriptor after the data, unless empty.
        return 0x0808 if size else 0x0800

    def start(self, name: str, size: int) -> None:
        encoded = name.encode("utf-8")
        zip64 = size >= _ZIP32_LIMIT
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""
        pad = -(self._pos + 30 + len(encoded) + len(extra) + 4) % _ALIGNMENT
        extra += b"FB" + struct.pack("<H", pad) + b"Z" * pad
        declared = _ZIP64_MARK if zip64 else 0
        self._name, self._offset, self._size = encoded, self._pos, size
        self._written, self._crc = 0, 0
        self._emit(
            struct.pack(
                "<4sHHHHHIIIHH",
                _ZIP_MAGIC,
                45 if zip64 else 0,  # version needed
                self._flags(size),
                0,  # stored
                0,  # time
                0,  # date
                0,  # crc, in the descriptor
                declared,
                declared,
                len(encoded),
                len(extra),
            )
            + encoded
            + extra
        )

    def write(self, data: Union[bytes, memoryview]) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._written += len(data)
        self._emit(data)

    def end(self) -> None:
        if self._written != self._size:  # pragma: no cover - the callers write exact sizes
            raise ModelFormatError(f"record {self._name!r}: wrote {self._written} bytes")
        if not self._size:
            pass  # an empty record has no descriptor, as torch's writer (miniz) does
        elif self._size >= _ZIP32_LIMIT:
            self._emit(struct.pack("<4sIQQ", b"PK\x07\x08", self._crc, self._size, self._size))
        else:
            self._emit(struct.pack("<4sIII", b"PK\x07\x08", self._crc, self._size, self._size))
        self._entries.append((self._name, self._crc, self._size, self._offset))
        self.names.append(self._name.decode("utf-8"))
        self.crcs.append(self._crc)

    def record(self, name: str, data: bytes) -> None:
        self.start(name, len(data))
        self.write(data)
        self.end()

    def finish(self) -> None:
        directory = self._pos
        for name, crc, size, offset in self._entries:
            extra = b""
            fields = []
            if size >= _ZIP32_LIMIT:
                fields += [size, size]
            if offset >= _ZIP32_LIMIT:
                fields.append(offset)
            if fields:
                extra = struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields)
            self._emit(
                struct.pack(
                    "<4sHHHHHHIIIHHHHHII",
                    b"PK\x01\x02",
                    0,  # made by
                    45 if fields else 0,  # version needed
                    self._flags(size),
                    0,
                    0,
                    0,
                    crc,
                    _zip32(size),
                    _zip32(size),
                    len(name),
                    len(extra),
                    0,  # comment
                    0,  # disk
                    0,  # internal attributes
                    0,  # external attributes
                    _zip32(offset),
                )
                + name
                + extra
            )
        end64 = self._pos
        count = len(self._entries)
        size = end64 - directory
        self._emit(
            struct.pack(
                "<4sQHHIIQQQQ", b"PK\x06\x06", 44, 0x031E, 45, 0, 0, count, count, size, directory
            )
        )
        self._emit(struct.pack("<4sIQI", b"PK\x06\x07", 0, end64, 1))
        self._emit(
            struct.pack(
                "<4sHHHHIIH",
                b"PK\x05\x06",
                0,
                0,
                min(count, 0xFFFF),
                min(count, 0xFFFF),
                _zip32(size),
                _zip32(directory),
                0,
            )
        )


def _zip32(value: int) -> int:
    return _ZIP64_MARK if value >= _ZIP32_LIMIT else value


def _hash_combine(seed: int, value: int) -> int:
    return (seed ^ (value + 0x9E3779B9 + (seed << 6) + (seed >> 2))) & 0xFFFFFFFFFFFFFFFF


def _serialization_id(names: Sequence[str], crcs: Sequence[int]) -> bytes:
    # Like torch's writer: 20 digits from the record names, 20 from their data's CRCs.
    name_hash = 0
    crc_hash = 0
    for name, crc in zip(names, crcs):
        name_hash = _hash_combine(name_hash, zlib.crc32(name.encode("utf-8")))
        crc_hash = _hash_combine(crc_hash, crc)
    return f"{name_hash:020d}{crc_hash:020d}".encode("ascii")


def _streamable(group: Sequence[Tuple[str, TensorRef]]) -> bool:
    """Whether every tensor of a storage is the same contiguous, non-overlapping view."""
    first = group[0][1]
    if not _contiguous(first.size, first.stride):
        return False
    return all(
        (ref.dtype, ref.offset, ref.size, ref.stride)
        == (first.dtype, first.offset, first.size, first.stride)
        for _, ref in group[1:]
    )


def _tied_mismatch(name: str) -> TensorMismatchError:
    return TensorMismatchError(
        f"tensor {name!r} shares memory with another tensor (tied weights) or with itself"
        " (an expanded view), and the new values disagree"
    )


def _stream_storage(
    archive: _Archive,
    writer: _ZipWriter,
    info: zipfile.ZipInfo,
    group: Sequence[Tuple[str, TensorRef]],
    values: NewValues,
) -> None:
    """Writes a storage whose tensors are one contiguous view: new bytes, old bytes around."""
    key = group[0][1].storage.key
    ref = group[0][1]
    itemsize = _dtype(ref.dtype).itemsize
    begin = ref.offset * itemsize
    nbytes = math.prod(ref.size) * itemsize
    unit = archive.swap_unit(key)
    for piece in archive.iter_record(info, 0, begin):
        writer.write(piece)
    buf = memoryview(bytearray(min(CHUNK_BYTES, nbytes)))
    other = memoryview(bytearray(min(CHUNK_BYTES, nbytes) if len(group) > 1 else 0))
    done = 0
    while done < nbytes:
        n = min(len(buf), nbytes - done)
        piece = buf[:n]
        values.read(group[0][0], done, piece)
        for name, _ in group[1:]:
            values.read(name, done, other[:n])
            if other[:n] != piece:
                raise _tied_mismatch(name)
        _swap(piece, unit)
        writer.write(piece)
        done += n
    for piece in archive.iter_record(info, begin + nbytes, info.file_size - begin - nbytes):
        writer.write(piece)


def _scatter_storage(
    archive: _Archive,
    writer: _ZipWriter,
    info: zipfile.ZipInfo,
    group: Sequence[Tuple[str, TensorRef]],
    values: NewValues,
) -> None:
    """Writes a storage shared in some other way: read it, write each view, check, write."""
    key = group[0][1].storage.key
    unit = archive.swap_unit(key)
    storage = bytearray(info.file_size)
    archive.read_range(info, 0, memoryview(storage))
    _swap(storage, unit)  # little-endian while the new values go in
    for name, ref in group:
        nbytes = math.prod(ref.size) * _dtype(ref.dtype).itemsize
        if nbytes:
            new = bytearray(nbytes)
            values.read(name, 0, memoryview(new))
            _scatter(storage, _dtype(ref.dtype).itemsize, ref, new)
    # Shared bytes (tied weights, expanded views) must get consistent values, or part of
    # a new value would be silently lost.
    for name, ref in group:
        itemsize = _dtype(ref.dtype).itemsize
        nbytes = math.prod(ref.size) * itemsize
        if nbytes and (len(group) > 1 or _may_overlap(ref.size, ref.stride)):
            new = bytearray(nbytes)
            values.read(name, 0, memoryview(new))
            if b"".join(_gather(storage, itemsize, ref, 0)) != new:
                raise _tied_mismatch(name)
    _swap(storage, unit)
    mv = memoryview(storage)
    for i in range(0, len(storage), CHUNK_BYTES):
        writer.write(mv[i : i + CHUNK_BYTES])


def rewrite_archive(archive: _Archive, out: _Sink, values: NewValues) -> None:
    """Copies ``archive`` into ``out`` with each named tensor's data from ``values``.

    Only storage records change; the pickle and every other record are copied as they
    are (stored, in the template's order), in torch's zip layout, with a new
    serialization id. The caller has checked names, shapes and dtypes.

    Raises:
        TensorMismatchError: tensors that share memory get values that disagree.
        ModelFormatError: a template record is corrupt.
        OSError: writing fails.
    """
    groups = archive.by_storage()
    writer = _ZipWriter(out)
    prefix = archive.prefix + "/"
    for rel, info in archive.records.items():
        if rel == ".data/serialization_id":
            continue  # a new archive gets a new id
        key = rel[len("data/") :] if rel.startswith("data/") else None
        group = groups.get(key) if key is not None else None
        writer.start(prefix + rel, info.file_size)
        if group is None:
            for piece in archive.iter_record(info):
                writer.write(piece)
        elif _streamable(group):
            _stream_storage(archive, writer, info, group, values)
        else:
            _scatter_storage(archive, writer, info, group, values)
        writer.end()
    if "version" not in archive.records and ".data/version" not in archive.records:
        writer.record(prefix + "version", b"3\n")  # as torch's writer adds it
    writer.record(prefix + ".data/serialization_id", _serialization_id(writer.names, writer.crcs))
    writer.finish()


def open_archive(
    source: Source,
    *,
    parse: bool = True,
    limits: ReadLimits = DEFAULT_LIMITS,
    should_stop: Optional[StopCheck] = None,
    opened: Optional[IO[bytes]] = None,
) -> _Archive:
    """Opens a torch archive (bytes or path) for restricted reading; close it after use.

    For :mod:`fl_sidecar.models`; other callers use :func:`describe`. ``parse=False``
    checks the zip layout only (not the pickle); ``opened`` reads that open file
    instead of ``source`` and leaves it open.

    Raises:
        ModelFormatError, UnsafePickleError, ModelReadCancelledError, OSError: as
            :func:`describe`.
    """
    return _Archive(source, parse=parse, limits=limits, should_stop=should_stop, opened=opened)


def safetensors_into_archive(
    template: PathLike,
    weights: PathLike,
    dst: PathLike,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
    should_stop: Optional[StopCheck] = None,
) -> WrittenFile:
    """Writes the weights of a safetensors file into a copy of a torch archive file.

    Every name, shape and dtype is checked before anything is written; the pickle is
    copied as it is, so the result loads with plain ``torch.load``/``torch.jit.load`` as
    the template's module type (also with ``mmap=True``: records are 64-byte aligned).
    Big-endian templates stay big-endian.

    Memory: one :data:`CHUNK_BYTES` buffer (two for tied tensors) when each storage holds
    one contiguous view or identical tied views (the usual case); a storage shared in
    another way is held whole. ``dst`` is written atomically.

    Returns:
        The size and SHA-256 of what was written to ``dst``.

    Raises:
        TensorMismatchError: names, shapes or dtypes differ from the template's, or tied
            tensors get different values. Nothing is written.
        ModelFormatError: the template is not a torch archive or ``weights`` not safetensors.
        UnsafePickleError: the template's pickle asks for more than tensors; nothing ran.
        ModelLimitExceededError: reading the template would exceed one of ``limits``.
        ModelReadCancelledError: ``should_stop`` returned True (checked while the
            template is read); ``dst`` is left as it was.
        OSError: a file cannot be read or written.
    """
    header, start = read_safetensors_header(weights)
    with _Archive(template, limits=limits, should_stop=should_stop) as archive, open(
        os.fspath(weights), "rb"
    ) as wf:
        check_against(
            {n: (ref.size, ref.dtype) for n, ref in archive.tensors.items()},
            {n: (e.shape, e.dtype) for n, e in header.items()},
        )
        values = _SafetensorsValues(wf, header, start)
        return _atomic_write_hashed(dst, lambda out: rewrite_archive(archive, out, values))
