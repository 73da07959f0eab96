"""Old import path of compatibility mode's script runner.

The code lives in :mod:`fl_sidecar.sidecar.scripts` now;
this module only re-exports its names,
so that existing imports keep working.
"""

from __future__ import annotations

from fl_sidecar.sidecar.scripts import (
    DEFAULT_MAX_CONCURRENT,
    DEFAULT_MAX_QUEUED,
    ScriptRun,
    ScriptRunner,
)

__all__ = [
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_MAX_QUEUED",
    "ScriptRun",
    "ScriptRunner",
]
