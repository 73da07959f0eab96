"""A trainer's client raises the sidecar's domain error typed, through the real stack.

A real dev FL server, a real sidecar subprocess and a real ``SidecarClient``:
each failure is caught by its domain class (``NotFoundError``,
``ConflictError``, ...) and is a ``SidecarError`` with its gRPC code at the
same time. The id rules of ``docs/trainers.md`` are checked here too.
"""

from __future__ import annotations

import uuid

import pytest
from trainer_stack import ClientSide, TrainerStack, tiny_module_bytes

from fl_sidecar import errors
from fl_sidecar.client import CallCredentials
from fl_sidecar.errors import (
    AuthenticationError,
    ConflictError,
    NotFoundError,
    SidecarError,
    UploadFailedError,
)


@pytest.fixture(scope="module")
def side(stack: TrainerStack) -> ClientSide:
    return stack.add_client()


def test_an_unknown_model_is_a_not_found_error(side: ClientSide) -> None:
    with pytest.raises(NotFoundError) as caught:
        side.client.download(str(uuid.uuid4()))
    error = caught.value
    assert isinstance(error, SidecarError)
    assert (error.code, error.error_class) == ("NOT_FOUND", "NotFoundError")
    # The FL server's answer, as a ServerError has it.
    assert error.status is not None and error.status == error.http_status
    assert error.operation == "download"
    assert error.detail and "not found" in error.detail.lower()


def test_an_upload_for_the_wrong_round_is_a_conflict_error(
    stack: TrainerStack, side: ClientSide
) -> None:
    ids = stack.training([side], rounds=2, start=True)
    weights = side.client.download_state_dict(ids["model_id"])
    with pytest.raises(ConflictError) as caught:
        side.client.upload_state_dict(ids["model_id"], weights, round=1, sample_size=1)
    error = caught.value
    assert isinstance(error, UploadFailedError) and isinstance(error, SidecarError)
    assert (error.code, error.upload_state) == ("FAILED_PRECONDITION", "rejected")
    assert error.operation == "upload" and error.status == error.http_status
    # The round the server is in still takes the upload.
    reply = side.client.upload_state_dict(ids["model_id"], weights, round=0, sample_size=1)
    assert reply.http_status == 201


def test_an_unknown_training_and_wrong_credentials_are_typed(side: ClientSide) -> None:
    with pytest.raises(NotFoundError) as missing:
        side.client.get_training(str(uuid.uuid4()))
    assert isinstance(missing.value, SidecarError) and missing.value.code == "NOT_FOUND"
    with pytest.raises(AuthenticationError) as refused:
        side.client.get_training(
            str(uuid.uuid4()), credentials=CallCredentials.basic("nobody", "wrong")
        )
    assert isinstance(refused.value, SidecarError) and refused.value.code == "UNAUTHENTICATED"


def test_weights_that_do_not_fit_are_a_tensor_mismatch(
    stack: TrainerStack, side: ClientSide
) -> None:
    torch = pytest.importorskip("torch")
    ids = stack.training([side], rounds=1, start=True)
    with pytest.raises(errors.TensorMismatchError) as caught:
        side.client.upload_state_dict(
            ids["model_id"], {"not.a.layer": torch.zeros(3)}, round=0, sample_size=1
        )
    assert isinstance(caught.value, UploadFailedError)
    assert caught.value.code == "INVALID_ARGUMENT"


def test_a_corrupt_blob_is_a_codec_error(side: ClientSide) -> None:
    with pytest.raises(errors.CorruptDataError) as caught:
        side.client.unpack(b"definitely not zstd")
    assert isinstance(caught.value, SidecarError) and caught.value.code == "DATA_LOSS"


@pytest.mark.parametrize("model_id", ["not-a-uuid", str(uuid.uuid4())])
def test_an_id_the_server_does_not_know_is_not_found(side: ClientSide, model_id: str) -> None:
    # Ids are the FL server's business: the sidecar passes any well-formed one on.
    with pytest.raises(NotFoundError) as caught:
        side.client.download(model_id)
    assert isinstance(caught.value, SidecarError) and caught.value.code == "NOT_FOUND"


@pytest.mark.parametrize("model_id", ["a/b", "a b", "x?y", "x#y", "m" * 201, ""])
def test_a_malformed_id_is_refused_by_the_sidecar(side: ClientSide, model_id: str) -> None:
    # Never sent: it would change the FL server's URL path or query.
    with pytest.raises(SidecarError) as caught:
        side.client.download(model_id)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.http_status is None
    assert not isinstance(caught.value, errors.ServerError)


def test_a_bad_upload_id_is_refused_before_anything_is_sent(side: ClientSide) -> None:
    with pytest.raises(UploadFailedError) as caught:
        side.client.upload("m", tiny_module_bytes(), round=0, sample_size=1, upload_id="has space")
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.upload_state == "not_sent"


def test_compression_never_changes_downloads_too(stack: TrainerStack, side: ClientSide) -> None:
    # What docs/trainers.md says of --compression never: identity both ways.
    never = stack.add_client(extra_args=["--compression", "never"])
    model_id = stack.devserver.upload_model(stack.actor, tiny_module_bytes(seed=5))
    data, coded = side.client.download_with_info(model_id)
    same, plain = never.client.download_with_info(model_id)
    assert same == data
    assert coded.content_encoding == "zstd"  # the dev server offers zstd: auto takes it
    assert (plain.content_encoding, plain.wire_bytes) == ("identity", len(data))
    assert never.client.get_info().negotiated_coding == "identity"
