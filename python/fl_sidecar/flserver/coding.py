"""Content-coding negotiation (RFC 9110 section 12.5.3): the header parsers and the coding choice.

Shared by both halves of the negotiation: the FL server client
(:mod:`fl_sidecar.flserver`) learns from a server's answers whether it may
pack uploads, and the WSGI middleware (:mod:`fl_sidecar.wsgi_zstd`) reads what
a client accepts. Standard library only at import time (the codec, a native
extension, is imported on first use), so that a server that installs
fl-sidecar only for the middleware needs neither requests nor grpc.
"""

from __future__ import annotations

from types import ModuleType
from typing import Dict, List, Optional

from fl_sidecar.errors import ConfigurationError

__all__ = [
    "COMPRESSION_MODES",
    "IDENTITY",
    "ZSTD",
    "CodingNegotiation",
    "accepted_codings",
    "accepts",
    "codec",
    "codec_available",
    "download_coding",
    "header_list",
]

IDENTITY = "identity"
ZSTD = "zstd"
COMPRESSION_MODES = ("auto", "never", "always")
"""The client's modes: ``auto`` (zstd when negotiated), ``never`` (identity both ways),
``always`` (zstd uploads without waiting for the server to advertise it)."""


def header_list(value: str) -> List[str]:
    """The items of a comma-separated header value (``Content-Encoding``, ``Vary``), lower-case.

    In order, empty items dropped.
    """
    return [c.strip().lower() for c in value.split(",") if c.strip()]


def accepted_codings(value: str) -> Dict[str, float]:
    """An ``Accept-Encoding`` value as {coding: qvalue}, codings lower-case.

    A coding without ``q`` has 1.0; an unreadable ``q`` counts as 0 (not
    acceptable). When a coding is listed twice, its first entry counts.
    ``*`` is kept as a coding of its own.
    """
    out: Dict[str, float] = {}
    for item in value.split(","):
        parts = [p.strip() for p in item.split(";")]
        name = parts[0].lower()
        if not name:
            continue
        q = 1.0
        for param in parts[1:]:
            if param.lower().startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        out.setdefault(name, q)
    return out


def accepts(value: str, coding: str, *, wildcard: bool = True) -> bool:
    """Whether an ``Accept-Encoding`` value admits ``coding`` with a qvalue above 0.

    Args:
        value: the header's value (``""`` when absent: nothing but identity).
        coding: the coding asked about, e.g. ``"zstd"``.
        wildcard: whether ``*`` stands for a coding the list does not name (as a
            request's header means it). A server's advertisement in an answer
            names its codings, so the client asks with ``wildcard=False``.
    """
    weights = accepted_codings(value)
    q = weights.get(coding.lower())
    if q is None and wildcard:
        q = weights.get("*")
    return q is not None and q > 0


def codec() -> ModuleType:
    """The codec module, imported on first use (a native extension; JSON calls need none).

    Raises:
        ImportError: the native extension is not built.
    """
    from fl_sidecar import codec as module

    return module


def codec_available() -> bool:
    """Whether the codec can be imported (without it every transfer is identity)."""
    try:
        codec()
    except ImportError:
        return False
    return True


def download_coding(compression: str) -> str:
    """The coding a download asks for (``Accept-Encoding``): zstd unless ``never`` or no codec."""
    return ZSTD if compression != "never" and codec_available() else IDENTITY


class CodingNegotiation:
    """What the server accepts in requests, learnt from the answers it gives anyway.

    No request is ever sent just to learn it (the real server answers OPTIONS
    with a 500): every answer's ``Accept-Encoding`` teaches it, and a 415 ends
    zstd for good.

    Attributes:
        negotiated: ``"zstd"`` (advertised), ``"identity"`` (not advertised, or
            refused with a 415), or ``None`` (no answer seen yet).
        zstd_refused: a 415 was seen; the advertisement is not believed again.
    """

    def __init__(self) -> None:
        """Nothing learnt yet."""
        self.negotiated: Optional[str] = None
        self.zstd_refused = False

    @staticmethod
    def check_mode(compression: str) -> str:
        """``compression`` itself when it is one of :data:`COMPRESSION_MODES`.

        Raises:
            ConfigurationError: it is not.
        """
        if compression not in COMPRESSION_MODES:
            raise ConfigurationError(f"compression must be one of {COMPRESSION_MODES}")
        return compression

    def learn(self, advertised: Optional[str]) -> None:
        """Remember an answer's ``Accept-Encoding`` (``None``: the answer had none)."""
        if advertised is None:
            if self.negotiated is None:
                self.negotiated = IDENTITY
            return
        # After a 415 the advertisement is not believed again (no 415 loop).
        offered = accepts(advertised, ZSTD, wildcard=False)
        self.negotiated = ZSTD if offered and not self.zstd_refused else IDENTITY

    def refuse_zstd(self) -> None:
        """The server answered 415 to a zstd body: identity from now on."""
        self.zstd_refused = True
        self.negotiated = IDENTITY

    def upload_coding(self, compression: str) -> str:
        """The coding the next upload is sent in, for the client's ``compression`` mode."""
        if compression == "never" or self.zstd_refused or not codec_available():
            return IDENTITY
        if compression == "always":
            return ZSTD
        # Nothing learnt yet: identity, which every server takes; this upload's
        # answer teaches the coding to the next one.
        return ZSTD if self.negotiated == ZSTD else IDENTITY
