"""Start the real sidecar (``python -m fl_sidecar serve``) as a subprocess, for integration tests.

Usage::

    from sidecar_harness import running_sidecar

    with running_sidecar(server_url=devserver.url, args=["--token", user.token]) as sidecar:
        info = sidecar.stub.GetInfo(pb.GetInfoRequest(), metadata=sidecar.metadata)

The sidecar listens on a fresh unix socket in a short temp directory (or on
``127.0.0.1:0`` with ``tcp=True``), its notification endpoint on a free port,
its stderr (the log) goes to :attr:`SidecarProcess.log_path`. Start-up is
awaited without sleeping: the ready line on stdout (the real ports), then the
``grpc.health.v1`` Watch of ``fl_sidecar.v1.Sidecar`` until SERVING.
:meth:`SidecarProcess.stop` sends SIGTERM and returns the exit status;
:func:`running_sidecar` asserts it is 0 and that the socket file is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import fl_sidecar
from fl_sidecar.v1 import sidecar_pb2_grpc
from fl_sidecar.wire import MAX_MESSAGE_SIZE

__all__ = [
    "GRPC_OPTIONS",
    "SERVICE_NAME",
    "SidecarProcess",
    "running_sidecar",
    "short_tempdir",
    "spool_model_files",
    "start_sidecar",
]

SERVICE_NAME = "fl_sidecar.v1.Sidecar"
GRPC_OPTIONS: List[Tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
]
"""Client channel options matching the sidecar's 8 MiB message limit."""

# Environment variables that configure a sidecar: never inherited from the
# test runner's environment, so that every sidecar starts from its flags only.
_CONFIG_PREFIXES = ("FL_SIDECAR_", "FL_DEMONSTRATOR_", "FL_CLIENT_SERVER_")
_PACKAGE_ROOT = str(Path(fl_sidecar.__file__).resolve().parent.parent)


@dataclass
class SidecarProcess:
    """A running sidecar subprocess and a gRPC channel to it.

    Attributes:
        process: the ``python -m fl_sidecar serve`` process.
        workdir: its private temp directory (socket, log, spool).
        socket_path: the unix socket, or ``None`` on TCP only.
        target: the gRPC target of the channel (``unix://...`` or ``127.0.0.1:PORT``).
        ready: the ready line the sidecar printed (real ports and URLs).
        log_path: where its stderr (the log) goes.
        channel, stub: a channel to it and a ``SidecarStub`` on it.
        api_token: the token the channel's calls should carry, if any.
    """

    process: subprocess.Popen  # type: ignore[type-arg]
    workdir: Path
    socket_path: Optional[str]
    target: str
    ready: Dict[str, Any]
    log_path: Path
    channel: grpc.Channel
    stub: sidecar_pb2_grpc.SidecarStub
    api_token: Optional[str] = None
    _stopped_rc: Optional[int] = field(default=None, repr=False)

    @property
    def notification_url(self) -> Optional[str]:
        """Where the FL server should POST notifications (``None`` when disabled)."""
        value = self.ready.get("notification_url")
        return str(value) if value else None

    @property
    def metrics_port(self) -> Optional[int]:
        """The Prometheus port, when ``--metrics-port`` was given."""
        value = self.ready.get("metrics_port")
        return int(value) if value is not None else None

    @property
    def metadata(self) -> List[Tuple[str, str]]:
        """Call metadata carrying the API token (empty without one)."""
        return [("x-fl-sidecar-token", self.api_token)] if self.api_token else []

    def health_stub(self) -> health_pb2_grpc.HealthStub:
        """A ``grpc.health.v1.Health`` stub on the same channel."""
        return health_pb2_grpc.HealthStub(self.channel)

    def log_text(self) -> str:
        """Everything the sidecar logged so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal (SIGTERM starts the drain)."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the process to exit; returns its exit status.

        Raises:
            subprocess.TimeoutExpired: it did not exit in ``timeout`` seconds.
        """
        return self.process.wait(timeout=timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit (SIGKILL after ``timeout`` seconds), close the channel.

        Returns:
            The exit status (negative: killed by that signal).
        """
        if self._stopped_rc is not None:
            return self._stopped_rc
        self.signal(signal.SIGTERM)
        try:
            rc = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            rc = self.process.wait(timeout=10)
        self.channel.close()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stopped_rc = rc
        return rc

    def cleanup(self) -> None:
        """Stop if still running and remove the work directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def short_tempdir() -> Path:
    """A fresh directory with a short path: a unix socket inside fits sockaddr_un (107 bytes)."""
    base = tempfile.gettempdir()
    if len(base) > 40:
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="fls-", dir=base))


_short_tempdir = short_tempdir  # the name the test modules imported first


def spool_model_files(spool: Path) -> List[Path]:
    """The model files under a sidecar's ``--spool-dir``: what a transfer may leave behind.

    The spool's ``.lock`` (held while the sidecar lives) and the upload journal
    beside the spool (``fl-sidecar-uploads-<uid>``, kept across restarts) are meant
    to stay and are not counted.
    """
    return [
        path
        for path in spool.rglob("*")
        if path.is_file()
        and path.name != ".lock"
        and not path.parent.name.startswith("fl-sidecar-uploads-")
    ]


def _child_env(extra: Optional[Mapping[str, str]]) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CONFIG_PREFIXES)}
    # The subprocess imports the same fl_sidecar as this test process.
    paths = [_PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("XDG_RUNTIME_DIR", None)
    if extra:
        env.update(extra)
    return env


def _read_ready_line(process: subprocess.Popen, deadline: float, log_path: Path) -> Dict[str, Any]:  # type: ignore[type-arg]
    stdout: IO[bytes] = process.stdout  # type: ignore[assignment]
    selector = selectors.DefaultSelector()
    selector.register(stdout, selectors.EVENT_READ)
    buffer = b""
    try:
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(timeout=remaining):
                raise TimeoutError(
                    "the sidecar did not print its ready line in time; log:\n"
                    + log_path.read_text(errors="replace")
                )
            chunk = os.read(stdout.fileno(), 65536)
            if not chunk:
                process.wait(timeout=10)
                raise RuntimeError(
                    f"the sidecar exited with {process.returncode} before it was ready; log:\n"
                    + log_path.read_text(errors="replace")
                )
            buffer += chunk
    finally:
        selector.close()
    line = buffer.split(b"\n", 1)[0]
    ready: Dict[str, Any] = json.loads(line)
    assert ready.get("event") == "ready", ready
    return ready


def _await_serving(channel: grpc.Channel, deadline: float) -> None:
    grpc.channel_ready_future(channel).result(timeout=max(0.1, deadline - time.monotonic()))
    stub = health_pb2_grpc.HealthStub(channel)
    responses = stub.Watch(
        health_pb2.HealthCheckRequest(service=SERVICE_NAME),
        timeout=max(0.1, deadline - time.monotonic()),
    )
    try:
        for response in responses:
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return
    finally:
        responses.cancel()
    raise RuntimeError("the health Watch ended before the sidecar was SERVING")


def start_sidecar(
    *,
    server_url: str = "http://127.0.0.1:9",
    args: Sequence[str] = (),
    env: Optional[Mapping[str, str]] = None,
    api_token: Optional[str] = None,
    tcp: bool = False,
    unix: bool = True,
    notifications: bool = True,
    workdir: Optional[Path] = None,
    timeout: float = 60.0,
) -> SidecarProcess:
    """Start ``python -m fl_sidecar serve`` and wait until it is SERVING.

    Args:
        server_url: the FL server (``--server-url``).
        args: further ``serve`` flags.
        env: further environment variables (``FL_SIDECAR_*`` of the runner are dropped).
        api_token: passed as ``--api-token`` and put in :attr:`SidecarProcess.metadata`.
        tcp: listen on ``127.0.0.1:0`` and connect the channel there.
        unix: listen on a unix socket in the work directory.
        notifications: start the notification endpoint on a free port.
        workdir: where socket, log and spool go (a fresh short temp dir when ``None``).
        timeout: seconds to wait for readiness.

    Raises:
        TimeoutError / RuntimeError: it did not become ready (the message holds its log).
    """
    workdir = workdir or _short_tempdir()
    log_path = workdir / "sidecar.log"
    spool = workdir / "spool"
    spool.mkdir(exist_ok=True)
    socket_path = str(workdir / "s.sock") if unix else None
    command = [
        sys.executable,
        "-m",
        "fl_sidecar",
        "serve",
        "--server-url",
        server_url,
        "--spool-dir",
        str(spool),
        "--ready-file",
        str(workdir / "ready.json"),
        "--drain-seconds",
        "5",
    ]
    if socket_path is not None:
        command += ["--socket", socket_path]
    if tcp:
        command += ["--listen", "127.0.0.1:0"]
    if notifications:
        command += ["--notification-port", "0"]
    else:
        command += ["--no-notifications"]
    if api_token is not None:
        command += ["--api-token", api_token]
    command += list(args)
    deadline = time.monotonic() + timeout
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log_file,
            env=_child_env(env),
            cwd=str(workdir),
        )
    try:
        ready = _read_ready_line(process, deadline, log_path)
        # With both listeners the channel uses TCP (the unix socket is checked by path).
        target = f"127.0.0.1:{ready['tcp_port']}" if tcp else f"unix://{socket_path}"
        channel = grpc.insecure_channel(target, options=GRPC_OPTIONS)
        _await_serving(channel, deadline)
    except BaseException:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        raise
    return SidecarProcess(
        process=process,
        workdir=workdir,
        socket_path=socket_path,
        target=target,
        ready=ready,
        log_path=log_path,
        channel=channel,
        stub=sidecar_pb2_grpc.SidecarStub(channel),
        api_token=api_token,
    )


@contextlib.contextmanager
def running_sidecar(**kwargs: Any) -> Iterator[SidecarProcess]:
    """:func:`start_sidecar` as a context manager; on exit SIGTERM, and assert a clean stop.

    Asserts that the process exits 0 and removed its unix socket.
    """
    sidecar = start_sidecar(**kwargs)
    try:
        yield sidecar
    finally:
        rc = sidecar.stop()
        socket_gone = sidecar.socket_path is None or not os.path.exists(sidecar.socket_path)
        log = sidecar.log_text()
        shutil.rmtree(sidecar.workdir, ignore_errors=True)
    assert rc == 0, f"the sidecar exited with {rc}; log:\n{log}"
    assert socket_gone, "the sidecar left its socket file behind"
