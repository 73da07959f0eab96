"""An open ``WatchEvents`` subscription, read by a background thread."""

from __future__ import annotations

import queue
import threading
import time
from types import TracebackType
from typing import Any, Iterable, Iterator, Optional, Type

from fl_sidecar.events import EventKind, ServerEvent
from fl_sidecar.wire import event_from_proto

__all__ = ["EventStream"]


class EventStream:
    """An open ``WatchEvents`` subscription: iterate it, or call :meth:`get` with a timeout.

    A background thread reads the stream, so :meth:`get` can wait with a
    timeout without cancelling the subscription. Close it (or leave the
    ``with`` block) to cancel the stream.

    ``call`` is the ``WatchEvents`` call: an iterable of ``Event`` messages with
    ``cancel()``, whose failure is a :class:`~fl_sidecar.errors.SidecarError` (as
    the client's interceptor raises it); whatever it raises, :meth:`get` raises.
    """

    _END = object()

    def __init__(self, call: Any) -> None:
        self._call = call
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._pump, name="fl-sidecar-events", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for message in self._call:
                self._queue.put(event_from_proto(message))
        except Exception as exc:  # the call's failure, already typed by the interceptor
            if not self._closed:
                self._queue.put(exc)
        self._queue.put(self._END)

    def get(self, timeout: Optional[float] = None) -> ServerEvent:
        """The next event, waiting at most ``timeout`` seconds (``None``: forever).

        Raises:
            TimeoutError: nothing arrived in time (the subscription stays open).
            SidecarError: the stream failed (e.g. ``UNAVAILABLE`` when the sidecar went away).
            EOFError: the stream ended or was closed.
        """
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no event within {timeout} s") from None
        if isinstance(item, ServerEvent):
            return item
        self._queue.put(self._END)  # later calls end too
        if isinstance(item, Exception):
            raise item
        raise EOFError("the event stream ended")

    def wait_for(
        self,
        kinds: Iterable[EventKind],
        *,
        training_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> ServerEvent:
        """Skip events until one of ``kinds`` (of ``training_id``, when given) arrives.

        ``timeout`` (seconds) bounds the whole wait.

        Raises:
            TimeoutError, SidecarError, EOFError: as :meth:`get`.
        """
        wanted = frozenset(kinds)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = self.get(timeout=left)
            if event.kind in wanted and (training_id is None or event.training_id == training_id):
                return event

    def __iter__(self) -> Iterator[ServerEvent]:
        return self

    def __next__(self) -> ServerEvent:
        try:
            return self.get()
        except EOFError:
            raise StopIteration from None

    def close(self) -> None:
        """Cancel the subscription; idempotent."""
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
