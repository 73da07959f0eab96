"""The FL Demonstrator REST client, by job (the server's protocol: ``docs/protocol.md``).

- :mod:`~fl_sidecar.flserver.client`: :class:`FlServerClient`, the public class,
  made of :mod:`~fl_sidecar.flserver.participant` (the trainer's calls) and
  :mod:`~fl_sidecar.flserver.admin` (the operator's calls);
- :mod:`~fl_sidecar.flserver.downloads`, :mod:`~fl_sidecar.flserver.uploads`:
  streamed model transfers, decoded and packed with zstd;
- :mod:`~fl_sidecar.flserver.transport`: the one session, timeouts, retries and
  what may be resent; :mod:`~fl_sidecar.flserver.failures`: the typed error of
  an answer, and whether it may be repeated;
- :mod:`~fl_sidecar.flserver.bodies`: the request and answer bodies;
- :mod:`~fl_sidecar.flserver.coding`: content-coding negotiation (standard
  library only, shared with :mod:`fl_sidecar.wsgi_zstd`);
- :mod:`~fl_sidecar.flserver.credentials`, :mod:`~fl_sidecar.flserver.results`:
  what calls take and return.

The names below load on first use, so that importing one light module of the
package (``coding``, ``credentials``) never imports requests.
Credentials never appear in logs, reprs or exception messages.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

if TYPE_CHECKING:
    from fl_sidecar.flserver.client import FlServerClient
    from fl_sidecar.flserver.coding import COMPRESSION_MODES
    from fl_sidecar.flserver.credentials import Credentials
    from fl_sidecar.flserver.downloads import DEFAULT_MAX_DOWNLOAD_SIZE
    from fl_sidecar.flserver.results import MetricValue, ProgressCallback, TransferResult

__all__ = [
    "COMPRESSION_MODES",
    "DEFAULT_MAX_DOWNLOAD_SIZE",
    "Credentials",
    "FlServerClient",
    "MetricValue",
    "ProgressCallback",
    "TransferResult",
]

# name -> module that defines it; imported on first attribute access (PEP 562).
_LAZY = {
    "COMPRESSION_MODES": "fl_sidecar.flserver.coding",
    "DEFAULT_MAX_DOWNLOAD_SIZE": "fl_sidecar.flserver.downloads",
    "Credentials": "fl_sidecar.flserver.credentials",
    "FlServerClient": "fl_sidecar.flserver.client",
    "MetricValue": "fl_sidecar.flserver.results",
    "ProgressCallback": "fl_sidecar.flserver.results",
    "TransferResult": "fl_sidecar.flserver.results",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fl_sidecar.flserver' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY))
