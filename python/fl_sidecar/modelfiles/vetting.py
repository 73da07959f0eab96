"""What a model file is and holds, read without running anything: the vetting step.

:func:`detect_format` tells the format from the bytes; :func:`describe` reads a torch
archive's zip directory and pickle (restricted) and names its tensors, without their
data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from fl_sidecar.errors import ModelFormatError
from fl_sidecar.modelfiles.dtypes import dtype_itemsize
from fl_sidecar.modelfiles.fileio import Source, read_head, source_size
from fl_sidecar.modelfiles.formats import LEGACY_MAGIC, ZIP_MAGIC, ModelFormat, legacy_format_error
from fl_sidecar.modelfiles.limits import DEFAULT_LIMITS, ReadLimits, StopCheck
from fl_sidecar.modelfiles.pickle_objects import Placeholder, SafeOrderedDict, TensorRef
from fl_sidecar.modelfiles.safetensors import safetensors_header_length
from fl_sidecar.modelfiles.strided import contiguous
from fl_sidecar.modelfiles.torch_archive import TorchArchive

__all__ = ["ArchiveDescription", "TensorInfo", "describe", "detect_format", "list_tensors"]


@dataclass(frozen=True)
class TensorInfo:
    """A named tensor of a torch archive, as a view of one storage record; no data read.

    Attributes:
        name: state_dict name (``fc1.weight``).
        dtype: torch dtype name (``"float32"``, ``"bfloat16"``).
        shape: dimensions.
        stride: strides, in elements.
        storage_offset: where the view starts in its storage, in elements.
        storage_key: the storage record (``<prefix>/data/<key>``); tied tensors share one.
    """

    name: str
    dtype: str
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]
    storage_offset: int
    storage_key: str

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.numel * dtype_itemsize(self.dtype)

    @property
    def is_contiguous(self) -> bool:
        """Whether the view's elements lie row-major one after another in its storage."""
        return contiguous(self.shape, self.stride)


@dataclass(frozen=True)
class ArchiveDescription:
    """What a torch archive holds, read without running its pickle.

    Attributes:
        format: TORCH_PICKLE or TORCHSCRIPT.
        root_class: the pickled root object's class as ``module.Name`` (``__main__.Net``,
            ``collections.OrderedDict`` for a state_dict, ``__torch__.Net`` for TorchScript).
        is_module: the root is an ``nn.Module`` (pickled or scripted), not a bare state_dict.
        big_endian: the storages were written by a big-endian machine.
        tensors: the named tensors, in state_dict order.
    """

    format: ModelFormat
    root_class: str
    is_module: bool
    big_endian: bool
    tensors: Dict[str, TensorInfo]


def detect_format(source: Source) -> ModelFormat:
    """Tells how a model (bytes or a file path) is serialized, from its bytes, not its name.

    Reads the zip directory of an archive, not its pickle or data.

    Raises:
        ModelFormatError: it is none of the supported formats: not a zip, a truncated zip,
            a zip without ``data.pkl``, the legacy (pre-1.6) torch format, anything else.
        OSError: the file cannot be read.
    """
    head = read_head(source, 16)
    if head.startswith(ZIP_MAGIC):
        with TorchArchive(source, parse=False) as archive:
            return archive.format
    if safetensors_header_length(head, source_size(source)) is not None:
        return ModelFormat.SAFETENSORS
    if head.startswith(LEGACY_MAGIC[:4]):
        raise legacy_format_error()
    raise ModelFormatError("not a model file: neither a torch zip archive nor safetensors")


def _tensor_info(name: str, ref: TensorRef) -> TensorInfo:
    return TensorInfo(name, ref.dtype, ref.size, ref.stride, ref.offset, ref.storage.key)


def _root_facts(archive: TorchArchive) -> Tuple[str, bool]:
    root = archive.root
    if isinstance(root, Placeholder):
        state = root.state_dict_view()
        is_module = archive.format is ModelFormat.TORCHSCRIPT or (
            state is not None and isinstance(state.get("_parameters"), dict)
        )
        return root.qualified_name, is_module
    if isinstance(root, dict):
        return ("collections.OrderedDict" if isinstance(root, SafeOrderedDict) else "dict"), False
    return type(root).__name__, False


def describe(
    source: Source,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
    should_stop: Optional[StopCheck] = None,
) -> ArchiveDescription:
    """Reads what a torch archive (bytes or path) holds, without its tensor data.

    Only the zip directory and the pickle are read (restricted: nothing it names is
    imported or called), so memory is about the pickle's size, a few MiB for a 1 GiB
    model. This is the vetting step: an archive it accepts is read by ``torch.load``
    as the same records (see :class:`~fl_sidecar.errors.AmbiguousArchiveError`).

    Args:
        source: the archive's bytes, or a path.
        limits: budgets on the reader's work and memory.
        should_stop: called every few thousand steps; True stops the reading.

    Raises:
        AmbiguousArchiveError: another zip or torch reader could read it differently.
        ModelLimitExceededError: reading it would exceed one of ``limits``.
        ModelFormatError: not a torch zip archive, or a malformed one.
        UnsafePickleError: its pickle asks for more than rebuilding tensors; nothing ran.
        ModelReadCancelledError: ``should_stop`` returned True.
        OSError: the file cannot be read.
    """
    with TorchArchive(source, limits=limits, should_stop=should_stop) as archive:
        root_class, is_module = _root_facts(archive)
        tensors = {name: _tensor_info(name, ref) for name, ref in archive.tensors.items()}
        return ArchiveDescription(
            archive.format, root_class, is_module, archive.big_endian, tensors
        )


def list_tensors(source: Source) -> Dict[str, TensorInfo]:
    """The named tensors of an archive (bytes or path), in state_dict order, without data.

    Raises:
        ModelFormatError, UnsafePickleError, OSError: as :func:`describe`.
    """
    return describe(source).tensors
