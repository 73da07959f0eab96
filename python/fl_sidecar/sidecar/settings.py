"""The sidecar's settings: one typed object, read once from CLI flags and environment variables.

This is the only module of the package that reads ``os.environ``. Every other
class takes its settings as constructor arguments.

Each setting is declared once, as an entry of :data:`SETTINGS` (its flag,
variables, parser, default and help); :func:`add_arguments` makes the flags
from it, :meth:`Settings.from_args` the lookup and the typed :class:`Settings`,
and :func:`_validate` holds the rules between settings.

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
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from fl_sidecar.address import default_socket_path
from fl_sidecar.errors import ConfigurationError
from fl_sidecar.sidecar.values import (
    choice,
    is_loopback_host,
    non_negative_float,
    non_negative_int,
    parse_bool,
    parse_listen,
    parse_port,
    parse_server_url,
    parse_size,
    parse_training_ids,
    positive_float,
    positive_int,
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


@dataclass(frozen=True)
class Setting:
    """One setting of ``fl-sidecar serve``: its flag, environment variables, parser, default.

    Attributes:
        flag: the command-line flag, e.g. ``"--spool-dir"``; its argparse dest is
            the flag's name with ``_`` for ``-``.
        env: the environment variables read, in order (the first set one wins).
        field: the :class:`Settings` attribute it fills (``None``: it only steers
            others, e.g. ``--no-notifications``).
        help: what it does, for ``--help`` (the ``[VARIABLE; default ...]`` part is added).
        group: the ``--help`` section.
        parse: turns the text of a flag or variable into the value (raises
            ``ValueError`` or ``ConfigurationError`` for a bad one).
        what: what the value is, for error messages ("port", "size"...).
        default: the value when neither flag nor variable is set.
        default_text: the default as ``--help`` and the docs say it (``None``: ``str(default)``,
            or no default shown when ``default`` is ``None``).
        metavar: the flag's value name in ``--help``; ``None`` for a switch.
        switch: a flag without a value (``--allow-remote``); its variable is a boolean.
        choices: the accepted values, checked by argparse for the flag and by ``parse``.
        typed_flag: argparse applies ``parse`` to the flag (a bad value exits with usage).
        secret_file: also ``<flag>-file PATH`` and ``<VARIABLE>_FILE``: read the value
            from a file (the file wins over the variable, the flag over both).
        deprecated_env: older names still read, after ``env``, with a warning.
        env_note: said after the variables in ``--help``, e.g. "(sic)".
        applies_default: ``False`` when the cross-field check decides the value of
            an unset setting (e.g. the script settings outside compatibility mode).
    """

    flag: str
    env: Tuple[str, ...]
    field: Optional[str]
    help: str
    group: str
    parse: Callable[[str], Any] = str
    what: str = "value"
    default: Any = None
    default_text: Optional[str] = None
    metavar: Optional[str] = None
    switch: bool = False
    choices: Optional[Tuple[str, ...]] = None
    typed_flag: bool = False
    secret_file: bool = False
    deprecated_env: Tuple[str, ...] = ()
    env_note: str = ""
    applies_default: bool = True

    @property
    def dest(self) -> str:
        """The argparse attribute of the flag."""
        return self.flag[2:].replace("-", "_")

    @property
    def file_flag(self) -> str:
        """``<flag>-file`` (only meaningful with ``secret_file``)."""
        return f"{self.flag}-file"

    def help_text(self) -> str:
        """The ``--help`` line: what it does, then ``[VARIABLE...; default ...]``."""
        names = ", then ".join(self.env)
        if self.env_note:
            names = f"{names} {self.env_note}"
        if self.deprecated_env:
            names += ", or the deprecated " + ", ".join(self.deprecated_env)
        shown = self.shown_default()
        return f"{self.help} [{names}; default {shown}]" if shown else f"{self.help} [{names}]"

    def shown_default(self) -> Optional[str]:
        """The default as ``--help`` and docs/sidecar.md state it; ``None`` when there is none."""
        if self.default_text is not None:
            return self.default_text
        if self.default is None or self.switch:
            return None
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_LISTENING = "listening"
_FL_SERVER = "FL server"
_NOTIFICATIONS = "notifications and compatibility mode"
_DATA = "models and data"
_OPERATIONS = "operations"

SETTINGS: Tuple[Setting, ...] = (
    Setting(
        "--socket",
        ("FL_SIDECAR_SOCKET",),
        "socket_path",
        "unix socket to serve gRPC on, created with mode 0600",
        _LISTENING,
        metavar="PATH",
        default_text="$XDG_RUNTIME_DIR/fl-sidecar/sidecar.sock or "
        "/tmp/fl-sidecar-UID/sidecar.sock when --listen is not given",
        applies_default=False,
    ),
    Setting(
        "--trust-socket-parent",
        ("FL_SIDECAR_TRUST_SOCKET_PARENT",),
        "trust_socket_parent",
        "serve even if a directory above the socket's directory is writable by others "
        "without the sticky bit, e.g. a Kubernetes emptyDir that only the pod's containers "
        "mount; the socket's own directory must still be private",
        _LISTENING,
        parse=parse_bool,
        what="boolean",
        default=False,
        switch=True,
    ),
    Setting(
        "--listen",
        ("FL_SIDECAR_LISTEN",),
        "listen",
        "also (or only) serve gRPC on TCP, e.g. 127.0.0.1:50051; port 0 picks a free port",
        _LISTENING,
        parse=parse_listen,
        what="listen address",
        metavar="HOST:PORT",
    ),
    Setting(
        "--allow-remote",
        ("FL_SIDECAR_ALLOW_REMOTE",),
        "allow_remote",
        "allow non-loopback addresses for --listen, the notification endpoint and metrics",
        _LISTENING,
        parse=parse_bool,
        what="boolean",
        default=False,
        switch=True,
    ),
    Setting(
        "--api-token",
        ("FL_SIDECAR_API_TOKEN",),
        "api_token",
        "require the gRPC metadata x-fl-sidecar-token: TOKEN on every call",
        _LISTENING,
        metavar="TOKEN",
        secret_file=True,
    ),
    Setting(
        "--max-concurrent-rpcs",
        ("FL_SIDECAR_MAX_CONCURRENT_RPCS",),
        "max_concurrent_rpcs",
        "concurrent calls; each holds a worker thread, a WatchEvents stream for its whole "
        "life; more are refused with RESOURCE_EXHAUSTED",
        _LISTENING,
        parse=positive_int,
        what="count",
        default=DEFAULT_MAX_CONCURRENT_RPCS,
        metavar="N",
        typed_flag=True,
    ),
    Setting(
        "--ready-file",
        ("FL_SIDECAR_READY_FILE",),
        "ready_file",
        "write a JSON line with the actual addresses and ports here once serving",
        _LISTENING,
        metavar="PATH",
    ),
    Setting(
        "--server-url",
        ("FL_SIDECAR_SERVER_URL", "FL_DEMONSTRATOR_BASE_URL"),
        "server_url",
        "the FL server's base URL",
        _FL_SERVER,
        parse=parse_server_url,
        what="FL server URL",
        default=DEFAULT_SERVER_URL,
        metavar="URL",
    ),
    Setting(
        "--username",
        ("FL_SIDECAR_USERNAME",),
        "username",
        "FL server user (Basic auth)",
        _FL_SERVER,
        metavar="USERNAME",
    ),
    Setting(
        "--password",
        ("FL_SIDECAR_PASSWORD",),
        "password",
        "FL server password; prefer --password-file",
        _FL_SERVER,
        metavar="PASSWORD",
        secret_file=True,
    ),
    Setting(
        "--token",
        ("FL_SIDECAR_TOKEN",),
        "server_token",
        "FL server API token, sent as 'Authorization: Token ...'; preferred over Basic",
        _FL_SERVER,
        metavar="TOKEN",
        secret_file=True,
    ),
    Setting(
        "--authorization",
        ("FL_SIDECAR_AUTHORIZATION",),
        "authorization",
        "a complete HTTP Authorization header value",
        _FL_SERVER,
        metavar="HEADER",
        secret_file=True,
    ),
    Setting(
        "--compression",
        ("FL_SIDECAR_COMPRESSION",),
        "compression",
        "zstd for uploads: auto negotiates with the server; never also stops downloads "
        "from being offered zstd",
        _FL_SERVER,
        parse=choice(("auto", "never", "always"), str.lower),
        what="compression",
        default="auto",
        metavar="{auto,never,always}",
        choices=("auto", "never", "always"),
    ),
    Setting(
        "--http-timeout",
        ("FL_SIDECAR_HTTP_TIMEOUT",),
        "http_timeout",
        "seconds to wait for each read of an FL server answer (between bytes; connecting "
        "has its own 5 s limit)",
        _FL_SERVER,
        parse=positive_float,
        what="seconds",
        default=60.0,
        metavar="SECONDS",
        typed_flag=True,
    ),
    Setting(
        "--http-retries",
        ("FL_SIDECAR_HTTP_RETRIES",),
        "http_retries",
        "retries of idempotent requests",
        _FL_SERVER,
        parse=non_negative_int,
        what="count",
        default=3,
        metavar="N",
        typed_flag=True,
    ),
    Setting(
        "--notification-host",
        ("FL_CLIENT_SERVER_HOST",),
        "notification_host",
        "address of the endpoint the FL server POSTs notifications to",
        _NOTIFICATIONS,
        default="127.0.0.1",
        default_text="127.0.0.1, loopback unlike the reference client",
        metavar="HOST",
    ),
    Setting(
        "--notification-port",
        ("FL_CLIENT_SERVER_PORT",),
        "notification_port",
        "its port; 0 picks a free one",
        _NOTIFICATIONS,
        parse=parse_port,
        what="port",
        default=DEFAULT_NOTIFICATION_PORT,
        metavar="PORT",
        typed_flag=True,
    ),
    Setting(
        "--no-notifications",
        ("FL_SIDECAR_NO_NOTIFICATIONS",),
        None,
        "do not start the notification endpoint",
        _NOTIFICATIONS,
        parse=parse_bool,
        what="boolean",
        default=False,
        switch=True,
    ),
    Setting(
        "--run-scripts",
        ("FL_SIDECAR_RUN_SCRIPTS",),
        None,
        "compatibility mode: start the training script for each round and test "
        "notification, like the reference client; also on when any --script-* flag or "
        "reference script variable is set, off with FL_SIDECAR_RUN_SCRIPTS=0",
        _NOTIFICATIONS,
        parse=parse_bool,
        what="boolean",
        switch=True,
    ),
    Setting(
        "--script-executor",
        (_SCRIPT_EXECUTOR_VARIABLE,),
        "script_executor",
        "compatibility mode: the program that runs the training script",
        _NOTIFICATIONS,
        default=DEFAULT_SCRIPT_EXECUTOR,
        metavar="PROGRAM",
        applies_default=False,
    ),
    Setting(
        "--script-path",
        (_SCRIPT_PATH_VARIABLE,),
        "script_path",
        "compatibility mode: the training script, started with train|test --training-id "
        "--round --model-id per event",
        _NOTIFICATIONS,
        default=DEFAULT_SCRIPT_PATH,
        metavar="PATH",
        applies_default=False,
    ),
    Setting(
        "--script-working-directory",
        (_WORKING_DIRECTORY_VARIABLE,),
        "script_working_directory",
        "compatibility mode: its working directory",
        _NOTIFICATIONS,
        default=DEFAULT_SCRIPT_WORKING_DIRECTORY,
        default_text="the current directory",
        metavar="DIR",
        deprecated_env=(_DEPRECATED_WORKING_DIRECTORY_VARIABLE,),
        env_note="(sic)",
        applies_default=False,
    ),
    Setting(
        "--max-concurrent-scripts",
        ("FL_SIDECAR_MAX_CONCURRENT_SCRIPTS",),
        "max_concurrent_scripts",
        "compatibility mode: training scripts running at once",
        _NOTIFICATIONS,
        parse=positive_int,
        what="count",
        default=DEFAULT_MAX_CONCURRENT_SCRIPTS,
        metavar="N",
        typed_flag=True,
    ),
    Setting(
        "--max-queued-scripts",
        ("FL_SIDECAR_MAX_QUEUED_SCRIPTS",),
        "max_queued_scripts",
        "compatibility mode: script runs waiting at most; more are dropped and logged",
        _NOTIFICATIONS,
        parse=positive_int,
        what="count",
        default=DEFAULT_MAX_QUEUED_SCRIPTS,
        metavar="N",
        typed_flag=True,
    ),
    Setting(
        "--script-training-ids",
        ("FL_SIDECAR_SCRIPT_TRAINING_IDS",),
        "script_training_ids",
        "compatibility mode: run scripts only for these trainings; unset: only for "
        "trainings the FL server confirms",
        _NOTIFICATIONS,
        parse=parse_training_ids,
        what="training id list",
        metavar="ID[,ID...]",
    ),
    Setting(
        "--spool-dir",
        ("FL_SIDECAR_SPOOL_DIR",),
        "spool_dir",
        "where models in transit are spooled",
        _DATA,
        default_text="the system temp dir",
        metavar="DIR",
    ),
    Setting(
        "--max-model-size",
        ("FL_SIDECAR_MAX_MODEL_SIZE",),
        "max_model_size",
        "largest model accepted for upload and output of Unpack, e.g. 4G",
        _DATA,
        parse=parse_size,
        what="size",
        default=DEFAULT_MAX_MODEL_SIZE,
        default_text="4G",
        metavar="SIZE",
    ),
    Setting(
        "--trust-pickles",
        ("FL_SIDECAR_TRUST_PICKLES",),
        "trust_pickles",
        "pass TORCH downloads through without vetting them with the restricted reader",
        _DATA,
        parse=parse_bool,
        what="boolean",
        default=False,
        switch=True,
    ),
    Setting(
        "--metrics-port",
        ("FL_SIDECAR_METRICS_PORT",),
        "metrics_port",
        "serve Prometheus metrics on this port, 0 = any free one; off when unset",
        _OPERATIONS,
        parse=parse_port,
        what="port",
        metavar="PORT",
        typed_flag=True,
    ),
    Setting(
        "--metrics-host",
        ("FL_SIDECAR_METRICS_HOST",),
        "metrics_host",
        "address of the metrics endpoint",
        _OPERATIONS,
        default="127.0.0.1",
        metavar="HOST",
    ),
    Setting(
        "--log-level",
        ("FL_SIDECAR_LOG_LEVEL",),
        "log_level",
        "DEBUG, INFO, WARNING or ERROR",
        _OPERATIONS,
        parse=choice(_LOG_LEVELS, str.upper),
        what="log level",
        default="INFO",
        metavar="LEVEL",
    ),
    Setting(
        "--log-format",
        ("FL_SIDECAR_LOG_FORMAT",),
        "log_format",
        "key=value text or JSON lines on stderr",
        _OPERATIONS,
        parse=choice(("text", "json"), str.lower),
        what="log format",
        default="text",
        metavar="{text,json}",
        choices=("text", "json"),
    ),
    Setting(
        "--drain-seconds",
        ("FL_SIDECAR_DRAIN_SECONDS",),
        "drain_seconds",
        "on SIGTERM/SIGINT, how long in-flight transfers may finish before they are cancelled",
        _OPERATIONS,
        parse=non_negative_float,
        what="seconds",
        default=DEFAULT_DRAIN_SECONDS,
        metavar="SECONDS",
        typed_flag=True,
    ),
)
"""Every setting of ``fl-sidecar serve``, declared once: flags, variables, parsers, defaults.

:func:`add_arguments`, :meth:`Settings.from_args` and docs/sidecar.md's table
follow it (a test checks the docs and ``--help``).
"""

_BY_FIELD: Dict[str, Setting] = {s.field: s for s in SETTINGS if s.field is not None}


def _default(field_name: str) -> Any:
    return _BY_FIELD[field_name].default


@dataclass(frozen=True)
class Settings:
    """Everything ``fl-sidecar serve`` needs to know, resolved and validated.

    Each field is one entry of :data:`SETTINGS` (its default comes from there),
    except ``script_env`` and ``warnings``, which the resolution derives.
    Secret fields are excluded from ``repr`` so that logging a ``Settings``
    never leaks them. Sizes are bytes, durations seconds.
    """

    socket_path: Optional[str] = _default("socket_path")
    trust_socket_parent: bool = _default("trust_socket_parent")
    listen: Optional[Tuple[str, int]] = _default("listen")
    allow_remote: bool = _default("allow_remote")
    api_token: Optional[str] = field(default=_default("api_token"), repr=False)
    server_url: str = _default("server_url")
    username: Optional[str] = _default("username")
    password: Optional[str] = field(default=_default("password"), repr=False)
    server_token: Optional[str] = field(default=_default("server_token"), repr=False)
    authorization: Optional[str] = field(default=_default("authorization"), repr=False)
    notification_host: str = _default("notification_host")
    notification_port: Optional[int] = _default("notification_port")
    # Compatibility mode's three: None when it is off (their defaults apply when on).
    script_executor: Optional[str] = None
    script_path: Optional[str] = None
    script_working_directory: Optional[str] = None
    max_concurrent_scripts: int = _default("max_concurrent_scripts")
    max_queued_scripts: int = _default("max_queued_scripts")
    script_training_ids: Optional[Tuple[str, ...]] = _default("script_training_ids")
    metrics_host: str = _default("metrics_host")
    metrics_port: Optional[int] = _default("metrics_port")
    spool_dir: Optional[str] = _default("spool_dir")
    max_model_size: int = _default("max_model_size")
    trust_pickles: bool = _default("trust_pickles")
    compression: str = _default("compression")
    http_timeout: float = _default("http_timeout")
    http_retries: int = _default("http_retries")
    log_level: str = _default("log_level")
    log_format: str = _default("log_format")
    drain_seconds: float = _default("drain_seconds")
    max_concurrent_rpcs: int = _default("max_concurrent_rpcs")
    ready_file: Optional[str] = _default("ready_file")
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

        Per setting of :data:`SETTINGS`: the flag, then its variables in order,
        then its default; then :func:`_validate` checks the settings together.

        Args:
            args: the namespace argparse produced with :func:`add_arguments`.
            environ: the environment to read; ``None`` reads ``os.environ``.

        Raises:
            ConfigurationError: a value is invalid or settings contradict each other.
        """
        env: Mapping[str, str] = os.environ if environ is None else environ
        warnings: List[str] = []
        given = {s.dest: _resolve(s, args, env, warnings) for s in SETTINGS}
        return _validate(given, env, warnings)


def _resolve(
    setting: Setting, args: argparse.Namespace, env: Mapping[str, str], warnings: List[str]
) -> Any:
    """One setting's value from its flag, file, variables or deprecated variables; ``None``: unset.

    Raises:
        ConfigurationError: the value does not parse, or its secret file cannot be read.
    """
    flag_value = getattr(args, setting.dest, None)
    if flag_value is not None and not isinstance(flag_value, str):
        return flag_value  # a switch, or a flag argparse has parsed already
    if flag_value is None and setting.secret_file:
        secret = _secret_from_file(setting, args, env)
        if secret is not _NO_FILE:
            return secret
    raw = flag_value
    if raw is None:
        raw = next((env[name] for name in setting.env if env.get(name, "") != ""), None)
    if raw is None:
        for name in setting.deprecated_env:
            if env.get(name):
                raw = env[name]
                warnings.append(
                    f"{name} is deprecated: the reference client's name is "
                    f"{setting.env[0]} {setting.env_note}".rstrip()
                )
                break
    if raw is None:
        return None
    try:
        return setting.parse(raw)
    except (ValueError, ConfigurationError) as exc:
        raise ConfigurationError(
            f"invalid {setting.what} for {setting.flag} / {setting.env[0]}: {exc}"
        ) from None


_NO_FILE: Any = object()


def _secret_from_file(setting: Setting, args: argparse.Namespace, env: Mapping[str, str]) -> Any:
    """The secret read from ``<flag>-file`` or ``<VARIABLE>_FILE``; :data:`_NO_FILE` if neither."""
    file_path = getattr(args, setting.file_flag[2:].replace("-", "_"), None)
    if file_path is None:
        file_path = next(
            (env[name + "_FILE"] for name in setting.env if env.get(name + "_FILE")), None
        )
    if file_path is None:
        return _NO_FILE
    try:
        text = Path(file_path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read the secret file for {setting.flag}: {exc.strerror or exc}"
        ) from None
    # Only the trailing newline an editor adds is dropped; the rest is the secret.
    return text.rstrip("\r\n") or None


def _validate(given: Mapping[str, Any], env: Mapping[str, str], warnings: List[str]) -> Settings:
    """The cross-field rules, then the typed :class:`Settings`.

    ``given`` maps each setting's dest to its resolved value (``None``: unset).

    Raises:
        ConfigurationError: the settings contradict each other.
    """
    values: Dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.field is None:
            continue
        value = given[setting.dest]
        if value is None and setting.applies_default:
            value = setting.default
        values[setting.field] = value
    listen, allow_remote = values["listen"], values["allow_remote"]
    socket_path = values["socket_path"]
    if socket_path is None and listen is None:
        socket_path = default_socket_path(env)
    if socket_path is not None and len(os.fsencode(socket_path)) > _MAX_SOCKET_PATH:
        raise ConfigurationError(
            f"the unix socket path is longer than {_MAX_SOCKET_PATH} bytes: {socket_path}"
        )
    values["socket_path"] = socket_path
    if not allow_remote:
        for what, host in (
            ("listen", listen[0] if listen is not None else None),
            ("serve notifications", values["notification_host"]),
            ("serve metrics", values["metrics_host"]),
        ):
            if host is not None and not is_loopback_host(host):
                raise ConfigurationError(
                    f"refusing to {what} on the non-loopback address {host!r} without "
                    "--allow-remote (FL_SIDECAR_ALLOW_REMOTE=1)"
                )
    if given["no_notifications"]:
        values["notification_port"] = None
    if (values["username"] is None) != (values["password"] is None):
        raise ConfigurationError("a username needs a password and a password a username")
    scripts = ("script_executor", "script_path", "script_working_directory")
    run_scripts = given["run_scripts"]
    if run_scripts is None:
        run_scripts = any(values[name] is not None for name in scripts)
    for name in scripts:
        values[name] = (values[name] or _BY_FIELD[name].default) if run_scripts else None
    values["script_env"] = _script_environment(env, socket_path)
    return Settings(**values, warnings=tuple(warnings))


def _script_environment(env: Mapping[str, str], socket_path: Optional[str]) -> Dict[str, str]:
    # The training script inherits the environment without the FL server's
    # credentials (it talks to the sidecar, which keeps them), plus where
    # the sidecar listens.
    script_env = {k: v for k, v in env.items() if k not in _SERVER_SECRET_VARIABLES}
    for name in _SERVER_URL_VARIABLES:
        if name in script_env:
            # A user:password@ in the URL is a credential too.
            script_env[name] = strip_userinfo(script_env[name])
    if socket_path is not None:
        script_env["FL_SIDECAR_SOCKET"] = socket_path
    return script_env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every ``serve`` flag of :data:`SETTINGS` to ``parser``, in its ``--help`` group.

    Each help text names its environment variables and default. Every flag
    defaults to ``None`` so that :meth:`Settings.from_args` can tell "not given"
    from a value and fall back to the environment.
    """
    groups: Dict[str, Any] = {}
    for setting in SETTINGS:
        group = groups.get(setting.group)
        if group is None:
            group = groups[setting.group] = parser.add_argument_group(setting.group)
        if setting.switch:
            group.add_argument(
                setting.flag, action="store_const", const=True, help=setting.help_text()
            )
            continue
        options: Dict[str, Any] = {"metavar": setting.metavar, "help": setting.help_text()}
        if setting.choices is not None:
            options["choices"] = setting.choices
        if setting.typed_flag:
            options["type"] = setting.parse
        group.add_argument(setting.flag, **options)
        if setting.secret_file:
            variables = ", ".join(name + "_FILE" for name in setting.env)
            group.add_argument(
                setting.file_flag,
                metavar="PATH",
                help=f"read the value of {setting.flag} from a file [{variables}]",
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
