"""A refusal's way to the trainer: the server's body as the HTTP client keeps it, the servicer's
one failure path (what a failed call tells the client), and metric conversion.

No sockets: answers are built in memory, and ``SidecarService._fail`` is
driven with a recording stand-in for the gRPC context.
"""

from __future__ import annotations

import base64
import io
from typing import Any, List, Optional, Sequence, Tuple, cast

import grpc
import pytest
import requests
import urllib3

from fl_sidecar import server_api
from fl_sidecar.errors import (
    ConflictError,
    NotFoundError,
    ServerUnavailableError,
    SidecarError,
    UploadOutcomeUnknownError,
)
from fl_sidecar.sidecar import servicer, status
from fl_sidecar.v1 import sidecar_pb2 as pb


class _Aborted(Exception):
    pass


class _RecordingContext:
    """Records what the servicer sends, as grpc's context would send it."""

    def __init__(self) -> None:
        self.trailers: Sequence[Tuple[str, Any]] = ()
        self.code: Optional[grpc.StatusCode] = None
        self.details = ""

    def set_trailing_metadata(self, trailers: Sequence[Tuple[str, Any]]) -> None:
        self.trailers = tuple(trailers)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted


def _fail(exc: BaseException) -> _RecordingContext:
    service = servicer.SidecarService(
        cast(Any, None),
        cast(Any, None),
        server_url="http://fl.example",
        trust_pickles=False,
        max_unpack_size=1,
    )
    context = _RecordingContext()
    with pytest.raises(_Aborted):
        service._fail("UploadModel", cast(Any, context), exc)
    return context


def test_a_server_refusal_travels_with_its_status_body_and_class() -> None:
    body = '["Training with ID t is not currently in round 0"]'
    context = _fail(
        ConflictError(
            "upload failed: HTTP 400: Training with ID t is not currently in round 0",
            status=400,
            detail="Training with ID t is not currently in round 0",
            operation="upload",
            body=body,
            content_type="application/json",
        )
    )
    assert context.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "not currently in round 0" in context.details  # the message keeps the server's text
    assert dict(context.trailers) == {
        "fl-sidecar-error": "ConflictError",
        "fl-sidecar-http-status": "400",
        "fl-sidecar-http-content-type": "application/json",
        "fl-sidecar-http-body-bin": body.encode(),
    }


def test_an_error_without_an_answer_names_only_its_class() -> None:
    assert dict(_fail(ServerUnavailableError("connection refused")).trailers) == {
        "fl-sidecar-error": "ServerUnavailableError"
    }
    outcome = _fail(UploadOutcomeUnknownError("may have arrived", status=502, body="oops"))
    assert outcome.code == grpc.StatusCode.UNKNOWN
    assert dict(outcome.trailers)["fl-sidecar-http-status"] == "502"
    local = _fail(SidecarError("the first message must be the header", code="INVALID_ARGUMENT"))
    assert dict(local.trailers) == {"fl-sidecar-error": "SidecarError"}


def test_a_bug_says_nothing_beyond_internal() -> None:
    context = _fail(KeyError("secret-looking-key"))
    assert context.code == grpc.StatusCode.INTERNAL
    assert context.trailers == ()
    assert "secret-looking-key" not in context.details


def test_a_long_body_is_cut_to_fit_the_metadata_limit() -> None:
    body = '{"detail": "' + "\u00e9" * 6000 + '"}'
    trailers = dict(
        status.error_trailers(NotFoundError("x", status=400, body=body), "download failed")
    )
    sent = trailers["fl-sidecar-http-body-bin"]
    assert isinstance(sent, bytes)
    assert len(sent) <= 4096
    assert sent.decode("utf-8").startswith('{"detail": "\u00e9')  # cut between characters
    # A long message leaves less room: all the trailers stay below gRPC's 8 KiB default.
    message = "m" * 6000
    long_trailers = status.error_trailers(NotFoundError(message, status=400, body=body), message)
    wire = len(message) + sum(
        len(key) + len(base64.b64encode(v) if isinstance(v, bytes) else v)
        for key, v in long_trailers
    )
    assert wire < 8 * 1024


def test_an_odd_content_type_is_not_sent() -> None:
    trailers = dict(
        status.error_trailers(NotFoundError("x", status=400, content_type="text/\x00html"), "x")
    )
    assert "fl-sidecar-http-content-type" not in trailers


def test_metrics_keep_numbers_and_text_and_old_clients_zero() -> None:
    old_client_zero = pb.Metric.FromString(pb.Metric(name="zero").SerializeToString())
    metrics: List[pb.Metric] = [
        pb.Metric(name="accuracy", value=0.5),
        pb.Metric(name="note", text="abc"),
        pb.Metric(name="empty", text=""),
        old_client_zero,
    ]
    assert servicer._metrics_mapping(metrics) == {
        "accuracy": 0.5,
        "note": "abc",
        "empty": "",
        "zero": 0.0,
    }
    with pytest.raises(SidecarError, match="twice"):
        servicer._metrics_mapping([pb.Metric(name="a", value=1), pb.Metric(name="a", text="b")])


def _answer(status: int, body: bytes, authorization: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response.headers["Content-Type"] = "text/html"
    response.raw = urllib3.HTTPResponse(body=io.BytesIO(body), preload_content=False)
    response.request = requests.Request(
        "GET", "http://fl.example/api/models/x/", headers={"Authorization": authorization}
    ).prepare()
    return response


def test_the_kept_body_never_holds_the_requests_credentials() -> None:
    basic = "Basic " + base64.b64encode(b"alice:pa55word-x").decode()
    echo = f"<pre>HTTP_AUTHORIZATION = {basic}\nuser:pass alice:pa55word-x pw pa55word-x</pre>"
    detail, body = server_api._read_detail(_answer(500, echo.encode(), basic))
    assert body is not None and "HTTP_AUTHORIZATION = ***" in body
    for text in (body, detail):
        assert "pa55word-x" not in text and basic.split()[1] not in text
    token = "Token " + "ab12" * 10
    _, token_body = server_api._read_detail(_answer(400, f"bad {'ab12' * 10}".encode(), token))
    assert token_body == "bad ***"
    plain, kept = server_api._read_detail(_answer(400, b'{"detail":"Model m not found."}', token))
    assert (plain, kept) == ("Model m not found.", '{"detail":"Model m not found."}')
    assert server_api._read_detail(_answer(400, b"", token)) == ("", None)
