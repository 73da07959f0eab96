"""The template cache behind SAFETENSORS uploads: one fetch per round, pinned while read.

The FL server client is replaced by a recorder that writes a file (unit level: the
integration tests drive the same code through the real sidecar and dev server).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

from fl_sidecar.errors import ServerUnavailableError
from fl_sidecar.server_api import TransferResult
from fl_sidecar.sidecar.templates import TEMPLATE_CACHE_SIZE
from fl_sidecar.sidecar.transfers import TransferManager


class RecordingClient:
    """Writes ``model_id`` into the destination; can fail or stall on demand."""

    def __init__(self) -> None:
        self.fetches: List[str] = []
        self.fail_next = False
        # model id -> an event its fetch waits for; the fetch of another model sets it.
        self.gates: Dict[str, threading.Event] = {}
        self.opens: Dict[str, str] = {}
        self.gate_timed_out = False

    def download_model(self, model_id: str, dest: Path, **_kwargs: Any) -> TransferResult:
        self.fetches.append(model_id)
        if model_id in self.gates:
            self.gate_timed_out |= not self.gates[model_id].wait(5)
        if model_id in self.opens:
            self.gates[self.opens[model_id]].set()
        if self.fail_next:
            self.fail_next = False
            Path(dest).write_bytes(b"half")
            raise ServerUnavailableError("the server stalled")
        Path(dest).write_bytes(model_id.encode())
        return TransferResult(200, "", len(model_id), len(model_id), "identity", 0.0, "", {})


@pytest.fixture()
def manager(tmp_path: Path) -> Any:
    client = RecordingClient()
    manager = TransferManager(
        client,  # type: ignore[arg-type]
        spool_dir=str(tmp_path),
        max_model_size=1 << 20,
    )
    yield manager, client
    manager.close()


def test_one_fetch_per_round_and_lru_eviction_spares_templates_in_use(manager: Any) -> None:
    transfers, client = manager
    held = [transfers.templates.acquire((f"m{i}", 0), None) for i in range(TEMPLATE_CACHE_SIZE + 2)]
    # All are being read: none may be removed, whatever the cache size.
    assert all(t.path.read_bytes() == f"m{i}".encode() for i, t in enumerate(held))
    again = transfers.templates.acquire(("m0", 0), None)
    assert again is held[0]
    assert client.fetches == [f"m{i}" for i in range(TEMPLATE_CACHE_SIZE + 2)]
    # Use order now: m1, m2, m3, m0. Released templates over the limit go, least
    # recently used first; m0 stays pinned by 'again' throughout.
    for i, template in enumerate(held):
        transfers.templates.release((f"m{i}", 0), template)
        assert held[0].path.exists()
    transfers.templates.release(("m0", 0), again)
    alive = [f"m{i}" for i, t in enumerate(held) if t.path.exists()]
    assert len(alive) == TEMPLATE_CACHE_SIZE
    assert alive == ["m0", "m3"]
    # A cached template is not fetched again.
    transfers.templates.release(("m3", 0), transfers.templates.acquire(("m3", 0), None))
    assert client.fetches.count("m3") == 1


def test_a_failed_fetch_is_retried_and_leaves_no_file(manager: Any, tmp_path: Path) -> None:
    transfers, client = manager
    client.fail_next = True
    with pytest.raises(ServerUnavailableError):
        transfers.templates.acquire(("m", 3), None)
    assert not any(p.name.endswith(".template.pt") for p in transfers.spool_dir.iterdir())
    template = transfers.templates.acquire(("m", 3), None)
    assert template.path.read_bytes() == b"m"
    assert client.fetches == ["m", "m"]
    transfers.templates.release(("m", 3), template)


def test_concurrent_callers_share_one_fetch_and_other_rounds_do_not_wait(manager: Any) -> None:
    transfers, client = manager
    # The fetch of "m" can only finish once "other" has been fetched: a cache that
    # fetched one template at a time would stall here.
    client.gates["m"] = threading.Event()
    client.opens["other"] = "m"
    got: List[Any] = [None] * 4
    keys = [("m", 1), ("m", 1), ("m", 1), ("other", 1)]

    def take(index: int) -> None:
        got[index] = transfers.templates.acquire(keys[index], None)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for thread in threads[:3]:
        thread.start()
    while not client.fetches:  # "m" is being fetched
        time.sleep(0.001)
    threads[3].start()
    for thread in threads:
        thread.join(10)
    assert not client.gate_timed_out
    first = got[0]
    assert first is not None
    assert first is got[1] is got[2]
    assert first.path.read_bytes() == b"m"
    assert sorted(client.fetches) == ["m", "other"]
    for key, template in zip(keys, got):
        transfers.templates.release(key, template)
