"""The bodies the FL server client sends and reads.

Requests: ``multipart/form-data`` for model files (the file last, streamed
from disk with a known length), ``application/x-www-form-urlencoded`` for
metrics, and the metric fields both carry. Answers: small JSON bodies read up
to a limit, and error bodies read up to 64 KiB, redacted (a server that echoes
the request must not hand the trainer our credentials) and parsed into the
server's message.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union
from urllib.parse import urlencode as _stdlib_urlencode

import requests
import urllib3.exceptions

from fl_sidecar import redaction
from fl_sidecar.cancel import Cancellation
from fl_sidecar.errors import ModelError, RequestRejectedError, ServerError, ServerUnavailableError
from fl_sidecar.flserver.failures import Retryable, cancelled, describe
from fl_sidecar.flserver.results import BodyCallback, MetricValue, ProgressCallback

__all__ = [
    "FileSlice",
    "StreamBody",
    "json_or_empty",
    "load_small_body",
    "metric_fields",
    "multipart_parts",
    "parse_detail",
    "read_detail",
    "urlencode",
]

IO_CHUNK = 1024 * 1024  # bytes per read/write/send; big enough that syscalls are cheap
_ERROR_BODY_LIMIT = 64 * 1024  # an error answer is read at most this far (bytes)
_JSON_LIMIT = 16 * 1024 * 1024  # bytes; a longer JSON answer means a broken or hostile server


# --- request bodies -----------------------------------------------------------


class FileSlice:
    """Reads exactly ``size`` bytes of a file in chunks; fails if the file shrank."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size

    def chunks(self, block_size: int = IO_CHUNK) -> Iterator[bytes]:
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


class StreamBody:
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
        parts: Sequence[Union[bytes, FileSlice]],
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
        self.length = sum(p.size if isinstance(p, FileSlice) else len(p) for p in parts)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[bytes]:
        self.sent = 0
        self.started = True
        for part in self._parts:
            blocks: Iterator[bytes] = part.chunks() if isinstance(part, FileSlice) else iter([part])
            for block in blocks:
                if self._cancel is not None and self._cancel.is_set():
                    raise cancelled(
                        self._cancel,
                        self._operation,
                        f"stopped after {self.sent} of {self.length} body bytes: the server "
                        "did not get the request whole and stored nothing",
                    )
                if isinstance(part, FileSlice) and self._on_file_block is not None:
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


def multipart_parts(
    fields: Sequence[Tuple[str, str]], file_field: str, source: Path, boundary: str
) -> List[Union[bytes, FileSlice]]:
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
    return [head, FileSlice(source, size), f"\r\n--{boundary}--\r\n".encode()]


def metric_fields(metrics: Mapping[str, MetricValue]) -> Iterator[Tuple[str, str]]:
    """The form fields of ``metrics``: every ``metric_names``, then every ``metric_values``."""
    names = list(metrics)
    for name in names:
        yield ("metric_names", str(name))
    for name in names:
        value = metrics[name]
        # Text goes verbatim: the server stores values that are not numbers as they came.
        yield ("metric_values", value if isinstance(value, str) else repr(float(value)))


def urlencode(form: Sequence[Tuple[str, str]]) -> bytes:
    """An ``application/x-www-form-urlencoded`` body of ``form``, in order."""
    return _stdlib_urlencode(list(form)).encode("ascii")


# --- answers -------------------------------------------------------------------


def parse_detail(body: bytes, content_type: str, *, truncated: bool = False) -> str:
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


def json_or_empty(resp: requests.Response) -> Dict[str, Any]:
    """A loaded answer's JSON object; a list becomes its ``detail``, anything else ``{}``."""
    try:
        data = resp.json()
    except ValueError:
        return {}
    if isinstance(data, dict):
        return data
    return {"detail": "; ".join(str(x) for x in data)} if isinstance(data, list) else {}


def read_detail(resp: requests.Response) -> Tuple[str, Optional[str]]:
    """The server's message and its body as text (``None`` if empty), reading at most 64 KiB."""
    try:
        body = resp.raw.read(_ERROR_BODY_LIMIT, decode_content=True) if resp.raw else b""
    except (urllib3.exceptions.HTTPError, OSError):
        body = b""
    finally:
        resp.close()
    content_type = resp.headers.get("Content-Type", "")
    if not body:
        return parse_detail(b"", content_type), None
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
    return parse_detail(text.encode("utf-8"), content_type, truncated=truncated), text


def load_small_body(resp: requests.Response, operation: str, idempotent: bool) -> None:
    """Read a (JSON) answer into ``resp.content``, at most ``_JSON_LIMIT`` bytes.

    Raises Retryable when a repeatable request's answer broke off. For a request
    that changed the server's state the status line already said it was accepted,
    so a broken body is not an error: the content is left empty.
    """
    try:
        body = resp.raw.read(_JSON_LIMIT + 1, decode_content=True) or b""
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        resp.close()
        if idempotent:
            raise Retryable(
                ServerUnavailableError(
                    f"{operation}: the answer broke off ({describe(exc)})",
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


def unlink_quietly(path: Path) -> None:
    """Remove a spooled body or a partial download; one already gone is no error."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
