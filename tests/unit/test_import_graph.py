"""The people-facing modules and the dev server import each other without cycles.

The graph is read from the source (every import, also those inside
functions, and the command modules ``fl_sidecar.cli`` loads by name), so a
lazy import that closes a loop is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

from fl_sidecar import cli

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "fl_sidecar"

# The modules this check covers: the CLI for people and the dev server.
_CLI_MODULES = {
    "fl_sidecar.cli",
    "fl_sidecar.command",
    "fl_sidecar.demo",
    "fl_sidecar.demo_trainer",
    "fl_sidecar.formatting",
    "fl_sidecar.tools",
}


def _module_names() -> Dict[str, Path]:
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if "v1" in parts:
            continue  # generated code
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _imports(name: str, path: Path, known: Set[str]) -> Set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from pkg import sub`` imports the module ``sub``; the package is its parent.
            submodules = [f"{base}.{alias.name}" for alias in node.names]
            targets = [m for m in submodules if m in known] or [base]
        found |= {t for t in targets if t in known}
    if name == "fl_sidecar.cli":
        found |= set(cli._COMMAND_MODULES) & known
    return found - {name}


def _graph() -> Dict[str, Set[str]]:
    names = _module_names()
    known = set(names)
    return {name: _imports(name, path, known) for name, path in names.items()}


def _cycle_through(graph: Dict[str, Set[str]], start: str) -> List[str]:
    """A shortest import path from ``start`` back to itself, or ``[]``."""
    paths = {target: [start, target] for target in graph[start]}
    frontier = list(paths)
    while frontier:
        following = []
        for node in frontier:
            if node == start:
                return paths[node]
            for target in graph.get(node, set()):
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    following.append(target)
        frontier = following
    return paths.get(start, [])


def test_the_graph_sees_lazy_and_by_name_imports() -> None:
    graph = _graph()
    assert "fl_sidecar.formatting" in graph["fl_sidecar.demo"]
    assert "fl_sidecar.formatting" in graph["fl_sidecar.tools"]
    # demo_trainer imports models inside a function; cli loads its commands by name.
    assert "fl_sidecar.models" in graph["fl_sidecar.demo_trainer"]
    assert {"fl_sidecar.demo", "fl_sidecar.tools"} <= graph["fl_sidecar.cli"]
    assert "fl_sidecar.devserver.store" in graph["fl_sidecar.devserver.handlers.context"]


def test_a_cycle_is_found_when_there_is_one() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle_through(graph, "a") == ["a", "b", "c", "a"]
    assert _cycle_through(graph, "d") == []


def test_the_cli_modules_have_no_import_cycle() -> None:
    graph = _graph()
    assert set(graph) >= _CLI_MODULES
    for name in sorted(_CLI_MODULES):
        assert _cycle_through(graph, name) == [], name


def test_the_dev_server_has_no_import_cycle() -> None:
    graph = _graph()
    devserver = sorted(n for n in graph if n.startswith("fl_sidecar.devserver"))
    assert "fl_sidecar.devserver.handlers.models" in devserver
    for name in devserver:
        assert _cycle_through(graph, name) == [], name


def test_the_whole_package_has_no_import_cycle() -> None:
    """Every module, lazy imports included: the layers of docs/ and README hold."""
    graph = _graph()
    assert {"fl_sidecar.sidecar.servicer", "fl_sidecar.trainer.client"} <= set(graph)
    # The one allowed back edge: ``fl_sidecar.events.EventBus`` (its old path) is
    # named for the type checker only and looked up on first use by the module's
    # PEP 562 ``__getattr__``, never when ``fl_sidecar.events`` is imported; the
    # bus itself builds on the events' types.
    assert "fl_sidecar.events" in graph["fl_sidecar.sidecar.eventbus"]
    graph["fl_sidecar.events"].discard("fl_sidecar.sidecar.eventbus")
    cycles = {name: _cycle_through(graph, name) for name in sorted(graph)}
    assert {name: cycle for name, cycle in cycles.items() if cycle} == {}


def test_the_fl_server_client_does_not_depend_on_the_sidecar_process() -> None:
    """flserver is used by the sidecar (and the demo, and operators): never the other way."""
    graph = _graph()
    flserver = sorted(n for n in graph if n.startswith("fl_sidecar.flserver"))
    assert "fl_sidecar.flserver.transport" in flserver
    assert "fl_sidecar.cancel" in graph["fl_sidecar.flserver.transport"]
    for name in flserver:
        reached = {t for t in graph[name] if t.startswith("fl_sidecar.sidecar")}
        assert reached == set(), name
    assert not {t for t in graph["fl_sidecar.cancel"] if t.startswith("fl_sidecar.sidecar")}
