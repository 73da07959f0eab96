"""The gRPC servicer of ``fl_sidecar.v1.Sidecar``: converts messages, calls the transfer layer.

It holds no transfer logic of its own and reaches the FL server only through
:class:`~fl_sidecar.sidecar.transfers.TransferManager` (the codec and the event
bus serve Pack, Unpack and WatchEvents); it validates requests, turns messages
into calls and results into messages, and maps domain errors to gRPC status
codes as the proto's header comment documents
(:func:`~fl_sidecar.sidecar.status.status_for`). Unexpected exceptions become
INTERNAL and are logged with their traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional, Sequence, Tuple, TypeVar, Union

import grpc

from fl_sidecar import __version__
from fl_sidecar.cancel import REASON_TRAINER_GONE, Cancellation
from fl_sidecar.errors import SidecarError, SizeLimitExceededError, UploadOutcomeUnknownError
from fl_sidecar.flserver import Credentials
from fl_sidecar.sidecar import uploads as upload_journal
from fl_sidecar.sidecar.codecstreams import (
    CodecResources,
    codec_defaults,
    pack_stream,
    unpack_stream,
)
from fl_sidecar.sidecar.downloads import (
    PHASE_CONVERTING,
    PHASE_FETCHING,
    DownloadProgress,
    EarlyStream,
    PartFile,
)
from fl_sidecar.sidecar.eventbus import EventBus
from fl_sidecar.sidecar.status import error_trailers, status_for, upload_failure
from fl_sidecar.sidecar.telemetry import Metrics
from fl_sidecar.sidecar.transfers import SpooledModel, TransferManager, is_sha256_hex
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from fl_sidecar.wire import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_SAFETENSORS,
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

_EVENT_POLL = 1.0  # seconds
# Calls the drain does not wait for: WatchEvents ends when the bus closes, GetInfo and
# GetUpload are instant (and GetUpload is what a trainer asks while the sidecar stops).
_NOT_DRAINED = frozenset({"WatchEvents", "GetInfo", "GetUpload"})

T = TypeVar("T")


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


def _require_id(value: str, what: str) -> str:
    if not value:
        raise _invalid(f"{what} is required")
    if len(value) > 200 or any(c.isspace() or c in "/?#" for c in value):
        raise _invalid(f"{what} {value[:64]!r} is not a valid id")
    return value


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
        level, chunk_size = codec_defaults()
        coding = self.transfers.request_coding()
        return pb.GetInfoResponse(
            version=__version__,
            codec="zstd-seekable",
            codec_level=level,
            codec_chunk_size=chunk_size,
            server_url=self.server_url,
            negotiated_coding=coding,
            notification_url=self.notification_url,
            max_message_size=MAX_MESSAGE_SIZE,
            trusts_pickles=self.trust_pickles,
        )

    @_streaming
    def DownloadModel(
        self, request: pb.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.DownloadModelResponse]:
        """Fetch, vet/convert, then stream ModelInfo and chunks; progress while fetching.

        A TORCH model whose size the FL server announces (an identity body) streams
        while it arrives: ModelInfo at once (its sha256 empty), then the chunks, the
        last one held back until the model is complete and vetted
        (:class:`~fl_sidecar.sidecar.downloads.EarlyStream`).
        """
        self._check_open()
        model_id = _require_id(request.model_id, "model_id")
        fmt = _format_name(request.format)
        chunk_size = request.chunk_size or DEFAULT_CHUNK_SIZE
        if chunk_size > MAX_CHUNK_SIZE:
            raise _invalid(f"chunk_size {chunk_size} exceeds the maximum of {MAX_CHUNK_SIZE} bytes")
        credentials = _credentials(request.credentials)

        handoff = self.transfers.start_download(model_id, fmt, credentials=credentials)
        # The trainer cancelled or disconnected: the HTTP download, vetting and
        # conversion stop (the worker thread's spool files go with them).
        context.add_callback(handoff.trainer_gone)
        early: Optional[EarlyStream] = None
        try:
            fetching = handoff.progress(context.is_active)
            while True:
                try:
                    update = next(fetching)
                except StopIteration as done:
                    model: SpooledModel = done.value
                    break
                if isinstance(update, PartFile):
                    if early is not None:
                        early.restart(update)  # a retried fetch
                    elif EarlyStream.fits(update) and fmt != FORMAT_SAFETENSORS:
                        early = EarlyStream(update, chunk_size)
                        yield pb.DownloadModelResponse(
                            info=pb.ModelInfo(
                                model_id=model_id,
                                format=pb.MODEL_FORMAT_TORCH,
                                size=early.size,
                                content_encoding=update.coding,
                                wire_bytes=early.size,
                            )
                        )
                    else:
                        update.file.close()
                elif early is not None:
                    for block in early.ready():
                        yield pb.DownloadModelResponse(chunk=block)
                else:
                    yield pb.DownloadModelResponse(progress=_progress_message(update))
            if early is not None:
                for block in early.finish(model):
                    yield pb.DownloadModelResponse(chunk=block)
            else:
                yield pb.DownloadModelResponse(info=_model_info(model_id, model))
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
            handoff.close()

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
            failure = upload_failure(exc, upload_id, state)
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
        result = self.transfers.upload_metrics(
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
        answer = self.transfers.get_training(
            training_id, credentials=_credentials(request.credentials)
        )
        return pb.GetTrainingResponse(
            state=str(answer.get("state", "")), json=json.dumps(answer, default=str)
        )

    @_streaming
    def Pack(
        self, request_iterator: Iterator[pb.PackRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.PackResponse]:
        """Pack the streamed bytes (zstd, or the tensor codec); emit them packed, then a summary."""
        self._check_open()
        yield from pack_stream(_requests(request_iterator), self._codec_resources())

    @_streaming
    def Unpack(
        self, request_iterator: Iterator[pb.UnpackRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.UnpackResponse]:
        """Unpack any zstd stream or a tensor blob; emit the original bytes, then a summary."""
        self._check_open()
        yield from unpack_stream(
            _requests(request_iterator), self.max_unpack_size, self._codec_resources()
        )

    def _codec_resources(self) -> CodecResources:
        """Where Pack and Unpack spool tensor blobs and references, and the held models."""
        return CodecResources(
            self.transfers.spool_dir, self.max_unpack_size, self.transfers.templates
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


def _set_upload_trailer(context: Any, upload_id: str, state: str) -> None:
    context.set_trailing_metadata(
        ((UPLOAD_ID_METADATA_KEY, upload_id), (UPLOAD_STATE_METADATA_KEY, state))
    )


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


_PHASES = {
    PHASE_FETCHING: pb.Progress.PHASE_FETCHING,
    PHASE_CONVERTING: pb.Progress.PHASE_CONVERTING,
}


def _model_info(model_id: str, model: SpooledModel) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_id=model_id,
        format=pb.MODEL_FORMAT_SAFETENSORS
        if model.format == FORMAT_SAFETENSORS
        else pb.MODEL_FORMAT_TORCH,
        size=model.size,
        sha256=model.sha256,
        content_encoding=model.content_encoding,
        wire_bytes=model.wire_bytes,
    )


def _progress_message(update: DownloadProgress) -> pb.Progress:
    return pb.Progress(phase=_PHASES[update.phase], done=update.done, total=update.total)
