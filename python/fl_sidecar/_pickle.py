"""The restricted pickle reader, at its old path: the code lives in :mod:`fl_sidecar.modelfiles`.

The unpickler and its allow-list are in :mod:`~fl_sidecar.modelfiles.pickle_reader`, the
opcode pre-scan in :mod:`~fl_sidecar.modelfiles.pickle_scan`, the records it gives back in
:mod:`~fl_sidecar.modelfiles.pickle_objects`, the budgets in
:mod:`~fl_sidecar.modelfiles.limits`. Every name this module had is re-exported here (the
same objects).
"""

from __future__ import annotations

from fl_sidecar.modelfiles.limits import (
    DEFAULT_LIMITS,
    STOP_CHECK_INTERVAL,
    ReadLimits,
    StopCheck,
    check_stop,
)
from fl_sidecar.modelfiles.pickle_objects import (
    DtypeName,
    Placeholder,
    PlaceholderMeta,
    SafeOrderedDict,
    StorageRef,
    StorageType,
    TensorRef,
)
from fl_sidecar.modelfiles.pickle_reader import (
    DTYPE_ALIASES,
    STORAGE_DTYPES,
    RestrictedUnpickler,
    restricted_loads,
)
from fl_sidecar.modelfiles.pickle_scan import PickleStats, scan_pickle

__all__ = [
    "DEFAULT_LIMITS",
    "DTYPE_ALIASES",
    "STOP_CHECK_INTERVAL",
    "STORAGE_DTYPES",
    "DtypeName",
    "PickleStats",
    "Placeholder",
    "PlaceholderMeta",
    "ReadLimits",
    "RestrictedUnpickler",
    "SafeOrderedDict",
    "StopCheck",
    "StorageRef",
    "StorageType",
    "TensorRef",
    "check_stop",
    "restricted_loads",
    "scan_pickle",
]
