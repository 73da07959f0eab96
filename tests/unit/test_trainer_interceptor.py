"""Unit tests of ``fl_sidecar.trainer.interceptor``: socket check, token and typed errors, once."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List

import grpc
import pytest

from fl_sidecar import errors
from fl_sidecar.errors import ConflictError, NotFoundError, SidecarError, UploadFailedError
from fl_sidecar.trainer.interceptor import (
    SidecarInterceptor,
    _CallDetails,
    map_rpc_error,
    raise_if_refused,
)
from fl_sidecar.trainer.streams import RequestStream
from fl_sidecar.v1 import sidecar_pb2 as pb


class _Failed(grpc.RpcError):  # type: ignore[misc]  # grpc ships no stubs
    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any = None) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


class _Outcome:
    def __init__(self, response: Any) -> None:
        self.response = response

    def result(self) -> Any:
        return self.response


def _details(method: str, metadata: Any = None) -> Any:
    return _CallDetails(f"/fl_sidecar.v1.Sidecar/{method}", 5.0, metadata, None, None, None)


def test_a_failed_call_carries_the_servers_answer() -> None:
    body = '["Training with ID t is not currently in round 0"]'
    call = _Failed(
        grpc.StatusCode.FAILED_PRECONDITION,
        "upload failed: HTTP 400: Training with ID t is not currently in round 0",
        (
            ("fl-sidecar-error", "ConflictError"),
            ("fl-sidecar-http-status", "400"),
            ("fl-sidecar-http-content-type", "application/json"),
            ("fl-sidecar-http-body-bin", body.encode()),
        ),
    )
    error = map_rpc_error(call, "UploadMetrics", pb.UploadMetricsRequest(model_id="m"))
    assert isinstance(error, ConflictError) and isinstance(error, SidecarError)
    assert error.code == "FAILED_PRECONDITION"
    assert str(error).startswith("metrics upload for model m failed (FAILED_PRECONDITION): ")
    assert "not currently in round 0" in str(error)
    assert (error.error_class, error.http_status, error.http_body, error.http_content_type) == (
        "ConflictError",
        400,
        body,
        "application/json",
    )
    assert (error.status, error.operation, error.body) == (400, "metrics", body)


@pytest.mark.parametrize("trailers", [None, (), (("fl-sidecar-http-status", "4x"),)])
def test_a_failed_call_without_an_answer_has_no_http_facts(trailers: Any) -> None:
    error = map_rpc_error(
        _Failed(grpc.StatusCode.UNAVAILABLE, "failed to connect", trailers), "GetInfo"
    )
    assert type(error) is SidecarError
    assert error.code == "UNAVAILABLE"
    assert "cannot reach the sidecar" in str(error)
    assert (error.error_class, error.http_status, error.http_body) == (None, None, None)


@pytest.mark.parametrize(
    ("method", "request_message", "named"),
    [
        ("DownloadModel", pb.DownloadModelRequest(model_id="m1"), "download of model m1"),
        ("GetTraining", pb.GetTrainingRequest(training_id="t1"), "GetTraining t1"),
        ("GetUpload", pb.GetUploadRequest(upload_id="u1"), "GetUpload u1"),
        ("GetInfo", pb.GetInfoRequest(), "GetInfo"),
    ],
)
def test_the_message_names_the_call(method: str, request_message: Any, named: str) -> None:
    error = map_rpc_error(_Failed(grpc.StatusCode.NOT_FOUND, "gone"), method, request_message)
    assert str(error) == f"{named} failed (NOT_FOUND): gone"


def test_an_upload_failure_is_an_upload_failed_error_with_its_state() -> None:
    header = pb.UploadHeader(upload_id="u-9", model_id="m1")
    requests = RequestStream(
        pb.UploadModelRequest(header=header), lambda c: c, [], progress=None, total=0
    )
    trailers = (("fl-sidecar-upload-id", "u-9"), ("fl-sidecar-upload-state", "rejected"))
    error = map_rpc_error(
        _Failed(grpc.StatusCode.PERMISSION_DENIED, "no", trailers), "UploadModel", requests
    )
    assert isinstance(error, UploadFailedError)
    assert (error.upload_id, error.upload_state) == ("u-9", "rejected")
    assert str(error).startswith("upload u-9 for model m1 failed (PERMISSION_DENIED)")
    # No trailer: the status came from grpc, nobody said what reached the server.
    broken = map_rpc_error(_Failed(grpc.StatusCode.UNAVAILABLE, "x"), "UploadModel", requests)
    assert isinstance(broken, UploadFailedError) and broken.upload_state == ""


def test_the_token_is_added_to_every_call_and_the_callers_metadata_kept() -> None:
    interceptor = SidecarInterceptor(
        "127.0.0.1:1", socket_path=None, expected_owner=None, api_token="tok"
    )
    seen: List[Any] = []

    def continuation(details: Any, request: Any) -> Any:
        seen.append(details)
        return _Outcome("answer")

    outcome = interceptor.intercept_unary_unary(
        continuation, _details("GetInfo", (("a", "1"),)), None
    )
    assert outcome.result() == "answer"
    assert seen[0].metadata == (("a", "1"), ("x-fl-sidecar-token", "tok"))
    assert (seen[0].method, seen[0].timeout) == ("/fl_sidecar.v1.Sidecar/GetInfo", 5.0)
    untokened = SidecarInterceptor(
        "127.0.0.1:1", socket_path=None, expected_owner=None, api_token=None
    )
    untokened.intercept_stream_unary(continuation, _details("UploadModel"), iter(()))
    assert seen[1].metadata == ()


def test_a_failed_unary_call_raises_typed_and_other_exceptions_pass() -> None:
    interceptor = SidecarInterceptor(
        "127.0.0.1:1", socket_path=None, expected_owner=None, api_token=None
    )
    failed = _Failed(
        grpc.StatusCode.NOT_FOUND, "no model", (("fl-sidecar-error", "NotFoundError"),)
    )
    with pytest.raises(NotFoundError) as caught:
        interceptor.intercept_unary_unary(
            lambda d, r: failed, _details("DownloadModel"), pb.DownloadModelRequest()
        )
    assert isinstance(caught.value, SidecarError)
    assert caught.value.code == "NOT_FOUND" and caught.value.__cause__ is None

    class Wrapped(grpc.RpcError, grpc.Future):  # type: ignore[misc]
        """grpc's wrapper of an exception raised on the call's way (not a status)."""

        def exception(self) -> BaseException:
            return KeyError("from a serializer")

    with pytest.raises(KeyError, match="serializer"):
        interceptor.intercept_unary_unary(lambda d, r: Wrapped(), _details("GetInfo"), None)


def test_a_stream_failure_is_typed_when_read(tmp_path: Path) -> None:
    interceptor = SidecarInterceptor(
        "127.0.0.1:1", socket_path=None, expected_owner=None, api_token=None
    )

    def responses() -> Any:
        yield "first"
        raise _Failed(
            grpc.StatusCode.DATA_LOSS, "corrupt", (("fl-sidecar-error", "ChecksumMismatchError"),)
        )

    stream = interceptor.intercept_stream_stream(
        lambda d, r: responses(), _details("Unpack"), iter(())
    )
    assert next(stream) == "first"
    with pytest.raises(errors.ChecksumMismatchError) as caught:
        next(stream)
    assert isinstance(caught.value, SidecarError) and caught.value.code == "DATA_LOSS"


def test_nothing_is_sent_to_a_missing_or_foreign_socket(tmp_path: Path) -> None:
    calls: List[Any] = []
    missing = SidecarInterceptor(
        "unix:" + str(tmp_path / "none.sock"),
        socket_path=str(tmp_path / "none.sock"),
        expected_owner=None,
        api_token="tok",
    )
    with pytest.raises(SidecarError, match="no sidecar is listening") as caught:
        missing.intercept_unary_unary(lambda d, r: calls.append(d), _details("GetInfo"), None)
    assert caught.value.code == "UNAVAILABLE"
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone could have put a socket here
    (shared / "s.sock").touch()
    foreign = SidecarInterceptor(
        "unix:" + str(shared / "s.sock"),
        socket_path=str(shared / "s.sock"),
        expected_owner=None,
        api_token="tok",
    )
    with pytest.raises(errors.UnsafeSocketError):
        foreign.intercept_unary_unary(lambda d, r: calls.append(d), _details("GetInfo"), None)
    assert calls == []


def test_a_refused_stream_raises_when_made() -> None:
    class Refused(grpc.RpcError, grpc.Future):  # type: ignore[misc]
        """What grpc returns for a streaming call whose interceptor raised."""

        def done(self) -> bool:
            return True

        def exception(self) -> BaseException:
            return errors.UnsafeSocketError("belongs to uid 1")

    with pytest.raises(errors.UnsafeSocketError):
        raise_if_refused(Refused())
    raise_if_refused(iter(()))  # a live stream: nothing to raise
