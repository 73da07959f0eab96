"""The dev server's WSGI plumbing: requests, responses, JSON and form bodies, error answers.

Nothing here knows the REST API; the handlers build on it. A handler ends a
request early by raising :class:`HttpError`; the application turns it into
the JSON answer (see :mod:`fl_sidecar.devserver.app`).
"""

from __future__ import annotations

import json
from typing import Any, BinaryIO, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from .multipart import MultipartError, MultipartForm, parse_boundary, parse_multipart
from .store import Row

__all__ = [
    "DRAIN_LIMIT",
    "JSON_LIMIT",
    "REASONS",
    "Body",
    "BoundedInput",
    "FileChunks",
    "Headers",
    "HttpError",
    "Request",
    "Response",
    "StartResponse",
    "detail",
    "drain",
    "listed",
    "read_form",
    "read_json",
]

StartResponse = Callable[..., Any]
Headers = List[Tuple[str, str]]
Body = Union[Dict[str, Any], List[Any]]

JSON_LIMIT = 1024 * 1024
"""Largest JSON (or urlencoded metrics) body read, in bytes (413 above)."""
DRAIN_LIMIT = 64 * 1024 * 1024
"""Largest unread body drained after an error answer, in bytes."""
_DOWNLOAD_CHUNK = 1024 * 1024


class HttpError(Exception):
    """Ends a request with ``status`` and a JSON ``body``; never escapes the app."""

    def __init__(self, status: int, body: Body, headers: Optional[Headers] = None) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body
        self.headers = headers or []


def detail(status: int, message: str) -> HttpError:
    """An error answered as ``{"detail": message}``, the real server's usual shape."""
    return HttpError(status, {"detail": message})


def listed(message: str) -> HttpError:
    """A 400 answered as ``[message]``, the shape of the real server's validation errors."""
    return HttpError(400, [message])


class Response:
    """A status, headers and body chunks; a JSON ``body`` is encoded with its headers."""

    def __init__(
        self, status: int, body: Optional[Body] = None, headers: Optional[Headers] = None
    ) -> None:
        self.status = status
        self.headers: Headers = list(headers or [])
        self.chunks: Iterable[bytes] = []
        if body is not None:
            data = json.dumps(body).encode("utf-8")
            self.headers.append(("Content-Type", "application/json"))
            self.headers.append(("Content-Length", str(len(data))))
            self.chunks = [data]


class BoundedInput:
    """The request body, never read past its Content-Length (``None``: read to EOF)."""

    def __init__(self, stream: BinaryIO, length: Optional[int]) -> None:
        self._stream = stream
        self.remaining = length

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all that is left when negative); ``b""`` at the end."""
        if self.remaining is None:
            return self._stream.read(size)
        if self.remaining <= 0:
            return b""
        want = self.remaining if size < 0 else min(size, self.remaining)
        data = self._stream.read(want)
        self.remaining -= len(data)
        return data


class Request:
    """One WSGI request: method, path, content type and a bounded body.

    Raises:
        HttpError: 400 for a Content-Length that is not a decimal number.
    """

    def __init__(self, environ: Dict[str, Any]) -> None:
        self.environ = environ
        self.method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        self.path = str(environ.get("PATH_INFO", "/"))
        self.content_type = str(environ.get("CONTENT_TYPE", ""))
        raw_length = str(environ.get("CONTENT_LENGTH", "") or "").strip()
        length: Optional[int]
        if raw_length:
            if not raw_length.isdigit():
                raise detail(400, "Invalid Content-Length.")
            length = int(raw_length)
        elif environ.get("wsgi.input_terminated"):
            length = None
        else:
            length = 0
        self.length = length
        self.body = BoundedInput(environ["wsgi.input"], length)
        self.user: Optional[Row] = None

    def header(self, name: str) -> Optional[str]:
        """The request header ``name`` (any case), or ``None``."""
        value = self.environ.get("HTTP_" + name.upper().replace("-", "_"))
        return None if value is None else str(value)


def drain(request: Request) -> None:
    """Read and drop what is left of a body of at most :data:`DRAIN_LIMIT` bytes.

    An unread body makes the socket close with a reset, and the client would
    lose the error answer sent before it.
    """
    remaining = request.body.remaining
    if remaining is None or remaining > DRAIN_LIMIT:
        return
    while request.body.read(256 * 1024):
        pass


def read_json(request: Request) -> Dict[str, Any]:
    """The body as a JSON object.

    Raises:
        HttpError: 413 above :data:`JSON_LIMIT` bytes; 400 when it is not
            JSON or not an object.
    """
    if request.length is not None and request.length > JSON_LIMIT:
        raise detail(413, f"JSON body larger than {JSON_LIMIT} bytes.")
    raw = request.body.read(JSON_LIMIT + 1)
    if len(raw) > JSON_LIMIT:
        raise detail(413, f"JSON body larger than {JSON_LIMIT} bytes.")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise detail(400, f"JSON parse error - {exc}") from None
    except RecursionError:
        raise detail(400, "JSON parse error - nested too deeply") from None
    if not isinstance(data, dict):
        raise detail(400, "Invalid data. Expected a dictionary.")
    return data


def read_form(request: Request, *, max_size: int, spool_dir: str) -> MultipartForm:
    """The body as a multipart form; file parts are spooled into ``spool_dir``.

    Raises:
        HttpError: 413 above ``max_size`` bytes; 400 for a malformed form.
    """
    if request.length is not None and request.length > max_size:
        raise detail(413, f"Request body larger than {max_size} bytes.")
    try:
        boundary = parse_boundary(request.content_type)
        return parse_multipart(
            request.body,  # type: ignore[arg-type]
            boundary,
            length=request.length,
            spool_dir=spool_dir,
            max_file_size=max_size,
        )
    except MultipartError as exc:
        raise detail(400, f"Multipart form parse error - {exc}") from None


class FileChunks:
    """A response body read from an open file in chunks; WSGI servers call close()."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def __iter__(self) -> Iterator[bytes]:
        while True:
            chunk = self._handle.read(_DOWNLOAD_CHUNK)
            if not chunk:
                return
            yield chunk

    def close(self) -> None:
        """Close the file."""
        self._handle.close()


REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
}
