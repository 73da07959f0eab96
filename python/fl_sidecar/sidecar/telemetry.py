"""Prometheus metrics and structured logs of the sidecar.

Metrics live on their own :class:`prometheus_client.CollectorRegistry` (never
the global one), so that several sidecars in one process (tests, the demo) do
not collide, and are served only when a metrics port is configured.

Logs are one line per record on stderr, ``key=value`` text or JSON. A
redaction filter replaces every form of every secret (the configured ones and
every credential the process has made: raw, ``user:password``, its base64, the
header value, their URL and JSON encodings; see :mod:`fl_sidecar.redaction`)
with ``***`` in messages and fields, a second line of defence behind the rule
that no code logs credentials in the first place.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any, Dict, Iterable, List, Optional, TextIO, Tuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fl_sidecar import redaction

__all__ = ["Metrics", "RedactingFilter", "configure_logging", "redact"]

redact = redaction.redact
"""Every form of every secret the process holds as ``***``: :func:`fl_sidecar.redaction.redact`."""
# Attributes every LogRecord has; anything else came in through ``extra=``.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def _extra_fields(record: logging.LogRecord) -> Dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD_ATTRS}


class RedactingFilter(logging.Filter):
    """Replaces every form of every secret by ``***`` in a record.

    The secrets are the ones given here (registered process-wide, so errors made
    from then on are clean too) and every credential the process has made.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        """Redact these raw secrets in all their forms (shorter than 4 characters: ignored)."""
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)
        redaction.register(*self._secrets)

    def redact(self, text: str) -> str:
        """``text`` with every form of every secret replaced."""
        return redaction.redact(text, extra=self._secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the message, the exception and stack text and every field; keep the record."""
        record.msg = self.redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        for key, value in _extra_fields(record).items():
            if isinstance(value, str):
                setattr(record, key, self.redact(value))
                continue
            # Lists, dicts, bytes, exceptions, ...: judged by how a formatter renders
            # them; one that would show a secret is replaced by its redacted rendering.
            rendered = json.dumps(value, default=str)
            redacted = self.redact(rendered)
            if redacted != rendered:
                setattr(record, key, redacted)
        return True


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return json.dumps(text)
    return text


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts: List[Tuple[str, Any]] = [
            ("ts", time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("msg", record.getMessage()),
        ]
        parts.extend(_extra_fields(record).items())
        line = " ".join(f"{key}={_quote(value)}" for key, value in parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += " exc=" + json.dumps(record.exc_text)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: Dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            data.setdefault(key, value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            data["exc"] = record.exc_text
        return json.dumps(data, default=str)


def configure_logging(
    *,
    level: str = "INFO",
    fmt: str = "text",
    secrets: Iterable[str] = (),
    stream: Optional[TextIO] = None,
) -> None:
    """Send the root logger's records to ``stream`` (stderr) as text or JSON lines.

    Args:
        level: a logging level name.
        fmt: ``"text"`` (key=value) or ``"json"``.
        secrets: strings replaced by ``***`` wherever they would appear.
        stream: where to write; ``None`` is ``sys.stderr``.

    Raises:
        ValueError: an unknown format or level.
    """
    if fmt not in ("text", "json"):
        raise ValueError(f"unknown log format {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    handler.addFilter(RedactingFilter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # grpc's and urllib3's debug chatter could echo headers; keep them at WARNING.
    for noisy in ("urllib3", "grpc"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class Metrics:
    """The sidecar's Prometheus metrics, on a dedicated registry.

    Names are prefixed ``fl_sidecar_``; bytes and seconds are the units.
    """

    def __init__(self) -> None:
        """Create the metrics on a fresh registry (nothing is served yet)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.transfer_bytes = Counter(
            "fl_sidecar_transfer_bytes",
            "Bytes of models moved, by direction (download/upload) and form "
            "(raw: the model file; wire: the HTTP body).",
            ["direction", "form"],
            registry=self.registry,
        )
        self.transfer_seconds = Histogram(
            "fl_sidecar_transfer_seconds",
            "Seconds spent moving a model to or from the FL server, by direction.",
            ["direction"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "fl_sidecar_rpc_seconds",
            "Seconds per gRPC call, by method.",
            ["method"],
            registry=self.registry,
        )
        self.rpc_errors = Counter(
            "fl_sidecar_rpc_errors",
            "gRPC calls that ended with an error, by method and status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.events = Counter(
            "fl_sidecar_events",
            "Notifications received from the FL server, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "fl_sidecar_transfers_in_flight",
            "Model transfers in progress, by direction.",
            ["direction"],
            registry=self.registry,
        )
        self._server: Any = None
        self._lock = threading.Lock()

    def serve(self, host: str, port: int) -> int:
        """Serve ``/metrics`` over HTTP on ``host:port`` (0 = any free port) in a daemon thread.

        Returns:
            The port actually bound.

        Raises:
            OSError: the address cannot be bound.
        """
        with self._lock:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
            self._server = server
            return int(server.server_port)

    def close(self) -> None:
        """Stop serving metrics (idempotent)."""
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
