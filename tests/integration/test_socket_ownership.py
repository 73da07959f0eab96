"""A socket another user could have planted: the sidecar will not serve, a client will not talk.

Real processes and sockets: ``python -m fl_sidecar serve`` subprocesses, and a
real gRPC server in this process that poses as the sidecar on a unix socket
owned by ``nobody`` (65534). As root, ``chown`` plays the other user.
"""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import grpc
import pytest
from sidecar_harness import _child_env, _read_ready_line, running_sidecar

from fl_sidecar import errors
from fl_sidecar.client import CallCredentials, SidecarClient
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.v1 import sidecar_pb2_grpc

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root"),
]

OTHER_UID = 65534  # nobody
TOKEN = "tok-Secret-" + "t" * 20
PASSWORD = "pw-Secret-5678"


def _serve(*flags: str, env: Any = None) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    return subprocess.run(
        [sys.executable, "-m", "fl_sidecar", "serve", "--no-notifications", *flags],
        env=_child_env(env),
        capture_output=True,
        timeout=60,
        check=False,
    )


def test_sidecar_refuses_a_socket_directory_of_another_user(workdir: Path) -> None:
    theirs = workdir / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    result = _serve("--socket", str(theirs / "s.sock"))
    assert result.returncode == 2, result.stderr
    assert str(theirs).encode() in result.stderr
    assert f"uid {OTHER_UID}".encode() in result.stderr
    assert list(theirs.iterdir()) == []


def test_sidecar_refuses_a_world_writable_socket_directory(workdir: Path) -> None:
    shared = workdir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    result = _serve("--socket", str(shared / "s.sock"))
    assert result.returncode == 2, result.stderr
    assert b"writable by others" in result.stderr
    assert b"0777" in result.stderr
    assert list(shared.iterdir()) == []


def test_world_writable_parent_needs_trust_socket_parent(workdir: Path) -> None:
    # A Kubernetes emptyDir: mode 0777, reached by the pod's containers alone.
    volume = workdir / "volume"
    volume.mkdir()
    volume.chmod(0o777)
    socket_path = volume / "grpc" / "s.sock"
    refused = _serve("--socket", str(socket_path))
    assert refused.returncode == 2, refused.stderr
    assert b"parent" in refused.stderr and str(volume).encode() in refused.stderr
    assert not (volume / "grpc").exists()  # nothing made under an unsafe parent
    with running_sidecar(
        args=["--socket", str(socket_path), "--trust-socket-parent"],
        unix=False,
        tcp=True,
        notifications=False,
    ) as process:
        assert process.ready["socket"] == str(socket_path)
        assert stat.S_IMODE(os.lstat(socket_path.parent).st_mode) == 0o700
        with SidecarClient(str(socket_path), timeout=10) as client:
            assert client.get_info().version


def test_sidecar_refuses_a_default_directory_someone_else_made_first(workdir: Path) -> None:
    # $XDG_RUNTIME_DIR/fl-sidecar squatted by another user before the sidecar starts.
    squatted = workdir / "fl-sidecar"
    squatted.mkdir(mode=0o700)
    os.chown(squatted, OTHER_UID, OTHER_UID)
    result = _serve(env={"XDG_RUNTIME_DIR": str(workdir)})
    assert result.returncode == 2, result.stderr
    assert str(squatted).encode() in result.stderr
    assert b"belongs to" in result.stderr


def test_sidecar_refuses_a_socket_file_of_another_user(workdir: Path) -> None:
    import socket

    planted = workdir / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(planted))
        os.chown(planted, OTHER_UID, OTHER_UID)
        result = _serve("--socket", str(planted))
    finally:
        listener.close()
    assert result.returncode == 2, result.stderr
    assert b"belongs to" in result.stderr
    assert os.lstat(planted).st_uid == OTHER_UID  # not removed as "stale"


def test_sidecar_creates_its_default_directory_0700(workdir: Path) -> None:
    runtime = workdir / "xdg"
    runtime.mkdir(mode=0o700)
    log_path = workdir / "sidecar.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fl_sidecar", "serve", "--no-notifications"],
            stdout=subprocess.PIPE,
            stderr=log,
            env=_child_env({"XDG_RUNTIME_DIR": str(runtime), "FL_SIDECAR_SPOOL_DIR": str(workdir)}),
        )
    try:
        ready = _read_ready_line(process, time.monotonic() + 60, log_path)
        directory = runtime / "fl-sidecar"
        assert ready["socket"] == str(directory / "sidecar.sock")
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
        with SidecarClient(ready["socket"], timeout=10) as client:
            client.wait_ready(timeout=30)
            assert client.get_info().version
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert process.stdout is not None
        process.stdout.close()


class _Impostor(sidecar_pb2_grpc.SidecarServicer):
    """Poses as the sidecar; records whatever reaches it."""

    def __init__(self) -> None:
        self.received: List[Tuple[str, Any, Tuple[Tuple[str, str], ...]]] = []
        self.lock = threading.Lock()

    def _record(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.received.append((name, request, tuple(context.invocation_metadata())))

    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("GetInfo", request, context)
        return pb.GetInfoResponse(version="impostor")

    def GetTraining(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._record("GetTraining", request, context)
        return pb.GetTrainingResponse()


@pytest.fixture()
def impostor(workdir: Path) -> Iterator[Tuple[_Impostor, Path]]:
    """A real gRPC server on ``<workdir>/run/s.sock``, directory and socket owned by nobody."""
    directory = workdir / "run"
    directory.mkdir(mode=0o755)
    path = directory / "s.sock"
    servicer = _Impostor()  # type: ignore[abstract]  # the other RPCs: UNIMPLEMENTED
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    sidecar_pb2_grpc.add_SidecarServicer_to_server(servicer, server)
    assert server.add_insecure_port(f"unix:{path}") != 0
    server.start()
    os.chown(path, OTHER_UID, OTHER_UID)
    os.chown(directory, OTHER_UID, OTHER_UID)
    try:
        yield servicer, path
    finally:
        server.stop(grace=None).wait()


def test_client_sends_no_token_or_credentials_to_another_users_socket(
    impostor: Tuple[_Impostor, Path],
) -> None:
    servicer, path = impostor
    credentials = CallCredentials(username="alice", password=PASSWORD)
    with SidecarClient(str(path), api_token=TOKEN, credentials=credentials, timeout=10) as client:
        client.wait_ready(timeout=10)  # connecting is allowed: it sends nothing
        with pytest.raises(errors.UnsafeSocketError, match="belongs to") as caught:
            client.get_training("t-1")
        with pytest.raises(errors.UnsafeSocketError):
            client.get_info()
    assert caught.value.owner == OTHER_UID
    assert f"uid {OTHER_UID}" in str(caught.value)
    assert servicer.received == []

    # The same client told to expect that owner does reach it: the refusal above was the check.
    with SidecarClient(
        str(path), api_token=TOKEN, credentials=credentials, expected_owner=OTHER_UID
    ) as client:
        assert client.get_training("t-1") is not None
    assert [name for name, _, _ in servicer.received] == ["GetTraining"]
    _, request, metadata = servicer.received[0]
    assert request.credentials.basic.password == PASSWORD
    assert ("x-fl-sidecar-token", TOKEN) in metadata


def test_client_refuses_a_socket_of_another_user_in_its_own_directory(
    impostor: Tuple[_Impostor, Path],
) -> None:
    servicer, path = impostor
    os.chown(path.parent, 0, 0)  # the directory is ours; only the socket is not
    with SidecarClient(str(path), api_token=TOKEN) as client, pytest.raises(
        errors.UnsafeSocketError, match=f"the socket {path}"
    ):
        client.get_info()
    assert servicer.received == []


def test_client_refuses_through_the_environment_setting_too(
    impostor: Tuple[_Impostor, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    servicer, path = impostor
    monkeypatch.setenv("FL_SIDECAR_SOCKET_OWNER", "12345")  # expects someone else
    with SidecarClient(f"unix://{path}", api_token=TOKEN) as client, pytest.raises(
        errors.UnsafeSocketError
    ):
        client.get_info()
    monkeypatch.setenv("FL_SIDECAR_SOCKET_OWNER", str(OTHER_UID))
    with SidecarClient(f"unix://{path}", api_token=TOKEN) as client:
        assert client.get_info().version == "impostor"
    assert len(servicer.received) == 1
