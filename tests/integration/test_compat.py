"""The drop-in Communication through real sidecars: compatibility mode, the MNIST-style example.

- A full two-client training in compatibility mode: each sidecar starts the
  training script per event (``train|test --training-id --round --model-id``),
  and the script uses ``fl_sidecar.compat.Communication``.
- ``examples/python/main.py`` (the reference MNIST example's shape, one import
  changed) trains and tests a whole one-round training, run as the client
  process would run it.
- The reference API's methods and exceptions against a real sidecar.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List

import pytest
from trainer_stack import ClientSide, TrainerStack, tiny_module, tiny_module_bytes

from fl_sidecar.compat import (
    Communication,
    MetricsUploadException,
    ModelDownloadException,
    ModelUploadException,
    is_torchscript_instance,
)
from fl_sidecar.errors import SidecarError

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "python" / "main.py"

COMPAT_SCRIPT = textwrap.dedent(
    """
    import argparse, os, sys
    import torch
    from fl_sidecar.compat import Communication

    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["train", "test"])
    parser.add_argument("--training-id", required=True)
    parser.add_argument("--round", required=True, type=int)
    parser.add_argument("--model-id", required=True)
    args = parser.parse_args()
    com = Communication.from_user_password(
        os.environ["CLIENT_ID"], args.training_id, args.round, args.model_id,
        os.environ["FL_DEMONSTRATOR_USERNAME"], os.environ["FL_DEMONSTRATOR_PASSWORD"],
    )
    model = com.download_model()
    out = os.environ["COMPAT_OUT"]
    if args.action == "train":
        shift = float(os.environ["COMPAT_SHIFT"]) * (args.round + 1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(shift)
        torch.save(model.state_dict(), os.path.join(out, f"upload-{args.round}.pt"))
        com.upload_model(model, {"accuracy": 0.5}, int(os.environ["COMPAT_SAMPLES"]))
    else:
        com.upload_metrics({"accuracy": 0.9})
    open(os.path.join(out, f"{args.action}-{args.round}.done"), "w").close()
    """
)


@pytest.fixture(scope="module")
def plain_side(stack: TrainerStack) -> ClientSide:
    """A sidecar without compatibility mode (the test drives the scripts itself)."""
    return stack.add_client()


def _wait_for_state(stack: TrainerStack, training_id: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    current = None
    while time.monotonic() < deadline:
        current = stack.devserver.training(stack.actor, training_id)["state"]
        if current == state:
            return
        # The dev server signals idleness when aggregation and notifications are done.
        stack.devserver.wait_idle(timeout=1.0)
        time.sleep(0.05)
    raise AssertionError(f"training {training_id} is {current!r}, not {state!r}\n{stack.logs()}")


def test_compatibility_mode_runs_the_script_per_round(stack: TrainerStack, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(COMPAT_SCRIPT)
    sides = []
    outs = []
    for index, (shift, samples) in enumerate(((0.5, 20), (-0.25, 60))):
        out = tmp_path / f"out{index}"
        out.mkdir()
        outs.append(out)
        username, password = f"compat{index}-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
        sides.append(
            stack.add_client(
                username=username,
                password=password,
                extra_args=(
                    "--script-executor",
                    sys.executable,
                    "--script-path",
                    str(script),
                    "--script-working-directory",
                    str(tmp_path),
                ),
                env={
                    "CLIENT_ID": str(uuid.uuid4()),
                    "FL_DEMONSTRATOR_USERNAME": username,
                    "FL_DEMONSTRATOR_PASSWORD": password,
                    "COMPAT_OUT": str(out),
                    "COMPAT_SHIFT": str(shift),
                    "COMPAT_SAMPLES": str(samples),
                },
            )
        )
    ids = stack.training(sides, rounds=1, start=True)
    _wait_for_state(stack, ids["training_id"], "C", timeout=150)

    # The training is complete once the server has both metrics; each script
    # writes its marker only after upload_metrics returns, so give it a moment.
    for out in outs:
        done: List[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = sorted(p.name for p in out.glob("*.done"))
            if len(done) >= 2:
                break
            time.sleep(0.05)
        assert done == ["test-1.done", "train-0.done"], stack.logs()
    first = torch.load(outs[0] / "upload-0.pt")
    second = torch.load(outs[1] / "upload-0.pt")
    final = plain_state(stack, ids["model_id"])
    for name, tensor in final.items():
        expected = (first[name] * 20 + second[name] * 60) / 80
        assert torch.allclose(tensor, expected, atol=1e-6), name


def plain_state(stack: TrainerStack, model_id: str) -> Dict[str, Any]:
    side = stack.clients[0]
    return side.client.download_state_dict(model_id)


def _example_env(side: ClientSide) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(
        FL_SIDECAR_SOCKET=side.sidecar.socket_path,
        FL_DEMONSTRATOR_USERNAME=side.user.username,
        FL_DEMONSTRATOR_PASSWORD=side.user.password,
        CLIENT_ID=side.user.id,
    )
    return env


def test_mnist_style_example_runs_a_training(stack: TrainerStack, plain_side: ClientSide) -> None:
    ids = stack.training([plain_side], rounds=1, start=True)
    common = ["--training-id", ids["training_id"], "--model-id", ids["model_id"]]
    env = _example_env(plain_side)
    train = subprocess.run(
        [sys.executable, str(EXAMPLE), "train", "--round", "0", *common],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert train.returncode == 0, train.stderr.decode()[-3000:]
    stack.devserver.wait_idle(timeout=30)
    test = subprocess.run(
        [sys.executable, str(EXAMPLE), "test", "--round", "1", *common],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert test.returncode == 0, test.stderr.decode()[-3000:]
    _wait_for_state(stack, ids["training_id"], "C", timeout=30)
    # The global model changed: the example's upload was aggregated into it.
    final = plain_side.client.download_state_dict(ids["model_id"])
    initial = tiny_module().state_dict()
    assert any(not torch.equal(final[k], initial[k]) for k in initial)


def test_download_model_works_on_current_torch(
    stack: TrainerStack, plain_side: ClientSide, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reference client's torch.load(weights_only=True default) refuses this on torch >= 2.6.
    monkeypatch.setattr(Communication, "sidecar_target", plain_side.sidecar.target)
    model_id = stack.devserver.upload_model(stack.actor, tiny_module_bytes(seed=5))
    com = Communication.from_user_password(
        uuid.uuid4(), uuid.uuid4(), 0, model_id, plain_side.user.username, plain_side.user.password
    )
    with com:
        model = com.download_model()
    assert isinstance(model, torch.nn.Sequential)
    for name, tensor in tiny_module(seed=5).state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor)


def test_a_subclass_that_packs_its_own_way_gets_the_bytes(
    stack: TrainerStack, plain_side: ClientSide, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Communication streams through a temporary file; an override still sees the blob.
    seen: List[str] = []

    class Custom(Communication):
        def unpack_model(self, blob: bytes) -> Any:
            seen.append(f"unpack {len(blob)}")
            return super().unpack_model(blob)

        def pack_model(self, model: Any) -> bytes:
            seen.append("pack")
            return super().pack_model(model)

    monkeypatch.setattr(Communication, "sidecar_target", plain_side.sidecar.target)
    ids = stack.training([plain_side], rounds=1, model=tiny_module_bytes(seed=6), start=True)
    com = Custom.from_user_password(
        uuid.uuid4(),
        ids["training_id"],
        0,
        ids["model_id"],
        plain_side.user.username,
        plain_side.user.password,
    )
    with com:
        model = com.download_model()
        assert com.upload_model(model, {"accuracy": 0.5}, 3) is True
    assert seen == [f"unpack {len(tiny_module_bytes(seed=6))}", "pack"]


def test_reference_exceptions_are_typed(
    stack: TrainerStack, plain_side: ClientSide, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Communication, "sidecar_target", plain_side.sidecar.target)
    com = Communication.from_http_authorization(
        uuid.uuid4(), uuid.uuid4(), 0, str(uuid.uuid4()), plain_side.user.token_header()
    )
    with pytest.raises(ModelDownloadException) as down:
        com.download_model()
    assert isinstance(down.value, SidecarError)
    assert down.value.code == "NOT_FOUND"
    with pytest.raises(ModelUploadException) as up:
        com.upload_model(tiny_module(), {"accuracy": 0.1}, 5)
    assert isinstance(up.value, SidecarError)
    with pytest.raises(MetricsUploadException) as metrics:
        com.upload_metrics({"accuracy": None})  # text is passed on; a missing value is not
    assert metrics.value.code == "INVALID_ARGUMENT"
    bad = Communication.from_user_password(
        uuid.uuid4(), uuid.uuid4(), 0, str(uuid.uuid4()), "nobody", "wrong"
    )
    with pytest.raises(ModelDownloadException) as auth:
        bad.download_model()
    assert auth.value.code == "UNAUTHENTICATED"
    assert "wrong" not in str(auth.value)
    com.close()
    bad.close()


def test_pack_unpack_and_torchscript() -> None:
    com = Communication(uuid.uuid4(), uuid.uuid4(), 3, uuid.uuid4(), "Token x")
    module = tiny_module(seed=2)
    again = com.unpack_model(com.pack_model(module))
    assert isinstance(again, torch.nn.Sequential)
    scripted = torch.jit.script(tiny_module(seed=2))
    assert is_torchscript_instance(scripted)
    assert not is_torchscript_instance(module)
    loaded = com.unpack_model(com.pack_model(scripted))
    assert is_torchscript_instance(loaded)
    x = torch.ones(1, 4)
    assert torch.equal(loaded(x), module(x))
    assert com.get_headers() == {"Authorization": "Token x"}
    assert "Token x" not in repr(com)


def test_compatibility_mode_runs_each_round_once_despite_the_real_servers_repeats(
    quirky_stack: TrainerStack, tmp_path: Path
) -> None:
    # The same training as above, while the dev server repeats round starts and
    # tests and sends the training start late, as the real server does.
    test_compatibility_mode_runs_the_script_per_round(quirky_stack, tmp_path)
    for side in quirky_stack.clients[-2:]:
        log = Path(side.sidecar.log_path or "").read_text(encoding="utf-8", errors="replace")
        assert log.count('msg="training script started"') == 2, log[-3000:]
        assert "a repeat of a notification already delivered" in log
