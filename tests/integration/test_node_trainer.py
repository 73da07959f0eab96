"""The Node.js example trainer (examples/node/trainer.js) runs a training through a sidecar.

It loads the .proto with @grpc/proto-loader, follows WatchEvents, downloads
SAFETENSORS, rewrites every float32 weight as ``w * scale + shift`` by parsing
the safetensors header itself, uploads SAFETENSORS and test metrics. With a
single client, the aggregated global model is exactly its upload.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import pytest
from trainer_stack import TrainerStack, tiny_module

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

EXAMPLE_DIR = Path(__file__).resolve().parents[2] / "examples" / "node"
NODE = shutil.which("node")


def _records(output: bytes) -> List[Dict[str, Any]]:
    records = []
    for line in output.decode("utf-8", "replace").splitlines():
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            records.append(value)
    return records


@pytest.mark.skipif(NODE is None, reason="node is not installed (CI has it: this test runs there)")
@pytest.mark.parametrize("quirks", [False, True], ids=["plain", "notification-quirks"])
def test_node_trainer_runs_a_training(request: pytest.FixtureRequest, quirks: bool) -> None:
    # With quirks the dev server repeats and reorders notifications as the real one does.
    stack: TrainerStack = request.getfixturevalue("quirky_stack" if quirks else "stack")
    assert (EXAMPLE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "examples/node has no node_modules: run `make install` (npm ci in examples/node)"
    )
    side = stack.add_client()
    ids = stack.training([side], rounds=1, start=True)
    assert NODE is not None
    done = subprocess.run(
        [
            NODE,
            str(EXAMPLE_DIR / "trainer.js"),
            "--target",
            side.sidecar.target,
            "--training-id",
            ids["training_id"],
            "--scale",
            "0.5",
            "--shift",
            "0.125",
            "--sample-size",
            "7",
            "--event-timeout",
            "60",
        ],
        capture_output=True,
        timeout=120,
    )
    records = _records(done.stdout)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[-3000:] + stack.logs()
    events = [r["event"] for r in records]
    assert events == ["ready", "train", "test", "finished"]
    train = records[1]
    assert train["http_status"] == 201
    assert train["round"] == 0
    assert train["values_changed"] == sum(p.numel() for p in tiny_module().parameters())

    state = stack.devserver.training(stack.actor, ids["training_id"])
    assert state["state"] == "C"
    final = side.client.download_state_dict(ids["model_id"])
    for name, tensor in tiny_module().state_dict().items():
        assert torch.allclose(final[name], tensor * 0.5 + 0.125, atol=1e-6), name


@pytest.mark.skipif(NODE is None, reason="node is not installed (CI has it: this test runs there)")
def test_node_trainer_rejects_bad_usage() -> None:
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(EXAMPLE_DIR / "trainer.js"), "--scale", "many"],
        capture_output=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2
    assert b"--scale needs a number" in done.stderr
