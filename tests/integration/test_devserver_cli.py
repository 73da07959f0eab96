"""``fl-sidecar devserver`` as a real process: ready file, serving, graceful SIGTERM/SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import fl_sidecar


def _env() -> dict[str, str]:
    env = dict(os.environ)
    package_root = str(Path(fl_sidecar.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_stops_gracefully(tmp_path: Path, sig: signal.Signals) -> None:
    ready = tmp_path / "ready"
    db = tmp_path / "dev.sqlite3"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fl_sidecar",
            "devserver",
            "--port",
            "0",
            "--db",
            str(db),
            "--data-dir",
            str(tmp_path / "data"),
            "--ready-file",
            str(ready),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # printed once the socket listens
        assert line.startswith("dev FL server listening on http://127.0.0.1:"), line
        url = line.rsplit(" ", 1)[1].strip()
        assert ready.read_text().strip() == url
        request = urllib.request.Request(
            url + "/api/users/",
            data=json.dumps(
                {"username": "u", "password": "p", "message_endpoint": "http://127.0.0.1:9/"}
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 201
            assert response.headers.get("Accept-Encoding") == "zstd"
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()
    assert db.exists()  # the file database outlives the process


def test_cli_help_lists_the_flags() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fl_sidecar", "devserver", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
        check=True,
    ).stdout
    for flag in ("--host", "--port", "--db", "--data-dir", "--ready-file"):
        assert flag in out
