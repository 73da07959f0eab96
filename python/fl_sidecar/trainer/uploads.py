"""Model uploads of the trainer's client, and what became of an upload (the sidecar's journal).

An upload streams an ``UploadHeader`` and the model's chunks; nothing reaches
the FL server unless the whole stream arrives. Every failure is an
:class:`~fl_sidecar.errors.UploadFailedError` whose ``upload_state`` says what
reached the FL server (the sidecar's trailer; the journal when the connection
to the sidecar broke).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Union

from fl_sidecar.errors import SidecarError, UploadFailedError
from fl_sidecar.trainer.connection import SidecarConnection
from fl_sidecar.trainer.credentials import CallCredentials
from fl_sidecar.trainer.remote_errors import remote_error
from fl_sidecar.trainer.results import UploadResult, UploadStatus
from fl_sidecar.trainer.streams import (
    Buffer,
    MetricsArg,
    PathLike,
    ProgressCallback,
    RequestStream,
    format_value,
    metric_list,
    private_file,
    read_chunks,
    slice_chunks,
)
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.wire import upload_state_name

if TYPE_CHECKING:
    import torch

__all__ = ["ModelUploads"]

# The gRPC code of a refusal the journal recorded (by HTTP status), as the sidecar maps them.
_REJECTION_CODES = {401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}


class ModelUploads(SidecarConnection):
    """The upload calls of :class:`~fl_sidecar.trainer.client.SidecarClient`."""

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
        r = self._stub.GetUpload(request, timeout=self.timeout)
        return UploadStatus(
            upload_id=r.upload_id,
            state=upload_state_name(r.state),
            http_status=r.http_status,
            detail=r.detail,
            model_id=r.model_id,
            round=r.round,
            updated_at=r.updated_at,
        )

    def _upload_stream(
        self,
        header: pb.UploadHeader,
        chunks: Iterable[bytes],
        *,
        progress: Optional[ProgressCallback],
        timeout: Optional[float],
    ) -> UploadResult:
        source = RequestStream(
            pb.UploadModelRequest(header=header),
            lambda chunk: pb.UploadModelRequest(chunk=chunk),
            chunks,
            progress=progress,
            total=header.size,
        )
        self.last_upload_id = header.upload_id
        try:
            r = self._stub.UploadModel(source, timeout=timeout)
        except UploadFailedError as failed:
            source.reraise()
            outcome = self._upload_outcome(failed, header)
            if isinstance(outcome, UploadStatus):
                # The sidecar recorded the server's 2xx before the connection broke.
                return UploadResult(
                    http_status=outcome.http_status,
                    detail=outcome.detail,
                    raw_bytes=0,
                    wire_bytes=0,
                    content_encoding="",
                    seconds=0.0,
                    upload_id=outcome.upload_id,
                )
            raise outcome from None
        except SidecarError as refused:
            # Refused before the call was made (no socket at the path); the interceptor
            # raises every failure of a call that was made as an UploadFailedError.
            raise UploadFailedError(
                f"upload {header.upload_id} for model {header.model_id}: {refused}; "
                "nothing was sent",
                code=refused.code,
                upload_id=header.upload_id,
                upload_state="not_sent",
            ) from refused
        return UploadResult(
            http_status=r.http_status,
            detail=r.detail,
            raw_bytes=r.raw_bytes,
            wire_bytes=r.wire_bytes,
            content_encoding=r.content_encoding,
            seconds=r.seconds,
            upload_id=r.upload_id or header.upload_id,
        )

    def _upload_outcome(
        self, failed: UploadFailedError, header: pb.UploadHeader
    ) -> Union[UploadFailedError, UploadStatus]:
        """The error of a failed UploadModel, with what reached the FL server.

        The sidecar puts the upload's state in the trailing metadata of every
        status it sends (then ``failed`` says it already). A status without it
        came from the gRPC library (the connection to the sidecar broke): then
        the sidecar's journal is asked, and an upload it recorded as accepted is
        returned as its status.
        """
        if failed.upload_state:
            return failed
        code, message = failed.code, str(failed)
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
        return remote_error(
            UploadFailedError,
            message,
            code=code,
            error_class=failed.error_class,
            http_status=failed.http_status,
            http_body=failed.http_body,
            http_content_type=failed.http_content_type,
            method="UploadModel",
            upload_id=header.upload_id,
            upload_state=state,
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
            metrics=metric_list(metrics),
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
            fmt=format_value(format),
            size=size,
            sha256=hashlib.sha256(view).hexdigest() if checksum else "",
            credentials=credentials,
            owner=owner,
            upload_id=upload_id,
        )
        return self._upload_stream(
            header, slice_chunks(view, self.chunk_size), progress=progress, timeout=timeout
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
            fmt=format_value(format),
            size=size,
            sha256=sha,
            credentials=credentials,
            owner=owner,
            upload_id=upload_id,
        )
        with open(path, "rb") as f:
            return self._upload_stream(
                header, read_chunks(f, self.chunk_size), progress=progress, timeout=timeout
            )

    def _upload_written(
        self,
        model_id: str,
        write: Callable[[IO[bytes]], None],
        *,
        format: str,
        round: int,
        sample_size: int,
        metrics: MetricsArg,
        owner: str,
        progress: Optional[ProgressCallback],
        credentials: Optional[CallCredentials],
        timeout: Optional[float],
        upload_id: Optional[str],
    ) -> UploadResult:
        """Upload what ``write(file)`` writes, streamed through a private temporary file."""
        with private_file("upload") as path:
            with open(path, "wb") as out:
                write(out)
            return self.upload_file(
                model_id,
                path,
                round=round,
                sample_size=sample_size,
                metrics=metrics,
                format=format,
                owner=owner,
                progress=progress,
                credentials=credentials,
                timeout=timeout,
                upload_id=upload_id,
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

        Tensors on a GPU are copied to CPU for serialisation (one at a time);
        ``state_dict`` is not modified. The file is written to a private temporary
        file (the model's size, removed before returning) and streamed from there,
        so the process holds no copy of the whole file in memory.

        Raises:
            SidecarError: ``INVALID_ARGUMENT`` when the weights do not match, and as :meth:`upload`.
            fl_sidecar.errors.TensorMismatchError: a value is not a tensor, or its dtype
                has no safetensors name.
            OSError: the temporary file cannot be written or read.
        """
        from fl_sidecar.modelfiles.torch_io import write_safetensors

        return self._upload_written(
            model_id,
            lambda out: write_safetensors(state_dict, out),
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

        The archive is written by :func:`fl_sidecar.modelfiles.torch_io.write_module`
        (``torch.save``/``torch.jit.save``; GPU tensors are saved as CPU tensors and
        the trainer's module is left untouched) into a private temporary file (the
        model's size, removed before returning) and streamed from there, so the
        process holds no copy of the whole archive in memory.

        Raises:
            SidecarError, ValueError: as :meth:`upload`.
            TypeError: ``module`` is not an ``nn.Module``.
            fl_sidecar.errors.ModelFormatError: torch cannot serialize it.
            OSError: the temporary file cannot be written or read.
        """
        from fl_sidecar.modelfiles.torch_io import write_module

        return self._upload_written(
            model_id,
            lambda out: write_module(module, out),
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
