"""The spool on disk: a full spool, and spool directories left behind by a sidecar that died.

Real processes only: the dev FL server, ``fl-sidecar serve`` subprocesses and
the generated stubs. A full disk is a real 1 MiB tmpfs mounted as the spool
(needs root, or the test is skipped); a crash is a real SIGKILL in the middle
of an upload.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

import grpc
import pytest
from conftest import DevServerHandle
from sidecar_harness import SidecarProcess, _short_tempdir, running_sidecar, start_sidecar

from fl_sidecar.v1 import sidecar_pb2 as pb

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

CHUNK = 64 * 1024
SPOOL_PREFIX = "fl-sidecar-spool-"


def _module_bytes(width: int, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(width, width))
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def _files_under(path: Path) -> List[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def _upload_messages(header: pb.UploadHeader, data: bytes) -> Iterator[pb.UploadModelRequest]:
    yield pb.UploadModelRequest(header=header)
    for start in range(0, len(data), CHUNK):
        yield pb.UploadModelRequest(chunk=data[start : start + CHUNK])


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode(errors='replace')}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture()
def small_spool() -> Iterator[Path]:
    workdir = _short_tempdir()
    try:
        with _tmpfs(workdir / "spool", "1m"):
            yield workdir
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_full_spool_is_resource_exhausted_naming_the_directory(
    devserver: DevServerHandle, small_spool: Path
) -> None:
    spool = small_spool / "spool"
    big = _module_bytes(600)  # about 1.4 MiB of float32: more than the tmpfs holds
    small = _module_bytes(8, seed=1)
    assert len(big) > 1024 * 1024
    actor, (alice,), big_id, _ = devserver.setup_training(big, ["http://127.0.0.1:9/"])
    small_id = devserver.upload_model(actor, small)
    with running_sidecar(
        server_url=devserver.url,
        args=["--token", alice.token, "--http-retries", "0"],
        notifications=False,
        workdir=small_spool,
    ) as sidecar:
        (own,) = [p for p in spool.iterdir() if p.name.startswith(SPOOL_PREFIX)]

        request = pb.DownloadModelRequest(model_id=big_id)
        with pytest.raises(grpc.RpcError) as caught:
            list(sidecar.stub.DownloadModel(request, timeout=60))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(own) in (caught.value.details() or "")
        assert "--spool-dir" in (caught.value.details() or "")
        assert _files_under(spool) == [f"{own.name}/.lock"]

        header = pb.UploadHeader(model_id=big_id, round=0, sample_size=1, size=len(big))
        with pytest.raises(grpc.RpcError) as caught:
            sidecar.stub.UploadModel(_upload_messages(header, big), timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(own) in (caught.value.details() or "")
        assert _files_under(spool) == [f"{own.name}/.lock"]

        # Nothing partial was kept: the space is free again for a model that fits.
        chunks = [
            m.chunk
            for m in sidecar.stub.DownloadModel(pb.DownloadModelRequest(model_id=small_id))
            if m.WhichOneof("kind") == "chunk"
        ]
        assert b"".join(chunks) == small
        assert "bug" not in sidecar.log_text()


def _spool_dirs(parent: Path) -> List[Path]:
    return sorted(p for p in parent.iterdir() if p.name.startswith(SPOOL_PREFIX))


def _wait_for_file(directory: Path, suffix: str, timeout: float = 30.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in directory.iterdir() if p.name.endswith(suffix) and p.stat().st_size]
        if found:
            return found[0]
        time.sleep(0.02)  # polling a file the other process writes, with a deadline
    raise TimeoutError(f"no {suffix} file appeared in {directory}")


def test_spool_of_a_killed_sidecar_is_removed_and_a_live_ones_kept(
    devserver: DevServerHandle, tmp_path: Path
) -> None:
    shared = tmp_path / "shared-spool"
    shared.mkdir()
    data = _module_bytes(256)  # 256 KiB: the upload below stops after its first 64 KiB
    actor, (alice,), model_id, training_id = devserver.setup_training(data, ["http://127.0.0.1:9/"])
    flags = ["--spool-dir", str(shared), "--token", alice.token]
    live: Optional[SidecarProcess] = None
    doomed: Optional[SidecarProcess] = None
    try:
        live = start_sidecar(server_url=devserver.url, args=flags, notifications=False)
        (live_dir,) = _spool_dirs(shared)
        doomed = start_sidecar(server_url=devserver.url, args=flags, notifications=False)
        (doomed_dir,) = [p for p in _spool_dirs(shared) if p != live_dir]

        # An upload that stops half way: the trainer holds back the rest.
        release = threading.Event()

        def messages() -> Iterator[pb.UploadModelRequest]:
            header = pb.UploadHeader(model_id=model_id, round=0, sample_size=1, size=len(data))
            yield pb.UploadModelRequest(header=header)
            yield pb.UploadModelRequest(chunk=data[:CHUNK])
            release.wait(60)

        stub = doomed.stub
        failures: List[BaseException] = []

        def upload() -> None:
            try:
                stub.UploadModel(messages(), timeout=60)
            except grpc.RpcError as exc:
                failures.append(exc)

        uploader = threading.Thread(target=upload)
        uploader.start()
        partial = _wait_for_file(doomed_dir, ".upload")
        doomed.signal(signal.SIGKILL)
        assert doomed.wait(timeout=30) == -signal.SIGKILL
        release.set()
        uploader.join(timeout=60)
        assert len(failures) == 1
        assert partial.exists()  # what a crash leaves behind

        live_files = _files_under(live_dir)
        with running_sidecar(server_url=devserver.url, args=flags, notifications=False) as next_one:
            assert not doomed_dir.exists()
            assert live_dir.exists()
            assert _files_under(live_dir) == live_files
            assert str(doomed_dir) in next_one.log_text()
            # The live sidecar still works with its spool.
            chunks = [
                m.chunk
                for m in live.stub.DownloadModel(pb.DownloadModelRequest(model_id=model_id))
                if m.WhichOneof("kind") == "chunk"
            ]
            assert b"".join(chunks) == data
        assert devserver.training(actor, training_id)["local_models_arrived"] == 0
    finally:
        for process in (doomed, live):
            if process is not None:
                process.cleanup()
    assert _spool_dirs(shared) == []
