"""The sidecar process: socket, TCP + API token, health and drain, reflection, GetInfo, --help.

Every test runs the real ``python -m fl_sidecar serve`` subprocess (see
``sidecar_harness``) and talks to it with real gRPC clients.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import urllib.request
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sidecar_harness import (
    GRPC_OPTIONS,
    SERVICE_NAME,
    SidecarProcess,
    _child_env,
    _short_tempdir,
    running_sidecar,
    start_sidecar,
)

from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.v1 import sidecar_pb2_grpc

pytestmark = pytest.mark.slow

SECRET_PASSWORD = "pw-Very-Secret-1234"


@pytest.fixture(scope="module")
def sidecar() -> Iterator[SidecarProcess]:
    """One sidecar (unix socket) whose server URL carries credentials that must never show."""
    with running_sidecar(
        server_url=f"http://alice:{SECRET_PASSWORD}@127.0.0.1:9/fl/",
        args=["--metrics-port", "0", "--http-retries", "0"],
    ) as process:
        yield process


def test_socket_is_private_and_get_info_has_no_credentials(sidecar: SidecarProcess) -> None:
    assert sidecar.socket_path is not None
    mode = os.lstat(sidecar.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600

    info = sidecar.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.server_url == "http://127.0.0.1:9/fl/"
    assert SECRET_PASSWORD not in str(info)
    assert "alice" not in str(info)
    assert info.max_message_size == 8 * 1024 * 1024
    assert info.version
    assert info.codec == "zstd-seekable"
    assert info.trusts_pickles is False
    assert info.notification_url == sidecar.notification_url
    assert info.notification_url.startswith("http://127.0.0.1:")
    assert SECRET_PASSWORD not in sidecar.log_text()
    ready_file = json.loads((sidecar.workdir / "ready.json").read_text())
    assert ready_file == sidecar.ready


def test_unreachable_fl_server_is_unavailable(sidecar: SidecarProcess) -> None:
    request = pb.DownloadModelRequest(model_id="0b7a8a36-6c39-4f3e-9f43-3a6d2c1f0e55")
    with pytest.raises(grpc.RpcError) as caught:
        list(sidecar.stub.DownloadModel(request, timeout=60))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert SECRET_PASSWORD not in (caught.value.details() or "")


def test_reflection_lists_the_service(sidecar: SidecarProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(sidecar.channel)
    answers = list(
        stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in answers[0].list_services_response.service}
    assert SERVICE_NAME in names
    assert "grpc.health.v1.Health" in names


def test_health_check_serving_for_both_names(sidecar: SidecarProcess) -> None:
    health = sidecar.health_stub()
    for name in (SERVICE_NAME, ""):
        answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_metrics_endpoint_serves_prometheus_text(sidecar: SidecarProcess) -> None:
    sidecar.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    with pytest.raises(grpc.RpcError):
        sidecar.stub.GetTraining(pb.GetTrainingRequest(training_id=""), timeout=10)
    port = sidecar.metrics_port
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    assert "fl_sidecar_rpc_seconds" in text
    assert 'fl_sidecar_rpc_errors_total{code="INVALID_ARGUMENT",method="GetTraining"}' in text


def test_second_sidecar_on_a_live_socket_refuses_to_start(sidecar: SidecarProcess) -> None:
    assert sidecar.socket_path is not None
    result = subprocess.run(
        [sys.executable, "-m", "fl_sidecar", "serve", "--socket", sidecar.socket_path],
        env=_child_env({"FL_SIDECAR_NO_NOTIFICATIONS": "1"}),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert b"another server is listening" in result.stderr
    assert os.path.exists(sidecar.socket_path)
    # The first one still answers.
    sidecar.stub.GetInfo(pb.GetInfoRequest(), timeout=10)


def test_stale_socket_is_replaced_and_removed_after_sigterm() -> None:
    workdir = _short_tempdir()
    stale = workdir / "s.sock"
    # A socket file nobody listens on (its server died without cleaning up).
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(stale))
    leftover.close()
    assert stale.exists()
    process = start_sidecar(workdir=workdir, notifications=False)
    try:
        assert process.socket_path == str(stale)
        assert stat.S_IMODE(os.lstat(stale).st_mode) == 0o600
        process.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        assert process.stop() == 0
        assert not stale.exists()
        assert not (workdir / "ready.json").exists()
        # The spool directory it made inside --spool-dir is gone too.
        assert list((workdir / "spool").iterdir()) == []
    finally:
        process.cleanup()


def test_regular_file_at_the_socket_path_is_not_replaced() -> None:
    workdir = _short_tempdir()
    try:
        path = workdir / "s.sock"
        path.write_text("precious")
        result = subprocess.run(
            [sys.executable, "-m", "fl_sidecar", "serve", "--socket", str(path)],
            env=_child_env({"FL_SIDECAR_NO_NOTIFICATIONS": "1"}),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert b"not a socket" in result.stderr
        assert path.read_text() == "precious"
    finally:
        for child in workdir.iterdir():
            child.unlink()
        workdir.rmdir()


def test_tcp_with_api_token() -> None:
    token = "tok-" + "x" * 28
    with running_sidecar(tcp=True, unix=False, api_token=token, notifications=False) as process:
        assert process.ready["tcp_port"] > 0
        assert process.target == f"127.0.0.1:{process.ready['tcp_port']}"
        with pytest.raises(grpc.RpcError) as missing:
            process.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as wrong:
            process.stub.GetInfo(
                pb.GetInfoRequest(), metadata=[("x-fl-sidecar-token", token + "y")], timeout=10
            )
        assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # A streaming call is refused the same way.
        with pytest.raises(grpc.RpcError) as streaming:
            list(process.stub.WatchEvents(pb.WatchEventsRequest(), timeout=10))
        assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = process.stub.GetInfo(pb.GetInfoRequest(), metadata=process.metadata, timeout=10)
        assert info.version
        # Health stays open for orchestrators' probes, which cannot send metadata.
        health = process.health_stub().Check(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert token not in process.log_text()


def test_non_loopback_listen_needs_allow_remote() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fl_sidecar", "serve", "--listen", "0.0.0.0:0"],
        env=_child_env({"FL_SIDECAR_NO_NOTIFICATIONS": "1"}),
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert b"--allow-remote" in result.stderr


def test_health_turns_not_serving_while_draining() -> None:
    process = start_sidecar()
    try:
        watch = process.health_stub().Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60
        )
        first = next(watch)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        # A WatchEvents stream is open too (it has delivered an event, so it is
        # established): the drain must end it, not wait for it.
        assert process.notification_url is not None
        notification = json.dumps(
            {
                "notification_type": "TRAINING_START",
                "training_uuid": "t-1",
                "body": {"global_model_uuid": "m-1"},
            }
        ).encode()
        posted = urllib.request.Request(process.notification_url, data=notification, method="POST")
        with urllib.request.urlopen(posted, timeout=10) as answer:
            assert answer.status == 200
        events = process.stub.WatchEvents(pb.WatchEventsRequest(after_seq=0), timeout=60)
        assert next(events).training_id == "t-1"
        process.signal()
        second = next(watch)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert list(events) == []
        assert process.wait(timeout=30) == 0
        assert process.socket_path is not None
        assert not os.path.exists(process.socket_path)
    finally:
        process.cleanup()


def test_help_documents_every_setting_with_its_environment_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fl_sidecar", "serve", "--help"],
        env=_child_env(None),
        capture_output=True,
        timeout=60,
        check=True,
    )
    text = result.stdout.decode()
    for name in (
        "FL_SIDECAR_SOCKET",
        "FL_SIDECAR_LISTEN",
        "FL_SIDECAR_API_TOKEN",
        "FL_SIDECAR_SERVER_URL",
        "FL_DEMONSTRATOR_BASE_URL",
        "FL_SIDECAR_USERNAME",
        "FL_SIDECAR_PASSWORD",
        "FL_SIDECAR_TOKEN",
        "FL_SIDECAR_AUTHORIZATION",
        "FL_SIDECAR_METRICS_PORT",
        "FL_SIDECAR_SPOOL_DIR",
        "FL_SIDECAR_MAX_MODEL_SIZE",
        "FL_SIDECAR_TRUST_PICKLES",
        "FL_SIDECAR_COMPRESSION",
        "FL_SIDECAR_LOG_LEVEL",
        "FL_SIDECAR_LOG_FORMAT",
        "FL_SIDECAR_DRAIN_SECONDS",
        "FL_CLIENT_SERVER_HOST",
        "FL_CLIENT_SERVER_PORT",
        "FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR",
        "FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH",
        "FL_DEMONSTRATOR_TRAINING_SCRIPT_WORKING_DIRETORY",
    ):
        assert name in text, name


def test_generated_stub_with_explicit_channel(sidecar: SidecarProcess) -> None:
    # What another language does: a bare channel to the socket and the generated stub.
    with grpc.insecure_channel(f"unix://{sidecar.socket_path}", options=GRPC_OPTIONS) as channel:
        stub = sidecar_pb2_grpc.SidecarStub(channel)
        info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    assert info.max_message_size >= 4 * 1024 * 1024


def test_drain_lets_a_call_in_progress_finish_and_refuses_new_ones() -> None:
    zstandard = pytest.importorskip("zstandard")
    data = os.urandom(4 * 1024 * 1024)  # incompressible: the first half decodes to ~2 MiB
    blob = zstandard.ZstdCompressor(level=1).compress(data)
    half = len(blob) // 2
    sent_first_half = threading.Event()
    release = threading.Event()

    def requests() -> Iterator[pb.UnpackRequest]:
        yield pb.UnpackRequest(chunk=blob[:half])
        sent_first_half.set()
        release.wait(30)
        yield pb.UnpackRequest(chunk=blob[half:])

    process = start_sidecar(notifications=False)
    try:
        watch = process.health_stub().Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=60
        )
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        responses = process.stub.Unpack(requests(), timeout=60)
        assert sent_first_half.wait(30)
        # Output of the first half: the call is running in the sidecar.
        first = next(responses)
        assert first.WhichOneof("kind") == "chunk"
        process.signal()
        # NOT_SERVING proves the drain has begun while the Unpack call is still open.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.RpcError) as refused:
            process.stub.GetTraining(pb.GetTrainingRequest(training_id="t"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        release.set()
        rest = b"".join(m.chunk for m in responses if m.WhichOneof("kind") == "chunk")
        assert first.chunk + rest == data
        assert process.wait(timeout=30) == 0
    finally:
        release.set()
        process.cleanup()


def test_notification_port_in_use_fails_cleanly() -> None:
    workdir = _short_tempdir()
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "fl_sidecar",
                "serve",
                "--socket",
                str(workdir / "s.sock"),
                "--notification-port",
                str(port),
            ],
            env=_child_env(None),
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 1
        assert b"cannot start" in result.stderr
        assert b"Traceback" not in result.stderr
        assert not (workdir / "s.sock").exists()
    finally:
        taken.close()
        for child in workdir.iterdir():
            child.unlink()
        workdir.rmdir()
