"""The codec against other processes: the ``zstd`` command-line tool decodes our blobs and
we decode its output; child processes measure peak memory of streaming packing and of a
decompression bomb (Rust allocations are invisible to tracemalloc, so the child reports
its own peak RSS)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import pytest

from fl_sidecar import _codec, codec
from fl_sidecar.errors import ChecksumMismatchError

ZSTD = shutil.which("zstd")
needs_zstd_cli = pytest.mark.skipif(ZSTD is None, reason="the zstd command-line tool is missing")


def run_zstd(*args: str, data: bytes) -> bytes:
    assert ZSTD is not None
    done = subprocess.run(
        [ZSTD, "-q", *args], input=data, capture_output=True, timeout=60, check=True
    )
    return done.stdout


@needs_zstd_cli
@pytest.mark.parametrize("chunk", [1000, 64 * 1024])
def test_zstd_cli_decodes_our_blobs(chunk: int) -> None:
    data = os.urandom(50_000) + b"\x00" * 100_000 + b"text " * 20_000
    blob = codec.pack(data, chunk_size=chunk, threads=2)
    assert codec.inspect(blob).frames > 1
    assert run_zstd("-d", "-c", data=blob) == data


@needs_zstd_cli
def test_zstd_cli_checks_our_frame_checksums(tmp_path: Path) -> None:
    data = b"checksummed " * 10_000
    blob = bytearray(codec.pack(data, chunk_size=30_000))
    first = codec.inspect(bytes(blob))
    assert first.has_checksums
    # Damage the stored checksum of frame 0: both decoders must refuse.
    frame0_end = len(codec.pack(data[:30_000], chunk_size=30_000)) - (8 + 12 + 9)
    blob[frame0_end - 1] ^= 0xFF
    with pytest.raises(ChecksumMismatchError):
        codec.unpack(bytes(blob))
    assert ZSTD is not None
    done = subprocess.run([ZSTD, "-d", "-c"], input=bytes(blob), capture_output=True, timeout=60)
    assert done.returncode != 0


@needs_zstd_cli
def test_we_decode_zstd_cli_output() -> None:
    data = os.urandom(20_000) * 3 + b"z" * 300_000
    piped = run_zstd("-c", "-3", "--no-check", data=data)  # from stdin: no content size
    assert codec.inspect(piped).decompressed_size is None
    assert codec.unpack(piped) == data
    with_sizes = run_zstd("-c", "-19", "--check", "--content-size", data=data[:70_000])
    concatenated = piped + with_sizes
    assert codec.unpack(concatenated) == data + data[:70_000]
    unpacker = codec.Unpacker()
    out = b"".join(
        unpacker.write(concatenated[i : i + 4096]) for i in range(0, len(concatenated), 4096)
    )
    unpacker.finish()
    assert out == data + data[:70_000]


@needs_zstd_cli
def test_zstd_cli_on_files_round_trip(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    src = tmp_path / "weights.bin"
    src.write_bytes(data)
    stats = codec.pack_file(src, tmp_path / "weights.bin.zst", chunk_size=256 * 1024)
    assert stats.frames == 4
    assert ZSTD is not None
    subprocess.run(
        [ZSTD, "-q", "-d", "-f", str(tmp_path / "weights.bin.zst"), "-o", str(tmp_path / "out")],
        check=True,
        timeout=60,
    )
    assert (tmp_path / "out").read_bytes() == data


def child_peak(script: str, tmp_path: Path) -> Dict[str, int]:
    """Runs ``script`` in a fresh interpreter; it prints a JSON dict of measurements.

    ``current_kib()`` is the resident size now, ``peak_kib()`` the high-water mark
    (VmHWM: this process image only; ``ru_maxrss`` would also count the parent's pages
    at fork): peak after minus current before bounds what the measured work added (Linux).
    """
    prelude = textwrap.dedent(
        """
        import json, sys
        from fl_sidecar import codec
        def status_kib(field):
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))
        def peak_kib():
            return status_kib("VmHWM")
        def current_kib():
            return status_kib("VmRSS")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    result: Dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.slow
def test_streaming_pack_file_memory_stays_bounded(tmp_path: Path) -> None:
    size = 128 << 20
    chunk = 1 << 20
    with (tmp_path / "big.bin").open("wb") as f:
        block = os.urandom(chunk)  # incompressible: the output is as big as the input
        for _ in range(size // chunk):
            f.write(block)
    result = child_peak(
        f"""
        before = current_kib()
        stats = codec.pack_file("big.bin", "big.zst", chunk_size={chunk}, threads=2)
        print(json.dumps({{"before": before, "after": peak_kib(), "raw": stats.raw_size}}))
        """,
        tmp_path,
    )
    assert result["raw"] == size
    grown_mib = (result["after"] - result["before"]) / 1024
    # Input batch (2 x 1 MiB), its compressed output, a zstd context per worker (about
    # 3 MiB at level 3), the write buffer, and what the allocator keeps per thread: about
    # 30 MiB measured, independent of the file's 128 MiB.
    assert grown_mib < 56, f"peak RSS grew by {grown_mib:.1f} MiB"
    big = tmp_path / "big.bin"
    back = tmp_path / "back.bin"
    assert codec.unpack_file(tmp_path / "big.zst", back) == size
    assert back.stat().st_size == size
    with big.open("rb") as a, back.open("rb") as b:
        assert a.read(chunk) == b.read(chunk)


def test_bomb_does_not_allocate_past_the_limit(tmp_path: Path) -> None:
    result = child_peak(
        """
        import struct
        from fl_sidecar.errors import SizeLimitExceededError
        bomb = b"\\x28\\xb5\\x2f\\xfd" + bytes([0x00, 13 << 3])
        for i in range(8192):  # 1 GiB of RLE blocks in 32 KiB
            header = int(i == 8191) | (1 << 1) | ((128 * 1024) << 3)
            bomb += struct.pack("<I", header)[:3] + b"\\xab"
        before = current_kib()
        caught = 0
        for attempt in range(3):
            try:
                codec.unpack(bomb, max_output_size=8 << 20)
            except SizeLimitExceededError:
                caught += 1
            unpacker = codec.Unpacker(max_output_size=8 << 20)
            try:
                for _piece in unpacker.write_iter(bomb):
                    pass
            except SizeLimitExceededError:
                caught += 1
        print(json.dumps({"before": before, "after": peak_kib(), "caught": caught}))
        """,
        tmp_path,
    )
    assert result["caught"] == 6
    grown_mib = (result["after"] - result["before"]) / 1024
    # Bounded by a few times the 8 MiB limit (output buffers, the decoder's 8 MiB window),
    # about 33 MiB measured, never the gigabyte the bomb expands to.
    assert grown_mib < 64, f"peak RSS grew by {grown_mib:.1f} MiB"


def test_bounded_unpacker_memory_stays_bounded_whatever_the_expansion(tmp_path: Path) -> None:
    result = child_peak(
        """
        import os, struct
        ordinary = codec.pack(os.urandom(3 << 20))
        bomb = b"\\x28\\xb5\\x2f\\xfd" + bytes([0x00, 13 << 3])  # no size, 8 MiB window
        for i in range(4096):  # 512 MiB of zeros in 16 KiB of RLE blocks
            header = int(i == 4095) | (1 << 1) | ((128 * 1024) << 3)
            bomb += struct.pack("<I", header)[:3] + b"\\x00"
        blob = ordinary + bomb
        before = current_kib()
        unpacker = codec.Unpacker(max_output_size=1 << 30, max_piece_size=4 << 20)
        total = largest = 0
        for piece in unpacker.write_iter(blob):  # the whole blob in one write
            total += len(piece)
            largest = max(largest, len(piece))
        unpacker.finish()
        print(json.dumps({"before": before, "after": peak_kib(), "total": total,
                          "largest": largest}))
        """,
        tmp_path,
    )
    assert result["total"] == (3 << 20) + (512 << 20)
    assert result["largest"] <= 4 << 20
    grown_mib = (result["after"] - result["before"]) / 1024
    # The bomb's 8 MiB window, one 4 MiB piece in the decoder and its bytes copy, the held
    # input: about 20 MiB, never the 512 MiB one unbounded write would return.
    assert grown_mib < 48, f"peak RSS grew by {grown_mib:.1f} MiB"


def test_zstd_version_is_the_linked_library() -> None:
    """The module reports the libzstd it runs: the static 1.5.7 of scripts/build-libzstd.sh,
    or (FL_SIDECAR_SYSTEM_ZSTD=1, no download) the shared system one it then needs."""
    module = _codec.__file__
    assert module is not None
    ldd = shutil.which("ldd")
    if ldd is None:
        pytest.skip("ldd is missing")
    linked = subprocess.run([ldd, module], capture_output=True, text=True, timeout=60, check=True)
    shared = [line.split()[0] for line in linked.stdout.splitlines() if "libzstd" in line]
    if not shared:
        assert codec.zstd_version() == "1.5.7"
        return
    import ctypes

    system = ctypes.CDLL(shared[0])
    system.ZSTD_versionString.restype = ctypes.c_char_p
    assert codec.zstd_version() == system.ZSTD_versionString().decode()
