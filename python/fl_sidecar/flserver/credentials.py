"""Credentials for the FL server: an ``Authorization`` header value that never shows.

Each one registers its every form with :mod:`fl_sidecar.redaction` when it is
made, so that logs, reprs, exception messages and error bodies never carry it.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from fl_sidecar import redaction
from fl_sidecar.errors import ConfigurationError

__all__ = ["Credentials"]


class Credentials:
    """An ``Authorization`` header value, kept out of every repr, str and log line.

    Build one with :meth:`basic`, :meth:`token` or :meth:`from_header`. A token
    is cheaper for the server (Basic costs it about 0.25 s per request).
    """

    __slots__ = ("_header", "_scheme")

    def __init__(self, header: str) -> None:
        """Wrap a complete ``Authorization`` header value; prefer the class methods.

        Raises:
            ConfigurationError: the value is empty or holds a line break.
        """
        value = header.strip()
        if not value or any(c in value for c in "\r\n\0"):
            raise ConfigurationError("invalid Authorization header value (empty or multi-line)")
        # Known to the redaction from now on, in every form (base64, user:password, ...).
        redaction.register_header(value)
        self._header = value
        self._scheme = value.split(None, 1)[0].lower()

    @classmethod
    def basic(cls, username: str, password: str) -> Credentials:
        """HTTP Basic credentials (what the reference client sends).

        Raises:
            ConfigurationError: the username is empty or contains ``:``.
        """
        if not username or ":" in username:
            raise ConfigurationError("a Basic username must be non-empty and contain no ':'")
        raw = f"{username}:{password}".encode()
        return cls("Basic " + base64.b64encode(raw).decode("ascii"))

    @classmethod
    def token(cls, token: str) -> Credentials:
        """DRF token credentials (``Authorization: Token <token>``).

        Raises:
            ConfigurationError: the token is empty or contains whitespace.
        """
        if not token or any(c.isspace() for c in token):
            raise ConfigurationError("a token must be non-empty and contain no whitespace")
        return cls("Token " + token)

    @classmethod
    def from_header(cls, value: str) -> Credentials:
        """Credentials from a complete ``Authorization`` header value, e.g. ``"Basic dXM6cHc="``.

        This is what the reference client's ``from_http_authorization`` takes.

        Raises:
            ConfigurationError: the value is empty, has no scheme and parameter,
                or holds a line break.
        """
        creds = cls(value)
        if len(creds._header.split(None, 1)) != 2:
            raise ConfigurationError("an Authorization header value needs a scheme and a value")
        if creds._scheme == "basic":
            try:
                base64.b64decode(creds._header.split(None, 1)[1], validate=True)
            except (binascii.Error, ValueError):
                raise ConfigurationError("a Basic Authorization value is not base64") from None
        return creds

    @property
    def scheme(self) -> str:
        """The lower-case authentication scheme, e.g. ``"basic"`` or ``"token"``."""
        return self._scheme

    def header(self) -> str:
        """The ``Authorization`` header value (a secret: do not log it)."""
        return self._header

    def __repr__(self) -> str:
        return f"Credentials(scheme={self._scheme!r}, value=<hidden>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Credentials):
            return NotImplemented
        return self._header == other._header

    def __hash__(self) -> int:
        return hash(self._header)

    def __reduce__(self) -> Any:
        # Pickling would copy the secret into places we cannot see (process pools, caches).
        raise TypeError("Credentials cannot be pickled")
