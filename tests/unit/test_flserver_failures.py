"""The typed error of each answer of the DLR server (it says "not found" with 400)."""

from __future__ import annotations

from typing import Any, Type

import pytest

from fl_sidecar import errors
from fl_sidecar.flserver.bodies import parse_detail
from fl_sidecar.flserver.failures import map_error


@pytest.mark.parametrize(
    ("status", "body", "expected", "detail"),
    [
        (400, b'{"detail":"Model 42 not found."}', errors.NotFoundError, "Model 42 not found."),
        (400, b'{"detail":"GlobalModel 7 not found."}', errors.NotFoundError, None),
        (400, b'["Training with ID t is not currently in round 5"]', errors.ConflictError, None),
        (400, b'["Training with ID t is in state I"]', errors.ConflictError, None),
        (400, b'{"detail":"\'round\'"}', errors.RequestRejectedError, "'round'"),
        (400, b'["Invalid model file: bad"]', errors.RequestRejectedError, None),
        (401, b'{"detail":"Invalid token."}', errors.AuthenticationError, "Invalid token."),
        (
            403,
            b'{"detail":"You are not a participant of training x!"}',
            errors.PermissionDeniedError,
            None,
        ),
        (404, b"<html>nope</html>", errors.NotFoundError, None),
        (409, b'{"detail":"duplicate"}', errors.ConflictError, "duplicate"),
        (413, b'{"detail":"too big"}', errors.RequestRejectedError, None),
        (500, b"Internal Server Error", errors.ServerUnavailableError, None),
        (503, b"", errors.ServerUnavailableError, ""),
    ],
)
def test_error_mapping_from_real_server_bodies(
    status: int, body: bytes, expected: Type[errors.ServerError], detail: Any
) -> None:
    parsed = parse_detail(body, "application/json")
    err = map_error(status, parsed, "upload")
    assert type(err) is expected
    assert err.status == status and err.operation == "upload"
    if detail is not None:
        assert err.detail == detail
    assert f"HTTP {status}" in str(err)
