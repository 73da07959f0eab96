"""ZstdMiddleware called directly as a WSGI app (no sockets): decoding, refusals, encoding."""

from __future__ import annotations

import io
import json
import tracemalloc
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sidecar import codec
from fl_sidecar.wsgi_zstd import (
    DEFAULT_MAX_RATIO,
    DEFAULT_MAX_REQUEST_SIZE,
    DEFAULT_MAX_UNDECLARED_SIZE,
    ENVIRON_WIRE_BYTES,
    BodyDecodingError,
    ZstdMiddleware,
)

Headers = List[Tuple[str, str]]


class Recorder:
    """An inner WSGI app that records what it was given and answers ``body``."""

    def __init__(
        self,
        body: bytes = b"ok",
        status: str = "200 OK",
        headers: Optional[Headers] = None,
        chunks: Optional[Iterable[bytes]] = None,
    ) -> None:
        self.body = body
        self.status = status
        self.headers = headers
        self.chunks = chunks
        self.calls: List[Dict[str, Any]] = []
        self.closed = 0

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        received = environ["wsgi.input"].read(length) if length else b""
        self.calls.append({"environ": environ, "body": received})
        headers = self.headers
        if headers is None:
            headers = [("Content-Type", "application/octet-stream")]
            headers.append(("Content-Length", str(len(self.body))))
        start_response(self.status, headers)
        recorder = self

        class Result:
            def __iter__(self) -> Iterator[bytes]:
                if recorder.chunks is not None:
                    yield from recorder.chunks
                else:
                    yield recorder.body

            def close(self) -> None:
                recorder.closed += 1

        return Result()


def call(
    app: Any,
    *,
    method: str = "POST",
    body: bytes = b"",
    headers: Optional[Dict[str, str]] = None,
    content_length: Optional[str] = "auto",
) -> Tuple[int, Dict[str, str], bytes]:
    environ: Dict[str, Any] = {
        "REQUEST_METHOD": method,
        "PATH_INFO": "/api/models/x/",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
    }
    if content_length == "auto":
        environ["CONTENT_LENGTH"] = str(len(body))
    elif content_length is not None:
        environ["CONTENT_LENGTH"] = content_length
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    got: Dict[str, Any] = {}

    def start_response(status: str, hdrs: Headers, exc_info: Any = None) -> Callable[[bytes], None]:
        got["status"], got["headers"] = status, hdrs
        return lambda data: None

    result = app(environ, start_response)
    try:
        data = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    names = [k.lower() for k, _ in got["headers"]]
    assert len(names) == len(set(names)), f"duplicate headers: {got['headers']}"
    return int(got["status"].split()[0]), {k.lower(): v for k, v in got["headers"]}, data


MIB = 1024 * 1024
ZSTD = {"Content-Encoding": "zstd"}


def test_decodes_a_zstd_body_for_the_inner_app() -> None:
    inner = Recorder()
    app = ZstdMiddleware(inner, max_request_size=8 * MIB, spool_threshold=64 * 1024)
    raw = b"model bytes " * 300_000  # 3.6 MB, above the spool threshold
    packed = codec.pack(raw, chunk_size=MIB)
    status, headers, _ = call(app, body=packed, headers=ZSTD)
    assert status == 200
    (seen,) = inner.calls
    assert seen["body"] == raw
    assert seen["environ"]["CONTENT_LENGTH"] == str(len(raw))
    assert "HTTP_CONTENT_ENCODING" not in seen["environ"]
    assert seen["environ"][ENVIRON_WIRE_BYTES] == len(packed) < len(raw)
    assert headers["accept-encoding"] == "zstd"
    assert inner.closed == 1


@pytest.mark.parametrize("frames", [1, 3])
def test_decodes_foreign_zstd_streams(frames: int) -> None:
    inner = Recorder()
    app = ZstdMiddleware(inner, max_request_size=MIB)
    parts = [bytes([i]) * 50_000 for i in range(frames)]
    packed = b"".join(zstandard.ZstdCompressor().compress(p) for p in parts)
    assert call(app, body=packed, headers={"Content-Encoding": "ZSTD"})[0] == 200
    assert inner.calls[0]["body"] == b"".join(parts)


def test_identity_bodies_pass_untouched() -> None:
    inner = Recorder()
    app = ZstdMiddleware(inner, max_request_size=10)
    body = b"plain body longer than the zstd limit"
    assert call(app, body=body, headers={"Content-Encoding": "identity"})[0] == 200
    assert call(app, body=body)[0] == 200
    assert [c["body"] for c in inner.calls] == [body, body]


@pytest.mark.parametrize(
    "coding", ["gzip", "br", "deflate", "x-unknown", "zstd, gzip", "gzip, zstd"]
)
def test_undecodable_codings_get_415_with_accept_encoding(coding: str) -> None:
    inner = Recorder()
    app = ZstdMiddleware(inner, max_request_size=MIB)
    status, headers, body = call(app, body=b"\x1f\x8b...", headers={"Content-Encoding": coding})
    assert status == 415
    assert headers["accept-encoding"] == "zstd"
    assert "zstd" in json.loads(body)["detail"]
    assert inner.calls == []


def test_bombs_get_413_without_unbounded_memory() -> None:
    inner = Recorder()
    app = ZstdMiddleware(inner, max_request_size=MIB)
    ours = codec.pack(b"\0" * (64 * MIB))  # chunked frames, sizes declared
    foreign = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (64 * MIB))
    tracemalloc.start()
    try:
        for bomb in (ours, foreign):
            status, _, body = call(app, body=bomb, headers=ZSTD)
            assert status == 413, body
            assert "exceeds" in json.loads(body)["detail"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MIB
    assert inner.calls == []


def test_a_body_larger_than_any_decodable_size_is_refused_before_reading() -> None:
    app = ZstdMiddleware(Recorder(), max_request_size=1000)
    status, _, _ = call(app, body=b"", headers=ZSTD, content_length=str(10 * MIB))
    assert status == 413


def _flip(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0xFF]) + blob[at + 1 :]


def test_truncated_corrupt_and_garbage_bodies_get_400() -> None:
    inner = Recorder()
    app = ZstdMiddleware(inner, max_request_size=8 * MIB)
    packed = codec.pack(bytes(range(256)) * 20_000, chunk_size=256 * 1024)
    cases = {
        "truncated": packed[: len(packed) // 2],
        "cut in the seek table": packed[:-3],
        "corrupt": _flip(packed, len(packed) // 3),
        "bad magic": _flip(packed, 0),
        "garbage": b"definitely not zstd" * 10,
        "empty": b"",
    }
    for name, body in cases.items():
        status, headers, answer = call(app, body=body, headers=ZSTD)
        assert status == 400, name
        assert "detail" in json.loads(answer), name
        assert headers["accept-encoding"] == "zstd"
    assert inner.calls == []


def test_short_body_and_missing_length() -> None:
    app = ZstdMiddleware(Recorder(), max_request_size=MIB)
    packed = codec.pack(b"x" * 1000)
    assert call(app, body=packed, headers=ZSTD, content_length=str(len(packed) + 10))[0] == 400
    assert call(app, body=packed, headers=ZSTD, content_length=None)[0] == 411
    assert call(app, body=packed, headers=ZSTD, content_length="12abc")[0] == 400


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2048))
def test_hostile_bodies_never_give_a_5xx(blob: bytes) -> None:
    app = ZstdMiddleware(Recorder(), max_request_size=64 * 1024)
    for body in (blob, b"\x28\xb5\x2f\xfd" + blob):
        status, _, _ = call(app, body=body, headers=ZSTD)
        assert status in (200, 400, 413)


def _zstd_decode(data: bytes) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True)
    return reader.read()


def test_answers_are_compressed_for_clients_that_accept_zstd() -> None:
    body = b'{"weights": [0, 0, 0, 0]}' * 2000
    app = ZstdMiddleware(Recorder(body), max_request_size=MIB)
    status, headers, data = call(app, method="GET", headers={"Accept-Encoding": "gzip, zstd"})
    assert status == 200
    assert headers["content-encoding"] == "zstd"
    assert headers["vary"] == "Accept-Encoding"
    assert headers["accept-encoding"] == "zstd"
    assert int(headers["content-length"]) == len(data) < len(body)
    assert codec.is_zstd(data[:4])
    assert codec.unpack(data) == body
    assert _zstd_decode(data) == body  # a foreign decoder reads every frame


def test_streamed_answers_without_length_are_compressed_as_a_stream() -> None:
    chunks = [bytes([i % 7]) * 300_000 for i in range(8)]  # 2.4 MB, no Content-Length
    inner = Recorder(headers=[("Content-Type", "application/octet-stream")], chunks=chunks)
    app = ZstdMiddleware(inner, max_request_size=MIB)
    status, headers, data = call(app, method="GET", headers={"Accept-Encoding": "zstd"})
    assert status == 200 and headers["content-encoding"] == "zstd"
    assert "content-length" not in headers
    assert _zstd_decode(data) == b"".join(chunks)
    assert inner.closed == 1


@pytest.mark.parametrize(
    ("accept", "method", "inner", "why"),
    [
        (None, "GET", Recorder(b"x" * 5000), "client did not ask"),
        ("zstd;q=0", "GET", Recorder(b"x" * 5000), "client refused zstd"),
        ("gzip", "GET", Recorder(b"x" * 5000), "client asked for another coding"),
        ("zstd", "GET", Recorder(b"x" * 100), "too small"),
        ("zstd", "HEAD", Recorder(b"x" * 5000), "HEAD"),
        ("zstd", "GET", Recorder(b"", status="204 No Content"), "no body"),
        (
            "zstd",
            "GET",
            Recorder(b"x" * 5000, headers=[("Content-Encoding", "gzip")]),
            "already encoded",
        ),
        (
            "zstd",
            "GET",
            Recorder(b"x" * 5000, headers=[("Cache-Control", "no-transform")]),
            "no-transform",
        ),
    ],
)
def test_answers_left_alone(accept: Optional[str], method: str, inner: Recorder, why: str) -> None:
    app = ZstdMiddleware(inner, max_request_size=MIB)
    headers = {"Accept-Encoding": accept} if accept else {}
    status, got, data = call(app, method=method, headers=headers)
    assert status == int(inner.status[:3]), why
    assert got.get("content-encoding") != "zstd", why
    assert data == inner.body, why
    assert got["accept-encoding"].endswith("zstd"), why
    # Only answers that a zstd client would get compressed vary by Accept-Encoding.
    assert ("vary" in got) == (
        why in ("client did not ask", "client refused zstd", "client asked for another coding")
    ), why


def test_star_accepts_zstd_and_existing_accept_encoding_is_merged() -> None:
    inner = Recorder(b"y" * 5000, headers=[("Accept-Encoding", "gzip")])
    app = ZstdMiddleware(inner, max_request_size=MIB)
    _, headers, data = call(app, method="GET", headers={"Accept-Encoding": "*"})
    assert headers["content-encoding"] == "zstd"
    assert headers["accept-encoding"] == "gzip, zstd"
    assert codec.unpack(data) == inner.body


def test_refused_sizes() -> None:
    with pytest.raises(ValueError):
        ZstdMiddleware(Recorder(), max_request_size=0)


def test_a_large_limit_still_decodes_in_bounded_memory() -> None:
    """A 64 MiB body of zeros (a few KB packed) under a 1 GiB limit: decoded in steps."""
    seen: List[int] = []

    def counting_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        total = 0
        while True:
            block = environ["wsgi.input"].read(MIB)
            if not block:
                break
            total += len(block)
        seen.append(total)
        start_response("204 No Content", [])
        return []

    app = ZstdMiddleware(counting_app, max_request_size=1024 * MIB, max_ratio=None)
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * MIB))
    tracemalloc.start()
    try:
        status, _, _ = call(app, body=bomb, headers=ZSTD)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 204 and seen == [64 * MIB]
    assert peak < 16 * MIB


# --- lazy decoding: the application's reads drive the decoder ----------------------


_RLE_BLOCK = 128 * 1024


def rle_frame(size: int, *, declared: Optional[int] = None) -> bytes:
    """One real zstd frame of ``size`` zero bytes in RLE blocks (4 bytes per 128 KiB)."""
    out = bytearray(b"\x28\xb5\x2f\xfd\xc0\x38")  # magic; 8-byte size, 128 KiB window
    out += (size if declared is None else declared).to_bytes(8, "little")
    remaining = size
    while True:
        n = min(_RLE_BLOCK, remaining)
        remaining -= n
        last = int(remaining == 0)
        out += ((n << 3) | (1 << 1) | last).to_bytes(3, "little") + b"\0"
        if last:
            return bytes(out)


class Refuser:
    """An app that checks credentials first and answers 401 without reading the body."""

    def __init__(self) -> None:
        self.inputs: List[Any] = []
        self.lengths: List[str] = []

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        self.inputs.append(environ["wsgi.input"])
        self.lengths.append(environ["CONTENT_LENGTH"])
        start_response("401 Unauthorized", [("Content-Length", "2")])
        return [b"no"]


def test_an_app_that_refuses_without_reading_never_pays_for_decoding() -> None:
    """1 GiB declared in 47 KB: the app answers 401, and nothing was decoded."""
    refuser = Refuser()
    app = ZstdMiddleware(refuser, max_request_size=4 * 1024 * MIB)
    bomb = rle_frame(MIB) * 1024
    tracemalloc.start()
    try:
        status, _, body = call(app, body=bomb, headers=ZSTD)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 401 and body == b"no"
    assert refuser.lengths == [str(1024 * MIB)]  # the length, from the frame headers
    assert refuser.inputs[0].decoded_bytes == 0
    assert peak < 4 * MIB


def _django_like_reader(environ: Dict[str, Any]) -> bytes:
    """Reads as Django's LimitedStream and multipart parser do: CONTENT_LENGTH, then pieces."""
    stream, remaining = environ["wsgi.input"], int(environ["CONTENT_LENGTH"])
    parts: List[bytes] = []
    line = stream.readline(min(remaining, 64 * 1024))  # the first boundary line
    remaining -= len(line)
    parts.append(line)
    while remaining > 0:
        block = stream.read(min(remaining, 64 * 1024))
        if not block:
            break
        remaining -= len(block)
        parts.append(block)
    return b"".join(parts)


def test_the_app_gets_the_decoded_length_and_exact_bytes_by_read_and_readline() -> None:
    payload = b"--B\r\nContent-Disposition: form-data\r\n\r\n" + bytes(range(256)) * 9000 + b"\r\n"
    packed = codec.pack(payload, chunk_size=64 * 1024)
    got: List[bytes] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        assert environ["CONTENT_LENGTH"] == str(len(payload))
        assert "HTTP_CONTENT_ENCODING" not in environ
        got.append(_django_like_reader(environ))
        assert environ["wsgi.input"].read() == b""  # at the end
        start_response("201 Created", [("Content-Length", "0")])
        return []

    assert call(ZstdMiddleware(app), body=packed, headers=ZSTD)[0] == 201
    assert got == [payload]
    lines: List[List[bytes]] = []

    def line_app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        lines.append(list(environ["wsgi.input"]))
        start_response("204 No Content", [])
        return []

    text = b"".join(b"line %d\n" % i for i in range(50_000)) + b"no newline at the end"
    assert call(ZstdMiddleware(line_app), body=codec.pack(text), headers=ZSTD)[0] == 204
    assert b"".join(lines[0]) == text and len(lines[0]) == 50_001


class Swallower:
    """An app that reads the body and turns any read error into its own 500 (as Django does)."""

    def __init__(self, *, catch: bool = True) -> None:
        self.catch = catch
        self.errors: List[BaseException] = []

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            while environ["wsgi.input"].read(MIB):
                pass
        except OSError as exc:
            self.errors.append(exc)
            if not self.catch:
                raise
            start_response("500 Internal Server Error", [("Content-Length", "4")])
            return [b"oops"]
        start_response("201 Created", [("Content-Length", "0")])
        return []


@pytest.mark.parametrize("catch", [True, False], ids=["app-answers-500", "error-escapes"])
def test_a_limit_passed_mid_read_is_413_and_corruption_400_whatever_the_app_does(
    catch: bool,
) -> None:
    # 512 MiB from 23 KB: past the ratio limit (1024 x 23 KB + 16 MiB) while the app reads.
    bomb = rle_frame(MIB) * 512
    swallower = Swallower(catch=catch)
    status, headers, body = call(ZstdMiddleware(swallower), body=bomb, headers=ZSTD)
    assert status == 413, body
    assert "too large" in json.loads(body)["detail"] and headers["accept-encoding"] == "zstd"
    assert isinstance(swallower.errors[0], BodyDecodingError)
    # A frame whose blocks decode to less than its header declares: found mid-read.
    liar = rle_frame(MIB) + rle_frame(1024, declared=MIB) + rle_frame(MIB)
    status, _, body = call(ZstdMiddleware(Swallower(catch=catch)), body=liar, headers=ZSTD)
    assert status == 400, body
    assert "invalid zstd body" in json.loads(body)["detail"]


def test_the_last_byte_is_handed_out_only_after_the_stream_checks_out() -> None:
    """A corrupt checksum at the very end: the app never sees a complete body."""
    payload = bytes(range(256)) * 4096
    # One frame with its size and a content checksum (its last 4 bytes), no seek table:
    # nothing but decoding can find the flipped checksum.
    packed = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(payload))
    assert codec.inspect(bytes(packed)).decompressed_size == len(payload)
    packed[-1] ^= 0xFF
    received: List[int] = []

    def app(environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        total = 0
        try:
            while True:
                block = environ["wsgi.input"].read(100_000)
                if not block:
                    break
                total += len(block)
        finally:
            received.append(total)
        start_response("201 Created", [("Content-Length", "0")])
        return []

    status, _, body = call(ZstdMiddleware(app), body=bytes(packed), headers=ZSTD)
    assert status == 400, body
    assert received[0] < len(payload)


def test_bodies_without_declared_sizes_are_decoded_up_front_within_their_own_limit() -> None:
    foreign = zstandard.ZstdCompressor(write_content_size=False)
    small = foreign.compress(b"abc" * 100_000)
    refuser = Refuser()
    app = ZstdMiddleware(refuser, max_undeclared_size=MIB)
    assert call(app, body=small, headers=ZSTD)[0] == 401
    assert refuser.lengths == [str(300_000)]
    status, _, body = call(app, body=foreign.compress(b"abc" * 500_000), headers=ZSTD)
    assert status == 413 and "declare" in json.loads(body)["detail"]
    assert len(refuser.lengths) == 1  # never reached the app


def test_the_defaults_suit_a_server_on_the_internet() -> None:
    app = ZstdMiddleware(Recorder())
    assert app.max_request_size == DEFAULT_MAX_REQUEST_SIZE <= 4 * 1024**3
    assert app.max_ratio == DEFAULT_MAX_RATIO <= 1024
    assert app.max_undeclared_size == DEFAULT_MAX_UNDECLARED_SIZE <= 64 * MIB
    # A declared size over the limit: refused before the app runs, nothing decoded.
    refuser = Refuser()
    status, _, _ = call(ZstdMiddleware(refuser), body=rle_frame(5 * 1024**3), headers=ZSTD)
    assert status == 413 and refuser.lengths == []
