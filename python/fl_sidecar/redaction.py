"""Every form of every secret the process holds, and the one function that removes them.

A server that echoes a request's ``Authorization`` header in an error body, or
a library that prints a URL, can put a credential into text that would reach a
trainer or a log. :func:`redact` replaces each known secret with ``***`` in
whatever form it shows up in:

- the raw token or password;
- ``user:password`` and its base64, standard and URL-safe, with and without
  padding (what Basic auth sends), and the password decoded from a Basic value;
- the full header value (``Basic ...``, ``Token ...``);
- each of those percent-encoded (``quote``, ``quote_plus``), JSON-escaped and
  HTML-escaped (how a server that echoes them in a URL, a JSON body or a debug
  page writes them).

Secrets are registered process-wide: every
:class:`~fl_sidecar.server_api.Credentials` registers its forms when it is made
(so per-call credentials a trainer passed are known the moment they are used),
and the sidecar's logging registers its configured secrets. The registry keeps
the forms of the most recent :data:`MAX_REMEMBERED` secrets.

This module imports nothing outside the standard library: the error classes
use it.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import re
import threading
from collections import OrderedDict
from typing import FrozenSet, Iterable, List, Optional, Pattern, Set, Tuple
from urllib.parse import quote, quote_plus

__all__ = [
    "MAX_REMEMBERED",
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "basic_forms",
    "header_forms",
    "redact",
    "register",
    "register_header",
    "secret_forms",
]

REDACTED = "***"
MIN_SECRET_LENGTH = 4
"""Characters: shorter forms are not redacted (they would hit ordinary words)."""
_SCHEMES = frozenset({"basic", "bearer", "digest", "token"})
MAX_REMEMBERED = 4096
"""Secrets (each with its forms) the registry keeps; the oldest are forgotten first."""


def _encodings(value: str) -> Set[str]:
    """``value`` as a URL, a JSON string or an HTML page would write it."""
    return {
        value,
        quote(value, safe=""),
        quote(value),
        quote_plus(value),
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
        html.escape(value),
    }


def _base64_forms(raw: bytes) -> Set[str]:
    standard = base64.b64encode(raw).decode("ascii")
    urlsafe = base64.urlsafe_b64encode(raw).decode("ascii")
    return {standard, standard.rstrip("="), urlsafe, urlsafe.rstrip("=")}


def _long_enough(forms: Iterable[str]) -> FrozenSet[str]:
    return frozenset(f for f in forms if len(f) >= MIN_SECRET_LENGTH)


def secret_forms(secret: str) -> FrozenSet[str]:
    """The forms of one raw secret (a token, a password): itself and its encodings.

    Forms shorter than :data:`MIN_SECRET_LENGTH` characters are left out.
    """
    return _long_enough(_encodings(secret)) if secret else frozenset()


def basic_forms(username: str, password: str) -> FrozenSet[str]:
    """The forms of Basic credentials: the password, ``user:password`` and its base64.

    The username alone is not a secret and is not among them.
    """
    pair = f"{username}:{password}"
    forms: Set[str] = set()
    for value in (password, pair, *_base64_forms(pair.encode("utf-8"))):
        forms |= _encodings(value)
    return _long_enough(forms)


def header_forms(header: str) -> FrozenSet[str]:
    """The forms of an ``Authorization`` header value (``Basic ...``, ``Token ...``, others).

    Its parameter alone is a form too; a Basic value adds the forms of the
    ``user:password`` it decodes to.
    """
    value = header.strip()
    parts = value.split(None, 1)
    if len(parts) == 1 and value.lower() in _SCHEMES:
        return frozenset()  # a scheme without its parameter holds no secret
    forms: Set[str] = set(_encodings(value))
    if len(parts) == 2:
        scheme, param = parts[0].lower(), parts[1].strip()
        forms |= _encodings(param)
        if scheme == "basic":
            pair = _decode_basic(param)
            if pair is not None and ":" in pair:
                username, password = pair.split(":", 1)
                forms |= basic_forms(username, password)
    return _long_enough(forms)


def _decode_basic(param: str) -> Optional[str]:
    padded = param + "=" * (-len(param) % 4)
    for decode in (base64.b64decode, base64.urlsafe_b64decode):
        try:
            return decode(padded.encode("ascii")).decode("utf-8")
        except (binascii.Error, ValueError, UnicodeError):
            continue
    return None


class _Registry:
    """The forms of the secrets this process holds, newest last, and one regex of them all."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: OrderedDict[FrozenSet[str], None] = OrderedDict()
        self._pattern: Optional[Pattern[str]] = None
        self._forms: FrozenSet[str] = frozenset()

    def add(self, forms: FrozenSet[str]) -> None:
        if not forms:
            return
        with self._lock:
            if forms in self._secrets:
                self._secrets.move_to_end(forms)
                return
            self._secrets[forms] = None
            while len(self._secrets) > MAX_REMEMBERED:
                self._secrets.popitem(last=False)
            self._pattern = None

    def snapshot(self) -> Tuple[Optional[Pattern[str]], FrozenSet[str]]:
        with self._lock:
            if self._pattern is None and self._secrets:
                self._forms = frozenset().union(*self._secrets)
                self._pattern = _pattern_of(self._forms)
            return self._pattern, self._forms


_REGISTRY = _Registry()


def register(*secrets: str) -> None:
    """Remember raw secrets (tokens, passwords) so that :func:`redact` removes every form."""
    for secret in secrets:
        _REGISTRY.add(secret_forms(secret))


def register_header(header: str) -> None:
    """Remember an ``Authorization`` header value and every form of the secret in it."""
    _REGISTRY.add(header_forms(header))


def redact(text: str, *, extra: Iterable[str] = (), truncated: bool = False) -> str:
    """``text`` with every form of every registered secret (and of ``extra``) as ``***``.

    Args:
        text: any text bound for a log, an exception or a trainer.
        extra: further raw secrets for this call only (each expanded to its forms).
        truncated: ``text`` was cut off; a secret's beginning at its very end is
            removed too (a cut can leave a prefix that no whole form matches).

    Returns:
        The redacted text (``text`` itself when nothing matched).
    """
    if not text:
        return text
    pattern, forms = _REGISTRY.snapshot()
    if extra:
        more: Set[str] = set()
        for secret in extra:
            more |= secret_forms(secret)
        if more - forms:
            forms = forms | more
            pattern = _pattern_of(forms)
    if pattern is None:
        return text
    text = _replace_spans(text, pattern)
    if truncated:
        text = _cut_partial_tail(text, forms)
    return text


def _pattern_of(forms: Iterable[str]) -> Pattern[str]:
    # A lookahead finds a form at EVERY position, also one that starts inside
    # another match (secrets can overlap: "Token abc" and "abc-def" in
    # "Token abc-def"); longest first, so each position yields its longest form.
    ordered = sorted(forms, key=len, reverse=True)
    return re.compile("(?=(" + "|".join(re.escape(f) for f in ordered) + "))")


def _replace_spans(text: str, pattern: Pattern[str]) -> str:
    """``text`` with the union of every form's occurrences replaced, each run by one ``***``."""
    pieces: List[str] = []
    end = 0  # end of the text copied or redacted so far
    run_end = -1  # end of the redacted run being extended
    for match in pattern.finditer(text):
        start, stop = match.start(), match.start() + len(match.group(1))
        if start <= run_end:
            run_end = max(run_end, stop)
            continue
        if run_end >= 0:
            pieces.append(REDACTED)
            end = run_end
        pieces.append(text[end:start])
        run_end = stop
    if run_end < 0:
        return text
    pieces.append(REDACTED)
    pieces.append(text[run_end:])
    return "".join(pieces)


def _cut_partial_tail(text: str, forms: FrozenSet[str]) -> str:
    """Replaces a tail of ``text`` that is the beginning of a form (at least 4 characters)."""
    longest = 0
    for form in forms:
        for size in range(min(len(form) - 1, len(text)), MIN_SECRET_LENGTH - 1, -1):
            if text.endswith(form[:size]):
                longest = max(longest, size)
                break
    return text[: len(text) - longest] + REDACTED if longest else text
