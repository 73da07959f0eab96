"""The torch-free archive module against torch's own results: same tensors, same bytes."""

from __future__ import annotations

import hashlib
import io
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_factories import EvilModule, Tied, changed

from fl_sidecar import modelfiles
from fl_sidecar.errors import ModelFormatError, TensorMismatchError, UnsafePickleError
from fl_sidecar.modelfiles import convert, rewrite, torch_archive, torch_io, zipwriter

jit_load: Callable[..., Any] = torch.jit.load
jit_trace: Callable[..., Any] = torch.jit.trace


class Net(torch.nn.Module):
    """Parameters, a BatchNorm's buffers (int64 num_batches_tracked), no-bias layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)
        self.fc2 = torch.nn.Linear(3, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc2(self.bn(self.fc1(x)))
        return out


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield


def _save(obj: Any, path: Path) -> Path:
    if isinstance(obj, torch.jit.ScriptModule):
        torch.jit.save(obj, str(path))
    else:
        torch.save(obj, path)
    return path


def _raw(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


def _assert_same(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert _raw(got[name]) == _raw(want[name]), name


def _torch_rewritten(data: bytes, workdir: Path) -> bytes:
    """The archive's records written again by torch's own zip writer (the layout reference)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    prefix = src.infolist()[0].filename.split("/", 1)[0]
    # torch names the archive's folder after the file it writes.
    path = workdir / "reference" / f"{prefix}.pt"
    path.parent.mkdir(exist_ok=True)
    writer = torch._C.PyTorchFileWriter(str(path))
    for info in src.infolist():
        rel = info.filename.split("/", 1)[1]
        if rel != ".data/serialization_id":
            body = src.read(info)
            writer.write_record(rel, body, len(body))
    writer.write_end_of_file()
    del writer
    return path.read_bytes()


def _without_serialization_id(data: bytes) -> List[Tuple[str, int, bytes]]:
    """(name, data offset, bytes) of every record but the serialization id."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    out = []
    for info in zf.infolist():
        if info.filename.endswith("/.data/serialization_id"):
            continue
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        out.append((info.filename, info.header_offset + 30 + name_len + extra_len, zf.read(info)))
    return out


# ---------------------------------------------------------------- the models covered


def _module(dtype: torch.dtype) -> torch.nn.Module:
    return Net().to(dtype) if dtype.is_floating_point else Net()


def _int64_state() -> Dict[str, torch.Tensor]:
    return {"ids": torch.arange(12).reshape(3, 4), "count": torch.tensor(7)}


CASES: Dict[str, Callable[[], Any]] = {
    "module-fp32": lambda: _module(torch.float32),
    "module-bf16": lambda: _module(torch.bfloat16),
    "module-fp16": lambda: _module(torch.float16),
    "tied-module": Tied,
    "scripted": lambda: torch.jit.script(Net()),
    "scripted-tied": lambda: torch.jit.script(Tied()),
    "traced": lambda: jit_trace(Net().eval(), torch.randn(2, 4)),
    "state-dict": lambda: Net().state_dict(),
    "state-dict-int64": _int64_state,
}


def _reference_state(obj: Any) -> Dict[str, torch.Tensor]:
    return dict(obj.state_dict()) if isinstance(obj, torch.nn.Module) else dict(obj)


def _load(path: Path, scripted: bool, **kwargs: Any) -> Any:
    if scripted:
        return jit_load(str(path))
    return torch.load(path, weights_only=False, **kwargs)


@pytest.mark.parametrize("case", list(CASES))
def test_describe_matches_what_torch_loads(case: str, tmp_path: Path) -> None:
    obj = CASES[case]()
    src = _save(obj, tmp_path / "m.pt")
    scripted = isinstance(obj, torch.jit.ScriptModule)
    info = modelfiles.describe(src)
    assert info.format is (
        modelfiles.ModelFormat.TORCHSCRIPT if scripted else modelfiles.ModelFormat.TORCH_PICKLE
    )
    assert modelfiles.detect_format(src) is info.format
    assert info.is_module is isinstance(obj, torch.nn.Module)
    assert not info.big_endian
    loaded = _reference_state(_load(src, scripted))
    assert list(info.tensors) == list(loaded)
    assert modelfiles.list_tensors(src) == info.tensors
    for name, tensor in loaded.items():
        spec = info.tensors[name]
        assert spec.dtype == str(tensor.dtype).replace("torch.", "")
        assert spec.shape == tuple(tensor.shape)
        assert spec.stride == tuple(tensor.stride())
        assert spec.storage_offset == tensor.storage_offset()
        assert spec.nbytes == tensor.numel() * tensor.element_size()
    if case == "tied-module":
        assert info.tensors["emb.weight"].storage_key == info.tensors["head.weight"].storage_key
    # The torch-typed face gives the same facts.
    assert {n: (s.shape, s.dtype) for n, s in torch_io.describe(src).tensors.items()} == {
        n: (t.shape, t.dtype) for n, t in loaded.items()
    }


@pytest.mark.parametrize("case", list(CASES))
def test_archive_to_safetensors_is_the_torch_result(case: str, tmp_path: Path) -> None:
    obj = CASES[case]()
    src = _save(obj, tmp_path / "m.pt")
    dst = tmp_path / "m.safetensors"
    modelfiles.archive_to_safetensors(src, dst)
    reference = _reference_state(_load(src, isinstance(obj, torch.jit.ScriptModule)))
    # Byte for byte what the torch path writes from the tensors torch itself loads...
    assert dst.read_bytes() == torch_io.to_safetensors(reference)
    # ...and the safetensors library reads the values back.
    _assert_same(
        {n: t for n, t in safetensors.torch.load_file(str(dst)).items() if n in reference},
        {n: reference[n] for n in safetensors.torch.load_file(str(dst))},
    )
    assert set(safetensors.torch.load_file(str(dst))) == set(reference)
    assert not list(tmp_path.glob(".fl-sidecar-*"))


@pytest.mark.parametrize("case", list(CASES))
def test_safetensors_into_archive_loads_with_torch(case: str, tmp_path: Path) -> None:
    obj = CASES[case]()
    scripted = isinstance(obj, torch.jit.ScriptModule)
    template = _save(obj, tmp_path / "global.pt")
    new = changed(_reference_state(obj))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors(new))
    dest = tmp_path / "local.pt"
    written = modelfiles.safetensors_into_archive(template, weights, dest)
    data = dest.read_bytes()
    assert written == (len(data), hashlib.sha256(data).hexdigest())
    loaded = _load(dest, scripted)
    if scripted:
        assert isinstance(loaded, torch.jit.ScriptModule)
    elif isinstance(obj, torch.nn.Module):
        assert type(loaded) is type(obj)
    _assert_same(_reference_state(loaded), new)
    if not scripted:
        _assert_same(_reference_state(_load(dest, False, mmap=True)), new)
    if case == "tied-module":
        assert loaded.head.weight is loaded.emb.weight
    # torch's own writer lays the same records out at the same offsets.
    data = dest.read_bytes()
    reference = _torch_rewritten(data, tmp_path)
    assert _without_serialization_id(data) == _without_serialization_id(reference)
    assert len(data) == len(reference)
    # The untouched records are the template's, the pickle included.
    before = zipfile.ZipFile(template)
    after = zipfile.ZipFile(dest)
    for info in before.infolist():
        if "/data/" not in info.filename and not info.filename.endswith("serialization_id"):
            assert after.read(info.filename) == before.read(info), info.filename


def test_small_copy_buffer_gives_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = torch.randn(40, 24)
    state = {"w": base, "t": base.t(), "tail": base.reshape(-1)[5:], "b": torch.randn(333).half()}
    src = _save(state, tmp_path / "m.pt")
    new = changed(state)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors(dict(state, b=new["b"])))
    expected = torch_io.to_safetensors(state)
    for module in (torch_archive, convert, rewrite):  # every reader and writer of pieces
        monkeypatch.setattr(module, "CHUNK_BYTES", 48)  # many pieces, each a multiple of 16
    modelfiles.archive_to_safetensors(src, tmp_path / "out.safetensors")
    assert (tmp_path / "out.safetensors").read_bytes() == expected
    modelfiles.safetensors_into_archive(src, weights, tmp_path / "out.pt")
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(got["b"], new["b"]) and torch.equal(got["w"], base)


# ---------------------------------------------------------------- views and ties


def _views(step_start: int = 0, scalar: float = 1.5) -> Dict[str, torch.Tensor]:
    """Every way tensors share or view storage; fresh random values on each call."""
    base = torch.randn(6, 4)
    fused = torch.randn(3, 8)  # two slices of one buffer (a fused qkv, say)
    return {
        "base": base,
        "t": base.t(),
        "col": base[:, 1],
        "row": base[2],
        "tail": base.reshape(-1)[5:],
        "left": fused[:, :4],
        "right": fused[:, 4:],
        "expanded": torch.randn(3, 1).expand(3, 5),
        "step": torch.arange(step_start, step_start + 20)[::3],
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(scalar),
    }


def test_non_contiguous_views_convert_like_torch(tmp_path: Path) -> None:
    state = _views()
    src = _save(state, tmp_path / "v.pt")
    info = modelfiles.describe(src)
    assert not info.tensors["t"].is_contiguous and info.tensors["tail"].is_contiguous
    dst = tmp_path / "v.safetensors"
    modelfiles.archive_to_safetensors(src, dst)
    assert dst.read_bytes() == torch_io.to_safetensors(state)
    loaded = safetensors.torch.load_file(str(dst))
    for name, value in state.items():
        assert torch.equal(loaded[name], value), name


def test_views_take_consistent_new_values(tmp_path: Path) -> None:
    state = _views()
    src = _save(state, tmp_path / "v.pt")
    new = _views(step_start=100, scalar=-2.0)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors(new))
    dest = tmp_path / "out.pt"
    modelfiles.safetensors_into_archive(src, weights, dest)
    loaded = torch.load(dest, weights_only=True)
    for name, value in new.items():
        assert torch.equal(loaded[name], value), name
    assert loaded["t"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()


@pytest.mark.parametrize("which", ["t", "tail", "expanded"])
def test_shared_memory_with_disagreeing_values_is_refused(which: str, tmp_path: Path) -> None:
    state = _views()
    src = _save(state, tmp_path / "v.pt")
    new = {n: v.clone() for n, v in state.items()}
    if which == "expanded":
        new["expanded"] = torch.randn(3, 5)  # one stored element, five different values
    else:
        new[which] = new[which] + 1
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors(new))
    dest = tmp_path / "out.pt"
    with pytest.raises(TensorMismatchError, match="shares memory"):
        modelfiles.safetensors_into_archive(src, weights, dest)
    assert not dest.exists()
    assert not list(tmp_path.glob(".fl-sidecar-*"))


def test_tied_weights_become_two_entries_and_must_agree(tmp_path: Path) -> None:
    model = Tied()
    src = _save(model, tmp_path / "t.pt")
    dst = tmp_path / "t.safetensors"
    modelfiles.archive_to_safetensors(src, dst)
    header, _ = modelfiles.read_safetensors_header(dst)
    assert header["emb.weight"].begin != header["head.weight"].begin  # copies, as the library
    new = changed(dict(model.state_dict()))
    new["head.weight"] = new["head.weight"].clone()
    new["head.weight"][0, 0] += 1
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors(new))
    with pytest.raises(TensorMismatchError, match="tied"):
        modelfiles.safetensors_into_archive(src, weights, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_names_shapes_dtypes_are_checked(tmp_path: Path) -> None:
    model = Net()
    src = _save(model, tmp_path / "n.pt")
    good = dict(model.state_dict())
    bad_cases = [
        {k: v for k, v in good.items() if k != "fc1.bias"},
        dict(good, extra=torch.ones(1)),
        dict(good, **{"fc1.bias": torch.ones(4)}),
        dict(good, **{"fc1.bias": torch.ones(3, dtype=torch.float64)}),
    ]
    for case in bad_cases:
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(torch_io.to_safetensors(case))
        with pytest.raises(TensorMismatchError):
            modelfiles.safetensors_into_archive(src, weights, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()


def test_complex128_has_no_safetensors_name(tmp_path: Path) -> None:
    src = _save({"c": torch.ones(2, dtype=torch.complex128)}, tmp_path / "c.pt")
    with pytest.raises(TensorMismatchError, match="safetensors"):
        modelfiles.archive_to_safetensors(src, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


# ---------------------------------------------------------------- other archives


def _as_big_endian(data: bytes) -> bytes:
    """The same archive as a big-endian machine writes it (numbers swapped per part)."""
    src = zipfile.ZipFile(io.BytesIO(data))
    units = {}
    for spec in modelfiles.describe(data).tensors.values():
        probe = torch.empty(0, dtype=getattr(torch, spec.dtype))
        units[spec.storage_key] = probe.element_size() // (2 if probe.is_complex() else 1)
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    for info in src.infolist():
        rel = info.filename.split("/", 1)[1]
        body = src.read(info)
        if rel == "byteorder":
            body = b"big"
        elif rel.startswith("data/"):
            unit = units[rel[len("data/") :]]
            swapped = torch.frombuffer(bytearray(body), dtype=torch.uint8).view(-1, unit).flip(1)
            body = swapped.contiguous().numpy().tobytes()
        if rel != ".data/serialization_id":
            writer.write_record(rel, body, len(body))
    writer.write_end_of_file()
    return out.getvalue()


def test_big_endian_archive_converts_both_ways(tmp_path: Path) -> None:
    state = {
        "a": torch.randn(3, 2),
        "h": torch.randn(5).half(),
        "i": torch.arange(4),
        "c": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
    }
    big = tmp_path / "big.pt"
    big.write_bytes(_as_big_endian(_buffer(state)))
    assert modelfiles.describe(big).big_endian
    _assert_same(dict(torch.load(big, weights_only=True)), state)  # torch agrees
    dst = tmp_path / "big.safetensors"
    modelfiles.archive_to_safetensors(big, dst)
    assert dst.read_bytes() == torch_io.to_safetensors(state)
    _assert_same(torch_io.read_tensors(big), state)
    new = changed(state)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors(new))
    dest = tmp_path / "out.pt"
    modelfiles.safetensors_into_archive(big, weights, dest)
    assert zipfile.ZipFile(dest).read("archive/byteorder") == b"big"
    _assert_same(dict(torch.load(dest, weights_only=True)), new)


def _buffer(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def test_deflated_renamed_archive_converts(tmp_path: Path) -> None:
    base = torch.randn(5, 4)
    state = {"w": base, "tail": base.reshape(-1)[3:], "t": base.t(), "i": torch.arange(7)}
    src = zipfile.ZipFile(io.BytesIO(_buffer(state)))
    deflated = tmp_path / "d.pt"
    with zipfile.ZipFile(deflated, "w", compression=zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            out.writestr("model/" + info.filename.split("/", 1)[1], src.read(info))
    dst = tmp_path / "d.safetensors"
    modelfiles.archive_to_safetensors(deflated, dst)
    assert dst.read_bytes() == torch_io.to_safetensors(state)
    new = {"w": base + 1, "tail": (base + 1).reshape(-1)[3:], "t": (base + 1).t(), "i": state["i"]}
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors(new))
    dest = tmp_path / "out.pt"
    modelfiles.safetensors_into_archive(deflated, weights, dest)
    got = torch.load(dest, weights_only=True)
    assert all(torch.equal(got[n], v) for n, v in new.items())
    assert zipfile.ZipFile(dest).namelist()[0].startswith("model/")


def test_zip64_records_load_with_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Records past 4 GiB take zip64 fields; a lowered limit takes that path with small data.
    model = Net()
    template = _save(model, tmp_path / "n.pt")
    new = changed(dict(model.state_dict()))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors(new))
    monkeypatch.setattr(zipwriter, "_ZIP32_LIMIT", 40)
    dest = tmp_path / "out.pt"
    modelfiles.safetensors_into_archive(template, weights, dest)
    assert any(i.file_size >= 40 and i.extra for i in zipfile.ZipFile(dest).infolist())
    _assert_same(dict(torch.load(dest, weights_only=False).state_dict()), new)
    _assert_same(dict(torch.load(dest, weights_only=False, mmap=True).state_dict()), new)
    monkeypatch.undo()
    _assert_same(torch_io.read_tensors(dest), new)


def test_safetensors_header_reader_matches_the_library(tmp_path: Path) -> None:
    state = {"w": torch.randn(3, 4), "h": torch.randn(2).half(), "i": torch.arange(3)}
    path = tmp_path / "lib.safetensors"
    safetensors.torch.save_file(state, str(path))
    header, start = modelfiles.read_safetensors_header(path)
    data = path.read_bytes()
    for name, value in state.items():
        entry = header[name]
        assert entry.dtype == str(value.dtype).replace("torch.", "")
        assert entry.shape == tuple(value.shape)
        assert data[start + entry.begin : start + entry.end] == _raw(value)


# ---------------------------------------------------------------- hostile inputs


def test_code_running_pickle_is_refused_by_every_entry_point(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    src = _save(EvilModule(f"touch {marker}"), tmp_path / "evil.pt")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors({"fc.weight": torch.ones(2, 2)}))
    assert modelfiles.detect_format(src) is modelfiles.ModelFormat.TORCH_PICKLE  # no pickle read
    with pytest.raises(UnsafePickleError):
        modelfiles.describe(src)
    with pytest.raises(UnsafePickleError):
        modelfiles.archive_to_safetensors(src, tmp_path / "out.safetensors")
    with pytest.raises(UnsafePickleError):
        modelfiles.safetensors_into_archive(src, weights, tmp_path / "out.pt")
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pt", "w.safetensors"]


def test_malformed_inputs_are_format_errors(tmp_path: Path) -> None:
    good = _buffer({"w": torch.arange(6.0)})
    cases = {
        "junk": b"hello world",
        "truncated": good[: len(good) // 2],
        "tail-cut": good[:-1],
        "no-pickle": _zip({"archive/data/0": b"\0" * 8}),
        "short-storage": _patched_storage(good, b"\0" * 20),
    }
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors({"w": torch.zeros(6)}))
    for name, data in cases.items():
        src = tmp_path / f"{name}.pt"
        src.write_bytes(data)
        with pytest.raises(ModelFormatError):
            modelfiles.describe(src)
        with pytest.raises(ModelFormatError):
            modelfiles.archive_to_safetensors(src, tmp_path / "out.safetensors")
        with pytest.raises(ModelFormatError):
            modelfiles.safetensors_into_archive(src, weights, tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    assert not (tmp_path / "out.safetensors").exists()
    for garbage in (b"", b"\x00" * 8 + b"{}", b"not safetensors at all"):
        weights.write_bytes(garbage)
        with pytest.raises(ModelFormatError):
            modelfiles.read_safetensors_header(weights)
        src = tmp_path / "good.pt"
        src.write_bytes(good)
        with pytest.raises(ModelFormatError):
            modelfiles.safetensors_into_archive(src, weights, tmp_path / "out.pt")


def test_storage_claiming_more_than_the_file_is_refused(tmp_path: Path) -> None:
    # The directory says 1 GiB stored; the file is tiny: refused before any allocation.
    pkl_state = _buffer({"w": torch.zeros(2**28)})
    zf = zipfile.ZipFile(io.BytesIO(pkl_state))
    pkl = zf.read("archive/data.pkl")
    lying = _zip({"archive/data.pkl": pkl, "archive/data/0": b"\0" * 8})
    lying = _patch_sizes(lying, "archive/data/0", 2**30)
    src = tmp_path / "lying.pt"
    src.write_bytes(lying)
    # The record would overlap the directory: refused while the layout is checked.
    with pytest.raises(ModelFormatError, match="overlaps"):
        modelfiles.archive_to_safetensors(src, tmp_path / "out.safetensors")


@pytest.mark.parametrize("kind", ["expanded", "many-names"])
def test_data_far_beyond_the_storages_is_refused(kind: str, tmp_path: Path) -> None:
    # A few bytes of archive must not become terabytes of safetensors on the disk.
    if kind == "expanded":
        state = {"w": torch.zeros(1).expand(2**40)}  # torch saves one element
    else:
        base = torch.zeros(2**20)  # 4 MiB, named 100 times: 400 MiB > 8 x 4 + 256 MiB
        state = {f"t{i}": base for i in range(100)}
    src = _save(state, tmp_path / "m.pt")
    assert src.stat().st_size < 8 * 2**20
    with pytest.raises(ModelFormatError, match="refused"):
        modelfiles.archive_to_safetensors(src, tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    # Modest expansion, as real models have (tied embeddings), converts.
    ok = _save({"a": torch.ones(4), "b": torch.ones(1).expand(1000)}, tmp_path / "ok.pt")
    modelfiles.archive_to_safetensors(ok, tmp_path / "ok.safetensors")
    assert torch.equal(
        safetensors.torch.load_file(str(tmp_path / "ok.safetensors"))["b"], torch.ones(1000)
    )


def _zip(records: Dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in records.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _patched_storage(data: bytes, body: bytes) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(data))
    return _zip(
        {
            i.filename: (body if i.filename == "archive/data/0" else src.read(i))
            for i in src.infolist()
        }
    )


def _patch_sizes(data: bytes, name: str, size: int) -> bytes:
    """Sets both sizes of ``name`` in the central directory and its local header (a
    stored record that lies consistently)."""
    out = bytearray(data)
    pos = out.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", out, pos + 28)[0]
        if out[pos + 46 : pos + 46 + name_len].decode() == name:
            struct.pack_into("<II", out, pos + 20, size, size)
            local = struct.unpack_from("<I", out, pos + 42)[0]
            struct.pack_into("<II", out, local + 18, size, size)
            return bytes(out)
        pos = out.find(b"PK\x01\x02", pos + 4)
    raise AssertionError(f"{name} not found")


_TEMPLATE = _buffer({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2).half()})
_TEMPLATE_PKL = zipfile.ZipFile(io.BytesIO(_TEMPLATE)).read("archive/data.pkl")


@settings(max_examples=60, deadline=None)
@given(
    flips=st.lists(
        st.tuples(st.integers(0, len(_TEMPLATE_PKL) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    ),
)
def test_property_mutated_pickles_convert_or_fail_typed(flips: List[Tuple[int, int]]) -> None:
    pkl = bytearray(_TEMPLATE_PKL)
    for pos, value in flips:
        pkl[pos] = value
    src = zipfile.ZipFile(io.BytesIO(_TEMPLATE))
    records = {i.filename: src.read(i) for i in src.infolist()}
    records["archive/data.pkl"] = bytes(pkl)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.pt"
        path.write_bytes(_zip(records))
        dst = Path(tmp) / "m.safetensors"
        # Either a typed error with a message, or valid safetensors: never another exception.
        try:
            modelfiles.archive_to_safetensors(path, dst)
        except (ModelFormatError, UnsafePickleError, TensorMismatchError) as exc:
            assert str(exc)
            assert not dst.exists()
        else:
            header, _ = modelfiles.read_safetensors_header(dst)
            assert set(header) == set(modelfiles.list_tensors(path))


_VIEW_KINDS = ["whole", "tail", "transpose", "row", "column", "step", "expand"]
_PROPERTY_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8]


def _view(base: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "tail":
        return base.reshape(-1)[1:]
    if kind == "transpose":
        return base.t()
    if kind == "row":
        return base[1]
    if kind == "column":
        return base[:, 1]
    if kind == "step":
        return base.reshape(-1)[::2]
    if kind == "expand":
        return base[:1, :1].expand(3, 4)
    return base


@settings(max_examples=40, deadline=None)
@given(
    entries=st.lists(
        st.tuples(
            st.sampled_from(range(len(_PROPERTY_DTYPES))),
            st.integers(2, 5),
            st.integers(2, 5),
            st.lists(st.sampled_from(_VIEW_KINDS), min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=3,
    ),
    seed=st.integers(0, 1000),
)
def test_property_views_convert_like_torch_both_ways(
    entries: List[Tuple[int, int, int, List[str]]], seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    state: Dict[str, torch.Tensor] = {}
    for i, (dtype_index, rows, cols, kinds) in enumerate(entries):
        dtype = _PROPERTY_DTYPES[dtype_index]
        base = (torch.randn(rows, cols, generator=gen) * 50).to(dtype)
        for j, kind in enumerate(kinds):
            state[f"s{i}.v{j}"] = _view(base, kind)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "m.pt"
        torch.save(state, src)
        dst = Path(tmp) / "m.safetensors"
        modelfiles.archive_to_safetensors(src, dst)
        assert dst.read_bytes() == torch_io.to_safetensors(state)
        # Back in, with the same values (consistent by construction): the same tensors.
        out = Path(tmp) / "out.pt"
        modelfiles.safetensors_into_archive(src, dst, out)
        loaded = torch.load(out, weights_only=True)
        for name, value in state.items():
            assert _raw(loaded[name]) == _raw(value), name
