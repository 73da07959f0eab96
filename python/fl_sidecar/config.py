"""Old import path of the sidecar's settings.

The code lives in :mod:`fl_sidecar.sidecar.settings` now;
this module only re-exports its names,
so that existing imports keep working.
"""

from __future__ import annotations

from fl_sidecar.sidecar.settings import (
    DEFAULT_DRAIN_SECONDS,
    DEFAULT_MAX_CONCURRENT_RPCS,
    DEFAULT_MAX_CONCURRENT_SCRIPTS,
    DEFAULT_MAX_MODEL_SIZE,
    DEFAULT_MAX_QUEUED_SCRIPTS,
    DEFAULT_NOTIFICATION_PORT,
    DEFAULT_SCRIPT_EXECUTOR,
    DEFAULT_SCRIPT_PATH,
    DEFAULT_SCRIPT_WORKING_DIRECTORY,
    DEFAULT_SERVER_URL,
    REFERENCE_CLIENT_DEFAULTS,
    SETTINGS,
    Setting,
    Settings,
    add_arguments,
    default_socket_path,
    is_loopback_host,
    parse_bool,
    parse_listen,
    parse_port,
    parse_size,
    reference_client_environment,
    strip_userinfo,
)

__all__ = [
    "DEFAULT_DRAIN_SECONDS",
    "DEFAULT_MAX_CONCURRENT_RPCS",
    "DEFAULT_MAX_CONCURRENT_SCRIPTS",
    "DEFAULT_MAX_MODEL_SIZE",
    "DEFAULT_MAX_QUEUED_SCRIPTS",
    "DEFAULT_NOTIFICATION_PORT",
    "DEFAULT_SCRIPT_EXECUTOR",
    "DEFAULT_SCRIPT_PATH",
    "DEFAULT_SCRIPT_WORKING_DIRECTORY",
    "DEFAULT_SERVER_URL",
    "REFERENCE_CLIENT_DEFAULTS",
    "SETTINGS",
    "Setting",
    "Settings",
    "add_arguments",
    "default_socket_path",
    "is_loopback_host",
    "parse_bool",
    "parse_listen",
    "parse_port",
    "parse_size",
    "reference_client_environment",
    "strip_userinfo",
]
