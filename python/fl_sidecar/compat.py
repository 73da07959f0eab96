"""A drop-in ``Communication`` with the DLR reference client's API, working through the sidecar.

Migrating a trainer written for the reference client (``dlr.fl.client``)
takes one line::

    from dlr.fl.client import Communication        # before
    from fl_sidecar.compat import Communication    # after

Every method keeps its name, signature, return value and exception class
name. The difference is underneath: models travel through the local
fl-sidecar over gRPC (compressed, streamed, with retries), and the trainer's
``http_authorization`` is passed to the sidecar as that call's credentials.

Where the sidecar is: :attr:`Communication.sidecar_target` (a class-level
setting; ``None`` means :func:`fl_sidecar.client.default_target`:
``FL_SIDECAR_SOCKET``, ``FL_SIDECAR_LISTEN``, else the sidecar's default
socket). In compatibility mode the sidecar starts the training script per
round like the reference client does; the script inherits where it listens.

torch is needed for :meth:`Communication.download_model`,
:meth:`~Communication.upload_model`, :meth:`~Communication.pack_model` and
:meth:`~Communication.unpack_model` (through :mod:`fl_sidecar.models`).
"""

from __future__ import annotations

import base64
import logging
import subprocess
import uuid
from types import TracebackType
from typing import Any, ClassVar, Dict, Optional, Type, TypeVar, Union

from fl_sidecar.client import CallCredentials, SidecarClient
from fl_sidecar.errors import SidecarError

__all__ = [
    "Communication",
    "CommunicationException",
    "MetricsUploadException",
    "ModelDownloadException",
    "ModelUploadException",
    "T",
    "is_torchscript_instance",
]

T = TypeVar("T", bound="Communication")

IdLike = Union[uuid.UUID, str]

_TORCHSCRIPT_CLASSES = frozenset({"ScriptModule", "RecursiveScriptModule", "ScriptFunction"})


def is_torchscript_instance(obj: Any) -> bool:
    """Whether ``obj`` is a TorchScript module or function (without importing torch)."""
    return any(
        cls.__name__ in _TORCHSCRIPT_CLASSES
        and cls.__module__.startswith(("torch.jit", "torch._C"))
        for cls in type(obj).__mro__
    )


class CommunicationException(SidecarError):
    """Base class of the reference client's communication errors, raised through the sidecar.

    Attributes:
        code: the gRPC status name of the sidecar's answer (``"NOT_FOUND"``, ...).
        response: always ``None`` (the reference client put the HTTP response
            here; the sidecar owns HTTP now). The sidecar's message is ``str(exc)``.
    """

    def __init__(self, message: str, *, code: str = "UNKNOWN") -> None:
        super().__init__(message, code=code)
        self.response: Any = None


class ModelDownloadException(CommunicationException):
    """Global model download (from the server) failed."""


class ModelUploadException(CommunicationException):
    """Local model upload (to the server) failed."""


class MetricsUploadException(CommunicationException):
    """Global model metrics upload (to the server) failed."""


def _wrap(exc_type: Type[CommunicationException], exc: SidecarError) -> CommunicationException:
    return exc_type(str(exc), code=exc.code)


class Communication:
    """Client communication module: the reference client's ``Communication``, through the sidecar.

    Class-level settings (set them once, before use, e.g. in a test or at startup):

    - :attr:`sidecar_target`: the sidecar's address; ``None`` asks the settings module.
    - :attr:`sidecar_api_token`: the sidecar's API token, when it requires one.
    - :attr:`map_location`: where :meth:`download_model` puts the tensors (``None``: as saved).
    - :attr:`script_executor`, :attr:`script_path`, :attr:`script_working_directory`:
      what :meth:`start_training` and :meth:`start_testing` run (the reference
      client's ``FL_DEMONSTRATOR_TRAINING_SCRIPT_*`` defaults).
    """

    _logger: ClassVar[logging.Logger] = logging.getLogger("fl.client")

    sidecar_target: ClassVar[Optional[str]] = None
    sidecar_api_token: ClassVar[Optional[str]] = None
    map_location: ClassVar[Any] = None
    script_executor: ClassVar[str] = "python"
    script_path: ClassVar[str] = "src/main.py"
    script_working_directory: ClassVar[str] = "."

    def __init__(
        self,
        client_id: IdLike,
        training_id: IdLike,
        round: int,
        model_id: IdLike,
        http_authorization: str,
    ) -> None:
        """Create a communication module for one round of one training.

        Args:
            client_id: UUID of the client.
            training_id: UUID of the training.
            round: number of the training round.
            model_id: UUID of the global model.
            http_authorization: HTTP ``Authorization`` header value for the FL server.
        """
        self.client_id = client_id
        """UUID of the client."""
        self.training_id = training_id
        """UUID of the training."""
        self.round = round
        """Number of the training round."""
        self.model_id = model_id
        """UUID of the global model."""
        self.http_authorization = http_authorization
        """HTTP authorization header value."""
        self._sidecar: Optional[SidecarClient] = None

    def __repr__(self) -> str:
        # Never the authorization value.
        return (
            f"{type(self).__name__}(client_id={self.client_id!s}, "
            f"training_id={self.training_id!s}, round={self.round}, model_id={self.model_id!s})"
        )

    @classmethod
    def from_user_password(
        cls: Type[T],
        client_id: IdLike,
        training_id: IdLike,
        round: int,
        model_id: IdLike,
        username: str,
        password: str,
    ) -> T:
        """Create an instance that authenticates with HTTP Basic ``username``/``password``."""
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        return cls(client_id, training_id, round, model_id, "Basic " + token)

    @classmethod
    def from_http_authorization(
        cls: Type[T],
        client_id: IdLike,
        training_id: IdLike,
        round: int,
        model_id: IdLike,
        http_authorization: str,
    ) -> T:
        """Create an instance from a complete HTTP ``Authorization`` header value."""
        return cls(client_id, training_id, round, model_id, http_authorization)

    # --- the connection to the sidecar ---------------------------------------

    def _client(self) -> SidecarClient:
        if self._sidecar is None:
            self._sidecar = SidecarClient(
                self.sidecar_target,
                api_token=self.sidecar_api_token,
                credentials=CallCredentials.header(self.http_authorization),
            )
        return self._sidecar

    def close(self) -> None:
        """Close the connection to the sidecar (reopened on the next call)."""
        if self._sidecar is not None:
            self._sidecar.close()
            self._sidecar = None

    def __enter__(self: T) -> T:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    # --- notification handlers (the sidecar calls the script itself) -------

    @classmethod
    def _start_script(cls, action: str, training_id: IdLike, round: int, model_id: IdLike) -> None:
        args = [
            cls.script_executor,
            cls.script_path,
            action,
            "--training-id",
            str(training_id),
            "--round",
            str(int(round)),
            "--model-id",
            str(model_id),
        ]
        cls._logger.debug("starting %s", args)
        # Like the reference client: start it and return at once.
        subprocess.Popen(args, cwd=cls.script_working_directory)

    @classmethod
    def start_training(cls, training_id: IdLike, round: int, model_id: IdLike) -> None:
        """Start the training script to train ``round``: ``<executor> <path> train --training-id
        ... --round ... --model-id ...`` in the working directory.

        Raises:
            OSError: the executor cannot be started.
        """
        cls._logger.info("training start")
        cls._start_script("train", training_id, round, model_id)

    @classmethod
    def start_testing(cls, training_id: IdLike, round: int, model_id: IdLike) -> None:
        """Start the training script to test the global model of ``round`` (action ``test``).

        Raises:
            OSError: the executor cannot be started.
        """
        cls._logger.info("testing start")
        cls._start_script("test", training_id, round, model_id)

    @classmethod
    def init_training(cls, training_id: IdLike, model_id: IdLike) -> None:
        """Handle the start of a training (nothing to prepare; logged)."""
        cls._logger.info("training init: %s", training_id)

    @classmethod
    def end_training(cls, training_id: IdLike, model_id: IdLike) -> None:
        """Handle the end of a training (clean-up hook; logged)."""
        cls._logger.info("training end: %s", training_id)

    @classmethod
    def unknown_message(cls, message_type: str, training_id: IdLike, data: Any) -> int:
        """Handle a notification of an unknown type; returns the HTTP status to answer (400)."""
        cls._logger.warning("unknown server message of type %r ignored", message_type)
        return 400

    # --- client calls ---------------------------------------------------------

    def download_model(self) -> Any:
        """Download the global model and load it in this process.

        Unlike the reference client, this works on torch 2.6 and later: there
        ``torch.load`` defaults to ``weights_only=True``, which refuses the
        pickled ``nn.Module`` the server stores (the reference client's
        training script then dies and the training hangs). The model is
        unpickled here, in the trainer's process where its classes live, as
        the reference intends (``weights_only=False``, or ``torch.jit.load``
        for TorchScript): this runs code from the server, so use it only with
        a server you trust. :attr:`map_location` places the tensors.

        Raises:
            ModelDownloadException: the sidecar or the server failed, or the
                bytes are not a loadable model (``code`` says why).
        """
        self._logger.info("model download")
        try:
            blob = self._client().download(str(self.model_id), format="torch")
        except SidecarError as exc:
            raise _wrap(ModelDownloadException, exc) from exc
        try:
            return self.unpack_model(blob)
        except Exception as exc:
            raise ModelDownloadException(
                f"the downloaded model {self.model_id} cannot be loaded: {exc}",
                code="INVALID_ARGUMENT",
            ) from exc

    def upload_model(self, model: Any, metrics: Dict[str, Any], sample_size: int) -> bool:
        """Upload the local model with its metrics and sample size for this round.

        GPU tensors are saved as CPU tensors (the trainer's model is not
        changed). Returns ``True`` on success.

        Raises:
            ModelUploadException: the upload failed (``code`` ``UNKNOWN`` means it
                may have arrived: do not resend blindly).
        """
        self._logger.info("model upload")
        try:
            blob = self.pack_model(model)
            self._client().upload(
                str(self.model_id),
                blob,
                round=int(self.round),
                sample_size=int(sample_size),
                metrics={name: float(value) for name, value in metrics.items()},
                format="torch",
                owner=str(self.client_id),
            )
        except SidecarError as exc:
            raise _wrap(ModelUploadException, exc) from exc
        except (TypeError, ValueError) as exc:
            raise ModelUploadException(str(exc), code="INVALID_ARGUMENT") from exc
        return True

    def upload_metrics(self, metrics: Dict[str, Any]) -> bool:
        """Upload test metrics of the global model; returns ``True`` on success.

        Raises:
            MetricsUploadException: the upload failed or a value is not a number.
        """
        self._logger.info("metrics upload")
        try:
            self._client().upload_metrics(
                str(self.model_id),
                {name: float(value) for name, value in metrics.items()},
                owner=str(self.client_id),
            )
        except SidecarError as exc:
            raise _wrap(MetricsUploadException, exc) from exc
        except (TypeError, ValueError) as exc:
            raise MetricsUploadException(str(exc), code="INVALID_ARGUMENT") from exc
        return True

    # --- helpers --------------------------------------------------------------

    def get_headers(self) -> Dict[str, str]:
        """The HTTP headers the reference client sends: ``{"Authorization": ...}``."""
        return {"Authorization": self.http_authorization}

    def unpack_model(self, blob: bytes) -> Any:
        """Load a model from torch bytes (pickled module or TorchScript), trusting them.

        Raises:
            fl_sidecar.errors.ModelError: the bytes are not a torch model.
        """
        import fl_sidecar.models as models

        return models.load_trusted(blob, map_location=self.map_location)

    def pack_model(self, model: Any) -> bytes:
        """Serialise a module (``torch.save``, or ``torch.jit.save`` for TorchScript) to bytes.

        GPU tensors are written as CPU tensors; ``model`` is not modified.
        """
        import fl_sidecar.models as models

        data: bytes = models.dump_module(model)
        return data
