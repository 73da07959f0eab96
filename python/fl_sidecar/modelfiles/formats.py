"""The model file formats and the magic bytes that tell them apart."""

from __future__ import annotations

import enum

from fl_sidecar.errors import ModelFormatError

__all__ = ["ModelFormat"]

ZIP_MAGIC = b"PK\x03\x04"
# The pre-1.6 torch.save format: a bare pickle stream starting with a magic number.
LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class ModelFormat(enum.Enum):
    """How a model file is serialized."""

    TORCH_PICKLE = "torch"
    """``torch.save`` zip archive (pickled module or state_dict)."""
    TORCHSCRIPT = "torchscript"
    """``torch.jit.save`` zip archive."""
    SAFETENSORS = "safetensors"
    """safetensors: an 8-byte header length, a JSON header, raw little-endian data."""


def legacy_format_error() -> ModelFormatError:
    """The error for a pre-1.6 torch file or a bare pickle (what the legacy magic starts)."""
    return ModelFormatError(
        "this is a legacy (pre-1.6) torch file or a bare pickle; only zip archives are"
        " supported (re-save it with a current torch)"
    )
