"""The dtypes a model file may hold: element sizes, byte-swap units, safetensors names.

Dtypes are carried as torch's names (``"float32"``, ``"bfloat16"``), as the restricted
reader gives them; nothing here imports torch.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional

from fl_sidecar.errors import ModelFormatError

__all__ = ["SAFETENSORS_DTYPES", "dtype_itemsize"]


class DtypeFacts(NamedTuple):
    itemsize: int  # bytes per element
    swap_unit: int  # bytes swapped as one number on a byte-order change (complex: a part)
    safetensors: Optional[str]  # the safetensors name, or None when it has none


# Canonical torch dtype names (as the restricted pickle reader gives them) -> facts.
DTYPES: Dict[str, DtypeFacts] = {
    "float64": DtypeFacts(8, 8, "F64"),
    "float32": DtypeFacts(4, 4, "F32"),
    "float16": DtypeFacts(2, 2, "F16"),
    "bfloat16": DtypeFacts(2, 2, "BF16"),
    "int64": DtypeFacts(8, 8, "I64"),
    "int32": DtypeFacts(4, 4, "I32"),
    "int16": DtypeFacts(2, 2, "I16"),
    "int8": DtypeFacts(1, 1, "I8"),
    "uint8": DtypeFacts(1, 1, "U8"),
    "bool": DtypeFacts(1, 1, "BOOL"),
    "uint16": DtypeFacts(2, 2, "U16"),
    "uint32": DtypeFacts(4, 4, "U32"),
    "uint64": DtypeFacts(8, 8, "U64"),
    "float8_e4m3fn": DtypeFacts(1, 1, "F8_E4M3"),
    "float8_e5m2": DtypeFacts(1, 1, "F8_E5M2"),
    "float8_e4m3fnuz": DtypeFacts(1, 1, "F8_E4M3FNUZ"),
    "float8_e5m2fnuz": DtypeFacts(1, 1, "F8_E5M2FNUZ"),
    "complex64": DtypeFacts(8, 4, "C64"),
    "complex128": DtypeFacts(16, 8, None),
}
# safetensors name -> canonical torch dtype name.
SAFETENSORS_DTYPES: Dict[str, str] = {
    d.safetensors: name for name, d in DTYPES.items() if d.safetensors is not None
}


def dtype_facts(name: str) -> DtypeFacts:
    found = DTYPES.get(name)
    if found is None:
        raise ModelFormatError(f"unknown dtype {name}")
    return found


def dtype_itemsize(name: str) -> int:
    """Bytes per element of a dtype named as torch names it (``"bfloat16"`` -> 2).

    Raises:
        ModelFormatError: not a dtype this module knows.
    """
    return dtype_facts(name).itemsize
