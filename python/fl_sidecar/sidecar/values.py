"""Parsers of the settings' text values: booleans, sizes, ports, addresses, URLs.

Each takes the text of a flag or an environment variable and returns the value,
or raises ``ValueError`` saying what was expected; :mod:`fl_sidecar.sidecar.settings`
names the flag and the variable in the error it makes of it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Callable, Dict, Tuple
from urllib.parse import urlsplit, urlunsplit

from fl_sidecar.address import parse_listen

__all__ = [
    "choice",
    "is_loopback_host",
    "non_negative_float",
    "non_negative_int",
    "parse_bool",
    "parse_listen",
    "parse_port",
    "parse_server_url",
    "parse_size",
    "parse_training_ids",
    "positive_float",
    "positive_int",
    "strip_userinfo",
]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_SIZE_UNITS: Dict[str, int] = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1000,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "T": 1024**4,
    "TB": 1000**4,
    "TIB": 1024**4,
}
_SIZE_PATTERN = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*\Z")


def parse_bool(text: str) -> bool:
    """Parse ``1/true/yes/on`` or ``0/false/no/off`` (any case).

    Raises:
        ValueError: anything else.
    """
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def parse_size(text: str) -> int:
    """Parse a byte size: ``1048576``, ``512M``/``512MiB`` (binary), ``500MB`` (decimal).

    Returns:
        The size in bytes (at least 1).

    Raises:
        ValueError: not a size, an unknown unit, or zero.
    """
    match = _SIZE_PATTERN.match(text)
    if match is None or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 4G or 500MB, got {text!r}")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if value < 1:
        raise ValueError("the size must be at least 1 byte")
    return value


def parse_port(text: str) -> int:
    """Parse a TCP port, 0 (any free port) to 65535.

    Raises:
        ValueError: not an integer in that range.
    """
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0..65535")
    return port


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def strip_userinfo(url: str) -> str:
    """``url`` without its ``user:password@`` part (safe to log and to return to trainers)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None and "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def positive_float(text: str) -> float:
    """A number above 0 (seconds, say). Raises ValueError otherwise."""
    value = float(text)
    if not value > 0:
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A number of at least 0. Raises ValueError otherwise."""
    value = float(text)
    if not value >= 0:
        raise ValueError(f"expected a non-negative number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer of at least 1 (a count). Raises ValueError otherwise."""
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer of at least 0. Raises ValueError otherwise."""
    value = int(text)
    if value < 0:
        raise ValueError(f"expected a non-negative integer, got {text!r}")
    return value


def parse_server_url(text: str) -> str:
    """An ``http(s)://host[:port]...`` URL, unchanged. Raises ValueError (without any password)."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # The URL may carry user:password@: the message never echoes it.
        raise ValueError(f"{strip_userinfo(text)!r}: expected http(s)://host[:port]")
    return text


def choice(choices: Tuple[str, ...], normalise: Callable[[str], str]) -> Callable[[str], str]:
    """A parser accepting ``choices`` after ``normalise`` (e.g. ``str.lower``); ValueError else."""

    def parse(text: str) -> str:
        value = normalise(text)
        if value not in choices:
            expected = ", ".join(choices[:-1]) + " or " + choices[-1]
            raise ValueError(f"{text!r}: expected {expected}")
        return value

    return parse


def parse_training_ids(text: str) -> Tuple[str, ...]:
    """A comma-separated id list, blanks dropped. Raises ValueError when it names none."""
    ids = tuple(part.strip() for part in text.split(",") if part.strip())
    if not ids:
        raise ValueError("it names no training id")
    return ids
