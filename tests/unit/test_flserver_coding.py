"""Content-coding negotiation without sockets: the header parsers and the coding choice."""

from __future__ import annotations

import pytest

from fl_sidecar import errors
from fl_sidecar.flserver import coding
from fl_sidecar.flserver.coding import (
    CodingNegotiation,
    accepted_codings,
    accepts,
    download_coding,
    header_list,
)


def test_accept_encoding_parsing() -> None:
    assert accepted_codings("zstd") == {"zstd": 1.0}
    assert accepted_codings("gzip, ZSTD;q=0.5") == {"gzip": 1.0, "zstd": 0.5}
    assert accepted_codings("zstd;q=0")["zstd"] == 0.0
    assert accepted_codings("zstd;q=bogus")["zstd"] == 0.0
    assert accepted_codings(" , ") == {}
    assert accepted_codings("zstd ; Q=0.25") == {"zstd": 0.25}
    # A coding listed twice: its first entry counts, whichever way it goes.
    assert accepted_codings("zstd;q=0, zstd") == {"zstd": 0.0}
    assert accepted_codings("zstd, zstd;q=0") == {"zstd": 1.0}


@pytest.mark.parametrize(
    ("value", "wildcard", "expected"),
    [
        ("zstd", True, True),
        ("gzip, zstd;q=0.1", True, True),
        ("zstd;q=0", True, False),
        ("zstd;q=0, *", True, False),  # named: the wildcard does not reopen it
        ("*", True, True),
        ("*;q=0", True, False),
        ("gzip, *", False, False),  # a server's advertisement names its codings
        ("", True, False),
        ("gzip, br", True, False),
    ],
)
def test_accepts(value: str, wildcard: bool, expected: bool) -> None:
    assert accepts(value, "zstd", wildcard=wildcard) is expected
    assert accepts(value, "ZSTD", wildcard=wildcard) is expected


def test_header_list() -> None:
    assert header_list("zstd") == ["zstd"]
    assert header_list(" ZSTD , identity,, ") == ["zstd", "identity"]
    assert header_list("") == []


def test_the_server_teaches_the_coding_with_every_answer() -> None:
    negotiation = CodingNegotiation()
    assert negotiation.negotiated is None
    assert negotiation.upload_coding("auto") == "identity"  # nothing learnt: identity
    negotiation.learn(None)
    assert negotiation.negotiated == "identity"
    negotiation.learn("gzip, zstd")
    assert negotiation.negotiated == "zstd"
    assert negotiation.upload_coding("auto") == "zstd"
    negotiation.learn(None)  # an answer without the header forgets nothing
    assert negotiation.negotiated == "zstd"
    negotiation.learn("gzip")
    assert negotiation.negotiated == "identity"
    negotiation.learn("*")  # an advertisement names its codings: no wildcard
    assert negotiation.negotiated == "identity"


def test_a_415_ends_zstd_for_good() -> None:
    negotiation = CodingNegotiation()
    negotiation.learn("zstd")
    negotiation.refuse_zstd()
    assert negotiation.negotiated == "identity"
    negotiation.learn("zstd")  # the advertisement is not believed again
    assert negotiation.negotiated == "identity"
    for mode in coding.COMPRESSION_MODES:
        assert negotiation.upload_coding(mode) == "identity"


def test_the_compression_modes() -> None:
    fresh = CodingNegotiation()
    assert fresh.upload_coding("always") == "zstd"
    assert fresh.upload_coding("never") == "identity"
    fresh.learn("zstd")
    assert fresh.upload_coding("never") == "identity"
    assert download_coding("auto") == "zstd" and download_coding("always") == "zstd"
    assert download_coding("never") == "identity"
    for mode in coding.COMPRESSION_MODES:
        assert CodingNegotiation.check_mode(mode) == mode
    with pytest.raises(errors.ConfigurationError, match="compression"):
        CodingNegotiation.check_mode("sometimes")


def test_without_the_codec_everything_is_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(coding, "codec_available", lambda: False)
    negotiation = CodingNegotiation()
    negotiation.learn("zstd")
    assert negotiation.upload_coding("auto") == "identity"
    assert negotiation.upload_coding("always") == "identity"
    assert download_coding("auto") == "identity"
