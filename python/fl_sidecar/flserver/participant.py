"""The trainer's calls of the FL server: fetch the global model, send updates and metrics.

Part of :class:`~fl_sidecar.flserver.FlServerClient`; the transfers themselves
live in :mod:`~fl_sidecar.flserver.downloads` and :mod:`~fl_sidecar.flserver.uploads`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from fl_sidecar import redaction
from fl_sidecar.cancel import Cancellation
from fl_sidecar.flserver.bodies import json_or_empty, metric_fields, urlencode
from fl_sidecar.flserver.coding import download_coding
from fl_sidecar.flserver.credentials import Credentials
from fl_sidecar.flserver.downloads import ModelDownloads
from fl_sidecar.flserver.results import (
    BodyCallback,
    MetricValue,
    PartFileCallback,
    PathLike,
    ProgressCallback,
    TransferResult,
)
from fl_sidecar.flserver.transport import quote_id
from fl_sidecar.flserver.uploads import ModelUploads

__all__ = ["ParticipantCalls"]


class ParticipantCalls(ModelDownloads, ModelUploads):
    """``download_model``, ``upload_model``, ``upload_metrics`` and ``get_training``."""

    def download_model(
        self,
        model_id: str,
        dest: PathLike,
        *,
        credentials: Optional[Credentials] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[Cancellation] = None,
        on_part_file: Optional[PartFileCallback] = None,
    ) -> TransferResult:
        """Download the global model ``model_id`` into the file ``dest``.

        The body is streamed into a temp file beside ``dest`` and renamed into
        place only when complete, so ``dest`` is never half-written. A zstd body
        is decoded by the codec as it arrives. Safe to repeat: retried (from the
        start) on connection errors, timeouts, cut-off bodies and 502/503/504.

        Args:
            progress: called with (wire bytes received, wire total or ``None``).
            cancel: cancelling it stops the download at once, even in a blocked read
                (its connection is shut down); nothing is left at ``dest``.
            on_part_file: told of each attempt's temp file as its body begins, so a
                caller can read the bytes as they arrive (see ``PartFileCallback``).

        Returns:
            A :class:`TransferResult`; ``raw_bytes`` and ``sha256`` describe the model file.

        Raises:
            NotFoundError: no such model. AuthenticationError: bad credentials.
            SizeLimitExceededError: the model exceeds ``max_download_size``.
            CodecError: the zstd body is corrupt or truncated.
            ServerUnavailableError: unreachable, timed out or 5xx after the retries.
            TransferCancelledError: ``cancel`` was cancelled.
        """
        operation = "download"
        path = f"api/models/{quote_id(model_id)}/"
        dest_path = Path(dest)
        accept = download_coding(self.compression)
        started = time.monotonic()

        def attempt() -> TransferResult:
            resp = self._attempt(
                "GET",
                path,
                operation=operation,
                idempotent=True,
                headers={"Accept-Encoding": accept},
                credentials=credentials,
                stream=True,
                cancel=cancel,
            )
            with resp:
                try:
                    return self._receive_model(
                        resp, dest_path, operation, progress, started, cancel, on_part_file
                    )
                finally:
                    # Before the connection goes back to the pool, where another
                    # call may take it: a later cancel must not shut it down.
                    if cancel is not None:
                        cancel.detach_all()

        return self._with_retries(operation, attempt, cancel)

    def upload_model(
        self,
        model_id: str,
        source: PathLike,
        *,
        round: int,
        sample_size: int,
        metrics: Optional[Mapping[str, MetricValue]] = None,
        owner: Optional[str] = None,
        credentials: Optional[Credentials] = None,
        progress: Optional[ProgressCallback] = None,
        sha256: Optional[str] = None,
        cancel: Optional[Cancellation] = None,
        on_body_complete: Optional[BodyCallback] = None,
    ) -> TransferResult:
        """Upload a locally trained model file for ``round`` of the training of ``model_id``.

        Never resent once its body may have reached the server (the real server
        counts duplicates). Packed with zstd when the server accepts it.

        Args:
            source: the torch model file to send (read in 1 MiB pieces).
            round: the training round this update belongs to.
            sample_size: number of training samples (FedAvg weight).
            metrics: metric name -> value, sent as ``metric_names``/``metric_values``
                (a number as its shortest round-trip form, a text as it is).
            owner: sent as the ``owner`` field when given (the real server ignores it).
            progress: called with (wire bytes sent, wire total).
            sha256: the file's hex SHA-256 when the caller already knows it (the sidecar
                checked it as the trainer streamed the file in): reported as is, and the
                file is not hashed again (about 0.5 s of CPU per GiB).
            cancel: cancelling it stops the upload at once, even in a blocked write
                or read (its connection is shut down). Before the body's last byte
                was handed to the socket that is a certain non-arrival
                (``TransferCancelledError``); after it, the outcome is unknown.
            on_body_complete: called just before the body's last byte is handed to
                the socket (each time, should a refused zstd body be sent again
                as identity); after it returns, the upload may arrive.

        Raises:
            ConflictError: wrong round or training state. NotFoundError: no such model.
            PermissionDeniedError: not a participant. RequestRejectedError: another 4xx
            (e.g. not a torch file). UploadOutcomeUnknownError: the connection failed or
            the server answered 5xx after the body may have arrived.
            ServerUnavailableError: the server could not be reached.
            TransferCancelledError: cancelled before the body was complete; nothing arrived.
            FileNotFoundError: ``source`` does not exist.
        """
        fields: List[Tuple[str, str]] = []
        if owner is not None:
            fields.append(("owner", str(owner)))
        fields.append(("round", str(int(round))))
        fields.append(("sample_size", str(int(sample_size))))
        fields.extend(metric_fields(metrics or {}))
        return self._upload_file(
            "upload",
            f"api/models/{quote_id(model_id)}/",
            fields,
            Path(source),
            credentials,
            progress,
            sha256=sha256,
            cancel=cancel,
            on_body_complete=on_body_complete,
        )

    def upload_metrics(
        self,
        model_id: str,
        metrics: Mapping[str, MetricValue],
        *,
        owner: Optional[str] = None,
        credentials: Optional[Credentials] = None,
    ) -> TransferResult:
        """Post test metrics of the global model ``model_id`` (form-urlencoded).

        Treated like an upload: the server counts metrics towards the next
        round, so it is resent only when it certainly did not arrive.

        Raises:
            the same errors as :meth:`upload_model`.
        """
        form = list(metric_fields(metrics))
        if owner is not None:
            form.insert(0, ("owner", str(owner)))
        started = time.monotonic()
        body = urlencode(form)
        resp = self._with_retries(
            "metrics",
            lambda: self._attempt(
                "POST",
                f"api/models/{quote_id(model_id)}/metrics/",
                operation="metrics",
                idempotent=False,
                data=body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                credentials=credentials,
            ),
        )
        payload = json_or_empty(resp)
        return TransferResult(
            status=resp.status_code,
            detail=redaction.redact(str(payload.get("detail", ""))),
            raw_bytes=len(body),
            wire_bytes=len(body),
            content_encoding="identity",
            seconds=time.monotonic() - started,
            sha256="",
            response=payload,
        )

    def get_training(
        self, training_id: str, *, credentials: Optional[Credentials] = None
    ) -> Dict[str, Any]:
        """The training's state: ``state`` (I, O, C, E), ``participants``, counters...

        Raises:
            NotFoundError: no such training. ServerUnavailableError: after retries.
        """
        resp = self._with_retries(
            "get_training",
            lambda: self._attempt(
                "GET",
                f"api/trainings/{quote_id(training_id)}/",
                operation="get_training",
                idempotent=True,
                credentials=credentials,
            ),
        )
        return json_or_empty(resp)
