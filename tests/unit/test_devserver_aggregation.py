"""The dev server's background FedAvg: a round that cannot be averaged fails its training."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from fl_sidecar.devserver.handlers.aggregation import Aggregator
from fl_sidecar.devserver.handlers.context import Context
from fl_sidecar.devserver.notify import Notifier
from fl_sidecar.devserver.store import Store


def test_a_failed_aggregation_puts_its_training_in_state_e_and_ends_pending(
    tmp_path: Path,
) -> None:
    store, notifier = Store(), Notifier()
    ctx = Context(store, notifier, str(tmp_path), 1024, 1)
    aggregator = Aggregator(ctx, workers=1)
    try:
        now = time.time()
        user_id, model_id, training_id = (str(uuid.uuid4()) for _ in range(3))
        store.add_user(
            user_id,
            "u",
            "-",
            "token",
            "",
            actor=True,
            client=True,
            first_name="",
            last_name="",
            email="",
            created=now,
        )
        # The global model's file is missing: averaging cannot read it.
        missing = str(tmp_path / "models" / "missing.pt")
        store.add_model(model_id, "m", "", user_id, missing, 0, "torch", "{}", now)
        store.create_training(
            training_id,
            model_id,
            user_id,
            target_num_updates=1,
            metric_names=[],
            aggregation_method="FedAvg",
            clients=[user_id],
            created=now,
        )
        aggregator.submit(training_id, 0)
        assert aggregator.wait_idle(30)
        training = store.training(training_id)
        assert training is not None
        assert training["state"] == "E"
        assert str(training["error"]).startswith("aggregation failed: ")
        assert store.model(model_id)["round"] == 0  # type: ignore[index]
        assert list((tmp_path / "models").iterdir()) == []  # no temporary file left
    finally:
        aggregator.close()
        notifier.close()
        store.close()


def test_after_close_a_submitted_round_is_dropped_and_nothing_stays_pending(
    tmp_path: Path,
) -> None:
    store, notifier = Store(), Notifier()
    aggregator = Aggregator(Context(store, notifier, str(tmp_path), 1024, 1), workers=1)
    aggregator.close()
    aggregator.submit(str(uuid.uuid4()), 0)
    assert aggregator.wait_idle(0)
    notifier.close()
    store.close()
