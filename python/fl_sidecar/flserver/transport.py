"""The FL server client's transport: one session, timeouts, retries, and what may be resent.

- one keep-alive :class:`requests.Session` per client, whose connections a
  :class:`~fl_sidecar.cancel.Cancellation` can shut down (a read or write
  blocked on a stalled peer is broken that way);
- timeouts on every request (``connect_timeout`` to connect, ``timeout``
  between two bytes of the answer);
- retries with exponential backoff and jitter on connection errors, timeouts
  and 502/503/504 for requests that are safe to repeat (GET, PUT of the
  participants); a request that changes the server's state (uploads, metrics,
  creations, start) is resent only when it certainly never reached the server
  (connection refused, name resolution failed, connect timeout), because the
  real server counts a duplicate upload. When its outcome is unknown,
  :class:`~fl_sidecar.errors.UploadOutcomeUnknownError` says so.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, TypeVar, Union
from urllib.parse import quote

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool
import urllib3.exceptions

from fl_sidecar.cancel import Cancellation
from fl_sidecar.errors import (
    ServerUnavailableError,
    TransferCancelledError,
    UploadOutcomeUnknownError,
)
from fl_sidecar.flserver.bodies import StreamBody, load_small_body, read_detail
from fl_sidecar.flserver.coding import CodingNegotiation
from fl_sidecar.flserver.credentials import Credentials
from fl_sidecar.flserver.failures import Retryable, cancelled, describe, map_error

__all__ = ["BODY_READ_ERRORS", "DEFAULT_MAX_BACKOFF", "Transport", "open_session", "quote_id"]

_log = logging.getLogger(__name__)

DEFAULT_MAX_BACKOFF = 30.0  # seconds; caps exponential backoff and Retry-After
_RETRY_STATUSES = frozenset({502, 503, 504})
_USER_AGENT = "fl-sidecar/0.1"
BODY_READ_ERRORS = (urllib3.exceptions.HTTPError, requests.RequestException, OSError)
"""What reading a streamed answer's body may raise when the connection breaks."""

T = TypeVar("T")


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


def open_session(
    verify: Union[bool, str], proxies: Optional[Mapping[str, str]]
) -> requests.Session:
    """The client's one keep-alive session: cancellable connections, no retries, no environment.

    Args:
        verify: TLS certificate check: True, False, or a CA bundle path.
        proxies: scheme -> proxy URL (environment proxies are never used implicitly).
    """
    session = requests.Session()
    # Retries are ours: urllib3's would resend uploads whose outcome is unknown.
    adapter = _CancellableAdapter(max_retries=0, pool_maxsize=16)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # Proxies and netrc from the environment would leak past our settings object.
    session.trust_env = False
    session.verify = verify
    if proxies:
        session.proxies.update(proxies)
    session.headers["User-Agent"] = _USER_AGENT
    # Small JSON answers need no coding; downloads ask for zstd explicitly.
    session.headers["Accept-Encoding"] = "identity"
    return session


# --- what may be resent -------------------------------------------------------


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


def _retry_after(resp: requests.Response) -> Optional[float]:
    value = resp.headers.get("Retry-After", "").strip()
    if value.isdigit():
        return float(value)
    return None


def quote_id(value: str) -> str:
    """A path segment: ids are UUIDs, but nothing hostile may escape its segment."""
    return quote(str(value), safe="")


# --- one attempt, the retry loop -----------------------------------------------


class Transport:
    """The request machinery of :class:`~fl_sidecar.flserver.FlServerClient` (a base class).

    The client's constructor sets these attributes; the calls of
    :mod:`fl_sidecar.flserver.participant` and :mod:`fl_sidecar.flserver.admin`
    make their requests through :meth:`_attempt` and :meth:`_with_retries`.
    """

    base_url: str
    credentials: Optional[Credentials]
    timeout: float
    connect_timeout: float
    retries: int
    backoff: float
    max_backoff: float
    _session: requests.Session
    _coding: CodingNegotiation

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
        self._coding.learn(resp.headers.get("Accept-Encoding"))

    @staticmethod
    def _cancelled_request(
        cancel: Cancellation, operation: str, idempotent: bool, body: Any
    ) -> Exception:
        """The error for a request whose connection a cancellation shut down."""
        if idempotent or (isinstance(body, StreamBody) and not body.complete):
            # A body that never got its last byte out is no request to the server.
            # (Other bodies are small and may have gone out whole: unknown below.)
            return cancelled(
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

        Raises Retryable when repeating the request is safe. With ``cancel``, its
        socket is attached to it until the answer's head is read (until the whole
        body is read for ``stream=True``: the caller detaches then).
        """
        url = self.base_url + path
        all_headers = {} if anonymous else self._headers(credentials, None)
        if headers:
            all_headers.update(headers)
        if cancel is not None and cancel.is_set():
            raise cancelled(cancel, operation, "the request was not sent")
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
            reason = describe(exc)
            if cancel is not None and cancel.is_set():
                raise self._cancelled_request(cancel, operation, idempotent, data) from None
            if isinstance(exc, requests.exceptions.SSLError):
                raise ServerUnavailableError(
                    f"{operation} failed: TLS error: {reason}", operation=operation
                ) from None
            if idempotent or _certainly_not_sent(exc):
                raise Retryable(
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
                load_small_body(resp, operation, idempotent)
            return resp
        if cancel is not None:
            cancel.detach_all()  # the connection is released with the error body
        detail, body = read_detail(resp)
        content_type = resp.headers.get("Content-Type") or None
        if status >= 500:
            if idempotent and status in _RETRY_STATUSES:
                raise Retryable(
                    map_error(status, detail, operation, body, content_type),
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
        raise map_error(status, detail, operation, body, content_type)

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
            except Retryable as failure:
                if cancel is not None and cancel.is_set():
                    raise cancelled(cancel, operation, "no further attempt was made") from None
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
                        raise cancelled(cancel, operation, "no further attempt was made") from None
                else:
                    time.sleep(delay)
