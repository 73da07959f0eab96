"""Which error gives which gRPC status, and the trailers that say what caused it.

The servicer (:mod:`fl_sidecar.sidecar.servicer`) aborts a failed call with
:func:`status_for` of the error and :func:`error_trailers`; an upload's failure
is restated by :func:`upload_failure` so that its code agrees with what reached
the FL server. The proto's header comment and docs/sidecar.md ("Status codes")
document the same mapping.
"""

from __future__ import annotations

import errno
from typing import List, Tuple, Union

import grpc

from fl_sidecar.errors import (
    AuthenticationError,
    CodecError,
    ConfigurationError,
    ConflictError,
    CorruptDataError,
    FlSidecarError,
    MalformedNotificationError,
    ModelError,
    ModelFormatError,
    ModelLimitExceededError,
    ModelReadCancelledError,
    NotFoundError,
    PermissionDeniedError,
    ReferenceMismatchError,
    RequestRejectedError,
    ServerError,
    ServerUnavailableError,
    SidecarError,
    SizeLimitExceededError,
    SpoolFullError,
    TensorMismatchError,
    TransferCancelledError,
    UnsafePickleError,
    UploadOutcomeUnknownError,
)
from fl_sidecar.sidecar import uploads
from fl_sidecar.sidecar.downloads import DownloadCancelledError
from fl_sidecar.wire import (
    ERROR_CLASS_KEY,
    HTTP_BODY_KEY,
    HTTP_BODY_LIMIT,
    HTTP_CONTENT_TYPE_KEY,
    HTTP_STATUS_KEY,
)

__all__ = ["STATUS_BY_ERROR", "error_trailers", "status_for", "upload_failure"]

STATUS_BY_ERROR: List[Tuple[type, grpc.StatusCode]] = [
    (SizeLimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # The codec raises it when zstd cannot allocate a frame's window: a limit, not damage.
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SpoolFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # A model reader's budget (pickle opcodes, depth, walk steps...) is a limit too.
    (ModelLimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelReadCancelledError, grpc.StatusCode.CANCELLED),
    # Not damage: the blob needs another reference model (HTTP answers 412 likewise).
    (ReferenceMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (CorruptDataError, grpc.StatusCode.DATA_LOSS),
    (CodecError, grpc.StatusCode.DATA_LOSS),
    (UnsafePickleError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelFormatError, grpc.StatusCode.INVALID_ARGUMENT),
    (TensorMismatchError, grpc.StatusCode.INVALID_ARGUMENT),
    (ModelError, grpc.StatusCode.INVALID_ARGUMENT),
    (AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (ConflictError, grpc.StatusCode.FAILED_PRECONDITION),
    (RequestRejectedError, grpc.StatusCode.INVALID_ARGUMENT),
    (UploadOutcomeUnknownError, grpc.StatusCode.UNKNOWN),
    (ServerUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ServerError, grpc.StatusCode.UNKNOWN),
    (DownloadCancelledError, grpc.StatusCode.CANCELLED),
    (ConfigurationError, grpc.StatusCode.INVALID_ARGUMENT),
    (MalformedNotificationError, grpc.StatusCode.INVALID_ARGUMENT),
]
"""Each domain error class and its code, most specific first: the first match decides.

docs/sidecar.md ("Status codes") lists the same table; a test compares the two.
"""

_DISK_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code
)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for a domain error, as the proto documents; INTERNAL otherwise.

    A :class:`~fl_sidecar.errors.SidecarError` carries its own code; a cancelled
    transfer is UNAVAILABLE when the sidecar stopped it (shutting down) and
    CANCELLED when the trainer went away; then :data:`STATUS_BY_ERROR` decides;
    a full disk (ENOSPC, EDQUOT, EFBIG) anywhere is RESOURCE_EXHAUSTED.
    """
    if isinstance(exc, SidecarError):
        return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
    if isinstance(exc, TransferCancelledError):
        # Stopped by the shutdown: nothing arrived, and another sidecar (or this one
        # restarted) can do it. Stopped because the trainer left: nobody listens.
        return grpc.StatusCode.UNAVAILABLE if exc.shutting_down else grpc.StatusCode.CANCELLED
    for error_class, code in STATUS_BY_ERROR:
        if isinstance(exc, error_class):
            return code
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return grpc.StatusCode.RESOURCE_EXHAUSTED  # a full disk is no bug, wherever it shows
    return grpc.StatusCode.INTERNAL


# Room left for the status message (grpc-message) under the 8 KiB that gRPC
# clients accept for trailing metadata by default.
_TRAILER_BUDGET = 7 * 1024


def _grpc_message_length(message: str) -> int:
    """Bytes of ``message`` as grpc-message sends it (percent-encoding all but printable ASCII)."""
    return sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in message.encode())


def error_trailers(exc: BaseException, message: str) -> List[Tuple[str, Union[str, bytes]]]:
    """The trailing metadata that tells a client what caused a failed call.

    The error's class name for every domain error; for an FL server's refusal
    also its HTTP status, Content-Type and body (UTF-8, cut to
    :data:`~fl_sidecar.errors.HTTP_BODY_LIMIT` bytes and to what fits beside
    ``message`` in the 8 KiB of metadata a client accepts by default). Nothing
    for a bug (INTERNAL): its class says nothing a trainer can act on.
    """
    if not isinstance(exc, FlSidecarError):
        return []
    trailers: List[Tuple[str, Union[str, bytes]]] = [(ERROR_CLASS_KEY, type(exc).__name__)]
    # A status the sidecar restated (an upload's outcome, say) still shows the
    # server's answer that caused it.
    if not isinstance(exc, ServerError) and isinstance(exc.__cause__, ServerError):
        exc = exc.__cause__
    if isinstance(exc, ServerError) and exc.status is not None:
        trailers.append((HTTP_STATUS_KEY, str(int(exc.status))))
        content_type = exc.content_type or ""
        if content_type and content_type.isascii() and content_type.isprintable():
            trailers.append((HTTP_CONTENT_TYPE_KEY, content_type[:200]))
        if exc.body:
            # Binary metadata is base64 on the wire (4 bytes per 3).
            room = (_TRAILER_BUDGET - _grpc_message_length(message)) * 3 // 4
            limit = max(0, min(HTTP_BODY_LIMIT, room))
            # Cut on a character boundary, so the client decodes no broken character.
            body = exc.body.encode("utf-8")[:limit].decode("utf-8", "ignore").encode("utf-8")
            if body:
                trailers.append((HTTP_BODY_KEY, body))
    return trailers


def upload_failure(exc: Exception, upload_id: str, state: str) -> Exception:
    """The error the trainer gets for a failed upload, true to what reached the server.

    "Retry" (UNAVAILABLE) only ever goes with ``not_sent``; whenever the whole
    request may have reached the server, the code is UNKNOWN.

    Args:
        exc: what the upload raised.
        upload_id: the upload's id, named in the message.
        state: its journal state (:data:`fl_sidecar.sidecar.uploads.STATES`).

    Returns:
        ``exc`` itself when its code already tells the truth, else a
        :class:`~fl_sidecar.errors.SidecarError` with the right code.
    """
    if state == uploads.UNKNOWN and status_for(exc) != grpc.StatusCode.UNKNOWN:
        return SidecarError(
            f"{exc} (upload {upload_id}: the whole request was sent and no answer came, so the "
            "FL server may have it; do not resend it blindly: ask GetUpload / GetTraining)",
            code="UNKNOWN",
        )
    if state == uploads.UNKNOWN:
        return SidecarError(f"{exc} (upload {upload_id}; ask GetUpload)", code="UNKNOWN")
    code = status_for(exc)
    if state != uploads.NOT_SENT and code == grpc.StatusCode.UNAVAILABLE:
        code = grpc.StatusCode.UNKNOWN  # never "retry" for what may have arrived
    if state == uploads.NOT_SENT and isinstance(exc, TransferCancelledError):
        return SidecarError(
            f"{exc} (upload {upload_id}: it did not arrive; safe to send again)", code=code.name
        )
    if code == status_for(exc):
        return exc
    return SidecarError(str(exc), code=code.name)
