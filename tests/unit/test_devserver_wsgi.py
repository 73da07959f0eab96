"""The dev server's WSGI plumbing, router and authentication, called in-process (no sockets)."""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

from fl_sidecar.devserver.app import DevServerApp
from fl_sidecar.devserver.handlers.auth import check_password, hash_password
from fl_sidecar.devserver.notify import Notifier
from fl_sidecar.devserver.router import Router
from fl_sidecar.devserver.store import Store
from fl_sidecar.devserver.wsgi import HttpError, Request, Response

TOKEN = "t0k3n"


class _InProcess:
    """The application with one user (token ``TOKEN``) and one model, called directly."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = Store()
        self.notifier = Notifier()
        self.app = DevServerApp(self.store, str(tmp_path), self.notifier, password_iterations=1)
        self.user_id, self.model_id = str(uuid.uuid4()), str(uuid.uuid4())
        self.store.add_user(
            self.user_id,
            "u",
            hash_password("pw", 1),
            TOKEN,
            "http://127.0.0.1:9/",
            actor=False,
            client=True,
            first_name="",
            last_name="",
            email="",
            created=time.time(),
        )
        model_path = str(tmp_path / "m.pt")
        self.store.add_model(
            self.model_id, "m", "", self.user_id, model_path, 0, "torch", "{}", time.time()
        )

    def call(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = "",
        headers: Optional[Dict[str, str]] = None,
        terminated: bool = False,
    ) -> Tuple[int, Dict[str, str], bytes]:
        environ: Dict[str, Any] = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "CONTENT_TYPE": content_type,
            "wsgi.input": io.BytesIO(body),
        }
        if terminated:
            environ["wsgi.input_terminated"] = True
        else:
            environ["CONTENT_LENGTH"] = str(len(body))
        for name, value in (headers or {}).items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        answers: List[Tuple[str, List[Tuple[str, str]]]] = []
        chunks = self.app(environ, lambda status, head: answers.append((status, head)))
        data = b"".join(chunks)
        status, head = answers[0]
        return int(status.split()[0]), dict(head), data

    def close(self) -> None:
        self.app.close()
        self.notifier.close()
        self.store.close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[_InProcess]:
    app = _InProcess(tmp_path)
    try:
        yield app
    finally:
        app.close()


def test_metrics_form_without_content_length_past_the_limit_is_413(served: _InProcess) -> None:
    # Under a WSGI server that passes chunked bodies on (wsgi.input_terminated), an
    # oversized form must be refused, not cut at the limit and parsed.
    statuses = []
    for size in (100, 1024 * 1024 + 1):
        body = b"metric_names=a&metric_values=1&pad=" + b"x" * (size - 35)
        status, _, _ = served.call(
            "POST",
            f"/api/models/{served.model_id}/metrics/",
            body,
            content_type="application/x-www-form-urlencoded",
            headers={"Authorization": f"Token {TOKEN}"},
            terminated=True,
        )
        statuses.append(status)
    assert statuses == [201, 413]


def test_router_answers_options_405_and_404(served: _InProcess) -> None:
    status, headers, body = served.call("OPTIONS", f"/api/models/{served.model_id}/")
    assert (status, headers["Allow"]) == (200, "GET, OPTIONS, POST")
    assert json.loads(body) == {"allow": ["GET", "OPTIONS", "POST"]}
    status, headers, body = served.call("DELETE", "/api/users")
    assert (status, headers["Allow"]) == (405, "POST")
    assert json.loads(body) == {"detail": 'Method "DELETE" not allowed.'}
    status, _, body = served.call("GET", "/api/nothing/")
    assert (status, json.loads(body)) == (404, {"detail": "Not found."})


def test_a_router_passes_the_paths_named_groups() -> None:
    router = Router()
    seen: List[str] = []

    def handler(request: Request, item: str) -> Response:
        seen.append(item)
        return Response(204)

    router.add(r"^/items/(?P<item>[^/]+)/?$", {"GET": handler})
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/items/abc/", "wsgi.input": io.BytesIO()}
    assert router.dispatch(Request(environ)).status == 204
    assert seen == ["abc"]


def test_a_content_length_that_is_no_number_is_400(served: _InProcess) -> None:
    with pytest.raises(HttpError) as raised:
        Request({"CONTENT_LENGTH": "12x", "wsgi.input": io.BytesIO()})
    assert (raised.value.status, raised.value.body) == (400, {"detail": "Invalid Content-Length."})


def test_basic_token_and_password_authentication(served: _InProcess) -> None:
    path = f"/api/models/{served.model_id}/metrics/"

    def status_with(header: str) -> int:
        return served.call("GET", path, headers={"Authorization": header})[0]

    basic = base64.b64encode(b"u:pw").decode()
    as_token = base64.b64encode(f"{TOKEN}:".encode()).decode()
    wrong = base64.b64encode(b"u:nope").decode()
    assert status_with(f"Token {TOKEN}") == 200
    assert status_with(f"Basic {basic}") == 200
    assert status_with(f"Basic {as_token}") == 200
    assert status_with(f"Basic {wrong}") == 401
    status, headers, body = served.call("GET", path)
    assert (status, headers["WWW-Authenticate"]) == (401, "Token")
    assert json.loads(body) == {"detail": "Authentication credentials were not provided."}


def test_password_hashes_check_and_malformed_ones_never_match() -> None:
    encoded = hash_password("secret", 10)
    assert encoded.startswith("pbkdf2_sha256$10$")
    assert check_password("secret", encoded)
    assert not check_password("Secret", encoded)
    assert not check_password("secret", "not-a-hash")
    assert not check_password("secret", "pbkdf2_sha256$ten$salt$x")
