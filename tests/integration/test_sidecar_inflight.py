"""Transfers in flight: shutdown, crashes and trainers that leave, with honest outcomes.

Real parts only: the dev FL server, the ``fl-sidecar serve`` subprocess, and
between them :class:`faultproxy.FaultProxy` playing a stalled link (``hold``:
it stops reading the sidecar's request, so the sidecar's writes block) or an
answer that never comes (``hold-answer``: the server processed the request,
the sidecar hears nothing). Each test checks what the trainer is told against
what the FL server really has (its training's ``local_models_arrived``) and
against the sidecar's upload journal after a restart (``GetUpload``).
"""

from __future__ import annotations

import io
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import grpc
import pytest
from conftest import DevServerHandle, User
from faultproxy import FaultProxy
from sidecar_harness import SidecarProcess, spool_model_files, start_sidecar

from fl_sidecar.client import SidecarClient
from fl_sidecar.errors import SidecarError, UploadFailedError
from fl_sidecar.v1 import sidecar_pb2 as pb

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

DRAIN_SECONDS = 1.0
# What the sidecar may take beyond the drain to stop: the 2 s it gives cancelled
# calls to answer, the gRPC server's 1 s, start-up of the cleanup. Generous: the
# bound is what a hang would break, not a measurement.
EXIT_BOUND = DRAIN_SECONDS + 20.0
HOLD_AFTER = 64 * 1024  # bytes of the request relayed before the link stalls
CHUNK = 1024 * 1024


def _module_bytes(width: int, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    buffer = io.BytesIO()
    torch.save(torch.nn.Sequential(torch.nn.Linear(width, width)), buffer)
    return buffer.getvalue()


@dataclass
class Round:
    """A started training of alice and bob (so alice's upload alone aggregates nothing)."""

    devserver: DevServerHandle
    actor: User
    alice: User
    model_id: str
    training_id: str
    model: bytes

    def arrived(self) -> int:
        return int(self.devserver.training(self.actor, self.training_id)["local_models_arrived"])


def _round(devserver: DevServerHandle, model: bytes) -> Round:
    actor = devserver.create_user(actor=True, client=False)
    alice, bob = devserver.create_user(), devserver.create_user()
    model_id = devserver.upload_model(actor, model)
    training_id = devserver.create_training(actor, model_id, [alice, bob], target_num_updates=2)
    devserver.start_training(actor, training_id)
    return Round(devserver, actor, alice, model_id, training_id, model)


@pytest.fixture
def big_round(devserver: DevServerHandle) -> Round:
    # 16 MB: far more than the socket buffers between the sidecar and a stalled link.
    return _round(devserver, _module_bytes(2000))


@pytest.fixture
def small_round(devserver: DevServerHandle) -> Round:
    return _round(devserver, _module_bytes(8))


def _sidecar(workdir: Path, proxy: FaultProxy, user: User) -> SidecarProcess:
    return start_sidecar(
        server_url=proxy.url,
        workdir=workdir,
        notifications=False,
        args=[
            "--token",
            user.token,
            "--compression",
            "never",
            "--drain-seconds",
            str(DRAIN_SECONDS),
        ],
    )


def _header(game: Round, upload_id: str) -> pb.UploadHeader:
    return pb.UploadHeader(
        model_id=game.model_id, round=0, sample_size=3, upload_id=upload_id, size=len(game.model)
    )


def _messages(header: pb.UploadHeader, data: bytes) -> Iterator[pb.UploadModelRequest]:
    yield pb.UploadModelRequest(header=header)
    for start in range(0, len(data), CHUNK):
        yield pb.UploadModelRequest(chunk=data[start : start + CHUNK])


def _trailer(error: grpc.RpcError) -> Dict[str, str]:
    return {key: str(value) for key, value in (error.trailing_metadata() or ())}


def _failure(future: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        future.result(timeout=120)
    return caught.value


def _upload_state(sidecar: SidecarProcess, upload_id: str) -> pb.GetUploadResponse:
    answer: pb.GetUploadResponse = sidecar.stub.GetUpload(
        pb.GetUploadRequest(upload_id=upload_id), timeout=30
    )
    return answer


def _exit_status_after(sidecar: SidecarProcess, signum: int) -> Tuple[int, float]:
    started = time.monotonic()
    sidecar.signal(signum)
    rc = sidecar.wait(timeout=EXIT_BOUND)
    return rc, time.monotonic() - started


def _wait_spool_empty(workdir: Path) -> List[Path]:
    # The sidecar removes the partial file right after its request ended; bounded wait.
    deadline = time.monotonic() + 20
    while spool_model_files(workdir / "spool") and time.monotonic() < deadline:
        time.sleep(0.02)
    return spool_model_files(workdir / "spool")


def _posts(proxy: FaultProxy, game: Round) -> Sequence[Any]:
    return proxy.seen("POST", f"/api/models/{game.model_id}/")


# --- shutdown (SIGTERM) with an upload in flight --------------------------------


def test_sigterm_mid_upload_cancels_it_and_says_it_did_not_arrive(
    big_round: Round, devserver: DevServerHandle, workdir: Path
) -> None:
    upload_id = str(uuid.uuid4())
    with FaultProxy((devserver.host, devserver.port), actions=[f"hold:{HOLD_AFTER}"]) as proxy:
        sidecar = _sidecar(workdir, proxy, big_round.alice)
        try:
            future = sidecar.stub.UploadModel.future(
                _messages(_header(big_round, upload_id), big_round.model), timeout=120
            )
            assert proxy.holding.wait(60), "the upload never reached the stalled link"
            rc, seconds = _exit_status_after(sidecar, signal.SIGTERM)
            error = _failure(future)
        finally:
            sidecar.stop()
        assert rc == 0, sidecar.log_text()
        print(f"exit {seconds:.2f} s after SIGTERM with --drain-seconds {DRAIN_SECONDS}")
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert "did not arrive" in (error.details() or "")
        assert (
            _trailer(error).items()
            >= {
                "fl-sidecar-upload-id": upload_id,
                "fl-sidecar-upload-state": "not_sent",
            }.items()
        )
        # Let through whatever the sidecar had written: the server gets a cut-off
        # request, never the model.
        proxy.release()
        assert proxy.wait_client_closed(1, timeout=30)
        assert len(_posts(proxy, big_round)) == 1
        assert not _posts(proxy, big_round)[0].complete
    devserver.wait_idle()
    assert big_round.arrived() == 0
    restarted = _sidecar(workdir, proxy_for_restart(devserver), big_round.alice)
    try:
        record = _upload_state(restarted, upload_id)
        assert record.state == pb.UPLOAD_STATE_NOT_SENT, record
        assert record.model_id == big_round.model_id
    finally:
        assert restarted.stop() == 0


def proxy_for_restart(devserver: DevServerHandle) -> FaultProxy:
    """A pass-through proxy for a restarted sidecar (closed by the test's fixture teardown)."""
    proxy = FaultProxy((devserver.host, devserver.port))
    _proxies.append(proxy)
    return proxy


_proxies: List[FaultProxy] = []


@pytest.fixture(autouse=True)
def _close_restart_proxies() -> Iterator[None]:
    yield
    while _proxies:
        _proxies.pop().stop()


def test_sigterm_while_the_answer_is_awaited_is_unknown_not_retry(
    small_round: Round, devserver: DevServerHandle, workdir: Path
) -> None:
    upload_id = str(uuid.uuid4())
    with FaultProxy((devserver.host, devserver.port), actions=["hold-answer:0"]) as proxy:
        sidecar = _sidecar(workdir, proxy, small_round.alice)
        try:
            future = sidecar.stub.UploadModel.future(
                _messages(_header(small_round, upload_id), small_round.model), timeout=120
            )
            # The server answered (the proxy holds its answer): it has the upload.
            assert proxy.holding.wait(60)
            rc, _seconds = _exit_status_after(sidecar, signal.SIGTERM)
            error = _failure(future)
        finally:
            sidecar.stop()
        assert rc == 0, sidecar.log_text()
    assert error.code() == grpc.StatusCode.UNKNOWN, error.details()
    assert _trailer(error)["fl-sidecar-upload-state"] == "unknown"
    assert small_round.arrived() == 1  # it did arrive: "retry" would have made a duplicate
    restarted = _sidecar(workdir, proxy_for_restart(devserver), small_round.alice)
    try:
        assert _upload_state(restarted, upload_id).state == pb.UPLOAD_STATE_UNKNOWN
        # The same upload again is refused without sending anything.
        again = restarted.stub.UploadModel.future(
            _messages(_header(small_round, upload_id), small_round.model), timeout=60
        )
        refused = _failure(again)
        assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION, refused.details()
        assert _trailer(refused)["fl-sidecar-upload-state"] == "unknown"
    finally:
        assert restarted.stop() == 0
    assert small_round.arrived() == 1


def test_sigterm_mid_download_stops_it_and_exits(
    big_round: Round, devserver: DevServerHandle, workdir: Path
) -> None:
    with FaultProxy(
        (devserver.host, devserver.port), actions=[f"hold-answer:{HOLD_AFTER}"]
    ) as proxy:
        sidecar = _sidecar(workdir, proxy, big_round.alice)
        try:
            stream = sidecar.stub.DownloadModel(
                pb.DownloadModelRequest(model_id=big_round.model_id), timeout=120
            )
            received: List[Any] = []
            reader = threading.Thread(target=lambda: _drain_into(stream, received), daemon=True)
            reader.start()
            assert proxy.holding.wait(60)
            rc, _seconds = _exit_status_after(sidecar, signal.SIGTERM)
            reader.join(timeout=60)
        finally:
            sidecar.stop()
        assert rc == 0, sidecar.log_text()
        assert proxy.wait_client_closed(1, timeout=30)
    assert received and isinstance(received[-1], grpc.RpcError)
    assert received[-1].code() == grpc.StatusCode.UNAVAILABLE, received[-1].details()
    assert "shutting down" in (received[-1].details() or "")


def _drain_into(stream: Any, received: List[Any]) -> None:
    try:
        for message in stream:
            received.append(message)
    except grpc.RpcError as exc:
        received.append(exc)


# --- the sidecar killed (SIGKILL) mid-upload, then restarted ----------------------


def test_killed_after_the_server_accepted_the_client_is_never_told_to_retry(
    small_round: Round, devserver: DevServerHandle, workdir: Path
) -> None:
    upload_id = str(uuid.uuid4())
    outcome: List[BaseException] = []
    with FaultProxy((devserver.host, devserver.port), actions=["hold-answer:0"]) as proxy:
        sidecar = _sidecar(workdir, proxy, small_round.alice)
        client = SidecarClient(sidecar.target, timeout=10)

        def upload() -> None:
            try:
                client.upload(
                    small_round.model_id,
                    small_round.model,
                    round=0,
                    sample_size=3,
                    upload_id=upload_id,
                    timeout=120,
                )
            except BaseException as exc:
                outcome.append(exc)

        uploader = threading.Thread(target=upload, daemon=True)
        uploader.start()
        try:
            assert proxy.holding.wait(60)  # the server answered 201; the sidecar never hears it
            sidecar.signal(signal.SIGKILL)
            sidecar.wait(timeout=30)
            uploader.join(timeout=60)
        finally:
            sidecar.stop()
            client.close()
        assert len(_posts(proxy, small_round)) == 1
    assert small_round.arrived() == 1
    assert outcome and isinstance(outcome[0], UploadFailedError), outcome
    failure = outcome[0]
    # Not UNAVAILABLE: that would say "retry", and a retry would be a duplicate.
    assert failure.code == "UNKNOWN", failure
    assert failure.upload_state == "unknown"
    assert failure.upload_id == upload_id
    proxy = proxy_for_restart(devserver)
    restarted = _sidecar(workdir, proxy, small_round.alice)
    with SidecarClient(restarted.target, timeout=10) as client:
        try:
            status = client.get_upload(upload_id)
            assert status.state == "unknown"  # the whole request went out: it may have arrived
            assert (status.model_id, status.round) == (small_round.model_id, 0)
            # What the trainer does next: the training says the upload arrived.
            assert client.get_training(small_round.training_id).data["local_models_arrived"] == 1
            with pytest.raises(UploadFailedError) as again:
                client.upload(
                    small_round.model_id,
                    small_round.model,
                    round=0,
                    sample_size=3,
                    upload_id=upload_id,
                    timeout=60,
                )
            assert again.value.code == "FAILED_PRECONDITION"
        finally:
            assert restarted.stop() == 0
    assert _posts(proxy, small_round) == []  # nothing was sent again
    assert small_round.arrived() == 1


def test_killed_mid_body_the_upload_did_not_arrive_and_may_be_sent_again(
    big_round: Round, devserver: DevServerHandle, workdir: Path
) -> None:
    upload_id = str(uuid.uuid4())
    with FaultProxy((devserver.host, devserver.port), actions=[f"hold:{HOLD_AFTER}"]) as proxy:
        sidecar = _sidecar(workdir, proxy, big_round.alice)
        try:
            future = sidecar.stub.UploadModel.future(
                _messages(_header(big_round, upload_id), big_round.model), timeout=120
            )
            assert proxy.holding.wait(60)
            sidecar.signal(signal.SIGKILL)
            sidecar.wait(timeout=30)
            error = _failure(future)
        finally:
            sidecar.stop()
        # The connection broke: no state from the sidecar, the trainer must ask.
        assert "fl-sidecar-upload-state" not in _trailer(error)
        proxy.release()
        assert proxy.wait_client_closed(1, timeout=30)
    devserver.wait_idle()
    assert big_round.arrived() == 0
    restarted = _sidecar(workdir, proxy_for_restart(devserver), big_round.alice)
    try:
        record = _upload_state(restarted, upload_id)
        assert record.state == pb.UPLOAD_STATE_NOT_SENT, record
        answer = restarted.stub.UploadModel(
            _messages(_header(big_round, upload_id), big_round.model), timeout=120
        )
        assert answer.http_status == 201 and answer.upload_id == upload_id
        assert _upload_state(restarted, upload_id).state == pb.UPLOAD_STATE_ACCEPTED
    finally:
        assert restarted.stop() == 0
    assert big_round.arrived() == 1


def test_an_accepted_upload_is_remembered_across_a_crash(
    small_round: Round, devserver: DevServerHandle, workdir: Path
) -> None:
    with FaultProxy((devserver.host, devserver.port)) as proxy:
        sidecar = _sidecar(workdir, proxy, small_round.alice)
        try:
            with SidecarClient(sidecar.target, timeout=10) as client:
                result = client.upload(
                    small_round.model_id, small_round.model, round=0, sample_size=3
                )
                assert result.http_status == 201
                assert result.upload_id and client.last_upload_id == result.upload_id
            sidecar.signal(signal.SIGKILL)
            sidecar.wait(timeout=30)
        finally:
            sidecar.stop()
        restarted = _sidecar(workdir, proxy, small_round.alice)
        try:
            with SidecarClient(restarted.target, timeout=10) as client:
                status = client.get_upload(result.upload_id)
                assert (status.state, status.http_status) == ("accepted", 201)
                with pytest.raises(UploadFailedError) as again:
                    client.upload(
                        small_round.model_id,
                        small_round.model,
                        round=0,
                        sample_size=3,
                        upload_id=result.upload_id,
                    )
                assert again.value.code == "ALREADY_EXISTS"
                assert again.value.upload_state == "accepted"
                with pytest.raises(SidecarError) as unknown:
                    client.get_upload(str(uuid.uuid4()))
                assert unknown.value.code == "NOT_FOUND"
        finally:
            assert restarted.stop() == 0
        assert len(_posts(proxy, small_round)) == 1
    assert small_round.arrived() == 1


# --- the trainer leaves: the sidecar's work for it stops --------------------------


def test_trainer_that_leaves_mid_download_stops_the_http_request(
    big_round: Round, devserver: DevServerHandle, workdir: Path
) -> None:
    with FaultProxy(
        (devserver.host, devserver.port), actions=[f"hold-answer:{HOLD_AFTER}"]
    ) as proxy:
        sidecar = _sidecar(workdir, proxy, big_round.alice)
        try:
            for fmt in (pb.MODEL_FORMAT_TORCH, pb.MODEL_FORMAT_SAFETENSORS):
                closed = proxy.client_closed
                proxy.holding.clear()
                proxy.set_actions([f"hold-answer:{HOLD_AFTER}"])
                stream = sidecar.stub.DownloadModel(
                    pb.DownloadModelRequest(model_id=big_round.model_id, format=fmt), timeout=120
                )
                assert proxy.holding.wait(60)  # part of the model is in, the rest stalls
                stream.cancel()
                # The sidecar closes its request to the server at once, not after
                # its 60 s read timeout.
                assert proxy.wait_client_closed(closed + 1, timeout=20)
                assert _wait_spool_empty(workdir) == []
        finally:
            assert sidecar.stop() == 0


def test_trainer_that_leaves_mid_send_stops_the_upload_and_it_did_not_arrive(
    big_round: Round, devserver: DevServerHandle, workdir: Path
) -> None:
    upload_id = str(uuid.uuid4())
    with FaultProxy((devserver.host, devserver.port), actions=[f"hold:{HOLD_AFTER}"]) as proxy:
        sidecar = _sidecar(workdir, proxy, big_round.alice)
        try:
            future = sidecar.stub.UploadModel.future(
                _messages(_header(big_round, upload_id), big_round.model), timeout=120
            )
            assert proxy.holding.wait(60)
            future.cancel()
            # The sidecar stops sending: its request's socket is shut down.
            record = _await_final_state(sidecar, upload_id)
            assert record.state == pb.UPLOAD_STATE_NOT_SENT, record
            assert _wait_spool_empty(workdir) == []
            proxy.release()
            assert proxy.wait_client_closed(1, timeout=30)
            assert not _posts(proxy, big_round)[0].complete
        finally:
            assert sidecar.stop() == 0
    devserver.wait_idle()
    assert big_round.arrived() == 0


def _await_final_state(
    sidecar: SidecarProcess, upload_id: str, timeout: float = 20.0
) -> pb.GetUploadResponse:
    # The journal is written by the sidecar's call thread after the request broke off.
    deadline = time.monotonic() + timeout
    record: Optional[pb.GetUploadResponse] = None
    while time.monotonic() < deadline:
        record = _upload_state(sidecar, upload_id)
        if record.state != pb.UPLOAD_STATE_SENDING:
            return record
        time.sleep(0.05)
    assert record is not None
    return record


# --- every UploadModel status says what reached the server -----------------------


def test_every_upload_status_carries_the_truth_about_the_server(
    small_round: Round, devserver: DevServerHandle, workdir: Path
) -> None:
    # 503: the proxy read the whole request and answered for the server, which
    # the sidecar cannot tell from a server that failed after storing it.
    with FaultProxy((devserver.host, devserver.port), actions=["503"]) as proxy:
        sidecar = _sidecar(workdir, proxy, small_round.alice)
        try:
            cases = [
                ("maybe", 0, grpc.StatusCode.UNKNOWN, "unknown", pb.UPLOAD_STATE_UNKNOWN),
                ("refused", 7, grpc.StatusCode.FAILED_PRECONDITION, "rejected", None),
            ]
            for upload_id, round_, code, state, recorded in cases:
                header = _header(small_round, upload_id)
                header.round = round_
                error = _failure(
                    sidecar.stub.UploadModel.future(
                        _messages(header, small_round.model), timeout=60
                    )
                )
                assert error.code() == code, error.details()
                assert (
                    _trailer(error).items()
                    >= {
                        "fl-sidecar-upload-id": upload_id,
                        "fl-sidecar-upload-state": state,
                    }.items()
                )
                record = _upload_state(sidecar, upload_id)
                if recorded is not None:
                    assert record.state == recorded
                else:
                    # The server's 400 ("not currently in round 7") is kept.
                    assert (record.state, record.http_status) == (pb.UPLOAD_STATE_REJECTED, 400)
            answer = sidecar.stub.UploadModel(
                _messages(_header(small_round, "fine"), small_round.model), timeout=60
            )
            assert (answer.http_status, answer.upload_id) == (201, "fine")
        finally:
            assert sidecar.stop() == 0
    # Nothing listens: certainly not sent, and only then UNAVAILABLE.
    closed = FaultProxy((devserver.host, devserver.port))
    closed.stop()
    sidecar = _sidecar(workdir, closed, small_round.alice)
    try:
        error = _failure(
            sidecar.stub.UploadModel.future(
                _messages(_header(small_round, "nowhere"), small_round.model), timeout=120
            )
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
        assert _trailer(error)["fl-sidecar-upload-state"] == "not_sent"
        assert _upload_state(sidecar, "nowhere").state == pb.UPLOAD_STATE_NOT_SENT
    finally:
        assert sidecar.stop() == 0
    assert small_round.arrived() == 1
