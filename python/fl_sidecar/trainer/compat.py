"""A drop-in ``Communication`` with the DLR reference client's API, working through the sidecar.

Migrating a trainer written for the reference client (``dlr.fl.client``)
takes one line::

    from dlr.fl.client import Communication        # before
    from fl_sidecar.compat import Communication    # after

Every method keeps its name, signature, return value and exception class
name, the exceptions carry the FL server's answer as ``e.response``
(``status_code``, ``text``, ``json()``, ...), metric values go to the server
as the reference posts them (``str()`` of each), and :class:`Settings` has the
reference's fields. The difference is underneath: models travel through the
local fl-sidecar over gRPC (compressed, streamed, with retries), and the
trainer's ``http_authorization`` is passed to the sidecar as that call's
credentials.

Where the sidecar is: :attr:`Communication.sidecar_target` (a class-level
setting; ``None`` means :func:`fl_sidecar.address.default_target`:
``FL_SIDECAR_SOCKET``, ``FL_SIDECAR_LISTEN``, else the sidecar's default
socket). In compatibility mode the sidecar starts the training script per
round like the reference client does; the script inherits where it listens.

torch is needed for :meth:`Communication.download_model`,
:meth:`~Communication.upload_model`, :meth:`~Communication.pack_model` and
:meth:`~Communication.unpack_model` (through :mod:`fl_sidecar.models`).
"""

from __future__ import annotations

import base64
import contextlib
import http
import json
import logging
import subprocess
import uuid
from types import TracebackType
from typing import (
    Any,
    ClassVar,
    Dict,
    Iterator,
    Mapping,
    Optional,
    Tuple,
    Type,
    TypeVar,
    Union,
)

from fl_sidecar import config
from fl_sidecar.errors import ConfigurationError, SidecarError
from fl_sidecar.trainer.client import CallCredentials, SidecarClient

__all__ = [
    "Communication",
    "CommunicationException",
    "MetricsUploadException",
    "ModelDownloadException",
    "ModelUploadException",
    "ServerResponse",
    "Settings",
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


_E = TypeVar("_E", bound="CommunicationException")

# Read once, at import, as the reference client reads its settings.
_REFERENCE_ENVIRONMENT = config.reference_client_environment()


def _port(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        # The reference fails at import with a bare ValueError; this one names the variable.
        raise ConfigurationError(
            f"FL_CLIENT_SERVER_PORT must be an integer, not {value[:40]!r}"
        ) from None


class Settings:
    """The reference client's ``Settings``: the same names, variables and defaults.

    Read from the environment once, when this module is imported, as the
    reference does; assign an attribute to change it for this process. What
    each one does here:

    - ``FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR`` (``python``),
      ``FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH`` (``src/main.py``),
      ``FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY`` (``.``; the reference's
      spelling): what :meth:`Communication.start_training` and
      :meth:`~Communication.start_testing` run, read at each call.
    - ``FL_DEMONSTRATOR_BASE_URL`` (``http://localhost:8000``), ``SERVER_HOST``
      (``FL_CLIENT_SERVER_HOST``, ``0.0.0.0``) and ``SERVER_PORT``
      (``FL_CLIENT_SERVER_PORT``, ``8101``): for reading only. The sidecar
      talks to the FL server and receives its notifications, so its own
      settings (the same variables, or ``--server-url`` and
      ``--notification-port``) decide.
    - ``MAIN_MODULE``, ``COMMUNICATION_MODULE``: dotted paths of the entry point
      (the sidecar's CLI) and of :class:`Communication`. The reference's
      ``FL_CLIENT_SETTINGS_MODULE`` (a replacement settings class) is not
      read: subclass :class:`Communication` or assign these attributes instead.

    Raises (at import):
        fl_sidecar.errors.ConfigurationError: ``FL_CLIENT_SERVER_PORT`` is not an integer.
    """

    FL_DEMONSTRATOR_BASE_URL: ClassVar[str] = _REFERENCE_ENVIRONMENT["FL_DEMONSTRATOR_BASE_URL"]
    """Base URL of the FL server (informational here: the sidecar's own setting decides)."""
    FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR: ClassVar[str] = _REFERENCE_ENVIRONMENT[
        "FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR"
    ]
    """The program that runs the training script."""
    FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH: ClassVar[str] = _REFERENCE_ENVIRONMENT[
        "FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH"
    ]
    """The training script."""
    FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY: ClassVar[str] = _REFERENCE_ENVIRONMENT[
        "FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY"
    ]
    """The training script's working directory (the reference's spelling)."""
    SERVER_HOST: ClassVar[str] = _REFERENCE_ENVIRONMENT["FL_CLIENT_SERVER_HOST"]
    """Host of the notification endpoint (informational: the sidecar serves it)."""
    SERVER_PORT: ClassVar[int] = _port(_REFERENCE_ENVIRONMENT["FL_CLIENT_SERVER_PORT"])
    """Port of the notification endpoint (informational: the sidecar serves it)."""
    MAIN_MODULE: ClassVar[str] = "fl_sidecar.cli.main"
    """The client's entry point: the sidecar (``fl-sidecar serve``)."""
    COMMUNICATION_MODULE: ClassVar[str] = "fl_sidecar.compat.Communication"
    """The communication class."""


class _Headers(Mapping[str, str]):
    """Read-only headers with case-insensitive names, like ``requests``' headers."""

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items: Dict[str, Tuple[str, str]] = {k.lower(): (k, v) for k, v in items.items()}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (original for original, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return repr(dict(self.items()))


class ServerResponse:
    """The FL server's answer behind a failed call, where the reference had its HTTP response.

    It has the parts of a ``requests.Response`` that error handlers read. The
    sidecar passes on the server's real status and body (at most 4 KiB, with
    credentials redacted). When the server gave no answer (the sidecar itself
    refused the call, or could not reach the server), ``status_code`` is
    ``None`` and the body is empty, so ``e.response.status_code`` never fails.

    Attributes:
        status_code: the HTTP status, e.g. ``400``, or ``None`` without an answer.
        reason: its reason phrase, e.g. ``"Bad Request"`` (``""`` when unknown).
        text: the body as text, e.g. ``'{"detail":"Model ... not found."}'``.
        content: the body as UTF-8 bytes.
        headers: ``Content-Type`` when the server sent one (names case-insensitive).
        encoding: always ``"utf-8"``.
        url: always ``None`` (the sidecar knows the server's URL; ``fl-sidecar info`` shows it).
    """

    def __init__(
        self,
        status_code: Optional[int],
        text: str = "",
        *,
        content_type: Optional[str] = None,
    ) -> None:
        self.status_code = status_code
        self.text = text
        self.content = text.encode("utf-8")
        self.encoding = "utf-8"
        self.headers: Mapping[str, str] = _Headers(
            {"Content-Type": content_type} if content_type else {}
        )
        self.url: Optional[str] = None
        self.reason = ""
        if status_code is not None:
            with contextlib.suppress(ValueError):  # a status Python has no phrase for
                self.reason = http.HTTPStatus(status_code).phrase

    @property
    def ok(self) -> bool:
        """Whether the status is below 400 (``False`` without an answer)."""
        return self.status_code is not None and self.status_code < 400

    def json(self, **kwargs: Any) -> Any:
        """The body parsed as JSON (``kwargs`` go to :func:`json.loads`).

        Raises:
            json.JSONDecodeError: a ``ValueError``; the body is not JSON (or empty).
        """
        return json.loads(self.text, **kwargs)

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return f"<ServerResponse [{self.status_code}]>"


class CommunicationException(SidecarError):
    """Base class of the reference client's communication errors, raised through the sidecar.

    Constructed like the reference's, from a response: a :class:`ServerResponse`,
    anything shaped like a ``requests.Response`` (kept as it is), or a message
    string (then ``response`` says that no answer came). The message of one
    raised here is the sidecar's, which quotes the server's own text.

    Attributes:
        response: the FL server's answer (:class:`ServerResponse`): ``status_code``,
            ``text``, ``json()``, ``content``, ``reason``, ``headers``.
        code: the gRPC status name of the sidecar's answer (``"NOT_FOUND"``, ...).
        error_class, http_status, http_body: as :class:`fl_sidecar.errors.SidecarError`.
    """

    def __init__(self, response: Any, *args: Any, code: str = "UNKNOWN") -> None:
        if isinstance(response, str):
            message, response = response, ServerResponse(None)
        else:
            message = _reference_message(response)
        status = getattr(response, "status_code", None)
        body = getattr(response, "text", None)
        super().__init__(
            message,
            code=code,
            http_status=status if isinstance(status, int) else None,
            http_body=body if isinstance(body, str) and body else None,
        )
        self.args = (message, *args)
        self.response: Any = response

    @classmethod
    def _from_sidecar(cls: Type[_E], error: SidecarError) -> _E:
        """The exception for a failed sidecar call: its message, code and the server's answer."""
        exc = cls(str(error), code=error.code)
        exc.response = ServerResponse(
            error.http_status, error.http_body or "", content_type=error.http_content_type
        )
        exc.error_class = error.error_class
        exc.http_status = error.http_status
        exc.http_body = error.http_body
        exc.http_content_type = error.http_content_type
        return exc


class ModelDownloadException(CommunicationException):
    """Global model download (from the server) failed."""


class ModelUploadException(CommunicationException):
    """Local model upload (to the server) failed."""


class MetricsUploadException(CommunicationException):
    """Global model metrics upload (to the server) failed."""


def _reference_message(response: Any) -> str:
    # The reference's rule: the body's JSON "message" field, else the whole body.
    text = getattr(response, "text", None)
    if not isinstance(text, str):
        return "the FL server's answer could not be read"
    try:
        data = json.loads(text)
    except ValueError:
        return text
    message = data.get("message") if isinstance(data, dict) else None
    return message if isinstance(message, str) else text


def _metric_texts(metrics: Mapping[Any, Any]) -> Dict[str, str]:
    """Metrics as the reference client posts them: ``str()`` of each name and value.

    Raises:
        ValueError: a value is ``None`` (the reference drops it, so its names and
            values no longer pair up), or bytes that are not UTF-8.
    """
    texts: Dict[str, str] = {}
    for name, value in metrics.items():
        if value is None:
            raise ValueError(f"metric {str(name)!r} has no value (None)")
        if isinstance(value, (bytes, bytearray)):
            try:
                texts[str(name)] = bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"metric {str(name)!r}: bytes that are not UTF-8 text") from None
        else:
            texts[str(name)] = str(value)
    return texts


class Communication:
    """Client communication module: the reference client's ``Communication``, through the sidecar.

    Class-level settings (set them once, before use, e.g. in a test or at startup):

    - :attr:`sidecar_target`: the sidecar's address; ``None`` means
      :func:`fl_sidecar.address.default_target`.
    - :attr:`sidecar_api_token`: the sidecar's API token, when it requires one.
    - :attr:`map_location`: where :meth:`download_model` puts the tensors (``None``: as saved).
    - :attr:`script_executor`, :attr:`script_path`, :attr:`script_working_directory`:
      what :meth:`start_training` and :meth:`start_testing` run; ``None`` (the
      default) means :class:`Settings`' ``FL_DEMONSTRATOR_TRAINING_*`` values.
    """

    _logger: ClassVar[logging.Logger] = logging.getLogger("fl.client")

    sidecar_target: ClassVar[Optional[str]] = None
    sidecar_api_token: ClassVar[Optional[str]] = None
    map_location: ClassVar[Any] = None
    script_executor: ClassVar[Optional[str]] = None
    script_path: ClassVar[Optional[str]] = None
    script_working_directory: ClassVar[Optional[str]] = None

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
            cls.script_executor or Settings.FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR,
            cls.script_path or Settings.FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH,
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
        working_directory = (
            cls.script_working_directory or Settings.FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY
        )
        subprocess.Popen(args, cwd=working_directory)

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

        The model streams into a private temporary file (removed before this
        returns) and loads from there, so the process grows by about the
        model's tensors, where the reference client holds the whole file as well.
        A subclass that overrides :meth:`unpack_model` gets the bytes instead.

        Raises:
            ModelDownloadException: the sidecar or the server failed, or the
                bytes are not a loadable model (``code`` says why;
                ``response.status_code``/``response.text`` are the server's answer).
        """
        self._logger.info("model download")
        try:
            if type(self).unpack_model is not Communication.unpack_model:
                # A subclass that unpacks its own way gets the bytes, as the reference hands them.
                blob = self._client().download(str(self.model_id), format="torch")
                return self.unpack_model(blob)
            return self._client().download_module(
                str(self.model_id), map_location=self.map_location
            )
        except SidecarError as exc:
            raise ModelDownloadException._from_sidecar(exc) from exc
        except Exception as exc:
            raise ModelDownloadException(
                f"the downloaded model {self.model_id} cannot be loaded: {exc}",
                code="INVALID_ARGUMENT",
            ) from exc

    def upload_model(self, model: Any, metrics: Dict[str, Any], sample_size: int) -> bool:
        """Upload the local model with its metrics and sample size for this round.

        GPU tensors are saved as CPU tensors (the trainer's model is not
        changed). The archive is written to a private temporary file and streamed
        from there (removed before this returns), never held in memory whole
        (a subclass that overrides :meth:`pack_model` sends its bytes instead).
        Metric values go to the server as ``str(value)``, as the reference
        client posts them (``"abc"``, ``1``, ``0.5``, ``True``).
        Returns ``True`` on success.

        Raises:
            ModelUploadException: the upload failed (``code`` ``UNKNOWN`` means it
                may have arrived: do not resend blindly; ``response`` is the
                server's answer), a metric value is ``None`` or the model is not a
                module (``INVALID_ARGUMENT``), or the temporary file cannot be
                written (``RESOURCE_EXHAUSTED``; nothing was sent).
        """
        self._logger.info("model upload")
        try:
            texts = _metric_texts(metrics)
            if type(self).pack_model is not Communication.pack_model:
                # A subclass that packs its own way sends its bytes, as with the reference.
                self._client().upload(
                    str(self.model_id),
                    self.pack_model(model),
                    round=int(self.round),
                    sample_size=int(sample_size),
                    metrics=texts,
                    format="torch",
                    owner=str(self.client_id),
                )
            else:
                self._client().upload_module(
                    str(self.model_id),
                    model,
                    round=int(self.round),
                    sample_size=int(sample_size),
                    metrics=texts,
                    owner=str(self.client_id),
                )
        except SidecarError as exc:
            raise ModelUploadException._from_sidecar(exc) from exc
        except (TypeError, ValueError) as exc:
            raise ModelUploadException(str(exc), code="INVALID_ARGUMENT") from exc
        except OSError as exc:
            raise ModelUploadException(
                f"the model cannot be staged for upload: {exc}", code="RESOURCE_EXHAUSTED"
            ) from exc
        return True

    def upload_metrics(self, metrics: Dict[str, Any]) -> bool:
        """Upload test metrics of the global model; returns ``True`` on success.

        Values go to the server as ``str(value)``, as the reference client posts them.

        Raises:
            MetricsUploadException: the upload failed (``response`` is the server's
                answer), or a value is ``None``.
        """
        self._logger.info("metrics upload")
        try:
            self._client().upload_metrics(
                str(self.model_id),
                _metric_texts(metrics),
                owner=str(self.client_id),
            )
        except SidecarError as exc:
            raise MetricsUploadException._from_sidecar(exc) from exc
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
