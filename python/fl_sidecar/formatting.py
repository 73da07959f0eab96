"""How the people-facing commands write quantities: byte counts in binary units."""

from __future__ import annotations

__all__ = ["human_bytes"]


def human_bytes(n: float) -> str:
    """``n`` bytes (or bytes per second) in binary units: ``512 B``, ``1.5 KiB`` ... ``TiB``.

    Whole bytes below 1 KiB, one decimal above; TiB is the largest unit.
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
