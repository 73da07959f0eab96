"""Handing a download over to the streaming call that serves it.

A download (fetch, vetting, conversion) runs on its own thread, so the call
that streams it can report progress while it runs and notice at once when the
trainer goes away. :class:`DownloadHandoff` owns that thread and the queue
between the two, and makes sure the spooled model is deleted whoever stops
first: the call (the trainer left) or the download (it failed or finished).
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generator, Optional, Tuple

from fl_sidecar.errors import TransferCancelledError
from fl_sidecar.sidecar.cancel import REASON_TRAINER_GONE, Cancellation
from fl_sidecar.sidecar.spool import SpooledModel

__all__ = [
    "PHASE_CONVERTING",
    "PHASE_FETCHING",
    "DownloadCancelledError",
    "DownloadHandoff",
    "DownloadProgress",
    "Fetch",
]

PHASE_FETCHING = "fetching"
"""The model's bytes are arriving from the FL server."""

PHASE_CONVERTING = "converting"
"""The model is being vetted or converted in the spool."""

_POLL_SECONDS = 0.25  # between checks that the trainer is still there

Fetch = Callable[
    [Callable[[int, Optional[int]], None], Callable[[], None], Cancellation], SpooledModel
]
"""``fetch(progress, on_converting, cancel)``: runs the download, returns the spooled model."""


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

    def trainer_gone(self) -> None:
        """Stop the download: the HTTP request, vetting and conversion (and their spool files)."""
        self.cancel.cancel(REASON_TRAINER_GONE)

    def progress(
        self, is_active: Callable[[], bool]
    ) -> Generator[DownloadProgress, None, SpooledModel]:
        """Yield progress (the newest count only) until the model is spooled; return it.

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
            if kind == "converting":
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
