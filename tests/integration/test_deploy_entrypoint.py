"""The container's entry point, run for real against a real sidecar process.

The entry point is a plain script, tested here without a container engine
(tests/integration/test_image.py runs it inside the built image): its
``healthcheck`` must say healthy exactly while the sidecar serves, and
anything else must reach the ``fl-sidecar`` command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict

from sidecar_harness import running_sidecar

ENTRYPOINT = Path(__file__).resolve().parents[2] / "deploy" / "entrypoint.sh"


def _env(socket_path: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    # The image has the package's python and fl-sidecar script first on PATH.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["FL_SIDECAR_SOCKET"] = socket_path
    return env


def test_entrypoint_script_is_valid_sh() -> None:
    result = subprocess.run(["sh", "-n", str(ENTRYPOINT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_healthcheck_follows_the_sidecar(tmp_path: Path) -> None:
    with running_sidecar() as sidecar:
        assert sidecar.socket_path is not None
        env = _env(sidecar.socket_path)
        healthy = subprocess.run(
            ["sh", str(ENTRYPOINT), "healthcheck"], env=env, capture_output=True, timeout=60
        )
        assert healthy.returncode == 0, healthy.stderr
        socket_path = sidecar.socket_path
    # The sidecar has stopped (and removed its socket): unhealthy now.
    gone = subprocess.run(
        ["sh", str(ENTRYPOINT), "healthcheck"],
        env=_env(socket_path),
        capture_output=True,
        timeout=60,
    )
    assert gone.returncode == 1


def test_other_commands_reach_the_cli(tmp_path: Path) -> None:
    env = _env(str(tmp_path / "unused.sock"))
    result = subprocess.run(
        ["sh", str(ENTRYPOINT), "serve", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--socket" in result.stdout and "FL_SIDECAR_SOCKET" in result.stdout
