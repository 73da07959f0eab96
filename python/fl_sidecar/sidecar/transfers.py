"""The transfer layer: everything the servicer asks of the FL server goes through here.

The domain layer between the gRPC servicer (:mod:`fl_sidecar.sidecar.servicer`,
which only converts messages) and the building blocks: :mod:`fl_sidecar.server_api`
(HTTP), :mod:`fl_sidecar.archive` (torch-free model files: vetting and
conversion copy raw tensor bytes, so the sidecar never imports torch and its
memory stays at a few buffers whatever the model's size) and
:mod:`fl_sidecar.sidecar.spool` (the private spool directory the models pass
through, never whole in memory). :class:`TransferManager` owns the FL server
client: downloads (also handed to a streaming call by
:meth:`TransferManager.start_download`), uploads, metrics, a training's state
and the request coding negotiated with the server.

The sidecar never executes a pickle: a TORCH download is vetted with the
restricted reader unless ``trust_pickles`` is set, conversions use the
restricted reader, and a SAFETENSORS upload is written into a copy of the
global model's archive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Set, Tuple

from fl_sidecar import archive as model_files
from fl_sidecar.cancel import REASON_SHUTDOWN, Cancellation
from fl_sidecar.errors import (
    AuthenticationError,
    ConflictError,
    ModelFormatError,
    ModelReadCancelledError,
    NotFoundError,
    PermissionDeniedError,
    RequestRejectedError,
    ServerError,
    SidecarError,
    TransferCancelledError,
    UnsafePickleError,
    UploadOutcomeUnknownError,
)
from fl_sidecar.flserver import (
    Credentials,
    FlServerClient,
    MetricValue,
    ProgressCallback,
    TransferResult,
)
from fl_sidecar.flserver.results import PartFileCallback
from fl_sidecar.sidecar import uploads
from fl_sidecar.sidecar.downloads import DownloadCancelledError, DownloadHandoff
from fl_sidecar.sidecar.spool import (
    SPOOL_PREFIX,
    SpooledModel,
    UploadSpool,
    create_spool_dir,
    raise_if_spool_full,
    remove_stale_spools,
    spool_space,
    unlink_quietly,
)
from fl_sidecar.sidecar.telemetry import Metrics
from fl_sidecar.sidecar.templates import ModelFacts, TemplateCache
from fl_sidecar.sidecar.uploads import UploadJournal
from fl_sidecar.wire import FORMAT_SAFETENSORS, FORMAT_TORCH

__all__ = [
    "FORMAT_SAFETENSORS",
    "FORMAT_TORCH",
    "SPOOL_PREFIX",
    "DownloadCancelledError",
    "DownloadHandoff",
    "SpooledModel",
    "TransferManager",
    "UploadSpool",
    "is_sha256_hex",
    "raise_if_spool_full",
    "remove_stale_spools",
    "round_seconds",
    "spool_space",
]


_log = logging.getLogger(__name__)
_SHA256_PATTERN = re.compile(r"[0-9a-f]{64}\Z")

# The FL server's answers that say it stored nothing (4xx).
_REFUSALS = (
    AuthenticationError,
    PermissionDeniedError,
    NotFoundError,
    ConflictError,
    RequestRejectedError,
)


def is_sha256_hex(text: str) -> bool:
    """Whether ``text`` is a 64-character hex SHA-256 digest (either case)."""
    return _SHA256_PATTERN.match(text.lower()) is not None


class TransferManager:
    """Downloads and uploads models for trainers, through one :class:`FlServerClient`.

    Thread-safe: each call uses its own spool files; the template cache is locked.
    """

    def __init__(
        self,
        client: FlServerClient,
        *,
        spool_dir: Optional[str] = None,
        max_model_size: int,
        trust_pickles: bool = False,
        metrics: Optional[Metrics] = None,
        journal: Optional[UploadJournal] = None,
        model_round: Optional[Callable[[str], Optional[int]]] = None,
    ) -> None:
        """Create the private spool directory (mode 0700, locked) under ``spool_dir``.

        Then remove the spool directories under ``spool_dir`` that dead sidecars
        left behind (:func:`remove_stale_spools`).

        Args:
            client: the FL server client (its default credentials apply when a call has none).
            spool_dir: parent of the spool directory; ``None`` is the system temp dir.
            max_model_size: largest upload accepted, in bytes.
            trust_pickles: pass TORCH downloads through without vetting them.
            metrics: where bytes and durations are counted.
            journal: where uploads with an id are recorded before they are sent.
            model_round: the round a global model id is in, when the sidecar knows it
                (the notifications it delivered), else ``None``: a download whose round
                is known is kept and reused for that round (see :meth:`download`).

        Raises:
            SpoolFullError: no room for the spool directory. OSError: it cannot be created.
        """
        self.client = client
        self.max_model_size = max_model_size
        self.trust_pickles = trust_pickles
        self.metrics = metrics
        self.journal = journal
        self._model_round = model_round
        self._cancellations: Set[Cancellation] = set()
        self._cancellations_lock = threading.Lock()
        self._shutting_down = False
        parent = Path(spool_dir) if spool_dir is not None else Path(tempfile.gettempdir())
        self.spool_dir, lock_fd = create_spool_dir(parent)
        self._lock_fd: Optional[int] = lock_fd
        removed = remove_stale_spools(parent)
        if removed:
            _log.info(
                "removed spool directories left behind by sidecars that died",
                extra={"spool_parent": str(parent), "removed": [str(p) for p in removed]},
            )
        # The global models held by (model id, round): SAFETENSORS uploads'
        # templates, and downloads of a round already fetched.
        self.templates = TemplateCache(
            lambda: self._spool_path(".template.pt"), self._fetch_template
        )

    def close(self) -> None:
        """Remove the spool directory with every file still in it, then drop its lock."""
        shutil.rmtree(self.spool_dir, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- cancellation --

    @contextlib.contextmanager
    def cancellable(self, cancel: Optional[Cancellation] = None) -> Iterator[Cancellation]:
        """A call's :class:`Cancellation` (``cancel`` or a new one), reached by :meth:`cancel_all`.

        Already cancelled when the manager is shutting down.
        """
        token = cancel if cancel is not None else Cancellation()
        with self._cancellations_lock:
            self._cancellations.add(token)
            shutting_down = self._shutting_down
        if shutting_down:
            token.cancel(REASON_SHUTDOWN)
        try:
            yield token
        finally:
            with self._cancellations_lock:
                self._cancellations.discard(token)

    def cancel_all(self, reason: str = REASON_SHUTDOWN) -> int:
        """Cancel every transfer in flight (and every later one); returns how many were running."""
        with self._cancellations_lock:
            self._shutting_down = True
            running = list(self._cancellations)
        for token in running:
            token.cancel(reason)
        return len(running)

    def _spool_path(self, suffix: str) -> Path:
        return self.spool_dir / f"{uuid.uuid4().hex}{suffix}"

    def new_upload_spool(self, *, hashed: bool = True) -> UploadSpool:
        """A fresh :class:`UploadSpool` limited to ``max_model_size`` bytes."""
        return UploadSpool(self._spool_path(".upload"), self.max_model_size, hashed=hashed)

    # -- the FL server's other calls --

    def upload_metrics(
        self,
        model_id: str,
        metrics: Mapping[str, MetricValue],
        *,
        owner: Optional[str] = None,
        credentials: Optional[Credentials] = None,
    ) -> TransferResult:
        """Post test metrics of the global model ``model_id``.

        Args:
            credentials: for this call; ``None`` uses the client's own.

        Raises:
            ServerError subclasses from the FL server (UploadOutcomeUnknownError when
            the request went out and no answer came: it is never resent).
        """
        return self.client.upload_metrics(model_id, metrics, owner=owner, credentials=credentials)

    def get_training(
        self, training_id: str, *, credentials: Optional[Credentials] = None
    ) -> Dict[str, Any]:
        """The training's state as the FL server reports it (its JSON object).

        Raises:
            NotFoundError: no such training. ServerError subclasses otherwise.
        """
        return self.client.get_training(training_id, credentials=credentials)

    def training_known(self, training_id: str) -> bool:
        """Whether the FL server answers for ``training_id`` with the sidecar's own credentials.

        Raises:
            ServerError: the server could not be asked (unavailable, bad credentials).
        """
        try:
            self.client.get_training(training_id)
        except (NotFoundError, PermissionDeniedError, ConflictError, RequestRejectedError):
            return False
        return True

    def request_coding(self) -> str:
        """The content coding uploads use: ``"zstd"``, ``"identity"``, or ``""`` (not learnt yet).

        ``--compression never`` makes it ``"identity"`` (and downloads are then
        not offered zstd either).
        """
        if self.client.compression == "never":
            return "identity"
        return self.client.negotiated_coding or ""

    # -- download --

    def start_download(
        self, model_id: str, fmt: str, *, credentials: Optional[Credentials] = None
    ) -> DownloadHandoff:
        """Start :meth:`download` on its own thread, for a call that streams the model.

        The handoff reports progress, hands over the spooled model and deletes it
        when closed; see :class:`~fl_sidecar.sidecar.downloads.DownloadHandoff`.
        """
        return DownloadHandoff(
            lambda progress, on_converting, cancel, on_part_file: self.download(
                model_id,
                fmt,
                credentials=credentials,
                progress=progress,
                on_converting=on_converting,
                cancel=cancel,
                on_part_file=on_part_file,
            )
        )

    def download(
        self,
        model_id: str,
        fmt: str,
        *,
        credentials: Optional[Credentials] = None,
        progress: Optional[ProgressCallback] = None,
        on_converting: Optional[Callable[[], None]] = None,
        cancel: Optional[Cancellation] = None,
        on_part_file: Optional[PartFileCallback] = None,
    ) -> SpooledModel:
        """Fetch the global model into a spool file, vet or convert it.

        When the sidecar knows the model's round (``model_round``), the archive is
        kept by (model id, round) for that round's SAFETENSORS uploads and later
        downloads, and an archive already held for that round is used instead of
        fetching again. A round that is not known means a fetch, and nothing kept.

        Args:
            model_id: the global model's id.
            fmt: ``"torch"`` (the server's bytes) or ``"safetensors"`` (converted).
            credentials: for this call; ``None`` uses the client's own.
            progress: called with (wire bytes received, wire total or ``None``).
            on_converting: called once before vetting or conversion starts.
            cancel: cancelled when the trainer went away or the sidecar stops: the fetch
                stops at once (its connection is shut down), vetting and conversion at
                their next stage, and the spool files are removed.
            on_part_file: for a TORCH download, told of each fetch attempt's part file
                as its body begins (see ``FlServerClient.download_model``), so the
                bytes can be streamed while they arrive; not called for SAFETENSORS
                (converted from the whole archive) nor for a copy already held.

        Returns:
            The spooled model; the caller must :meth:`SpooledModel.discard` it.

        Raises:
            ServerError subclasses from the FL server; CodecError for a corrupt body;
            UnsafePickleError: the archive's pickle would run code (and pickles are not
            trusted, or the format is SAFETENSORS); ModelFormatError: not a torch
            archive; DownloadCancelledError: ``cancel`` was cancelled; SpoolFullError: the
            spool's file system is full (the partial files are removed).
        """
        with self.cancellable(cancel) as stop:
            return self._download(
                model_id, fmt, credentials, progress, on_converting, stop, on_part_file
            )

    def _download(
        self,
        model_id: str,
        fmt: str,
        credentials: Optional[Credentials],
        progress: Optional[ProgressCallback],
        on_converting: Optional[Callable[[], None]],
        stop: Cancellation,
        on_part_file: Optional[PartFileCallback] = None,
    ) -> SpooledModel:
        archive = self._spool_path(".pt")

        def check() -> None:
            if stop.is_set():
                raise DownloadCancelledError(
                    f"download of model {model_id}: {stop.reason}; stopped",
                    shutting_down=stop.shutting_down,
                )

        self._track_in_flight("download", +1)
        try:
            round_ = self._round_of(model_id)
            facts = self._held_copy(model_id, round_, archive)
            if facts is None:
                try:
                    result = self.client.download_model(
                        model_id,
                        archive,
                        credentials=credentials,
                        progress=progress,
                        cancel=stop,
                        on_part_file=on_part_file if fmt == FORMAT_TORCH else None,
                    )
                except TransferCancelledError as exc:
                    raise DownloadCancelledError(
                        str(exc), shutting_down=exc.shutting_down
                    ) from None
                self._count("download", result)
                facts = ModelFacts(
                    result.raw_bytes, result.sha256, result.content_encoding, result.wire_bytes
                )
            check()
            if fmt == FORMAT_SAFETENSORS:
                if on_converting is not None:
                    on_converting()
                converted = self._spool_path(".safetensors")
                try:
                    size, sha256 = model_files.archive_to_safetensors(
                        archive, converted, should_stop=stop.is_set
                    )
                    check()
                except ModelReadCancelledError:
                    unlink_quietly(converted)
                    check()  # the reader stopped because ``stop`` is set: say why
                    raise
                except BaseException:
                    unlink_quietly(converted)
                    raise
                # Converted by the restricted reader: fit to be a template, not vetted.
                self._keep(model_id, round_, archive, facts)
                unlink_quietly(archive)
                return SpooledModel(
                    converted,
                    size,
                    sha256,
                    FORMAT_SAFETENSORS,
                    facts.content_encoding,
                    facts.wire_bytes,
                )
            if not self.trust_pickles and not facts.vetted:
                if on_converting is not None:
                    on_converting()
                try:
                    self._vet(archive, stop)
                except ModelReadCancelledError:
                    check()
                    raise
                check()
                facts = dataclasses.replace(facts, vetted=True)
            self._keep(model_id, round_, archive, facts)
            return SpooledModel(
                archive,
                facts.size,
                facts.sha256,
                FORMAT_TORCH,
                facts.content_encoding,
                facts.wire_bytes,
            )
        except OSError as exc:
            unlink_quietly(archive)
            raise_if_spool_full(exc, self.spool_dir)
            raise
        except BaseException:
            unlink_quietly(archive)
            raise
        finally:
            self._track_in_flight("download", -1)

    def _round_of(self, model_id: str) -> Optional[int]:
        return self._model_round(model_id) if self._model_round is not None else None

    def _held_copy(self, model_id: str, round_: Optional[int], dest: Path) -> Optional[ModelFacts]:
        """Give ``dest`` the archive held for (``model_id``, ``round_``); its facts, or ``None``."""
        if round_ is None:
            return None
        key = (model_id, round_)
        template = self.templates.lookup(key)
        if template is None:
            return None
        try:
            try:
                os.link(template.path, dest)  # a name of the download's own: no copy
            except OSError:
                shutil.copyfile(template.path, dest)
            facts = template.facts
        finally:
            self.templates.release(key, template)
        _log.info(
            "served the global model from the copy held for its round",
            extra={"model_id": model_id, "round": round_},
        )
        return facts

    def _keep(self, model_id: str, round_: Optional[int], archive: Path, facts: ModelFacts) -> None:
        """Hold a downloaded archive for its round, unless the round changed meanwhile."""
        # A round notification that arrived during the fetch may mean the bytes
        # are the next round's: keep nothing then.
        if round_ is not None and self._round_of(model_id) == round_:
            self.templates.adopt((model_id, round_), archive, facts)

    def _vet(self, archive: Path, stop: Cancellation) -> None:
        try:
            # describe() runs the restricted unpickler over the pickle only, not
            # the tensor data: memory stays small for big models. A trainer that
            # leaves, or the drain, stops the walk within a few thousand steps.
            model_files.describe(archive, should_stop=stop.is_set)
        except UnsafePickleError as exc:
            raise UnsafePickleError(
                f"the FL server's model would run code when unpickled ({exc}); the sidecar "
                "refuses it. Start the sidecar with --trust-pickles (FL_SIDECAR_TRUST_PICKLES=1) "
                "only if you trust the server"
            ) from exc

    # -- upload --

    def upload(
        self,
        model_id: str,
        source: Path,
        fmt: str,
        *,
        round: int,
        sample_size: int,
        metrics: Mapping[str, MetricValue],
        owner: Optional[str] = None,
        credentials: Optional[Credentials] = None,
        sha256: Optional[str] = None,
        upload_id: Optional[str] = None,
        cancel: Optional[Cancellation] = None,
    ) -> TransferResult:
        """Upload a spooled model (converting SAFETENSORS into the global model's archive).

        Args:
            model_id: the global model's id.
            source: the spooled upload (a torch archive, or a safetensors file).
            fmt: ``"torch"`` or ``"safetensors"``.
            round, sample_size, metrics, owner: the upload's fields.
            credentials: for this call; ``None`` uses the client's own.
            sha256: the source's verified SHA-256, if known (a TORCH upload is then
                not hashed again).
            upload_id: the trainer's name for the upload: recorded in the journal
                durably before the first byte is sent, and its outcome after (the
                caller has :meth:`UploadJournal.claim`-ed it).
            cancel: cancelled when the trainer went away or the sidecar stops: the
                upload stops at once, also mid-request (see ``FlServerClient.upload_model``).

        Returns:
            What the FL server answered and what was moved.

        Raises:
            ModelFormatError: TORCH data that is not a torch archive, or SAFETENSORS data
            that is not safetensors. TensorMismatchError: the weights do not match the
            global model. ServerError subclasses from the FL server. SpoolFullError: the
            spool's file system is full (the converted or packed files are removed).
            TransferCancelledError: cancelled before the request was complete: the
            server stored nothing. UploadOutcomeUnknownError: the whole request went
            out and no answer came (cancelled, connection broken, 5xx).
            SidecarError: UNAVAILABLE when the journal cannot be written (nothing was sent).
        """
        with self.cancellable(cancel) as stop:
            return self._upload(
                model_id,
                source,
                fmt,
                round=round,
                sample_size=sample_size,
                metrics=metrics,
                owner=owner,
                credentials=credentials,
                sha256=sha256,
                upload_id=upload_id,
                stop=stop,
            )

    def _upload(
        self,
        model_id: str,
        source: Path,
        fmt: str,
        *,
        round: int,
        sample_size: int,
        metrics: Mapping[str, MetricValue],
        owner: Optional[str],
        credentials: Optional[Credentials],
        sha256: Optional[str],
        upload_id: Optional[str],
        stop: Cancellation,
    ) -> TransferResult:
        self._track_in_flight("upload", +1)
        converted: Optional[Path] = None
        try:
            known: Optional[str]
            if fmt == FORMAT_SAFETENSORS:
                converted = self._spool_path(".pt")
                # The converted archive's digest is counted while it is written.
                known = self._write_into_template(
                    model_id, round, source, converted, credentials, stop
                ).sha256
                to_send = converted
            else:
                self._check_torch(source)
                to_send = source
                known = sha256
            if stop.is_set():
                raise TransferCancelledError(
                    f"upload for model {model_id}: {stop.reason} before it was sent; nothing "
                    "reached the FL server",
                    shutting_down=stop.shutting_down,
                )
            journal = self.journal if upload_id is not None else None
            on_body_complete: Optional[Callable[[], None]] = None
            if journal is not None and upload_id is not None:
                self._journal_sending(journal, upload_id, model_id, round)
                on_body_complete = functools.partial(journal.body_complete, upload_id)
            try:
                result = self.client.upload_model(
                    model_id,
                    to_send,
                    round=round,
                    sample_size=sample_size,
                    metrics=metrics,
                    owner=owner,
                    credentials=credentials,
                    sha256=known,
                    cancel=stop,
                    on_body_complete=on_body_complete,
                )
            except BaseException as exc:
                if journal is not None and upload_id is not None:
                    record = journal.get(upload_id)
                    body_complete = record is not None and record.body_complete
                    journal.finish(
                        upload_id,
                        _upload_state_after(exc, body_complete),
                        http_status=int(getattr(exc, "status", None) or 0),
                        detail=str(exc),
                    )
                raise
            if journal is not None and upload_id is not None:
                journal.finish(
                    upload_id, uploads.ACCEPTED, http_status=result.status, detail=result.detail
                )
            self._count("upload", result)
            return result
        except OSError as exc:
            raise_if_spool_full(exc, self.spool_dir)
            raise
        finally:
            if converted is not None:
                unlink_quietly(converted)
            self._track_in_flight("upload", -1)

    @staticmethod
    def _journal_sending(journal: UploadJournal, upload_id: str, model_id: str, round: int) -> None:
        try:
            journal.sending(upload_id, model_id, round)
        except OSError as exc:
            raise SidecarError(
                f"cannot record upload {upload_id} in the journal {journal.directory} "
                f"({exc.strerror or exc}); nothing was sent",
                code="UNAVAILABLE",
            ) from None

    def _check_torch(self, source: Path) -> None:
        detected = model_files.detect_format(source)
        if detected == model_files.ModelFormat.SAFETENSORS:
            raise ModelFormatError(
                "the upload is declared TORCH but holds a safetensors file; declare "
                "MODEL_FORMAT_SAFETENSORS"
            )

    def _write_into_template(
        self,
        model_id: str,
        round: int,
        weights: Path,
        dest: Path,
        credentials: Optional[Credentials],
        stop: Optional[Cancellation] = None,
    ) -> model_files.WrittenFile:
        if model_files.detect_format(weights) != model_files.ModelFormat.SAFETENSORS:
            raise ModelFormatError(
                "the upload is declared SAFETENSORS but is not a safetensors file"
            )
        key = (model_id, round)
        template = self.templates.acquire(key, credentials, stop)
        try:
            # Outside every lock: uploads for different models, or several trainers'
            # uploads for the same round, convert in parallel.
            return model_files.safetensors_into_archive(
                template.path, weights, dest, should_stop=stop.is_set if stop is not None else None
            )
        finally:
            self.templates.release(key, template)

    def _fetch_template(
        self,
        key: Tuple[str, int],
        path: Path,
        credentials: Optional[Credentials],
        stop: Optional[Cancellation] = None,
    ) -> ModelFacts:
        model_id, round = key
        started = time.monotonic()
        try:
            result = self.client.download_model(
                model_id, path, credentials=credentials, cancel=stop
            )
        except ServerError as exc:
            unlink_quietly(path)
            # The trainer asked for an upload: the global model is fetched only to
            # convert it, so the answer is told as the upload's, with the same class.
            raise _as_upload_error(exc, model_id) from exc
        except BaseException:
            unlink_quietly(path)
            raise
        self._count("download", result)
        _log.info(
            "fetched the global model as the template for a safetensors upload",
            extra={
                "model_id": model_id,
                "round": round,
                "bytes": result.raw_bytes,
                "seconds": round_seconds(time.monotonic() - started),
            },
        )
        return ModelFacts(
            result.raw_bytes, result.sha256, result.content_encoding, result.wire_bytes
        )

    # -- bookkeeping --

    def _count(self, direction: str, result: TransferResult) -> None:
        if self.metrics is None:
            return
        self.metrics.transfer_bytes.labels(direction, "raw").inc(result.raw_bytes)
        self.metrics.transfer_bytes.labels(direction, "wire").inc(result.wire_bytes)
        self.metrics.transfer_seconds.labels(direction).observe(result.seconds)

    def _track_in_flight(self, direction: str, delta: int) -> None:
        if self.metrics is not None:
            self.metrics.in_flight.labels(direction).inc(delta)


def _upload_state_after(exc: BaseException, body_complete: bool) -> str:
    """The journal state of an upload whose ``upload_model`` call raised ``exc``.

    A 4xx answer says the server stored nothing. Otherwise no answer decided it,
    and what was sent does: a request whose last byte never went out is no
    request to the server; a complete one may have been stored.
    """
    if isinstance(exc, _REFUSALS):
        return uploads.REJECTED
    if isinstance(exc, UploadOutcomeUnknownError) or body_complete:
        return uploads.UNKNOWN
    return uploads.NOT_SENT


def round_seconds(seconds: float) -> float:
    """Seconds rounded to milliseconds, for logs."""
    return round(seconds, 3)


def _as_upload_error(exc: ServerError, model_id: str) -> ServerError:
    """``exc`` (from fetching the global model for a SAFETENSORS upload) told as the upload's."""
    detail = exc.detail or str(exc)
    try:
        return type(exc)(
            f"upload for model {model_id} failed: {detail}",
            status=exc.status,
            detail=exc.detail,
            operation="upload",
            body=exc.body,
            content_type=exc.content_type,
        )
    except TypeError:  # a subclass with another constructor: keep the original
        return exc
