"""SidecarClient against a real sidecar subprocess and the dev server.

Events are produced the way the FL server produces them: HTTP POSTs to the
sidecar's notification endpoint. Each test uses its own training id so the
shared sidecar's history does not mix tests.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import List

import pytest
from trainer_stack import ClientSide, TrainerStack, post_notification, tiny_module_bytes

from fl_sidecar.client import CallCredentials, SidecarClient
from fl_sidecar.errors import SidecarError
from fl_sidecar.events import EventKind

EVENT_TIMEOUT = 20.0


@pytest.fixture(scope="module")
def side(stack: TrainerStack) -> ClientSide:
    return stack.add_client()


def _round_start(training_id: str, round_: int, model_id: str = "") -> dict:  # type: ignore[type-arg]
    return {
        "notification_type": "UPDATE_ROUND_START",
        "training_uuid": training_id,
        "body": {"round": round_, "global_model_uuid": model_id or str(uuid.uuid4())},
    }


def _post(side: ClientSide, payload: dict) -> None:  # type: ignore[type-arg]
    status = post_notification(side.notification_url, payload)
    assert 200 <= status < 300


def test_get_info_reports_the_endpoint_and_no_credentials(side: ClientSide) -> None:
    info = side.client.get_info()
    assert info.notification_url.startswith("http://127.0.0.1:")
    assert info.server_url.startswith("http://127.0.0.1:")
    assert side.user.password not in repr(info)
    assert info.max_message_size >= 4 * 1024 * 1024


def test_a_late_subscriber_gets_the_round_start_it_missed(side: ClientSide) -> None:
    training_id = str(uuid.uuid4())
    _post(side, _round_start(training_id, 0))
    with side.client.watch_events(training_ids=[training_id]) as events:
        event = events.get(timeout=EVENT_TIMEOUT)
    assert event.kind is EventKind.UPDATE_ROUND_START
    assert event.training_id == training_id
    assert event.round == 0
    assert event.model_id


def test_two_subscribers_both_get_every_event(side: ClientSide) -> None:
    training_id = str(uuid.uuid4())
    with side.client.watch_events(training_ids=[training_id]) as first, side.client.watch_events(
        training_ids=[training_id]
    ) as second:
        # Subscriptions are open once the sidecar answers a call after them;
        # a round start posted now is live for both.
        side.client.get_info()
        for round_ in range(3):
            _post(side, _round_start(training_id, round_))
        got_first = [first.get(timeout=EVENT_TIMEOUT) for _ in range(3)]
        got_second = [second.get(timeout=EVENT_TIMEOUT) for _ in range(3)]
    assert [e.round for e in got_first] == [0, 1, 2]
    assert [e.seq for e in got_first] == [e.seq for e in got_second]
    assert got_first[0].seq < got_first[1].seq < got_first[2].seq


def test_resume_after_a_sequence_number(side: ClientSide) -> None:
    training_id = str(uuid.uuid4())
    for round_ in range(3):
        _post(side, _round_start(training_id, round_))
    with side.client.watch_events(training_ids=[training_id]) as events:
        seen = [events.get(timeout=EVENT_TIMEOUT) for _ in range(3)]
    with side.client.watch_events(after_seq=seen[0].seq, training_ids=[training_id]) as events:
        resumed = [events.get(timeout=EVENT_TIMEOUT) for _ in range(2)]
        with pytest.raises(TimeoutError):
            events.get(timeout=0.3)
    assert [e.seq for e in resumed] == [seen[1].seq, seen[2].seq]


def test_wait_for_skips_other_kinds(side: ClientSide) -> None:
    training_id = str(uuid.uuid4())
    _post(
        side,
        {
            "notification_type": "TRAINING_START",
            "training_uuid": training_id,
            "body": {"global_model_uuid": str(uuid.uuid4())},
        },
    )
    _post(side, _round_start(training_id, 4))
    with side.client.watch_events(training_ids=[training_id]) as events:
        event = events.wait_for([EventKind.UPDATE_ROUND_START], timeout=EVENT_TIMEOUT)
    assert event.round == 4


def test_unknown_model_is_not_found(side: ClientSide) -> None:
    with pytest.raises(SidecarError) as info:
        side.client.download(str(uuid.uuid4()))
    assert info.value.code == "NOT_FOUND"
    assert "not found" in str(info.value).lower()


def test_wrong_per_call_credentials_are_unauthenticated(
    stack: TrainerStack, side: ClientSide
) -> None:
    model_id = stack.devserver.upload_model(stack.actor, tiny_module_bytes())
    with pytest.raises(SidecarError) as info:
        side.client.download(model_id, credentials=CallCredentials.basic("nobody", "wrong"))
    assert info.value.code == "UNAUTHENTICATED"
    assert "wrong" not in str(info.value)


def test_download_bytes_file_and_progress(
    stack: TrainerStack, side: ClientSide, tmp_path: Path
) -> None:
    original = tiny_module_bytes(seed=3)
    model_id = stack.devserver.upload_model(stack.actor, original)
    progress: List[tuple] = []  # type: ignore[type-arg]
    data, result = side.client.download_with_info(
        model_id, progress=lambda done, total: progress.append((done, total))
    )
    assert data == original
    assert result.size == len(original)
    assert result.sha256 == hashlib.sha256(original).hexdigest()
    assert progress[-1] == (len(original), len(original))
    target = tmp_path / "model.pt"
    file_result = side.client.download_to_file(model_id, target)
    assert target.read_bytes() == original
    assert file_result.sha256 == result.sha256
    tensors = side.client.download_state_dict(model_id)
    assert set(tensors) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_failed_download_to_file_leaves_nothing(side: ClientSide, tmp_path: Path) -> None:
    target = tmp_path / "model.pt"
    with pytest.raises(SidecarError):
        side.client.download_to_file(str(uuid.uuid4()), target)
    assert os.listdir(tmp_path) == []


def test_upload_without_a_training_is_refused_with_a_typed_error(
    stack: TrainerStack, side: ClientSide
) -> None:
    model_id = stack.devserver.upload_model(stack.actor, tiny_module_bytes())
    with pytest.raises(SidecarError) as info:
        side.client.upload(model_id, tiny_module_bytes(1), round=0, sample_size=3)
    # The dev server answers 400 "not used by any training"; the message carries it.
    assert info.value.code in {"FAILED_PRECONDITION", "INVALID_ARGUMENT"}
    assert "training" in str(info.value)


def test_garbage_upload_is_invalid_argument(stack: TrainerStack, side: ClientSide) -> None:
    ids = stack.training([side], rounds=1, start=True)
    with pytest.raises(SidecarError) as info:
        side.client.upload(
            ids["model_id"], b"not a model at all" * 10, round=0, sample_size=3, format="torch"
        )
    assert info.value.code == "INVALID_ARGUMENT"
    state = stack.devserver.training(stack.actor, ids["training_id"])
    assert state["state"] == "O"


def test_pack_and_unpack_through_the_sidecar(side: ClientSide, tmp_path: Path) -> None:
    data = os.urandom(300_000) + bytes(2_000_000)
    packed = side.client.pack(data, chunk_size=1024 * 1024)
    assert packed[:4] == b"\x28\xb5\x2f\xfd"
    assert len(packed) < len(data)
    assert side.client.unpack(packed) == data
    src, blob, back = tmp_path / "raw", tmp_path / "raw.zst", tmp_path / "back"
    src.write_bytes(data)
    summary = side.client.pack_file(src, blob)
    assert summary.raw_bytes == len(data)
    assert summary.packed_bytes == blob.stat().st_size
    side.client.unpack_file(blob, back)
    assert back.read_bytes() == data


def test_corrupt_blob_is_data_loss(side: ClientSide) -> None:
    packed = bytearray(side.client.pack(os.urandom(100_000)))
    packed[len(packed) // 2] ^= 0xFF
    with pytest.raises(SidecarError) as info:
        side.client.unpack(bytes(packed))
    assert info.value.code == "DATA_LOSS"


def test_unreachable_sidecar_is_unavailable(tmp_path: Path) -> None:
    with SidecarClient(str(tmp_path / "nothing.sock"), timeout=2.0) as client:
        with pytest.raises(SidecarError) as info:
            client.get_info()
        assert info.value.code == "UNAVAILABLE"
        with pytest.raises(SidecarError) as ready:
            client.wait_ready(timeout=0.2)
        assert ready.value.code == "UNAVAILABLE"


def test_api_token_is_sent_as_metadata(stack: TrainerStack) -> None:
    guarded = stack.add_client(api_token="t0ken-for-test", register=False)
    with pytest.raises(SidecarError) as info:
        guarded.client.get_info()
    assert info.value.code == "UNAUTHENTICATED"
    with SidecarClient(guarded.sidecar.target, api_token="t0ken-for-test") as client:
        assert client.get_info().notification_url


def test_download_without_verification_reports_the_announced_digest(
    stack: TrainerStack, side: ClientSide
) -> None:
    original = tiny_module_bytes(seed=4)
    model_id = stack.devserver.upload_model(stack.actor, original)
    with SidecarClient(side.sidecar.target, verify=False) as fast:
        data, result = fast.download_with_info(model_id)
    assert data == original
    assert result.sha256 == hashlib.sha256(original).hexdigest()


def test_get_training_reports_the_state(stack: TrainerStack, side: ClientSide) -> None:
    ids = stack.training([side], rounds=1, start=False)
    status = side.client.get_training(ids["training_id"])
    assert status.state == "I"
    assert status.data.get("state") == "I"
    stack.devserver.start_training(stack.actor, ids["training_id"])
    assert side.client.get_training(ids["training_id"]).state == "O"
    with pytest.raises(SidecarError) as info:
        side.client.get_training(str(uuid.uuid4()))
    assert info.value.code == "NOT_FOUND"


class _TrainerCrashed(Exception):
    pass


def test_a_trainer_failing_mid_upload_uploads_nothing(
    stack: TrainerStack, side: ClientSide
) -> None:
    ids = stack.training([side], rounds=1, start=True)
    weights = side.client.download_state_dict(ids["model_id"])
    big = bytes(3 * 1024 * 1024)  # several chunks, so the stream is cut in the middle

    def crash(done: int, total: int) -> None:
        if done >= 1024 * 1024:
            raise _TrainerCrashed

    with pytest.raises(_TrainerCrashed):
        side.client.upload(ids["model_id"], big, round=0, sample_size=1, progress=crash)
    assert stack.devserver.training(stack.actor, ids["training_id"])["state"] == "O"
    # Nothing was counted: the real upload of round 0 is still accepted.
    reply = side.client.upload_state_dict(ids["model_id"], weights, round=0, sample_size=1)
    assert reply.http_status == 201


def test_weights_that_do_not_match_the_model_are_refused(
    stack: TrainerStack, side: ClientSide
) -> None:
    torch = pytest.importorskip("torch")
    ids = stack.training([side], rounds=1, start=True)
    wrong = {"not.a.layer": torch.zeros(3)}
    with pytest.raises(SidecarError) as info:
        side.client.upload_state_dict(ids["model_id"], wrong, round=0, sample_size=1)
    assert info.value.code == "INVALID_ARGUMENT"
    assert stack.devserver.training(stack.actor, ids["training_id"])["state"] == "O"


def test_negative_round_is_refused_before_sending(side: ClientSide) -> None:
    with pytest.raises(ValueError, match="round"):
        side.client.upload("m", b"x", round=-1, sample_size=1)
