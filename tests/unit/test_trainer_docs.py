"""``docs/trainers.md`` states the contract's numbers as ``fl_sidecar.wire`` defines them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fl_sidecar import wire
from fl_sidecar.trainer.connection import SidecarConnection

DOC = Path(__file__).resolve().parents[2] / "docs" / "trainers.md"
_UNITS = {"bytes": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def _limits_table() -> dict[str, int]:
    """The rows ``| what | `NAME` | N unit |`` of the doc's limits table, by name."""
    rows = re.findall(
        r"^\| [^|]+ \| `([A-Z_]+)` \| (\d+) (bytes|KiB|MiB|GiB) \|$", DOC.read_text(), re.M
    )
    return {name: int(number) * _UNITS[unit] for name, number, unit in rows}


def test_the_limits_table_has_wires_numbers() -> None:
    table = _limits_table()
    assert set(table) == {"MAX_MESSAGE_SIZE", "MAX_CHUNK_SIZE", "DEFAULT_CHUNK_SIZE"}
    for name, value in table.items():
        assert getattr(wire, name) == value, name


def test_the_prose_says_the_same_numbers() -> None:
    text = DOC.read_text()
    mib = 1024 * 1024
    assert f"at least {wire.MAX_MESSAGE_SIZE // mib} MiB" in text
    assert (
        f"0 means {wire.DEFAULT_CHUNK_SIZE // mib} MiB; 1 byte to {wire.MAX_CHUNK_SIZE // mib} MiB"
        in text
    )
    assert f"takes 1 byte to {wire.MAX_CHUNK_SIZE // mib} MiB and raises `ValueError`" in text


def test_the_python_client_takes_exactly_the_documented_chunk_sizes() -> None:
    for size in (1, wire.DEFAULT_CHUNK_SIZE, wire.MAX_CHUNK_SIZE):
        SidecarConnection("127.0.0.1:1", chunk_size=size).close()
    for size in (0, wire.MAX_CHUNK_SIZE + 1):
        with pytest.raises(ValueError):
            SidecarConnection("127.0.0.1:1", chunk_size=size)
