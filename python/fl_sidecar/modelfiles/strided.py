"""Strided tensor views over a storage's raw bytes: layout facts, gather, scatter, byte swap.

Elements are opaque numbers here (strided ``memoryview`` slices move them, nothing is
interpreted), so neither torch nor numpy is needed.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Iterator, Literal, Sequence, Tuple

from fl_sidecar.modelfiles.pickle_objects import TensorRef


def contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    expected = 1
    for size, step in zip(reversed(shape), reversed(stride)):
        if size != 1 and step != expected:
            return False
        expected *= size
    return True


def may_overlap(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether a view may address one element twice (an expanded tensor, stride 0)."""
    extent = 1
    for size, step in sorted((d for d in zip(shape, stride) if d[0] > 1), key=lambda d: d[1]):
        if step < extent:
            return True
        extent = step * size
    return False


def view_span(ref: TensorRef) -> Tuple[int, int]:
    """The elements [first, last + 1) of its storage that a non-empty view touches."""
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    return ref.offset, last + 1


# memoryview formats of 1-8 byte elements
_FORMATS: Dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _elements(buf: Any, itemsize: int) -> memoryview:
    """A 1-D view of a buffer's elements (opaque numbers: nothing is interpreted)."""
    view: memoryview = memoryview(buf).cast("B").cast(_FORMATS[itemsize])
    return view


def _row_starts(shape: Sequence[int], stride: Sequence[int], offset: int) -> Iterator[int]:
    """The first element of every innermost row of a view, in row-major order."""
    for index in itertools.product(*(range(n) for n in shape)):
        yield offset + sum(i * s for i, s in zip(index, stride))


def gather(buf: Any, itemsize: int, ref: TensorRef, first: int) -> Iterator[bytes]:
    """The elements of a (non-empty) view, row-major, from ``buf`` holding its storage's
    elements from ``first`` on; one innermost row at a time."""
    shape, stride = ref.size, ref.stride
    offset = ref.offset - first
    if itemsize not in _FORMATS:  # 16-byte complex128: element by element
        raw = memoryview(buf).cast("B")
        for start in _row_starts(shape, stride, offset):
            yield raw[start * itemsize : (start + 1) * itemsize].tobytes()
        return
    elements = _elements(buf, itemsize)
    if not shape:
        yield elements[offset : offset + 1].tobytes()
        return
    n, step = shape[-1], stride[-1]
    for start in _row_starts(shape[:-1], stride[:-1], offset):
        if step == 0:
            yield elements[start : start + 1].tobytes() * n
        else:
            yield elements[start : start + (n - 1) * step + 1 : step].tobytes()


def scatter(buf: Any, itemsize: int, ref: TensorRef, new: Any) -> None:
    """Writes a view's new elements (row-major in ``new``) into its storage's ``buf``.

    Where the view addresses one element more than once (stride 0), the last value
    written wins; the caller checks that they all agreed.
    """
    shape, stride = ref.size, ref.stride
    if itemsize not in _FORMATS:
        raw, src = memoryview(buf).cast("B"), memoryview(new).cast("B")
        for i, start in enumerate(_row_starts(shape, stride, ref.offset)):
            raw[start * itemsize : (start + 1) * itemsize] = src[i * itemsize : (i + 1) * itemsize]
        return
    elements, values = _elements(buf, itemsize), _elements(new, itemsize)
    if not shape:
        elements[ref.offset] = values[0]
        return
    n, step = shape[-1], stride[-1]
    pos = 0
    for start in _row_starts(shape[:-1], stride[:-1], ref.offset):
        if step == 0:
            elements[start] = values[pos + n - 1]
        else:
            elements[start : start + (n - 1) * step + 1 : step] = values[pos : pos + n]
        pos += n


def swap_bytes(buf: Any, unit: int) -> None:
    """Reverses the byte order of every ``unit``-byte number of a writable buffer, in place."""
    if unit <= 1:
        return
    raw = memoryview(buf).cast("B")
    if not len(raw):
        return
    original = raw.tobytes()  # one copy: at most a copy buffer or one storage
    for k in range(unit):
        raw[k::unit] = original[unit - 1 - k :: unit]
