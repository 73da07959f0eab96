"""Local model and metrics uploads: every refusal with the real server's shapes, and safety."""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path
from typing import Any, Callable, List, Tuple

import torch
from conftest import DevServerHandle, NotificationSink, User, encode_multipart

SinkFactory = Callable[..., NotificationSink]
ModelFactory = Callable[..., bytes]


def _upload(
    devserver: DevServerHandle,
    user: User,
    model_id: str,
    model: bytes | None,
    *,
    fields: List[Tuple[str, str]] | None = None,
) -> Any:
    if fields is None:
        fields = [("owner", "ignored"), ("round", "0"), ("sample_size", "10")]
    files = [] if model is None else [("model_file", "model_file", model)]
    content_type, body = encode_multipart(fields, files)
    return devserver.request(
        "POST", f"/api/models/{model_id}/", user=user, body=body, content_type=content_type
    )


class _Evil:
    """Pickles to a call of os.system: executing it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Tuple[Any, Tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _saved(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_upload_refusals_have_the_real_shapes(
    devserver: DevServerHandle, notification_sink: SinkFactory, tiny_model: ModelFactory
) -> None:
    sink = notification_sink()
    actor, (user,), model_id, training_id = devserver.setup_training(
        tiny_model(0), [sink.url], start=False
    )
    stranger = devserver.create_user()
    local = tiny_model(5)

    before = _upload(devserver, user, model_id, local)
    assert before.status == 400
    assert before.json() == [f"Training with ID {training_id} is in state I"]
    devserver.start_training(actor, training_id)

    outsider = _upload(devserver, stranger, model_id, local)
    assert outsider.status == 403
    assert outsider.json() == {"detail": f"You are not a participant of training {training_id}!"}

    no_round = _upload(devserver, user, model_id, local, fields=[("sample_size", "1")])
    assert no_round.status == 400 and no_round.json() == {"detail": "'round'"}

    for bad in ("five", "", "1e3", "0x1"):
        result = _upload(
            devserver, user, model_id, local, fields=[("round", bad), ("sample_size", "1")]
        )
        assert result.status == 400, bad  # the real server answers 500 here
        assert isinstance(result.json(), list)

    bad_samples = _upload(
        devserver, user, model_id, local, fields=[("round", "0"), ("sample_size", "-3")]
    )
    assert bad_samples.status == 400

    no_file = _upload(devserver, user, model_id, None)
    assert no_file.status == 400
    assert no_file.json() == {"detail": "No uploaded file 'model_file' found."}

    wrong_round = _upload(
        devserver, user, model_id, local, fields=[("round", "5"), ("sample_size", "1")]
    )
    assert wrong_round.status == 400
    assert wrong_round.json() == [f"Training with ID {training_id} is not currently in round 5"]

    garbage = _upload(devserver, user, model_id, b"\x00" * 100)
    assert garbage.status == 400 and garbage.json()[0].startswith("Invalid model file: ")

    state_dict = _saved(torch.nn.Sequential(torch.nn.Linear(4, 3)).state_dict())
    refused = _upload(devserver, user, model_id, state_dict)
    assert refused.status == 400 and "state_dict" in refused.json()[0]

    other_shape = _saved(torch.nn.Sequential(torch.nn.Linear(5, 3)))
    mismatch = _upload(devserver, user, model_id, other_shape)
    assert mismatch.status == 400 and mismatch.json()[0].startswith("Invalid model file: ")

    mismatched_metrics = _upload(
        devserver,
        user,
        model_id,
        local,
        fields=[("round", "0"), ("sample_size", "1"), ("metric_names", "a")],
    )
    assert mismatched_metrics.status == 400

    # None of the refusals counted: the one good upload completes the round.
    assert devserver.training(actor, training_id)["local_models_arrived"] == 0
    ok = _upload(devserver, user, model_id, local)
    assert ok.status == 201 and ok.json() == {"detail": "Model Update Accepted"}
    assert sink.wait_for(3)[-1]["notification_type"] == "MODEL_TEST_ROUND"


def test_malicious_pickle_is_refused_and_never_executed(
    devserver: DevServerHandle,
    notification_sink: SinkFactory,
    tiny_model: ModelFactory,
    tmp_path: Path,
) -> None:
    marker = tmp_path / "pwned"
    evil = _saved(_Evil(marker))
    evil_module = _saved({"weights": torch.zeros(2), "hook": _Evil(marker)})
    sink = notification_sink()
    actor, (user,), model_id, training_id = devserver.setup_training(tiny_model(0), [sink.url])
    for payload in (evil, evil_module):
        content_type, body = encode_multipart(
            [("name", "evil"), ("description", "")], [("model_file", "model_file", payload)]
        )
        glob = devserver.request(
            "POST", "/api/models/", user=actor, body=body, content_type=content_type
        )
        assert glob.status == 400 and glob.json()[0].startswith("Invalid model file: ")
        local = _upload(devserver, user, model_id, payload)
        assert local.status == 400 and local.json()[0].startswith("Invalid model file: ")
        assert "system" in local.json()[0]  # refused for naming os.system, not by accident
    assert not marker.exists()
    assert devserver.training(actor, training_id)["local_models_arrived"] == 0


def test_torchscript_training_round(
    devserver: DevServerHandle, notification_sink: SinkFactory, tmp_path: Path
) -> None:
    def scripted(seed: int) -> bytes:
        torch.manual_seed(seed)
        module = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(3, 2)))
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        return buffer.getvalue()

    sink = notification_sink()
    actor, users, model_id, _ = devserver.setup_training(
        scripted(0), [sink.url, sink.url], target_num_updates=1
    )
    locals_ = [scripted(1), scripted(2)]
    for user, data, samples in zip(users, locals_, (1, 3)):
        result = _upload(
            devserver, user, model_id, data, fields=[("round", "0"), ("sample_size", str(samples))]
        )
        assert result.status == 201, result.body
    sink.wait_for(6)
    blob = devserver.request("GET", f"/api/models/{model_id}/", user=actor).body
    got = torch.jit.load(io.BytesIO(blob)).state_dict()  # type: ignore[no-untyped-call]
    states = [torch.jit.load(io.BytesIO(d)).state_dict() for d in locals_]  # type: ignore[no-untyped-call]
    for key in got:
        expected = states[0][key] * 0.25 + states[1][key] * 0.75
        torch.testing.assert_close(got[key], expected, rtol=0, atol=2.4e-7)


def test_metrics_upload_rules(
    devserver: DevServerHandle, notification_sink: SinkFactory, tiny_model: ModelFactory
) -> None:
    sink = notification_sink()
    actor, (user,), model_id, training_id = devserver.setup_training(tiny_model(0), [sink.url])
    form = "application/x-www-form-urlencoded"
    body = b"metric_names=a&metric_names=b&metric_values=0.8&metric_values=0.2"
    ok = devserver.request(
        "POST", f"/api/models/{model_id}/metrics/", user=user, body=body, content_type=form
    )
    assert ok.status == 201
    assert ok.json() == {"detail": "Model Metrics Upload Accepted", "model_id": model_id}
    unknown = str(uuid.uuid4())
    missing = devserver.request(
        "POST", f"/api/models/{unknown}/metrics/", user=user, body=body, content_type=form
    )
    assert missing.status == 400 and missing.json() == {"detail": f"Model {unknown} not found."}
    for bad in (b"metric_names=a", b"metric_names=a&metric_values=1&metric_values=2", b"%%%&&&=="):
        result = devserver.request(
            "POST", f"/api/models/{model_id}/metrics/", user=user, body=bad, content_type=form
        )
        assert result.status == 400, bad
    stranger = devserver.create_user()
    refused = devserver.request(
        "POST", f"/api/models/{model_id}/metrics/", user=stranger, body=body, content_type=form
    )
    assert refused.status == 403
    # A value that is not a number is stored as it came, as the real server does.
    text = b"metric_names=note&metric_values=high"
    noted = devserver.request(
        "POST", f"/api/models/{model_id}/metrics/", user=user, body=text, content_type=form
    )
    assert noted.status == 201
    stored = devserver.request("GET", f"/api/models/{model_id}/metrics/", user=actor).json()
    assert [(m["key"], m["value"], m["round"]) for m in stored] == [
        ("a", 0.8, 0),
        ("b", 0.2, 0),
        ("note", "high", 0),
    ]
    # Metrics outside a test round are stored but do not move the training on.
    state = devserver.training(actor, training_id)
    assert state["round"] == 0 and state["phase"] == "update"


def test_training_setup_validation(devserver: DevServerHandle, tiny_model: ModelFactory) -> None:
    actor = devserver.create_user(actor=True)
    other = devserver.create_user()
    model_id = devserver.upload_model(actor, tiny_model(0))
    cases: List[Any] = [
        {"model_id": str(uuid.uuid4()), "target_num_updates": 1, "clients": []},
        {"model_id": model_id, "target_num_updates": 0, "clients": []},
        {"model_id": model_id, "target_num_updates": "2", "clients": []},
        {"model_id": model_id, "target_num_updates": 1, "clients": ["nope"]},
        {"model_id": model_id, "target_num_updates": 1, "aggregation_method": "Magic"},
        {"model_id": model_id, "target_num_updates": 1, "metric_names": "acc"},
    ]
    for case in cases:
        result = devserver.request("POST", "/api/trainings/", user=actor, json_body=case)
        assert result.status == 400, case
    training_id = devserver.create_training(actor, model_id, [])
    reused = devserver.request(
        "POST",
        "/api/trainings/",
        user=actor,
        json_body={"model_id": model_id, "target_num_updates": 1},
    )
    assert reused.status == 400
    empty = devserver.request("POST", f"/api/trainings/{training_id}/start/", user=actor)
    assert empty.status == 400
    not_actor = devserver.request(
        "PUT",
        f"/api/trainings/{training_id}/clients/",
        user=other,
        json_body={"clients": [other.id]},
    )
    assert not_actor.status == 403
    devserver.add_clients(actor, training_id, [other])
    assert devserver.training(actor, training_id)["participants"] == [other.id]
    devserver.start_training(actor, training_id)
    late = devserver.request(
        "PUT", f"/api/trainings/{training_id}/clients/", user=actor, json_body={"clients": []}
    )
    assert late.status == 400


def test_zstd_coded_upload_and_download_through_the_middleware(
    devserver: DevServerHandle, notification_sink: SinkFactory, tiny_model: ModelFactory
) -> None:
    from fl_sidecar import codec

    sink = notification_sink()
    _actor, (user,), model_id, _ = devserver.setup_training(
        tiny_model(0), [sink.url], target_num_updates=1
    )
    local = tiny_model(7)
    content_type, body = encode_multipart(
        [("round", "0"), ("sample_size", "4")], [("model_file", "model_file", local)]
    )
    packed = codec.pack(body)
    result = devserver.request(
        "POST",
        f"/api/models/{model_id}/",
        user=user,
        body=packed,
        content_type=content_type,
        headers={"Content-Encoding": "zstd"},
    )
    assert result.status == 201, result.body
    assert "zstd" in result.headers["accept-encoding"]
    assert sink.wait_for(3)[-1]["notification_type"] == "MODEL_TEST_ROUND"
    coded = devserver.request(
        "GET", f"/api/models/{model_id}/", user=user, headers={"Accept-Encoding": "zstd"}
    )
    assert coded.status == 200 and coded.headers.get("content-encoding") == "zstd"
    got = _state_of(codec.unpack(coded.body))
    for key, value in _state_of(local).items():  # one client: the average is its model
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)


def _state_of(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False).state_dict()
