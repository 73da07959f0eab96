"""Unit tests of ``fl_sidecar.trainer.remote_errors``: the sidecar's domain error, raised typed."""

from __future__ import annotations

import pickle

import pytest

from fl_sidecar import errors
from fl_sidecar.errors import (
    ConflictError,
    FlSidecarError,
    NotFoundError,
    ServerError,
    SidecarError,
    TransferCancelledError,
    UploadFailedError,
)
from fl_sidecar.service import status_for
from fl_sidecar.trainer.remote_errors import DOMAIN_ERRORS, remote_error, remote_error_type


def _mappable() -> list[type]:
    """Every class of ``fl_sidecar.errors`` the servicer maps to a status other than INTERNAL."""
    found = []
    for name in errors.__all__:
        cls = getattr(errors, name)
        if not (isinstance(cls, type) and issubclass(cls, FlSidecarError)):
            continue
        if issubclass(cls, SidecarError) or cls is FlSidecarError:
            continue  # the sidecar's own refusals travel as they are
        instance = cls.__new__(cls)
        if isinstance(instance, TransferCancelledError):
            instance.shutting_down = False  # what the servicer reads of it
        if status_for(instance).name != "INTERNAL":
            found.append(cls)
    return found


def test_every_error_the_servicer_maps_has_a_typed_form() -> None:
    mappable = _mappable()
    assert NotFoundError in mappable and ConflictError in mappable  # the scan sees them
    for cls in mappable:
        assert DOMAIN_ERRORS[cls.__name__] is cls


@pytest.mark.parametrize("name", sorted(DOMAIN_ERRORS))
@pytest.mark.parametrize("base", [SidecarError, UploadFailedError])
def test_each_class_is_raised_as_itself_and_as_a_sidecar_error(
    name: str, base: type[SidecarError]
) -> None:
    fields = {"upload_id": "u", "upload_state": "rejected"} if base is UploadFailedError else {}
    error = remote_error(
        base,
        f"call failed: {name}",
        code="FAILED_PRECONDITION",
        error_class=name,
        http_status=409,
        http_body='["Training t is not currently in round 5"]',
        http_content_type="application/json",
        method="UploadModel",
        **fields,
    )
    assert isinstance(error, DOMAIN_ERRORS[name])
    assert isinstance(error, base) and isinstance(error, SidecarError)
    assert type(error).__name__ == name
    assert str(error) == f"call failed: {name}"
    assert (error.code, error.error_class, error.http_status) == ("FAILED_PRECONDITION", name, 409)
    if base is UploadFailedError:
        assert isinstance(error, UploadFailedError)
        assert (error.upload_id, error.upload_state) == ("u", "rejected")
    if isinstance(error, ServerError):
        assert (error.status, error.operation) == (409, "upload")
        assert error.detail == "Training t is not currently in round 5"
        assert error.body == '["Training t is not currently in round 5"]'
        assert error.content_type == "application/json"
    # One type per pair: ``type(a) is type(b)`` for two errors of the same kind.
    assert remote_error_type(base, name) is type(error)


def test_unknown_or_missing_class_names_give_the_plain_base() -> None:
    for name in (None, "", "NoSuchError", "DownloadCancelledError", "SidecarError", "object"):
        error = remote_error(SidecarError, "m", code="UNKNOWN", error_class=name)
        assert type(error) is SidecarError
    upload = remote_error(
        UploadFailedError,
        "m",
        code="UNKNOWN",
        error_class="UploadFailedError",
        upload_id="",
        upload_state="",
    )
    assert type(upload) is UploadFailedError


def test_server_detail_is_the_servers_message() -> None:
    def detail(body: str | None, content_type: str | None = None) -> object:
        error = remote_error(
            SidecarError,
            "m",
            code="NOT_FOUND",
            error_class="NotFoundError",
            http_body=body,
            http_content_type=content_type,
            method="DownloadModel",
        )
        assert isinstance(error, NotFoundError)
        assert error.operation == "download"
        return error.detail

    assert detail('{"detail": "Model m not found."}') == "Model m not found."
    assert detail('{"a": 1}', "application/json") == "a: 1"
    assert detail("<html>teapot</html>") == "<html>teapot</html>"
    assert detail(None) is None


def test_a_cancelled_transfer_says_whether_the_sidecar_was_shutting_down() -> None:
    stopping = remote_error(
        SidecarError, "m", code="UNAVAILABLE", error_class="TransferCancelledError"
    )
    left = remote_error(SidecarError, "m", code="CANCELLED", error_class="TransferCancelledError")
    assert isinstance(stopping, TransferCancelledError) and stopping.shutting_down
    assert isinstance(left, TransferCancelledError) and not left.shutting_down


def test_a_typed_error_survives_pickling() -> None:
    error = remote_error(
        UploadFailedError,
        "upload u failed",
        code="FAILED_PRECONDITION",
        error_class="ConflictError",
        http_status=400,
        http_body='["not in round 5"]',
        method="UploadModel",
        upload_id="u",
        upload_state="rejected",
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert isinstance(copy, ConflictError) and isinstance(copy, UploadFailedError)
    assert str(copy) == "upload u failed"
    assert (copy.code, copy.upload_state, copy.status, copy.detail) == (
        "FAILED_PRECONDITION",
        "rejected",
        400,
        "not in round 5",
    )
