"""The trainer's peak memory on model transfers: the tensors, never the file as well.

Each transfer runs in a fresh trainer process against a real sidecar and dev server,
with a 128 MiB fp32 model, and reports its peak RSS (VmHWM) growth over a baseline
taken just before the transfer.

- Downloads (``download_state_dict``, ``download_module``, compat's ``download_model``):
  the process first downloads a tiny model the same way, so every lazy import and
  gRPC's buffers count in its baseline. Growth must stay under 1.25x the model: the
  tensors take 1x; holding the whole file as well grows it by about 2x.
- Uploads (``upload_state_dict``, ``upload_module``, compat's ``upload_model``): the
  trainer holds its model already, and serializes a tiny one first for the same
  reason. Growth must stay under 0.5x the model: a copy of the whole file in memory
  would be 1x.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from typing import Dict, Iterator

import pytest
from trainer_stack import ClientSide, TrainerStack

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

MIB = 1 << 20
LAYERS = 8
WIDTH = 2048  # 8 x (2048 x 2048 + 2048) fp32: 128.06 MiB of tensors
MODEL_MIB = LAYERS * (WIDTH * WIDTH + WIDTH) * 4 / MIB
DOWNLOAD_BOUND = 1.25
UPLOAD_BOUND = 0.5

PRELUDE = textwrap.dedent(
    """
    import io, json, sys
    import torch
    from fl_sidecar.client import SidecarClient
    from fl_sidecar.compat import Communication

    target, method, user, password, small, big = sys.argv[1:7]
    small, big = json.loads(small), json.loads(big)
    Communication.sidecar_target = target

    def peak_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024

    def communication(ids):
        return Communication.from_user_password(
            "c", ids["training_id"], 0, ids["model_id"], user, password
        )

    def model_mib(tensors):
        return sum(t.numel() * t.element_size() for t in tensors.values()) / (1 << 20)
    """
)

DOWNLOADER = PRELUDE + textwrap.dedent(
    """
    def fetch(ids):
        if method == "download_state_dict":
            with SidecarClient(target) as client:
                return client.download_state_dict(ids["model_id"])
        if method == "download_module":
            with SidecarClient(target) as client:
                return client.download_module(ids["model_id"])
        with communication(ids) as com:
            return com.download_model()

    kept = fetch(small)
    baseline = peak_mib()
    kept = fetch(big)
    tensors = kept if isinstance(kept, dict) else kept.state_dict()
    print(json.dumps({"growth_mib": peak_mib() - baseline, "model_mib": model_mib(tensors)}))
    """
)

UPLOADER = PRELUDE + textwrap.dedent(
    """
    layers, width = int(sys.argv[7]), int(sys.argv[8])
    module = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    torch.save(torch.nn.Linear(2, 2), io.BytesIO())  # lazy imports into the baseline
    with SidecarClient(target) as client, communication(big) as com:
        client.get_training(big["training_id"])
        baseline = peak_mib()
        if method == "upload_state_dict":
            reply = client.upload_state_dict(
                big["model_id"], module.state_dict(), round=0, sample_size=4
            )
            ok = reply.http_status == 201
        elif method == "upload_module":
            reply = client.upload_module(big["model_id"], module, round=0, sample_size=4)
            ok = reply.http_status == 201
        else:
            ok = com.upload_model(module, {"accuracy": 0.5}, 4)
    growth = peak_mib() - baseline
    print(json.dumps({"growth_mib": growth, "model_mib": model_mib(module.state_dict()), "ok": ok}))
    """
)


def module_bytes(layers: int, width: int) -> bytes:
    torch.manual_seed(0)
    module = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(layers)))
    buf = io.BytesIO()
    torch.save(module, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def side(stack: TrainerStack) -> ClientSide:
    return stack.add_client()


@pytest.fixture(scope="module")
def big_model() -> bytes:
    return module_bytes(LAYERS, WIDTH)


@pytest.fixture(scope="module")
def small_training(stack: TrainerStack, side: ClientSide) -> Dict[str, str]:
    return stack.training([side], rounds=1, model=module_bytes(1, 4), start=True)


@pytest.fixture
def big_training(
    stack: TrainerStack, side: ClientSide, big_model: bytes
) -> Iterator[Dict[str, str]]:
    yield stack.training([side], rounds=1, model=big_model, start=True)


def run_trainer(
    script: str,
    method: str,
    side: ClientSide,
    small: Dict[str, str],
    big: Dict[str, str],
    *extra: str,
) -> Dict[str, float]:
    """Runs ``script`` as a fresh trainer process; the JSON dict it printed last."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            script,
            side.sidecar.target,
            method,
            side.user.username,
            side.user.password,
            json.dumps(small),
            json.dumps(big),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    measured: Dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["model_mib"] == pytest.approx(MODEL_MIB)
    print(f"{method}: peak growth {measured['growth_mib']:.1f} MiB for {MODEL_MIB:.1f} MiB")
    return measured


@pytest.mark.parametrize("method", ["download_state_dict", "download_module", "download_model"])
def test_a_download_grows_the_trainer_by_about_the_tensors(
    side: ClientSide, small_training: Dict[str, str], big_training: Dict[str, str], method: str
) -> None:
    measured = run_trainer(DOWNLOADER, method, side, small_training, big_training)
    assert measured["growth_mib"] < DOWNLOAD_BOUND * MODEL_MIB, measured


@pytest.mark.parametrize("method", ["upload_state_dict", "upload_module", "upload_model"])
def test_an_upload_holds_no_copy_of_the_model_file(
    side: ClientSide, small_training: Dict[str, str], big_training: Dict[str, str], method: str
) -> None:
    measured = run_trainer(
        UPLOADER, method, side, small_training, big_training, str(LAYERS), str(WIDTH)
    )
    assert measured["ok"], measured
    assert measured["growth_mib"] < UPLOAD_BOUND * MODEL_MIB, measured
