"""What every handler shares: the store, the notifier, the data directories, authentication."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Sequence

from ..multipart import MultipartForm
from ..notify import Notifier
from ..store import Row, Store
from ..wsgi import Request, detail, read_form
from .auth import authenticate
from .fields import parse_uuid

__all__ = ["Context"]


@dataclass
class Context:
    """The dev server's state as the handlers see it.

    Args:
        store: the database.
        notifier: delivers notifications.
        data_dir: model files go under ``models/``, ``local/`` and ``spool/`` there.
        max_upload_size: largest multipart body accepted, in bytes (413 above).
        password_iterations: PBKDF2-SHA256 iterations for new passwords.
    """

    store: Store
    notifier: Notifier
    data_dir: str
    max_upload_size: int
    password_iterations: int

    def __post_init__(self) -> None:
        for directory in (self.models_dir, self.local_dir, self.spool_dir):
            os.makedirs(directory, exist_ok=True)

    @property
    def models_dir(self) -> str:
        """Where global models live."""
        return os.path.join(self.data_dir, "models")

    @property
    def local_dir(self) -> str:
        """Where local models wait for their round's aggregation."""
        return os.path.join(self.data_dir, "local")

    @property
    def spool_dir(self) -> str:
        """Where uploads are spooled while their form is parsed."""
        return os.path.join(self.data_dir, "spool")

    def authenticate(self, request: Request) -> Row:
        """The request's user (see :func:`.auth.authenticate`; raises its 401s)."""
        return authenticate(self.store, request)

    def read_form(self, request: Request) -> MultipartForm:
        """The request's multipart form (raises 413 above ``max_upload_size``, 400 if malformed)."""
        return read_form(request, max_size=self.max_upload_size, spool_dir=self.spool_dir)

    def model_or_400(self, model_id: str, label: str = "Model") -> Row:
        """The global model ``model_id``, else a 400 ``{"detail": "<label> <id> not found."}``."""
        normal = parse_uuid(model_id)
        row = None if normal is None else self.store.model(normal)
        if row is None:
            raise detail(400, f"{label} {model_id} not found.")
        return row

    def training_or_400(self, training_id: str) -> Row:
        """The training ``training_id``, else a 400 ``{"detail": "Training <id> not found."}``."""
        normal = parse_uuid(training_id)
        row = None if normal is None else self.store.training(normal)
        if row is None:
            raise detail(400, f"Training {training_id} not found.")
        return row

    def notify(
        self, user_ids: Sequence[str], kind: str, training_id: str, body: Dict[str, Any]
    ) -> None:
        """Send a notification to each of these users that has a message endpoint."""
        for endpoint in self.store.message_endpoints(user_ids):
            self.notifier.send(endpoint, kind, training_id, body)
