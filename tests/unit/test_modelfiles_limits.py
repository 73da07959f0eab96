"""Budgets on the restricted reader's work and memory: hand-made pickles that would
exhaust the sidecar get ModelLimitExceededError (or ModelFormatError) quickly.

pytest-timeout guards the tests that used to run for hours (a DAG walked 2**40 times);
no test measures wall-clock time.
"""

from __future__ import annotations

import io
import struct
import zipfile
from pathlib import Path
from typing import List

import pytest
import torch
from model_factories import archive_with_pickle

from fl_sidecar import modelfiles
from fl_sidecar.devserver import modelcheck
from fl_sidecar.errors import (
    ModelError,
    ModelFormatError,
    ModelLimitExceededError,
    ModelReadCancelledError,
)
from fl_sidecar.modelfiles import torch_io
from fl_sidecar.modelfiles.limits import ReadLimits
from fl_sidecar.modelfiles.pickle_reader import restricted_loads
from fl_sidecar.modelfiles.pickle_scan import scan_pickle


def _storage_tensor(key: str = "0", numel: int = 2) -> bytes:
    """Opcodes that push one float32 tensor of ``numel`` elements viewing storage ``key``."""
    return (
        b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
        + b"X"
        + struct.pack("<I", len(key))
        + key.encode()
        + b"X\x03\x00\x00\x00cpuJ"
        + struct.pack("<i", numel)
        + b"tQK\x00J"
        + struct.pack("<i", numel)
        + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR"
    )


def _dag(depth: int, leaf: bytes) -> bytes:
    """Level 0 is ``leaf``; level k is a list holding level k-1 twice (memo GETs): the
    pickle grows linearly, a naive walk doubles with each level."""
    out = b"\x80\x02" + leaf + b"r" + struct.pack("<I", 0)
    for level in range(1, depth + 1):
        get = b"j" + struct.pack("<I", level - 1)
        out += b"]" + get + b"a" + get + b"a" + b"r" + struct.pack("<I", level)
    return out + b"."


# ---------------------------------------------------------------- shared sub-objects


@pytest.mark.timeout(60)
def test_dag_of_lists_is_walked_once_per_object() -> None:
    depth = 40
    pkl = _dag(depth, b"]")
    assert len(pkl) < 1024
    with modelfiles.open_archive(archive_with_pickle(pkl)) as opened:
        assert opened.tensors == {}
        # One step per object reached: 2 per level (both edges), not 2**40.
        assert opened.walk_steps <= 2 * depth + 2


@pytest.mark.timeout(120)
def test_dag_with_a_tensor_at_the_leaf_is_a_limit_error() -> None:
    # 2**40 names for one tensor: the name budget stops it at about 2**19.
    data = archive_with_pickle(_dag(40, _storage_tensor()), {"data/0": b"\0" * 8})
    assert len(data) < 4096
    with pytest.raises(ModelLimitExceededError, match="300000 tensors"):
        modelfiles.describe(data)
    with pytest.raises(ModelLimitExceededError):
        torch_io.read_tensors(data)


def test_small_dag_with_tensors_names_every_path() -> None:
    # Shared sub-objects still give one name per path, as state_dict() does.
    data = archive_with_pickle(_dag(3, _storage_tensor()), {"data/0": b"\0" * 8})
    with modelfiles.open_archive(data) as opened:
        assert len(opened.tensors) == 8
        assert list(opened.tensors)[:2] == ["0.0.0", "0.0.1"]
        assert len({id(ref) for ref in opened.tensors.values()}) == 1


@pytest.mark.timeout(60)
def test_walk_step_budget_is_enforced() -> None:
    data = archive_with_pickle(_dag(12, _storage_tensor()), {"data/0": b"\0" * 8})
    with pytest.raises(ModelLimitExceededError, match="walk steps"):
        modelfiles.describe(data, limits=ReadLimits(max_walk_steps=1000))
    assert len(modelfiles.describe(data).tensors) == 4096


class SharedNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 3)
        self.b = self.a  # one submodule under two names
        self.c = torch.nn.Linear(3, 3)
        self.c.weight = self.a.weight  # tied parameter


def test_tied_weights_and_a_shared_submodule_still_read(tmp_path: Path) -> None:
    net = SharedNet()
    path = tmp_path / "net.pt"
    torch.save(net, path)
    got = torch_io.read_tensors(path)
    assert list(got) == list(net.state_dict())
    assert got["a.weight"].data_ptr() == got["b.weight"].data_ptr() == got["c.weight"].data_ptr()
    assert list(modelcheck.check_module_file(path)) == list(net.state_dict())


@pytest.mark.timeout(120)
def test_dev_server_check_refuses_the_dag(tmp_path: Path) -> None:
    path = tmp_path / "dag.pt"
    path.write_bytes(archive_with_pickle(_dag(40, _storage_tensor()), {"data/0": b"\0" * 8}))
    with pytest.raises(ModelLimitExceededError):
        modelcheck.check_module_file(path)


def test_real_models_stay_far_below_the_limits() -> None:
    layer = torch.nn.TransformerEncoderLayer(64, 4, 128, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 24, enable_nested_tensor=False)
    for save in (torch.save, torch.jit.save):
        buf = io.BytesIO()
        save(encoder if save is torch.save else torch.jit.script(encoder), buf)
        data = buf.getvalue()
        pkl = zipfile.ZipFile(io.BytesIO(data)).read(
            next(n for n in zipfile.ZipFile(io.BytesIO(data)).namelist() if n.endswith("data.pkl"))
        )
        stats = scan_pickle(pkl)
        limits = ReadLimits()
        assert stats.opcodes * 50 < limits.max_pickle_opcodes
        assert stats.objects * 50 < limits.max_pickle_objects
        assert stats.max_marks * 50 < limits.max_marks
        assert stats.max_tuple_depth * 50 < limits.max_depth
        with modelfiles.open_archive(data) as opened:
            assert len(opened.tensors) == len(encoder.state_dict())
            assert opened.walk_steps * 100 < limits.max_walk_steps


# ---------------------------------------------------------------- the unpickler's own input


@pytest.mark.parametrize(
    "pkl",
    [
        pytest.param(b"\x80\x02X\xff\xff\xff\x7fabc.", id="BINUNICODE past the end"),
        pytest.param(b"\x80\x04\x8d" + struct.pack("<Q", 2**63) + b"ab.", id="BINUNICODE8 2**63"),
        pytest.param(b"\x80\x03B\xff\xff\xff\xffab.", id="BINBYTES past the end"),
        pytest.param(b"\x80\x04\x8e" + struct.pack("<Q", 2**62) + b"ab.", id="BINBYTES8 2**62"),
        pytest.param(b"\x80\x02\x8b\xff\xff\xff\x7f\x01.", id="LONG4 past the end"),
        pytest.param(b"\x80\x02j\x05\x00\x00\x00.", id="GET of a memo entry never stored"),
        pytest.param(b"\x80\x02K\x01", id="no STOP"),
        pytest.param(b"\x80\x02a.", id="stack underflow"),
        pytest.param(b"\x80\x02K\x01t.", id="TUPLE without MARK"),
        pytest.param(b"\x80\x02\xff.", id="unknown opcode"),
    ],
)
def test_malformed_pickles_are_format_errors(pkl: bytes) -> None:
    with pytest.raises(ModelFormatError, match="pickle"):
        restricted_loads(pkl)


@pytest.mark.parametrize(
    ("pkl", "limit"),
    [
        # The C unpickler would grow its memo table to 2 * 2**30 entries (16 GiB).
        pytest.param(b"\x80\x02K\x01r\x00\x00\x00\x400K\x01.", "memo entry", id="memo index"),
        pytest.param(b"\x80\x02" + b"(" * 5000 + b"N.", "MARKs", id="open MARKs"),
        pytest.param(b"\x80\x02" + b"N" * 1_100_000 + b".", "stack", id="stack size"),
        # Hashing a million-deep tuple (a dict key) overflows the C stack: a crash.
        pytest.param(
            b"\x80\x02}" + b")" + b"\x85" * 1_000_000 + b"K\x01s.", "tuples", id="deep tuple key"
        ),
        pytest.param(
            b"\x80\x04(" + b")" + b"\x85" * 100_000 + b"\x91.", "tuples", id="deep frozenset"
        ),
    ],
)
def test_pickles_that_exhaust_the_unpickler_are_limit_errors(pkl: bytes, limit: str) -> None:
    with pytest.raises(ModelLimitExceededError, match=limit):
        restricted_loads(pkl)


def test_opcode_and_storage_budgets() -> None:
    many = b"\x80\x02]" + b"K\x01a" * 2000 + b"."
    assert restricted_loads(many)[0] == [1] * 2000
    with pytest.raises(ModelLimitExceededError, match="opcodes"):
        restricted_loads(many, limits=ReadLimits(max_pickle_opcodes=1000))
    sets = b"\x80\x04]" + b"\x8fa" * 2000 + b"."  # an empty set is 216 bytes
    assert len(restricted_loads(sets)[0]) == 2000
    with pytest.raises(ModelLimitExceededError, match="containers and objects"):
        restricted_loads(sets, limits=ReadLimits(max_pickle_objects=1000))
    storages = b"\x80\x02]" + b"".join(_storage_tensor(str(i)) + b"a" for i in range(20)) + b"."
    assert len(restricted_loads(storages)[1]) == 20
    with pytest.raises(ModelLimitExceededError, match="storage references"):
        restricted_loads(storages, limits=ReadLimits(max_tensors=10))


def test_deep_lists_are_a_limit_error() -> None:
    depth = 100_000
    pkl = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    with pytest.raises(ModelLimitExceededError, match="deep"):
        torch_io.read_tensors(archive_with_pickle(pkl))


def test_limit_errors_are_model_errors() -> None:
    assert issubclass(ModelLimitExceededError, ModelFormatError)
    assert issubclass(ModelLimitExceededError, ModelError)


def test_storage_declared_beyond_its_record_is_refused() -> None:
    # A storage the pickle declares (even one no named tensor views) must be a record of
    # exactly its size: declared bytes never exceed the file's.
    pkl = b"\x80\x02]" + _storage_tensor("0", 2**30) + b"a."
    with pytest.raises(ModelFormatError, match="holds 8 bytes"):
        modelfiles.describe(archive_with_pickle(pkl, {"data/0": b"\0" * 8}))


def test_huge_tensor_sizes_are_refused() -> None:
    pkl = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\n"
        b"FloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQK\x00\x8a\x09"
        + (2**64).to_bytes(9, "little")
        + b"K\x00\x86K\x01K\x01\x86\x89ccollections\nOrderedDict\n)RtR."
    )
    with pytest.raises(ModelFormatError, match="large"):
        modelfiles.describe(archive_with_pickle(pkl, {"data/0": b"\0" * 8}))


# ---------------------------------------------------------------- cancellation


def test_should_stop_cancels_the_scan_and_the_walk() -> None:
    big = b"\x80\x02]" + b"K\x01a" * 10_000 + b"."
    calls: List[int] = []

    def stop() -> bool:
        calls.append(1)
        return True

    with pytest.raises(ModelReadCancelledError):
        restricted_loads(big, should_stop=stop)
    assert calls
    data = archive_with_pickle(_dag(14, _storage_tensor()), {"data/0": b"\0" * 8})
    seen: List[int] = []

    def stop_in_walk() -> bool:
        seen.append(1)
        return len(seen) > 1  # the scan's check passes (once); the walk's stops

    with pytest.raises(ModelReadCancelledError):
        modelfiles.describe(data, should_stop=stop_in_walk)
    never = modelfiles.describe(data, should_stop=lambda: False)
    assert len(never.tensors) == 2**14


@pytest.mark.timeout(60)
def test_torchscript_code_is_parsed_once_however_many_objects() -> None:
    # 3000 objects of one __torch__ class and a 4 MiB code file: parsing the file once
    # per object would scan 12 GB of text.
    children = 3000
    pkl = b"\x80\x02c__torch__\nC\nq\x00c__torch__\nM\nq\x01h\x01)\x81}("
    for i in range(children):
        pkl += b"X" + struct.pack("<I", len(f"c{i}")) + f"c{i}".encode() + b"h\x00)\x81}b"
    pkl += b"ub."
    code = ("# filler\n" * (4 * 1024 * 1024 // 9)) + "class M(Module):\n  pass\nclass C(Module):\n"
    data = archive_with_pickle(pkl, {"code/__torch__.py": code.encode()})
    with modelfiles.open_archive(data) as opened:
        assert opened.format is modelfiles.ModelFormat.TORCHSCRIPT
        assert opened.tensors == {}
        assert set(opened.script_classes["__torch__"]) == {"M", "C"}
