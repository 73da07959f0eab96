"""Pack, Unpack and WatchEvents through the real sidecar subprocess and the generated stubs.

Notifications are POSTed over real HTTP to the sidecar's notification
endpoint, as the FL server does; events come back over gRPC.
"""

from __future__ import annotations

import hashlib
import io
import json
import struct
import urllib.error
import urllib.request
import uuid
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import grpc
import pytest
from sidecar_harness import SidecarProcess, running_sidecar

from fl_sidecar.v1 import sidecar_pb2 as pb

pytestmark = pytest.mark.slow

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def sidecar() -> Iterator[SidecarProcess]:
    with running_sidecar(args=["--log-format", "json"]) as process:
        yield process


# --- Pack / Unpack -------------------------------------------------------------


def _sample(size: int) -> bytes:
    # Compressible but not trivial: repeated hashes.
    block = b"".join(hashlib.sha256(str(i).encode()).digest() for i in range(2048))
    return (block * (size // len(block) + 1))[:size]


def _collect(responses: Iterable[Any]) -> Tuple[bytes, Any, List[int]]:
    """A Pack or Unpack answer: its chunks joined, its summary, and each chunk's size."""
    chunks: List[bytes] = []
    summary: Any = None
    for message in responses:
        assert summary is None, "a message after the summary"
        if message.WhichOneof("kind") == "summary":
            summary = message.summary
        else:
            chunks.append(message.chunk)
    assert summary is not None
    return b"".join(chunks), summary, [len(c) for c in chunks]


def _pack(
    sidecar: SidecarProcess, data: bytes, options: Optional[pb.PackOptions] = None
) -> Tuple[bytes, pb.PackSummary, List[int]]:
    def requests() -> Iterator[pb.PackRequest]:
        if options is not None:
            yield pb.PackRequest(options=options)
        for start in range(0, len(data), MIB):
            yield pb.PackRequest(chunk=data[start : start + MIB])

    return _collect(sidecar.stub.Pack(requests(), timeout=60))


def _unpack(
    sidecar: SidecarProcess, blob: bytes, options: Optional[pb.UnpackOptions] = None
) -> Tuple[bytes, pb.UnpackSummary, List[int]]:
    def requests() -> Iterator[pb.UnpackRequest]:
        if options is not None:
            yield pb.UnpackRequest(options=options)
        for start in range(0, len(blob), 300_000):
            yield pb.UnpackRequest(chunk=blob[start : start + 300_000])

    return _collect(sidecar.stub.Unpack(requests(), timeout=60))


def test_pack_then_unpack_round_trips_and_foreign_decoders_read_it(
    sidecar: SidecarProcess,
) -> None:
    codec = pytest.importorskip("fl_sidecar.codec")
    zstandard = pytest.importorskip("zstandard")
    data = _sample(9 * MIB + 123)
    packed, summary, sizes = _pack(sidecar, data, pb.PackOptions(level=3, chunk_size=MIB))
    assert summary.raw_bytes == len(data)
    assert summary.packed_bytes == len(packed)
    assert summary.frames == 10
    assert max(sizes) <= 4 * MIB
    info = codec.inspect(packed)
    assert info.frames == 10
    assert info.has_seek_table
    assert codec.unpack(packed) == data
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(packed), read_across_frames=True)
    assert reader.read() == data

    unpacked, unpack_summary, out_sizes = _unpack(sidecar, packed)
    assert unpacked == data
    assert unpack_summary.raw_bytes == len(data)
    assert unpack_summary.packed_bytes == len(packed)
    assert max(out_sizes) <= 4 * MIB


def test_unpack_reads_plain_zstd(sidecar: SidecarProcess) -> None:
    zstandard = pytest.importorskip("zstandard")
    data = _sample(3 * MIB)
    unpacked, _summary, _sizes = _unpack(sidecar, zstandard.ZstdCompressor(level=1).compress(data))
    assert unpacked == data


def test_pack_of_nothing_unpacks_to_nothing(sidecar: SidecarProcess) -> None:
    packed, summary, _sizes = _pack(sidecar, b"")
    assert summary.raw_bytes == 0
    unpacked, _summary, _sizes = _unpack(sidecar, packed)
    assert unpacked == b""


def _code_of(call: Any) -> Tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details() or ""


def test_corrupt_chunks_to_unpack_are_data_loss(sidecar: SidecarProcess) -> None:
    data = _sample(2 * MIB)
    packed, _summary, _sizes = _pack(sidecar, data, pb.PackOptions(chunk_size=MIB))
    damaged = bytearray(packed)
    damaged[len(damaged) // 3] ^= 0xFF
    code, _ = _code_of(lambda: _unpack(sidecar, bytes(damaged)))
    assert code == grpc.StatusCode.DATA_LOSS
    code, _ = _code_of(lambda: _unpack(sidecar, b"definitely not zstd" * 10))
    assert code == grpc.StatusCode.DATA_LOSS
    code, _ = _code_of(lambda: _unpack(sidecar, packed[: len(packed) // 2]))
    assert code == grpc.StatusCode.DATA_LOSS


def test_unpack_beyond_the_limit_is_resource_exhausted(sidecar: SidecarProcess) -> None:
    zstandard = pytest.importorskip("zstandard")
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (20 * MIB))
    code, details = _code_of(lambda: _unpack(sidecar, bomb, pb.UnpackOptions(max_output_size=MIB)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details


def test_a_trainers_max_output_size_cannot_lift_the_sidecars_limit() -> None:
    data = _sample(3 * MIB)
    with running_sidecar(args=["--max-model-size", "2M"]) as small:
        packed, _summary, _sizes = _pack(small, data)
        # Asking for more than the sidecar allows does not lift its 2 MiB ceiling.
        code, details = _code_of(
            lambda: _unpack(small, packed, pb.UnpackOptions(max_output_size=64 * MIB))
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(2 * MIB) in details
        code, _ = _code_of(lambda: _unpack(small, packed))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Asking for less than the ceiling lowers it.
        one_mib = _pack(small, data[:MIB])[0]
        code, details = _code_of(
            lambda: _unpack(small, one_mib, pb.UnpackOptions(max_output_size=MIB - 1))
        )
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(MIB - 1) in details
        # Within both limits it round-trips.
        smaller = data[: MIB + 5]
        blob = _pack(small, smaller)[0]
        out, summary, _ = _unpack(small, blob, pb.UnpackOptions(max_output_size=64 * MIB))
        assert out == smaller and summary.raw_bytes == len(smaller)


def _seekable_empty_frames(count: int) -> bytes:
    """``count`` empty zstd frames and a seek table that describes them truthfully."""
    frame = bytes([0x28, 0xB5, 0x2F, 0xFD, 0x20, 0x00, 0x01, 0x00, 0x00])
    table = struct.pack("<II", len(frame), 0) * count + struct.pack("<IBI", count, 0, 0x8F92EAB1)
    return frame * count + struct.pack("<II", 0x184D2A5E, len(table)) + table


def test_pack_and_unpack_agree_on_the_frame_limit(sidecar: SidecarProcess) -> None:
    frames = 1 << 20  # the codec's MAX_FRAMES
    requests = iter(
        [
            pb.PackRequest(options=pb.PackOptions(chunk_size=1)),
            pb.PackRequest(chunk=bytes(frames + 1)),
        ]
    )
    # Refused before compressing: Pack never writes a blob its own Unpack refuses.
    code, details = _code_of(lambda: list(sidecar.stub.Pack(requests, timeout=60)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(frames) in details and "chunk_size" in details
    # A blob with one frame too many is a limit reached, never DATA_LOSS.
    code, details = _code_of(lambda: _unpack(sidecar, _seekable_empty_frames(frames + 1)))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(frames) in details
    out, summary, _ = _unpack(sidecar, _seekable_empty_frames(frames))
    assert out == b"" and summary.raw_bytes == 0


def test_options_after_data_are_invalid_argument(sidecar: SidecarProcess) -> None:
    def late_options() -> Iterator[pb.PackRequest]:
        yield pb.PackRequest(chunk=b"abc")
        yield pb.PackRequest(options=pb.PackOptions(level=1))

    code, _ = _code_of(lambda: list(sidecar.stub.Pack(late_options(), timeout=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    too_big = iter([pb.PackRequest(options=pb.PackOptions(chunk_size=64 * MIB))])
    code, _ = _code_of(lambda: list(sidecar.stub.Pack(too_big, timeout=30)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# --- WatchEvents -------------------------------------------------------------


def _notify(
    sidecar: SidecarProcess,
    notification_type: str,
    training_id: str,
    body: Dict[str, Any],
) -> int:
    url = sidecar.notification_url
    assert url is not None
    payload = json.dumps(
        {"notification_type": notification_type, "training_uuid": training_id, "body": body}
    ).encode()
    request = urllib.request.Request(
        url, data=payload, headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        error.close()
        return int(error.code)


def _round(number: int, model: str) -> Dict[str, Any]:
    return {"round": number, "global_model_uuid": model}


def _take(stream: Any, count: int) -> List[pb.Event]:
    events = [next(stream) for _ in range(count)]
    stream.cancel()
    return events


def test_late_subscriber_gets_the_round_start_it_missed(sidecar: SidecarProcess) -> None:
    training = str(uuid.uuid4())
    model = str(uuid.uuid4())
    assert (
        _notify(sidecar, "UPDATE_ROUND_START", training, {"round": 0, "global_model_uuid": model})
        == 202
    )
    stream = sidecar.stub.WatchEvents(pb.WatchEventsRequest(training_ids=[training]), timeout=30)
    (event,) = _take(stream, 1)
    assert event.kind == pb.EVENT_KIND_UPDATE_ROUND_START
    assert event.training_id == training
    assert event.model_id == model
    assert event.HasField("round") and event.round == 0
    assert event.seq >= 1
    assert json.loads(event.raw_json)["training_uuid"] == training
    assert json.loads(event.body_json) == {"round": 0, "global_model_uuid": model}
    assert event.received_at > 0


def test_two_subscribers_get_every_event_and_resume_works(sidecar: SidecarProcess) -> None:
    training = str(uuid.uuid4())
    model = str(uuid.uuid4())
    assert _notify(sidecar, "TRAINING_START", training, {"global_model_uuid": model}) == 200
    first = _take(
        sidecar.stub.WatchEvents(pb.WatchEventsRequest(training_ids=[training]), timeout=30), 1
    )[0]
    assert first.kind == pb.EVENT_KIND_TRAINING_START
    assert not first.HasField("round")

    # Both resume after the same seq, so both must see the next events whenever they subscribed.
    request = pb.WatchEventsRequest(after_seq=first.seq, training_ids=[training])
    one = sidecar.stub.WatchEvents(request, timeout=30)
    two = sidecar.stub.WatchEvents(request, timeout=30)
    assert (
        _notify(sidecar, "UPDATE_ROUND_START", training, {"round": 0, "global_model_uuid": model})
        == 202
    )
    assert (
        _notify(sidecar, "MODEL_TEST_ROUND", training, {"round": 1, "global_model_uuid": model})
        == 202
    )
    assert _notify(sidecar, "TRAINING_FINISHED", training, {"global_model_uuid": model}) == 200
    kinds = [
        pb.EVENT_KIND_UPDATE_ROUND_START,
        pb.EVENT_KIND_MODEL_TEST_ROUND,
        pb.EVENT_KIND_TRAINING_FINISHED,
    ]
    got_one = _take(one, 3)
    got_two = _take(two, 3)
    assert [e.kind for e in got_one] == kinds
    assert [e.seq for e in got_one] == [e.seq for e in got_two]
    assert got_one[0].seq > first.seq
    assert got_one[0].seq < got_one[1].seq < got_one[2].seq

    # Resume from the middle: exactly the events after that seq.
    resumed = sidecar.stub.WatchEvents(
        pb.WatchEventsRequest(after_seq=got_one[0].seq, training_ids=[training]), timeout=30
    )
    assert [e.seq for e in _take(resumed, 2)] == [got_one[1].seq, got_one[2].seq]


def test_resume_across_a_sidecar_restart_misses_nothing() -> None:
    """A trainer that saw event N of one sidecar process resumes on its successor."""
    training = str(uuid.uuid4())
    body = {"global_model_uuid": str(uuid.uuid4())}
    with running_sidecar() as old:
        assert _notify(old, "TRAINING_START", training, body) == 200
        (seen,) = _take(old.stub.WatchEvents(pb.WatchEventsRequest(), timeout=30), 1)
    with running_sidecar() as new:
        assert _notify(new, "UPDATE_ROUND_START", training, {"round": 0, **body}) == 202
        assert _notify(new, "MODEL_TEST_ROUND", training, {"round": 1, **body}) == 202
        resumed = _take(
            new.stub.WatchEvents(pb.WatchEventsRequest(after_seq=seen.seq), timeout=30), 2
        )
        assert [e.kind for e in resumed] == [
            pb.EVENT_KIND_UPDATE_ROUND_START,
            pb.EVENT_KIND_MODEL_TEST_ROUND,
        ]
        assert seen.seq < resumed[0].seq < resumed[1].seq < 2**53
        # A number this process has not reached cannot be honoured: a typed error,
        # not a silent wait that would skip events.
        beyond = new.stub.WatchEvents(
            pb.WatchEventsRequest(after_seq=resumed[1].seq + 1000), timeout=30
        )
        with pytest.raises(grpc.RpcError) as caught:
            next(beyond)
        assert caught.value.code() == grpc.StatusCode.OUT_OF_RANGE
        assert "subscribe again without after_seq" in (caught.value.details() or "")


def test_unknown_types_are_events_and_malformed_ones_are_not(sidecar: SidecarProcess) -> None:
    training = str(uuid.uuid4())
    assert _notify(sidecar, "SOMETHING_NEW", training, {"x": 1}) == 400
    (event,) = _take(
        sidecar.stub.WatchEvents(pb.WatchEventsRequest(training_ids=[training]), timeout=30), 1
    )
    assert event.kind == pb.EVENT_KIND_UNKNOWN
    assert event.notification_type == "SOMETHING_NEW"
    assert json.loads(event.raw_json)["body"] == {"x": 1}

    url = sidecar.notification_url
    assert url is not None
    bad = urllib.request.Request(url, data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(bad, timeout=10)
    caught.value.close()
    assert caught.value.code == 400
    # The next event of this training is a real one, not the malformed POST.
    after = event.seq
    assert _notify(sidecar, "TRAINING_FINISHED", training, {"global_model_uuid": "m"}) == 200
    (following,) = _take(
        sidecar.stub.WatchEvents(
            pb.WatchEventsRequest(after_seq=after, training_ids=[training]), timeout=30
        ),
        1,
    )
    assert following.kind == pb.EVENT_KIND_TRAINING_FINISHED


def test_cancelled_watch_frees_its_thread(sidecar: SidecarProcess) -> None:
    # More cancelled streams than the pool has threads (64): each must release its own,
    # or later calls would be refused with RESOURCE_EXHAUSTED.
    training = str(uuid.uuid4())
    assert _notify(sidecar, "TRAINING_START", training, {"global_model_uuid": "m"}) == 200
    for _ in range(80):
        stream = sidecar.stub.WatchEvents(
            pb.WatchEventsRequest(after_seq=0, training_ids=[training]), timeout=30
        )
        assert next(stream).training_id == training  # the stream is established
        stream.cancel()
    info = sidecar.stub.GetInfo(pb.GetInfoRequest(), timeout=30)
    assert info.version


def test_zz_json_logs_are_one_object_per_line(sidecar: SidecarProcess) -> None:
    lines = sidecar.log_text().splitlines()
    assert lines
    records = [json.loads(line) for line in lines]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any(r["msg"] == "sidecar serving" and r.get("socket") for r in records)
