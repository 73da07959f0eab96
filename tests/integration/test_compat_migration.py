"""Migrating from the reference client: metric values and error answers, through real parts.

A real dev FL server, a real sidecar subprocess and real clients
(``compat.Communication``, ``SidecarClient``, a bare gRPC stub and a Node.js
program as trainers in other languages):

- metric values that are not numbers (``"abc"``, ``True``) reach the server
  as the reference client posts them (``str()`` of each) and are stored;
- a refusal by the FL server reaches the trainer with the server's real HTTP
  status and body: ``e.response.status_code``, ``.text``, ``.json()`` in
  compat, ``http_status``/``http_body``/``error_class`` on ``SidecarError``,
  trailing metadata for any gRPC client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import grpc
import pytest
from trainer_stack import ClientSide, TrainerStack, tiny_module, tiny_module_bytes

from fl_sidecar.compat import (
    Communication,
    MetricsUploadException,
    ModelDownloadException,
    ModelUploadException,
)
from fl_sidecar.errors import SidecarError
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.v1 import sidecar_pb2_grpc as pb_grpc

pytest.importorskip("torch")

pytestmark = pytest.mark.slow

NODE = shutil.which("node")
NODE_MODULES = Path(__file__).resolve().parents[2] / "examples" / "node" / "node_modules"
PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"

# What the reference client posts for each value (str() of it) and what the
# server then stores: numbers as numbers, anything else as the text it came as.
MIXED = {"note": "abc", "count": 1, "rate": 0.5, "flag": True}
STORED = {"note": "abc", "count": 1.0, "rate": 0.5, "flag": "True"}


@pytest.fixture(scope="module")
def side(stack: TrainerStack) -> ClientSide:
    return stack.add_client()


@pytest.fixture
def compat_target(side: ClientSide, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(Communication, "sidecar_target", side.sidecar.target)
    yield


def _communication(side: ClientSide, ids: Dict[str, str], round_: int) -> Communication:
    return Communication.from_user_password(
        side.user.id,
        ids["training_id"],
        round_,
        ids["model_id"],
        side.user.username,
        side.user.password,
    )


def _stored(stack: TrainerStack, model_id: str) -> Dict[Tuple[str, str], Any]:
    """(kind, key) -> value of every metric the dev server stored for the model."""
    answer = stack.devserver.request("GET", f"/api/models/{model_id}/metrics/", user=stack.actor)
    assert answer.status == 200, answer.body
    return {(row["kind"], row["key"]): row["value"] for row in answer.json()}


def _wait_for_phase(stack: TrainerStack, training_id: str, model_round: int) -> None:
    """Until the aggregation of the round is done (the global model's round moved on)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        stack.devserver.wait_idle(timeout=1.0)
        training = stack.devserver.training(stack.actor, training_id)
        if training.get("state") == "C" or int(training.get("round", -1)) >= model_round:
            return
        time.sleep(0.05)
    raise AssertionError(f"training {training_id} did not reach round {model_round}")


def test_compat_posts_any_metric_value_as_the_reference_does(
    stack: TrainerStack, side: ClientSide, compat_target: None
) -> None:
    ids = stack.training([side], rounds=1, start=True)
    with _communication(side, ids, 0) as com:
        assert com.upload_model(tiny_module(), dict(MIXED), 10) is True
    stack.devserver.wait_idle(timeout=30)
    note = 'said "hi"\nthen left'
    with _communication(side, ids, 1) as com:
        assert com.upload_metrics({**MIXED, "quoted": note}) is True
    stored = _stored(stack, ids["model_id"])
    for key, value in STORED.items():
        assert stored[("train", key)] == value, key
        assert stored[("test", key)] == value, key
    assert stored[("test", "quoted")] == note


def test_sidecar_client_sends_text_metrics_too(stack: TrainerStack, side: ClientSide) -> None:
    ids = stack.training([side], rounds=1, start=True)
    result = side.client.upload(
        ids["model_id"], tiny_module_bytes(), round=0, sample_size=5, metrics=MIXED
    )
    assert result.http_status == 201
    stack.devserver.wait_idle(timeout=30)
    assert side.client.upload_metrics(ids["model_id"], MIXED).http_status == 201
    stored = _stored(stack, ids["model_id"])
    assert {key: stored[("train", key)] for key in STORED} == STORED
    assert {key: stored[("test", key)] for key in STORED} == STORED


def test_a_bare_grpc_client_sends_text_and_an_old_clients_zero(
    stack: TrainerStack, side: ClientSide
) -> None:
    model_id = stack.devserver.upload_model(stack.actor, tiny_module_bytes(seed=3))
    # A client generated before `text` existed leaves a 0.0 value off the wire.
    zero = pb.Metric.FromString(pb.Metric(name="zero").SerializeToString())
    request = pb.UploadMetricsRequest(
        model_id=model_id,
        metrics=[pb.Metric(name="note", text="abc"), pb.Metric(name="acc", value=0.25), zero],
        credentials=pb.Credentials(authorization_header=side.user.token_header()),
    )
    with grpc.insecure_channel(side.sidecar.target) as channel:
        answer = pb_grpc.SidecarStub(channel).UploadMetrics(request, timeout=30)
    assert answer.http_status == 201
    stored = _stored(stack, model_id)
    assert (stored[("test", "note")], stored[("test", "acc")], stored[("test", "zero")]) == (
        "abc",
        0.25,
        0.0,
    )


def test_compat_errors_carry_the_servers_status_and_body(
    stack: TrainerStack, side: ClientSide, compat_target: None
) -> None:
    unknown = str(uuid.uuid4())
    com = Communication.from_http_authorization(
        side.user.id, uuid.uuid4(), 0, unknown, side.user.token_header()
    )
    with com, pytest.raises(ModelDownloadException) as download:
        com.download_model()
    response = download.value.response
    assert response.status_code == 400
    assert response.json() == {"detail": f"Model {unknown} not found."}
    assert json.loads(response.text) == response.json()
    assert response.content == response.text.encode()
    assert response.reason == "Bad Request"
    assert response.headers["content-type"].startswith("application/json")
    assert f"Model {unknown} not found." in str(download.value)  # the server's text, kept
    assert (download.value.code, download.value.error_class) == ("NOT_FOUND", "NotFoundError")

    with com, pytest.raises(MetricsUploadException) as metrics:
        com.upload_metrics({"note": "abc"})
    assert metrics.value.response.status_code == 400
    assert metrics.value.response.json()["detail"].endswith("not found.")


def test_an_upload_into_a_round_that_moved_on_shows_the_servers_400(
    stack: TrainerStack, side: ClientSide, compat_target: None
) -> None:
    ids = stack.training([side], rounds=2, start=True)
    with _communication(side, ids, 0) as com:
        com.upload_model(tiny_module(), {"loss": 0.5}, 10)
        _wait_for_phase(stack, ids["training_id"], 1)
        with pytest.raises(ModelUploadException) as late:
            com.upload_model(tiny_module(), {"loss": 0.5}, 10)
    exc = late.value
    expected = [f"Training with ID {ids['training_id']} is not currently in round 0"]
    assert exc.response.status_code == 400
    assert exc.response.json() == expected  # the server's own JSON: a list of strings
    assert exc.code == "FAILED_PRECONDITION"
    assert exc.error_class == "ConflictError"
    assert "not currently in round 0" in str(exc)

    # The same answer reaches SidecarClient's typed error.
    with pytest.raises(SidecarError) as native:
        side.client.upload(ids["model_id"], tiny_module_bytes(), round=0, sample_size=3)
    assert native.value.http_status == 400
    assert native.value.http_body is not None
    assert json.loads(native.value.http_body) == expected
    assert native.value.error_class == "ConflictError"


def test_refused_credentials_show_the_401_without_the_password(
    stack: TrainerStack, side: ClientSide, compat_target: None
) -> None:
    password = "wrong-" + uuid.uuid4().hex
    com = Communication.from_user_password(
        side.user.id, uuid.uuid4(), 0, str(uuid.uuid4()), side.user.username, password
    )
    with com, pytest.raises(ModelDownloadException) as refused:
        com.download_model()
    response = refused.value.response
    assert response.status_code == 401
    assert "detail" in response.json()
    assert password not in response.text and password not in str(refused.value)


def test_errors_without_a_server_answer_still_have_a_response(
    stack: TrainerStack, side: ClientSide, compat_target: None, tmp_path: Path
) -> None:
    ids = stack.training([side], rounds=1)
    with _communication(side, ids, 0) as com:
        # Refused by the sidecar itself, before the server: sample_size 0 weights nothing.
        with pytest.raises(ModelUploadException) as local:
            com.upload_model(tiny_module(), {"loss": 1.0}, 0)
        with pytest.raises(ModelUploadException) as missing:
            com.upload_model(tiny_module(), {"loss": None}, 3)
    for exc in (local.value, missing.value):
        assert exc.response.status_code is None
        assert exc.response.text == "" and not exc.response.ok
    assert local.value.code == "INVALID_ARGUMENT"
    assert "loss" in str(missing.value)

    Communication.sidecar_target = f"unix:{tmp_path / 'no-sidecar.sock'}"
    try:
        with _communication(side, ids, 0) as com, pytest.raises(ModelDownloadException) as gone:
            com.download_model()
    finally:
        Communication.sidecar_target = side.sidecar.target
    assert gone.value.code == "UNAVAILABLE"
    assert gone.value.response.status_code is None


NODE_PROGRAM = """
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const [protoRoot, target, auth, modelId, unknownId] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoRoot + '/fl_sidecar/v1/sidecar.proto', {
  includeDirs: [protoRoot], keepCase: true, longs: Number, enums: String,
  defaults: true, oneofs: true,
});
const Sidecar = grpc.loadPackageDefinition(definition).fl_sidecar.v1.Sidecar;
const client = new Sidecar(target, grpc.credentials.createInsecure());
const credentials = { authorization_header: auth };
const metrics = [{ name: 'note', text: 'from node' }, { name: 'acc', value: 0.75 }];
client.UploadMetrics({ model_id: modelId, metrics, credentials }, (error, answer) => {
  if (error) { console.error(error); process.exit(1); }
  client.UploadMetrics({ model_id: unknownId, metrics, credentials }, (refused) => {
    const trailers = refused.metadata;
    console.log(JSON.stringify({
      ok_status: answer.http_status,
      code: refused.code,
      error_class: trailers.get('fl-sidecar-error')[0],
      http_status: trailers.get('fl-sidecar-http-status')[0],
      http_body: trailers.get('fl-sidecar-http-body-bin')[0].toString('utf8'),
    }));
    client.close();
  });
});
"""


@pytest.mark.skipif(NODE is None, reason="node is not installed (CI has it: this test runs there)")
def test_a_node_trainer_sends_text_and_reads_the_servers_answer(
    stack: TrainerStack, side: ClientSide, tmp_path: Path
) -> None:
    assert NODE is not None
    assert (NODE_MODULES / "@grpc" / "grpc-js").is_dir(), "run `npm ci` in examples/node"
    program = tmp_path / "metrics.js"
    program.write_text(NODE_PROGRAM)
    model_id = stack.devserver.upload_model(stack.actor, tiny_module_bytes(seed=4))
    unknown = str(uuid.uuid4())
    done = subprocess.run(
        [
            NODE,
            str(program),
            str(PROTO_ROOT),
            side.sidecar.target,
            side.user.token_header(),
            model_id,
            unknown,
        ],
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
        capture_output=True,
        timeout=120,
    )
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-3000:]
    report: Dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert report["ok_status"] == 201
    assert report["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert (report["error_class"], report["http_status"]) == ("NotFoundError", "400")
    assert json.loads(report["http_body"]) == {"detail": f"Model {unknown} not found."}
    stored = _stored(stack, model_id)
    assert (stored[("test", "note")], stored[("test", "acc")]) == ("from node", 0.75)
