"""Compatibility mode wiring: ``serve`` starts the training script per round notification.

The script is real (run by the sidecar subprocess with this Python); it
reports its command line and environment back over a unix socket the test
listens on, so the test waits on ``accept()`` rather than sleeping.
"""

from __future__ import annotations

import json
import socket
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict

import pytest
from sidecar_harness import _short_tempdir, running_sidecar

pytestmark = pytest.mark.slow

SCRIPT = """
import json, os, socket, sys
report = {"argv": sys.argv[1:], "cwd": os.getcwd(),
          "has_password": "FL_SIDECAR_PASSWORD" in os.environ,
          "socket": os.environ.get("FL_SIDECAR_SOCKET")}
client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
client.connect(os.environ["TEST_REPORT_SOCKET"])
client.sendall(json.dumps(report).encode())
client.close()
"""


def _receive(listener: socket.socket) -> Dict[str, Any]:
    connection, _ = listener.accept()
    with connection:
        data = b""
        while True:
            block = connection.recv(65536)
            if not block:
                break
            data += block
    report: Dict[str, Any] = json.loads(data)
    return report


def _notify(url: str, notification_type: str, training: str, body: Dict[str, Any]) -> int:
    payload = json.dumps(
        {"notification_type": notification_type, "training_uuid": training, "body": body}
    ).encode()
    request = urllib.request.Request(
        url, data=payload, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return int(answer.status)


def test_round_and_test_notifications_start_the_script(tmp_path: Path) -> None:
    workdir = _short_tempdir()
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "train.py").write_text(SCRIPT)
    report_path = str(workdir / "report.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(report_path)
    listener.listen(4)
    listener.settimeout(60)
    # No FL server runs here to confirm the training: it is configured instead.
    training, model = str(uuid.uuid4()), str(uuid.uuid4())
    try:
        with running_sidecar(
            workdir=workdir,
            env={
                "FL_SIDECAR_SCRIPT_TRAINING_IDS": training,
                "FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR": sys.executable,
                "FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH": "train.py",
                "FL_DEMONSTRATOR_TRAINING_SCRIPT_WORKING_DIRETORY": str(scripts),
                "FL_SIDECAR_USERNAME": "alice",
                "FL_SIDECAR_PASSWORD": "Compat-Secret-Pw-1",
                "TEST_REPORT_SOCKET": report_path,
            },
        ) as sidecar:
            url = sidecar.notification_url
            assert url is not None
            body = {"round": 2, "global_model_uuid": model}
            assert _notify(url, "UPDATE_ROUND_START", training, body) == 202
            train = _receive(listener)
            assert train["argv"] == [
                "train",
                "--training-id",
                training,
                "--round",
                "2",
                "--model-id",
                model,
            ]
            assert Path(train["cwd"]).resolve() == scripts.resolve()
            assert train["has_password"] is False
            assert train["socket"] == sidecar.socket_path
            assert _notify(url, "MODEL_TEST_ROUND", training, {**body, "round": 3}) == 202
            test = _receive(listener)
            assert test["argv"][:1] == ["test"]
            assert test["argv"][test["argv"].index("--round") + 1] == "3"
            assert "Compat-Secret-Pw-1" not in sidecar.log_text()
    finally:
        listener.close()
