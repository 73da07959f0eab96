"""A restricted unpickler for the ``data.pkl`` of torch archives: it never runs the pickle.

torch archives (``torch.save`` of a module or a state_dict, ``torch.jit.save``)
hold one pickle that rebuilds the object graph, plus one zip record per tensor
storage. Unpickling that graph with :mod:`pickle` imports and calls whatever the
pickle names, which is how a malicious model runs code on the machine that loads
it. This module reads the same pickle with an unpickler that

- imports nothing: :meth:`RestrictedUnpickler.find_class` answers every global
  from a fixed table of inert stand-ins, or with a placeholder class, or refuses;
- calls nothing but its own stand-ins for torch's tensor and storage rebuild
  functions, which only *record* what the tensor would be (:class:`TensorRef`,
  :class:`StorageRef`); calling any other global raises
  :class:`~fl_sidecar.errors.UnsafePickleError` before anything happens;
- turns objects of unknown classes (the model's own ``__main__.Net``,
  ``torch.nn.modules.linear.Linear``, TorchScript's ``__torch__.*``) into
  :class:`Placeholder` instances that keep their pickled state as plain data.

It does not import torch: dtypes are carried as names (``"float32"``), and
:mod:`~fl_sidecar.modelfiles.torch_io` turns the records into tensors.

Before the unpickler sees a byte, :func:`~fl_sidecar.modelfiles.pickle_scan.scan_pickle`
walks the opcodes once and enforces the budgets of
:class:`~fl_sidecar.modelfiles.limits.ReadLimits` that the C unpickler itself has no way
to: the number of opcodes (its memory), memo indices (``LONG_BINPUT 2**31`` would
make it allocate a 16 GiB memo table), open MARKs and stack size, and how deeply
tuples nest (hashing a tuple nested a million deep, as a dict key does, overflows
the C stack and kills the process).
"""

from __future__ import annotations

import io
import pickle
import re
from typing import Any, Callable, Dict, Optional, Tuple

from fl_sidecar.errors import ModelFormatError, UnsafePickleError
from fl_sidecar.modelfiles.limits import DEFAULT_LIMITS, ReadLimits, StopCheck
from fl_sidecar.modelfiles.pickle_objects import (
    DtypeName,
    Placeholder,
    PlaceholderMeta,
    SafeOrderedDict,
    StorageRef,
    StorageType,
    TensorRef,
    check_dims,
    check_int,
)
from fl_sidecar.modelfiles.pickle_scan import scan_pickle

__all__ = ["DTYPE_ALIASES", "STORAGE_DTYPES", "RestrictedUnpickler", "restricted_loads"]

# Legacy typed-storage class names (``torch.FloatStorage``) -> dtype name.
STORAGE_DTYPES: Dict[str, str] = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}

# dtype attribute names of the torch module that a pickle may name (``torch.float32``),
# mapped to one canonical name each.
DTYPE_ALIASES: Dict[str, str] = {
    "float64": "float64",
    "double": "float64",
    "float32": "float32",
    "float": "float32",
    "float16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "long": "int64",
    "int32": "int32",
    "int": "int32",
    "int16": "int16",
    "short": "int16",
    "int8": "int8",
    "uint8": "uint8",
    "uint16": "uint16",
    "uint32": "uint32",
    "uint64": "uint64",
    "bool": "bool",
    "complex128": "complex128",
    "cdouble": "complex128",
    "complex64": "complex64",
    "cfloat": "complex64",
    "float8_e4m3fn": "float8_e4m3fn",
    "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz",
    "float8_e5m2fnuz": "float8_e5m2fnuz",
}

# Modules whose globals are refused outright, even as inert placeholders: naming them
# in a model pickle has no honest purpose.
_FORBIDDEN_MODULES = frozenset(
    {
        "os",
        "posix",
        "nt",
        "subprocess",
        "sys",
        "builtins",
        "__builtin__",
        "importlib",
        "shutil",
        "socket",
        "pickle",
        "_pickle",
        "marshal",
        "types",
        "ctypes",
        "io",
        "_io",
        "operator",
        "_operator",
        "functools",
        "runpy",
        "code",
        "codeop",
        "codecs",
        "_codecs",
        "pty",
        "webbrowser",
        "platform",
        "multiprocessing",
        "threading",
        "_thread",
        "signal",
        "tempfile",
        "glob",
        "pathlib",
        "inspect",
        "pdb",
        "timeit",
        "copyreg",
        "copy_reg",
        "asyncio",
        "http",
        "urllib",
        "requests",
        "pip",
        "setuptools",
        "zipimport",
    }
)
_FORBIDDEN_PREFIXES = tuple(m + "." for m in _FORBIDDEN_MODULES)

_STORAGE_KEY = re.compile(r"\A[A-Za-z0-9_]{1,64}\Z")


def _make_tensor(
    storage: object, offset: object, size: object, stride: object, dtype: Optional[str]
) -> TensorRef:
    if not isinstance(storage, StorageRef):
        raise ModelFormatError("the pickle rebuilds a tensor from something that is not a storage")
    dims = check_dims(size, "size")
    strides = check_dims(stride, "stride")
    if len(dims) != len(strides):
        raise ModelFormatError("the pickle gives a tensor whose size and stride differ in rank")
    return TensorRef(
        storage, dtype or storage.dtype, check_int(offset, "storage offset"), dims, strides, False
    )


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object) -> TensorRef:
    return _make_tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v2(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object = False,
    backward_hooks: object = None,
    metadata: object = None,
) -> TensorRef:
    tensor = _make_tensor(storage, offset, size, stride, None)
    tensor.requires_grad = bool(requires_grad is True)
    return tensor


def _rebuild_tensor_v3(
    storage: object,
    offset: object,
    size: object,
    stride: object,
    requires_grad: object,
    backward_hooks: object,
    dtype: object,
    metadata: object = None,
) -> TensorRef:
    if not isinstance(dtype, DtypeName):
        raise ModelFormatError("the pickle rebuilds a tensor with an unknown dtype")
    tensor = _make_tensor(storage, offset, size, stride, str(dtype))
    tensor.requires_grad = bool(requires_grad is True)
    return tensor


def _rebuild_parameter(data: object, requires_grad: object, backward_hooks: object) -> TensorRef:
    if not isinstance(data, TensorRef):
        raise ModelFormatError(
            "the pickle rebuilds a parameter from something that is not a tensor"
        )
    data.is_parameter = True
    data.requires_grad = bool(requires_grad is True)
    return data


def _rebuild_parameter_with_state(
    data: object, requires_grad: object, backward_hooks: object, state: object
) -> TensorRef:
    # The state holds Python attributes set on the Parameter; they are not weights.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


class _TensorClass:
    """``torch.Tensor`` / ``torch.nn.Parameter`` as named by ``_rebuild_from_type_v2``."""

    __slots__ = ("is_parameter",)

    def __init__(self, is_parameter: bool) -> None:
        self.is_parameter = is_parameter

    def __setstate__(self, state: object) -> None:
        raise ModelFormatError("the pickle gives state to a tensor class")


class _Allowed:
    """An allow-listed function as the unpickler sees it: callable, but not changeable.

    A plain function object would let a pickle's BUILD set its attributes
    (``__defaults__``...), changing it for every later archive; this wrapper has no
    ``__dict__`` and refuses state.
    """

    __slots__ = ("_func", "_name")

    def __init__(self, name: str, func: Callable[..., Any]) -> None:
        self._name = name
        self._func = func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._func(*args, **kwargs)

    def __setstate__(self, state: object) -> None:
        raise UnsafePickleError(f"the pickle tries to change {self._name}")


_REBUILD_FUNCTIONS: Dict[str, Callable[..., TensorRef]] = {
    "_rebuild_tensor": _rebuild_tensor,
    "_rebuild_tensor_v2": _rebuild_tensor_v2,
    "_rebuild_tensor_v3": _rebuild_tensor_v3,
    "_rebuild_parameter": _rebuild_parameter,
    "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
}
_REBUILD_ALLOWED: Dict[str, _Allowed] = {
    name: _Allowed(f"torch._utils.{name}", func) for name, func in _REBUILD_FUNCTIONS.items()
}
_REBUILD_CALLABLES = frozenset(_REBUILD_ALLOWED.values())


def _rebuild_from_type_v2(func: object, new_type: object, args: object, state: object) -> TensorRef:
    # torch uses this for tensors that carry Python attributes or are subclasses; only
    # the plain Tensor and Parameter types are accepted, and func must be one of ours.
    if func not in _REBUILD_CALLABLES or not isinstance(new_type, _TensorClass):
        raise UnsafePickleError("the pickle rebuilds a tensor through an unknown function or type")
    if not isinstance(args, tuple):
        raise ModelFormatError("the pickle rebuilds a tensor with invalid arguments")
    tensor = func(*args)
    if not isinstance(tensor, TensorRef):  # pragma: no cover - our functions return TensorRef
        raise ModelFormatError("the pickle rebuilds something that is not a tensor")
    if new_type.is_parameter:
        tensor.is_parameter = True
    return tensor


def _torch_size(dims: object = ()) -> Tuple[int, ...]:
    return check_dims(dims, "torch.Size")


class _Device(str):
    __slots__ = ()


def _torch_device(kind: object, index: object = None) -> _Device:
    if not isinstance(kind, str) or (index is not None and not isinstance(index, int)):
        raise ModelFormatError("the pickle builds an invalid torch.device")
    return _Device(kind if index is None else f"{kind}:{index}")


def _jit_list(data: object) -> object:
    # TorchScript tags typed lists (List[int], List[Tensor]...) with these identity
    # functions of torch.jit._pickle; the value is the list itself.
    if not isinstance(data, list):
        raise ModelFormatError("the pickle builds a TorchScript list from a non-list")
    return data


def _jit_type_tag(value: object, type_str: object) -> object:
    if not isinstance(type_str, str):
        raise ModelFormatError("the pickle gives a TorchScript type tag that is not a string")
    return value


def _safe_set(items: object = ()) -> set[Any]:
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise ModelFormatError("the pickle builds a set from something that is not a sequence")
    return set(items)


def _safe_frozenset(items: object = ()) -> frozenset[Any]:
    return frozenset(_safe_set(items))


def _codecs_encode(text: object, encoding: object = "utf-8") -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(str, "latin1"): only that is allowed.
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError("the pickle calls _codecs.encode with unexpected arguments")
    return text.encode("latin1")


class _ObjectType:
    """``builtins.object`` as named by protocol 0/1 pickles (only for _reconstructor)."""

    __slots__ = ()

    def __setstate__(self, state: object) -> None:
        raise ModelFormatError("the pickle gives state to builtins.object")


_OBJECT = _ObjectType()


def _reconstructor(cls: object, base: object, state: object) -> Placeholder:
    # Protocols 0 and 1 rebuild objects as copyreg._reconstructor(cls, object, None),
    # i.e. object.__new__(cls); only placeholder classes are accepted.
    if (
        not isinstance(cls, type)
        or not issubclass(cls, Placeholder)
        or base is not _OBJECT
        or state is not None
    ):
        raise UnsafePickleError("the pickle calls copyreg._reconstructor with unexpected arguments")
    return cls.__new__(cls)


# (module, name) -> the inert object find_class hands the unpickler instead.
_ALLOWED: Dict[Tuple[str, str], Any] = {
    ("collections", "OrderedDict"): SafeOrderedDict,
    ("torch._utils", "_rebuild_from_type_v2"): _Allowed(
        "torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2
    ),
    ("torch._tensor", "_rebuild_from_type_v2"): _Allowed(
        "torch._tensor._rebuild_from_type_v2", _rebuild_from_type_v2
    ),
    ("torch", "Tensor"): _TensorClass(False),
    ("torch._tensor", "Tensor"): _TensorClass(False),
    ("torch.nn.parameter", "Parameter"): _TensorClass(True),
    ("torch", "Size"): _Allowed("torch.Size", _torch_size),
    ("torch", "device"): _Allowed("torch.device", _torch_device),
    ("builtins", "set"): _Allowed("set", _safe_set),
    ("__builtin__", "set"): _Allowed("set", _safe_set),
    ("builtins", "frozenset"): _Allowed("frozenset", _safe_frozenset),
    ("__builtin__", "frozenset"): _Allowed("frozenset", _safe_frozenset),
    ("_codecs", "encode"): _Allowed("_codecs.encode", _codecs_encode),
    ("copy_reg", "_reconstructor"): _Allowed("copyreg._reconstructor", _reconstructor),
    ("copyreg", "_reconstructor"): _Allowed("copyreg._reconstructor", _reconstructor),
    ("__builtin__", "object"): _OBJECT,
    ("torch.jit._pickle", "build_intlist"): _Allowed("build_intlist", _jit_list),
    ("torch.jit._pickle", "build_doublelist"): _Allowed("build_doublelist", _jit_list),
    ("torch.jit._pickle", "build_boollist"): _Allowed("build_boollist", _jit_list),
    ("torch.jit._pickle", "build_tensorlist"): _Allowed("build_tensorlist", _jit_list),
    ("torch.jit._pickle", "restore_type_tag"): _Allowed("restore_type_tag", _jit_type_tag),
    ("builtins", "object"): _OBJECT,
}
for _name, _allowed in _REBUILD_ALLOWED.items():
    _ALLOWED[("torch._utils", _name)] = _allowed
for _name, _dtype in STORAGE_DTYPES.items():
    _ALLOWED[("torch", _name)] = StorageType(_dtype)
_ALLOWED[("torch", "UntypedStorage")] = StorageType("uint8", untyped=True)
_ALLOWED[("torch.storage", "UntypedStorage")] = StorageType("uint8", untyped=True)
for _name, _dtype in DTYPE_ALIASES.items():
    _ALLOWED[("torch", _name)] = DtypeName(_dtype)

# torch rebuild functions for tensor kinds the reader cannot represent: refused as a
# format limitation (they are harmless, just unsupported).
_UNSUPPORTED_TORCH = frozenset(
    {
        "_rebuild_sparse_tensor",
        "_rebuild_nested_tensor",
        "_rebuild_qtensor",
        "_rebuild_wrapper_subclass",
        "_rebuild_device_tensor_from_numpy",
        "_rebuild_device_tensor_from_cpu_tensor",
        "_rebuild_meta_tensor_no_storage",
        "_rebuild_xla_tensor",
        "_rebuild_mtia_tensor",
    }
)


def _unsupported(name: str) -> Callable[..., Any]:
    def refuse(*args: object, **kwargs: object) -> Any:
        raise ModelFormatError(
            f"the archive holds a tensor kind the reader does not support: {name}"
        )

    return refuse


# Calls whose real effect is only to build a value the reader never needs: numpy arrays,
# dtypes and scalars kept as model attributes (e.g. a normalisation mean). They give an
# inert placeholder instead; numpy itself is never imported or called.
_INERT_CALLS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "dtype"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Reads a torch archive's pickle without importing or running anything it names.

    Storages come back as :class:`StorageRef`, tensors as :class:`TensorRef`, objects of
    unknown classes as :class:`Placeholder` instances.
    """

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self._placeholders: Dict[Tuple[str, str], type] = {}
        self.storages: Dict[str, StorageRef] = {}

    def find_class(self, module: str, name: str) -> Any:
        """Answers a GLOBAL with an inert stand-in; raises UnsafePickleError for the rest."""
        if not isinstance(module, str) or not isinstance(name, str):
            raise UnsafePickleError("the pickle names a global with a non-string name")
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        if module in _FORBIDDEN_MODULES or module.startswith(_FORBIDDEN_PREFIXES):
            raise UnsafePickleError(
                f"the pickle names {module}.{name}, which a model never needs; refused"
            )
        if module == "torch._utils" and name in _UNSUPPORTED_TORCH:
            return _Allowed(f"{module}.{name}", _unsupported(name))
        if (
            "." in name
            or not name.isidentifier()
            or not all(part.isidentifier() for part in module.split("."))
        ):
            # Dotted names resolve attribute chains (getattr); odd names have no honest use.
            raise UnsafePickleError(f"the pickle names an unusual global {module!r} {name!r}")
        cls = self._placeholder_class(module, name)
        if (module, name) in _INERT_CALLS:
            return _Allowed(f"{module}.{name}", lambda *args: cls.__new__(cls, *args))
        return cls

    def _placeholder_class(self, module: str, name: str) -> type:
        key = (module, name)
        cls = self._placeholders.get(key)
        if cls is None:
            cls = PlaceholderMeta(
                name, (Placeholder,), {"pickle_module": module, "pickle_name": name}
            )
            self._placeholders[key] = cls
        return cls

    def persistent_load(self, pid: Any) -> Any:
        """Records a storage the pickle refers to; it is read later, from its own record."""
        if not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage":
            raise ModelFormatError("the pickle refers to an unknown kind of persistent object")
        _, storage_type, key, location, numel = pid
        if not isinstance(storage_type, StorageType):
            raise ModelFormatError("the pickle refers to a storage of an unknown type")
        if not isinstance(key, str) or not _STORAGE_KEY.match(key):
            raise ModelFormatError(f"the pickle refers to a storage with an invalid key {key!r}")
        if not isinstance(location, str) or len(location) > 64:
            raise ModelFormatError("the pickle refers to a storage with an invalid location")
        count = check_int(numel, "storage size")
        known = self.storages.get(key)
        if known is not None:
            if known.dtype != storage_type.dtype or known.numel != count:
                raise ModelFormatError(f"storage {key} is referred to with different types")
            return known
        ref = StorageRef(key, storage_type.dtype, count, location)
        self.storages[key] = ref
        return ref


def restricted_loads(
    data: bytes,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
    should_stop: Optional[StopCheck] = None,
) -> Tuple[Any, Dict[str, StorageRef]]:
    """Unpickles ``data`` with :class:`RestrictedUnpickler`, after :func:`scan_pickle`.

    Args:
        data: the pickle.
        limits: the budgets (see :class:`ReadLimits`).
        should_stop: a cancellation check, called every few thousand opcodes while
            scanning (the C unpickler itself cannot be interrupted; it runs on data
            the scan has bounded).

    Returns:
        the root object (placeholders, records and plain containers) and the storages
        it refers to, by key.

    Raises:
        UnsafePickleError: the pickle names or calls something other than tensor rebuilding
            and plain containers; nothing of it ran.
        ModelLimitExceededError: the pickle exceeds one of ``limits``; nothing was built.
        ModelFormatError: the pickle is malformed or truncated.
        ModelReadCancelledError: ``should_stop`` returned True.
    """
    scan_pickle(data, limits, should_stop)
    unpickler = RestrictedUnpickler(io.BytesIO(data))
    try:
        root = unpickler.load()
    except (UnsafePickleError, ModelFormatError):
        raise
    except RecursionError as exc:
        raise ModelFormatError("the pickle nests too deeply") from exc
    except MemoryError as exc:
        raise ModelFormatError("the pickle needs too much memory") from exc
    except Exception as exc:
        # Malformed opcodes, NEWOBJ on a non-type, BUILD on an object that takes no
        # state...: the C unpickler raises many types; none of them ran anything.
        raise ModelFormatError(f"the archive's pickle is malformed: {exc}") from exc
    return root, unpickler.storages
