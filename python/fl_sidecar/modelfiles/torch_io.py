"""Model I/O with torch: tensors in and out of torch archives and safetensors, modules.

This module and :mod:`~fl_sidecar.modelfiles.aggregate` (FedAvg) are the only ones of the
package that import torch; the others import them lazily. Everything that needs no torch
(format detection, describing an archive, and archive <-> safetensors conversion of
files) lives in the other modules of :mod:`fl_sidecar.modelfiles`, which the sidecar
uses so that it never imports torch.

The FL server stores models as pickled ``nn.Module``s (``torch.save``) or TorchScript
archives (``torch.jit.save``). Both are zip files: one pickle (``<prefix>/data.pkl``)
that rebuilds the object graph, and one record per tensor storage
(``<prefix>/data/<key>``). The named tensors are read out of such an archive with a
restricted unpickler (:mod:`~fl_sidecar.modelfiles.pickle_reader`) that imports and
calls nothing, and new weights are written into a *copy* of the archive by replacing
storage records only, leaving the pickle untouched: the server then loads the result as
the same module type with the new values.

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
from typing import IO, Any, Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch

from fl_sidecar.errors import AmbiguousArchiveError, ModelFormatError, TensorMismatchError
from fl_sidecar.modelfiles.fileio import (
    PathLike,
    Source,
    atomic_write,
    is_bytes,
    open_source,
    read_exact,
)
from fl_sidecar.modelfiles.formats import ModelFormat
from fl_sidecar.modelfiles.pickle_objects import TensorRef
from fl_sidecar.modelfiles.rewrite import NewValues, check_against, rewrite_archive
from fl_sidecar.modelfiles.safetensors import read_safetensors_header, safetensors_header
from fl_sidecar.modelfiles.torch_archive import open_archive
from fl_sidecar.modelfiles.vetting import describe as _describe_archive

__all__ = [
    "ArchiveInfo",
    "TensorSpec",
    "describe",
    "dump_module",
    "from_safetensors",
    "list_tensors",
    "load_trusted",
    "module_from_state_dict",
    "read_tensors",
    "save_module",
    "to_safetensors",
    "write_module",
    "write_safetensors",
    "write_tensors",
]

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


def torch_dtype(name: str) -> torch.dtype:
    # name comes from the fixed allow-lists of the pickle reader, never from the pickle.
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelFormatError(f"this torch build has no dtype {name}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``, the names the torch-free modules use."""
    return str(dtype)[len("torch.") :]


# --------------------------------------------------------------------------- reading


def describe(source: Source) -> ArchiveInfo:
    """Reads what a torch archive (bytes or path) holds, without its tensor data.

    :func:`fl_sidecar.modelfiles.vetting.describe` with dtypes as torch dtypes.

    Raises:
        ModelFormatError: not a torch zip archive, or a malformed one, or a dtype this
            torch build lacks.
        UnsafePickleError: its pickle asks for more than rebuilding tensors; nothing ran.
        OSError: the file cannot be read.
    """
    info = _describe_archive(source)
    tensors = {
        name: TensorSpec(name, t.shape, torch_dtype(t.dtype)) for name, t in info.tensors.items()
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


def tensor_view(storage: torch.Tensor, ref: TensorRef) -> torch.Tensor:
    return storage.view(torch_dtype(ref.dtype)).as_strided(ref.size, ref.stride, ref.offset)


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
            :class:`fl_sidecar.modelfiles.limits.ReadLimits`).
        UnsafePickleError: the pickle names or calls something other than tensor
            rebuilding and plain containers; none of it ran.
        OSError: the file cannot be read.
    """
    with open_archive(source) as archive:
        storages: Dict[str, torch.Tensor] = {}
        out: Dict[str, torch.Tensor] = {}
        for name, ref in archive.tensors.items():
            torch_dtype(ref.dtype)
            key = ref.storage.key
            if key not in storages:
                storages[key] = _read_storage(archive, key)
            out[name] = tensor_view(storages[key], ref)
        return out


# --------------------------------------------------------------------------- writing


class TensorValues(NewValues):
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
    written by :func:`fl_sidecar.modelfiles.rewrite.rewrite_archive` (torch's zip layout).

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
    with open_archive(template) as archive:
        given = {}
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TensorMismatchError(f"{name!r} is not a tensor but {type(value).__name__}")
            given[name] = (tuple(value.shape), dtype_name(value.dtype))
        check_against({n: (r.size, r.dtype) for n, r in archive.tensors.items()}, given)
        values = TensorValues(tensors)
        if dest is None:
            buf = io.BytesIO()
            rewrite_archive(archive, buf, values)
            return buf.getvalue()
        atomic_write(dest, lambda f: rewrite_archive(archive, f, values))
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


def write_module(module: torch.nn.Module, out: IO[bytes]) -> None:
    """Writes a module as the reference client does (``torch.save``, or ``torch.jit.save``)
    into the binary file ``out``, never holding the whole archive in memory.

    Tensors on an accelerator are written from CPU copies; the trainer's module stays
    where it is, with the same parameter objects.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ModelFormatError: torch cannot serialize it (e.g. a lambda attribute).
        OSError: ``out`` cannot be written.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"a model to save must be an nn.Module, not {type(module).__name__}")
    on_cpu = _all_on_cpu(module)
    try:
        if isinstance(module, torch.jit.ScriptModule):
            if on_cpu:
                torch.jit.save(module, out)
            else:
                # jit has no save-time device map: reload the bytes onto the CPU and save again.
                buf = io.BytesIO()
                torch.jit.save(module, buf)
                buf.seek(0)
                moved = _jit_load(buf, map_location="cpu")
                del buf
                torch.jit.save(moved, out)
        else:
            torch.save(module if on_cpu else _cpu_copy(module), out)
    except (RuntimeError, TypeError, AttributeError, copy.Error) as exc:
        raise ModelFormatError(f"torch cannot serialize this module: {exc}") from exc


def dump_module(module: torch.nn.Module) -> bytes:
    """:func:`write_module`'s archive as bytes.

    Returns:
        the archive's bytes.

    Raises:
        TypeError, ModelFormatError: as :func:`write_module`.
    """
    buf = io.BytesIO()
    write_module(module, buf)
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
    """Writes :func:`write_module`'s archive to ``path`` atomically (streamed, not in memory).

    Raises:
        TypeError, ModelFormatError: as :func:`dump_module`.
        OSError: the file cannot be written.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"a model to save must be an nn.Module, not {type(module).__name__}")
    atomic_write(path, lambda f: write_module(module, f))


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
        if is_bytes(source):
            opened: IO[bytes] = io.BytesIO(bytes(source))  # type: ignore[arg-type]
        else:
            opened = stack.enter_context(open(os.fspath(source), "rb"))  # type: ignore[arg-type]
        with open_archive(source, parse=vet, opened=opened) as archive:
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


def write_safetensors(tensors: Mapping[str, torch.Tensor], out: IO[bytes]) -> None:
    """Writes named tensors (any device, strided or tied) as safetensors into the binary
    file ``out``, one tensor's CPU copy at a time.

    Raises:
        TensorMismatchError: a value is not a tensor, or its dtype has no safetensors name.
        OSError: ``out`` cannot be written.
    """
    specs: Dict[str, Tuple[Tuple[int, ...], str]] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TensorMismatchError(f"{name!r} is not a named tensor")
        specs[name] = (tuple(value.shape), dtype_name(value.dtype))
    header, order = safetensors_header(specs)
    out.write(header)
    for name in order:
        value = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        if value.numel():
            out.write(value.view(torch.uint8).numpy().data)


def to_safetensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """:func:`write_safetensors`'s file as bytes.

    Raises:
        TensorMismatchError: as :func:`write_safetensors`.
    """
    buf = io.BytesIO()
    write_safetensors(tensors, buf)
    return buf.getvalue()


def from_safetensors(data: Source) -> Dict[str, torch.Tensor]:
    """Reads safetensors (bytes or a file path) into named CPU tensors.

    Raises:
        ModelFormatError: not valid safetensors.
        OSError: the file cannot be read.
    """
    header, start = read_safetensors_header(data)
    out: Dict[str, torch.Tensor] = {}
    with open_source(data) as f:
        for name, entry in header.items():
            buf = torch.empty(entry.end - entry.begin, dtype=torch.uint8)
            f.seek(start + entry.begin)
            read_exact(f, buf.numpy().data, "the safetensors data")
            out[name] = buf.view(torch_dtype(entry.dtype)).view(entry.shape)
    return out
