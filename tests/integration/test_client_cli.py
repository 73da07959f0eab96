"""The CLI tools (download, upload, pack, unpack, info) against a real sidecar and dev server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from trainer_stack import ClientSide, TrainerStack, tiny_module, tiny_module_bytes

from fl_sidecar.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def side(stack: TrainerStack) -> ClientSide:
    return stack.add_client()


def test_info_describes_the_sidecar(side: ClientSide, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--target", side.sidecar.target]) == 0
    out = capsys.readouterr().out
    assert "zstd" in out
    assert side.notification_url in out
    assert side.user.password not in out


def test_download_and_upload_round_trip(
    stack: TrainerStack, side: ClientSide, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = stack.training([side], rounds=1, start=True)
    target = tmp_path / "global.safetensors"
    assert (
        main(
            [
                "download",
                ids["model_id"],
                "-o",
                str(target),
                "--format",
                "safetensors",
                "--target",
                side.sidecar.target,
            ]
        )
        == 0
    )
    assert "sha256" in capsys.readouterr().out
    assert target.stat().st_size > 0
    status = main(
        [
            "upload",
            ids["model_id"],
            str(target),
            "--round",
            "0",
            "--sample-size",
            "12",
            "--metric",
            "accuracy=0.5",
            "--target",
            side.sidecar.target,
        ]
    )
    assert status == 0
    assert "HTTP 201" in capsys.readouterr().out
    stack.devserver.wait_idle(timeout=30)
    state = stack.devserver.training(stack.actor, ids["training_id"])
    assert state["state"] == "O"  # now waiting for the test metrics of round 1
    # Uploading the unchanged weights leaves the global model unchanged.
    final = side.client.download_state_dict(ids["model_id"])
    for name, tensor in tiny_module().state_dict().items():
        assert final[name].equal(tensor)


def test_download_of_an_unknown_model_fails_cleanly(
    side: ClientSide, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "x.pt"
    status = main(
        ["download", str(uuid.uuid4()), "-o", str(target), "--target", side.sidecar.target]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert "NOT_FOUND" in err and "Traceback" not in err
    assert not target.exists()


def test_pack_and_unpack_locally_and_via_the_sidecar(
    side: ClientSide, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = tmp_path / "model.pt"
    raw.write_bytes(tiny_module_bytes() * 50 + os.urandom(10_000))
    packed, back = tmp_path / "model.pt.zst", tmp_path / "back.pt"
    assert main(["pack", str(raw), str(packed), "--level", "3", "--chunk-size", "64KiB"]) == 0
    assert main(["info", str(packed)]) == 0
    out = capsys.readouterr().out
    assert f"zstd, {packed.stat().st_size} B packed, {raw.stat().st_size} B raw" in out
    assert "seek table yes" in out
    assert main(["unpack", str(packed), str(back)]) == 0
    assert back.read_bytes() == raw.read_bytes()
    via = tmp_path / "via.zst"
    target = side.sidecar.target
    assert main(["pack", str(raw), str(via), "--via-sidecar", "--target", target]) == 0
    back.unlink()
    assert main(["unpack", str(via), str(back), "--via-sidecar", "--target", target]) == 0
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(raw.read_bytes()).digest()


def test_unpack_of_garbage_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage, out = tmp_path / "garbage.zst", tmp_path / "out"
    garbage.write_bytes(b"\x28\xb5\x2f\xfd" + os.urandom(200))
    assert main(["unpack", str(garbage), str(out)]) == 1
    err = capsys.readouterr().err
    assert "Error" in err and "Traceback" not in err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["garbage.zst"]


def test_unpack_size_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw, packed, out = tmp_path / "zeros", tmp_path / "zeros.zst", tmp_path / "out"
    raw.write_bytes(bytes(4 * 1024 * 1024))
    assert main(["pack", str(raw), str(packed)]) == 0
    assert main(["unpack", str(packed), str(out), "--max-size", "1MiB"]) == 1
    assert "SizeLimitExceeded" in capsys.readouterr().err
    assert not out.exists()


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fl_sidecar", "upload", "m", str(tmp_path / "f"), "--round", "x"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"--round" in done.stderr
