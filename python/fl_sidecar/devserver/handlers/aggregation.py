"""FedAvg in the background: a round's local models become the global model's next round."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import uuid

from .context import Context

__all__ = ["Aggregator"]

_log = logging.getLogger(__name__)


class Aggregator:
    """Averages rounds on a pool of ``workers`` threads and counts what is pending.

    A failed aggregation puts its training in state E with the reason.
    """

    def __init__(self, ctx: Context, workers: int) -> None:
        self._ctx = ctx
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="devserver-aggregate"
        )
        self._pending_lock = threading.Condition()
        self._pending = 0

    def submit(self, training_id: str, upload_round: int) -> None:
        """Aggregate the round in the background (dropped when shutting down)."""
        with self._pending_lock:
            self._pending += 1
        try:
            self._pool.submit(self._aggregate, training_id, upload_round)
        except RuntimeError:  # shutting down
            self._done_pending()

    def wait_idle(self, timeout: float) -> bool:
        """Block until no aggregation is pending (or ``timeout`` seconds pass); True if idle."""
        with self._pending_lock:
            return self._pending_lock.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Wait for running aggregations, then stop the workers."""
        self._pool.shutdown(wait=True)

    def _done_pending(self) -> None:
        with self._pending_lock:
            self._pending -= 1
            self._pending_lock.notify_all()

    def _aggregate(self, training_id: str, upload_round: int) -> None:
        try:
            self._aggregate_round(training_id, upload_round)
        except Exception as exc:
            _log.exception("aggregation of training %s round %s failed", training_id, upload_round)
            self._ctx.store.mark_training_failed(
                training_id, f"aggregation failed: {exc}", time.time()
            )
        finally:
            self._done_pending()

    def _aggregate_round(self, training_id: str, upload_round: int) -> None:
        from fl_sidecar import models

        store = self._ctx.store
        training = store.training(training_id)
        assert training is not None
        model = store.model(training["model_id"])
        assert model is not None
        uploads = store.local_models_of_round(training_id, upload_round)
        # average_archives normalises: the sample sizes are the FedAvg weights.
        weights = [float(u["sample_size"]) for u in uploads]
        tmp_path = os.path.join(self._ctx.models_dir, f"{model['id']}.{uuid.uuid4().hex}.tmp")
        try:
            # One tensor at a time, with the restricted reader: uploads' pickles never
            # run, and memory does not grow with the number of clients.
            models.average_archives(model["path"], [u["path"] for u in uploads], weights, tmp_path)
            # Readers that already opened the old file keep reading it intact.
            os.replace(tmp_path, model["path"])
        except BaseException:
            if os.path.exists(tmp_path):
                os.unlink(tmp_path)
            raise
        store.finish_aggregation(
            training_id, model["id"], upload_round, os.path.getsize(model["path"]), time.time()
        )
        for upload in uploads:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(upload["path"])
        self._ctx.notify(
            store.participant_ids(training_id),
            "MODEL_TEST_ROUND",
            training_id,
            {"round": upload_round + 1, "global_model_uuid": model["id"]},
        )
