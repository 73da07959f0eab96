"""Is an uploaded file an ``nn.Module``? Answered without executing any of it.

The real server ``torch.load``s every upload (running whatever the pickle
says). The dev server reads the tensors with the restricted reader of
:mod:`fl_sidecar.models`, and tells a pickled module from a bare state_dict
by looking at the pickle's opcodes (:mod:`pickletools` only parses them): a
module is rebuilt as a class instance (``GLOBAL`` then ``NEWOBJ``), a
state_dict as an ``OrderedDict`` or ``dict``.
"""

from __future__ import annotations

import json
import os
import pickletools
import zipfile
from typing import Dict, List, Tuple, Union

from fl_sidecar.errors import ModelFormatError

__all__ = ["Signature", "check_module_file", "signature_from_json", "signature_to_json"]

#: tensor name -> (shape, dtype name)
Signature = Dict[str, Tuple[Tuple[int, ...], str]]

_MAX_PICKLE_BYTES = 256 * 1024 * 1024
_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}
_MEMO_OPS = {"MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT", "FRAME"}


def check_module_file(path: Union[str, os.PathLike[str]]) -> Signature:
    """Check that ``path`` holds an ``nn.Module`` (pickled or TorchScript); return its tensors.

    Nothing in the file is executed: the tensors are read by the restricted
    reader and the module check only parses pickle opcodes.

    Raises:
        ModelFormatError: not a torch archive, a safetensors file, or a bare
            state_dict / tensor container rather than a module.
        UnsafePickleError: the pickle asks for anything but tensors and plain containers.
        ModelError: any other reason the restricted reader refuses it.
    """
    from fl_sidecar import models

    fmt = models.detect_format(path)
    if fmt is models.ModelFormat.SAFETENSORS:
        raise ModelFormatError("a safetensors file holds weights only, not an nn.Module")
    tensors = models.read_tensors(path)
    if fmt is models.ModelFormat.TORCH_PICKLE:
        _require_pickled_module(path)
    signature: Signature = {}
    for name, tensor in tensors.items():
        signature[name] = (tuple(int(d) for d in tensor.shape), str(tensor.dtype))
    if not signature:
        raise ModelFormatError("the model has no tensors")
    return signature


def _require_pickled_module(path: Union[str, os.PathLike[str]]) -> None:
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not names:
                raise ModelFormatError("torch archive without data.pkl")
            info = archive.getinfo(names[0])
            if info.file_size > _MAX_PICKLE_BYTES:
                raise ModelFormatError("torch archive's data.pkl is implausibly large")
            data = archive.read(info)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ModelFormatError(f"not a torch zip archive: {exc}") from exc
    if not _top_level_is_instance(data):
        raise ModelFormatError("the file holds a state_dict or tensors, not an nn.Module")


def _top_level_is_instance(data: bytes) -> bool:
    """True when the pickle's outermost object is built by ``cls.__new__`` (``NEWOBJ``)."""
    strings: List[str] = []
    seen_class = False
    try:
        for opcode, arg, _pos in pickletools.genops(data):
            name = opcode.name
            if name in ("PROTO",) or name in _MEMO_OPS:
                continue
            if not seen_class:
                if name in _STRING_OPS:
                    strings.append(str(arg))
                    continue
                if name == "GLOBAL" or (name == "STACK_GLOBAL" and len(strings) == 2):
                    seen_class = True
                    continue
                return False
            if name in ("EMPTY_TUPLE", "MARK"):
                continue
            return name in ("NEWOBJ", "NEWOBJ_EX")
    except ValueError:
        return False
    return False


def signature_to_json(signature: Signature) -> str:
    """Serialise a :data:`Signature` for the database."""
    return json.dumps({k: [list(v[0]), v[1]] for k, v in signature.items()}, sort_keys=True)


def signature_from_json(text: str) -> Signature:
    """Inverse of :func:`signature_to_json`."""
    raw = json.loads(text)
    return {k: (tuple(int(d) for d in v[0]), str(v[1])) for k, v in raw.items()}
