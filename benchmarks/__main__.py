"""Run the benchmarks: ``python -m benchmarks [NAME ...] [--OPT=V]``.

NAME is one of codec, models, http, sidecar, tensor, realserver, round (all when none).

Each benchmark module exposes ``main(argv) -> int`` and prints its own table of
medians and ratios against its baselines, measured side by side in one run.
"""

from __future__ import annotations

import importlib
import sys
from typing import List

BENCHMARKS = ("codec", "models", "http", "sidecar", "tensor", "realserver", "round")


def main(argv: List[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or list(BENCHMARKS)
    extra = [a for a in argv if a.startswith("-")]
    status = 0
    for name in names:
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
            return 2
        print(f"\n=== benchmark: {name} ===", flush=True)
        module = importlib.import_module(f"benchmarks.{name}_bench")
        status |= int(module.main(extra) or 0)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
