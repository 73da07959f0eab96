"""A small TCP proxy for HTTP/1.x that misbehaves on request: test tooling, not a mock.

It sits between a real client and a real server and, for each accepted
connection, takes the next action from a queue (``default`` when the queue
is empty):

- ``"pass"``: relay both ways untouched;
- ``"drop"``: read the request head, then reset the connection (no answer);
- ``"503"``: read the whole request, answer ``503 Service Unavailable``, close;
- ``"stall"``: read and discard everything, never answer (until :meth:`stop`);
- ``"truncate:N"``: relay the request, then only the first ``N`` bytes of the
  answer, then close;
- ``"hold:N"``: relay the first ``N`` bytes the client sends, then read no more
  from it (its writes block, like a stalled slow link) until :meth:`release`;
- ``"hold-answer:N"``: relay the request whole, and the first ``N`` bytes of the
  answer, then hold the rest back until :meth:`release` (``N=0``: the server
  processed the request, the client hears nothing).

:attr:`holding` is set when a hold begins; :meth:`wait_client_closed` waits
until the client closed its side of a connection (seen while relaying).

Every request seen is recorded (method, path, headers, the first 64 KiB of
its body and its total size) so that tests can check what went over the wire:
how many uploads, whether they were zstd, how many bytes.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

__all__ = ["FaultProxy", "SeenRequest"]

_BODY_PREFIX = 64 * 1024


@dataclass
class SeenRequest:
    """One HTTP request as it crossed the proxy."""

    action: str
    method: str = ""
    path: str = ""
    headers: Dict[str, str] = field(default_factory=dict)
    body_prefix: bytes = b""
    body_bytes: int = 0
    complete: bool = False
    response_head: bytes = b""
    response_bytes: int = 0


class _RequestParser:
    """Incremental parser of the client->server byte stream (Content-Length bodies only)."""

    def __init__(self, proxy: FaultProxy, action: str) -> None:
        self._proxy = proxy
        self._action = action
        self._buf = b""
        self._remaining = 0
        self.current: Optional[SeenRequest] = None

    def feed(self, data: bytes) -> None:
        while data:
            if self.current is not None and self._remaining > 0:
                take = data[: self._remaining]
                data = data[len(take) :]
                req = self.current
                if len(req.body_prefix) < _BODY_PREFIX:
                    req.body_prefix += take[: _BODY_PREFIX - len(req.body_prefix)]
                req.body_bytes += len(take)
                self._remaining -= len(take)
                if self._remaining == 0:
                    req.complete = True
                continue
            self._buf += data
            data = b""
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head, rest = self._buf[:end], self._buf[end + 4 :]
            self._buf = b""
            lines = head.decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            req = SeenRequest(self._action, parts[0], parts[1] if len(parts) > 1 else "")
            for line in lines[1:]:
                name, _, value = line.partition(":")
                req.headers[name.strip().lower()] = value.strip()
            self._remaining = int(req.headers.get("content-length", "0") or 0)
            req.complete = self._remaining == 0
            self.current = req
            self._proxy._record(req)
            data = rest

    @property
    def head_seen(self) -> bool:
        return self.current is not None

    @property
    def body_done(self) -> bool:
        return self.current is not None and self._remaining == 0


class FaultProxy:
    """A misbehaving TCP proxy on a free loopback port in front of ``upstream``.

    Args:
        upstream: (host, port) of the real server.
        actions: actions for the first connections, in order.
        default: action once ``actions`` is used up.
        port: the loopback port to listen on (0: a free one).
    """

    def __init__(
        self,
        upstream: Tuple[str, int],
        actions: Sequence[str] = (),
        default: str = "pass",
        port: int = 0,
    ) -> None:
        self.upstream = upstream
        self.default = default
        self.requests: List[SeenRequest] = []
        self.connections = 0
        self._actions = list(actions)
        self.holding = threading.Event()
        self.client_closed = 0
        self._released = threading.Event()
        self._lock = threading.Condition()
        self._stopping = threading.Event()
        self._threads: List[threading.Thread] = []
        self._socks: List[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", port))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepter.start()

    # -- control --

    def set_actions(self, actions: Sequence[str], default: Optional[str] = None) -> None:
        """Replace the queue of actions (and optionally the default)."""
        with self._lock:
            self._actions = list(actions)
            if default is not None:
                self.default = default

    def seen(self, method: Optional[str] = None, path_prefix: str = "") -> List[SeenRequest]:
        """Requests recorded so far, filtered by method and path prefix."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and r.path.startswith(path_prefix)
            ]

    def wait_requests(self, count: int, timeout: float = 10.0) -> List[SeenRequest]:
        """Wait until ``count`` requests were seen; returns them all."""
        with self._lock:
            self._lock.wait_for(lambda: len(self.requests) >= count, timeout)
            return list(self.requests)

    def release(self) -> None:
        """End every hold: relay what was held back, and everything after it."""
        self._released.set()

    def wait_client_closed(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until clients closed ``count`` relayed connections; True if they did."""
        with self._lock:
            return self._lock.wait_for(lambda: self.client_closed >= count, timeout)

    def stop(self) -> None:
        """Close the listener and every connection (stalled ones included)."""
        self._stopping.set()
        self._released.set()
        # shutdown() wakes the thread blocked in accept(); close() alone does not.
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._accepter.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- internals --

    def _record(self, req: SeenRequest) -> None:
        with self._lock:
            self.requests.append(req)
            self._lock.notify_all()

    def _next_action(self) -> str:
        with self._lock:
            self.connections += 1
            return self._actions.pop(0) if self._actions else self.default

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            action = self._next_action()
            with self._lock:
                self._socks.append(client)
            thread = threading.Thread(target=self._serve, args=(client, action), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, client: socket.socket, action: str) -> None:
        parser = _RequestParser(self, action)
        try:
            if action == "pass" or action.startswith("truncate:"):
                limit = int(action.split(":", 1)[1]) if action.startswith("truncate:") else None
                self._relay(client, parser, limit)
            elif action.startswith("hold:"):
                # A small receive buffer, so that the client's writes block soon after
                # the hold begins however large the host's TCP buffers may grow.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                self._relay(client, parser, None, hold_request=int(action.split(":", 1)[1]))
            elif action.startswith("hold-answer:"):
                self._relay(client, parser, None, hold_answer=int(action.split(":", 1)[1]))
            elif action == "drop":
                while not parser.head_seen:
                    data = client.recv(65536)
                    if not data:
                        return
                    parser.feed(data)
                # SO_LINGER 0: close with a reset, like a crashed peer.
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif action == "503":
                while not parser.body_done:
                    data = client.recv(65536)
                    if not data:
                        return
                    parser.feed(data)
                body = b'{"detail":"Service Unavailable (fault proxy)"}'
                client.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
                )
            elif action == "stall":
                while not self._stopping.is_set():
                    data = client.recv(65536)
                    if not data:
                        return
                    parser.feed(data)
            else:
                raise ValueError(f"unknown fault action {action!r}")
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()

    def _hold(self) -> None:
        self.holding.set()
        self._released.wait()

    def _relay(
        self,
        client: socket.socket,
        parser: _RequestParser,
        limit: Optional[int],
        *,
        hold_request: Optional[int] = None,
        hold_answer: Optional[int] = None,
    ) -> None:
        upstream = socket.create_connection(self.upstream, timeout=30)
        with self._lock:
            self._socks.append(upstream)

        def up() -> None:
            forwarded = 0
            try:
                while True:
                    size = 256 * 1024
                    if hold_request is not None and not self._released.is_set():
                        if forwarded >= hold_request:
                            self._hold()
                        else:
                            size = min(size, hold_request - forwarded)
                    data = client.recv(size)
                    if not data:
                        break
                    forwarded += len(data)
                    parser.feed(data)
                    upstream.sendall(data)
                upstream.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            finally:
                with self._lock:
                    self.client_closed += 1
                    self._lock.notify_all()

        pump = threading.Thread(target=up, daemon=True)
        pump.start()
        sent = 0
        try:
            while True:
                data = upstream.recv(256 * 1024)
                if not data:
                    break
                if limit is not None:
                    data = data[: limit - sent]
                if hold_answer is not None and not self._released.is_set():
                    if sent >= hold_answer:
                        self._hold()
                    elif sent + len(data) > hold_answer:
                        client.sendall(data[: hold_answer - sent])
                        data = data[hold_answer - sent :]
                        sent = hold_answer
                        self._hold()
                # Recorded before it is sent, so a client that got the answer sees the record.
                req = parser.current
                if req is not None:
                    if len(req.response_head) < 4096:
                        req.response_head += data[: 4096 - len(req.response_head)]
                    req.response_bytes += len(data)
                client.sendall(data)
                sent += len(data)
                if limit is not None and sent >= limit:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    break
        except OSError:
            pass
        finally:
            upstream.close()
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            pump.join(timeout=5)
