"""The CLI tools (download, upload, pack, unpack, info, events) against a real sidecar."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Dict, List

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


def test_pack_refuses_more_frames_than_unpack_accepts_up_front(
    side: ClientSide, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frames = 1 << 20  # the codec's MAX_FRAMES
    raw = tmp_path / "raw"
    raw.write_bytes(bytes(frames + 1))
    packed = tmp_path / "raw.zst"
    assert main(["pack", str(raw), str(packed), "--chunk-size", "1"]) == 1
    err = capsys.readouterr().err
    assert "SizeLimitExceeded" in err and str(frames) in err and "--chunk-size" in err
    target = side.sidecar.target
    args = ["pack", str(raw), str(packed), "--chunk-size", "1", "--via-sidecar"]
    assert main([*args, "--target", target]) == 1
    assert str(frames) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fl_sidecar", "upload", "m", str(tmp_path / "f"), "--round", "x"],
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert b"--round" in done.stderr


def _post_notification(url: str, notification_type: str, training_id: str, round_: int) -> int:
    body = {"round": round_, "global_model_uuid": str(uuid.uuid4())}
    payload = json.dumps(
        {"notification_type": notification_type, "training_uuid": training_id, "body": body}
    ).encode()
    request = urllib.request.Request(
        url, data=payload, headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return int(answer.status)


_EVENTS = [sys.executable, "-m", "fl_sidecar", "events"]


def _events_cli(side: ClientSide, *args: str) -> List[Dict[str, Any]]:
    """Run ``fl-sidecar events --json`` as its own process; its lines, parsed."""
    done = subprocess.run(
        [*_EVENTS, "--json", "--target", side.sidecar.target, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_events_cli_watches_without_taking_a_trainers_round_start(side: ClientSide) -> None:
    training = str(uuid.uuid4())
    assert _post_notification(side.notification_url, "UPDATE_ROUND_START", training, 0) == 202
    (seen,) = _events_cli(side, "--training", training, "--count", "1")
    assert seen["kind"] == "UPDATE_ROUND_START"
    assert seen["training_id"] == training and seen["round"] == 0
    assert seen["body"]["round"] == 0
    # A trainer that connects now still gets the round start it missed.
    with side.client.watch_events(training_ids=[training]) as events:
        got = events.get(timeout=30)
    assert got.seq == seen["seq"]

    # --take receives like a trainer: the next trainer gets only what came after.
    assert _post_notification(side.notification_url, "MODEL_TEST_ROUND", training, 1) == 202
    (taken,) = _events_cli(side, "--training", training, "--count", "1", "--take")
    assert taken["kind"] == "MODEL_TEST_ROUND"
    assert _post_notification(side.notification_url, "UPDATE_ROUND_START", training, 1) == 202
    with side.client.watch_events(training_ids=[training]) as events:
        after = events.get(timeout=30)
    assert (after.kind.name, after.round) == ("UPDATE_ROUND_START", 1)

    # --all replays everything retained, in order.
    replay = _events_cli(side, "--training", training, "--all", "--count", "3")
    assert [e["seq"] for e in replay] == [seen["seq"], taken["seq"], after.seq]
    resume = ["--after-seq", str(taken["seq"]), "--count", "1"]
    text = subprocess.run(
        [*_EVENTS, "--target", side.sidecar.target, "--training", training, *resume],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert text.returncode == 0, text.stderr
    assert f"UPDATE_ROUND_START training={training} round=1" in text.stdout
