"""The notification endpoint over real sockets, with real HTTP clients."""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import socket
import threading
import urllib.error
import urllib.request
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sidecar.events import EventKind, ServerEvent
from fl_sidecar.sidecar.eventbus import EventBus
from fl_sidecar.sidecar.notifications import DEFAULT_PORT, NotificationServer

TRAINING = "6e3a4c1e-8f5b-4d43-9b43-0d8f3f0b7a11"
MODEL = "0b7c9d2a-1e4f-4a5b-8c6d-7e8f9a0b1c2d"
WAIT = 10.0  # seconds: upper bound for anything that should be immediate
LIMIT = 4096  # bytes: the endpoint's body limit in these tests


def notification(kind: str, round_: Optional[int] = None, training: str = TRAINING) -> bytes:
    body: Dict[str, Any] = {"global_model_uuid": MODEL}
    if round_ is not None:
        body = {"round": round_, "global_model_uuid": MODEL}
    # Field order as the real server sends them.
    return json.dumps({"notification_type": kind, "body": body, "training_uuid": training}).encode()


@pytest.fixture
def bus() -> Iterator[EventBus]:
    bus = EventBus()
    yield bus
    bus.close()


@pytest.fixture
def server(bus: EventBus) -> Iterator[NotificationServer]:
    with NotificationServer(bus, port=0, max_body_size=LIMIT) as endpoint:
        yield endpoint


def post(
    server: NotificationServer,
    data: bytes,
    *,
    path: str = "/",
    method: str = "POST",
    headers: Optional[Dict[str, str]] = None,
) -> Tuple[int, Dict[str, Any]]:
    """Send one request with urllib; returns (status, decoded JSON answer)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}{path}",
        data=data if method != "GET" else None,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as error:
        with error:
            payload = error.read()
        return error.code, json.loads(payload) if payload else {}


def raw_exchange(server: NotificationServer, request: bytes) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.sendall(request)
        chunks: List[bytes] = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def status_line(answer: bytes) -> int:
    return int(answer.split(b"\r\n", 1)[0].split(b" ")[1])


def assert_still_serving(server: NotificationServer, bus: EventBus) -> None:
    before = bus.last_seq()
    status, _ = post(server, notification("TRAINING_START"))
    assert status == 200
    assert bus.last_seq() == before + 1


# --- status codes --------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "round_", "expected"),
    [
        ("TRAINING_START", None, 200),
        ("UPDATE_ROUND_START", 0, 202),
        ("MODEL_TEST_ROUND", 1, 202),
        ("TRAINING_FINISHED", None, 200),
    ],
)
def test_status_codes_of_the_real_servers_notifications(
    server: NotificationServer, bus: EventBus, kind: str, round_: Optional[int], expected: int
) -> None:
    with bus.subscribe() as sub:
        status, _ = post(server, notification(kind, round_))
        assert status == expected
        event = sub.get(timeout=WAIT)
    assert event is not None
    assert event.kind is EventKind(kind)
    assert event.training_id == TRAINING
    assert event.model_id == MODEL
    assert event.round == round_
    assert json.loads(event.raw_json) == json.loads(notification(kind, round_))


def test_any_path_is_accepted_like_the_reference_client(
    server: NotificationServer, bus: EventBus
) -> None:
    for round_, path in enumerate(("/", "/notifications/", "/a/b?c=d")):
        status, _ = post(server, notification("UPDATE_ROUND_START", round_), path=path)
        assert status == 202
    assert bus.last_seq() == 3


def test_unknown_type_is_400_but_published_with_its_raw_json(
    server: NotificationServer, bus: EventBus
) -> None:
    data = b'{"notification_type": "BRAND_NEW", "training_uuid": "t-9", "body": {"x": [1]}}'
    with bus.subscribe() as sub:
        status, answer = post(server, data)
        event = sub.get(timeout=WAIT)
    assert status == 400
    assert "BRAND_NEW" in answer["detail"]
    assert event is not None
    assert event.kind is EventKind.UNKNOWN
    assert event.notification_type == "BRAND_NEW"
    assert event.raw_json == data.decode()
    assert json.loads(event.body_json) == {"x": [1]}


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{not json",
        b"[1, 2, 3]",
        b"\xff\xfe\x00",
        b'{"notification_type": "UPDATE_ROUND_START", "training_uuid": "t"}',
        b'{"notification_type": "UPDATE_ROUND_START", "training_uuid": "t", "body": {}}',
        b'{"notification_type": 5, "training_uuid": "t", "body": {}}',
        b'{"notification_type": "MODEL_TEST_ROUND", "training_uuid": "t", '
        b'"body": {"round": "1", "global_model_uuid": "m"}}',
        b'{"notification_type": "TRAINING_START", "training_uuid": "--x", '
        b'"body": {"global_model_uuid": "m"}}',
        b"[" * 3000 + b"]" * 1000,
    ],
)
def test_malformed_bodies_get_400_publish_nothing_and_the_server_keeps_serving(
    server: NotificationServer, bus: EventBus, data: bytes
) -> None:
    status, answer = post(server, data)
    assert status == 400
    assert answer["detail"]
    assert bus.last_seq() == 0
    assert_still_serving(server, bus)


def test_oversized_body_is_refused_from_its_content_length_without_reading_it(
    server: NotificationServer, bus: EventBus
) -> None:
    # Announce 100 MB, send only the headers: the answer must come at once,
    # without the endpoint waiting for (or reading) the body.
    answer = raw_exchange(
        server,
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000000\r\n\r\n",
    )
    assert status_line(answer) == 413
    assert b"exceeds" in answer
    assert bus.last_seq() == 0
    assert_still_serving(server, bus)


def test_body_just_over_the_limit_is_413_and_at_the_limit_is_accepted(
    server: NotificationServer, bus: EventBus
) -> None:
    base = json.loads(notification("TRAINING_START"))
    base["body"]["padding"] = ""
    size = len(json.dumps(base).encode())
    base["body"]["padding"] = "x" * (LIMIT - size)
    at_limit = json.dumps(base).encode()
    assert len(at_limit) == LIMIT
    assert post(server, at_limit)[0] == 200
    status, _ = post(server, at_limit + b" ")
    assert status == 413
    assert bus.last_seq() == 1


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\n{}", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"y" * 70_000 + b"\r\n\r\n", 431),
        (b"BREW / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 405),
    ],
)
def test_broken_requests_get_4xx_never_500(
    server: NotificationServer, bus: EventBus, head: bytes, expected: int
) -> None:
    answer = raw_exchange(server, head)
    assert status_line(answer) == expected
    assert bus.last_seq() == 0
    assert_still_serving(server, bus)


def test_a_garbage_request_line_gets_400(server: NotificationServer, bus: EventBus) -> None:
    # Without a version on the request line http.server answers like HTTP/0.9:
    # no status line, only the error page.
    answer = raw_exchange(server, b"GARBAGE\r\n\r\n")
    assert b"400" in answer
    assert b"500" not in answer
    assert_still_serving(server, bus)


def test_body_shorter_than_its_content_length_is_refused(
    server: NotificationServer, bus: EventBus
) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.sendall(b'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{"a":')
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(65536)
    assert status_line(answer) == 400
    assert bus.last_seq() == 0
    assert_still_serving(server, bus)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_get_405(server: NotificationServer, bus: EventBus, method: str) -> None:
    status, _ = post(server, notification("TRAINING_START"), method=method)
    assert status == 405
    assert bus.last_seq() == 0


def test_head_gets_405_without_a_body(server: NotificationServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
    try:
        connection.request("HEAD", "/")
        response = connection.getresponse()
        assert response.status == 405
        assert response.getheader("Allow") == "POST"
        assert response.read() == b""
    finally:
        connection.close()


def test_keep_alive_connection_serves_several_notifications(
    server: NotificationServer, bus: EventBus
) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
    try:
        for round_, data in enumerate([notification("UPDATE_ROUND_START", 0), b"{bad", b"[]"]):
            connection.request("POST", "/", body=data)
            response = connection.getresponse()
            response.read()
            assert response.status == (202 if round_ == 0 else 400)
        connection.request("POST", "/", body=notification("MODEL_TEST_ROUND", 1))
        response = connection.getresponse()
        response.read()
        assert response.status == 202
    finally:
        connection.close()
    assert [event.kind for event in bus.snapshot()] == [
        EventKind.UPDATE_ROUND_START,
        EventKind.MODEL_TEST_ROUND,
    ]


@pytest.fixture(scope="module")
def shared_server() -> Iterator[NotificationServer]:
    bus = EventBus(history=100)
    with NotificationServer(bus, port=0, max_body_size=LIMIT) as endpoint:
        yield endpoint
    bus.close()


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=600)
    | st.builds(
        lambda fields: json.dumps(fields).encode(),
        st.dictionaries(
            st.sampled_from(["notification_type", "training_uuid", "body", "x"]),
            st.none()
            | st.integers()
            | st.text(max_size=30)
            | st.sampled_from(["TRAINING_START", "UPDATE_ROUND_START", TRAINING])
            | st.dictionaries(
                st.sampled_from(["round", "global_model_uuid"]),
                st.none() | st.integers() | st.text(max_size=40) | st.just(MODEL),
            ),
        ),
    )
)
def test_fuzzed_bodies_never_get_a_5xx(shared_server: NotificationServer, data: bytes) -> None:
    status, answer = post(shared_server, data)
    assert status in (200, 202, 400)
    assert isinstance(answer.get("detail"), str)


# --- order and responsiveness ----------------------------------------------------


def test_out_of_order_arrival_is_delivered_in_arrival_order(
    server: NotificationServer, bus: EventBus
) -> None:
    # The real server sometimes sends the round start before the training start.
    sent = [
        notification("UPDATE_ROUND_START", 0),
        notification("TRAINING_START"),
        notification("MODEL_TEST_ROUND", 1),
        notification("UPDATE_ROUND_START", 1),
        notification("MODEL_TEST_ROUND", 2),
        notification("TRAINING_FINISHED"),
    ]
    for data in sent:
        assert post(server, data)[0] in (200, 202)
    # A trainer that connects only now gets all of them, as they arrived.
    with bus.subscribe() as late:
        received = [late.get(timeout=WAIT) for _ in sent]
        assert late.get(timeout=0) is None
    assert [event.raw_json if event else None for event in received] == [
        data.decode() for data in sent
    ]
    assert [event.seq for event in received if event] == [1, 2, 3, 4, 5, 6]


def test_answers_while_a_subscriber_and_the_event_handler_are_stuck(bus: EventBus) -> None:
    release = threading.Event()
    handled: List[int] = []

    def slow_handler(event: ServerEvent) -> None:
        handled.append(event.seq)
        release.wait(WAIT)  # stuck until the test lets go

    stuck_reader = bus.subscribe()  # never reads
    with NotificationServer(bus, port=0, on_event=slow_handler) as server:
        for round_ in range(3):
            # Each answer arrives although the previous handler is still stuck.
            status, _ = post(server, notification("UPDATE_ROUND_START", round_))
            assert status == 202
        assert bus.last_seq() == 3
        release.set()
    stuck_reader.close()
    assert handled == [1, 2, 3]


def test_a_stuck_handler_does_not_hold_connection_slots(bus: EventBus) -> None:
    # on_event runs on its own thread: with one connection slot and the
    # handler stuck on the first event, later senders still get answers.
    release = threading.Event()
    handled: List[int] = []

    def stuck_handler(event: ServerEvent) -> None:
        handled.append(event.seq)
        # Longer than post()'s timeout: were the handler holding the only
        # slot, the second POST would time out.
        release.wait(6 * WAIT)

    with NotificationServer(bus, port=0, max_connections=1, on_event=stuck_handler) as server:
        statuses = [post(server, notification("MODEL_TEST_ROUND", n))[0] for n in range(4)]
        assert statuses == [202] * 4
        release.set()
    assert handled == [1, 2, 3, 4]


def test_on_event_sees_concurrent_notifications_in_seq_order(bus: EventBus) -> None:
    handled: List[int] = []
    with NotificationServer(
        bus, port=0, on_event=lambda event: handled.append(event.seq)
    ) as server:
        threads = [
            threading.Thread(
                target=post, args=(server, notification("UPDATE_ROUND_START", i, f"t{i}"))
            )
            for i in range(12)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
    # stop() let the dispatcher catch up.
    assert handled == list(range(1, 13))


def test_a_failing_event_handler_does_not_break_the_endpoint(bus: EventBus) -> None:
    def failing_handler(event: ServerEvent) -> None:
        raise RuntimeError("handler bug")

    with NotificationServer(bus, port=0, on_event=failing_handler) as server:
        assert post(server, notification("UPDATE_ROUND_START", 0))[0] == 202
        assert post(server, notification("MODEL_TEST_ROUND", 1))[0] == 202
    assert bus.last_seq() == 2


def test_concurrent_senders_all_get_answers_and_every_event_is_published(
    server: NotificationServer, bus: EventBus
) -> None:
    statuses: List[int] = []
    lock = threading.Lock()

    def send(index: int) -> None:
        status, _ = post(server, notification("UPDATE_ROUND_START", index, training=f"t{index}"))
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert statuses == [202] * 16
    events = bus.snapshot()
    assert [event.seq for event in events] == list(range(1, 17))
    assert sorted(event.training_id for event in events) == sorted(f"t{i}" for i in range(16))


def test_a_burst_of_senders_fits_the_listen_backlog(bus: EventBus) -> None:
    # With socketserver's default listen backlog of 5, the kernel reset some
    # of 64 simultaneous senders: notifications lost, as the server never retries.
    outcomes: List[object] = []
    lock = threading.Lock()

    def send(index: int) -> None:
        data = notification("TRAINING_START", training=f"t{index}")
        try:
            outcome: object = post(endpoint, data)[0]
        except OSError as exc:
            outcome = exc
        with lock:
            outcomes.append(outcome)

    with NotificationServer(bus, port=0) as endpoint:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT)
    assert outcomes == [200] * 64
    assert bus.last_seq() == 64


def test_connections_over_the_limit_wait_instead_of_being_refused(bus: EventBus) -> None:
    # The real server never retries a non-2xx answer: a refusal would lose the
    # notification. Two idle connections take both slots (too young to be
    # closed to make room); a third sender must get its answer once one of
    # them goes away.
    with NotificationServer(bus, port=0, max_connections=2, evict_after=600) as server:
        idle = [
            socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) for _ in range(2)
        ]
        for sock in idle:
            sock.sendall(b"POST / HTTP/1.1\r\n")  # headers never finished
        answered: List[int] = []
        sender = threading.Thread(
            target=lambda: answered.append(post(server, notification("TRAINING_START"))[0])
        )
        sender.start()
        sender.join(0.3)
        # Still waiting: not refused, not answered (a broken limit answers at once).
        assert answered == []
        assert bus.last_seq() == 0
        idle[0].close()
        sender.join(WAIT)
        assert answered == [200]
        assert bus.last_seq() == 1
        idle[1].close()


def test_stop_returns_while_every_slot_is_taken(bus: EventBus) -> None:
    server = NotificationServer(bus, port=0, max_connections=1)
    server.start()
    idle = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    waiting = socket.create_connection(("127.0.0.1", server.port), timeout=WAIT)
    try:
        idle.sendall(b"POST / HTTP/1.1\r\n")
        stopper = threading.Thread(target=server.stop)
        stopper.start()
        stopper.join(WAIT)
        assert not stopper.is_alive()
        assert not server.running
        # The waiting connection was closed without an answer (a reset when
        # it was still in the listen backlog).
        with contextlib.suppress(ConnectionResetError):
            assert waiting.recv(1024) == b""
    finally:
        idle.close()
        waiting.close()


# --- lifecycle -------------------------------------------------------------------


def test_port_and_url(bus: EventBus) -> None:
    endpoint = NotificationServer(bus, port=0)
    assert NotificationServer(bus).port == DEFAULT_PORT == 8101
    assert endpoint.port == 0
    endpoint.start()
    try:
        assert endpoint.port > 0
        assert endpoint.url == f"http://127.0.0.1:{endpoint.port}/"
        endpoint.start()  # idempotent
        assert post(endpoint, notification("TRAINING_START"))[0] == 200
    finally:
        endpoint.stop()
    endpoint.stop()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(endpoint.url.split(":")[2][:-1])), timeout=1)


def test_listens_on_loopback_by_default(bus: EventBus) -> None:
    with NotificationServer(bus, port=0) as endpoint:
        assert endpoint.host == "127.0.0.1"
        assert endpoint._server is not None
        assert endpoint._server.server_address[0] == "127.0.0.1"


def test_ipv6_loopback(bus: EventBus) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        endpoint = NotificationServer(bus, host="::1", port=0)
        endpoint.start()
    except OSError:
        pytest.skip("IPv6 loopback not available")
    try:
        assert endpoint.url.startswith("http://[::1]:")
        with urllib.request.urlopen(
            urllib.request.Request(endpoint.url, data=notification("TRAINING_START")),
            timeout=WAIT,
        ) as response:
            assert response.status == 200
    finally:
        endpoint.stop()


def test_invalid_settings_are_refused(bus: EventBus) -> None:
    with pytest.raises(ValueError):
        NotificationServer(bus, port=70000)
    with pytest.raises(ValueError):
        NotificationServer(bus, max_body_size=0)
    with pytest.raises(ValueError):
        NotificationServer(bus, max_connections=0)
    with pytest.raises(ValueError):
        NotificationServer(bus, max_connections_per_peer=0)
    with pytest.raises(ValueError):
        NotificationServer(bus, request_deadline=0)
    with pytest.raises(ValueError):
        NotificationServer(bus, evict_after=0)


def test_a_busy_port_raises_oserror(server: NotificationServer, bus: EventBus) -> None:
    other = NotificationServer(bus, port=server.port)
    with pytest.raises(OSError):
        other.start()
    assert not other.running


# --- logs ----------------------------------------------------------------------


def test_logs_are_structured_and_never_quote_a_body_in_full(
    server: NotificationServer, bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "SECRET" + "x" * 500
    caplog.set_level(logging.DEBUG, logger="fl_sidecar")
    unknown = json.dumps(
        {"notification_type": "NEW_" + "Y" * 100, "training_uuid": "t1", "body": {"k": secret}}
    ).encode()
    malformed = json.dumps(
        {"notification_type": "TRAINING_START", "training_uuid": secret, "body": {}}
    ).encode()
    assert post(server, unknown)[0] == 400
    assert post(server, malformed)[0] == 400
    assert post(server, notification("UPDATE_ROUND_START", 4))[0] == 202
    records = [r for r in caplog.records if r.name.startswith("fl_sidecar")]
    assert records
    for record in records:
        text = record.getMessage() + " ".join(str(value) for value in vars(record).values())
        assert "SECRET" + "x" * 60 not in text
        assert "Y" * 100 not in text
    accepted = [r for r in records if getattr(r, "seq", None) == 2]
    assert accepted, "the accepted notification was not logged with its seq"
    assert getattr(accepted[0], "round", None) == 4
    assert getattr(accepted[0], "status", None) == 202
    assert getattr(accepted[0], "training_id", None) == TRAINING


# --- repeats, slow peers, oversized streamed bodies --------------------------------


def test_repeats_the_real_server_sends_are_answered_but_delivered_once(bus: EventBus) -> None:
    handled: List[Tuple[EventKind, Optional[int]]] = []
    with NotificationServer(
        bus, port=0, on_event=lambda e: handled.append((e.kind, e.round))
    ) as server, bus.subscribe() as sub:
        sent = [
            ("UPDATE_ROUND_START", 0, 202),
            ("TRAINING_START", None, 200),  # after the round start, as the real one may
            ("UPDATE_ROUND_START", 0, 202),
            ("UPDATE_ROUND_START", 0, 202),
            ("TRAINING_START", None, 200),
            ("MODEL_TEST_ROUND", 1, 202),
            ("MODEL_TEST_ROUND", 1, 202),
            ("UPDATE_ROUND_START", 0, 202),  # late, and older than the newest round
            ("UPDATE_ROUND_START", 1, 202),
        ]
        for kind, round_, status in sent:
            answer = post(server, notification(kind, round_))
            assert answer[0] == status, answer
        received = []
        for _ in range(4):
            event = sub.get(timeout=WAIT)
            assert event is not None
            received.append((event.kind, event.round))
        assert sub.get(timeout=0) is None
    assert received == [
        (EventKind.UPDATE_ROUND_START, 0),
        (EventKind.TRAINING_START, None),
        (EventKind.MODEL_TEST_ROUND, 1),
        (EventKind.UPDATE_ROUND_START, 1),
    ]
    assert handled == received  # the handler (scripts) saw each once too


def _slow_connection(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0))
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # headers never finished
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (waits up to the socket's timeout)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_slow_peers_cannot_block_notifications_and_are_closed_at_the_deadline(
    bus: EventBus,
) -> None:
    # Slow connections from two peer addresses fill every slot; one more
    # trickles a header byte every 0.2 s, which no per-read timeout would stop.
    with NotificationServer(
        bus, port=0, max_connections=8, max_connections_per_peer=4, request_deadline=3.0
    ) as server:
        slow = [_slow_connection(server.port, "127.0.0.2") for _ in range(6)]
        slow += [_slow_connection(server.port) for _ in range(6)]
        trickler = _slow_connection(server.port, "127.0.0.3")
        trickle_closed = threading.Event()

        def trickle() -> None:
            for _ in range(int(WAIT * 5)):
                try:
                    trickler.sendall(b"y")
                except OSError:
                    trickle_closed.set()
                    return
                if trickle_closed.wait(0.2):
                    return

        trickling = threading.Thread(target=trickle, daemon=True)
        trickling.start()
        try:
            with bus.subscribe() as sub:
                answers: List[int] = []
                sender = threading.Thread(
                    target=lambda: answers.append(post(server, notification("TRAINING_START"))[0])
                )
                sender.start()
                event = sub.get(timeout=WAIT)
                assert event is not None and event.kind is EventKind.TRAINING_START
                sender.join(WAIT)
                assert answers == [200]
            # Every slow connection is closed once its deadline passes.
            for sock in slow:
                assert _closed_by_peer(sock)
            assert trickle_closed.wait(WAIT) or _closed_by_peer(trickler)
            # And the endpoint still serves.
            assert post(server, notification("TRAINING_FINISHED"))[0] == 200
        finally:
            trickle_closed.set()
            trickling.join(WAIT)
            for sock in [*slow, trickler]:
                sock.close()


def test_a_kept_alive_connection_gets_a_fresh_deadline_per_request(bus: EventBus) -> None:
    with NotificationServer(bus, port=0, request_deadline=5.0) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
        try:
            for round_ in range(3):
                connection.request("POST", "/", body=notification("UPDATE_ROUND_START", round_))
                response = connection.getresponse()
                response.read()
                assert response.status == 202
        finally:
            connection.close()
    assert bus.last_seq() == 3


@pytest.mark.parametrize("size", [LIMIT + 1, 300_000, 1024 * 1024])
def test_a_client_streaming_an_oversized_body_reads_the_413(bus: EventBus, size: int) -> None:
    with NotificationServer(bus, port=0, max_body_size=LIMIT) as server:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT)
        try:
            connection.putrequest("POST", "/")
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(size))
            connection.endheaders()
            chunk = b"x" * 16384
            sent = 0
            while sent < size:
                piece = chunk[: size - sent]
                connection.send(piece)
                sent += len(piece)
            response = connection.getresponse()
            assert response.status == 413
            assert b"exceeds" in response.read()
        finally:
            connection.close()
        assert bus.last_seq() == 0
        assert post(server, notification("TRAINING_START"))[0] == 200


def test_a_client_expecting_100_continue_gets_the_413_instead(
    server: NotificationServer, bus: EventBus
) -> None:
    answer = raw_exchange(
        server,
        b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 100000000\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 413 ")
    # A body within the limit is invited as usual.
    data = notification("TRAINING_START")
    with socket.create_connection(("127.0.0.1", server.port), timeout=WAIT) as sock:
        sock.sendall(
            b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n"
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 100 ")
        sock.sendall(data)
        answer = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert status_line(answer) == 200
    assert bus.last_seq() == 1


# --- resuming WatchEvents on a real sidecar ------------------------------------------


def test_watch_events_resumes_on_a_sidecar_without_events_yet() -> None:
    # A trainer resuming after a sidecar restart passes the last number it saw
    # (from the previous process) before the new one has received anything.
    from sidecar_harness import running_sidecar

    from fl_sidecar.client import SidecarClient

    with running_sidecar() as sidecar, SidecarClient(sidecar.target, timeout=WAIT) as client:
        url = sidecar.notification_url
        assert url is not None
        streams = [client.watch_events(after_seq=n, training_ids=[TRAINING]) for n in (0, 1)]
        try:
            request = urllib.request.Request(
                url, data=notification("UPDATE_ROUND_START", 0), method="POST"
            )
            with urllib.request.urlopen(request, timeout=WAIT) as answer:
                assert answer.status == 202
            first = [stream.get(timeout=WAIT) for stream in streams]
            assert [event.round for event in first] == [0, 0]
            newest = first[0].seq
        finally:
            for stream in streams:
                stream.close()
        # Resuming at the newest event waits for the next one.
        with client.watch_events(after_seq=newest, training_ids=[TRAINING]) as resumed:
            request = urllib.request.Request(
                url, data=notification("UPDATE_ROUND_START", 1), method="POST"
            )
            with urllib.request.urlopen(request, timeout=WAIT) as answer:
                assert answer.status == 202
            event = resumed.get(timeout=WAIT)
            assert (event.round, event.seq) == (1, newest + 1)


def test_the_dev_servers_quirks_repeat_and_reorder_like_the_real_server(
    tmp_path: Any, notification_sink: Any, tiny_model: Any
) -> None:
    from conftest import DevServerHandle

    from fl_sidecar.devserver import DevServer

    server = DevServer(
        data_dir=tmp_path / "data",
        password_iterations=1000,
        notify_retry_delays=(0.05,),
        notification_quirks=True,
    )
    server.start()
    try:
        sink = notification_sink()
        handle = DevServerHandle(server)
        _, _, model_id, training_id = handle.setup_training(tiny_model(0), [sink.url])
        sink.wait_for(4)
        assert handle.wait_idle(WAIT)
        sent = [(b["notification_type"], b["body"].get("round")) for b in sink.bodies]
        assert sent == [
            ("UPDATE_ROUND_START", 0),
            ("TRAINING_START", None),  # after the round start
            ("UPDATE_ROUND_START", 0),
            ("UPDATE_ROUND_START", 0),
        ]
        assert {b["training_uuid"] for b in sink.bodies} == {training_id}
        assert {b["body"]["global_model_uuid"] for b in sink.bodies} == {model_id}
    finally:
        server.stop()
