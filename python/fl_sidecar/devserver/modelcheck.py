"""Is an uploaded file an ``nn.Module``? Answered without executing any of it.

The real server ``torch.load``s every upload (running whatever the pickle
says). The dev server reads the tensors with the restricted reader of
:mod:`fl_sidecar.modelfiles`, and tells a pickled module from a bare state_dict
by the class of the pickle's root object, which that reader records without
importing or calling anything.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Tuple, Union

from fl_sidecar.errors import ModelFormatError

__all__ = ["Signature", "check_module_file", "signature_from_json", "signature_to_json"]

#: tensor name -> (shape, dtype name)
Signature = Dict[str, Tuple[Tuple[int, ...], str]]


def check_module_file(path: Union[str, os.PathLike[str]]) -> Signature:
    """Check that ``path`` holds an ``nn.Module`` (pickled or TorchScript); return its tensors.

    Nothing in the file is executed: :func:`fl_sidecar.modelfiles.torch_io.describe` reads
    the archive with the restricted unpickler, which rebuilds a module's
    class as an inert placeholder.

    Raises:
        ModelFormatError: not a torch archive, a safetensors file, or a bare
            state_dict / tensor container rather than a module, or no tensors.
        AmbiguousArchiveError: another zip or torch reader could read the file
            differently (a ModelFormatError).
        ModelLimitExceededError: reading it would exceed the reader's budgets on work
            and memory (a ModelFormatError; see ``fl_sidecar.modelfiles.ReadLimits``).
        UnsafePickleError: the pickle asks for anything but tensors and plain containers.
        OSError: the file cannot be read.
    """
    from fl_sidecar.modelfiles import ModelFormat, detect_format, torch_io

    if detect_format(path) is ModelFormat.SAFETENSORS:
        raise ModelFormatError("a safetensors file holds weights only, not an nn.Module")
    info = torch_io.describe(path)
    if not info.is_module:
        raise ModelFormatError(
            f"the file holds a {info.root_class}, not an nn.Module (a bare state_dict is refused)"
        )
    signature: Signature = {}
    for name, spec in info.tensors.items():
        signature[name] = (tuple(int(d) for d in spec.shape), str(spec.dtype))
    if not signature:
        raise ModelFormatError("the model has no tensors")
    return signature


def signature_to_json(signature: Signature) -> str:
    """Serialise a :data:`Signature` for the database."""
    return json.dumps({k: [list(v[0]), v[1]] for k, v in signature.items()}, sort_keys=True)


def signature_from_json(text: str) -> Signature:
    """Inverse of :func:`signature_to_json`."""
    raw = json.loads(text)
    return {k: (tuple(int(d) for d in v[0]), str(v[1])) for k, v in raw.items()}
