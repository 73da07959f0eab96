"""Budgets on reading one model's pickle and tensors, and the caller's cancellation check."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from fl_sidecar.errors import ModelReadCancelledError

__all__ = ["DEFAULT_LIMITS", "STOP_CHECK_INTERVAL", "ReadLimits", "StopCheck", "check_stop"]

#: A caller's cancellation check: returns True when the work should stop.
StopCheck = Callable[[], bool]


@dataclass(frozen=True)
class ReadLimits:
    """Budgets on the work and memory of reading one model's pickle; units in each name.

    The defaults are far above what real models need (a 1 GiB transformer's pickle
    has tens of thousands of opcodes, nests about a dozen levels, and names hundreds
    of tensors) and far below what exhausts the machine.

    Attributes:
        max_pickle_opcodes: opcodes in ``data.pkl``; bounds the unpickler's work.
        max_pickle_objects: containers and objects the pickle builds (lists, dicts, sets,
            tuples, instances, call results); bounds the unpickler's memory (an empty
            set is 216 bytes from one opcode).
        max_depth: nesting of modules and containers the tensor walk follows, and of
            tuples in the pickle (hashing a tuple recurses in C).
        max_marks: MARKs open at once in the pickle.
        max_stack: objects on the unpickler's stack at once.
        max_tensors: storages the pickle refers to, and named tensors found.
        max_walk_steps: the tensor walk's work: one step per object visited and per
            tensor name produced at each level, plus one per 64 characters of that name
            (a shared sub-object is walked once; its names are reused).
    """

    max_pickle_opcodes: int = 2_000_000
    max_pickle_objects: int = 500_000
    max_depth: int = 200
    max_marks: int = 1_000
    max_stack: int = 1_000_000
    max_tensors: int = 300_000
    max_walk_steps: int = 20_000_000


DEFAULT_LIMITS = ReadLimits()
"""The limits every reader uses unless given others."""

# How many units of work pass between two calls of a caller's stop check.
STOP_CHECK_INTERVAL = 4096


def check_stop(should_stop: Optional[StopCheck]) -> None:
    """Raises ModelReadCancelledError when ``should_stop`` says so (None: never)."""
    if should_stop is not None and should_stop():
        raise ModelReadCancelledError("reading the model was cancelled")
