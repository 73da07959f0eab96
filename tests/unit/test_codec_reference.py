"""The codec's offline faces with a reference model: ``codec.pack``/``unpack`` (and their
file variants) writing and reading tensor blobs, and the sidecar's Pack/Unpack streams
(:mod:`fl_sidecar.sidecar.codecstreams`) with held, streamed and path references, driven
with real messages, a real spool directory and a real held-model cache (no process: the
integration tests run the same through the sidecar subprocess). Hostile inputs give typed
errors: missing, wrong and misshapen references, truncated blobs, sizes that lie, bombs.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Generator, Iterator, List, Optional, Tuple, cast

import pytest
import torch
from test_tensor_codec import HEADER, _reseal

from fl_sidecar import codec
from fl_sidecar.errors import (
    ChecksumMismatchError,
    CorruptDataError,
    ModelFormatError,
    ReferenceMismatchError,
    SidecarError,
    SizeLimitExceededError,
    TruncatedDataError,
)
from fl_sidecar.sidecar import codecstreams
from fl_sidecar.sidecar.codecstreams import (
    CodecResources,
    pack_stream,
    tensor_blob_limit,
    unpack_stream,
)
from fl_sidecar.sidecar.templates import ModelFacts, TemplateCache
from fl_sidecar.v1 import sidecar_pb2 as pb

MIB = 1024 * 1024


def _archive(state: Dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def _state(seed: int, step: float = 0.0) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 300, generator=g) * 0.05
    return {
        "fc.weight": w + step * torch.sign(w) * 1e-3,
        "fc.bias": (torch.randn(256, generator=g) * 0.01).to(torch.bfloat16),
        "steps": torch.arange(1000, dtype=torch.int64),
    }


@pytest.fixture(scope="module")
def models() -> Tuple[bytes, bytes]:
    """A global model and the update trained from it (torch archives)."""
    return _archive(_state(1)), _archive(_state(1, step=0.5))


# --- codec.pack / codec.unpack ---------------------------------------------------


def test_pack_with_a_reference_writes_a_smaller_tensor_blob_that_needs_it(
    models: Tuple[bytes, bytes],
) -> None:
    reference, update = models
    blob = codec.pack(update, reference=reference)
    assert codec.blob_format(blob) == codec.FORMAT_TENSOR
    assert codec.tensor_info(blob).uses_reference
    alone = codec.pack(update, format="tensor")
    plain = codec.pack(update)
    assert len(blob) < len(alone) < len(plain)
    assert codec.unpack(blob, reference=reference) == update
    assert codec.unpack(alone) == update
    with pytest.raises(ReferenceMismatchError, match="none was given"):
        codec.unpack(blob)


def test_a_reference_may_be_bytes_a_str_path_or_a_path(
    tmp_path: Path, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    path = tmp_path / "global.pt"
    path.write_bytes(reference)
    blobs = {
        codec.pack(update, reference=given)
        for given in (reference, bytearray(reference), memoryview(reference), str(path), path)
    }
    assert len(blobs) == 1
    blob = blobs.pop()
    for given in (reference, str(path), path):
        assert codec.unpack(blob, reference=given) == update
    with pytest.raises(OSError):
        codec.unpack(blob, reference=tmp_path / "missing.pt")


def test_without_a_reference_or_format_pack_is_the_zstd_format_as_before(
    models: Tuple[bytes, bytes],
) -> None:
    _reference, update = models
    blob = codec.pack(update)
    assert codec.blob_format(blob) == codec.FORMAT_ZSTD
    assert codec.inspect(blob).has_seek_table
    assert blob == codec.pack(
        update, level=codec.DEFAULT_LEVEL, chunk_size=codec.DEFAULT_CHUNK_SIZE
    )
    assert codec.pack(update, format="zstd") == blob


def test_a_zstd_blob_ignores_a_reference(models: Tuple[bytes, bytes]) -> None:
    reference, update = models
    assert codec.unpack(codec.pack(update), reference=reference) == update
    # So does a tensor blob coded without one.
    assert codec.unpack(codec.pack(update, format="tensor"), reference=b"anything") == update


def test_auto_codes_model_files_with_the_tensor_codec_and_the_rest_with_zstd(
    models: Tuple[bytes, bytes],
) -> None:
    _reference, update = models
    assert codec.blob_format(codec.pack(update, format="auto")) == codec.FORMAT_TENSOR
    text = b"not a model, " * 1000
    blob = codec.pack(text, format="auto")
    assert codec.blob_format(blob) == codec.FORMAT_ZSTD
    assert codec.unpack(blob) == text


def test_bad_formats_and_non_models_are_typed_errors(models: Tuple[bytes, bytes]) -> None:
    reference, update = models
    with pytest.raises(ValueError, match="tensor format"):
        codec.pack(update, reference=reference, format="zstd")
    with pytest.raises(ValueError, match="unknown format"):
        codec.pack(update, format="zip")
    with pytest.raises(ModelFormatError):
        codec.pack(b"plain bytes" * 100, format="tensor")
    with pytest.raises(ModelFormatError):
        codec.pack(update, reference=b"not a model at all")
    with pytest.raises(ValueError):
        codec.pack(update, reference=reference, level=codec.MAX_LEVEL + 1)


def test_a_wrong_reference_is_a_reference_mismatch(models: Tuple[bytes, bytes]) -> None:
    reference, update = models
    blob = codec.pack(update, reference=reference)
    other = _archive(_state(2))  # same names, shapes and size; other values
    assert len(other) == len(reference)
    with pytest.raises(ReferenceMismatchError, match="block"):
        codec.unpack(blob, reference=other)
    with pytest.raises(ReferenceMismatchError, match="bytes"):
        codec.unpack(blob, reference=reference[:-1])


def test_a_reference_of_other_shapes_or_dtypes_is_not_used_and_not_accepted_back(
    models: Tuple[bytes, bytes],
) -> None:
    reference, update = models
    misshapen = _state(1)
    misshapen["fc.weight"] = misshapen["fc.weight"][:128].clone()  # another shape
    misshapen["fc.bias"] = misshapen["fc.bias"].to(torch.float16)  # another dtype
    misshapen["steps"] = misshapen["steps"].to(torch.int32)
    odd = _archive(misshapen)
    blob = codec.pack(update, reference=odd)
    # No tensor had a twin: coded alone, so it needs no reference.
    assert not codec.tensor_info(blob).uses_reference
    assert codec.unpack(blob) == update
    # A blob coded against the right reference refuses the misshapen one.
    with pytest.raises(ReferenceMismatchError):
        codec.unpack(codec.pack(update, reference=reference), reference=odd)


def test_safetensors_models_code_against_a_safetensors_reference() -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    reference = safetensors_torch.save({k: v.contiguous() for k, v in _state(3).items()})
    update = safetensors_torch.save({k: v.contiguous() for k, v in _state(3, 0.5).items()})
    blob = codec.pack(update, reference=reference)
    assert codec.tensor_info(blob).uses_reference
    assert len(blob) < len(codec.pack(update, format="tensor"))
    assert codec.unpack(blob, reference=reference) == update


def test_the_file_variants_round_trip_and_leave_dst_alone_on_errors(
    tmp_path: Path, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    src, ref, blob, out = (tmp_path / n for n in ("update.pt", "global.pt", "u.fltc", "out.pt"))
    src.write_bytes(update)
    ref.write_bytes(reference)
    stats = codec.pack_file(src, blob, reference=ref)
    assert (stats.raw_size, stats.packed_size, stats.frames) == (
        len(update),
        blob.stat().st_size,
        0,
    )
    assert blob.read_bytes() == codec.pack(update, reference=reference)
    assert codec.unpack_file(blob, out, reference=ref) == len(update)
    assert out.read_bytes() == update
    out.write_bytes(b"the previous file")
    with pytest.raises(ReferenceMismatchError):
        codec.unpack_file(blob, out)
    with pytest.raises(ReferenceMismatchError):
        codec.unpack_file(blob, out, reference=_archive(_state(2)))
    assert out.read_bytes() == b"the previous file"
    # auto: a model becomes a tensor blob, anything else zstd (streamed as before).
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"words " * 10_000)
    assert codec.pack_file(notes, tmp_path / "n.zst", format="auto").frames >= 1
    assert codec.blob_format((tmp_path / "n.zst").read_bytes()[:4]) == codec.FORMAT_ZSTD
    assert codec.pack_file(src, tmp_path / "a.fltc", format="auto").frames == 0
    with pytest.raises(ModelFormatError):
        codec.pack_file(notes, tmp_path / "bad", format="tensor")
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".fl-sidecar-")]


def test_truncated_and_lying_tensor_blobs_are_corrupt_data(
    tmp_path: Path, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    blob = codec.pack(update, reference=reference)
    for cut in (5, HEADER - 1, HEADER + 40, len(blob) // 2, len(blob) - 1):
        with pytest.raises(CorruptDataError):
            codec.unpack(blob[:cut], reference=reference)
    with pytest.raises(TruncatedDataError):
        codec.unpack(blob[:-1], reference=reference)
    cut_file = tmp_path / "cut.fltc"
    cut_file.write_bytes(blob[:-100])
    with pytest.raises(TruncatedDataError):
        codec.unpack_file(cut_file, tmp_path / "out", reference=reference)
    assert not (tmp_path / "out").exists()
    # A total size that lies: the index checksum says so; resealed, the segments do.
    lying = bytearray(blob)
    struct.pack_into("<Q", lying, 8, len(update) + 8)
    with pytest.raises(ChecksumMismatchError):
        codec.unpack(bytes(lying), reference=reference)
    _reseal(lying)
    with pytest.raises(CorruptDataError, match="segments cover"):
        codec.unpack(bytes(lying), reference=reference)
    # A reference size that lies is a reference mismatch, not a wrong model.
    lying = bytearray(blob)
    struct.pack_into("<Q", lying, 32, len(reference) + 1)
    _reseal(lying)
    with pytest.raises(ReferenceMismatchError):
        codec.unpack(bytes(lying), reference=reference)


def test_a_tensor_bomb_is_refused_before_allocating(tmp_path: Path) -> None:
    zeros = _archive({"w": torch.zeros(4 * MIB)})  # 16 MiB of zeros
    blob = codec.pack(zeros, format="tensor")
    assert len(blob) < 64 * 1024
    with pytest.raises(SizeLimitExceededError):
        codec.unpack(blob, max_output_size=MIB)
    header = bytearray(blob[:HEADER])
    struct.pack_into("<Q", header, 8, 1 << 45)
    with pytest.raises(SizeLimitExceededError):
        codec.unpack(bytes(header))
    bomb = tmp_path / "bomb.fltc"
    bomb.write_bytes(bytes(header))
    with pytest.raises(SizeLimitExceededError):
        codec.unpack_file(bomb, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the sidecar's Pack / Unpack streams -----------------------------------------


class Held:
    """A real held-model cache holding what :meth:`hold` gives it (nothing is fetched)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

        def no_fetch(*_args: Any) -> ModelFacts:
            raise AssertionError("Pack and Unpack never fetch a model")

        self.cache = TemplateCache(lambda: directory / f"{uuid.uuid4().hex}.template", no_fetch)

    def hold(self, model_id: str, round_: int, data: bytes) -> str:
        source = self.directory / f"{model_id}-{round_}.download"
        source.write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        facts = ModelFacts(len(data), digest, "identity", len(data), vetted=True)
        assert self.cache.adopt((model_id, round_), source, facts)
        source.unlink()  # the download's own name goes; the cache keeps its link
        return digest

    def pinned(self) -> int:
        return sum(t.users for t in self.cache._entries.values())


@pytest.fixture()
def spool(tmp_path: Path) -> Path:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture()
def held(tmp_path: Path) -> Held:
    directory = tmp_path / "held"
    directory.mkdir()
    return Held(directory)


def _resources(spool: Path, held: Optional[Held] = None, max_size: int = 64 * MIB) -> Any:
    return CodecResources(spool, max_size, held.cache if held is not None else None)


def _messages(
    kind: Any,
    options: Any,
    data: bytes,
    reference: Optional[bytes] = None,
    step: int = 300_000,
) -> Iterator[Any]:
    if options is not None:
        yield kind(options=options)
    if reference is not None:
        for start in range(0, len(reference), step):
            yield kind(reference_chunk=reference[start : start + step])
    for start in range(0, len(data), step):
        yield kind(chunk=data[start : start + step])


def _run(responses: Iterator[Any]) -> Tuple[bytes, Any]:
    chunks: List[bytes] = []
    summary = None
    for message in responses:
        assert summary is None, "a message after the summary"
        if message.WhichOneof("kind") == "chunk":
            assert len(message.chunk) <= 4 * MIB
            chunks.append(message.chunk)
        else:
            summary = message.summary
    assert summary is not None
    return b"".join(chunks), summary


def _pack(spool: Path, data: bytes, options: Any, **kwargs: Any) -> Tuple[bytes, Any]:
    held = kwargs.pop("held", None)
    resources = _resources(spool, held, kwargs.pop("max_size", 64 * MIB))
    return _run(pack_stream(_messages(pb.PackRequest, options, data, **kwargs), resources))


def _unpack(spool: Path, blob: bytes, options: Any, **kwargs: Any) -> Tuple[bytes, Any]:
    held = kwargs.pop("held", None)
    max_size = kwargs.pop("max_size", 64 * MIB)
    messages = _messages(pb.UnpackRequest, options, blob, **kwargs)
    return _run(unpack_stream(messages, max_size, _resources(spool, held, max_size)))


def _streamed(sha256: str = "") -> pb.CodecReference:
    return pb.CodecReference(streamed=True, sha256=sha256)


def _held_ref(model_id: str, round_: int, sha256: str = "") -> pb.CodecReference:
    return pb.CodecReference(
        held=pb.CodecReference.HeldModel(model_id=model_id, round=round_), sha256=sha256
    )


def _code(call: Any) -> Tuple[str, str]:
    with pytest.raises(SidecarError) as caught:
        call()
    return caught.value.code, str(caught.value)


def test_a_streamed_reference_packs_and_unpacks_and_the_spool_is_left_empty(
    spool: Path, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    digest = hashlib.sha256(reference).hexdigest()
    options = pb.PackOptions(reference=_streamed())
    blob, summary = _pack(spool, update, options, reference=reference)
    assert blob == codec.pack(update, reference=reference)
    assert (summary.format, summary.frames, summary.reference_sha256) == ("tensor", 0, digest)
    assert (summary.raw_bytes, summary.packed_bytes) == (len(update), len(blob))
    out, summary = _unpack(
        spool, blob, pb.UnpackOptions(reference=_streamed(digest)), reference=reference
    )
    assert out == update
    assert (summary.format, summary.reference_sha256) == ("tensor", digest)
    assert (summary.packed_bytes, summary.raw_bytes) == (len(blob), len(update))
    assert list(spool.iterdir()) == []


def test_a_held_model_is_a_reference_and_is_let_go_after(
    spool: Path, held: Held, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    digest = held.hold("m1", 3, reference)
    blob, summary = _pack(spool, update, pb.PackOptions(reference=_held_ref("m1", 3)), held=held)
    assert summary.reference_sha256 == digest
    assert codec.unpack(blob, reference=reference) == update
    out, summary = _unpack(
        spool, blob, pb.UnpackOptions(reference=_held_ref("m1", 3, digest.upper())), held=held
    )
    assert out == update and summary.reference_sha256 == digest
    assert held.pinned() == 0
    # Not held (another round, another model): refused, never fetched.
    for spec in (_held_ref("m1", 4), _held_ref("m2", 3)):
        code, message = _code(
            lambda spec=spec: _unpack(spool, blob, pb.UnpackOptions(reference=spec), held=held)
        )
        assert code == "FAILED_PRECONDITION" and "holds no global model" in message
    # Held, but not the bytes the trainer says.
    with pytest.raises(ReferenceMismatchError, match="SHA-256"):
        _pack(spool, update, pb.PackOptions(reference=_held_ref("m1", 3, "0" * 64)), held=held)
    assert held.pinned() == 0
    assert list(spool.iterdir()) == []


def test_a_path_reference_needs_its_digest_and_reveals_nothing_without_it(
    tmp_path: Path, spool: Path, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    path = tmp_path / "global.pt"
    path.write_bytes(reference)
    digest = hashlib.sha256(reference).hexdigest()
    blob, summary = _pack(
        spool, update, pb.PackOptions(reference=pb.CodecReference(path=str(path), sha256=digest))
    )
    assert summary.reference_sha256 == digest
    assert codec.unpack(blob, reference=reference) == update
    # Without a digest, relative, or malformed: a bad request, nothing read.
    for spec, words in (
        (pb.CodecReference(path=str(path)), "needs reference.sha256"),
        (pb.CodecReference(path="global.pt", sha256=digest), "absolute"),
        (pb.CodecReference(path=str(path), sha256="abc"), "64 hex digits"),
        (pb.CodecReference(sha256=digest), "one of held, streamed or path"),
    ):
        code, message = _code(
            lambda spec=spec: _pack(spool, update, pb.PackOptions(reference=spec))
        )
        assert code == "INVALID_ARGUMENT" and words in message
    # Other bytes, no file, a directory, a FIFO (not waited on), a device: one answer.
    secret = tmp_path / "secret"
    secret.write_bytes(b"token-123")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    answers = set()
    for target in (secret, tmp_path / "missing", tmp_path, fifo, Path("/dev/zero")):
        spec = pb.CodecReference(path=str(target), sha256=digest)
        code, message = _code(
            lambda spec=spec: _unpack(spool, blob, pb.UnpackOptions(reference=spec))
        )
        assert code == "FAILED_PRECONDITION"
        answers.add(message.replace(str(target), "PATH"))
    assert len(answers) == 1, answers
    assert "token" not in answers.pop()
    assert list(spool.iterdir()) == []


def test_a_tensor_blob_needs_its_reference_over_the_stream_too(
    spool: Path, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    blob = codec.pack(update, reference=reference)
    with pytest.raises(ReferenceMismatchError, match="none was given"):
        _unpack(spool, blob, None)
    with pytest.raises(ReferenceMismatchError):
        _unpack(spool, blob, pb.UnpackOptions(reference=_streamed()), reference=_archive(_state(2)))
    # A streamed reference whose digest is not the one announced.
    with pytest.raises(ReferenceMismatchError, match="SHA-256"):
        _unpack(
            spool,
            blob,
            pb.UnpackOptions(reference=_streamed("ab" * 32)),
            reference=reference,
        )
    # A zstd stream with a reference: the reference is not needed, and not reported.
    out, summary = _unpack(
        spool, codec.pack(update), pb.UnpackOptions(reference=_streamed()), reference=reference
    )
    assert out == update and (summary.format, summary.reference_sha256) == ("zstd", "")
    assert list(spool.iterdir()) == []


def test_hostile_tensor_blobs_over_the_stream_are_typed_errors(
    spool: Path, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    blob = codec.pack(update, reference=reference)
    options = pb.UnpackOptions(reference=_streamed())
    with pytest.raises(TruncatedDataError):
        _unpack(spool, blob[:-7], options, reference=reference)
    lying = bytearray(blob)
    struct.pack_into("<Q", lying, 8, len(update) - 8)
    with pytest.raises(ChecksumMismatchError):
        _unpack(spool, bytes(lying), options, reference=reference)
    _reseal(lying)
    with pytest.raises(CorruptDataError):
        _unpack(spool, bytes(lying), options, reference=reference)
    # Bombs: a small blob of a large output, and a header that claims 32 TiB.
    zeros = codec.pack(_archive({"w": torch.zeros(4 * MIB)}), format="tensor")
    with pytest.raises(SizeLimitExceededError):
        _unpack(spool, zeros, pb.UnpackOptions(max_output_size=MIB))
    header = bytearray(zeros[:HEADER])
    struct.pack_into("<Q", header, 8, 1 << 45)
    with pytest.raises(SizeLimitExceededError):
        _unpack(spool, bytes(header), None)
    # A trainer's max_output_size never lifts the sidecar's limit.
    with pytest.raises(SizeLimitExceededError):
        _unpack(spool, zeros, pb.UnpackOptions(max_output_size=1 << 40), max_size=MIB)
    assert list(spool.iterdir()) == []


def test_the_tensor_blob_spooled_for_unpack_is_bounded(
    spool: Path, models: Tuple[bytes, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Room for the output, 1/64 more, and the largest index the format allows.
    assert tensor_blob_limit(1 << 30) == (1 << 30) + (1 << 24) + 32 * 2**20 + 64 * 2**22 + 56
    _reference, update = models
    blob = codec.pack(update, format="tensor")
    monkeypatch.setattr(codecstreams, "_INDEX_ROOM", 0)  # a limit small enough to reach
    with pytest.raises(SizeLimitExceededError, match="tensor blob exceeds"):
        _unpack(spool, blob + bytes(len(update)), None, max_size=len(update))
    assert list(spool.iterdir()) == []


def test_pack_streams_refuse_what_does_not_go_together(
    spool: Path, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    cases = [
        (pb.PackOptions(format=pb.PACK_FORMAT_ZSTD, reference=_streamed()), "PACK_FORMAT_TENSOR"),
        (pb.PackOptions(format=99), "unknown PackOptions.format"),  # type: ignore[arg-type]
        (pb.PackOptions(format=pb.PACK_FORMAT_TENSOR, level=99), "outside"),
    ]
    for options, words in cases:
        code, message = _code(
            lambda options=options: _pack(spool, update, options, reference=reference)
        )
        assert code == "INVALID_ARGUMENT" and words in message
    # reference_chunk messages without a streamed reference, or after the data began.
    code, message = _code(lambda: _pack(spool, update, None, reference=reference))
    assert code == "INVALID_ARGUMENT" and "without reference.streamed" in message
    late = iter(
        [
            pb.PackRequest(options=pb.PackOptions(reference=_streamed())),
            pb.PackRequest(reference_chunk=reference),
            pb.PackRequest(chunk=update),
            pb.PackRequest(reference_chunk=b"late"),
        ]
    )
    code, message = _code(lambda: _run(pack_stream(late, _resources(spool))))
    assert code == "INVALID_ARGUMENT" and "after the first chunk" in message
    # Not a model, for the tensor format: the model file error (INVALID_ARGUMENT).
    with pytest.raises(ModelFormatError, match="needs a model file"):
        _pack(spool, b"text " * 1000, pb.PackOptions(format=pb.PACK_FORMAT_TENSOR))
    with pytest.raises(ModelFormatError, match="reference is not a model"):
        _pack(spool, update, pb.PackOptions(reference=_streamed()), reference=b"text")
    # The input is held in the spool up to the sidecar's limit only.
    with pytest.raises(SizeLimitExceededError, match="input"):
        _pack(spool, update, pb.PackOptions(format=pb.PACK_FORMAT_TENSOR), max_size=1000)
    with pytest.raises(SizeLimitExceededError, match="reference"):
        _pack(
            spool,
            update,
            pb.PackOptions(reference=_streamed()),
            reference=reference,
            max_size=len(reference) - 1,
        )
    assert list(spool.iterdir()) == []


def test_pack_streams_keep_zstd_and_auto_picks_by_content(
    spool: Path, models: Tuple[bytes, bytes]
) -> None:
    _reference, update = models
    blob, summary = _pack(spool, update, None)
    assert blob == codec.pack(update) and (summary.format, summary.frames) == ("zstd", 1)
    blob, summary = _pack(spool, update, pb.PackOptions(format=pb.PACK_FORMAT_AUTO))
    assert summary.format == "tensor" and codec.unpack(blob) == update
    text = b"words " * 100_000
    blob, summary = _pack(
        spool, text, pb.PackOptions(format=pb.PACK_FORMAT_AUTO, chunk_size=64 * 1024)
    )
    assert summary.format == "zstd" and summary.frames == -(-len(text) // (64 * 1024))
    assert codec.unpack(blob) == text
    out, summary = _unpack(spool, blob, None)
    assert out == text and summary.format == "zstd"
    assert list(spool.iterdir()) == []


def test_a_call_that_stops_midway_leaves_nothing_pinned_or_spooled(
    spool: Path, held: Held, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    held.hold("m", 0, reference)
    blob = codec.pack(update, reference=reference)

    def broken() -> Iterator[Any]:
        yield pb.UnpackRequest(options=pb.UnpackOptions(reference=_held_ref("m", 0)))
        yield pb.UnpackRequest(chunk=blob[:1000])
        raise SidecarError("the trainer went away mid-stream", code="CANCELLED")

    with pytest.raises(SidecarError):
        _run(unpack_stream(broken(), 64 * MIB, _resources(spool, held)))
    # A reader that stops after the first output message.
    stream = unpack_stream(
        _messages(pb.UnpackRequest, pb.UnpackOptions(reference=_held_ref("m", 0)), blob),
        64 * MIB,
        _resources(spool, held),
    )
    next(stream)
    cast(Generator[Any, None, None], stream).close()
    assert held.pinned() == 0
    assert list(spool.iterdir()) == []


def test_concurrent_calls_share_one_held_model(
    spool: Path, held: Held, models: Tuple[bytes, bytes]
) -> None:
    reference, update = models
    held.hold("m", 0, reference)
    blob = codec.pack(update, reference=reference)
    results: List[bytes] = []

    def one() -> None:
        out, _summary = _unpack(
            spool, blob, pb.UnpackOptions(reference=_held_ref("m", 0)), held=held
        )
        results.append(out)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [update] * 4
    assert held.pinned() == 0
