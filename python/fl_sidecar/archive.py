"""Torch-free model files, at their old path: the code lives in :mod:`fl_sidecar.modelfiles`.

Every name this module had is re-exported here (the same objects): format detection and
describing (:mod:`~fl_sidecar.modelfiles.vetting`), the safetensors header
(:mod:`~fl_sidecar.modelfiles.safetensors`), archive <-> safetensors conversion
(:mod:`~fl_sidecar.modelfiles.convert`), rewriting an archive's tensors
(:mod:`~fl_sidecar.modelfiles.rewrite`), opening an archive
(:mod:`~fl_sidecar.modelfiles.torch_archive`), files and buffers
(:mod:`~fl_sidecar.modelfiles.fileio`), dtypes and read budgets. Importing it loads no
torch and no numpy.
"""

from __future__ import annotations

from fl_sidecar.modelfiles.convert import archive_to_safetensors, safetensors_into_archive
from fl_sidecar.modelfiles.dtypes import SAFETENSORS_DTYPES, dtype_itemsize
from fl_sidecar.modelfiles.fileio import (
    CHUNK_BYTES,
    PathLike,
    Source,
    WrittenFile,
    atomic_write,
    open_source,
    read_exact,
)
from fl_sidecar.modelfiles.formats import ModelFormat
from fl_sidecar.modelfiles.limits import DEFAULT_LIMITS, ReadLimits
from fl_sidecar.modelfiles.rewrite import NewValues, check_against, rewrite_archive
from fl_sidecar.modelfiles.safetensors import (
    SafetensorsEntry,
    read_safetensors_header,
    safetensors_header,
)
from fl_sidecar.modelfiles.torch_archive import open_archive
from fl_sidecar.modelfiles.vetting import (
    ArchiveDescription,
    TensorInfo,
    describe,
    detect_format,
    list_tensors,
)

__all__ = [
    "CHUNK_BYTES",
    "DEFAULT_LIMITS",
    "SAFETENSORS_DTYPES",
    "ArchiveDescription",
    "ModelFormat",
    "NewValues",
    "PathLike",
    "ReadLimits",
    "SafetensorsEntry",
    "Source",
    "TensorInfo",
    "WrittenFile",
    "archive_to_safetensors",
    "atomic_write",
    "check_against",
    "describe",
    "detect_format",
    "dtype_itemsize",
    "list_tensors",
    "open_archive",
    "open_source",
    "read_exact",
    "read_safetensors_header",
    "rewrite_archive",
    "safetensors_header",
    "safetensors_into_archive",
]
