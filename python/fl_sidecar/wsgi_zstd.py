"""WSGI middleware: the server half of zstd content-coding negotiation (RFC 9110 section 12.5.3).

Wrap any WSGI application (the DLR FL Demonstrator is Django) and it will:

- decode request bodies sent with ``Content-Encoding: zstd`` **only as the
  application reads them**, so that an application that refuses a request
  without reading its body (a 401, a 403) never pays for decoding it. The
  application sees an ordinary body: ``wsgi.input`` decodes on ``read()`` and
  ``readline()``, ``CONTENT_LENGTH`` is the decoded length, and
  ``HTTP_CONTENT_ENCODING`` is gone. How:

  - the body as sent is read first (in memory up to ``spool_threshold``, then
    in an unnamed temp file): it costs what the client paid to send, at most
    ``max_request_size`` plus zstd's worst-case expansion;
  - the decoded length comes from the zstd frame headers, without decoding
    (every frame of our packer, the ``zstd`` tool and most libraries declares
    its content size). A declared length over ``max_request_size`` gets 413 at
    once;
  - decoding then happens inside the application's reads, in steps of at most
    4 MiB, and every limit holds as it goes: never more than the declared
    length, never more than ``max_ratio`` times the body as sent (beyond the
    first 16 MiB). When the last declared byte is decoded, the rest of the
    stream (checksums, seek table) is checked before that byte is handed out;
  - a body whose frames do not all declare their sizes cannot be given a
    length without decoding it, so it is decoded before the application runs,
    into a temp file, up to ``max_undeclared_size`` (64 MiB by default);
  - a body over a limit gets 413, a truncated or corrupt one 400, never a 500:
    when decoding fails while the application reads, its read raises
    :class:`BodyDecodingError` (an ``OSError``, like a client that went away)
    and whatever the application answers, the middleware answers 413 or 400
    instead;
- answer 415 with ``Accept-Encoding: zstd`` to a request coding it cannot
  decode (gzip, br, anything else): a certain non-arrival that a client may
  resend in identity;
- compress answers with zstd for clients that send ``Accept-Encoding: zstd``,
  when the answer is not already encoded and is at least ``min_response_size``
  bytes;
- advertise ``Accept-Encoding: zstd`` on every answer.

The header parsing is the client's own (:mod:`fl_sidecar.flserver.coding`,
standard library only): installing fl-sidecar for this middleware needs
neither requests nor grpc.

The defaults suit a server that faces the internet: 4 GiB decoded at most, a
ratio of 1024, 64 MiB for bodies without declared sizes. Django, in the
project's ``wsgi.py``, one line after ``application`` is made::

    application = ZstdMiddleware(application, max_request_size=4 * 1024**3)
"""

from __future__ import annotations

import io
import json
import mmap
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
    NoReturn,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from fl_sidecar.errors import CodecError, SizeLimitExceededError
from fl_sidecar.flserver.coding import ZSTD, accepts, header_list

__all__ = [
    "DEFAULT_MAX_RATIO",
    "DEFAULT_MAX_REQUEST_SIZE",
    "DEFAULT_MAX_UNDECLARED_SIZE",
    "ENVIRON_WIRE_BYTES",
    "BodyDecodingError",
    "ZstdMiddleware",
]

Headers = List[Tuple[str, str]]
StartResponse = Callable[..., Callable[[bytes], object]]
WsgiApp = Callable[[Dict[str, Any], StartResponse], Iterable[bytes]]

ENVIRON_WIRE_BYTES = "fl_sidecar.zstd.request_wire_bytes"
"""environ key: the size of a zstd request body as it arrived (bytes), for logs and tests."""

DEFAULT_MAX_REQUEST_SIZE = 4 * 1024**3
"""Bytes: the largest decoded request body accepted by default (4 GiB)."""
DEFAULT_MAX_RATIO = 1024.0
"""Decoded bytes per byte as sent, beyond the first 16 MiB, accepted by default."""
DEFAULT_MAX_UNDECLARED_SIZE = 64 * 1024 * 1024
"""Bytes: the largest body decoded before the application runs (frames without sizes)."""

_RATIO_FLOOR = 16 * 1024 * 1024  # bytes any body may decode to, whatever its ratio
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
    if token.lower() in header_list(current):
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
        max_request_size: int = DEFAULT_MAX_REQUEST_SIZE,
        max_ratio: Optional[float] = DEFAULT_MAX_RATIO,
        max_undeclared_size: int = DEFAULT_MAX_UNDECLARED_SIZE,
        min_response_size: int = 1024,
        level: Optional[int] = None,
        chunk_size: Optional[int] = None,
        threads: int = 0,
        spool_threshold: int = 1024 * 1024,
        spool_dir: Optional[str] = None,
    ) -> None:
        """Wrap ``app``.

        Args:
            max_request_size: largest decoded request body accepted, in bytes (larger:
                413). The zstd body as sent may be at most slightly larger than this (the
                worst-case zstd expansion of incompressible data).
            max_ratio: most decoded bytes per byte on the wire, beyond the first 16 MiB
                (more: 413, as soon as the application has read that far); ``None``: no
                ratio limit. A real model compresses a few times at most; a bomb, by
                thousands.
            max_undeclared_size: largest decoded body, in bytes, of a zstd body whose
                frames do not all declare their content size: such a body is decoded
                before the application runs (it needs the length), so it is held small.
            min_response_size: answers shorter than this (bytes) are sent uncompressed.
            level: zstd level for answers (codec default when ``None``).
            chunk_size: uncompressed bytes per zstd frame of answers (codec default when None).
            threads: codec threads for answers (0: one per core).
            spool_threshold: request bodies (as sent, or decoded up front) above this many
                bytes are kept in a temp file instead of memory.
            spool_dir: directory of those temp files (the system temp dir when ``None``).

        Raises:
            ValueError: a size is not positive.
        """
        if (
            max_request_size <= 0
            or max_undeclared_size <= 0
            or min_response_size < 0
            or spool_threshold < 0
            or (max_ratio is not None and max_ratio <= 0)
        ):
            raise ValueError("sizes and the ratio must be positive")
        self.app = app
        self.max_request_size = int(max_request_size)
        self.max_ratio = None if max_ratio is None else float(max_ratio)
        self.max_undeclared_size = int(max_undeclared_size)
        self.min_response_size = int(min_response_size)
        self.spool_threshold = int(spool_threshold)
        self.spool_dir = spool_dir
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
        sent_codings = header_list(environ.get("HTTP_CONTENT_ENCODING", ""))
        codings = [c for c in sent_codings if c != "identity"]
        body: Optional[_Body] = None
        if codings:
            if codings != ["zstd"]:
                return self._error(
                    start_response,
                    "415 Unsupported Media Type",
                    f"Content-Encoding {', '.join(codings)!r} is not supported; "
                    "this server accepts: zstd",
                )
            prepared = self._prepare_request(environ, start_response)
            if not isinstance(prepared, tuple):
                return prepared
            body, size, wire = prepared
            environ = dict(environ)
            del environ["HTTP_CONTENT_ENCODING"]
            environ["wsgi.input"] = body
            environ["CONTENT_LENGTH"] = str(size)
            environ[ENVIRON_WIRE_BYTES] = wire
        wants_zstd = accepts(environ.get("HTTP_ACCEPT_ENCODING", ""), ZSTD)
        return _Response(self, environ, start_response, wants_zstd, body)

    # -- requests --

    def ratio_limit(self, wire: int) -> Optional[int]:
        """The most decoded bytes a body of ``wire`` bytes may give under ``max_ratio``."""
        if self.max_ratio is None:
            return None
        return int(self.max_ratio * wire) + _RATIO_FLOOR

    def _prepare_request(
        self, environ: Dict[str, Any], start_response: StartResponse
    ) -> Union[Tuple[_Body, int, int], List[bytes]]:
        """The body for the app: (input, decoded size, wire bytes), or an error answer.

        The body as sent is read (it is what the client paid to send); it is
        decoded only as the application reads it, when its frames declare their
        sizes (CONTENT_LENGTH comes from them). Otherwise it is decoded here, up
        to ``max_undeclared_size``.
        """
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
        wire_body = _WireSpool(self.spool_threshold, self.spool_dir)
        keep = False
        try:
            wire = self._receive(environ["wsgi.input"], length, wire_body)
            if wire == 0:
                raise _BadBody("the body is empty")
            declared = wire_body.declared_size()
            if declared is None:
                spool, size = self._decode_now(wire_body, wire)
                return spool, size, wire
            if declared > self.max_request_size:
                return self._too_large(start_response)
            lazy = _DecodingInput(wire_body, declared, self.ratio_limit(wire))
            keep = True  # closed with the answer (``_Response.close``)
            return lazy, declared, wire
        except SizeLimitExceededError:
            return self._too_large(start_response)
        except (CodecError, _BadBody) as exc:
            return self._error(start_response, "400 Bad Request", f"invalid zstd body: {exc}")
        finally:
            if not keep:
                wire_body.close()

    def _receive(self, stream: IO[bytes], length: Optional[int], into: _WireSpool) -> int:
        """Copies the body as sent into ``into``; returns its size (bytes)."""
        wire = 0
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
            into.write(block)
        return wire

    def _decode_now(self, wire_body: _WireSpool, wire: int) -> Tuple[IO[bytes], int]:
        """Decodes a body whose sizes are not declared into a spooled file: (file, size)."""
        limit = min(self.max_request_size, self.max_undeclared_size)
        ratio_limit = self.ratio_limit(wire)
        # It lives until the answer is closed, past this function: no context manager.
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=self.spool_threshold, dir=self.spool_dir
        )
        try:
            unpacker = _codec().Unpacker(max_output_size=limit, max_piece_size=_DECODE_STEP)
            size = 0
            source = wire_body.reader()
            while True:
                block = source.read(_READ_BLOCK)
                if not block:
                    break
                for out in unpacker.write_iter(block):
                    size += len(out)
                    if size > limit or (ratio_limit is not None and size > ratio_limit):
                        raise SizeLimitExceededError("the decoded body is too large")
                    spool.write(out)
            unpacker.finish()
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool, size

    def _too_large(self, start_response: StartResponse) -> List[bytes]:
        return self._error(
            start_response,
            "413 Content Too Large",
            f"the decoded body exceeds {self.max_request_size} bytes, "
            f"{self.max_undeclared_size} bytes when its zstd frames do not declare their "
            f"sizes, or {self.max_ratio} times its size as sent",
        )

    @staticmethod
    def _error(start_response: StartResponse, status: str, detail: str) -> List[bytes]:
        start_response(status, _error_headers(_error_body(detail)))
        return [_error_body(detail)]


def _error_body(detail: str) -> bytes:
    return json.dumps({"detail": detail}).encode()


def _error_headers(body: bytes) -> Headers:
    return [
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Accept-Encoding", "zstd"),
    ]


class _BadBody(Exception):
    """The request body is shorter than its Content-Length, or broke off."""


class _WireSpool:
    """The body as sent: in memory up to ``threshold`` bytes, then in an unnamed temp file."""

    def __init__(self, threshold: int, directory: Optional[str]) -> None:
        self._threshold = threshold
        self._directory = directory
        self._memory: Optional[io.BytesIO] = io.BytesIO()
        self._file: Optional[IO[bytes]] = None

    def write(self, block: bytes) -> None:
        if self._memory is not None:
            if self._memory.tell() + len(block) <= self._threshold:
                self._memory.write(block)
                return
            # It lives as long as this spool: closed by close().
            self._file = tempfile.TemporaryFile(dir=self._directory)  # noqa: SIM115
            self._file.write(self._memory.getbuffer())
            self._memory = None
        assert self._file is not None
        self._file.write(block)

    def declared_size(self) -> Optional[int]:
        """The decoded size its zstd frames declare (all of them), from their headers.

        Raises:
            CorruptDataError (and subclasses): the frame or block headers are invalid.
        """
        codec = _codec()
        if self._memory is not None:
            with self._memory.getbuffer() as view:
                size: Optional[int] = codec.inspect(view).decompressed_size
            return size
        assert self._file is not None
        self._file.flush()
        with mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) as view:
            size = codec.inspect(view).decompressed_size
        return size

    def reader(self) -> IO[bytes]:
        """A file positioned at the start of the body."""
        if self._memory is not None:
            return io.BytesIO(self._memory.getvalue())
        assert self._file is not None
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._memory = None


class BodyDecodingError(OSError):
    """The zstd request body could not be decoded while the application read it.

    An ``OSError``, like a client that went away mid-body, so that frameworks
    treat it as an unreadable body. Whatever the application answers then, the
    middleware answers 413 (a limit) or 400 (a corrupt body) instead.
    """


class _DecodingInput:
    """``wsgi.input`` for a zstd body: decoded as the application reads, never further.

    Every limit holds as it goes: the decoded bytes never pass the size the frames
    declared (the CONTENT_LENGTH the application was given) nor the ratio limit.
    When the last declared byte is decoded, the rest of the stream (checksums, the
    seek table) is checked before that byte is handed out, so an application that
    got its whole body got a verified one.
    """

    def __init__(self, wire: _WireSpool, declared: int, ratio_limit: Optional[int]) -> None:
        self._wire = wire
        self._source = wire.reader()
        self._unpacker = _codec().Unpacker(max_output_size=declared, max_piece_size=_DECODE_STEP)
        self._pieces: Iterator[bytes] = iter(())
        self._buffer = bytearray()
        self._declared = declared
        self._ratio_limit = ratio_limit
        self._ended = declared == 0
        self._complete = False  # the whole stream decoded and checked
        self.produced = 0
        self.failure: Optional[Tuple[str, str]] = None  # (status line, detail)

    # -- the file interface WSGI applications use --

    def read(self, size: Optional[int] = -1) -> bytes:
        """Up to ``size`` decoded bytes (all the rest for ``-1``/``None``); ``b""`` at the end.

        Raises:
            BodyDecodingError: the body is corrupt or passes a limit.
        """
        if size is None or size < 0:
            self._fill(None)
            size = len(self._buffer)
        else:
            self._fill(size)
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readline(self, size: Optional[int] = -1) -> bytes:
        """The next line (up to and with ``b"\\n"``), at most ``size`` bytes when given.

        Raises:
            BodyDecodingError: the body is corrupt or passes a limit.
        """
        limit = None if size is None or size < 0 else size
        scanned = 0
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end >= 0:
                take = end + 1
                break
            scanned = len(self._buffer)
            if (limit is not None and scanned >= limit) or self._ended:
                take = scanned
                break
            self._fill(scanned + 1)
        if limit is not None:
            take = min(take, limit)
        data = bytes(self._buffer[:take])
        del self._buffer[:take]
        return data

    def readlines(self, hint: int = -1) -> List[bytes]:
        lines: List[bytes] = []
        total = 0
        while hint <= 0 or total < hint:
            line = self.readline()
            if not line:
                break
            lines.append(line)
            total += len(line)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line

    def readable(self) -> bool:
        return True

    @property
    def decoded_bytes(self) -> int:
        """Bytes decoded so far (0 until the application reads)."""
        return self.produced

    def close(self) -> None:
        """Release the body as sent (its temp file)."""
        self._ended = True
        self._buffer = bytearray()
        self._wire.close()

    # -- decoding --

    def _fill(self, want: Optional[int]) -> None:
        """Decodes until ``want`` bytes are buffered (``None``: all of them) or the body ends."""
        if self.failure is not None:
            raise BodyDecodingError(self.failure[1])
        while not self._ended and (want is None or len(self._buffer) < want):
            try:
                piece = self._next_piece()
            except SizeLimitExceededError as exc:
                self._fail("413 Content Too Large", f"the decoded body is too large: {exc}")
            except (CodecError, _BadBody) as exc:
                self._fail("400 Bad Request", f"invalid zstd body: {exc}")
            if piece is None:
                self._ended = True
                return
            self._buffer += piece

    def _next_piece(self) -> Optional[bytes]:
        if self._complete:
            return None
        while True:
            try:
                piece = next(self._pieces)
            except StopIteration:
                block = self._source.read(_READ_BLOCK)
                if not block:
                    self._unpacker.finish()
                    self._complete = True
                    if self.produced != self._declared:
                        raise _BadBody(
                            f"it decoded to {self.produced} bytes, its frames declare "
                            f"{self._declared}"
                        ) from None
                    return None
                self._pieces = self._unpacker.write_iter(block)
                continue
            if not piece:
                continue
            self.produced += len(piece)
            if self._ratio_limit is not None and self.produced > self._ratio_limit:
                raise SizeLimitExceededError(
                    f"over {self._ratio_limit} bytes from a body this small (max_ratio)"
                )
            if self.produced == self._declared:
                self._check_the_rest()
            return piece

    def _check_the_rest(self) -> None:
        """After the last declared byte: the rest of the stream must decode to nothing."""
        for _ in self._pieces:
            raise _BadBody("it decodes to more than its frames declare")
        while True:
            block = self._source.read(_READ_BLOCK)
            if not block:
                break
            for _ in self._unpacker.write_iter(block):
                raise _BadBody("it decodes to more than its frames declare")
        self._unpacker.finish()
        self._complete = True

    def _fail(self, status: str, detail: str) -> NoReturn:
        self.failure = (status, detail)
        self._ended = True
        self._buffer = bytearray()
        raise BodyDecodingError(detail)


_Body = Union[IO[bytes], _DecodingInput]


class _Response:
    """The wrapped answer: buffers a little to decide on compression, then streams."""

    def __init__(
        self,
        mw: ZstdMiddleware,
        environ: Dict[str, Any],
        start_response: StartResponse,
        wants_zstd: bool,
        body: Optional[_Body],
    ) -> None:
        self._mw = mw
        self._start_response = start_response
        self._wants_zstd = wants_zstd
        self._is_head = environ.get("REQUEST_METHOD", "GET").upper() == "HEAD"
        self._body = body
        self._status: Optional[str] = None
        self._headers: Headers = []
        self._pending: List[bytes] = []  # from the legacy write() callable
        self._headers_sent = False
        self._result: Iterable[bytes] = ()
        try:
            self._result = mw.app(environ, self._inner_start_response)
        except Exception:
            # An application that let our decoding error escape gets our answer, not a 500.
            if self._body_failure() is None:
                raise

    def _body_failure(self) -> Optional[Tuple[str, str]]:
        """(status, detail) when decoding the request body failed while the app read it."""
        return self._body.failure if isinstance(self._body, _DecodingInput) else None

    def _inner_start_response(
        self, status: str, headers: Headers, exc_info: Optional[Any] = None
    ) -> Callable[[bytes], object]:
        if exc_info is not None and self._headers_sent:
            raise exc_info[1].with_traceback(exc_info[2])
        self._status = status
        self._headers = list(headers)
        return self._pending.append

    def __iter__(self) -> Iterator[bytes]:
        failure = self._body_failure()
        if failure is None:
            inner = iter(self._result)
            buffered: List[bytes] = list(self._pending)
            self._pending = []
            try:
                size, ended = _read_ahead(
                    inner,
                    buffered,
                    sum(len(b) for b in buffered),
                    max(self._mw.min_response_size, 1),
                )
            except Exception:
                if self._body_failure() is None:
                    raise
            buffered.extend(self._pending)  # write() may have been called during iteration
            self._pending = []
            failure = self._body_failure()
        if failure is not None:
            # Whatever the application made of it (a 500, its own 400), the answer is
            # ours: a limit is 413, a corrupt body 400, never a 5xx.
            body = _error_body(failure[1])
            self._status, self._headers = failure[0], _error_headers(body)
            self._send_headers(self._headers)
            yield body
            return
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
            if self._body is not None:
                self._body.close()
