"""The one public exception hierarchy of fl-sidecar.

Every error the package raises on purpose is a :class:`FlSidecarError`. The
categories mirror what a caller can do about them:

- :class:`CodecError` and its subclasses: a packed blob is corrupt, truncated,
  fails its checksums, or would exceed the caller's size limit. The native
  extension raises exactly these classes (``fl_sidecar._codec`` registers them
  from here), so ``except fl_sidecar.errors.ChecksumMismatchError`` works for
  errors raised in Rust.
- :class:`ModelError` and its subclasses: a model archive is not what it should
  be, a pickle tried to do something other than rebuild tensors, or new weights
  do not match the template.
- :class:`ServerError` and its subclasses: the FL server refused, failed, or
  could not be reached. Each carries the HTTP ``status`` (``None`` when no
  answer came), the server's own message (``detail``) and the ``operation``.
  Credentials never appear in messages: every form of every secret the
  process holds is redacted when the error is made (:mod:`fl_sidecar.redaction`).
- :class:`SidecarError`: the local sidecar refused a call (gRPC status mapped
  back by the Python client).
"""

from __future__ import annotations

from typing import Optional

from fl_sidecar.redaction import redact

__all__ = [
    "AmbiguousArchiveError",
    "AuthenticationError",
    "ChecksumMismatchError",
    "CodecError",
    "ConfigurationError",
    "ConflictError",
    "CorruptDataError",
    "FlSidecarError",
    "MalformedNotificationError",
    "ModelError",
    "ModelFormatError",
    "ModelLimitExceededError",
    "ModelReadCancelledError",
    "NotFoundError",
    "PermissionDeniedError",
    "ReferenceMismatchError",
    "RequestRejectedError",
    "SeekTableError",
    "ServerError",
    "ServerUnavailableError",
    "SidecarError",
    "SizeLimitExceededError",
    "SpoolFullError",
    "TensorMismatchError",
    "TransferCancelledError",
    "TruncatedDataError",
    "UnsafePickleError",
    "UnsafeSocketError",
    "UploadFailedError",
    "UploadOutcomeUnknownError",
]


class FlSidecarError(Exception):
    """Base class of every error fl-sidecar raises on purpose."""


class ConfigurationError(FlSidecarError, ValueError):
    """A setting (flag or environment variable) is missing or invalid."""


class UnsafeSocketError(ConfigurationError):
    """The unix socket, or a directory above it, could be someone else's.

    The sidecar refuses to serve there, and a trainer's client refuses to send
    its token or credentials there.

    Attributes:
        path: the socket or directory refused (``None`` when no path is involved).
        owner: its owner's uid (``None`` when not known).
    """

    def __init__(
        self, message: str, *, path: Optional[str] = None, owner: Optional[int] = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.owner = owner


# --- codec ---------------------------------------------------------------


class CodecError(FlSidecarError):
    """A blob could not be packed or unpacked."""


class CorruptDataError(CodecError, ValueError):
    """The data is not a valid zstd stream (bad magic, bad header, bad block)."""


class TruncatedDataError(CorruptDataError):
    """The data ends before the stream does."""


class ChecksumMismatchError(CorruptDataError):
    """A frame's content checksum does not match its decompressed bytes."""


class SeekTableError(CorruptDataError):
    """The seek table is malformed or disagrees with the frames it describes."""


class ReferenceMismatchError(CodecError):
    """A tensor blob was coded against a reference other than the one given.

    No reference, one of another size, or one whose bytes differ where a tensor was
    coded against it: decoding would give a wrong model, so nothing is returned.
    """


class SizeLimitExceededError(CodecError):
    """The output would exceed the caller's limit (a decompression bomb, or just too big).

    Raised before the memory is allocated whenever the sizes are known up front.
    """


# --- models --------------------------------------------------------------


class ModelError(FlSidecarError):
    """A model archive or tensor set could not be read, written or converted."""


class ModelFormatError(ModelError, ValueError):
    """The bytes are not a model archive of the expected format."""


class AmbiguousArchiveError(ModelFormatError):
    """A zip archive that another zip or torch reader could read differently.

    Duplicate or look-alike record names, records that overlap or lie about their
    sizes, local headers that disagree with the central directory, data before or
    after the archive, zip64 fields that disagree, a file that is both a pickle and
    a zip: the restricted reader would vet one thing while ``torch.load`` ran
    another, so such an archive is refused outright.
    """


class ModelLimitExceededError(ModelFormatError):
    """Reading a model would exceed one of the reader's budgets on work or memory.

    The message names the limit (pickle opcodes, nesting depth, tensor count, walk
    steps...). Real models stay far below every limit; a hostile pickle that shares
    sub-objects to make the walk explode, or nests containers until a C routine
    recurses too deep, is stopped here before it costs more.
    """


class ModelReadCancelledError(FlSidecarError):
    """The caller's ``should_stop`` check asked the model reader to stop, and it did."""


class UnsafePickleError(ModelError):
    """A pickle asked for something other than rebuilding tensors and plain containers.

    The restricted reader refuses it without running any of it. Load it with
    :func:`fl_sidecar.models.load_trusted` only if you trust where it came from.
    """


class TensorMismatchError(ModelError, ValueError):
    """New weights do not match the template's names, shapes or dtypes."""


# --- FL server -----------------------------------------------------------


class ServerError(FlSidecarError):
    """The FL server refused or failed a request.

    Attributes:
        status: the HTTP status code, or ``None`` when no answer was received.
        detail: the server's own message (its ``detail`` field or list of strings).
        operation: what was being done, e.g. ``"download"``, ``"upload"``, ``"metrics"``.
        body: the server's answer body as text (at most 64 KiB), when it sent one:
            usually its JSON, e.g. ``["Training with ID ... is not currently in round 5"]``.
        content_type: the answer's ``Content-Type``, when it had one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        detail: Optional[str] = None,
        operation: Optional[str] = None,
        body: Optional[str] = None,
        content_type: Optional[str] = None,
    ) -> None:
        # The server's text can echo a credential (some servers put the request's
        # Authorization header in their error bodies): every form of every secret
        # the process holds is removed here, so no caller can pass one on.
        super().__init__(redact(message))
        self.status = status
        self.detail = redact(detail) if detail is not None else None
        self.operation = operation
        self.body = redact(body) if body is not None else None
        self.content_type = content_type


class AuthenticationError(ServerError):
    """The server refused the credentials (HTTP 401)."""


class PermissionDeniedError(ServerError):
    """Authenticated, but not allowed (HTTP 403, e.g. not a participant of the training)."""


class NotFoundError(ServerError):
    """The model, training or user does not exist (the DLR server says so with a 400)."""


class ConflictError(ServerError):
    """The request conflicts with the training's state: wrong round, wrong state, duplicate."""


class RequestRejectedError(ServerError):
    """The server rejected the request as invalid (another 4xx)."""


class ServerUnavailableError(ServerError):
    """The server could not be reached, timed out, or answered 5xx, after the retry budget."""


class UploadOutcomeUnknownError(ServerUnavailableError):
    """An upload failed after its body may have reached the server.

    It is never resent automatically (the real server counts duplicates). Ask
    the training's state to learn whether it arrived.
    """


class TransferCancelledError(FlSidecarError):
    """A transfer was stopped before it completed: the trainer went away or the sidecar shut down.

    For an upload it means that the request never reached the FL server whole
    (its last body byte was not sent), so the server stored nothing and sending
    it again is safe. An upload cancelled after its whole body was sent is an
    :class:`UploadOutcomeUnknownError` instead.

    Attributes:
        shutting_down: True when the sidecar's shutdown stopped it, False when the
            trainer did.
    """

    def __init__(self, message: str, *, shutting_down: bool = False) -> None:
        super().__init__(message)
        self.shutting_down = shutting_down


# --- sidecar -------------------------------------------------------------


class SidecarError(FlSidecarError):
    """The local sidecar refused or failed a call.

    When the call failed because the FL server refused it, the sidecar passes
    the server's answer on (trailing metadata, see :data:`fl_sidecar.wire.ERROR_CLASS_KEY`) and
    it lands here. The Python client raises it as an instance of the domain class the
    sidecar named too (``except NotFoundError`` works; :mod:`fl_sidecar.trainer.remote_errors`).

    Attributes:
        code: the gRPC status code name (e.g. ``"NOT_FOUND"``).
        error_class: the sidecar's error class behind it (e.g. ``"ConflictError"``,
            ``"UploadOutcomeUnknownError"``), or ``None`` when the sidecar named none.
        http_status: the FL server's HTTP status, or ``None`` when the server gave
            no answer (refused by the sidecar itself, server unreachable, ...).
        http_body: the FL server's answer body as text (at most 4 KiB), or ``None``.
        http_content_type: that answer's ``Content-Type``, or ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        error_class: Optional[str] = None,
        http_status: Optional[int] = None,
        http_body: Optional[str] = None,
        http_content_type: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.error_class = error_class
        self.http_status = http_status
        self.http_body = http_body
        self.http_content_type = http_content_type


class SpoolFullError(FlSidecarError):
    """The spool's file system is full (no space, a quota, or a file size limit).

    Nothing was sent or kept: the partial spool files are removed. Free space in
    (or give more to) ``spool_dir``, then retry.

    Attributes:
        spool_dir: the sidecar's spool directory.
    """

    def __init__(self, message: str, *, spool_dir: Optional[str] = None) -> None:
        super().__init__(message)
        self.spool_dir = spool_dir


class UploadFailedError(SidecarError):
    """An upload through the sidecar failed; ``upload_state`` says what reached the FL server.

    Attributes:
        upload_id: the upload's id (ask ``SidecarClient.get_upload`` about it later).
        upload_state: ``"not_sent"`` (nothing arrived: safe to send again),
            ``"rejected"`` (the server refused it and stored nothing),
            ``"unknown"`` (it may have arrived: never resend it blindly) or
            ``"sending"`` (the sidecar is sending it right now).
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        upload_id: str,
        upload_state: str,
        error_class: Optional[str] = None,
        http_status: Optional[int] = None,
        http_body: Optional[str] = None,
        http_content_type: Optional[str] = None,
    ) -> None:
        super().__init__(
            message,
            code=code,
            error_class=error_class,
            http_status=http_status,
            http_body=http_body,
            http_content_type=http_content_type,
        )
        self.upload_id = upload_id
        self.upload_state = upload_state


# --- notifications -------------------------------------------------------


class MalformedNotificationError(FlSidecarError, ValueError):
    """A notification from the FL server is not valid JSON of the expected shape, or too large.

    The notification endpoint answers it with 400 (413 when too large) and publishes nothing.
    """
