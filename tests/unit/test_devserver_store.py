"""The dev server's store: the named methods that hold every SQL statement, on in-memory SQLite."""

from __future__ import annotations

import uuid
from typing import Iterator, List, Tuple

import pytest

from fl_sidecar.devserver.store import DuplicateUploadError, Row, Store

NOW = 1_700_000_000.0


@pytest.fixture
def store() -> Iterator[Store]:
    db = Store()
    try:
        yield db
    finally:
        db.close()


def _user(store: Store, name: str, endpoint: str = "http://127.0.0.1:9/") -> str:
    user_id = str(uuid.uuid4())
    added = store.add_user(
        user_id,
        name,
        "hash",
        f"token-{name}",
        endpoint,
        actor=False,
        client=True,
        first_name="",
        last_name="",
        email="",
        created=NOW,
    )
    assert added
    return user_id


def _model(store: Store, owner: str) -> str:
    model_id = str(uuid.uuid4())
    store.add_model(model_id, "m", "", owner, "/nowhere/m.pt", 10, "torch", "{}", NOW)
    return model_id


def _training(store: Store, model_id: str, actor: str, clients: List[str], rounds: int = 1) -> str:
    training_id = str(uuid.uuid4())
    used_by = store.create_training(
        training_id,
        model_id,
        actor,
        target_num_updates=rounds,
        metric_names=["loss"],
        aggregation_method="FedAvg",
        clients=clients,
        created=NOW,
    )
    assert used_by is None
    return training_id


def _upload(store: Store, training_id: str, model_id: str, owner: str, round_: int = 0) -> bool:
    checked: List[Tuple[Row, Row]] = []
    complete = store.add_local_model(
        local_id=str(uuid.uuid4()),
        training_id=training_id,
        model_id=model_id,
        owner_id=owner,
        upload_round=round_,
        sample_size=5,
        path=f"/nowhere/{owner}.pt",
        metrics=[("loss", 0.5)],
        recheck=lambda t, m: checked.append((t, m)),
        now=NOW,
    )
    assert [(t["id"], m["id"]) for t, m in checked] == [(training_id, model_id)]
    return complete


def test_users_are_found_by_token_and_name_and_a_taken_name_writes_nothing(store: Store) -> None:
    alice = _user(store, "alice")
    assert store.user_by_token("token-alice")["id"] == alice  # type: ignore[index]
    assert store.user_by_username("alice")["id"] == alice  # type: ignore[index]
    assert store.user_by_token("nope") is None
    assert store.user_exists(alice) and not store.user_exists(str(uuid.uuid4()))
    again = store.add_user(
        str(uuid.uuid4()),
        "alice",
        "h",
        "other-token",
        "",
        actor=False,
        client=True,
        first_name="",
        last_name="",
        email="",
        created=NOW,
    )
    assert again is False
    assert store.user_by_token("other-token") is None


def test_message_endpoints_keep_order_and_skip_empty_and_unknown(store: Store) -> None:
    a = _user(store, "a", "http://a/")
    b = _user(store, "b", "")
    c = _user(store, "c", "http://c/")
    assert store.message_endpoints([c, b, str(uuid.uuid4()), a]) == ["http://c/", "http://a/"]


def test_a_model_serves_one_training_only(store: Store) -> None:
    actor = _user(store, "actor")
    model_id = _model(store, actor)
    first = _training(store, model_id, actor, [])
    used_by = store.create_training(
        str(uuid.uuid4()),
        model_id,
        actor,
        target_num_updates=1,
        metric_names=[],
        aggregation_method="FedAvg",
        clients=[],
        created=NOW,
    )
    assert used_by == first
    assert store.latest_training_of_model(model_id)["id"] == first  # type: ignore[index]


def test_participants_change_only_in_state_i_and_start_needs_some(store: Store) -> None:
    actor, a, b = _user(store, "actor"), _user(store, "a"), _user(store, "b")
    model_id = _model(store, actor)
    training_id = _training(store, model_id, actor, [])
    assert store.start_training(training_id, model_id, NOW) == ("I", 0, None)
    assert store.training(training_id)["state"] == "I"  # type: ignore[index]
    assert store.change_participants(training_id, [b, a, b], add=True) == "I"
    assert store.participant_ids(training_id) == [b, a]
    assert store.change_participants(training_id, [b], add=False) == "I"
    assert store.participant_ids(training_id) == [a]
    outcome = store.start_training(training_id, model_id, NOW)
    assert (outcome.state, outcome.participants, outcome.model_round) == ("I", 1, 0)
    training = store.training(training_id)
    assert (training["state"], training["phase"]) == ("O", "update")  # type: ignore[index]
    assert store.change_participants(training_id, [b], add=True) == "O"
    assert store.participant_ids(training_id) == [a]
    assert store.start_training(training_id, model_id, NOW) == ("O", 0, None)


def test_the_last_upload_of_a_round_moves_to_aggregating_and_a_duplicate_writes_nothing(
    store: Store,
) -> None:
    actor, a, b = _user(store, "actor"), _user(store, "a"), _user(store, "b")
    model_id = _model(store, actor)
    training_id = _training(store, model_id, actor, [a, b])
    store.start_training(training_id, model_id, NOW)
    assert _upload(store, training_id, model_id, a) is False
    with pytest.raises(DuplicateUploadError):
        _upload(store, training_id, model_id, a)
    assert store.round_progress(training_id, model_id) == (0, 1, 0)
    assert len(store.metrics_of_model(model_id)) == 1
    assert _upload(store, training_id, model_id, b) is True
    assert store.training(training_id)["phase"] == "aggregating"  # type: ignore[index]
    assert [r["owner_id"] for r in store.local_models_of_round(training_id, 0)] == [a, b]


def test_a_refused_recheck_writes_nothing(store: Store) -> None:
    actor, a = _user(store, "actor"), _user(store, "a")
    model_id = _model(store, actor)
    training_id = _training(store, model_id, actor, [a])

    def refuse(training: Row, model: Row) -> None:
        raise RuntimeError("moved on")

    with pytest.raises(RuntimeError):
        store.add_local_model(
            local_id=str(uuid.uuid4()),
            training_id=training_id,
            model_id=model_id,
            owner_id=a,
            upload_round=0,
            sample_size=1,
            path="/nowhere/x.pt",
            metrics=[("loss", 1.0)],
            recheck=refuse,
            now=NOW,
        )
    assert store.round_progress(training_id, model_id) == (0, 0, 0)
    assert store.metrics_of_model(model_id) == []


def test_test_reports_complete_a_round_then_the_training(store: Store) -> None:
    actor, a, b = _user(store, "actor"), _user(store, "a"), _user(store, "b")
    model_id = _model(store, actor)
    training_id = _training(store, model_id, actor, [a, b], rounds=2)
    store.start_training(training_id, model_id, NOW)
    # Outside a test phase metrics are stored but do not count.
    assert store.add_test_metrics(model_id, training_id, a, [("loss", 1.0)], NOW) is None
    for round_ in (0, 1):
        _upload(store, training_id, model_id, a, round_)
        _upload(store, training_id, model_id, b, round_)
        store.finish_aggregation(training_id, model_id, round_, 20, NOW)
        assert store.round_progress(training_id, model_id) == (round_ + 1, 0, 0)
        assert store.local_models_of_round(training_id, round_) == []
        # The actor is no participant: its report does not count.
        assert store.add_test_metrics(model_id, training_id, actor, [("loss", 1.0)], NOW) is None
        assert store.add_test_metrics(model_id, training_id, a, [("loss", 1.0)], NOW) is None
        assert store.add_test_metrics(model_id, training_id, a, [("loss", 1.0)], NOW) is None
        assert store.round_progress(training_id, model_id) == (round_ + 1, 0, 1)
        done = store.add_test_metrics(model_id, training_id, b, [("acc", "n/a")], NOW)
        assert done == (training_id, round_ + 1)
    training = store.training(training_id)
    assert (training["state"], training["phase"]) == ("C", "done")  # type: ignore[index]
    kinds = [(r["kind"], r["round"], r["value"]) for r in store.metrics_of_model(model_id)]
    assert kinds[0] == ("test", 0, 1.0)
    assert ("test", 2, "n/a") in kinds and ("train", 1, 0.5) in kinds


def test_a_failed_aggregation_puts_the_training_in_state_e(store: Store) -> None:
    actor = _user(store, "actor")
    model_id = _model(store, actor)
    training_id = _training(store, model_id, actor, [])
    store.mark_training_failed(training_id, "aggregation failed: boom", NOW)
    training = store.training(training_id)
    assert (training["state"], training["error"]) == ("E", "aggregation failed: boom")  # type: ignore[index]
