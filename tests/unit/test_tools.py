"""Unit tests of the CLI helpers in ``fl_sidecar.tools``: metric and size parsing, progress bar."""

from __future__ import annotations

import argparse
import io

import pytest

from fl_sidecar.tools import ProgressBar, _size, parse_metric


def test_parse_metric() -> None:
    assert parse_metric("accuracy=0.93") == ("accuracy", 0.93)
    for bad in ("accuracy", "=1", "loss=abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_metric(bad)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", 1048576), ("4MiB", 4 * 1024**2), ("1G", 1024**3), ("512k", 512 * 1024)],
)
def test_size_parsing(text: str, expected: int) -> None:
    assert _size(text) == expected


def test_size_parsing_refuses_garbage() -> None:
    for bad in ("lots", "4XB", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            _size(bad)


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal() -> None:
    quiet = io.StringIO()
    bar = ProgressBar("download", quiet)
    bar(10, 100)
    bar.close()
    assert quiet.getvalue() == ""

    tty = _Tty()
    bar = ProgressBar("download", tty, width=10)
    bar(100, 100)
    bar.close()
    text = tty.getvalue()
    assert "[##########]" in text and "100.0%" in text and text.endswith("\n")
    unknown = _Tty()
    bar = ProgressBar("x", unknown)
    bar(2048, 0)
    assert "2.0 KiB" in unknown.getvalue()
