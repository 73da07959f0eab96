"""The upload journal: what became of each upload, on disk, so a trainer can always ask.

A trainer names each upload (``UploadHeader.upload_id``). Before the sidecar
sends any byte of it to the FL server it records the upload durably (written,
fsynced, renamed, directory fsynced), and again just before the last body byte
goes out and when the answer comes. So after any failure, a sidecar crash
included, the journal tells which of these is true:

- ``not_sent``: the server cannot have the upload (it was never sent, or it was
  stopped before its last byte); sending it again is safe;
- ``sending``: it is being sent right now by a live sidecar;
- ``accepted``: the server answered 2xx;
- ``rejected``: the server answered 4xx and stored nothing;
- ``unknown``: the whole request went out and no answer came (the sidecar was
  stopped, the connection broke, or the server answered 5xx). The server may
  have stored it: do not send it again without checking the training.

A record found in ``sending`` when a sidecar starts belongs to a sidecar that
died mid-upload: before its last byte it becomes ``not_sent``, after it
``unknown``. Records are kept for :data:`RETENTION_SECONDS`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Set

from fl_sidecar.errors import ConfigurationError, SidecarError

__all__ = [
    "RETENTION_SECONDS",
    "STATES",
    "UploadJournal",
    "UploadRecord",
    "check_upload_id",
]

_log = logging.getLogger(__name__)

RETENTION_SECONDS = 7 * 24 * 3600
"""How long a finished upload's record is kept (seconds): 7 days."""

NOT_SENT = "not_sent"
SENDING = "sending"
ACCEPTED = "accepted"
REJECTED = "rejected"
UNKNOWN = "unknown"
STATES = (NOT_SENT, SENDING, ACCEPTED, REJECTED, UNKNOWN)
"""Every state a record can be in, as :attr:`UploadRecord.state` spells it."""

_MAX_ID_LENGTH = 128


def check_upload_id(upload_id: str) -> str:
    """``upload_id`` if it is 1-128 printable ASCII characters without spaces.

    Raises:
        SidecarError: INVALID_ARGUMENT otherwise.
    """
    if not upload_id or len(upload_id) > _MAX_ID_LENGTH:
        raise SidecarError(
            f"upload_id must be 1-{_MAX_ID_LENGTH} characters", code="INVALID_ARGUMENT"
        )
    if not all("!" <= c <= "~" for c in upload_id):
        raise SidecarError(
            "upload_id must be printable ASCII without spaces (e.g. a UUID)",
            code="INVALID_ARGUMENT",
        )
    return upload_id


@dataclass(frozen=True)
class UploadRecord:
    """What the journal knows about one upload.

    Attributes:
        upload_id: the trainer's name for the upload.
        state: one of :data:`STATES`.
        model_id, round: what it was uploaded for.
        http_status: the FL server's answer (0 when none came).
        detail: the server's message, or why the state is what it is.
        body_complete: whether the request's last byte was handed to the network.
        updated_at: unix time of the last change, seconds.
        pid: the sidecar process that wrote it.
    """

    upload_id: str
    state: str
    model_id: str
    round: int
    http_status: int = 0
    detail: str = ""
    body_complete: bool = False
    updated_at: float = 0.0
    pid: int = 0


class UploadJournal:
    """Durable upload records in a private directory (mode 0700), one small JSON file each.

    Thread-safe. Several sidecar processes may share the directory: a record
    is reconciled at start-up only when the process that wrote it is gone.
    """

    def __init__(self, directory: Path, *, retention: float = RETENTION_SECONDS) -> None:
        """Open the journal in ``directory`` (made, mode 0700, on the first record).

        Records of sidecars that died mid-upload are reconciled, old ones pruned.

        Raises:
            ConfigurationError: the directory belongs to another user or others may write to it.
            OSError: it cannot be created or read.
        """
        self.directory = directory
        self.retention = retention
        self._lock = threading.Lock()
        self._active: Set[str] = set()
        self._checked = False
        if directory.exists():
            self._check_directory()
            self._recover()

    def _check_directory(self) -> None:
        # Made on the first record, so a sidecar that never uploads leaves nothing behind.
        if not self._checked:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.stat(self.directory)
            if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise ConfigurationError(
                    f"the upload journal {self.directory} belongs to another user or is "
                    "writable by others; use a private directory"
                )
            self._checked = True

    # -- trainer-facing --

    def get(self, upload_id: str) -> Optional[UploadRecord]:
        """The record of ``upload_id``, or ``None`` when this journal never saw it."""
        return self._read(self._path(upload_id))

    # -- the upload's lifecycle --

    def claim(self, upload_id: str, model_id: str, round: int) -> None:
        """Reserve ``upload_id`` for an upload about to be received (in memory, not yet durable).

        Raises:
            SidecarError: ABORTED (an upload with this id is in progress),
                ALREADY_EXISTS (the server accepted it already), or
                FAILED_PRECONDITION (its earlier outcome is unknown).
        """
        with self._lock:
            if upload_id in self._active:
                raise SidecarError(
                    f"upload {upload_id} is in progress in this sidecar; ask GetUpload for "
                    "its outcome instead of sending it again",
                    code="ABORTED",
                )
            previous = self.get(upload_id)
            if previous is not None and previous.state == ACCEPTED:
                raise SidecarError(
                    f"upload {upload_id} was already accepted by the FL server (HTTP "
                    f"{previous.http_status}); it is not sent again",
                    code="ALREADY_EXISTS",
                )
            if previous is not None and previous.state in (UNKNOWN, SENDING):
                raise SidecarError(
                    f"upload {upload_id}'s earlier attempt has an unknown outcome (the FL "
                    "server may have it); it is not sent again under this id. Check the "
                    "training (GetTraining: round, local_models_arrived) and send it under "
                    "a new upload_id only if it did not arrive",
                    code="FAILED_PRECONDITION",
                )
            self._active.add(upload_id)

    def release(self, upload_id: str) -> None:
        """End the claim of :meth:`claim` (whatever became of the upload)."""
        with self._lock:
            self._active.discard(upload_id)

    def sending(self, upload_id: str, model_id: str, round: int) -> None:
        """Record durably that the upload's first byte is about to be sent.

        Raises:
            OSError: the record cannot be written (then nothing is sent).
        """
        self._write(UploadRecord(upload_id, SENDING, model_id, int(round)))

    def body_complete(self, upload_id: str) -> None:
        """Record durably that the request's last byte is about to be sent.

        Raises:
            OSError: the record cannot be written (then the last byte is not sent).
        """
        record = self.get(upload_id)
        if record is not None:
            self._write(replace(record, body_complete=True))

    def finish(self, upload_id: str, state: str, *, http_status: int = 0, detail: str = "") -> None:
        """Record the outcome: ``state`` is ``accepted``, ``rejected``, ``not_sent`` or ``unknown``.

        Failing to write is logged, not raised: the trainer gets the outcome in
        the call's answer all the same.
        """
        if state not in STATES or state == SENDING:
            raise ValueError(f"not a final upload state: {state!r}")
        record = self.get(upload_id)
        if record is None:
            return
        try:
            self._write(replace(record, state=state, http_status=http_status, detail=detail[:500]))
        except OSError as exc:
            _log.error(
                "could not record an upload's outcome",
                extra={"upload_id": upload_id, "state": state, "error": str(exc)},
            )

    # -- storage --

    def _path(self, upload_id: str) -> Path:
        # Hashed: the id is the trainer's text, the file name must be safe.
        return self.directory / (hashlib.sha256(upload_id.encode()).hexdigest()[:40] + ".json")

    def _read(self, path: Path) -> Optional[UploadRecord]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return UploadRecord(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            _log.warning("unreadable upload record", extra={"path": str(path), "error": str(exc)})
            return None

    def _write(self, record: UploadRecord) -> None:
        try:
            self._check_directory()
        except ConfigurationError as exc:
            raise PermissionError(str(exc)) from None
        record = replace(record, updated_at=time.time(), pid=os.getpid())
        path = self._path(record.upload_id)
        temp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                json.dump(asdict(record), file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        _fsync_directory(self.directory)

    def _recover(self) -> None:
        now = time.time()
        counts: Dict[str, int] = {}
        for path in self.directory.glob("*.json"):
            record = self._read(path)
            if record is None:
                continue
            if record.state == SENDING and not _alive(record.pid):
                if record.body_complete:
                    state, detail = (
                        UNKNOWN,
                        (
                            "the sidecar stopped after the whole request was sent and before the "
                            "FL server's answer came: the server may have it"
                        ),
                    )
                else:
                    state, detail = (
                        NOT_SENT,
                        (
                            "the sidecar stopped before the request's last byte was sent: the FL "
                            "server cannot have it"
                        ),
                    )
                self._write(replace(record, state=state, detail=detail))
                counts[state] = counts.get(state, 0) + 1
            elif record.state != SENDING and now - record.updated_at > self.retention:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        for stale in self.directory.glob("*.tmp"):
            # Left by a crash mid-write; a live writer renames its own within milliseconds.
            with contextlib.suppress(FileNotFoundError):
                if now - stale.stat().st_mtime > 3600:
                    stale.unlink()
        if counts:
            _log.warning(
                "uploads interrupted by an earlier stop, recorded",
                extra={"directory": str(self.directory), **counts},
            )


def _alive(pid: int) -> bool:
    """Whether another live process has ``pid`` (our own pid is a predecessor's, reused)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
