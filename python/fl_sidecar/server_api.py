"""The FL Demonstrator REST client: the one module of fl-sidecar that speaks HTTP.

Every call of the DLR FL Demonstrator server (see ``docs/protocol.md``) through one
keep-alive :class:`requests.Session`, with:

- timeouts on every request (``connect_timeout`` to connect, ``timeout`` between
  two bytes of the answer);
- retries with exponential backoff and jitter on connection errors, timeouts and
  502/503/504 for requests that are safe to repeat (GET, PUT of the
  participants); a request that changes the server's state (uploads, metrics,
  creations, start) is resent only when it certainly never reached the server
  (connection refused, name resolution failed, connect timeout), because the
  real server counts a duplicate upload. When its outcome is unknown,
  :class:`~fl_sidecar.errors.UploadOutcomeUnknownError` says so;
- the server's answers mapped onto :mod:`fl_sidecar.errors`, each carrying the
  HTTP status, the server's own message and the operation;
- content-coding negotiation (RFC 9110 section 12.5.3): downloads ask for
  ``Accept-Encoding: zstd`` and decode a zstd body with our codec's streaming
  decoder as it arrives (urllib3 decodes nothing: the raw stream is read);
  uploads are packed with ``Content-Encoding: zstd`` only for a server that
  advertised ``zstd`` in an ``Accept-Encoding`` response header, and fall back
  to identity for good after a 415. The coding applies to the whole
  ``multipart/form-data`` body (that is what an HTTP content coding is: the
  representation is encoded, its media type stays the same);
- streaming both ways: uploads are sent from a file (packed bodies from a temp
  file) with a known ``Content-Length``; downloads are written to a temp file
  beside the destination and renamed into place. No whole model is ever held
  in memory;
- cancellation (:class:`fl_sidecar.cancel.Cancellation`): model transfers stop
  between chunks, and a read or write blocked on a stalled peer is broken by
  shutting the request's socket down. An upload cancelled before its body's
  last byte was handed to the socket certainly did not arrive
  (:class:`~fl_sidecar.errors.TransferCancelledError`); after it, its outcome
  is unknown (:class:`~fl_sidecar.errors.UploadOutcomeUnknownError`).

Credentials never appear in logs, reprs or exception messages.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import os
import random
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)
from urllib.parse import quote, urlsplit

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions

from fl_sidecar import redaction
from fl_sidecar.cancel import Cancellation
from fl_sidecar.errors import (
    AuthenticationError,
    ConfigurationError,
    ConflictError,
    ModelError,
    NotFoundError,
    PermissionDeniedError,
    RequestRejectedError,
    ServerError,
    ServerUnavailableError,
    SizeLimitExceededError,
    TransferCancelledError,
    TruncatedDataError,
    UploadOutcomeUnknownError,
)

__all__ = [
    "COMPRESSION_MODES",
    "DEFAULT_MAX_DOWNLOAD_SIZE",
    "Credentials",
    "FlServerClient",
    "MetricValue",
    "ProgressCallback",
    "TransferResult",
]

_log = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[int, Optional[int]], None]
"""``progress(bytes_done, bytes_total_or_None)``: bytes on the wire for this transfer."""
MetricValue = Union[float, str]
"""A metric's value: a number (posted as its shortest round-trip form) or text (posted as is)."""

COMPRESSION_MODES = ("auto", "never", "always")
DEFAULT_MAX_DOWNLOAD_SIZE = 4 * 1024**3
"""Largest decoded download accepted by default, in bytes (4 GiB).

A zstd body can hide a bomb: what it decodes to is written to disk until this
limit stops it, so the default is what one model may reasonably be, not what
the disk holds.
"""

_SAMPLE_SIZE = 256 * 1024  # bytes per sample when estimating an upload's compressibility
_DECODE_STEP = 4 * 1024 * 1024  # most bytes one decoding step may return (bombs)
_PACK_READ = 8 * 1024 * 1024  # bytes per read when packing: the codec's threads get work
_IO_CHUNK = 1024 * 1024  # bytes per read/write/send; big enough that syscalls are cheap
_ERROR_BODY_LIMIT = 64 * 1024  # an error answer is read at most this far (bytes)
_JSON_LIMIT = 16 * 1024 * 1024  # bytes; a longer JSON answer means a broken or hostile server
_MAX_BACKOFF = 30.0  # seconds; caps exponential backoff and Retry-After
_RETRY_STATUSES = frozenset({502, 503, 504})
_USER_AGENT = "fl-sidecar/0.1"

T = TypeVar("T")
BodyCallback = Callable[[], None]
"""Called once, just before the last byte of an upload's body is handed to the socket."""


# --- cancellation of requests in flight --------------------------------------

# The Cancellation of the request this thread is making: the connection classes
# below attach their socket to it, so that cancelling breaks a blocked read or write.
_scope = threading.local()


def _attach_to_current(sock: Any) -> None:
    cancel: Optional[Cancellation] = getattr(_scope, "cancel", None)
    if cancel is not None and sock is not None:
        cancel.attach(sock)


@contextlib.contextmanager
def _cancel_scope(cancel: Optional[Cancellation]) -> Iterator[None]:
    previous = getattr(_scope, "cancel", None)
    _scope.cancel = cancel
    try:
        yield
    finally:
        _scope.cancel = previous


class _CancellableHTTPConnection(urllib3.connection.HTTPConnection):
    def connect(self) -> None:
        super().connect()
        _attach_to_current(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        # A kept-alive connection is already connected: attach it for this request.
        _attach_to_current(self.sock)
        super().request(*args, **kwargs)


class _CancellableHTTPSConnection(urllib3.connection.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        _attach_to_current(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach_to_current(self.sock)
        super().request(*args, **kwargs)


class _CancellableHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _CancellableHTTPConnection


class _CancellableHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _CancellableHTTPSConnection


_POOL_CLASSES = {"http": _CancellableHTTPPool, "https": _CancellableHTTPSPool}


class _CancellableAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections can be shut down by a :class:`Cancellation`."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager


def _cancelled(cancel: Cancellation, operation: str, what: str) -> TransferCancelledError:
    return TransferCancelledError(
        f"{operation}: {cancel.reason or 'cancelled'}; {what}",
        shutting_down=cancel.shutting_down,
    )


# --- credentials -----------------------------------------------------------


class Credentials:
    """An ``Authorization`` header value, kept out of every repr, str and log line.

    Build one with :meth:`basic`, :meth:`token` or :meth:`from_header`. A token
    is cheaper for the server (Basic costs it about 0.25 s per request).
    """

    __slots__ = ("_header", "_scheme")

    def __init__(self, header: str) -> None:
        """Wrap a complete ``Authorization`` header value; prefer the class methods.

        Raises:
            ConfigurationError: the value is empty or holds a line break.
        """
        value = header.strip()
        if not value or any(c in value for c in "\r\n\0"):
            raise ConfigurationError("invalid Authorization header value (empty or multi-line)")
        # Known to the redaction from now on, in every form (base64, user:password, ...).
        redaction.register_header(value)
        self._header = value
        self._scheme = value.split(None, 1)[0].lower()

    @classmethod
    def basic(cls, username: str, password: str) -> Credentials:
        """HTTP Basic credentials (what the reference client sends).

        Raises:
            ConfigurationError: the username is empty or contains ``:``.
        """
        if not username or ":" in username:
            raise ConfigurationError("a Basic username must be non-empty and contain no ':'")
        raw = f"{username}:{password}".encode()
        return cls("Basic " + base64.b64encode(raw).decode("ascii"))

    @classmethod
    def token(cls, token: str) -> Credentials:
        """DRF token credentials (``Authorization: Token <token>``).

        Raises:
            ConfigurationError: the token is empty or contains whitespace.
        """
        if not token or any(c.isspace() for c in token):
            raise ConfigurationError("a token must be non-empty and contain no whitespace")
        return cls("Token " + token)

    @classmethod
    def from_header(cls, value: str) -> Credentials:
        """Credentials from a complete ``Authorization`` header value, e.g. ``"Basic dXM6cHc="``.

        This is what the reference client's ``from_http_authorization`` takes.

        Raises:
            ConfigurationError: the value is empty, has no scheme and parameter,
                or holds a line break.
        """
        creds = cls(value)
        if len(creds._header.split(None, 1)) != 2:
            raise ConfigurationError("an Authorization header value needs a scheme and a value")
        if creds._scheme == "basic":
            try:
                base64.b64decode(creds._header.split(None, 1)[1], validate=True)
            except (binascii.Error, ValueError):
                raise ConfigurationError("a Basic Authorization value is not base64") from None
        return creds

    @property
    def scheme(self) -> str:
        """The lower-case authentication scheme, e.g. ``"basic"`` or ``"token"``."""
        return self._scheme

    def header(self) -> str:
        """The ``Authorization`` header value (a secret: do not log it)."""
        return self._header

    def __repr__(self) -> str:
        return f"Credentials(scheme={self._scheme!r}, value=<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credentials):
            return NotImplemented
        return self._header == other._header

    def __hash__(self) -> int:
        return hash(self._header)

    def __reduce__(self) -> Any:
        # Pickling would copy the secret into places we cannot see (process pools, caches).
        raise TypeError("Credentials cannot be pickled")


# --- results ---------------------------------------------------------------


@dataclass
class TransferResult:
    """What one call moved.

    Attributes:
        status: the HTTP status of the final answer.
        detail: the server's message (``detail`` field), or ``""``.
        raw_bytes: bytes of the model (or request body) before any content coding.
        wire_bytes: bytes of the body as they crossed the network.
        content_encoding: ``"zstd"`` or ``"identity"``: the coding on the wire.
        seconds: wall time of the whole call, retries included.
        sha256: hex SHA-256 of the raw model bytes (``""`` for metrics).
        response: the server's JSON answer (empty when it sent none).
    """

    status: int
    detail: str
    raw_bytes: int
    wire_bytes: int
    content_encoding: str
    seconds: float
    sha256: str
    response: Optional[Dict[str, Any]] = None


# --- internal helpers ------------------------------------------------------


class _Retryable(Exception):
    """One attempt failed in a way that is safe to repeat."""

    def __init__(self, error: ServerError, retry_after: Optional[float] = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


def _certainly_not_sent(exc: BaseException) -> bool:
    """True when the request never left this machine: no connection was made."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    reason: Optional[BaseException] = None
    if isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        first = exc.args[0]
        reason = getattr(first, "reason", first if isinstance(first, BaseException) else None)
    # NewConnectionError covers refused connections and failed name resolution.
    return isinstance(
        reason, (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError)
    )


def _describe(exc: BaseException) -> str:
    """A short reason for a transport error. URLs carry no credentials (userinfo is refused)."""
    reason: BaseException = exc
    if exc.args and isinstance(exc.args[0], urllib3.exceptions.MaxRetryError):
        inner = exc.args[0].reason
        if inner is not None:
            reason = inner
    text = redaction.redact(str(reason))
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(reason).__name__}: {text}"


def _parse_detail(body: bytes, content_type: str, *, truncated: bool = False) -> str:
    """The server's message from an error body: ``{"detail": ...}`` or a list of strings.

    Redacted before it is parsed or cut, so that no cut leaves a secret's beginning.
    ``truncated``: the body was read only up to a limit.
    """
    text = redaction.redact(body.decode("utf-8", "replace"), truncated=truncated).strip()
    if "json" in content_type.lower() or text[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        # The JSON decoded from redacted text can hold a secret again (\u escapes).
        if isinstance(data, dict):
            if "detail" in data:
                return redaction.redact(str(data["detail"]))
            return redaction.redact("; ".join(f"{k}: {v}" for k, v in data.items()))
        if isinstance(data, list):
            return redaction.redact("; ".join(str(item) for item in data))
    return text[:500]


def _map_error(
    status: int,
    detail: str,
    operation: str,
    body: Optional[str] = None,
    content_type: Optional[str] = None,
) -> ServerError:
    """The typed error for a non-2xx answer of the DLR server (it says "not found" with 400)."""
    message = (
        f"{operation} failed: HTTP {status}: {detail}"
        if detail
        else f"{operation} failed: HTTP {status}"
    )
    lowered = detail.lower()
    cls: type[ServerError]
    if status == 401:
        cls = AuthenticationError
    elif status == 403:
        cls = PermissionDeniedError
    elif status in (404, 410) or (status == 400 and "not found" in lowered):
        cls = NotFoundError
    elif status == 409 or (
        status == 400
        and (
            "not currently in round" in lowered
            or "is in state" in lowered
            or "is testing round" in lowered
            or "not in state" in lowered
            # The model exists, but no training uses it: the upload's precondition.
            or "not used by any training" in lowered
        )
    ):
        cls = ConflictError
    elif 400 <= status < 500:
        cls = RequestRejectedError
    else:
        cls = ServerUnavailableError
    return cls(
        message,
        status=status,
        detail=detail,
        operation=operation,
        body=body,
        content_type=content_type,
    )


def _parse_codings(value: str) -> Dict[str, float]:
    """``Accept-Encoding``-style list -> {coding: qvalue}."""
    out: Dict[str, float] = {}
    for item in value.split(","):
        parts = [p.strip() for p in item.split(";")]
        name = parts[0].lower()
        if not name:
            continue
        q = 1.0
        for param in parts[1:]:
            if param.lower().startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        out[name] = q
    return out


def _retry_after(resp: requests.Response) -> Optional[float]:
    value = resp.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    return None


def _codec() -> ModuleType:
    """The codec module, imported on first use (a native extension; JSON calls need none)."""
    from fl_sidecar import codec

    return codec


def _codec_available() -> bool:
    try:
        _codec()
    except ImportError:
        return False
    return True


class _FileSlice:
    """Reads exactly ``size`` bytes of a file in chunks; fails if the file shrank."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def chunks(self, block_size: int = _IO_CHUNK) -> Iterator[bytes]:
        remaining = self.size
        with open(self.path, "rb") as fh:
            while remaining > 0:
                block = fh.read(min(block_size, remaining))
                if not block:
                    raise ModelError(
                        f"{self.path.name} shrank while being sent ({self.size - remaining} of "
                        f"{self.size} bytes)"
                    )
                remaining -= len(block)
                yield block


class _StreamBody:
    """A request body with a known length, sent in 1 MiB chunks, reporting progress.

    requests sends an object with ``__iter__`` and ``__len__`` as a stream with a
    ``Content-Length`` header, and urllib3 sends each chunk as it comes.

    Cancelling stops it between chunks, and always before the last chunk: a
    body whose last byte was never handed to the socket cannot be a complete
    request on the server's side. ``complete`` says whether that point was
    passed (``on_complete`` runs just before, e.g. to record it durably).
    """

    def __init__(
        self,
        parts: Sequence[Union[bytes, _FileSlice]],
        progress: Optional[ProgressCallback] = None,
        on_file_block: Optional[Callable[[bytes], None]] = None,
        *,
        cancel: Optional[Cancellation] = None,
        on_complete: Optional[BodyCallback] = None,
        operation: str = "upload",
    ) -> None:
        self._parts = parts
        self._progress = progress
        self._on_file_block = on_file_block
        self._cancel = cancel
        self._on_complete = on_complete
        self._operation = operation
        self.sent = 0
        self.started = False
        self.complete = False
        self.length = sum(p.size if isinstance(p, _FileSlice) else len(p) for p in parts)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        self.sent = 0
        self.started = True
        for part in self._parts:
            blocks: Iterator[bytes] = (
                part.chunks() if isinstance(part, _FileSlice) else iter([part])
            )
            for block in blocks:
                if self._cancel is not None and self._cancel.is_set():
                    raise _cancelled(
                        self._cancel,
                        self._operation,
                        f"stopped after {self.sent} of {self.length} body bytes: the server "
                        "did not get the request whole and stored nothing",
                    )
                if isinstance(part, _FileSlice) and self._on_file_block is not None:
                    self._on_file_block(block)
                if self.sent + len(block) >= self.length and not self.complete:
                    if self._on_complete is not None:
                        self._on_complete()
                    self.complete = True
                self.sent += len(block)
                if self._progress is not None:
                    self._progress(self.sent, self.length)
                yield block


def _form_part(boundary: str, name: str, value: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
    ).encode()


def _multipart_parts(
    fields: Sequence[Tuple[str, str]], file_field: str, source: Path, boundary: str
) -> List[Union[bytes, _FileSlice]]:
    """The parts of a ``multipart/form-data`` body with the file last, as the reference sends it."""
    for name, value in fields:
        # A name sits in a quoted header; a value (a text metric may hold quotes and line
        # breaks, as the reference client sends them) is safe unless it holds the boundary.
        if any(c in name for c in '\r\n"') or boundary in value:
            raise RequestRejectedError(
                f"form field {name!r} holds a quote, a line break or the boundary",
                operation="upload",
            )
    head = b"".join(_form_part(boundary, n, v) for n, v in fields)
    # The reference client names the file part "model_file" with no part content type.
    head += (
        f"--{boundary}\r\nContent-Disposition: form-data; "
        f'name="{file_field}"; filename="{file_field}"\r\n\r\n'
    ).encode()
    size = source.stat().st_size
    return [head, _FileSlice(source, size), f"\r\n--{boundary}--\r\n".encode()]


def _max_wire(limit: int) -> int:
    """The longest zstd body that can decode to at most ``limit`` bytes (bytes).

    zstd's worst case for incompressible input is 1/256 more plus frame headers;
    twice that is allowed.
    """
    return limit + limit // 128 + 64 * 1024


def _over_limit(operation: str, limit: int, why: str) -> SizeLimitExceededError:
    """The error for a download over ``max_download_size``: a limit reached, not corruption."""
    return SizeLimitExceededError(
        f"{operation}: the model exceeds the download limit of {limit} bytes "
        f"(max_download_size; the sidecar's --max-model-size): {why}"
    )


class _DecodingSink:
    """Writes a download to a file as it arrives, decoding zstd on the fly.

    Decoding while receiving overlaps the decoder with the network: decoding a
    spooled body afterwards (``codec.unpack_file``) added about 10% to a
    100 Mbit/s download of a 43 MB model. Memory stays bounded: each decoding
    step returns at most 4 MiB (``max_piece_size``), so a bomb cannot become one
    huge allocation under a large limit. Hashes the decoded bytes.
    """

    def __init__(
        self, out: IO[bytes], hasher: Any, coding: str, limit: int, operation: str
    ) -> None:
        self._out = out
        self._hasher = hasher
        self._limit = limit
        self._operation = operation
        self._unpacker = (
            _codec().Unpacker(max_output_size=limit, max_piece_size=_DECODE_STEP)
            if coding == "zstd"
            else None
        )
        self.raw_bytes = 0

    def write(self, block: bytes) -> None:
        if self._unpacker is None:
            self._emit(block)
            return
        pieces = self._unpacker.write_iter(block)
        while True:
            try:
                # A frame whose header declares more than the rest of the limit is
                # refused here, before any of it is decoded or written.
                data = next(pieces, None)
            except SizeLimitExceededError as exc:
                raise _over_limit(
                    self._operation, self._limit, f"the zstd body decodes to more ({exc})"
                ) from None
            if data is None:
                return
            self._emit(data)

    def finish(self) -> None:
        if self._unpacker is not None:
            self._unpacker.finish()

    def _emit(self, data: bytes) -> None:
        if not data:
            return
        self.raw_bytes += len(data)
        if self.raw_bytes > self._limit:
            raise _over_limit(self._operation, self._limit, f"over {self._limit} bytes arrived")
        self._hasher.update(data)
        self._out.write(data)


# --- the client ------------------------------------------------------------


class FlServerClient:
    """A client of one FL Demonstrator server (or the embedded dev server).

    Thread safety: one instance may be shared by threads for independent calls
    (requests' connection pool is thread safe), but ``negotiated_coding`` is
    learnt per instance.

    Attributes:
        negotiated_coding: the request coding uploads use: ``"zstd"`` (the server
            advertised it), ``"identity"`` (it did not, or it answered 415), or
            ``None`` (no answer seen yet). It is learnt only from the answers to
            requests made anyway (a download, a JSON call, an upload, a 415); no
            request is ever sent just to learn it, and an upload made while it
            is ``None`` is sent in identity.
    """

    def __init__(
        self,
        base_url: str,
        credentials: Optional[Credentials] = None,
        *,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        retries: int = 4,
        backoff: float = 0.5,
        compression: str = "auto",
        level: Optional[int] = None,
        chunk_size: Optional[int] = None,
        threads: int = 0,
        max_download_size: int = DEFAULT_MAX_DOWNLOAD_SIZE,
        spool_dir: Optional[PathLike] = None,
        max_backoff: float = _MAX_BACKOFF,
        min_upload_saving: float = 0.1,
        verify: Union[bool, str] = True,
        proxies: Optional[Mapping[str, str]] = None,
    ) -> None:
        """Set up the client; no request is made here.

        Args:
            base_url: the server root, e.g. ``"http://127.0.0.1:8000"`` (no credentials in it).
            credentials: default credentials for every call that needs them.
            timeout: seconds to wait for each read of an answer (between bytes).
            connect_timeout: seconds to wait for a TCP connection.
            retries: extra attempts after the first for requests that may be repeated.
            backoff: first backoff delay in seconds; doubled each retry, with jitter.
            compression: ``"auto"`` (zstd when negotiated), ``"never"`` (identity both
                ways) or ``"always"`` (zstd uploads without waiting for the server to
                advertise it; a 415 still falls back to identity).
            level: zstd level for uploads (codec default when ``None``).
            chunk_size: uncompressed bytes per zstd frame (codec default when ``None``).
            threads: codec worker threads (0: one per core).
            max_download_size: largest model accepted, in bytes, after decoding.
            spool_dir: directory for packed upload bodies (system temp dir when ``None``).
            max_backoff: cap on one backoff delay, in seconds.
            min_upload_saving: pack an upload only if samples of the model shrink by at
                least this fraction (0.1: 10%); 0 packs whenever zstd is negotiated.
            verify: TLS certificate check: True, False, or a CA bundle path.
            proxies: scheme -> proxy URL (environment proxies are never used implicitly).

        Raises:
            ConfigurationError: an argument is invalid (e.g. a URL with a password in it).
        """
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError("base_url must be an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ConfigurationError("base_url must not hold credentials: pass Credentials instead")
        if compression not in COMPRESSION_MODES:
            raise ConfigurationError(f"compression must be one of {COMPRESSION_MODES}")
        if timeout <= 0 or connect_timeout <= 0 or retries < 0 or backoff < 0:
            raise ConfigurationError("timeouts must be positive, retries and backoff non-negative")
        if max_download_size <= 0:
            raise ConfigurationError("max_download_size must be positive")
        if not 0.0 <= min_upload_saving < 1.0:
            raise ConfigurationError("min_upload_saving must be in [0, 1)")
        self.base_url = base_url.rstrip("/") + "/"
        self.credentials = credentials
        self.timeout = float(timeout)
        self.connect_timeout = float(connect_timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.min_upload_saving = float(min_upload_saving)
        self.compression = compression
        self.level = level
        self.chunk_size = chunk_size
        self.threads = threads
        self.max_download_size = int(max_download_size)
        self.spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.negotiated_coding: Optional[str] = None
        self._zstd_refused = False  # a 415 seen: never send zstd again
        self._session = requests.Session()
        # Retries are ours: urllib3's would resend uploads whose outcome is unknown.
        adapter = _CancellableAdapter(max_retries=0, pool_maxsize=16)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        # Proxies and netrc from the environment would leak past our settings object.
        self._session.trust_env = False
        self._session.verify = verify
        if proxies:
            self._session.proxies.update(proxies)
        self._session.headers["User-Agent"] = _USER_AGENT
        # Small JSON answers need no coding; downloads ask for zstd explicitly.
        self._session.headers["Accept-Encoding"] = "identity"

    # -- lifecycle --

    def close(self) -> None:
        """Close the keep-alive connections."""
        self._session.close()

    def __enter__(self) -> FlServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FlServerClient({self.base_url!r}, negotiated_coding={self.negotiated_coding!r})"

    # -- client calls --

    def download_model(
        self,
        model_id: str,
        dest: PathLike,
        *,
        credentials: Optional[Credentials] = None,
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[Cancellation] = None,
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
        path = f"api/models/{_quote_id(model_id)}/"
        dest_path = Path(dest)
        accept = "zstd" if self.compression != "never" and _codec_available() else "identity"
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
                        resp, dest_path, operation, progress, started, cancel
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
        fields.extend(_metric_fields(metrics or {}))
        return self._upload_file(
            "upload",
            f"api/models/{_quote_id(model_id)}/",
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
        form = list(_metric_fields(metrics))
        if owner is not None:
            form.insert(0, ("owner", str(owner)))
        started = time.monotonic()
        body = _urlencode(form)
        resp = self._with_retries(
            "metrics",
            lambda: self._attempt(
                "POST",
                f"api/models/{_quote_id(model_id)}/metrics/",
                operation="metrics",
                idempotent=False,
                data=body,
                headers={"Content-Type": "application/x-www-form-urlencoded"},
                credentials=credentials,
            ),
        )
        payload = _json_or_empty(resp)
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

    # -- setup calls (operator / demo) --

    def create_user(
        self,
        username: str,
        password: str,
        message_endpoint: str,
        *,
        actor: bool = False,
        client: bool = True,
        first_name: str = "",
        last_name: str = "",
        email: str = "",
    ) -> Dict[str, Any]:
        """Register a user (no authentication needed); ``message_endpoint`` gets its notifications.

        Returns:
            The server's JSON answer, with at least ``id`` and ``token``.

        Raises:
            RequestRejectedError: the server refused the fields (e.g. the name is taken).
            UploadOutcomeUnknownError / ServerUnavailableError: as for uploads.
        """
        body = {
            "message_endpoint": message_endpoint,
            "actor": actor,
            "client": client,
            "username": username,
            "first_name": first_name,
            "last_name": last_name,
            "email": email,
            "password": password,
        }
        resp = self._with_retries(
            "create_user",
            lambda: self._attempt(
                "POST",
                "api/users/",
                operation="create_user",
                idempotent=False,
                json_body=body,
                anonymous=True,
            ),
        )
        return _json_or_empty(resp)

    def upload_global_model(
        self,
        name: str,
        description: str,
        path: PathLike,
        *,
        credentials: Optional[Credentials] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> str:
        """Upload a global model file (an ``nn.Module``, pickled or TorchScript).

        Returns:
            The new model's id.

        Raises:
            RequestRejectedError: the server refused the file. Others as :meth:`upload_model`.
        """
        result = self._upload_file(
            "upload_global_model",
            "api/models/",
            [("name", name), ("description", description)],
            Path(path),
            credentials,
            progress,
        )
        model_id = (result.response or {}).get("model_id")
        if not model_id:
            raise ServerError(
                "upload_global_model: the answer holds no model_id",
                status=result.status,
                detail=result.detail,
                operation="upload_global_model",
            )
        return str(model_id)

    def create_training(
        self,
        model_id: str,
        *,
        target_num_updates: int,
        metric_names: Sequence[str],
        aggregation_method: str = "FedAvg",
        clients: Sequence[str],
        credentials: Optional[Credentials] = None,
    ) -> str:
        """Create a training of ``model_id`` for ``clients`` (user ids).

        Returns:
            The new training's id.

        Raises:
            NotFoundError / RequestRejectedError: the server refused it.
        """
        body = {
            "model_id": str(model_id),
            "target_num_updates": int(target_num_updates),
            "metric_names": list(metric_names),
            "aggregation_method": aggregation_method,
            "clients": [str(c) for c in clients],
        }
        resp = self._with_retries(
            "create_training",
            lambda: self._attempt(
                "POST",
                "api/trainings/",
                operation="create_training",
                idempotent=False,
                json_body=body,
                credentials=credentials,
            ),
        )
        payload = _json_or_empty(resp)
        if not payload.get("training_id"):
            raise ServerError(
                "create_training: the answer holds no training_id",
                status=resp.status_code,
                operation="create_training",
            )
        return str(payload["training_id"])

    def set_participants(
        self,
        training_id: str,
        clients: Sequence[str],
        *,
        credentials: Optional[Credentials] = None,
    ) -> None:
        """Replace the participants of a training (PUT, so safe to repeat).

        Raises:
            NotFoundError / ConflictError / RequestRejectedError: the server refused it.
        """
        body = {"clients": [str(c) for c in clients]}
        self._with_retries(
            "set_participants",
            lambda: self._attempt(
                "PUT",
                f"api/trainings/{_quote_id(training_id)}/clients/",
                operation="set_participants",
                idempotent=True,
                json_body=body,
                credentials=credentials,
            ),
        )

    def start_training(
        self, training_id: str, *, credentials: Optional[Credentials] = None
    ) -> None:
        """Start a training (it must be in state INITIAL).

        Raises:
            ConflictError / RequestRejectedError: not in state INITIAL (the server says 400).
        """
        self._with_retries(
            "start_training",
            lambda: self._attempt(
                "POST",
                f"api/trainings/{_quote_id(training_id)}/start/",
                operation="start_training",
                idempotent=False,
                credentials=credentials,
            ),
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
                f"api/trainings/{_quote_id(training_id)}/",
                operation="get_training",
                idempotent=True,
                credentials=credentials,
            ),
        )
        return _json_or_empty(resp)

    # -- internals: one attempt, the retry loop --

    def _headers(
        self, credentials: Optional[Credentials], extra: Optional[Mapping[str, str]]
    ) -> Dict[str, str]:
        headers: Dict[str, str] = {}
        creds = credentials if credentials is not None else self.credentials
        if creds is not None:
            headers["Authorization"] = creds.header()
        if extra:
            headers.update(extra)
        return headers

    def _learn_coding(self, resp: requests.Response) -> None:
        """Remember what the server accepts, from any answer's ``Accept-Encoding``."""
        advertised = resp.headers.get("Accept-Encoding")
        if advertised is None:
            if self.negotiated_coding is None:
                self.negotiated_coding = "identity"
            return
        q = _parse_codings(advertised).get("zstd", 0.0)
        # After a 415 the advertisement is not believed again (no 415 loop).
        self.negotiated_coding = "zstd" if q > 0 and not self._zstd_refused else "identity"

    @staticmethod
    def _cancelled_request(
        cancel: Cancellation, operation: str, idempotent: bool, body: Any
    ) -> Exception:
        """The error for a request whose connection a cancellation shut down."""
        if idempotent or (isinstance(body, _StreamBody) and not body.complete):
            # A body that never got its last byte out is no request to the server.
            # (Other bodies are small and may have gone out whole: unknown below.)
            return _cancelled(
                cancel,
                operation,
                "the request was stopped before its last byte: the server did not get it whole "
                "and stored nothing",
            )
        return UploadOutcomeUnknownError(
            f"{operation}: {cancel.reason or 'cancelled'} after the whole request was sent; "
            "no answer came, so whether the server accepted it is unknown. It was NOT resent: "
            "ask the upload's state (GetUpload) or the training's state to learn whether it "
            "arrived",
            operation=operation,
        )

    def _attempt(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        idempotent: bool,
        headers: Optional[Mapping[str, str]] = None,
        credentials: Optional[Credentials] = None,
        data: Any = None,
        json_body: Any = None,
        stream: bool = False,
        anonymous: bool = False,
        passthrough: frozenset[int] = frozenset(),
        cancel: Optional[Cancellation] = None,
    ) -> requests.Response:
        """One request. Returns a 2xx (or ``passthrough``) answer; raises typed errors.

        Raises _Retryable when repeating the request is safe. With ``cancel``, its
        socket is attached to it until the answer's head is read (until the whole
        body is read for ``stream=True``: the caller detaches then).
        """
        url = self.base_url + path
        all_headers = {} if anonymous else self._headers(credentials, None)
        if headers:
            all_headers.update(headers)
        if cancel is not None and cancel.is_set():
            raise _cancelled(cancel, operation, "the request was not sent")
        try:
            with _cancel_scope(cancel):
                resp = self._session.request(
                    method,
                    url,
                    data=data,
                    json=json_body,
                    headers=all_headers,
                    timeout=(self.connect_timeout, self.timeout),
                    # Always streamed, so that an error body is read only up to a limit.
                    stream=True,
                    allow_redirects=idempotent,
                )
        except requests.RequestException as exc:
            if cancel is not None:
                cancel.detach_all()
            reason = _describe(exc)
            if cancel is not None and cancel.is_set():
                raise self._cancelled_request(cancel, operation, idempotent, data) from None
            if isinstance(exc, requests.exceptions.SSLError):
                raise ServerUnavailableError(
                    f"{operation} failed: TLS error: {reason}", operation=operation
                ) from None
            if idempotent or _certainly_not_sent(exc):
                raise _Retryable(
                    ServerUnavailableError(f"{operation} failed: {reason}", operation=operation)
                ) from None
            raise UploadOutcomeUnknownError(
                f"{operation}: the connection failed after the request may have reached the "
                f"server ({reason}); it was NOT resent: ask the training's state to learn "
                "whether it arrived",
                operation=operation,
            ) from None
        except TransferCancelledError:
            if cancel is not None:
                cancel.detach_all()
            raise
        if cancel is not None and not stream:
            cancel.detach_all()
        _log.debug("%s %s -> %d", method, path, resp.status_code)
        self._learn_coding(resp)
        status = resp.status_code
        if 200 <= status < 300 or status in passthrough:
            if not stream:
                _load_small_body(resp, operation, idempotent)
            return resp
        if cancel is not None:
            cancel.detach_all()  # the connection is released with the error body
        detail, body = _read_detail(resp)
        content_type = resp.headers.get("Content-Type") or None
        if status >= 500:
            if idempotent and status in _RETRY_STATUSES:
                raise _Retryable(
                    _map_error(status, detail, operation, body, content_type),
                    retry_after=_retry_after(resp),
                )
            if not idempotent:
                raise UploadOutcomeUnknownError(
                    f"{operation}: the server answered HTTP {status} ({detail or 'no detail'}) "
                    "after the request may have been processed; it was NOT resent: ask the "
                    "training's state to learn whether it arrived",
                    status=status,
                    detail=detail,
                    operation=operation,
                    body=body,
                    content_type=content_type,
                )
        raise _map_error(status, detail, operation, body, content_type)

    def _with_retries(
        self, operation: str, attempt: Callable[[], T], cancel: Optional[Cancellation] = None
    ) -> T:
        """Run ``attempt`` until it succeeds, raises a final error, or the budget is spent.

        A cancelled ``cancel`` ends the loop (no further attempt, no backoff sleep)
        with :class:`TransferCancelledError`.
        """
        tries = 0
        while True:
            try:
                return attempt()
            except _Retryable as failure:
                if cancel is not None and cancel.is_set():
                    raise _cancelled(cancel, operation, "no further attempt was made") from None
                if tries >= self.retries:
                    err = failure.error
                    raise type(err)(
                        f"{err} (gave up after {tries + 1} attempts)",
                        status=err.status,
                        detail=err.detail,
                        operation=operation,
                        body=err.body,
                        content_type=err.content_type,
                    ) from None
                delay = min(self.max_backoff, self.backoff * (2**tries))
                delay *= random.uniform(0.5, 1.0)  # jitter: clients that failed together spread out
                if failure.retry_after is not None:
                    delay = max(delay, min(failure.retry_after, self.max_backoff))
                _log.info(
                    "%s: attempt %d failed (%s); retrying in %.2f s",
                    operation,
                    tries + 1,
                    failure.error,
                    delay,
                )
                tries += 1
                if cancel is not None:
                    if cancel.wait(delay):
                        raise _cancelled(cancel, operation, "no further attempt was made") from None
                else:
                    time.sleep(delay)

    # -- internals: downloads --

    def _receive_model(
        self,
        resp: requests.Response,
        dest: Path,
        operation: str,
        progress: Optional[ProgressCallback],
        started: float,
        cancel: Optional[Cancellation] = None,
    ) -> TransferResult:
        coding = resp.headers.get("Content-Encoding", "identity").strip().lower() or "identity"
        if coding not in ("identity", "zstd"):
            raise ServerError(
                f"{operation}: the server sent Content-Encoding {coding!r}, not asked for",
                status=resp.status_code,
                operation=operation,
            )
        total_header = resp.headers.get("Content-Length")
        total = int(total_header) if total_header and total_header.isdigit() else None
        limit = self.max_download_size
        # Refused before a byte is written whenever the size is declared: by the
        # Content-Length of an identity body, by a zstd body too long to decode to
        # less than the limit, and (in _DecodingSink) by each zstd frame's header.
        if total is not None and total > (limit if coding == "identity" else _max_wire(limit)):
            raise _over_limit(operation, limit, f"the server declares {total} bytes on the wire")
        dest.parent.mkdir(parents=True, exist_ok=True)
        hasher = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                sink = _DecodingSink(out, hasher, coding, self.max_download_size, operation)
                wire = self._copy_raw(resp, sink, total, progress, operation, cancel)
                try:
                    sink.finish()
                except TruncatedDataError:
                    # A body that stops mid-frame is a broken connection, not bad data.
                    raise _Retryable(
                        ServerUnavailableError(
                            f"{operation}: the zstd body ended mid-stream after {wire} bytes",
                            operation=operation,
                        )
                    ) from None
            if total is not None and wire != total:
                raise _Retryable(
                    ServerUnavailableError(
                        f"{operation}: the body ended after {wire} of {total} bytes",
                        operation=operation,
                    )
                )
            os.replace(tmp, dest)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return TransferResult(
            status=resp.status_code,
            detail="",
            raw_bytes=sink.raw_bytes,
            wire_bytes=wire,
            content_encoding=coding,
            seconds=time.monotonic() - started,
            sha256=hasher.hexdigest(),
        )

    def _copy_raw(
        self,
        resp: requests.Response,
        sink: _DecodingSink,
        total: Optional[int],
        progress: Optional[ProgressCallback],
        operation: str,
        cancel: Optional[Cancellation] = None,
    ) -> int:
        """Feed the body as it is on the wire (urllib3 decodes nothing) into ``sink``."""
        wire = 0
        while True:
            if cancel is not None and cancel.is_set():
                raise _cancelled(cancel, operation, f"stopped after {wire} bytes")
            try:
                block = resp.raw.read(_IO_CHUNK, decode_content=False)
            except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
                if cancel is not None and cancel.is_set():
                    raise _cancelled(cancel, operation, f"stopped after {wire} bytes") from None
                raise _Retryable(
                    ServerUnavailableError(
                        f"{operation}: the body broke off after {wire} bytes ({_describe(exc)})",
                        operation=operation,
                    )
                ) from None
            if not block:
                if cancel is not None and cancel.is_set():
                    # A shut-down socket reads as the end of the body.
                    raise _cancelled(cancel, operation, f"stopped after {wire} bytes")
                return wire
            wire += len(block)
            sink.write(block)
            if progress is not None:
                progress(wire, total)

    # -- internals: uploads --

    def _upload_coding(self, credentials: Optional[Credentials]) -> str:
        if self.compression == "never" or self._zstd_refused or not _codec_available():
            return "identity"
        if self.compression == "always":
            return "zstd"
        # Nothing learnt yet: identity, which every server takes. No probe is sent
        # to find out (the real server answers OPTIONS with a 500); this upload's
        # answer teaches the coding to the next one.
        return "zstd" if self.negotiated_coding == "zstd" else "identity"

    def _worth_packing(self, source: Path) -> bool:
        """Whether samples of ``source`` shrink by at least ``min_upload_saving``.

        Packing is serial with sending (the body needs its length first), and the
        server decodes before it parses: measured at 100 Mbit/s, an fp32 MiniLM
        (9% saving) went up 4% slower with zstd, a bf16 one (22%) 12% faster.
        """
        if self.min_upload_saving <= 0:
            return True
        size = source.stat().st_size
        # Eight samples centred in eighths of the file: the start of a torch archive is
        # its (very compressible) pickle, which would flatter the estimate.
        count, sample = 8, _SAMPLE_SIZE
        if size <= count * sample:
            count, sample = 1, size
        raw = packed = 0
        with open(source, "rb") as fh:
            for i in range(count):
                fh.seek(max(0, (2 * i + 1) * size // (2 * count) - sample // 2))
                block = fh.read(sample)
                raw += len(block)
                packed += len(_codec().pack(block, **self._codec_args(threads=True)))
        return raw == 0 or packed <= raw * (1.0 - self.min_upload_saving)

    def _codec_args(self, *, threads: bool) -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"threads": self.threads} if threads else {}
        if self.level is not None:
            kwargs["level"] = self.level
        if self.chunk_size is not None:
            kwargs["chunk_size"] = self.chunk_size
        return kwargs

    def _upload_file(
        self,
        operation: str,
        path: str,
        fields: Sequence[Tuple[str, str]],
        source: Path,
        credentials: Optional[Credentials],
        progress: Optional[ProgressCallback],
        *,
        sha256: Optional[str] = None,
        cancel: Optional[Cancellation] = None,
        on_body_complete: Optional[BodyCallback] = None,
    ) -> TransferResult:
        started = time.monotonic()
        if not source.is_file():
            raise FileNotFoundError(f"no such model file: {source}")
        boundary = "fl-sidecar-" + uuid.uuid4().hex
        parts = _multipart_parts(fields, "model_file", source, boundary)
        content_type = f"multipart/form-data; boundary={boundary}"
        raw_model = source.stat().st_size
        coding = self._upload_coding(credentials)
        if coding == "zstd" and (self.compression == "always" or self._worth_packing(source)):
            spooled, digest = self._pack_body(
                parts, hash_file=sha256 is None, cancel=cancel, operation=operation
            )
            try:
                resp, wire, _ = self._send_body(
                    operation,
                    path,
                    [_FileSlice(spooled, spooled.stat().st_size)],
                    {"Content-Type": content_type, "Content-Encoding": "zstd"},
                    credentials,
                    progress,
                    passthrough=frozenset({415}),
                    hash_file=False,  # the packed body's digest is of no use
                    cancel=cancel,
                    on_body_complete=on_body_complete,
                )
            finally:
                _unlink_quietly(spooled)
            if resp.status_code != 415:
                return self._upload_result(resp, raw_model, "zstd", started, sha256 or digest, wire)
            # A 415 is a certain non-arrival: the coding was refused, nothing was stored.
            resp.close()
            _log.info("%s: the server refused zstd (415); using identity from now on", operation)
            self._zstd_refused = True
            self.negotiated_coding = "identity"
        resp, wire, digest = self._send_body(
            operation,
            path,
            parts,
            {"Content-Type": content_type},
            credentials,
            progress,
            hash_file=sha256 is None,
            cancel=cancel,
            on_body_complete=on_body_complete,
        )
        return self._upload_result(resp, raw_model, "identity", started, sha256 or digest, wire)

    def _send_body(
        self,
        operation: str,
        path: str,
        parts: Sequence[Union[bytes, _FileSlice]],
        headers: Mapping[str, str],
        credentials: Optional[Credentials],
        progress: Optional[ProgressCallback],
        *,
        passthrough: frozenset[int] = frozenset(),
        hash_file: bool = True,
        cancel: Optional[Cancellation] = None,
        on_body_complete: Optional[BodyCallback] = None,
    ) -> Tuple[requests.Response, int, str]:
        """POST a streamed body; returns the answer, the wire length and the file parts' sha256.

        With ``hash_file=False`` the digest is ``""`` (and costs no CPU).
        """
        last: Dict[str, Any] = {}

        def attempt() -> requests.Response:
            hasher = hashlib.sha256()
            body = _StreamBody(
                parts,
                progress,
                hasher.update if hash_file else None,
                cancel=cancel,
                on_complete=on_body_complete,
                operation=operation,
            )
            last["body"], last["hasher"] = body, hasher
            return self._attempt(
                "POST",
                path,
                operation=operation,
                idempotent=False,
                data=body,
                headers=headers,
                credentials=credentials,
                passthrough=passthrough,
                cancel=cancel,
            )

        resp = self._with_retries(operation, attempt, cancel)
        digest = str(last["hasher"].hexdigest()) if hash_file else ""
        return resp, int(last["body"].length), digest

    def _pack_body(
        self,
        parts: Sequence[Union[bytes, _FileSlice]],
        *,
        hash_file: bool = True,
        cancel: Optional[Cancellation] = None,
        operation: str = "upload",
    ) -> Tuple[Path, str]:
        """Pack the whole multipart body into a temp file; returns it and the model's sha256.

        With ``hash_file=False`` the digest is ``""``. A cancelled ``cancel`` stops it
        between 8 MiB blocks (TransferCancelledError; nothing was sent).
        """
        packer = _codec().Packer(**self._codec_args(threads=True))
        hasher = hashlib.sha256()
        fd, name = tempfile.mkstemp(prefix="fl-sidecar-upload-", suffix=".zst", dir=self.spool_dir)
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                for part in parts:
                    if isinstance(part, _FileSlice):
                        for block in part.chunks(_PACK_READ):
                            if cancel is not None and cancel.is_set():
                                raise _cancelled(
                                    cancel, operation, "stopped while packing: nothing was sent"
                                )
                            if hash_file:
                                hasher.update(block)
                            out.write(packer.write(block))
                    else:
                        out.write(packer.write(part))
                out.write(packer.finish())
        except BaseException:
            _unlink_quietly(path)
            raise
        return path, hasher.hexdigest() if hash_file else ""

    def _upload_result(
        self,
        resp: requests.Response,
        raw_model: int,
        coding: str,
        started: float,
        digest: str,
        wire: int,
    ) -> TransferResult:
        payload = _json_or_empty(resp)
        return TransferResult(
            status=resp.status_code,
            detail=redaction.redact(str(payload.get("detail", ""))),
            raw_bytes=raw_model,
            wire_bytes=wire,
            content_encoding=coding,
            seconds=time.monotonic() - started,
            sha256=digest,
            response=payload,
        )


# --- small helpers -----------------------------------------------------------


def _quote_id(value: str) -> str:
    """A path segment: ids are UUIDs, but nothing hostile may escape its segment."""
    return quote(str(value), safe="")


def _metric_fields(metrics: Mapping[str, MetricValue]) -> Iterator[Tuple[str, str]]:
    names = list(metrics)
    for name in names:
        yield ("metric_names", str(name))
    for name in names:
        value = metrics[name]
        # Text goes verbatim: the server stores values that are not numbers as they came.
        yield ("metric_values", value if isinstance(value, str) else repr(float(value)))


def _urlencode(form: Sequence[Tuple[str, str]]) -> bytes:
    from urllib.parse import urlencode

    return urlencode(list(form)).encode("ascii")


def _json_or_empty(resp: requests.Response) -> Dict[str, Any]:
    try:
        data = resp.json()
    except ValueError:
        return {}
    if isinstance(data, dict):
        return data
    return {"detail": "; ".join(str(x) for x in data)} if isinstance(data, list) else {}


def _read_detail(resp: requests.Response) -> Tuple[str, Optional[str]]:
    """The server's message and its body as text (``None`` if empty), reading at most 64 KiB."""
    try:
        body = resp.raw.read(_ERROR_BODY_LIMIT, decode_content=True) if resp.raw else b""
    except (urllib3.exceptions.HTTPError, OSError):
        body = b""
    finally:
        resp.close()
    content_type = resp.headers.get("Content-Type", "")
    if not body:
        return _parse_detail(b"", content_type), None
    # Message and body reach the trainer: a server that echoes the request (a debug
    # page lists its headers) must not hand it the sidecar's credentials. Redacted
    # before it is cut or parsed, so that no cut leaves a secret's beginning.
    # The request's own header is redacted too, whether or not its credentials were
    # registered (a caller may have set the header by hand).
    header = resp.request.headers.get("Authorization", "") if resp.request is not None else ""
    truncated = len(body) >= _ERROR_BODY_LIMIT
    text = redaction.redact(
        body.decode("utf-8", "replace"),
        extra=redaction.header_forms(str(header)) if header else (),
        truncated=truncated,
    )
    return _parse_detail(text.encode("utf-8"), content_type, truncated=truncated), text


def _load_small_body(resp: requests.Response, operation: str, idempotent: bool) -> None:
    """Read a (JSON) answer into ``resp.content``, at most ``_JSON_LIMIT`` bytes.

    Raises _Retryable when a repeatable request's answer broke off. For a request
    that changed the server's state the status line already said it was accepted,
    so a broken body is not an error: the content is left empty.
    """
    try:
        body = resp.raw.read(_JSON_LIMIT + 1, decode_content=True) or b""
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        resp.close()
        if idempotent:
            raise _Retryable(
                ServerUnavailableError(
                    f"{operation}: the answer broke off ({_describe(exc)})",
                    status=resp.status_code,
                    operation=operation,
                )
            ) from None
        body = b""
    if len(body) > _JSON_LIMIT:
        resp.close()
        raise ServerError(
            f"{operation}: the answer is larger than {_JSON_LIMIT} bytes",
            status=resp.status_code,
            operation=operation,
        )
    resp._content = body
    resp._content_consumed = True  # type: ignore[attr-defined]
    resp.close()


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
