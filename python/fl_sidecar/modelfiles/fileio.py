"""Model sources (bytes or a path), exact reads, and atomic writes that hash what they write.

Everything that reads or writes model files goes through these, in pieces of at most
:data:`CHUNK_BYTES`.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import IO, Any, Callable, List, NamedTuple, Protocol, Union

from fl_sidecar.errors import ModelFormatError

__all__ = [
    "CHUNK_BYTES",
    "PathLike",
    "Source",
    "WrittenFile",
    "atomic_write",
    "open_source",
    "read_exact",
]

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[bytes, bytearray, memoryview, PathLike]

CHUNK_BYTES = 8 * 1024 * 1024
"""Size of the copy buffer, in bytes: what converting a model holds of its data at a time."""


def is_bytes(source: object) -> bool:
    return isinstance(source, (bytes, bytearray, memoryview))


def open_source(source: Source) -> IO[bytes]:
    """Opens bytes or a file path for binary reading.

    Raises:
        OSError: the file cannot be opened.
    """
    if is_bytes(source):
        return io.BytesIO(source)  # type: ignore[arg-type]
    return open(os.fspath(source), "rb")  # type: ignore[arg-type]


def read_head(source: Source, size: int) -> bytes:
    if is_bytes(source):
        return bytes(memoryview(source).cast("B")[:size])  # type: ignore[arg-type]
    with open(os.fspath(source), "rb") as f:  # type: ignore[arg-type]
        head: bytes = f.read(size)
    return head


def source_size(source: Source) -> int:
    if is_bytes(source):
        return memoryview(source).nbytes  # type: ignore[arg-type]
    return os.stat(os.fspath(source)).st_size  # type: ignore[arg-type]


def readinto(f: Any, view: memoryview) -> int:
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
        n = readinto(f, out[done:])
        if not n:
            raise ModelFormatError(f"{what} is truncated")
        done += n


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


class Sink(Protocol):
    def write(self, __data: Union[bytes, bytearray, memoryview]) -> int: ...


class WrittenFile(NamedTuple):
    """What a converter wrote: the file's size and SHA-256, counted as it was written."""

    size: int
    sha256: str


class _HashingWriter:
    """Passes writes to ``out`` while counting and hashing them (spares a second read)."""

    def __init__(self, out: Sink) -> None:
        self._out = out
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: Union[bytes, bytearray, memoryview]) -> int:
        self._digest.update(data)
        self.size += memoryview(data).nbytes
        return self._out.write(data)

    def result(self) -> WrittenFile:
        return WrittenFile(self.size, self._digest.hexdigest())


def atomic_write_hashed(dest: PathLike, produce: Callable[[Sink], None]) -> WrittenFile:
    """:func:`atomic_write`, returning the size and SHA-256 of what ``produce`` wrote."""
    written: List[WrittenFile] = []

    def hashed(out: IO[bytes]) -> None:
        writer = _HashingWriter(out)
        produce(writer)
        written.append(writer.result())

    atomic_write(dest, hashed)
    return written[0]
