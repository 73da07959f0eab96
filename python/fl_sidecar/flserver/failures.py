"""What a failed or stopped request means: its typed error, and whether it may be repeated.

- :func:`map_error`: the typed error of :mod:`fl_sidecar.errors` for a non-2xx
  answer (the DLR server says "not found" and "wrong round" with 400);
- :class:`Retryable`: one attempt failed in a way that is safe to repeat (the
  retry loop of :mod:`fl_sidecar.flserver.transport` catches it);
- :func:`cancelled`: the error for a transfer a :class:`~fl_sidecar.cancel.Cancellation` stopped;
- :func:`describe`: a short, redacted reason for a transport error.
"""

from __future__ import annotations

from typing import Optional

import urllib3.exceptions

from fl_sidecar import redaction
from fl_sidecar.cancel import Cancellation
from fl_sidecar.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
    RequestRejectedError,
    ServerError,
    ServerUnavailableError,
    TransferCancelledError,
)

__all__ = ["Retryable", "cancelled", "describe", "map_error"]


class Retryable(Exception):
    """One attempt failed in a way that is safe to repeat."""

    def __init__(self, error: ServerError, retry_after: Optional[float] = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def cancelled(cancel: Cancellation, operation: str, what: str) -> TransferCancelledError:
    """The error for ``operation`` stopped by ``cancel``; ``what`` says how far it got."""
    return TransferCancelledError(
        f"{operation}: {cancel.reason or 'cancelled'}; {what}",
        shutting_down=cancel.shutting_down,
    )


def describe(exc: BaseException) -> str:
    """A short reason for a transport error. URLs carry no credentials (userinfo is refused)."""
    reason: BaseException = exc
    if exc.args and isinstance(exc.args[0], urllib3.exceptions.MaxRetryError):
        inner = exc.args[0].reason
        if inner is not None:
            reason = inner
    text = redaction.redact(str(reason))
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(reason).__name__}: {text}"


def map_error(
    status: int,
    detail: str,
    operation: str,
    body: Optional[str] = None,
    content_type: Optional[str] = None,
) -> ServerError:
    """The typed error for a non-2xx answer of the DLR server (it says "not found" with 400)."""
    message = (
        f"{operation} failed: HTTP {status}: {detail}"
        if detail
        else f"{operation} failed: HTTP {status}"
    )
    lowered = detail.lower()
    cls: type[ServerError]
    if status == 401:
        cls = AuthenticationError
    elif status == 403:
        cls = PermissionDeniedError
    elif status in (404, 410) or (status == 400 and "not found" in lowered):
        cls = NotFoundError
    elif status == 409 or (
        status == 400
        and (
            "not currently in round" in lowered
            or "is in state" in lowered
            or "is testing round" in lowered
            or "not in state" in lowered
            # The model exists, but no training uses it: the upload's precondition.
            or "not used by any training" in lowered
        )
    ):
        cls = ConflictError
    elif 400 <= status < 500:
        cls = RequestRejectedError
    else:
        cls = ServerUnavailableError
    return cls(
        message,
        status=status,
        detail=detail,
        operation=operation,
        body=body,
        content_type=content_type,
    )
