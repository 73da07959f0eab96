"""The package's public face and its architecture rules (DEVELOPERS.md, "Rules of the house")."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Set, Tuple

import pytest

import fl_sidecar

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "python" / "fl_sidecar"

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the suite runs on 3.11
    tomllib = None


def _runtime_imports(path: Path) -> Set[str]:
    """Top-level packages a module imports at run time (``if TYPE_CHECKING`` blocks excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    type_checking_only: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                for inner in ast.walk(child):
                    type_checking_only.add(id(inner))
    found: Set[str] = set()
    for node in ast.walk(tree):
        if id(node) in type_checking_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _modules_importing(package: str) -> Set[str]:
    result = set()
    for path in PACKAGE.rglob("*.py"):
        if "v1" in path.relative_to(PACKAGE).parts:
            continue  # generated code
        if package in _runtime_imports(path):
            result.add(str(path.relative_to(PACKAGE)))
    return result


@pytest.mark.skipif(tomllib is None, reason="tomllib needs Python 3.11")
def test_version_matches_the_project_metadata() -> None:
    assert tomllib is not None
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert fl_sidecar.__version__ == project["version"]


def test_every_public_name_resolves() -> None:
    for name in fl_sidecar.__all__:
        assert getattr(fl_sidecar, name) is not None, name
    assert fl_sidecar.pack is fl_sidecar.codec.pack
    with pytest.raises(AttributeError):
        fl_sidecar.no_such_name  # noqa: B018


# The trainer's side: only its channel and its interceptor touch grpc.
TRAINER_GRPC = {"trainer/connection.py", "trainer/interceptor.py"}


def test_boundaries_torch_requests_grpc() -> None:
    allowed: Dict[str, Set[str]] = {
        # Model I/O; the demo's trainer program is a trainer, not library code.
        "torch": {"modelfiles/torch_io.py", "modelfiles/aggregate.py", "demo_trainer.py"},
        # The FL server client's transport and bodies; the rest of fl_sidecar.flserver
        # only names requests' types (``if TYPE_CHECKING``).
        "requests": {"flserver/transport.py", "flserver/bodies.py"},
        # The sidecar's servicer, its status table and process, and the trainer-side client.
        "grpc": {"sidecar/servicer.py", "sidecar/status.py", "sidecar/process.py", *TRAINER_GRPC},
        "grpc_health": {"sidecar/servicer.py", "sidecar/process.py", *TRAINER_GRPC},
    }
    for package, modules in allowed.items():
        assert _modules_importing(package) <= modules, package
    # The scan sees the imports that are allowed (so an empty result is not a pass).
    assert {"modelfiles/torch_io.py", "modelfiles/aggregate.py"} <= _modules_importing("torch")
    assert _modules_importing("requests") == {"flserver/transport.py", "flserver/bodies.py"}
    assert _modules_importing("grpc") >= TRAINER_GRPC
    # The torch-free model files stay torch-free, and so does the sidecar's domain layer.
    sidecar_side = sorted(str(p.relative_to(PACKAGE)) for p in (PACKAGE / "sidecar").glob("*.py"))
    assert "sidecar/transfers.py" in sidecar_side
    for module in ("archive.py", "_pickle.py", *sidecar_side):
        assert not _runtime_imports(PACKAGE / module) & {"torch", "numpy", "safetensors"}
    # Every other module of the model files package is torch-free.
    for path in (PACKAGE / "modelfiles").glob("*.py"):
        if path.name not in ("torch_io.py", "aggregate.py"):
            assert not _runtime_imports(path) & {"torch", "numpy", "safetensors"}, path.name


def test_model_files_import_graph_has_no_cycles() -> None:
    modules = {path.stem: path for path in (PACKAGE / "modelfiles").glob("*.py")}
    edges: Dict[str, Set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        edges[name] = {
            node.module.rsplit(".", 1)[1]
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("fl_sidecar.modelfiles.")
        }
    assert edges["torch_io"] and edges["__init__"]  # the scan sees the imports
    done: Set[str] = set()

    def visit(name: str, path: Tuple[str, ...]) -> None:
        assert name not in path, " -> ".join((*path, name))
        if name not in done:
            for target in edges[name]:
                visit(target, (*path, name))
            done.add(name)

    for name in edges:
        visit(name, ())


def test_the_content_coding_parser_needs_only_the_standard_library() -> None:
    """wsgi_zstd shares it: a server installing fl-sidecar for the middleware has no requests."""
    stdlib = set(sys.stdlib_module_names)
    for module in ("flserver/coding.py", "wsgi_zstd.py"):
        third_party = _runtime_imports(PACKAGE / module) - stdlib - {"fl_sidecar"}
        assert third_party == set(), (module, third_party)
    assert "fl_sidecar" in _runtime_imports(PACKAGE / "wsgi_zstd.py")


def _package_imports(path: Path) -> Set[str]:
    """The ``fl_sidecar`` modules a module imports at run time (absolute imports)."""
    tree = ast.parse(path.read_text(), str(path))
    found: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "fl_sidecar":
                found |= {f"fl_sidecar.{alias.name}" for alias in node.names}
            elif node.module.startswith("fl_sidecar."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fl_sidecar.")}
    return found


def test_the_trainer_package_has_no_import_cycle_and_needs_no_sidecar_settings() -> None:
    modules = {
        "fl_sidecar.trainer." + path.stem: path
        for path in (PACKAGE / "trainer").glob("*.py")
        if path.stem != "__init__"
    }
    graph = {name: _package_imports(path) & set(modules) for name, path in modules.items()}
    assert graph, "the scan found the trainer's modules"
    done: Set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"import cycle: {' -> '.join((*trail, name))}"
        if name in done:
            return
        for imported in graph[name]:
            visit(imported, (*trail, name))
        done.add(name)

    for name in graph:
        visit(name, ())
    # Where the sidecar is comes from fl_sidecar.address; its settings are the sidecar's own.
    for name, path in modules.items():
        if name != "fl_sidecar.trainer.compat":  # the reference client's variables (compat)
            assert "fl_sidecar.config" not in _package_imports(path), name
    assert _runtime_imports(PACKAGE / "address.py") <= {"__future__", "os", "typing", "fl_sidecar"}
