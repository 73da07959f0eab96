"""FlServerClient under faults: dropped connections, 503s, stalls, cut-off bodies, refusals.

A real fault-injecting TCP proxy sits between the client and the real dev
server. Safe requests are retried within the budget; an upload is never sent
twice (counted on the wire and on the server).
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import socket
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
from conftest import DevServerHandle
from faultproxy import FaultProxy

from fl_sidecar import errors
from fl_sidecar.cancel import REASON_SHUTDOWN, Cancellation
from fl_sidecar.flserver import Credentials, FlServerClient

Setup = Tuple[str, str, Dict[str, Any], bytes, Path]


@pytest.fixture
def setup(devserver: DevServerHandle, tiny_model: Callable[..., bytes], tmp_path: Path) -> Setup:
    """(model id, training id, client user as a dict, global model bytes, local model file)."""
    model = tiny_model(0)
    _, clients, model_id, training_id = devserver.setup_training(
        model, ["http://127.0.0.1:9/", "http://127.0.0.1:9/"]
    )
    user = {"token": clients[0].token, "id": clients[0].id}
    local = tmp_path / "local.pt"
    local.write_bytes(tiny_model(5))
    return model_id, training_id, user, model, local


@pytest.fixture
def proxy(devserver: DevServerHandle) -> Iterator[FaultProxy]:
    with FaultProxy((devserver.host, devserver.port)) as p:
        yield p


def _client(url: str, token: str, **kwargs: Any) -> FlServerClient:
    settings: Dict[str, Any] = {"retries": 3, "backoff": 0.01, "timeout": 5.0}
    settings.update(kwargs)
    return FlServerClient(url, Credentials.token(token), **settings)


def _uploads(proxy: FaultProxy, model_id: str) -> List[Any]:
    return [r for r in proxy.seen("POST", f"/api/models/{model_id}/") if "metrics" not in r.path]


def test_download_survives_drop_503_and_a_cut_body(
    setup: Setup, proxy: FaultProxy, tmp_path: Path
) -> None:
    model_id, _, user, model, _ = setup
    proxy.set_actions(["drop", "503", "truncate:300", "pass"])
    dest = tmp_path / "model.pt"
    with _client(proxy.url, user["token"]) as client:
        got = client.download_model(model_id, dest)
    assert dest.read_bytes() == model
    assert got.sha256 == hashlib.sha256(model).hexdigest()
    assert [r.action for r in proxy.seen("GET")] == ["drop", "503", "truncate:300", "pass"]
    assert not list(tmp_path.glob("*.part"))


def test_download_gives_up_after_the_budget_on_503(
    setup: Setup, proxy: FaultProxy, tmp_path: Path
) -> None:
    model_id, _, user, _, _ = setup
    proxy.set_actions([], default="503")
    dest = tmp_path / "model.pt"
    with _client(proxy.url, user["token"], retries=2) as client, pytest.raises(
        errors.ServerUnavailableError
    ) as info:
        client.download_model(model_id, dest)
    assert info.value.status == 503 and info.value.operation == "download"
    assert "gave up after 3 attempts" in str(info.value)
    assert len(proxy.seen("GET")) == 3
    assert not dest.exists() and not list(tmp_path.glob("*.part"))


def test_download_stall_past_the_timeout_is_retried_then_fails(
    setup: Setup, proxy: FaultProxy, tmp_path: Path
) -> None:
    model_id, _, user, _, _ = setup
    proxy.set_actions([], default="stall")
    with _client(proxy.url, user["token"], retries=1, timeout=0.3) as client, pytest.raises(
        errors.ServerUnavailableError
    ) as info:
        client.download_model(model_id, tmp_path / "m.pt")
    assert type(info.value) is errors.ServerUnavailableError
    assert info.value.status is None and "timed out" in str(info.value).lower()
    assert len(proxy.seen("GET")) == 2


def test_download_always_cut_short_fails_and_leaves_nothing(
    setup: Setup, proxy: FaultProxy, tmp_path: Path
) -> None:
    model_id, _, user, _, _ = setup
    proxy.set_actions([], default="truncate:400")
    dest = tmp_path / "m.pt"
    with _client(proxy.url, user["token"], retries=1) as client, pytest.raises(
        errors.ServerUnavailableError, match=r"broke off|ended after"
    ):
        client.download_model(model_id, dest)
    assert not dest.exists() and not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("fault", ["503", "drop", "stall"])
def test_upload_is_never_resent_after_it_may_have_arrived(
    fault: str, setup: Setup, proxy: FaultProxy, devserver: DevServerHandle
) -> None:
    model_id, training_id, user, _, local = setup
    proxy.set_actions([fault])
    # A short read timeout, so that the stall trips it quickly.
    impatient = _client(proxy.url, user["token"], timeout=0.5, compression="never")
    with impatient, pytest.raises(errors.UploadOutcomeUnknownError) as info:
        impatient.upload_model(model_id, local, round=0, sample_size=4)
    assert "NOT resent" in str(info.value) and info.value.operation == "upload"
    assert user["token"] not in str(info.value)
    assert len(_uploads(proxy, model_id)) == 1
    with _client(proxy.url, user["token"], compression="never") as client:
        # The caller asks the training's state: nothing arrived, so it may send it again.
        state = client.get_training(training_id)
        assert state["local_models_arrived"] == 0
        assert client.upload_model(model_id, local, round=0, sample_size=4).status == 201
    assert len(_uploads(proxy, model_id)) == 2
    assert devserver.wait_idle(10)


def test_metrics_are_never_resent_either(setup: Setup, proxy: FaultProxy) -> None:
    model_id, _, user, _, _ = setup
    proxy.set_actions(["503"])
    with _client(proxy.url, user["token"]) as client, pytest.raises(
        errors.UploadOutcomeUnknownError
    ) as info:
        client.upload_metrics(model_id, {"accuracy": 0.5})
    assert info.value.status == 503 and info.value.operation == "metrics"
    assert len(proxy.seen("POST", f"/api/models/{model_id}/metrics/")) == 1


def _refused_port() -> int:
    """A loopback port with nothing listening (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_upload_to_a_refusing_server_is_retried_then_unavailable(
    setup: Setup, caplog: pytest.LogCaptureFixture
) -> None:
    model_id, _, user, _, local = setup
    caplog.set_level(logging.INFO, logger="fl_sidecar.flserver")
    url = f"http://127.0.0.1:{_refused_port()}"
    with _client(url, user["token"], retries=2, compression="never") as client, pytest.raises(
        errors.ServerUnavailableError
    ) as info:
        client.upload_model(model_id, local, round=0, sample_size=4)
    # Refused: it certainly never arrived, so it was retried and the outcome is known.
    assert type(info.value) is errors.ServerUnavailableError
    assert "gave up after 3 attempts" in str(info.value)
    retried = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) == 2
    assert user["token"] not in caplog.text


def test_upload_succeeds_after_a_refused_first_connection(
    setup: Setup, devserver: DevServerHandle
) -> None:
    """Refused at first (nothing listens); the server comes up; the retry gets through."""
    model_id, training_id, user, _, local = setup
    port = _refused_port()
    started: List[FaultProxy] = []

    class ComesUp(logging.Handler):
        # Runs in the client's thread when it logs its first retry, before it sleeps.
        def emit(self, record: logging.LogRecord) -> None:
            if "retrying" in record.getMessage() and not started:
                started.append(FaultProxy((devserver.host, devserver.port), port=port))

    handler = ComesUp()
    log = logging.getLogger("fl_sidecar.flserver")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        with _client(f"http://127.0.0.1:{port}", user["token"], compression="never") as client:
            assert client.upload_model(model_id, local, round=0, sample_size=4).status == 201
            assert client.get_training(training_id)["local_models_arrived"] == 1
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        for p in started:
            p.stop()
    assert len(started) == 1
    assert len(_uploads(started[0], model_id)) == 1


def test_one_keep_alive_connection_for_many_calls(tmp_path: Path) -> None:
    """Calls reuse one connection (Basic auth costs the real server 0.25 s per handshake)."""
    peers: List[Any] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(self, status: int, body: bytes) -> None:
            peers.append(self.client_address)
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            self._answer(200, b"m" * 100_000 if "models" in self.path else b'{"state": "O"}')

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self._answer(201, b'{"detail": "Model Update Accepted"}')

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    model = tmp_path / "m.pt"
    model.write_bytes(b"x" * 10_000)
    try:
        with _client(f"http://127.0.0.1:{server.server_port}", "tok") as client:
            for _ in range(3):
                client.download_model("a", tmp_path / "out.pt")
                client.get_training("t")
                client.upload_model("a", model, round=0, sample_size=1)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert len(peers) == 9
    assert len(set(peers)) == 1


# --- cancellation of requests in flight ---------------------------------------


def _cancel_when_held(proxy: FaultProxy, cancel: Cancellation) -> threading.Thread:
    def watch() -> None:
        if proxy.holding.wait(60):
            cancel.cancel(REASON_SHUTDOWN)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_cancelled_upload_stops_in_a_blocked_write_and_did_not_arrive(
    setup: Setup, proxy: FaultProxy, tmp_path: Path
) -> None:
    model_id, training_id, user, _, _ = setup
    big = tmp_path / "big.pt"
    big.write_bytes(b"\0" * (32 * 1024 * 1024))  # far more than the socket buffers hold
    proxy.set_actions(["hold:65536"])
    cancel, completed = Cancellation(), []
    watcher = _cancel_when_held(proxy, cancel)
    # The read timeout is long: only the cancellation can end the blocked write.
    with _client(proxy.url, user["token"], compression="never", timeout=120) as client:
        with pytest.raises(errors.TransferCancelledError) as info:
            client.upload_model(
                model_id,
                big,
                round=0,
                sample_size=4,
                cancel=cancel,
                on_body_complete=lambda: completed.append(1),
            )
        watcher.join(timeout=10)
        assert info.value.shutting_down and "stored nothing" in str(info.value)
        assert completed == []
        proxy.release()
        assert proxy.wait_client_closed(1, timeout=30)
        assert client.get_training(training_id)["local_models_arrived"] == 0
    assert len(_uploads(proxy, model_id)) == 1 and not _uploads(proxy, model_id)[0].complete


def test_a_cancelled_upload_whose_answer_is_awaited_is_outcome_unknown(
    setup: Setup, proxy: FaultProxy, devserver: DevServerHandle
) -> None:
    model_id, training_id, user, _, local = setup
    proxy.set_actions(["hold-answer:0"])
    cancel, completed = Cancellation(), []
    watcher = _cancel_when_held(proxy, cancel)
    with _client(proxy.url, user["token"], compression="never", timeout=120) as client:
        with pytest.raises(errors.UploadOutcomeUnknownError) as info:
            client.upload_model(
                model_id,
                local,
                round=0,
                sample_size=4,
                cancel=cancel,
                on_body_complete=lambda: completed.append(1),
            )
        watcher.join(timeout=10)
    assert "NOT resent" in str(info.value) and completed == [1]
    # The server had processed it when the proxy held its answer back.
    with _client(devserver.url, user["token"]) as direct:
        assert direct.get_training(training_id)["local_models_arrived"] == 1
    assert len(_uploads(proxy, model_id)) == 1


def test_a_cancelled_download_stops_in_a_blocked_read_and_leaves_nothing(
    setup: Setup, proxy: FaultProxy, tmp_path: Path
) -> None:
    model_id, _, user, _, _ = setup
    proxy.set_actions(["hold-answer:0"])
    cancel = Cancellation()
    watcher = _cancel_when_held(proxy, cancel)
    dest = tmp_path / "model.pt"
    with _client(proxy.url, user["token"], timeout=120) as client:
        with pytest.raises(errors.TransferCancelledError):
            client.download_model(model_id, dest, cancel=cancel)
        watcher.join(timeout=10)
        # Cancelled means no retry either: one request only.
        assert len(proxy.seen("GET", f"/api/models/{model_id}/")) == 1
        assert proxy.wait_client_closed(1, timeout=30)
    assert not dest.exists() and not list(tmp_path.glob("*.part"))
