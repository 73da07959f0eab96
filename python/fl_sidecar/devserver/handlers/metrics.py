"""``/api/models/<id>/metrics/``: test metrics (which complete a test round) and their listing."""

from __future__ import annotations

import time
import urllib.parse

from ..wsgi import JSON_LIMIT, Request, Response, detail, read_json
from .context import Context
from .fields import parse_metric_values

__all__ = ["MetricHandlers"]


class MetricHandlers:
    """The metrics of a global model."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    def upload_metrics(self, request: Request, model_id: str) -> Response:
        """201 once stored; the last participant's report of a test round advances the training.

        Takes form-urlencoded, multipart or JSON bodies (415 otherwise), up to
        :data:`~fl_sidecar.devserver.wsgi.JSON_LIMIT` bytes (413 above).
        """
        user = self._ctx.authenticate(request)
        model = self._ctx.model_or_400(model_id)
        if request.length is not None and request.length > JSON_LIMIT:
            raise detail(413, f"Metrics body larger than {JSON_LIMIT} bytes.")
        media_type = request.content_type.partition(";")[0].strip().lower()
        if media_type == "multipart/form-data":
            with self._ctx.read_form(request) as form:
                fields = form.fields
        elif media_type in ("application/x-www-form-urlencoded", ""):
            raw = request.body.read(JSON_LIMIT + 1)
            if len(raw) > JSON_LIMIT:  # a body without Content-Length, not cut off silently
                raise detail(413, f"Metrics body larger than {JSON_LIMIT} bytes.")
            try:
                fields = urllib.parse.parse_qs(
                    raw.decode("utf-8"), keep_blank_values=True, strict_parsing=bool(raw)
                )
            except (UnicodeDecodeError, ValueError) as exc:
                raise detail(400, f"Form parse error - {exc}") from None
        elif media_type == "application/json":
            data = read_json(request)
            fields = {
                k: [str(x) for x in v] if isinstance(v, list) else [str(v)] for k, v in data.items()
            }
        else:
            raise detail(415, f'Unsupported media type "{media_type}" in request.')
        names = fields.get("metric_names", [])
        values = parse_metric_values(names, fields.get("metric_values", []))
        store = self._ctx.store
        training = store.latest_training_of_model(model["id"])
        if training is not None:
            allowed = set(store.participant_ids(training["id"])) | {training["actor_id"]}
            if user["id"] not in allowed:
                raise detail(403, f"You are not a participant of training {training['id']}!")
        advance = store.add_test_metrics(
            model["id"],
            None if training is None else training["id"],
            user["id"],
            list(zip(names, values)),
            time.time(),
        )
        if advance is not None:
            self._advance_after_test(*advance)
        return Response(201, {"detail": "Model Metrics Upload Accepted", "model_id": model["id"]})

    def _advance_after_test(self, training_id: str, model_round: int) -> None:
        store = self._ctx.store
        training = store.training(training_id)
        assert training is not None
        participants = store.participant_ids(training_id)
        if training["state"] == "C":
            recipients = list(participants)
            if training["actor_id"] not in recipients:
                recipients.append(training["actor_id"])
            self._ctx.notify(
                recipients,
                "TRAINING_FINISHED",
                training_id,
                {"global_model_uuid": training["model_id"]},
            )
        else:
            self._ctx.notify(
                participants,
                "UPDATE_ROUND_START",
                training_id,
                {"round": model_round, "global_model_uuid": training["model_id"]},
            )

    def list_metrics(self, request: Request, model_id: str) -> Response:
        """200 with every metric of the model (training and test), oldest first."""
        self._ctx.authenticate(request)
        model = self._ctx.model_or_400(model_id)
        body = [
            {
                "model_id": r["model_id"],
                "training_id": r["training_id"],
                "round": r["round"],
                "reporter": r["reporter_id"],
                "kind": r["kind"],
                "key": r["key"],
                "value": r["value"],
            }
            for r in self._ctx.store.metrics_of_model(model["id"])
        ]
        return Response(200, body)
