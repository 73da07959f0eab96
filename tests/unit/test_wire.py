"""The client-sidecar contract is defined once, in fl_sidecar.wire, and covers the proto."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fl_sidecar import uploads, wire
from fl_sidecar.events import EventKind, ServerEvent
from fl_sidecar.v1 import sidecar_pb2 as pb

PACKAGE = Path(wire.__file__).resolve().parent

CONTRACT_NAMES = [
    "MAX_MESSAGE_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "MAX_CHUNK_SIZE",
    "TOKEN_METADATA_KEY",
    "ERROR_CLASS_KEY",
    "HTTP_STATUS_KEY",
    "HTTP_BODY_KEY",
    "HTTP_CONTENT_TYPE_KEY",
    "HTTP_BODY_LIMIT",
    "UPLOAD_ID_METADATA_KEY",
    "UPLOAD_STATE_METADATA_KEY",
    "EVENT_KINDS",
    "UPLOAD_STATES",
    "FORMATS",
    "FORMAT_TORCH",
    "FORMAT_SAFETENSORS",
]


# Same names, other meanings: the codec's frame sizes (not messages), the model
# files' struct formats for strided views.
UNRELATED = {
    ("MAX_CHUNK_SIZE", "codec.py"),
    ("DEFAULT_CHUNK_SIZE", "codec.py"),
    ("FORMATS", "modelfiles/strided.py"),
}


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_each_contract_name_is_defined_once(name: str) -> None:
    definition = re.compile(rf"^\s*_?{name}\s*(:[^=]*)?=", re.MULTILINE)
    homes = [
        path.relative_to(PACKAGE).as_posix()
        for path in PACKAGE.rglob("*.py")
        if "v1" not in path.parts and definition.search(path.read_text("utf-8"))
    ]
    assert [home for home in homes if (name, home) not in UNRELATED] == ["wire.py"]


def test_every_event_kind_maps_both_ways() -> None:
    assert set(wire.EVENT_KINDS) == set(EventKind)
    assert sorted(wire.EVENT_KINDS.values()) == sorted(
        set(pb.EventKind.values()) - {pb.EVENT_KIND_UNSPECIFIED}
    )
    for kind in EventKind:
        event = ServerEvent(
            seq=7,
            kind=kind,
            notification_type=kind.value,
            training_id="t",
            model_id="m",
            round=2,
            body_json="{}",
            raw_json="{}",
            received_at=1.5,
        )
        assert wire.event_from_proto(wire.event_to_proto(event)) == event


def test_upload_states_are_the_journals_and_cover_the_proto() -> None:
    journal = {uploads.NOT_SENT, uploads.SENDING, uploads.ACCEPTED, uploads.REJECTED}
    assert journal | {uploads.UNKNOWN} == set(wire.UPLOAD_STATES)
    proto_states = set(pb.UploadState.values()) - {pb.UPLOAD_STATE_UNSPECIFIED}
    assert set(wire.UPLOAD_STATES.values()) == proto_states
    for name, value in wire.UPLOAD_STATES.items():
        assert wire.upload_state_name(value) == name
    assert wire.upload_state_name(999) == "unknown"


def test_formats_and_chunk_limits_agree() -> None:
    for name, value in wire.FORMATS.items():
        assert wire.format_name(value) == name
    assert wire.format_name(pb.MODEL_FORMAT_UNSPECIFIED) == wire.FORMAT_TORCH
    with pytest.raises(ValueError, match="unknown model format"):
        wire.format_name(42)
    # A chunk and its framing fit one message.
    assert wire.DEFAULT_CHUNK_SIZE <= wire.MAX_CHUNK_SIZE <= wire.MAX_MESSAGE_SIZE // 2


def test_metrics_round_trip_numbers_and_text() -> None:
    sent = [wire.metric_to_proto(k, v) for k, v in [("acc", 0.5), ("n", 3), ("note", "abc")]]
    assert wire.metrics_from_proto(sent) == {"acc": 0.5, "n": 3.0, "note": "abc"}
    with pytest.raises(ValueError, match="twice"):
        wire.metrics_from_proto(sent + sent[:1])
    with pytest.raises(ValueError, match="no name"):
        wire.metrics_from_proto([pb.Metric(value=1.0)])


def test_credentials_from_proto_never_quotes_the_secret() -> None:
    assert wire.credentials_from_proto(pb.Credentials()) is None
    made = wire.credentials_from_proto(pb.Credentials(token="t0ken-value-123"))
    assert made is not None and "t0ken-value-123" not in repr(made)
    with pytest.raises(ValueError) as bad:
        wire.credentials_from_proto(pb.Credentials(authorization_header="Basic s3cret-value!"))
    assert "s3cret-value" not in str(bad.value)
