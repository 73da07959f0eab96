"""The sidecar's domain error, raised again on the trainer's side.

When the sidecar maps a domain error to a gRPC status it names the error's
class in the trailing metadata (:data:`fl_sidecar.wire.ERROR_CLASS_KEY`). The
client raises an error that is both a :class:`~fl_sidecar.errors.SidecarError`
(``code``, ``error_class``, ``http_status``, ... keep working) and an instance
of that class, so a trainer writes ``except NotFoundError`` or ``except
ConflictError`` instead of comparing code strings::

    try:
        client.upload(model_id, data, round=3, sample_size=10)
    except ConflictError as exc:       # also an UploadFailedError and a SidecarError
        print(exc.status, exc.detail)  # the FL server's HTTP status and message

Each such type is a subclass of the base (``SidecarError``, or
``UploadFailedError`` for uploads) and the domain class, made once and cached.
A class name this version does not know gives the plain base class.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Dict, Optional, Tuple, Type, TypeVar

from fl_sidecar import errors
from fl_sidecar.errors import (
    FlSidecarError,
    ServerError,
    SidecarError,
    SpoolFullError,
    TransferCancelledError,
    UnsafeSocketError,
)

__all__ = ["DOMAIN_ERRORS", "remote_error", "remote_error_type"]

_S = TypeVar("_S", bound=SidecarError)

DOMAIN_ERRORS: Dict[str, Type[FlSidecarError]] = {
    name: value
    for name in errors.__all__
    for value in (getattr(errors, name),)
    if isinstance(value, type)
    and issubclass(value, FlSidecarError)
    and not issubclass(value, SidecarError)
    and value is not FlSidecarError
}
"""Every error class of :mod:`fl_sidecar.errors` a failed call can name, by its name.

The :class:`~fl_sidecar.errors.SidecarError` family is left out: those are the
sidecar's own refusals, raised as they are."""

_OPERATIONS = {
    "DownloadModel": "download",
    "UploadModel": "upload",
    "UploadMetrics": "metrics",
    "GetTraining": "get_training",
}
"""The :attr:`ServerError.operation` of each RPC that talks to the FL server."""

_types: Dict[Tuple[type, type], type] = {}
_types_lock = threading.Lock()


def remote_error_type(base: Type[_S], error_class: Optional[str]) -> Type[_S]:
    """The type raised for a failed call: ``base`` and the domain class ``error_class``.

    ``base`` itself when ``error_class`` is ``None``, unknown, or already a
    ``base``. The type is made once per pair and reused, so ``type(a) is type(b)``
    for two errors of the same kind.
    """
    domain = DOMAIN_ERRORS.get(error_class or "")
    if domain is None or issubclass(base, domain):
        return base
    key = (base, domain)
    with _types_lock:
        made = _types.get(key)
        if made is None:
            made = type(
                domain.__name__,
                (base, domain),
                {
                    "__module__": __name__,
                    "__qualname__": domain.__name__,
                    "__doc__": f"A {domain.__name__} the sidecar reported, raised as a "
                    f"{base.__name__}.",
                    "__reduce__": _reduce,
                },
            )
            _types[key] = made
    return made


def _reduce(error: SidecarError) -> Tuple[Any, ...]:
    # A made type is no module attribute, so pickle (multiprocessing, say) rebuilds it.
    base = type(error).__bases__[0]
    return (_rebuild, (base, error.error_class, error.args, dict(error.__dict__)))


def _rebuild(
    base: Type[SidecarError],
    error_class: Optional[str],
    args: Tuple[Any, ...],
    state: Dict[str, Any],
) -> SidecarError:
    made = remote_error_type(base, error_class)
    error = made.__new__(made, *args)
    error.args = args
    error.__dict__.update(state)
    return error


def remote_error(
    base: Type[_S],
    message: str,
    *,
    code: str,
    error_class: Optional[str] = None,
    http_status: Optional[int] = None,
    http_body: Optional[str] = None,
    http_content_type: Optional[str] = None,
    method: str = "",
    **base_fields: Any,
) -> _S:
    """A ``base`` error that is also the domain error ``error_class`` names.

    ``base_fields`` go to ``base``'s constructor (``upload_id`` and
    ``upload_state`` for :class:`~fl_sidecar.errors.UploadFailedError`). The
    domain class's own constructor is not called (its signature is its own); its
    documented attributes are set from what the call carried: for a
    :class:`~fl_sidecar.errors.ServerError` ``status`` (the HTTP status), ``detail``
    (the server's message, from its body), ``operation`` (from ``method``, the
    RPC's name), ``body`` and ``content_type``.
    """
    made = remote_error_type(base, error_class)
    error = made.__new__(made, message)
    base.__init__(
        error,
        message,
        code=code,
        error_class=error_class,
        http_status=http_status,
        http_body=http_body,
        http_content_type=http_content_type,
        **base_fields,
    )
    if isinstance(error, ServerError):
        error.status = http_status
        error.detail = _server_detail(http_body, http_content_type)
        error.operation = _OPERATIONS.get(method)
        error.body = http_body
        error.content_type = http_content_type
    if isinstance(error, UnsafeSocketError):
        error.path, error.owner = None, None
    if isinstance(error, TransferCancelledError):
        # UNAVAILABLE is the sidecar's shutdown; CANCELLED, the trainer's own leaving.
        error.shutting_down = code == "UNAVAILABLE"
    if isinstance(error, SpoolFullError):
        error.spool_dir = None
    return error


def _server_detail(body: Optional[str], content_type: Optional[str]) -> Optional[str]:
    """The FL server's message in its answer: ``{"detail": ...}``, a list of strings, or text."""
    if not body:
        return None
    text = body.strip()
    if "json" in (content_type or "").lower() or text[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and "detail" in data:
            return str(data["detail"])
        if isinstance(data, dict):
            return "; ".join(f"{key}: {value}" for key, value in data.items())
        if isinstance(data, list):
            return "; ".join(str(item) for item in data)
    return text[:500]
