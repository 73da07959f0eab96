"""Request and answer bodies without sockets: multipart, the error body's message."""

from __future__ import annotations

import email.parser
import email.policy
from pathlib import Path
from typing import Any, List

import pytest

from fl_sidecar import errors
from fl_sidecar.flserver.bodies import StreamBody, multipart_parts, parse_detail


def test_detail_of_list_and_dict_bodies() -> None:
    assert parse_detail(b'["a", "b"]', "application/json") == "a; b"
    assert parse_detail(b'{"username": ["taken"]}', "application/json") == "username: ['taken']"
    assert parse_detail(b"{broken", "application/json") == "{broken"
    assert len(parse_detail(b"x" * 10000, "text/html")) == 500


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
    parts = multipart_parts(fields, "model_file", model, "BOUNDARY123")
    seen: List[Any] = []
    hashed: List[int] = []
    body = StreamBody(
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
    body = StreamBody(multipart_parts([], "model_file", model, "B"))
    model.write_bytes(b"x" * 10)
    with pytest.raises(errors.ModelError, match="shrank"):
        b"".join(iter(body))


def test_multipart_refuses_header_injection(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.write_bytes(b"1")
    # Only the boundary can end a part early: a value holding it is refused; a
    # value's quotes and line breaks stay inside its part (the reference sends them).
    with pytest.raises(errors.RequestRejectedError):
        multipart_parts([("metric_names", "a\r\n--B\r\nX: y")], "model_file", model, "B")
    with pytest.raises(errors.RequestRejectedError):
        multipart_parts([('metric_names"; x="', "a")], "model_file", model, "B")
