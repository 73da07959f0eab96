"""UploadSpool: bounded, hashed spooling of an upload's chunks, checked against the header."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from fl_sidecar import errors
from fl_sidecar.transfers import UploadSpool, is_sha256_hex


def test_spool_checks_size_and_digest(tmp_path: Path) -> None:
    data = b"abc" * 1000
    spool = UploadSpool(tmp_path / "a", max_size=10_000)
    spool.write(data[:1000])
    spool.write(data[1000:])
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o600
    path = spool.finish(len(data), hashlib.sha256(data).hexdigest().upper())
    assert path.read_bytes() == data
    spool.discard()
    assert not path.exists()
    spool.discard()  # idempotent


@pytest.mark.parametrize(
    ("size", "digest", "error"),
    [
        (3001, None, errors.TruncatedDataError),
        (2999, None, errors.CorruptDataError),
        (None, "0" * 64, errors.ChecksumMismatchError),
    ],
)
def test_broken_promises_are_typed_errors(
    tmp_path: Path, size: int, digest: str, error: type
) -> None:
    spool = UploadSpool(tmp_path / "b", max_size=10_000)
    spool.write(b"abc" * 1000)
    with pytest.raises(error):
        spool.finish(size, digest)
    spool.discard()
    assert not (tmp_path / "b").exists()


def test_spool_refuses_to_grow_beyond_its_limit(tmp_path: Path) -> None:
    spool = UploadSpool(tmp_path / "c", max_size=10)
    spool.write(b"x" * 10)
    with pytest.raises(errors.SizeLimitExceededError):
        spool.write(b"y")
    assert spool.size == 10
    spool.discard()


def test_unhashed_spool_skips_the_digest(tmp_path: Path) -> None:
    spool = UploadSpool(tmp_path / "d", max_size=10, hashed=False)
    spool.write(b"12345")
    assert spool.finish(5, None).read_bytes() == b"12345"
    spool.discard()


def test_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "e").write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        UploadSpool(tmp_path / "e", max_size=10)
    assert (tmp_path / "e").read_bytes() == b"keep"


def test_sha256_hex_check() -> None:
    assert is_sha256_hex("A" * 64)
    assert not is_sha256_hex("g" * 64)
    assert not is_sha256_hex("a" * 63)


def test_unpack_decoder_bounds_each_output_of_a_bomb_behind_ordinary_data() -> None:
    codec = pytest.importorskip("fl_sidecar.codec")
    zstandard = pytest.importorskip("zstandard")
    from fl_sidecar.service import _UNPACK_PIECE, _bounded_unpacker

    ordinary = codec.pack(bytes(range(256)) * 4096)  # 1 MiB of plain data first
    compressor = zstandard.ZstdCompressor(level=19).compressobj()  # no content size
    zero = b"\0" * (1 << 22)
    bomb = b"".join(compressor.compress(zero) for _ in range(32)) + compressor.flush()
    assert len(bomb) < 64 * 1024  # 128 MiB of output from a few KiB
    unpacker = _bounded_unpacker(1 << 30)
    sizes = [len(out) for out in unpacker.write_iter(ordinary + bomb)]
    unpacker.finish()
    assert sum(sizes) == (1 << 20) + 128 * 1024 * 1024
    # One message in, many bounded pieces out: never the 128 MiB at once.
    assert max(sizes) <= _UNPACK_PIECE
    assert len(sizes) >= 32
