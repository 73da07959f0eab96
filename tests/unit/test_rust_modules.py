"""The Rust core's modules import one another without cycles (read from the sources)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Set

CORE = Path(__file__).resolve().parents[2] / "rust" / "core" / "src"
_CRATE_PATH = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def _module_of(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    return parts[0] if parts else "lib"


def module_graph(root: Path) -> Dict[str, Set[str]]:
    """Top-level module -> the top-level modules its code names through ``crate::``.

    Test modules are left out: they may use anything.
    """
    graph: Dict[str, Set[str]] = {}
    for path in sorted(root.rglob("*.rs")):
        if path.name == "tests.rs" or path.stem.endswith("_tests"):
            continue
        module = _module_of(path, root)
        if module == "lib":
            continue
        text = path.read_text(encoding="utf-8")
        # Code after the first #[cfg(test)] is the file's own tests.
        text = text.split("#[cfg(test)]", 1)[0]
        graph.setdefault(module, set()).update(m for m in _CRATE_PATH.findall(text) if m != module)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    found: List[List[str]] = []

    def walk(node: str, stack: List[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                found.append([*stack[stack.index(nxt) :], nxt])
            elif len(stack) < len(graph):
                walk(nxt, [*stack, nxt])

    for start in sorted(graph):
        walk(start, [start])
    return found


def test_the_core_modules_have_no_import_cycles() -> None:
    graph = module_graph(CORE)
    assert {"encode", "decode", "fileio", "tensor", "rans"} <= set(graph)
    assert cycles(graph) == []


def test_encode_and_decode_share_helpers_through_fileio_and_format() -> None:
    graph = module_graph(CORE)
    assert "decode" not in graph["encode"]
    assert "encode" not in graph["decode"]
    assert {"fileio", "format"} <= graph["encode"] & graph["decode"]


def test_the_cycle_finder_finds_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.rs").write_text("use crate::b::f;\n")
    (tmp_path / "b.rs").write_text("fn g() { crate::a::h() }\n")
    (tmp_path / "c.rs").write_text("use crate::a;\n")
    assert module_graph(tmp_path) == {"a": {"b"}, "b": {"a"}, "c": {"a"}}
    assert ["a", "b", "a"] in cycles(module_graph(tmp_path))
    (tmp_path / "b.rs").write_text("fn g() {}\n")
    assert cycles(module_graph(tmp_path)) == []
