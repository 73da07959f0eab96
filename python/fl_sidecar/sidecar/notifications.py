"""The HTTP endpoint the FL server POSTs its notifications to.

Compatible with the reference client's endpoint: JSON
``{"notification_type", "training_uuid", "body"}`` POSTed to any path (the
reference client's server takes every path), default port 8101, answered with

- 200 for ``TRAINING_START`` and ``TRAINING_FINISHED``,
- 202 for ``UPDATE_ROUND_START``, ``MODEL_TEST_ROUND`` and ``SWAG_ROUND_START``,
- 200 for ``CLIENT_REMOVED``,
- 400 for types this version does not know (they are still published, as
  ``EventKind.UNKNOWN`` with their raw JSON, so trainers can see them),
- 400 for malformed JSON, missing fields and wrong types; 413 for a body over
  the limit (its ``Content-Length`` is checked first; a body of up to 1 MiB is
  read and discarded before the 413, so a client that streams it gets the
  answer rather than a broken pipe; a larger one is answered at once and the
  connection closed, and a client that sent ``Expect: 100-continue`` gets the
  413 instead of the ``100``); 411 without a ``Content-Length``; 405 for other
  methods.

Each request must arrive whole (request line, headers and body) within
``request_deadline`` seconds (10 by default) of its connection's accept, or of
the previous answer on a kept-alive connection; the connection is closed
otherwise, however steadily it trickles bytes. Connections are capped in total
(``max_connections``) and per peer address (``max_connections_per_peer``).
At a cap, a new connection closes the oldest one that has been sending its
request for over a second (a slow or stalled peer; a real notification takes
milliseconds); when none qualifies it waits for a free slot, never refused.
So slow peers cannot hold every slot while the FL server's notifications wait.

Repeats are dropped (see :meth:`fl_sidecar.sidecar.eventbus.EventBus.publish_once`): the
real server POSTs one round start several times, and each (training, type,
round) is published, and handed to ``on_event``, once. A repeat is answered
like the original (200 or 202).

Bad input never gets a 500 (the reference client answers 500 to unknown types
and malformed JSON). The real server's POST has no timeout and its worker pool
is small, so the endpoint answers at once: it publishes on the
:class:`~fl_sidecar.sidecar.eventbus.EventBus` (quick) and answers; ``on_event`` (e.g.
:meth:`fl_sidecar.sidecar.scripts.ScriptRunner.handle`) is called afterwards on one
dispatcher thread, in sequence-number order, so a slow handler never delays an
answer. Events are published in the order they arrive; the real server
sometimes sends a round start before the training start, and both are
delivered as received.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import logging
import socket
import threading
import time
from typing import Any, Callable, Deque, Dict, Optional, Tuple

from fl_sidecar.errors import MalformedNotificationError
from fl_sidecar.events import (
    DEFAULT_MAX_NOTIFICATION_SIZE,
    EventKind,
    ServerEvent,
    parse_notification,
)
from fl_sidecar.sidecar.eventbus import EventBus, Verdict
from fl_sidecar.sidecar.settings import DEFAULT_NOTIFICATION_PORT

__all__ = [
    "DEFAULT_EVICT_AFTER",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_MAX_CONNECTIONS_PER_PEER",
    "DEFAULT_PORT",
    "DEFAULT_REQUEST_DEADLINE",
    "STATUS_BY_KIND",
    "NotificationServer",
]

logger = logging.getLogger(__name__)

DEFAULT_PORT = DEFAULT_NOTIFICATION_PORT
"""The reference client's default notification port (``FL_CLIENT_SERVER_PORT``)."""

STATUS_BY_KIND: Dict[EventKind, int] = {
    EventKind.TRAINING_START: 200,
    EventKind.TRAINING_FINISHED: 200,
    EventKind.UPDATE_ROUND_START: 202,
    EventKind.MODEL_TEST_ROUND: 202,
    EventKind.SWAG_ROUND_START: 202,
    EventKind.CLIENT_REMOVED: 200,
    EventKind.UNKNOWN: 400,
}
"""The HTTP status answered for each kind of (well-formed) notification."""

DEFAULT_REQUEST_DEADLINE = 10.0
"""Seconds a request (request line, headers and body) may take to arrive whole."""

DEFAULT_MAX_CONNECTIONS = 64
"""Connections served at once, in total."""

DEFAULT_MAX_CONNECTIONS_PER_PEER = 16
"""Connections served at once from one peer address."""

DEFAULT_EVICT_AFTER = 1.0
"""Seconds a connection must have spent sending its request before a cap may close it.

Younger ones are spared: a burst of real notifications must not evict each other.
"""
# Bytes of an oversized body read and discarded before the 413, so that a
# client streaming it reads the answer instead of a reset.
_DISCARD_LIMIT = 1024 * 1024
_DISCARD_CHUNK = 64 * 1024
# Seconds between log lines about closed slow connections (counts in between).
_LOG_EVERY = 1.0
# Bounds what a log line may quote of a client-controlled string.
_LOG_QUOTE_LIMIT = 80
# Seconds between checks for stop() while every handler slot is taken.
_SLOT_POLL = 0.05
# Events waiting for on_event at most; beyond it the oldest waiting one is
# skipped (it stays on the bus for trainers) rather than growing memory.
_DISPATCH_BACKLOG = 10_000


def _quote(value: str) -> str:
    text = value if len(value) <= _LOG_QUOTE_LIMIT else value[:_LOG_QUOTE_LIMIT] + "..."
    return repr(text)


class _Connection:
    """One accepted connection, as the caps and the deadline see it."""

    __slots__ = ("closed_because", "peer", "reading_since", "sock")

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        # monotonic seconds since its current request began arriving; None
        # while a complete request is handled.
        self.reading_since: Optional[float] = time.monotonic()
        self.closed_because: Optional[str] = None


def _close_for(conn: _Connection, reason: str) -> None:
    """Wake the connection's handler (its read returns at once) so that it ends."""
    conn.closed_because = reason
    with contextlib.suppress(OSError):  # already gone
        conn.sock.shutdown(socket.SHUT_RDWR)


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # Rebinding a port the last run left in TIME_WAIT must work.
    allow_reuse_address = True
    # socketserver's default listen backlog is 5: a burst of concurrent
    # notifications overflows it and the kernel resets them, lost for good.
    request_queue_size = socket.SOMAXCONN
    # Set by NotificationServer before serving.
    notifications: NotificationServer

    def __init__(
        self,
        address: Tuple[str, int],
        family: socket.AddressFamily,
        *,
        max_connections: int,
        max_connections_per_peer: int,
        request_deadline: float,
        evict_after: float,
    ) -> None:
        self.address_family = family
        self._evict_after = evict_after
        self.stopping = False
        self.request_deadline = request_deadline
        self._max_connections = max_connections
        self._max_per_peer = min(max_connections_per_peer, max_connections)
        self._conn_cond = threading.Condition()
        self._connections: Dict[int, _Connection] = {}
        self._per_peer: collections.Counter[str] = collections.Counter()
        self._closed_unlogged: collections.Counter[str] = collections.Counter()
        self._last_closed_log: Dict[str, float] = {}
        super().__init__(address, _Handler, bind_and_activate=True)

    def connection_of(self, sock: Any) -> Optional[_Connection]:
        with self._conn_cond:
            return self._connections.get(id(sock))

    def process_request(self, request: Any, client_address: Any) -> None:
        # At a cap, close a connection that has been sending its request for a
        # while, or wait for a free handler; never refuse: the real server never
        # retries a non-2xx answer (a refusal would lose the notification),
        # while its POST waits as long as it takes. Meanwhile new connections
        # queue in the kernel's listen backlog.
        conn = _Connection(request, str(client_address[0]))
        registered = False
        while not registered:
            victim: Optional[_Connection] = None
            with self._conn_cond:
                if self.stopping:
                    self.shutdown_request(request)
                    return
                peer_full = self._per_peer[conn.peer] >= self._max_per_peer
                if not peer_full and len(self._connections) < self._max_connections:
                    conn.reading_since = time.monotonic()
                    self._connections[id(request)] = conn
                    self._per_peer[conn.peer] += 1
                    registered = True
                    continue
                scope = conn.peer if peer_full else None
                # One eviction at a time: a closed connection frees its slot
                # only when its handler has ended.
                if not self._closing_locked(scope):
                    victim = self._slowest_locked(scope)
                if victim is None:
                    self._conn_cond.wait(_SLOT_POLL)
            if victim is not None:
                _close_for(victim, "evicted")
                self._log_closed("evicted", victim.peer)
            self.close_overdue()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def service_actions(self) -> None:
        # serve_forever calls this between accepts (every poll interval).
        self.close_overdue()

    def close_overdue(self) -> None:
        """Close every connection whose request did not arrive whole within the deadline."""
        now = time.monotonic()
        overdue = []
        with self._conn_cond:
            for conn in self._connections.values():
                since = conn.reading_since
                if (
                    conn.closed_because is None
                    and since is not None
                    and now - since > self.request_deadline
                ):
                    conn.closed_because = "deadline"
                    overdue.append(conn)
        for conn in overdue:
            _close_for(conn, "deadline")
            self._log_closed("deadline", conn.peer)

    def _log_closed(self, reason: str, peer: str) -> None:
        """Log closed slow connections, at most one line per reason a second (a flood is many)."""
        now = time.monotonic()
        with self._conn_cond:
            self._closed_unlogged[reason] += 1
            if now - self._last_closed_log.get(reason, -_LOG_EVERY) < _LOG_EVERY:
                return
            count = self._closed_unlogged.pop(reason)
            self._last_closed_log[reason] = now
        if reason == "deadline":
            message = "notification endpoint: closed %d connection(s) whose request did not "
            message += f"arrive within {self.request_deadline:g} s"
        else:
            message = "notification endpoint: closed %d connection(s) still sending their "
            message += "request, to make room"
        logger.warning(message, count, extra={"peer": peer, "closed": count})

    def _closing_locked(self, peer: Optional[str]) -> bool:
        """Whether a connection (of ``peer``, if given) was closed and its handler not yet ended."""
        return any(
            conn.closed_because is not None and (peer is None or conn.peer == peer)
            for conn in self._connections.values()
        )

    def _slowest_locked(self, peer: Optional[str]) -> Optional[_Connection]:
        """The connection (of ``peer``, if given) sending its request the longest, over a second."""
        cutoff = time.monotonic() - self._evict_after
        slowest: Optional[_Connection] = None
        for conn in self._connections.values():
            since = conn.reading_since
            if conn.closed_because is not None or since is None or since > cutoff:
                continue
            if peer is not None and conn.peer != peer:
                continue
            if slowest is None or since < (slowest.reading_since or 0.0):
                slowest = conn
        return slowest

    def _forget(self, request: Any) -> None:
        with self._conn_cond:
            conn = self._connections.pop(id(request), None)
            if conn is not None:
                self._per_peer[conn.peer] -= 1
                if self._per_peer[conn.peer] <= 0:
                    del self._per_peer[conn.peer]
            self._conn_cond.notify_all()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The default prints a traceback to stderr; log it instead.
        logger.exception("notification endpoint: unexpected error in a handler")


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = "fl-sidecar"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    # No single read may outlast the whole request's deadline (the server
    # closes overdue connections; this bounds a read it has not reached yet).
    timeout = DEFAULT_REQUEST_DEADLINE
    _skip_body = False

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_deadline)

    def handle_one_request(self) -> None:
        conn = self.server.connection_of(self.request)
        if conn is not None:
            # A kept-alive connection's next request gets a deadline of its own.
            conn.reading_since = time.monotonic()
        self._skip_body = False
        super().handle_one_request()

    def handle_expect_100(self) -> bool:
        # A client waiting for "100 Continue" has not sent an oversized body:
        # answer the 413 instead of inviting it.
        length = self.headers.get("Content-Length", "").strip()
        if (
            length.isascii()
            and length.isdigit()
            and int(length) > self.server.notifications.max_body_size
        ):
            self._skip_body = True
            return True
        return super().handle_expect_100()

    def _request_complete(self) -> None:
        conn = self.server.connection_of(self.request)
        if conn is not None:
            conn.reading_since = None

    def _discard(self, count: int) -> int:
        """Read and drop up to ``count`` body bytes; returns how many arrived."""
        received = 0
        try:
            while received < count:
                chunk = self.rfile.read(min(_DISCARD_CHUNK, count - received))
                if not chunk:
                    break
                received += len(chunk)
        except (OSError, ValueError):
            pass  # closed by the deadline, or reset: the answer is still tried
        return received

    def do_POST(self) -> None:
        owner = self.server.notifications
        length_header = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding") is not None:
            # Chunked bodies have no length to check up front; the real
            # server always sends a Content-Length.
            self._answer(411, "send the body with a Content-Length", close=True)
            return
        if length_header is None:
            self._answer(411, "Content-Length is required", close=True)
            return
        if len(self.headers.get_all("Content-Length", [])) != 1:
            # Two lengths are a request-smuggling pattern; trust neither.
            self._answer(400, "more than one Content-Length", close=True)
            return
        digits = length_header.strip()
        if not (digits.isascii() and digits.isdigit()):
            self._answer(400, "Content-Length is not a non-negative integer", close=True)
            return
        length = int(digits)
        if length > owner.max_body_size:
            logger.warning(
                "notification refused: body too large",
                extra={"content_length": length, "limit": owner.max_body_size},
            )
            # Read (and drop) a body of moderate size first: a client that
            # streams it before reading the answer would otherwise see a
            # reset instead of the 413. A larger one is answered at once; the
            # connection closes either way (the rest of the body is unread).
            if not self._skip_body and length <= _DISCARD_LIMIT:
                self._discard(length)
            self._answer(
                413,
                f"body of {length} bytes exceeds the limit of {owner.max_body_size} bytes",
                close=True,
            )
            return
        try:
            data = self.rfile.read(length)
        except (OSError, socket.timeout):
            self.close_connection = True
            logger.warning("notification refused: body not received in time")
            return
        if len(data) != length:
            self._answer(400, "body shorter than its Content-Length", close=True)
            return
        self._request_complete()
        owner._receive(self, data)

    def __getattr__(self, name: str) -> Any:
        # BaseHTTPRequestHandler answers 501 to methods without a do_X
        # method; here every method but POST, known or not, is a 405.
        if name.startswith("do_") and name != "do_POST":
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        # Any body was left unread, so the connection cannot be reused.
        self._answer(405, "only POST is accepted", close=True, allow="POST")

    def _answer(
        self, status: int, detail: str, *, close: bool, allow: Optional[str] = None
    ) -> bool:
        """Send a JSON ``{"detail": ...}`` answer; ``False`` when the sender went away."""
        payload = json.dumps({"detail": detail}).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if allow is not None:
                self.send_header("Allow", allow)
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
            logger.debug("notification endpoint: answer not delivered", extra={"status": status})
            return False
        return True

    def log_message(self, format: str, *args: Any) -> None:
        # http.server's own lines (bad request lines, timeouts) go to logging.
        logger.debug("notification endpoint: " + format, *args)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # NotificationServer logs each notification itself, structured


class _Dispatcher:
    """One thread that hands events to ``on_event`` in the order they were put."""

    def __init__(self, on_event: Callable[[ServerEvent], None]) -> None:
        self._on_event = on_event
        self._cond = threading.Condition()
        self._queue: Deque[ServerEvent] = collections.deque()
        self._closing = False
        self._thread = threading.Thread(
            target=self._run, name="fl-sidecar-notification-handler", daemon=True
        )
        self._thread.start()

    def put(self, event: ServerEvent) -> None:
        with self._cond:
            if self._closing:
                return  # stopping: the event stays on the bus
            if len(self._queue) >= _DISPATCH_BACKLOG:
                skipped = self._queue.popleft()
                logger.error(
                    "notification handler too slow; skipped an event (still on the bus)",
                    extra={"seq": skipped.seq},
                )
            self._queue.append(event)
            self._cond.notify()

    def close(self, timeout: float) -> None:
        """Let the queued events through (for at most ``timeout`` seconds), then end."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "notification handler still busy at stop; it gets the rest when it returns"
            )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return
                event = self._queue.popleft()
            try:
                self._on_event(event)
            except Exception:
                logger.exception("notification handler failed", extra={"seq": event.seq})


class NotificationServer:
    """Receives the FL server's notifications over HTTP and publishes them on a bus.

    Serves on its own threads (one per connection, at most ``max_connections``
    at once); :meth:`start` returns once the socket listens.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        max_body_size: int = DEFAULT_MAX_NOTIFICATION_SIZE,
        on_event: Optional[Callable[[ServerEvent], None]] = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        max_connections_per_peer: int = DEFAULT_MAX_CONNECTIONS_PER_PEER,
        request_deadline: float = DEFAULT_REQUEST_DEADLINE,
        evict_after: float = DEFAULT_EVICT_AFTER,
    ) -> None:
        """Configure the endpoint (nothing listens before :meth:`start`).

        Args:
            bus: where notifications are published.
            host: the address to listen on; loopback by default. An IPv6
                address listens on IPv6.
            port: the TCP port; 0 picks a free one (see :attr:`port`).
            max_body_size: the largest accepted body, in bytes.
            on_event: called with each published event, after the answer,
                on one dispatcher thread, in ``seq`` order. Exceptions are
                logged, never answered. Up to 10,000 events wait for it; past
                that the oldest waiting one is skipped (and logged).
            max_connections: connections served at once (one thread each).
                At the cap, a new connection closes the oldest one still
                sending its request after a second; otherwise it waits,
                unanswered, until one ends. Bounds the threads a flood of
                connections can take.
            max_connections_per_peer: the same cap for one peer address (at
                most ``max_connections``).
            request_deadline: seconds a request may take to arrive whole
                (request line, headers and body), counted from the accept or
                from the previous answer on the connection; an overdue
                connection is closed.
            evict_after: seconds a connection must have spent sending its
                request before a new one at a cap may close it.

        Raises:
            ValueError: ``port`` is outside 0..65535, ``max_body_size``,
                ``max_connections`` or ``max_connections_per_peer`` is less
                than 1, or ``request_deadline`` or ``evict_after`` is not positive.
        """
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        if max_body_size < 1:
            raise ValueError(f"max_body_size must be at least 1 byte, got {max_body_size}")
        self.bus = bus
        self.host = host
        self.max_body_size = max_body_size
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, got {max_connections}")
        self.max_connections = max_connections
        if max_connections_per_peer < 1:
            raise ValueError(
                f"max_connections_per_peer must be at least 1, got {max_connections_per_peer}"
            )
        if not request_deadline > 0:
            raise ValueError(f"request_deadline must be positive, got {request_deadline}")
        if not evict_after > 0:
            raise ValueError(f"evict_after must be positive, got {evict_after}")
        self.evict_after = evict_after
        self.max_connections_per_peer = max_connections_per_peer
        self.request_deadline = request_deadline
        self._requested_port = port
        self._on_event = on_event
        self._server: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        # Publishing and queueing for on_event happen under one lock, so the
        # dispatcher sees events in seq order even when POSTs race.
        self._publish_lock = threading.Lock()
        self._dispatcher: Optional[_Dispatcher] = None

    @property
    def port(self) -> int:
        """The port listened on (the real one when 0 was asked); the requested one before start."""
        server = self._server
        if server is None:
            return self._requested_port
        return int(server.server_address[1])

    @property
    def url(self) -> str:
        """``http://host:port/``, the ``message_endpoint`` to register with the FL server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def running(self) -> bool:
        """Whether the endpoint is serving."""
        return self._server is not None

    def start(self) -> None:
        """Listen and serve in a background thread. Idempotent.

        Raises:
            OSError: the address cannot be bound (e.g. the port is in use).
        """
        with self._lock:
            if self._server is not None:
                return
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            server = _HTTPServer(
                (self.host, self._requested_port),
                family,
                max_connections=self.max_connections,
                max_connections_per_peer=self.max_connections_per_peer,
                request_deadline=self.request_deadline,
                evict_after=self.evict_after,
            )
            server.notifications = self
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},  # seconds: how fast stop() returns
                name="fl-sidecar-notifications",
                daemon=True,
            )
            thread.start()
            if self._on_event is not None:
                self._dispatcher = _Dispatcher(self._on_event)
            self._server, self._thread = server, thread
        logger.info(
            "notification endpoint listening",
            extra={"url": self.url, "max_body_size": self.max_body_size},
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and close the socket, then let ``on_event`` catch up. Idempotent.

        Args:
            timeout: the longest wait, in seconds, for ``on_event`` to take the
                events already published (what it has not taken by then is
                left on the bus).
        """
        with self._lock:
            server, thread = self._server, self._thread
            dispatcher = self._dispatcher
            self._server, self._thread, self._dispatcher = None, None, None
        if server is None:
            return
        server.stopping = True
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        if dispatcher is not None:
            dispatcher.close(timeout)
        logger.info("notification endpoint stopped")

    def __enter__(self) -> NotificationServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _receive(self, handler: _Handler, data: bytes) -> None:
        """Parse, publish, answer, then hand the event on (called on the request's thread)."""
        try:
            notification_type, training_id, body = parse_notification(
                data, max_size=self.max_body_size
            )
        except MalformedNotificationError as exc:
            logger.warning(
                "notification refused: %s",
                exc,
                extra={"status": 400, "size": len(data), "peer": handler.client_address[0]},
            )
            handler._answer(400, str(exc), close=False)
            return
        raw_json = data.decode("utf-8")  # parse_notification checked it is UTF-8
        with self._publish_lock:
            verdict, published = self.bus.publish_once(
                notification_type, training_id, body, raw_json
            )
            dispatcher = self._dispatcher
            if dispatcher is not None and published is not None:
                dispatcher.put(published)
        if published is None:
            self._answer_repeat(handler, verdict, notification_type, training_id, body)
            return
        event = published
        status = STATUS_BY_KIND[event.kind]
        logger.info(
            "notification seq=%d type=%s training=%s round=%s status=%d",
            event.seq,
            _quote(notification_type),
            training_id,
            event.round,
            status,
            extra={
                "seq": event.seq,
                "notification_type": notification_type[:_LOG_QUOTE_LIMIT],
                "training_id": training_id,
                "model_id": event.model_id,
                "round": event.round,
                "status": status,
            },
        )
        if event.kind is EventKind.UNKNOWN:
            detail = f"unknown notification type {_quote(notification_type)} (published)"
        else:
            detail = "accepted"
        if not handler._answer(status, detail, close=False):
            # The sender went away; the event is published all the same.
            logger.warning("notification answer not delivered", extra={"seq": event.seq})

    def _answer_repeat(
        self,
        handler: _Handler,
        verdict: Verdict,
        notification_type: str,
        training_id: str,
        body: Dict[str, Any],
    ) -> None:
        """Answer a dropped repeat like the original, and log why it was dropped."""
        kind = EventKind.from_notification_type(notification_type)
        status = STATUS_BY_KIND[kind]
        round_ = body.get("round")
        if verdict is Verdict.STALE:
            # Rarer than a plain repeat, and a sign the server is behind: say so.
            log = logger.warning
            detail = "dropped: an older round than this training's newest"
        else:
            log = logger.info
            detail = "dropped: a repeat of a notification already delivered"
        log(
            "notification %s type=%s training=%s round=%s status=%d",
            detail,
            _quote(notification_type),
            training_id,
            round_,
            status,
            extra={
                "notification_type": notification_type[:_LOG_QUOTE_LIMIT],
                "training_id": training_id,
                "round": round_,
                "status": status,
                "verdict": verdict.value,
            },
        )
        handler._answer(status, detail, close=False)
