"""The torch-free archive module in a fresh interpreter: no torch import, bounded memory.

Each check runs in its own subprocess, since what is measured (``sys.modules``, the
peak RSS) belongs to a whole process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict

import pytest
import torch

from fl_sidecar import models

_MIB = 1024 * 1024


def _run(code: str, *args: str, timeout: float = 120) -> str:
    """The last line ``code`` prints in a fresh interpreter (``args`` as its sys.argv[1:])."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1]


class Net(torch.nn.Module):
    """Tied weights, and a buffer that is a transposed (strided) view of a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.out = torch.nn.Linear(3, 4)
        self.out.weight = torch.nn.Parameter(self.fc.weight.detach().t().contiguous())
        self.head = torch.nn.Linear(3, 4, bias=False)
        self.head.weight = self.out.weight
        self.register_buffer("fc_t", self.fc.weight.detach().t())


def test_vetting_and_converting_never_import_torch_or_numpy(tmp_path: Path) -> None:
    # The sidecar's image has neither: only the core dependencies.
    pickled = tmp_path / "module.pt"
    torch.save(Net(), pickled)
    scripted = tmp_path / "scripted.pt"
    models.save_module(torch.jit.script(Net()), scripted)
    out = _run(
        f"""
        import json, sys
        from fl_sidecar import archive
        seen = []
        for src in ({str(pickled)!r}, {str(scripted)!r}):
            seen.append(archive.detect_format(src).value)
            names = list(archive.describe(src).tensors)
            archive.archive_to_safetensors(src, src + ".safetensors")
            seen.append(archive.detect_format(src + ".safetensors").value)
            archive.safetensors_into_archive(src, src + ".safetensors", src + ".out")
            seen.append(len(names))
        heavy = ("torch", "numpy")
        print(json.dumps([seen, sorted(m for m in sys.modules if m.split(".")[0] in heavy)]))
        """
    )
    seen, torch_modules = json.loads(out)
    assert torch_modules == []
    assert seen == ["torch", "safetensors", 6, "torchscript", "safetensors", 6]
    # What the torch-free process wrote loads with torch, as the same module types.
    loaded = torch.load(str(pickled) + ".out", weights_only=False)
    assert type(loaded) is Net
    assert isinstance(models.load_trusted(str(scripted) + ".out"), torch.jit.ScriptModule)


_PEAK = """
import json, sys
{imports}

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

try:  # reset the peak (VmHWM) to the current RSS, so the imports' peak is not counted
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = status("VmRSS")
src, dst, out, *more = sys.argv[1:]
{op}
print(json.dumps((status("VmHWM") - before) / 2**20))
"""


def _peak_mib(op: str, *paths: Path, imports: str = "from fl_sidecar import archive") -> float:
    """Peak RSS (MiB) that ``op`` adds, run after ``imports`` (which are not counted)."""
    code = _PEAK.format(op=op, imports=imports)
    return float(_run(code, *map(str, paths), timeout=300))


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_converting_a_256_mib_archive_keeps_memory_bounded(tmp_path: Path) -> None:
    state: Dict[str, torch.Tensor] = {
        f"layer{i}.weight": torch.full((4096, 4096), float(i)) for i in range(4)
    }
    state["tied.weight"] = state["layer0.weight"]  # one storage, two names: streamed too
    src = tmp_path / "big.pt"
    torch.save(state, src)
    del state
    assert src.stat().st_size > 256 * _MIB
    weights = tmp_path / "big.safetensors"
    out = tmp_path / "out.pt"
    to_st = _peak_mib("archive.archive_to_safetensors(src, dst)", src, weights, out)
    assert weights.stat().st_size > 320 * _MIB  # the tied copy is written twice
    back = _peak_mib("archive.safetensors_into_archive(src, dst, out)", src, weights, out)
    vetting = _peak_mib("archive.describe(src)", src, weights, out)
    # The control: holding the archive in memory shows up, so the bound can fail.
    control = _peak_mib("data = open(src, 'rb').read()", src, weights, out)
    assert control > 250, control
    assert to_st < 64, to_st
    assert back < 64, back
    assert vetting < 64, vetting
    loaded = torch.load(out, weights_only=True, mmap=True)
    assert float(loaded["layer3.weight"][4095, 4095]) == 3.0
    assert loaded["tied.weight"].data_ptr() == loaded["layer0.weight"].data_ptr()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_averaging_four_64_mib_uploads_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    """The dev server's FedAvg: memory for a few tensors, not for every client's model."""
    paths = []
    for client in range(5):  # the template and four uploads
        state = {f"layer{i}.weight": torch.full((1024, 1024), float(client)) for i in range(16)}
        path = tmp_path / f"m{client}.pt"
        torch.save(state, path)
        paths.append(path)
    del state
    assert paths[0].stat().st_size > 64 * _MIB
    out = tmp_path / "avg.pt"
    imports = "import torch\nfrom fl_sidecar import models"
    streamed = _peak_mib(
        "models.average_archives(src, [dst, *more], [1, 1, 1, 1], out)",
        paths[0],
        paths[1],
        out,
        *paths[2:],
        imports=imports,
    )
    # The control: reading every upload whole, as the dev server used to.
    whole = _peak_mib(
        "models.weighted_average([models.read_tensors(p) for p in (dst, *more)], [1, 1, 1, 1])",
        paths[0],
        paths[1],
        out,
        *paths[2:],
        imports=imports,
    )
    assert whole > 4 * 64, whole
    # A few tensors' buffers (about 44 MiB here) and allocator slack, far below the
    # four uploads a whole read holds.
    assert streamed < 2 * 64, streamed
    averaged = torch.load(out, weights_only=True)
    # (1 + 2 + 3 + 4) / 4, every element of every tensor
    assert all(bool((t == 2.5).all()) for t in averaged.values())
