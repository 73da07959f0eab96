"""A streaming ``multipart/form-data`` parser (RFC 7578) for the dev server.

File parts are spooled to disk as they arrive, so a model upload never exists
as a whole in memory; text fields are small and kept as strings. The stdlib
``cgi`` module that used to do this is gone in Python 3.13.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from typing import IO, BinaryIO, Dict, List, Optional, Tuple

from fl_sidecar.errors import FlSidecarError

__all__ = ["FilePart", "MultipartError", "MultipartForm", "parse_boundary", "parse_multipart"]

_READ_SIZE = 256 * 1024
_MAX_HEADER_BYTES = 16 * 1024
_MAX_PARTS = 1000
_DEFAULT_MAX_FIELD_SIZE = 1024 * 1024
_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,./:=? -]{1,70}$")


class MultipartError(FlSidecarError, ValueError):
    """The request body is not well-formed ``multipart/form-data`` (a client error)."""


class FilePart:
    """One uploaded file, spooled to ``path`` (``size`` bytes); the form owns the file."""

    def __init__(self, name: str, filename: str, path: str, size: int) -> None:
        self.name = name
        self.filename = filename
        self.path = path
        self.size = size


class MultipartForm:
    """The parsed form: ``fields`` (name -> values in order) and spooled ``files``.

    Use it as a context manager (or call :meth:`close`) to delete the spooled
    files that the caller did not take over with :meth:`take_file`.
    """

    def __init__(self) -> None:
        self.fields: Dict[str, List[str]] = {}
        self.files: Dict[str, List[FilePart]] = {}

    def first(self, name: str) -> Optional[str]:
        """The first value of text field ``name``, or ``None``."""
        values = self.fields.get(name)
        return values[0] if values else None

    def take_file(self, name: str) -> Optional[FilePart]:
        """Hand the first file part called ``name`` over to the caller (who then deletes it)."""
        parts = self.files.get(name)
        if not parts:
            return None
        return parts.pop(0)

    def close(self) -> None:
        """Delete every spooled file still owned by the form."""
        for parts in self.files.values():
            for part in parts:
                _unlink_quietly(part.path)
            parts.clear()

    def __enter__(self) -> MultipartForm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_boundary(content_type: str) -> str:
    """The boundary of a ``multipart/form-data`` Content-Type header value.

    Raises:
        MultipartError: not multipart/form-data, or no valid boundary.
    """
    media_type, _, params = content_type.partition(";")
    if media_type.strip().lower() != "multipart/form-data":
        raise MultipartError(f"expected multipart/form-data, got {media_type.strip()!r}")
    boundary = _parse_params(params).get("boundary")
    if boundary is None:
        raise MultipartError("multipart/form-data without a boundary")
    if not _BOUNDARY_RE.match(boundary) or boundary.endswith(" "):
        raise MultipartError("invalid multipart boundary")
    return boundary


def parse_multipart(
    stream: BinaryIO,
    boundary: str,
    *,
    length: Optional[int],
    spool_dir: str,
    max_field_size: int = _DEFAULT_MAX_FIELD_SIZE,
    max_file_size: Optional[int] = None,
) -> MultipartForm:
    """Parse a multipart body from ``stream``, spooling file parts into ``spool_dir``.

    Args:
        stream: the request body.
        boundary: from :func:`parse_boundary`.
        length: bytes to read (the Content-Length), or ``None`` to read to EOF.
        spool_dir: directory for the spooled file parts.
        max_field_size: largest text field, in bytes.
        max_file_size: largest file part, in bytes (``None``: unlimited).

    Raises:
        MultipartError: malformed or truncated body, or a part over its limit.
            Nothing is left on disk in that case.
    """
    form = MultipartForm()
    try:
        _Parser(stream, boundary, length, spool_dir, max_field_size, max_file_size, form).run()
    except BaseException:
        form.close()
        raise
    return form


class _Parser:
    def __init__(
        self,
        stream: BinaryIO,
        boundary: str,
        length: Optional[int],
        spool_dir: str,
        max_field_size: int,
        max_file_size: Optional[int],
        form: MultipartForm,
    ) -> None:
        self._stream = stream
        self._remaining = length
        self._spool_dir = spool_dir
        self._max_field_size = max_field_size
        self._max_file_size = max_file_size
        self._form = form
        # The first delimiter may start the body without a preceding CRLF;
        # seeding the buffer with one lets one search pattern find them all.
        self._buf = bytearray(b"\r\n")
        self._eof = False
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")

    def _fill(self) -> bool:
        """Read more input; False at the end of the body."""
        if self._eof:
            return False
        want = _READ_SIZE if self._remaining is None else min(_READ_SIZE, self._remaining)
        chunk = self._stream.read(want) if want > 0 else b""
        if not chunk:
            self._eof = True
            if self._remaining:
                raise MultipartError("request body ended before its Content-Length")
            return False
        if self._remaining is not None:
            self._remaining -= len(chunk)
        self._buf += chunk
        return True

    def run(self) -> None:
        # Preamble: discard everything up to the first delimiter.
        self._skip_to_delimiter()
        parts = 0
        while True:
            # After a delimiter: "--" closes the body, otherwise CRLF opens a part.
            while len(self._buf) < 2:
                if not self._fill():
                    raise MultipartError("truncated multipart body")
            if self._buf[:2] == b"--":
                self._drain()
                return
            line_end = self._find(b"\r\n", _MAX_HEADER_BYTES)
            if self._buf[:line_end].strip(b" \t"):
                raise MultipartError("garbage after multipart boundary")
            del self._buf[: line_end + 2]
            parts += 1
            if parts > _MAX_PARTS:
                raise MultipartError(f"more than {_MAX_PARTS} parts")
            name, filename = self._read_part_headers()
            if filename is None:
                data = bytearray()
                self._read_body(data, self._max_field_size, "field")
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise MultipartError(f"field {name!r} is not UTF-8") from exc
                self._form.fields.setdefault(name, []).append(text)
            else:
                self._read_file(name, filename)

    def _find(self, needle: bytes, limit: int) -> int:
        """Index of ``needle`` in the buffer, reading more as needed (at most ``limit`` bytes)."""
        start = 0
        while True:
            index = self._buf.find(needle, start)
            if index >= 0:
                return index
            if len(self._buf) > limit:
                raise MultipartError("multipart header too long")
            start = max(0, len(self._buf) - len(needle) + 1)
            if not self._fill():
                raise MultipartError("truncated multipart body")

    def _skip_to_delimiter(self) -> None:
        keep = len(self._delimiter) - 1
        while True:
            index = self._buf.find(self._delimiter)
            if index >= 0:
                del self._buf[: index + len(self._delimiter)]
                return
            if len(self._buf) > keep:
                del self._buf[: len(self._buf) - keep]
            if not self._fill():
                raise MultipartError("no multipart boundary found in the body")

    def _read_part_headers(self) -> Tuple[str, Optional[str]]:
        end = self._find(b"\r\n\r\n", _MAX_HEADER_BYTES)
        raw = bytes(self._buf[:end])
        del self._buf[: end + 4]
        disposition: Optional[str] = None
        for line in raw.split(b"\r\n"):
            key, sep, value = line.partition(b":")
            if not sep:
                raise MultipartError("malformed part header")
            if key.strip().lower() == b"content-disposition":
                disposition = value.decode("utf-8", "replace").strip()
        if disposition is None:
            raise MultipartError("part without Content-Disposition")
        kind, _, params = disposition.partition(";")
        if kind.strip().lower() != "form-data":
            raise MultipartError("part disposition is not form-data")
        parsed = _parse_params(params)
        name = parsed.get("name")
        if name is None:
            raise MultipartError("part without a name")
        return name, parsed.get("filename")

    def _read_body(self, sink: bytearray | IO[bytes], limit: Optional[int], what: str) -> int:
        """Move the part's bytes to ``sink`` up to the next delimiter; returns their count."""
        keep = len(self._delimiter) - 1
        total = 0
        while True:
            index = self._buf.find(self._delimiter)
            if index >= 0:
                chunk = self._buf[:index]
                del self._buf[: index + len(self._delimiter)]
                done = True
            else:
                # The buffer's tail may be the start of a delimiter: keep it.
                cut = max(0, len(self._buf) - keep)
                chunk = self._buf[:cut]
                del self._buf[:cut]
                done = False
            total += len(chunk)
            if limit is not None and total > limit:
                raise MultipartError(f"{what} part larger than {limit} bytes")
            if chunk:
                if isinstance(sink, bytearray):
                    sink += chunk
                else:
                    sink.write(chunk)
            if done:
                return total
            if not self._fill():
                raise MultipartError("truncated multipart body")

    def _read_file(self, name: str, filename: str) -> None:
        fd, path = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self._spool_dir)
        part = FilePart(name, filename, path, 0)
        # Registered before writing so that a failure below still deletes it.
        self._form.files.setdefault(name, []).append(part)
        with os.fdopen(fd, "wb") as out:
            part.size = self._read_body(out, self._max_file_size, "file")

    def _drain(self) -> None:
        # The epilogue is ignored, but reading it keeps the connection usable.
        while self._fill():
            self._buf.clear()


def _parse_params(params: str) -> Dict[str, str]:
    """``; key="value"; key2=value2`` into a dict (lower-case keys, quotes removed)."""
    result: Dict[str, str] = {}
    for match in re.finditer(
        r';?\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', ";" + params
    ):
        key = match.group(1).lower()
        value = match.group(2).strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        result.setdefault(key, value)
    return result


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
