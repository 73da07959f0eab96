"""The transport's idempotency rules without sockets: what certainly never left this machine."""

from __future__ import annotations

import requests
import urllib3.exceptions

from fl_sidecar.flserver.transport import _certainly_not_sent


def _conn_error(reason: BaseException) -> requests.exceptions.ConnectionError:
    return requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(None, "/", reason))  # type: ignore[arg-type]


def test_only_connection_failures_count_as_certainly_not_sent() -> None:
    refused = _conn_error(urllib3.exceptions.NewConnectionError(None, "refused"))  # type: ignore[arg-type]
    dns = _conn_error(urllib3.exceptions.NameResolutionError("nohost", None, OSError("x")))  # type: ignore[arg-type]
    assert _certainly_not_sent(refused)
    assert _certainly_not_sent(dns)
    assert _certainly_not_sent(requests.exceptions.ConnectTimeout("connect timed out"))
    reset = requests.exceptions.ConnectionError(
        urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError())
    )
    assert not _certainly_not_sent(reset)
    assert not _certainly_not_sent(requests.exceptions.ReadTimeout("read timed out"))
    assert not _certainly_not_sent(requests.exceptions.ChunkedEncodingError("broken"))
    assert not _certainly_not_sent(_conn_error(urllib3.exceptions.ProtocolError("x")))
