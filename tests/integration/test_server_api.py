"""FlServerClient against the real dev server over loopback: every call, auth, errors."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
from conftest import DevServerHandle

from fl_sidecar import errors
from fl_sidecar.flserver import Credentials, FlServerClient

PASSWORD = "pw-Very-Secret-42"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _users(anon: FlServerClient, *names: str, actor: bool = False) -> List[Dict[str, Any]]:
    return [
        anon.create_user(
            name, PASSWORD, "http://127.0.0.1:9/", actor=actor, client=not actor, email="x@y.z"
        )
        for name in names
    ]


def _recorder(seen: List[Tuple[int, Any]]) -> Callable[[int, Any], None]:
    def record(done: int, total: Any) -> None:
        seen.append((done, total))

    return record


@pytest.fixture
def training(
    devserver: DevServerHandle, tiny_model: Callable[..., bytes], tmp_path: Path
) -> Tuple[Dict[str, Any], List[Dict[str, Any]], str, str, bytes]:
    """(actor, [client1, client2], model id, training id, model bytes), set up with the client."""
    with FlServerClient(devserver.url) as anon:
        (actor,) = _users(anon, "actor", actor=True)
        clients = _users(anon, "client1", "client2")
    model = tiny_model(1)
    with FlServerClient(devserver.url, Credentials.token(actor["token"])) as op:
        model_id = op.upload_global_model("tiny", "a tiny model", _write(tmp_path / "g.pt", model))
        training_id = op.create_training(
            model_id, target_num_updates=1, metric_names=["accuracy"], clients=[clients[0]["id"]]
        )
        op.set_participants(training_id, [c["id"] for c in clients])
        assert op.get_training(training_id)["state"] == "I"
        op.start_training(training_id)
    return actor, clients, model_id, training_id, model


def test_every_call_with_both_auth_forms(
    training: Any, devserver: DevServerHandle, tiny_model: Callable[..., bytes], tmp_path: Path
) -> None:
    _, clients, model_id, training_id, model = training
    basic = FlServerClient(devserver.url, Credentials.basic("client1", PASSWORD))
    token = FlServerClient(devserver.url, Credentials.token(clients[1]["token"]))
    with basic, token:
        for i, client in enumerate((basic, token)):
            progress: List[Tuple[int, Any]] = []
            dest = tmp_path / f"dl{i}" / "global.pt"
            got = client.download_model(model_id, dest, progress=_recorder(progress))
            assert dest.read_bytes() == model
            assert got.status == 200 and got.raw_bytes == len(model)
            assert got.sha256 == hashlib.sha256(model).hexdigest()
            assert progress and progress[-1][0] == got.wire_bytes
            assert not list(dest.parent.glob("*.part"))
        state = token.get_training(training_id)
        assert state["state"] == "O"
        for i, client in enumerate((basic, token)):
            local = _write(tmp_path / f"local{i}.pt", tiny_model(10 + i))
            sent = client.upload_model(
                model_id, local, round=0, sample_size=10 * (i + 1), metrics={"accuracy": 0.5 + i}
            )
            assert sent.status == 201 and sent.detail == "Model Update Accepted"
            assert sent.raw_bytes == local.stat().st_size
            assert sent.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
        assert devserver.wait_idle(20)
        after = token.get_training(training_id)
        assert after["state"] == "O"
        for client in (basic, token):
            posted = client.upload_metrics(model_id, {"accuracy": 0.75})
            assert posted.status == 201 and "Metrics" in posted.detail
        assert devserver.wait_idle(20)
        assert token.get_training(training_id)["state"] == "C"
        # The aggregated model differs from the original global model.
        final = basic.download_model(model_id, tmp_path / "final.pt")
        assert final.sha256 != hashlib.sha256(model).hexdigest()


def test_wrong_password_unknown_ids_and_no_secret_in_messages(
    training: Any, devserver: DevServerHandle, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, clients, model_id, training_id, _ = training
    caplog.set_level(logging.DEBUG)
    wrong = Credentials.basic("client1", PASSWORD + "x")
    with FlServerClient(devserver.url, wrong, retries=0) as client:
        with pytest.raises(errors.AuthenticationError) as info:
            client.get_training(training_id)
        assert info.value.status == 401 and info.value.detail == "Invalid username/password."
        assert info.value.operation == "get_training"
        with pytest.raises(errors.AuthenticationError):
            client.download_model(model_id, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()
    bad_token = FlServerClient(devserver.url, Credentials.token("f" * 40))
    with bad_token, pytest.raises(errors.AuthenticationError, match="Invalid token"):
        bad_token.get_training(training_id)
    with FlServerClient(devserver.url, Credentials.token(clients[0]["token"])) as client:
        with pytest.raises(errors.NotFoundError) as nf:
            client.download_model("00000000-0000-0000-0000-000000000000", tmp_path / "y.pt")
        assert nf.value.status == 400 and "not found" in str(nf.value)
        with pytest.raises(errors.NotFoundError):
            client.download_model("../../etc/passwd", tmp_path / "y.pt")
        with pytest.raises(errors.NotFoundError):
            client.get_training("11111111-2222-3333-4444-555555555555")
        with pytest.raises(errors.NotFoundError):
            client.upload_metrics("not-a-uuid", {"accuracy": 1.0})
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in (PASSWORD, wrong.header().split()[1], clients[0]["token"]):
        assert secret not in logged


def test_upload_errors_duplicate_wrong_round_not_torch_not_participant(
    training: Any, devserver: DevServerHandle, tiny_model: Callable[..., bytes], tmp_path: Path
) -> None:
    actor, clients, model_id, training_id, _ = training
    local = _write(tmp_path / "local.pt", tiny_model(3))
    with FlServerClient(devserver.url, Credentials.token(clients[0]["token"])) as client:
        with pytest.raises(errors.ConflictError) as wrong_round:
            client.upload_model(model_id, local, round=5, sample_size=3)
        assert wrong_round.value.status == 400
        assert "not currently in round 5" in (wrong_round.value.detail or "")
        junk = _write(tmp_path / "junk.pt", b"this is not a torch file" * 100)
        with pytest.raises(errors.RequestRejectedError) as not_torch:
            client.upload_model(model_id, junk, round=0, sample_size=3)
        assert type(not_torch.value) is errors.RequestRejectedError
        assert not_torch.value.status == 400 and "Invalid model file" in str(not_torch.value)
        assert client.upload_model(model_id, local, round=0, sample_size=3).status == 201
        with pytest.raises(errors.ConflictError) as dup:
            client.upload_model(model_id, local, round=0, sample_size=3)
        assert dup.value.status == 409 and dup.value.operation == "upload"
        with pytest.raises(FileNotFoundError):
            client.upload_model(model_id, tmp_path / "missing.pt", round=0, sample_size=3)
    with FlServerClient(devserver.url, Credentials.token(actor["token"])) as op:
        with pytest.raises(errors.PermissionDeniedError) as denied:
            op.upload_model(model_id, local, round=0, sample_size=3)
        assert denied.value.status == 403
        with pytest.raises(errors.ConflictError):
            op.start_training(training_id)
        state = op.get_training(training_id)
    assert state["local_models_arrived"] == 1


def test_setup_call_errors(devserver: DevServerHandle, tmp_path: Path) -> None:
    with FlServerClient(devserver.url) as anon:
        _users(anon, "dup")
        with pytest.raises(errors.RequestRejectedError) as taken:
            _users(anon, "dup")
        assert taken.value.status == 400 and "username" in str(taken.value)
        with pytest.raises(errors.AuthenticationError):
            anon.create_training("x", target_num_updates=1, metric_names=[], clients=[])
    (actor,) = _users(FlServerClient(devserver.url), "op", actor=True)
    with FlServerClient(devserver.url, Credentials.token(actor["token"])) as op:
        with pytest.raises(errors.RequestRejectedError):
            op.upload_global_model("bad", "bad", _write(tmp_path / "sd.pt", b"\x80\x04K\x01."))
        with pytest.raises(errors.NotFoundError):
            op.create_training(
                "00000000-0000-0000-0000-000000000000",
                target_num_updates=1,
                metric_names=["a"],
                clients=[],
            )
