"""Redaction of every form of every secret: one test per form, and the places that apply it."""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import uuid
from typing import Callable, Dict, Tuple
from urllib.parse import quote, quote_plus

import pytest

from fl_sidecar import errors, redaction
from fl_sidecar.flserver.bodies import parse_detail
from fl_sidecar.flserver.credentials import Credentials
from fl_sidecar.flserver.failures import map_error
from fl_sidecar.telemetry import RedactingFilter, configure_logging, redact


def _fresh(prefix: str) -> str:
    """A secret no other test registered, with characters that every encoding changes."""
    return f'{prefix}-{uuid.uuid4().hex[:12]}+/=:&"<'


def _basic() -> Tuple[str, str, Credentials]:
    user, password = f"user-{uuid.uuid4().hex[:6]}", _fresh("pw")
    return user, password, Credentials.basic(user, password)


def _b64(raw: str, encode: Callable[[bytes], bytes], pad: bool) -> str:
    text = encode(raw.encode()).decode()
    return text if pad else text.rstrip("=")


BASIC_FORMS: Dict[str, Callable[[str, str], str]] = {
    "raw password": lambda u, p: p,
    "user:password": lambda u, p: f"{u}:{p}",
    "base64": lambda u, p: _b64(f"{u}:{p}", base64.b64encode, True),
    "base64 unpadded": lambda u, p: _b64(f"{u}:{p}", base64.b64encode, False),
    "base64 urlsafe": lambda u, p: _b64(f"{u}:{p}", base64.urlsafe_b64encode, True),
    "base64 urlsafe unpadded": lambda u, p: _b64(f"{u}:{p}", base64.urlsafe_b64encode, False),
    "header value": lambda u, p: "Basic " + _b64(f"{u}:{p}", base64.b64encode, True),
    "url-encoded password": lambda u, p: quote(p, safe=""),
    "url-encoded password (plus)": lambda u, p: quote_plus(p),
    "url-encoded user:password": lambda u, p: quote(f"{u}:{p}", safe=""),
    "url-encoded base64": lambda u, p: quote(_b64(f"{u}:{p}", base64.b64encode, True), safe=""),
    "json-escaped password": lambda u, p: json.dumps(p)[1:-1],
    "html-escaped password": lambda u, p: html.escape(p),
}


@pytest.mark.parametrize("form", sorted(BASIC_FORMS))
def test_every_form_of_basic_credentials_is_redacted(form: str) -> None:
    user, password, _credentials = _basic()
    shown = BASIC_FORMS[form](user, password)
    text = f"error: got {shown!s} from you"
    out = redaction.redact(text)
    assert shown not in out and "***" in out
    assert password not in out
    assert out.startswith("error: got ") and out.endswith(" from you")


TOKEN_FORMS: Dict[str, Callable[[str], str]] = {
    "raw token": lambda t: t,
    "header value": lambda t: f"Token {t}",
    "url-encoded": lambda t: quote(t, safe=""),
    "url-encoded (plus)": lambda t: quote_plus(t),
    "json-escaped": lambda t: json.dumps(t)[1:-1],
    "html-escaped": lambda t: html.escape(t),
}


@pytest.mark.parametrize("form", sorted(TOKEN_FORMS))
def test_every_form_of_a_token_is_redacted(form: str) -> None:
    token = f"tok{uuid.uuid4().hex}+/=&<"
    Credentials.token(token)
    shown = TOKEN_FORMS[form](token)
    assert redaction.redact(f"[{shown}]") == "[***]"


def test_a_header_value_given_whole_is_known_in_every_form() -> None:
    user, password = f"hdr-{uuid.uuid4().hex[:6]}", _fresh("hpw")
    header = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    Credentials.from_header(header)
    for form in (password, f"{user}:{password}", header.split()[1], header, quote(password)):
        assert form not in redaction.redact(f"echo {form} end"), form
    custom = f"Bearer {uuid.uuid4().hex}"
    Credentials.from_header(custom)
    assert redaction.redact(custom) == "***"
    assert custom.split()[1] not in redaction.redact(custom.split()[1])


def test_a_secret_cut_off_at_the_end_of_a_truncated_text_is_removed() -> None:
    token = f"cut{uuid.uuid4().hex}"
    Credentials.token(token)
    cut = f"Authorization: Token {token[:10]}"
    assert token[:10] not in redaction.redact(cut, truncated=True)
    assert redaction.redact(cut) == cut  # a prefix alone is not known without the hint


def test_short_and_unknown_strings_are_left_alone() -> None:
    redaction.register("abc")  # shorter than MIN_SECRET_LENGTH: would hit ordinary words
    with pytest.raises(errors.ConfigurationError):
        Credentials.from_header("Token")  # a scheme alone is no secret: "Token" stays readable
    assert redaction.redact("Token abcdef") == "Token abcdef"
    assert redaction.redact("abcdef") == "abcdef"
    assert redaction.redact("nothing secret here") == "nothing secret here"
    assert redaction.redact("") == ""


def test_extra_secrets_apply_to_one_call() -> None:
    secret = _fresh("extra")
    assert redaction.redact(f"a {secret} b", extra=[secret]) == "a *** b"


def test_server_errors_are_redacted_when_they_are_made() -> None:
    _user, password, credentials = _basic()
    header = credentials.header()
    error = errors.AuthenticationError(
        f"upload failed: you sent {header}", detail=f"bad {password}", status=401
    )
    assert header not in str(error) and password not in (error.detail or "")
    # The typed error of a server answer that echoes the header, through the real mapping.
    body = json.dumps({"detail": f"Invalid header: {header}"}).encode()
    mapped = map_error(400, parse_detail(body, "application/json"), "download")
    assert header.split()[1] not in str(mapped) and "***" in str(mapped)
    assert header.split()[1] not in (mapped.detail or "")


def test_a_json_body_with_escaped_secrets_is_redacted_after_decoding() -> None:
    token = f"esc{uuid.uuid4().hex}"
    Credentials.token(token)
    escaped = "".join(f"\\u{ord(c):04x}" for c in token)  # JSON that hides the token's text
    detail = parse_detail(f'{{"detail": "Token {escaped}"}}'.encode(), "application/json")
    assert token not in detail and "***" in detail


def test_an_error_body_is_redacted_before_it_is_cut() -> None:
    token = f"long{uuid.uuid4().hex}"
    Credentials.token(token)
    text = ("x" * 490 + f"Token {token}").encode()  # the 500-character cut falls inside it
    detail = parse_detail(text, "text/plain")
    assert token[:8] not in detail


def test_log_redaction_uses_the_same_forms() -> None:
    user, password, credentials = _basic()
    encoded = credentials.header().split()[1]
    api_token = _fresh("api")
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging(level="INFO", fmt="json", secrets=[api_token], stream=stream)
    try:
        log = logging.getLogger("fl_sidecar.test")
        log.info("server said %s", encoded, extra={"pair": f"{user}:{password}"})
        log.info("trainer token %s", quote(api_token, safe=""))
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    text = stream.getvalue()
    for secret in (encoded, password, api_token, quote(api_token, safe="")):
        assert secret not in text
    assert text.count("***") >= 3
    assert RedactingFilter().redact(encoded) == "***"  # the credential alone makes it known
    assert redact is redaction.redact  # telemetry's public name is the same function


def test_overlapping_secrets_are_redacted_whole() -> None:
    """One secret's form may start inside another's: neither leaves a remainder."""
    # Unique values: the registry is process-wide and other tests share it.
    tail = uuid.uuid4().hex
    redaction.register(f"ovl{tail[:6]}-{tail}")
    redaction.register_header(f"Token ovl{tail[:6]}")  # overlaps the start of the first
    text = redaction.redact(f"header Token ovl{tail[:6]}-{tail} end")
    assert tail not in text and tail[:6] not in text
    assert text == "header *** end"
