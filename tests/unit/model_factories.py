"""Models and state dicts shared by the model I/O tests (test_models*, test_archive)."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Tuple

import torch


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
