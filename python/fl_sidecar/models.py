"""Model I/O with torch, at its old path: the code lives in :mod:`fl_sidecar.modelfiles`.

Tensors, modules, safetensors and :func:`load_trusted` are in
:mod:`~fl_sidecar.modelfiles.torch_io`, FedAvg in :mod:`~fl_sidecar.modelfiles.aggregate`
(the only modules that import torch); :func:`detect_format`,
:func:`archive_to_safetensors`, :func:`safetensors_into_archive` and
:class:`ModelFormat` are the torch-free ones of :mod:`fl_sidecar.modelfiles`. Every name
this module had is re-exported here (the same objects). Importing it imports torch.
"""

from __future__ import annotations

from fl_sidecar.modelfiles.aggregate import average_archives, weighted_average
from fl_sidecar.modelfiles.convert import archive_to_safetensors, safetensors_into_archive
from fl_sidecar.modelfiles.formats import ModelFormat
from fl_sidecar.modelfiles.torch_io import (
    ArchiveInfo,
    TensorSpec,
    describe,
    dump_module,
    from_safetensors,
    list_tensors,
    load_trusted,
    module_from_state_dict,
    read_tensors,
    save_module,
    to_safetensors,
    write_tensors,
)
from fl_sidecar.modelfiles.vetting import detect_format

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
