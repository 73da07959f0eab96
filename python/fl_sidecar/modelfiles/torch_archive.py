"""A torch zip archive opened for restricted reading: its records, storages and tensors.

A torch archive (``torch.save`` of a module or state_dict, ``torch.jit.save``) is a
zip file holding one pickle (``<prefix>/data.pkl``) that rebuilds the object graph and
one record per tensor storage (``<prefix>/data/<key>``). :class:`TorchArchive` checks
the zip layout (:mod:`~fl_sidecar.modelfiles.zipcheck`), reads the pickle with the
restricted reader (:mod:`~fl_sidecar.modelfiles.pickle_reader`), names the tensors
(:mod:`~fl_sidecar.modelfiles.tensor_walk`), validates every view against its storage
record, and streams record bytes in buffer-sized pieces.
"""

from __future__ import annotations

import contextlib
import os
import zipfile
from typing import IO, Any, Dict, Iterator, List, Optional, Sequence, Tuple

from fl_sidecar.errors import ModelFormatError
from fl_sidecar.modelfiles.dtypes import dtype_facts
from fl_sidecar.modelfiles.fileio import CHUNK_BYTES, Source, open_source, read_exact, readinto
from fl_sidecar.modelfiles.formats import ZIP_MAGIC, ModelFormat
from fl_sidecar.modelfiles.limits import DEFAULT_LIMITS, ReadLimits, StopCheck
from fl_sidecar.modelfiles.pickle_objects import TensorRef
from fl_sidecar.modelfiles.pickle_reader import restricted_loads
from fl_sidecar.modelfiles.strided import swap_bytes, view_span
from fl_sidecar.modelfiles.tensor_walk import ScriptClass, collect_tensors
from fl_sidecar.modelfiles.zipcheck import ambiguous, check_layout, refuse_non_zip

__all__ = ["TorchArchive", "open_archive"]

_MAX_PICKLE_SIZE = 256 * 1024 * 1024  # bytes; the pickle of a 1 GiB model is a few MiB
_MAX_CODE_SIZE = 16 * 1024 * 1024  # bytes, one TorchScript code file


class TorchArchive:
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
        if not head.startswith(ZIP_MAGIC):
            refuse_non_zip(self._file, head, self._total)
        self._entries = check_layout(self._file, self._total)
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
                raise ambiguous(
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
        self.script_classes: Dict[str, Dict[str, ScriptClass]] = {}  # by code module
        self.walk_steps = 0  # how much work naming the tensors took (see tensor_walk)
        if not parse:
            return
        self.root, self.storages = restricted_loads(
            self.read_record(pkl), limits=self.limits, should_stop=self.should_stop
        )
        self.tensors = collect_tensors(self)
        self.storage_dtypes = self._check_storages()

    def _check_zipfile_agrees(self, infos: Sequence[zipfile.ZipInfo]) -> None:
        """zipfile (which inflates records) must see exactly the records we checked."""
        ours = list(self._entries.values())
        if len(infos) != len(ours):
            raise ambiguous("zipfile sees a different number of records")
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
                raise ambiguous(f"zipfile reads record {entry.name!r} differently")

    @property
    def record_names(self) -> List[str]:
        """Every record's name (prefix included), in directory order."""
        return list(self._entries)

    def __enter__(self) -> TorchArchive:
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
            itemsize = dtype_facts(ref.dtype).itemsize
            storage = ref.storage
            nbytes = storage.numel * dtype_facts(storage.dtype).itemsize
            if storage.dtype != ref.dtype and storage.dtype != "uint8":
                raise ModelFormatError(f"tensor {name} has a dtype other than its storage's")
            unit = storage.dtype if storage.dtype != "uint8" else ref.dtype
            if element.setdefault(storage.key, unit) != unit:
                raise ModelFormatError(f"storage {storage.key} is viewed as different dtypes")
            if ref.size and min(ref.size) == 0:
                continue
            if view_span(ref)[1] > nbytes // itemsize:
                raise ModelFormatError(f"tensor {name} reaches past the end of its storage")
        # Every storage the pickle refers to must be a record of exactly its declared
        # size, so declared sizes never exceed what the file holds.
        for key, storage in self.storages.items():
            info = self.records.get(f"data/{key}")
            if info is None:
                raise ModelFormatError(f"storage record data/{key} is missing")
            expected = storage.numel * dtype_facts(storage.dtype).itemsize
            if info.file_size != expected:
                raise ModelFormatError(
                    f"storage record data/{key} holds {info.file_size} bytes, expected {expected}"
                )
        return element

    def swap_unit(self, key: str) -> int:
        """Bytes per number to swap when this storage's byte order is not little-endian."""
        return dtype_facts(self.storage_dtypes[key]).swap_unit if self.big_endian else 1

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
                        n = readinto(reader, scratch[: min(len(scratch), start - skipped)])
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
        swap_bytes(out, self.swap_unit(key))

    def by_storage(self) -> Dict[str, List[Tuple[str, TensorRef]]]:
        groups: Dict[str, List[Tuple[str, TensorRef]]] = {}
        for name, ref in self.tensors.items():
            groups.setdefault(ref.storage.key, []).append((name, ref))
        return groups


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


def open_archive(
    source: Source,
    *,
    parse: bool = True,
    limits: ReadLimits = DEFAULT_LIMITS,
    should_stop: Optional[StopCheck] = None,
    opened: Optional[IO[bytes]] = None,
) -> TorchArchive:
    """Opens a torch archive (bytes or path) for restricted reading; close it after use.

    For the readers and writers of this package; other callers use
    :func:`~fl_sidecar.modelfiles.vetting.describe`. ``parse=False`` checks the zip
    layout only (not the pickle); ``opened`` reads that open file instead of ``source``
    and leaves it open.

    Raises:
        ModelFormatError, UnsafePickleError, ModelReadCancelledError, OSError: as
            :func:`~fl_sidecar.modelfiles.vetting.describe`.
    """
    return TorchArchive(source, parse=parse, limits=limits, should_stop=should_stop, opened=opened)
