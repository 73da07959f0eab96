"""Unit tests of the trainer's client (``fl_sidecar.trainer``): targets, credentials,
metrics, formats, the event stream and the upload outcome rules.

No sockets, no processes: a gRPC channel object is created lazily and never
connects here; fake calls go through the client's real interceptor.
"""

from __future__ import annotations

import queue
from typing import Any, Callable, Iterator, List, Tuple, Union

import grpc
import pytest

from fl_sidecar import wire
from fl_sidecar.address import normalize_target
from fl_sidecar.errors import NotFoundError, SidecarError, UploadFailedError
from fl_sidecar.events import EventKind
from fl_sidecar.trainer.client import SidecarClient
from fl_sidecar.trainer.credentials import CallCredentials
from fl_sidecar.trainer.events import EventStream
from fl_sidecar.trainer.interceptor import SidecarInterceptor, _CallDetails, _MappedStream
from fl_sidecar.trainer.streams import format_value, metric_list
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

    metrics = metric_list(
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
    assert metric_list([("a", 1)])[0].name == "a"
    with pytest.raises(ValueError, match="accuracy"):
        metric_list({"accuracy": None})
    with pytest.raises(ValueError, match="UTF-8"):
        metric_list({"raw": b"\xff\xfe"})


def test_unknown_format_is_refused() -> None:
    assert format_value("SAFETENSORS") == pb.MODEL_FORMAT_SAFETENSORS
    with pytest.raises(ValueError, match="onnx"):
        format_value("onnx")


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


class _Failed(grpc.RpcError):  # type: ignore[misc]  # grpc ships no stubs
    """A failed call as grpc reports it, with the sidecar's trailers (or none)."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: Any = None) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> Any:
        return self._trailers


def _unavailable() -> _Failed:
    return _Failed(grpc.StatusCode.UNAVAILABLE, "the sidecar went away")


class _BrokenCall:
    """A grpc stream that fails at once, as when the sidecar goes away."""

    def __iter__(self) -> Iterator[Any]:
        raise _unavailable()

    def cancel(self) -> None:
        pass


def _intercepted(call: Any, method: str = "WatchEvents") -> Any:
    """``call`` as the client's interceptor hands a server stream back."""
    interceptor = SidecarInterceptor(
        "127.0.0.1:1", socket_path=None, expected_owner=None, api_token=None
    )
    details = _CallDetails(f"/fl_sidecar.v1.Sidecar/{method}", None, None, None, None, None)
    stream = interceptor.intercept_unary_stream(
        lambda _d, _r: call, details, pb.WatchEventsRequest()
    )
    assert isinstance(stream, _MappedStream)
    return stream


def test_event_stream_failure_raises_once_then_ends() -> None:
    stream = EventStream(_intercepted(_BrokenCall()))
    with pytest.raises(SidecarError, match="went away") as failed:
        stream.get(timeout=5)
    assert failed.value.code == "UNAVAILABLE"
    with pytest.raises(EOFError):
        stream.get(timeout=5)


def test_event_stream_passes_on_any_failure_of_its_call() -> None:
    class Exploding:
        def __iter__(self) -> Iterator[Any]:
            raise RuntimeError("bug in the call object")

        def cancel(self) -> None:
            pass

    stream = EventStream(Exploding())
    # The reader thread must not die silently (get() would then wait forever).
    with pytest.raises(RuntimeError, match="bug in the call"):
        stream.get(timeout=5)


class _Outcome:
    """A unary call's outcome as grpc's interceptor machinery passes it on."""

    def __init__(self, response: Any) -> None:
        self._response = response

    def result(self) -> Any:
        return self._response


class _InterceptedStub:
    """Stands in for the generated stub: each call goes through the client's interceptor.

    ``answers`` maps an RPC's name to what the server side does with the request
    (or request stream): return a response, or raise a ``grpc.RpcError``.
    """

    def __init__(self, interceptor: SidecarInterceptor, answers: Any) -> None:
        self._interceptor = interceptor
        self._answers = answers
        self.asked: List[str] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        answer = self._answers[name]

        def call(request: Any, timeout: Any = None, metadata: Any = None) -> Any:
            self.asked.append(name)

            def continuation(details: Any, request: Any) -> Any:
                try:
                    return _Outcome(answer(request))
                except grpc.RpcError as exc:
                    return exc  # grpc hands a failed call to the interceptor as its outcome

            details = _CallDetails(
                f"/fl_sidecar.v1.Sidecar/{name}", timeout, metadata, None, None, None
            )
            streaming = name in ("UploadModel", "Pack", "Unpack")
            intercept = (
                self._interceptor.intercept_stream_unary
                if streaming
                else self._interceptor.intercept_unary_unary
            )
            return intercept(continuation, details, request).result()

        return call


def _upload_through(journal: Any) -> Any:
    client = SidecarClient("127.0.0.1:1")  # never dialled: the stub answers

    def upload(requests: Iterator[Any]) -> Any:
        for _ in requests:  # the whole stream goes out, then the connection breaks
            pass
        raise _unavailable()

    def get_upload(request: Any) -> Any:
        assert request.upload_id == "u-1"
        if isinstance(journal, BaseException):
            raise journal
        return journal

    stub = _InterceptedStub(client._interceptor, {"UploadModel": upload, "GetUpload": get_upload})
    client._stub = stub  # type: ignore[assignment]
    try:
        return client.upload("m1", b"model", round=0, sample_size=1, upload_id="u-1")
    finally:
        assert stub.asked == ["UploadModel", "GetUpload"]
        client.close()


def test_a_broken_upload_call_asks_the_journal_and_never_says_retry_blindly() -> None:
    # The sidecar cannot be asked either: the outcome is unknown, not "retry".
    with pytest.raises(UploadFailedError) as unknown:
        _upload_through(_unavailable())
    assert (unknown.value.code, unknown.value.upload_state) == ("UNKNOWN", "unknown")
    assert unknown.value.upload_id == "u-1"
    assert "get_upload('u-1')" in str(unknown.value)
    # The journal never saw it: nothing was sent, retrying is safe.
    with pytest.raises(UploadFailedError) as not_sent:
        _upload_through(_Failed(grpc.StatusCode.NOT_FOUND, "never began to send it"))
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


def test_an_upload_the_sidecar_refused_is_typed_and_keeps_its_trailer_state() -> None:
    client = SidecarClient("127.0.0.1:1")

    def upload(requests: Iterator[Any]) -> Any:
        for _ in requests:
            pass
        raise _Failed(
            grpc.StatusCode.NOT_FOUND,
            "download failed: HTTP 400: Model m1 not found.",
            (
                ("fl-sidecar-error", "NotFoundError"),
                ("fl-sidecar-http-status", "400"),
                ("fl-sidecar-upload-id", "u-2"),
                ("fl-sidecar-upload-state", "not_sent"),
            ),
        )

    stub = _InterceptedStub(client._interceptor, {"UploadModel": upload})
    client._stub = stub  # type: ignore[assignment]
    try:
        with pytest.raises(NotFoundError) as caught:
            client.upload("m1", b"model", round=0, sample_size=1, upload_id="u-2")
    finally:
        client.close()
    error = caught.value
    assert isinstance(error, UploadFailedError) and isinstance(error, SidecarError)
    assert (error.code, error.upload_id, error.upload_state) == ("NOT_FOUND", "u-2", "not_sent")
    assert (error.status, error.operation) == (400, "upload")
    assert str(error).startswith("upload u-2 for model m1 failed (NOT_FOUND): ")
    assert stub.asked == ["UploadModel"]  # the trailer said it: no journal question


def test_a_failing_progress_callback_is_the_error_of_an_upload() -> None:
    client = SidecarClient("127.0.0.1:1")

    def upload(requests: Iterator[Any]) -> Any:
        try:
            for _ in requests:
                pass
        except ValueError:
            # grpc turns an exception of the request stream into a cancelled call.
            raise _Failed(grpc.StatusCode.UNKNOWN, "Exception iterating requests!") from None
        raise AssertionError("the stream should have failed")

    def progress(done: int, total: int) -> None:
        raise ValueError("the trainer's progress bar broke")

    client._stub = _InterceptedStub(client._interceptor, {"UploadModel": upload})  # type: ignore[assignment]
    try:
        with pytest.raises(ValueError, match="progress bar broke"):
            client.upload("m1", b"model", round=0, sample_size=1, progress=progress)
    finally:
        client.close()


def test_no_socket_means_an_upload_was_not_sent(tmp_path: Any) -> None:
    client = SidecarClient(str(tmp_path / "none.sock"))
    try:
        with pytest.raises(UploadFailedError) as caught:
            client.upload("m1", b"model", round=0, sample_size=1, upload_id="u-3")
    finally:
        client.close()
    assert (caught.value.code, caught.value.upload_state) == ("UNAVAILABLE", "not_sent")
    assert "nothing was sent" in str(caught.value)
    assert client.last_upload_id == "u-3"


def test_a_subscription_to_a_missing_socket_fails_when_made(tmp_path: Any) -> None:
    client = SidecarClient(str(tmp_path / "none.sock"))
    try:
        with pytest.raises(SidecarError, match="no sidecar is listening") as caught:
            client.watch_events()
        assert caught.value.code == "UNAVAILABLE"
        with pytest.raises(SidecarError, match="no sidecar is listening"):
            client.download("m1")  # a server stream refused the same way, when read
    finally:
        client.close()


class _FakeDownloadCall:
    """A DownloadModel call's messages, then optionally the error the interceptor raises."""

    def __init__(self, messages: List[pb.DownloadModelResponse], error: Any) -> None:
        self._messages = messages
        self._error = error
        self.cancelled = False

    def __iter__(self) -> Iterator[pb.DownloadModelResponse]:
        yield from self._messages
        if self._error is not None:
            raise self._error

    def cancel(self) -> None:
        self.cancelled = True


def _serve_download(
    client: SidecarClient, data: bytes, *, cut_at: Union[int, None] = None
) -> _FakeDownloadCall:
    import hashlib

    info = pb.ModelInfo(model_id="m", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    sent = data if cut_at is None else data[:cut_at]
    messages = [pb.DownloadModelResponse(info=info)] + [
        pb.DownloadModelResponse(chunk=sent[i : i + 7]) for i in range(0, len(sent), 7)
    ]
    error = None if cut_at is None else SidecarError("vetting failed", code="INVALID_ARGUMENT")
    call = _FakeDownloadCall(messages, error)

    class Stub:
        def DownloadModel(self, request: Any, timeout: Any = None) -> _FakeDownloadCall:
            return call

    client._stub = Stub()  # type: ignore[assignment]
    return call


def test_tensor_downloads_go_through_a_removed_private_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch = pytest.importorskip("torch")
    from fl_sidecar.modelfiles.torch_io import to_safetensors

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    weights = {"a.weight": torch.arange(12.0).view(3, 4), "b": torch.ones(5, dtype=torch.int64)}
    with SidecarClient("unix:///nonexistent/fl.sock") as client:
        _serve_download(client, to_safetensors(weights))
        got = client.download_state_dict("m")
    assert set(got) == set(weights)
    assert all(torch.equal(got[n], weights[n]) for n in weights)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["download_state_dict", "download_module"])
def test_a_download_stream_that_ends_in_an_error_is_no_model(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    torch = pytest.importorskip("torch")
    from fl_sidecar.modelfiles.torch_io import to_safetensors

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    data = to_safetensors({"w": torch.zeros(64)})
    with SidecarClient("unix:///nonexistent/fl.sock") as client:
        # All bytes but the stream's end arrived, then the sidecar refused the model.
        _serve_download(client, data, cut_at=len(data))
        with pytest.raises(SidecarError, match="vetting failed"):
            getattr(client, method)("m")
    assert list(tmp_path.iterdir()) == []
