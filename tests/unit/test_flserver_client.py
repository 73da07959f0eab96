"""FlServerClient without sockets: its settings, its repr, its defaults and its public paths."""

from __future__ import annotations

from typing import Any

import pytest

from fl_sidecar import errors
from fl_sidecar.flserver import Credentials, FlServerClient

SECRET = "s3cr3t-Pa55word"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"base_url": "http://user:pw@127.0.0.1:8000"},
        {"base_url": "ftp://127.0.0.1"},
        {"base_url": "127.0.0.1:8000"},
        {"base_url": "http://127.0.0.1", "compression": "sometimes"},
        {"base_url": "http://127.0.0.1", "timeout": 0},
        {"base_url": "http://127.0.0.1", "retries": -1},
        {"base_url": "http://127.0.0.1", "max_download_size": 0},
        {"base_url": "http://127.0.0.1", "min_upload_saving": 1.0},
        {"base_url": "http://127.0.0.1", "min_upload_saving": -0.1},
    ],
)
def test_client_refuses_bad_settings(kwargs: Any) -> None:
    with pytest.raises(errors.ConfigurationError) as info:
        FlServerClient(**kwargs)
    assert "pw@" not in str(info.value)


def test_client_repr_hides_credentials() -> None:
    with FlServerClient("http://127.0.0.1:1/", Credentials.basic("u", SECRET)) as client:
        assert SECRET not in repr(client)
        assert client.negotiated_coding is None
        assert client.base_url == "http://127.0.0.1:1/"


def test_the_default_download_limit_is_a_model_size_not_a_disk() -> None:
    """A zstd bomb is written to disk until the limit stops it: a few GiB, not 16."""
    from fl_sidecar.config import DEFAULT_MAX_MODEL_SIZE
    from fl_sidecar.flserver import DEFAULT_MAX_DOWNLOAD_SIZE

    assert DEFAULT_MAX_DOWNLOAD_SIZE == DEFAULT_MAX_MODEL_SIZE == 4 * 1024**3
    with FlServerClient("http://127.0.0.1:1/") as client:
        assert client.max_download_size == DEFAULT_MAX_DOWNLOAD_SIZE
