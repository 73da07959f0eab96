"""What importing the package costs, measured in a fresh interpreter."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "grpc", "requests", "numpy")


def _loaded_after(statement: str) -> set[str]:
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return {name.split(".")[0] for name in json.loads(out)}


def test_importing_the_package_and_the_codec_loads_nothing_heavy() -> None:
    loaded = _loaded_after("import fl_sidecar, fl_sidecar.codec, fl_sidecar.errors")
    assert "fl_sidecar" in loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_a_lazy_name_loads_its_module_on_first_use() -> None:
    loaded = _loaded_after("import fl_sidecar\nfl_sidecar.FlServerClient")
    assert "requests" in loaded
    assert "torch" not in loaded


def test_the_dev_server_and_the_cli_tools_load_nothing_heavy() -> None:
    # torch only once an aggregation runs; the dev server speaks HTTP with the stdlib.
    loaded = _loaded_after(
        "import fl_sidecar.devserver, fl_sidecar.devserver.app, fl_sidecar.tools, "
        "fl_sidecar.formatting, fl_sidecar.command"
    )
    assert {"fl_sidecar"} <= loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
