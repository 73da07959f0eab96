"""The sidecar's event bus: the FL server's notifications numbered, with replay and resume.

The notification endpoint (:mod:`fl_sidecar.sidecar.notifications`) parses each POST
with :func:`fl_sidecar.events.parse_notification` and hands it to :meth:`EventBus.publish`,
which numbers it (consecutive from ``first_seq``; the sidecar starts from the
clock, so numbers also grow across restarts) and keeps it in a bounded history.
Trainers read events through :meth:`EventBus.subscribe` (the gRPC
``WatchEvents`` stream is one subscription per call):

- ``after_seq=None``: first every retained event that no subscriber has
  received yet (a round start that arrived while no trainer listened is
  delivered when one connects), then every live event.
- ``after_seq=N``: every retained event with ``seq > N`` (resume after a
  reconnect), then every live event.

Every subscriber receives every live event; events arrive in publication
order. The history keeps the newest ``history`` events, and no more than
``max_bytes`` of their JSON text (the newest event is always kept): a resume
from a sequence number older than :meth:`EventBus.oldest_seq` gets what is
retained, and a subscriber that falls further behind than the history skips
the events dropped meanwhile (:attr:`Subscription.missed` counts them). An event counts as
received once :meth:`Subscription.get` (or iteration) returned it.

The FL server repeats and reorders notifications (two uploads that finish in
the same second have made it POST one round start three times), so the
endpoint publishes with :meth:`EventBus.publish_once`, which delivers each
(training, type, round) once:

- a repeat of a (training, type, round) already published is dropped;
- a round notification (``UPDATE_ROUND_START``, ``MODEL_TEST_ROUND``,
  ``SWAG_ROUND_START``) whose round is older than the newest round already
  published for its training is dropped (the training has moved on; acting on
  it would redo a finished round);
- ``TRAINING_START``, ``TRAINING_FINISHED`` and ``CLIENT_REMOVED`` are
  published once per training, in whatever order they arrive;
- types this version does not know are never dropped.

What is remembered for this is bounded (the newest round per training, for the
most recent :data:`DEFAULT_DEDUPE_TRAININGS` trainings) and lives as long as
the process: a restarted sidecar delivers a repeat once more.
"""

from __future__ import annotations

import collections
import enum
import json
import math
import threading
import time
from types import TracebackType
from typing import (
    Any,
    Deque,
    FrozenSet,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Set,
    Tuple,
    Type,
)

from fl_sidecar.events import ROUND_KINDS, EventKind, ServerEvent

__all__ = [
    "DEFAULT_DEDUPE_TRAININGS",
    "DEFAULT_HISTORY",
    "DEFAULT_HISTORY_BYTES",
    "EventBus",
    "Subscription",
    "Verdict",
]

DEFAULT_HISTORY = 10_000
"""Events the bus retains for replay and resume."""

DEFAULT_HISTORY_BYTES = 64 * 1024 * 1024
"""Bytes of event JSON text (raw plus body) the bus retains at most."""

DEFAULT_DEDUPE_TRAININGS = 10_000
"""Trainings whose newest round :meth:`EventBus.publish_once` remembers (least recent forgotten)."""


class Verdict(enum.Enum):
    """What :meth:`EventBus.publish_once` did with a notification."""

    PUBLISHED = "published"
    DUPLICATE = "duplicate"
    """The same (training, type, round) was published before."""
    STALE = "stale"
    """A round notification older than the newest round published for its training."""


class _TrainingRounds:
    """What one training has published: its newest round and the kinds seen for it."""

    __slots__ = ("newest_round", "once_kinds", "round_kinds")

    def __init__(self) -> None:
        self.newest_round = -1
        # Kinds published for newest_round: older rounds are refused as stale
        # anyway, so nothing about them needs remembering.
        self.round_kinds: Set[EventKind] = set()
        self.once_kinds: Set[EventKind] = set()

    def verdict(self, kind: EventKind, round_: Optional[int]) -> Verdict:
        if kind in ROUND_KINDS and round_ is not None:
            if round_ < self.newest_round:
                return Verdict.STALE
            if round_ == self.newest_round and kind in self.round_kinds:
                return Verdict.DUPLICATE
            return Verdict.PUBLISHED
        if kind is EventKind.UNKNOWN or kind in ROUND_KINDS:
            return Verdict.PUBLISHED  # nothing to compare an unknown type (or a roundless one) by
        return Verdict.DUPLICATE if kind in self.once_kinds else Verdict.PUBLISHED

    def record(self, kind: EventKind, round_: Optional[int]) -> None:
        if kind in ROUND_KINDS and round_ is not None:
            if round_ > self.newest_round:
                self.newest_round = round_
                self.round_kinds = set()
            self.round_kinds.add(kind)
        elif kind is not EventKind.UNKNOWN and kind not in ROUND_KINDS:
            self.once_kinds.add(kind)


def _optional_model_id(body: Mapping[str, Any]) -> Optional[str]:
    value = body.get("global_model_uuid")
    return value if isinstance(value, str) else None


def _optional_round(body: Mapping[str, Any]) -> Optional[int]:
    value = body.get("round")
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _size(event: ServerEvent) -> int:
    return len(event.raw_json) + len(event.body_json)


class EventBus:
    """Numbers the server's notifications and fans them out to subscribers.

    Thread-safe: any thread may publish, subscribe, read or close. Memory is
    bounded by ``history`` events and ``max_bytes`` of their JSON text.
    """

    def __init__(
        self,
        *,
        history: int = DEFAULT_HISTORY,
        max_bytes: int = DEFAULT_HISTORY_BYTES,
        first_seq: int = 1,
        dedupe_trainings: int = DEFAULT_DEDUPE_TRAININGS,
    ) -> None:
        """Create an empty bus.

        Args:
            history: how many of the newest events to retain for replay and
                resume (at least 1).
            max_bytes: the most characters of ``raw_json`` plus ``body_json``
                the retained events may hold together (a flood of large
                notifications cannot grow memory beyond it); the newest event
                is kept whatever its size.
            first_seq: the first event's sequence number (at least 1); see
                :func:`fl_sidecar.events.clock_first_seq`.
            dedupe_trainings: how many trainings :meth:`publish_once`
                remembers (the least recently notified is forgotten first).

        Raises:
            ValueError: ``history``, ``max_bytes``, ``first_seq`` or
                ``dedupe_trainings`` is less than 1.
        """
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self._history = history
        self._max_bytes = max_bytes
        self._retained_bytes = 0
        self._cond = threading.Condition(threading.Lock())
        self._events: Deque[ServerEvent] = collections.deque()
        if first_seq < 1:
            raise ValueError(f"first_seq must be at least 1, got {first_seq}")
        if dedupe_trainings < 1:
            raise ValueError(f"dedupe_trainings must be at least 1, got {dedupe_trainings}")
        self._first_seq = first_seq
        self._last_seq = first_seq - 1
        self._dedupe_trainings = dedupe_trainings
        self._rounds: collections.OrderedDict[str, _TrainingRounds] = collections.OrderedDict()
        # Open subscriptions that take delivery (observers excluded).
        self._subscribers: Set[Subscription] = set()
        # Retained events no subscriber has received yet; a subscriber with
        # after_seq=None starts with these.
        self._undelivered: Set[int] = set()
        self._closed = False

    @property
    def history(self) -> int:
        """How many events the bus retains."""
        return self._history

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def update_round_of_model(self, model_id: str) -> Optional[int]:
        """The round the global model ``model_id`` is in, if the newest event about it says so.

        That is the round of the newest retained event naming ``model_id`` when it is
        an ``UPDATE_ROUND_START``: until this sidecar's trainers have uploaded for that
        round the server cannot aggregate, so the model's bytes are that round's. Any
        other newest event (a test round, the end of the training) or none retained:
        ``None``, the round is not known.
        """
        with self._cond:
            for event in reversed(self._events):
                if event.model_id == model_id:
                    if event.kind is EventKind.UPDATE_ROUND_START:
                        return event.round
                    return None
        return None

    def publish(
        self,
        notification_type: str,
        training_id: str,
        body: Mapping[str, Any],
        raw_json: str,
    ) -> ServerEvent:
        """Number a notification, retain it and wake every subscriber.

        Repeats are published too; the endpoint uses :meth:`publish_once`.

        Args:
            notification_type: the type as the server sent it (unknown types
                become ``EventKind.UNKNOWN``).
            training_id: the notification's ``training_uuid``.
            body: the notification's ``body`` (must be JSON-serialisable).
            raw_json: the whole notification as received; the caller bounds its size.

        Returns:
            The published event, with its sequence number.

        Raises:
            TypeError, ValueError: ``body`` cannot be serialised as JSON.
        """
        body_json = json.dumps(dict(body), separators=(",", ":"), allow_nan=False)
        kind = EventKind.from_notification_type(notification_type)
        with self._cond:
            return self._publish_locked(
                kind, notification_type, training_id, body, body_json, raw_json
            )

    def publish_once(
        self,
        notification_type: str,
        training_id: str,
        body: Mapping[str, Any],
        raw_json: str,
    ) -> Tuple[Verdict, Optional[ServerEvent]]:
        """Publish a notification unless it repeats one already published (see the module docs).

        Args:
            notification_type, training_id, body, raw_json: as for :meth:`publish`.

        Returns:
            ``(Verdict.PUBLISHED, event)``, or ``(Verdict.DUPLICATE, None)`` /
            ``(Verdict.STALE, None)`` for a notification that was dropped.

        Raises:
            TypeError, ValueError: ``body`` cannot be serialised as JSON.
        """
        body_json = json.dumps(dict(body), separators=(",", ":"), allow_nan=False)
        kind = EventKind.from_notification_type(notification_type)
        round_ = _optional_round(body)
        with self._cond:
            rounds = self._rounds.get(training_id)
            if rounds is None:
                rounds = self._rounds[training_id] = _TrainingRounds()
                while len(self._rounds) > self._dedupe_trainings:
                    self._rounds.popitem(last=False)
            else:
                self._rounds.move_to_end(training_id)
            verdict = rounds.verdict(kind, round_)
            if verdict is not Verdict.PUBLISHED:
                return verdict, None
            rounds.record(kind, round_)
            event = self._publish_locked(
                kind, notification_type, training_id, body, body_json, raw_json
            )
            return verdict, event

    def has_subscriber(self, training_id: str) -> bool:
        """Whether an open subscription (not an observer) would receive ``training_id``'s events."""
        with self._cond:
            if self._closed:
                return False
            return any(
                sub._training_ids is None or training_id in sub._training_ids
                for sub in self._subscribers
            )

    def _publish_locked(
        self,
        kind: EventKind,
        notification_type: str,
        training_id: str,
        body: Mapping[str, Any],
        body_json: str,
        raw_json: str,
    ) -> ServerEvent:
        self._last_seq += 1
        event = ServerEvent(
            seq=self._last_seq,
            kind=kind,
            notification_type=notification_type,
            training_id=training_id,
            model_id=_optional_model_id(body),
            round=_optional_round(body),
            body_json=body_json,
            raw_json=raw_json,
            received_at=time.time(),
        )
        self._events.append(event)
        self._undelivered.add(event.seq)
        self._retained_bytes += _size(event)
        while len(self._events) > self._history or (
            self._retained_bytes > self._max_bytes and len(self._events) > 1
        ):
            dropped = self._events.popleft()
            self._undelivered.discard(dropped.seq)
            self._retained_bytes -= _size(dropped)
        self._cond.notify_all()
        return event

    def subscribe(
        self,
        *,
        after_seq: Optional[int] = None,
        training_ids: Optional[Iterable[str]] = None,
        observe: bool = False,
    ) -> Subscription:
        """Start reading events.

        Args:
            after_seq: ``None``: first the retained events no subscriber has
                received yet, then live ones. ``N``: every retained event with
                ``seq > N``, then live ones (a resume from before
                :meth:`oldest_seq` starts at the oldest retained event; a
                number beyond :meth:`last_seq` waits for the next live event
                after ``N``).
            training_ids: only events of these trainings; ``None`` or empty: all.
            observe: watch without taking delivery: what this subscription
                receives stays undelivered for the next subscriber without
                ``after_seq`` (monitoring must not steal a trainer's round start).

        Returns:
            A :class:`Subscription` (close it when done; a closed bus gives one
            that is already at its end).

        Raises:
            ValueError: ``after_seq`` is negative.
        """
        if after_seq is not None and after_seq < 0:
            raise ValueError(f"after_seq must not be negative, got {after_seq}")
        wanted = frozenset(training_ids) if training_ids else None
        with self._cond:
            if after_seq is None:
                backlog = sorted(
                    seq
                    for seq in self._undelivered
                    if wanted is None or self._event_at(seq).training_id in wanted
                )
                cursor = self._last_seq
            else:
                backlog = []
                cursor = after_seq
            subscription = Subscription(
                self, cursor=cursor, backlog=backlog, training_ids=wanted, observe=observe
            )
            if not observe:
                self._subscribers.add(subscription)
            return subscription

    def last_seq(self) -> int:
        """The sequence number of the newest event; ``first_seq - 1`` before the first."""
        with self._cond:
            return self._last_seq

    def oldest_seq(self) -> Optional[int]:
        """The sequence number of the oldest retained event; ``None`` when none is retained."""
        with self._cond:
            return self._events[0].seq if self._events else None

    def snapshot(self, *, after_seq: int = 0) -> List[ServerEvent]:
        """The retained events with ``seq > after_seq``, oldest first (marks none as received)."""
        with self._cond:
            return [event for event in self._events if event.seq > after_seq]

    def close(self) -> None:
        """End every subscription: blocked reads return ``None`` and iteration stops.

        Idempotent. Publishing still works afterwards (the events are retained),
        but no subscriber receives them.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # --- used by Subscription, with self._cond held -------------------------

    def _event_at(self, seq: int) -> ServerEvent:
        # seqs in the history are contiguous, so the index is an offset.
        return self._events[seq - self._events[0].seq]

    def _is_retained(self, seq: int) -> bool:
        return bool(self._events) and self._events[0].seq <= seq <= self._last_seq


class Subscription:
    """One reader of an :class:`EventBus`: an iterator of :class:`ServerEvent`.

    Create it with :meth:`EventBus.subscribe`. :meth:`get` and iteration are
    meant for one reading thread; :meth:`close` may be called from any thread
    (a gRPC cancellation callback) and wakes the reader.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        cursor: int,
        backlog: List[int],
        training_ids: Optional[FrozenSet[str]],
        observe: bool = False,
    ) -> None:
        self._bus = bus
        self._observe = observe
        self._cursor = cursor
        self._backlog: Deque[int] = collections.deque(backlog)
        self._training_ids = training_ids
        self._closed = False
        self._missed = 0

    @property
    def closed(self) -> bool:
        """Whether this subscription or its bus was closed."""
        return self._closed or self._bus.closed

    @property
    def missed(self) -> int:
        """Events this subscriber skipped because the bounded history dropped them first."""
        return self._missed

    @property
    def position(self) -> int:
        """The live cursor: events with a larger ``seq`` are still to come."""
        return self._cursor

    def get(self, timeout: Optional[float] = None) -> Optional[ServerEvent]:
        """The next event, waiting for it if needed.

        Args:
            timeout: the longest wait in seconds; ``None`` waits until an event
                arrives or the subscription or bus is closed.

        Returns:
            The next event, or ``None`` on timeout or once closed.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bus = self._bus
        with bus._cond:
            while True:
                if self._closed or bus._closed:
                    return None
                event = self._next_locked()
                if event is not None:
                    if not self._observe:
                        bus._undelivered.discard(event.seq)
                    return event
                if deadline is None:
                    bus._cond.wait()
                else:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return None
                    bus._cond.wait(remaining)

    def _next_locked(self) -> Optional[ServerEvent]:
        bus = self._bus
        while self._backlog:
            seq = self._backlog.popleft()
            if bus._is_retained(seq):
                return bus._event_at(seq)
            self._missed += 1
        while self._cursor < bus._last_seq:
            if not bus._events:
                # Nothing published yet: a resume from a number the previous
                # process gave out (below this bus's first) has missed nothing here.
                self._cursor = bus._last_seq
                break
            oldest = bus._events[0].seq
            if self._cursor + 1 < oldest:
                # Only numbers this bus gave out count as missed, not the gap
                # below its first_seq (a resume after a restart).
                self._missed += max(0, oldest - max(self._cursor + 1, bus._first_seq))
                self._cursor = oldest - 1
            self._cursor += 1
            event = bus._event_at(self._cursor)
            if self._training_ids is None or event.training_id in self._training_ids:
                return event
        return None

    def close(self) -> None:
        """Stop reading: a blocked :meth:`get` returns ``None``. Idempotent, thread-safe."""
        with self._bus._cond:
            self._closed = True
            self._bus._subscribers.discard(self)
            self._bus._cond.notify_all()

    def __iter__(self) -> Iterator[ServerEvent]:
        return self

    def __next__(self) -> ServerEvent:
        event = self.get()
        if event is None:
            raise StopIteration
        return event

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()
