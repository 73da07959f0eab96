"""Naming a torch archive's tensors as ``state_dict()`` would, from its restricted pickle.

The walk goes through modules (own parameters, persistent buffers, children), plain
containers and TorchScript objects (whose class code, parsed as text and never run,
says which attributes are parameters and buffers), under the budgets of
:class:`~fl_sidecar.modelfiles.limits.ReadLimits`.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Protocol, Tuple

from fl_sidecar.errors import ModelFormatError, ModelLimitExceededError
from fl_sidecar.modelfiles.dtypes import dtype_facts
from fl_sidecar.modelfiles.limits import STOP_CHECK_INTERVAL, ReadLimits, StopCheck, check_stop
from fl_sidecar.modelfiles.pickle_objects import Placeholder, TensorRef

_CLASS_LINE = re.compile(r"^class (\w+)\((\w*)\):[ \t]*$", re.MULTILINE)
_NAME_LIST = re.compile(r"^[ \t]+(__parameters__|__buffers__) = \[([^\]\n]*)\]", re.MULTILINE)
_QUOTED = re.compile(r"\"([^\"\n]*)\"")


ScriptClass = Tuple[List[str], List[str], bool]  # parameters, buffers, is_module


class WalkedArchive(Protocol):
    """What the walk needs of an opened archive (a ``TorchArchive``)."""

    root: Any  # the pickle's root object, as the restricted reader rebuilt it
    limits: ReadLimits
    should_stop: Optional[StopCheck]
    script_classes: Dict[str, Dict[str, ScriptClass]]  # by code module, filled by the walk
    walk_steps: int  # set by the walk: how much work naming the tensors took

    def code(self, module: str) -> Optional[str]:
        """The TorchScript source of a ``__torch__`` module, or None."""
        ...


def _parse_script_classes(text: str) -> Dict[str, ScriptClass]:
    """Every class of a TorchScript code file, parsed once (text, never run).

    The first definition of a name wins, as a reader scanning for it would find.
    """
    classes: Dict[str, ScriptClass] = {}
    matches = list(_CLASS_LINE.finditer(text))
    for i, match in enumerate(matches):
        if match.group(1) in classes:
            continue
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[match.end() : end]
        lists: Dict[str, List[str]] = {"__parameters__": [], "__buffers__": []}
        for found in _NAME_LIST.finditer(body):
            lists[found.group(1)] = _QUOTED.findall(found.group(2))
        classes[match.group(1)] = (
            lists["__parameters__"],
            lists["__buffers__"],
            match.group(2) == "Module",
        )
    return classes


def _script_class(archive: WalkedArchive, obj: Placeholder) -> Optional[ScriptClass]:
    """(parameters, buffers, is_module) of a TorchScript class, parsed from its code, not run.

    Each code file is parsed once per archive, however many objects of its classes the
    pickle holds (scanning a 16 MiB file once per object would be a CPU sink).
    """
    cls = type(obj)
    classes = archive.script_classes.get(cls.pickle_module)
    if classes is None:
        text = archive.code(cls.pickle_module)
        classes = _parse_script_classes(text) if text is not None else {}
        archive.script_classes[cls.pickle_module] = classes
    return classes.get(cls.pickle_name)


# (name relative to the object, tensor) pairs an object holds, in state_dict order
_Named = List[Tuple[str, TensorRef]]


def _join(key: object, name: str) -> str:
    return f"{key}.{name}" if name else str(key)


class _Collector:
    """Names the tensors under the pickle's root, as ``state_dict()`` would.

    Memoised by object identity: a sub-object shared by several containers (a DAG, as
    a tied submodule makes, or a hostile pickle repeating one list 2**40 times over) is
    walked once, and its names are reused under each of its parents. Every step counts
    against :attr:`ReadLimits.max_walk_steps`; ``steps`` tells how many were taken.
    """

    def __init__(self, archive: WalkedArchive) -> None:
        self.archive = archive
        self.limits: ReadLimits = archive.limits
        self.should_stop: Optional[StopCheck] = archive.should_stop
        self.memo: Dict[int, _Named] = {}
        self.path: set[int] = set()
        self.steps = 0
        self._next_check = STOP_CHECK_INTERVAL

    def step(self, units: int = 1) -> None:
        self.steps += units
        if self.steps > self.limits.max_walk_steps:
            raise ModelLimitExceededError(
                f"naming the model's tensors exceeds the reader's limit of"
                f" {self.limits.max_walk_steps} walk steps (objects visited and names made)"
            )
        if self.steps >= self._next_check:
            self._next_check = self.steps + STOP_CHECK_INTERVAL
            check_stop(self.should_stop)

    def adopt(self, out: _Named, key: str, named: _Named) -> None:
        """Appends a child's names under ``key``, paying for each name made."""
        if len(out) + len(named) > self.limits.max_tensors:
            raise ModelLimitExceededError(
                f"the model names more than the reader's limit of {self.limits.max_tensors} tensors"
            )
        for name, ref in named:
            full = _join(key, name)
            self.step(1 + len(full) // 64)
            out.append((full, ref))

    def any(self, obj: object, depth: int) -> _Named:
        self.step()
        if isinstance(obj, TensorRef):
            return [("", obj)]
        if not isinstance(obj, (Placeholder, dict, list, tuple)):
            return []
        known = self.memo.get(id(obj))
        if known is not None:
            return known
        if depth > self.limits.max_depth:
            raise ModelLimitExceededError(
                f"the model nests too deeply (the reader's limit is {self.limits.max_depth} levels)"
            )
        if id(obj) in self.path:
            raise ModelFormatError("the model contains itself")
        self.path.add(id(obj))
        out: _Named = []
        try:
            if isinstance(obj, Placeholder):
                state = obj.state_dict_view()
                if state is not None and isinstance(state.get("_parameters"), dict):
                    self.module(state, out, depth)
                elif type(obj).pickle_module.startswith("__torch__"):
                    self.script(obj, out, depth)
                elif state is not None:
                    self.mapping(state, out, depth)
            elif isinstance(obj, dict):
                self.mapping(obj, out, depth)
            else:
                for i, item in enumerate(obj):
                    self.adopt(out, str(i), self.any(item, depth + 1))
        finally:
            self.path.discard(id(obj))
        self.memo[id(obj)] = out
        return out

    def mapping(self, state: Dict[Any, Any], out: _Named, depth: int) -> None:
        for key, value in state.items():
            if isinstance(key, str):
                self.adopt(out, key, self.any(value, depth + 1))

    def tensor(self, out: _Named, key: str, value: object) -> None:
        if isinstance(value, TensorRef):
            self.adopt(out, key, [("", value)])

    def module(self, state: Dict[Any, Any], out: _Named, depth: int) -> None:
        # nn.Module.state_dict order: own parameters, own persistent buffers, children.
        for key, value in state["_parameters"].items():
            self.tensor(out, key, value)
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        buffers = state.get("_buffers")
        if isinstance(buffers, dict):
            for key, value in buffers.items():
                if key not in skip:
                    self.tensor(out, key, value)
        children = state.get("_modules")
        if isinstance(children, dict):
            for key, child in children.items():
                if isinstance(child, Placeholder):
                    self.adopt(out, key, self.any(child, depth + 1))

    def script(self, obj: Placeholder, out: _Named, depth: int) -> None:
        # A TorchScript object keeps parameters and buffers as plain attributes; its
        # class code lists which are which, as RecursiveScriptModule.state_dict() uses.
        state = obj.state_dict_view() or {}
        info = _script_class(self.archive, obj)
        if info is None:
            names = [k for k, v in state.items() if isinstance(v, TensorRef)]
        else:
            names = info[0] + info[1]
        for key in names:
            self.tensor(out, key, state.get(key))
        for key, value in state.items():
            if isinstance(value, Placeholder) and isinstance(key, str):
                child = _script_class(self.archive, value)
                if child is None or child[2]:
                    self.adopt(out, key, self.any(value, depth + 1))


def collect_tensors(archive: WalkedArchive) -> Dict[str, TensorRef]:
    collector = _Collector(archive)
    try:
        named = collector.any(archive.root, 0)
    except RecursionError as exc:  # a deep stack on entry; the depth limit covers the rest
        raise ModelLimitExceededError("the model nests too deeply") from exc
    archive.walk_steps = collector.steps
    out: Dict[str, TensorRef] = {}
    for name, ref in named:
        if out.setdefault(name, ref) is not ref:
            raise ModelFormatError(f"two different tensors are named {name!r}")
    for ref in out.values():
        dtype_facts(ref.dtype)  # an allow-listed name without dtype facts is refused
    return out
