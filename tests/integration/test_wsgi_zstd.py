"""Content-coding negotiation over real sockets: the client, the middleware, plain servers.

- the dev server (behind the middleware): zstd both ways, checked on the wire
  through the fault proxy in pass-through mode;
- a recording WSGI app behind the middleware: the decoded upload is exact;
- a plain WSGI app without it (served by wsgiref on port 0): identity, no 415 loop;
- a server that advertises zstd but answers 415: one fallback, remembered;
- hostile zstd bodies against the dev server: 4xx, never 5xx.
"""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import http.client
import io
import json
import os
import socketserver
import threading
import tracemalloc
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import zstandard
from conftest import DevServerHandle
from faultproxy import FaultProxy

from fl_sidecar import codec, errors
from fl_sidecar.devserver import DevServer
from fl_sidecar.flserver import Credentials, FlServerClient
from fl_sidecar.wsgi_zstd import ENVIRON_WIRE_BYTES, ZstdMiddleware

MODEL_BYTES = b"\x00\x01\x02\x03torch-ish" * 40_000  # 520 KB, compressible


def compressible_model(seed: int = 0) -> bytes:
    """torch.save of an nn.Linear(256, 256) with small integer weights (compresses well)."""
    import torch

    module = torch.nn.Linear(256, 256)
    with torch.no_grad():
        module.weight.copy_((torch.arange(256 * 256).reshape(256, 256) + seed) % 7 - 3.0)
        module.bias.fill_(float(seed))
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class RecordingApp:
    """A minimal FL-like server: GET serves MODEL_BYTES, POST records the body it got.

    ``refuse_codings``: answer 415 to any Content-Encoding (and advertise zstd anyway
    when ``advertise`` is set), like a server whose decoding broke.
    """

    def __init__(self, *, advertise: bool = False, refuse_codings: bool = False) -> None:
        self.advertise = advertise
        self.refuse_codings = refuse_codings
        self.requests: List[Dict[str, Any]] = []
        self._lock = threading.Lock()

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        record = {
            "method": environ["REQUEST_METHOD"],
            "path": environ["PATH_INFO"],
            "content_encoding": environ.get("HTTP_CONTENT_ENCODING"),
            "content_type": environ.get("CONTENT_TYPE", ""),
            "accept_encoding": environ.get("HTTP_ACCEPT_ENCODING"),
            "wire_bytes": environ.get(ENVIRON_WIRE_BYTES),
            "body": body,
        }
        with self._lock:
            self.requests.append(record)
        extra = [("Accept-Encoding", "zstd")] if self.advertise else []
        if self.refuse_codings and record["content_encoding"]:
            start_response("415 Unsupported Media Type", [("Content-Length", "0"), *extra])
            return [b""]
        if record["method"] == "GET":
            start_response(
                "200 OK",
                [
                    ("Content-Type", "application/octet-stream"),
                    ("Content-Length", str(len(MODEL_BYTES))),
                    *extra,
                ],
            )
            return [MODEL_BYTES]
        answer = json.dumps({"detail": "Model Update Accepted"}).encode()
        status = "201 Created" if record["method"] == "POST" else "200 OK"
        start_response(
            status,
            [("Content-Type", "application/json"), ("Content-Length", str(len(answer))), *extra],
        )
        return [answer]

    def seen(self, method: str) -> List[Dict[str, Any]]:
        with self._lock:
            return [r for r in self.requests if r["method"] == method]


@pytest.fixture
def serve() -> Iterator[Callable[[Any], str]]:
    """Factory: serve a WSGI app with wsgiref on a free loopback port; returns its URL."""
    servers: List[Tuple[WSGIServer, threading.Thread]] = []

    def start(app: Any) -> str:
        server = make_server(
            "127.0.0.1", 0, app, server_class=_ThreadingServer, handler_class=_QuietHandler
        )
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.daemon = True
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _form(record: Dict[str, Any]) -> Dict[str, Any]:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + record["content_type"].encode() + b"\r\n\r\n" + record["body"]
    )
    out: Dict[str, Any] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        value = part.get_payload(decode=True)
        out.setdefault(str(name), []).append(value)
    return out


def test_zstd_both_ways_with_the_dev_server_on_the_wire(
    devserver: DevServerHandle, tmp_path: Path
) -> None:
    model = compressible_model(0)
    # Two participants, one uploads: the round stays open, nothing is aggregated.
    _, clients, model_id, training_id = devserver.setup_training(
        model, ["http://127.0.0.1:9/", "http://127.0.0.1:9/"]
    )
    local = tmp_path / "local.pt"
    local.write_bytes(compressible_model(1))
    with FaultProxy((devserver.host, devserver.port)) as proxy, FlServerClient(
        proxy.url, Credentials.token(clients[0].token)
    ) as client:
        got = client.download_model(model_id, tmp_path / "global.pt")
        assert (tmp_path / "global.pt").read_bytes() == model
        assert got.content_encoding == "zstd" and got.raw_bytes == len(model)
        assert got.wire_bytes < len(model) // 2
        assert client.negotiated_coding == "zstd"
        (get,) = proxy.seen("GET", f"/api/models/{model_id}/")
        assert get.headers["accept-encoding"] == "zstd"
        head, _, body_start = get.response_head.partition(b"\r\n\r\n")
        assert b"content-encoding: zstd" in head.lower()
        assert codec.is_zstd(body_start[:4])

        sent = client.upload_model(model_id, local, round=0, sample_size=7, metrics={"a": 1.0})
        assert sent.status == 201 and sent.content_encoding == "zstd"
        (post,) = proxy.seen("POST", f"/api/models/{model_id}/")
        assert post.headers["content-encoding"] == "zstd"
        assert post.headers["content-type"].startswith("multipart/form-data; boundary=")
        assert codec.is_zstd(post.body_prefix[:4])
        assert post.body_bytes == sent.wire_bytes < local.stat().st_size // 2
        assert client.get_training(training_id)["local_models_arrived"] == 1
    assert devserver.wait_idle(20)


def test_upload_decoded_by_the_middleware_is_exact(serve: Any, tmp_path: Path) -> None:
    app = RecordingApp()
    url = serve(ZstdMiddleware(app, max_request_size=64 * 1024 * 1024))
    local = tmp_path / "local.pt"
    local.write_bytes(MODEL_BYTES + b"local")
    with FlServerClient(url, Credentials.token("t0k3n")) as client:
        client.download_model("m1", tmp_path / "global.pt")  # teaches the coding
        assert client.negotiated_coding == "zstd"
        sent = client.upload_model(
            "m1", local, round=3, sample_size=12, metrics={"acc": 0.5, "loss": 2.25}, owner="me"
        )
    assert sent.content_encoding == "zstd" and sent.wire_bytes < sent.raw_bytes // 4
    assert [r["method"] for r in app.requests] == ["GET", "POST"]
    post = app.seen("POST")[0]
    assert post["content_encoding"] is None  # decoded before the app saw it
    assert post["wire_bytes"] == sent.wire_bytes
    form = _form(post)
    assert form["model_file"] == [local.read_bytes()]
    assert form["round"] == [b"3"] and form["sample_size"] == [b"12"] and form["owner"] == [b"me"]
    assert form["metric_names"] == [b"acc", b"loss"]
    assert form["metric_values"] == [b"0.5", b"2.25"]
    assert sent.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()


def test_a_known_digest_is_reported_not_recomputed(serve: Any, tmp_path: Path) -> None:
    local = tmp_path / "local.pt"
    local.write_bytes(MODEL_BYTES + b"known")
    # A digest the file does not have: reported as given proves the file was not hashed.
    told = "ab" * 32
    zstd_app, plain_app = RecordingApp(), RecordingApp()
    for app, wrapped, coding in (
        (zstd_app, ZstdMiddleware(zstd_app, max_request_size=64 * 1024 * 1024), "zstd"),
        (plain_app, plain_app, "identity"),
    ):
        with FlServerClient(serve(wrapped), Credentials.token("t0k3n")) as client:
            client.get_training("t1")  # any answer teaches the coding
            sent = client.upload_model("m1", local, round=0, sample_size=1, sha256=told)
            plain = client.upload_model("m1", local, round=0, sample_size=1)
        assert sent.content_encoding == plain.content_encoding == coding
        assert sent.sha256 == told
        assert plain.sha256 == hashlib.sha256(local.read_bytes()).hexdigest()
        assert [_form(post)["model_file"] for post in app.seen("POST")] == [
            [local.read_bytes()]
        ] * 2


def test_plain_server_without_the_middleware_gets_identity(serve: Any, tmp_path: Path) -> None:
    app = RecordingApp()
    url = serve(app)
    local = tmp_path / "local.pt"
    local.write_bytes(MODEL_BYTES)
    with FlServerClient(url, Credentials.token("t")) as client:
        got = client.download_model("m1", tmp_path / "g.pt")
        assert got.content_encoding == "identity" and got.wire_bytes == len(MODEL_BYTES)
        assert (tmp_path / "g.pt").read_bytes() == MODEL_BYTES
        assert client.negotiated_coding == "identity"
        for _ in range(2):
            sent = client.upload_model("m1", local, round=0, sample_size=1)
            assert sent.status == 201 and sent.content_encoding == "identity"
    assert app.seen("GET")[0]["accept_encoding"] == "zstd"
    posts = app.seen("POST")
    assert len(posts) == 2 and all(p["content_encoding"] is None for p in posts)
    assert _form(posts[0])["model_file"] == [MODEL_BYTES]
    # A fresh client that uploads first sends identity without asking anything first.
    with FlServerClient(url, Credentials.token("t")) as fresh:
        assert fresh.upload_model("m1", local, round=0, sample_size=1).content_encoding == (
            "identity"
        )
        fresh.upload_metrics("m1", {"acc": 1.0})
        assert fresh.negotiated_coding == "identity"
    assert [r["method"] for r in app.requests] == ["GET", "POST", "POST", "POST", "POST"]


def test_the_coding_is_learnt_from_answers_never_from_a_probe(serve: Any, tmp_path: Path) -> None:
    """No OPTIONS, ever: an upload before any answer goes identity, and its answer teaches."""
    app = RecordingApp()
    url = serve(ZstdMiddleware(app, max_request_size=64 * 1024 * 1024))
    local = tmp_path / "local.pt"
    local.write_bytes(MODEL_BYTES)
    with FlServerClient(url, Credentials.token("t")) as client:
        assert client.negotiated_coding is None
        first = client.upload_model("m1", local, round=0, sample_size=1)
        assert first.content_encoding == "identity"
        assert client.negotiated_coding == "zstd"  # the upload's answer advertised it
        second = client.upload_model("m1", local, round=1, sample_size=1)
        assert second.content_encoding == "zstd"
    assert [r["method"] for r in app.requests] == ["POST", "POST"]
    assert all(_form(p)["model_file"] == [MODEL_BYTES] for p in app.seen("POST"))


def test_415_falls_back_to_identity_once_and_remembers(serve: Any, tmp_path: Path) -> None:
    app = RecordingApp(advertise=True, refuse_codings=True)
    url = serve(app)
    local = tmp_path / "local.pt"
    local.write_bytes(MODEL_BYTES)
    with FlServerClient(url, Credentials.token("t")) as client:
        client.get_training("t1")  # the advertisement, believed until the 415
        assert client.negotiated_coding == "zstd"
        first = client.upload_model("m1", local, round=0, sample_size=1)
        assert first.status == 201 and first.content_encoding == "identity"
        assert client.negotiated_coding == "identity"
        second = client.upload_model("m1", local, round=1, sample_size=1)
        assert second.content_encoding == "identity"
    codings = [p["content_encoding"] for p in app.seen("POST")]
    assert codings == ["zstd", None, None]


def test_incompressible_models_go_identity_unless_told(serve: Any, tmp_path: Path) -> None:
    app = RecordingApp()
    url = serve(ZstdMiddleware(app, max_request_size=1 << 26))
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(5 * 1024 * 1024))  # three 1 MiB samples, none shrinks
    with FlServerClient(url) as client:
        client.get_training("t")  # teaches the coding
        sent = client.upload_model("m", noise, round=0, sample_size=1)
        assert client.negotiated_coding == "zstd" and sent.content_encoding == "identity"
    with FlServerClient(url, min_upload_saving=0) as eager:
        eager.get_training("t")
        assert eager.upload_model("m", noise, round=0, sample_size=1).content_encoding == "zstd"
    codings = [p["content_encoding"] for p in app.seen("POST")]
    assert codings == [None, None]  # the middleware decoded the second one
    assert app.seen("POST")[1]["wire_bytes"] > 0
    assert all(_form(p)["model_file"] == [noise.read_bytes()] for p in app.seen("POST"))


def test_never_and_always_modes(serve: Any, tmp_path: Path) -> None:
    app = RecordingApp()
    url = serve(ZstdMiddleware(app, max_request_size=1 << 26))
    local = tmp_path / "local.pt"
    local.write_bytes(MODEL_BYTES)
    with FlServerClient(url, compression="never") as never:
        assert never.download_model("m", tmp_path / "a.pt").content_encoding == "identity"
        assert never.upload_model("m", local, round=0, sample_size=1).content_encoding == "identity"
    with FlServerClient(url, compression="always") as always:
        assert always.upload_model("m", local, round=0, sample_size=1).content_encoding == "zstd"
    assert app.seen("GET")[0]["accept_encoding"] == "identity"
    assert [r["method"] for r in app.requests] == ["GET", "POST", "POST"]  # no probes


def _raw_request(
    url: str, body: bytes, headers: Dict[str, str], path: str = "/api/models/"
) -> Tuple[int, Dict[str, str], bytes]:
    host, port = url.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.fixture
def small_devserver(tmp_path: Path) -> Iterator[str]:
    server = DevServer(data_dir=tmp_path / "data", max_upload_size=1024 * 1024)
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


def test_dev_server_refuses_hostile_zstd_bodies_with_4xx(small_devserver: str) -> None:
    multipart = b'--B\r\nContent-Disposition: form-data; name="name"\r\n\r\nx\r\n--B--\r\n'
    packed = codec.pack(multipart * 1000)
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (256 * 1024 * 1024))
    cases: Dict[str, Tuple[bytes, str, int]] = {
        "bomb": (bomb, "zstd", 413),
        "truncated": (packed[: len(packed) // 2], "zstd", 400),
        "corrupt": (packed[:20] + b"\xff" * 8 + packed[28:], "zstd", 400),
        "not zstd": (b"hello" * 100, "zstd", 400),
        "gzip": (b"\x1f\x8b" + b"\0" * 50, "gzip", 415),
        "stacked": (packed, "zstd, zstd", 415),
    }
    for name, (body, coding, expected) in cases.items():
        status, headers, answer = _raw_request(
            small_devserver,
            body,
            {
                "Content-Encoding": coding,
                "Content-Type": "multipart/form-data; boundary=B",
                "Authorization": "Token " + "0" * 40,
            },
        )
        assert status == expected, (name, answer)
        assert headers["accept-encoding"] == "zstd", name
        assert "detail" in json.loads(answer), name
    # Still serving, and a valid zstd body reaches the app (which then wants credentials).
    status, _, answer = _raw_request(
        small_devserver,
        packed,
        {"Content-Encoding": "zstd", "Content-Type": "multipart/form-data; boundary=B"},
    )
    assert status == 401, answer


class HostileApp:
    """A server that misbehaves in the answers: bombs, corrupt zstd, huge JSON, odd codings."""

    def __init__(self, body: bytes, headers: List[Tuple[str, str]]) -> None:
        self.body = body
        self.headers = headers

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Length", str(len(self.body))), *self.headers])
        return [self.body]


def test_hostile_answers_get_typed_errors_and_leave_nothing(serve: Any, tmp_path: Path) -> None:
    packed = codec.pack(bytes(range(256)) * 4096, chunk_size=64 * 1024)
    zstd = [("Content-Encoding", "zstd")]
    cases: List[Tuple[bytes, List[Tuple[str, str]], Any]] = [
        (codec.pack(b"\0" * (8 * 1024 * 1024)), zstd, errors.SizeLimitExceededError),
        (
            zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * (8 << 20)),
            zstd,
            errors.SizeLimitExceededError,
        ),
        (packed[:100] + b"\xff" * 50 + packed[150:], zstd, errors.CorruptDataError),
        (b"not zstd at all", zstd, errors.CorruptDataError),
        (b"\x1f\x8b\x08\x00", [("Content-Encoding", "gzip")], errors.ServerError),
        (b"x" * (2 * 1024 * 1024), [], errors.SizeLimitExceededError),
    ]
    for body, headers, expected in cases:
        url = serve(HostileApp(body, headers))
        dest = tmp_path / "model.pt"
        client = FlServerClient(url, max_download_size=1024 * 1024, retries=0)
        with client, pytest.raises(expected):
            client.download_model("m", dest)
        assert not dest.exists() and list(tmp_path.iterdir()) == [], headers


def test_huge_json_answer_is_refused(serve: Any) -> None:
    url = serve(HostileApp(b"[" + b"1," * (9 * 1024 * 1024) + b"1]", []))
    with FlServerClient(url, retries=0) as client, pytest.raises(errors.ServerError) as info:
        client.get_training("t")
    assert "larger than" in str(info.value)


def test_a_bomb_under_a_large_limit_downloads_in_bounded_memory(serve: Any, tmp_path: Path) -> None:
    """64 MiB of zeros in a few KB: decoded in 4 MiB steps, never as one allocation."""
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 * 1024 * 1024))
    url = serve(HostileApp(bomb, [("Content-Encoding", "zstd")]))
    dest = tmp_path / "model.pt"
    tracemalloc.start()
    try:
        with FlServerClient(url, max_download_size=1 << 30) as client:
            got = client.download_model("m", dest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert got.raw_bytes == dest.stat().st_size == 64 * 1024 * 1024
    assert got.wire_bytes == len(bomb)
    assert peak < 24 * 1024 * 1024


def _written_by_this_process() -> int:
    """Bytes this process passed to write() so far (the dev server runs in its threads)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def test_an_unauthenticated_bomb_costs_the_dev_server_nothing(
    devserver: DevServerHandle, tiny_model: Callable[..., bytes]
) -> None:
    """1 GiB declared in 47 KB, without credentials: 401 before a byte is decoded.

    The middleware used to decode the whole body to a temp file before the app
    could refuse it (8 GiB for one 264 KB POST).
    """
    from test_sidecar_hostile_server import rle_frame

    bomb = rle_frame(1024 * 1024) * 1024
    multipart = {"Content-Encoding": "zstd", "Content-Type": "multipart/form-data; boundary=B"}
    before = _written_by_this_process()
    status, headers, answer = _raw_request(devserver.url, bomb, multipart)
    written = _written_by_this_process() - before
    assert status == 401, answer
    assert headers["accept-encoding"] == "zstd"
    assert written < 4 * 1024 * 1024, written
    # With credentials the app reads, and the ratio limit stops the bomb as it goes.
    _, clients, model_id, _ = devserver.setup_training(tiny_model(0), ["http://127.0.0.1:9/"])
    authorized = {**multipart, "Authorization": f"Token {clients[0].token}"}
    before = _written_by_this_process()
    status, _, answer = _raw_request(
        devserver.url, bomb, authorized, path=f"/api/models/{model_id}/"
    )
    written = _written_by_this_process() - before
    assert status == 413, answer
    assert "too large" in json.loads(answer)["detail"]
    assert written < 256 * 1024 * 1024, written  # the ratio limit: 1024 x 47 KB + 16 MiB
