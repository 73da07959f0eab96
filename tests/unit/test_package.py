"""The package's public face and its architecture rules (DEVELOPERS.md, "Rules of the house")."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, Set

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


def test_boundaries_torch_requests_grpc() -> None:
    allowed: Dict[str, Set[str]] = {
        # Model I/O; the demo's trainer program is a trainer, not library code.
        "torch": {"models.py", "demo_trainer.py"},
        "requests": {"server_api.py"},
        # The sidecar's servicer, its status table and process, and the trainer-side client.
        "grpc": {"sidecar/servicer.py", "sidecar/status.py", "sidecar/process.py", "client.py"},
        "grpc_health": {"sidecar/servicer.py", "sidecar/process.py", "client.py"},
    }
    for package, modules in allowed.items():
        assert _modules_importing(package) <= modules, package
    # The scan sees the imports that are allowed (so an empty result is not a pass).
    assert "models.py" in _modules_importing("torch")
    assert _modules_importing("requests") == {"server_api.py"}
    # The torch-free model files stay torch-free, and so does the sidecar's domain layer.
    sidecar_side = sorted(str(p.relative_to(PACKAGE)) for p in (PACKAGE / "sidecar").glob("*.py"))
    assert "sidecar/transfers.py" in sidecar_side
    for module in ("archive.py", "_pickle.py", *sidecar_side):
        assert not _runtime_imports(PACKAGE / module) & {"torch", "numpy", "safetensors"}
