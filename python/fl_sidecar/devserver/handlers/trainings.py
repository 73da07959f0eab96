"""``/api/trainings/``: create, read, change participants, start."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Dict, List

from ..store import Row
from ..wsgi import HttpError, Request, Response, detail, listed, read_json
from .context import Context
from .fields import MAX_COUNT, parse_uuid

__all__ = ["TrainingHandlers"]

_AGGREGATION_METHODS = ("FedAvg", "FedProx")
_KNOWN_METHODS = ("FedAvg", "FedDC", "FedProx")


class TrainingHandlers:
    """The trainings resource."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def create_training(self, request: Request) -> Response:
        """201 with the new training's id; 400 per bad field or when the model is in use."""
        user = self._ctx.authenticate(request)
        data = read_json(request)
        raw_model = data.get("model_id")
        if not isinstance(raw_model, str):
            raise HttpError(400, {"model_id": ["This field is required."]})
        model = self._ctx.model_or_400(raw_model)
        target = data.get("target_num_updates")
        if not isinstance(target, int) or isinstance(target, bool) or not 1 <= target <= MAX_COUNT:
            raise HttpError(
                400, {"target_num_updates": [f"An integer from 1 to {MAX_COUNT} is required."]}
            )
        metric_names = data.get("metric_names", [])
        if not isinstance(metric_names, list) or not all(isinstance(m, str) for m in metric_names):
            raise HttpError(400, {"metric_names": ["Expected a list of strings."]})
        method = data.get("aggregation_method", "FedAvg")
        if method not in _KNOWN_METHODS:
            raise HttpError(400, {"aggregation_method": [f'"{method}" is not a valid choice.']})
        if method not in _AGGREGATION_METHODS:
            raise HttpError(
                400, {"aggregation_method": [f"{method} is not implemented by the dev server."]}
            )
        clients = self._client_ids(data.get("clients", []))
        training_id = str(uuid.uuid4())
        used_by = self._ctx.store.create_training(
            training_id,
            model["id"],
            user["id"],
            target_num_updates=target,
            metric_names=metric_names,
            aggregation_method=method,
            clients=clients,
            created=time.time(),
        )
        if used_by is not None:
            raise listed(f"Model {model['id']} is already used by training {used_by}")
        return Response(
            201, {"detail": "Training created successfully!", "training_id": training_id}
        )

    def _client_ids(self, raw: Any) -> List[str]:
        if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
            raise HttpError(400, {"clients": ["Expected a list of user ids."]})
        result: List[str] = []
        for client in raw:
            normal = parse_uuid(client)
            if normal is None or not self._ctx.store.user_exists(normal):
                raise HttpError(400, {"clients": [f"User {client} not found."]})
            if normal not in result:
                result.append(normal)
        return result

    def get_training(self, request: Request, training_id: str) -> Response:
        """200 with the training, its round and the round's progress; 400 if unknown."""
        self._ctx.authenticate(request)
        training = self._ctx.training_or_400(training_id)
        return Response(200, self._training_body(training))

    def _training_body(self, training: Row) -> Dict[str, Any]:
        store = self._ctx.store
        progress = store.round_progress(training["id"], training["model_id"])
        participants = store.participant_ids(training["id"])
        return {
            "id": training["id"],
            "state": training["state"],
            "target_num_updates": training["target_num_updates"],
            "metric_names": json.loads(training["metric_names"]),
            "aggregation_method": training["aggregation_method"],
            "model": training["model_id"],
            "actor": training["actor_id"],
            "participants": participants,
            "round": progress.round,
            "phase": training["phase"],
            "local_models_arrived": progress.local_models_arrived,
            "local_models_expected": len(participants),
            "test_reports_arrived": progress.test_reports_arrived,
            "error": training["error"],
            "last_update": training["updated"],
        }

    def add_participants(self, request: Request, training_id: str) -> Response:
        """202 once added (state I only; the actor only)."""
        self._change_participants(request, training_id, add=True)
        return Response(202, {"detail": "Users registered as participants!"})

    def remove_participants(self, request: Request, training_id: str) -> Response:
        """202 once removed (state I only; the actor only)."""
        self._change_participants(request, training_id, add=False)
        return Response(202, {"detail": "Users removed from participants!"})

    def _change_participants(self, request: Request, training_id: str, *, add: bool) -> None:
        user = self._ctx.authenticate(request)
        training = self._ctx.training_or_400(training_id)
        data = read_json(request)
        if "clients" not in data:
            raise HttpError(400, {"clients": ["This field is required."]})
        clients = self._client_ids(data["clients"])
        if training["actor_id"] != user["id"]:
            raise detail(403, "Only the training's actor may change its participants.")
        state = self._ctx.store.change_participants(training["id"], clients, add=add)
        if state != "I":
            raise listed(f"Training with ID {training['id']} is in state {state}")

    def start_training(self, request: Request, training_id: str) -> Response:
        """202 and ``TRAINING_START`` then ``UPDATE_ROUND_START`` to every participant.

        400 unless the training is in state I with participants; 403 unless
        the caller is its actor.
        """
        user = self._ctx.authenticate(request)
        training = self._ctx.training_or_400(training_id)
        if training["actor_id"] != user["id"]:
            raise detail(403, "Only the training's actor may start it.")
        outcome = self._ctx.store.start_training(training["id"], training["model_id"], time.time())
        if outcome.state != "I":
            raise listed(f"Training with ID {training['id']} is in state {outcome.state}, not I")
        if outcome.model_round is None:
            raise listed(f"Training with ID {training['id']} has no participants")
        participants = self._ctx.store.participant_ids(training["id"])
        body = {"global_model_uuid": training["model_id"]}
        self._ctx.notify(participants, "TRAINING_START", training["id"], body)
        self._ctx.notify(
            participants,
            "UPDATE_ROUND_START",
            training["id"],
            {"round": outcome.model_round, "global_model_uuid": training["model_id"]},
        )
        return Response(202, {"detail": "Training started!"})
