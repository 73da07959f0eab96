"""Notification delivery: JSON POSTs from the dev server to each client's endpoint.

Unlike the real server (no timeout, a small shared worker pool, so one slow
endpoint delays every training), each POST here has a timeout, and a pool of
workers serves one ordered queue per endpoint: a slow endpoint holds up only
its own notifications, and each client still sees them in the order sent.
A refused connection is retried on a schedule (the real server's +5, +15,
+30, +50, +75 s by default) without letting later notifications overtake it.

With ``quirks=True`` it also repeats and reorders notifications the way the
real server has been seen to (see :class:`Notifier`), so that clients can be
tested against them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import threading
import urllib.error
import urllib.request
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

__all__ = ["DEFAULT_RETRY_DELAYS", "QUIRK_COPIES", "Notification", "Notifier"]

_log = logging.getLogger(__name__)

#: Seconds to wait before each retry of a refused connection (the real server's schedule).
DEFAULT_RETRY_DELAYS: Sequence[float] = (5.0, 15.0, 30.0, 50.0, 75.0)

#: With quirks on: how many times each type is sent (the real server's worst seen).
QUIRK_COPIES: Mapping[str, int] = {
    "UPDATE_ROUND_START": 3,
    "MODEL_TEST_ROUND": 2,
    "TRAINING_FINISHED": 2,
}


class Notification:
    """One notification for one endpoint; ``attempts`` counts deliveries tried."""

    def __init__(self, endpoint: str, body: bytes) -> None:
        self.endpoint = endpoint
        self.body = body
        self.attempts = 0


def notification_body(notification_type: str, training_id: str, body: Mapping[str, Any]) -> bytes:
    """The exact JSON the real server sends (same key order and separators)."""
    return json.dumps(
        {"notification_type": notification_type, "body": dict(body), "training_uuid": training_id}
    ).encode("utf-8")


class _EndpointQueue:
    def __init__(self) -> None:
        self.items: Deque[Notification] = collections.deque()
        self.busy = False  # a worker is draining it, or a retry timer is pending


class Notifier:
    """Delivers notifications in the background, in order per endpoint.

    Args:
        timeout: seconds each POST may take (connect and each read) before it is abandoned.
        workers: endpoints served at the same time.
        retry_delays: seconds before each retry after a refused connection; its
            length is the number of retries.
        quirks: send notifications as the real server has been seen to:
            ``UPDATE_ROUND_START`` three times, ``MODEL_TEST_ROUND`` and
            ``TRAINING_FINISHED`` twice; ``TRAINING_START`` after the first
            round start instead of before it; and, after each
            ``MODEL_TEST_ROUND``, the previous round's ``UPDATE_ROUND_START``
            once more (a late repeat of an older round).
    """

    def __init__(
        self,
        *,
        timeout: float = 5.0,
        workers: int = 8,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        quirks: bool = False,
    ) -> None:
        self._timeout = timeout
        self._quirks = quirks
        # Per (endpoint, training), with quirks: a held-back TRAINING_START and
        # the last round start sent.
        self._held_start: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self._last_round_start: Dict[Tuple[str, str], Dict[str, Any]] = {}
        self._retry_delays = tuple(retry_delays)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="devserver-notify"
        )
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._queues: Dict[str, _EndpointQueue] = {}
        self._timers: List[threading.Timer] = []
        self._closed = False
        #: counters: notifications delivered (2xx), dropped, and refused attempts retried
        self.delivered = 0
        self.failed = 0
        self.retried = 0

    def send(
        self, endpoint: str, notification_type: str, training_id: str, body: Mapping[str, Any]
    ) -> None:
        """Queue one notification for ``endpoint`` (returns at once; never raises for delivery)."""
        if not self._quirks:
            self._enqueue(
                Notification(endpoint, notification_body(notification_type, training_id, body))
            )
            return
        with self._lock:
            sends = self._quirky(endpoint, notification_type, training_id, dict(body))
        for kind, payload in sends:
            self._enqueue(Notification(endpoint, notification_body(kind, training_id, payload)))

    def _quirky(
        self, endpoint: str, notification_type: str, training_id: str, body: Dict[str, Any]
    ) -> List[Tuple[str, Dict[str, Any]]]:
        """What the real server might send instead of this one notification (lock held)."""
        key = (endpoint, training_id)
        if notification_type == "TRAINING_START":
            self._held_start[key] = body  # goes out after the next one
            return []
        sends = [(notification_type, body)]
        held = self._held_start.pop(key, None)
        if held is not None:
            sends.append(("TRAINING_START", held))
        sends += [(notification_type, body)] * (QUIRK_COPIES.get(notification_type, 1) - 1)
        if notification_type == "UPDATE_ROUND_START":
            self._last_round_start[key] = body
        elif notification_type == "MODEL_TEST_ROUND" and key in self._last_round_start:
            sends.append(("UPDATE_ROUND_START", self._last_round_start[key]))
        elif notification_type == "TRAINING_FINISHED":
            self._last_round_start.pop(key, None)
        return sends

    def _enqueue(self, item: Notification) -> None:
        with self._lock:
            if self._closed:
                return
            queue = self._queues.setdefault(item.endpoint, _EndpointQueue())
            queue.items.append(item)
            if not queue.busy:
                queue.busy = True
                self._pool.submit(self._drain, item.endpoint)

    def _drain(self, endpoint: str) -> None:
        while True:
            with self._lock:
                queue = self._queues[endpoint]
                if not queue.items or self._closed:
                    queue.busy = False
                    self._idle.notify_all()
                    return
                item = queue.items[0]
            retry_in = self._deliver(item)
            with self._lock:
                if retry_in is None:
                    queue.items.popleft()
                    self._idle.notify_all()
                    continue
                self.retried += 1
                self._idle.notify_all()
                # Keep the item at the head so later ones cannot overtake it;
                # the queue stays busy until the timer resumes it.
                if self._closed:
                    queue.busy = False
                    self._idle.notify_all()
                    return
                timer = threading.Timer(retry_in, self._resume, args=(endpoint,))
                timer.daemon = True
                self._timers.append(timer)
                timer.start()
                return

    def _resume(self, endpoint: str) -> None:
        with self._lock:
            self._timers = [
                t for t in self._timers if t.is_alive() and t is not threading.current_thread()
            ]
            if self._closed:
                self._queues[endpoint].busy = False
                self._idle.notify_all()
                return
        try:
            self._pool.submit(self._drain, endpoint)
        except RuntimeError:  # the pool shut down in between
            with self._lock:
                self._queues[endpoint].busy = False
                self._idle.notify_all()

    def _deliver(self, item: Notification) -> Optional[float]:
        """POST once; returns the delay before a retry, or ``None`` when done with it."""
        item.attempts += 1
        request = urllib.request.Request(
            item.endpoint,
            data=item.body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout) as response:
                response.read()
            with self._lock:
                self.delivered += 1
            return None
        except urllib.error.HTTPError as exc:
            # Like the real server: a non-2xx answer is logged, not retried.
            _log.warning("notification to %s answered %s; dropped", item.endpoint, exc.code)
            exc.close()
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, ConnectionRefusedError):
                retry = item.attempts - 1
                if retry < len(self._retry_delays):
                    _log.info(
                        "notification to %s refused; retry in %ss",
                        item.endpoint,
                        self._retry_delays[retry],
                    )
                    return self._retry_delays[retry]
            _log.warning("notification to %s failed (%s); dropped", item.endpoint, reason)
        with self._lock:
            self.failed += 1
        return None

    def wait_until(self, predicate: Callable[[Notifier], bool], timeout: float) -> bool:
        """Block until ``predicate(self)`` holds (checked after each attempt); True if it did."""
        with self._idle:
            return self._idle.wait_for(lambda: predicate(self), timeout)

    def wait_idle(self, timeout: float) -> bool:
        """Block until every queue is empty (or ``timeout`` seconds pass); True if idle."""
        with self._idle:
            return self._idle.wait_for(
                lambda: all(not q.busy and not q.items for q in self._queues.values()), timeout
            )

    def close(self) -> None:
        """Stop delivering: pending notifications are dropped, in-flight POSTs finish."""
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self._pool.shutdown(wait=True)
