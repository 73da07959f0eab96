"""The strict zip layout check: an archive that every zip and torch reader reads alike.

torch's reader (miniz), Python's zipfile and other tools disagree on zips that are not
laid out plainly (a prepended pickle, duplicate names, a local header that differs from
the directory...). A vetted archive must load as the same records wherever it goes, so
anything that lets readers disagree is refused with
:class:`~fl_sidecar.errors.AmbiguousArchiveError` (see :func:`check_layout`).
"""

from __future__ import annotations

import struct
import unicodedata
import zipfile
from dataclasses import dataclass
from typing import IO, Dict, List, Sequence, Tuple

from fl_sidecar.errors import AmbiguousArchiveError, ModelFormatError, ModelLimitExceededError
from fl_sidecar.modelfiles.formats import LEGACY_MAGIC, ZIP_MAGIC, legacy_format_error
from fl_sidecar.modelfiles.safetensors import safetensors_header_length

ZIP64_MARK = 0xFFFFFFFF  # what a 32-bit field holds when its zip64 field has the value
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
class ZipEntry:
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


def ambiguous(message: str) -> AmbiguousArchiveError:
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
            raise ambiguous(f"{where} has a malformed extra field")
        tag, size = struct.unpack_from("<HH", extra, pos)
        if pos + 4 + size > len(extra):
            raise ambiguous(f"{where} has a malformed extra field")
        if tag in fields:
            raise ambiguous(f"{where} repeats extra field {tag:#06x}")
        fields[tag] = extra[pos + 4 : pos + 4 + size]
        pos += 4 + size
    return fields


def _zip64_values(fields: Dict[int, bytes], marked: Sequence[bool], where: str) -> List[int]:
    """The 64-bit values a zip64 extra block gives for the fields marked 0xFFFFFFFF."""
    data = fields.get(_ZIP64_EXTRA, b"")
    wanted = sum(marked)
    if len(data) != 8 * wanted:
        raise ambiguous(f"{where} has a zip64 extra field that does not match its marked sizes")
    return list(struct.unpack(f"<{wanted}Q", data)) if wanted else []


def _check_name(raw: bytes, flags: int, seen: Dict[str, str]) -> str:
    """Decodes a record name the way every reader does, or refuses it."""
    if flags & _FLAG_UTF8:
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ambiguous(f"record name {raw!r} is not UTF-8 although flagged so") from None
    else:
        if any(b >= 0x80 for b in raw):
            # zipfile decodes it as cp437, torch compares raw bytes: they disagree.
            raise ambiguous(f"record name {raw!r} is not ASCII and not flagged UTF-8")
        name = raw.decode("ascii")
    shown = repr(name)
    if not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise ambiguous(f"record name {shown} is empty or holds control characters")
    if "\\" in name or name.startswith("/"):
        raise ambiguous(f"record name {shown} has a backslash or a leading slash")
    parts = name[:-1].split("/") if name.endswith("/") else name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ambiguous(f"record name {shown} has an empty, '.' or '..' component")
    # Readers on case-insensitive file systems, or that fold case or normalise Unicode
    # (macOS writes NFD), would see one record.
    key = unicodedata.normalize("NFC", name.rstrip("/")).casefold()
    if key in seen:
        raise ambiguous(f"records {seen[key]} and {shown} have the same name")
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
            raise ambiguous("data or a comment follows the end of the archive")
        raise ModelFormatError("not a readable zip archive: no end of central directory")
    if comment:
        raise ambiguous("the end record announces a comment the file does not hold")
    if disk or cd_disk or disk_count != count:
        raise ambiguous("the archive claims to span several disks")
    directory_end = total - _END_RECORD.size
    locator_at = directory_end - _ZIP64_LOCATOR.size
    has_zip64 = locator_at >= 0 and _read_at(f, locator_at, 4) == _LOCATOR_MAGIC
    if not has_zip64:
        if ZIP64_MARK in (cd_size, cd_offset) or count == 0xFFFF:
            raise ambiguous("the end record marks zip64 fields but there is no zip64 record")
        return count, cd_offset, cd_size, directory_end
    magic, locator_disk, end64_at, disks = _ZIP64_LOCATOR.unpack(
        _read_at(f, locator_at, _ZIP64_LOCATOR.size)
    )
    if locator_disk != 0 or disks != 1:
        raise ambiguous("the zip64 locator claims several disks")
    if end64_at != locator_at - _ZIP64_END_RECORD.size:
        raise ambiguous("the zip64 end record is not where its locator says")
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
        raise ambiguous("the zip64 end record is malformed or has extensible data")
    if disk or cd_disk or disk_count != count64:
        raise ambiguous("the zip64 end record claims several disks")
    for narrow, wide, mark in (
        (count, count64, 0xFFFF),
        (cd_size, cd_size64, ZIP64_MARK),
        (cd_offset, cd_offset64, ZIP64_MARK),
    ):
        if narrow != wide and narrow != mark:
            raise ambiguous("the end record and the zip64 end record disagree")
    return count64, cd_offset64, cd_size64, end64_at


def _central_directory(f: IO[bytes], total: int) -> List[ZipEntry]:
    """Parses and cross-checks a zip's directory and local headers; see :func:`check_layout`."""
    count, cd_offset, cd_size, directory_end = _end_records(f, total)
    if cd_offset + cd_size != directory_end:
        raise ambiguous("the central directory does not end where the end record starts")
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
    entries: List[ZipEntry] = []
    for _ in range(count):
        if pos + _CENTRAL_HEADER.size > len(directory):
            raise ambiguous("the central directory holds fewer records than it says")
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
            raise ambiguous("the central directory is malformed")
        start = pos + _CENTRAL_HEADER.size
        pos = start + name_len + extra_len + comment_len
        if pos > len(directory):
            raise ambiguous("a central directory record runs past the directory")
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
            raise ambiguous(f"{where} is marked as a directory but named as a file")
        if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise ModelFormatError(f"{where} uses compression method {method}")
        if disk == 0xFFFF or disk:
            raise ambiguous(f"{where} claims another disk")
        fields = _extra_fields(directory[start + name_len : start + name_len + extra_len], where)
        marked = [usize == ZIP64_MARK, csize == ZIP64_MARK, offset == ZIP64_MARK]
        wide = iter(_zip64_values(fields, marked, where))
        usize = next(wide) if marked[0] else usize
        csize = next(wide) if marked[1] else csize
        offset = next(wide) if marked[2] else offset
        if method == zipfile.ZIP_STORED and csize != usize:
            raise ambiguous(f"{where} is stored but its compressed and real sizes differ")
        if name.endswith("/") and usize:
            raise ambiguous(f"{where} is a directory that holds data")
        entries.append(_local_header(f, raw, name, flags, method, crc, csize, usize, offset))
    if pos != len(directory):
        raise ambiguous("the central directory holds more than its records")
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
) -> ZipEntry:
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
    if magic != ZIP_MAGIC:
        raise ambiguous(f"{where} has no local header where the directory says")
    if (local_flags ^ flags) & _READING_FLAGS or local_method != method:
        raise ambiguous(f"{where}: the local header's flags or method differ from the directory's")
    if _read_at(f, offset + _LOCAL_HEADER.size, name_len) != raw:
        raise ambiguous(f"{where}: the local header names another record")
    fields = _extra_fields(
        _read_at(f, offset + _LOCAL_HEADER.size + name_len, extra_len), f"{where}'s local header"
    )
    if _ZIP64_EXTRA in fields:
        # A local zip64 block holds both sizes, whichever are marked.
        if len(fields[_ZIP64_EXTRA]) != 16 or ZIP64_MARK not in (local_csize, local_usize):
            raise ambiguous(f"{where}: the local header's zip64 field is malformed")
        wide_usize, wide_csize = struct.unpack("<QQ", fields[_ZIP64_EXTRA])
        local_usize = wide_usize if local_usize == ZIP64_MARK else local_usize
        local_csize = wide_csize if local_csize == ZIP64_MARK else local_csize
    # With a data descriptor the local header may leave CRC and sizes zero (miniz, our
    # writer); every value it does give must be the directory's.
    for given, expected in ((local_crc, crc), (local_csize, csize), (local_usize, usize)):
        if given != expected and not (flags & _FLAG_DESCRIPTOR and given == 0):
            raise ambiguous(f"{where}: the local header's sizes or CRC differ from the directory's")
    data_offset = offset + _LOCAL_HEADER.size + name_len + extra_len
    return ZipEntry(
        name, flags, method, crc, csize, usize, offset, data_offset, data_offset + csize
    )


def _check_tiling(f: IO[bytes], entries: Sequence[ZipEntry], cd_offset: int) -> None:
    """Records must follow each other from byte 0 to the directory: no gaps, no overlaps."""
    ordered = sorted(entries, key=lambda e: e.header_offset)
    if ordered[0].header_offset != 0:
        raise ambiguous("data precedes the first record")
    for i, entry in enumerate(ordered):
        boundary = ordered[i + 1].header_offset if i + 1 < len(ordered) else cd_offset
        end = entry.end
        if end > boundary:
            raise ambiguous(f"record {entry.name!r} overlaps what follows it")
        if entry.flags & _FLAG_DESCRIPTOR:
            end = _descriptor_end(f, entry, boundary)
        if end != boundary:
            raise ambiguous(f"unaccounted bytes follow record {entry.name!r}")


def _descriptor_end(f: IO[bytes], entry: ZipEntry, boundary: int) -> int:
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
        raise ambiguous(f"record {entry.name!r}'s data descriptor is missing or disagrees")
    return entry.end + fits[0]


def check_layout(f: IO[bytes], total: int) -> Dict[str, ZipEntry]:
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
    if not head.startswith(ZIP_MAGIC):
        refuse_non_zip(f, head, total)
    return {entry.name: entry for entry in _central_directory(f, total)}


def refuse_non_zip(f: IO[bytes], head: bytes, total: int) -> None:
    """Says why a file that does not start with a zip record is no torch archive."""
    f.seek(max(0, total - 65557))
    if _END_MAGIC in f.read():
        # torch.load takes a file that does not start with a local header for a legacy
        # pickle and runs it: a zip directory at the end must not make it look vetted.
        raise ambiguous("the file ends as a zip archive but does not start as one")
    if safetensors_header_length(head, None) is not None:
        raise ModelFormatError("this is safetensors, not a torch archive: use from_safetensors")
    if head.startswith(LEGACY_MAGIC[:4]):
        raise legacy_format_error()
    raise ModelFormatError("not a readable zip archive: it does not start with a zip record")
