"""fl-sidecar: move federated-learning models between trainers and the FL server.

The curated public API. Submodules: :mod:`fl_sidecar.codec` (zstd-chunk
codec), :mod:`fl_sidecar.models` (safe model I/O, needs torch),
:mod:`fl_sidecar.errors` (the exception hierarchy).
"""

from fl_sidecar import errors
from fl_sidecar.errors import FlSidecarError

__version__ = "0.1.0"

__all__ = ["FlSidecarError", "__version__", "errors"]
