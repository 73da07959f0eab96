"""The old paths of the model files (archive, _pickle, models) keep every name they had."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import List

import pytest

import fl_sidecar.modelfiles
from fl_sidecar.modelfiles import (
    aggregate,
    convert,
    limits,
    pickle_objects,
    pickle_reader,
    pickle_scan,
    torch_io,
    vetting,
)

# Every name each old module exported before the split, as it did.
OLD_NAMES = {
    "fl_sidecar.archive": [
        "CHUNK_BYTES",
        "DEFAULT_LIMITS",
        "SAFETENSORS_DTYPES",
        "ArchiveDescription",
        "ModelFormat",
        "NewValues",
        "ReadLimits",
        "SafetensorsEntry",
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
    ],
    "fl_sidecar._pickle": [
        "DEFAULT_LIMITS",
        "DtypeName",
        "Placeholder",
        "PlaceholderMeta",
        "ReadLimits",
        "RestrictedUnpickler",
        "StopCheck",
        "StorageRef",
        "TensorRef",
        "check_stop",
        "restricted_loads",
        "scan_pickle",
        "STOP_CHECK_INTERVAL",
        "SafeOrderedDict",
    ],
    "fl_sidecar.models": [
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
    ],
}

NEW_HOMES: List[ModuleType] = [
    fl_sidecar.modelfiles,
    limits,
    pickle_objects,
    pickle_reader,
    pickle_scan,
    torch_io,
    aggregate,
]


@pytest.mark.parametrize("old", sorted(OLD_NAMES))
def test_old_path_exports_the_very_objects_of_the_new_modules(old: str) -> None:
    module = importlib.import_module(old)
    assert set(OLD_NAMES[old]) <= set(module.__all__)
    for name in module.__all__:
        value = getattr(module, name)
        homes = [home for home in NEW_HOMES if getattr(home, name, None) is value]
        assert homes, f"{old}.{name} is not the object of a modelfiles module"


def test_models_keeps_its_torch_and_torch_free_describe_apart() -> None:
    import fl_sidecar.models as models

    # models.describe gives torch dtypes, as before; the package's describe gives names.
    assert models.describe is torch_io.describe
    assert fl_sidecar.modelfiles.describe is vetting.describe
    assert models.archive_to_safetensors is convert.archive_to_safetensors
