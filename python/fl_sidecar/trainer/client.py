"""The high-level Python client of the fl-sidecar gRPC service.

A trainer talks to the sidecar running next to it::

    from fl_sidecar.client import SidecarClient   # or fl_sidecar.trainer.client

    with SidecarClient("unix:///run/user/1000/fl-sidecar/sidecar.sock") as sidecar:
        for event in sidecar.watch_events():
            if event.kind is EventKind.UPDATE_ROUND_START:
                weights = sidecar.download_state_dict(event.model_id)
                ...  # train
                sidecar.upload_state_dict(event.model_id, weights, round=event.round,
                                          sample_size=len(dataset))

Models move in 1-4 MiB messages; every method that moves a model takes an
optional ``progress(done_bytes, total_bytes)`` callback (``total_bytes`` is 0
while unknown). Every failed call raises a :class:`fl_sidecar.errors.SidecarError`
whose ``code`` is the gRPC status name (``"NOT_FOUND"``, ``"UNAVAILABLE"``, ...);
when the sidecar named a domain error, the error is also an instance of that
class (``except NotFoundError``, ``except ConflictError``, see
:mod:`fl_sidecar.trainer.remote_errors`); when the FL server refused,
``http_status`` and ``http_body`` hold its answer. On a unix socket every call
first checks who owns the socket and its directory and raises
:class:`fl_sidecar.errors.UnsafeSocketError` before sending anything when
another user could have put it there (see ``expected_owner``). The token, that
check and the error mapping are one interceptor
(:mod:`fl_sidecar.trainer.interceptor`).

torch is needed only by the ``*_state_dict`` and ``*_module`` methods, which use
:mod:`fl_sidecar.models` (imported on first use).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

from fl_sidecar.address import default_target, normalize_target, unix_socket_path
from fl_sidecar.trainer.codec_calls import CodecCalls, HeldModel, SidecarFile
from fl_sidecar.trainer.connection import SOCKET_OWNER_VARIABLE
from fl_sidecar.trainer.credentials import CallCredentials
from fl_sidecar.trainer.downloads import ModelDownloads
from fl_sidecar.trainer.events import EventStream
from fl_sidecar.trainer.interceptor import raise_if_refused
from fl_sidecar.trainer.results import (
    DownloadResult,
    MetricsResult,
    PackResult,
    SidecarInfo,
    TrainingStatus,
    UnpackResult,
    UploadResult,
    UploadStatus,
)
from fl_sidecar.trainer.streams import MetricsArg, metric_list
from fl_sidecar.trainer.uploads import ModelUploads
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.wire import DEFAULT_CHUNK_SIZE, MAX_MESSAGE_SIZE, TOKEN_METADATA_KEY

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "MAX_MESSAGE_SIZE",
    "SOCKET_OWNER_VARIABLE",
    "TOKEN_METADATA_KEY",
    "CallCredentials",
    "DownloadResult",
    "EventStream",
    "HeldModel",
    "MetricsResult",
    "PackResult",
    "SidecarClient",
    "SidecarFile",
    "SidecarInfo",
    "TrainingStatus",
    "UnpackResult",
    "UploadResult",
    "UploadStatus",
    "default_target",
    "normalize_target",
    "unix_socket_path",
]


class SidecarClient(ModelDownloads, ModelUploads, CodecCalls):
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
            that is neither a uid nor a known user name. ConfigurationError:
            ``target=None`` and a malformed ``FL_SIDECAR_LISTEN``.

    Attributes:
        last_upload_id: the ``upload_id`` of the latest upload this client started
            (``None`` before the first), for :meth:`get_upload`.
    """

    def get_info(self) -> SidecarInfo:
        """The sidecar's version, codec settings, FL server URL and notification URL.

        Raises:
            SidecarError: the call failed.
        """
        r = self._stub.GetInfo(pb.GetInfoRequest(), timeout=self.timeout)
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
            metrics=metric_list(metrics),
            credentials=self._creds(credentials),
            owner=owner,
        )
        r = self._stub.UploadMetrics(request, timeout=self.timeout)
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
        r = self._stub.GetTraining(request, timeout=self.timeout)
        try:
            data = json.loads(r.json) if r.json else {}
        except ValueError:
            data = {}
        return TrainingStatus(state=r.state, data=data if isinstance(data, dict) else {})

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
            UnsafeSocketError, SidecarError: at once, when the socket is refused (as
                every call); a failed subscription raises when reading the stream.
        """
        request = pb.WatchEventsRequest(
            training_ids=[str(t) for t in training_ids], observe=observe
        )
        if after_seq is not None:
            request.after_seq = int(after_seq)
        call = self._stub.WatchEvents(request, timeout=timeout)
        raise_if_refused(call)
        return EventStream(call)
