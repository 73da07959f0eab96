"""Model transfers through the real sidecar, with the generated stubs alone.

Real processes only: the embedded dev FL server (in this process, on a real
socket), the ``fl-sidecar serve`` subprocess (``sidecar_harness``) and gRPC
calls through ``fl_sidecar.v1.sidecar_pb2_grpc.SidecarStub``, no high-level
client, as a trainer in another language would make them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import os
import pickle
import threading
import time
import urllib.request
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import grpc
import pytest
from conftest import DevServerHandle, User
from sidecar_harness import _PACKAGE_ROOT, SidecarProcess, running_sidecar, spool_model_files

from fl_sidecar import models
from fl_sidecar.client import SidecarClient
from fl_sidecar.compat import Communication, ModelDownloadException
from fl_sidecar.devserver import DevServer
from fl_sidecar.errors import AmbiguousArchiveError
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.v1 import sidecar_pb2_grpc

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

MAX_MODEL_SIZE = 1024 * 1024  # the module's sidecar refuses uploads above 1 MiB
CHUNK = 64 * 1024


def _module_bytes(seed: int) -> bytes:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


@dataclass
class World:
    """The dev server, two participant users and a sidecar configured as user A."""

    devserver: DevServerHandle
    actor: User
    alice: User
    bob: User
    sidecar: SidecarProcess
    secrets: List[str] = field(default_factory=list)

    @property
    def stub(self) -> sidecar_pb2_grpc.SidecarStub:
        return self.sidecar.stub

    def new_training(self, model: Optional[bytes] = None) -> Tuple[str, str, bytes]:
        """A started training of alice and bob; returns (model id, training id, model bytes)."""
        data = model if model is not None else _module_bytes(len(self.secrets))
        model_id = self.devserver.upload_model(self.actor, data)
        training_id = self.devserver.create_training(
            self.actor, model_id, [self.alice, self.bob], target_num_updates=2
        )
        self.devserver.start_training(self.actor, training_id)
        return model_id, training_id, data

    def arrived(self, training_id: str) -> int:
        return int(self.devserver.training(self.actor, training_id)["local_models_arrived"])


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    server = DevServer(
        data_dir=tmp_path_factory.mktemp("devserver"),
        notify_timeout=5.0,
        notify_retry_delays=(0.05,),
        password_iterations=1000,
    )
    server.start()
    try:
        handle = DevServerHandle(server)
        actor = handle.create_user(actor=True, client=False)
        alice = handle.create_user(password="Alice-Pw-7c1e9a-secret")
        bob = handle.create_user(password="Bob-Pw-33d0f2-secret")
        password_file = tmp_path_factory.mktemp("secrets") / "alice.pw"
        password_file.write_text(alice.password + "\n")
        with running_sidecar(
            server_url=handle.url,
            args=[
                "--username",
                alice.username,
                "--password-file",
                str(password_file),
                "--max-model-size",
                str(MAX_MODEL_SIZE),
                "--log-level",
                "DEBUG",
                "--metrics-port",
                "0",
            ],
        ) as sidecar:
            world = World(handle, actor, alice, bob, sidecar)
            world.secrets = [
                alice.password,
                bob.password,
                bob.token,
                alice.token,
                base64.b64encode(f"{alice.username}:{alice.password}".encode()).decode(),
                base64.b64encode(f"{bob.username}:{bob.password}".encode()).decode(),
            ]
            yield world
    finally:
        server.stop()


def _token(user: User) -> pb.Credentials:
    return pb.Credentials(token=user.token)


def _basic(user: User) -> pb.Credentials:
    return pb.Credentials(basic=pb.BasicAuth(username=user.username, password=user.password))


def download(
    stub: sidecar_pb2_grpc.SidecarStub, request: pb.DownloadModelRequest
) -> Tuple[pb.ModelInfo, bytes, List[pb.Progress]]:
    """One DownloadModel call: (info, the bytes, progress messages); checks the message order."""
    info: Optional[pb.ModelInfo] = None
    progress: List[pb.Progress] = []
    chunks: List[bytes] = []
    for message in stub.DownloadModel(request, timeout=60):
        kind = message.WhichOneof("kind")
        if kind == "progress":
            assert info is None, "progress after the ModelInfo"
            progress.append(message.progress)
        elif kind == "info":
            assert info is None, "two ModelInfo messages"
            info = message.info
        else:
            assert info is not None, "a chunk before the ModelInfo"
            assert 0 < len(message.chunk) <= (request.chunk_size or 1024 * 1024)
            chunks.append(message.chunk)
    assert info is not None
    return info, b"".join(chunks), progress


def upload_messages(
    header: pb.UploadHeader, data: bytes, chunk: int = CHUNK
) -> Iterator[pb.UploadModelRequest]:
    yield pb.UploadModelRequest(header=header)
    for start in range(0, len(data), chunk):
        yield pb.UploadModelRequest(chunk=data[start : start + chunk])


def _code(call: Callable[[], Any]) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    code: grpc.StatusCode = caught.value.code()
    return code


def _details(call: Callable[[], Any]) -> Tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details() or ""


# --- downloads ---------------------------------------------------------------


def test_download_torch_is_the_servers_bytes(world: World) -> None:
    model_id, _training_id, data = world.new_training()
    info, body, progress = download(
        world.stub,
        pb.DownloadModelRequest(model_id=model_id, format=pb.MODEL_FORMAT_TORCH, chunk_size=1000),
    )
    assert body == data
    assert info.model_id == model_id
    assert info.format == pb.MODEL_FORMAT_TORCH
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.content_encoding in ("zstd", "identity")
    assert info.wire_bytes > 0
    assert all(
        p.phase in (pb.Progress.PHASE_FETCHING, pb.Progress.PHASE_CONVERTING) for p in progress
    )


def test_download_safetensors_loads_with_safetensors(world: World) -> None:
    model_id, _training_id, data = world.new_training()
    info, body, _progress = download(
        world.stub,
        pb.DownloadModelRequest(
            model_id=model_id, format=pb.MODEL_FORMAT_SAFETENSORS, credentials=_token(world.bob)
        ),
    )
    assert info.format == pb.MODEL_FORMAT_SAFETENSORS
    assert info.size == len(body)
    assert info.sha256 == hashlib.sha256(body).hexdigest()
    tensors = safetensors_torch.load(body)
    expected = torch.load(io.BytesIO(data), weights_only=False).state_dict()
    assert sorted(tensors) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(tensors[name], tensor), name


def test_download_of_an_unknown_model_is_not_found(world: World) -> None:
    code, details = _details(
        lambda: download(
            world.stub, pb.DownloadModelRequest(model_id="00000000-0000-0000-0000-000000000000")
        )
    )
    assert code == grpc.StatusCode.NOT_FOUND
    assert "not found" in details.lower()


def test_download_bad_requests_are_invalid_argument(world: World) -> None:
    for request in (
        pb.DownloadModelRequest(model_id=""),
        pb.DownloadModelRequest(model_id="../../etc/passwd"),
        pb.DownloadModelRequest(model_id="x", chunk_size=5 * 1024 * 1024),
        pb.DownloadModelRequest(model_id="x", format=7),  # type: ignore[arg-type]
    ):
        code = _code(functools.partial(download, world.stub, request))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_download_with_a_full_authorization_header(world: World) -> None:
    model_id, _training_id, data = world.new_training()
    credentials = pb.Credentials(authorization_header=world.bob.token_header())
    _info, body, _progress = download(
        world.stub, pb.DownloadModelRequest(model_id=model_id, credentials=credentials)
    )
    assert body == data
    malformed = pb.Credentials(basic=pb.BasicAuth(username="a:b", password="Pw-in-reply-9"))
    request = pb.DownloadModelRequest(model_id=model_id, credentials=malformed)
    code, details = _details(lambda: download(world.stub, request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "basic credentials are malformed" in details
    assert "Pw-in-reply-9" not in details


def test_download_with_wrong_credentials_is_unauthenticated(world: World) -> None:
    model_id, _training_id, _data = world.new_training()
    request = pb.DownloadModelRequest(model_id=model_id, credentials=pb.Credentials(token="f" * 40))
    assert _code(lambda: download(world.stub, request)) == grpc.StatusCode.UNAUTHENTICATED


# --- uploads -----------------------------------------------------------------


def test_generated_stubs_alone_run_a_round_torch_and_safetensors(world: World) -> None:
    """Alice uploads TORCH, Bob SAFETENSORS; the dev server aggregates; round 1 begins."""
    model_id, training_id, data = world.new_training()
    answer = world.stub.UploadModel(
        upload_messages(
            pb.UploadHeader(
                model_id=model_id,
                round=0,
                sample_size=10,
                metrics=[pb.Metric(name="loss", value=0.5)],
                format=pb.MODEL_FORMAT_TORCH,
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            ),
            data,
        ),
        timeout=60,
    )
    assert answer.http_status == 201, answer.detail
    assert answer.raw_bytes == len(data)
    assert answer.wire_bytes > 0
    assert answer.content_encoding in ("zstd", "identity")
    assert world.arrived(training_id) == 1

    _info, weights, _progress = download(
        world.stub,
        pb.DownloadModelRequest(
            model_id=model_id, format=pb.MODEL_FORMAT_SAFETENSORS, credentials=_basic(world.bob)
        ),
    )
    tensors = safetensors_torch.load(weights)
    trained = {name: tensor + 1.0 for name, tensor in tensors.items()}
    new_weights = safetensors_torch.save(trained)
    answer = world.stub.UploadModel(
        upload_messages(
            pb.UploadHeader(
                model_id=model_id,
                round=0,
                sample_size=30,
                format=pb.MODEL_FORMAT_SAFETENSORS,
                credentials=_basic(world.bob),
            ),
            new_weights,
        ),
        timeout=60,
    )
    assert answer.http_status == 201, answer.detail
    assert world.devserver.wait_idle(30)
    state = world.devserver.training(world.actor, training_id)
    assert state["round"] == 1
    assert state["state"] == "O"

    # The new global model is the FedAvg of both: original*10/40 + (original+1)*30/40.
    _info, new_global, _progress = download(
        world.stub,
        pb.DownloadModelRequest(model_id=model_id, format=pb.MODEL_FORMAT_SAFETENSORS),
    )
    averaged = safetensors_torch.load(new_global)
    for name, tensor in tensors.items():
        assert torch.allclose(averaged[name], tensor + 0.75, atol=1e-5), name

    training = world.stub.GetTraining(pb.GetTrainingRequest(training_id=training_id), timeout=30)
    assert training.state == "O"
    assert training_id in training.json

    metrics = world.stub.UploadMetrics(
        pb.UploadMetricsRequest(model_id=model_id, metrics=[pb.Metric(name="accuracy", value=0.9)]),
        timeout=30,
    )
    assert metrics.http_status == 201, metrics.detail


def test_concurrent_safetensors_uploads_share_one_template(world: World) -> None:
    """Both participants upload SAFETENSORS at once through one sidecar: one template fetch."""
    model_id, training_id, _data = world.new_training()
    _info, weights, _progress = download(
        world.stub, pb.DownloadModelRequest(model_id=model_id, format=pb.MODEL_FORMAT_SAFETENSORS)
    )
    tensors = safetensors_torch.load(weights)
    shifts = {"alice": 1.0, "bob": -3.0}
    answers: Dict[str, Any] = {}
    start = threading.Barrier(2)

    def upload(name: str, credentials: Optional[pb.Credentials], samples: int) -> None:
        body = safetensors_torch.save({n: t + shifts[name] for n, t in tensors.items()})
        header = pb.UploadHeader(
            model_id=model_id,
            round=0,
            sample_size=samples,
            format=pb.MODEL_FORMAT_SAFETENSORS,
            credentials=credentials,
        )
        start.wait(10)
        try:
            answers[name] = world.stub.UploadModel(upload_messages(header, body), timeout=60)
        except grpc.RpcError as exc:
            answers[name] = exc

    threads = [
        threading.Thread(target=upload, args=("alice", None, 30)),
        threading.Thread(target=upload, args=("bob", _token(world.bob), 10)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(90)
    for name in shifts:
        assert getattr(answers[name], "http_status", None) == 201, answers[name]
    fetches = [
        line
        for line in world.sidecar.log_text().splitlines()
        if "as the template" in line and model_id in line
    ]
    assert len(fetches) == 1, fetches
    assert world.devserver.wait_idle(30)
    assert world.devserver.training(world.actor, training_id)["round"] == 1
    _info, new_global, _progress = download(
        world.stub, pb.DownloadModelRequest(model_id=model_id, format=pb.MODEL_FORMAT_SAFETENSORS)
    )
    averaged = safetensors_torch.load(new_global)
    for name, tensor in tensors.items():  # (t+1)*30/40 + (t-3)*10/40 = t
        assert torch.allclose(averaged[name], tensor, atol=1e-5), name


def test_a_rounds_model_is_fetched_once_for_its_download_and_uploads(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Download then SAFETENSORS uploads of one round: one GET; the next round: a fresh one.

    The sidecar knows the model's round from the round start it was notified of.
    """
    from faultproxy import FaultProxy

    username = f"held-{uuid.uuid4().hex[:8]}"
    password = "Held-Pw-5e2b7d-secret"
    password_file = tmp_path_factory.mktemp("held") / "pw"
    password_file.write_text(password + "\n")
    args = ["--username", username, "--password-file", str(password_file)]
    server = (world.devserver.host, world.devserver.port)
    with FaultProxy(server) as proxy, running_sidecar(server_url=proxy.url, args=args) as sc:
        assert sc.notification_url is not None
        user = world.devserver.create_user(username, password, message_endpoint=sc.notification_url)
        model_id = world.devserver.upload_model(world.actor, _module_bytes(99))
        training_id = world.devserver.create_training(
            world.actor, model_id, [user, world.bob], target_num_updates=2
        )
        world.devserver.start_training(world.actor, training_id)
        assert world.devserver.wait_idle(30)  # round 0's start reached the sidecar

        def model_gets() -> int:
            return len(proxy.seen("GET", f"/api/models/{model_id}/"))

        def upload(round_: int, credentials: Optional[pb.Credentials], tensors: Any) -> None:
            header = pb.UploadHeader(
                model_id=model_id,
                round=round_,
                sample_size=10,
                format=pb.MODEL_FORMAT_SAFETENSORS,
                credentials=credentials,
            )
            body = safetensors_torch.save(tensors)
            answer = sc.stub.UploadModel(upload_messages(header, body), timeout=60)
            assert answer.http_status == 201

        safetensors = pb.DownloadModelRequest(model_id=model_id, format=pb.MODEL_FORMAT_SAFETENSORS)
        _info, weights, _progress = download(sc.stub, safetensors)
        assert model_gets() == 1
        tensors = safetensors_torch.load(weights)
        _info, body, _progress = download(
            sc.stub, pb.DownloadModelRequest(model_id=model_id, format=pb.MODEL_FORMAT_TORCH)
        )
        assert body == _module_bytes(99)
        upload(0, None, tensors)
        upload(0, _token(world.bob), tensors)  # another trainer of this sidecar, same round
        assert model_gets() == 1
        assert world.devserver.wait_idle(30)
        assert world.devserver.training(world.actor, training_id)["round"] == 1
        # Aggregated: the id now names round 1's model. While the round is tested the
        # sidecar does not know the model's round: fetched, and not held.
        _info, weights, _progress = download(sc.stub, safetensors)
        assert model_gets() == 2
        for credentials in (None, _token(world.bob)):
            metrics = sc.stub.UploadMetrics(
                pb.UploadMetricsRequest(
                    model_id=model_id,
                    metrics=[pb.Metric(name="accuracy", value=0.5)],
                    credentials=credentials,
                ),
                timeout=30,
            )
            assert metrics.http_status == 201, metrics.detail
        assert world.devserver.wait_idle(30)  # round 1's start reached the sidecar
        _info, weights, _progress = download(sc.stub, safetensors)
        assert model_gets() == 3
        upload(1, None, safetensors_torch.load(weights))
        assert model_gets() == 3
        assert "served the global model from the copy held for its round" in sc.log_text()


def _get_info_coding(sidecar: SidecarProcess) -> str:
    coding: str = sidecar.stub.GetInfo(pb.GetInfoRequest(), timeout=10).negotiated_coding
    return coding


def test_starting_a_sidecar_sends_no_request_and_the_coding_comes_from_a_download(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A start costs the server nothing (the real one answers OPTIONS with a 500)."""
    from faultproxy import FaultProxy

    model_id, _training_id, data = world.new_training()
    token = ["--token", world.alice.token]
    server = (world.devserver.host, world.devserver.port)
    with FaultProxy(server) as proxy:
        with running_sidecar(server_url=proxy.url, args=token, notifications=False) as sc:
            assert _get_info_coding(sc) == ""  # not learnt yet, and nothing asked
            _info, body, _progress = download(
                sc.stub, pb.DownloadModelRequest(model_id=model_id, format=pb.MODEL_FORMAT_TORCH)
            )
            assert body == data
            assert _get_info_coding(sc) == "zstd"  # from the download's answer
        # The sidecar has exited: every request it ever made is recorded.
        assert [(r.method, r.path) for r in proxy.seen()] == [("GET", f"/api/models/{model_id}/")]
        never = [*token, "--compression", "never"]
        with running_sidecar(server_url=proxy.url, args=never, notifications=False) as sc:
            assert _get_info_coding(sc) == "identity"
        assert len(proxy.seen()) == 1
    # A server without the zstd middleware (like the real one) is identity, learnt the same way.
    plain = DevServer(
        data_dir=tmp_path_factory.mktemp("plain"), compression=False, password_iterations=1000
    )
    plain.start()
    try:
        handle = DevServerHandle(plain)
        _actor, users, plain_model, _training = handle.setup_training(data, ["http://127.0.0.1:9/"])
        plain_args = ["--token", users[0].token]
        with running_sidecar(server_url=handle.url, args=plain_args, notifications=False) as sc:
            assert _get_info_coding(sc) == ""
            _info, body, _progress = download(
                sc.stub,
                pb.DownloadModelRequest(model_id=plain_model, format=pb.MODEL_FORMAT_TORCH),
            )
            assert body == data and _get_info_coding(sc) == "identity"
    finally:
        plain.stop()


def test_upload_without_header_is_invalid_argument(world: World) -> None:
    model_id, training_id, data = world.new_training()
    only_chunks = iter([pb.UploadModelRequest(chunk=data[:100])])
    code, details = _details(lambda: world.stub.UploadModel(only_chunks, timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "header" in details
    assert _code(lambda: world.stub.UploadModel(iter([]), timeout=30)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    # A second header mid-stream is refused too.
    header = pb.UploadHeader(model_id=model_id, round=0, sample_size=1)
    twice = iter([pb.UploadModelRequest(header=header), pb.UploadModelRequest(header=header)])
    assert _code(lambda: world.stub.UploadModel(twice, timeout=30)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert world.arrived(training_id) == 0


def test_upload_of_the_wrong_format_is_invalid_argument(world: World) -> None:
    model_id, training_id, data = world.new_training()
    header = pb.UploadHeader(model_id=model_id, round=0, sample_size=1)
    garbage = b"this is not a torch archive" * 100
    assert _code(lambda: world.stub.UploadModel(upload_messages(header, garbage), timeout=30)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    # safetensors bytes declared TORCH
    weights = safetensors_torch.save({"0.weight": torch.zeros(4, 8)})
    code, details = _details(
        lambda: world.stub.UploadModel(upload_messages(header, weights), timeout=30)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "SAFETENSORS" in details
    # a torch archive declared SAFETENSORS
    header.format = pb.MODEL_FORMAT_SAFETENSORS
    assert _code(lambda: world.stub.UploadModel(upload_messages(header, data), timeout=30)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    # safetensors with names that do not match the global model
    wrong = safetensors_torch.save({"other.weight": torch.zeros(2, 2)})
    assert _code(lambda: world.stub.UploadModel(upload_messages(header, wrong), timeout=30)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    assert world.arrived(training_id) == 0


def test_upload_that_breaks_its_promises_is_data_loss(world: World) -> None:
    model_id, training_id, data = world.new_training()
    short = pb.UploadHeader(model_id=model_id, round=0, sample_size=1, size=len(data) + 1)
    assert _code(lambda: world.stub.UploadModel(upload_messages(short, data), timeout=30)) == (
        grpc.StatusCode.DATA_LOSS
    )
    bad_hash = pb.UploadHeader(model_id=model_id, round=0, sample_size=1, sha256="0" * 64)
    assert _code(lambda: world.stub.UploadModel(upload_messages(bad_hash, data), timeout=30)) == (
        grpc.StatusCode.DATA_LOSS
    )
    assert world.arrived(training_id) == 0


def test_upload_over_the_size_limit_is_resource_exhausted(world: World) -> None:
    model_id, training_id, _data = world.new_training()
    announced = pb.UploadHeader(model_id=model_id, round=0, sample_size=1, size=MAX_MODEL_SIZE + 1)
    assert _code(
        lambda: world.stub.UploadModel(iter([pb.UploadModelRequest(header=announced)]))
    ) == (grpc.StatusCode.RESOURCE_EXHAUSTED)
    unannounced = pb.UploadHeader(model_id=model_id, round=0, sample_size=1)
    too_big = b"\0" * (MAX_MODEL_SIZE + 1)
    assert _code(
        lambda: world.stub.UploadModel(
            upload_messages(unannounced, too_big, 256 * 1024), timeout=30
        )
    ) == (grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert world.arrived(training_id) == 0


def test_upload_for_the_wrong_round_or_by_a_stranger(world: World) -> None:
    model_id, training_id, data = world.new_training()
    no_samples = pb.UploadHeader(model_id=model_id, round=0, sample_size=0)
    assert _code(lambda: world.stub.UploadModel(upload_messages(no_samples, data), timeout=30)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    wrong_round = pb.UploadHeader(model_id=model_id, round=3, sample_size=1)
    assert _code(
        lambda: world.stub.UploadModel(upload_messages(wrong_round, data), timeout=30)
    ) == (grpc.StatusCode.FAILED_PRECONDITION)
    stranger = pb.UploadHeader(
        model_id=model_id, round=0, sample_size=1, credentials=_token(world.actor)
    )
    assert _code(lambda: world.stub.UploadModel(upload_messages(stranger, data), timeout=30)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert world.arrived(training_id) == 0


@pytest.mark.parametrize("fmt", [pb.MODEL_FORMAT_TORCH, pb.MODEL_FORMAT_SAFETENSORS])
def test_upload_to_a_model_that_no_training_uses_is_failed_precondition(
    world: World, fmt: int
) -> None:
    """The model exists but no training uses it: the upload's precondition, not its bytes."""
    data = _module_bytes(7)
    model_id = world.devserver.upload_model(world.actor, data)
    if fmt == pb.MODEL_FORMAT_SAFETENSORS:
        state = torch.load(io.BytesIO(data), weights_only=False).state_dict()
        data = safetensors_torch.save(state)
    header = pb.UploadHeader(model_id=model_id, round=0, sample_size=1, format=fmt)  # type: ignore[arg-type]
    with pytest.raises(grpc.RpcError) as caught:
        world.stub.UploadModel(upload_messages(header, data), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = caught.value.details() or ""
    # The message is about the upload the trainer asked for, never an internal step.
    assert "upload" in details.lower() and model_id in details
    assert "template" not in details.lower() and "download" not in details.lower()
    assert "not used by any training" in details
    trailers = dict(caught.value.trailing_metadata() or ())
    assert trailers["fl-sidecar-upload-state"] == "rejected"
    assert trailers["fl-sidecar-error"] == "ConflictError"


def test_safetensors_upload_to_an_unknown_model_names_the_upload(world: World) -> None:
    """The global model is fetched only to convert the upload: its refusal is the upload's."""
    state = torch.load(io.BytesIO(_module_bytes(8)), weights_only=False).state_dict()
    model_id = str(uuid.uuid4())
    header = pb.UploadHeader(
        model_id=model_id, round=0, sample_size=1, format=pb.MODEL_FORMAT_SAFETENSORS
    )
    with pytest.raises(grpc.RpcError) as caught:
        world.stub.UploadModel(upload_messages(header, safetensors_torch.save(state)), timeout=30)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    details = caught.value.details() or ""
    assert details.startswith(f"upload for model {model_id} failed: ")
    assert "download" not in details.lower() and "not found" in details.lower()
    trailers = dict(caught.value.trailing_metadata() or ())
    assert trailers["fl-sidecar-upload-state"] == "not_sent"
    assert trailers["fl-sidecar-http-status"] == "400"


def test_trainer_that_disconnects_mid_upload_uploads_nothing(world: World) -> None:
    model_id, training_id, data = world.new_training()
    sent = threading.Event()
    release = threading.Event()

    def messages() -> Iterator[pb.UploadModelRequest]:
        yield pb.UploadModelRequest(
            header=pb.UploadHeader(model_id=model_id, round=0, sample_size=7)
        )
        yield pb.UploadModelRequest(chunk=data[: len(data) // 2])
        sent.set()
        release.wait(30)  # the trainer "hangs", then goes away

    future = world.stub.UploadModel.future(messages(), timeout=60)
    assert sent.wait(30)
    future.cancel()
    release.set()
    with pytest.raises(grpc.FutureCancelledError):
        future.result()
    # A complete upload afterwards is the first and only one the server sees.
    answer = world.stub.UploadModel(
        upload_messages(pb.UploadHeader(model_id=model_id, round=0, sample_size=5), data),
        timeout=60,
    )
    assert answer.http_status == 201
    assert world.arrived(training_id) == 1
    rows = world.devserver.server.app.store.all(
        "SELECT sample_size FROM local_models WHERE training_id = ?", (training_id,)
    )
    assert [row["sample_size"] for row in rows] == [5]


# --- pickles -----------------------------------------------------------------


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Tuple[Any, Tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _plant_evil_model(world: World, marker: Path) -> str:
    """A global model whose stored file is a pickle that would run a command when loaded."""
    model_id, _training_id, _data = world.new_training()
    buffer = io.BytesIO()
    torch.save({"weight": torch.zeros(2), "payload": _Evil(str(marker))}, buffer)
    row = world.devserver.server.app.store.one("SELECT path FROM models WHERE id = ?", (model_id,))
    assert row is not None
    Path(row["path"]).write_bytes(buffer.getvalue())
    return model_id


def test_malicious_pickle_from_the_server_is_refused(world: World, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model_id = _plant_evil_model(world, marker)
    for fmt in (pb.MODEL_FORMAT_TORCH, pb.MODEL_FORMAT_SAFETENSORS):
        request = pb.DownloadModelRequest(model_id=model_id, format=fmt)
        code, details = _details(functools.partial(download, world.stub, request))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "pickle" in details.lower() or "code" in details.lower()
    assert not marker.exists()


def test_malicious_pickle_passes_through_only_with_trust(world: World, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model_id = _plant_evil_model(world, marker)
    with running_sidecar(
        server_url=world.devserver.url,
        args=["--token", world.alice.token, "--trust-pickles"],
        notifications=False,
    ) as trusting:
        info = trusting.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
        assert info.trusts_pickles is True
        _info, body, _progress = download(trusting.stub, pb.DownloadModelRequest(model_id=model_id))
        assert b"system" in body  # the bytes as the server sent them
        # SAFETENSORS still never runs the pickle.
        assert _code(
            lambda: download(
                trusting.stub,
                pb.DownloadModelRequest(model_id=model_id, format=pb.MODEL_FORMAT_SAFETENSORS),
            )
        ) == (grpc.StatusCode.FAILED_PRECONDITION)
        log = trusting.log_text()
    assert not marker.exists()
    assert world.alice.token not in log


def _two_pickles(evil_first: bool, marker: Path) -> bytes:
    """A zip with two ``archive/data.pkl`` records: a harmless one and one that runs a
    command; zipfile and torch's reader may each pick a different one."""
    good = io.BytesIO()
    torch.save({"weight": torch.zeros(2)}, good)
    with zipfile.ZipFile(io.BytesIO(good.getvalue())) as src:
        records = [(info.filename, src.read(info)) for info in src.infolist()]
    evil = ("archive/data.pkl", pickle.dumps(_Evil(str(marker)), protocol=2))
    records = [evil, *records] if evil_first else [*records, evil]
    out = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        with zipfile.ZipFile(out, "w") as zf:
            for name, data in records:
                zf.writestr(name, data)
    return out.getvalue()


def _plant(world: World, data: bytes) -> str:
    model_id, _training_id, _data = world.new_training()
    row = world.devserver.server.app.store.one("SELECT path FROM models WHERE id = ?", (model_id,))
    assert row is not None
    Path(row["path"]).write_bytes(data)
    return model_id


def test_archive_with_two_pickles_is_refused_on_every_path(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    model_ids = [_plant(world, _two_pickles(first, marker)) for first in (True, False)]
    for model_id in model_ids:
        # The vetting sidecar refuses it, for both formats.
        for fmt in (pb.MODEL_FORMAT_TORCH, pb.MODEL_FORMAT_SAFETENSORS):
            request = pb.DownloadModelRequest(model_id=model_id, format=fmt)
            code, details = _details(functools.partial(download, world.stub, request))
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "differently" in details
    # A sidecar that trusts pickles passes the bytes on; the trainer's loaders refuse them.
    with running_sidecar(
        server_url=world.devserver.url,
        args=["--token", world.alice.token, "--trust-pickles"],
        notifications=False,
    ) as trusting:
        monkeypatch.setattr(Communication, "sidecar_target", trusting.target)
        with SidecarClient(trusting.target) as client:
            for model_id in model_ids:
                with pytest.raises(AmbiguousArchiveError):
                    client.download_module(model_id)
                com = Communication(
                    uuid.uuid4(), uuid.uuid4(), 0, model_id, f"Token {world.alice.token}"
                )
                with pytest.raises(ModelDownloadException, match="differently"):
                    com.download_model()
    assert not marker.exists()


# --- last: nothing leaked ----------------------------------------------------


def test_zz_no_credential_in_the_log(world: World) -> None:
    """After downloads and uploads with Basic and Token credentials, the log holds none."""
    log = world.sidecar.log_text()
    assert "model uploaded" in log
    assert "model downloaded" in log
    for secret in world.secrets:
        assert secret not in log
    info = world.stub.GetInfo(pb.GetInfoRequest(), timeout=10)
    for secret in world.secrets:
        assert secret not in str(info)
    # After uploads the coding with the server is known.
    assert info.negotiated_coding in ("zstd", "identity")


def test_zz_metrics_count_bytes_both_ways(world: World) -> None:
    port = world.sidecar.metrics_port
    assert port is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values: Dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("fl_sidecar_transfer_bytes_total{"):
            labels, value = line.rsplit(" ", 1)
            values[labels] = float(value)
    for direction in ("download", "upload"):
        for form in ("raw", "wire"):
            key = f'fl_sidecar_transfer_bytes_total{{direction="{direction}",form="{form}"}}'
            assert values.get(key, 0) > 0, key
    assert 'fl_sidecar_rpc_errors_total{code="NOT_FOUND",method="DownloadModel"}' in text


def test_cancelled_download_leaves_no_spool_file(world: World) -> None:
    torch.manual_seed(1)
    buffer = io.BytesIO()
    torch.save(torch.nn.Linear(2000, 2000), buffer)  # 16 MB: more than gRPC's flow window
    model_id, _training_id, _data = world.new_training(buffer.getvalue())
    with running_sidecar(
        server_url=world.devserver.url, args=["--token", world.alice.token], notifications=False
    ) as sidecar:
        for fmt in (pb.MODEL_FORMAT_TORCH, pb.MODEL_FORMAT_SAFETENSORS):
            stream = sidecar.stub.DownloadModel(
                pb.DownloadModelRequest(model_id=model_id, format=fmt, chunk_size=4096),
                timeout=60,
            )
            chunks = 0
            for message in stream:
                chunks += message.WhichOneof("kind") == "chunk"
                if chunks == 3:
                    break
            assert (
                len(spool_model_files(sidecar.workdir / "spool")) == 1
            )  # the model being streamed
            stream.cancel()
            # The sidecar notices the cancellation asynchronously: wait for its
            # effect (bounded), there is no event to wait on from outside.
            deadline = time.monotonic() + 20
            while spool_model_files(sidecar.workdir / "spool") and time.monotonic() < deadline:
                time.sleep(0.02)
            assert spool_model_files(sidecar.workdir / "spool") == []


def test_without_torch_models_are_vetted_converted_and_moved(world: World, tmp_path: Path) -> None:
    """A sidecar whose Python has no torch vets, converts and moves models all the same.

    Vetting and conversion copy raw tensor bytes (fl_sidecar.archive): torch is
    never imported by the sidecar, so a torch that cannot be imported changes nothing.
    """
    blocker = tmp_path / "no-torch"
    blocker.mkdir()
    (blocker / "torch.py").write_text("raise ImportError('no torch here', name='torch')\n")
    model_id, training_id, data = world.new_training()
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), _PACKAGE_ROOT])}
    with running_sidecar(
        server_url=world.devserver.url,
        args=["--token", world.alice.token],
        env=env,
        notifications=False,
    ) as plain:
        _info, body, _progress = download(plain.stub, pb.DownloadModelRequest(model_id=model_id))
        assert body == data
        info, weights, _progress = download(
            plain.stub,
            pb.DownloadModelRequest(model_id=model_id, format=pb.MODEL_FORMAT_SAFETENSORS),
        )
        assert info.format == pb.MODEL_FORMAT_SAFETENSORS
        assert models.from_safetensors(weights).keys() == models.read_tensors(data).keys()
        answer = plain.stub.UploadModel(
            upload_messages(
                pb.UploadHeader(
                    model_id=model_id,
                    round=0,
                    sample_size=2,
                    format=pb.MODEL_FORMAT_SAFETENSORS,
                ),
                weights,
            ),
            timeout=60,
        )
        assert answer.http_status == 201
        garbage = upload_messages(
            pb.UploadHeader(model_id=model_id, round=0, sample_size=2), b"not a model" * 50
        )
        assert _code(lambda: plain.stub.UploadModel(garbage, timeout=60)) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert "no torch here" not in plain.log_text()
    assert world.arrived(training_id) == 1
