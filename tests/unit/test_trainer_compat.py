"""Unit tests of ``fl_sidecar.trainer.compat``: the reference-named exceptions, metric texts,
credentials and the TorchScript check (the reference's signatures: ``test_compat_api.py``)."""

from __future__ import annotations

import pytest

from fl_sidecar.errors import FlSidecarError, NotFoundError, SidecarError
from fl_sidecar.trainer import compat as compat_module
from fl_sidecar.trainer.compat import (
    Communication,
    CommunicationException,
    MetricsUploadException,
    ModelDownloadException,
    ModelUploadException,
    ServerResponse,
    is_torchscript_instance,
)
from fl_sidecar.trainer.remote_errors import remote_error


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


def test_compat_exception_from_a_typed_error_keeps_the_servers_answer() -> None:
    error = remote_error(
        SidecarError,
        "download of model m failed (NOT_FOUND): Model m not found.",
        code="NOT_FOUND",
        error_class="NotFoundError",
        http_status=400,
        http_body='{"detail":"Model m not found."}',
        method="DownloadModel",
    )
    assert isinstance(error, NotFoundError)
    exc = ModelDownloadException._from_sidecar(error)
    assert (exc.code, exc.error_class, exc.response.status_code) == (
        "NOT_FOUND",
        "NotFoundError",
        400,
    )


def test_the_old_import_path_is_the_same_module_content() -> None:
    import fl_sidecar.compat as old

    for name in old.__all__:
        assert getattr(old, name) is getattr(compat_module, name), name
