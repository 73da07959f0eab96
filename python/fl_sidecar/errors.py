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
  Credentials never appear in messages.
- :class:`SidecarError`: the local sidecar refused a call (gRPC status mapped
  back by the Python client).
"""

from __future__ import annotations

from typing import Optional

__all__ = [
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
    "NotFoundError",
    "PermissionDeniedError",
    "RequestRejectedError",
    "SeekTableError",
    "ServerError",
    "ServerUnavailableError",
    "SidecarError",
    "SizeLimitExceededError",
    "TensorMismatchError",
    "TransferCancelledError",
    "TruncatedDataError",
    "UnsafePickleError",
    "UploadFailedError",
    "UploadOutcomeUnknownError",
]


class FlSidecarError(Exception):
    """Base class of every error fl-sidecar raises on purpose."""


class ConfigurationError(FlSidecarError, ValueError):
    """A setting (flag or environment variable) is missing or invalid."""


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


class SizeLimitExceededError(CodecError):
    """The output would exceed the caller's limit (a decompression bomb, or just too big).

    Raised before the memory is allocated whenever the sizes are known up front.
    """


# --- models --------------------------------------------------------------


class ModelError(FlSidecarError):
    """A model archive or tensor set could not be read, written or converted."""


class ModelFormatError(ModelError, ValueError):
    """The bytes are not a model archive of the expected format."""


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
    """

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        detail: Optional[str] = None,
        operation: Optional[str] = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail
        self.operation = operation


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

    Attributes:
        code: the gRPC status code name (e.g. ``"NOT_FOUND"``).
    """

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class UploadFailedError(SidecarError):
    """An upload through the sidecar failed; ``upload_state`` says what reached the FL server.

    Attributes:
        upload_id: the upload's id (ask ``SidecarClient.get_upload`` about it later).
        upload_state: ``"not_sent"`` (nothing arrived: safe to send again),
            ``"rejected"`` (the server refused it and stored nothing),
            ``"unknown"`` (it may have arrived: never resend it blindly) or
            ``"sending"`` (the sidecar is sending it right now).
    """

    def __init__(self, message: str, *, code: str, upload_id: str, upload_state: str) -> None:
        super().__init__(message, code=code)
        self.upload_id = upload_id
        self.upload_state = upload_state


# --- notifications -------------------------------------------------------


class MalformedNotificationError(FlSidecarError, ValueError):
    """A notification from the FL server is not valid JSON of the expected shape, or too large.

    The notification endpoint answers it with 400 (413 when too large) and publishes nothing.
    """
