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
from fl_sidecar.wsgi_zstd import ENVIRON_WIRE_BYTES, ZstdMiddleware

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

    app = ZstdMiddleware(counting_app, max_request_size=1024 * MIB)
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * MIB))
    tracemalloc.start()
    try:
        status, _, _ = call(app, body=bomb, headers=ZSTD)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 204 and seen == [64 * MIB]
    assert peak < 16 * MIB
