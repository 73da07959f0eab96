"""``DevServer``: the dev FL server on a real socket, served by threads in this process."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import socketserver
import tempfile
import threading
from typing import Any, Callable, Iterable, Optional, Sequence, Union
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from .app import DevServerApp
from .notify import DEFAULT_RETRY_DELAYS, Notifier
from .store import Store

__all__ = ["DevServer"]

_log = logging.getLogger(__name__)

WsgiApp = Callable[..., Iterable[bytes]]


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-response is normal; don't print tracebacks.
        _log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _IPv6Server(_ThreadingWSGIServer):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        _log.debug("%s - %s", self.address_string(), format % args)


def _wrap_middleware(app: WsgiApp, max_request_size: int) -> WsgiApp:
    """Put the zstd content-coding middleware in front, when it is available."""
    try:
        from fl_sidecar.wsgi_zstd import ZstdMiddleware
    except ImportError:
        _log.warning("fl_sidecar.wsgi_zstd unavailable: serving without zstd content coding")
        return app
    wrapped: WsgiApp = ZstdMiddleware(app, max_request_size=max_request_size)
    return wrapped


class DevServer:
    """The embedded DLR FL Demonstrator server for local runs, demos and tests.

    Args:
        host: address to listen on (loopback by default).
        port: TCP port; 0 picks a free one.
        db: SQLite database file, or ``":memory:"``.
        data_dir: directory for model files; a temporary one (deleted on
            :meth:`stop`) when ``None``.
        notify_timeout: seconds each notification POST may take.
        notify_retry_delays: seconds before each retry of a refused notification.
        notify_workers: endpoints notified at the same time.
        max_upload_size: largest request body, in bytes (decoded size under zstd).
        password_iterations: PBKDF2-SHA256 iterations for new user passwords.
        compression: put the zstd middleware in front of the app.
        notification_quirks: repeat and reorder notifications as the real
            server does (see :class:`~fl_sidecar.devserver.notify.Notifier`).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        db: str = ":memory:",
        data_dir: Union[str, os.PathLike[str], None] = None,
        notify_timeout: float = 5.0,
        *,
        notify_retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        notify_workers: int = 8,
        max_upload_size: int = 8 * 1024**3,
        password_iterations: int = 20_000,
        compression: bool = True,
        notification_quirks: bool = False,
    ) -> None:
        self._host = host
        self._notification_quirks = notification_quirks
        self._port = port
        self._db = db
        self._owns_data_dir = data_dir is None
        self._data_dir = os.fspath(data_dir) if data_dir is not None else ""
        self._notify_timeout = notify_timeout
        self._notify_retry_delays = tuple(notify_retry_delays)
        self._notify_workers = notify_workers
        self._max_upload_size = max_upload_size
        self._password_iterations = password_iterations
        self._compression = compression
        self._server: Optional[_ThreadingWSGIServer] = None
        self._thread: Optional[threading.Thread] = None
        self._app: Optional[DevServerApp] = None
        self._store: Optional[Store] = None
        self._notifier: Optional[Notifier] = None
        self._url: Optional[str] = None

    @property
    def url(self) -> str:
        """The base URL (``http://host:port``), once started.

        Raises:
            RuntimeError: not started.
        """
        if self._url is None:
            raise RuntimeError("DevServer is not started")
        return self._url

    @property
    def app(self) -> DevServerApp:
        """The WSGI application (without the middleware), once started."""
        if self._app is None:
            raise RuntimeError("DevServer is not started")
        return self._app

    def start(self) -> str:
        """Open the database, bind the socket and serve in background threads.

        Returns:
            The base URL.

        Raises:
            OSError: the address cannot be bound.
            sqlite3.Error: the database cannot be opened.
            RuntimeError: already started.
        """
        if self._server is not None:
            raise RuntimeError("DevServer already started")
        if self._owns_data_dir:
            self._data_dir = tempfile.mkdtemp(prefix="fl-devserver-")
        try:
            self._store = Store(self._db)
            self._notifier = Notifier(
                timeout=self._notify_timeout,
                workers=self._notify_workers,
                retry_delays=self._notify_retry_delays,
                quirks=self._notification_quirks,
            )
            self._app = DevServerApp(
                self._store,
                self._data_dir,
                self._notifier,
                max_upload_size=self._max_upload_size,
                password_iterations=self._password_iterations,
            )
            served: WsgiApp = self._app
            if self._compression:
                served = _wrap_middleware(self._app, self._max_upload_size)
            server_class = _IPv6Server if ":" in self._host else _ThreadingWSGIServer
            server = server_class((self._host, self._port), _QuietHandler)
            server.set_app(served)
        except BaseException:
            self._cleanup()
            raise
        self._server = server
        host, port = server.server_address[:2]
        host_text = host.decode() if isinstance(host, bytes) else str(host)
        shown = f"[{host_text}]" if ":" in host_text else host_text
        self._url = f"http://{shown}:{port}"
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="devserver",
            daemon=True,
        )
        self._thread.start()
        _log.info("dev FL server listening on %s (data in %s)", self._url, self._data_dir)
        return self._url

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no aggregation runs and every notification is delivered or dropped.

        Returns:
            True if idle within ``timeout`` seconds.
        """
        if self._app is None or self._notifier is None:
            return True
        return self._app.wait_idle(timeout) and self._notifier.wait_idle(timeout)

    def wait_notifier(self, predicate: Callable[[Notifier], bool], timeout: float = 10.0) -> bool:
        """Wait until ``predicate(notifier)`` holds, e.g. ``lambda n: n.retried >= 1``.

        The notifier's counters are ``delivered``, ``failed`` and ``retried``.

        Returns:
            True if it held within ``timeout`` seconds.
        """
        if self._notifier is None:
            return False
        return self._notifier.wait_until(predicate, timeout)

    def stop(self) -> None:
        """Stop serving, finish running aggregations, drop pending notifications.

        Idempotent. Deletes the data directory if the server created it.
        """
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        self._cleanup()
        self._url = None

    def _cleanup(self) -> None:
        if self._app is not None:
            self._app.close()
            self._app = None
        if self._notifier is not None:
            self._notifier.close()
            self._notifier = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._owns_data_dir and self._data_dir:
            shutil.rmtree(self._data_dir, ignore_errors=True)
            self._data_dir = ""

    def __enter__(self) -> DevServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
