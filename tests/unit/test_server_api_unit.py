"""server_api without sockets: credentials, error mapping, retry rules, multipart bodies."""

from __future__ import annotations

import base64
import email.parser
import email.policy
import pickle
from pathlib import Path
from typing import Any, List, Type

import pytest
import requests
import urllib3.exceptions

from fl_sidecar import errors
from fl_sidecar.server_api import (
    Credentials,
    FlServerClient,
    _certainly_not_sent,
    _map_error,
    _multipart_parts,
    _parse_codings,
    _parse_detail,
    _StreamBody,
)

SECRET = "s3cr3t-Pa55word"


def test_basic_credentials_header_and_secrecy() -> None:
    creds = Credentials.basic("alice", SECRET)
    scheme, value = creds.header().split(" ", 1)
    assert scheme == "Basic"
    assert base64.b64decode(value).decode() == f"alice:{SECRET}"
    assert creds.scheme == "basic"
    for shown in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert SECRET not in shown and value not in shown
    with pytest.raises(TypeError):
        pickle.dumps(creds)


def test_token_and_from_header() -> None:
    token = "0123456789abcdef0123456789abcdef01234567"
    creds = Credentials.token(token)
    assert creds.header() == f"Token {token}"
    assert token not in repr(creds)
    assert Credentials.from_header(f"Token {token}") == creds
    basic = Credentials.basic("bob", SECRET)
    assert Credentials.from_header(basic.header()) == basic
    assert Credentials.from_header(basic.header()).scheme == "basic"


@pytest.mark.parametrize(
    "value",
    ["", "   ", "Basic", "Token", "Basic !!not base64!!", "Token abc\r\nX-Evil: 1", "Token a\nb"],
)
def test_from_header_refuses_malformed_values(value: str) -> None:
    with pytest.raises(errors.ConfigurationError) as info:
        Credentials.from_header(value)
    assert "abc" not in str(info.value)


@pytest.mark.parametrize("bad", [("", "pw"), ("a:b", "pw")])
def test_basic_refuses_bad_usernames(bad: Any) -> None:
    with pytest.raises(errors.ConfigurationError):
        Credentials.basic(*bad)


@pytest.mark.parametrize("token", ["", "has space", "tab\there"])
def test_token_refuses_bad_tokens(token: str) -> None:
    with pytest.raises(errors.ConfigurationError):
        Credentials.token(token)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_url": "http://user:pw@127.0.0.1:8000"},
        {"base_url": "ftp://127.0.0.1"},
        {"base_url": "127.0.0.1:8000"},
        {"base_url": "http://127.0.0.1", "compression": "sometimes"},
        {"base_url": "http://127.0.0.1", "timeout": 0},
        {"base_url": "http://127.0.0.1", "retries": -1},
        {"base_url": "http://127.0.0.1", "max_download_size": 0},
        {"base_url": "http://127.0.0.1", "min_upload_saving": 1.0},
        {"base_url": "http://127.0.0.1", "min_upload_saving": -0.1},
    ],
)
def test_client_refuses_bad_settings(kwargs: Any) -> None:
    with pytest.raises(errors.ConfigurationError) as info:
        FlServerClient(**kwargs)
    assert "pw@" not in str(info.value)


def test_client_repr_hides_credentials() -> None:
    with FlServerClient("http://127.0.0.1:1/", Credentials.basic("u", SECRET)) as client:
        assert SECRET not in repr(client)
        assert client.negotiated_coding is None
        assert client.base_url == "http://127.0.0.1:1/"


@pytest.mark.parametrize(
    ("status", "body", "expected", "detail"),
    [
        (400, b'{"detail":"Model 42 not found."}', errors.NotFoundError, "Model 42 not found."),
        (400, b'{"detail":"GlobalModel 7 not found."}', errors.NotFoundError, None),
        (400, b'["Training with ID t is not currently in round 5"]', errors.ConflictError, None),
        (400, b'["Training with ID t is in state I"]', errors.ConflictError, None),
        (400, b'{"detail":"\'round\'"}', errors.RequestRejectedError, "'round'"),
        (400, b'["Invalid model file: bad"]', errors.RequestRejectedError, None),
        (401, b'{"detail":"Invalid token."}', errors.AuthenticationError, "Invalid token."),
        (
            403,
            b'{"detail":"You are not a participant of training x!"}',
            errors.PermissionDeniedError,
            None,
        ),
        (404, b"<html>nope</html>", errors.NotFoundError, None),
        (409, b'{"detail":"duplicate"}', errors.ConflictError, "duplicate"),
        (413, b'{"detail":"too big"}', errors.RequestRejectedError, None),
        (500, b"Internal Server Error", errors.ServerUnavailableError, None),
        (503, b"", errors.ServerUnavailableError, ""),
    ],
)
def test_error_mapping_from_real_server_bodies(
    status: int, body: bytes, expected: Type[errors.ServerError], detail: Any
) -> None:
    parsed = _parse_detail(body, "application/json")
    err = _map_error(status, parsed, "upload")
    assert type(err) is expected
    assert err.status == status and err.operation == "upload"
    if detail is not None:
        assert err.detail == detail
    assert f"HTTP {status}" in str(err)


def test_detail_of_list_and_dict_bodies() -> None:
    assert _parse_detail(b'["a", "b"]', "application/json") == "a; b"
    assert _parse_detail(b'{"username": ["taken"]}', "application/json") == "username: ['taken']"
    assert _parse_detail(b"{broken", "application/json") == "{broken"
    assert len(_parse_detail(b"x" * 10000, "text/html")) == 500


def _conn_error(reason: BaseException) -> requests.exceptions.ConnectionError:
    return requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/", reason))  # type: ignore[arg-type]


def test_only_connection_failures_count_as_certainly_not_sent() -> None:
    refused = _conn_error(urllib3.exceptions.NewConnectionError(None, "refused"))  # type: ignore[arg-type]
    dns = _conn_error(urllib3.exceptions.NameResolutionError("nohost", None, OSError("x")))  # type: ignore[arg-type]
    assert _certainly_not_sent(refused)
    assert _certainly_not_sent(dns)
    assert _certainly_not_sent(requests.exceptions.ConnectTimeout("connect timed out"))
    reset = requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError())
    )
    assert not _certainly_not_sent(reset)
    assert not _certainly_not_sent(requests.exceptions.ReadTimeout("read timed out"))
    assert not _certainly_not_sent(requests.exceptions.ChunkedEncodingError("broken"))
    assert not _certainly_not_sent(_conn_error(urllib3.exceptions.ProtocolError("x")))


def test_accept_encoding_parsing() -> None:
    assert _parse_codings("zstd") == {"zstd": 1.0}
    assert _parse_codings("gzip, ZSTD;q=0.5") == {"gzip": 1.0, "zstd": 0.5}
    assert _parse_codings("zstd;q=0")["zstd"] == 0.0
    assert _parse_codings("zstd;q=bogus")["zstd"] == 0.0
    assert _parse_codings(" , ") == {}


def _parse_form(content_type: str, body: bytes) -> List[Any]:
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body
    )
    return list(msg.iter_parts())


def test_multipart_body_streams_the_file_with_exact_length(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    payload = bytes(range(256)) * 9000  # 2.3 MB: several 1 MiB reads
    model.write_bytes(payload)
    fields = [("round", "3"), ("sample_size", "10"), ("metric_names", "acc")]
    parts = _multipart_parts(fields, "model_file", model, "BOUNDARY123")
    seen: List[Any] = []
    hashed: List[int] = []
    body = _StreamBody(
        parts, lambda done, total: seen.append((done, total)), lambda b: hashed.append(len(b))
    )
    data = b"".join(iter(body))
    assert len(data) == len(body)
    assert seen[-1] == (len(body), len(body))
    assert max(hashed) <= 1024 * 1024 and sum(hashed) == len(payload)
    form = _parse_form("multipart/form-data; boundary=BOUNDARY123", data)
    names = [p.get_param("name", header="content-disposition") for p in form]
    assert names == ["round", "sample_size", "metric_names", "model_file"]
    assert form[-1].get_filename() == "model_file"
    assert form[-1].get_payload(decode=True) == payload
    assert form[0].get_content().strip() == "3"


def test_multipart_body_fails_if_the_file_shrinks(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"x" * 5000)
    body = _StreamBody(_multipart_parts([], "model_file", model, "B"))
    model.write_bytes(b"x" * 10)
    with pytest.raises(errors.ModelError, match="shrank"):
        b"".join(iter(body))


def test_multipart_refuses_header_injection(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.write_bytes(b"1")
    # Only the boundary can end a part early: a value holding it is refused; a
    # value's quotes and line breaks stay inside its part (the reference sends them).
    with pytest.raises(errors.RequestRejectedError):
        _multipart_parts([("metric_names", "a\r\n--B\r\nX: y")], "model_file", model, "B")
    with pytest.raises(errors.RequestRejectedError):
        _multipart_parts([('metric_names"; x="', "a")], "model_file", model, "B")


def test_the_default_download_limit_is_a_model_size_not_a_disk() -> None:
    """A zstd bomb is written to disk until the limit stops it: a few GiB, not 16."""
    from fl_sidecar.config import DEFAULT_MAX_MODEL_SIZE
    from fl_sidecar.server_api import DEFAULT_MAX_DOWNLOAD_SIZE

    assert DEFAULT_MAX_DOWNLOAD_SIZE == DEFAULT_MAX_MODEL_SIZE == 4 * 1024**3
    with FlServerClient("http://127.0.0.1:1/") as client:
        assert client.max_download_size == DEFAULT_MAX_DOWNLOAD_SIZE
