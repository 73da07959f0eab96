"""The event bus (replay, resume, fan-out, bounds) and notification parsing."""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sidecar.errors import FlSidecarError, MalformedNotificationError
from fl_sidecar.events import MAX_ROUND, EventKind, ServerEvent, clock_first_seq, parse_notification
from fl_sidecar.sidecar.eventbus import EventBus, Subscription

TRAINING = "6e3a4c1e-8f5b-4d43-9b43-0d8f3f0b7a11"
MODEL = "0b7c9d2a-1e4f-4a5b-8c6d-7e8f9a0b1c2d"
WAIT = 5.0  # seconds: generous upper bound for anything that should be immediate


def publish_round(bus: EventBus, round_: int, training: str = TRAINING) -> ServerEvent:
    body = {"round": round_, "global_model_uuid": MODEL}
    raw = json.dumps(
        {"notification_type": "UPDATE_ROUND_START", "training_uuid": training, "body": body}
    )
    return bus.publish("UPDATE_ROUND_START", training, body, raw)


def drain(sub: Subscription) -> List[int]:
    """Every event available right now, as seqs (no waiting)."""
    seqs: List[int] = []
    while True:
        event = sub.get(timeout=0)
        if event is None:
            return seqs
        seqs.append(event.seq)


def notification(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


# --- the event model ---------------------------------------------------------


def test_the_round_of_a_model_is_known_only_from_its_newest_round_start() -> None:
    bus = EventBus()
    assert bus.update_round_of_model(MODEL) is None  # nothing heard of it
    bus.publish("TRAINING_START", TRAINING, {"global_model_uuid": MODEL}, "{}")
    assert bus.update_round_of_model(MODEL) is None
    bus.publish("UPDATE_ROUND_START", TRAINING, {"round": 0, "global_model_uuid": MODEL}, "{}")
    bus.publish("UPDATE_ROUND_START", "t2", {"round": 5, "global_model_uuid": "other"}, "{}")
    assert bus.update_round_of_model(MODEL) == 0
    assert bus.update_round_of_model("other") == 5
    # Aggregated and being tested: the bytes are no longer round 0's.
    bus.publish("MODEL_TEST_ROUND", TRAINING, {"round": 1, "global_model_uuid": MODEL}, "{}")
    assert bus.update_round_of_model(MODEL) is None
    bus.publish("UPDATE_ROUND_START", TRAINING, {"round": 1, "global_model_uuid": MODEL}, "{}")
    assert bus.update_round_of_model(MODEL) == 1
    bus.publish("TRAINING_FINISHED", TRAINING, {"global_model_uuid": MODEL}, "{}")
    assert bus.update_round_of_model(MODEL) is None


def test_publish_numbers_events_and_fills_fields() -> None:
    bus = EventBus()
    assert bus.last_seq() == 0
    assert bus.oldest_seq() is None
    first = bus.publish("TRAINING_START", TRAINING, {"global_model_uuid": MODEL}, "{}")
    second = publish_round(bus, 3)
    assert (first.seq, second.seq) == (1, 2)
    assert first.kind is EventKind.TRAINING_START
    assert first.model_id == MODEL
    assert first.round is None
    assert second.kind is EventKind.UPDATE_ROUND_START
    assert second.round == 3
    assert second.training_id == TRAINING
    assert json.loads(second.body_json) == {"round": 3, "global_model_uuid": MODEL}
    assert second.body() == {"round": 3, "global_model_uuid": MODEL}
    assert json.loads(second.raw_json)["notification_type"] == "UPDATE_ROUND_START"
    assert second.received_at >= first.received_at > 0
    assert bus.last_seq() == 2
    assert bus.oldest_seq() == 1


def test_numbering_can_start_from_the_clock() -> None:
    start = clock_first_seq()
    bus = EventBus(first_seq=start)
    assert bus.last_seq() == start - 1
    assert publish_round(bus, 0).seq == start
    assert publish_round(bus, 1).seq == start + 1
    assert bus.oldest_seq() == start
    with bus.subscribe(after_seq=start) as sub:
        assert drain(sub) == [start + 1]
    # Microseconds: a later process starts above this one's numbers, and stays exact
    # as a JavaScript number.
    assert start < clock_first_seq() + 1 < 2**53
    with pytest.raises(ValueError, match="first_seq"):
        EventBus(first_seq=0)


@pytest.mark.parametrize(
    ("notification_type", "kind"),
    [
        ("TRAINING_START", EventKind.TRAINING_START),
        ("UPDATE_ROUND_START", EventKind.UPDATE_ROUND_START),
        ("MODEL_TEST_ROUND", EventKind.MODEL_TEST_ROUND),
        ("TRAINING_FINISHED", EventKind.TRAINING_FINISHED),
        ("SWAG_ROUND_START", EventKind.SWAG_ROUND_START),
        ("CLIENT_REMOVED", EventKind.CLIENT_REMOVED),
        ("SOMETHING_NEW", EventKind.UNKNOWN),
        ("training_start", EventKind.UNKNOWN),
        ("UNKNOWN", EventKind.UNKNOWN),
    ],
)
def test_kind_from_notification_type(notification_type: str, kind: EventKind) -> None:
    assert EventKind.from_notification_type(notification_type) is kind


def test_unknown_type_keeps_its_raw_json() -> None:
    bus = EventBus()
    raw = '{"notification_type":"NEW_THING","training_uuid":"t1","body":{"x":[1,2]}}'
    event = bus.publish("NEW_THING", "t1", {"x": [1, 2]}, raw)
    assert event.kind is EventKind.UNKNOWN
    assert event.notification_type == "NEW_THING"
    assert event.raw_json == raw
    assert event.model_id is None and event.round is None


def test_publish_rejects_a_body_that_is_not_json() -> None:
    bus = EventBus()
    with pytest.raises(ValueError):
        bus.publish("X", "t1", {"x": float("nan")}, "{}")
    assert bus.last_seq() == 0


def test_history_must_be_positive() -> None:
    with pytest.raises(ValueError):
        EventBus(history=0)


# --- replay and fan-out ------------------------------------------------------


def test_late_subscriber_gets_the_events_it_missed() -> None:
    bus = EventBus()
    publish_round(bus, 0)
    publish_round(bus, 1)
    with bus.subscribe() as sub:
        assert drain(sub) == [1, 2]
        publish_round(bus, 2)
        assert drain(sub) == [3]


def test_events_already_received_are_not_replayed_to_a_new_subscriber() -> None:
    bus = EventBus()
    publish_round(bus, 0)
    with bus.subscribe() as first:
        assert drain(first) == [1]
    publish_round(bus, 1)  # nobody listens
    with bus.subscribe() as second:
        assert drain(second) == [2]


def test_unread_events_of_a_live_subscriber_are_replayed_to_a_new_one() -> None:
    bus = EventBus()
    slow = bus.subscribe()
    publish_round(bus, 0)  # queued for `slow`, not yet received by anyone
    fresh = bus.subscribe()
    assert drain(fresh) == [1]
    assert drain(slow) == [1]


def test_an_observer_does_not_take_delivery() -> None:
    bus = EventBus()
    publish_round(bus, 0)  # nobody listens yet
    with bus.subscribe(observe=True) as watcher:
        assert drain(watcher) == [1]
        publish_round(bus, 1)
        assert drain(watcher) == [2]
    # Both are still owed to the first real subscriber, and to it only.
    with bus.subscribe() as trainer:
        assert drain(trainer) == [1, 2]
    with bus.subscribe() as late:
        assert drain(late) == []


def test_two_subscribers_both_get_every_event() -> None:
    bus = EventBus()
    a = bus.subscribe()
    b = bus.subscribe()
    for round_ in range(5):
        publish_round(bus, round_)
    assert drain(a) == [1, 2, 3, 4, 5]
    assert drain(b) == [1, 2, 3, 4, 5]


def test_resume_after_a_sequence_number() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        for round_ in range(5):
            publish_round(bus, round_)
        assert drain(sub) == [1, 2, 3, 4, 5]
    # Already received, yet a resume replays them.
    with bus.subscribe(after_seq=2) as resumed:
        assert drain(resumed) == [3, 4, 5]
        publish_round(bus, 5)
        assert drain(resumed) == [6]
    with bus.subscribe(after_seq=0) as everything:
        assert drain(everything) == [1, 2, 3, 4, 5, 6]


def test_resume_beyond_the_last_event_waits_for_later_ones() -> None:
    bus = EventBus()
    publish_round(bus, 0)
    with bus.subscribe(after_seq=3) as sub:
        publish_round(bus, 1)  # seq 2
        publish_round(bus, 2)  # seq 3
        assert drain(sub) == []
        publish_round(bus, 3)  # seq 4
        assert drain(sub) == [4]


def test_negative_after_seq_is_refused() -> None:
    with pytest.raises(ValueError):
        EventBus().subscribe(after_seq=-1)


def test_history_is_bounded_and_resume_gets_what_is_retained() -> None:
    bus = EventBus(history=3)
    for round_ in range(10):
        publish_round(bus, round_)
    assert bus.oldest_seq() == 8
    assert [event.seq for event in bus.snapshot()] == [8, 9, 10]
    with bus.subscribe(after_seq=2) as resumed:
        assert drain(resumed) == [8, 9, 10]
        assert resumed.missed == 5
    with bus.subscribe() as late:
        assert drain(late) == []  # the resume received them


def test_a_subscriber_that_falls_behind_skips_dropped_events() -> None:
    bus = EventBus(history=2)
    with bus.subscribe() as sub:
        publish_round(bus, 0)
        assert drain(sub) == [1]
        for round_ in range(1, 6):
            publish_round(bus, round_)
        assert drain(sub) == [5, 6]
        assert sub.missed == 3


def test_backlog_dropped_before_it_is_read_counts_as_missed() -> None:
    bus = EventBus(history=2)
    publish_round(bus, 0)
    publish_round(bus, 1)
    with bus.subscribe() as sub:  # backlog: 1, 2
        publish_round(bus, 2)  # drops 1
        assert drain(sub) == [2, 3]
        assert sub.missed == 1


def test_training_filter() -> None:
    bus = EventBus()
    publish_round(bus, 0, training="a")
    publish_round(bus, 0, training="b")
    with bus.subscribe(training_ids=["b"]) as only_b:
        assert drain(only_b) == [2]
        publish_round(bus, 1, training="a")
        publish_round(bus, 1, training="b")
        assert drain(only_b) == [4]
    # The event of training a that only_b skipped is still undelivered.
    with bus.subscribe() as everyone:
        assert drain(everyone) == [1, 3]


def test_get_times_out_with_none() -> None:
    bus = EventBus()
    with bus.subscribe() as sub:
        assert sub.get(timeout=0.01) is None
        assert not sub.closed


def test_iteration_yields_events_until_the_bus_closes() -> None:
    bus = EventBus()
    for round_ in range(3):
        publish_round(bus, round_)
    seen: List[int] = []
    sub = bus.subscribe()
    for event in sub:
        seen.append(event.seq)
        if event.seq == 3:
            bus.close()
    assert seen == [1, 2, 3]
    assert sub.closed


# --- closing -----------------------------------------------------------------


def _blocked_reader(
    sub: Subscription,
) -> Tuple[threading.Thread, threading.Event, List[Optional[ServerEvent]]]:
    started = threading.Event()
    result: List[Optional[ServerEvent]] = []

    def read() -> None:
        started.set()
        result.append(sub.get())

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert started.wait(WAIT)
    return thread, started, result


def test_subscription_close_from_another_thread_wakes_a_blocked_get() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    thread, _, result = _blocked_reader(sub)
    sub.close()
    sub.close()  # idempotent
    thread.join(WAIT)
    assert not thread.is_alive()
    assert result == [None]
    publish_round(bus, 0)
    assert sub.get(timeout=0) is None
    assert list(sub) == []


def test_bus_close_wakes_every_subscriber() -> None:
    bus = EventBus()
    readers = [_blocked_reader(bus.subscribe()) for _ in range(3)]
    bus.close()
    for thread, _, result in readers:
        thread.join(WAIT)
        assert not thread.is_alive()
        assert result == [None]
    assert bus.closed
    after = bus.subscribe()
    assert after.closed
    assert after.get(timeout=0) is None


def test_a_blocked_get_wakes_for_a_live_event() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    thread, _, result = _blocked_reader(sub)
    event = publish_round(bus, 7)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert result == [event]


# --- threads -----------------------------------------------------------------


def test_concurrent_publishers_keep_seq_order_and_lose_nothing() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    publishers, per_publisher = 4, 200
    barrier = threading.Barrier(publishers)
    returned: Dict[int, List[int]] = {}

    def publish_many(index: int) -> None:
        barrier.wait(WAIT)
        returned[index] = [
            publish_round(bus, n, training=f"t{index}").seq for n in range(per_publisher)
        ]

    threads = [threading.Thread(target=publish_many, args=(i,)) for i in range(publishers)]
    for thread in threads:
        thread.start()
    received: List[ServerEvent] = []
    while len(received) < publishers * per_publisher:
        event = sub.get(timeout=WAIT)
        assert event is not None, "an event was lost"
        received.append(event)
    for thread in threads:
        thread.join(WAIT)
    assert [event.seq for event in received] == list(range(1, publishers * per_publisher + 1))
    for index in range(publishers):
        # Each publisher's own events arrive in the order it published them.
        rounds = [event.round for event in received if event.training_id == f"t{index}"]
        assert rounds == list(range(per_publisher))
        assert returned[index] == sorted(returned[index])
    assert sub.get(timeout=0) is None


# --- parse_notification ------------------------------------------------------


def test_parse_the_real_servers_notifications() -> None:
    # Exactly as the real server sends them (docs/protocol.md).
    cases = [
        ('{"notification_type": "TRAINING_START", "body": {"global_model_uuid": "%s"}, '
         '"training_uuid": "%s"}', None),
        ('{"notification_type": "UPDATE_ROUND_START", "body": {"round": 0, '
         '"global_model_uuid": "%s"}, "training_uuid": "%s"}', 0),
        ('{"notification_type": "MODEL_TEST_ROUND", "body": {"round": 1, '
         '"global_model_uuid": "%s"}, "training_uuid": "%s"}', 1),
        ('{"notification_type": "TRAINING_FINISHED", "body": {"global_model_uuid": "%s"}, '
         '"training_uuid": "%s"}', None),
    ]  # fmt: skip
    for template, round_ in cases:
        data = (template % (MODEL, TRAINING)).encode()
        notification_type, training_id, body = parse_notification(data, max_size=1024)
        assert EventKind.from_notification_type(notification_type) is not EventKind.UNKNOWN
        assert training_id == TRAINING
        assert body["global_model_uuid"] == MODEL
        assert body.get("round") == round_


def test_parse_accepts_unknown_types_with_any_object_body() -> None:
    data = notification(notification_type="NEW_THING", training_uuid="t-1", body={"a": None})
    assert parse_notification(data, max_size=1024) == ("NEW_THING", "t-1", {"a": None})


def test_parse_client_removed_needs_no_model() -> None:
    data = notification(notification_type="CLIENT_REMOVED", training_uuid="t-1", body={})
    assert parse_notification(data, max_size=1024)[0] == "CLIENT_REMOVED"


GOOD: Dict[str, Any] = {
    "notification_type": "UPDATE_ROUND_START",
    "training_uuid": TRAINING,
    "body": {"round": 2, "global_model_uuid": MODEL},
}


def with_changes(**changes: Any) -> bytes:
    fields = dict(GOOD)
    for key, value in changes.items():
        if value is ...:
            fields.pop(key)
        else:
            fields[key] = value
    return json.dumps(fields).encode()


def with_body(**changes: Any) -> bytes:
    body = dict(GOOD["body"])
    for key, value in changes.items():
        if value is ...:
            body.pop(key)
        else:
            body[key] = value
    return with_changes(body=body)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"{",
        b"[]",
        b'"a string"',
        b"null",
        b"\xff\xfe{}",
        b'{"notification_type": "TRAINING_START", "training_uuid": "t", "body": {"x": NaN}}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"a": ' * 50_000 + b"1" + b"}" * 50_000,
        b'{"round": ' + b"9" * 10_000 + b"}",
        with_changes(notification_type=...),
        with_changes(notification_type=""),
        with_changes(notification_type=7),
        with_changes(notification_type=None),
        with_changes(notification_type="BAD\nTYPE"),
        with_changes(notification_type="X" * 200),
        with_changes(training_uuid=...),
        with_changes(training_uuid=""),
        with_changes(training_uuid=12),
        with_changes(training_uuid="--help"),
        with_changes(training_uuid="a b"),
        with_changes(training_uuid="x" * 129),
        with_changes(training_uuid="id\x00"),
        with_changes(body=...),
        with_changes(body=None),
        with_changes(body=[1, 2]),
        with_changes(body="round=2"),
        with_body(round=...),
        with_body(round="2"),
        with_body(round=2.0),
        with_body(round=True),
        with_body(round=-1),
        with_body(round=MAX_ROUND + 1),
        with_body(round=None),
        with_body(global_model_uuid=...),
        with_body(global_model_uuid=5),
        with_body(global_model_uuid="-rf"),
    ],
    ids=lambda data: repr(data[:40]),
)
def test_parse_rejects_malformed_notifications(data: bytes) -> None:
    with pytest.raises(MalformedNotificationError):
        parse_notification(data, max_size=1_000_000)


def test_parse_rejects_a_training_start_without_a_model() -> None:
    data = notification(notification_type="TRAINING_START", training_uuid="t", body={})
    with pytest.raises(MalformedNotificationError, match="global_model_uuid"):
        parse_notification(data, max_size=1024)


def test_parse_rejects_oversized_bodies() -> None:
    data = with_changes()
    assert parse_notification(data, max_size=len(data))[1] == TRAINING
    with pytest.raises(MalformedNotificationError, match="exceeds"):
        parse_notification(data, max_size=len(data) - 1)


def test_error_messages_do_not_echo_long_values() -> None:
    secret_ish = "s" * 10_000
    with pytest.raises(MalformedNotificationError) as info:
        parse_notification(with_changes(training_uuid=secret_ish), max_size=100_000)
    assert len(str(info.value)) < 300
    assert isinstance(info.value, ValueError) and isinstance(info.value, FlSidecarError)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_bytes_never_raise_anything_but_the_typed_error(data: bytes) -> None:
    with contextlib.suppress(MalformedNotificationError):
        parse_notification(data, max_size=256)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "notification_type": st.sampled_from(
                ["TRAINING_START", "UPDATE_ROUND_START", "MODEL_TEST_ROUND", "X"]
            )
            | json_values,
            "training_uuid": st.just(TRAINING) | json_values,
            "body": st.fixed_dictionaries(
                {},
                optional={
                    "round": st.integers(min_value=-5, max_value=5) | json_values,
                    "global_model_uuid": st.just(MODEL) | json_values,
                },
            )
            | json_values,
        },
    )
)
def test_fuzz_structured_notifications(fields: Dict[str, Any]) -> None:
    data = json.dumps(fields).encode()
    try:
        notification_type, training_id, body = parse_notification(data, max_size=100_000)
    except MalformedNotificationError:
        return
    # Whatever is accepted publishes cleanly and keeps its fields.
    event = EventBus().publish(notification_type, training_id, body, data.decode())
    assert event.training_id == training_id == fields["training_uuid"]
    assert event.notification_type == fields["notification_type"]
    if event.kind in (EventKind.UPDATE_ROUND_START, EventKind.MODEL_TEST_ROUND):
        assert event.round == body["round"] and event.model_id == body["global_model_uuid"]


# --- a model of the bus, checked against random histories ---------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(["a", "b"])),
        st.tuples(st.just("subscribe"), st.none() | st.integers(min_value=0, max_value=30)),
        st.tuples(st.just("read"), st.integers(min_value=0, max_value=5)),
        st.tuples(st.just("close"), st.integers(min_value=0, max_value=5)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations, st.integers(min_value=1, max_value=8))
def test_bus_matches_a_simple_model(ops: List[Tuple[str, Any]], history: int) -> None:
    """Replay, resume, fan-out and the history bound, against a plain-list model."""
    bus = EventBus(history=history)
    published: List[str] = []  # training of each seq (index = seq - 1)
    received_by_anyone: Set[int] = set()
    # Per subscription: (subscription, the seqs it should still get, its
    # after_seq floor, closed?)
    subs: List[Tuple[Subscription, List[int], int, List[bool]]] = []

    def retained(seq: int) -> bool:
        return seq > len(published) - history

    for op, arg in ops:
        if op == "publish":
            event = bus.publish("UPDATE_ROUND_START", arg, {"round": 0}, "{}")
            published.append(arg)
            assert event.seq == len(published)
            for _, expected, floor, closed in subs:
                if not closed[0] and event.seq > floor:
                    expected.append(event.seq)
        elif op == "subscribe":
            last = len(published)
            if arg is None:
                backlog = [
                    seq
                    for seq in range(1, last + 1)
                    if retained(seq) and seq not in received_by_anyone
                ]
            else:
                backlog = [seq for seq in range(arg + 1, last + 1) if retained(seq)]
            floor = last if arg is None else arg
            subs.append((bus.subscribe(after_seq=arg), backlog, floor, [False]))
        elif subs:
            sub, expected, _, closed = subs[arg % len(subs)]
            if op == "close":
                sub.close()
                closed[0] = True
                expected.clear()
                continue
            got = drain(sub)
            # Events dropped from the history before this reader got to them are skipped.
            want = [seq for seq in expected if retained(seq)]
            assert got == want
            expected.clear()
            received_by_anyone.update(got)
    assert bus.last_seq() == len(published)
    assert [event.seq for event in bus.snapshot()] == [
        seq for seq in range(1, len(published) + 1) if retained(seq)
    ]


def test_history_is_bounded_in_bytes_too() -> None:
    bus = EventBus(history=1000, max_bytes=1000)
    with pytest.raises(ValueError):
        EventBus(max_bytes=0)
    big = "x" * 300
    for _ in range(10):
        bus.publish("NEW", "t1", {"pad": big}, big)  # ~610 characters each
    retained = bus.snapshot()
    assert [event.seq for event in retained] == [10]
    huge = "y" * 5000
    event = bus.publish("NEW", "t1", {}, huge)
    # The newest event is kept whatever its size.
    assert bus.snapshot() == [event]
    small = [bus.publish("NEW", "t1", {}, "{}").seq for _ in range(3)]
    assert [event.seq for event in bus.snapshot()] == small


# --- resume on a bus with few or no events -------------------------------------


@pytest.mark.parametrize("after_seq", [0, 1, 999, 1000, 1001])
def test_resume_on_a_bus_without_events_waits_for_the_first(after_seq: int) -> None:
    # A restarted sidecar numbers from the clock; a trainer resumes with the
    # last number the previous process gave it, before anything arrived here.
    bus = EventBus(first_seq=1000)
    with bus.subscribe(after_seq=after_seq) as sub:
        assert sub.get(timeout=0) is None
        publish_round(bus, 0)
        if after_seq < 1000:
            assert drain(sub) == [1000]
        else:
            assert drain(sub) == []  # a number beyond the first waits for later ones
        assert sub.missed == 0


def test_resume_from_the_previous_process_counts_only_this_bus_as_missed() -> None:
    bus = EventBus(first_seq=1000, history=2)
    for round_ in range(5):  # seqs 1000..1004; 1003 and 1004 are retained
        publish_round(bus, round_)
    with bus.subscribe(after_seq=17) as resumed:
        assert drain(resumed) == [1003, 1004]
        assert resumed.missed == 3  # 1000..1002, not the numbers below 1000


def test_resume_at_the_newest_event_waits_for_the_next() -> None:
    bus = EventBus(first_seq=50)
    publish_round(bus, 0)
    with bus.subscribe(after_seq=bus.last_seq()) as sub:
        assert sub.get(timeout=0) is None
        publish_round(bus, 1)
        assert drain(sub) == [51]


# --- delivering each (training, type, round) once ---------------------------------


def offer(
    bus: EventBus, kind: str, round_: Optional[int] = None, training: str = TRAINING
) -> Tuple[str, Optional[int]]:
    body: Dict[str, Any] = {"global_model_uuid": MODEL}
    if round_ is not None:
        body["round"] = round_
    verdict, event = bus.publish_once(kind, training, body, "{}")
    return verdict.value, None if event is None else event.seq


def test_publish_once_drops_repeats_the_real_server_sends() -> None:
    bus = EventBus()
    assert offer(bus, "UPDATE_ROUND_START", 0) == ("published", 1)
    # Before TRAINING_START, as the real server sometimes sends them.
    assert offer(bus, "TRAINING_START") == ("published", 2)
    assert offer(bus, "UPDATE_ROUND_START", 0) == ("duplicate", None)
    assert offer(bus, "UPDATE_ROUND_START", 0) == ("duplicate", None)
    assert offer(bus, "TRAINING_START") == ("duplicate", None)
    assert offer(bus, "MODEL_TEST_ROUND", 1) == ("published", 3)
    assert offer(bus, "MODEL_TEST_ROUND", 1) == ("duplicate", None)
    assert offer(bus, "UPDATE_ROUND_START", 1) == ("published", 4)
    assert offer(bus, "TRAINING_FINISHED") == ("published", 5)
    assert offer(bus, "TRAINING_FINISHED") == ("duplicate", None)
    assert [e.seq for e in bus.snapshot()] == [1, 2, 3, 4, 5]


def test_publish_once_drops_a_late_notification_of_an_older_round() -> None:
    bus = EventBus()
    offer(bus, "UPDATE_ROUND_START", 0)
    offer(bus, "MODEL_TEST_ROUND", 1)
    # Round 0 is over: its round start arriving late would make a trainer redo it.
    assert offer(bus, "UPDATE_ROUND_START", 0) == ("stale", None)
    assert offer(bus, "SWAG_ROUND_START", 0) == ("stale", None)
    # Same round, another type: delivered, whichever of the two comes first.
    assert offer(bus, "UPDATE_ROUND_START", 1) == ("published", 3)
    assert offer(bus, "MODEL_TEST_ROUND", 1) == ("duplicate", None)
    assert offer(bus, "MODEL_TEST_ROUND", 0) == ("stale", None)


def test_publish_once_keeps_trainings_apart_and_never_drops_unknown_types() -> None:
    bus = EventBus()
    assert offer(bus, "UPDATE_ROUND_START", 3, training="a")[0] == "published"
    assert offer(bus, "UPDATE_ROUND_START", 0, training="b")[0] == "published"
    assert offer(bus, "UPDATE_ROUND_START", 3, training="b")[0] == "published"
    assert offer(bus, "NEW_KIND", 1, training="a")[0] == "published"
    assert offer(bus, "NEW_KIND", 1, training="a")[0] == "published"


def test_publish_once_forgets_the_least_recent_training_first() -> None:
    bus = EventBus(dedupe_trainings=2)
    offer(bus, "UPDATE_ROUND_START", 0, training="a")
    offer(bus, "UPDATE_ROUND_START", 0, training="b")
    offer(bus, "UPDATE_ROUND_START", 1, training="a")  # "a" is now the most recent
    offer(bus, "UPDATE_ROUND_START", 0, training="c")  # forgets "b"
    assert offer(bus, "UPDATE_ROUND_START", 1, training="a")[0] == "duplicate"
    assert offer(bus, "UPDATE_ROUND_START", 0, training="b")[0] == "published"
    with pytest.raises(ValueError):
        EventBus(dedupe_trainings=0)


def test_has_subscriber_follows_open_subscriptions_and_their_filters() -> None:
    bus = EventBus()
    assert not bus.has_subscriber("a")
    with bus.subscribe(observe=True):
        assert not bus.has_subscriber("a")  # monitoring does not take delivery
    with bus.subscribe(training_ids=["a"]):
        assert bus.has_subscriber("a")
        assert not bus.has_subscriber("b")
    assert not bus.has_subscriber("a")
    sub = bus.subscribe()
    assert bus.has_subscriber("b")
    bus.close()
    assert not bus.has_subscriber("b")
    sub.close()
