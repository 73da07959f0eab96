"""Shared fixtures of the integration tests: a real dev FL server and notification sinks.

Fixtures (stable interface, other test modules rely on them):

- ``devserver``: a started :class:`fl_sidecar.devserver.DevServer` on a free
  loopback port, wrapped in a :class:`DevServerHandle` (``.url``, ``.server``,
  and helpers that do the operator's setup calls over real HTTP:
  ``create_user``, ``upload_model``, ``create_training``, ``add_clients``,
  ``start_training``, ``training``, ``request``, ``wait_idle``).
- ``notification_sink``: a factory of :class:`NotificationSink` HTTP servers
  (port 0) that record the notification bodies they receive.
- ``workdir``: a fresh short-path directory for a sidecar's socket and
  spool (``sidecar_harness.short_tempdir``), removed after the test.
- ``tiny_model``: a factory ``tiny_model(seed=0) -> bytes`` of a small pickled
  ``nn.Sequential`` (torch.save).
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import shutil
import threading
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import pytest

from fl_sidecar.devserver import DevServer

if TYPE_CHECKING:
    from trainer_stack import TrainerStack

__all__ = [
    "DevServerHandle",
    "HttpResult",
    "NotificationSink",
    "User",
    "encode_multipart",
]


@dataclass
class User:
    """A user created on the dev server (``password`` kept so tests can use Basic auth)."""

    id: str
    username: str
    password: str
    token: str
    message_endpoint: str

    def basic(self) -> str:
        """``Authorization`` value for Basic username:password."""
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def token_header(self) -> str:
        """``Authorization`` value for ``Token <token>``."""
        return f"Token {self.token}"


@dataclass
class HttpResult:
    """One HTTP answer: status, headers (lower-case names) and the whole body."""

    status: int
    headers: Dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


FileField = Tuple[str, str, bytes]  # (field name, file name, data)


def encode_multipart(
    fields: Sequence[Tuple[str, str]], files: Sequence[FileField] = ()
) -> Tuple[str, bytes]:
    """Encode a multipart/form-data body like the reference client; returns (content type, body)."""
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields:
        out.write(f"--{boundary}\r\n".encode())
        out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode("utf-8") + b"\r\n")
    for name, filename, data in files:
        out.write(f"--{boundary}\r\n".encode())
        out.write(
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", out.getvalue()


class DevServerHandle:
    """A running dev server plus the setup calls tests need, all over real HTTP."""

    def __init__(self, server: DevServer) -> None:
        self.server = server
        self.url = server.url
        parsed = urllib.parse.urlsplit(self.url)
        self.host = parsed.hostname or "127.0.0.1"
        self.port = parsed.port or 80
        self._counter = 0
        self._lock = threading.Lock()

    def request(
        self,
        method: str,
        path: str,
        *,
        user: Optional[User] = None,
        auth: Optional[str] = None,
        json_body: Any = None,
        body: Optional[bytes] = None,
        content_type: Optional[str] = None,
        headers: Optional[Mapping[str, str]] = None,
        timeout: float = 30.0,
    ) -> HttpResult:
        """Send one request with http.client; ``user`` authenticates with its token."""
        all_headers: Dict[str, str] = dict(headers or {})
        if user is not None:
            all_headers["Authorization"] = user.token_header()
        if auth is not None:
            all_headers["Authorization"] = auth
        if json_body is not None:
            body = json.dumps(json_body).encode()
            content_type = "application/json"
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            data = response.read()
            answer = {k.lower(): v for k, v in response.getheaders()}
            return HttpResult(response.status, answer, data)
        finally:
            conn.close()

    def create_user(
        self,
        username: Optional[str] = None,
        password: str = "secret-pw",
        *,
        message_endpoint: str = "http://127.0.0.1:9/",
        actor: bool = False,
        client: bool = True,
    ) -> User:
        """``POST /api/users/``; returns the new user (asserts 201)."""
        with self._lock:
            self._counter += 1
            username = username or f"user{self._counter}-{uuid.uuid4().hex[:6]}"
        result = self.request(
            "POST",
            "/api/users/",
            json_body={
                "username": username,
                "password": password,
                "message_endpoint": message_endpoint,
                "actor": actor,
                "client": client,
                "first_name": "Test",
                "last_name": "User",
                "email": f"{username}@example.invalid",
            },
        )
        assert result.status == 201, result.body
        data = result.json()
        return User(data["id"], username, password, data["token"], message_endpoint)

    def upload_model(self, user: User, data: bytes, *, name: str = "model") -> str:
        """``POST /api/models/`` (global model); returns its id (asserts 201)."""
        content_type, body = encode_multipart(
            [("name", name), ("description", "test model")], [("model_file", "model_file", data)]
        )
        result = self.request(
            "POST", "/api/models/", user=user, body=body, content_type=content_type
        )
        assert result.status == 201, result.body
        return str(result.json()["model_id"])

    def create_training(
        self,
        actor: User,
        model_id: str,
        clients: Sequence[Union[User, str]] = (),
        *,
        target_num_updates: int = 2,
        metric_names: Sequence[str] = ("accuracy",),
        aggregation_method: str = "FedAvg",
    ) -> str:
        """``POST /api/trainings/``; returns the training id (asserts 201)."""
        result = self.request(
            "POST",
            "/api/trainings/",
            user=actor,
            json_body={
                "model_id": model_id,
                "target_num_updates": target_num_updates,
                "metric_names": list(metric_names),
                "aggregation_method": aggregation_method,
                "clients": [c.id if isinstance(c, User) else c for c in clients],
            },
        )
        assert result.status == 201, result.body
        return str(result.json()["training_id"])

    def add_clients(
        self, actor: User, training_id: str, clients: Sequence[Union[User, str]]
    ) -> None:
        """``PUT /api/trainings/<id>/clients/`` (asserts 202)."""
        ids = [c.id if isinstance(c, User) else c for c in clients]
        result = self.request(
            "PUT", f"/api/trainings/{training_id}/clients/", user=actor, json_body={"clients": ids}
        )
        assert result.status == 202, result.body

    def start_training(self, actor: User, training_id: str) -> None:
        """``POST /api/trainings/<id>/start/`` (asserts 202)."""
        result = self.request("POST", f"/api/trainings/{training_id}/start/", user=actor)
        assert result.status == 202, result.body

    def training(self, user: User, training_id: str) -> Dict[str, Any]:
        """``GET /api/trainings/<id>/`` as a dict (asserts 200)."""
        result = self.request("GET", f"/api/trainings/{training_id}/", user=user)
        assert result.status == 200, result.body
        data: Dict[str, Any] = result.json()
        return data

    def setup_training(
        self,
        model: bytes,
        endpoints: Sequence[str],
        *,
        target_num_updates: int = 2,
        start: bool = True,
    ) -> Tuple[User, List[User], str, str]:
        """An actor, one client per endpoint, a global model and a training (started).

        Returns:
            (actor, clients, model id, training id).
        """
        actor = self.create_user(actor=True, client=False)
        clients = [self.create_user(message_endpoint=e) for e in endpoints]
        model_id = self.upload_model(actor, model)
        training_id = self.create_training(
            actor, model_id, clients, target_num_updates=target_num_updates
        )
        if start:
            self.start_training(actor, training_id)
        return actor, clients, model_id, training_id

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until aggregations finish and notifications are delivered (True if so)."""
        return self.server.wait_idle(timeout)


class NotificationSink:
    """An HTTP server (port 0) recording each POSTed JSON body, in arrival order.

    ``status`` is the answer it gives; ``delay`` (an Event) holds answers back
    while it is cleared, to play a slow endpoint.
    """

    def __init__(self, status: int = 200, port: int = 0) -> None:
        self.status = status
        self.bodies: List[Any] = []
        self.raw: List[bytes] = []
        self.headers: List[Dict[str, str]] = []
        self.release = threading.Event()
        self.release.set()
        self._cond = threading.Condition()
        sink = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length)
                sink.release.wait(30)
                with sink._cond:
                    sink.raw.append(data)
                    sink.headers.append({k.lower(): v for k, v in self.headers.items()})
                    try:
                        sink.bodies.append(json.loads(data))
                    except ValueError:
                        sink.bodies.append(None)
                    sink._cond.notify_all()
                self.send_response(sink.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 20.0) -> List[Any]:
        """Wait until ``count`` bodies arrived; returns them (fails the test on timeout)."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.bodies) >= count, timeout)
            assert ok, f"expected {count} notifications, got {len(self.bodies)}: {self.bodies}"
            return list(self.bodies)

    def types(self) -> List[str]:
        """The notification types received so far."""
        with self._cond:
            return [b["notification_type"] for b in self.bodies if isinstance(b, dict)]

    def close(self) -> None:
        """Stop the server."""
        self.release.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def make_devserver(tmp_path: Any) -> Iterator[Callable[..., DevServerHandle]]:
    """Factory ``make_devserver(**options)`` of started dev FL servers, all stopped after the test.

    The suite's defaults (fast password hashing, short notification retries,
    a data directory under ``tmp_path``) apply unless ``options`` (any of
    :class:`DevServer`'s) say otherwise.
    """
    servers: List[DevServer] = []

    def make(**options: Any) -> DevServerHandle:
        settings: Dict[str, Any] = {
            "data_dir": tmp_path / ("devserver-data" + (f"-{len(servers)}" if servers else "")),
            "notify_timeout": 5.0,
            "notify_retry_delays": (0.05, 0.1, 0.2),
            "password_iterations": 1000,
        }
        settings.update(options)
        server = DevServer(**settings)
        server.start()
        servers.append(server)
        return DevServerHandle(server)

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture
def devserver(make_devserver: Callable[..., DevServerHandle]) -> DevServerHandle:
    """A started dev FL server with the suite's defaults (see ``make_devserver``)."""
    return make_devserver()


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh short-path directory for a sidecar's socket and spool, removed afterwards."""
    from sidecar_harness import short_tempdir

    path = short_tempdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def notification_sink() -> Iterator[Callable[..., NotificationSink]]:
    """Factory of :class:`NotificationSink` servers, all closed after the test."""
    sinks: List[NotificationSink] = []

    def make(status: int = 200, port: int = 0) -> NotificationSink:
        sink = NotificationSink(status, port)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close()


@pytest.fixture
def tiny_model() -> Callable[..., bytes]:
    """Factory ``tiny_model(seed=0) -> bytes``: torch.save of a small nn.Sequential."""

    def make(seed: int = 0) -> bytes:
        import torch

        torch.manual_seed(seed)
        module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        buffer = io.BytesIO()
        torch.save(module, buffer)
        return buffer.getvalue()

    return make


@pytest.fixture(scope="module")
def stack() -> Iterator[TrainerStack]:
    """A dev server plus sidecar subprocesses (``stack.add_client()``), one per test module."""
    from trainer_stack import TrainerStack  # it builds on this module's fixtures' types

    s = TrainerStack()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="module")
def quirky_stack() -> Iterator[TrainerStack]:
    """Like ``stack``, but the dev server repeats and reorders notifications as the real one."""
    from trainer_stack import TrainerStack

    s = TrainerStack(notification_quirks=True)
    try:
        yield s
    finally:
        s.close()
