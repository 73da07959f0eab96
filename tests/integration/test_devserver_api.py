"""The dev server's setup calls, authentication and error shapes, over real HTTP."""

from __future__ import annotations

import base64
import socket
import uuid

from conftest import DevServerHandle, encode_multipart


def _user_body(username: str) -> dict[str, object]:
    return {
        "username": username,
        "password": "pw-1",
        "message_endpoint": "http://127.0.0.1:9/",
        "actor": False,
        "client": True,
    }


def test_create_user_returns_id_and_token_never_password(devserver: DevServerHandle) -> None:
    result = devserver.request("POST", "/api/users/", json_body=_user_body("alice"))
    assert result.status == 201
    data = result.json()
    assert uuid.UUID(data["id"])
    assert len(data["token"]) == 40 and int(data["token"], 16) >= 0
    assert data["message_endpoint"] == "http://127.0.0.1:9/"
    assert "password" not in data and b"pw-1" not in result.body


def test_duplicate_username_and_bad_fields_are_400(devserver: DevServerHandle) -> None:
    assert devserver.request("POST", "/api/users/", json_body=_user_body("bob")).status == 201
    again = devserver.request("POST", "/api/users/", json_body=_user_body("bob"))
    assert again.status == 400
    assert again.json() == {"username": ["A user with that username already exists."]}
    bad = devserver.request(
        "POST", "/api/users/", json_body={"username": "", "message_endpoint": "ftp://x", "actor": 3}
    )
    assert bad.status == 400
    assert set(bad.json()) == {"username", "password", "message_endpoint", "actor"}
    broken = devserver.request(
        "POST", "/api/users/", body=b"{not json", content_type="application/json"
    )
    assert broken.status == 400 and "JSON parse error" in broken.json()["detail"]
    listed = devserver.request("POST", "/api/users/", json_body=[1, 2])
    assert listed.status == 400 and "detail" in listed.json()


def test_auth_forms_and_401_bodies(devserver: DevServerHandle) -> None:
    user = devserver.create_user()
    path = f"/api/trainings/{uuid.uuid4()}/"
    # Every accepted form gets past authentication (to the 400 for the unknown training).
    token_as_user = "Basic " + base64.b64encode(f"{user.token}:".encode()).decode()
    for auth in (user.basic(), user.token_header(), token_as_user):
        result = devserver.request("GET", path, auth=auth)
        assert result.status == 400, (auth[:6], result.body)
        assert result.json() == {"detail": f"Training {path.split('/')[3]} not found."}

    cases: dict[str | None, str] = {
        None: "Authentication credentials were not provided.",
        "Token " + "0" * 40: "Invalid token.",
        "Basic " + base64.b64encode(f"{user.username}:wrong".encode()).decode(): (
            "Invalid username/password."
        ),
        "Basic " + base64.b64encode(b"nobody:pw").decode(): "Invalid username/password.",
        "Basic " + base64.b64encode(b"0123:").decode(): "Invalid username/password.",
    }
    for bad_auth, detail in cases.items():
        result = devserver.request("GET", path, auth=bad_auth)
        assert result.status == 401
        assert result.json() == {"detail": detail}
        assert result.headers["www-authenticate"] == "Token"
    garbage = devserver.request("GET", path, auth="Basic %%%not-base64")
    assert garbage.status == 401 and garbage.headers["www-authenticate"] == "Token"


def test_credentials_are_never_echoed(devserver: DevServerHandle) -> None:
    user = devserver.create_user(password="hunter2-very-secret")
    wrong = "Basic " + base64.b64encode(f"{user.username}:hunter2-very-secreT".encode()).decode()
    result = devserver.request("GET", "/api/models/x/", auth=wrong)
    assert result.status == 401
    assert b"hunter2" not in result.body


def test_unknown_or_malformed_model_id_is_400_not_found(devserver: DevServerHandle) -> None:
    user = devserver.create_user()
    for model_id in (str(uuid.uuid4()), "not-a-uuid", "1234"):
        result = devserver.request("GET", f"/api/models/{model_id}/", user=user)
        assert result.status == 400
        assert result.json() == {"detail": f"Model {model_id} not found."}
    upload_type, upload = encode_multipart(
        [("round", "0"), ("sample_size", "1")], [("model_file", "model_file", b"x")]
    )
    missing = str(uuid.uuid4())
    result = devserver.request(
        "POST", f"/api/models/{missing}/", user=user, body=upload, content_type=upload_type
    )
    assert result.status == 400
    assert result.json() == {"detail": f"GlobalModel {missing} not found."}


def test_unknown_path_and_method(devserver: DevServerHandle) -> None:
    user = devserver.create_user()
    assert devserver.request("GET", "/api/nothing/", user=user).status == 404
    result = devserver.request("DELETE", "/api/models/", user=user)
    assert result.status == 405 and "POST" in result.headers["allow"]


def test_global_model_upload_needs_a_file_and_multipart(devserver: DevServerHandle) -> None:
    user = devserver.create_user()
    content_type, body = encode_multipart([("name", "m"), ("description", "d")])
    result = devserver.request(
        "POST", "/api/models/", user=user, body=body, content_type=content_type
    )
    assert result.status == 400
    assert result.json() == {"detail": "No uploaded file 'model_file' found."}
    not_multipart = devserver.request(
        "POST", "/api/models/", user=user, body=b"name=m", content_type="text/plain"
    )
    assert not_multipart.status == 400 and "multipart" in not_multipart.json()["detail"]
    truncated = body[: len(body) // 2]
    cut = devserver.request(
        "POST", "/api/models/", user=user, body=truncated, content_type=content_type
    )
    assert cut.status == 400 and "detail" in cut.json()


def test_not_a_torch_file_is_refused(devserver: DevServerHandle) -> None:
    user = devserver.create_user()
    content_type, body = encode_multipart(
        [("name", "m"), ("description", "d")],
        [("model_file", "model_file", b"this is not a torch archive at all")],
    )
    result = devserver.request(
        "POST", "/api/models/", user=user, body=body, content_type=content_type
    )
    assert result.status == 400
    message = result.json()
    assert isinstance(message, list) and message[0].startswith("Invalid model file: ")


def test_health(devserver: DevServerHandle) -> None:
    result = devserver.request("GET", "/healthz")
    assert result.status == 200 and result.json() == {"status": "ok"}


def _raw(devserver: DevServerHandle, data: bytes) -> int:
    """Send raw bytes, return the status code of the answer."""
    with socket.create_connection((devserver.host, devserver.port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def test_hostile_requests_get_4xx_never_500(devserver: DevServerHandle) -> None:
    user = devserver.create_user()
    user_cases = [
        {"username": "x", "password": "p", "message_endpoint": "http://[::1"},
        {"username": "x", "password": "p", "message_endpoint": "http://h:99999/"},
        {"username": ["x"], "password": {"a": 1}, "message_endpoint": 5},
    ]
    for case in user_cases:
        assert devserver.request("POST", "/api/users/", json_body=case).status == 400
    deep = b"[" * 100_000
    assert (
        devserver.request("POST", "/api/users/", body=deep, content_type="application/json").status
        == 400
    )
    training = {"model_id": str(uuid.uuid4()), "target_num_updates": 10**30}
    assert devserver.request("POST", "/api/trainings/", user=user, json_body=training).status == 400
    for path in ("/api/models/%00/", "/api/models/%C3%A9/metrics/", "/api/trainings/../../etc/"):
        status = devserver.request("GET", path, user=user).status
        assert 400 <= status < 500, path
    nan = b"metric_names=a&metric_values=nan"
    status = devserver.request(
        "POST",
        f"/api/models/{uuid.uuid4()}/metrics/",
        user=user,
        body=nan,
        content_type="application/x-www-form-urlencoded",
    ).status
    assert status == 400
    auth = user.token_header().encode()
    assert (
        _raw(devserver, b"POST /api/users/ HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
        == 400
    )
    huge = b"POST /api/trainings/ HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
    huge += b"\r\nContent-Type: application/json\r\nContent-Length: 99999999999\r\n\r\n{}"
    assert _raw(devserver, huge) == 413
    bad_type = b"POST /api/models/ HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
    bad_type += (
        b"\r\nContent-Type: multipart/form-data; boundary=\x01\r\nContent-Length: 2\r\n\r\n{}"
    )
    assert _raw(devserver, bad_type) == 400
    latin = b"GET /api/models/\xe9\xff/ HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth + b"\r\n\r\n"
    assert _raw(devserver, latin) == 400
