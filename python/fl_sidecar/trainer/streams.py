"""The plumbing of streamed calls: chunking, request streams with progress, atomic files.

Shared by the download, upload and pack/unpack calls of the trainer's client.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import (
    Any,
    BinaryIO,
    Callable,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.wire import FORMATS, metric_to_proto

__all__ = [
    "Buffer",
    "MetricsArg",
    "PathLike",
    "ProgressCallback",
    "RequestStream",
    "format_value",
    "metric_list",
    "private_file",
    "read_chunks",
    "slice_chunks",
    "write_atomically",
]

Buffer = Union[bytes, bytearray, memoryview]
PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[int, int], None]
"""``progress(done_bytes, total_bytes)``; ``total_bytes`` is 0 while unknown."""
MetricsArg = Optional[Union[Mapping[str, Any], Sequence[Tuple[str, Any]]]]
"""Metrics by name: numbers go as numbers, anything else as its ``str()``.

(:func:`fl_sidecar.wire.metric_to_proto`)."""
_T = TypeVar("_T")


def format_value(fmt: Union[str, int]) -> int:
    """The proto ``ModelFormat`` of ``"torch"``/``"safetensors"`` (any case) or of a number.

    Raises:
        ValueError: an unknown format name.
    """
    if isinstance(fmt, str):
        try:
            return int(FORMATS[fmt.lower()])
        except KeyError:
            raise ValueError(
                f"unknown model format {fmt!r}; choose from {', '.join(FORMATS)}"
            ) from None
    return int(fmt)


def metric_list(metrics: MetricsArg) -> List[pb.Metric]:
    """The ``Metric`` messages of a mapping or of (name, value) pairs (``None``: none).

    Raises:
        ValueError: a value is ``None``, or bytes that are not UTF-8.
    """
    if metrics is None:
        return []
    items = metrics.items() if isinstance(metrics, Mapping) else metrics
    return [metric_to_proto(name, value) for name, value in items]


class RequestStream:
    """A client stream: ``first``, then ``wrap(chunk)`` per chunk, reporting ``progress``.

    It remembers an exception raised while producing requests. grpc turns
    such an exception into a cancelled call with status UNKNOWN, which the
    contract reserves for "the upload may have arrived"; the trainer's own
    exception (a failing progress callback, a read error) is the true cause,
    and the sidecar uploaded nothing.
    """

    def __init__(
        self,
        first: Any,
        wrap: Callable[[bytes], Any],
        chunks: Iterable[bytes],
        *,
        progress: Optional[ProgressCallback],
        total: int,
    ) -> None:
        self.first = first
        """The first request (the header or options), for error messages."""
        self._source = _with_progress(first, wrap, chunks, progress, total)
        self.error: Optional[BaseException] = None

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._source)
        except StopIteration:
            raise
        except BaseException as exc:
            self.error = exc
            raise

    def reraise(self) -> None:
        """Raise the remembered exception, if any."""
        if self.error is not None:
            raise self.error


def _with_progress(
    first: Any,
    wrap: Callable[[bytes], Any],
    chunks: Iterable[bytes],
    progress: Optional[ProgressCallback],
    total: int,
) -> Iterator[Any]:
    yield first
    done = 0
    for chunk in chunks:
        done += len(chunk)
        yield wrap(chunk)
        if progress is not None:
            progress(done, total)


def slice_chunks(view: memoryview, size: int) -> Iterator[bytes]:
    """``view`` in pieces of ``size`` bytes (the last one shorter), each a copy."""
    for start in range(0, view.nbytes, size):
        yield bytes(view[start : start + size])


def read_chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    """The file's rest in blocks of at most ``size`` bytes.

    Raises:
        OSError: the file cannot be read.
    """
    while True:
        block = f.read(size)
        if not block:
            return
        yield block


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


@contextlib.contextmanager
def private_file(purpose: str) -> Iterator[str]:
    """A new empty file in the temporary directory (``TMPDIR``), mode 0600, removed on leaving.

    The tensor and module transfers stream through such a file so that the trainer
    never holds a whole model file in memory besides its tensors; ``purpose`` goes
    into the file's name (``fl-sidecar-<purpose>-*.part``).

    Raises:
        OSError: the file cannot be made.
    """
    fd, path = tempfile.mkstemp(prefix=f"fl-sidecar-{purpose}-", suffix=".part")
    os.close(fd)
    try:
        yield path
    finally:
        _unlink_quietly(path)


def write_atomically(dst: PathLike, produce: Callable[[Callable[[bytes], object]], _T]) -> _T:
    """Run ``produce(write)`` into a temporary file beside ``dst``, then rename it to ``dst``.

    When ``produce`` raises, the temporary file is removed and ``dst`` is untouched.

    Raises:
        OSError: the file cannot be written; and whatever ``produce`` raises.
    """
    target = os.fspath(dst)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".fl-sidecar-", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            result = produce(out.write)
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return result
