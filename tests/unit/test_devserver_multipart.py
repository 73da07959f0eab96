"""The dev server's streaming multipart parser: round trips, chunk edges, hostile bodies."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sidecar.devserver.multipart import (
    MultipartError,
    MultipartForm,
    parse_boundary,
    parse_multipart,
)

BOUNDARY = "b0undary-XyZ"


class _Trickle(io.RawIOBase):
    """A stream that hands out at most ``step`` bytes per read, like a slow socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = io.BytesIO(data)
        self._step = step

    def read(self, size: int = -1) -> bytes:
        want = self._step if size < 0 else min(size, self._step)
        return self._data.read(want)


def _body(
    fields: List[Tuple[str, str]], files: List[Tuple[str, bytes]], boundary: str = BOUNDARY
) -> bytes:
    out = io.BytesIO()
    out.write(b"preamble to ignore\r\n")
    for name, value in fields:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, data in files:
        out.write(
            f"--{boundary}\r\nContent-Disposition: form-data; name={name}; "
            f'filename="f.pt"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\nepilogue".encode())
    return out.getvalue()


def _parse(
    data: bytes, spool: Path, step: int = 1 << 20, length: Optional[int] = -1
) -> MultipartForm:
    size = len(data) if length == -1 else length
    return parse_multipart(_Trickle(data, step), BOUNDARY, length=size, spool_dir=str(spool))  # type: ignore[arg-type]


def test_fields_and_files_round_trip(tmp_path: Path) -> None:
    payload = b"\r\n--" + BOUNDARY.encode()[:-1] + b"\r\n--not-it" + os.urandom(3000)
    data = _body(
        [("round", "3"), ("metric_names", "a"), ("metric_names", "b")], [("model_file", payload)]
    )
    for step in (1, 7, len(BOUNDARY) + 3, 4096):
        with _parse(data, tmp_path, step) as form:
            assert form.fields == {"round": ["3"], "metric_names": ["a", "b"]}
            part = form.files["model_file"][0]
            assert Path(part.path).read_bytes() == payload and part.size == len(payload)
    assert list(tmp_path.iterdir()) == []  # the form deleted its spooled file


def test_take_file_hands_over_ownership(tmp_path: Path) -> None:
    with _parse(_body([], [("model_file", b"abc")]), tmp_path) as form:
        part = form.take_file("model_file")
        assert part is not None
        assert form.take_file("model_file") is None
    assert Path(part.path).read_bytes() == b"abc"


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[: len(b) // 2],  # truncated in the middle
        lambda b: b[: b.rindex(b"--" + BOUNDARY.encode())],  # no closing boundary
        lambda b: b.replace(BOUNDARY.encode(), b"other"),  # no boundary at all
        lambda b: b.replace(b"Content-Disposition", b"Content-Dispositio\x00"),
        lambda b: b.replace(b"form-data; name=", b"attachment; name="),
        lambda b: b"",
    ],
)
def test_malformed_bodies_raise_and_leave_nothing(tmp_path: Path, mangle: object) -> None:
    data = _body([("round", "0")], [("model_file", b"x" * 10000)])
    with pytest.raises(MultipartError):
        _parse(mangle(data), tmp_path, step=333)  # type: ignore[operator]
    assert list(tmp_path.iterdir()) == []


def test_content_length_longer_than_the_body_is_an_error(tmp_path: Path) -> None:
    data = _body([("round", "0")], [])
    with pytest.raises(MultipartError, match="Content-Length"):
        _parse(data, tmp_path, length=len(data) + 10)


def test_limits(tmp_path: Path) -> None:
    big_field = _body([("round", "9" * 2000)], [])
    with pytest.raises(MultipartError, match="larger than"):
        parse_multipart(
            io.BytesIO(big_field),
            BOUNDARY,
            length=len(big_field),
            spool_dir=str(tmp_path),
            max_field_size=1000,
        )
    big_file = _body([], [("model_file", b"z" * 5000)])
    with pytest.raises(MultipartError, match="larger than"):
        parse_multipart(
            io.BytesIO(big_file),
            BOUNDARY,
            length=len(big_file),
            spool_dir=str(tmp_path),
            max_file_size=4000,
        )
    endless_header = f"--{BOUNDARY}\r\nX: {'a' * 40000}".encode()
    with pytest.raises(MultipartError):
        _parse(endless_header, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_parse_boundary() -> None:
    assert parse_boundary(f'multipart/form-data; boundary="{BOUNDARY}"') == BOUNDARY
    assert parse_boundary(f"Multipart/Form-Data;charset=utf-8; boundary={BOUNDARY}") == BOUNDARY
    for bad in (
        "application/json",
        "multipart/form-data",
        "multipart/form-data; boundary=",
        "multipart/form-data; boundary=" + "x" * 71,
        'multipart/form-data; boundary="a\x00"',
    ):
        with pytest.raises(MultipartError):
            parse_boundary(bad)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(st.text(min_size=0, max_size=50).filter(lambda t: "\r" not in t), max_size=4),
    payload=st.binary(max_size=3000),
    step=st.integers(min_value=1, max_value=600),
)
def test_round_trip_property(tmp_path: Path, values: List[str], payload: bytes, step: int) -> None:
    data = _body([(f"f{i}", v) for i, v in enumerate(values)], [("model_file", payload)])
    with _parse(data, tmp_path, step) as form:
        assert [form.first(f"f{i}") for i in range(len(values))] == values
        assert Path(form.files["model_file"][0].path).read_bytes() == payload


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(garbage=st.binary(max_size=2000), step=st.integers(min_value=1, max_value=300))
def test_garbage_never_crashes(tmp_path: Path, garbage: bytes, step: int) -> None:
    try:
        form = _parse(garbage, tmp_path, step)
    except MultipartError:
        pass
    else:
        form.close()
    assert list(tmp_path.iterdir()) == []
