"""The high-level Python client of the fl-sidecar gRPC service.

A trainer talks to the sidecar running next to it::

    from fl_sidecar.client import SidecarClient

    with SidecarClient("unix:///run/user/1000/fl-sidecar/sidecar.sock") as sidecar:
        for event in sidecar.watch_events():
            if event.kind is EventKind.UPDATE_ROUND_START:
                weights = sidecar.download_state_dict(event.model_id)
                ...  # train
                sidecar.upload_state_dict(event.model_id, weights, round=event.round,
                                          sample_size=len(dataset))

Models move in 1-4 MiB messages; every method that moves a model takes an
optional ``progress(done_bytes, total_bytes)`` callback (``total_bytes`` is 0
while unknown). Every gRPC failure surfaces as :class:`fl_sidecar.errors.SidecarError`
whose ``code`` is the gRPC status name (``"NOT_FOUND"``, ``"UNAVAILABLE"``, ...);
when the FL server refused, ``http_status`` and ``http_body`` hold its answer.
On a unix socket every call first checks who owns the socket and its directory
and raises :class:`fl_sidecar.errors.UnsafeSocketError` before sending anything
when another user could have put it there (see ``expected_owner``).

torch is needed only by the ``*_state_dict`` and ``*_module`` methods, which use
:mod:`fl_sidecar.models` (imported on first use).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import tempfile
import threading
import uuid
from dataclasses import dataclass, field
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    BinaryIO,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Type,
    TypeVar,
    Union,
)

import grpc

from fl_sidecar import socketdir
from fl_sidecar.errors import SidecarError, UploadFailedError
from fl_sidecar.events import EventKind, ServerEvent
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from fl_sidecar.wire import (
    DEFAULT_CHUNK_SIZE,
    ERROR_CLASS_KEY,
    FORMATS,
    HTTP_BODY_KEY,
    HTTP_CONTENT_TYPE_KEY,
    HTTP_STATUS_KEY,
    MAX_CHUNK_SIZE,
    MAX_MESSAGE_SIZE,
    TOKEN_METADATA_KEY,
    UPLOAD_STATE_METADATA_KEY,
    event_from_proto,
    format_name,
    metric_to_proto,
    upload_state_name,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_MESSAGE_SIZE",
    "SOCKET_OWNER_VARIABLE",
    "TOKEN_METADATA_KEY",
    "CallCredentials",
    "DownloadResult",
    "EventStream",
    "MetricsResult",
    "PackResult",
    "SidecarClient",
    "SidecarInfo",
    "TrainingStatus",
    "UnpackResult",
    "UploadResult",
    "UploadStatus",
    "default_target",
    "normalize_target",
    "unix_socket_path",
]

SOCKET_OWNER_VARIABLE = "FL_SIDECAR_SOCKET_OWNER"
"""Environment variable naming the uid or user the sidecar's socket may belong to."""

Buffer = Union[bytes, bytearray, memoryview]
PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[int, int], None]
_T = TypeVar("_T")
MetricsArg = Optional[Union[Mapping[str, Any], Sequence[Tuple[str, Any]]]]
"""Metrics by name: numbers go as numbers, anything else as its ``str()``.

(:func:`fl_sidecar.wire.metric_to_proto`)."""

# The gRPC code of a refusal the journal recorded (by HTTP status), as the sidecar maps them.
_REJECTION_CODES = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}

_CODEC_REQUESTS = {"Pack": pb.PackRequest, "Unpack": pb.UnpackRequest}
"""The request message of each codec RPC, by its name."""


def default_target() -> str:
    """The sidecar address to use when the caller names none, as the settings module resolves it.

    Where a sidecar started in this environment would serve:
    ``FL_SIDECAR_SOCKET``, ``FL_SIDECAR_LISTEN``, else
    ``$XDG_RUNTIME_DIR/fl-sidecar/sidecar.sock`` or ``/tmp/fl-sidecar-<uid>/sidecar.sock``.
    A training script started by a sidecar in compatibility mode inherits
    its environment, so it finds that sidecar.

    Raises:
        fl_sidecar.errors.ConfigurationError: the environment's settings are invalid.
    """
    import argparse

    from fl_sidecar import config

    settings = config.Settings.from_args(argparse.Namespace())
    if settings.socket_path is not None:
        return "unix:" + settings.socket_path
    if settings.listen is not None:
        host, port = settings.listen
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "unix:" + config.default_socket_path({})


def normalize_target(target: Optional[str]) -> str:
    """Turn a user's address into a gRPC target.

    ``None`` means :func:`default_target`; a path (``/x/y.sock``, ``./y.sock``)
    becomes ``unix:<path>``; ``unix:...``, ``unix-abstract:...``, ``dns:...``
    and ``host:port`` pass through unchanged.

    Raises:
        ValueError: for an empty target.
    """
    if target is None:
        return default_target()
    target = target.strip()
    if not target:
        raise ValueError("empty sidecar target")
    if target.startswith(("/", "./", "../")):
        return "unix:" + os.path.abspath(target)
    return target


def unix_socket_path(target: str) -> Optional[str]:
    """The file system path of a ``unix:`` gRPC target; ``None`` for any other target.

    ``unix:///abs``, ``unix:/abs`` and ``unix:relative`` name a path;
    ``unix-abstract:`` sockets have none.
    """
    if target.startswith("unix://"):
        return target[len("unix://") :] or None
    if target.startswith("unix:"):
        return os.path.abspath(target[len("unix:") :]) if target[len("unix:") :] else None
    return None


def _format_value(fmt: Union[str, int]) -> int:
    if isinstance(fmt, str):
        try:
            return int(FORMATS[fmt.lower()])
        except KeyError:
            raise ValueError(
                f"unknown model format {fmt!r}; choose from {', '.join(FORMATS)}"
            ) from None
    return int(fmt)


@dataclass(frozen=True)
class CallCredentials:
    """FL-server credentials for one call, overriding the sidecar's own.

    They travel to the local sidecar only, which uses them for that call and
    never logs them; ``repr`` hides them too.
    """

    username: Optional[str] = field(default=None, repr=False)
    password: Optional[str] = field(default=None, repr=False)
    token: Optional[str] = field(default=None, repr=False)
    authorization_header: Optional[str] = field(default=None, repr=False)

    @classmethod
    def basic(cls, username: str, password: str) -> CallCredentials:
        """HTTP basic authentication with the FL server's username and password."""
        return cls(username=username, password=password)

    @classmethod
    def api_token(cls, token: str) -> CallCredentials:
        """An FL-server API token (sent as ``Authorization: Token <token>``)."""
        return cls(token=token)

    @classmethod
    def header(cls, value: str) -> CallCredentials:
        """A complete HTTP ``Authorization`` header value, as the reference client takes."""
        return cls(authorization_header=value)

    def to_proto(self) -> pb.Credentials:
        """The contract's ``Credentials`` message."""
        if self.authorization_header is not None:
            return pb.Credentials(authorization_header=self.authorization_header)
        if self.token is not None:
            return pb.Credentials(token=self.token)
        if self.username is not None:
            return pb.Credentials(
                basic=pb.BasicAuth(username=self.username, password=self.password or "")
            )
        return pb.Credentials()


@dataclass(frozen=True)
class SidecarInfo:
    """What ``GetInfo`` reports (sizes in bytes)."""

    version: str
    codec: str
    codec_level: int
    codec_chunk_size: int
    server_url: str
    negotiated_coding: str
    notification_url: str
    max_message_size: int
    trusts_pickles: bool


@dataclass(frozen=True)
class DownloadResult:
    """Facts of a downloaded model.

    Attributes:
        model_id: the global model's id.
        format: ``"torch"`` or ``"safetensors"``.
        size: bytes delivered to the trainer.
        sha256: hex digest of those bytes (computed and checked by the client unless
            it was created with ``verify=False``; then as the sidecar announced it).
        content_encoding: how the model crossed the network, ``"zstd"`` or ``"identity"``.
        wire_bytes: bytes that took on the network.
    """

    model_id: str
    format: str
    size: int
    sha256: str
    content_encoding: str
    wire_bytes: int


@dataclass(frozen=True)
class UploadResult:
    """The FL server's answer to an upload, with the transfer's sizes (bytes) and time (s)."""

    http_status: int
    detail: str
    raw_bytes: int
    wire_bytes: int
    content_encoding: str
    seconds: float
    upload_id: str = ""


@dataclass(frozen=True)
class UploadStatus:
    """What became of an upload (:meth:`SidecarClient.get_upload`).

    Attributes:
        upload_id: the upload's id.
        state: ``"not_sent"`` (nothing reached the FL server: safe to send again),
            ``"sending"``, ``"accepted"``, ``"rejected"`` (refused, nothing stored) or
            ``"unknown"`` (the whole request went out, no answer came: it may have arrived).
        http_status: the FL server's answer; 0 when none came.
        detail: the server's message, or why the state is what it is.
        model_id, round: what it was uploaded for.
        updated_at: unix time of the last change, seconds.
    """

    upload_id: str
    state: str
    http_status: int
    detail: str
    model_id: str
    round: int
    updated_at: float


@dataclass(frozen=True)
class MetricsResult:
    """The FL server's answer to a metrics upload."""

    http_status: int
    detail: str


@dataclass(frozen=True)
class TrainingStatus:
    """A training's state: ``state`` is I (initial), O (ongoing), C (completed) or E (error)."""

    state: str
    data: Dict[str, Any]


@dataclass(frozen=True)
class PackResult:
    """Sizes (bytes) and frame count of a pack."""

    raw_bytes: int
    packed_bytes: int
    frames: int


@dataclass(frozen=True)
class UnpackResult:
    """Sizes (bytes) of an unpack."""

    packed_bytes: int
    raw_bytes: int


def _map_rpc_error(exc: grpc.RpcError, action: str) -> SidecarError:
    """The one place a failed call becomes a :class:`SidecarError`, with the cause it carries."""
    code = exc.code() if hasattr(exc, "code") else None
    details = exc.details() if hasattr(exc, "details") else None
    name = code.name if code is not None else "UNKNOWN"
    message = details or str(code)
    if name == "UNAVAILABLE" and "connect" in (details or "").lower():
        message = f"cannot reach the sidecar: {details}"
    trailers = _trailers(exc)
    status = trailers.get(HTTP_STATUS_KEY)
    body = trailers.get(HTTP_BODY_KEY)
    return SidecarError(
        f"{action} failed ({name}): {message}",
        code=name,
        error_class=_text(trailers.get(ERROR_CLASS_KEY)),
        http_status=int(status) if isinstance(status, str) and status.isdigit() else None,
        http_body=body.decode("utf-8", "replace") if isinstance(body, bytes) else None,
        http_content_type=_text(trailers.get(HTTP_CONTENT_TYPE_KEY)),
    )


def _trailers(exc: grpc.RpcError) -> Dict[str, Union[str, bytes]]:
    # A call that never reached the sidecar has no trailing metadata (or None).
    getter = getattr(exc, "trailing_metadata", None)
    try:
        items = getter() if callable(getter) else None
    except Exception:  # a broken call object must not hide the error itself
        items = None
    return {str(key): value for key, value in items or ()}


def _text(value: Union[str, bytes, None]) -> Optional[str]:
    return value if isinstance(value, str) and value else None


def _metric_list(metrics: MetricsArg) -> List[pb.Metric]:
    if metrics is None:
        return []
    items = metrics.items() if isinstance(metrics, Mapping) else metrics
    return [metric_to_proto(name, value) for name, value in items]


class EventStream:
    """An open ``WatchEvents`` subscription: iterate it, or call :meth:`get` with a timeout.

    A background thread reads the stream, so :meth:`get` can wait with a
    timeout without cancelling the subscription. Close it (or leave the
    ``with`` block) to cancel the stream.
    """

    _END = object()

    def __init__(self, call: Any) -> None:
        self._call = call
        self._queue: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._pump, name="fl-sidecar-events", daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        try:
            for message in self._call:
                self._queue.put(event_from_proto(message))
        except grpc.RpcError as exc:
            if not self._closed:
                self._queue.put(_map_rpc_error(exc, "WatchEvents"))
        self._queue.put(self._END)

    def get(self, timeout: Optional[float] = None) -> ServerEvent:
        """The next event, waiting at most ``timeout`` seconds (``None``: forever).

        Raises:
            TimeoutError: nothing arrived in time (the subscription stays open).
            SidecarError: the stream failed (e.g. ``UNAVAILABLE`` when the sidecar went away).
            EOFError: the stream ended or was closed.
        """
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no event within {timeout} s") from None
        if isinstance(item, ServerEvent):
            return item
        self._queue.put(self._END)  # later calls end too
        if isinstance(item, SidecarError):
            raise item
        raise EOFError("the event stream ended")

    def wait_for(
        self,
        kinds: Iterable[EventKind],
        *,
        training_id: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> ServerEvent:
        """Skip events until one of ``kinds`` (of ``training_id``, when given) arrives.

        ``timeout`` (seconds) bounds the whole wait.

        Raises:
            TimeoutError, SidecarError, EOFError: as :meth:`get`.
        """
        import time

        wanted = frozenset(kinds)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = self.get(timeout=left)
            if event.kind in wanted and (training_id is None or event.training_id == training_id):
                return event

    def __iter__(self) -> Iterator[ServerEvent]:
        return self

    def __next__(self) -> ServerEvent:
        try:
            return self.get()
        except EOFError:
            raise StopIteration from None

    def close(self) -> None:
        """Cancel the subscription; idempotent."""
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()


class SidecarClient:
    """A connection to one fl-sidecar; cheap to create, thread-safe, a context manager.

    Args:
        target: ``unix:///path``, a socket path, or ``host:port``; ``None``
            means :func:`default_target`.
        api_token: the sidecar's API token, when it was started with one.
        timeout: seconds allowed for each unary call (info, metrics, training);
            transfers and event streams are not bounded by it (pass
            ``timeout=`` to those calls).
        credentials: FL-server credentials sent with every call instead of the
            sidecar's own (per-call ``credentials=`` overrides them).
        chunk_size: bytes per streamed message on uploads and downloads (1-4 MiB).
        verify: check every download against the sha256 the sidecar announces
            (about 1 s of CPU per GiB; the size is always checked).
        expected_owner: on a unix socket, the uid or user name the sidecar runs
            as, when that is neither this process's user nor root (a sidecar in
            its own container); ``None`` reads ``FL_SIDECAR_SOCKET_OWNER``. Before
            each call the client checks that the socket and its directory belong
            to this process's user, root or ``expected_owner``, and that no one
            else can write to the directory; otherwise it raises
            :class:`fl_sidecar.errors.UnsafeSocketError` and sends nothing (no
            token, no credentials).

    Raises:
        ValueError: a bad ``chunk_size``. UnsafeSocketError: an ``expected_owner``
            that is neither a uid nor a known user name.

    Attributes:
        last_upload_id: the ``upload_id`` of the latest upload this client started
            (``None`` before the first), for :meth:`get_upload`.
    """

    def __init__(
        self,
        target: Optional[str] = None,
        *,
        api_token: Optional[str] = None,
        timeout: Optional[float] = 60.0,
        credentials: Optional[CallCredentials] = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        verify: bool = True,
        expected_owner: Optional[Union[int, str]] = None,
    ) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_SIZE} bytes")
        self.target = normalize_target(target)
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.verify = verify
        self._credentials = credentials
        # The id of the latest upload this client started (for get_upload after a crash).
        self.last_upload_id: Optional[str] = None
        self._socket_path = unix_socket_path(self.target)
        if expected_owner is None:
            expected_owner = os.environ.get(SOCKET_OWNER_VARIABLE) or None
        self._expected_owner = (
            socketdir.resolve_owner(expected_owner) if expected_owner is not None else None
        )
        self._token_metadata: Tuple[Tuple[str, str], ...] = (
            ((TOKEN_METADATA_KEY, api_token),) if api_token else ()
        )
        self._channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
            ],
        )
        self._stub = pb_grpc.SidecarStub(self._channel)

    # --- plumbing -----------------------------------------------------------

    def __repr__(self) -> str:
        return f"SidecarClient({self.target!r})"

    def __enter__(self) -> SidecarClient:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; open streams are cancelled."""
        self._channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects, at most ``timeout`` seconds.

        Raises:
            SidecarError: ``UNAVAILABLE`` when the sidecar cannot be reached in time.
        """
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise SidecarError(
                f"cannot reach the sidecar at {self.target} within {timeout} s",
                code="UNAVAILABLE",
            ) from None

    @property
    def _metadata(self) -> Tuple[Tuple[str, str], ...]:
        """The metadata of a call, after checking that the socket is the sidecar's.

        Every call carries the API token (and most carry FL server credentials),
        and every call passes its metadata from here: so nothing is sent to a
        socket that another user could have put in the sidecar's place.

        Raises:
            UnsafeSocketError: the socket or its directory is not trusted.
            SidecarError: ``UNAVAILABLE`` when no socket is at the path.
        """
        if self._socket_path is not None:
            try:
                socketdir.check_client_socket(
                    self._socket_path, expected_owner=self._expected_owner
                )
            except FileNotFoundError as exc:
                raise SidecarError(
                    f"no sidecar is listening at {self.target} ({exc.strerror}: {exc.filename})",
                    code="UNAVAILABLE",
                ) from None
        return self._token_metadata

    def _creds(self, credentials: Optional[CallCredentials]) -> Optional[pb.Credentials]:
        chosen = credentials if credentials is not None else self._credentials
        return chosen.to_proto() if chosen is not None else None

    # --- unary calls --------------------------------------------------------

    def get_info(self) -> SidecarInfo:
        """The sidecar's version, codec settings, FL server URL and notification URL.

        Raises:
            SidecarError: the call failed.
        """
        try:
            r = self._stub.GetInfo(
                pb.GetInfoRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc, "GetInfo") from None
        return SidecarInfo(
            version=r.version,
            codec=r.codec,
            codec_level=r.codec_level,
            codec_chunk_size=r.codec_chunk_size,
            server_url=r.server_url,
            negotiated_coding=r.negotiated_coding,
            notification_url=r.notification_url,
            max_message_size=r.max_message_size,
            trusts_pickles=r.trusts_pickles,
        )

    def upload_metrics(
        self,
        model_id: str,
        metrics: MetricsArg,
        *,
        owner: str = "",
        credentials: Optional[CallCredentials] = None,
    ) -> MetricsResult:
        """Upload test metrics of the global model ``model_id`` (name -> value).

        A value that is not a number (``"abc"``, ``True``) is sent as text, as the
        reference client sends it; the FL server stores it.

        Raises:
            ValueError: a metric value is ``None``, or bytes that are not UTF-8.
            SidecarError: the sidecar or the FL server refused (see ``code``; the
                server's answer is in ``http_status`` and ``http_body``).
        """
        request = pb.UploadMetricsRequest(
            model_id=str(model_id),
            metrics=_metric_list(metrics),
            credentials=self._creds(credentials),
            owner=owner,
        )
        try:
            r = self._stub.UploadMetrics(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc, f"metrics upload for model {model_id}") from None
        return MetricsResult(http_status=r.http_status, detail=r.detail)

    def get_training(
        self, training_id: str, *, credentials: Optional[CallCredentials] = None
    ) -> TrainingStatus:
        """The training's state as the FL server reports it.

        Raises:
            SidecarError: e.g. ``NOT_FOUND`` for an unknown training.
        """
        request = pb.GetTrainingRequest(
            training_id=str(training_id), credentials=self._creds(credentials)
        )
        try:
            r = self._stub.GetTraining(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc, f"GetTraining {training_id}") from None
        try:
            data = json.loads(r.json) if r.json else {}
        except ValueError:
            data = {}
        return TrainingStatus(state=r.state, data=data if isinstance(data, dict) else {})

    def get_upload(self, upload_id: str) -> UploadStatus:
        """What became of the upload ``upload_id``, from the sidecar's journal.

        It answers after a sidecar restart too (the journal is on disk), and
        while the sidecar shuts down.

        Raises:
            SidecarError: ``NOT_FOUND`` when this sidecar never began to send an
                upload with that id (so it did not arrive through it), or
                ``UNAVAILABLE`` when the sidecar cannot be reached.
        """
        request = pb.GetUploadRequest(upload_id=str(upload_id))
        try:
            r = self._stub.GetUpload(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc, f"GetUpload {upload_id}") from None
        return UploadStatus(
            upload_id=r.upload_id,
            state=upload_state_name(r.state),
            http_status=r.http_status,
            detail=r.detail,
            model_id=r.model_id,
            round=r.round,
            updated_at=r.updated_at,
        )

    # --- downloads ----------------------------------------------------------

    def _download_stream(
        self,
        model_id: str,
        fmt: int,
        sink: Callable[[bytes], object],
        *,
        progress: Optional[ProgressCallback],
        credentials: Optional[CallCredentials],
        timeout: Optional[float],
    ) -> DownloadResult:
        request = pb.DownloadModelRequest(
            model_id=str(model_id),
            format=fmt,  # type: ignore[arg-type]
            chunk_size=self.chunk_size,
            credentials=self._creds(credentials),
        )
        action = f"download of model {model_id}"
        info: Optional[pb.ModelInfo] = None
        digest = hashlib.sha256() if self.verify else None
        done = 0
        call = self._stub.DownloadModel(request, timeout=timeout, metadata=self._metadata)
        try:
            for message in call:
                kind = message.WhichOneof("kind")
                if kind == "chunk":
                    if info is None:
                        raise SidecarError(f"{action}: data before the model info", code="INTERNAL")
                    chunk = message.chunk
                    done += len(chunk)
                    if done > info.size:
                        raise SidecarError(
                            f"{action}: more bytes than announced ({info.size})", code="DATA_LOSS"
                        )
                    if digest is not None:
                        digest.update(chunk)
                    sink(chunk)
                    if progress is not None:
                        progress(done, info.size)
                elif kind == "info":
                    info = message.info
                    if progress is not None:
                        progress(0, info.size)
                elif kind == "progress" and progress is not None and info is None:
                    progress(0, 0)
        except grpc.RpcError as exc:
            raise _map_rpc_error(exc, action) from None
        except BaseException:
            call.cancel()
            raise
        if info is None:
            raise SidecarError(f"{action}: the stream ended without model info", code="INTERNAL")
        if done != info.size:
            raise SidecarError(f"{action}: got {done} of {info.size} bytes", code="DATA_LOSS")
        sha = info.sha256.lower()
        if digest is not None:
            sha = digest.hexdigest()
            if info.sha256 and info.sha256.lower() != sha:
                raise SidecarError(f"{action}: sha256 mismatch", code="DATA_LOSS")
        return DownloadResult(
            model_id=info.model_id or str(model_id),
            format=format_name(info.format),
            size=info.size,
            sha256=sha,
            content_encoding=info.content_encoding,
            wire_bytes=info.wire_bytes,
        )

    def download_with_info(
        self,
        model_id: str,
        *,
        format: Union[str, int] = "torch",
        progress: Optional[ProgressCallback] = None,
        credentials: Optional[CallCredentials] = None,
        timeout: Optional[float] = None,
    ) -> Tuple[bytes, DownloadResult]:
        """Download the global model into memory; returns its bytes and facts.

        ``format`` is ``"torch"`` (the server's bytes) or ``"safetensors"``.
        ``timeout`` bounds the whole transfer (seconds; ``None``: unbounded).

        Raises:
            ValueError: unknown format.
            SidecarError: ``NOT_FOUND`` for an unknown model, ``DATA_LOSS`` when
                the bytes do not match their announced size or sha256, ...
        """
        chunks: List[bytes] = []
        result = self._download_stream(
            model_id,
            _format_value(format),
            chunks.append,
            progress=progress,
            credentials=credentials,
            timeout=timeout,
        )
        # The chunks are the message buffers gRPC already made; joining them is
        # the one copy needed to hand back contiguous bytes.
        data = b"".join(chunks)
        chunks.clear()
        return data, result

    def download(
        self,
        model_id: str,
        *,
        format: Union[str, int] = "torch",
        progress: Optional[ProgressCallback] = None,
        credentials: Optional[CallCredentials] = None,
        timeout: Optional[float] = None,
    ) -> bytes:
        """Download the global model's bytes (see :meth:`download_with_info`).

        Raises:
            SidecarError: as :meth:`download_with_info`.
        """
        data, _ = self.download_with_info(
            model_id, format=format, progress=progress, credentials=credentials, timeout=timeout
        )
        return data

    def download_to_file(
        self,
        model_id: str,
        path: PathLike,
        *,
        format: Union[str, int] = "torch",
        progress: Optional[ProgressCallback] = None,
        credentials: Optional[CallCredentials] = None,
        timeout: Optional[float] = None,
    ) -> DownloadResult:
        """Download the global model into ``path`` (written to a temporary file, then renamed).

        A failed download leaves ``path`` untouched.

        Raises:
            SidecarError: as :meth:`download_with_info`.
            OSError: the file cannot be written.
        """
        fmt = _format_value(format)
        return _write_atomically(
            path,
            lambda sink: self._download_stream(
                model_id,
                fmt,
                sink,
                progress=progress,
                credentials=credentials,
                timeout=timeout,
            ),
        )

    def download_state_dict(
        self,
        model_id: str,
        *,
        device: Optional[str] = None,
        progress: Optional[ProgressCallback] = None,
        credentials: Optional[CallCredentials] = None,
        timeout: Optional[float] = None,
    ) -> Dict[str, torch.Tensor]:
        """Download the global model's weights as a state_dict (via SAFETENSORS: no pickle).

        ``device`` (e.g. ``"cuda:0"``) moves the tensors there; default CPU.

        Raises:
            SidecarError: as :meth:`download_with_info`.
            fl_sidecar.errors.ModelError: the bytes are not valid safetensors.
        """
        import fl_sidecar.models as models

        data = self.download(
            model_id,
            format="safetensors",
            progress=progress,
            credentials=credentials,
            timeout=timeout,
        )
        tensors = models.from_safetensors(data)
        del data
        if device is not None:
            tensors = {name: t.to(device) for name, t in tensors.items()}
        return dict(tensors)

    def download_module(
        self,
        model_id: str,
        *,
        map_location: Any = None,
        progress: Optional[ProgressCallback] = None,
        credentials: Optional[CallCredentials] = None,
        timeout: Optional[float] = None,
    ) -> Any:
        """Download the global model and load it as a module in this process.

        This unpickles the server's bytes (``torch.load(weights_only=False)`` or
        ``torch.jit.load``): the model's classes must be importable here, and
        it runs code from the server, so use it only if you trust the server.
        ``map_location`` is passed to torch (e.g. ``"cuda:0"``).

        Raises:
            SidecarError: as :meth:`download_with_info`.
            fl_sidecar.errors.ModelError: the bytes are not a torch model.
        """
        import fl_sidecar.models as models

        data = self.download(
            model_id, format="torch", progress=progress, credentials=credentials, timeout=timeout
        )
        return models.load_trusted(data, map_location=map_location)

    # --- uploads ------------------------------------------------------------

    def _upload_stream(
        self,
        header: pb.UploadHeader,
        chunks: Iterable[bytes],
        *,
        progress: Optional[ProgressCallback],
        timeout: Optional[float],
    ) -> UploadResult:
        source = _Requests(
            pb.UploadModelRequest(header=header),
            lambda chunk: pb.UploadModelRequest(chunk=chunk),
            chunks,
            progress=progress,
            total=header.size,
        )
        self.last_upload_id = header.upload_id
        try:
            metadata = self._metadata
        except SidecarError as refused:
            # No call was made (no socket, or one this client does not trust).
            raise UploadFailedError(
                f"upload {header.upload_id} for model {header.model_id}: {refused}; "
                "nothing was sent",
                code=refused.code,
                upload_id=header.upload_id,
                upload_state="not_sent",
            ) from refused
        try:
            r = self._stub.UploadModel(source, timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            source.reraise()
            failure = self._upload_error(exc, header)
            if isinstance(failure, UploadStatus):
                # The sidecar recorded the server's 2xx before the connection broke.
                return UploadResult(
                    http_status=failure.http_status,
                    detail=failure.detail,
                    raw_bytes=0,
                    wire_bytes=0,
                    content_encoding="",
                    seconds=0.0,
                    upload_id=failure.upload_id,
                )
            raise failure from None
        return UploadResult(
            http_status=r.http_status,
            detail=r.detail,
            raw_bytes=r.raw_bytes,
            wire_bytes=r.wire_bytes,
            content_encoding=r.content_encoding,
            seconds=r.seconds,
            upload_id=r.upload_id or header.upload_id,
        )

    def _upload_error(
        self, exc: grpc.RpcError, header: pb.UploadHeader
    ) -> Union[UploadFailedError, UploadStatus]:
        """The error of a failed UploadModel, with what reached the FL server.

        The sidecar puts the upload's state in the trailing metadata of every
        status it sends. A status without it came from the gRPC library (the
        connection to the sidecar broke): then the sidecar's journal is asked,
        and an upload it recorded as accepted is returned as its status.
        """
        mapped = _map_rpc_error(exc, f"upload {header.upload_id} for model {header.model_id}")
        trailer = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
        state = dict(trailer or ()).get(UPLOAD_STATE_METADATA_KEY)
        code, message = mapped.code, str(mapped)
        if state is None:
            try:
                status = self.get_upload(header.upload_id)
            except SidecarError as asked:
                state = "not_sent" if asked.code == "NOT_FOUND" else "unknown"
            else:
                if status.state == "accepted":
                    return status
                state = status.state
                if state == "rejected":
                    code = _REJECTION_CODES.get(status.http_status, "FAILED_PRECONDITION")
                    message += f"; the FL server refused it: HTTP {status.http_status}"
                    message += f" {status.detail}" if status.detail else ""
            if state in ("unknown", "sending"):
                code = "UNKNOWN"
                message += (
                    f"; the upload's outcome is unknown (the connection to the sidecar broke): "
                    f"ask get_upload({header.upload_id!r}) before sending it again"
                )
        return UploadFailedError(
            message,
            code=code,
            upload_id=header.upload_id,
            upload_state=str(state),
            error_class=mapped.error_class,
            http_status=mapped.http_status,
            http_body=mapped.http_body,
            http_content_type=mapped.http_content_type,
        )

    def _header(
        self,
        model_id: str,
        *,
        round: int,
        sample_size: int,
        metrics: MetricsArg,
        fmt: int,
        size: int,
        sha256: str,
        credentials: Optional[CallCredentials],
        owner: str,
        upload_id: Optional[str],
    ) -> pb.UploadHeader:
        if round < 0 or sample_size < 0:
            raise ValueError("round and sample_size must not be negative")
        return pb.UploadHeader(
            upload_id=upload_id or str(uuid.uuid4()),
            model_id=str(model_id),
            round=int(round),
            sample_size=int(sample_size),
            metrics=_metric_list(metrics),
            format=fmt,  # type: ignore[arg-type]
            size=size,
            sha256=sha256,
            credentials=self._creds(credentials),
            owner=owner,
        )

    def upload(
        self,
        model_id: str,
        data: Buffer,
        *,
        round: int,
        sample_size: int,
        metrics: MetricsArg = None,
        format: Union[str, int] = "torch",
        checksum: bool = False,
        owner: str = "",
        progress: Optional[ProgressCallback] = None,
        credentials: Optional[CallCredentials] = None,
        timeout: Optional[float] = None,
        upload_id: Optional[str] = None,
    ) -> UploadResult:
        """Upload a locally trained model (its bytes) for ``round`` of the global model.

        ``format``: ``"torch"`` (a torch.save'd module or TorchScript archive)
        or ``"safetensors"`` (weights the sidecar writes into a copy of the
        global model). ``checksum=True`` sends the sha256 for the sidecar to check.
        Nothing reaches the FL server unless the whole stream arrives.

        ``upload_id`` names the upload for :meth:`get_upload` (a new UUID when
        ``None``; the result's and the error's ``upload_id`` and
        :attr:`last_upload_id` carry it). The retry rule: after an
        :class:`~fl_sidecar.errors.UploadFailedError` whose ``upload_state`` is
        ``"not_sent"`` send it again (the same id may be reused); ``"rejected"``:
        the server refused it; ``"unknown"``: it may have arrived, never resend it
        blindly (compare :meth:`get_training`, then send under a new id only if it
        did not arrive).

        Raises:
            ValueError: negative round or sample size, a ``None`` metric, unknown format.
            UploadFailedError: (a :class:`SidecarError`) ``FAILED_PRECONDITION`` (wrong
                round/state, or an id whose outcome is unknown), ``ALREADY_EXISTS`` (this
                id was accepted already), ``PERMISSION_DENIED``, ``INVALID_ARGUMENT``,
                ``UNAVAILABLE`` (only with ``upload_state == "not_sent"``), ``UNKNOWN``
                (the upload may have arrived), ...
        """
        view = memoryview(data).cast("B")
        size = view.nbytes
        header = self._header(
            model_id,
            round=round,
            sample_size=sample_size,
            metrics=metrics,
            fmt=_format_value(format),
            size=size,
            sha256=hashlib.sha256(view).hexdigest() if checksum else "",
            credentials=credentials,
            owner=owner,
            upload_id=upload_id,
        )
        return self._upload_stream(
            header, _slice_chunks(view, self.chunk_size), progress=progress, timeout=timeout
        )

    def upload_file(
        self,
        model_id: str,
        path: PathLike,
        *,
        round: int,
        sample_size: int,
        metrics: MetricsArg = None,
        format: Union[str, int] = "torch",
        checksum: bool = False,
        owner: str = "",
        progress: Optional[ProgressCallback] = None,
        credentials: Optional[CallCredentials] = None,
        timeout: Optional[float] = None,
        upload_id: Optional[str] = None,
    ) -> UploadResult:
        """Upload a model file, streamed from disk (see :meth:`upload`).

        Raises:
            OSError: the file cannot be read.
            SidecarError, ValueError: as :meth:`upload`.
        """
        size = os.path.getsize(path)
        sha = ""
        if checksum:
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(self.chunk_size), b""):
                    digest.update(block)
            sha = digest.hexdigest()
        header = self._header(
            model_id,
            round=round,
            sample_size=sample_size,
            metrics=metrics,
            fmt=_format_value(format),
            size=size,
            sha256=sha,
            credentials=credentials,
            owner=owner,
            upload_id=upload_id,
        )
        with open(path, "rb") as f:
            return self._upload_stream(
                header, _read_chunks(f, self.chunk_size), progress=progress, timeout=timeout
            )

    def upload_state_dict(
        self,
        model_id: str,
        state_dict: Mapping[str, torch.Tensor],
        *,
        round: int,
        sample_size: int,
        metrics: MetricsArg = None,
        owner: str = "",
        progress: Optional[ProgressCallback] = None,
        credentials: Optional[CallCredentials] = None,
        timeout: Optional[float] = None,
        upload_id: Optional[str] = None,
    ) -> UploadResult:
        """Upload weights as SAFETENSORS; names, shapes and dtypes must match the global model.

        Tensors on a GPU are copied to CPU for serialisation; ``state_dict`` is not modified.

        Raises:
            SidecarError: ``INVALID_ARGUMENT`` when the weights do not match, and as :meth:`upload`.
        """
        import fl_sidecar.models as models

        data = models.to_safetensors(state_dict)
        return self.upload(
            model_id,
            data,
            round=round,
            sample_size=sample_size,
            metrics=metrics,
            format="safetensors",
            owner=owner,
            progress=progress,
            credentials=credentials,
            timeout=timeout,
            upload_id=upload_id,
        )

    def upload_module(
        self,
        model_id: str,
        module: Any,
        *,
        round: int,
        sample_size: int,
        metrics: MetricsArg = None,
        owner: str = "",
        progress: Optional[ProgressCallback] = None,
        credentials: Optional[CallCredentials] = None,
        timeout: Optional[float] = None,
        upload_id: Optional[str] = None,
    ) -> UploadResult:
        """Upload an ``nn.Module`` (or TorchScript module) as TORCH bytes.

        The bytes are made by :func:`fl_sidecar.models.dump_module`: GPU tensors
        are saved as CPU tensors and the trainer's module is left untouched.

        Raises:
            SidecarError, ValueError: as :meth:`upload`.
        """
        import fl_sidecar.models as models

        data = models.dump_module(module)
        return self.upload(
            model_id,
            data,
            round=round,
            sample_size=sample_size,
            metrics=metrics,
            format="torch",
            owner=owner,
            progress=progress,
            credentials=credentials,
            timeout=timeout,
            upload_id=upload_id,
        )

    # --- pack / unpack ------------------------------------------------------

    def _codec_call(
        self,
        action: str,
        options: Any,
        chunks: Iterable[bytes],
        sink: Callable[[bytes], object],
        *,
        progress: Optional[ProgressCallback],
        total: int,
        timeout: Optional[float],
    ) -> Any:
        """Run Pack or Unpack: output chunks go to ``sink``; returns the closing summary."""
        request_type = _CODEC_REQUESTS[action]
        source = _Requests(
            request_type(options=options),
            lambda chunk: request_type(chunk=chunk),
            chunks,
            progress=progress,
            total=total,
        )
        rpc = getattr(self._stub, action)
        summary = None
        try:
            for message in rpc(source, timeout=timeout, metadata=self._metadata):
                if message.WhichOneof("kind") == "chunk":
                    sink(message.chunk)
                else:
                    summary = message.summary
        except grpc.RpcError as exc:
            source.reraise()
            raise _map_rpc_error(exc, action) from None
        if summary is None:
            raise SidecarError(f"{action}: the stream ended without its summary", code="DATA_LOSS")
        return summary

    def _codec_bytes(
        self,
        action: str,
        options: Any,
        data: Buffer,
        timeout: Optional[float],
    ) -> bytes:
        out: List[bytes] = []
        view = memoryview(data).cast("B")
        chunks = _slice_chunks(view, self.chunk_size)
        self._codec_call(
            action,
            options,
            chunks,
            out.append,
            progress=None,
            total=view.nbytes,
            timeout=timeout,
        )
        return b"".join(out)

    def _codec_file(
        self,
        action: str,
        options: Any,
        src: PathLike,
        dst: PathLike,
        progress: Optional[ProgressCallback],
        timeout: Optional[float],
    ) -> Any:
        total = os.path.getsize(src)
        with open(src, "rb") as f:
            chunks = _read_chunks(f, self.chunk_size)
            return _write_atomically(
                dst,
                lambda sink: self._codec_call(
                    action,
                    options,
                    chunks,
                    sink,
                    progress=progress,
                    total=total,
                    timeout=timeout,
                ),
            )

    def pack(
        self,
        data: Buffer,
        *,
        level: int = 0,
        chunk_size: int = 0,
        timeout: Optional[float] = None,
    ) -> bytes:
        """Pack bytes into the zstd seekable format in the sidecar (0 = the sidecar's defaults).

        Raises:
            SidecarError: ``INVALID_ARGUMENT`` for bad options, and transport failures.
        """
        options = pb.PackOptions(level=level, chunk_size=chunk_size)
        return self._codec_bytes("Pack", options, data, timeout)

    def unpack(
        self, blob: Buffer, *, max_output_size: int = 0, timeout: Optional[float] = None
    ) -> bytes:
        """Unpack any zstd stream in the sidecar; ``max_output_size`` bytes (0 = its default).

        Raises:
            SidecarError: ``DATA_LOSS`` for corrupt/truncated data,
                ``RESOURCE_EXHAUSTED`` past the size limit.
        """
        options = pb.UnpackOptions(max_output_size=max_output_size)
        return self._codec_bytes("Unpack", options, blob, timeout)

    def pack_file(
        self,
        src: PathLike,
        dst: PathLike,
        *,
        level: int = 0,
        chunk_size: int = 0,
        progress: Optional[ProgressCallback] = None,
        timeout: Optional[float] = None,
    ) -> PackResult:
        """Pack the file ``src`` into ``dst`` through the sidecar (``dst`` replaced atomically).

        Raises:
            OSError: a file cannot be read or written.
            SidecarError: as :meth:`pack`.
        """
        options = pb.PackOptions(level=level, chunk_size=chunk_size)
        summary = self._codec_file("Pack", options, src, dst, progress, timeout)
        return PackResult(summary.raw_bytes, summary.packed_bytes, summary.frames)

    def unpack_file(
        self,
        src: PathLike,
        dst: PathLike,
        *,
        max_output_size: int = 0,
        progress: Optional[ProgressCallback] = None,
        timeout: Optional[float] = None,
    ) -> UnpackResult:
        """Unpack the file ``src`` into ``dst`` through the sidecar (``dst`` replaced atomically).

        Raises:
            OSError: a file cannot be read or written.
            SidecarError: as :meth:`unpack`.
        """
        options = pb.UnpackOptions(max_output_size=max_output_size)
        summary = self._codec_file("Unpack", options, src, dst, progress, timeout)
        return UnpackResult(summary.packed_bytes, summary.raw_bytes)

    # --- events -------------------------------------------------------------

    def watch_events(
        self,
        after_seq: Optional[int] = None,
        training_ids: Sequence[str] = (),
        *,
        timeout: Optional[float] = None,
        observe: bool = False,
    ) -> EventStream:
        """Subscribe to the FL server's notifications as typed events.

        Without ``after_seq`` the stream starts with the events no subscriber
        has received yet (a round start that arrived before the trainer
        connected), then live ones; with ``after_seq`` it resumes after that
        sequence number. ``training_ids`` filters (empty: all). ``timeout``
        (seconds) ends the whole subscription; :meth:`EventStream.get` takes
        its own per-event timeout. ``observe=True`` watches without taking
        delivery (for monitoring: a trainer subscribing later still gets the
        events this stream showed).

        Raises:
            SidecarError: when reading from the stream, if the subscription fails.
        """
        request = pb.WatchEventsRequest(
            training_ids=[str(t) for t in training_ids], observe=observe
        )
        if after_seq is not None:
            request.after_seq = int(after_seq)
        call = self._stub.WatchEvents(request, timeout=timeout, metadata=self._metadata)
        return EventStream(call)


class _Requests:
    """A client stream: ``first``, then ``wrap(chunk)`` per chunk, reporting ``progress``.

    It remembers an exception raised while producing requests. grpc turns
    such an exception into a cancelled call with status UNKNOWN, which the
    contract reserves for "the upload may have arrived"; the trainer's own
    exception (a failing progress callback, a read error) is the true cause,
    and the sidecar uploaded nothing.
    """

    def __init__(
        self,
        first: Any,
        wrap: Callable[[bytes], Any],
        chunks: Iterable[bytes],
        *,
        progress: Optional[ProgressCallback],
        total: int,
    ) -> None:
        self._source = _with_progress(first, wrap, chunks, progress, total)
        self.error: Optional[BaseException] = None

    def __iter__(self) -> _Requests:
        return self

    def __next__(self) -> Any:
        try:
            return next(self._source)
        except StopIteration:
            raise
        except BaseException as exc:
            self.error = exc
            raise

    def reraise(self) -> None:
        """Raise the remembered exception, if any."""
        if self.error is not None:
            raise self.error


def _with_progress(
    first: Any,
    wrap: Callable[[bytes], Any],
    chunks: Iterable[bytes],
    progress: Optional[ProgressCallback],
    total: int,
) -> Iterator[Any]:
    yield first
    done = 0
    for chunk in chunks:
        done += len(chunk)
        yield wrap(chunk)
        if progress is not None:
            progress(done, total)


def _slice_chunks(view: memoryview, size: int) -> Iterator[bytes]:
    for start in range(0, view.nbytes, size):
        yield bytes(view[start : start + size])


def _read_chunks(f: BinaryIO, size: int) -> Iterator[bytes]:
    while True:
        block = f.read(size)
        if not block:
            return
        yield block


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _write_atomically(dst: PathLike, produce: Callable[[Callable[[bytes], object]], _T]) -> _T:
    target = os.fspath(dst)
    directory = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".fl-sidecar-", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out:
            result = produce(out.write)
        os.replace(tmp, target)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return result
