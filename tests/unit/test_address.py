"""Unit tests of ``fl_sidecar.address``: where the sidecar is, and nothing more, from the env."""

from __future__ import annotations

import builtins
import io
import os
import pathlib
from typing import Any, List

import pytest

from fl_sidecar import address
from fl_sidecar.errors import ConfigurationError
from fl_sidecar.trainer.client import SidecarClient


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        (
            {"FL_SIDECAR_SOCKET": "/run/s.sock", "FL_SIDECAR_LISTEN": "127.0.0.1:1"},
            "unix:/run/s.sock",
        ),
        ({"FL_SIDECAR_SOCKET": "", "FL_SIDECAR_LISTEN": "127.0.0.1:50051"}, "127.0.0.1:50051"),
        ({"FL_SIDECAR_LISTEN": "[::1]:50051"}, "[::1]:50051"),
        (
            {"FL_SIDECAR_LISTEN": "", "XDG_RUNTIME_DIR": "/run/user/7"},
            "unix:/run/user/7/fl-sidecar/sidecar.sock",
        ),
        ({}, f"unix:/tmp/fl-sidecar-{os.getuid()}/sidecar.sock"),
        ({"XDG_RUNTIME_DIR": ""}, f"unix:/tmp/fl-sidecar-{os.getuid()}/sidecar.sock"),
    ],
)
def test_the_address_comes_from_three_variables_in_order(
    environ: dict[str, str], expected: str
) -> None:
    assert address.default_target(environ) == expected


def test_a_malformed_listen_address_is_a_configuration_error() -> None:
    for bad in ("nohost", ":50051", "host:port", "host:70000"):
        with pytest.raises(ConfigurationError, match="FL_SIDECAR_LISTEN"):
            address.default_target({"FL_SIDECAR_LISTEN": bad})


def test_parse_listen() -> None:
    assert address.parse_listen("[::1]:9") == ("::1", 9)
    assert address.parse_listen("localhost:0") == ("localhost", 0)
    with pytest.raises(ValueError):
        address.parse_listen("localhost")


def test_default_socket_path_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/8")
    assert address.default_socket_path() == "/run/user/8/fl-sidecar/sidecar.sock"
    assert address.default_socket_path({}) == f"/tmp/fl-sidecar-{os.getuid()}/sidecar.sock"


@pytest.mark.parametrize("given_socket", [True, False])
def test_a_trainers_client_reads_no_sidecar_setting_and_no_secret_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, given_socket: bool
) -> None:
    # Settings of the sidecar a trainer inherits: invalid for a trainer's purposes
    # (the sidecar's log level) or secret files the trainer must never read.
    monkeypatch.setenv("FL_SIDECAR_LOG_LEVEL", "verbose")
    monkeypatch.setenv("FL_SIDECAR_TOKEN_FILE", "/nonexistent/token")
    monkeypatch.setenv("FL_DEMONSTRATOR_PASSWORD_FILE", "/nonexistent/password")
    monkeypatch.setenv("FL_SIDECAR_MAX_MODEL_SIZE", "lots")
    if given_socket:
        monkeypatch.setenv("FL_SIDECAR_SOCKET", str(tmp_path / "s.sock"))
        expected = "unix:" + str(tmp_path / "s.sock")
    else:  # the default socket
        monkeypatch.delenv("FL_SIDECAR_SOCKET", raising=False)
        monkeypatch.delenv("FL_SIDECAR_LISTEN", raising=False)
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
        expected = "unix:" + str(tmp_path / "fl-sidecar" / "sidecar.sock")
    opened: List[Any] = []
    real_open, real_io_open = builtins.open, io.open

    def recording_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(file)
        return real_open(file, *args, **kwargs)

    def recording_io_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        opened.append(file)
        return real_io_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_io_open)

    def recording_read_text(self: pathlib.Path, *args: Any, **kwargs: Any) -> str:
        opened.append(self)
        return ""

    monkeypatch.setattr(pathlib.Path, "read_text", recording_read_text)
    client = SidecarClient()
    try:
        assert client.target == expected
    finally:
        client.close()
    assert not [f for f in opened if "nonexistent" in str(f)], opened
