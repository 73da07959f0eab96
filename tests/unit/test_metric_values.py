"""Metric values that are not numbers: the sidecar's form fields, the dev server's reading.

The reference client posts ``str()`` of each value and the real server stores
values that are not numbers; the sidecar posts text verbatim and numbers in
their shortest round-trip form, and the dev server stores both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_sidecar import server_api
from fl_sidecar.devserver.app import DevServerApp, _HttpError
from fl_sidecar.errors import RequestRejectedError


def test_form_fields_keep_text_verbatim_and_numbers_short() -> None:
    fields = list(server_api._metric_fields({"note": "abc", "n": 1, "x": 0.1, "flag": "True"}))
    assert fields == [
        ("metric_names", "note"),
        ("metric_names", "n"),
        ("metric_names", "x"),
        ("metric_names", "flag"),
        ("metric_values", "abc"),
        ("metric_values", "1.0"),
        ("metric_values", "0.1"),
        ("metric_values", "True"),
    ]
    assert server_api._urlencode(fields[4:5]) == b"metric_values=abc"


def test_multipart_values_may_hold_quotes_and_line_breaks(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"weights")
    note = 'said "hi"\r\nthen left'
    parts = server_api._multipart_parts([("metric_values", note)], "model_file", model, "b-1")
    head = parts[0]
    assert isinstance(head, bytes)
    assert note.encode() in head
    with pytest.raises(RequestRejectedError):
        server_api._multipart_parts([("metric_values", "x--b-1")], "model_file", model, "b-1")
    with pytest.raises(RequestRejectedError):
        server_api._multipart_parts([('a"b', "x")], "model_file", model, "b-1")


def test_dev_server_stores_text_values_and_still_refuses_nan() -> None:
    parse = DevServerApp._parse_metric_values
    assert parse(["a", "b", "c", "d"], ["0.5", "1", "abc", "True"]) == [0.5, 1.0, "abc", "True"]
    with pytest.raises(_HttpError, match="finite"):
        parse(["a"], ["nan"])
    with pytest.raises(_HttpError, match="metric_values"):
        parse(["a", "b"], ["1"])
