"""The dev server's WSGI application: the DLR FL Demonstrator REST API on SQLite.

Same paths, fields, status codes and body shapes as the real server (see
docs/protocol.md and docs/devserver.md), safer where the real one is dangerous:
duplicate uploads get 409, uploads are checked without executing their
pickles, malformed input gets 400 (never 500), and notifications cannot block
each other.

This module wires the parts together: :mod:`.wsgi` (requests, responses,
bodies), :mod:`.router`, the handlers by resource in :mod:`.handlers`, and
:mod:`.store` (every SQL statement).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional

from .handlers.aggregation import Aggregator
from .handlers.context import Context
from .handlers.fields import parse_metric_values
from .handlers.metrics import MetricHandlers
from .handlers.models import ModelHandlers
from .handlers.trainings import TrainingHandlers
from .handlers.users import UserHandlers
from .notify import Notifier
from .router import Router
from .store import Store
from .wsgi import REASONS, HttpError, Request, Response, StartResponse, drain

__all__ = ["DevServerApp"]

# Older import sites (tests) name the error class by its former private name.
_HttpError = HttpError

_log = logging.getLogger(__name__)


def _routes(ctx: Context, aggregator: Aggregator) -> Router:
    users = UserHandlers(ctx)
    models = ModelHandlers(ctx, aggregator)
    metrics = MetricHandlers(ctx)
    trainings = TrainingHandlers(ctx)
    router = Router()
    router.add(r"^/api/users/?$", {"POST": users.create_user})
    router.add(r"^/api/models/?$", {"POST": models.upload_global_model})
    router.add(
        r"^/api/models/(?P<model_id>[^/]+)/?$",
        {"GET": models.download_model, "POST": models.upload_local_model},
    )
    router.add(
        r"^/api/models/(?P<model_id>[^/]+)/metrics/?$",
        {"POST": metrics.upload_metrics, "GET": metrics.list_metrics},
    )
    router.add(r"^/api/trainings/?$", {"POST": trainings.create_training})
    router.add(r"^/api/trainings/(?P<training_id>[^/]+)/?$", {"GET": trainings.get_training})
    router.add(
        r"^/api/trainings/(?P<training_id>[^/]+)/clients/?$",
        {"PUT": trainings.add_participants, "DELETE": trainings.remove_participants},
    )
    router.add(
        r"^/api/trainings/(?P<training_id>[^/]+)/start/?$", {"POST": trainings.start_training}
    )
    router.add(r"^/healthz/?$", {"GET": users.health})
    return router


class DevServerApp:
    """The WSGI application. :class:`~fl_sidecar.devserver.DevServer` builds and serves it.

    Args:
        store: the database.
        data_dir: directory for model files (``models/``, ``local/``, ``spool/`` under it).
        notifier: delivers notifications.
        max_upload_size: largest request body accepted, in bytes (413 above).
        password_iterations: PBKDF2-SHA256 iterations for new passwords (the
            real server uses 1,000,000; a dev server need not be that slow).
        aggregation_workers: trainings aggregated at the same time.
    """

    # Kept for callers of the former static method; the code is fields.parse_metric_values.
    _parse_metric_values = staticmethod(parse_metric_values)

    def __init__(
        self,
        store: Store,
        data_dir: str,
        notifier: Notifier,
        *,
        max_upload_size: int = 8 * 1024**3,
        password_iterations: int = 20_000,
        aggregation_workers: int = 2,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.max_upload_size = max_upload_size
        self.password_iterations = password_iterations
        self._ctx = Context(store, notifier, data_dir, max_upload_size, password_iterations)
        self._aggregator = Aggregator(self._ctx, aggregation_workers)
        self._router = _routes(self._ctx, self._aggregator)

    def __call__(self, environ: Dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        request: Optional[Request] = None
        try:
            request = Request(environ)
            response = self._router.dispatch(request)
        except HttpError as exc:
            response = Response(exc.status, exc.body, exc.headers)
        except Exception:
            # Input errors are all mapped to 4xx above; reaching here is a server bug.
            _log.exception(
                "dev server bug on %s %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO")
            )
            response = Response(500, {"detail": "Internal server error."})
        if request is not None and response.status >= 400:
            drain(request)
        start_response(
            f"{response.status} {REASONS.get(response.status, 'Unknown')}", response.headers
        )
        return response.chunks

    def wait_idle(self, timeout: float) -> bool:
        """Block until no aggregation is pending (or ``timeout`` seconds pass); True if idle."""
        return self._aggregator.wait_idle(timeout)

    def close(self) -> None:
        """Wait for running aggregations, then stop the aggregation workers."""
        self._aggregator.close()
