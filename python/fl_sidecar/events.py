"""The FL server's notifications as typed values: the kinds, the event, the parser.

Shared by both sides: the sidecar's notification endpoint parses each POST with
:func:`parse_notification`, its event bus (:mod:`fl_sidecar.sidecar.eventbus`,
re-exported here as :class:`EventBus`) numbers them as :class:`ServerEvent`
values, and trainers read them through ``WatchEvents`` and compare
:class:`EventKind` values (``from fl_sidecar.events import EventKind``).
"""

from __future__ import annotations

import enum
import json
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, FrozenSet, Optional, Tuple, cast

from fl_sidecar.errors import MalformedNotificationError

if TYPE_CHECKING:
    from fl_sidecar.sidecar.eventbus import (
        DEFAULT_DEDUPE_TRAININGS,
        DEFAULT_HISTORY,
        DEFAULT_HISTORY_BYTES,
        EventBus,
        Subscription,
        Verdict,
    )

__all__ = [
    "DEFAULT_DEDUPE_TRAININGS",
    "DEFAULT_HISTORY",
    "DEFAULT_HISTORY_BYTES",
    "DEFAULT_MAX_NOTIFICATION_SIZE",
    "MAX_ROUND",
    "ROUND_KINDS",
    "EventBus",
    "EventKind",
    "ServerEvent",
    "Subscription",
    "Verdict",
    "clock_first_seq",
    "is_valid_id",
    "parse_notification",
]

# The sidecar's event bus moved to fl_sidecar.sidecar.eventbus; its names stay
# importable from here, loaded on first use (the bus imports this module, so a
# plain import here would be a cycle).
_MOVED_TO_EVENTBUS = frozenset(
    {
        "DEFAULT_DEDUPE_TRAININGS",
        "DEFAULT_HISTORY",
        "DEFAULT_HISTORY_BYTES",
        "EventBus",
        "Subscription",
        "Verdict",
    }
)

DEFAULT_MAX_NOTIFICATION_SIZE = 64 * 1024
"""Bytes: the largest notification the endpoint accepts (the real ones are ~150 bytes)."""

MAX_ROUND = 2**31 - 1
"""The largest round number accepted (the gRPC contract carries it as uint32)."""

# Training and model ids end up on a training script's command line and in
# logs: accept what the server sends (UUIDs) and other plain tokens, but
# nothing that starts with "-" (an option to the script's parser), no
# whitespace, no control characters.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")


class EventKind(enum.Enum):
    """What a notification means to a trainer."""

    TRAINING_START = "TRAINING_START"
    UPDATE_ROUND_START = "UPDATE_ROUND_START"
    MODEL_TEST_ROUND = "MODEL_TEST_ROUND"
    TRAINING_FINISHED = "TRAINING_FINISHED"
    SWAG_ROUND_START = "SWAG_ROUND_START"
    CLIENT_REMOVED = "CLIENT_REMOVED"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def from_notification_type(cls, notification_type: str) -> EventKind:
        """Map the server's ``notification_type`` to a kind; anything else is ``UNKNOWN``."""
        try:
            return cls(notification_type)
        except ValueError:
            return cls.UNKNOWN


ROUND_KINDS: FrozenSet[EventKind] = frozenset(
    {EventKind.UPDATE_ROUND_START, EventKind.MODEL_TEST_ROUND, EventKind.SWAG_ROUND_START}
)
"""The kinds that start a round: their body carries ``round`` and ``global_model_uuid``."""
# The other kinds whose body must name the global model (as the real server sends them).
_MODEL_KINDS: FrozenSet[EventKind] = ROUND_KINDS | {
    EventKind.TRAINING_START,
    EventKind.TRAINING_FINISHED,
}


@dataclass(frozen=True)
class ServerEvent:
    """One notification of the FL server, numbered by the bus.

    Attributes:
        seq: strictly increasing, consecutive within one bus (from its ``first_seq``).
        kind: what it means; ``UNKNOWN`` for a type this version does not know.
        notification_type: the type as the server sent it.
        training_id: the notification's ``training_uuid``.
        model_id: ``body.global_model_uuid``, or ``None`` when absent.
        round: ``body.round``, or ``None`` when absent.
        body_json: the notification's ``body`` as compact JSON text.
        raw_json: the whole notification as received (at most the endpoint's
            body size limit).
        received_at: when it was published, unix time in seconds.
    """

    seq: int
    kind: EventKind
    notification_type: str
    training_id: str
    model_id: Optional[str]
    round: Optional[int]
    body_json: str
    raw_json: str
    received_at: float

    def body(self) -> Dict[str, Any]:
        """The notification's ``body`` as a fresh dict (decoded from :attr:`body_json`)."""
        decoded = json.loads(self.body_json)
        return decoded if isinstance(decoded, dict) else {}


def clock_first_seq() -> int:
    """A first sequence number from the clock: microseconds since the Unix epoch.

    A restarted sidecar then numbers its events above every number the previous
    process gave out (unless it published more than a million events a second or
    the clock went back), so a trainer resuming with the last number it saw gets
    every event of the new process instead of skipping the first ones. The values
    stay below 2**53, exact as JavaScript numbers.
    """
    return max(1, time.time_ns() // 1000)


def _reject_constant(name: str) -> Any:
    raise MalformedNotificationError(f"notification contains the non-JSON constant {name}")


def is_valid_id(value: Any) -> bool:
    """Whether ``value`` is an acceptable training or model id.

    A string of 1 to 128 letters, digits and ``._:-`` that does not start with
    ``-`` (UUIDs are): safe as a separate command-line argument, a file name
    part and in a log line.
    """
    return isinstance(value, str) and _ID_PATTERN.match(value) is not None


def _describe(value: Any) -> str:
    """A short, safe description of a bad value for an error message (never the value in full)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_notification(
    data: bytes, *, max_size: int = DEFAULT_MAX_NOTIFICATION_SIZE
) -> Tuple[str, str, Dict[str, Any]]:
    """Parse and validate one notification POSTed by the FL server.

    Args:
        data: the request body, UTF-8 JSON
            ``{"notification_type": str, "training_uuid": str, "body": {...}}``.
        max_size: the largest accepted body, in bytes.

    Returns:
        ``(notification_type, training_id, body)``. Types this version does not
        know are returned too (their body must still be a JSON object); the
        caller publishes them as ``EventKind.UNKNOWN``.

    Raises:
        MalformedNotificationError: the body is larger than ``max_size``, not
            UTF-8 JSON, nested too deeply, not an object, lacks a field, or a
            field has the wrong type: ``notification_type`` must be a non-empty
            string, ``training_uuid`` an id (letters, digits, ``._:-``, at most
            128, not starting with ``-``), ``body`` an object; a known type's
            ``global_model_uuid`` must be an id and a round type's ``round`` an
            integer in ``0..MAX_ROUND``.
    """
    if len(data) > max_size:
        raise MalformedNotificationError(
            f"notification of {len(data)} bytes exceeds the limit of {max_size} bytes"
        )
    try:
        text = bytes(data).decode("utf-8")
        decoded = json.loads(text, parse_constant=_reject_constant)
    except MalformedNotificationError:
        raise
    except (ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError, UnicodeDecodeError and Python's
        # limit on digits in an int; RecursionError is deeply nested arrays.
        raise MalformedNotificationError(
            f"notification is not valid UTF-8 JSON: {type(exc).__name__}"
        ) from None
    if not isinstance(decoded, dict):
        raise MalformedNotificationError(
            f"notification must be a JSON object, got {type(decoded).__name__}"
        )
    notification_type = decoded.get("notification_type")
    if not isinstance(notification_type, str) or not notification_type:
        raise MalformedNotificationError(
            "notification_type is missing or not a non-empty string: "
            f"{_describe(notification_type)}"
        )
    if len(notification_type) > 128 or not notification_type.isprintable():
        raise MalformedNotificationError(
            f"notification_type is not a plain name: {_describe(notification_type)}"
        )
    training_id = decoded.get("training_uuid")
    if not is_valid_id(training_id):
        raise MalformedNotificationError(
            f"training_uuid is missing or not an id: {_describe(training_id)}"
        )
    body = decoded.get("body")
    if not isinstance(body, dict):
        raise MalformedNotificationError(f"body is missing or not a JSON object: {_describe(body)}")
    kind = EventKind.from_notification_type(notification_type)
    if kind in _MODEL_KINDS and not is_valid_id(body.get("global_model_uuid")):
        raise MalformedNotificationError(
            f"{notification_type}: body.global_model_uuid is missing or not an id: "
            f"{_describe(body.get('global_model_uuid'))}"
        )
    if kind in ROUND_KINDS:
        round_ = body.get("round")
        # bool is an int subclass; true is not a round.
        if not isinstance(round_, int) or isinstance(round_, bool) or not 0 <= round_ <= MAX_ROUND:
            raise MalformedNotificationError(
                f"{notification_type}: body.round is missing or not an integer in "
                f"0..{MAX_ROUND}: {_describe(round_)}"
            )
    return notification_type, cast(str, training_id), body


def __getattr__(name: str) -> Any:
    """The event bus's names, from :mod:`fl_sidecar.sidecar.eventbus` (where they live now)."""
    if name in _MOVED_TO_EVENTBUS:
        import importlib

        return getattr(importlib.import_module("fl_sidecar.sidecar.eventbus"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
