"""The spool: bounded, hashed upload spooling, a full disk, and stale spool directories.

No sockets, no processes: the FL server client is a stand-in that writes files
and fails as a full disk does; other sidecars' spools are directories with a
lock file, held (live) or not (its owner died).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
from pathlib import Path
from typing import Any, List, Optional

import pytest

from fl_sidecar import errors
from fl_sidecar.server_api import TransferResult
from fl_sidecar.sidecar.transfers import (
    SPOOL_PREFIX,
    TransferManager,
    UploadSpool,
    is_sha256_hex,
    remove_stale_spools,
)


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
    from fl_sidecar.sidecar.codecstreams import _UNPACK_PIECE, _bounded_unpacker

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


# --- a full spool ------------------------------------------------------------


class _FullFile:
    """A spool file on a full disk: every write (and the flush on close) fails."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.closed = False

    def write(self, data: bytes) -> int:
        raise OSError(self.code, os.strerror(self.code))

    def close(self) -> None:
        self.closed = True
        raise OSError(self.code, os.strerror(self.code))


def _on_a_full_disk(spool: UploadSpool, code: int) -> None:
    assert spool._file is not None
    spool._file.close()
    spool._file = _FullFile(code)  # type: ignore[assignment]


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_full_disk_while_spooling_an_upload_is_a_spool_full_error(
    tmp_path: Path, code: int
) -> None:
    spool = UploadSpool(tmp_path / "u.upload", max_size=1000)
    _on_a_full_disk(spool, code)
    with pytest.raises(errors.SpoolFullError) as caught:
        spool.write(b"x" * 10)
    assert str(tmp_path) in str(caught.value)
    assert caught.value.spool_dir == str(tmp_path)
    assert os.strerror(code) in str(caught.value)
    spool.discard()  # the failing flush does not keep the file
    assert list(tmp_path.iterdir()) == []


def test_full_disk_on_the_last_flush_is_a_spool_full_error(tmp_path: Path) -> None:
    spool = UploadSpool(tmp_path / "u.upload", max_size=1000)
    _on_a_full_disk(spool, errno.ENOSPC)
    with pytest.raises(errors.SpoolFullError):
        spool.finish(None, None)
    spool.discard()
    assert list(tmp_path.iterdir()) == []


def test_other_os_errors_are_not_called_a_full_spool(tmp_path: Path) -> None:
    spool = UploadSpool(tmp_path / "u.upload", max_size=1000)
    _on_a_full_disk(spool, errno.EIO)
    with pytest.raises(OSError) as caught:
        spool.write(b"x")
    assert not isinstance(caught.value, errors.SpoolFullError)
    spool.discard()


class _FullDiskClient:
    """Writes part of the model into the spool, then fails as a full disk does."""

    def __init__(self, code: int = errno.ENOSPC) -> None:
        self.code = code
        self.uploads = 0

    def download_model(self, model_id: str, dest: Path, **_kwargs: Any) -> TransferResult:
        Path(dest).write_bytes(b"partial")
        raise OSError(self.code, os.strerror(self.code), str(dest))

    def upload_model(self, model_id: str, source: Path, **_kwargs: Any) -> TransferResult:
        self.uploads += 1
        raise OSError(self.code, os.strerror(self.code))  # packing the body filled the disk


def _spool_files(manager: TransferManager) -> List[str]:
    return sorted(p.name for p in manager.spool_dir.iterdir())


@pytest.mark.parametrize("fmt", ["torch", "safetensors"])
def test_download_into_a_full_spool_is_typed_and_leaves_nothing(tmp_path: Path, fmt: str) -> None:
    manager = TransferManager(
        _FullDiskClient(),  # type: ignore[arg-type]
        spool_dir=str(tmp_path),
        max_model_size=1 << 20,
    )
    try:
        with pytest.raises(errors.SpoolFullError) as caught:
            manager.download("m", fmt)
        assert str(manager.spool_dir) in str(caught.value)
        assert _spool_files(manager) == [".lock"]
    finally:
        manager.close()


class _DownloadingClient:
    """Writes the whole model into the spool, as a download that fitted."""

    def download_model(self, model_id: str, dest: Path, **_kwargs: Any) -> TransferResult:
        Path(dest).write_bytes(b"the archive")
        return TransferResult(200, "", 11, 11, "identity", 0.0, "", {})


def test_conversion_into_a_full_spool_is_typed_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fl_sidecar import archive

    def convert_until_full(archive: Path, dest: Path, **_: Any) -> Any:
        Path(dest).write_bytes(b"half a safetensors file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(archive, "archive_to_safetensors", convert_until_full)
    manager = TransferManager(
        _DownloadingClient(),  # type: ignore[arg-type]
        spool_dir=str(tmp_path),
        max_model_size=1 << 20,
    )
    try:
        with pytest.raises(errors.SpoolFullError):
            manager.download("m", "safetensors")
        assert _spool_files(manager) == [".lock"]
    finally:
        manager.close()


def test_upload_into_a_full_spool_is_typed_and_leaves_nothing(tmp_path: Path) -> None:
    import zipfile

    client = _FullDiskClient(errno.EDQUOT)
    manager = TransferManager(
        client,  # type: ignore[arg-type]
        spool_dir=str(tmp_path),
        max_model_size=1 << 20,
    )
    source = tmp_path / "model.pt"
    with zipfile.ZipFile(source, "w") as archive:
        archive.writestr("model/data.pkl", b"not unpickled on this path")
    try:
        with pytest.raises(errors.SpoolFullError) as caught:
            manager.upload("m", source, "torch", round=0, sample_size=1, metrics={})
        assert client.uploads == 1
        assert str(manager.spool_dir) in str(caught.value)
        assert _spool_files(manager) == [".lock"]
    finally:
        manager.close()


def test_a_full_spool_is_resource_exhausted_not_internal() -> None:
    grpc = pytest.importorskip("grpc")
    from fl_sidecar.sidecar.status import status_for

    full = errors.SpoolFullError("full", spool_dir="/spool")
    assert status_for(full) == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Wherever else a full disk shows, it is no bug either.
    assert status_for(OSError(errno.ENOSPC, "full")) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_for(OSError(errno.EACCES, "no")) == grpc.StatusCode.INTERNAL


# --- stale spool directories ---------------------------------------------------


def _stale_spool(parent: Path, name: str, *, lock: bool = True) -> Path:
    """What a sidecar that died leaves: its directory, a partial file and an unheld lock."""
    directory = parent / f"{SPOOL_PREFIX}{name}"
    directory.mkdir(mode=0o700)
    (directory / "abc.upload").write_bytes(b"half an upload")
    if lock:
        (directory / ".lock").write_text("4242\n")
    return directory


def _manager(parent: Path) -> TransferManager:
    return TransferManager(
        object(),  # type: ignore[arg-type]  # no transfer is made
        spool_dir=str(parent),
        max_model_size=1 << 20,
    )


def test_start_up_removes_stale_spools_and_spares_a_live_one(tmp_path: Path) -> None:
    live = _manager(tmp_path)
    (live.spool_dir / "busy.upload").write_bytes(b"in flight")
    stale = _stale_spool(tmp_path, "dead1")
    other = tmp_path / "unrelated"
    other.mkdir()
    started: Optional[TransferManager] = None
    try:
        started = _manager(tmp_path)
        assert not stale.exists()
        assert (live.spool_dir / "busy.upload").read_bytes() == b"in flight"
        assert other.exists()
        assert started.spool_dir.exists()
        assert stat.S_IMODE(started.spool_dir.stat().st_mode) == 0o700
        # Nor does a third start-up touch either live one.
        assert remove_stale_spools(tmp_path) == ()
        assert live.spool_dir.exists() and started.spool_dir.exists()
    finally:
        live.close()
        if started is not None:
            started.close()
    assert not live.spool_dir.exists()
    # Closed: its lock released and its directory gone, nothing left for others.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unrelated"]


def test_a_lock_held_elsewhere_keeps_the_spool(tmp_path: Path) -> None:
    held = _stale_spool(tmp_path, "held")
    fd = os.open(held / ".lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a live sidecar holds it
        assert remove_stale_spools(tmp_path) == ()
        assert (held / "abc.upload").exists()
    finally:
        os.close(fd)
    assert remove_stale_spools(tmp_path) == (held,)
    assert not held.exists()


def test_spools_without_a_lock_symlinks_and_other_users_are_left_alone(tmp_path: Path) -> None:
    lockless = _stale_spool(tmp_path, "old-version", lock=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    target = _stale_spool(elsewhere, "target")  # stale, but reached only through a symlink
    link = tmp_path / f"{SPOOL_PREFIX}link"
    link.symlink_to(target)
    removed = remove_stale_spools(tmp_path)
    assert removed == ()
    assert lockless.exists() and target.exists() and link.is_symlink()
    if os.geteuid() == 0:
        theirs = _stale_spool(tmp_path, "theirs")
        os.chown(theirs, 65534, 65534)
        assert remove_stale_spools(tmp_path) == ()
        assert (theirs / "abc.upload").exists()
