"""The sidecar's settings: one typed object, read once from CLI flags and environment variables.

This is the only module of the package that reads ``os.environ``. Every other
class takes its settings as constructor arguments.

Precedence, per setting: the command-line flag, then the environment
variable, then the default. Secrets (the FL server password or token, a full
``Authorization`` header, the sidecar's API token) may also come from a file
(``--password-file`` and friends) so they stay out of ``ps`` and shell history.
The reference client's variables keep their names and meaning
(``FL_DEMONSTRATOR_BASE_URL``, ``FL_CLIENT_SERVER_HOST``,
``FL_CLIENT_SERVER_PORT``, ``FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR``,
``FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH``,
``FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY`` (sic, without ``SCRIPT_``)); new
ones are ``FL_SIDECAR_*``.

Compatibility mode (a training script per round, as the reference client
runs it) is on when ``--run-scripts`` (``FL_SIDECAR_RUN_SCRIPTS=1``), any
``--script-*`` flag or any of the reference client's three script variables
is set; ``FL_SIDECAR_RUN_SCRIPTS=0`` turns it off whatever else is set. When
on, what is not set takes the reference client's defaults: executor
``python``, script ``src/main.py``, working directory ``.``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

from fl_sidecar.errors import ConfigurationError

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
    "Settings",
    "add_arguments",
    "default_socket_path",
    "is_loopback_host",
    "parse_listen",
    "parse_size",
    "reference_client_environment",
    "strip_userinfo",
]


DEFAULT_MAX_MODEL_SIZE = 4 * 1024**3
"""Bytes: the largest model downloaded, accepted for upload or produced by Unpack (4 GiB).

A download decoded from a zstd bomb is written to the spool until this limit
stops it, so the default is a generous model size, not the size of a disk.
"""

DEFAULT_NOTIFICATION_PORT = 8101
"""The reference client's notification port."""

DEFAULT_SCRIPT_EXECUTOR = "python"
"""Compatibility mode: the reference client's default executor (looked up on ``PATH``)."""

DEFAULT_SCRIPT_PATH = "src/main.py"
"""Compatibility mode: the reference client's default training script."""

DEFAULT_SCRIPT_WORKING_DIRECTORY = "."
"""Compatibility mode: the reference client's default working directory (the current one)."""

DEFAULT_MAX_CONCURRENT_SCRIPTS = 2
"""Compatibility mode: training scripts run at once (each training's runs stay in order)."""

DEFAULT_MAX_QUEUED_SCRIPTS = 64
"""Compatibility mode: script runs waiting at most; further ones are dropped and logged."""

# The reference client's script variables, and the name this project read
# (wrongly) for the working directory before, still accepted with a warning.
_SCRIPT_EXECUTOR_VARIABLE = "FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR"
_SCRIPT_PATH_VARIABLE = "FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH"
_WORKING_DIRECTORY_VARIABLE = "FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY"
_DEPRECATED_WORKING_DIRECTORY_VARIABLE = "FL_DEMONSTRATOR_TRAINING_SCRIPT_WORKING_DIRETORY"

DEFAULT_SERVER_URL = "http://localhost:8000"
"""The FL server used when neither a flag nor an environment variable names one."""

DEFAULT_DRAIN_SECONDS = 10.0
"""Seconds in-flight transfers may take to finish after SIGTERM before they are cancelled."""

DEFAULT_MAX_CONCURRENT_RPCS = 64
"""Concurrent RPCs (each holds a worker thread; a WatchEvents stream holds one for its life)."""

# Unix socket paths longer than this do not fit sockaddr_un.sun_path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 107

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_SIZE_UNITS: Dict[str, int] = {
    "": 1,
    "B": 1,
    "K": 1024,
    "KB": 1000,
    "KIB": 1024,
    "M": 1024**2,
    "MB": 1000**2,
    "MIB": 1024**2,
    "G": 1024**3,
    "GB": 1000**3,
    "GIB": 1024**3,
    "T": 1024**4,
    "TB": 1000**4,
    "TIB": 1024**4,
}
# Environment variables holding the FL server's credentials: never passed on to a training script.
_SERVER_SECRET_VARIABLES = frozenset(
    {
        "FL_SIDECAR_USERNAME",
        "FL_SIDECAR_PASSWORD",
        "FL_SIDECAR_PASSWORD_FILE",
        "FL_SIDECAR_TOKEN",
        "FL_SIDECAR_TOKEN_FILE",
        "FL_SIDECAR_AUTHORIZATION",
        "FL_SIDECAR_AUTHORIZATION_FILE",
    }
)
# Environment variables holding the FL server's URL: passed on without their userinfo.
_SERVER_URL_VARIABLES = ("FL_SIDECAR_SERVER_URL", "FL_DEMONSTRATOR_BASE_URL")
_SIZE_PATTERN = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*\Z")

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    """Everything ``fl-sidecar serve`` needs to know, resolved and validated.

    Secret fields are excluded from ``repr`` so that logging a ``Settings``
    never leaks them. Sizes are bytes, durations seconds.
    """

    socket_path: Optional[str] = None
    trust_socket_parent: bool = False
    listen: Optional[Tuple[str, int]] = None
    allow_remote: bool = False
    api_token: Optional[str] = field(default=None, repr=False)
    server_url: str = DEFAULT_SERVER_URL
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    server_token: Optional[str] = field(default=None, repr=False)
    authorization: Optional[str] = field(default=None, repr=False)
    notification_host: str = "127.0.0.1"
    notification_port: Optional[int] = DEFAULT_NOTIFICATION_PORT
    script_executor: Optional[str] = None
    script_path: Optional[str] = None
    script_working_directory: Optional[str] = None
    max_concurrent_scripts: int = DEFAULT_MAX_CONCURRENT_SCRIPTS
    max_queued_scripts: int = DEFAULT_MAX_QUEUED_SCRIPTS
    script_training_ids: Optional[Tuple[str, ...]] = None
    metrics_host: str = "127.0.0.1"
    metrics_port: Optional[int] = None
    spool_dir: Optional[str] = None
    max_model_size: int = DEFAULT_MAX_MODEL_SIZE
    trust_pickles: bool = False
    compression: str = "auto"
    http_timeout: float = 60.0
    http_retries: int = 3
    log_level: str = "INFO"
    log_format: str = "text"
    drain_seconds: float = DEFAULT_DRAIN_SECONDS
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS
    ready_file: Optional[str] = None
    script_env: Optional[Dict[str, str]] = field(default=None, repr=False, compare=False)
    warnings: Tuple[str, ...] = field(default=(), compare=False)
    """Deprecations met while reading the settings, for the log once logging is set up."""

    @property
    def public_server_url(self) -> str:
        """The FL server URL without any ``user:password@`` part, safe to log and return."""
        return strip_userinfo(self.server_url)

    @property
    def compatibility_mode(self) -> bool:
        """Whether round notifications start the training script (the reference client's way)."""
        return self.script_path is not None

    def secrets(self) -> List[str]:
        """Every configured secret string (for redaction of logs and messages)."""
        found = [self.api_token, self.password, self.server_token, self.authorization]
        userinfo_password = urlsplit(self.server_url).password
        if userinfo_password:
            found.append(userinfo_password)
        return [value for value in found if value]

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None
    ) -> Settings:
        """Resolve the settings from parsed flags (see :func:`add_arguments`) and the environment.

        Args:
            args: the namespace argparse produced with :func:`add_arguments`.
            environ: the environment to read; ``None`` reads ``os.environ``.

        Raises:
            ConfigurationError: a value is invalid or settings contradict each other.
        """
        env: Mapping[str, str] = os.environ if environ is None else environ
        resolver = _Resolver(args, env)
        return resolver.settings()


class _Resolver:
    def __init__(self, args: argparse.Namespace, env: Mapping[str, str]) -> None:
        self._args = args
        self._env = env

    def _raw(self, dest: str, *names: str) -> Optional[str]:
        value = getattr(self._args, dest, None)
        if value is not None:
            return str(value)
        for name in names:
            if self._env.get(name, "") != "":
                return self._env[name]
        return None

    def _typed(self, dest: str, names: Tuple[str, ...], parse: Callable[[str], T], what: str) -> T:
        flag_value = getattr(self._args, dest, None)
        if flag_value is not None and not isinstance(flag_value, str):
            return flag_value  # type: ignore[no-any-return]
        raw = self._raw(dest, *names)
        if raw is None:
            raise LookupError(dest)
        try:
            return parse(raw)
        except (ValueError, ConfigurationError) as exc:
            source = f"--{dest.replace('_', '-')} / {names[0]}" if names else dest
            raise ConfigurationError(f"invalid {what} for {source}: {exc}") from None

    def _optional(
        self, dest: str, names: Tuple[str, ...], parse: Callable[[str], T], what: str
    ) -> Optional[T]:
        try:
            return self._typed(dest, names, parse, what)
        except LookupError:
            return None

    def _default(
        self, dest: str, names: Tuple[str, ...], parse: Callable[[str], T], what: str, default: T
    ) -> T:
        value = self._optional(dest, names, parse, what)
        return default if value is None else value

    def _secret(self, dest: str, file_dest: str, *names: str) -> Optional[str]:
        file_path = getattr(self._args, file_dest, None)
        if file_path is None:
            for name in names:
                file_name = name + "_FILE"
                if self._env.get(file_name):
                    file_path = self._env[file_name]
                    break
        direct = self._raw(dest, *names)
        if file_path is not None and getattr(self._args, dest, None) is None:
            try:
                text = Path(file_path).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read the secret file for --{dest.replace('_', '-')}: "
                    f"{exc.strerror or exc}"
                ) from None
            # Only the trailing newline an editor adds is dropped; the rest is the secret.
            return text.rstrip("\r\n") or None
        return direct

    def settings(self) -> Settings:
        listen = self._optional("listen", ("FL_SIDECAR_LISTEN",), parse_listen, "listen address")
        allow_remote = self._default(
            "allow_remote", ("FL_SIDECAR_ALLOW_REMOTE",), parse_bool, "boolean", False
        )
        socket_path = self._raw("socket", "FL_SIDECAR_SOCKET")
        if socket_path is None and listen is None:
            socket_path = default_socket_path(self._env)
        if socket_path is not None and len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
            raise ConfigurationError(
                f"the unix socket path is longer than {_MAX_SOCKET_PATH} bytes: {socket_path}"
            )
        if listen is not None and not allow_remote and not is_loopback_host(listen[0]):
            raise ConfigurationError(
                f"refusing to listen on the non-loopback address {listen[0]!r} without "
                "--allow-remote (FL_SIDECAR_ALLOW_REMOTE=1)"
            )
        notification_host = self._raw("notification_host", "FL_CLIENT_SERVER_HOST") or "127.0.0.1"
        if not allow_remote and not is_loopback_host(notification_host):
            raise ConfigurationError(
                f"refusing to serve notifications on the non-loopback address "
                f"{notification_host!r} without --allow-remote (FL_SIDECAR_ALLOW_REMOTE=1)"
            )
        disabled = self._default(
            "no_notifications", ("FL_SIDECAR_NO_NOTIFICATIONS",), parse_bool, "boolean", False
        )
        notification_port: Optional[int] = self._default(
            "notification_port",
            ("FL_CLIENT_SERVER_PORT",),
            parse_port,
            "port",
            DEFAULT_NOTIFICATION_PORT,
        )
        if disabled:
            notification_port = None
        metrics_port = self._optional(
            "metrics_port", ("FL_SIDECAR_METRICS_PORT",), parse_port, "port"
        )
        metrics_host = self._raw("metrics_host", "FL_SIDECAR_METRICS_HOST") or "127.0.0.1"
        if not allow_remote and not is_loopback_host(metrics_host):
            raise ConfigurationError(
                f"refusing to serve metrics on the non-loopback address {metrics_host!r} "
                "without --allow-remote"
            )
        compression = (self._raw("compression", "FL_SIDECAR_COMPRESSION") or "auto").lower()
        if compression not in ("auto", "never", "always"):
            raise ConfigurationError(
                f"invalid compression {compression!r}: expected auto, never or always"
            )
        log_format = (self._raw("log_format", "FL_SIDECAR_LOG_FORMAT") or "text").lower()
        if log_format not in ("text", "json"):
            raise ConfigurationError(f"invalid log format {log_format!r}: expected text or json")
        log_level = (self._raw("log_level", "FL_SIDECAR_LOG_LEVEL") or "INFO").upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigurationError(
                f"invalid log level {log_level!r}: expected DEBUG, INFO, WARNING or ERROR"
            )
        server_url = (
            self._raw("server_url", "FL_SIDECAR_SERVER_URL", "FL_DEMONSTRATOR_BASE_URL")
            or DEFAULT_SERVER_URL
        )
        parts = urlsplit(server_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(
                f"invalid FL server URL {strip_userinfo(server_url)!r}: expected http(s)://host[:port]"
            )
        username = self._raw("username", "FL_SIDECAR_USERNAME")
        password = self._secret("password", "password_file", "FL_SIDECAR_PASSWORD")
        if (username is None) != (password is None):
            raise ConfigurationError("a username needs a password and a password a username")
        warnings: List[str] = []
        script_executor = self._raw("script_executor", _SCRIPT_EXECUTOR_VARIABLE)
        script_path = self._raw("script_path", _SCRIPT_PATH_VARIABLE)
        script_working_directory = self._raw(
            "script_working_directory", _WORKING_DIRECTORY_VARIABLE
        )
        if script_working_directory is None:
            script_working_directory = self._env.get(_DEPRECATED_WORKING_DIRECTORY_VARIABLE) or None
            if script_working_directory is not None:
                warnings.append(
                    f"{_DEPRECATED_WORKING_DIRECTORY_VARIABLE} is deprecated: the reference "
                    f"client's name is {_WORKING_DIRECTORY_VARIABLE} (sic)"
                )
        run_scripts = self._optional(
            "run_scripts", ("FL_SIDECAR_RUN_SCRIPTS",), parse_bool, "boolean"
        )
        if run_scripts is None:
            run_scripts = any(
                value is not None
                for value in (script_executor, script_path, script_working_directory)
            )
        if run_scripts:
            script_executor = script_executor or DEFAULT_SCRIPT_EXECUTOR
            script_path = script_path or DEFAULT_SCRIPT_PATH
            script_working_directory = script_working_directory or DEFAULT_SCRIPT_WORKING_DIRECTORY
        else:
            script_executor = script_path = script_working_directory = None
        training_ids_text = self._raw("script_training_ids", "FL_SIDECAR_SCRIPT_TRAINING_IDS")
        script_training_ids: Optional[Tuple[str, ...]] = None
        if training_ids_text is not None:
            script_training_ids = tuple(
                part.strip() for part in training_ids_text.split(",") if part.strip()
            )
            if not script_training_ids:
                raise ConfigurationError(
                    "--script-training-ids / FL_SIDECAR_SCRIPT_TRAINING_IDS names no training id"
                )
        # The training script inherits the environment without the FL server's
        # credentials (it talks to the sidecar, which keeps them), plus where
        # the sidecar listens.
        script_env = {k: v for k, v in self._env.items() if k not in _SERVER_SECRET_VARIABLES}
        for name in _SERVER_URL_VARIABLES:
            if name in script_env:
                # A user:password@ in the URL is a credential too.
                script_env[name] = strip_userinfo(script_env[name])
        if socket_path is not None:
            script_env["FL_SIDECAR_SOCKET"] = socket_path
        return Settings(
            socket_path=socket_path,
            trust_socket_parent=self._default(
                "trust_socket_parent",
                ("FL_SIDECAR_TRUST_SOCKET_PARENT",),
                parse_bool,
                "boolean",
                False,
            ),
            listen=listen,
            allow_remote=allow_remote,
            api_token=self._secret("api_token", "api_token_file", "FL_SIDECAR_API_TOKEN"),
            server_url=server_url,
            username=username,
            password=password,
            server_token=self._secret("token", "token_file", "FL_SIDECAR_TOKEN"),
            authorization=self._secret(
                "authorization", "authorization_file", "FL_SIDECAR_AUTHORIZATION"
            ),
            notification_host=notification_host,
            notification_port=notification_port,
            script_executor=script_executor,
            script_path=script_path,
            script_working_directory=script_working_directory,
            max_concurrent_scripts=self._default(
                "max_concurrent_scripts",
                ("FL_SIDECAR_MAX_CONCURRENT_SCRIPTS",),
                _positive_int,
                "count",
                DEFAULT_MAX_CONCURRENT_SCRIPTS,
            ),
            max_queued_scripts=self._default(
                "max_queued_scripts",
                ("FL_SIDECAR_MAX_QUEUED_SCRIPTS",),
                _positive_int,
                "count",
                DEFAULT_MAX_QUEUED_SCRIPTS,
            ),
            script_training_ids=script_training_ids,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            spool_dir=self._raw("spool_dir", "FL_SIDECAR_SPOOL_DIR"),
            max_model_size=self._default(
                "max_model_size",
                ("FL_SIDECAR_MAX_MODEL_SIZE",),
                parse_size,
                "size",
                DEFAULT_MAX_MODEL_SIZE,
            ),
            trust_pickles=self._default(
                "trust_pickles", ("FL_SIDECAR_TRUST_PICKLES",), parse_bool, "boolean", False
            ),
            compression=compression,
            http_timeout=self._default(
                "http_timeout", ("FL_SIDECAR_HTTP_TIMEOUT",), _positive_float, "seconds", 60.0
            ),
            http_retries=self._default(
                "http_retries", ("FL_SIDECAR_HTTP_RETRIES",), _non_negative_int, "count", 3
            ),
            log_level=log_level,
            log_format=log_format,
            drain_seconds=self._default(
                "drain_seconds",
                ("FL_SIDECAR_DRAIN_SECONDS",),
                _non_negative_float,
                "seconds",
                DEFAULT_DRAIN_SECONDS,
            ),
            max_concurrent_rpcs=self._default(
                "max_concurrent_rpcs",
                ("FL_SIDECAR_MAX_CONCURRENT_RPCS",),
                _positive_int,
                "count",
                DEFAULT_MAX_CONCURRENT_RPCS,
            ),
            ready_file=self._raw("ready_file", "FL_SIDECAR_READY_FILE"),
            script_env=script_env,
            warnings=tuple(warnings),
        )


def parse_bool(text: str) -> bool:
    """Parse ``1/true/yes/on`` or ``0/false/no/off`` (any case).

    Raises:
        ValueError: anything else.
    """
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def parse_size(text: str) -> int:
    """Parse a byte size: ``1048576``, ``512M``/``512MiB`` (binary), ``500MB`` (decimal).

    Returns:
        The size in bytes (at least 1).

    Raises:
        ValueError: not a size, an unknown unit, or zero.
    """
    match = _SIZE_PATTERN.match(text)
    if match is None or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"expected a size such as 4G or 500MB, got {text!r}")
    value = int(match.group(1)) * _SIZE_UNITS[match.group(2).upper()]
    if value < 1:
        raise ValueError("the size must be at least 1 byte")
    return value


def parse_port(text: str) -> int:
    """Parse a TCP port, 0 (any free port) to 65535.

    Raises:
        ValueError: not an integer in that range.
    """
    port = int(text)
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is outside 0..65535")
    return port


def parse_listen(text: str) -> Tuple[str, int]:
    """Parse ``host:port`` (``[::1]:port`` for IPv6) into ``(host, port)``.

    Raises:
        ValueError: no port, or the port is invalid.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, parse_port(port_text)


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names only this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def strip_userinfo(url: str) -> str:
    """``url`` without its ``user:password@`` part (safe to log and to return to trainers)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None and "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def default_socket_path(environ: Mapping[str, str]) -> str:
    """The default unix socket: ``$XDG_RUNTIME_DIR/fl-sidecar/sidecar.sock``, else under /tmp.

    The /tmp fallback is a per-user directory (``/tmp/fl-sidecar-<uid>``) that
    the server creates with mode 0700; one that another user made first is
    refused, never used.
    """
    runtime_dir = environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return os.path.join(runtime_dir, "fl-sidecar", "sidecar.sock")
    return os.path.join("/tmp", f"fl-sidecar-{os.getuid()}", "sidecar.sock")


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"expected a positive number, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError(f"expected a non-negative number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"expected a non-negative integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``serve`` flag to ``parser``; each help text names its environment variable.

    Every flag defaults to ``None`` so that :meth:`Settings.from_args` can tell
    "not given" from a value and fall back to the environment.
    """
    net = parser.add_argument_group("listening")
    net.add_argument(
        "--socket",
        metavar="PATH",
        help="unix socket to serve gRPC on, created with mode 0600 [FL_SIDECAR_SOCKET; default "
        "$XDG_RUNTIME_DIR/fl-sidecar/sidecar.sock or /tmp/fl-sidecar-UID/sidecar.sock when "
        "--listen is not given]",
    )
    net.add_argument(
        "--trust-socket-parent",
        action="store_const",
        const=True,
        help="serve even if a directory above the socket's directory is writable by others "
        "without the sticky bit, e.g. a Kubernetes emptyDir that only the pod's containers "
        "mount; the socket's own directory must still be private "
        "[FL_SIDECAR_TRUST_SOCKET_PARENT]",
    )
    net.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="also (or only) serve gRPC on TCP, e.g. 127.0.0.1:50051; port 0 picks a free "
        "port [FL_SIDECAR_LISTEN]",
    )
    net.add_argument(
        "--allow-remote",
        action="store_const",
        const=True,
        help="allow non-loopback addresses for --listen, the notification endpoint and "
        "metrics [FL_SIDECAR_ALLOW_REMOTE]",
    )
    net.add_argument(
        "--api-token",
        metavar="TOKEN",
        help="require the gRPC metadata x-fl-sidecar-token: TOKEN on every call "
        "[FL_SIDECAR_API_TOKEN]",
    )
    net.add_argument(
        "--api-token-file",
        metavar="PATH",
        help="read the API token from a file [FL_SIDECAR_API_TOKEN_FILE]",
    )
    net.add_argument(
        "--max-concurrent-rpcs",
        metavar="N",
        type=_positive_int,
        help="concurrent calls; each holds a worker thread, a WatchEvents stream for its "
        "whole life; more are refused with RESOURCE_EXHAUSTED [FL_SIDECAR_MAX_CONCURRENT_RPCS; "
        f"default {DEFAULT_MAX_CONCURRENT_RPCS}]",
    )
    net.add_argument(
        "--ready-file",
        metavar="PATH",
        help="write a JSON line with the actual addresses and ports here once serving "
        "[FL_SIDECAR_READY_FILE]",
    )

    fl = parser.add_argument_group("FL server")
    fl.add_argument(
        "--server-url",
        metavar="URL",
        help="the FL server's base URL [FL_SIDECAR_SERVER_URL, then FL_DEMONSTRATOR_BASE_URL; "
        f"default {DEFAULT_SERVER_URL}]",
    )
    fl.add_argument("--username", help="FL server user (Basic auth) [FL_SIDECAR_USERNAME]")
    fl.add_argument(
        "--password", help="FL server password; prefer --password-file [FL_SIDECAR_PASSWORD]"
    )
    fl.add_argument(
        "--password-file",
        metavar="PATH",
        help="read the FL server password from a file [FL_SIDECAR_PASSWORD_FILE]",
    )
    fl.add_argument(
        "--token",
        help="FL server API token, sent as 'Authorization: Token ...'; preferred over Basic "
        "[FL_SIDECAR_TOKEN]",
    )
    fl.add_argument(
        "--token-file",
        metavar="PATH",
        help="read the FL server token from a file [FL_SIDECAR_TOKEN_FILE]",
    )
    fl.add_argument(
        "--authorization",
        metavar="HEADER",
        help="a complete HTTP Authorization header value [FL_SIDECAR_AUTHORIZATION]",
    )
    fl.add_argument(
        "--authorization-file",
        metavar="PATH",
        help="read the Authorization header value from a file [FL_SIDECAR_AUTHORIZATION_FILE]",
    )
    fl.add_argument(
        "--compression",
        choices=("auto", "never", "always"),
        help="zstd for uploads: auto negotiates with the server [FL_SIDECAR_COMPRESSION; "
        "default auto]",
    )
    fl.add_argument(
        "--http-timeout",
        metavar="SECONDS",
        type=_positive_float,
        help="seconds to wait for each read of an FL server answer (between bytes; connecting "
        "has its own 5 s limit) [FL_SIDECAR_HTTP_TIMEOUT; default 60]",
    )
    fl.add_argument(
        "--http-retries",
        metavar="N",
        type=_non_negative_int,
        help="retries of idempotent requests [FL_SIDECAR_HTTP_RETRIES; default 3]",
    )

    notes = parser.add_argument_group("notifications and compatibility mode")
    notes.add_argument(
        "--notification-host",
        metavar="HOST",
        help="address of the endpoint the FL server POSTs notifications to "
        "[FL_CLIENT_SERVER_HOST; default 127.0.0.1, loopback unlike the reference client]",
    )
    notes.add_argument(
        "--notification-port",
        metavar="PORT",
        type=parse_port,
        help="its port; 0 picks a free one [FL_CLIENT_SERVER_PORT; default "
        f"{DEFAULT_NOTIFICATION_PORT}]",
    )
    notes.add_argument(
        "--no-notifications",
        action="store_const",
        const=True,
        help="do not start the notification endpoint [FL_SIDECAR_NO_NOTIFICATIONS]",
    )
    notes.add_argument(
        "--run-scripts",
        action="store_const",
        const=True,
        help="compatibility mode: start the training script for each round and test "
        "notification, like the reference client; also on when any --script-* flag or "
        "reference script variable is set, off with FL_SIDECAR_RUN_SCRIPTS=0 "
        "[FL_SIDECAR_RUN_SCRIPTS]",
    )
    notes.add_argument(
        "--script-executor",
        metavar="PROGRAM",
        help="compatibility mode: the program that runs the training script "
        f"[{_SCRIPT_EXECUTOR_VARIABLE}; default {DEFAULT_SCRIPT_EXECUTOR}]",
    )
    notes.add_argument(
        "--script-path",
        metavar="PATH",
        help="compatibility mode: the training script, started with train|test --training-id "
        f"--round --model-id per event [{_SCRIPT_PATH_VARIABLE}; default {DEFAULT_SCRIPT_PATH}]",
    )
    notes.add_argument(
        "--script-working-directory",
        metavar="DIR",
        help="compatibility mode: its working directory "
        f"[{_WORKING_DIRECTORY_VARIABLE} (sic), or the deprecated "
        f"{_DEPRECATED_WORKING_DIRECTORY_VARIABLE}; default the current directory]",
    )
    notes.add_argument(
        "--max-concurrent-scripts",
        metavar="N",
        type=_positive_int,
        help="compatibility mode: training scripts running at once "
        f"[FL_SIDECAR_MAX_CONCURRENT_SCRIPTS; default {DEFAULT_MAX_CONCURRENT_SCRIPTS}]",
    )
    notes.add_argument(
        "--max-queued-scripts",
        metavar="N",
        type=_positive_int,
        help="compatibility mode: script runs waiting at most; more are dropped and logged "
        f"[FL_SIDECAR_MAX_QUEUED_SCRIPTS; default {DEFAULT_MAX_QUEUED_SCRIPTS}]",
    )
    notes.add_argument(
        "--script-training-ids",
        metavar="ID[,ID...]",
        help="compatibility mode: run scripts only for these trainings; unset: only for "
        "trainings the FL server confirms [FL_SIDECAR_SCRIPT_TRAINING_IDS]",
    )

    data = parser.add_argument_group("models and data")
    data.add_argument(
        "--spool-dir",
        metavar="DIR",
        help="where models in transit are spooled [FL_SIDECAR_SPOOL_DIR; default the system "
        "temp dir]",
    )
    data.add_argument(
        "--max-model-size",
        metavar="SIZE",
        help="largest model accepted for upload and output of Unpack, e.g. 4G "
        "[FL_SIDECAR_MAX_MODEL_SIZE; default 4G]",
    )
    data.add_argument(
        "--trust-pickles",
        action="store_const",
        const=True,
        help="pass TORCH downloads through without vetting them with the restricted reader "
        "[FL_SIDECAR_TRUST_PICKLES]",
    )

    ops = parser.add_argument_group("operations")
    ops.add_argument(
        "--metrics-port",
        metavar="PORT",
        type=parse_port,
        help="serve Prometheus metrics on this port, 0 = any free one; off when unset "
        "[FL_SIDECAR_METRICS_PORT]",
    )
    ops.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address of the metrics endpoint [FL_SIDECAR_METRICS_HOST; default 127.0.0.1]",
    )
    ops.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING or ERROR [FL_SIDECAR_LOG_LEVEL; default INFO]",
    )
    ops.add_argument(
        "--log-format",
        choices=("text", "json"),
        help="key=value text or JSON lines on stderr [FL_SIDECAR_LOG_FORMAT; default text]",
    )
    ops.add_argument(
        "--drain-seconds",
        metavar="SECONDS",
        type=_non_negative_float,
        help="on SIGTERM/SIGINT, how long in-flight transfers may finish before they are "
        f"cancelled [FL_SIDECAR_DRAIN_SECONDS; default {DEFAULT_DRAIN_SECONDS:g}]",
    )


REFERENCE_CLIENT_DEFAULTS: Dict[str, str] = {
    "FL_DEMONSTRATOR_BASE_URL": DEFAULT_SERVER_URL,
    "FL_DEMONSTRATOR_TRAINING_SCRIPT_EXECUTOR": "python",
    "FL_DEMONSTRATOR_TRAINING_SCRIPT_PATH": "src/main.py",
    "FL_DEMONSTRATOR_TRAINING_WORKING_DIRETORY": ".",
    "FL_CLIENT_SERVER_HOST": "0.0.0.0",
    "FL_CLIENT_SERVER_PORT": str(DEFAULT_NOTIFICATION_PORT),
}
"""The reference client's environment variables and its defaults for them (``DIRETORY`` sic)."""


def reference_client_environment(env: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """The reference client's settings variables as it reads them (for ``compat.Settings``).

    Each of :data:`REFERENCE_CLIENT_DEFAULTS` from ``env`` (default: the process
    environment), else its default. As in the reference client, a variable that
    is set but empty counts as set.
    """
    source = os.environ if env is None else env
    return {name: source.get(name, default) for name, default in REFERENCE_CLIENT_DEFAULTS.items()}
