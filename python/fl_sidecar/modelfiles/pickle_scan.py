"""The opcode pre-scan: a pickle's budgets enforced before the unpickler sees a byte.

:func:`scan_pickle` walks the opcodes once and enforces what the C unpickler itself has
no way to: the number of opcodes (its memory), memo indices (``LONG_BINPUT 2**31`` would
make it allocate a 16 GiB memo table), open MARKs and stack size, and how deeply tuples
nest (hashing a tuple nested a million deep, as a dict key does, overflows the C stack
and kills the process).
"""

from __future__ import annotations

import pickletools
from typing import Dict, List, Optional

from fl_sidecar.errors import ModelFormatError, ModelLimitExceededError, ModelReadCancelledError
from fl_sidecar.modelfiles.limits import (
    DEFAULT_LIMITS,
    STOP_CHECK_INTERVAL,
    ReadLimits,
    StopCheck,
    check_stop,
)

__all__ = ["PickleStats", "scan_pickle"]

_TUPLE_OPS = frozenset({"EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "FROZENSET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_KEEP_FIRST_OPS = frozenset({"APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS", "BUILD"})
# Opcodes that make a container or an object (strings and numbers are bounded by bytes).
_OBJECT_OPS = frozenset(
    {
        "EMPTY_LIST",
        "LIST",
        "EMPTY_DICT",
        "DICT",
        "EMPTY_SET",
        "FROZENSET",
        "TUPLE",
        "TUPLE1",
        "TUPLE2",
        "TUPLE3",
        "REDUCE",
        "NEWOBJ",
        "NEWOBJ_EX",
        "OBJ",
        "INST",
    }
)


class PickleStats:
    """What :func:`scan_pickle` counted: for tests and for messages.

    Attributes:
        opcodes: opcodes up to and including STOP.
        objects: containers and objects built (see :attr:`ReadLimits.max_pickle_objects`).
        max_marks: the most MARKs open at once.
        max_stack: the most objects on the stack at once.
        max_tuple_depth: the deepest tuple nesting built.
        storages: persistent ids (storage references) met.
    """

    __slots__ = ("max_marks", "max_stack", "max_tuple_depth", "objects", "opcodes", "storages")

    def __init__(self) -> None:
        self.opcodes = 0
        self.objects = 0
        self.max_marks = 0
        self.max_stack = 0
        self.max_tuple_depth = 0
        self.storages = 0


def _limit(what: str, limit: int) -> ModelLimitExceededError:
    return ModelLimitExceededError(
        f"the model's pickle exceeds the reader's limit of {limit} {what}"
    )


def scan_pickle(
    data: bytes, limits: ReadLimits = DEFAULT_LIMITS, should_stop: Optional[StopCheck] = None
) -> PickleStats:
    """Walks a pickle's opcodes once, without building anything, and enforces ``limits``.

    Simulates the unpickler's stack with one number per object (how deeply tuples nest
    in it), so that what the C unpickler would do unbounded is refused first: more than
    ``max_pickle_opcodes`` opcodes or ``max_pickle_objects`` containers and objects, a
    memo index beyond the opcode count (the C unpickler sizes its memo table by the
    largest index), more than ``max_marks`` open MARKs or ``max_stack`` objects, tuples
    nested deeper than ``max_depth``, more than ``max_tensors`` storage references.
    Lengths that run past the data (a BINUNICODE8 claiming 2**63 bytes) are malformed.

    Returns:
        the counts, for tests and messages.

    Raises:
        ModelLimitExceededError: a limit is exceeded.
        ModelFormatError: the opcodes are malformed (unknown, truncated, a stack
            underflow, a memo index never stored).
        ModelReadCancelledError: ``should_stop`` returned True (checked every few
            thousand opcodes).
    """
    stats = PickleStats()
    stack: List[int] = []  # per object: how deeply tuples nest in it
    marks: List[int] = []  # stack heights at each open MARK
    memo: Dict[int, int] = {}
    # The C unpickler grows its memo table to twice the largest index it stores.
    max_memo_index = min(len(data), limits.max_pickle_opcodes)
    ops = pickletools.genops(data)
    count = 0
    try:
        for op, arg, _pos in ops:
            count += 1
            if count > limits.max_pickle_opcodes:
                raise _limit("opcodes", limits.max_pickle_opcodes)
            if count % STOP_CHECK_INTERVAL == 0:
                check_stop(should_stop)
            name = op.name
            fence = marks[-1] if marks else 0
            if name in _PUT_OPS:
                if len(stack) <= fence:
                    raise ModelFormatError("the pickle memoizes from an empty stack")
                if not isinstance(arg, int) or arg < 0 or arg > max_memo_index:
                    raise ModelLimitExceededError(
                        f"the model's pickle stores memo entry {arg}, beyond the reader's"
                        f" limit of {max_memo_index} (its opcode count)"
                    )
                memo[arg] = stack[-1]
                continue
            if name == "MEMOIZE":
                if len(stack) <= fence:
                    raise ModelFormatError("the pickle memoizes from an empty stack")
                memo[len(memo)] = stack[-1]
                continue
            if name in _GET_OPS:
                if arg not in memo:
                    raise ModelFormatError(f"the pickle reads memo entry {arg}, never stored")
                stack.append(memo[arg])
            elif name == "MARK":
                marks.append(len(stack))
                if len(marks) > limits.max_marks:
                    raise _limit("open MARKs", limits.max_marks)
                stats.max_marks = max(stats.max_marks, len(marks))
            elif name == "POP":
                if len(stack) > fence:
                    stack.pop()
                elif marks:
                    marks.pop()
                else:
                    raise ModelFormatError("the pickle pops from an empty stack")
            else:
                if name in _OBJECT_OPS:
                    stats.objects += 1
                    if stats.objects > limits.max_pickle_objects:
                        raise _limit("containers and objects", limits.max_pickle_objects)
                consumed = _pop_operands(op, stack, marks)
                if name in ("PERSID", "BINPERSID"):
                    stats.storages += 1
                    if stats.storages > limits.max_tensors:
                        raise _limit("storage references", limits.max_tensors)
                pushed = _pushed_depth(name, consumed)
                if pushed > limits.max_depth:
                    raise _limit("levels of nested tuples", limits.max_depth)
                stats.max_tuple_depth = max(stats.max_tuple_depth, pushed)
                stack.extend([pushed] * len(op.stack_after))
            if len(stack) > limits.max_stack:
                raise _limit("objects on the unpickler's stack", limits.max_stack)
            stats.max_stack = max(stats.max_stack, len(stack))
            if name == "STOP":
                break
        else:
            raise ModelFormatError("the archive's pickle is malformed: it has no STOP")
    except (ModelFormatError, ModelReadCancelledError):
        raise
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        # pickletools' errors for unknown opcodes and arguments that run past the data.
        raise ModelFormatError(f"the archive's pickle is malformed: {exc}") from exc
    stats.opcodes = count
    return stats


def _pop_operands(op: pickletools.OpcodeInfo, stack: List[int], marks: List[int]) -> List[int]:
    """Pops what ``op`` consumes, as the C unpickler would; returns the popped depths."""
    before = op.stack_before
    if pickletools.markobject in before:
        if not marks:
            raise ModelFormatError(f"the pickle's {op.name} has no MARK")
        below = before.index(pickletools.markobject)
        start = marks.pop()
        consumed = stack[start:]
        del stack[start:]
        if op.name == "OBJ" and not consumed:
            raise ModelFormatError("the pickle's OBJ has no class")
    else:
        below = len(before)
        consumed = []
    fence = marks[-1] if marks else 0
    if len(stack) - below < fence:
        raise ModelFormatError(f"the pickle's {op.name} underflows the stack")
    if below:
        consumed = stack[-below:] + consumed
        del stack[-below:]
    return consumed


def _pushed_depth(name: str, consumed: List[int]) -> int:
    """How deeply tuples nest in what an opcode pushes, from what it consumed."""
    if name in _TUPLE_OPS:
        return 1 + max(consumed, default=0)
    if name == "DUP" or name in _KEEP_FIRST_OPS:
        return consumed[0]
    if name == "REDUCE":
        # A call returns at most its arguments' items (restore_type_tag returns one).
        return max(consumed[1] - 1, 0)
    return 0
