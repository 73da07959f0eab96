"""The gRPC servicer of ``fl_sidecar.v1.Sidecar``: converts messages, calls domain code.

It holds no transfer logic of its own (that is :mod:`fl_sidecar.transfers`,
:mod:`fl_sidecar.server_api`, :mod:`fl_sidecar.codec` and
:mod:`fl_sidecar.events`); it validates requests, turns messages into calls
and results into messages, and maps domain errors to gRPC status codes as the
proto's header comment documents (:func:`status_for`). Unexpected exceptions
become INTERNAL and are logged with their traceback.
"""

from __future__ import annotations

import errno
import functools
import importlib
import json
import logging
import queue
import threading
import time
import uuid
from pathlib import Path
from typing import (
    Any,
    Callable,
    Dict,
    Generator,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import grpc

from fl_sidecar import __version__
from fl_sidecar import uploads as upload_journal
from fl_sidecar.cancel import REASON_TRAINER_GONE, Cancellation
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
from fl_sidecar.events import EventBus
from fl_sidecar.server_api import Credentials
from fl_sidecar.telemetry import Metrics
from fl_sidecar.transfers import (
    DownloadCancelledError,
    SpooledModel,
    TransferManager,
    is_sha256_hex,
)
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from fl_sidecar.wire import (
    DEFAULT_CHUNK_SIZE,
    ERROR_CLASS_KEY,
    FORMAT_SAFETENSORS,
    HTTP_BODY_KEY,
    HTTP_BODY_LIMIT,
    HTTP_CONTENT_TYPE_KEY,
    HTTP_STATUS_KEY,
    MAX_CHUNK_SIZE,
    MAX_MESSAGE_SIZE,
    UPLOAD_ID_METADATA_KEY,
    UPLOAD_STATE_METADATA_KEY,
    UPLOAD_STATES,
    MetricValue,
    credentials_from_proto,
    event_to_proto,
    format_name,
    metrics_from_proto,
)

__all__ = [
    "SERVICE_NAME",
    "UPLOAD_ID_METADATA_KEY",
    "UPLOAD_STATE_METADATA_KEY",
    "SidecarService",
    "error_trailers",
    "status_for",
]

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["Sidecar"].full_name
"""``"fl_sidecar.v1.Sidecar"``, the name used by health checking and reflection."""

_log = logging.getLogger(__name__)

# Pack/Unpack output is gathered to at least this many bytes per message
# (fewer, larger messages are cheaper) and cut at MAX_CHUNK_SIZE.
_MIN_OUTPUT_MESSAGE = 1024 * 1024
_MAX_PACK_CHUNK_SIZE = 8 * 1024 * 1024
_PROGRESS_POLL = 0.25  # seconds between checks that the trainer is still there
_EVENT_POLL = 1.0  # seconds
# Calls the drain does not wait for: WatchEvents ends when the bus closes, GetInfo and
# GetUpload are instant (and GetUpload is what a trainer asks while the sidecar stops).
_NOT_DRAINED = frozenset({"WatchEvents", "GetInfo", "GetUpload"})

# Most specific first: the first matching class decides.
_STATUS_BY_ERROR: List[Tuple[type, grpc.StatusCode]] = [
    (SizeLimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # The codec raises it when zstd cannot allocate a frame's window: a limit, not damage.
    (MemoryError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SpoolFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # A model reader's budget (pickle opcodes, depth, walk steps...) is a limit too.
    (ModelLimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (ModelReadCancelledError, grpc.StatusCode.CANCELLED),
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

_DISK_FULL_ERRNOS = frozenset(
    code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EFBIG) if code
)

T = TypeVar("T")


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status code for a domain error, as the proto documents; INTERNAL otherwise."""
    if isinstance(exc, SidecarError):
        return getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL)
    if isinstance(exc, TransferCancelledError):
        # Stopped by the shutdown: nothing arrived, and another sidecar (or this one
        # restarted) can do it. Stopped because the trainer left: nobody listens.
        return grpc.StatusCode.UNAVAILABLE if exc.shutting_down else grpc.StatusCode.CANCELLED
    for error_class, code in _STATUS_BY_ERROR:
        if isinstance(exc, error_class):
            return code
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
        return grpc.StatusCode.RESOURCE_EXHAUSTED  # a full disk is no bug, wherever it shows
    return grpc.StatusCode.INTERNAL


def _invalid(message: str) -> SidecarError:
    return SidecarError(message, code="INVALID_ARGUMENT")


def _format_name(value: int) -> str:
    try:
        return format_name(value)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _credentials(message: pb.Credentials) -> Optional[Credentials]:
    try:
        return credentials_from_proto(message)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def _metrics_mapping(metrics: Any) -> Dict[str, MetricValue]:
    try:
        return metrics_from_proto(metrics)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


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


def _require_id(value: str, what: str) -> str:
    if not value:
        raise _invalid(f"{what} is required")
    if len(value) > 200 or any(c.isspace() or c in "/?#" for c in value):
        raise _invalid(f"{what} {value[:64]!r} is not a valid id")
    return value


def _codec_module() -> Any:
    return importlib.import_module("fl_sidecar.codec")


def _split(data: bytes) -> Iterator[bytes]:
    view = memoryview(data)
    for start in range(0, len(view), MAX_CHUNK_SIZE):
        yield bytes(view[start : start + MAX_CHUNK_SIZE])


class _OutputBuffer:
    """Gathers produced bytes into messages of 1-4 MiB."""

    def __init__(self) -> None:
        self._parts: List[bytes] = []
        self._size = 0
        self.total = 0

    def add(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        self._parts.append(data)
        self._size += len(data)
        self.total += len(data)
        if self._size >= _MIN_OUTPUT_MESSAGE:
            yield from self.flush()

    def flush(self) -> Iterator[bytes]:
        if not self._parts:
            return
        joined = b"".join(self._parts)
        self._parts, self._size = [], 0
        yield from _split(joined)


class _MergedTrailers:
    """A call's context whose trailing metadata accumulates instead of being replaced.

    grpc keeps only the last ``set_trailing_metadata``: without this, the error
    trailers ``_fail`` sets would drop the upload id and state that UploadModel set
    before it failed. A key set again keeps its latest value.
    """

    def __init__(self, context: Any) -> None:
        self._context = context
        self._trailers: Dict[str, Union[str, bytes]] = {}

    def set_trailing_metadata(self, pairs: Sequence[Tuple[str, Union[str, bytes]]]) -> None:
        self._trailers.update(pairs)
        self._context.set_trailing_metadata(tuple(self._trailers.items()))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _unary(method: Callable[..., T]) -> Callable[..., T]:
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: SidecarService, request: Any, context: grpc.ServicerContext) -> T:
        started = time.monotonic()
        self._enter(name)
        context = _MergedTrailers(context)
        try:
            return method(self, request, context)
        except Exception as exc:
            self._fail(name, context, exc)
            raise  # not reached: _fail aborts
        finally:
            self._leave(name, started)

    return wrapper


def _streaming(
    method: Callable[..., Iterator[T]],
) -> Callable[..., Iterator[T]]:
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self: SidecarService, request: Any, context: grpc.ServicerContext) -> Iterator[T]:
        started = time.monotonic()
        self._enter(name)
        context = _MergedTrailers(context)
        try:
            yield from method(self, request, context)
        except Exception as exc:
            self._fail(name, context, exc)
        finally:
            self._leave(name, started)

    return wrapper


class SidecarService(pb_grpc.SidecarServicer):
    """Implements every RPC of ``fl_sidecar.v1.Sidecar``."""

    def __init__(
        self,
        transfers: TransferManager,
        bus: EventBus,
        *,
        server_url: str,
        trust_pickles: bool,
        max_unpack_size: int,
        notification_url: str = "",
        metrics: Optional[Metrics] = None,
    ) -> None:
        """Wire the servicer to its domain objects.

        Args:
            transfers: downloads and uploads models.
            bus: the server's notifications, for WatchEvents.
            server_url: the FL server's URL, already stripped of credentials.
            trust_pickles: reported by GetInfo (the transfers apply it).
            max_unpack_size: the most bytes Unpack produces; a trainer's
                ``max_output_size`` may lower it, never raise it.
            notification_url: where the FL server should POST notifications.
            metrics: where call durations and errors are counted.
        """
        self.transfers = transfers
        self.bus = bus
        self.server_url = server_url
        self.trust_pickles = trust_pickles
        self.max_unpack_size = max_unpack_size
        self.notification_url = notification_url
        self.metrics = metrics
        self._draining = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._active = 0

    def begin_drain(self) -> None:
        """Refuse new calls with UNAVAILABLE and end every WatchEvents stream."""
        self._draining.set()
        self.bus.close()

    def active_calls(self) -> int:
        """Calls in progress that the drain waits for (all but WatchEvents and GetInfo)."""
        with self._idle:
            return self._active

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until no drained call is in progress; True if none is."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout=timeout)

    def _enter(self, method: str) -> None:
        if method in _NOT_DRAINED:
            return
        with self._idle:
            self._active += 1

    def _leave(self, method: str, started: float) -> None:
        self._observe(method, started)
        if method in _NOT_DRAINED:
            return
        with self._idle:
            self._active -= 1
            if self._active == 0:
                self._idle.notify_all()

    # -- plumbing --

    def _fail(self, method: str, context: grpc.ServicerContext, exc: BaseException) -> None:
        code = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            _log.error("bug: unexpected error", exc_info=exc, extra={"method": method})
            message = f"internal error in the sidecar ({type(exc).__name__}); see its log"
        else:
            message = str(exc) or type(exc).__name__
            _log.info(
                "call failed",
                extra={
                    "method": method,
                    "code": code.name,
                    "error": type(exc).__name__,
                    "detail": message[:300],
                },
            )
        if self.metrics is not None:
            self.metrics.rpc_errors.labels(method, code.name).inc()
        trailers = error_trailers(exc, message) if code != grpc.StatusCode.INTERNAL else []
        if trailers:
            context.set_trailing_metadata(trailers)
        context.abort(code, message)

    def _observe(self, method: str, started: float) -> None:
        if self.metrics is not None:
            self.metrics.rpc_seconds.labels(method).observe(time.monotonic() - started)

    def _check_open(self) -> None:
        if self._draining.is_set():
            raise SidecarError("the sidecar is shutting down", code="UNAVAILABLE")

    # -- RPCs --

    @_unary
    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> Any:
        """Facts about this sidecar; never credentials."""
        try:
            codec = _codec_module()
            level, chunk_size = int(codec.DEFAULT_LEVEL), int(codec.DEFAULT_CHUNK_SIZE)
        except ImportError:
            level, chunk_size = 0, 0
        client = self.transfers.client
        coding = "identity" if client.compression == "never" else client.negotiated_coding
        return pb.GetInfoResponse(
            version=__version__,
            codec="zstd-seekable",
            codec_level=level,
            codec_chunk_size=chunk_size,
            server_url=self.server_url,
            negotiated_coding=coding or "",
            notification_url=self.notification_url,
            max_message_size=MAX_MESSAGE_SIZE,
            trusts_pickles=self.trust_pickles,
        )

    @_streaming
    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadModelResponse]:
        """Fetch, vet/convert, then stream ModelInfo and chunks; progress while fetching."""
        self._check_open()
        model_id = _require_id(request.model_id, "model_id")
        fmt = _format_name(request.format)
        chunk_size = request.chunk_size or DEFAULT_CHUNK_SIZE
        if chunk_size > MAX_CHUNK_SIZE:
            raise _invalid(f"chunk_size {chunk_size} exceeds the maximum of {MAX_CHUNK_SIZE} bytes")
        credentials = _credentials(request.credentials)

        updates: queue.Queue[Tuple[str, Any]] = queue.Queue()
        cancel = Cancellation()
        handoff = threading.Lock()
        # The trainer cancelled or disconnected: the HTTP download, vetting and
        # conversion stop (the worker thread's spool files go with them).
        context.add_callback(functools.partial(cancel.cancel, REASON_TRAINER_GONE))

        def fetch() -> None:
            try:
                model = self.transfers.download(
                    model_id,
                    fmt,
                    credentials=credentials,
                    progress=lambda done, total: updates.put(("progress", (done, total))),
                    on_converting=lambda: updates.put(("converting", None)),
                    cancel=cancel,
                )
            except BaseException as exc:
                updates.put(("error", exc))
            else:
                # Under the lock: either the reader still takes the model, or
                # it is gone and the model is deleted here; never neither.
                with handoff:
                    if cancel.is_set():
                        model.discard()
                    else:
                        updates.put(("done", model))

        worker = threading.Thread(target=fetch, name="fl-sidecar-download", daemon=True)
        worker.start()
        model: Optional[SpooledModel] = None
        try:
            model = yield from self._await_download(updates, context)
            yield pb.DownloadModelResponse(
                info=pb.ModelInfo(
                    model_id=model_id,
                    format=pb.MODEL_FORMAT_SAFETENSORS
                    if model.format == FORMAT_SAFETENSORS
                    else pb.MODEL_FORMAT_TORCH,
                    size=model.size,
                    sha256=model.sha256,
                    content_encoding=model.content_encoding,
                    wire_bytes=model.wire_bytes,
                )
            )
            with open(model.path, "rb") as file:
                while True:
                    block = file.read(chunk_size)
                    if not block:
                        break
                    yield pb.DownloadModelResponse(chunk=block)
            _log.info(
                "model downloaded",
                extra={
                    "model_id": model_id,
                    "format": model.format,
                    "bytes": model.size,
                    "wire_bytes": model.wire_bytes,
                    "coding": model.content_encoding,
                },
            )
        finally:
            with handoff:
                cancel.cancel(REASON_TRAINER_GONE)
            if model is not None:
                model.discard()
            _discard_unclaimed(updates)

    def _await_download(
        self, updates: queue.Queue[Tuple[str, Any]], context: grpc.ServicerContext
    ) -> Generator[pb.DownloadModelResponse, None, SpooledModel]:
        # A generator that yields progress messages and returns the spooled model.
        while True:
            try:
                kind, value = updates.get(timeout=_PROGRESS_POLL)
            except queue.Empty:
                if not context.is_active():
                    raise DownloadCancelledError("the trainer cancelled the download") from None
                continue
            latest_progress = None
            # Coalesce progress: only the newest count is worth a message.
            while kind == "progress":
                latest_progress = value
                try:
                    kind, value = updates.get_nowait()
                except queue.Empty:
                    kind = ""
            if latest_progress is not None:
                done, total = latest_progress
                yield pb.DownloadModelResponse(
                    progress=pb.Progress(
                        phase=pb.Progress.PHASE_FETCHING, done=done, total=total or 0
                    )
                )
            if kind == "converting":
                yield pb.DownloadModelResponse(
                    progress=pb.Progress(phase=pb.Progress.PHASE_CONVERTING)
                )
            elif kind == "error":
                raise value
            elif kind == "done":
                spooled: SpooledModel = value
                return spooled

    @_unary
    def UploadModel(self, request_iterator: Iterator[pb.UploadModelRequest], context: Any) -> Any:
        """Spool the chunks, check them against the header, convert if asked, upload.

        Every status it ends with carries the upload's id and state as trailing
        metadata; UNAVAILABLE only ever goes with ``not_sent``.
        """
        _set_upload_trailer(context, "", upload_journal.NOT_SENT)
        self._check_open()
        messages = _requests(request_iterator)
        first = next(messages, None)
        if first is None or first.WhichOneof("kind") != "header":
            raise _invalid("the first message of UploadModel must be the header")
        header = first.header
        model_id = _require_id(header.model_id, "header.model_id")
        upload_id = (
            upload_journal.check_upload_id(header.upload_id)
            if header.upload_id
            else str(uuid.uuid4())
        )
        _set_upload_trailer(context, upload_id, upload_journal.NOT_SENT)
        fmt = _format_name(header.format)
        metrics = _metrics_mapping(header.metrics)
        credentials = _credentials(header.credentials)
        if header.sample_size < 1:
            raise _invalid("header.sample_size must be at least 1 (it weights the FedAvg)")
        if header.sha256 and not is_sha256_hex(header.sha256):
            raise _invalid("header.sha256 must be 64 hex digits")
        if header.size > self.transfers.max_model_size:
            raise SizeLimitExceededError(
                f"the model's {header.size} bytes exceed the sidecar's limit of "
                f"{self.transfers.max_model_size} bytes"
            )
        journal = self.transfers.journal
        previous = None
        if journal is not None:
            previous = journal.get(upload_id)
            try:
                journal.claim(upload_id, model_id, header.round)
            except SidecarError as refused:
                # Refused without sending: the trailer says what the earlier attempt did.
                earlier = upload_journal.SENDING if refused.code == "ABORTED" else None
                if earlier is None and previous is not None:
                    earlier = previous.state
                _set_upload_trailer(context, upload_id, earlier or upload_journal.NOT_SENT)
                raise
        cancel = Cancellation()
        # The trainer went away: spooling, conversion and the HTTP request stop.
        context.add_callback(functools.partial(cancel.cancel, REASON_TRAINER_GONE))
        try:
            result = self._spool_and_upload(
                header, messages, context, model_id, fmt, metrics, credentials, upload_id, cancel
            )
        except Exception as exc:
            state = upload_journal.NOT_SENT
            record = journal.get(upload_id) if journal is not None else None
            if record is not None and record != previous:
                state = record.state  # this attempt reached the journal: it says what happened
            elif isinstance(exc, UploadOutcomeUnknownError):
                state = upload_journal.UNKNOWN
            _set_upload_trailer(context, upload_id, state)
            failure = _upload_failure(exc, upload_id, state)
            if failure is exc:
                raise
            raise failure from exc
        finally:
            if journal is not None:
                journal.release(upload_id)
        _set_upload_trailer(context, upload_id, upload_journal.ACCEPTED)
        _log.info(
            "model uploaded",
            extra={
                "model_id": model_id,
                "round": header.round,
                "format": fmt,
                "bytes": result.raw_bytes,
                "wire_bytes": result.wire_bytes,
                "coding": result.content_encoding,
                "status": result.status,
                "upload_id": upload_id,
            },
        )
        return pb.UploadModelResponse(
            http_status=result.status,
            detail=result.detail,
            raw_bytes=result.raw_bytes,
            wire_bytes=result.wire_bytes,
            content_encoding=result.content_encoding,
            seconds=result.seconds,
            upload_id=upload_id,
        )

    def _spool_and_upload(
        self,
        header: pb.UploadHeader,
        messages: Iterator[pb.UploadModelRequest],
        context: Any,
        model_id: str,
        fmt: str,
        metrics: Dict[str, MetricValue],
        credentials: Optional[Credentials],
        upload_id: str,
        cancel: Cancellation,
    ) -> Any:
        spool = self.transfers.new_upload_spool(hashed=bool(header.sha256))
        try:
            for message in messages:
                if message.WhichOneof("kind") != "chunk":
                    raise _invalid("UploadModel takes one header, then only chunks")
                spool.write(message.chunk)
            path = spool.finish(header.size or None, header.sha256 or None)
            if not context.is_active():
                raise SidecarError("the trainer went away; nothing was uploaded", code="CANCELLED")
            return self.transfers.upload(
                model_id,
                Path(path),
                fmt,
                round=header.round,
                sample_size=header.sample_size,
                metrics=metrics,
                owner=header.owner or None,
                credentials=credentials,
                # Checked against the chunks as they arrived: not hashed again.
                sha256=header.sha256.lower() or None,
                upload_id=upload_id,
                cancel=cancel,
            )
        finally:
            spool.discard()

    @_unary
    def GetUpload(self, request: pb.GetUploadRequest, context: Any) -> Any:
        """What became of an upload, from the journal (answers during the drain too)."""
        upload_id = upload_journal.check_upload_id(request.upload_id)
        journal = self.transfers.journal
        if journal is None:
            raise SidecarError("this sidecar keeps no upload journal", code="FAILED_PRECONDITION")
        record = journal.get(upload_id)
        if record is None:
            raise SidecarError(
                f"this sidecar never began to send an upload {upload_id} (or forgot it after "
                "7 days): it did not reach the FL server through this sidecar",
                code="NOT_FOUND",
            )
        return pb.GetUploadResponse(
            upload_id=record.upload_id,
            state=UPLOAD_STATES.get(record.state, pb.UPLOAD_STATE_UNKNOWN),  # type: ignore[arg-type]
            http_status=record.http_status,
            detail=record.detail,
            model_id=record.model_id,
            round=record.round,
            updated_at=record.updated_at,
        )

    @_unary
    def UploadMetrics(self, request: pb.UploadMetricsRequest, context: Any) -> Any:
        """Post test metrics of the global model."""
        self._check_open()
        model_id = _require_id(request.model_id, "model_id")
        metrics = _metrics_mapping(request.metrics)
        if not metrics:
            raise _invalid("UploadMetrics needs at least one metric")
        result = self.transfers.client.upload_metrics(
            model_id,
            metrics,
            owner=request.owner or None,
            credentials=_credentials(request.credentials),
        )
        return pb.UploadMetricsResponse(http_status=result.status, detail=result.detail)

    @_unary
    def GetTraining(self, request: pb.GetTrainingRequest, context: Any) -> Any:
        """The training's state as the FL server reports it."""
        self._check_open()
        training_id = _require_id(request.training_id, "training_id")
        answer = self.transfers.client.get_training(
            training_id, credentials=_credentials(request.credentials)
        )
        return pb.GetTrainingResponse(
            state=str(answer.get("state", "")), json=json.dumps(answer, default=str)
        )

    @_streaming
    def Pack(
        self, request_iterator: Iterator[pb.PackRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PackResponse]:
        """Pack the streamed bytes; emit packed bytes as they are produced, then a summary."""
        self._check_open()
        codec = _codec_module()
        level, chunk_size = int(codec.DEFAULT_LEVEL), int(codec.DEFAULT_CHUNK_SIZE)
        packer: Any = None
        raw = 0
        output = _OutputBuffer()
        for index, message in enumerate(_requests(request_iterator)):
            kind = message.WhichOneof("kind")
            if kind == "options":
                if index != 0:
                    raise _invalid("Pack options must be the first message")
                if message.options.level:
                    level = message.options.level
                if message.options.chunk_size:
                    chunk_size = message.options.chunk_size
                if chunk_size > _MAX_PACK_CHUNK_SIZE:
                    raise _invalid(
                        f"chunk_size {chunk_size} exceeds the maximum of "
                        f"{_MAX_PACK_CHUNK_SIZE} bytes"
                    )
                continue
            if kind != "chunk":
                continue
            if packer is None:
                packer = _new_packer(codec, level, chunk_size)
            raw += len(message.chunk)
            for block in output.add(packer.write(message.chunk)):
                yield pb.PackResponse(chunk=block)
        if packer is None:
            packer = _new_packer(codec, level, chunk_size)
        for block in output.add(packer.finish()):
            yield pb.PackResponse(chunk=block)
        for block in output.flush():
            yield pb.PackResponse(chunk=block)
        stats = packer.stats
        yield pb.PackResponse(
            summary=pb.PackSummary(raw_bytes=raw, packed_bytes=output.total, frames=stats.frames)
        )

    @_streaming
    def Unpack(
        self, request_iterator: Iterator[pb.UnpackRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.UnpackResponse]:
        """Unpack any zstd stream; emit the original bytes as they are produced, then a summary."""
        self._check_open()
        limit = self.max_unpack_size
        unpacker: Any = None
        packed = 0
        output = _OutputBuffer()
        for index, message in enumerate(_requests(request_iterator)):
            kind = message.WhichOneof("kind")
            if kind == "options":
                if index != 0:
                    raise _invalid("Unpack options must be the first message")
                if message.options.max_output_size:
                    # The sidecar's --max-model-size is the ceiling: a trainer may only
                    # ask for less, never lift it.
                    limit = min(limit, message.options.max_output_size)
                continue
            if kind != "chunk":
                continue
            if unpacker is None:
                unpacker = _bounded_unpacker(limit)
            packed += len(message.chunk)
            for produced in unpacker.write_iter(message.chunk):
                for block in output.add(produced):
                    yield pb.UnpackResponse(chunk=block)
        if unpacker is None:
            unpacker = _bounded_unpacker(limit)
        unpacker.finish()
        for block in output.flush():
            yield pb.UnpackResponse(chunk=block)
        yield pb.UnpackResponse(
            summary=pb.UnpackSummary(packed_bytes=packed, raw_bytes=output.total)
        )

    @_streaming
    def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Event]:
        """Stream the bus's events (backlog or resume, then live) until cancel or drain."""
        self._check_open()
        after_seq = request.after_seq if request.HasField("after_seq") else None
        if after_seq is not None and after_seq > self.bus.last_seq():
            # Only another sidecar process (or a bug) gives a number this one has not
            # reached: waiting for it would skip this process's events up to it.
            raise SidecarError(
                f"after_seq {after_seq} is beyond this sidecar's newest event "
                f"({self.bus.last_seq()}): it is not from this sidecar process; "
                "subscribe again without after_seq",
                code="OUT_OF_RANGE",
            )
        subscription = self.bus.subscribe(
            after_seq=after_seq,
            training_ids=list(request.training_ids) or None,
            observe=request.observe,
        )
        # Wakes the blocked get() when the trainer cancels, so its thread is freed at once.
        context.add_callback(subscription.close)
        try:
            while not self._draining.is_set():
                event = subscription.get(timeout=_EVENT_POLL)
                if event is None:
                    if subscription.closed or not context.is_active():
                        return
                    continue
                yield event_to_proto(event)
        finally:
            subscription.close()


_UNPACK_PIECE = 4 * 1024 * 1024
"""Most bytes one Unpack decoding step may produce (bytes).

A decompression bomb turns a few bytes into gigabytes (zstd RLE blocks reach
about 32000:1), even hidden behind ordinary data; the codec's bounded decoder
stops at this many bytes per step and decodes on only as the stream is read,
so one Unpack call holds about one piece, one frame window and one message.
"""


def _bounded_unpacker(limit: int) -> Any:
    """A streaming decoder that refuses more than ``limit`` bytes in all, 4 MiB per step."""
    return _codec_module().Unpacker(max_output_size=limit, max_piece_size=_UNPACK_PIECE)


def _set_upload_trailer(context: Any, upload_id: str, state: str) -> None:
    context.set_trailing_metadata(
        ((UPLOAD_ID_METADATA_KEY, upload_id), (UPLOAD_STATE_METADATA_KEY, state))
    )


def _upload_failure(exc: Exception, upload_id: str, state: str) -> Exception:
    """The error the trainer gets for a failed upload, true to what reached the server.

    "Retry" (UNAVAILABLE) only ever goes with ``not_sent``; whenever the whole
    request may have reached the server, the code is UNKNOWN.
    """
    if state == upload_journal.UNKNOWN and status_for(exc) != grpc.StatusCode.UNKNOWN:
        return SidecarError(
            f"{exc} (upload {upload_id}: the whole request was sent and no answer came, so the "
            "FL server may have it; do not resend it blindly: ask GetUpload / GetTraining)",
            code="UNKNOWN",
        )
    if state == upload_journal.UNKNOWN:
        return SidecarError(f"{exc} (upload {upload_id}; ask GetUpload)", code="UNKNOWN")
    code = status_for(exc)
    if state != upload_journal.NOT_SENT and code == grpc.StatusCode.UNAVAILABLE:
        code = grpc.StatusCode.UNKNOWN  # never "retry" for what may have arrived
    if state == upload_journal.NOT_SENT and isinstance(exc, TransferCancelledError):
        return SidecarError(
            f"{exc} (upload {upload_id}: it did not arrive; safe to send again)", code=code.name
        )
    if code == status_for(exc):
        return exc
    return SidecarError(str(exc), code=code.name)


def _discard_unclaimed(updates: queue.Queue[Tuple[str, Any]]) -> None:
    # A model the worker finished after the reader stopped waiting for it.
    while True:
        try:
            kind, value = updates.get_nowait()
        except queue.Empty:
            return
        if kind == "done":
            value.discard()


def _requests(request_iterator: Iterator[T]) -> Iterator[T]:
    while True:
        try:
            message = next(request_iterator, None)
        except grpc.RpcError:
            # The trainer cancelled or the connection broke mid-stream.
            raise SidecarError("the trainer went away mid-stream", code="CANCELLED") from None
        if message is None:
            return
        yield message


def _new_packer(codec: Any, level: int, chunk_size: int) -> Any:
    try:
        return codec.Packer(level=level, chunk_size=chunk_size)
    except (ValueError, TypeError) as exc:
        raise _invalid(f"invalid pack options: {exc}") from None
