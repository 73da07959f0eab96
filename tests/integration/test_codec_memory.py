"""Every decode path on a decompression bomb, each in its own process, its peak RSS measured.

The bomb is the one a hostile peer sends: 264 KB of zstd RLE blocks in one frame
without a content size (so nothing can be refused from a header), expanding to
8 GiB, against the default 4 GiB limit. Each path must refuse it with the typed
``SizeLimitExceededError`` (RESOURCE_EXHAUSTED through the sidecar) while its peak
RSS stays far below the limit: the streaming paths hand output on in 4 MiB steps
and never hold more than one step, one frame window (here the largest accepted,
128 MiB) and one read. The paths that write a file (or send it over the sidecar's
socket) pass everything up to the limit on before refusing, so they run against
a 1 GiB limit to spare the machine; an unbounded decoder would still hold four
times the bound.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Iterator

import grpc
import pytest
from sidecar_harness import running_sidecar

from fl_sidecar import codec
from fl_sidecar.v1 import sidecar_pb2 as pb

pytestmark = pytest.mark.slow

MIB = 1 << 20
LIMIT = 4 << 30
FILE_LIMIT = 1 << 30
# Well above one window, one step and the interpreter; far below the 4 GiB limit.
PEAK_BOUND_MIB = 256


def rle_bomb(blocks: int, *, window_log: int = 27, byte: int = 0xAB) -> bytes:
    """One zstd frame without a content size: ``blocks`` RLE blocks of 128 KiB each,
    4 bytes apiece (``window_log`` 27 asks for the largest window the decoder accepts)."""
    out = bytearray(b"\x28\xb5\x2f\xfd" + bytes([0x00, (window_log - 10) << 3]))
    for i in range(blocks):
        header = int(i + 1 == blocks) | (1 << 1) | ((128 * 1024) << 3)
        out += struct.pack("<I", header)[:3] + bytes([byte])
    return bytes(out)


BOMB = rle_bomb(66_000)  # 264 KB -> 8.06 GiB


@pytest.fixture(scope="module")
def bomb_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bomb") / "bomb.zst"
    path.write_bytes(BOMB)
    return path


def run_measured(script: str, cwd: Path) -> Dict[str, object]:
    """Runs ``script`` in a fresh interpreter and returns the JSON dict it prints last,
    with ``peak_mib``, its own peak RSS (VmHWM) when it ended."""
    prelude = textwrap.dedent(
        """
        import json, sys
        from fl_sidecar import codec
        from fl_sidecar.errors import SizeLimitExceededError
        def peak_mib():
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr
    result: Dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def assert_refused_within_bound(result: Dict[str, object], limit: int = LIMIT) -> None:
    assert result["error"] == "SizeLimitExceededError", result
    assert str(limit) in str(result["message"]), result
    peak = float(str(result["peak_mib"]))
    assert peak < PEAK_BOUND_MIB, f"peak RSS {peak:.0f} MiB"


def test_the_bomb_is_what_the_report_describes() -> None:
    info = codec.inspect(BOMB)
    assert len(BOMB) < 270_000
    assert info.decompressed_size is None and not info.has_seek_table


def test_unpacker_with_default_pieces_stays_bounded(bomb_file: Path) -> None:
    result = run_measured(
        f"""
        blob = open({str(bomb_file)!r}, "rb").read()
        unpacker = codec.Unpacker()  # the defaults: 4 GiB limit, 4 MiB pieces
        largest = 0
        try:
            for i in range(0, len(blob), 1 << 20):
                for piece in unpacker.write_iter(blob[i : i + (1 << 20)]):
                    largest = max(largest, len(piece))
            unpacker.finish()
            error, message = None, ""
        except SizeLimitExceededError as e:
            error, message = type(e).__name__, str(e)
        print(json.dumps({{"error": error, "message": message, "largest": largest,
                          "produced": unpacker.produced, "peak_mib": peak_mib()}}))
        """,
        bomb_file.parent,
    )
    assert_refused_within_bound(result)
    assert result["largest"] == codec.DEFAULT_PIECE_SIZE
    assert int(str(result["produced"])) <= LIMIT + 1


def test_unpacker_write_returns_one_piece_and_holds_the_rest(bomb_file: Path) -> None:
    result = run_measured(
        f"""
        blob = open({str(bomb_file)!r}, "rb").read()
        unpacker = codec.Unpacker()
        first = len(unpacker.write(blob))  # the whole bomb in one write
        pieces = 1
        try:
            while unpacker.pending_input:
                unpacker.drain()
                pieces += 1
            error, message = None, ""
        except SizeLimitExceededError as e:
            error, message = type(e).__name__, str(e)
        print(json.dumps({{"error": error, "message": message, "first": first,
                          "pieces": pieces, "peak_mib": peak_mib()}}))
        """,
        bomb_file.parent,
    )
    assert_refused_within_bound(result)
    assert result["first"] == codec.DEFAULT_PIECE_SIZE
    assert int(str(result["pieces"])) >= LIMIT // codec.DEFAULT_PIECE_SIZE


def test_unpack_file_stays_bounded_and_leaves_nothing(bomb_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    result = run_measured(
        f"""
        try:
            codec.unpack_file({str(bomb_file)!r}, {str(out)!r}, max_output_size={FILE_LIMIT})
            error, message = None, ""
        except SizeLimitExceededError as e:
            error, message = type(e).__name__, str(e)
        print(json.dumps({{"error": error, "message": message, "peak_mib": peak_mib()}}))
        """,
        tmp_path,
    )
    assert_refused_within_bound(result, FILE_LIMIT)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name != "out.bin"]


def test_one_shot_unpack_measures_the_bomb_without_holding_it(bomb_file: Path) -> None:
    result = run_measured(
        f"""
        blob = open({str(bomb_file)!r}, "rb").read()
        try:
            codec.unpack(blob)
            error, message = None, ""
        except SizeLimitExceededError as e:
            error, message = type(e).__name__, str(e)
        print(json.dumps({{"error": error, "message": message, "peak_mib": peak_mib()}}))
        """,
        bomb_file.parent,
    )
    assert_refused_within_bound(result)


def test_unpack_file_streams_a_seek_table_frame_larger_than_ours(tmp_path: Path) -> None:
    # A seek table may list one frame of up to 4 GiB: the file path must not hold it whole.
    frame = rle_bomb(4096, window_log=23)  # 512 MiB
    table_entry = struct.pack("<II", len(frame), 512 * MIB)
    table = table_entry + struct.pack("<IBI", 1, 0, 0x8F92EAB1)
    blob = frame + struct.pack("<II", 0x184D2A5E, len(table)) + table
    (tmp_path / "big.zst").write_bytes(blob)
    result = run_measured(
        """
        written = codec.unpack_file("big.zst", "big.bin")
        with open("big.bin", "rb") as f:
            ok = all(chunk == b"\\xab" * len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
        print(json.dumps({"written": written, "ok": ok, "peak_mib": peak_mib()}))
        """,
        tmp_path,
    )
    assert result["written"] == 512 * MIB and result["ok"] is True
    peak = float(str(result["peak_mib"]))
    assert peak < PEAK_BOUND_MIB, f"peak RSS {peak:.0f} MiB"


def _cli_peak(*args: str, cwd: Path) -> Dict[str, object]:
    """Runs ``fl-sidecar ARGS`` as a child; its exit status, stderr and peak RSS (MiB)."""
    script = textwrap.dedent(
        f"""
        import json, resource, subprocess, sys
        done = subprocess.run([sys.executable, "-m", "fl_sidecar.cli", *{list(args)!r}],
                              capture_output=True, text=True)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(json.dumps({{"rc": done.returncode, "stderr": done.stderr, "peak_mib": peak}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    result: Dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_cli_unpack_stays_bounded_and_names_the_limit(bomb_file: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out.bin")
    result = _cli_peak("unpack", str(bomb_file), out, "--max-size", "1GiB", cwd=tmp_path)
    assert result["rc"] != 0
    assert "SizeLimitExceededError" in str(result["stderr"]), result
    assert str(FILE_LIMIT) in str(result["stderr"])
    peak = float(str(result["peak_mib"]))
    assert peak < PEAK_BOUND_MIB, f"peak RSS {peak:.0f} MiB"
    assert not list(tmp_path.iterdir())


def _vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def test_sidecar_unpack_stays_bounded() -> None:
    def requests() -> Iterator[pb.UnpackRequest]:
        # 1 GiB, not 4: every byte up to the limit crosses the socket before the refusal.
        yield pb.UnpackRequest(options=pb.UnpackOptions(max_output_size=FILE_LIMIT))
        for start in range(0, len(BOMB), MIB):
            yield pb.UnpackRequest(chunk=BOMB[start : start + MIB])

    with running_sidecar() as sidecar:
        before = _vm_hwm_mib(sidecar.process.pid)
        produced = 0
        with pytest.raises(grpc.RpcError) as caught:
            for message in sidecar.stub.Unpack(requests(), timeout=240):
                produced += len(message.chunk)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(FILE_LIMIT) in (caught.value.details() or "")
        grown = _vm_hwm_mib(sidecar.process.pid) - before
    assert 0 < produced <= FILE_LIMIT
    assert grown < PEAK_BOUND_MIB, f"the sidecar's peak RSS grew by {grown:.0f} MiB"


def test_bomb_bounds_hold_with_the_smallest_window_too(tmp_path: Path) -> None:
    # The common case: an 8 MiB window; memory then is well under 64 MiB above baseline.
    small = rle_bomb(66_000, window_log=23)
    (tmp_path / "b.zst").write_bytes(small)
    result = run_measured(
        f"""
        try:
            codec.unpack_file("b.zst", "b.bin", max_output_size={FILE_LIMIT})
            error, message = None, ""
        except SizeLimitExceededError as e:
            error, message = type(e).__name__, str(e)
        print(json.dumps({{"error": error, "message": message, "peak_mib": peak_mib()}}))
        """,
        tmp_path,
    )
    assert_refused_within_bound(result, FILE_LIMIT)
    assert float(str(result["peak_mib"])) < 96
    assert os.listdir(tmp_path) == ["b.zst"]


def test_a_window_the_process_cannot_allocate_is_memory_error_not_corruption() -> None:
    # Under an address-space limit, zstd's allocation of a 128 MiB window fails: that is
    # this process's limit, so MemoryError (RESOURCE_EXHAUSTED in the sidecar), never
    # CorruptDataError (DATA_LOSS), which would blame the data.
    result = run_measured(
        f"""
        import resource
        from fl_sidecar.errors import CodecError
        blob = {rle_bomb(2000)!r}
        unpacker = codec.Unpacker(max_output_size=1 << 30)
        with open("/proc/self/status") as f:
            vm = next(int(l.split()[1]) for l in f if l.startswith("VmSize:")) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (64 << 20), resource.RLIM_INFINITY))
        try:
            for piece in unpacker.write_iter(blob):
                pass
            error = None
        except (MemoryError, CodecError) as e:
            error = type(e).__name__
        print(json.dumps({{"error": error}}))
        """,
        Path.cwd(),
    )
    assert result["error"] == "MemoryError", result
