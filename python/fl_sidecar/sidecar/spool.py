"""The sidecar's spool: private, locked directories and the files models pass through.

Memory stays bounded: models live in spool files in a private directory
(mode 0700) that is removed when the sidecar stops, never whole in memory. A
spool directory left behind by a sidecar that died (SIGKILL, power loss) is
removed by the next sidecar that starts with the same parent; a live
sidecar's is never touched (see :func:`remove_stale_spools`). A full spool (no
space, a quota, a file size limit) is a :class:`SpoolFullError` naming the
directory, and leaves no partial files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Optional, Tuple

from fl_sidecar.errors import (
    ChecksumMismatchError,
    CorruptDataError,
    SizeLimitExceededError,
    SpoolFullError,
    TruncatedDataError,
)

__all__ = [
    "SPOOL_PREFIX",
    "SpooledModel",
    "UploadSpool",
    "create_spool_dir",
    "raise_if_spool_full",
    "remove_stale_spools",
    "spool_space",
    "unlink_quietly",
]

_log = logging.getLogger(__name__)
SPOOL_PREFIX = "fl-sidecar-spool-"
"""Name prefix of each sidecar's spool directory under ``--spool-dir``."""
# Held with flock(LOCK_EX) for the sidecar's lifetime: a spool directory whose
# lock anyone can take belongs to no live process (the kernel drops the lock
# when its holder dies, even by SIGKILL), and is removed at the next start-up.
_LOCK_NAME = ".lock"
_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code
)


@dataclass
class SpooledModel:
    """A model in a spool file, ready to be streamed to the trainer.

    Attributes:
        path: the spool file (deleted by :meth:`discard`).
        size: bytes of the file.
        sha256: hex digest of the file.
        format: ``"torch"`` or ``"safetensors"``.
        content_encoding: how it crossed the network from the FL server.
        wire_bytes: bytes it took on the network.
    """

    path: Path
    size: int
    sha256: str
    format: str
    content_encoding: str
    wire_bytes: int

    def discard(self) -> None:
        """Delete the spool file (idempotent)."""
        unlink_quietly(self.path)


class UploadSpool:
    """Collects an upload's chunks in a spool file, counting and hashing them.

    Memory stays at one chunk; the file is deleted by :meth:`discard`.
    """

    def __init__(self, path: Path, max_size: int, *, hashed: bool = True) -> None:
        """Create the spool file at ``path`` (mode 0600); ``max_size`` is in bytes.

        ``hashed=False`` skips the SHA-256 (about a third of the per-chunk work)
        when no digest will be checked.
        """
        self.path = path
        self.max_size = max_size
        self.size = 0
        self._hash = hashlib.sha256() if hashed else None
        with spool_space(path.parent):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        self._file: Optional[IO[bytes]] = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        """Append a chunk.

        Raises:
            SizeLimitExceededError: the upload grew beyond ``max_size`` bytes.
            SpoolFullError: the spool's file system is full.
        """
        if self._file is None:
            raise ValueError("the spool is closed")
        if self.size + len(data) > self.max_size:
            raise SizeLimitExceededError(
                f"the model exceeds the sidecar's limit of {self.max_size} bytes"
            )
        with spool_space(self.path.parent):
            self._file.write(data)
        if self._hash is not None:
            self._hash.update(data)
        self.size += len(data)

    def finish(self, expected_size: Optional[int], expected_sha256: Optional[str]) -> Path:
        """Close the file and check it against the header's promises.

        Args:
            expected_size: bytes announced (``None``: not checked).
            expected_sha256: hex digest announced (``None``: not checked).

        Returns:
            The spool file's path.

        Raises:
            TruncatedDataError: fewer bytes arrived than announced.
            CorruptDataError: more bytes arrived than announced.
            ChecksumMismatchError: the SHA-256 differs from the announced one.
            SpoolFullError: the last buffered bytes did not fit.
        """
        if self._file is not None:
            file, self._file = self._file, None
            with spool_space(self.path.parent):
                file.close()
        if expected_size is not None and self.size < expected_size:
            raise TruncatedDataError(
                f"the upload ended after {self.size} of the {expected_size} bytes announced"
            )
        if expected_size is not None and self.size > expected_size:
            raise CorruptDataError(
                f"the upload carried {self.size} bytes, more than the {expected_size} announced"
            )
        if expected_sha256 is None:
            return self.path
        if self._hash is None:
            raise ValueError("this spool was created without hashing")
        digest = self._hash.hexdigest()
        if digest != expected_sha256.lower():
            raise ChecksumMismatchError(
                f"the upload's SHA-256 is {digest}, not the {expected_sha256} announced"
            )
        return self.path

    def discard(self) -> None:
        """Close and delete the spool file (idempotent; a full disk does not stop it)."""
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):  # flushing into a full spool: the file goes anyway
                file.close()
        unlink_quietly(self.path)


def raise_if_spool_full(exc: OSError, spool_dir: Path) -> None:
    """Raise :class:`SpoolFullError` naming ``spool_dir`` when ``exc`` says the disk is full.

    ENOSPC (no space or no inodes), EDQUOT (a quota) and EFBIG (a file size
    limit) count; any other error returns, for the caller to re-raise.

    Raises:
        SpoolFullError: ``exc`` is one of those, chained to it.
    """
    if exc.errno not in _FULL_ERRNOS:
        return
    reason = os.strerror(exc.errno) if exc.errno is not None else str(exc)
    raise SpoolFullError(
        f"the spool directory {spool_dir} has no room for the model ({reason}); free space "
        "there, or point --spool-dir (FL_SIDECAR_SPOOL_DIR) at a larger file system; "
        "nothing was kept",
        spool_dir=str(spool_dir),
    ) from exc


@contextlib.contextmanager
def spool_space(spool_dir: Path) -> Iterator[None]:
    """Turn a full-disk :class:`OSError` inside the block into :class:`SpoolFullError`.

    Raises:
        SpoolFullError: see :func:`raise_if_spool_full`; other errors pass unchanged.
    """
    try:
        yield
    except OSError as exc:
        raise_if_spool_full(exc, spool_dir)
        raise


def create_spool_dir(parent: Path) -> Tuple[Path, int]:
    """A fresh ``fl-sidecar-spool-*`` directory (0700) under ``parent`` and its held lock's fd.

    The lock file is created and locked under a temporary name, then renamed
    to ``.lock``: whoever finds a ``.lock`` finds it already held.
    """
    with spool_space(parent):
        directory = Path(tempfile.mkdtemp(prefix=SPOOL_PREFIX, dir=parent))
    pending = directory / f"{_LOCK_NAME}.{os.getpid()}"
    try:
        fd = os.open(pending, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))  # for people: who holds it
            os.rename(pending, directory / _LOCK_NAME)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory, fd


def remove_stale_spools(parent: Path) -> Tuple[Path, ...]:
    """Remove the spool directories under ``parent`` that no live sidecar holds.

    Only directories named ``fl-sidecar-spool-*``, owned by this user, that are
    not symlinks and whose ``.lock`` nobody holds (its holder died: the kernel
    released the lock) are removed. A live sidecar's directory (its lock is
    held, on this host or, on a shared file system with working locks, any)
    and directories without a lock file (made by an older version, or one that
    is starting this instant) are left alone.

    Returns:
        The directories removed.
    """
    removed = []
    try:
        entries = list(os.scandir(parent))
    except OSError as exc:
        _log.warning(
            "cannot look for stale spool directories",
            extra={"spool_parent": str(parent), "error": str(exc)},
        )
        return ()
    for entry in entries:
        if not entry.name.startswith(SPOOL_PREFIX):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                continue
            if _remove_if_unlocked(Path(entry.path)):
                removed.append(Path(entry.path))
        except OSError as exc:
            _log.warning(
                "could not check or remove a stale spool directory",
                extra={"path": entry.path, "error": str(exc)},
            )
    return tuple(removed)


def _remove_if_unlocked(directory: Path) -> bool:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        try:
            lock_fd = os.open(_LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
        except FileNotFoundError:
            return False
    finally:
        os.close(dir_fd)
    try:
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live sidecar holds it
        # Held by us now: no sidecar can be using it. rmtree does not follow symlinks.
        shutil.rmtree(directory)
        return True
    finally:
        os.close(lock_fd)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        _log.warning("could not remove a spool file", extra={"path": str(path), "error": str(exc)})
