"""WSGI middleware: the server half of zstd content-coding negotiation (RFC 9110 section 12.5.3).

Wrap any WSGI application (the DLR FL Demonstrator is Django) and it will:

- decode request bodies sent with ``Content-Encoding: zstd`` using our codec's
  streaming :class:`~fl_sidecar.codec.Unpacker`, fed in pieces that decode to
  at most 4 MiB each, spooling the decoded body to a temp file above
  ``spool_threshold`` bytes, so memory stays bounded whatever arrives. The
  inner application sees an ordinary body: ``wsgi.input`` is the decoded body,
  ``CONTENT_LENGTH`` its length, and ``HTTP_CONTENT_ENCODING`` is gone. A body
  that would decode past ``max_request_size`` gets 413; a truncated or corrupt
  one gets 400; never a 500;
- answer 415 with ``Accept-Encoding: zstd`` to a request coding it cannot
  decode (gzip, br, anything else): a certain non-arrival that a client may
  resend in identity;
- compress answers with zstd for clients that send ``Accept-Encoding: zstd``,
  when the answer is not already encoded and is at least ``min_response_size``
  bytes;
- advertise ``Accept-Encoding: zstd`` on every answer.

Django, in the project's ``wsgi.py``, one line after ``application`` is made::

    application = ZstdMiddleware(application, max_request_size=4 * 1024**3)
"""

from __future__ import annotations

import json
import tempfile
from types import ModuleType
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from fl_sidecar.errors import CodecError, SizeLimitExceededError

__all__ = ["ENVIRON_WIRE_BYTES", "ZstdMiddleware"]

Headers = List[Tuple[str, str]]
StartResponse = Callable[..., Callable[[bytes], object]]
WsgiApp = Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]

ENVIRON_WIRE_BYTES = "fl_sidecar.zstd.request_wire_bytes"
"""environ key: the size of a zstd request body as it arrived (bytes), for logs and tests."""

_READ_BLOCK = 1024 * 1024  # bytes read from wsgi.input at a time
# Most bytes one decoding step returns: a few KB of zstd can decode to GBs, and
# without a bound one call returns all of it (up to max_request_size) at once.
_DECODE_STEP = 4 * 1024 * 1024
_ONE_SHOT_LIMIT = 1024 * 1024  # answers up to this size get a Content-Length after packing
_NO_BODY_STATUSES = frozenset({204, 304})


def _codec() -> ModuleType:
    """The codec module, imported on first use (a native extension)."""
    from fl_sidecar import codec

    return codec


def _codings(value: str) -> List[str]:
    return [c.strip().lower() for c in value.split(",") if c.strip()]


def _accepts_zstd(value: str) -> bool:
    """Whether an ``Accept-Encoding`` request header admits zstd (with q > 0)."""
    star: Optional[float] = None
    for item in value.split(","):
        parts = [p.strip() for p in item.split(";")]
        name = parts[0].lower()
        q = 1.0
        for param in parts[1:]:
            if param.lower().startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if name == "zstd":
            return q > 0
        if name == "*":
            star = q
    return star is not None and star > 0


def _header(headers: Sequence[Tuple[str, str]], name: str) -> Optional[str]:
    lname = name.lower()
    for key, value in headers:
        if key.lower() == lname:
            return value
    return None


def _without(headers: Sequence[Tuple[str, str]], *names: str) -> Headers:
    drop = {n.lower() for n in names}
    return [(k, v) for k, v in headers if k.lower() not in drop]


def _merge_token(headers: Headers, name: str, token: str) -> Headers:
    """Add ``token`` to the list-valued header ``name`` unless it is already there."""
    current = _header(headers, name)
    if current is None:
        return [*headers, (name, token)]
    if token.lower() in _codings(current):
        return headers
    return [*_without(headers, name), (name, f"{current}, {token}")]


def _read_ahead(
    blocks: Iterator[bytes], into: List[bytes], size: int, until: int
) -> Tuple[int, bool]:
    """Moves blocks into ``into`` while ``size`` (bytes so far) is below ``until``.

    Returns the new size and whether ``blocks`` ended.
    """
    while size < until:
        try:
            block = next(blocks)
        except StopIteration:
            return size, True
        into.append(block)
        size += len(block)
    return size, False


class ZstdMiddleware:
    """zstd request decoding, response encoding and advertisement for any WSGI application."""

    def __init__(
        self,
        app: WsgiApp,
        *,
        max_request_size: int,
        min_response_size: int = 1024,
        level: Optional[int] = None,
        chunk_size: Optional[int] = None,
        threads: int = 0,
        spool_threshold: int = 1024 * 1024,
    ) -> None:
        """Wrap ``app``.

        Args:
            max_request_size: largest decoded request body accepted, in bytes (larger: 413).
                The zstd body as sent may be at most slightly larger than this (the
                worst-case zstd expansion of incompressible data).
            min_response_size: answers shorter than this (bytes) are sent uncompressed.
            level: zstd level for answers (codec default when ``None``).
            chunk_size: uncompressed bytes per zstd frame of answers (codec default when None).
            threads: codec threads for answers (0: one per core).
            spool_threshold: decoded request bodies above this many bytes go to a temp file.

        Raises:
            ValueError: a size is not positive.
        """
        if max_request_size <= 0 or min_response_size < 0 or spool_threshold < 0:
            raise ValueError("sizes must be positive")
        self.app = app
        self.max_request_size = int(max_request_size)
        self.min_response_size = int(min_response_size)
        self.spool_threshold = int(spool_threshold)
        self._packer_args: Dict[str, Any] = {"threads": threads}
        if level is not None:
            self._packer_args["level"] = level
        if chunk_size is not None:
            self._packer_args["chunk_size"] = chunk_size
        # zstd's worst case for incompressible input is 1/256 more plus frame headers;
        # allow twice that.
        self.max_wire_size = self.max_request_size + self.max_request_size // 128 + 64 * 1024

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        """Handle one request (the WSGI entry point). Errors become 4xx answers, never 5xx."""
        codings = [c for c in _codings(environ.get("HTTP_CONTENT_ENCODING", "")) if c != "identity"]
        spool: Optional[IO[bytes]] = None
        if codings:
            if codings != ["zstd"]:
                return self._error(
                    start_response,
                    "415 Unsupported Media Type",
                    f"Content-Encoding {', '.join(codings)!r} is not supported; "
                    "this server accepts: zstd",
                )
            decoded = self._decode_request(environ, start_response)
            if not isinstance(decoded, tuple):
                return decoded
            spool, size, wire = decoded
            environ = dict(environ)
            del environ["HTTP_CONTENT_ENCODING"]
            environ["wsgi.input"] = spool
            environ["CONTENT_LENGTH"] = str(size)
            environ[ENVIRON_WIRE_BYTES] = wire
        wants_zstd = _accepts_zstd(environ.get("HTTP_ACCEPT_ENCODING", ""))
        return _Response(self, environ, start_response, wants_zstd, spool)

    # -- requests --

    def _decode_request(
        self, environ: Dict[str, Any], start_response: StartResponse
    ) -> Union[Tuple[IO[bytes], int, int], List[bytes]]:
        """Decode the body into a spooled file: (file, size, wire bytes), or an error answer."""
        length_text = environ.get("CONTENT_LENGTH") or ""
        length: Optional[int] = None
        if length_text.strip():
            try:
                length = int(length_text)
            except ValueError:
                return self._error(start_response, "400 Bad Request", "invalid Content-Length")
            if length < 0:
                return self._error(start_response, "400 Bad Request", "invalid Content-Length")
        elif not environ.get("wsgi.input_terminated"):
            return self._error(
                start_response, "411 Length Required", "a zstd body needs a Content-Length"
            )
        if length is not None and length > self.max_wire_size:
            return self._too_large(start_response)
        stream = environ["wsgi.input"]
        # It lives until the answer is closed, past this function: no context manager.
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=self.spool_threshold
        )
        try:
            unpacker = _codec().Unpacker(
                max_output_size=self.max_request_size, max_piece_size=_DECODE_STEP
            )
            wire = 0
            size = 0
            while length is None or wire < length:
                want = _READ_BLOCK if length is None else min(_READ_BLOCK, length - wire)
                try:
                    block = stream.read(want)
                except OSError as exc:  # the client went away mid-body
                    raise _BadBody(f"the body broke off after {wire} bytes ({exc})") from None
                if not block:
                    if length is not None:
                        raise _BadBody(f"the body ended after {wire} of {length} bytes")
                    break
                wire += len(block)
                if wire > self.max_wire_size:
                    raise SizeLimitExceededError("the zstd body is too large")
                for out in unpacker.write_iter(block):
                    size += len(out)
                    if size > self.max_request_size:  # the codec limits too; a backstop
                        raise SizeLimitExceededError("the decoded body is too large")
                    spool.write(out)
            unpacker.finish()
        except SizeLimitExceededError:
            spool.close()
            return self._too_large(start_response)
        except (CodecError, _BadBody) as exc:
            spool.close()
            return self._error(start_response, "400 Bad Request", f"invalid zstd body: {exc}")
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool, size, wire

    def _too_large(self, start_response: StartResponse) -> List[bytes]:
        return self._error(
            start_response,
            "413 Content Too Large",
            f"the decoded body exceeds {self.max_request_size} bytes",
        )

    @staticmethod
    def _error(start_response: StartResponse, status: str, detail: str) -> List[bytes]:
        body = json.dumps({"detail": detail}).encode()
        start_response(
            status,
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(body))),
                ("Accept-Encoding", "zstd"),
            ],
        )
        return [body]


class _BadBody(Exception):
    """The request body is shorter than its Content-Length, or broke off."""


class _Response:
    """The wrapped answer: buffers a little to decide on compression, then streams."""

    def __init__(
        self,
        mw: ZstdMiddleware,
        environ: Dict[str, Any],
        start_response: StartResponse,
        wants_zstd: bool,
        spool: Optional[IO[bytes]],
    ) -> None:
        self._mw = mw
        self._start_response = start_response
        self._wants_zstd = wants_zstd
        self._is_head = environ.get("REQUEST_METHOD", "GET").upper() == "HEAD"
        self._spool = spool
        self._status: Optional[str] = None
        self._headers: Headers = []
        self._pending: List[bytes] = []  # from the legacy write() callable
        self._headers_sent = False
        self._result: Iterable[bytes] = mw.app(environ, self._inner_start_response)

    def _inner_start_response(
        self, status: str, headers: Headers, exc_info: Optional[Any] = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None and self._headers_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        self._status = status
        self._headers = list(headers)
        return self._pending.append

    def __iter__(self) -> Iterator[bytes]:
        inner = iter(self._result)
        buffered: List[bytes] = list(self._pending)
        self._pending = []
        size, ended = _read_ahead(
            inner, buffered, sum(len(b) for b in buffered), max(self._mw.min_response_size, 1)
        )
        buffered.extend(self._pending)  # write() may have been called during iteration
        self._pending = []
        if self._status is None:
            raise RuntimeError("the application returned without calling start_response")
        eligible = self._eligible(size, ended)
        headers = _merge_token(self._headers, "Accept-Encoding", "zstd")
        if eligible:
            # Its coding depends on Accept-Encoding, whichever variant this one is.
            headers = _merge_token(headers, "Vary", "Accept-Encoding")
        if not (eligible and self._wants_zstd):
            self._send_headers(headers)
            yield from buffered
            if not ended:
                yield from inner
            return
        headers = [*_without(headers, "Content-Length"), ("Content-Encoding", "zstd")]
        packer = _codec().Packer(**self._mw._packer_args)
        if not ended:
            # Try to see the end within the one-shot limit, so the answer gets a length.
            size, ended = _read_ahead(inner, buffered, size, _ONE_SHOT_LIMIT + 1)
        if ended:
            packed = b"".join(packer.write(b) for b in buffered) + packer.finish()
            self._send_headers([*headers, ("Content-Length", str(len(packed)))])
            yield packed
            return
        self._send_headers(headers)
        for block in buffered:
            out = packer.write(block)
            if out:
                yield out
        for block in inner:
            out = packer.write(block)
            if out:
                yield out
        yield packer.finish()

    def _eligible(self, size: int, ended: bool) -> bool:
        """Whether this answer is compressed for a client that accepts zstd."""
        if self._status is None or self._is_head:
            return False
        try:
            code = int(self._status.split(None, 1)[0])
        except ValueError:
            return False
        if code < 200 or code in _NO_BODY_STATUSES or code == 206:
            return False
        encoding = _header(self._headers, "Content-Encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            return False
        if "no-transform" in (_header(self._headers, "Cache-Control") or "").lower():
            return False
        length = _header(self._headers, "Content-Length")
        if length is not None and length.strip().isdigit():
            return int(length) >= self._mw.min_response_size
        return not (ended and size < self._mw.min_response_size)

    def _send_headers(self, headers: Headers) -> None:
        assert self._status is not None
        self._start_response(self._status, headers)
        self._headers_sent = True

    def close(self) -> None:
        """Close the inner answer (WSGI requires it) and the decoded request body."""
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            if self._spool is not None:
                self._spool.close()
