"""File conversions without torch: torch archive -> safetensors, and safetensors -> archive.

Memory is bounded by a fixed copy buffer (:data:`~fl_sidecar.modelfiles.fileio.CHUNK_BYTES`)
whatever the model's size, with two documented exceptions that hold one storage in
memory: a non-contiguous tensor view (its storage span), and new values for tensors that
share a storage in some other way than as identical views.
"""

from __future__ import annotations

import math
import os
from typing import IO, List, Mapping, Optional

from fl_sidecar.errors import ModelFormatError
from fl_sidecar.modelfiles.dtypes import dtype_facts
from fl_sidecar.modelfiles.fileio import (
    CHUNK_BYTES,
    PathLike,
    Sink,
    WrittenFile,
    atomic_write_hashed,
    read_exact,
)
from fl_sidecar.modelfiles.limits import DEFAULT_LIMITS, ReadLimits, StopCheck, check_stop
from fl_sidecar.modelfiles.pickle_objects import TensorRef
from fl_sidecar.modelfiles.rewrite import NewValues, check_against, rewrite_archive
from fl_sidecar.modelfiles.safetensors import (
    SafetensorsEntry,
    read_safetensors_header,
    safetensors_header,
)
from fl_sidecar.modelfiles.strided import contiguous, gather, swap_bytes, view_span
from fl_sidecar.modelfiles.torch_archive import TorchArchive

__all__ = ["archive_to_safetensors", "safetensors_into_archive"]

# Converted data may exceed the storages it comes from (tied weights are written once per
# name, expanded views element by element) by this factor plus this many bytes, no more.
_MAX_EXPANSION = 8
_EXPANSION_SLACK = 256 * 1024 * 1024


def _write_view(archive: TorchArchive, ref: TensorRef, out: Sink) -> None:
    """Writes a tensor view's bytes, row-major and little-endian, to ``out``."""
    itemsize = dtype_facts(ref.dtype).itemsize
    numel = math.prod(ref.size)
    if numel == 0:
        return
    info = archive.records[f"data/{ref.storage.key}"]
    unit = archive.swap_unit(ref.storage.key)
    if contiguous(ref.size, ref.stride):
        for piece in archive.iter_record(info, ref.offset * itemsize, numel * itemsize):
            swap_bytes(piece, unit)  # pieces are whole numbers: the buffer is a multiple of 16
            out.write(piece)
        return
    # A strided view (a transpose, a column slice) is gathered from its storage span:
    # rare in saved models, and bounded by that one storage.
    first, end = view_span(ref)
    span = bytearray((end - first) * itemsize)
    archive.read_range(info, first * itemsize, memoryview(span))
    swap_bytes(span, unit)
    pending: List[bytes] = []
    size = 0
    for row in gather(span, itemsize, ref, first):
        pending.append(row)
        size += len(row)
        if size >= CHUNK_BYTES:
            out.write(b"".join(pending))
            pending, size = [], 0
    out.write(b"".join(pending))


def _check_expansion(archive: TorchArchive) -> None:
    """Refuses tensors that would write far more than their storages hold.

    Tied names each get their own copy and an expanded view (stride 0) writes every
    element it repeats: a tiny hostile archive could otherwise fill the disk.
    """
    stored = sum(
        archive.records[f"data/{key}"].file_size
        for key in {ref.storage.key for ref in archive.tensors.values()}
    )
    total = sum(
        math.prod(ref.size) * dtype_facts(ref.dtype).itemsize for ref in archive.tensors.values()
    )
    if total > _MAX_EXPANSION * stored + _EXPANSION_SLACK:
        raise ModelFormatError(
            f"the archive's tensors would make {total} bytes of data from {stored} bytes of"
            " storage (many names for one storage, or expanded views); refused"
        )


def archive_to_safetensors(
    src: PathLike,
    dst: PathLike,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
    should_stop: Optional[StopCheck] = None,
) -> WrittenFile:
    """Converts a torch archive file into a safetensors file, without running its pickle.

    Each tensor's bytes are copied from its storage record; tied tensors become separate
    entries with the same values, as ``safetensors.torch`` writes them; big-endian
    archives are converted to little-endian. The output is byte-identical to
    :func:`fl_sidecar.modelfiles.torch_io.to_safetensors` of the archive's state_dict.

    Memory: one :data:`CHUNK_BYTES` buffer for contiguous tensors (the usual case); a
    non-contiguous view is gathered from its storage span. ``dst`` is written atomically.

    Returns:
        The size and SHA-256 of what was written to ``dst``.

    Raises:
        ModelFormatError: not a torch archive, or a malformed one (truncated or corrupt
            records included), or tensors that would write more than 8 times their
            storages' bytes plus 256 MiB (tied many times over, or expanded views).
        UnsafePickleError: the pickle asks for more than rebuilding tensors; nothing ran.
        TensorMismatchError: a dtype has no safetensors name (complex128).
        ModelLimitExceededError: reading it would exceed one of ``limits``.
        ModelReadCancelledError: ``should_stop`` returned True (checked between tensors
            too); ``dst`` is left as it was.
        OSError: a file cannot be read or written.
    """
    with TorchArchive(src, limits=limits, should_stop=should_stop) as archive:
        specs = {n: (ref.size, ref.dtype) for n, ref in archive.tensors.items()}
        header, order = safetensors_header(specs)
        _check_expansion(archive)

        def produce(out: Sink) -> None:
            out.write(header)
            for name in order:
                check_stop(should_stop)
                _write_view(archive, archive.tensors[name], out)

        return atomic_write_hashed(dst, produce)


class _SafetensorsValues(NewValues):
    def __init__(self, f: IO[bytes], header: Mapping[str, SafetensorsEntry], start: int) -> None:
        self._f = f
        self._header = header
        self._start = start

    def read(self, name: str, start: int, out: memoryview) -> None:
        self._f.seek(self._start + self._header[name].begin + start)
        read_exact(self._f, out, "the safetensors data")


def safetensors_into_archive(
    template: PathLike,
    weights: PathLike,
    dst: PathLike,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
    should_stop: Optional[StopCheck] = None,
) -> WrittenFile:
    """Writes the weights of a safetensors file into a copy of a torch archive file.

    Every name, shape and dtype is checked before anything is written; the pickle is
    copied as it is, so the result loads with plain ``torch.load``/``torch.jit.load`` as
    the template's module type (also with ``mmap=True``: records are 64-byte aligned).
    Big-endian templates stay big-endian.

    Memory: one :data:`CHUNK_BYTES` buffer (two for tied tensors) when each storage holds
    one contiguous view or identical tied views (the usual case); a storage shared in
    another way is held whole. ``dst`` is written atomically.

    Returns:
        The size and SHA-256 of what was written to ``dst``.

    Raises:
        TensorMismatchError: names, shapes or dtypes differ from the template's, or tied
            tensors get different values. Nothing is written.
        ModelFormatError: the template is not a torch archive or ``weights`` not safetensors.
        UnsafePickleError: the template's pickle asks for more than tensors; nothing ran.
        ModelLimitExceededError: reading the template would exceed one of ``limits``.
        ModelReadCancelledError: ``should_stop`` returned True (checked while the
            template is read); ``dst`` is left as it was.
        OSError: a file cannot be read or written.
    """
    header, start = read_safetensors_header(weights)
    with TorchArchive(template, limits=limits, should_stop=should_stop) as archive, open(
        os.fspath(weights), "rb"
    ) as wf:
        check_against(
            {n: (ref.size, ref.dtype) for n, ref in archive.tensors.items()},
            {n: (e.shape, e.dtype) for n, e in header.items()},
        )
        values = _SafetensorsValues(wf, header, start)
        return atomic_write_hashed(dst, lambda out: rewrite_archive(archive, out, values))
