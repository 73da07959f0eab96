"""Old import path of who may own the unix socket and its directories.

The code lives in :mod:`fl_sidecar.sidecar.socketdir` now;
this module only re-exports its names,
so that existing imports keep working.
"""

from __future__ import annotations

from fl_sidecar.sidecar.socketdir import (
    check_client_socket,
    check_socket_directory,
    check_socket_file,
    make_socket_directory,
    owner_name,
    resolve_owner,
)

__all__ = [
    "check_client_socket",
    "check_socket_directory",
    "check_socket_file",
    "make_socket_directory",
    "owner_name",
    "resolve_owner",
]
