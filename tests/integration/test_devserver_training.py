"""Whole trainings on the dev server over real sockets, driven through FlServerClient."""

from __future__ import annotations

import concurrent.futures
import io
import json
import socket
from pathlib import Path
from typing import Any, Callable, Dict, List

import pytest
import torch
from conftest import DevServerHandle, NotificationSink, User

from fl_sidecar.errors import ConflictError
from fl_sidecar.server_api import Credentials, FlServerClient

SinkFactory = Callable[..., NotificationSink]
ModelFactory = Callable[..., bytes]


def _note(kind: str, training_id: str, model_id: str, round_: int | None = None) -> bytes:
    body: Dict[str, Any] = {} if round_ is None else {"round": round_}
    body["global_model_uuid"] = model_id
    text = json.dumps({"notification_type": kind, "body": body, "training_uuid": training_id})
    return text.encode()


def _client(devserver: DevServerHandle, user: User, *, basic: bool = False) -> FlServerClient:
    creds = (
        Credentials.basic(user.username, user.password) if basic else Credentials.token(user.token)
    )
    return FlServerClient(devserver.url, creds, retries=0, timeout=30.0)


def _state(module_bytes: bytes) -> Dict[str, torch.Tensor]:
    module = torch.load(io.BytesIO(module_bytes), weights_only=False)
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _run_round(
    devserver: DevServerHandle,
    clients: List[FlServerClient],
    model_id: str,
    round_: int,
    local_models: List[bytes],
    sample_sizes: List[int],
    tmp_path: Path,
) -> None:
    for index, (client, data, samples) in enumerate(zip(clients, local_models, sample_sizes)):
        downloaded = tmp_path / f"global-{round_}-{index}.pt"
        client.download_model(model_id, downloaded)
        assert downloaded.stat().st_size > 0
        source = _write(tmp_path, f"local-{round_}-{index}.pt", data)
        client.upload_model(
            model_id, source, round=round_, sample_size=samples, metrics={"loss": 0.1 * index}
        )


def _expected_average(models: List[bytes], sample_sizes: List[int]) -> Dict[str, torch.Tensor]:
    states = [_state(m) for m in models]
    total = sum(sample_sizes)
    return {
        key: sum(s[key] * (n / total) for s, n in zip(states, sample_sizes))  # type: ignore[misc]
        for key in states[0]
    }


def test_full_training_two_clients(
    devserver: DevServerHandle,
    notification_sink: SinkFactory,
    tiny_model: ModelFactory,
    tmp_path: Path,
) -> None:
    sinks = [notification_sink(), notification_sink()]
    actor_sink = notification_sink()
    actor = devserver.create_user(message_endpoint=actor_sink.url, actor=True, client=False)
    users = [devserver.create_user(message_endpoint=s.url) for s in sinks]
    model_id = devserver.upload_model(actor, tiny_model(0))
    training_id = devserver.create_training(actor, model_id, [users[0]], target_num_updates=2)
    devserver.add_clients(actor, training_id, [users[1]])
    assert devserver.training(actor, training_id)["state"] == "I"
    devserver.start_training(actor, training_id)
    again = devserver.request("POST", f"/api/trainings/{training_id}/start/", user=actor)
    assert again.status == 400 and isinstance(again.json(), list)

    clients = [_client(devserver, users[0]), _client(devserver, users[1], basic=True)]
    sizes = [[30, 10], [5, 15]]
    for round_ in (0, 1):
        for sink in sinks:
            sink.wait_for(2 + 2 * round_)
        locals_ = [tiny_model(10 + round_), tiny_model(20 + round_)]
        _run_round(devserver, clients, model_id, round_, locals_, sizes[round_], tmp_path)
        for sink in sinks:
            sink.wait_for(3 + 2 * round_)
        state = devserver.training(actor, training_id)
        assert state["round"] == round_ + 1 and state["local_models_arrived"] == 0
        downloaded = tmp_path / f"aggregated-{round_}.pt"
        clients[0].download_model(model_id, downloaded)
        got = _state(downloaded.read_bytes())
        expected = _expected_average(locals_, sizes[round_])
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2.4e-7)
        for index, client in enumerate(clients):
            client.upload_metrics(model_id, {"accuracy": 0.5 + index, "loss": 1.0 / (round_ + 1)})

    for sink in sinks:
        sink.wait_for(6)
    actor_sink.wait_for(1)
    expected_sequence = [
        _note("TRAINING_START", training_id, model_id),
        _note("UPDATE_ROUND_START", training_id, model_id, 0),
        _note("MODEL_TEST_ROUND", training_id, model_id, 1),
        _note("UPDATE_ROUND_START", training_id, model_id, 1),
        _note("MODEL_TEST_ROUND", training_id, model_id, 2),
        _note("TRAINING_FINISHED", training_id, model_id),
    ]
    for sink in sinks:
        assert sink.raw == expected_sequence
        assert all(h["content-type"] == "application/json" for h in sink.headers)
    assert actor_sink.raw == [expected_sequence[-1]]
    final = devserver.training(actor, training_id)
    assert final["state"] == "C"
    assert final["participants"] == [users[0].id, users[1].id]

    metrics = devserver.request("GET", f"/api/models/{model_id}/metrics/", user=actor).json()
    tested = {
        (m["reporter"], m["round"], m["key"]): m["value"] for m in metrics if m["kind"] == "test"
    }
    assert tested[(users[1].id, 2, "accuracy")] == 1.5
    assert tested[(users[0].id, 1, "loss")] == 1.0
    assert len(tested) == 8
    trained = [m for m in metrics if m["kind"] == "train"]
    assert {(m["reporter"], m["round"]) for m in trained} == {
        (u.id, r) for u in users for r in (0, 1)
    }

    # A completed training refuses uploads with the real server's message.
    late = _write(tmp_path, "late.pt", tiny_model(99))
    with pytest.raises(ConflictError) as info:
        clients[0].upload_model(model_id, late, round=2, sample_size=1)
    assert info.value.status == 400 and "is in state C" in str(info.value.detail)
    for client in clients:
        client.close()


def test_duplicate_upload_is_refused_and_not_counted(
    devserver: DevServerHandle,
    notification_sink: SinkFactory,
    tiny_model: ModelFactory,
    tmp_path: Path,
) -> None:
    sinks = [notification_sink(), notification_sink()]
    actor, users, model_id, training_id = devserver.setup_training(
        tiny_model(0), [s.url for s in sinks], target_num_updates=1
    )
    first, second = _client(devserver, users[0]), _client(devserver, users[1])
    a, b, a_again = tiny_model(1), tiny_model(2), tiny_model(3)
    first.upload_model(model_id, _write(tmp_path, "a.pt", a), round=0, sample_size=3)
    with pytest.raises(ConflictError) as info:
        first.upload_model(model_id, _write(tmp_path, "a2.pt", a_again), round=0, sample_size=9)
    assert info.value.status == 409
    state = devserver.training(actor, training_id)
    assert state["local_models_arrived"] == 1 and state["local_models_expected"] == 2
    second.upload_model(model_id, _write(tmp_path, "b.pt", b), round=0, sample_size=1)
    for sink in sinks:
        assert sink.wait_for(3)[-1]["notification_type"] == "MODEL_TEST_ROUND"
    result = devserver.request("GET", f"/api/models/{model_id}/", user=users[1])
    got = _state(result.body)
    expected = _expected_average([a, b], [3, 1])
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2.4e-7)
    first.close()
    second.close()


def test_concurrent_clients_one_aggregation(
    devserver: DevServerHandle,
    notification_sink: SinkFactory,
    tiny_model: ModelFactory,
    tmp_path: Path,
) -> None:
    count = 8
    sink = notification_sink()
    actor, users, model_id, _training_id = devserver.setup_training(
        tiny_model(0), [sink.url] * count, target_num_updates=1
    )
    sink.wait_for(2 * count)
    locals_ = [tiny_model(100 + i) for i in range(count)]
    sizes = [i + 1 for i in range(count)]
    paths = [_write(tmp_path, f"c{i}.pt", m) for i, m in enumerate(locals_)]

    def upload(index: int) -> None:
        with _client(devserver, users[index]) as client:
            target = tmp_path / f"down{index}.pt"
            client.download_model(model_id, target)
            client.upload_model(model_id, paths[index], round=0, sample_size=sizes[index])

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        list(pool.map(upload, range(count)))
    bodies = sink.wait_for(3 * count)
    tests = [b for b in bodies if b["notification_type"] == "MODEL_TEST_ROUND"]
    assert len(tests) == count and all(b["body"]["round"] == 1 for b in tests)
    got = _state(devserver.request("GET", f"/api/models/{model_id}/", user=actor).body)
    expected = _expected_average(locals_, sizes)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=2.4e-7)


def test_slow_endpoint_does_not_delay_another_training(
    devserver: DevServerHandle,
    notification_sink: SinkFactory,
    tiny_model: ModelFactory,
) -> None:
    slow, fast = notification_sink(), notification_sink()
    slow.release.clear()  # answers nothing until released
    devserver.setup_training(tiny_model(0), [slow.url])
    devserver.setup_training(tiny_model(1), [fast.url])
    bodies = fast.wait_for(2, timeout=10)
    assert [b["notification_type"] for b in bodies] == ["TRAINING_START", "UPDATE_ROUND_START"]
    assert slow.bodies == []  # still held up, yet the other training went on
    slow.release.set()
    assert [b["notification_type"] for b in slow.wait_for(2)] == [
        "TRAINING_START",
        "UPDATE_ROUND_START",
    ]


def test_refused_notifications_are_retried_in_order(
    notification_sink: SinkFactory,
    tiny_model: ModelFactory,
    make_devserver: Callable[..., DevServerHandle],
) -> None:
    # A bound socket that does not listen refuses connections on this port.
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}/"
    handle = make_devserver(notify_retry_delays=(0.2, 0.5, 1.0, 2.0, 5.0))
    handle.setup_training(tiny_model(0), [endpoint])
    assert handle.server.wait_notifier(lambda n: n.retried >= 1, timeout=10)
    blocker.close()
    sink = notification_sink(port=port)
    bodies = sink.wait_for(2)
    assert [b["notification_type"] for b in bodies] == ["TRAINING_START", "UPDATE_ROUND_START"]
