"""Handing a download over to the streaming call that serves it.

A download (fetch, vetting, conversion) runs on its own thread, so the call
that streams it can report progress while it runs and notice at once when the
trainer goes away. :class:`DownloadHandoff` owns that thread and the queue
between the two, and makes sure the spooled model is deleted whoever stops
first: the call (the trainer left) or the download (it failed or finished).

It also hands over each attempt's part file as its body begins
(:class:`PartFile`, already open), so the call can stream a TORCH model's
bytes while they are still arriving.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Generator, Iterator, List, Optional, Tuple, Union

from fl_sidecar.cancel import REASON_TRAINER_GONE, Cancellation
from fl_sidecar.errors import SidecarError, TransferCancelledError
from fl_sidecar.sidecar.spool import SpooledModel

__all__ = [
    "PHASE_CONVERTING",
    "PHASE_FETCHING",
    "DownloadCancelledError",
    "DownloadHandoff",
    "DownloadProgress",
    "EarlyStream",
    "Fetch",
    "ModelChangedError",
    "PartFile",
]

PHASE_FETCHING = "fetching"
"""The model's bytes are arriving from the FL server."""

PHASE_CONVERTING = "converting"
"""The model is being vetted or converted in the spool."""

_POLL_SECONDS = 0.25  # between checks that the trainer is still there

Fetch = Callable[
    [
        Callable[[int, Optional[int]], None],
        Callable[[], None],
        Cancellation,
        Callable[[Path, str, Optional[int]], None],
    ],
    SpooledModel,
]
"""``fetch(progress, on_converting, cancel, on_part_file)``: runs the download, returns the model.

``on_part_file(path, coding, wire_total)`` is the FL server client's hook: called as
each attempt's body begins, before a byte of it is written to ``path``.
"""


class DownloadCancelledError(TransferCancelledError):
    """The trainer went away (or the sidecar shut down) while the model was being fetched.

    The partial file is gone.
    """


@dataclass(frozen=True)
class DownloadProgress:
    """How far a download is.

    Attributes:
        phase: :data:`PHASE_FETCHING` or :data:`PHASE_CONVERTING`.
        done: bytes received so far as they crossed the network (wire bytes; a
            zstd-coded answer counts its coded bytes); 0 while converting.
        total: the wire bytes the FL server announced (its Content-Length); 0 when
            it announced none, as for a zstd-coded answer coded while it streams.
    """

    phase: str
    done: int = 0
    total: int = 0


@dataclass(frozen=True)
class PartFile:
    """An attempt's body as it arrives: its decoded bytes, readable while they are written.

    Attributes:
        file: open for reading from the start (it keeps reading the file when the
            download renames it into place); the reader closes it.
        coding: the body's content coding, ``"identity"`` or ``"zstd"``.
        total: the wire bytes the FL server announced, or ``None``; for an identity
            body, the model's size.
    """

    file: IO[bytes]
    coding: str
    total: Optional[int]


class DownloadHandoff:
    """One download on its own thread, handed to the call that streams it.

    Use :meth:`progress` (a generator of :class:`DownloadProgress` that returns
    the spooled model), and :meth:`close` in a ``finally``; :meth:`trainer_gone`
    is the callback for the trainer's cancellation.
    """

    def __init__(self, fetch: Fetch, *, name: str = "fl-sidecar-download") -> None:
        """Start ``fetch`` on a daemon thread named ``name``."""
        self.cancel = Cancellation()
        self._updates: queue.Queue[Tuple[str, Any]] = queue.Queue()
        self._handoff = threading.Lock()
        self._model: Optional[SpooledModel] = None
        self._part_files: List[IO[bytes]] = []  # opened for the reader: closed by close()
        self._fetch = fetch
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        updates = self._updates
        try:
            model = self._fetch(
                lambda done, total: updates.put(("progress", (done, total))),
                lambda: updates.put(("converting", None)),
                self.cancel,
                self._part_file,
            )
        except BaseException as exc:
            updates.put(("error", exc))
        else:
            # Under the lock: either the reader still takes the model, or it is
            # gone and the model is deleted here; never neither.
            with self._handoff:
                if self.cancel.is_set():
                    model.discard()
                else:
                    updates.put(("done", model))

    def _part_file(self, path: Path, coding: str, total: Optional[int]) -> None:
        # Opened here, before the body is written: by the time the reader gets to
        # it the file may already be renamed into place, or removed by a retry.
        file = open(path, "rb")  # noqa: SIM115 - closed by the reader or close()
        with self._handoff:
            self._part_files.append(file)
        self._updates.put(("part", PartFile(file, coding, total)))

    def trainer_gone(self) -> None:
        """Stop the download: the HTTP request, vetting and conversion (and their spool files)."""
        self.cancel.cancel(REASON_TRAINER_GONE)

    def progress(
        self, is_active: Callable[[], bool]
    ) -> Generator[Union[DownloadProgress, PartFile], None, SpooledModel]:
        """Yield progress (the newest count only) until the model is spooled; return it.

        Each attempt's :class:`PartFile` is yielded as its body begins, in order with
        the progress that follows it.

        Args:
            is_active: whether the trainer still listens; checked every 0.25 s.

        Raises:
            DownloadCancelledError: the trainer went away. Whatever the download
            raised (ServerError, CodecError, UnsafePickleError, SpoolFullError...).
        """
        while True:
            try:
                kind, value = self._updates.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not is_active():
                    raise DownloadCancelledError("the trainer cancelled the download") from None
                continue
            latest: Optional[Tuple[int, Optional[int]]] = None
            # Coalesce progress: only the newest count is worth a message.
            while kind == "progress":
                latest = value
                try:
                    kind, value = self._updates.get_nowait()
                except queue.Empty:
                    kind = ""
            if latest is not None:
                done, total = latest
                yield DownloadProgress(PHASE_FETCHING, done, total or 0)
            if kind == "part":
                yield value
            elif kind == "converting":
                yield DownloadProgress(PHASE_CONVERTING)
            elif kind == "error":
                raise value
            elif kind == "done":
                model: SpooledModel = value
                self._model = model
                return model

    def close(self) -> None:
        """Stop the download if it still runs and delete its model (idempotent)."""
        with self._handoff:
            self.cancel.cancel(REASON_TRAINER_GONE)
            part_files, self._part_files = self._part_files, []
        for file in part_files:
            file.close()
        if self._model is not None:
            self._model.discard()
        # A model the worker finished after the reader stopped waiting for it.
        while True:
            try:
                kind, value = self._updates.get_nowait()
            except queue.Empty:
                return
            if kind == "done":
                value.discard()


class EarlyStream:
    """A TORCH model's bytes sent to the trainer while they still arrive, its end held back.

    For an identity body whose size the FL server announced: the trainer is told that
    size at once, then gets whole chunks as the part file grows, but never the last
    one before the download is complete and vetted (vetting needs the whole archive:
    a zip's central directory is at its end), so a trainer never holds a complete
    model that was not vetted. When the fetch is retried after bytes went out, nothing
    more goes until the end, where the complete file must begin with the bytes sent.
    """

    def __init__(self, part: PartFile, chunk_size: int) -> None:
        """Stream ``part`` (an identity body with a known ``total``) in ``chunk_size`` chunks."""
        if part.total is None:
            raise ValueError("an early stream needs the body's announced size")
        self.size = part.total
        self._chunk_size = chunk_size
        self._file: Optional[IO[bytes]] = part.file
        self._pending = bytearray()
        self.sent = 0
        # After a retry: the first attempt's part file, whose first ``sent`` bytes
        # went out (an open descriptor reads it even once the download removed it).
        self._sent_source: Optional[IO[bytes]] = None

    @staticmethod
    def fits(part: PartFile) -> bool:
        """Whether ``part``'s bytes are the model's as they arrive, with a known size."""
        return part.coding == "identity" and part.total is not None

    def restart(self, part: PartFile) -> None:
        """A retry began ``part``: what went out is checked against the complete file."""
        part.file.close()
        if self._file is not None:
            if self._sent_source is None:
                self._sent_source = self._file
            else:
                self._file.close()
        self._file = None

    def ready(self) -> Iterator[bytes]:
        """The whole chunks that have arrived, short of the last chunk of the model."""
        file = self._file
        while file is not None and self.sent + self._chunk_size < self.size:
            block = file.read(self._chunk_size - len(self._pending))
            if not block:
                return
            self._pending += block
            if len(self._pending) == self._chunk_size:
                chunk = bytes(self._pending)
                self._pending.clear()
                self.sent += len(chunk)
                yield chunk

    def finish(self, model: SpooledModel) -> Iterator[bytes]:
        """The rest of ``model`` (complete and vetted), after what went out early.

        Raises:
            ModelChangedError: the complete model is not the one whose bytes went out
            (its size, or after a retry its first bytes, differ).
        """
        if self._file is not None:
            self._file.close()
            self._file = None
        sent_source, self._sent_source = self._sent_source, None
        try:
            if model.size != self.size:
                raise ModelChangedError(
                    f"the FL server announced {self.size} bytes and sent {model.size}; "
                    "download the model again"
                )
            if sent_source is not None and self.sent > 0:
                with open(model.path, "rb") as file:
                    same = _same_prefix(sent_source, file, self.sent)
                if not same:
                    raise ModelChangedError(
                        "the global model changed on the FL server while it was downloaded "
                        "(a retried fetch got other bytes); download the model again"
                    )
        finally:
            if sent_source is not None:
                sent_source.close()
        with open(model.path, "rb") as file:
            file.seek(self.sent)
            while True:
                block = file.read(self._chunk_size)
                if not block:
                    return
                yield block


class ModelChangedError(SidecarError):
    """The model's bytes already streamed to the trainer are not those of the complete model."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code="ABORTED")


def _same_prefix(first: IO[bytes], second: IO[bytes], length: int) -> bool:
    """Whether both files begin with the same ``length`` bytes (read from their starts)."""
    first.seek(0)
    second.seek(0)
    left = length
    while left > 0:
        step = min(left, 1 << 20)
        a, b = first.read(step), second.read(step)
        if a != b or not a:
            return False
        left -= len(a)
    return True
