"""Old import path of the ``serve`` process.

The code lives in :mod:`fl_sidecar.sidecar.process` now;
this module only re-exports its names,
so that existing imports keep working.
"""

from __future__ import annotations

from fl_sidecar.sidecar.process import (
    TOKEN_METADATA_KEY,
    SidecarServer,
    check_socket_directory,
    register,
    run_serve,
)

__all__ = [
    "TOKEN_METADATA_KEY",
    "SidecarServer",
    "check_socket_directory",
    "register",
    "run_serve",
]
