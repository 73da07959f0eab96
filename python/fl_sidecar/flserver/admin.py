"""The operator's calls of the FL server: users, global models and trainings.

What an operator (or the demo) does to set a training up: register users,
upload a global model, create a training, set its participants, start it.
Part of :class:`~fl_sidecar.flserver.FlServerClient`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from fl_sidecar.errors import ServerError
from fl_sidecar.flserver.bodies import json_or_empty
from fl_sidecar.flserver.credentials import Credentials
from fl_sidecar.flserver.results import PathLike, ProgressCallback
from fl_sidecar.flserver.transport import quote_id
from fl_sidecar.flserver.uploads import ModelUploads

__all__ = ["AdminCalls"]


class AdminCalls(ModelUploads):
    """Users, global models and trainings: the calls that set a training up.

    ``create_user``, ``upload_global_model``, ``create_training``,
    ``set_participants`` and ``start_training``.
    """

    def create_user(
        self,
        username: str,
        password: str,
        message_endpoint: str,
        *,
        actor: bool = False,
        client: bool = True,
        first_name: str = "",
        last_name: str = "",
        email: str = "",
    ) -> Dict[str, Any]:
        """Register a user (no authentication needed); ``message_endpoint`` gets its notifications.

        Returns:
            The server's JSON answer, with at least ``id`` and ``token``.

        Raises:
            RequestRejectedError: the server refused the fields (e.g. the name is taken).
            UploadOutcomeUnknownError / ServerUnavailableError: as for uploads.
        """
        body = {
            "message_endpoint": message_endpoint,
            "actor": actor,
            "client": client,
            "username": username,
            "first_name": first_name,
            "last_name": last_name,
            "email": email,
            "password": password,
        }
        resp = self._with_retries(
            "create_user",
            lambda: self._attempt(
                "POST",
                "api/users/",
                operation="create_user",
                idempotent=False,
                json_body=body,
                anonymous=True,
            ),
        )
        return json_or_empty(resp)

    def upload_global_model(
        self,
        name: str,
        description: str,
        path: PathLike,
        *,
        credentials: Optional[Credentials] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> str:
        """Upload a global model file (an ``nn.Module``, pickled or TorchScript).

        Returns:
            The new model's id.

        Raises:
            RequestRejectedError: the server refused the file. Others as :meth:`upload_model`.
        """
        result = self._upload_file(
            "upload_global_model",
            "api/models/",
            [("name", name), ("description", description)],
            Path(path),
            credentials,
            progress,
        )
        model_id = (result.response or {}).get("model_id")
        if not model_id:
            raise ServerError(
                "upload_global_model: the answer holds no model_id",
                status=result.status,
                detail=result.detail,
                operation="upload_global_model",
            )
        return str(model_id)

    def create_training(
        self,
        model_id: str,
        *,
        target_num_updates: int,
        metric_names: Sequence[str],
        aggregation_method: str = "FedAvg",
        clients: Sequence[str],
        credentials: Optional[Credentials] = None,
    ) -> str:
        """Create a training of ``model_id`` for ``clients`` (user ids).

        Returns:
            The new training's id.

        Raises:
            NotFoundError / RequestRejectedError: the server refused it.
        """
        body = {
            "model_id": str(model_id),
            "target_num_updates": int(target_num_updates),
            "metric_names": list(metric_names),
            "aggregation_method": aggregation_method,
            "clients": [str(c) for c in clients],
        }
        resp = self._with_retries(
            "create_training",
            lambda: self._attempt(
                "POST",
                "api/trainings/",
                operation="create_training",
                idempotent=False,
                json_body=body,
                credentials=credentials,
            ),
        )
        payload = json_or_empty(resp)
        if not payload.get("training_id"):
            raise ServerError(
                "create_training: the answer holds no training_id",
                status=resp.status_code,
                operation="create_training",
            )
        return str(payload["training_id"])

    def set_participants(
        self,
        training_id: str,
        clients: Sequence[str],
        *,
        credentials: Optional[Credentials] = None,
    ) -> None:
        """Replace the participants of a training (PUT, so safe to repeat).

        Raises:
            NotFoundError / ConflictError / RequestRejectedError: the server refused it.
        """
        body = {"clients": [str(c) for c in clients]}
        self._with_retries(
            "set_participants",
            lambda: self._attempt(
                "PUT",
                f"api/trainings/{quote_id(training_id)}/clients/",
                operation="set_participants",
                idempotent=True,
                json_body=body,
                credentials=credentials,
            ),
        )

    def start_training(
        self, training_id: str, *, credentials: Optional[Credentials] = None
    ) -> None:
        """Start a training (it must be in state INITIAL).

        Raises:
            ConflictError / RequestRejectedError: not in state INITIAL (the server says 400).
        """
        self._with_retries(
            "start_training",
            lambda: self._attempt(
                "POST",
                f"api/trainings/{quote_id(training_id)}/start/",
                operation="start_training",
                idempotent=False,
                credentials=credentials,
            ),
        )
