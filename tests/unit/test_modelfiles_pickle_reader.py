"""The restricted reader never runs a pickle, and malformed archives get typed errors."""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_factories import Evil, EvilModule, archive_with_pickle

from fl_sidecar import modelfiles
from fl_sidecar.errors import ModelFormatError, UnsafePickleError
from fl_sidecar.modelfiles import torch_io
from fl_sidecar.modelfiles.pickle_reader import restricted_loads


def _replace_record(archive: bytes, rel: str, data: bytes) -> bytes:
    """A copy of a torch archive with one record replaced (or removed when data is b"")."""
    src = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for info in src.infolist():
        name = info.filename.split("/", 1)[1]
        if name == ".data/serialization_id":
            continue
        body = data if name == rel else src.read(info)
        if name == rel and not data:
            continue
        writer.write_record(name, body, len(body))
    writer.write_end_of_file()
    return out.getvalue()


def _plain_archive() -> bytes:
    buf = io.BytesIO()
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, buf)
    return buf.getvalue()


# ---------------------------------------------------------------- code-running pickles


def test_reduce_to_os_system_in_torch_save_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    torch.save({"weights": torch.ones(2), "x": Evil(f"touch {marker}")}, buf)
    with pytest.raises(UnsafePickleError):
        torch_io.read_tensors(buf.getvalue())
    assert not marker.exists()


def test_evil_attribute_of_a_pickled_module_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    buf = io.BytesIO()
    torch.save(EvilModule(f"touch {marker}"), buf)
    path = tmp_path / "model.pt"
    path.write_bytes(buf.getvalue())
    for reader in (torch_io.read_tensors, torch_io.describe, torch_io.list_tensors):
        with pytest.raises(UnsafePickleError):
            reader(path)
    with pytest.raises(UnsafePickleError):
        torch_io.write_tensors(path, {"fc.weight": torch.zeros(2, 2), "fc.bias": torch.zeros(2)})
    with pytest.raises(UnsafePickleError):
        modelfiles.archive_to_safetensors(path, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    # Sanity check of the test itself: a plain unpickler would have run it.
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert marker.exists()


def _proto0(module: str, name: str, arg: str) -> bytes:
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


HOSTILE: Dict[str, Callable[[Path], bytes]] = {
    "builtins.eval": lambda m: _proto0("builtins", "eval", f"open({str(m)!r}, 'w')"),
    "__builtin__.eval": lambda m: _proto0("__builtin__", "eval", f"open({str(m)!r}, 'w')"),
    "builtins.exec": lambda m: _proto0("builtins", "exec", f"open({str(m)!r}, 'w')"),
    "os.system": lambda m: _proto0("os", "system", f"touch {m}"),
    "posix.system": lambda m: _proto0("posix", "system", f"touch {m}"),
    "nt.system": lambda m: _proto0("nt", "system", f"touch {m}"),
    "subprocess.call": lambda m: _proto0("subprocess", "call", f"touch {m}"),
    "subprocess.Popen": lambda m: _proto0("subprocess", "Popen", f"touch {m}"),
    "torch.load": lambda m: _proto0("torch", "load", str(m)),
    "torch.hub.load": lambda m: _proto0("torch.hub", "load", str(m)),
    "unknown class called": lambda m: _proto0("__main__", "Net", str(m)),
    # getattr(__import__('os'), 'system')('touch M') in protocol 0
    "getattr chain": lambda m: (
        b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V"
        + f"touch {m}".encode()
        + b"\ntR."
    ),
    # dotted attribute path in a protocol 4 STACK_GLOBAL
    "dotted name": lambda m: (
        pickle.dumps(0, protocol=4)[:2]
        + b"\x8c\x05torch\x94\x8c\x10serialization.os\x94\x93"
        + b"\x8c\x06system\x94\x86\x94."
    ),
    "stack_global os.system": lambda m: (
        b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93"
        + b"\x8c"
        + bytes([len(f"touch {m}")])
        + f"touch {m}".encode()
        + b"\x85R."
    ),
    "INST with arguments": lambda m: f"(V{m}\ni__main__\nNet\n.".encode(),
    "copyreg __newobj__": lambda m: b"ccopy_reg\n__newobj__\n(c__main__\nNet\ntR.",
    "copyreg reconstructor on another base": lambda m: (
        b"ccopy_reg\n_reconstructor\n(c__main__\nNet\nc__main__\nBase\nNtR."
    ),
    "copyreg reconstructor with state": lambda m: (
        b"ccopy_reg\n_reconstructor\n(c__main__\nNet\nc__builtin__\nobject\n(V"
        + str(m).encode()
        + b"\nttR."
    ),
    "_rebuild_from_type_v2 with a foreign function": lambda m: (
        b"ctorch._tensor\n_rebuild_from_type_v2\n(cos\nsystem\n"
        b"ctorch\nTensor\n(V" + f"touch {m}".encode() + b"\nt(dtR."
    ),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hand_crafted_pickles_are_refused(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    pkl = HOSTILE[kind](marker)
    with pytest.raises(UnsafePickleError):
        restricted_loads(pkl)
    with pytest.raises(UnsafePickleError):
        torch_io.read_tensors(archive_with_pickle(pkl))
    assert not marker.exists()


def test_plain_pickle_would_run_the_hand_crafted_payload(tmp_path: Path) -> None:
    # The hostile pickles are real: a plain unpickler runs them.
    marker = tmp_path / "MARKER"
    pickle.loads(HOSTILE["os.system"](marker))
    assert marker.exists()


def test_unknown_classes_become_inert_placeholders() -> None:
    # NEWOBJ + BUILD of an unknown class, as torch.save writes modules, runs nothing.
    pkl = b"\x80\x02c__main__\nNet\nq\x00)\x81}X\x01\x00\x00\x00aK\x01sb."
    root, storages = restricted_loads(pkl)
    assert type(root).__name__ == "Net"
    assert root.qualified_name == "__main__.Net"
    assert root.state_dict_view() == {"a": 1}
    assert storages == {}


def test_pickle_cannot_change_the_allowed_functions() -> None:
    # BUILD with slot state would setattr on a plain function (its __defaults__, say),
    # changing it for every later archive.
    pkl = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x0c\x00\x00\x00__defaults__(K\x01ts\x86b."
    )
    with pytest.raises(UnsafePickleError):
        restricted_loads(pkl)
    for builder in (b"ctorch\nSize\n", b"ccollections\nOrderedDict\n", b"c__main__\nNet\n"):
        with pytest.raises((UnsafePickleError, ModelFormatError)):
            restricted_loads(b"\x80\x02" + builder + b"}X\x01\x00\x00\x00aK\x01sb.")
    # ...and reading a normal archive afterwards still works.
    assert torch.equal(torch_io.read_tensors(_plain_archive())["w"], torch.arange(6.0).view(2, 3))


def test_placeholder_class_cannot_be_called() -> None:
    pkl = b"\x80\x02c__main__\nNet\nq\x00)\x81."
    root, _ = restricted_loads(pkl)
    with pytest.raises(UnsafePickleError):
        type(root)()


def test_deep_nesting_is_a_format_error_not_a_crash() -> None:
    depth = 100_000
    pkl = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    with pytest.raises(ModelFormatError, match="deep"):
        torch_io.read_tensors(archive_with_pickle(pkl))


def test_self_containing_structure_is_a_format_error() -> None:
    # a list that contains itself: l = []; l.append(l)
    pkl = b"\x80\x02]q\x00h\x00a."
    with pytest.raises(ModelFormatError, match="itself"):
        torch_io.read_tensors(archive_with_pickle(pkl))


# ---------------------------------------------------------------- malformed input


def _module_archive() -> bytes:
    buf = io.BytesIO()
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)), buf)
    return buf.getvalue()


_TEMPLATE = _module_archive()
_TEMPLATE_PKL = zipfile.ZipFile(io.BytesIO(_TEMPLATE)).read("archive/data.pkl")


@settings(max_examples=60, deadline=None)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(_TEMPLATE_PKL) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    cut=st.integers(1, len(_TEMPLATE_PKL)),
)
def test_property_mutated_pickles_fail_typed_or_read(
    flips: List[Tuple[int, int]], cut: int
) -> None:
    pkl = bytearray(_TEMPLATE_PKL)
    for pos, value in flips:
        pkl[pos] = value
    archive = _replace_record(_TEMPLATE, "data.pkl", bytes(pkl[:cut]))
    # Either a typed error with a message, or tensors: never another exception or a crash.
    try:
        got = torch_io.read_tensors(archive)
    except (ModelFormatError, UnsafePickleError) as exc:
        assert str(exc)
    else:
        assert all(isinstance(v, torch.Tensor) for v in got.values())


def test_not_a_model_is_a_format_error(tmp_path: Path) -> None:
    for data in (b"", b"hello world", os.urandom(1000), b"PK\x03\x04garbage"):
        with pytest.raises(ModelFormatError):
            torch_io.read_tensors(data)
        with pytest.raises(ModelFormatError):
            modelfiles.detect_format(data)
        path = tmp_path / "junk"
        path.write_bytes(data)
        with pytest.raises(ModelFormatError):
            torch_io.read_tensors(path)


def test_truncated_archive_is_a_format_error() -> None:
    data = _plain_archive()
    for cut in (10, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1):
        with pytest.raises(ModelFormatError):
            torch_io.read_tensors(data[:cut])


def test_zip_without_data_pkl_is_a_format_error() -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/other.pkl", b"\x80\x02}.")
        zf.writestr("archive/data/0", b"\0" * 8)
    with pytest.raises(ModelFormatError, match=r"data\.pkl"):
        torch_io.read_tensors(buf.getvalue())
    with pytest.raises(ModelFormatError):
        modelfiles.detect_format(buf.getvalue())


def test_legacy_torch_format_is_a_format_error() -> None:
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf, _use_new_zipfile_serialization=False)
    with pytest.raises(ModelFormatError, match="legacy"):
        modelfiles.detect_format(buf.getvalue())
    with pytest.raises(ModelFormatError):
        torch_io.read_tensors(buf.getvalue())


def test_missing_or_wrong_sized_storage_is_a_format_error() -> None:
    data = _plain_archive()
    with pytest.raises(ModelFormatError, match="missing"):
        torch_io.read_tensors(_replace_record(data, "data/0", b""))
    with pytest.raises(ModelFormatError, match="bytes"):
        torch_io.read_tensors(_replace_record(data, "data/0", b"\0" * 20))


def test_truncated_pickle_is_a_format_error() -> None:
    data = _plain_archive()
    pkl = zipfile.ZipFile(io.BytesIO(data)).read("archive/data.pkl")
    with pytest.raises(ModelFormatError):
        torch_io.read_tensors(_replace_record(data, "data.pkl", pkl[: len(pkl) // 2]))


def test_tensor_past_its_storage_is_a_format_error() -> None:
    # size (4,) of a 2-element storage: torch would read out of bounds.
    pkl = (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQ"
        b"K\x00K\x04\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs."
    )
    archive = archive_with_pickle(pkl, extra={"data/0": b"\0" * 8})
    with pytest.raises(ModelFormatError, match="past the end"):
        torch_io.read_tensors(archive)
    # The same with size (2,) is fine: the crafted pickle is otherwise valid.
    ok = archive_with_pickle(pkl.replace(b"K\x04\x85", b"K\x02\x85"), extra={"data/0": b"\0" * 8})
    assert torch.equal(torch_io.read_tensors(ok)["w"], torch.zeros(2))


def _patch_declared_size(archive: bytes, name: str, size: int) -> bytes:
    """The archive with ``name``'s uncompressed size changed, in its local header and in
    the central directory alike (so that only the size itself is implausible)."""
    data = bytearray(archive)
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        if data[pos + 46 : pos + 46 + name_len].decode() == name:
            struct.pack_into("<I", data, pos + 24, size)
            local = struct.unpack_from("<I", data, pos + 42)[0]
            struct.pack_into("<I", data, local + 22, size)
            return bytes(data)
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(f"{name} not found")


def test_zip_bomb_storage_is_refused() -> None:
    # A deflated record that claims 256 MiB from a few bytes: beyond deflate's ratio.
    numel = 2**26
    pkl = (
        b"\x80\x02}X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n("
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ"
        + struct.pack("<i", numel)
        + b"tQK\x00J"
        + struct.pack("<i", numel)
        + b"\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtRs."
    )
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/data/0", b"\0" * 4096)
    bomb = _patch_declared_size(buf.getvalue(), "archive/data/0", numel * 4)
    with pytest.raises(ModelFormatError, match="implausible"):
        torch_io.read_tensors(bomb)
    # Sanity check: with an honest size, the only complaint is the size mismatch.
    with pytest.raises(ModelFormatError, match="expected"):
        torch_io.read_tensors(buf.getvalue())


def test_invalid_storage_key_is_refused() -> None:
    pkl = (
        b"\x80\x02(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x05\x00\x00\x00../..X\x03"
        b"\x00\x00\x00cpuK\x02tQ."
    )
    with pytest.raises(ModelFormatError, match="key"):
        restricted_loads(pkl)


def test_safetensors_garbage_is_a_format_error(tmp_path: Path) -> None:
    good = torch_io.to_safetensors({"a": torch.ones(3)})
    bad_cases = [
        b"",
        good[:7],
        struct.pack("<Q", 10**12) + good[8:],
        struct.pack("<Q", 4) + b"[1] " + b"\0" * 8,
        good[:-1],
    ]
    for data in bad_cases:
        with pytest.raises(ModelFormatError):
            torch_io.from_safetensors(data)
    lying = good.replace(b'"shape":[3]', b'"shape":[9]')
    with pytest.raises(ModelFormatError):
        torch_io.from_safetensors(lying)


_GOOD_SAFETENSORS = torch_io.to_safetensors(
    {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
)


@settings(max_examples=60, deadline=None)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(_GOOD_SAFETENSORS) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
    cut=st.integers(0, len(_GOOD_SAFETENSORS)),
)
def test_property_mutated_safetensors_fail_typed_or_read(
    flips: List[Tuple[int, int]], cut: int
) -> None:
    data = bytearray(_GOOD_SAFETENSORS)
    for pos, value in flips:
        data[pos] = value
    try:
        got = torch_io.from_safetensors(bytes(data[:cut]))
    except ModelFormatError as exc:
        assert str(exc)
    else:
        assert all(isinstance(v, torch.Tensor) for v in got.values())


def test_safetensors_given_as_an_archive_says_so() -> None:
    with pytest.raises(ModelFormatError, match="safetensors"):
        torch_io.read_tensors(torch_io.to_safetensors({"a": torch.ones(2)}))


def test_load_trusted_refuses_what_is_not_a_torch_archive() -> None:
    with pytest.raises(ModelFormatError):
        torch_io.load_trusted(b"not a model")
    with pytest.raises(ModelFormatError):
        torch_io.load_trusted(torch_io.to_safetensors({"a": torch.ones(1)}))
