"""A trainer's connection to one sidecar: the channel, its interceptor and the client's settings.

:class:`SidecarConnection` is the base of
:class:`~fl_sidecar.trainer.client.SidecarClient`; the calls themselves live in
the client and in its download, upload and pack/unpack parts.
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Optional, Type, TypeVar, Union

import grpc

from fl_sidecar import socketdir
from fl_sidecar.address import normalize_target, unix_socket_path
from fl_sidecar.errors import SidecarError
from fl_sidecar.trainer.credentials import CallCredentials
from fl_sidecar.trainer.interceptor import SidecarInterceptor
from fl_sidecar.v1 import sidecar_pb2 as pb
from fl_sidecar.v1 import sidecar_pb2_grpc as pb_grpc
from fl_sidecar.wire import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_MESSAGE_SIZE

__all__ = ["SOCKET_OWNER_VARIABLE", "SidecarConnection"]

SOCKET_OWNER_VARIABLE = "FL_SIDECAR_SOCKET_OWNER"
"""Environment variable naming the uid or user the sidecar's socket may belong to."""

_C = TypeVar("_C", bound="SidecarConnection")


class SidecarConnection:
    """The channel to one sidecar and the settings of its calls (see :class:`SidecarClient`).

    Raises:
        ValueError: a bad ``chunk_size``. UnsafeSocketError: an ``expected_owner``
            that is neither a uid nor a known user name. ConfigurationError:
            ``target=None`` and a malformed ``FL_SIDECAR_LISTEN``.
    """

    def __init__(
        self,
        target: Optional[str] = None,
        *,
        api_token: Optional[str] = None,
        timeout: Optional[float] = 60.0,
        credentials: Optional[CallCredentials] = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        verify: bool = True,
        expected_owner: Optional[Union[int, str]] = None,
    ) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(f"chunk_size must be 1..{MAX_CHUNK_SIZE} bytes")
        self.target = normalize_target(target)
        self.timeout = timeout
        self.chunk_size = chunk_size
        self.verify = verify
        self._credentials = credentials
        # The id of the latest upload this client started (for get_upload after a crash).
        self.last_upload_id: Optional[str] = None
        if expected_owner is None:
            expected_owner = os.environ.get(SOCKET_OWNER_VARIABLE) or None
        self._expected_owner = (
            socketdir.resolve_owner(expected_owner) if expected_owner is not None else None
        )
        self._interceptor = SidecarInterceptor(
            self.target,
            socket_path=unix_socket_path(self.target),
            expected_owner=self._expected_owner,
            api_token=api_token,
        )
        self._raw_channel = grpc.insecure_channel(
            self.target,
            options=[
                ("grpc.max_send_message_length", MAX_MESSAGE_SIZE),
                ("grpc.max_receive_message_length", MAX_MESSAGE_SIZE),
            ],
        )
        self._channel = grpc.intercept_channel(self._raw_channel, self._interceptor)
        self._stub = pb_grpc.SidecarStub(self._channel)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; open streams are cancelled."""
        self._raw_channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel connects, at most ``timeout`` seconds.

        Connecting sends nothing (no token, no credentials), so it is not checked.

        Raises:
            SidecarError: ``UNAVAILABLE`` when the sidecar cannot be reached in time.
        """
        try:
            grpc.channel_ready_future(self._raw_channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise SidecarError(
                f"cannot reach the sidecar at {self.target} within {timeout} s",
                code="UNAVAILABLE",
            ) from None

    def _creds(self, credentials: Optional[CallCredentials]) -> Optional[pb.Credentials]:
        chosen = credentials if credentials is not None else self._credentials
        return chosen.to_proto() if chosen is not None else None
