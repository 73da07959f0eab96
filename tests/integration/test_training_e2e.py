"""A full federated training through sidecars: dev server + two sidecar subprocesses + trainers.

The trainers are Python threads using :class:`SidecarClient` and ``WatchEvents``
over the sidecars' unix sockets; one moves weights as SAFETENSORS, the other
as a TORCH module. The final global model must be the sample-size-weighted
mean of the last round's uploads.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any, Dict, List, Optional, Tuple

import pytest
from trainer_stack import ClientSide, TrainerStack, tiny_module

from fl_sidecar.events import EventKind

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow

EVENT_TIMEOUT = 60.0


class Trainer(threading.Thread):
    """Follows one sidecar's events: trains (a deterministic weight shift), tests, finishes."""

    def __init__(
        self,
        side: ClientSide,
        training_id: str,
        *,
        fmt: str,
        sample_size: int,
        shift: float,
    ) -> None:
        super().__init__(daemon=True)
        self.side = side
        self.training_id = training_id
        self.fmt = fmt
        self.sample_size = sample_size
        self.shift = shift
        self.ready = threading.Event()
        self.uploads: Dict[int, Dict[str, Any]] = {}
        self.seen: List[Tuple[EventKind, Optional[int]]] = []
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self._follow()
        except BaseException as exc:
            self.error = exc
            self.ready.set()

    def _follow(self) -> None:
        client = self.side.client
        with client.watch_events(training_ids=[self.training_id]) as events:
            self.ready.set()
            while True:
                event = events.get(timeout=EVENT_TIMEOUT)
                self.seen.append((event.kind, event.round))
                model_id = event.model_id or ""
                if event.kind is EventKind.UPDATE_ROUND_START:
                    assert event.round is not None
                    weights = client.download_state_dict(model_id)
                    new = {k: v + self.shift * (event.round + 1) for k, v in weights.items()}
                    if self.fmt == "safetensors":
                        result = client.upload_state_dict(
                            model_id,
                            new,
                            round=event.round,
                            sample_size=self.sample_size,
                            metrics={"accuracy": 0.5},
                        )
                    else:
                        module = tiny_module()
                        module.load_state_dict(new)
                        result = client.upload_module(
                            model_id,
                            module,
                            round=event.round,
                            sample_size=self.sample_size,
                            metrics={"accuracy": 0.5},
                        )
                    assert result.http_status == 201, result
                    self.uploads[event.round] = new
                elif event.kind is EventKind.MODEL_TEST_ROUND:
                    client.upload_metrics(model_id, {"accuracy": 0.75})
                elif event.kind is EventKind.TRAINING_FINISHED:
                    return


@pytest.mark.parametrize("quirks", [False, True], ids=["plain", "notification-quirks"])
def test_two_clients_train_through_watch_events(
    request: pytest.FixtureRequest, quirks: bool
) -> None:
    # With quirks the dev server repeats round starts and tests and sends the
    # training start late, as the real server does: each must arrive once.
    stack: TrainerStack = request.getfixturevalue("quirky_stack" if quirks else "stack")
    alice = stack.add_client()
    bob = stack.add_client()
    ids = stack.training([alice, bob], rounds=2)
    trainers = [
        Trainer(alice, ids["training_id"], fmt="safetensors", sample_size=30, shift=0.25),
        Trainer(bob, ids["training_id"], fmt="torch", sample_size=10, shift=-0.5),
    ]
    for trainer in trainers:
        trainer.start()
        assert trainer.ready.wait(30), "trainer did not subscribe"
    stack.devserver.start_training(stack.actor, ids["training_id"])
    for trainer in trainers:
        trainer.join(timeout=120)
        assert not trainer.is_alive(), "training stalled:\n" + stack.logs()
        assert trainer.error is None, f"{trainer.error!r}\n{stack.logs()}"

    expected_events = [
        (EventKind.UPDATE_ROUND_START, 0),
        (EventKind.MODEL_TEST_ROUND, 1),
        (EventKind.UPDATE_ROUND_START, 1),
        (EventKind.MODEL_TEST_ROUND, 2),
        (EventKind.TRAINING_FINISHED, None),
    ]
    for trainer in trainers:
        rounds = [e for e in trainer.seen if e[0] is not EventKind.TRAINING_START]
        assert rounds == expected_events
        assert sorted(trainer.uploads) == [0, 1]

    state = stack.devserver.training(stack.actor, ids["training_id"])
    assert state["state"] == "C"

    final = alice.client.download_state_dict(ids["model_id"])
    a, b = trainers[0].uploads[1], trainers[1].uploads[1]
    assert set(final) == set(a)
    for name, tensor in final.items():
        expected = (a[name] * 30 + b[name] * 10) / 40
        assert torch.allclose(tensor, expected, atol=1e-6), name
    # The module path (TORCH) yields the same weights as the SAFETENSORS path.
    module = bob.client.download_module(ids["model_id"])
    for name, tensor in module.state_dict().items():
        assert torch.equal(tensor, final[name])


def test_upload_for_a_round_the_training_is_not_in_is_refused(stack: TrainerStack) -> None:
    side = stack.clients[0] if stack.clients else stack.add_client()
    ids = stack.training([side], rounds=1, start=True)
    weights = side.client.download_state_dict(ids["model_id"])
    from fl_sidecar.errors import SidecarError

    with pytest.raises(SidecarError) as info:
        side.client.upload_state_dict(ids["model_id"], weights, round=5, sample_size=1)
    assert info.value.code == "FAILED_PRECONDITION"
    # Nothing was counted: the training still waits for this client's round-0 model.
    state = stack.devserver.training(stack.actor, ids["training_id"])
    assert state["state"] == "O"


def _run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fl_sidecar", "demo", *args],
        capture_output=True,
        text=True,
        timeout=170,
    )


def test_demo_runs_a_federated_training() -> None:
    done = _run_demo("--rounds", "2", "--clients", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    table = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[0] for row in table] == ["0", "1"]
    accuracy = [float(row[-1].rstrip("%")) for row in table]
    initial = next(line for line in lines if line.strip().startswith("init"))
    assert accuracy[-1] > float(initial.split()[-1].rstrip("%"))
    assert "completed" in done.stdout
    # It cleaned up: the directory that held the sidecars' sockets and logs is gone.
    socket_line = next(line for line in lines if line.startswith("sidecar 0"))
    socket_path = socket_line.split()[2].replace("unix:", "", 1)
    assert socket_path.endswith(".sock")
    assert not os.path.exists(os.path.dirname(socket_path))


def test_demo_fails_when_the_training_stalls() -> None:
    done = _run_demo("--rounds", "1", "--timeout", "0.01")
    assert done.returncode == 1
    assert "stalled" in done.stdout
