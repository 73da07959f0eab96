"""Pack and Unpack with a reference model, end to end: a real sidecar subprocess, real gRPC
clients (the generated stub and :class:`~fl_sidecar.client.SidecarClient`), the dev FL
server for a held global model, and ``fl-sidecar pack``/``unpack`` run as subprocesses.

The reference comes streamed, as a held global model, or as a path on the sidecar's
machine with its SHA-256; hostile inputs end in the documented status codes and leave
nothing in the spool.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import grpc
import pytest
import torch
from sidecar_harness import SidecarProcess, running_sidecar, spool_model_files
from trainer_stack import TrainerStack, tiny_module

import fl_sidecar
from fl_sidecar import codec
from fl_sidecar.client import HeldModel, SidecarClient, SidecarFile
from fl_sidecar.errors import ReferenceMismatchError, SidecarError
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.wire import ERROR_CLASS_KEY

pytestmark = pytest.mark.slow

MIB = 1024 * 1024
_PACKAGE_ROOT = str(Path(fl_sidecar.__file__).resolve().parent.parent)


def _archive(state: Dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _state(seed: int, step: float = 0.0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(512, 600, generator=g) * 0.05
    return {
        "fc.weight": w + step * torch.sign(w) * 1e-3,
        "fc.bias": (torch.randn(512, generator=g) * 0.01).to(torch.bfloat16),
        "steps": torch.arange(4096, dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def models() -> Tuple[bytes, bytes]:
    """A global model and an update trained from it (torch archives, about 1.2 MiB)."""
    return _archive(_state(1)), _archive(_state(1, step=0.5))


@pytest.fixture(scope="module")
def sidecar() -> Iterator[SidecarProcess]:
    with running_sidecar(args=["--log-format", "json"], notifications=False) as process:
        yield process


@pytest.fixture(scope="module")
def client(sidecar: SidecarProcess) -> Iterator[SidecarClient]:
    with SidecarClient(sidecar.target) as c:
        yield c


def _spool(sidecar: SidecarProcess) -> List[Path]:
    return spool_model_files(sidecar.workdir / "spool")


def _collect(responses: Any) -> Tuple[bytes, Any]:
    chunks: List[bytes] = []
    summary = None
    for message in responses:
        if message.WhichOneof("kind") == "summary":
            summary = message.summary
        else:
            chunks.append(message.chunk)
    assert summary is not None
    return b"".join(chunks), summary


def _raw_unpack(
    sidecar: SidecarProcess,
    blob: bytes,
    options: Optional[pb.UnpackOptions] = None,
    reference: Optional[bytes] = None,
) -> Tuple[bytes, Any]:
    def requests() -> Iterator[pb.UnpackRequest]:
        if options is not None:
            yield pb.UnpackRequest(options=options)
        for start in range(0, len(reference or b""), MIB):
            yield pb.UnpackRequest(reference_chunk=(reference or b"")[start : start + MIB])
        for start in range(0, len(blob), 300_000):
            yield pb.UnpackRequest(chunk=blob[start : start + 300_000])

    return _collect(sidecar.stub.Unpack(requests(), timeout=60))


def _status(call: Any) -> Tuple[grpc.StatusCode, str, Dict[str, Any]]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error: Any = caught.value
    trailers = dict(error.trailing_metadata() or ())
    return error.code(), error.details() or "", trailers


# --- streamed references -------------------------------------------------------


def test_a_streamed_reference_round_trips_through_the_sidecar_and_reads_locally(
    tmp_path: Path, sidecar: SidecarProcess, client: SidecarClient, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    digest = hashlib.sha256(reference).hexdigest()
    src, ref, blob, back = (tmp_path / n for n in ("u.pt", "g.pt", "u.fltc", "back.pt"))
    src.write_bytes(update)
    ref.write_bytes(reference)
    seen: List[Tuple[int, int]] = []
    packed = client.pack_file(
        src, blob, reference=ref, progress=lambda done, total: seen.append((done, total))
    )
    assert (packed.format, packed.frames, packed.reference_sha256) == ("tensor", 0, digest)
    assert packed.raw_bytes == len(update) and packed.packed_bytes == blob.stat().st_size
    assert seen[-1] == (len(reference) + len(update),) * 2  # the reference's bytes count too
    # What the sidecar wrote is what the codec writes here, and the codec reads it here.
    assert blob.read_bytes() == codec.pack(update, reference=reference)
    assert codec.unpack(blob.read_bytes(), reference=reference) == update
    assert packed.packed_bytes < len(codec.pack(update, format="tensor")) < len(codec.pack(update))
    unpacked = client.unpack_file(blob, back, reference=ref)
    assert (unpacked.format, unpacked.reference_sha256) == ("tensor", digest)
    assert back.read_bytes() == update
    # The bytes calls, with the reference as bytes.
    assert client.pack(update, reference=reference) == blob.read_bytes()
    assert client.unpack(blob.read_bytes(), reference=reference) == update
    # Without a reference, Pack stays zstd; auto picks the tensor codec for a model.
    plain = client.pack_file(src, tmp_path / "u.zst")
    assert plain.format == "zstd" and plain.frames >= 1
    assert codec.blob_format((tmp_path / "u.zst").read_bytes()[:4]) == "zstd"
    assert client.pack_file(src, tmp_path / "u.auto", format="auto").format == "tensor"
    assert client.unpack(client.pack(b"plain bytes " * 1000, format="auto")) == (
        b"plain bytes " * 1000
    )
    assert _spool(sidecar) == []


def test_a_file_on_the_sidecars_machine_is_used_only_with_its_digest(
    tmp_path: Path, sidecar: SidecarProcess, client: SidecarClient, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    ref = tmp_path / "g.pt"
    ref.write_bytes(reference)
    digest = hashlib.sha256(reference).hexdigest()
    blob = client.pack(update, reference=SidecarFile(ref))  # digest hashed here
    assert codec.unpack(blob, reference=reference) == update
    assert client.unpack(blob, reference=SidecarFile(str(ref), digest)) == update
    secret = tmp_path / "secret-token"
    secret.write_text("s3cr3t-value")
    messages = set()
    for target in (secret, tmp_path / "missing", tmp_path):
        with pytest.raises(SidecarError) as caught:
            client.unpack(blob, reference=SidecarFile(target, digest))
        assert caught.value.code == "FAILED_PRECONDITION"
        messages.add(str(caught.value).replace(str(target), "PATH"))
    assert len(messages) == 1 and "s3cr3t" not in messages.pop()
    # Over the raw stub: a path without a digest is a bad request.
    code, details, _ = _status(
        lambda: _raw_unpack(
            sidecar, blob, pb.UnpackOptions(reference=pb.CodecReference(path=str(ref)))
        )
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in details
    assert _spool(sidecar) == []


# --- hostile inputs ---------------------------------------------------------------


def test_missing_and_wrong_references_are_failed_precondition(
    sidecar: SidecarProcess, client: SidecarClient, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    blob = codec.pack(update, reference=reference)
    code, details, trailers = _status(lambda: _raw_unpack(sidecar, blob))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "none was given" in details
    assert trailers[ERROR_CLASS_KEY] == "ReferenceMismatchError"
    other = _archive(_state(2))
    streamed = pb.UnpackOptions(reference=pb.CodecReference(streamed=True))
    code, _, trailers = _status(lambda: _raw_unpack(sidecar, blob, streamed, other))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert trailers[ERROR_CLASS_KEY] == "ReferenceMismatchError"
    # A reference of other shapes and dtypes: its size differs, the blob refuses it.
    misshapen = _state(1)
    misshapen["fc.weight"] = misshapen["fc.weight"][:100].clone()  # another shape
    misshapen["fc.bias"] = misshapen["fc.bias"].to(torch.float16)  # another dtype
    misshapen["steps"] = misshapen["steps"].to(torch.int32)
    with pytest.raises(ReferenceMismatchError):
        client.unpack(blob, reference=_archive(misshapen))
    # ... and packed against it, nothing matched: coded alone, no reference needed.
    alone = client.pack(update, reference=_archive(misshapen))
    assert not codec.tensor_info(alone).uses_reference
    assert client.unpack(alone) == update
    # The trainer's typed error, also a SidecarError with the code.
    with pytest.raises(ReferenceMismatchError) as caught:
        client.unpack(blob)
    assert isinstance(caught.value, SidecarError)
    assert caught.value.code == "FAILED_PRECONDITION"
    assert _spool(sidecar) == []


def test_truncated_lying_and_bomb_blobs_end_in_their_codes(
    sidecar: SidecarProcess, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    blob = codec.pack(update, reference=reference)
    streamed = pb.UnpackOptions(reference=pb.CodecReference(streamed=True))
    code, _, trailers = _status(lambda: _raw_unpack(sidecar, blob[:-9], streamed, reference))
    assert code == grpc.StatusCode.DATA_LOSS
    assert trailers[ERROR_CLASS_KEY] == "TruncatedDataError"
    lying = bytearray(blob)
    struct.pack_into("<Q", lying, 8, len(update) * 2)
    code, _, trailers = _status(lambda: _raw_unpack(sidecar, bytes(lying), streamed, reference))
    assert code == grpc.StatusCode.DATA_LOSS
    assert trailers[ERROR_CLASS_KEY] == "ChecksumMismatchError"
    zeros_model = _archive({"w": torch.zeros(4 * MIB)})  # 16 MiB
    zeros = codec.pack(zeros_model, format="tensor")
    code, details, _ = _status(
        lambda: _raw_unpack(sidecar, zeros, pb.UnpackOptions(max_output_size=MIB))
    )
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and str(MIB) in details
    header = bytearray(zeros[:48])
    struct.pack_into("<Q", header, 8, 1 << 45)  # claims 32 TiB
    code, _, _ = _status(lambda: _raw_unpack(sidecar, bytes(header)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    out, summary = _raw_unpack(sidecar, zeros)
    assert out == zeros_model and summary.raw_bytes == len(zeros_model)
    assert _spool(sidecar) == []


def test_a_tensor_pack_of_no_model_or_over_the_limit_is_refused(
    models: Tuple[bytes, bytes],
) -> None:
    reference, update = models
    with running_sidecar(args=["--max-model-size", "1M"], notifications=False) as small:
        with SidecarClient(small.target) as c:
            with pytest.raises(SidecarError) as caught:
                c.pack(b"no model here " * 100, format="tensor")
            assert caught.value.code == "INVALID_ARGUMENT"
            with pytest.raises(SidecarError) as caught:
                c.pack(update, reference=reference)  # 1.2 MiB of reference > 1 MiB
            assert caught.value.code == "RESOURCE_EXHAUSTED"
            assert "1048576" in str(caught.value)
            # zstd streams past the limit, as before.
            assert codec.unpack(c.pack(update)) == update
        assert spool_model_files(small.workdir / "spool") == []


# --- a held global model ------------------------------------------------------------


def _module_archive(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def test_the_held_global_model_is_a_reference(tmp_path: Path, stack: TrainerStack) -> None:
    side = stack.add_client()
    ids = stack.training([side], rounds=1, start=True)
    assert stack.devserver.wait_idle(timeout=30)  # round 0's start reached the sidecar
    model_path = tmp_path / "global.pt"
    downloaded = side.client.download_to_file(ids["model_id"], model_path)
    reference = model_path.read_bytes()
    assert downloaded.sha256 == hashlib.sha256(reference).hexdigest()
    module = tiny_module()
    module.load_state_dict(torch.load(io.BytesIO(reference), weights_only=False).state_dict())
    with torch.no_grad():
        module[0].weight.add_(0.001)  # one layer trained
    update = _module_archive(module)
    held = HeldModel(ids["model_id"], 0, downloaded.sha256)
    src, blob, back = tmp_path / "u.pt", tmp_path / "u.fltc", tmp_path / "back.pt"
    src.write_bytes(update)
    packed = side.client.pack_file(src, blob, reference=held)
    assert (packed.format, packed.reference_sha256) == ("tensor", downloaded.sha256)
    assert codec.unpack(blob.read_bytes(), reference=reference) == update
    unpacked = side.client.unpack_file(blob, back, reference=HeldModel(ids["model_id"], 0))
    assert back.read_bytes() == update and unpacked.reference_sha256 == downloaded.sha256
    # A round the sidecar holds nothing for: refused, never fetched.
    with pytest.raises(SidecarError) as caught:
        side.client.unpack(blob.read_bytes(), reference=HeldModel(ids["model_id"], 7))
    assert caught.value.code == "FAILED_PRECONDITION"
    assert "holds no global model" in str(caught.value)
    # Held, but not the bytes the trainer trained from.
    with pytest.raises(ReferenceMismatchError):
        side.client.pack(update, reference=HeldModel(ids["model_id"], 0, "0" * 64))


# --- the CLI, as a subprocess -------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FL_SIDECAR_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [_PACKAGE_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    return subprocess.run(
        [sys.executable, "-m", "fl_sidecar", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_cli_packs_and_unpacks_with_a_reference(
    tmp_path: Path, sidecar: SidecarProcess, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    digest = hashlib.sha256(reference).hexdigest()
    (tmp_path / "u.pt").write_bytes(update)
    (tmp_path / "g.pt").write_bytes(reference)
    run = _cli("pack", "u.pt", "u.fltc", "--reference", "g.pt", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert f"against the reference {digest[:16]}" in run.stdout
    blob = (tmp_path / "u.fltc").read_bytes()
    assert blob == codec.pack(update, reference=reference)
    info = _cli("info", "u.fltc", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert f"tensor blob (format 1), {len(blob)} B packed, {len(update)} B raw" in info.stdout
    assert f"needs its reference ({len(reference)} B)" in info.stdout
    # Without the reference: a typed error, exit 1, and no output file.
    run = _cli("unpack", "u.fltc", "back.pt", cwd=tmp_path)
    assert run.returncode == 1
    assert "ReferenceMismatchError" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "back.pt").exists()
    (tmp_path / "other.pt").write_bytes(_archive(_state(2)))
    run = _cli("unpack", "u.fltc", "back.pt", "--reference", "other.pt", cwd=tmp_path)
    assert run.returncode == 1 and "ReferenceMismatchError" in run.stderr
    run = _cli("unpack", "u.fltc", "back.pt", "--reference", "g.pt", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "back.pt").read_bytes() == update
    # Truncated, and a bomb past --max-size: exit 1 with the error's name.
    (tmp_path / "cut.fltc").write_bytes(blob[: len(blob) // 2])
    run = _cli("unpack", "cut.fltc", "cut.pt", "--reference", "g.pt", cwd=tmp_path)
    assert run.returncode == 1 and "TruncatedDataError" in run.stderr
    (tmp_path / "zeros.pt").write_bytes(_archive({"w": torch.zeros(MIB)}))
    run = _cli("pack", "zeros.pt", "zeros.fltc", "--format", "tensor", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    run = _cli("unpack", "zeros.fltc", "z.pt", "--max-size", "64KiB", cwd=tmp_path)
    assert run.returncode == 1 and "SizeLimitExceededError" in run.stderr
    assert not (tmp_path / "z.pt").exists()
    # Through the sidecar: the reference is streamed to it.
    target = sidecar.target
    run = _cli(
        "pack",
        "u.pt",
        "via.fltc",
        "--reference",
        "g.pt",
        "--via-sidecar",
        "--target",
        target,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "via.fltc").read_bytes() == blob
    run = _cli("unpack", "via.fltc", "via.pt", "--via-sidecar", "--target", target, cwd=tmp_path)
    assert run.returncode == 1 and "none was given" in run.stderr
    run = _cli(
        "unpack",
        "via.fltc",
        "via.pt",
        "--reference",
        "g.pt",
        "--via-sidecar",
        "--target",
        target,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "via.pt").read_bytes() == update
    # Options that do not go together: bad usage.
    for args in (
        ("pack", "u.pt", "x", "--format", "zstd", "--reference", "g.pt"),
        ("unpack", "u.fltc", "x", "--held-reference", "m", "0"),
        ("pack", "u.pt", "x", "--held-reference", "m", "zero", "--via-sidecar"),
    ):
        run = _cli(*args, cwd=tmp_path)
        assert run.returncode == 2, (args, run.stderr)
    assert not (tmp_path / "x").exists()
    assert _spool(sidecar) == []
