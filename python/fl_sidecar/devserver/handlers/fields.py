"""Reading the fields of requests: ids, integers, metric values, model files."""

from __future__ import annotations

import math
import re
import uuid
from typing import List, Optional, Sequence, Union

from fl_sidecar.errors import FlSidecarError

from .. import modelcheck
from ..wsgi import detail, listed

__all__ = [
    "MAX_COUNT",
    "check_model_file",
    "form_int",
    "parse_metric_values",
    "parse_uuid",
]

_INT_RE = re.compile(r"^-?[0-9]{1,18}$")
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)
MAX_COUNT = 10**15
"""Largest round count or sample size: far below SQLite's 64-bit integers."""


def form_int(name: str, raw: str) -> int:
    """A decimal integer form field (ASCII digits only, at most 18 of them).

    Raises:
        HttpError: 400 ``[message]`` otherwise.
    """
    text = raw.strip()
    if not _INT_RE.match(text):
        raise listed(f"{name} must be an integer, got {raw[:40]!r}")
    return int(text)


def parse_uuid(text: str) -> Optional[str]:
    """The canonical form of a UUID (with or without dashes, any case), or ``None``."""
    if not _UUID_RE.match(text):
        return None
    return str(uuid.UUID(text))


def parse_metric_values(names: Sequence[str], raw_values: Sequence[str]) -> List[Union[float, str]]:
    """One value per name: a finite float, or the text as it came when it is not a number.

    Raises:
        HttpError: 400 when the counts differ or a value is NaN or infinite.
    """
    if len(names) != len(raw_values):
        raise detail(400, f"{len(names)} metric_names but {len(raw_values)} metric_values.")
    values: List[Union[float, str]] = []
    for name, raw in zip(names, raw_values):
        try:
            value = float(raw)
        except ValueError:
            # The real server stores a value that is not a number as it came: so do we.
            values.append(raw)
            continue
        if not math.isfinite(value):
            # NaN cannot be stored in SQLite nor written as JSON.
            raise detail(400, f"Metric {name[:80]!r} is not a finite number.")
        values.append(value)
    return values


def check_model_file(path: str) -> modelcheck.Signature:
    """The tensors' signature of an uploaded model file, read without running its pickle.

    Raises:
        HttpError: 400 ``["Invalid model file: ..."]`` when it is not a model file.
    """
    try:
        return modelcheck.check_module_file(path)
    except FlSidecarError as exc:  # ModelError, or e.g. a codec error inside the reader
        raise listed(f"Invalid model file: {exc}") from None
