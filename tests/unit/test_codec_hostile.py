"""Hostile input to the codec: bit flips in every region, truncation at every boundary,
seek tables that lie, decompression bombs. Each gets its typed error, never a crash, and
never output past the caller's limit.

The regions are found by a walker written here from the specs (RFC 8878 and zstd's
seekable format), independent of the Rust one.
"""

from __future__ import annotations

import contextlib
import os
import struct
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Tuple, Type, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sidecar import codec
from fl_sidecar.errors import (
    ChecksumMismatchError,
    CodecError,
    CorruptDataError,
    SeekTableError,
    SizeLimitExceededError,
    TruncatedDataError,
)

DATA = bytes((i * 7 + i // 13) % 251 for i in range(3000)) + b"tail"
CHUNK = 1000


class Regions(NamedTuple):
    frame_headers: List[Tuple[int, int]]  # (start, end) of each frame header
    block_headers: List[Tuple[int, int]]
    block_bodies: List[Tuple[int, int]]
    checksums: List[Tuple[int, int]]
    frame_ends: List[int]
    table_header: Tuple[int, int]  # skippable magic + frame size
    table_entries: List[Tuple[int, int, int]]  # offsets of (compressed, decompressed, checksum)
    footer: Tuple[int, int, int]  # offsets of frame count, descriptor, magic


def walk(blob: bytes) -> Regions:
    """Splits one of our blobs into its regions, from the specs."""
    headers, bheads, bodies, sums, ends = [], [], [], [], []
    (count,) = struct.unpack_from("<I", blob, len(blob) - 9)
    table_start = len(blob) - (8 + 12 * count + 9)
    at = 0
    while at < table_start:
        assert blob[at : at + 4] == b"\x28\xb5\x2f\xfd"
        descriptor = blob[at + 4]
        single = descriptor & 0x20
        fcs = [1 if single else 0, 2, 4, 8][descriptor >> 6]
        size = 5 + (0 if single else 1) + [0, 1, 2, 4][descriptor & 3] + fcs
        headers.append((at, at + size))
        at += size
        while True:
            (v,) = struct.unpack("<I", blob[at : at + 3] + b"\0")
            stored = 1 if (v >> 1) & 3 == 1 else v >> 3
            bheads.append((at, at + 3))
            bodies.append((at + 3, at + 3 + stored))
            at += 3 + stored
            if v & 1:
                break
        assert descriptor & 4
        sums.append((at, at + 4))
        at += 4
        ends.append(at)
    assert at == table_start
    entries = [
        (table_start + 8 + 12 * i, table_start + 12 + 12 * i, table_start + 16 + 12 * i)
        for i in range(count)
    ]
    n = len(blob)
    return Regions(
        headers, bheads, bodies, sums, ends, (table_start, table_start + 8), entries,
        (n - 9, n - 5, n - 4),
    )  # fmt: skip


BLOB = codec.pack(DATA, chunk_size=CHUNK)
REGIONS = walk(BLOB)


def flip(blob: bytes, byte: int, bit: int) -> bytes:
    out = bytearray(blob)
    out[byte] ^= 1 << bit
    return bytes(out)


def outcome(blob: bytes) -> List[Union[bytes, Type[CodecError]]]:
    """The one-shot and the streamed results: the bytes, or the error class."""
    results: List[Union[bytes, Type[CodecError]]] = []
    for decode in (one_shot, streamed):
        try:
            results.append(decode(blob))
        except CodecError as e:
            results.append(type(e))
    return results


def one_shot(blob: bytes) -> bytes:
    return codec.unpack(blob)


def streamed(blob: bytes, piece: int = 97) -> bytes:
    unpacker = codec.Unpacker()
    out = b"".join(unpacker.write(blob[i : i + piece]) for i in range(0, len(blob), piece))
    unpacker.finish()
    return out


def test_walker_agrees_with_inspect() -> None:
    info = codec.inspect(BLOB)
    assert info.frames == len(REGIONS.frame_ends) == 4
    assert BLOB[REGIONS.footer[2] :] == struct.pack("<I", 0x8F92EAB1)


def assert_raises_each(blob: bytes, expected: Type[CodecError]) -> None:
    for decode in (one_shot, streamed):
        with pytest.raises(expected):
            decode(blob)


@pytest.mark.parametrize("bit", range(8))
def test_flip_in_frame_magic(bit: int) -> None:
    start, _ = REGIONS.frame_headers[1]
    assert_raises_each(flip(BLOB, start + 1, bit), CorruptDataError)


@pytest.mark.parametrize("bit", [0, 1, 2, 3, 5, 6, 7])  # bit 4 is unused per RFC 8878
def test_flip_in_frame_header_descriptor(bit: int) -> None:
    start, _ = REGIONS.frame_headers[2]
    bad = flip(BLOB, start + 4, bit)
    # The one-shot decoder checks the header against the seek table first; the streaming
    # one meets the header alone, where a flip may also ask for a window too large.
    with pytest.raises(CorruptDataError):
        one_shot(bad)
    with pytest.raises((CorruptDataError, SizeLimitExceededError)):
        streamed(bad)


def test_flip_in_frame_content_size() -> None:
    start, end = REGIONS.frame_headers[0]
    for byte in range(start + 5, end):
        for bit in range(8):
            # The header disagrees with the seek table (or with the blocks).
            assert_raises_each(flip(BLOB, byte, bit), CorruptDataError)


def test_flip_in_block_headers_and_bodies() -> None:
    hits = 0
    for (hs, he), (bs, be) in zip(REGIONS.block_headers, REGIONS.block_bodies):
        for byte in list(range(hs, he)) + list(range(bs, be, max(1, (be - bs) // 25))):
            for bit in (0, 3, 7):
                for result in outcome(flip(BLOB, byte, bit)):
                    # Never different data: either an error or (for don't-care bits in
                    # the entropy-coded stream) the very same content, checksum-verified.
                    if isinstance(result, bytes):
                        assert result == DATA
                    else:
                        assert issubclass(result, CorruptDataError)
                        hits += 1
    assert hits > 100


@pytest.mark.parametrize("frame", range(4))
def test_flip_in_frame_checksum_is_a_checksum_mismatch(frame: int) -> None:
    start, _ = REGIONS.checksums[frame]
    assert_raises_each(flip(BLOB, start + 2, 5), ChecksumMismatchError)


@pytest.mark.parametrize("field", [0, 1, 2], ids=["compressed", "decompressed", "checksum"])
@pytest.mark.parametrize("entry", [0, 3])
def test_flip_in_seek_table_entry(field: int, entry: int) -> None:
    offset = REGIONS.table_entries[entry][field]
    for bit in (0, 9, 31):
        assert_raises_each(flip(BLOB, offset + bit // 8, bit % 8), SeekTableError)


@pytest.mark.parametrize("which", ["count", "descriptor", "magic"])
def test_flip_in_footer(which: str) -> None:
    count, descriptor, magic = REGIONS.footer
    targets = {
        "count": [(count, b) for b in range(8)],
        "descriptor": [(descriptor, b) for b in range(2, 8)],  # bits 0-1 are unused
        "magic": [(magic + i, b) for i in range(4) for b in (0, 7)],
    }[which]
    for byte, bit in targets:
        assert_raises_each(flip(BLOB, byte, bit), SeekTableError)


def test_unused_bits_are_ignored_as_the_specs_say() -> None:
    assert codec.unpack(flip(BLOB, REGIONS.footer[1], 0)) == DATA
    assert codec.unpack(flip(BLOB, REGIONS.frame_headers[0][0] + 4, 4)) == DATA


def test_flip_in_seek_table_frame_header() -> None:
    start, end = REGIONS.table_header
    for byte in range(start, end):
        assert_raises_each(flip(BLOB, byte, 3), CorruptDataError)


@settings(max_examples=150, deadline=None)
@given(byte=st.integers(0, len(BLOB) - 1), bit=st.integers(0, 7))
def test_any_single_flip_is_an_error_or_the_same_data(byte: int, bit: int) -> None:
    for result in outcome(flip(BLOB, byte, bit)):
        if isinstance(result, bytes):
            assert result == DATA
        else:
            assert issubclass(result, CodecError)


def test_truncation_at_every_offset() -> None:
    ends = REGIONS.frame_ends
    for cut in range(len(BLOB)):
        piece = BLOB[:cut]
        if cut in ends:
            # Whole frames form a valid zstd stream; the missing seek table shows it.
            prefix = DATA[: CHUNK * (ends.index(cut) + 1)]
            assert one_shot(piece) == prefix
            assert streamed(piece) == prefix
            assert not codec.inspect(piece).has_seek_table
        else:
            assert_raises_each(piece, TruncatedDataError)


def test_truncation_at_every_region_boundary_is_named() -> None:
    boundaries = sorted(
        {s for s, _ in REGIONS.frame_headers + REGIONS.block_headers + REGIONS.checksums}
        | {e for _, e in REGIONS.block_bodies}
        | {REGIONS.table_header[1]}
        | {e[0] for e in REGIONS.table_entries}
        | set(REGIONS.footer)
    )
    for cut in boundaries:
        if cut in REGIONS.frame_ends or cut == 0:
            continue
        with pytest.raises(TruncatedDataError, match="ends"):
            codec.unpack(BLOB[:cut])


def rewrite_table(blob: bytes, edit: Callable[[List[List[int]]], None]) -> bytes:
    count = REGIONS.footer[0]
    (n,) = struct.unpack_from("<I", blob, count)
    start = REGIONS.table_header[0]
    entries = [list(struct.unpack_from("<III", blob, start + 8 + 12 * i)) for i in range(n)]
    edit(entries)
    body = b"".join(struct.pack("<III", *e) for e in entries)
    body += struct.pack("<IBI", len(entries), 0x80, 0x8F92EAB1)
    return blob[:start] + struct.pack("<II", 0x184D2A5E, len(body)) + body


LIES: Dict[str, Callable[[List[List[int]]], None]] = {
    "decompressed+1": lambda e: e[1].__setitem__(1, e[1][1] + 1),
    "decompressed-1": lambda e: e[1].__setitem__(1, e[1][1] - 1),
    "decompressed huge": lambda e: e[0].__setitem__(1, 1 << 31),
    "compressed+1": lambda e: e[2].__setitem__(0, e[2][0] + 1),
    "checksum": lambda e: e[3].__setitem__(2, e[3][2] ^ 0x10),
    "one entry fewer": lambda e: e.__delitem__(0),
    "one entry more": lambda e: e.append([20, 20, 0]),
    "no entries": lambda e: e.clear(),
    "swapped": lambda e: e.reverse(),
}


def test_untouched_rewrite_is_identical() -> None:
    assert rewrite_table(BLOB, lambda e: None) == BLOB


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_seek_table(lie: str) -> None:
    bad = rewrite_table(BLOB, LIES[lie])
    assert_raises_each(bad, SeekTableError)
    with pytest.raises(SeekTableError):
        codec.inspect(bad)


def rle_bomb(blocks: int, *, content_size: int = -1, byte: int = 0xAB) -> bytes:
    """A zstd frame of `blocks` RLE blocks of 128 KiB of `byte` each: 4 bytes per 128 KiB."""
    if content_size < 0:
        out = b"\x28\xb5\x2f\xfd" + bytes([0x00, 13 << 3])  # no size, 8 MiB window
    else:
        out = b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", content_size)
    for i in range(blocks):
        header = int(i + 1 == blocks) | (1 << 1) | ((128 * 1024) << 3)
        out += struct.pack("<I", header)[:3] + bytes([byte])
    return out


def test_bomb_without_sizes_stops_at_the_limit() -> None:
    bomb = rle_bomb(8192)  # 1 GiB of output from 32 KiB
    limit = 1 << 20
    with pytest.raises(SizeLimitExceededError):
        codec.unpack(bomb, max_output_size=limit)
    unpacker = codec.Unpacker(max_output_size=limit)
    with pytest.raises(SizeLimitExceededError):
        unpacker.write(bomb)
    # The decoder stopped within one byte of the limit: it never made the gigabyte.
    assert unpacker.produced <= limit + 1
    # The decoder is spent after the error.
    with pytest.raises(ValueError):
        unpacker.write(b"")


@pytest.mark.parametrize("piece", [codec.MIN_PIECE_SIZE, 1 << 20, 4 << 20])
def test_a_bomb_of_zeros_in_one_write_comes_out_in_bounded_pieces(piece: int) -> None:
    # Ordinary data first, then 64 MiB of zeros from 2 KiB, fed as one write.
    ordinary = os.urandom(300_000)
    blob = codec.pack(ordinary, chunk_size=100_000) + rle_bomb(512, byte=0)
    assert len(blob) < 310_000
    unpacker = codec.Unpacker(max_output_size=1 << 30, max_piece_size=piece)
    sizes = []
    total = 0
    for i, out in enumerate(unpacker.write_iter(blob)):
        sizes.append(len(out))
        # Checked piece by piece, never joined: the test itself stays bounded too.
        if i == 0:
            assert out[: len(ordinary)] == ordinary[: len(out)]
        if total >= len(ordinary):
            assert out.count(0) == len(out)
        total += len(out)
    unpacker.finish()
    assert total == len(ordinary) + (64 << 20)
    assert max(sizes) <= piece
    # Every piece but the last is full up to one block: bounded, but not needlessly small.
    assert min(sizes[:-1]) > piece - codec.MIN_PIECE_SIZE
    assert unpacker.produced == total


def test_bounded_pieces_still_stop_at_the_total_limit() -> None:
    unpacker = codec.Unpacker(max_output_size=1 << 20, max_piece_size=256 << 10)
    pieces = []
    with pytest.raises(SizeLimitExceededError):
        for out in unpacker.write_iter(rle_bomb(8192)):  # 1 GiB
            pieces.append(len(out))
    assert all(n <= 256 << 10 for n in pieces)
    assert unpacker.produced <= (1 << 20) + 1
    with pytest.raises(ValueError):
        unpacker.drain()


def test_bomb_with_claimed_size_is_refused_from_the_header() -> None:
    claim = rle_bomb(1, content_size=1 << 50)
    with pytest.raises(SizeLimitExceededError, match=str(1 << 50)):
        codec.unpack(claim)
    unpacker = codec.Unpacker()
    with pytest.raises(SizeLimitExceededError):
        unpacker.write(claim)
    assert unpacker.produced == 0


def test_real_bomb_is_refused_before_decoding() -> None:
    blob = codec.pack(bytes(64 << 20), chunk_size=8 << 20)
    assert len(blob) < 100_000
    with pytest.raises(SizeLimitExceededError, match="67108864"):
        codec.unpack(blob, max_output_size=1 << 20)
    unpacker = codec.Unpacker(max_output_size=1 << 20)
    with pytest.raises(SizeLimitExceededError):
        unpacker.write(blob)
    assert unpacker.produced == 0


def test_seek_table_cannot_inflate_a_frame_beyond_its_blocks() -> None:
    # A frame without a content size, described by a table claiming 2 GiB.
    frame = rle_bomb(2)
    body = struct.pack("<III", len(frame), 1 << 31, 0) + struct.pack("<IBI", 1, 0x80, 0x8F92EAB1)
    blob = frame + struct.pack("<II", 0x184D2A5E, len(body)) + body
    with pytest.raises(SeekTableError):
        codec.unpack(blob)


@pytest.mark.parametrize(
    "junk",
    [b"", b"\x00", b"\x28\xb5\x2f", b"not zstd at all", b"\x28\xb5\x2f\xfd" + b"\xff" * 40],
)
def test_junk(junk: bytes) -> None:
    with pytest.raises(CorruptDataError):
        codec.unpack(junk)
    with pytest.raises(CorruptDataError):
        streamed(junk)
    if junk:
        with pytest.raises(CorruptDataError):
            codec.inspect(junk)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_crash(junk: bytes) -> None:
    for candidate in (junk, b"\x28\xb5\x2f\xfd" + junk, BLOB[:40] + junk):
        for decode in (one_shot, streamed):
            with contextlib.suppress(CodecError):
                decode(candidate)


def test_empty_frames_are_still_verified() -> None:
    blob = bytearray(codec.pack(b""))
    assert codec.unpack(bytes(blob)) == b""
    # The empty frame's stored checksum (XXH64 of nothing) is checked even though no byte
    # comes out.
    frame_end = len(blob) - (8 + 12 + 9)
    blob[frame_end - 1] ^= 0x01
    with pytest.raises(CorruptDataError):
        codec.unpack(bytes(blob))


# --- the frame limit: pack and unpack agree, and a limit is never called corruption ---

EMPTY_FRAME = bytes([0x28, 0xB5, 0x2F, 0xFD, 0x20, 0x00, 0x01, 0x00, 0x00])  # 9 bytes, no data


def seekable_empty_frames(count: int) -> bytes:
    """``count`` empty frames and a seek table that describes them truthfully."""
    entries = struct.pack("<II", len(EMPTY_FRAME), 0) * count
    table = entries + struct.pack("<IBI", count, 0, 0x8F92EAB1)
    return EMPTY_FRAME * count + struct.pack("<II", 0x184D2A5E, len(table)) + table


def test_packing_refuses_more_frames_than_unpacking_accepts(tmp_path: Path) -> None:
    assert codec.MAX_FRAMES == 1 << 20
    too_many = bytes(codec.MAX_FRAMES + 1)
    with pytest.raises(SizeLimitExceededError, match=f"{codec.MAX_FRAMES}.*chunk_size"):
        codec.pack(too_many, chunk_size=1)
    packer = codec.Packer(chunk_size=64, threads=16)
    packer.write(bytes(codec.MAX_FRAMES * 64))
    with pytest.raises(SizeLimitExceededError, match=str(codec.MAX_FRAMES)):
        packer.write(b"x")
        packer.finish()
    src, dst = tmp_path / "src.bin", tmp_path / "dst.zst"
    src.write_bytes(too_many)
    with pytest.raises(SizeLimitExceededError, match=str(codec.MAX_FRAMES)):
        codec.pack_file(src, dst, chunk_size=1)
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.bin"]


def test_a_blob_of_exactly_max_frames_round_trips() -> None:
    # (The Rust tests take it through the streaming and file paths too.)
    data = os.urandom(codec.MAX_FRAMES)
    blob = codec.pack(data, chunk_size=1)
    assert codec.inspect(blob).frames == codec.MAX_FRAMES
    assert codec.unpack(blob) == data


def test_more_frames_than_the_limit_is_a_size_limit_not_corruption(tmp_path: Path) -> None:
    blob = seekable_empty_frames(codec.MAX_FRAMES + 1)
    for decode in (one_shot, lambda b: streamed(b, piece=1 << 20)):
        with pytest.raises(SizeLimitExceededError, match=str(codec.MAX_FRAMES)):
            decode(blob)
    (tmp_path / "b.zst").write_bytes(blob)
    with pytest.raises(SizeLimitExceededError, match=str(codec.MAX_FRAMES)):
        codec.unpack_file(tmp_path / "b.zst", tmp_path / "b.bin")
    assert not (tmp_path / "b.bin").exists()
    # Without a seek table, the walk of the one-shot decoder has the same limit.
    with pytest.raises(SizeLimitExceededError, match=str(codec.MAX_FRAMES)):
        codec.unpack(EMPTY_FRAME * (codec.MAX_FRAMES + 1))
