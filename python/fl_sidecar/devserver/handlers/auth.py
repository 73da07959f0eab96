"""Authentication as the real server does it: Basic (password or token) and Token headers.

Passwords are stored as Django's ``pbkdf2_sha256$iterations$salt$hash``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from typing import Optional

from ..store import Row, Store
from ..wsgi import HttpError, Request

__all__ = ["authenticate", "check_password", "hash_password"]

_AUTH_CHALLENGE = ("WWW-Authenticate", "Token")


def hash_password(password: str, iterations: int, salt: Optional[str] = None) -> str:
    """The PBKDF2-SHA256 encoding of ``password`` (a fresh salt unless one is given)."""
    salt = salt or secrets.token_hex(12)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"


def check_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (constant-time compare; False if malformed)."""
    try:
        _algo, iterations, salt, _digest = encoded.split("$", 3)
        expected = hash_password(password, int(iterations), salt)
    except ValueError:
        return False
    return hmac.compare_digest(expected, encoded)


def _unauthorized(message: str) -> HttpError:
    return HttpError(401, {"detail": message}, [_AUTH_CHALLENGE])


def authenticate(store: Store, request: Request) -> Row:
    """The user the request's ``Authorization`` header names; also set as ``request.user``.

    Raises:
        HttpError: 401 with the real server's body and ``WWW-Authenticate: Token``
            when the header is missing, malformed or names no user.
    """
    header = request.header("Authorization")
    if not header or not header.strip():
        raise _unauthorized("Authentication credentials were not provided.")
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    user: Optional[Row]
    if scheme.lower() == "token":
        if not credentials or " " in credentials:
            raise _unauthorized("Invalid token header.")
        user = store.user_by_token(credentials)
        if user is None:
            raise _unauthorized("Invalid token.")
    elif scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(credentials, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise _unauthorized(
                "Invalid basic header. Credentials not correctly base64 encoded."
            ) from None
        username, sep, password = decoded.partition(":")
        if not sep:
            raise _unauthorized("Invalid basic header. No credentials provided.")
        user = None
        if password == "":
            user = store.user_by_token(username)
        else:
            row = store.user_by_username(username)
            if row is not None and check_password(password, row["password_hash"]):
                user = row
        if user is None:
            raise _unauthorized("Invalid username/password.")
    else:
        raise _unauthorized("Authentication credentials were not provided.")
    request.user = user
    return user
