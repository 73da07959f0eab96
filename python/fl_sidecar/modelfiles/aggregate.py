"""FedAvg with torch: weighted averages of state_dicts, and of archive files tensor by tensor.

This module and :mod:`~fl_sidecar.modelfiles.torch_io` are the only ones of the package
that import torch. Every archive is read with the restricted reader: an upload's pickle
never runs.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

from fl_sidecar.errors import TensorMismatchError
from fl_sidecar.modelfiles.fileio import PathLike, Source, atomic_write
from fl_sidecar.modelfiles.rewrite import check_against, rewrite_archive
from fl_sidecar.modelfiles.torch_archive import open_archive
from fl_sidecar.modelfiles.torch_io import (
    TensorSpec,
    TensorValues,
    dtype_name,
    tensor_view,
    torch_dtype,
)

__all__ = ["average_archives", "weighted_average"]


def _check_against(
    specs: Mapping[str, TensorSpec], given: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]]
) -> None:
    check_against(
        {n: (s.shape, dtype_name(s.dtype)) for n, s in specs.items()},
        {n: (tuple(shape), dtype_name(dtype)) for n, (shape, dtype) in given.items()},
    )


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
        base = stack.enter_context(open_archive(template))
        archives = [stack.enter_context(open_archive(source)) for source in sources]
        specs = {n: (r.size, r.dtype) for n, r in base.tensors.items()}
        for archive in archives:
            check_against(specs, {n: (r.size, r.dtype) for n, r in archive.tensors.items()})
        for ref in base.tensors.values():
            torch_dtype(ref.dtype)
        values = TensorValues(_LazyAverage(archives, factors, base))
        atomic_write(dest, lambda f: rewrite_archive(base, f, values))


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
        spec = TensorSpec(name, tuple(ref.size), torch_dtype(ref.dtype))
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
        return tensor_view(storage, ref)

    def __iter__(self) -> Iterator[str]:
        return iter(self._base.tensors)

    def __len__(self) -> int:
        return len(self._base.tensors)
