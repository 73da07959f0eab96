"""FL-server credentials a trainer sends with one call, overriding the sidecar's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from fl_sidecar.v1 import sidecar_pb2 as pb

__all__ = ["CallCredentials"]


@dataclass(frozen=True)
class CallCredentials:
    """FL-server credentials for one call, overriding the sidecar's own.

    They travel to the local sidecar only, which uses them for that call and
    never logs them; ``repr`` hides them too.
    """

    username: Optional[str] = field(default=None, repr=False)
    password: Optional[str] = field(default=None, repr=False)
    token: Optional[str] = field(default=None, repr=False)
    authorization_header: Optional[str] = field(default=None, repr=False)

    @classmethod
    def basic(cls, username: str, password: str) -> CallCredentials:
        """HTTP basic authentication with the FL server's username and password."""
        return cls(username=username, password=password)

    @classmethod
    def api_token(cls, token: str) -> CallCredentials:
        """An FL-server API token (sent as ``Authorization: Token <token>``)."""
        return cls(token=token)

    @classmethod
    def header(cls, value: str) -> CallCredentials:
        """A complete HTTP ``Authorization`` header value, as the reference client takes."""
        return cls(authorization_header=value)

    def to_proto(self) -> pb.Credentials:
        """The contract's ``Credentials`` message."""
        if self.authorization_header is not None:
            return pb.Credentials(authorization_header=self.authorization_header)
        if self.token is not None:
            return pb.Credentials(token=self.token)
        if self.username is not None:
            return pb.Credentials(
                basic=pb.BasicAuth(username=self.username, password=self.password or "")
            )
        return pb.Credentials()
