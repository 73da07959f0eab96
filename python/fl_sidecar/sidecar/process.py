"""``fl-sidecar serve``: the sidecar process.

Starts, in this order: logging, metrics (when a port is configured), the FL
server client, the event bus and the notification endpoint (with the training
script runner in compatibility mode), then the gRPC server on a unix socket
(mode 0600) and/or loopback TCP, with health checking, reflection and the
optional API token. When everything listens it prints one JSON line to stdout
(``{"event": "ready", ...}``: the real ports) and writes the same to
``--ready-file``.

On SIGTERM or SIGINT it drains: health turns NOT_SERVING, new calls are
refused with UNAVAILABLE, WatchEvents streams end, the notification endpoint
stops, in-flight transfers get ``--drain-seconds`` to finish. Then the rest
are cancelled, HTTP requests included (their connections are shut down), and
each trainer is told what really became of its transfer: an upload stopped
before its last byte did not arrive (UNAVAILABLE, ``not_sent``), one whose
request was complete but unanswered is UNKNOWN. Then the socket file, the
ready file and the spool directory are removed and the process exits 0, at
most about ``--drain-seconds`` + 3 seconds after the signal (calls that still
run then, e.g. a conversion between two checks, are abandoned).

Threads: gRPC calls run on a pool of ``--max-concurrent-rpcs`` threads and
the server admits no more calls than that (the rest get RESOURCE_EXHAUSTED at
once), so a call never waits behind WatchEvents streams that hold their
threads for hours. Health Watch streams hold no thread.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hmac
import json
import logging
import os
import signal
import socket
import stat
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Dict, List, Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fl_sidecar import __version__
from fl_sidecar.cancel import REASON_SHUTDOWN
from fl_sidecar.errors import ConfigurationError
from fl_sidecar.events import EventKind, ServerEvent, clock_first_seq
from fl_sidecar.flserver import Credentials, FlServerClient
from fl_sidecar.sidecar import socketdir
from fl_sidecar.sidecar.eventbus import EventBus
from fl_sidecar.sidecar.servicer import SERVICE_NAME, SidecarService
from fl_sidecar.sidecar.settings import Settings, add_arguments, strip_userinfo
from fl_sidecar.sidecar.telemetry import Metrics, configure_logging
from fl_sidecar.sidecar.transfers import TransferManager
from fl_sidecar.sidecar.uploads import UploadJournal
from fl_sidecar.v1 import sidecar_pb2_grpc
from fl_sidecar.wire import MAX_MESSAGE_SIZE, TOKEN_METADATA_KEY

__all__ = [
    "TOKEN_METADATA_KEY",
    "SidecarServer",
    "check_socket_directory",
    "register",
    "run_serve",
]


_log = logging.getLogger(__name__)

# Health checks stay open without the token: orchestrators' gRPC probes cannot
# send metadata, and health reveals nothing but SERVING / NOT_SERVING.
_UNAUTHENTICATED_PREFIXES = ("/grpc.health.v1.Health/",)
_FINAL_GRACE = 1.0  # seconds the gRPC server gives leftover calls (health watches) at the end
_CANCEL_GRACE = 2.0  # seconds cancelled calls get to tell their trainers what became of them


def journal_directory(spool_dir: Optional[str]) -> str:
    """Where the upload journal lives: beside the spool directory, kept across restarts.

    ``<spool_dir>/fl-sidecar-uploads-<uid>`` (the system temp dir when ``spool_dir``
    is ``None``): the spool directory itself is private to one process and removed
    when it stops, the journal must outlive it.
    """
    return os.path.join(spool_dir or tempfile.gettempdir(), f"fl-sidecar-uploads-{os.getuid()}")


class _TokenInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call without the right ``x-fl-sidecar-token`` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        method = handler_call_details.method or ""
        if method.startswith(_UNAUTHENTICATED_PREFIXES):
            return continuation(handler_call_details)
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                presented = value.encode("utf-8") if isinstance(value, str) else bytes(value)
                break
        if hmac.compare_digest(presented, self._token):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return _refusing_handler(handler)


def _refusing_handler(handler: Any) -> Any:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            f"missing or wrong API token (metadata {TOKEN_METADATA_KEY})",
        )

    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)


def server_credentials(settings: Settings) -> Optional[Credentials]:
    """The sidecar's own FL server credentials: header, then token, then Basic, then URL.

    Raises:
        ConfigurationError: a credential is malformed.
    """
    try:
        if settings.authorization:
            return Credentials.from_header(settings.authorization)
        if settings.server_token:
            return Credentials.token(settings.server_token)
        if settings.username is not None and settings.password is not None:
            return Credentials.basic(settings.username, settings.password)
    except ValueError:
        raise ConfigurationError("the configured FL server credentials are malformed") from None
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(settings.server_url)
    if parts.username is not None:
        return Credentials.basic(unquote(parts.username), unquote(parts.password or ""))
    return None


def check_socket_directory(directory: str, *, trust_parents: bool = False) -> None:
    """Refuse a socket directory that someone other than this process's user could change.

    See :func:`fl_sidecar.sidecar.socketdir.check_socket_directory`: ours, writable by
    others only with the sticky bit, and parents owned by root or us.

    Raises:
        UnsafeSocketError: the directory or a parent fails the checks.
    """
    socketdir.check_socket_directory(directory, trust_parents=trust_parents)


def _prepare_socket_path(path: str, *, trust_parents: bool = False) -> None:
    """Make the socket's directory (0700, checked); remove a stale socket of ours, refuse the rest.

    Raises:
        UnsafeSocketError: the directory is not private, or the path holds something
            that is not our socket. ConfigurationError: a live server answers there.
    """
    directory = os.path.dirname(os.path.abspath(path))
    socketdir.make_socket_directory(directory, trust_parents=trust_parents)
    if socketdir.check_socket_file(path, owners={os.geteuid()}) is None:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        _log.info("removing a stale socket", extra={"socket": path})
        os.unlink(path)
        return
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        raise ConfigurationError(f"cannot check the existing socket {path}: {exc}") from None
    finally:
        probe.close()
    raise ConfigurationError(f"another server is listening on {path}; refusing to start")


class SidecarServer:
    """The running sidecar: gRPC server, notification endpoint, metrics, transfers.

    Use :meth:`start`, then :meth:`drain_and_stop` (what SIGTERM does).
    """

    def __init__(self, settings: Settings) -> None:
        """Build every part from ``settings``; nothing listens yet.

        Raises:
            ConfigurationError: invalid settings. OSError: the spool directory cannot be made.
        """
        self.settings = settings
        self.metrics = Metrics()
        self.bus = EventBus(first_seq=clock_first_seq())
        self.client = FlServerClient(
            strip_userinfo(settings.server_url),
            server_credentials(settings),
            timeout=settings.http_timeout,
            retries=settings.http_retries,
            compression=settings.compression,
            max_download_size=settings.max_model_size,
            spool_dir=settings.spool_dir,
        )
        self.journal = UploadJournal(Path(journal_directory(settings.spool_dir)))
        self.transfers = TransferManager(
            self.client,
            spool_dir=settings.spool_dir,
            max_model_size=settings.max_model_size,
            trust_pickles=settings.trust_pickles,
            metrics=self.metrics,
            journal=self.journal,
            model_round=self.bus.update_round_of_model,
        )
        # Packed upload bodies go into the locked spool directory too, so a crash
        # leaves nothing outside what the next start-up cleans.
        self.client.spool_dir = self.transfers.spool_dir
        # Made by start(), once the notification endpoint's URL is known.
        self.service: Optional[SidecarService] = None
        self.health = health.HealthServicer()
        self.notifications: Any = None
        self.script_runner: Any = None
        self.metrics_port: Optional[int] = None
        self.tcp_port: Optional[int] = None
        self._grpc: Any = None
        self._socket_inode: Optional[int] = None
        self._stopped = threading.Event()

    # -- start --

    def start(self) -> Dict[str, Any]:
        """Start every part; returns the facts printed as the ready line.

        Raises:
            ConfigurationError: the socket path is taken by a live server or not a socket.
            OSError / RuntimeError: an address cannot be bound.
        """
        settings = self.settings
        for warning in settings.warnings:
            _log.warning(warning)
        if settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(settings.metrics_host, settings.metrics_port)
        notification_url = self._start_notifications()
        self.service = SidecarService(
            self.transfers,
            self.bus,
            server_url=settings.public_server_url,
            trust_pickles=settings.trust_pickles,
            max_unpack_size=settings.max_model_size,
            notification_url=notification_url,
            metrics=self.metrics,
        )
        self._start_grpc(self.service)
        # No request to the FL server here: the request coding is learnt from the
        # answers to the transfers themselves (a start-up probe made the real server
        # log a 500 on every start).
        ready: Dict[str, Any] = {
            "event": "ready",
            "pid": os.getpid(),
            "version": __version__,
            "socket": settings.socket_path,
            "grpc_target": f"unix://{settings.socket_path}" if settings.socket_path else None,
            "tcp_port": self.tcp_port,
            "tcp_target": (
                f"{_host_for_url(settings.listen[0])}:{self.tcp_port}"
                if settings.listen is not None
                else None
            ),
            "notification_url": notification_url or None,
            "metrics_port": self.metrics_port,
        }
        _log.info("sidecar serving", extra={k: v for k, v in ready.items() if k != "event"})
        return ready

    def _start_notifications(self) -> str:
        """Start the notification endpoint (unless disabled); returns its URL or ``""``."""
        settings = self.settings
        if settings.notification_port is None:
            return ""
        from fl_sidecar.sidecar.notifications import NotificationServer

        on_event = self._event_handler()
        self.notifications = NotificationServer(
            self.bus,
            host=settings.notification_host,
            port=settings.notification_port,
            on_event=on_event,
        )
        self.notifications.start()
        url: str = self.notifications.url
        return url

    def _event_handler(self) -> Callable[[ServerEvent], None]:
        runner: Any = None
        settings = self.settings
        if settings.compatibility_mode:
            from fl_sidecar.sidecar.scripts import ScriptRunner

            assert settings.script_path is not None  # compatibility mode sets all three
            runner = ScriptRunner(
                executor=settings.script_executor or "python",
                script_path=settings.script_path,
                working_directory=settings.script_working_directory,
                env=settings.script_env,
                max_concurrent=settings.max_concurrent_scripts,
                max_queued=settings.max_queued_scripts,
                allowed_training_ids=settings.script_training_ids,
                confirm_training=self.transfers.training_known,
            )
            self.script_runner = runner
            if not runner.executor_found():
                _log.warning(
                    "compatibility mode: the training script executor is not found; "
                    "every run will fail to start",
                    extra={"executor": settings.script_executor},
                )
            _log.info(
                "compatibility mode: round and test notifications start the training script",
                extra={
                    "script": settings.script_path,
                    "executor": settings.script_executor,
                    "working_directory": settings.script_working_directory,
                    "max_concurrent_scripts": settings.max_concurrent_scripts,
                    "training_ids": ",".join(settings.script_training_ids or ()) or "confirmed",
                },
            )
        else:
            _log.info(
                "compatibility mode off: round starts go to WatchEvents subscribers only "
                "(--run-scripts or the FL_DEMONSTRATOR_TRAINING_SCRIPT_* variables start a "
                "training script per round)"
            )
        events_counter = self.metrics.events
        bus = self.bus
        round_kinds = (
            EventKind.UPDATE_ROUND_START,
            EventKind.MODEL_TEST_ROUND,
            EventKind.SWAG_ROUND_START,
        )

        def on_event(event: ServerEvent) -> None:
            events_counter.labels(event.kind.value).inc()
            if runner is not None:
                runner.handle(event)
            elif event.kind in round_kinds and not bus.has_subscriber(event.training_id):
                _log.warning(
                    "round notification with no WatchEvents subscriber and no training script: "
                    "it waits for the next subscriber",
                    extra={
                        "seq": event.seq,
                        "training_id": event.training_id,
                        "round": event.round,
                        "notification_type": event.notification_type,
                    },
                )

        return on_event

    def _start_grpc(self, service: SidecarService) -> None:
        settings = self.settings
        workers = settings.max_concurrent_rpcs
        interceptors: List[Any] = []
        if settings.api_token:
            interceptors.append(_TokenInterceptor(settings.api_token))
        server = grpc.server(
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fl-sidecar-rpc"),
            interceptors=interceptors,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
                # Two sidecars must never share a TCP port silently.
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=workers,
        )
        sidecar_pb2_grpc.add_SidecarServicer_to_server(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if settings.socket_path is not None:
            self._bind_unix(server, settings.socket_path)
        if settings.listen is not None:
            host, port = settings.listen
            bound = server.add_insecure_port(f"{_host_for_url(host)}:{port}")
            if bound == 0:
                raise OSError(f"cannot listen on {host}:{port}")
            self.tcp_port = bound
        server.start()
        self._grpc = server
        self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)

    def _bind_unix(self, server: Any, path: str) -> None:
        _prepare_socket_path(path, trust_parents=self.settings.trust_socket_parent)
        # grpc creates (binds) the socket inside add_insecure_port; the umask
        # makes it 0600 from its first moment, the chmod is belt and braces.
        old_umask = os.umask(0o177)
        try:
            bound = server.add_insecure_port(f"unix:{path}")
        finally:
            os.umask(old_umask)
        if bound == 0:
            raise OSError(f"cannot listen on the unix socket {path}")
        os.chmod(path, 0o600)
        info = os.lstat(path)
        if not stat.S_ISSOCK(info.st_mode) or stat.S_IMODE(info.st_mode) != 0o600:
            raise OSError(f"the socket {path} does not have mode 0600")
        self._socket_inode = info.st_ino

    # -- stop --

    def drain_and_stop(self) -> bool:
        """Drain (health NOT_SERVING, refuse new calls, wait for transfers), stop, clean up.

        After ``drain_seconds`` the transfers still running are cancelled (HTTP
        requests included) and get 2 seconds to report to their trainers.
        Idempotent; blocks at most about ``drain_seconds`` + 3 seconds.

        Returns:
            True when every call ended; False when some still run (stuck between
            two cancellation checks): the caller should not wait for their threads.
        """
        if self._stopped.is_set():
            return True
        self._stopped.set()
        settings = self.settings
        _log.info("draining", extra={"drain_seconds": settings.drain_seconds})
        self.health.enter_graceful_shutdown()
        service = self.service
        if service is not None:
            service.begin_drain()
        else:
            self.bus.close()  # start() failed before the servicer existed
        if self.notifications is not None:
            self.notifications.stop()
        finished = service is None or service.wait_idle(settings.drain_seconds)
        if service is not None and not finished:
            transfers = self.transfers.cancel_all(REASON_SHUTDOWN)
            _log.warning(
                "cancelling calls still running after the drain",
                extra={"left": service.active_calls(), "transfers": transfers},
            )
            finished = service.wait_idle(_CANCEL_GRACE)
            if not finished:
                _log.warning(
                    "calls still running after their cancellation; not waiting for them",
                    extra={"left": service.active_calls()},
                )
        if self.script_runner is not None:
            # After the drain, so a script's last upload could still finish.
            self.script_runner.stop()
        if self._grpc is not None:
            self._grpc.stop(grace=_FINAL_GRACE).wait()
        self._cleanup()
        _log.info("stopped")
        return finished

    def _cleanup(self) -> None:
        settings = self.settings
        if settings.socket_path is not None and self._socket_inode is not None:
            with contextlib.suppress(FileNotFoundError):
                # Remove only our own socket, not one a successor created meanwhile.
                if os.lstat(settings.socket_path).st_ino == self._socket_inode:
                    os.unlink(settings.socket_path)
        if settings.ready_file:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(settings.ready_file)
        self.transfers.close()
        self.client.close()
        self.metrics.close()


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _write_ready_file(path: str, ready: Dict[str, Any]) -> None:
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w", encoding="utf-8") as file:
        json.dump(ready, file)
        file.write("\n")
    os.replace(temp, path)


def run_serve(settings: Settings) -> int:
    """Run the sidecar until SIGTERM/SIGINT; returns the exit status (0 after a clean drain).

    Raises:
        ConfigurationError: invalid settings or the socket is taken.
    """
    configure_logging(level=settings.log_level, fmt=settings.log_format, secrets=settings.secrets())
    stop = threading.Event()
    received: List[int] = []

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        received.append(signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = SidecarServer(settings)
    try:
        ready = server.start()
        if settings.ready_file:
            _write_ready_file(settings.ready_file, ready)
        print(json.dumps(ready), flush=True)
        while not stop.wait(0.5):
            pass
        _log.info(
            "signal received",
            extra={"signal": signal.Signals(received[0]).name if received else "?"},
        )
    finally:
        finished = server.drain_and_stop()
    if not finished:
        # The gRPC pool's threads are joined at interpreter exit: one stuck in a
        # conversion would hold the exit up for as long as it runs. Everything of
        # ours is cleaned up already.
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)
    return 0


def _serve_command(args: argparse.Namespace) -> int:
    try:
        settings = Settings.from_args(args)
        return run_serve(settings)
    except ConfigurationError as exc:
        print(f"fl-sidecar serve: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # An address in use, a directory that cannot be made: the cause, not a traceback.
        _log.error("cannot start", extra={"error": str(exc)})
        print(f"fl-sidecar serve: cannot start: {exc}", file=sys.stderr)
        return 1


def register(subparsers: Any) -> None:
    """Add the ``serve`` subcommand to the CLI's subparsers."""
    parser = subparsers.add_parser(
        "serve",
        help="run the sidecar (gRPC for trainers, notifications from the FL server)",
        description=(
            "Run the fl-sidecar: gRPC for trainers on a unix socket (or loopback TCP), the "
            "FL server's notification endpoint, optional Prometheus metrics. Every flag can "
            "also be set by the environment variable in brackets; flags win."
        ),
    )
    add_arguments(parser)
    parser.set_defaults(func=_serve_command)
