"""The codec's Python face: round trips, zero-copy inputs, streaming, files, inspect,
and decoding our blobs with other decoders in-process (python-zstandard, urllib3)."""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import List

import numpy as np
import pytest
import urllib3.response
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sidecar import codec
from fl_sidecar.errors import CodecError, FlSidecarError, SizeLimitExceededError

SMALL_CHUNKS = st.sampled_from([1, 7, 64, 333, 1024])
THREADS = st.sampled_from([0, 1, 2, 3])
LEVELS = st.sampled_from([-5, -1, 0, *range(1, codec.MAX_LEVEL + 1)])


def sizes_around_multiples(chunk: int) -> List[int]:
    """0, 1, and every k * chunk with one byte either side, for k in 1..3."""
    out = {0, 1}
    for k in (1, 2, 3):
        out.update({k * chunk - 1, k * chunk, k * chunk + 1})
    return sorted(n for n in out if n >= 0)


def zstandard_read_all(blob: bytes) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=True)
    with reader:
        return reader.read()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=5000), chunk=SMALL_CHUNKS, threads=THREADS, level=LEVELS)
def test_round_trip_random_bytes(data: bytes, chunk: int, threads: int, level: int) -> None:
    blob = codec.pack(data, level=level, chunk_size=chunk, threads=threads)
    assert codec.unpack(blob, threads=threads) == data
    info = codec.inspect(blob)
    assert info.decompressed_size == len(data)
    assert info.frames == max(1, -(-len(data) // chunk))
    assert info.has_checksums and info.has_seek_table
    assert info.compressed_size == len(blob)


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(
        st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=0, max_size=700
    ),
    chunk=SMALL_CHUNKS,
)
def test_round_trip_float_arrays(values: List[float], chunk: int) -> None:
    array = np.array(values, dtype=np.float32)
    blob = codec.pack(array, chunk_size=chunk)
    out = np.frombuffer(codec.unpack(blob), dtype=np.float32)
    np.testing.assert_array_equal(out, array)


@pytest.mark.parametrize("chunk", [1, 64, 1000])
def test_sizes_around_chunk_multiples(chunk: int) -> None:
    for n in sizes_around_multiples(chunk):
        data = os.urandom(n)
        for threads in (0, 1, 2):
            blob = codec.pack(data, chunk_size=chunk, threads=threads)
            assert codec.unpack(blob, threads=threads) == data, n
            assert zstandard_read_all(blob) == data


def test_every_level_offered() -> None:
    data = b"federated learning " * 300
    for level in range(codec.MIN_LEVEL if codec.MIN_LEVEL > -8 else -7, codec.MAX_LEVEL + 1):
        blob = codec.pack(data, level=level, chunk_size=1024)
        assert codec.unpack(blob) == data, level


def test_defaults_are_sane() -> None:
    assert 1 <= codec.DEFAULT_LEVEL <= 19
    assert 64 * 1024 <= codec.DEFAULT_CHUNK_SIZE <= codec.MAX_CHUNK_SIZE == 8 * 1024 * 1024
    assert codec.DEFAULT_MAX_OUTPUT_SIZE >= 1 << 30


@pytest.mark.parametrize(
    "make",
    [
        lambda raw: raw,
        lambda raw: bytearray(raw),
        lambda raw: memoryview(raw),
        lambda raw: memoryview(b"xx" + raw + b"yy")[2:-2],
        lambda raw: np.frombuffer(raw, dtype=np.uint8),
        lambda raw: np.frombuffer(raw, dtype=np.float32).reshape(-1, 4),
    ],
    ids=["bytes", "bytearray", "memoryview", "memoryview-slice", "numpy-u8", "numpy-f32-2d"],
)
def test_buffer_inputs(make: object) -> None:
    raw = np.random.default_rng(1).standard_normal(4096).astype(np.float32).tobytes()
    obj = make(raw)  # type: ignore[operator]
    blob = codec.pack(obj, chunk_size=4000)
    assert codec.unpack(blob) == raw
    assert codec.unpack(memoryview(blob)) == raw
    assert codec.unpack(bytearray(blob)) == raw
    assert codec.unpack(np.frombuffer(blob, dtype=np.uint8)) == raw


def test_pack_reads_the_callers_buffer_in_place() -> None:
    # A writable numpy view aliases the memory: pack sees exactly what is there now,
    # which a hidden copy made earlier could not show.
    array = np.zeros(10_000, dtype=np.uint8)
    view = memoryview(array.data)
    array[123] = 7
    assert codec.unpack(codec.pack(view, chunk_size=512))[123] == 7


def test_non_contiguous_and_non_buffers_are_refused() -> None:
    strided = np.arange(100, dtype=np.int32)[::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        codec.pack(strided)
    with pytest.raises(ValueError, match="C-contiguous"):
        codec.pack(memoryview(b"abcdef")[::2])
    fortran = np.asfortranarray(np.ones((4, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        codec.pack(fortran)
    with pytest.raises(TypeError):
        codec.pack("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        codec.unpack(12345)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chunk_size": 0},
        {"chunk_size": codec.MAX_CHUNK_SIZE + 1},
        {"chunk_size": -1},
        {"level": codec.MAX_LEVEL + 1},
        {"threads": -1},
        {"threads": 100_000},
    ],
)
def test_bad_parameters_are_value_errors(kwargs: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError):
        codec.pack(b"data", **kwargs)
    with pytest.raises(ValueError):
        codec.Packer(**kwargs)


def test_errors_are_the_public_classes() -> None:
    with pytest.raises(SizeLimitExceededError) as info:
        codec.unpack(codec.pack(b"x" * 1000), max_output_size=999)
    assert isinstance(info.value, CodecError)
    assert isinstance(info.value, FlSidecarError)
    assert type(info.value).__module__ == "fl_sidecar.errors"


def test_empty_input_is_one_empty_frame() -> None:
    blob = codec.pack(b"")
    assert codec.is_zstd(blob)
    assert codec.inspect(blob).frames == 1
    assert codec.unpack(blob) == b""
    assert zstandard_read_all(blob) == b""


def test_is_zstd() -> None:
    assert codec.is_zstd(codec.pack(b"abc"))
    assert codec.is_zstd(zstandard.ZstdCompressor().compress(b"abc"))
    assert codec.is_zstd(b"\x5e\x2a\x4d\x18rest")  # a skippable frame first
    assert not codec.is_zstd(b"PK\x03\x04")
    assert not codec.is_zstd(b"\x28\xb5\x2f")
    assert not codec.is_zstd(b"")


def test_streaming_packer_equals_one_shot_and_bounds_its_output() -> None:
    data = np.random.default_rng(2).integers(0, 8, 50_000, dtype=np.uint8).tobytes()
    packer = codec.Packer(chunk_size=1000, threads=2)
    pieces = [packer.write(data[i : i + 777]) for i in range(0, len(data), 777)]
    # Nothing is held back longer than one batch of threads x chunk_size.
    assert sum(len(p) for p in pieces) > 0
    pieces.append(packer.finish())
    blob = b"".join(pieces)
    assert blob == codec.pack(data, chunk_size=1000, threads=2)
    assert packer.stats.raw_size == len(data)
    assert packer.stats.packed_size == len(blob)
    assert packer.stats.frames == 50
    with pytest.raises(ValueError):
        packer.finish()
    with pytest.raises(ValueError):
        packer.write(b"more")


@settings(max_examples=25, deadline=None)
@given(data=st.binary(max_size=3000), piece=st.integers(1, 500), chunk=SMALL_CHUNKS)
def test_streaming_unpacker_any_piece_size(data: bytes, piece: int, chunk: int) -> None:
    blob = codec.pack(data, chunk_size=chunk)
    unpacker = codec.Unpacker()
    out = b"".join(unpacker.write(blob[i : i + piece]) for i in range(0, len(blob), piece))
    unpacker.finish()
    assert out == data
    assert unpacker.produced == len(data)


@settings(max_examples=25, deadline=None)
@given(
    data=st.binary(max_size=400_000) | st.just(bytes(3 << 20)),
    piece=st.integers(1, 200_000),
    bound=st.sampled_from([codec.MIN_PIECE_SIZE, codec.MIN_PIECE_SIZE + 1, 300_000]),
)
def test_bounded_unpacker_any_piece_size(data: bytes, piece: int, bound: int) -> None:
    blob = codec.pack(data, chunk_size=150_000)
    unpacker = codec.Unpacker(max_piece_size=bound)
    outs = [
        out for i in range(0, len(blob), piece) for out in unpacker.write_iter(blob[i : i + piece])
    ]
    unpacker.finish()
    assert b"".join(outs) == data
    assert all(0 < len(out) <= bound for out in outs)


def test_bounded_unpacker_holds_a_copy_and_insists_on_draining() -> None:
    data = bytes(1 << 20) + os.urandom(1000)
    blob = bytearray(codec.pack(data))
    unpacker = codec.Unpacker(max_piece_size=codec.MIN_PIECE_SIZE)
    first = unpacker.write(blob)
    assert 0 < len(first) <= codec.MIN_PIECE_SIZE
    assert unpacker.pending_input > 0
    blob[:] = bytes(len(blob))  # the caller reuses its buffer: what is held is a copy
    with pytest.raises(ValueError, match="drain"):
        unpacker.write(b"more")
    with pytest.raises(ValueError, match="drain"):
        unpacker.finish()
    rest = []
    while unpacker.pending_input:
        rest.append(unpacker.drain())
    assert unpacker.drain() == b""
    unpacker.finish()
    assert first + b"".join(rest) == data


def test_default_unpacker_is_bounded_to_the_default_piece_size() -> None:
    assert codec.DEFAULT_PIECE_SIZE == 4 << 20
    # What fits in one piece comes out at once, nothing held.
    unpacker = codec.Unpacker()
    assert unpacker.write(codec.pack(bytes(3 << 20))) == bytes(3 << 20)
    assert unpacker.pending_input == 0
    assert unpacker.drain() == b""
    assert list(unpacker.write_iter(codec.pack(b"abc"))) == [b"abc"]
    unpacker.finish()
    # More than a piece: one piece now, the rest held for drain(), with or without None.
    for unpacker in (codec.Unpacker(), codec.Unpacker(max_piece_size=None)):
        blob = codec.pack(bytes(10 << 20))
        first = unpacker.write(blob)
        assert len(first) <= codec.DEFAULT_PIECE_SIZE
        assert unpacker.pending_input > 0
        rest = []
        while unpacker.pending_input:
            rest.append(unpacker.drain())
        assert all(len(piece) <= codec.DEFAULT_PIECE_SIZE for piece in rest)
        unpacker.finish()
        assert len(first) + sum(map(len, rest)) == 10 << 20


@pytest.mark.parametrize("bound", [0, 1, codec.MIN_PIECE_SIZE - 1, -1])
def test_piece_bound_below_one_block_is_refused(bound: int) -> None:
    with pytest.raises(ValueError):
        codec.Unpacker(max_piece_size=bound)


def test_zstd_version() -> None:
    version = codec.zstd_version()
    assert re.fullmatch(r"1\.\d+\.\d+", version), version
    # The codec relies on single-segment frames and streaming APIs of 1.4+.
    assert tuple(int(p) for p in version.split(".")) >= (1, 4, 0)


def test_files_round_trip(tmp_path: Path) -> None:
    data = np.random.default_rng(3).standard_normal(300_000).astype(np.float32).tobytes()
    src, packed, back = tmp_path / "w.bin", tmp_path / "w.zst", tmp_path / "back.bin"
    src.write_bytes(data)
    stats = codec.pack_file(src, packed, chunk_size=256 * 1024, threads=2)
    assert stats.raw_size == len(data)
    assert stats.packed_size == packed.stat().st_size
    assert stats.frames == -(-len(data) // (256 * 1024))
    assert packed.read_bytes() == codec.pack(data, chunk_size=256 * 1024)
    assert codec.unpack_file(packed, back) == len(data)
    assert back.read_bytes() == data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.bin", "w.bin", "w.zst"]


def test_failed_file_unpack_leaves_nothing_behind(tmp_path: Path) -> None:
    blob = codec.pack(b"a" * 10_000, chunk_size=1000)
    bad, dst = tmp_path / "bad.zst", tmp_path / "out.bin"
    bad.write_bytes(blob[:-30])
    dst.write_bytes(b"previous")
    with pytest.raises(CodecError):
        codec.unpack_file(bad, dst)
    assert dst.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zst", "out.bin"]
    with pytest.raises(FileNotFoundError):
        codec.pack_file(tmp_path / "missing", tmp_path / "x.zst")


def test_inspect_foreign_blobs() -> None:
    data = b"plain zstd " * 1000
    one = zstandard.ZstdCompressor().compress(data)
    info = codec.inspect(one)
    assert (info.frames, info.decompressed_size, info.has_seek_table) == (1, len(data), False)
    assert info.ratio == pytest.approx(len(data) / len(one))
    streamed = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    assert codec.inspect(streamed).decompressed_size is None
    assert codec.inspect(streamed).ratio is None
    assert codec.unpack(one + streamed) == data + data


def test_decodes_python_zstandard_multi_frame_output() -> None:
    data = os.urandom(1000) * 64
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    segments = cctx.multi_compress_to_buffer([data[i : i + 8192] for i in range(0, 64000, 8192)])
    blob = b"".join(segments[i].tobytes() for i in range(len(segments)))
    assert codec.unpack(blob) == data
    assert codec.inspect(blob).frames == len(segments)


def test_python_zstandard_stream_reader_reads_all_frames() -> None:
    data = os.urandom(50_000)
    blob = codec.pack(data, chunk_size=4096)
    assert zstandard_read_all(blob) == data
    # From a file object, read in small pieces.
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
    pieces = []
    with reader:
        while piece := reader.read(1000):
            pieces.append(piece)
    assert b"".join(pieces) == data


def test_python_zstandard_one_shot_returns_only_the_first_frame_and_we_warn() -> None:
    data = os.urandom(10_000)
    blob = codec.pack(data, chunk_size=4096)
    first = zstandard.ZstdDecompressor().decompress(blob)
    assert first == data[:4096], "python-zstandard changed: revisit the warning"
    doc = codec.__doc__ or ""
    assert "decompress" in doc and "FIRST frame" in doc and "read_across_frames=True" in doc


def test_urllib3_zstd_decoder_reads_all_frames_and_skips_the_seek_table() -> None:
    data = np.random.default_rng(4).standard_normal(20_000).astype(np.float32).tobytes()
    blob = codec.pack(data, chunk_size=10_000)
    assert codec.inspect(blob).frames == 8
    decoder = urllib3.response.ZstdDecoder()
    # Fed in network-sized pieces, as a response body arrives.
    out = b"".join(decoder.decompress(blob[i : i + 1500]) for i in range(0, len(blob), 1500))
    out += decoder.flush()
    assert out == data


def test_concurrent_calls_from_python_threads() -> None:
    import threading

    data = [os.urandom(200_000) for _ in range(2)]
    results: List[bytes] = [b"", b""]

    def work(i: int) -> None:
        results[i] = codec.unpack(codec.pack(data[i], chunk_size=10_000, threads=2))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == data


@pytest.mark.parametrize("operation", ["pack", "unpack", "packer", "unpacker"])
def test_the_gil_is_released_during_native_work(operation: str) -> None:
    # A second thread counts while it holds the GIL. With a long switch interval it gets
    # the GIL only when this thread gives it up, so a count that moves across one native
    # call proves the call released it. (No timing is asserted: it is retried until seen.)
    import sys
    import threading

    data = np.random.default_rng(6).integers(0, 16, 4 << 20, dtype=np.uint8).tobytes()
    blob = codec.pack(data)
    calls = {
        "pack": lambda: codec.pack(data, threads=1),
        "unpack": lambda: codec.unpack(blob, threads=1),
        "packer": lambda: codec.Packer(threads=1).write(data),
        "unpacker": lambda: codec.Unpacker().write(blob),
    }
    count = [0]
    stop = threading.Event()

    def counter() -> None:
        while not stop.is_set():
            count[0] += 1
            stop.wait(0.0002)  # gives the GIL back at once

    old = sys.getswitchinterval()
    sys.setswitchinterval(1.0)
    thread = threading.Thread(target=counter)
    thread.start()
    seen = False
    try:
        for _ in range(50):
            before = count[0]
            calls[operation]()
            if count[0] > before:
                seen = True
                break
    finally:
        stop.set()
        thread.join(timeout=30)
        sys.setswitchinterval(old)
    assert seen


def test_max_output_size_exactly_at_the_limit() -> None:
    data = b"z" * 5000
    blob = codec.pack(data, chunk_size=1000)
    assert codec.unpack(blob, max_output_size=5000) == data
    with pytest.raises(SizeLimitExceededError):
        codec.unpack(blob, max_output_size=4999)
    unpacker = codec.Unpacker(max_output_size=4999)
    with pytest.raises(SizeLimitExceededError):
        unpacker.write(blob)


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_unpack_file_parallel_and_limits(tmp_path: Path, threads: int) -> None:
    data = np.random.default_rng(5).integers(0, 4, 300_000, dtype=np.uint8).tobytes()
    packed, out = tmp_path / "p.zst", tmp_path / "out.bin"
    packed.write_bytes(codec.pack(data, chunk_size=20_000))
    assert codec.unpack_file(packed, out, threads=threads) == len(data)
    assert out.read_bytes() == data
    # Refused from the seek table before a byte is written; the old file stays.
    with pytest.raises(SizeLimitExceededError):
        codec.unpack_file(packed, out, max_output_size=len(data) - 1, threads=threads)
    assert out.read_bytes() == data
    # Foreign zstd (no seek table, no sizes) streams through the same call.
    foreign = tmp_path / "f.zst"
    foreign.write_bytes(zstandard.ZstdCompressor(write_content_size=False).compress(data))
    assert codec.unpack_file(foreign, tmp_path / "f.bin", threads=threads) == len(data)
    assert (tmp_path / "f.bin").read_bytes() == data
