"""BoundedUnpacker: any zstd stream, fed in any pieces, decodes exactly, in bounded steps."""

from __future__ import annotations

import os
import tracemalloc
from typing import List, Tuple

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sidecar import codec, errors
from fl_sidecar._zstd_stream import BoundedUnpacker

MIB = 1024 * 1024


def _decode(blob: bytes, piece: int, limit: int = 1 << 33) -> Tuple[bytes, int]:
    unpacker = BoundedUnpacker(limit, max_step=MIB)
    out: List[bytes] = []
    for i in range(0, len(blob), piece):
        out.extend(unpacker.write(blob[i : i + piece]))
    unpacker.finish()
    return b"".join(out), max((len(o) for o in out), default=0)


DATA = os.urandom(MIB) * 3 + bytes(range(256)) * 4096


@pytest.mark.parametrize(
    "name",
    ["ours", "foreign", "foreign with checksums", "foreign multi-frame", "skippable first"],
)
@pytest.mark.parametrize("piece", [1, 13, 4096, 3 * MIB])
def test_round_trips_whatever_the_pieces(name: str, piece: int) -> None:
    data = DATA if piece > 1 else DATA[:20_000]
    blobs = {
        "ours": codec.pack(data, chunk_size=MIB),
        "foreign": zstandard.ZstdCompressor(write_content_size=False).compress(data),
        "foreign with checksums": zstandard.ZstdCompressor(write_checksum=True).compress(data),
        "foreign multi-frame": b"".join(
            zstandard.ZstdCompressor().compress(data[i : i + MIB]) for i in range(0, len(data), MIB)
        ),
        "skippable first": b"\x5a\x2a\x4d\x18"
        + (3).to_bytes(4, "little")
        + b"abc"
        + zstandard.ZstdCompressor().compress(data),
    }
    decoded, _ = _decode(blobs[name], piece)
    assert decoded == data


def test_bombs_decode_in_bounded_steps() -> None:
    raw = 128 * MIB
    for bomb in (
        zstandard.ZstdCompressor(level=19).compress(b"\0" * raw),
        codec.pack(b"\0" * raw),
    ):
        assert len(bomb) < 64 * 1024
        tracemalloc.start()
        try:
            size = 0
            unpacker = BoundedUnpacker(1 << 33, max_step=MIB)
            for out in unpacker.write(bomb):
                assert len(out) <= MIB + 128 * 1024
                size += len(out)
            unpacker.finish()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert size == raw
        assert peak < 8 * MIB


def test_limit_truncation_and_corruption_are_the_codecs_errors() -> None:
    packed = codec.pack(DATA, chunk_size=MIB)
    with pytest.raises(errors.SizeLimitExceededError):
        _decode(packed, 65536, limit=MIB)
    with pytest.raises(errors.TruncatedDataError):
        _decode(packed[: len(packed) // 2], 65536)
    with pytest.raises(errors.CorruptDataError):
        _decode(b"\x28\xb5\x2f\xfd" + b"\xff" * 100, 7)
    with pytest.raises(errors.CorruptDataError):
        _decode(b"definitely not zstd", 5)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=512), st.integers(min_value=1, max_value=64))
def test_hostile_streams_raise_codec_errors_only(blob: bytes, piece: int) -> None:
    for data in (blob, b"\x28\xb5\x2f\xfd" + blob):
        try:
            decoded, _ = _decode(data, piece, limit=MIB)
        except errors.CodecError:
            continue
        assert len(decoded) <= MIB
