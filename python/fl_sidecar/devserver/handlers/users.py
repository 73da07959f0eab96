"""``POST /api/users/`` (no authentication, as on the real server) and ``GET /healthz``."""

from __future__ import annotations

import secrets
import time
import urllib.parse
import uuid
from typing import Dict, List

from ..wsgi import HttpError, Request, Response, read_json
from .auth import hash_password
from .context import Context

__all__ = ["UserHandlers"]


class UserHandlers:
    """The users resource, and the health check."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def health(self, request: Request) -> Response:
        """200 ``{"status": "ok"}``."""
        return Response(200, {"status": "ok"})

    def create_user(self, request: Request) -> Response:
        """201 with the new user and its token; 400 with a message per bad field."""
        data = read_json(request)
        errors: Dict[str, List[str]] = {}

        def text(name: str, required: bool, limit: int = 254) -> str:
            value = data.get(name, "")
            if value is None:
                value = ""
            if not isinstance(value, str):
                errors[name] = ["Not a valid string."]
                return ""
            if required and not value:
                errors[name] = ["This field is required."]
            elif len(value) > limit:
                errors[name] = [f"Ensure this field has no more than {limit} characters."]
            return str(value)

        def flag(name: str) -> bool:
            value = data.get(name, False)
            if not isinstance(value, bool):
                errors[name] = ["Must be a valid boolean."]
                return False
            return value

        username = text("username", True, 150)
        password = text("password", True, 1024)
        endpoint = text("message_endpoint", True, 2048)
        if endpoint and "message_endpoint" not in errors:
            try:
                parsed = urllib.parse.urlsplit(endpoint)
                valid = parsed.scheme in ("http", "https") and bool(parsed.hostname)
                valid = valid and (parsed.port is None or parsed.port > 0)
            except ValueError:  # e.g. an unclosed IPv6 bracket or a port out of range
                valid = False
            if not valid:
                errors["message_endpoint"] = ["Enter a valid URL."]
        first_name = text("first_name", False, 150)
        last_name = text("last_name", False, 150)
        email = text("email", False)
        actor = flag("actor")
        client = flag("client")
        if errors:
            raise HttpError(400, errors)
        user_id = str(uuid.uuid4())
        token = secrets.token_hex(20)
        added = self._ctx.store.add_user(
            user_id,
            username,
            hash_password(password, self._ctx.password_iterations),
            token,
            endpoint,
            actor=actor,
            client=client,
            first_name=first_name,
            last_name=last_name,
            email=email,
            created=time.time(),
        )
        if not added:
            raise HttpError(400, {"username": ["A user with that username already exists."]})
        body = {
            "id": user_id,
            "username": username,
            "token": token,
            "message_endpoint": endpoint,
            "actor": actor,
            "client": client,
            "first_name": first_name,
            "last_name": last_name,
            "email": email,
        }
        return Response(201, body)
