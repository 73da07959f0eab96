"""Models on an accelerator: upload from the device, download onto it (``map_location``).

The trainer's model lives on ``device``; ``upload_module`` must send CPU
tensors (the dev server, like a CPU-only FL server, loads them on CPU) without
moving the trainer's model, and ``download_module(map_location=device)`` /
``download_state_dict(device=...)`` / ``Communication.map_location`` must put
the next global model back on the device. The ``cuda`` case runs where a GPU
is present (the device check); the ``cpu`` case runs everywhere.
"""

from __future__ import annotations

import uuid

import pytest
from trainer_stack import ClientSide, TrainerStack, tiny_module

from fl_sidecar.compat import Communication

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"),
    ),
]


@pytest.fixture(scope="module")
def side(stack: TrainerStack) -> ClientSide:
    return stack.add_client()


@pytest.mark.parametrize("device", DEVICES)
def test_upload_from_device_and_download_onto_it(
    stack: TrainerStack, side: ClientSide, device: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = stack.training([side], rounds=1, start=True)
    module = tiny_module().to(device)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(2.0)
    reply = side.client.upload_module(ids["model_id"], module, round=0, sample_size=4)
    assert reply.http_status == 201
    # The trainer's model stayed where it was.
    assert all(p.device.type == device for p in module.parameters())
    stack.devserver.wait_idle(timeout=30)

    loaded = side.client.download_module(ids["model_id"], map_location=device)
    assert all(p.device.type == device for p in loaded.parameters())
    for name, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    weights = side.client.download_state_dict(ids["model_id"], device=device)
    assert all(t.device.type == device for t in weights.values())

    monkeypatch.setattr(Communication, "sidecar_target", side.sidecar.target)
    monkeypatch.setattr(Communication, "map_location", device)
    com = Communication.from_user_password(
        uuid.uuid4(), ids["training_id"], 1, ids["model_id"], side.user.username, side.user.password
    )
    with com:
        again = com.download_model()
    assert all(p.device.type == device for p in again.parameters())
