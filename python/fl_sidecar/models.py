"""Model I/O with torch: tensors in and out of torch archives and safetensors, FedAvg.

This is the only module of the package that imports torch; the others import it lazily.
Everything that needs no torch (format detection, describing an archive, and
archive <-> safetensors conversion of files) lives in :mod:`fl_sidecar.archive`, which
the sidecar uses so that it never imports torch; the functions of that module that are
re-exported here (:func:`detect_format`, :func:`archive_to_safetensors`,
:func:`safetensors_into_archive`) are the same objects.

The FL server stores models as pickled ``nn.Module``s (``torch.save``) or TorchScript
archives (``torch.jit.save``). Both are zip files: one pickle (``<prefix>/data.pkl``)
that rebuilds the object graph, and one record per tensor storage
(``<prefix>/data/<key>``). The named tensors are read out of such an archive with a
restricted unpickler (:mod:`fl_sidecar._pickle`) that imports and calls nothing, and
new weights are written into a *copy* of the archive by replacing storage records only,
leaving the pickle untouched: the server then loads the result as the same module type
with the new values.

Tensor names follow ``module.state_dict()``: ``fc1.weight``, ``layers.0.bias``.
Full unpickling (:func:`load_trusted`) exists for the trainer's own process, where
the model's classes live, and only behind that explicit call.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import math
import os
from dataclasses import dataclass
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch

from fl_sidecar import archive as _tf
from fl_sidecar._pickle import TensorRef
from fl_sidecar.archive import (
    ModelFormat,
    archive_to_safetensors,
    detect_format,
    safetensors_into_archive,
)
from fl_sidecar.errors import AmbiguousArchiveError, ModelFormatError, TensorMismatchError

__all__ = [
    "ArchiveInfo",
    "ModelFormat",
    "TensorSpec",
    "archive_to_safetensors",
    "average_archives",
    "describe",
    "detect_format",
    "dump_module",
    "from_safetensors",
    "list_tensors",
    "load_trusted",
    "module_from_state_dict",
    "read_tensors",
    "safetensors_into_archive",
    "save_module",
    "to_safetensors",
    "weighted_average",
    "write_tensors",
]

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[bytes, bytearray, memoryview, PathLike]

# torch.jit.load has no annotations; this gives it a type for mypy --strict.
_jit_load: Callable[..., Any] = torch.jit.load


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor's facts, known without reading its data.

    Attributes:
        name: state_dict name (``fc1.weight``).
        shape: dimensions.
        dtype: element type.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class ArchiveInfo:
    """What a torch archive holds, read without running its pickle.

    Attributes:
        format: TORCH_PICKLE or TORCHSCRIPT.
        root_class: the pickled root object's class as ``module.Name`` (``__main__.Net``,
            ``collections.OrderedDict`` for a state_dict, ``__torch__.Net`` for TorchScript).
        is_module: the root is an ``nn.Module`` (pickled or scripted), not a bare state_dict.
        tensors: the named tensors, in state_dict order.
    """

    format: ModelFormat
    root_class: str
    is_module: bool
    tensors: Dict[str, TensorSpec]


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _torch_dtype(name: str) -> torch.dtype:
    # name comes from the fixed allow-lists of fl_sidecar._pickle, never from the pickle.
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelFormatError(f"this torch build has no dtype {name}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, the names :mod:`fl_sidecar.archive` uses."""
    return str(dtype)[len("torch.") :]


def _is_bytes(source: object) -> bool:
    return isinstance(source, (bytes, bytearray, memoryview))


# --------------------------------------------------------------------------- reading


def describe(source: Source) -> ArchiveInfo:
    """Reads what a torch archive (bytes or path) holds, without its tensor data.

    :func:`fl_sidecar.archive.describe` with dtypes as torch dtypes.

    Raises:
        ModelFormatError: not a torch zip archive, or a malformed one, or a dtype this
            torch build lacks.
        UnsafePickleError: its pickle asks for more than rebuilding tensors; nothing ran.
        OSError: the file cannot be read.
    """
    info = _tf.describe(source)
    tensors = {
        name: TensorSpec(name, t.shape, _torch_dtype(t.dtype)) for name, t in info.tensors.items()
    }
    return ArchiveInfo(info.format, info.root_class, info.is_module, tensors)


def list_tensors(source: Source) -> Dict[str, TensorSpec]:
    """Names, shapes and dtypes of an archive's tensors (bytes or path), without the data.

    Raises:
        ModelFormatError, UnsafePickleError, OSError: as :func:`describe`.
    """
    return describe(source).tensors


def _read_storage(archive: Any, key: str) -> torch.Tensor:
    """A storage's bytes as a flat uint8 tensor, in little-endian order."""
    buf = torch.empty(archive.records[f"data/{key}"].file_size, dtype=torch.uint8)
    archive.read_storage_into(key, buf.numpy().data)
    return buf


def _tensor_view(storage: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    return storage.view(_torch_dtype(ref.dtype)).as_strided(ref.size, ref.stride, ref.offset)


def read_tensors(source: Source) -> Dict[str, torch.Tensor]:
    """Reads the named tensors (state_dict names) of a torch archive, on the CPU.

    Works for pickled modules, state_dicts and TorchScript archives, without executing
    the pickle. Tensors that shared a storage in the archive (tied weights) share it in
    the result.

    Raises:
        ModelFormatError: not a torch zip archive (a truncated zip, no ``data.pkl``...),
            or records that disagree with the pickle; its subclasses
            AmbiguousArchiveError (another reader could read the zip differently) and
            ModelLimitExceededError (over the reader's budgets, see
            :class:`fl_sidecar.archive.ReadLimits`).
        UnsafePickleError: the pickle names or calls something other than tensor
            rebuilding and plain containers; none of it ran.
        OSError: the file cannot be read.
    """
    with _tf.open_archive(source) as archive:
        storages: Dict[str, torch.Tensor] = {}
        out: Dict[str, torch.Tensor] = {}
        for name, ref in archive.tensors.items():
            _torch_dtype(ref.dtype)
            key = ref.storage.key
            if key not in storages:
                storages[key] = _read_storage(archive, key)
            out[name] = _tensor_view(storages[key], ref)
        return out


# --------------------------------------------------------------------------- writing


def _check_against(
    specs: Mapping[str, TensorSpec], given: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]]
) -> None:
    _tf.check_against(
        {n: (s.shape, _dtype_name(s.dtype)) for n, s in specs.items()},
        {n: (tuple(shape), _dtype_name(dtype)) for n, (shape, dtype) in given.items()},
    )


class _TensorValues(_tf.NewValues):
    """New values from torch tensors (any device), one CPU copy at a time."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self._cache: Dict[str, torch.Tensor] = {}

    def _bytes(self, name: str) -> torch.Tensor:
        found = self._cache.get(name)
        if found is None:
            if len(self._cache) >= 4:  # tied tensors are read in turn; keep a few
                self._cache.clear()
            value = self._tensors[name].detach().to("cpu").contiguous().reshape(-1)
            found = value.view(torch.uint8) if value.numel() else value.new_empty(0)
            self._cache[name] = found
        return found

    def read(self, name: str, start: int, out: memoryview) -> None:
        data = self._bytes(name)
        if len(out):
            out[:] = data[start : start + len(out)].numpy().data


def write_tensors(
    template: Source,
    tensors: Mapping[str, torch.Tensor],
    dest: Optional[PathLike] = None,
) -> Optional[bytes]:
    """Writes new weights into a copy of a torch archive (pickled module, TorchScript, state_dict).

    The copy keeps the template's pickle and code; only the tensor data changes, so it
    loads with plain ``torch.load``/``torch.jit.load`` as the same module type. Tensors
    may be on any device; they are copied to the CPU one at a time. The archive is
    written by :func:`fl_sidecar.archive.rewrite_archive` (torch's zip layout).

    Args:
        template: the archive, as bytes or a path.
        tensors: exactly the template's names (see :func:`read_tensors`) with the same
            shapes and dtypes.
        dest: a path to write to (atomically), or None to return the bytes.

    Returns:
        the new archive's bytes when ``dest`` is None, else None.

    Raises:
        TensorMismatchError: a name is missing or extra, a shape or dtype differs, or tied
            tensors get different values. Nothing is written.
        ModelFormatError, UnsafePickleError, OSError: as :func:`read_tensors`.
    """
    with _tf.open_archive(template) as archive:
        given = {}
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TensorMismatchError(f"{name!r} is not a tensor but {type(value).__name__}")
            given[name] = (tuple(value.shape), _dtype_name(value.dtype))
        _tf.check_against({n: (r.size, r.dtype) for n, r in archive.tensors.items()}, given)
        values = _TensorValues(tensors)
        if dest is None:
            buf = io.BytesIO()
            _tf.rewrite_archive(archive, buf, values)
            return buf.getvalue()
        _tf.atomic_write(dest, lambda f: _tf.rewrite_archive(archive, f, values))
        return None


# --------------------------------------------------------------------------- modules


def _state_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    for sub in module.modules():
        yield from (t for t in sub._parameters.values() if t is not None)
        yield from (t for t in sub._buffers.values() if t is not None)
        yield from (t for t in vars(sub).values() if isinstance(t, torch.Tensor))


def _cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` with every tensor on the CPU; ``module`` is untouched.

    The tensors are copied to the CPU first and handed to deepcopy through its memo, so
    no second copy of the weights is ever made on the accelerator. Tied tensors stay tied.
    """
    memo: Dict[int, Any] = {}
    for tensor in _state_tensors(module):
        if id(tensor) in memo:
            continue
        cpu = tensor.detach().to("cpu", copy=True)
        if isinstance(tensor, torch.nn.Parameter):
            cpu = torch.nn.Parameter(cpu, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = cpu
    return copy.deepcopy(module, memo)


def _all_on_cpu(module: torch.nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in _state_tensors(module))


def dump_module(module: torch.nn.Module) -> bytes:
    """Serializes a module as the reference client does: ``torch.save``, or ``torch.jit.save``.

    Tensors on an accelerator are written from CPU copies; the trainer's module stays
    where it is, with the same parameter objects.

    Returns:
        the archive's bytes.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ModelFormatError: torch cannot serialize it (e.g. a lambda attribute).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"dump_module needs an nn.Module, not {type(module).__name__}")
    on_cpu = _all_on_cpu(module)
    buf = io.BytesIO()
    try:
        if isinstance(module, torch.jit.ScriptModule):
            torch.jit.save(module, buf)
            if not on_cpu:
                # jit has no save-time device map: reload the bytes onto the CPU and save again.
                moved = _jit_load(io.BytesIO(buf.getvalue()), map_location="cpu")
                buf = io.BytesIO()
                torch.jit.save(moved, buf)
        else:
            torch.save(module if on_cpu else _cpu_copy(module), buf)
    except (RuntimeError, TypeError, AttributeError, copy.Error) as exc:
        raise ModelFormatError(f"torch cannot serialize this module: {exc}") from exc
    return buf.getvalue()


def module_from_state_dict(
    state: Mapping[str, torch.Tensor], *, requires_grad: bool = False
) -> torch.nn.Module:
    """An ``nn.Module`` holding ``state`` under its dotted names, built from plain modules only.

    The FL server stores models as ``nn.Module``s and rejects a bare state_dict;
    this wraps one (a safetensors file's tensors, say) so it can be uploaded as a
    global model. Every object in it is a ``torch.nn.Module``, so any torch loads
    it without the trainer's own classes; ``module.state_dict()`` gives back the
    same names. The tensors are shared, not copied.

    Raises:
        TensorMismatchError: a name is empty, or is both a tensor and a prefix of another.
    """
    root = torch.nn.Module()
    for name, tensor in state.items():
        *path, leaf = name.split(".")
        owner = root
        try:
            for part in path:
                child = owner._modules.get(part)
                if child is None:
                    child = torch.nn.Module()
                    owner.add_module(part, child)
                owner = child
            owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=requires_grad))
        except (KeyError, TypeError) as exc:
            raise TensorMismatchError(f"cannot hold tensor {name!r} in a module: {exc}") from None
    return root


def save_module(module: torch.nn.Module, path: PathLike) -> None:
    """Writes :func:`dump_module`'s bytes to ``path`` atomically.

    Raises:
        TypeError, ModelFormatError: as :func:`dump_module`.
        OSError: the file cannot be written.
    """
    data = dump_module(module)

    def produce(f: IO[bytes]) -> None:
        f.write(data)

    _tf.atomic_write(path, produce)


def load_trusted(source: Source, *, map_location: Any = None, vet: bool = False) -> Any:
    """Fully loads a model, running its pickle: only for archives you trust.

    ``torch.load(weights_only=False)`` for pickled archives (the model's classes must be
    importable), ``torch.jit.load`` for TorchScript; ``map_location`` as for those.

    The bytes torch loads are the bytes checked: a path is opened once and that open
    file is checked and then handed to torch (never opened again by name); bytes are
    checked and loaded from the same buffer. The check is the vetting reader's zip
    layout check (not its pickle check: this function trusts the pickle), plus torch's
    own reader listing exactly the records ours found, so an archive that the sidecar
    vetted cannot load here as another one (two ``data.pkl`` records, a pickle with a
    zip appended...).

    ``vet=True`` also runs the restricted reader over the very bytes about to be
    loaded (as the sidecar vets a TORCH download), and refuses a pickle that would call
    anything but tensor rebuilding before torch sees it.

    Raises:
        UnsafePickleError: ``vet`` is set and the pickle would run code; nothing ran.
        AmbiguousArchiveError: torch or another reader could read the archive
            differently from the vetting reader.
        ModelFormatError: not a torch archive, or torch cannot load it.
        OSError: the file cannot be read.
    """
    with contextlib.ExitStack() as stack:
        if _is_bytes(source):
            opened: IO[bytes] = io.BytesIO(bytes(source))  # type: ignore[arg-type]
        else:
            opened = stack.enter_context(open(os.fspath(source), "rb"))  # type: ignore[arg-type]
        with _tf.open_archive(source, parse=vet, opened=opened) as archive:
            fmt = archive.format
            ours = sorted(name[len(archive.prefix) + 1 :] for name in archive.record_names)
        opened.seek(0)
        try:
            theirs = sorted(torch._C.PyTorchFileReader(opened).get_all_records())
        except Exception as exc:
            raise ModelFormatError(f"torch cannot read the archive: {exc}") from exc
        if theirs != ours:
            raise AmbiguousArchiveError(
                "torch's reader sees other records than the vetting reader"
                f" ({len(theirs)} against {len(ours)}); refused"
            )
        opened.seek(0)
        try:
            if fmt is ModelFormat.TORCHSCRIPT:
                return _jit_load(opened, map_location=map_location)
            return torch.load(opened, map_location=map_location, weights_only=False)
        except (OSError, MemoryError):
            raise
        except Exception as exc:
            raise ModelFormatError(f"torch could not load the model: {exc}") from exc


# --------------------------------------------------------------------------- safetensors


def to_safetensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serializes named tensors (any device, strided or tied) as safetensors bytes.

    Raises:
        TensorMismatchError: a value is not a tensor, or its dtype has no safetensors name.
    """
    specs: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TensorMismatchError(f"{name!r} is not a named tensor")
        specs[name] = (tuple(value.shape), _dtype_name(value.dtype))
    header, order = _tf.safetensors_header(specs)
    buf = io.BytesIO()
    buf.write(header)
    for name in order:
        value = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        if value.numel():
            buf.write(value.view(torch.uint8).numpy().data)
    return buf.getvalue()


def from_safetensors(data: Source) -> Dict[str, torch.Tensor]:
    """Reads safetensors (bytes or a file path) into named CPU tensors.

    Raises:
        ModelFormatError: not valid safetensors.
        OSError: the file cannot be read.
    """
    header, start = _tf.read_safetensors_header(data)
    out: Dict[str, torch.Tensor] = {}
    with _tf.open_source(data) as f:
        for name, entry in header.items():
            buf = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
            f.seek(start + entry.begin)
            _tf.read_exact(f, buf.numpy().data, "the safetensors data")
            out[name] = buf.view(_torch_dtype(entry.dtype)).view(entry.shape)
    return out


# --------------------------------------------------------------------------- FedAvg


def weighted_average(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> Dict[str, torch.Tensor]:
    """FedAvg: the average of state_dicts weighted by ``weights`` (e.g. sample sizes).

    Accumulates in float64 (complex128 for complex tensors) one tensor at a time and
    returns each result in its original dtype on the CPU; integer and bool tensors are
    rounded to the nearest value. :func:`average_archives` does the same from files,
    holding one tensor at a time.

    Raises:
        TensorMismatchError: no state_dicts, a weight count that differs, a negative or
            non-finite weight, all-zero weights, or names/shapes/dtypes that differ between
            the state_dicts.
    """
    if not state_dicts:
        raise TensorMismatchError("weighted_average needs at least one state_dict")
    factors = _fedavg_factors(weights, len(state_dicts))
    first = state_dicts[0]
    specs = {n: TensorSpec(n, tuple(t.shape), t.dtype) for n, t in first.items()}
    for other in state_dicts[1:]:
        _check_against(specs, {n: (tuple(t.shape), t.dtype) for n, t in other.items()})
    return {
        name: _average_one(
            [functools.partial(sd.__getitem__, name) for sd in state_dicts], factors, spec
        )
        for name, spec in specs.items()
    }


def average_archives(
    template: Source,
    sources: Sequence[Source],
    weights: Sequence[float],
    dest: PathLike,
) -> None:
    """FedAvg of torch archives, written into a copy of ``template``, one tensor at a time.

    The result equals ``write_tensors(template, weighted_average([read_tensors(s) ...],
    weights), dest)``, but instead of every source's whole model, memory holds a few
    buffers the size of the largest tensor (one source's tensor at a time, its
    float64 widening and the sum): a dev server averaging a 1 GiB model from ten
    clients needs megabytes, not 11 GiB. Every archive is read with the
    restricted unpickler (an upload's pickle never runs).

    Raises:
        TensorMismatchError: no sources, bad weights (as :func:`weighted_average`), or a
            source whose names, shapes or dtypes differ from the template's. Nothing is
            written.
        ModelFormatError, UnsafePickleError, OSError: as :func:`read_tensors`.
    """
    if not sources:
        raise TensorMismatchError("average_archives needs at least one source")
    factors = _fedavg_factors(weights, len(sources))
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(_tf.open_archive(template))
        archives = [stack.enter_context(_tf.open_archive(source)) for source in sources]
        specs = {n: (r.size, r.dtype) for n, r in base.tensors.items()}
        for archive in archives:
            _tf.check_against(specs, {n: (r.size, r.dtype) for n, r in archive.tensors.items()})
        for ref in base.tensors.values():
            _torch_dtype(ref.dtype)
        values = _TensorValues(_LazyAverage(archives, factors, base))
        _tf.atomic_write(dest, lambda f: _tf.rewrite_archive(base, f, values))


def _fedavg_factors(weights: Sequence[float], count: int) -> List[float]:
    """The normalised FedAvg weights (summing to 1); see :func:`weighted_average`."""
    if len(weights) != count:
        raise TensorMismatchError(f"{count} state_dicts but {len(weights)} weights")
    factors = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in factors):
        raise TensorMismatchError(f"weights must be finite and non-negative: {list(weights)}")
    total = math.fsum(factors)
    if total <= 0:
        raise TensorMismatchError("the weights sum to zero")
    return [w / total for w in factors]


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype.is_complex else torch.float64


def _average_one(
    fetches: Iterable[Callable[[], torch.Tensor]],
    factors: Sequence[float],
    spec: TensorSpec,
    acc: Optional[torch.Tensor] = None,
    widened: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The weighted sum of the tensors ``fetches`` return (each called only if weighted).

    ``acc``: a zeroed accumulator of the spec's shape to sum into (float64, or
    complex128 for complex tensors), and ``widened``: a buffer like it that each
    tensor is widened into; ``None`` allocates them.
    """
    acc_dtype = _accumulator_dtype(spec.dtype)
    if acc is None:
        acc = torch.zeros(spec.shape, dtype=acc_dtype)
    for fetch, factor in zip(fetches, factors):
        if factor:
            tensor = fetch().detach()
            if widened is None:
                acc.add_(tensor.to("cpu", acc_dtype), alpha=factor)
            else:
                acc.add_(widened.copy_(tensor), alpha=factor)
    if spec.dtype.is_floating_point or spec.dtype.is_complex:
        return acc.to(spec.dtype)
    return acc.round().to(spec.dtype)


class _LazyAverage(Mapping[str, torch.Tensor]):
    """The FedAvg of each named tensor over the archives, computed when looked up.

    Sources are read one at a time into a reused buffer, widened into another and
    summed into a third, so besides the results only three buffers exist, sized for
    the largest tensor (reusing them also keeps the allocator from fragmenting the
    heap: allocating afresh per tensor doubled the peak).
    """

    def __init__(self, archives: Sequence[Any], factors: Sequence[float], base: Any) -> None:
        self._archives = archives
        self._factors = factors
        self._base = base
        self._read_buf = torch.empty(0, dtype=torch.uint8)
        # accumulator dtype -> (sum buffer, widening buffer), flat
        self._acc_bufs: Dict[torch.dtype, Tuple[torch.Tensor, torch.Tensor]] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        ref = self._base.tensors[name]
        spec = TensorSpec(name, tuple(ref.size), _torch_dtype(ref.dtype))
        acc_dtype = _accumulator_dtype(spec.dtype)
        numel = math.prod(spec.shape)
        bufs = self._acc_bufs.get(acc_dtype)
        if bufs is None or bufs[0].numel() < numel:
            bufs = self._acc_bufs[acc_dtype] = (
                torch.empty(numel, dtype=acc_dtype),
                torch.empty(numel, dtype=acc_dtype),
            )
        return _average_one(
            [functools.partial(self._read, archive, name) for archive in self._archives],
            self._factors,
            spec,
            acc=bufs[0][:numel].view(spec.shape).zero_(),
            widened=bufs[1][:numel].view(spec.shape),
        )

    def _read(self, archive: Any, name: str) -> torch.Tensor:
        ref = archive.tensors[name]
        key = ref.storage.key
        size = archive.records[f"data/{key}"].file_size
        if self._read_buf.numel() < size:
            self._read_buf = torch.empty(size, dtype=torch.uint8)
        storage = self._read_buf[:size]
        archive.read_storage_into(key, storage.numpy().data)
        return _tensor_view(storage, ref)

    def __iter__(self) -> Iterator[str]:
        return iter(self._base.tensors)

    def __len__(self) -> int:
        return len(self._base.tensors)
