"""Model files: torch archives and safetensors, vetted and converted without torch.

The sidecar vets and converts models without importing torch (about 200 MiB of RSS and
seconds of start-up): importing this package loads only the standard library. Its
modules, one job each, from the bottom up:

======================  =============================================================
``dtypes``              element sizes, byte-swap units and safetensors names of dtypes
``formats``             :class:`ModelFormat` and the magic bytes that tell them apart
``fileio``              bytes-or-path sources, exact reads, atomic hashed writes
``limits``              :class:`ReadLimits` budgets and the cancellation check
``pickle_objects``      what the restricted reader gives back (tensor and storage records)
``pickle_scan``         the opcode pre-scan that enforces the budgets first
``pickle_reader``       the restricted unpickler and its allow-list (imports, runs nothing)
``strided``             strided views over raw storage bytes, gather, scatter, byte swap
``safetensors``         the safetensors header: reading, checking, making
``zipcheck``            the strict zip layout (:class:`~fl_sidecar.errors.AmbiguousArchiveError`)
``zipwriter``           a zip writer with torch's layout (64-byte aligned records)
``tensor_walk``         naming the tensors as ``state_dict()`` would
``torch_archive``       an archive opened for restricted reading: records, storages
``vetting``             :func:`detect_format`, :func:`describe`, :func:`list_tensors`
``rewrite``             new tensor values into a copy of an archive
``convert``             :func:`archive_to_safetensors`, :func:`safetensors_into_archive`
``torch_io``            with torch: tensors, modules, safetensors, :func:`load_trusted`
``aggregate``           with torch: FedAvg of state_dicts and of archive files
======================  =============================================================

``torch_io`` and ``aggregate`` import torch and are not imported here; their names are
also at the old path :mod:`fl_sidecar.models`. The names below are also at
:mod:`fl_sidecar.archive` and :mod:`fl_sidecar._pickle`.
"""

from __future__ import annotations

from fl_sidecar.modelfiles.convert import archive_to_safetensors, safetensors_into_archive
from fl_sidecar.modelfiles.dtypes import SAFETENSORS_DTYPES, dtype_itemsize
from fl_sidecar.modelfiles.fileio import (
    CHUNK_BYTES,
    WrittenFile,
    atomic_write,
    open_source,
    read_exact,
)
from fl_sidecar.modelfiles.formats import ModelFormat
from fl_sidecar.modelfiles.limits import DEFAULT_LIMITS, ReadLimits, StopCheck
from fl_sidecar.modelfiles.rewrite import NewValues, check_against, rewrite_archive
from fl_sidecar.modelfiles.safetensors import (
    SafetensorsEntry,
    read_safetensors_header,
    safetensors_header,
)
from fl_sidecar.modelfiles.torch_archive import TorchArchive, open_archive
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
    "ReadLimits",
    "SafetensorsEntry",
    "StopCheck",
    "TensorInfo",
    "TorchArchive",
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
