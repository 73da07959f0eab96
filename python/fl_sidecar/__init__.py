"""fl-sidecar: move federated-learning models between trainers and the FL server.

The curated public API. The heavy parts load on first use, so
``import fl_sidecar`` stays cheap (no grpc, requests or torch):

- :class:`SidecarClient` (:mod:`fl_sidecar.client`): a trainer's gRPC client of the sidecar.
- :class:`Communication` (:mod:`fl_sidecar.compat`): the reference client's API, through
  the sidecar.
- :class:`FlServerClient` (:mod:`fl_sidecar.server_api`): the FL Demonstrator REST client.
- :class:`DevServer` (:mod:`fl_sidecar.devserver`): the embedded dev FL server.
- :func:`pack`, :func:`unpack`, :func:`inspect` (:mod:`fl_sidecar.codec`): the zstd codec.
- :mod:`fl_sidecar.errors`: the exception hierarchy; :mod:`fl_sidecar.models`: model I/O
  (needs torch); :mod:`fl_sidecar.archive`: torch-free model files.
"""

from __future__ import annotations

import importlib
from typing import Any

from fl_sidecar import errors
from fl_sidecar.errors import FlSidecarError

__version__ = "0.1.0"

# name -> module that defines it; imported on first attribute access (PEP 562).
_LAZY = {
    "SidecarClient": "fl_sidecar.client",
    "Communication": "fl_sidecar.compat",
    "FlServerClient": "fl_sidecar.server_api",
    "DevServer": "fl_sidecar.devserver",
    "pack": "fl_sidecar.codec",
    "unpack": "fl_sidecar.codec",
    "inspect": "fl_sidecar.codec",
}

__all__ = [
    "Communication",
    "DevServer",
    "FlServerClient",
    "FlSidecarError",
    "SidecarClient",
    "__version__",
    "errors",
    "inspect",
    "pack",
    "unpack",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fl_sidecar' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
