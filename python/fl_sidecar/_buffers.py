"""Checks shared by the codec's Python faces: buffers and sizes handed to the native module."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union, cast

if TYPE_CHECKING:
    import numpy.typing
    from typing_extensions import Buffer as _Buffer

    # numpy arrays export the buffer protocol, but numpy's stubs only say so for 3.12+.
    Buffer = Union[_Buffer, "numpy.typing.NDArray[Any]"]

__all__ = ["check_count", "contiguous"]


def check_count(name: str, value: int) -> int:
    # The binding takes unsigned sizes; a negative one would surface as OverflowError.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def contiguous(data: Buffer) -> _Buffer:
    """Checks ``data`` is a C-contiguous buffer (TypeError / ValueError otherwise)."""
    if isinstance(data, (bytes, bytearray)):
        return data
    view = memoryview(cast("_Buffer", data))  # TypeError without the buffer protocol
    if not view.c_contiguous:
        raise ValueError(
            "data must be a C-contiguous buffer; copy it first "
            "(bytes(...), numpy.ascontiguousarray(...))"
        )
    return cast("_Buffer", data)
