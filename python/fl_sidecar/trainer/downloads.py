"""Model downloads of the trainer's client: into memory, into a file, as tensors or a module.

The sidecar fetches the model from the FL server, vets or converts it, then
streams a ``ModelInfo`` and the model's bytes in chunks; this part checks the
size and (unless ``verify=False``) the sha256 of what arrives.

The tensor and module downloads never hold the whole file in memory: the chunks go
into a private temporary file (``tempfile``'s directory, ``TMPDIR``; mode 0600),
the tensors are read from it into their own memory, and the file is removed before
the call returns, whether it succeeded or not. The trainer's memory then grows by
about the tensors alone, not by the file as well.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

from fl_sidecar.errors import SidecarError
from fl_sidecar.trainer.connection import SidecarConnection
from fl_sidecar.trainer.credentials import CallCredentials
from fl_sidecar.trainer.results import DownloadResult
from fl_sidecar.trainer.streams import (
    PathLike,
    ProgressCallback,
    format_value,
    private_file,
    write_atomically,
)
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.wire import format_name

if TYPE_CHECKING:
    import torch

__all__ = ["ModelDownloads"]


class ModelDownloads(SidecarConnection):
    """The download calls of :class:`~fl_sidecar.trainer.client.SidecarClient`."""

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
        # A failed call raises a typed SidecarError while reading (the interceptor's).
        call = self._stub.DownloadModel(request, timeout=timeout)
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

    @contextlib.contextmanager
    def _downloaded_file(
        self,
        model_id: str,
        fmt: int,
        *,
        progress: Optional[ProgressCallback],
        credentials: Optional[CallCredentials],
        timeout: Optional[float],
    ) -> Iterator[str]:
        """The model downloaded into a private temporary file, removed on leaving.

        A stream that ends in an error yields nothing: the file is removed and the
        error raised, so what was received is never loaded.
        """
        with private_file("download") as path:
            with open(path, "wb") as out:
                self._download_stream(
                    model_id,
                    fmt,
                    out.write,
                    progress=progress,
                    credentials=credentials,
                    timeout=timeout,
                )
            yield path

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
            format_value(format),
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
        fmt = format_value(format)
        return write_atomically(
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

        ``device`` (e.g. ``"cuda:0"``) moves the tensors there; default CPU. The
        stream goes into a private temporary file (the size of the model, removed
        before returning) and each tensor is read from it into its own memory, so
        the process grows by about the tensors' size, not twice that. With
        ``device``, each CPU tensor is dropped once it is moved.

        Raises:
            SidecarError: as :meth:`download_with_info`.
            fl_sidecar.errors.ModelError: the bytes are not valid safetensors.
            OSError: the temporary file cannot be written or read.
        """
        import fl_sidecar.models as models

        with self._downloaded_file(
            model_id,
            format_value("safetensors"),
            progress=progress,
            credentials=credentials,
            timeout=timeout,
        ) as path:
            tensors = models.from_safetensors(path)
        if device is None:
            return tensors
        moved: Dict[str, torch.Tensor] = {}
        for name in list(tensors):
            moved[name] = tensors.pop(name).to(device)
        return moved

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

        The stream goes into a private temporary file (the size of the model,
        removed before returning); :func:`fl_sidecar.models.load_trusted` opens it
        once, checks that open file and loads from it, so the process grows by
        about the module's tensors, not by the file as well.

        Raises:
            SidecarError: as :meth:`download_with_info`.
            fl_sidecar.errors.ModelError: the bytes are not a torch model.
            OSError: the temporary file cannot be written or read.
        """
        import fl_sidecar.models as models

        with self._downloaded_file(
            model_id,
            format_value("torch"),
            progress=progress,
            credentials=credentials,
            timeout=timeout,
        ) as path:
            return models.load_trusted(path, map_location=map_location)
