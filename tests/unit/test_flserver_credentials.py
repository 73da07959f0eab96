"""Credentials without sockets: the header forms, what they refuse, and their secrecy."""

from __future__ import annotations

import base64
import pickle
from typing import Any

import pytest

from fl_sidecar import errors
from fl_sidecar.flserver.credentials import Credentials

SECRET = "s3cr3t-Pa55word"


def test_basic_credentials_header_and_secrecy() -> None:
    creds = Credentials.basic("alice", SECRET)
    scheme, value = creds.header().split(" ", 1)
    assert scheme == "Basic"
    assert base64.b64decode(value).decode() == f"alice:{SECRET}"
    assert creds.scheme == "basic"
    for shown in (repr(creds), str(creds), f"{creds}", repr([creds])):
        assert SECRET not in shown and value not in shown
    with pytest.raises(TypeError):
        pickle.dumps(creds)


def test_token_and_from_header() -> None:
    token = "0123456789abcdef0123456789abcdef01234567"
    creds = Credentials.token(token)
    assert creds.header() == f"Token {token}"
    assert token not in repr(creds)
    assert Credentials.from_header(f"Token {token}") == creds
    basic = Credentials.basic("bob", SECRET)
    assert Credentials.from_header(basic.header()) == basic
    assert Credentials.from_header(basic.header()).scheme == "basic"


@pytest.mark.parametrize(
    "value",
    ["", "   ", "Basic", "Token", "Basic !!not base64!!", "Token abc\r\nX-Evil: 1", "Token a\nb"],
)
def test_from_header_refuses_malformed_values(value: str) -> None:
    with pytest.raises(errors.ConfigurationError) as info:
        Credentials.from_header(value)
    assert "abc" not in str(info.value)


@pytest.mark.parametrize("bad", [("", "pw"), ("a:b", "pw")])
def test_basic_refuses_bad_usernames(bad: Any) -> None:
    with pytest.raises(errors.ConfigurationError):
        Credentials.basic(*bad)


@pytest.mark.parametrize("token", ["", "has space", "tab\there"])
def test_token_refuses_bad_tokens(token: str) -> None:
    with pytest.raises(errors.ConfigurationError):
        Credentials.token(token)
