"""The real sidecar against an FL server that misbehaves on purpose.

A tiny HTTP server on loopback (``http.server`` in a thread, real sockets)
plays the FL server: it serves zstd bombs as downloads, and echoes the
request's ``Authorization`` header in its error bodies. The sidecar is the real
``fl-sidecar serve`` subprocess; the trainer's side is the generated gRPC stub.

- a bomb is RESOURCE_EXHAUSTED naming the limit, and what the sidecar wrote to
  disk meanwhile (``wchar`` of ``/proc/<pid>/io``) stays small;
- no form of a credential reaches the trainer's gRPC error or the sidecar's log.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple
from urllib.parse import quote

import grpc
import pytest
from sidecar_harness import SidecarProcess, running_sidecar

from fl_sidecar.v1 import sidecar_pb2 as pb

pytestmark = pytest.mark.slow

_RLE_BLOCK = 128 * 1024  # zstd's largest block


def rle_frame(size: int, *, declared: Optional[int] = None) -> bytes:
    """One real zstd frame of ``size`` zero bytes made of RLE blocks (4 bytes per 128 KiB).

    ``declared``: the content size its header states (``size`` unless told).
    """
    out = bytearray(b"\x28\xb5\x2f\xfd")  # frame magic
    # Descriptor 0xC0: an 8-byte content size, no single segment, no checksum;
    # window descriptor 0x38: a 128 KiB window.
    out += bytes([0xC0, 0x38]) + struct.pack("<Q", size if declared is None else declared)
    remaining = size
    while True:
        n = min(_RLE_BLOCK, remaining)
        remaining -= n
        last = int(remaining == 0)
        out += ((n << 3) | (1 << 1) | last).to_bytes(3, "little") + b"\0"
        if last:
            return bytes(out)


@dataclass
class Answer:
    """What the hostile server answers to every request."""

    status: int = 200
    body: bytes = b""
    headers: List[Tuple[str, str]] = field(default_factory=list)
    echo_authorization: bool = False  # put the request's Authorization header in the body


class HostileServer:
    """An HTTP/1.1 server on a free loopback port that answers as told, recording requests."""

    def __init__(self) -> None:
        self.answer = Answer()
        self.seen: List[Dict[str, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _reply(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                outer.seen.append({"method": self.command, "path": self.path, **self.headers})
                answer = outer.answer
                body = answer.body
                if answer.echo_authorization:
                    echoed = self.headers.get("Authorization", "")
                    body = body.replace(b"{auth}", echoed.encode())
                    body = body.replace(b"{auth_url}", quote(echoed, safe="").encode())
                    param = echoed.split(" ", 1)[-1]
                    body = body.replace(b"{param}", param.encode())
                self.send_response(answer.status)
                for name, value in answer.headers:
                    self.send_header(name, value)
                if not any(name.lower() == "content-length" for name, _ in answer.headers):
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # The sidecar may refuse the answer before reading all of it.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = _reply

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def hostile() -> Iterator[HostileServer]:
    server = HostileServer()
    try:
        yield server
    finally:
        server.close()


def _bytes_written(sidecar: SidecarProcess) -> int:
    """Bytes the sidecar process passed to write() so far (``wchar`` of /proc/<pid>/io)."""
    for line in Path(f"/proc/{sidecar.process.pid}/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/<pid>/io")


def _download_error(sidecar: SidecarProcess, model_id: str = "m1") -> grpc.RpcError:
    request = pb.DownloadModelRequest(model_id=model_id, format=pb.MODEL_FORMAT_TORCH)
    with pytest.raises(grpc.RpcError) as caught:
        for _ in sidecar.stub.DownloadModel(request, timeout=120):
            pass
    return caught.value


_ZSTD = [("Content-Encoding", "zstd"), ("Content-Type", "application/octet-stream")]


def test_a_bomb_declared_over_the_default_limit_writes_nothing(hostile: HostileServer) -> None:
    """160 KB that decode to 5 GiB, over the 4 GiB default: refused before decoding."""
    hostile.answer = Answer(body=rle_frame(5 * 1024**3), headers=_ZSTD)
    with running_sidecar(server_url=hostile.url, args=["--token", "t"], notifications=False) as sc:
        before = _bytes_written(sc)
        error = _download_error(sc)
        written = _bytes_written(sc) - before
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert str(4 * 1024**3) in (error.details() or "")  # names the limit
        assert written < 1024 * 1024, written
        assert list((sc.workdir / "spool").rglob("*.part")) == []


def test_a_bomb_of_small_frames_stops_at_the_limit(hostile: HostileServer) -> None:
    """1 GiB in 1 MiB frames that each declare their size honestly: stopped at the limit."""
    limit = 8 * 1024 * 1024
    hostile.answer = Answer(body=rle_frame(1024 * 1024) * 1024, headers=_ZSTD)
    args = ["--token", "t", "--max-model-size", str(limit)]
    with running_sidecar(server_url=hostile.url, args=args, notifications=False) as sc:
        before = _bytes_written(sc)
        error = _download_error(sc)
        written = _bytes_written(sc) - before
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert str(limit) in (error.details() or "")
        assert written <= limit + 1024 * 1024, written
        assert list((sc.workdir / "spool").rglob("*.part")) == []


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        # identity: the Content-Length alone says it is too big
        (b"\0" * (9 * 1024 * 1024), [("Content-Type", "application/octet-stream")]),
        # zstd: a body too long to decode to less than the limit
        (b"\0" * (9 * 1024 * 1024), _ZSTD),
        # zstd: the first frame's header declares more than the limit
        (rle_frame(1024, declared=9 * 1024 * 1024), _ZSTD),
    ],
    ids=["identity-length", "zstd-length", "zstd-frame-header"],
)
def test_a_declared_size_over_the_limit_is_refused_before_writing(
    hostile: HostileServer, body: bytes, headers: List[Tuple[str, str]]
) -> None:
    limit = 8 * 1024 * 1024
    hostile.answer = Answer(body=body, headers=headers)
    args = ["--token", "t", "--max-model-size", str(limit)]
    with running_sidecar(server_url=hostile.url, args=args, notifications=False) as sc:
        before = _bytes_written(sc)
        error = _download_error(sc)
        written = _bytes_written(sc) - before
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert str(limit) in (error.details() or "")
        assert written < 1024 * 1024, written


# --- credentials echoed by the server ----------------------------------------------


def _forms_of_basic(username: str, password: str) -> List[str]:
    pair = f"{username}:{password}".encode()
    standard = base64.b64encode(pair).decode()
    urlsafe = base64.urlsafe_b64encode(pair).decode()
    return [
        password,
        pair.decode(),
        standard,
        standard.rstrip("="),
        urlsafe,
        urlsafe.rstrip("="),
        f"Basic {standard}",
        quote(password, safe=""),
        quote(standard, safe=""),
    ]


def _forms_of_token(token: str) -> List[str]:
    return [token, f"Token {token}", quote(token, safe="")]


def _everything_the_trainer_sees(error: grpc.RpcError) -> str:
    parts = [error.details() or "", repr(error.trailing_metadata())]
    debug = getattr(error, "debug_error_string", None)
    if callable(debug):
        parts.append(str(debug()))
    return "\n".join(parts)


# The server's answer: the echoed header in JSON, in plain text, and URL-encoded.
_ECHO = json.dumps({"detail": "Invalid header: {auth}"}).encode()
_ECHO_TEXT = b"<html>bad request from {auth} (url: /login?a={auth_url}, value: {param})</html>"


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.parametrize("body", [_ECHO, _ECHO_TEXT], ids=["json", "text"])
def test_an_echoed_authorization_header_reaches_neither_trainer_nor_log(
    hostile: HostileServer, tmp_path: Path, status: int, body: bytes
) -> None:
    """The sidecar's own Basic and Token credentials, and a trainer's per-call ones."""
    hostile.answer = Answer(
        status=status,
        body=body,
        headers=[("Content-Type", "application/json" if body is _ECHO else "text/html")],
        echo_authorization=True,
    )
    # Characters that base64 and URL encoding change, so that each form differs.
    username, password = "alice", "Pw+/=:&-7c1e9a-secret"
    password_file = tmp_path / "pw"
    password_file.write_text(password + "\n")
    sidecar_token, trainer_token = "tok-sidecar-" + "a1" * 10, "tok-trainer-" + "b2" * 10
    trainer_user, trainer_password = "bob", "Bob+Pw/33d0f2=secret"
    common = ["--http-retries", "0", "--log-level", "DEBUG"]
    setups = [
        (["--username", username, "--password-file", str(password_file)], None),
        (["--token", sidecar_token], None),
        (["--token", sidecar_token], pb.Credentials(token=trainer_token)),
        (
            ["--token", sidecar_token],
            pb.Credentials(basic=pb.BasicAuth(username=trainer_user, password=trainer_password)),
        ),
    ]
    secrets = [
        *_forms_of_basic(username, password),
        *_forms_of_basic(trainer_user, trainer_password),
        *_forms_of_token(sidecar_token),
        *_forms_of_token(trainer_token),
    ]
    for args, credentials in setups:
        with running_sidecar(
            server_url=hostile.url, args=[*args, *common], notifications=False
        ) as sc:
            request = pb.DownloadModelRequest(
                model_id="m1", format=pb.MODEL_FORMAT_TORCH, credentials=credentials
            )
            with pytest.raises(grpc.RpcError) as caught:
                for _ in sc.stub.DownloadModel(request, timeout=60):
                    pass
            seen = _everything_the_trainer_sees(caught.value)
            assert "Invalid header" in seen or "bad request" in seen  # the server's text came
            assert "***" in seen
            for secret in secrets:
                assert secret not in seen, (args, secret)
            with pytest.raises(grpc.RpcError) as caught:
                sc.stub.GetTraining(
                    pb.GetTrainingRequest(training_id="t1", credentials=credentials), timeout=60
                )
            seen = _everything_the_trainer_sees(caught.value)
            assert "***" in seen
            for secret in secrets:
                assert secret not in seen, (args, secret)
            log = sc.log_text()
        # The server really echoed a credential each time.
        assert all("Authorization" in request for request in hostile.seen)
        assert "***" in log
        for secret in secrets:
            assert secret not in log, (args, secret)
