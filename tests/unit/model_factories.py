"""Models, state dicts and archives shared by the model file tests (test_modelfiles_*)."""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch


class Net(torch.nn.Module):
    """A small model with parameters, persistent and non-persistent buffers, and no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)
        self.fc2 = torch.nn.Linear(3, 2, bias=False)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])
        self.register_buffer("scratch", torch.ones(2), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc2(self.bn(self.fc1(x)))
        for layer in self.layers:
            x = layer(x)
        scratch = self.scratch
        assert isinstance(scratch, torch.Tensor)
        return x + scratch


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, to compare dtypes that torch.equal does not support."""
    return t.contiguous().reshape(-1).view(torch.uint8)


class Tied(torch.nn.Module):
    """Embedding and output projection share one weight (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.proj = torch.nn.Linear(3, 3)
        self.head = torch.nn.Linear(3, 5, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.proj(self.emb(x)))
        return out


class Evil:
    """Runs a shell command when unpickled by a plain unpickler."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> Tuple[Callable[..., Any], Tuple[str]]:
        return (os.system, (self.command,))


class EvilModule(torch.nn.Module):
    """A real module that carries a code-running attribute."""

    def __init__(self, command: str) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)
        self.payload = Evil(command)


def changed(state: Dict[str, torch.Tensor], seed: int = 1) -> Dict[str, torch.Tensor]:
    """New values, same names/shapes/dtypes; tensors that share memory get the same value."""
    gen = torch.Generator().manual_seed(seed)
    out: Dict[str, torch.Tensor] = {}
    seen: Dict[Tuple[int, Tuple[int, ...]], torch.Tensor] = {}
    for name, value in state.items():
        key = (value.untyped_storage().data_ptr() if value.numel() else -id(value), value.shape)
        if key not in seen:
            if value.is_floating_point():
                seen[key] = torch.randn(value.shape, generator=gen).to(value.dtype)
            else:
                seen[key] = torch.randint(0, 100, value.shape, generator=gen).to(value.dtype)
        out[name] = seen[key]
    return out


def archive_with_pickle(pkl: bytes, extra: Optional[Dict[str, bytes]] = None) -> bytes:
    """A torch-style zip archive (torch's own writer) whose data.pkl is ``pkl``, plus ``extra``."""
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    writer.write_record("data.pkl", pkl, len(pkl))
    for name, data in (extra or {}).items():
        writer.write_record(name, data, len(data))
    writer.write_record("byteorder", b"little", 6)
    writer.write_end_of_file()
    return out.getvalue()
