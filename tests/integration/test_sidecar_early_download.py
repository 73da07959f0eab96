"""A TORCH download reaches the trainer while the FL server sends it; its end waits for vetting.

Real processes only: the embedded dev FL server without the zstd middleware (identity
bodies with a Content-Length, as the real server sends), a fault proxy in front of it
that can hold the rest of an answer back, the ``fl-sidecar serve`` subprocess, and
the generated stubs or the Python client.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import grpc
import pytest
from conftest import DevServerHandle
from faultproxy import FaultProxy
from sidecar_harness import running_sidecar

from fl_sidecar.client import SidecarClient
from fl_sidecar.devserver import DevServer
from fl_sidecar.errors import SidecarError
from fl_sidecar.v1 import sidecar_pb2 as pb

pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")

CHUNK = 64 * 1024


def _model_bytes(payload: Any = None) -> bytes:
    """A module of about 3.2 MB (the sidecar reads 1 MiB at a time), or one running ``payload``."""
    torch.manual_seed(0)
    module = torch.nn.Linear(1000, 800)
    buffer = io.BytesIO()
    torch.save(module if payload is None else {"m": module, "payload": payload}, buffer)
    return buffer.getvalue()


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> Tuple[Any, Tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevServerHandle]:
    server = DevServer(
        data_dir=tmp_path_factory.mktemp("plain"), compression=False, password_iterations=1000
    )
    server.start()
    try:
        yield DevServerHandle(server)
    finally:
        server.stop()


class _Reader:
    """Reads one DownloadModel stream on its own thread, telling when the first chunk came."""

    def __init__(self, call: Any) -> None:
        self.messages: List[pb.DownloadModelResponse] = []
        self.first_chunk = threading.Event()
        self.error: Optional[grpc.RpcError] = None
        self._call = call
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for message in self._call:
                self.messages.append(message)
                if message.WhichOneof("kind") == "chunk":
                    self.first_chunk.set()
        except grpc.RpcError as exc:
            self.error = exc

    def join(self) -> None:
        self._thread.join(60)
        assert not self._thread.is_alive()

    def chunks(self) -> bytes:
        return b"".join(m.chunk for m in self.messages if m.WhichOneof("kind") == "chunk")


def test_a_torch_download_streams_while_the_fl_server_still_sends(plain: DevServerHandle) -> None:
    data = _model_bytes()
    _actor, users, model_id, _training = plain.setup_training(data, ["http://127.0.0.1:9/"])
    # The first connection's answer stops after two thirds of the model.
    hold = f"hold-answer:{len(data) * 2 // 3}"
    with FaultProxy((plain.host, plain.port), actions=[hold]) as proxy:
        args = ["--token", users[0].token]
        with running_sidecar(server_url=proxy.url, args=args, notifications=False) as sc:
            call = sc.stub.DownloadModel(
                pb.DownloadModelRequest(model_id=model_id, chunk_size=CHUNK), timeout=120
            )
            reader = _Reader(call)
            try:
                assert reader.first_chunk.wait(60), "no byte reached the trainer"
                # The FL server's answer is still held back: the trainer got these
                # bytes while the sidecar was still receiving.
                assert proxy.holding.is_set()
                early = len(reader.chunks())
                assert 0 < early < len(data)
            finally:
                proxy.release()
            reader.join()
    assert reader.error is None, reader.error
    kinds = [m.WhichOneof("kind") for m in reader.messages]
    assert kinds[0] == "info" and set(kinds[1:]) == {"chunk"}
    info = reader.messages[0].info
    assert info.size == len(data) and info.sha256 == "" and info.content_encoding == "identity"
    assert reader.chunks() == data


def test_an_unvetted_model_never_reaches_the_trainer_whole(
    plain: DevServerHandle, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    evil = _model_bytes(_Evil(str(marker)))
    _actor, users, model_id, _training = plain.setup_training(
        _model_bytes(), ["http://127.0.0.1:9/"]
    )
    row = plain.server.app.store.one("SELECT path FROM models WHERE id = ?", (model_id,))
    assert row is not None
    Path(row["path"]).write_bytes(evil)
    args = ["--token", users[0].token]
    with running_sidecar(server_url=plain.url, args=args, notifications=False) as sc:
        reader = _Reader(
            sc.stub.DownloadModel(
                pb.DownloadModelRequest(model_id=model_id, chunk_size=CHUNK), timeout=120
            )
        )
        reader.join()
        assert reader.error is not None
        assert reader.error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "pickle" in (reader.error.details() or "").lower()
        # Bytes went out early, but the end of the model was held back for vetting.
        assert len(reader.chunks()) < len(evil)
        # The Python client's file download leaves nothing behind.
        dest = tmp_path / "out" / "model.pt"
        dest.parent.mkdir()
        with SidecarClient(sc.target, timeout=60) as client, pytest.raises(SidecarError):
            client.download_to_file(model_id, dest)
        assert list(dest.parent.iterdir()) == []
    assert not marker.exists()


def test_the_python_client_checks_an_early_stream_itself(plain: DevServerHandle) -> None:
    data = _model_bytes()
    _actor, users, model_id, _training = plain.setup_training(data, ["http://127.0.0.1:9/"])
    args = ["--token", users[0].token]
    sidecar = running_sidecar(server_url=plain.url, args=args, notifications=False)
    with sidecar as sc, SidecarClient(sc.target, timeout=60) as client:
        body, result = client.download_with_info(model_id)
    assert body == data
    # ModelInfo had no digest to give (it came first): the client hashed what arrived.
    assert result.sha256 == hashlib.sha256(data).hexdigest() and result.size == len(data)


def test_a_retried_fetch_continues_the_stream_with_the_same_bytes(plain: DevServerHandle) -> None:
    data = _model_bytes()
    _actor, users, model_id, _training = plain.setup_training(data, ["http://127.0.0.1:9/"])
    # The first answer breaks off after two thirds: the sidecar fetches again.
    cut = f"truncate:{len(data) * 2 // 3}"
    with FaultProxy((plain.host, plain.port), actions=[cut]) as proxy:
        args = ["--token", users[0].token]
        with running_sidecar(server_url=proxy.url, args=args, notifications=False) as sc:
            reader = _Reader(
                sc.stub.DownloadModel(
                    pb.DownloadModelRequest(model_id=model_id, chunk_size=CHUNK), timeout=120
                )
            )
            reader.join()
        assert len(proxy.seen("GET", f"/api/models/{model_id}/")) == 2
    assert reader.error is None, reader.error
    assert reader.messages[0].WhichOneof("kind") == "info"
    assert reader.chunks() == data
