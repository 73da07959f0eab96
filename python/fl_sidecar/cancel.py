"""Old import path of cancelling transfers in flight.

The code lives in :mod:`fl_sidecar.sidecar.cancel` now;
this module only re-exports its names,
so that existing imports keep working.
"""

from __future__ import annotations

from fl_sidecar.sidecar.cancel import (
    REASON_SHUTDOWN,
    REASON_TRAINER_GONE,
    Cancellation,
)

__all__ = [
    "REASON_SHUTDOWN",
    "REASON_TRAINER_GONE",
    "Cancellation",
]
