"""The contract between a trainer's client and the sidecar, in one place.

Everything both ends of ``fl_sidecar.v1.Sidecar`` must agree on beyond the
proto itself lives here, and only here: the message limits and chunk sizes,
the metadata keys (the API token, a failed call's cause, an upload's id and
state), the maps between the proto's enums and the package's own names, and
the conversions of events, credentials and metrics between proto messages and
Python values. The Python client (:mod:`fl_sidecar.client`), the servicer
(:mod:`fl_sidecar.service`) and the ``serve`` process (:mod:`fl_sidecar.server`)
import it; trainers in other languages find the same facts in the proto's
comments and ``docs/trainers.md``.

It imports the generated protobuf code and the standard library only (no grpc,
no requests, no torch), so both sides can use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Dict, Iterable, Optional, Union

from fl_sidecar.events import EventKind, ServerEvent
from fl_sidecar.v1 import sidecar_pb2 as pb

if TYPE_CHECKING:
    from fl_sidecar.flserver import Credentials

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ERROR_CLASS_KEY",
    "EVENT_KINDS",
    "FORMATS",
    "FORMAT_SAFETENSORS",
    "FORMAT_TORCH",
    "HTTP_BODY_KEY",
    "HTTP_BODY_LIMIT",
    "HTTP_CONTENT_TYPE_KEY",
    "HTTP_STATUS_KEY",
    "MAX_CHUNK_SIZE",
    "MAX_MESSAGE_SIZE",
    "TOKEN_METADATA_KEY",
    "UPLOAD_ID_METADATA_KEY",
    "UPLOAD_STATES",
    "UPLOAD_STATE_METADATA_KEY",
    "MetricValue",
    "credentials_from_proto",
    "event_from_proto",
    "event_to_proto",
    "format_name",
    "metric_to_proto",
    "metrics_from_proto",
    "upload_state_name",
]

# --- sizes ----------------------------------------------------------------

MAX_MESSAGE_SIZE = 8 * 1024 * 1024
"""Bytes: the largest gRPC message either side sends or accepts.

A chunk travels inside a message with a few bytes of framing, so chunks stay
at or below :data:`MAX_CHUNK_SIZE`, half of this limit."""

DEFAULT_CHUNK_SIZE = 1024 * 1024
"""Bytes per streamed model chunk when the caller names no size (1 MiB)."""

MAX_CHUNK_SIZE = 4 * 1024 * 1024
"""Bytes: the largest chunk a streamed message may carry (4 MiB); larger ones are refused."""

# --- metadata keys ----------------------------------------------------------

TOKEN_METADATA_KEY = "x-fl-sidecar-token"
"""Request metadata: the sidecar's API token (TCP listeners started with one)."""

# Where a failed call's cause travels from the sidecar to its client: gRPC
# trailing metadata (the proto's header comment documents the keys).
ERROR_CLASS_KEY = "fl-sidecar-error"
"""Trailing metadata: the sidecar's error class name, e.g. ``"NotFoundError"``."""
HTTP_STATUS_KEY = "fl-sidecar-http-status"
"""Trailing metadata: the FL server's HTTP status as decimal digits."""
HTTP_BODY_KEY = "fl-sidecar-http-body-bin"
"""Trailing metadata (binary): the FL server's answer body, UTF-8."""
HTTP_CONTENT_TYPE_KEY = "fl-sidecar-http-content-type"
"""Trailing metadata: the FL server's ``Content-Type``."""
HTTP_BODY_LIMIT = 4096
"""Bytes: the most of the server's body a failed call carries (metadata must stay small)."""

UPLOAD_ID_METADATA_KEY = "fl-sidecar-upload-id"
"""Trailing metadata of every UploadModel status the sidecar sends: the upload's id."""
UPLOAD_STATE_METADATA_KEY = "fl-sidecar-upload-state"
"""Trailing metadata of every UploadModel status the sidecar sends: ``not_sent``,
``accepted``, ``rejected``, ``unknown`` or (refused as in progress) ``sending``."""

# --- enums and names ----------------------------------------------------------

FORMAT_TORCH = "torch"
"""A model in the FL server's own form: a torch file (pickled module or TorchScript)."""
FORMAT_SAFETENSORS = "safetensors"
"""A model as a safetensors file: the language-neutral form."""

FORMATS: Dict[str, int] = {
    FORMAT_TORCH: pb.MODEL_FORMAT_TORCH,
    FORMAT_SAFETENSORS: pb.MODEL_FORMAT_SAFETENSORS,
}
"""The proto's ``ModelFormat`` by its user-facing name (CLI, Python API)."""

EVENT_KINDS: Dict[EventKind, int] = {
    EventKind.TRAINING_START: pb.EVENT_KIND_TRAINING_START,
    EventKind.UPDATE_ROUND_START: pb.EVENT_KIND_UPDATE_ROUND_START,
    EventKind.MODEL_TEST_ROUND: pb.EVENT_KIND_MODEL_TEST_ROUND,
    EventKind.TRAINING_FINISHED: pb.EVENT_KIND_TRAINING_FINISHED,
    EventKind.SWAG_ROUND_START: pb.EVENT_KIND_SWAG_ROUND_START,
    EventKind.CLIENT_REMOVED: pb.EVENT_KIND_CLIENT_REMOVED,
    EventKind.UNKNOWN: pb.EVENT_KIND_UNKNOWN,
}
"""The proto's ``EventKind`` for each of ours (every kind, ``UNKNOWN`` included)."""
_KINDS_BY_PROTO: Dict[int, EventKind] = {value: kind for kind, value in EVENT_KINDS.items()}

UPLOAD_STATES: Dict[str, int] = {
    "not_sent": pb.UPLOAD_STATE_NOT_SENT,
    "sending": pb.UPLOAD_STATE_SENDING,
    "accepted": pb.UPLOAD_STATE_ACCEPTED,
    "rejected": pb.UPLOAD_STATE_REJECTED,
    "unknown": pb.UPLOAD_STATE_UNKNOWN,
}
"""The proto's ``UploadState`` by the name the journal and the trailers use."""
_UPLOAD_STATE_NAMES: Dict[int, str] = {value: name for name, value in UPLOAD_STATES.items()}

MetricValue = Union[float, str]
"""A metric's value: a number, or text the FL server stores as it is."""


def format_name(value: int) -> str:
    """The name (``"torch"``/``"safetensors"``) of a proto ``ModelFormat``; unset is TORCH.

    Raises:
        ValueError: a value the contract does not define.
    """
    if value in (pb.MODEL_FORMAT_UNSPECIFIED, pb.MODEL_FORMAT_TORCH):
        return FORMAT_TORCH
    if value == pb.MODEL_FORMAT_SAFETENSORS:
        return FORMAT_SAFETENSORS
    raise ValueError(f"unknown model format {value}; expected TORCH or SAFETENSORS")


def upload_state_name(value: int) -> str:
    """The name of a proto ``UploadState``; a value this version does not know is ``unknown``."""
    return _UPLOAD_STATE_NAMES.get(value, "unknown")


# --- events ----------------------------------------------------------------


def event_to_proto(event: ServerEvent) -> pb.Event:
    """The ``Event`` message of a server notification the sidecar received."""
    message = pb.Event(
        seq=event.seq,
        kind=EVENT_KINDS.get(event.kind, pb.EVENT_KIND_UNKNOWN),  # type: ignore[arg-type]
        notification_type=event.notification_type,
        training_id=event.training_id,
        model_id=event.model_id or "",
        body_json=event.body_json,
        raw_json=event.raw_json,
        received_at=event.received_at,
    )
    if event.round is not None:
        message.round = event.round
    return message


def event_from_proto(message: pb.Event) -> ServerEvent:
    """The event an ``Event`` message describes.

    A kind this version does not know is taken from ``notification_type``
    (``UNKNOWN`` if that is unknown too), so an older client still reads a newer
    sidecar's events.
    """
    kind = _KINDS_BY_PROTO.get(message.kind)
    if kind is None or kind is EventKind.UNKNOWN:
        kind = EventKind.from_notification_type(message.notification_type)
    return ServerEvent(
        seq=message.seq,
        kind=kind,
        notification_type=message.notification_type,
        training_id=message.training_id,
        model_id=message.model_id or None,
        round=message.round if message.HasField("round") else None,
        body_json=message.body_json,
        raw_json=message.raw_json,
        received_at=message.received_at,
    )


# --- metrics ---------------------------------------------------------------


def metric_to_proto(name: Any, value: Any) -> pb.Metric:
    """One metric: a number as ``value``, anything else as ``text`` (its ``str()``).

    What the FL server receives then matches what the reference client posts
    for the same value (it sends ``str()`` of every value as a form field):
    a text verbatim, ``True``/``False`` for a bool, UTF-8 bytes decoded.
    Numbers are whatever ``float()`` takes (ints, floats, numpy scalars,
    one-element tensors) and go as numbers.

    Raises:
        ValueError: the value is ``None`` (the reference client drops it and its
            names and values no longer pair up), or bytes that are not UTF-8.
    """
    key = str(name)
    if value is None:
        raise ValueError(f"metric {key!r} has no value (None)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        try:
            return pb.Metric(name=key, text=bytes(value).decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError(f"metric {key!r}: bytes that are not UTF-8 text") from None
    if isinstance(value, (str, bool)):
        return pb.Metric(name=key, text=str(value))
    try:
        return pb.Metric(name=key, value=float(value))
    except (TypeError, ValueError, ArithmeticError, RuntimeError):
        # RuntimeError: a tensor of several elements; ArithmeticError: an int beyond a double.
        return pb.Metric(name=key, text=str(value))


def metrics_from_proto(metrics: Iterable[pb.Metric]) -> Dict[str, MetricValue]:
    """The metrics of a request by name: numbers as floats, texts as strings.

    A metric with neither field set is the number 0: clients made before
    ``text`` existed leave a 0.0 value off the wire.

    Raises:
        ValueError: a metric without a name, or a name that appears twice.
    """
    result: Dict[str, MetricValue] = {}
    for metric in metrics:
        if not metric.name:
            raise ValueError("a metric has no name")
        if metric.name in result:
            raise ValueError(f"the metric {metric.name!r} appears twice")
        is_text = metric.WhichOneof("kind") == "text"
        result[metric.name] = metric.text if is_text else metric.value
    return result


# --- credentials -------------------------------------------------------------


def credentials_from_proto(message: pb.Credentials) -> Optional[Credentials]:
    """The FL server credentials a call carries, or ``None`` for the sidecar's own.

    Raises:
        ValueError: the credentials are malformed; the message names only their
            kind, never their value (it might quote the secret).
    """
    kind = message.WhichOneof("kind")
    if kind is None:
        return None
    # The FL server client is imported only here: a trainer's client never needs it.
    credentials_type = importlib.import_module("fl_sidecar.flserver.credentials").Credentials
    try:
        if kind == "basic":
            made = credentials_type.basic(message.basic.username, message.basic.password)
        elif kind == "token":
            made = credentials_type.token(message.token)
        else:
            made = credentials_type.from_header(message.authorization_header)
    except ValueError:  # ConfigurationError is a ValueError too
        raise ValueError(f"the call's {kind} credentials are malformed") from None
    result: Credentials = made
    return result
