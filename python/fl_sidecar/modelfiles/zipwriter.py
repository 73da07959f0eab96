"""A zip writer that lays records out as torch's ``PyTorchFileWriter`` does."""

from __future__ import annotations

import struct
import zlib
from typing import List, Sequence, Tuple, Union

from fl_sidecar.errors import ModelFormatError
from fl_sidecar.modelfiles.fileio import Sink
from fl_sidecar.modelfiles.formats import ZIP_MAGIC
from fl_sidecar.modelfiles.zipcheck import ZIP64_MARK

_ALIGNMENT = 64  # bytes: torch's writer aligns every record's data to this (mmap loading)
_ZIP32_LIMIT = 0xFFFFFFFF  # bytes: sizes and offsets from here on take zip64 fields


class ZipWriter:
    """Writes a zip as torch's ``PyTorchFileWriter`` does, streaming each record.

    Records are stored (not compressed); each local header carries an ``FB`` extra field
    padded so that the data starts at a multiple of 64 bytes (what ``torch.load(mmap=True)``
    needs), sizes and CRC follow the data in a descriptor, and the directory ends with a
    zip64 end record. Record sizes must be known when a record starts.
    """

    def __init__(self, out: Sink) -> None:
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
        declared = ZIP64_MARK if zip64 else 0
        self._name, self._offset, self._size = encoded, self._pos, size
        self._written, self._crc = 0, 0
        self._emit(
            struct.pack(
                "<4sHHHHHIIIHH",
                ZIP_MAGIC,
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
    return ZIP64_MARK if value >= _ZIP32_LIMIT else value


def _hash_combine(seed: int, value: int) -> int:
    return (seed ^ (value + 0x9E3779B9 + (seed << 6) + (seed >> 2))) & 0xFFFFFFFFFFFFFFFF


def serialization_id(names: Sequence[str], crcs: Sequence[int]) -> bytes:
    # Like torch's writer: 20 digits from the record names, 20 from their data's CRCs.
    name_hash = 0
    crc_hash = 0
    for name, crc in zip(names, crcs):
        name_hash = _hash_combine(name_hash, zlib.crc32(name.encode("utf-8")))
        crc_hash = _hash_combine(crc_hash, crc)
    return f"{name_hash:020d}{crc_hash:020d}".encode("ascii")
