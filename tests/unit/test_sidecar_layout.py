"""The sidecar package's layout: no import cycles, and the old paths still work."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "python" / "fl_sidecar"

# Old module path -> where its code lives now.
MOVED = {
    "fl_sidecar.server": "fl_sidecar.sidecar.process",
    "fl_sidecar.service": "fl_sidecar.sidecar.servicer",
    "fl_sidecar.transfers": "fl_sidecar.sidecar.transfers",
    "fl_sidecar.uploads": "fl_sidecar.sidecar.uploads",
    "fl_sidecar.socketdir": "fl_sidecar.sidecar.socketdir",
    "fl_sidecar.notifications": "fl_sidecar.sidecar.notifications",
    "fl_sidecar.scripts": "fl_sidecar.sidecar.scripts",
    "fl_sidecar.config": "fl_sidecar.sidecar.settings",
    "fl_sidecar.telemetry": "fl_sidecar.sidecar.telemetry",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _load_time_imports(path: Path) -> Set[str]:
    """fl_sidecar modules imported as ``path`` loads (not in functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), str(path))
    found: Set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(inner, ast.Import):
                found |= {alias.name for alias in inner.names}
            elif isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                found.add(inner.module)
                found |= {f"{inner.module}.{alias.name}" for alias in inner.names}
    return {name for name in found if name.startswith("fl_sidecar")}


def _graph() -> Dict[str, Set[str]]:
    paths = [p for p in PACKAGE.rglob("*.py") if "v1" not in p.relative_to(PACKAGE).parts]
    modules = {_module_name(p): p for p in paths}
    return {
        name: {imported for imported in _load_time_imports(path) if imported in modules} - {name}
        for name, path in modules.items()
    }


def _cycle_through(graph: Dict[str, Set[str]], start: str) -> List[str]:
    stack = [(start, [start])]
    seen: Set[str] = set()
    while stack:
        node, trail = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == start:
                return [*trail, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*trail, nxt]))
    return []


def test_the_sidecar_side_imports_no_cycle() -> None:
    graph = _graph()
    mine = [n for n in graph if n.startswith("fl_sidecar.sidecar") or n in MOVED]
    mine.append("fl_sidecar.events")
    assert "fl_sidecar.sidecar.servicer" in mine
    for name in mine:
        assert _cycle_through(graph, name) == [], name


def test_the_sidecar_package_loads_nothing_on_import() -> None:
    # Importing the package (e.g. for the settings) must not start gRPC imports.
    tree = ast.parse((PACKAGE / "sidecar" / "__init__.py").read_text())
    assert not any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in tree.body)


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_an_old_path_re_exports_every_public_name(old: str, new: str) -> None:
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    assert new in (old_module.__doc__ or "")  # it says where the code lives now
    for name in new_module.__all__:
        assert getattr(old_module, name) is getattr(new_module, name), (old, name)


def test_the_event_bus_is_still_importable_from_events() -> None:
    from fl_sidecar import events
    from fl_sidecar.sidecar import eventbus

    for name in eventbus.__all__:
        assert getattr(events, name) is getattr(eventbus, name), name
    with pytest.raises(AttributeError):
        events.NoSuchName  # noqa: B018


def test_the_docs_name_every_module_of_the_sidecar_package() -> None:
    docs = (ROOT / "docs" / "sidecar.md").read_text()
    section = docs.split("## Where the code lives", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    modules = {p.stem for p in (PACKAGE / "sidecar").glob("*.py")} - {"__init__"}
    assert listed == modules


def test_the_servicer_reaches_the_fl_server_only_through_the_transfer_layer() -> None:
    tree = ast.parse((PACKAGE / "sidecar" / "servicer.py").read_text())
    attributes = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    assert "client" not in attributes  # never transfers.client.<call>
    imported = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "fl_sidecar.server_api"
        for alias in node.names
    }
    assert imported <= {"Credentials"}  # a type for the requests' credentials, no calls
    # ... and the notification URL comes through the constructor, not patched on later.
    process = (PACKAGE / "sidecar" / "process.py").read_text()
    assert ".notification_url =" not in process
