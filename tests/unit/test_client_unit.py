"""Unit tests of the trainer side: targets, credentials, metrics, CLI parsing, compat surface.

No sockets, no processes: a gRPC channel object is created lazily and never
connects here.
"""

from __future__ import annotations

import argparse
import io
import queue
from typing import Any, Iterator, List, Tuple, Union

import grpc
import pytest

from fl_sidecar import client as client_module
from fl_sidecar import compat as compat_module
from fl_sidecar import wire
from fl_sidecar.client import CallCredentials, EventStream, SidecarClient, normalize_target
from fl_sidecar.compat import (
    Communication,
    CommunicationException,
    MetricsUploadException,
    ModelDownloadException,
    ModelUploadException,
    ServerResponse,
    is_torchscript_instance,
)
from fl_sidecar.errors import FlSidecarError, SidecarError
from fl_sidecar.events import EventKind
from fl_sidecar.tools import ProgressBar, _size, parse_metric
from fl_sidecar.v1 import sidecar_pb2 as pb


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("unix:///run/x.sock", "unix:///run/x.sock"),
        ("/run/x.sock", "unix:/run/x.sock"),
        ("localhost:50051", "localhost:50051"),
        ("  127.0.0.1:9  ", "127.0.0.1:9"),
    ],
)
def test_normalize_target(given: str, expected: str) -> None:
    assert normalize_target(given) == expected


def test_relative_socket_path_becomes_absolute() -> None:
    target = normalize_target("./side.sock")
    assert target.startswith("unix:/") and target.endswith("/side.sock")


def test_empty_target_is_refused() -> None:
    with pytest.raises(ValueError):
        normalize_target("   ")


def test_chunk_size_is_bounded() -> None:
    with pytest.raises(ValueError):
        SidecarClient("unix:/nonexistent.sock", chunk_size=0)
    with pytest.raises(ValueError):
        SidecarClient("unix:/nonexistent.sock", chunk_size=16 * 1024 * 1024)


def test_credentials_become_the_right_oneof_and_stay_hidden() -> None:
    basic = CallCredentials.basic("alice", "s3cret-pw")
    assert basic.to_proto().WhichOneof("kind") == "basic"
    assert basic.to_proto().basic.password == "s3cret-pw"
    assert "s3cret-pw" not in repr(basic)
    token = CallCredentials.api_token("tok-123")
    assert token.to_proto().token == "tok-123"
    assert "tok-123" not in repr(token)
    header = CallCredentials.header("Basic Zm9vOmJhcg==")
    assert header.to_proto().authorization_header == "Basic Zm9vOmJhcg=="
    assert CallCredentials().to_proto().WhichOneof("kind") is None


def _sent(metric: pb.Metric) -> Tuple[str, Union[float, str, None]]:
    kind = metric.WhichOneof("kind")
    return metric.name, None if kind is None else getattr(metric, kind)


def test_metrics_are_numbers_or_text_as_the_reference_sends_them() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque-7"

    metrics = client_module._metric_list(
        {
            "accuracy": 0.5,
            "loss": 2,
            "note": "abc",
            "converged": True,
            "raw": b"caf\xc3\xa9",
            "other": Opaque(),
            "zero": 0.0,
        }
    )
    assert [_sent(m) for m in metrics] == [
        ("accuracy", 0.5),
        ("loss", 2.0),
        ("note", "abc"),
        ("converged", "True"),
        ("raw", "caf\u00e9"),
        ("other", "opaque-7"),
        ("zero", 0.0),  # set explicitly: it travels although it is proto3's default
    ]
    assert client_module._metric_list([("a", 1)])[0].name == "a"
    with pytest.raises(ValueError, match="accuracy"):
        client_module._metric_list({"accuracy": None})
    with pytest.raises(ValueError, match="UTF-8"):
        client_module._metric_list({"raw": b"\xff\xfe"})


class _FailedCall(grpc.RpcError):  # type: ignore[misc]  # grpc ships no stubs
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def test_a_failed_call_carries_the_servers_answer() -> None:
    body = '["Training with ID t is not currently in round 0"]'
    call = _FailedCall(
        grpc.StatusCode.FAILED_PRECONDITION,
        "upload failed: HTTP 400: Training with ID t is not currently in round 0",
        (
            ("fl-sidecar-error", "ConflictError"),
            ("fl-sidecar-http-status", "400"),
            ("fl-sidecar-http-content-type", "application/json"),
            ("fl-sidecar-http-body-bin", body.encode()),
        ),
    )
    error = client_module._map_rpc_error(call, "upload for model m")
    assert error.code == "FAILED_PRECONDITION"
    assert "not currently in round 0" in str(error)
    assert (error.error_class, error.http_status, error.http_body, error.http_content_type) == (
        "ConflictError",
        400,
        body,
        "application/json",
    )


@pytest.mark.parametrize("trailers", [None, (), (("fl-sidecar-http-status", "4x"),)])
def test_a_failed_call_without_an_answer_has_no_http_facts(trailers: Any) -> None:
    error = client_module._map_rpc_error(
        _FailedCall(grpc.StatusCode.UNAVAILABLE, "failed to connect", trailers), "GetInfo"
    )
    assert error.code == "UNAVAILABLE"
    assert (error.error_class, error.http_status, error.http_body) == (None, None, None)


def test_unknown_format_is_refused() -> None:
    assert client_module._format_value("SAFETENSORS") == pb.MODEL_FORMAT_SAFETENSORS
    with pytest.raises(ValueError, match="onnx"):
        client_module._format_value("onnx")


def test_event_conversion_keeps_optional_round() -> None:
    message = pb.Event(
        seq=7,
        kind=pb.EVENT_KIND_UPDATE_ROUND_START,
        notification_type="UPDATE_ROUND_START",
        training_id="t",
        model_id="m",
        round=0,
        body_json='{"round": 0}',
    )
    event = wire.event_from_proto(message)
    assert (event.seq, event.kind, event.round, event.model_id) == (
        7,
        EventKind.UPDATE_ROUND_START,
        0,
        "m",
    )
    bare = wire.event_from_proto(pb.Event(seq=1, notification_type="SOMETHING_NEW"))
    assert bare.kind is EventKind.UNKNOWN
    assert bare.round is None and bare.model_id is None


class _FakeCall:
    """Stands in for a grpc stream object: an iterator with cancel()."""

    def __init__(self, messages: List[Any]) -> None:
        self._messages: queue.Queue[Any] = queue.Queue()
        for message in messages:
            self._messages.put(message)
        self.cancelled = False

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._messages.get()
            if item is None:
                return
            yield item

    def end(self) -> None:
        self._messages.put(None)

    def cancel(self) -> None:
        self.cancelled = True
        self.end()


def test_event_stream_get_wait_for_and_end() -> None:
    call = _FakeCall(
        [
            pb.Event(seq=1, kind=pb.EVENT_KIND_TRAINING_START, training_id="a"),
            pb.Event(seq=2, kind=pb.EVENT_KIND_UPDATE_ROUND_START, training_id="b", round=0),
            pb.Event(seq=3, kind=pb.EVENT_KIND_UPDATE_ROUND_START, training_id="a", round=1),
        ]
    )
    stream = EventStream(call)
    event = stream.wait_for([EventKind.UPDATE_ROUND_START], training_id="a", timeout=5)
    assert event.seq == 3
    with pytest.raises(TimeoutError):
        stream.get(timeout=0.05)
    call.end()
    assert list(stream) == []
    with pytest.raises(EOFError):
        stream.get(timeout=1)
    stream.close()
    assert call.cancelled


class _BrokenCall:
    """A grpc stream that fails at once, as when the sidecar goes away."""

    def __iter__(self) -> Iterator[Any]:
        raise _Unavailable()

    def cancel(self) -> None:
        pass


class _Unavailable(grpc.RpcError):  # type: ignore[misc]  # grpc ships no stubs
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the sidecar went away"


def test_event_stream_failure_raises_once_then_ends() -> None:
    stream = EventStream(_BrokenCall())
    with pytest.raises(SidecarError, match="went away") as failed:
        stream.get(timeout=5)
    assert failed.value.code == "UNAVAILABLE"
    with pytest.raises(EOFError):
        stream.get(timeout=5)


def test_parse_metric() -> None:
    assert parse_metric("accuracy=0.93") == ("accuracy", 0.93)
    for bad in ("accuracy", "=1", "loss=abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_metric(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", 1048576), ("4MiB", 4 * 1024**2), ("1G", 1024**3), ("512k", 512 * 1024)],
)
def test_size_parsing(text: str, expected: int) -> None:
    assert _size(text) == expected


def test_size_parsing_refuses_garbage() -> None:
    for bad in ("lots", "4XB", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _size(bad)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    bar = ProgressBar("download", quiet)
    bar(10, 100)
    bar.close()
    assert quiet.getvalue() == ""

    tty = _Tty()
    bar = ProgressBar("download", tty, width=10)
    bar(100, 100)
    bar.close()
    text = tty.getvalue()
    assert "[##########]" in text and "100.0%" in text and text.endswith("\n")
    unknown = _Tty()
    bar = ProgressBar("x", unknown)
    bar(2048, 0)
    assert "2.0 KiB" in unknown.getvalue()


def test_compat_exceptions_are_reference_named_and_typed() -> None:
    for cls in (ModelDownloadException, ModelUploadException, MetricsUploadException):
        assert issubclass(cls, CommunicationException)
        assert issubclass(cls, SidecarError)
        assert issubclass(cls, FlSidecarError)
    exc = ModelUploadException("refused", code="FAILED_PRECONDITION")
    assert exc.code == "FAILED_PRECONDITION"
    # No server answer behind it: a response all the same, so handlers never fail on None.
    assert exc.response.status_code is None
    assert exc.response.text == "" and not exc.response.ok


def test_compat_exception_from_a_sidecar_error_carries_the_server_answer() -> None:
    error = SidecarError(
        "download of model m failed (NOT_FOUND): download failed: HTTP 400: Model m not found.",
        code="NOT_FOUND",
        error_class="NotFoundError",
        http_status=400,
        http_body='{"detail":"Model m not found."}',
        http_content_type="application/json",
    )
    exc = ModelDownloadException._from_sidecar(error)
    assert isinstance(exc, ModelDownloadException)
    assert str(exc) == str(error)  # the sidecar's message, quoting the server's text
    assert (exc.code, exc.error_class, exc.http_status) == ("NOT_FOUND", "NotFoundError", 400)
    response = exc.response
    assert isinstance(response, ServerResponse)
    assert (response.status_code, response.reason, response.ok) == (400, "Bad Request", False)
    assert response.json() == {"detail": "Model m not found."}
    assert response.content == b'{"detail":"Model m not found."}'
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get("Content-Type") == "application/json"
    assert repr(response) == "<ServerResponse [400]>"
    with pytest.raises(ValueError):
        ServerResponse(502, "<html>bad gateway</html>").json()


def test_compat_metric_values_are_what_the_reference_posts() -> None:
    texts = compat_module._metric_texts({"note": "abc", "n": 1, "x": 0.5, "ok": True, 7: b"b"})
    assert texts == {"note": "abc", "n": "1", "x": "0.5", "ok": "True", "7": "b"}
    with pytest.raises(ValueError, match="note"):
        compat_module._metric_texts({"note": None})


def test_communication_from_user_password_builds_basic_auth() -> None:
    com = Communication.from_user_password("c", "t", 2, "m", "alice", "pw")
    assert com.http_authorization == "Basic YWxpY2U6cHc="
    assert com.get_headers() == {"Authorization": "Basic YWxpY2U6cHc="}
    assert (com.client_id, com.training_id, com.round, com.model_id) == ("c", "t", 2, "m")
    assert "YWxpY2U6cHc=" not in repr(com)
    assert Communication.unknown_message("NEW_TYPE", "t", {}) == 400


def test_is_torchscript_instance_without_torch_objects() -> None:
    assert not is_torchscript_instance(object())
    assert not is_torchscript_instance(3)


class _UploadStub:
    """UploadModel breaks as a killed sidecar's would; GetUpload answers from ``journal``."""

    def __init__(self, journal: Any) -> None:
        self.journal = journal
        self.asked: List[str] = []

    def UploadModel(self, requests: Iterator[Any], **kwargs: Any) -> Any:
        for _ in requests:  # the whole stream goes out, then the connection breaks
            pass
        raise _Unavailable()

    def GetUpload(self, request: Any, **kwargs: Any) -> Any:
        self.asked.append(request.upload_id)
        if isinstance(self.journal, BaseException):
            raise self.journal
        return self.journal


def _upload_through(journal: Any) -> Any:
    client = SidecarClient("127.0.0.1:1")  # never dialled: the stub answers
    stub = _UploadStub(journal)
    client._stub = stub  # type: ignore[assignment]
    try:
        return client.upload("m1", b"model", round=0, sample_size=1, upload_id="u-1")
    finally:
        assert stub.asked == ["u-1"]
        client.close()


def test_a_broken_upload_call_asks_the_journal_and_never_says_retry_blindly() -> None:
    from fl_sidecar.errors import UploadFailedError

    # The sidecar cannot be asked either: the outcome is unknown, not "retry".
    with pytest.raises(UploadFailedError) as unknown:
        _upload_through(_Unavailable())
    assert (unknown.value.code, unknown.value.upload_state) == ("UNKNOWN", "unknown")
    assert "get_upload('u-1')" in str(unknown.value)
    # The journal never saw it: nothing was sent, retrying is safe.
    with pytest.raises(UploadFailedError) as not_sent:
        _upload_through(_NotFound())
    assert (not_sent.value.code, not_sent.value.upload_state) == ("UNAVAILABLE", "not_sent")
    # The server's 201 was recorded before the connection broke: it is a success.
    accepted = pb.GetUploadResponse(
        upload_id="u-1", state=pb.UPLOAD_STATE_ACCEPTED, http_status=201, model_id="m1"
    )
    result = _upload_through(accepted)
    assert (result.http_status, result.upload_id) == (201, "u-1")
    refused = pb.GetUploadResponse(upload_id="u-1", state=pb.UPLOAD_STATE_REJECTED, http_status=403)
    with pytest.raises(UploadFailedError) as rejected:
        _upload_through(refused)
    assert (rejected.value.code, rejected.value.upload_state) == ("PERMISSION_DENIED", "rejected")


class _NotFound(grpc.RpcError):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.NOT_FOUND

    def details(self) -> str:
        return "never began to send it"
