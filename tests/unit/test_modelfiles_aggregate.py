"""FedAvg: weighted averages of state_dicts, and of archive files one tensor at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import pytest
import torch
from model_factories import Net, Tied, raw_bytes

from fl_sidecar.errors import ModelFormatError, TensorMismatchError
from fl_sidecar.modelfiles import aggregate, torch_io


def test_weighted_average_is_fedavg() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10), "h": torch.tensor([1.0]).bfloat16()}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(20), "h": torch.tensor([3.0]).bfloat16()}
    avg = aggregate.weighted_average([a, b], [1, 3])
    assert torch.equal(avg["w"], torch.tensor([2.5, 5.0]))
    assert avg["n"].dtype == torch.int64 and int(avg["n"]) == 18  # 17.5 rounds to even
    assert avg["h"].dtype == torch.bfloat16 and float(avg["h"]) == 2.5
    assert list(avg) == ["w", "n", "h"]


def test_weighted_average_accumulates_in_float64() -> None:
    gen = torch.Generator().manual_seed(3)
    dicts = [{"w": torch.randn(1000, generator=gen)} for _ in range(7)]
    weights = [13, 1, 700, 2, 9, 40, 5]
    avg = aggregate.weighted_average(dicts, weights)["w"]
    exact = sum(d["w"].double() * w for d, w in zip(dicts, weights)) / sum(weights)
    assert isinstance(exact, torch.Tensor)
    assert torch.equal(avg, exact.float())


def test_weighted_average_refuses_bad_input() -> None:
    a = {"w": torch.ones(2)}
    cases: List[Tuple[List[Dict[str, torch.Tensor]], Sequence[float]]] = [
        ([], []),
        ([a], [1, 2]),
        ([a, a], [1, -1]),
        ([a, a], [0, 0]),
        ([a, a], [1, float("nan")]),
        ([a, {"w": torch.ones(3)}], [1, 1]),
        ([a, {"v": torch.ones(2)}], [1, 1]),
        ([a, {"w": torch.ones(2, dtype=torch.float64)}], [1, 1]),
    ]
    for sds, weights in cases:
        with pytest.raises(TensorMismatchError):
            aggregate.weighted_average(sds, weights)


@pytest.mark.parametrize("kind", ["module", "tied", "torchscript"])
def test_average_archives_equals_reading_averaging_and_writing(kind: str, tmp_path: Path) -> None:
    def make() -> torch.nn.Module:
        return Tied() if kind == "tied" else Net()

    template = tmp_path / "global.pt"
    base = make()
    if kind == "torchscript":
        torch_io.save_module(torch.jit.script(base), template)
    else:
        torch_io.save_module(base, template)
    sources, states = [], []
    for i in range(3):
        trained = make()
        with torch.no_grad():  # different weights and integer buffers per client
            for tensor in trained.state_dict().values():
                tensor.add_(
                    torch.randint_like(tensor, 0, 9)
                    if not tensor.is_floating_point()
                    else torch.randn_like(tensor)
                )
        path = tmp_path / f"client{i}.pt"
        torch_io.save_module(torch.jit.script(trained) if kind == "torchscript" else trained, path)
        sources.append(path)
        states.append(torch_io.read_tensors(path))
    weights = [30, 10, 5]
    streamed = tmp_path / "streamed.pt"
    aggregate.average_archives(template, sources, weights, streamed)
    whole = tmp_path / "whole.pt"
    torch_io.write_tensors(template, aggregate.weighted_average(states, weights), whole)
    got, want = torch_io.read_tensors(streamed), torch_io.read_tensors(whole)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype
        assert torch.equal(raw_bytes(got[name]), raw_bytes(want[name])), name
    # It is still the template's module type, with the new weights.
    loaded: Any = torch_io.load_trusted(streamed)
    if kind == "torchscript":
        assert isinstance(loaded, torch.jit.ScriptModule)
    else:
        assert type(loaded) is type(base)
    for name, tensor in loaded.state_dict().items():
        if name in want:
            assert torch.equal(tensor, want[name]), name


def test_average_archives_refuses_mismatches_and_writes_nothing(tmp_path: Path) -> None:
    template = tmp_path / "global.pt"
    torch_io.save_module(Net(), template)
    good = tmp_path / "good.pt"
    torch_io.save_module(Net(), good)
    other = tmp_path / "other.pt"
    torch_io.save_module(torch.nn.Linear(4, 3), other)
    dest = tmp_path / "out.pt"
    cases: List[Tuple[List[Path], List[float]]] = [
        ([], []),
        ([good, other], [1, 1]),
        ([good], [1, 2]),
        ([good, good], [0, 0]),
        ([good], [float("inf")]),
    ]
    for sources, weights in cases:
        with pytest.raises(TensorMismatchError):
            aggregate.average_archives(template, sources, weights, dest)
        assert not dest.exists()
    not_torch = tmp_path / "not.pt"
    not_torch.write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ModelFormatError):
        aggregate.average_archives(template, [good, not_torch], [1, 1], dest)
    assert not dest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["global.pt", "good.pt", "other.pt", "not.pt"]
    )
