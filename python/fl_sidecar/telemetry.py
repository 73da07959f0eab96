"""Old import path of metrics and structured logs.

The code lives in :mod:`fl_sidecar.sidecar.telemetry` now;
this module only re-exports its names,
so that existing imports keep working.
"""

from __future__ import annotations

from fl_sidecar.sidecar.telemetry import (
    Metrics,
    RedactingFilter,
    configure_logging,
    redact,
)

__all__ = [
    "Metrics",
    "RedactingFilter",
    "configure_logging",
    "redact",
]
