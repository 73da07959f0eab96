"""Model I/O: torch archives and safetensors, without ever running a pickle from the server.

This is the only module of the package that imports torch; the others import it lazily.

The FL server stores models as pickled ``nn.Module``s (``torch.save``) or TorchScript
archives (``torch.jit.save``). Both are zip files: one pickle (``<prefix>/data.pkl``)
that rebuilds the object graph, and one record per tensor storage
(``<prefix>/data/<key>``). The sidecar reads the named tensors out of such an
archive with a restricted unpickler (:mod:`fl_sidecar._pickle`) that imports and
calls nothing, and writes new weights into a *copy* of the archive by replacing
storage records only, leaving the pickle untouched: the server then loads the
result as the same module type with the new values.

Tensor names follow ``module.state_dict()``: ``fc1.weight``, ``layers.0.bias``.
Full unpickling (:func:`load_trusted`) exists for the trainer's own process, where
the model's classes live, and only behind that explicit call.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import functools
import io
import json
import math
import os
import re
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from typing import (
    IO,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import torch

from fl_sidecar._pickle import Placeholder, SafeOrderedDict, TensorRef, restricted_loads
from fl_sidecar.errors import ModelFormatError, TensorMismatchError

__all__ = [
    "ArchiveInfo",
    "ModelFormat",
    "TensorSpec",
    "archive_to_safetensors",
    "describe",
    "detect_format",
    "dump_module",
    "from_safetensors",
    "list_tensors",
    "load_trusted",
    "read_tensors",
    "safetensors_into_archive",
    "save_module",
    "to_safetensors",
    "weighted_average",
    "write_tensors",
]

PathLike = Union[str, "os.PathLike[str]"]
Source = Union[bytes, bytearray, memoryview, PathLike]

_ZIP_MAGIC = b"PK\x03\x04"
# The pre-1.6 torch.save format: a bare pickle stream starting with a magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"
_MAX_PICKLE_SIZE = 256 * 1024 * 1024  # bytes; the pickle of a 1 GiB model is a few MiB
_MAX_CODE_SIZE = 16 * 1024 * 1024  # bytes, one TorchScript code file
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes, as the safetensors library allows
_MAX_DEPTH = 200  # nesting of modules and containers; the walk recurses ~2 frames a level
_COPY_CHUNK = 16 * 1024 * 1024  # bytes

# safetensors dtype names; the torch names are looked up because older torch builds
# (before 2.3) lack the unsigned 16-64 bit dtypes.
_SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    st: getattr(torch, name)
    for st, name in (
        ("F64", "float64"),
        ("F32", "float32"),
        ("F16", "float16"),
        ("BF16", "bfloat16"),
        ("I64", "int64"),
        ("I32", "int32"),
        ("I16", "int16"),
        ("I8", "int8"),
        ("U8", "uint8"),
        ("BOOL", "bool"),
        ("U16", "uint16"),
        ("U32", "uint32"),
        ("U64", "uint64"),
        ("F8_E4M3", "float8_e4m3fn"),
        ("F8_E5M2", "float8_e5m2"),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
        ("C64", "complex64"),
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
}
_SAFETENSORS_NAMES: Dict[torch.dtype, str] = {v: k for k, v in _SAFETENSORS_DTYPES.items()}

# torch.jit.load has no annotations; this gives it a type for mypy --strict.
_jit_load: Callable[..., Any] = torch.jit.load


class ModelFormat(enum.Enum):
    """How a model file is serialized."""

    TORCH_PICKLE = "torch"
    """``torch.save`` zip archive (pickled module or state_dict)."""
    TORCHSCRIPT = "torchscript"
    """``torch.jit.save`` zip archive."""
    SAFETENSORS = "safetensors"
    """safetensors: an 8-byte header length, a JSON header, raw little-endian data."""


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor's facts, known without reading its data.

    Attributes:
        name: state_dict name (``fc1.weight``).
        shape: dimensions.
        dtype: element type.
    """

    name: str
    shape: Tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.numel * _itemsize(self.dtype)


@dataclass(frozen=True)
class ArchiveInfo:
    """What a torch archive holds, read without running its pickle.

    Attributes:
        format: TORCH_PICKLE or TORCHSCRIPT.
        root_class: the pickled root object's class as ``module.Name`` (``__main__.Net``,
            ``collections.OrderedDict`` for a state_dict, ``__torch__.Net`` for TorchScript).
        is_module: the root is an ``nn.Module`` (pickled or scripted), not a bare state_dict.
        tensors: the named tensors, in state_dict order.
    """

    format: ModelFormat
    root_class: str
    is_module: bool
    tensors: Dict[str, TensorSpec]


# --------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _torch_dtype(name: str) -> torch.dtype:
    # name comes from the fixed allow-lists of fl_sidecar._pickle, never from the pickle.
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ModelFormatError(f"this torch build has no dtype {name}")
    return dtype


def _is_bytes(source: object) -> bool:
    return isinstance(source, (bytes, bytearray, memoryview))


def _head(source: Source, size: int) -> bytes:
    if _is_bytes(source):
        return bytes(memoryview(source).cast("B")[:size])  # type: ignore[arg-type]
    with open(os.fspath(source), "rb") as f:  # type: ignore[arg-type]
        head: bytes = f.read(size)
    return head


def _open_binary(source: Source) -> IO[bytes]:
    if _is_bytes(source):
        return io.BytesIO(source)  # type: ignore[arg-type]
    return open(os.fspath(source), "rb")  # type: ignore[arg-type]


def _safetensors_header_length(head: bytes, total: Optional[int]) -> Optional[int]:
    if len(head) < 9:
        return None
    (length,) = struct.unpack("<Q", head[:8])
    if length < 2 or length > _MAX_SAFETENSORS_HEADER or head[8:9] != b"{":
        return None
    if total is not None and 8 + length > total:
        return None
    return int(length)


def _source_size(source: Source) -> int:
    if _is_bytes(source):
        return memoryview(source).nbytes  # type: ignore[arg-type]
    return os.stat(os.fspath(source)).st_size  # type: ignore[arg-type]


def detect_format(source: Source) -> ModelFormat:
    """Tells how a model (bytes or a file path) is serialized, from its bytes, not its name.

    Raises:
        ModelFormatError: it is none of the supported formats: not a zip, a truncated zip,
            a zip without ``data.pkl``, the legacy (pre-1.6) torch format, anything else.
        OSError: the file cannot be read.
    """
    head = _head(source, 16)
    if head.startswith(_ZIP_MAGIC):
        with _Archive(source, parse=False) as archive:
            return archive.format
    if _safetensors_header_length(head, _source_size(source)) is not None:
        return ModelFormat.SAFETENSORS
    if head.startswith(_LEGACY_MAGIC[:4]):
        raise ModelFormatError(
            "this is a legacy (pre-1.6) torch file or a bare pickle; only zip archives are"
            " supported (re-save it with a current torch)"
        )
    raise ModelFormatError("not a model file: neither a torch zip archive nor safetensors")


# --------------------------------------------------------------------------- archive


class _Archive:
    """A torch zip archive opened for restricted reading."""

    def __init__(self, source: Source, *, parse: bool = True) -> None:
        self._file = _open_binary(source)
        try:
            self._open(parse)
        except BaseException:
            self._file.close()
            raise

    def _open(self, parse: bool) -> None:
        try:
            self.zip = zipfile.ZipFile(self._file)
            infos = self.zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
            self._file.seek(0)
            if _safetensors_header_length(self._file.read(16), None) is not None:
                raise ModelFormatError(
                    "this is safetensors, not a torch archive: use from_safetensors"
                ) from exc
            raise ModelFormatError(f"not a readable zip archive: {exc}") from exc
        if not infos:
            raise ModelFormatError("the zip archive is empty")
        # torch names the archive after its first record's directory, as does its reader.
        first = infos[0].filename
        if "/" not in first:
            raise ModelFormatError("not a torch archive: records are not in a directory")
        self.prefix = first.split("/", 1)[0]
        self.records: Dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if info.filename.startswith(self.prefix + "/"):
                self.records[info.filename[len(self.prefix) + 1 :]] = info
        pkl = self.records.get("data.pkl")
        if pkl is None:
            raise ModelFormatError("not a torch archive: it has no data.pkl")
        if pkl.file_size > _MAX_PICKLE_SIZE:
            raise ModelFormatError(f"data.pkl is implausibly large ({pkl.file_size} bytes)")
        self.format = (
            ModelFormat.TORCHSCRIPT
            if "constants.pkl" in self.records or any(r.startswith("code/") for r in self.records)
            else ModelFormat.TORCH_PICKLE
        )
        order = self._read_small("byteorder", 16)
        self.big_endian = order == b"big"
        if order is not None and order not in (b"little", b"big"):
            raise ModelFormatError(f"unknown byte order {order!r}")
        self._code_cache: Dict[str, Optional[str]] = {}
        if not parse:
            return
        self.root, self.storages = restricted_loads(self._read_record(pkl))
        self.tensors = _collect_tensors(self)
        self._storage_dtypes = self._check_storages()

    def __enter__(self) -> _Archive:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.zip.close()
        self._file.close()

    def _read_record(self, info: zipfile.ZipInfo) -> bytes:
        try:
            return self.zip.read(info)
        except (zipfile.BadZipFile, EOFError, ValueError, OSError) as exc:
            raise ModelFormatError(f"record {info.filename} is corrupt: {exc}") from exc
        except Exception as exc:  # zlib.error and friends for deflated records
            raise ModelFormatError(f"record {info.filename} is corrupt: {exc}") from exc

    def _read_small(self, name: str, limit: int) -> Optional[bytes]:
        info = self.records.get(name)
        if info is None:
            return None
        if info.file_size > limit:
            raise ModelFormatError(f"record {name} is implausibly large")
        return self._read_record(info).strip()

    def code(self, module: str) -> Optional[str]:
        """The TorchScript source of a ``__torch__`` module, or None."""
        if module in self._code_cache:
            return self._code_cache[module]
        text: Optional[str] = None
        info = self.records.get("code/" + module.replace(".", "/") + ".py")
        if info is not None and info.file_size <= _MAX_CODE_SIZE:
            text = self._read_record(info).decode("utf-8", errors="replace")
        self._code_cache[module] = text
        return text

    def _check_storages(self) -> Dict[str, torch.dtype]:
        """Validates every named tensor's view against its storage; returns element dtypes."""
        element: Dict[str, torch.dtype] = {}
        for name, ref in self.tensors.items():
            dtype = _torch_dtype(ref.dtype)
            storage = ref.storage
            storage_dtype = _torch_dtype(storage.dtype)
            nbytes = storage.numel * _itemsize(storage_dtype)
            if storage.dtype != ref.dtype and storage_dtype != torch.uint8:
                raise ModelFormatError(f"tensor {name} has a dtype other than its storage's")
            unit = storage_dtype if storage_dtype != torch.uint8 else dtype
            if element.setdefault(storage.key, unit) != unit:
                raise ModelFormatError(f"storage {storage.key} is viewed as different dtypes")
            capacity = nbytes // _itemsize(dtype)
            if ref.size and min(ref.size) == 0:
                continue
            last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
            if last >= capacity:
                raise ModelFormatError(f"tensor {name} reaches past the end of its storage")
        for key in element:
            info = self.records.get(f"data/{key}")
            if info is None:
                raise ModelFormatError(f"storage record data/{key} is missing")
            storage = self.storages[key]
            expected = storage.numel * _itemsize(_torch_dtype(storage.dtype))
            if info.file_size != expected:
                raise ModelFormatError(
                    f"storage record data/{key} holds {info.file_size} bytes, expected {expected}"
                )
            # torch stores records uncompressed; another tool may deflate them, but never
            # past deflate's own ratio limit (about 1032:1): beyond it is a zip bomb.
            if info.compress_type == zipfile.ZIP_STORED:
                plausible = info.compress_size == info.file_size
            else:
                plausible = info.file_size <= 1032 * info.compress_size + 1024
            if not plausible:
                raise ModelFormatError(f"storage record data/{key} declares an implausible size")
        return element

    def read_storage(self, key: str) -> torch.Tensor:
        """The storage's bytes as a flat uint8 tensor, in this machine's byte order."""
        info = self.records[f"data/{key}"]
        buf = torch.empty(info.file_size, dtype=torch.uint8)
        view = buf.numpy().data
        done = 0
        try:
            if info.compress_type == zipfile.ZIP_STORED:
                # Straight from the file into the tensor: zipfile's reader would copy each
                # chunk once more. Like torch's reader, this skips the CRC.
                self._file.seek(self._data_offset(info))
                while done < info.file_size:
                    n = _readinto(self._file, view[done : done + _COPY_CHUNK])
                    if not n:
                        break
                    done += n
            else:
                with self.zip.open(info) as f:
                    while done < info.file_size:
                        n = _readinto(f, view[done : done + _COPY_CHUNK])
                        if not n:
                            break
                        done += n
        except ModelFormatError:
            raise
        except Exception as exc:
            raise ModelFormatError(f"storage record data/{key} is corrupt: {exc}") from exc
        if done != info.file_size:
            raise ModelFormatError(f"storage record data/{key} is truncated")
        if self.big_endian:
            _swap_bytes_(buf, _itemsize(self._storage_dtypes[key]))
        return buf

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        """Where a record's data starts: after its local header, name and extra field."""
        self._file.seek(info.header_offset)
        header = self._file.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise ModelFormatError(f"record {info.filename} has a bad local header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        return int(info.header_offset) + 30 + int(name_len) + int(extra_len)

    def tensor_view(self, storage: torch.Tensor, ref: TensorRef) -> torch.Tensor:
        """The named tensor as a view of its storage's bytes (see :meth:`read_storage`)."""
        return storage.view(_torch_dtype(ref.dtype)).as_strided(ref.size, ref.stride, ref.offset)

    def specs(self) -> Dict[str, TensorSpec]:
        return {
            name: TensorSpec(name, ref.size, _torch_dtype(ref.dtype))
            for name, ref in self.tensors.items()
        }

    def by_storage(self) -> Dict[str, List[Tuple[str, TensorRef]]]:
        groups: Dict[str, List[Tuple[str, TensorRef]]] = {}
        for name, ref in self.tensors.items():
            groups.setdefault(ref.storage.key, []).append((name, ref))
        return groups


def _readinto(f: Any, view: memoryview) -> int:
    # zipfile's and open()'s readers both have readinto; IO[bytes] does not declare it.
    n = f.readinto(view)
    return int(n or 0)


def _swap_bytes_(buf: torch.Tensor, unit: int) -> None:
    if unit > 1 and buf.numel():
        rows = buf.view(-1, unit)
        rows.copy_(rows.flip(1))


# --------------------------------------------------------------------------- naming


_CLASS_LINE = re.compile(r"^class (\w+)\((\w*)\):[ \t]*$", re.MULTILINE)
_NAME_LIST = re.compile(r"^[ \t]+(__parameters__|__buffers__) = \[([^\]\n]*)\]", re.MULTILINE)
_QUOTED = re.compile(r"\"([^\"\n]*)\"")


def _script_class(
    archive: _Archive, obj: Placeholder
) -> Optional[Tuple[List[str], List[str], bool]]:
    """(parameters, buffers, is_module) of a TorchScript class, parsed from its code, not run."""
    cls = type(obj)
    text = archive.code(cls.pickle_module)
    if text is None:
        return None
    for match in _CLASS_LINE.finditer(text):
        if match.group(1) != cls.pickle_name:
            continue
        end = _CLASS_LINE.search(text, match.end())
        body = text[match.end() : end.start() if end else len(text)]
        lists: Dict[str, List[str]] = {"__parameters__": [], "__buffers__": []}
        for found in _NAME_LIST.finditer(body):
            lists[found.group(1)] = _QUOTED.findall(found.group(2))
        return lists["__parameters__"], lists["__buffers__"], match.group(2) == "Module"
    return None


class _Collector:
    def __init__(self, archive: _Archive) -> None:
        self.archive = archive
        self.out: Dict[str, TensorRef] = {}
        self.path: set[int] = set()

    def add(self, name: str, value: object) -> None:
        if not isinstance(value, TensorRef):
            return
        if name in self.out and self.out[name] is not value:
            raise ModelFormatError(f"two different tensors are named {name!r}")
        self.out[name] = value

    def enter(self, obj: object, depth: int) -> None:
        if depth > _MAX_DEPTH:
            raise ModelFormatError("the model nests too deeply")
        if id(obj) in self.path:
            raise ModelFormatError("the model contains itself")
        self.path.add(id(obj))

    def any(self, obj: object, prefix: str, depth: int) -> None:
        if isinstance(obj, TensorRef):
            self.add(prefix[:-1], obj)
            return
        if not isinstance(obj, (Placeholder, dict, list, tuple)):
            return
        self.enter(obj, depth)
        try:
            if isinstance(obj, Placeholder):
                state = obj.state_dict_view()
                if state is not None and isinstance(state.get("_parameters"), dict):
                    self.module(state, prefix, depth)
                elif type(obj).pickle_module.startswith("__torch__"):
                    self.script(obj, prefix, depth)
                elif state is not None:
                    self.mapping(state, prefix, depth)
            elif isinstance(obj, dict):
                self.mapping(obj, prefix, depth)
            else:
                for i, item in enumerate(obj):
                    self.any(item, f"{prefix}{i}.", depth + 1)
        finally:
            self.path.discard(id(obj))

    def mapping(self, state: Dict[Any, Any], prefix: str, depth: int) -> None:
        for key, value in state.items():
            if isinstance(key, str):
                self.any(value, f"{prefix}{key}.", depth + 1)

    def module(self, state: Dict[Any, Any], prefix: str, depth: int) -> None:
        # nn.Module.state_dict order: own parameters, own persistent buffers, children.
        for key, value in state["_parameters"].items():
            self.add(f"{prefix}{key}", value)
        skip = state.get("_non_persistent_buffers_set")
        skip = skip if isinstance(skip, (set, frozenset)) else set()
        buffers = state.get("_buffers")
        if isinstance(buffers, dict):
            for key, value in buffers.items():
                if key not in skip:
                    self.add(f"{prefix}{key}", value)
        children = state.get("_modules")
        if isinstance(children, dict):
            for key, child in children.items():
                if isinstance(child, Placeholder):
                    self.any(child, f"{prefix}{key}.", depth + 1)

    def script(self, obj: Placeholder, prefix: str, depth: int) -> None:
        # A TorchScript object keeps parameters and buffers as plain attributes; its
        # class code lists which are which, as RecursiveScriptModule.state_dict() uses.
        state = obj.state_dict_view() or {}
        info = _script_class(self.archive, obj)
        if info is None:
            names = [k for k, v in state.items() if isinstance(v, TensorRef)]
        else:
            names = info[0] + info[1]
        for key in names:
            self.add(f"{prefix}{key}", state.get(key))
        for key, value in state.items():
            if isinstance(value, Placeholder) and isinstance(key, str):
                child = _script_class(self.archive, value)
                if child is None or child[2]:
                    self.any(value, f"{prefix}{key}.", depth + 1)


def _collect_tensors(archive: _Archive) -> Dict[str, TensorRef]:
    collector = _Collector(archive)
    try:
        collector.any(archive.root, "", 0)
    except RecursionError as exc:  # a deep stack on entry; the depth limit covers the rest
        raise ModelFormatError("the model nests too deeply") from exc
    return collector.out


def _root_facts(archive: _Archive) -> Tuple[str, bool]:
    root = archive.root
    if isinstance(root, Placeholder):
        state = root.state_dict_view()
        is_module = archive.format is ModelFormat.TORCHSCRIPT or (
            state is not None and isinstance(state.get("_parameters"), dict)
        )
        return root.qualified_name, is_module
    if isinstance(root, dict):
        return ("collections.OrderedDict" if isinstance(root, SafeOrderedDict) else "dict"), False
    return type(root).__name__, False


# --------------------------------------------------------------------------- reading


def describe(source: Source) -> ArchiveInfo:
    """Reads what a torch archive (bytes or path) holds, without its tensor data.

    Raises:
        ModelFormatError: not a torch zip archive, or a malformed one.
        UnsafePickleError: its pickle asks for more than rebuilding tensors; nothing ran.
        OSError: the file cannot be read.
    """
    with _Archive(source) as archive:
        root_class, is_module = _root_facts(archive)
        return ArchiveInfo(archive.format, root_class, is_module, archive.specs())


def list_tensors(source: Source) -> Dict[str, TensorSpec]:
    """Names, shapes and dtypes of an archive's tensors (bytes or path), without the data.

    Raises:
        ModelFormatError, UnsafePickleError, OSError: as :func:`describe`.
    """
    return describe(source).tensors


def read_tensors(source: Source) -> Dict[str, torch.Tensor]:
    """Reads the named tensors (state_dict names) of a torch archive, on the CPU.

    Works for pickled modules, state_dicts and TorchScript archives, without executing
    the pickle. Tensors that shared a storage in the archive (tied weights) share it in
    the result.

    Raises:
        ModelFormatError: not a torch zip archive (a truncated zip, no ``data.pkl``...),
            or records that disagree with the pickle.
        UnsafePickleError: the pickle names or calls something other than tensor
            rebuilding and plain containers; none of it ran.
        OSError: the file cannot be read.
    """
    with _Archive(source) as archive:
        storages: Dict[str, torch.Tensor] = {}
        out: Dict[str, torch.Tensor] = {}
        for name, ref in archive.tensors.items():
            key = ref.storage.key
            if key not in storages:
                storages[key] = archive.read_storage(key)
            out[name] = archive.tensor_view(storages[key], ref)
        return out


# --------------------------------------------------------------------------- writing


def _check_against(
    specs: Mapping[str, TensorSpec], given: Mapping[str, Tuple[Tuple[int, ...], torch.dtype]]
) -> None:
    missing = [n for n in specs if n not in given]
    extra = [n for n in given if n not in specs]
    if missing or extra:
        raise TensorMismatchError(
            "tensor names differ from the template: "
            + (f"missing {_few(missing)}" if missing else "")
            + ("; " if missing and extra else "")
            + (f"unexpected {_few(extra)}" if extra else "")
        )
    for name, spec in specs.items():
        shape, dtype = given[name]
        if tuple(shape) != spec.shape:
            raise TensorMismatchError(
                f"tensor {name!r} has shape {tuple(shape)}, the template {spec.shape}"
            )
        if dtype != spec.dtype:
            raise TensorMismatchError(
                f"tensor {name!r} has dtype {dtype}, the template {spec.dtype}"
            )


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _write_into(view: torch.Tensor, value: torch.Tensor) -> None:
    try:
        view.copy_(value)
    except RuntimeError:
        # A view whose elements overlap (stride 0: an expanded tensor) refuses copy_;
        # scatter through linear indices instead. The last write wins; tied values are
        # checked afterwards.
        count = view.untyped_storage().nbytes() // view.element_size()
        index = torch.arange(count, dtype=torch.int64).as_strided(
            view.shape, view.stride(), view.storage_offset()
        )
        flat = torch.empty(0, dtype=view.dtype).set_(view.untyped_storage(), 0, (count,), (1,))
        flat[index.reshape(-1)] = value.reshape(-1).to(view.dtype)


def _rewrite_archive(
    archive: _Archive,
    out: IO[bytes],
    value_of: Callable[[str], torch.Tensor],
) -> None:
    """Copies ``archive`` into ``out``, with each named tensor's data from ``value_of``.

    ``value_of(name)`` gives the new value as a CPU tensor of the template's shape and
    dtype. Only storage records change; the pickle and every other record are copied as
    they are. One storage (and one new value) is in memory at a time.
    """
    groups = archive.by_storage()
    writer = torch._C.PyTorchFileWriter(out)
    try:
        for rel, info in archive.records.items():
            if rel == ".data/serialization_id":
                continue  # a new archive gets a new id from the writer
            key = rel[len("data/") :] if rel.startswith("data/") else None
            group = groups.get(key) if key is not None else None
            if group is None:
                data = archive._read_record(info)
                writer.write_record(rel, data, len(data))
                continue
            if len(group) == 1 and not archive.big_endian and _covers(group[0][1], info.file_size):
                # The common case, one tensor per storage: write its bytes as they are.
                value = value_of(group[0][0]).contiguous()
                if value.storage_offset() or value.untyped_storage().nbytes() != info.file_size:
                    value = value.clone()
                writer.write_record(rel, value.untyped_storage(), info.file_size)  # type: ignore[arg-type]
                del value
                continue
            storage = archive.read_storage(key)  # type: ignore[arg-type]
            for name, ref in group:
                _write_into(archive.tensor_view(storage, ref), value_of(name))
            # Shared bytes (tied weights, expanded views) must get consistent values, or
            # part of a new value would be silently lost.
            for name, ref in group:
                if (len(group) > 1 or _may_overlap(ref)) and not _bytes_equal(
                    archive.tensor_view(storage, ref), value_of(name)
                ):
                    raise TensorMismatchError(
                        f"tensor {name!r} shares memory with another tensor (tied weights)"
                        " or with itself (an expanded view), and the new values disagree"
                    )
            if archive.big_endian:
                _swap_bytes_(storage, _itemsize(archive._storage_dtypes[key]))  # type: ignore[index]
            writer.write_record(rel, storage.untyped_storage(), storage.numel())  # type: ignore[arg-type]
            del storage
    except BaseException:
        # The writer's destructor finishes the zip if nobody did, and a failure there
        # aborts the process; finish the (discarded) output here instead.
        with contextlib.suppress(Exception):
            writer.write_end_of_file()
        raise
    writer.write_end_of_file()


def _covers(ref: TensorRef, nbytes: int) -> bool:
    """Whether a view is its whole storage, contiguous from offset 0."""
    expected = 1
    for size, stride in zip(reversed(ref.size), reversed(ref.stride)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return ref.offset == 0 and expected * _itemsize(_torch_dtype(ref.dtype)) == nbytes


def _may_overlap(ref: TensorRef) -> bool:
    """Whether a view may address one element twice (an expanded tensor, stride 0)."""
    extent = 1
    for size, stride in sorted(
        (d for d in zip(ref.size, ref.stride) if d[0] > 1), key=lambda d: d[1]
    ):
        if stride < extent:
            return True
        extent = stride * size
    return False


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0:
        return True
    ua = a.contiguous().reshape(-1).view(torch.uint8)
    ub = b.contiguous().reshape(-1).view(torch.uint8)
    return bool(torch.equal(ua, ub))


def _atomic_write(dest: PathLike, produce: Callable[[IO[bytes]], None]) -> None:
    """Writes a file through a temporary sibling and a rename: never a half-written dest."""
    path = os.fspath(dest)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".fl-sidecar-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            produce(f)
        # No fsync: these files are derived and can be made again; the rename alone keeps
        # a reader from ever seeing a half-written file.
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_tensors(
    template: Source,
    tensors: Mapping[str, torch.Tensor],
    dest: Optional[PathLike] = None,
) -> Optional[bytes]:
    """Writes new weights into a copy of a torch archive (pickled module, TorchScript, state_dict).

    The copy keeps the template's pickle and code; only the tensor data changes, so it
    loads with plain ``torch.load``/``torch.jit.load`` as the same module type. Tensors
    may be on any device; they are copied to the CPU one at a time.

    Args:
        template: the archive, as bytes or a path.
        tensors: exactly the template's names (see :func:`read_tensors`) with the same
            shapes and dtypes.
        dest: a path to write to (atomically), or None to return the bytes.

    Returns:
        the new archive's bytes when ``dest`` is None, else None.

    Raises:
        TensorMismatchError: a name is missing or extra, a shape or dtype differs, or tied
            tensors get different values. Nothing is written.
        ModelFormatError, UnsafePickleError, OSError: as :func:`read_tensors`.
    """
    with _Archive(template) as archive:
        specs = archive.specs()
        given = {}
        for name, value in tensors.items():
            if not isinstance(value, torch.Tensor):
                raise TensorMismatchError(f"{name!r} is not a tensor but {type(value).__name__}")
            given[name] = (tuple(value.shape), value.dtype)
        _check_against(specs, given)

        def value_of(name: str) -> torch.Tensor:
            return tensors[name].detach().to("cpu")

        if dest is None:
            buf = io.BytesIO()
            _rewrite_archive(archive, buf, value_of)
            return buf.getvalue()
        _atomic_write(dest, lambda f: _rewrite_archive(archive, f, value_of))
        return None


# --------------------------------------------------------------------------- modules


def _state_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    for sub in module.modules():
        yield from (t for t in sub._parameters.values() if t is not None)
        yield from (t for t in sub._buffers.values() if t is not None)
        yield from (t for t in vars(sub).values() if isinstance(t, torch.Tensor))


def _cpu_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``module`` with every tensor on the CPU; ``module`` is untouched.

    The tensors are copied to the CPU first and handed to deepcopy through its memo, so
    no second copy of the weights is ever made on the accelerator. Tied tensors stay tied.
    """
    memo: Dict[int, Any] = {}
    for tensor in _state_tensors(module):
        if id(tensor) in memo:
            continue
        cpu = tensor.detach().to("cpu", copy=True)
        if isinstance(tensor, torch.nn.Parameter):
            cpu = torch.nn.Parameter(cpu, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = cpu
    return copy.deepcopy(module, memo)


def _all_on_cpu(module: torch.nn.Module) -> bool:
    return all(t.device.type == "cpu" for t in _state_tensors(module))


def dump_module(module: torch.nn.Module) -> bytes:
    """Serializes a module as the reference client does: ``torch.save``, or ``torch.jit.save``.

    Tensors on an accelerator are written from CPU copies; the trainer's module stays
    where it is, with the same parameter objects.

    Returns:
        the archive's bytes.

    Raises:
        TypeError: ``module`` is not an ``nn.Module``.
        ModelFormatError: torch cannot serialize it (e.g. a lambda attribute).
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"dump_module needs an nn.Module, not {type(module).__name__}")
    on_cpu = _all_on_cpu(module)
    buf = io.BytesIO()
    try:
        if isinstance(module, torch.jit.ScriptModule):
            torch.jit.save(module, buf)
            if not on_cpu:
                # jit has no save-time device map: reload the bytes onto the CPU and save again.
                moved = _jit_load(io.BytesIO(buf.getvalue()), map_location="cpu")
                buf = io.BytesIO()
                torch.jit.save(moved, buf)
        else:
            torch.save(module if on_cpu else _cpu_copy(module), buf)
    except (RuntimeError, TypeError, AttributeError, copy.Error) as exc:
        raise ModelFormatError(f"torch cannot serialize this module: {exc}") from exc
    return buf.getvalue()


def save_module(module: torch.nn.Module, path: PathLike) -> None:
    """Writes :func:`dump_module`'s bytes to ``path`` atomically.

    Raises:
        TypeError, ModelFormatError: as :func:`dump_module`.
        OSError: the file cannot be written.
    """
    data = dump_module(module)

    def produce(f: IO[bytes]) -> None:
        f.write(data)

    _atomic_write(path, produce)


def load_trusted(source: Source, *, map_location: Any = None) -> Any:
    """Fully loads a model, running its pickle: only for archives you trust.

    ``torch.load(weights_only=False)`` for pickled archives (the model's classes must be
    importable), ``torch.jit.load`` for TorchScript; ``map_location`` as for those.

    Raises:
        ModelFormatError: not a torch archive, or torch cannot load it.
        OSError: the file cannot be read.
    """
    fmt = detect_format(source)
    if fmt is ModelFormat.SAFETENSORS:
        raise ModelFormatError("this is safetensors, not a torch archive: use from_safetensors")
    target: Union[str, IO[bytes]] = (
        io.BytesIO(bytes(source))  # type: ignore[arg-type]
        if _is_bytes(source)
        else os.fspath(source)  # type: ignore[arg-type]
    )
    try:
        if fmt is ModelFormat.TORCHSCRIPT:
            return _jit_load(target, map_location=map_location)
        return torch.load(target, map_location=map_location, weights_only=False)
    except (OSError, MemoryError):
        raise
    except Exception as exc:
        raise ModelFormatError(f"torch could not load the model: {exc}") from exc


# --------------------------------------------------------------------------- safetensors


def to_safetensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Serializes named tensors (any device, strided or tied) as safetensors bytes.

    Raises:
        TensorMismatchError: a value is not a tensor, or its dtype has no safetensors name.
    """
    specs: Dict[str, TensorSpec] = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise TensorMismatchError(f"{name!r} is not a named tensor")
        specs[name] = TensorSpec(name, tuple(value.shape), value.dtype)
    buf = io.BytesIO()
    _write_safetensors(buf, specs, lambda name: tensors[name].detach().to("cpu"))
    return buf.getvalue()


def from_safetensors(data: Source) -> Dict[str, torch.Tensor]:
    """Reads safetensors (bytes or a file path) into named CPU tensors.

    Raises:
        ModelFormatError: not valid safetensors.
        OSError: the file cannot be read.
    """
    header, start = _read_safetensors_header(data)
    out: Dict[str, torch.Tensor] = {}
    with _open_binary(data) as f:
        for name, (shape, dtype, begin, end) in header.items():
            out[name] = _read_span(f, start + begin, end - begin, dtype).view(shape)
    return out


def _read_span(f: IO[bytes], offset: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    buf = torch.empty(length, dtype=torch.uint8)
    view = buf.numpy().data
    f.seek(offset)
    done = 0
    while done < length:
        n = _readinto(f, view[done : done + _COPY_CHUNK])
        if not n:
            raise ModelFormatError("the safetensors data is truncated")
        done += n
    return buf.view(dtype)


_Header = Dict[str, Tuple[Tuple[int, ...], torch.dtype, int, int]]


def _read_safetensors_header(source: Source) -> Tuple[_Header, int]:
    """Parses and checks a safetensors header: (name -> (shape, dtype, begin, end), data start)."""
    total = _source_size(source)
    with _open_binary(source) as f:
        head = f.read(8)
        if len(head) < 8:
            raise ModelFormatError("not safetensors: shorter than its 8-byte header length")
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_SAFETENSORS_HEADER or 8 + length > total:
            raise ModelFormatError(f"not safetensors: header length {length} does not fit")
        raw = f.read(length)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ModelFormatError(f"not safetensors: the header is not JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise ModelFormatError("not safetensors: the header is not a JSON object")
    data_size = total - 8 - length
    header: _Header = {}
    for name, entry in parsed.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"safetensors entry {name!r} is malformed") from exc
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise ModelFormatError(f"safetensors entry {name!r} has an invalid shape")
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size):
            raise ModelFormatError(f"safetensors entry {name!r} points outside the data")
        if end - begin != math.prod(shape) * _itemsize(dtype):
            raise ModelFormatError(f"safetensors entry {name!r} has the wrong data size")
        header[name] = (shape, dtype, begin, end)
    return header, 8 + length


def _write_safetensors(
    out: IO[bytes], specs: Mapping[str, TensorSpec], tensor: Callable[[str], torch.Tensor]
) -> None:
    """Writes safetensors from specs, asking for one contiguous CPU tensor at a time."""
    header: Dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, spec in specs.items():
        if spec.dtype not in _SAFETENSORS_NAMES:
            raise TensorMismatchError(f"safetensors cannot hold tensor {name!r} of {spec.dtype}")
    # Data in order of decreasing element size, as the safetensors library lays it out:
    # with the header padded to 8 bytes, every tensor starts aligned to its element size.
    order = sorted(specs, key=lambda n: -_itemsize(specs[n].dtype))
    for name in order:
        spec = specs[name]
        header[name] = {
            "dtype": _SAFETENSORS_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    out.write(struct.pack("<Q", len(raw)))
    out.write(raw)
    for name in order:
        value = tensor(name).contiguous().reshape(-1)
        if value.numel():
            out.write(value.view(torch.uint8).numpy().data)


def archive_to_safetensors(src: PathLike, dst: PathLike) -> None:
    """Converts a torch archive file into a safetensors file, without running its pickle.

    Memory: about one storage at a time. ``dst`` is written atomically.

    Raises:
        ModelFormatError, UnsafePickleError: as :func:`read_tensors`.
        TensorMismatchError: a dtype has no safetensors name.
        OSError: a file cannot be read or written.
    """
    with _Archive(src) as archive:
        specs = archive.specs()
        cache: Dict[str, torch.Tensor] = {}

        def tensor(name: str) -> torch.Tensor:
            ref = archive.tensors[name]
            key = ref.storage.key
            if key not in cache:
                cache.clear()  # keep one storage: consecutive tied tensors share it
                cache[key] = archive.read_storage(key)
            return archive.tensor_view(cache[key], ref)

        _atomic_write(dst, lambda f: _write_safetensors(f, specs, tensor))


def safetensors_into_archive(template: PathLike, weights: PathLike, dst: PathLike) -> None:
    """Writes the weights of a safetensors file into a copy of a torch archive file.

    Every name, shape and dtype is checked before anything is written; the result loads
    with plain ``torch.load``/``torch.jit.load`` as the template's module type. Memory:
    about one storage and one tensor at a time. ``dst`` is written atomically.

    Raises:
        TensorMismatchError: names, shapes or dtypes differ from the template's.
        ModelFormatError: the template is not a torch archive or ``weights`` not safetensors.
        UnsafePickleError: the template's pickle asks for more than tensors.
        OSError: a file cannot be read or written.
    """
    header, start = _read_safetensors_header(weights)
    with _Archive(template) as archive, open(os.fspath(weights), "rb") as wf:
        _check_against(archive.specs(), {n: (h[0], h[1]) for n, h in header.items()})

        def value_of(name: str) -> torch.Tensor:
            shape, dtype, begin, end = header[name]
            return _read_span(wf, start + begin, end - begin, dtype).view(shape)

        _atomic_write(dst, lambda f: _rewrite_archive(archive, f, value_of))


# --------------------------------------------------------------------------- FedAvg


def weighted_average(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> Dict[str, torch.Tensor]:
    """FedAvg: the average of state_dicts weighted by ``weights`` (e.g. sample sizes).

    Accumulates in float64 (complex128 for complex tensors) one tensor at a time and
    returns each result in its original dtype on the CPU; integer and bool tensors are
    rounded to the nearest value.

    Raises:
        TensorMismatchError: no state_dicts, a weight count that differs, a negative or
            non-finite weight, all-zero weights, or names/shapes/dtypes that differ between
            the state_dicts.
    """
    if not state_dicts:
        raise TensorMismatchError("weighted_average needs at least one state_dict")
    if len(weights) != len(state_dicts):
        raise TensorMismatchError(f"{len(state_dicts)} state_dicts but {len(weights)} weights")
    factors = [float(w) for w in weights]
    if any(not math.isfinite(w) or w < 0 for w in factors):
        raise TensorMismatchError(f"weights must be finite and non-negative: {list(weights)}")
    total = math.fsum(factors)
    if total <= 0:
        raise TensorMismatchError("the weights sum to zero")
    first = state_dicts[0]
    specs = {n: TensorSpec(n, tuple(t.shape), t.dtype) for n, t in first.items()}
    for other in state_dicts[1:]:
        _check_against(specs, {n: (tuple(t.shape), t.dtype) for n, t in other.items()})
    out: Dict[str, torch.Tensor] = {}
    for name, spec in specs.items():
        acc_dtype = torch.complex128 if spec.dtype.is_complex else torch.float64
        acc = torch.zeros(spec.shape, dtype=acc_dtype)
        for sd, w in zip(state_dicts, factors):
            if w:
                acc.add_(sd[name].detach().to("cpu", acc_dtype), alpha=w / total)
        if spec.dtype.is_floating_point or spec.dtype.is_complex:
            out[name] = acc.to(spec.dtype)
        else:
            out[name] = acc.round().to(spec.dtype)
    return out
