"""The held global models behind SAFETENSORS uploads and downloads: one fetch per round.

The FL server client is replaced by a recorder that writes a file (unit level: the
integration tests drive the same code through the real sidecar and dev server).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

from fl_sidecar.errors import ServerUnavailableError
from fl_sidecar.server_api import TransferResult
from fl_sidecar.sidecar.templates import TEMPLATE_CACHE_SIZE, ModelFacts
from fl_sidecar.sidecar.transfers import TransferManager
from fl_sidecar.wire import FORMAT_TORCH


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


def _manager_with_rounds(
    tmp_path: Path, rounds: Dict[str, int]
) -> Tuple[TransferManager, RecordingClient]:
    client = RecordingClient()
    transfers = TransferManager(
        client,  # type: ignore[arg-type]
        spool_dir=str(tmp_path),
        max_model_size=1 << 20,
        trust_pickles=True,  # the recorder's bodies are no archives: nothing to vet
        model_round=rounds.get,
    )
    return transfers, client


def _download(transfers: TransferManager, model_id: str) -> bytes:
    model = transfers.download(model_id, FORMAT_TORCH)
    try:
        return model.path.read_bytes()
    finally:
        model.discard()


def test_a_download_of_a_known_round_is_held_for_its_uploads_and_downloads(
    tmp_path: Path,
) -> None:
    rounds = {"m": 0}
    transfers, client = _manager_with_rounds(tmp_path, rounds)
    try:
        assert _download(transfers, "m") == b"m"
        # The upload's template and a second download of round 0: no second GET.
        template = transfers.templates.acquire(("m", 0), None)
        assert template.path.read_bytes() == b"m"
        transfers.templates.release(("m", 0), template)
        assert _download(transfers, "m") == b"m"
        assert client.fetches == ["m"]
        # The server aggregated: the same id now names round 1's bytes.
        rounds["m"] = 1
        assert _download(transfers, "m") == b"m"
        assert client.fetches == ["m", "m"]
        template = transfers.templates.acquire(("m", 1), None)
        transfers.templates.release(("m", 1), template)
        assert client.fetches == ["m", "m"]
        # Discarding the served copies left the held archives alone, and only those.
        models = [p for p in transfers.spool_dir.iterdir() if p.name.endswith(".pt")]
        assert len(models) == 2
        assert all(p.name.endswith(".template.pt") for p in models)
    finally:
        transfers.close()


def test_a_download_of_an_unknown_round_is_fetched_every_time_and_not_held(
    tmp_path: Path,
) -> None:
    transfers, client = _manager_with_rounds(tmp_path, {})
    try:
        assert _download(transfers, "m") == b"m"
        assert _download(transfers, "m") == b"m"
        assert client.fetches == ["m", "m"]
        assert not [p for p in transfers.spool_dir.iterdir() if p.name.endswith(".pt")]
    finally:
        transfers.close()


def test_a_download_during_which_the_round_moved_on_is_not_held(tmp_path: Path) -> None:
    rounds = {"m": 0}
    transfers, client = _manager_with_rounds(tmp_path, rounds)
    fetch = client.download_model

    def fetch_then_aggregate(model_id: str, dest: Path, **kwargs: Any) -> TransferResult:
        result = fetch(model_id, dest, **kwargs)
        rounds["m"] = 1  # the next round's notification came while the bytes arrived
        return result

    client.download_model = fetch_then_aggregate  # type: ignore[method-assign]
    try:
        assert _download(transfers, "m") == b"m"
        assert transfers.templates.lookup(("m", 0)) is None
        assert transfers.templates.lookup(("m", 1)) is None
    finally:
        transfers.close()


def test_adopt_keeps_lru_bounds_and_never_replaces_a_held_round(tmp_path: Path) -> None:
    transfers, _client = _manager_with_rounds(tmp_path, {})
    facts = ModelFacts(1, "0" * 64, "identity", 1)
    try:
        sources = []
        for i in range(TEMPLATE_CACHE_SIZE + 1):
            source = tmp_path / f"download{i}"
            source.write_bytes(f"m{i}".encode())
            sources.append(source)
            assert transfers.templates.adopt((f"m{i}", 0), source, facts)
            source.unlink()  # the download's own name goes; the held one stays
        assert transfers.templates.lookup(("m0", 0)) is None  # least recently used: gone
        newest = transfers.templates.lookup((f"m{TEMPLATE_CACHE_SIZE}", 0))
        assert newest is not None
        assert newest.path.read_bytes() == f"m{TEMPLATE_CACHE_SIZE}".encode()
        other = tmp_path / "other"
        other.write_bytes(b"other")
        assert not transfers.templates.adopt((f"m{TEMPLATE_CACHE_SIZE}", 0), other, facts)
        assert newest.path.read_bytes() == f"m{TEMPLATE_CACHE_SIZE}".encode()
        transfers.templates.release((f"m{TEMPLATE_CACHE_SIZE}", 0), newest)
    finally:
        transfers.close()
