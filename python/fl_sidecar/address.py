"""Where the sidecar listens, as both ends resolve it from the environment.

The sidecar serves where these say, and a trainer's client looks there, so a
training script started in the sidecar's environment finds it:

1. ``FL_SIDECAR_SOCKET``: a unix socket path;
2. else ``FL_SIDECAR_LISTEN``: ``host:port`` (``[::1]:port`` for IPv6);
3. else ``$XDG_RUNTIME_DIR/fl-sidecar/sidecar.sock``;
4. else ``/tmp/fl-sidecar-<uid>/sidecar.sock``.

A variable set to the empty string counts as unset. This module reads those
three variables and nothing else: no other setting of the sidecar, no secret
file. It imports the standard library and :mod:`fl_sidecar.errors` only (no
grpc), so the sidecar's settings and the trainer's client share it.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Tuple

from fl_sidecar.errors import ConfigurationError

__all__ = [
    "LISTEN_VARIABLE",
    "SOCKET_VARIABLE",
    "default_socket_path",
    "default_target",
    "normalize_target",
    "parse_listen",
    "unix_socket_path",
]

SOCKET_VARIABLE = "FL_SIDECAR_SOCKET"
"""Environment variable: the unix socket the sidecar serves on."""
LISTEN_VARIABLE = "FL_SIDECAR_LISTEN"
"""Environment variable: the TCP ``host:port`` the sidecar serves on (instead of a socket)."""


def default_socket_path(environ: Optional[Mapping[str, str]] = None) -> str:
    """The default unix socket: ``$XDG_RUNTIME_DIR/fl-sidecar/sidecar.sock``, else under /tmp.

    The /tmp fallback is a per-user directory (``/tmp/fl-sidecar-<uid>``) that
    the sidecar creates with mode 0700; one that another user made first is
    refused, never used. ``environ`` defaults to the process environment.
    """
    source = os.environ if environ is None else environ
    runtime_dir = source.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return os.path.join(runtime_dir, "fl-sidecar", "sidecar.sock")
    return os.path.join("/tmp", f"fl-sidecar-{os.getuid()}", "sidecar.sock")


def parse_listen(text: str) -> Tuple[str, int]:
    """Parse ``host:port`` (``[::1]:port`` for IPv6) into ``(host, port)``.

    Raises:
        ValueError: no host, no port, or a port outside 0..65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0..65535")
    return host, port


def default_target(environ: Optional[Mapping[str, str]] = None) -> str:
    """The gRPC target of the sidecar this environment names (see the module's order).

    ``environ`` defaults to the process environment.

    Raises:
        fl_sidecar.errors.ConfigurationError: ``FL_SIDECAR_LISTEN`` is not ``host:port``.
    """
    source = os.environ if environ is None else environ
    socket_path = source.get(SOCKET_VARIABLE, "")
    if socket_path:
        return "unix:" + socket_path
    listen = source.get(LISTEN_VARIABLE, "")
    if listen:
        try:
            host, port = parse_listen(listen)
        except ValueError as exc:
            raise ConfigurationError(
                f"invalid listen address in {LISTEN_VARIABLE}: {exc}"
            ) from None
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "unix:" + default_socket_path(source)


def normalize_target(target: Optional[str]) -> str:
    """Turn a user's address into a gRPC target.

    ``None`` means :func:`default_target`; a path (``/x/y.sock``, ``./y.sock``)
    becomes ``unix:<path>``; ``unix:...``, ``unix-abstract:...``, ``dns:...``
    and ``host:port`` pass through unchanged.

    Raises:
        ValueError: for an empty target.
        fl_sidecar.errors.ConfigurationError: ``None`` and a malformed ``FL_SIDECAR_LISTEN``.
    """
    if target is None:
        return default_target()
    target = target.strip()
    if not target:
        raise ValueError("empty sidecar target")
    if target.startswith(("/", "./", "../")):
        return "unix:" + os.path.abspath(target)
    return target


def unix_socket_path(target: str) -> Optional[str]:
    """The file system path of a ``unix:`` gRPC target; ``None`` for any other target.

    ``unix:///abs``, ``unix:/abs`` and ``unix:relative`` name a path;
    ``unix-abstract:`` sockets have none.
    """
    if target.startswith("unix://"):
        return target[len("unix://") :] or None
    if target.startswith("unix:"):
        return os.path.abspath(target[len("unix:") :]) if target[len("unix:") :] else None
    return None
