"""Cancellation of transfers in flight: one :class:`Cancellation` per trainer call.

A transfer checks its cancellation between pieces of work (body chunks,
decoding steps, stages), but a thread blocked in a socket read or write sees
no flag. So the HTTP layer attaches the socket of the request in progress, and
:meth:`Cancellation.cancel` shuts it down: the blocked call returns at once
with an error, which the transfer then reports as cancelled.

Two sources cancel a call: the trainer going away (its gRPC call ends) and the
sidecar's drain running out of time on shutdown. The reason is kept so that
the trainer (if it still listens) is told which one it was.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Any, List, Optional

__all__ = ["REASON_SHUTDOWN", "REASON_TRAINER_GONE", "Cancellation"]

REASON_TRAINER_GONE = "the trainer went away"
REASON_SHUTDOWN = "the sidecar is shutting down"


class Cancellation:
    """A cancel signal for one call's transfers, which also breaks blocked socket I/O.

    Thread-safe: :meth:`cancel` is called from another thread (a gRPC callback,
    the drain) than the one doing the transfer.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._sockets: List[Any] = []
        self.reason: Optional[str] = None

    def cancel(self, reason: str = REASON_TRAINER_GONE) -> None:
        """Set the signal (the first reason wins) and shut down every attached socket."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            self._event.set()
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            _shut(sock)

    def is_set(self) -> bool:
        """Whether the call was cancelled."""
        return self._event.is_set()

    @property
    def shutting_down(self) -> bool:
        """Whether the sidecar's shutdown (not the trainer) cancelled the call."""
        return self.reason == REASON_SHUTDOWN

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as the call is cancelled (for backoff delays)."""
        return self._event.wait(seconds)

    def attach(self, sock: Any) -> None:
        """Shut ``sock`` down on :meth:`cancel` (at once if already cancelled)."""
        with self._lock:
            if not self._event.is_set():
                if not any(s is sock for s in self._sockets):
                    self._sockets.append(sock)
                return
        _shut(sock)

    def detach_all(self) -> None:
        """Forget the attached sockets (the request using them is over)."""
        with self._lock:
            self._sockets = []


def _shut(sock: Any) -> None:
    # shutdown, not close: the owner still closes the descriptor; a close from here
    # could hit a descriptor number that was reused meanwhile.
    with contextlib.suppress(OSError, ValueError, AttributeError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
