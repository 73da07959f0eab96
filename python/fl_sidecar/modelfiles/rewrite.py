"""New tensor values written into a copy of a torch archive: only storage records change.

The pickle and every other record are copied as they are, in torch's zip layout, so
the copy loads as the template's module type with the new values.
"""

from __future__ import annotations

import math
import zipfile
from typing import Mapping, Sequence, Tuple

from fl_sidecar.errors import TensorMismatchError
from fl_sidecar.modelfiles.dtypes import dtype_facts
from fl_sidecar.modelfiles.fileio import CHUNK_BYTES, Sink
from fl_sidecar.modelfiles.pickle_objects import TensorRef
from fl_sidecar.modelfiles.strided import contiguous, gather, may_overlap, scatter, swap_bytes
from fl_sidecar.modelfiles.torch_archive import TorchArchive
from fl_sidecar.modelfiles.zipwriter import ZipWriter, serialization_id

__all__ = ["NewValues", "check_against", "rewrite_archive"]


class NewValues:
    """New tensor values to write into an archive, as little-endian row-major bytes."""

    def read(self, name: str, start: int, out: memoryview) -> None:
        """Fills ``out`` with the bytes of tensor ``name`` from byte ``start``."""
        raise NotImplementedError


def check_against(
    specs: Mapping[str, Tuple[Tuple[int, ...], str]],
    given: Mapping[str, Tuple[Tuple[int, ...], str]],
) -> None:
    """Checks that ``given`` (name -> (shape, dtype name)) matches ``specs`` exactly.

    Raises:
        TensorMismatchError: a name is missing or extra, or a shape or dtype differs.
    """
    missing = [n for n in specs if n not in given]
    extra = [n for n in given if n not in specs]
    if missing or extra:
        raise TensorMismatchError(
            "tensor names differ from the template: "
            + (f"missing {_few(missing)}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {_few(extra)}" if extra else "")
        )
    for name, (shape, dtype) in specs.items():
        new_shape, new_dtype = given[name]
        if tuple(new_shape) != tuple(shape):
            raise TensorMismatchError(
                f"tensor {name!r} has shape {tuple(new_shape)}, the template {tuple(shape)}"
            )
        if new_dtype != dtype:
            raise TensorMismatchError(
                f"tensor {name!r} has dtype torch.{new_dtype}, the template torch.{dtype}"
            )


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _streamable(group: Sequence[Tuple[str, TensorRef]]) -> bool:
    """Whether every tensor of a storage is the same contiguous, non-overlapping view."""
    first = group[0][1]
    if not contiguous(first.size, first.stride):
        return False
    return all(
        (ref.dtype, ref.offset, ref.size, ref.stride)
        == (first.dtype, first.offset, first.size, first.stride)
        for _, ref in group[1:]
    )


def _tied_mismatch(name: str) -> TensorMismatchError:
    return TensorMismatchError(
        f"tensor {name!r} shares memory with another tensor (tied weights) or with itself"
        " (an expanded view), and the new values disagree"
    )


def _stream_storage(
    archive: TorchArchive,
    writer: ZipWriter,
    info: zipfile.ZipInfo,
    group: Sequence[Tuple[str, TensorRef]],
    values: NewValues,
) -> None:
    """Writes a storage whose tensors are one contiguous view: new bytes, old bytes around."""
    key = group[0][1].storage.key
    ref = group[0][1]
    itemsize = dtype_facts(ref.dtype).itemsize
    begin = ref.offset * itemsize
    nbytes = math.prod(ref.size) * itemsize
    unit = archive.swap_unit(key)
    for piece in archive.iter_record(info, 0, begin):
        writer.write(piece)
    buf = memoryview(bytearray(min(CHUNK_BYTES, nbytes)))
    other = memoryview(bytearray(min(CHUNK_BYTES, nbytes) if len(group) > 1 else 0))
    done = 0
    while done < nbytes:
        n = min(len(buf), nbytes - done)
        piece = buf[:n]
        values.read(group[0][0], done, piece)
        for name, _ in group[1:]:
            values.read(name, done, other[:n])
            if other[:n] != piece:
                raise _tied_mismatch(name)
        swap_bytes(piece, unit)
        writer.write(piece)
        done += n
    for piece in archive.iter_record(info, begin + nbytes, info.file_size - begin - nbytes):
        writer.write(piece)


def _scatter_storage(
    archive: TorchArchive,
    writer: ZipWriter,
    info: zipfile.ZipInfo,
    group: Sequence[Tuple[str, TensorRef]],
    values: NewValues,
) -> None:
    """Writes a storage shared in some other way: read it, write each view, check, write."""
    key = group[0][1].storage.key
    unit = archive.swap_unit(key)
    storage = bytearray(info.file_size)
    archive.read_range(info, 0, memoryview(storage))
    swap_bytes(storage, unit)  # little-endian while the new values go in
    for name, ref in group:
        nbytes = math.prod(ref.size) * dtype_facts(ref.dtype).itemsize
        if nbytes:
            new = bytearray(nbytes)
            values.read(name, 0, memoryview(new))
            scatter(storage, dtype_facts(ref.dtype).itemsize, ref, new)
    # Shared bytes (tied weights, expanded views) must get consistent values, or part of
    # a new value would be silently lost.
    for name, ref in group:
        itemsize = dtype_facts(ref.dtype).itemsize
        nbytes = math.prod(ref.size) * itemsize
        if nbytes and (len(group) > 1 or may_overlap(ref.size, ref.stride)):
            new = bytearray(nbytes)
            values.read(name, 0, memoryview(new))
            if b"".join(gather(storage, itemsize, ref, 0)) != new:
                raise _tied_mismatch(name)
    swap_bytes(storage, unit)
    mv = memoryview(storage)
    for i in range(0, len(storage), CHUNK_BYTES):
        writer.write(mv[i : i + CHUNK_BYTES])


def rewrite_archive(archive: TorchArchive, out: Sink, values: NewValues) -> None:
    """Copies ``archive`` into ``out`` with each named tensor's data from ``values``.

    Only storage records change; the pickle and every other record are copied as they
    are (stored, in the template's order), in torch's zip layout, with a new
    serialization id. The caller has checked names, shapes and dtypes.

    Raises:
        TensorMismatchError: tensors that share memory get values that disagree.
        ModelFormatError: a template record is corrupt.
        OSError: writing fails.
    """
    groups = archive.by_storage()
    writer = ZipWriter(out)
    prefix = archive.prefix + "/"
    for rel, info in archive.records.items():
        if rel == ".data/serialization_id":
            continue  # a new archive gets a new id
        key = rel[len("data/") :] if rel.startswith("data/") else None
        group = groups.get(key) if key is not None else None
        writer.start(prefix + rel, info.file_size)
        if group is None:
            for piece in archive.iter_record(info):
                writer.write(piece)
        elif _streamable(group):
            _stream_storage(archive, writer, info, group, values)
        else:
            _scatter_storage(archive, writer, info, group, values)
        writer.end()
    if "version" not in archive.records and ".data/version" not in archive.records:
        writer.record(prefix + "version", b"3\n")  # as torch's writer adds it
    writer.record(prefix + ".data/serialization_id", serialization_id(writer.names, writer.crcs))
    writer.finish()
