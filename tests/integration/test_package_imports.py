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


def test_the_wsgi_middleware_imports_without_requests_or_grpc() -> None:
    """A server installs fl-sidecar only for the middleware: requests and grpc may be absent.

    ``sys.modules[name] = None`` makes any import of them raise ImportError, as
    on a machine without them. The middleware and the coding parser it shares
    with the FL server client must import and work all the same.
    """
    code = "\n".join(
        [
            "import sys",
            *(f"sys.modules[{name!r}] = None" for name in ("requests", "grpc", "urllib3")),
            "from fl_sidecar.wsgi_zstd import ZstdMiddleware",
            "from fl_sidecar.flserver.coding import accepts",
            "import fl_sidecar.flserver",
            "assert accepts('gzip, zstd;q=0.5', 'zstd')",
            "ZstdMiddleware(lambda environ, start_response: [])",
            "print('ok')",
        ]
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    # And the client itself, which needs requests, says so when it is missing.
    blocked = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nsys.modules['requests'] = None\n"
            "import fl_sidecar.flserver as f\nf.FlServerClient",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert blocked.returncode != 0 and "requests" in blocked.stderr


def test_the_torch_free_model_files_load_nothing_heavy() -> None:
    loaded = _loaded_after(
        "import fl_sidecar.modelfiles, fl_sidecar.archive, fl_sidecar._pickle\n"
        "import fl_sidecar.modelfiles.convert, fl_sidecar.devserver.modelcheck"
    )
    assert "fl_sidecar" in loaded


def test_the_dev_server_and_the_cli_tools_load_nothing_heavy() -> None:
    # torch only once an aggregation runs; the dev server speaks HTTP with the stdlib.
    loaded = _loaded_after(
        "import fl_sidecar.devserver, fl_sidecar.devserver.app, fl_sidecar.tools, "
        "fl_sidecar.formatting, fl_sidecar.command"
    )
    assert {"fl_sidecar"} <= loaded
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
