"""What the restricted pickle reader gives back: records of storages and tensors, placeholders.

None of these runs anything of what the pickle names: a :class:`TensorRef` only records
the view a tensor would be, a :class:`Placeholder` keeps an unknown object's pickled
state as plain data, and calling a placeholder class is refused.
"""

from __future__ import annotations

import collections
from typing import Any, Dict, Optional, Tuple

from fl_sidecar.errors import ModelFormatError, UnsafePickleError

__all__ = [
    "DtypeName",
    "Placeholder",
    "PlaceholderMeta",
    "SafeOrderedDict",
    "StorageRef",
    "StorageType",
    "TensorRef",
]

_MAX_DIMS = 64
_INT64_LIMIT = 2**63


class DtypeName(str):
    """A dtype named by the pickle, as its canonical torch name (``"float32"``)."""

    __slots__ = ()


class StorageType:
    """The storage class a persistent id names (``torch.FloatStorage``), as its dtype name."""

    __slots__ = ("dtype", "untyped")

    def __init__(self, dtype: str, *, untyped: bool = False) -> None:
        self.dtype = dtype
        self.untyped = untyped

    def __setstate__(self, state: object) -> None:
        raise ModelFormatError("the pickle gives state to a storage type")


class StorageRef:
    """One storage record of the archive (``<prefix>/data/<key>``).

    Attributes:
        key: the record's key.
        dtype: the element dtype name the storage was saved with (``"uint8"`` when untyped).
        numel: the number of elements of that dtype (bytes when untyped).
        location: the device tag it was saved from (``"cpu"``, ``"cuda:0"``).
    """

    __slots__ = ("dtype", "key", "location", "numel")

    def __init__(self, key: str, dtype: str, numel: int, location: str) -> None:
        self.key = key
        self.dtype = dtype
        self.numel = numel
        self.location = location

    def __setstate__(self, state: object) -> None:
        raise ModelFormatError("the pickle gives state to a storage")


class TensorRef:
    """A tensor the pickle would rebuild: a strided view of a storage, not yet read.

    Attributes:
        storage: the storage it views.
        dtype: its dtype name (the storage's, unless rebuilt with an explicit dtype).
        offset: the view's offset, in elements.
        size: its shape.
        stride: its strides, in elements.
        requires_grad: as pickled.
        is_parameter: rebuilt as an ``nn.Parameter``.
    """

    __slots__ = ("dtype", "is_parameter", "offset", "requires_grad", "size", "storage", "stride")

    def __init__(
        self,
        storage: StorageRef,
        dtype: str,
        offset: int,
        size: Tuple[int, ...],
        stride: Tuple[int, ...],
        requires_grad: bool,
    ) -> None:
        self.storage = storage
        self.dtype = dtype
        self.offset = offset
        self.size = size
        self.stride = stride
        self.requires_grad = requires_grad
        self.is_parameter = False

    def __setstate__(self, state: object) -> None:
        raise ModelFormatError("the pickle gives state to a tensor")


class PlaceholderMeta(type):
    """Metaclass of placeholder classes: calling one (pickle REDUCE) is refused.

    An unknown global may be a class (rebuilt with NEWOBJ + BUILD, which never runs
    its code) or any function (``os.system``); the pickle calling it is exactly
    the attack, so it is never allowed.
    """

    pickle_module: str
    pickle_name: str

    def __call__(cls, *args: object, **kwargs: object) -> Any:
        raise UnsafePickleError(
            f"the pickle calls {cls.pickle_module}.{cls.pickle_name}(...), which the restricted"
            " reader does not run"
        )


class Placeholder(metaclass=PlaceholderMeta):
    """An inert stand-in for an object of a class the reader does not import.

    Attributes:
        pickle_args: the arguments NEWOBJ passed (usually empty).
        pickle_state: what BUILD gave it (for modules: their ``__dict__``), or None.
    """

    pickle_module = ""
    pickle_name = ""

    def __new__(cls, *args: object, **kwargs: object) -> Placeholder:
        # NEWOBJ calls cls.__new__ directly, bypassing the metaclass: this only
        # records the arguments, it runs nothing of the named class.
        inst = object.__new__(cls)
        inst.__dict__["pickle_args"] = (args, kwargs)
        inst.__dict__["pickle_state"] = None
        return inst

    def __setstate__(self, state: object) -> None:
        self.__dict__["pickle_state"] = state

    @property
    def qualified_name(self) -> str:
        """The class the pickle named, as ``module.Name``."""
        return f"{type(self).pickle_module}.{type(self).pickle_name}"

    def state_dict_view(self) -> Optional[Dict[Any, Any]]:
        """The BUILD state when it is a dict (the object's ``__dict__``), else None.

        A (dict, slots) pair, as pickle writes for objects with ``__slots__``, gives its dict.
        """
        state = self.__dict__["pickle_state"]
        if isinstance(state, dict):
            return state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            return state[0]
        return None


class SafeOrderedDict(collections.OrderedDict):  # type: ignore[type-arg]
    """An OrderedDict whose BUILD state (a state_dict's ``_metadata``) is kept as data."""

    pickle_state: object = None

    def __setstate__(self, state: object) -> None:
        self.pickle_state = state


def check_int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelFormatError(f"the pickle gives a non-integer {what}: {type(value).__name__}")
    if value < 0:
        raise ModelFormatError(f"the pickle gives a negative {what}: {value}")
    if value >= _INT64_LIMIT:  # torch's sizes are int64: a larger one is no tensor
        raise ModelFormatError(f"the pickle gives an implausibly large {what}")
    return value


def check_dims(value: object, what: str) -> Tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > _MAX_DIMS:
        raise ModelFormatError(f"the pickle gives an invalid tensor {what}")
    return tuple(check_int(v, what) for v in value)
