"""safetensors files: reading and checking a header, and making one.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from fl_sidecar.errors import ModelFormatError, TensorMismatchError
from fl_sidecar.modelfiles.dtypes import DTYPES, SAFETENSORS_DTYPES, DtypeFacts, dtype_facts
from fl_sidecar.modelfiles.fileio import Source, open_source, source_size

__all__ = ["SafetensorsEntry", "read_safetensors_header", "safetensors_header"]

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes, as the safetensors library allows


def safetensors_header_length(head: bytes, total: Optional[int]) -> Optional[int]:
    if len(head) < 9:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if length < 2 or length > _MAX_SAFETENSORS_HEADER or head[8:9] != b"{":
        return None
    if total is not None and 8 + length > total:
        return None
    return int(length)


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
    total = source_size(source)
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
        if end - begin != math.prod(shape) * dtype_facts(dtype).itemsize:
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
        if DTYPES.get(dtype, DtypeFacts(0, 0, None)).safetensors is None:
            raise TensorMismatchError(f"safetensors cannot hold tensor {name!r} of torch.{dtype}")
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    order = sorted(specs, key=lambda n: -DTYPES[specs[n][1]].itemsize)
    offset = 0
    for name in order:
        shape, dtype = specs[name]
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {
            "dtype": DTYPES[dtype].safetensors,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, order
