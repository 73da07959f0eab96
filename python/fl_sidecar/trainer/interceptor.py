"""The one gRPC client interceptor of a trainer's channel: socket check, token, typed errors.

Every call of :class:`~fl_sidecar.trainer.client.SidecarClient` passes through
:class:`SidecarInterceptor`, which

1. on a unix socket checks, before anything is sent, that the socket and its
   directory belong to this process's user, root or the expected owner
   (:func:`fl_sidecar.socketdir.check_client_socket`), so no token and no
   credentials reach a socket another user could have put in the sidecar's place;
2. adds the sidecar's API token to the call's metadata
   (:data:`fl_sidecar.wire.TOKEN_METADATA_KEY`);
3. turns a failed call into a :class:`~fl_sidecar.errors.SidecarError` that is also
   the domain error the sidecar named (:mod:`fl_sidecar.trainer.remote_errors`),
   carrying the FL server's answer; an UploadModel failure is an
   :class:`~fl_sidecar.errors.UploadFailedError` with the upload's state.

A refusal in step 1 raises :class:`~fl_sidecar.errors.UnsafeSocketError`, or a
``SidecarError`` with code ``UNAVAILABLE`` when no socket is there.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Dict, Iterator, Optional, Tuple, Union

import grpc

from fl_sidecar import socketdir
from fl_sidecar.errors import FlSidecarError, SidecarError, UploadFailedError
from fl_sidecar.trainer.remote_errors import remote_error
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.wire import (
    ERROR_CLASS_KEY,
    HTTP_BODY_KEY,
    HTTP_CONTENT_TYPE_KEY,
    HTTP_STATUS_KEY,
    TOKEN_METADATA_KEY,
    UPLOAD_ID_METADATA_KEY,
    UPLOAD_STATE_METADATA_KEY,
)

__all__ = ["SidecarInterceptor", "map_rpc_error", "raise_if_refused"]

Trailers = Dict[str, Union[str, bytes]]


# grpc ships no stubs: its classes are Any to mypy.
class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,  # type: ignore[misc]
):
    """A call's details with the metadata replaced (grpc's own type cannot be built)."""


def rpc_name(method: Union[str, bytes]) -> str:
    """The RPC's name in a full method name (``/fl_sidecar.v1.Sidecar/GetInfo``: ``GetInfo``)."""
    text = method.decode() if isinstance(method, bytes) else str(method)
    return text.rpartition("/")[2]


def describe_call(method: str, request: Any) -> str:
    """How an error message names the call: what was asked, and of which model or training."""
    if method == "DownloadModel":
        return f"download of model {request.model_id}"
    if method == "UploadMetrics":
        return f"metrics upload for model {request.model_id}"
    if method in ("GetTraining", "GetUpload"):
        key = request.training_id if method == "GetTraining" else request.upload_id
        return f"{method} {key}"
    if method == "UploadModel":
        header = _upload_header(request)
        if header is not None:
            return f"upload {header.upload_id} for model {header.model_id}"
    return method


def _upload_header(requests: Any) -> Optional[pb.UploadHeader]:
    # A request stream of this package shows its first message (the header) as ``first``.
    first = getattr(requests, "first", None)
    if isinstance(first, pb.UploadModelRequest) and first.WhichOneof("kind") == "header":
        return first.header
    return None


def map_rpc_error(exc: grpc.RpcError, method: str, request: Any = None) -> SidecarError:
    """The one place a failed call becomes a (typed) :class:`SidecarError`.

    ``method`` is the RPC's name, ``request`` its request (or request stream),
    used only to name the call in the message. ``code`` is the gRPC status name;
    the class is also the domain error the sidecar named in the trailers; the FL
    server's status, body and content type come from the trailers too. For
    UploadModel it is an :class:`UploadFailedError` whose ``upload_state`` is the
    sidecar's trailer, or ``""`` when the status did not come from the sidecar
    (the connection broke): then nobody has said what reached the FL server yet.
    """
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    message = details or str(code)
    if name == "UNAVAILABLE" and "connect" in (details or "").lower():
        message = f"cannot reach the sidecar: {details}"
    trailers = call_trailers(exc)
    status = trailers.get(HTTP_STATUS_KEY)
    body = trailers.get(HTTP_BODY_KEY)
    facts: Dict[str, Any] = {
        "code": name,
        "error_class": _text(trailers.get(ERROR_CLASS_KEY)),
        "http_status": int(status) if isinstance(status, str) and status.isdigit() else None,
        "http_body": body.decode("utf-8", "replace") if isinstance(body, bytes) else None,
        "http_content_type": _text(trailers.get(HTTP_CONTENT_TYPE_KEY)),
        "method": method,
    }
    text = f"{describe_call(method, request)} failed ({name}): {message}"
    if method != "UploadModel":
        return remote_error(SidecarError, text, **facts)
    header = _upload_header(request)
    upload_id = header.upload_id if header is not None else ""
    return remote_error(
        UploadFailedError,
        text,
        upload_id=upload_id or str(trailers.get(UPLOAD_ID_METADATA_KEY, "")),
        upload_state=str(trailers.get(UPLOAD_STATE_METADATA_KEY, "")),
        **facts,
    )


def call_trailers(exc: grpc.RpcError) -> Trailers:
    """A failed call's trailing metadata by key (empty when it never reached the sidecar)."""
    getter = getattr(exc, "trailing_metadata", None)
    try:
        items = getter() if callable(getter) else None
    except Exception:  # a broken call object must not hide the error itself
        items = None
    return {str(key): value for key, value in items or ()}


def _text(value: Union[str, bytes, None]) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def raise_if_refused(call: Any) -> None:
    """Raise at once the refusal the interceptor made before a streaming call sent anything.

    grpc hands an exception raised while intercepting a call with a response
    stream to the first read instead; a subscription refused for its socket
    should fail when it is made.

    Raises:
        UnsafeSocketError, SidecarError: the refusal.
    """
    if isinstance(call, grpc.Future) and call.done():
        refusal = call.exception()
        if isinstance(refusal, FlSidecarError):
            raise refusal


class _MappedStream:
    """A call's response stream whose failure is raised as :func:`map_rpc_error` makes it."""

    def __init__(self, call: Any, mapper: Callable[[grpc.RpcError], SidecarError]) -> None:
        self._call = call
        self._responses: Optional[Iterator[Any]] = None
        self._mapper = mapper

    def __iter__(self) -> _MappedStream:
        return self

    def __next__(self) -> Any:
        try:
            if self._responses is None:
                self._responses = iter(self._call)
            return next(self._responses)
        except grpc.RpcError as exc:
            raise self._mapper(exc) from None

    def cancel(self) -> bool:
        """Cancel the call (the stream then ends with ``CANCELLED``)."""
        return bool(self._call.cancel())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class SidecarInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Checks the socket, adds the token and maps errors, for every call of one channel.

    Args:
        target: the gRPC target (for messages).
        socket_path: the unix socket's path, or ``None`` for a TCP target (nothing to check).
        expected_owner: a uid the socket may also belong to, besides this user and root.
        api_token: the sidecar's API token, or ``None``.
    """

    def __init__(
        self,
        target: str,
        *,
        socket_path: Optional[str],
        expected_owner: Optional[int],
        api_token: Optional[str],
    ) -> None:
        self.target = target
        self._socket_path = socket_path
        self._expected_owner = expected_owner
        self._token: Tuple[Tuple[str, str], ...] = (
            ((TOKEN_METADATA_KEY, api_token),) if api_token else ()
        )

    def check_socket(self) -> None:
        """Refuse a socket (or directory) that another user could have put there.

        Raises:
            UnsafeSocketError: the socket or its directory is not trusted.
            SidecarError: ``UNAVAILABLE`` when no socket is at the path.
        """
        if self._socket_path is None:
            return
        try:
            socketdir.check_client_socket(self._socket_path, expected_owner=self._expected_owner)
        except FileNotFoundError as exc:
            raise SidecarError(
                f"no sidecar is listening at {self.target} ({exc.strerror}: {exc.filename})",
                code="UNAVAILABLE",
            ) from None

    def _prepare(self, details: Any) -> Any:
        self.check_socket()
        metadata = tuple(details.metadata or ()) + self._token
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
            details.compression,
        )

    def _unary_outcome(self, outcome: Any, method: str, request: Any) -> Any:
        if isinstance(outcome, grpc.RpcError):
            cause = outcome.exception() if isinstance(outcome, grpc.Future) else outcome
            if cause is not None and not isinstance(cause, grpc.RpcError):
                raise cause  # not a status: an exception grpc caught on its way
            raise map_rpc_error(outcome, method, request) from None
        return outcome

    def _stream(self, call: Any, method: str, request: Any) -> _MappedStream:
        return _MappedStream(call, lambda exc: map_rpc_error(exc, method, request))

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        """A unary call: checked, with the token; a failure raised typed."""
        outcome = continuation(self._prepare(details), request)
        return self._unary_outcome(outcome, rpc_name(details.method), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        """A client-streaming call (UploadModel): checked, with the token; failure typed."""
        outcome = continuation(self._prepare(details), requests)
        return self._unary_outcome(outcome, rpc_name(details.method), requests)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        """A server-streaming call: checked, with the token; its stream's failure typed."""
        call = continuation(self._prepare(details), request)
        return self._stream(call, rpc_name(details.method), request)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        """A bidirectional call (Pack, Unpack): checked, with the token; failure typed."""
        call = continuation(self._prepare(details), requests)
        return self._stream(call, rpc_name(details.method), requests)
