"""``/api/models/``: global model uploads and downloads, local model uploads."""

from __future__ import annotations

import os
import time
import uuid

from .. import modelcheck
from ..store import DuplicateUploadError, Row
from ..wsgi import FileChunks, Request, Response, detail, listed
from .aggregation import Aggregator
from .context import Context
from .fields import MAX_COUNT, check_model_file, form_int, parse_metric_values

__all__ = ["ModelHandlers"]


class ModelHandlers:
    """The models resource; a round's last local model starts its aggregation."""

    def __init__(self, ctx: Context, aggregator: Aggregator) -> None:
        self._ctx = ctx
        self._aggregator = aggregator

    def upload_global_model(self, request: Request) -> Response:
        """201 with the new model's id; 400 for a missing field or an invalid model file."""
        user = self._ctx.authenticate(request)
        with self._ctx.read_form(request) as form:
            name = form.first("name")
            if name is None:
                raise detail(400, "'name'")
            description = form.first("description") or ""
            part = form.take_file("model_file")
            if part is None:
                raise detail(400, "No uploaded file 'model_file' found.")
            try:
                signature = check_model_file(part.path)
                model_id = str(uuid.uuid4())
                path = os.path.join(self._ctx.models_dir, f"{model_id}.pt")
                os.replace(part.path, path)
            except BaseException:
                os.unlink(part.path)
                raise
        self._ctx.store.add_model(
            model_id,
            name,
            description,
            user["id"],
            path,
            part.size,
            "torch",
            modelcheck.signature_to_json(signature),
            time.time(),
        )
        return Response(201, {"detail": "Model Upload Accepted", "model_id": model_id})

    def download_model(self, request: Request, model_id: str) -> Response:
        """200 with the model's bytes (streamed); 400 for an unknown model."""
        self._ctx.authenticate(request)
        row = self._ctx.model_or_400(model_id)
        try:
            handle = open(row["path"], "rb")  # noqa: SIM115 - closed by the iterator
        except FileNotFoundError:
            raise detail(400, f"Model {model_id} not found.") from None
        size = os.fstat(handle.fileno()).st_size
        response = Response(
            200,
            headers=[
                ("Content-Type", "application/octet-stream"),
                ("Content-Disposition", f'filename="model-{row["id"]}.pt"'),
                ("Content-Length", str(size)),
            ],
        )
        response.chunks = FileChunks(handle)
        return response

    def upload_local_model(self, request: Request, model_id: str) -> Response:
        """201 for a local model the round takes; 400/403/409 for every refusal."""
        user = self._ctx.authenticate(request)
        model = self._ctx.model_or_400(model_id, "GlobalModel")
        with self._ctx.read_form(request) as form:
            raw_round = form.first("round")
            if raw_round is None:
                raise detail(400, "'round'")
            raw_samples = form.first("sample_size")
            if raw_samples is None:
                raise detail(400, "'sample_size'")
            upload_round = form_int("round", raw_round)
            sample_size = form_int("sample_size", raw_samples)
            if not 1 <= sample_size <= MAX_COUNT:
                raise listed(f"sample_size must be an integer from 1 to {MAX_COUNT}")
            names = form.fields.get("metric_names", [])
            values = parse_metric_values(names, form.fields.get("metric_values", []))
            part = form.take_file("model_file")
            if part is None:
                raise detail(400, "No uploaded file 'model_file' found.")
            try:
                training = self._training_for_upload(model, user, upload_round)
                signature = check_model_file(part.path)
                expected = modelcheck.signature_from_json(model["signature"])
                if signature != expected:
                    raise listed(
                        "Invalid model file: its tensors do not match the global model's "
                        "names, shapes and dtypes"
                    )
                local_id = str(uuid.uuid4())
                path = os.path.join(self._ctx.local_dir, f"{local_id}.pt")
                os.replace(part.path, path)
            except BaseException:
                os.unlink(part.path)
                raise
        try:
            complete = self._ctx.store.add_local_model(
                local_id=local_id,
                training_id=training["id"],
                model_id=model["id"],
                owner_id=user["id"],
                upload_round=upload_round,
                sample_size=sample_size,
                path=path,
                metrics=list(zip(names, values)),
                # Re-checked under the lock: the state may have moved since the first check.
                recheck=lambda t, m: self._check_allowed(t, m, user, upload_round),
                now=time.time(),
            )
        except DuplicateUploadError:
            os.unlink(path)
            raise detail(
                409,
                f"You already uploaded a model for round {upload_round} of training "
                f"{training['id']}; a duplicate is not counted.",
            ) from None
        except BaseException:
            os.unlink(path)
            raise
        if complete:
            self._aggregator.submit(training["id"], upload_round)
        return Response(201, {"detail": "Model Update Accepted"})

    def _training_for_upload(self, model: Row, user: Row, upload_round: int) -> Row:
        training = self._ctx.store.latest_training_of_model(model["id"])
        if training is None:
            raise listed(f"Model {model['id']} is not used by any training")
        self._check_allowed(training, model, user, upload_round)
        return training

    def _check_allowed(self, training: Row, model: Row, user: Row, upload_round: int) -> None:
        """Refuse a local model the training does not take now, as the real server does.

        Raises:
            HttpError: 403 when the user is no participant; 400 when the
                training is not running, is in another round, or is testing.
        """
        if user["id"] not in self._ctx.store.participant_ids(training["id"]):
            raise detail(403, f"You are not a participant of training {training['id']}!")
        if training["state"] != "O":
            raise listed(f"Training with ID {training['id']} is in state {training['state']}")
        if model["round"] != upload_round:
            raise listed(
                f"Training with ID {training['id']} is not currently in round {upload_round}"
            )
        if training["phase"] != "update":
            raise listed(
                f"Training with ID {training['id']} is testing round {upload_round}; "
                "model updates are not accepted until the next round starts"
            )
