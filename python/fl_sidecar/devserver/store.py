"""SQLite storage of the dev server: users, models, trainings, local models, metrics.

Every SQL statement of the dev server lives here, behind a named method; the
handlers never write SQL. A method that reads and then writes runs in one
transaction, so the checks it makes still hold when it writes.

One connection (``check_same_thread=False``) guarded by a lock: the dev server
is for local runs and tests, and SQLite serialises writers anyway. Model bytes
live as files in the data directory; the database holds their paths.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

__all__ = ["DuplicateUploadError", "RoundProgress", "Row", "StartOutcome", "Store"]

MetricValue = Union[float, str]

Row = sqlite3.Row

_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY,
    username TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    token TEXT NOT NULL UNIQUE,
    message_endpoint TEXT NOT NULL,
    actor INTEGER NOT NULL,
    client INTEGER NOT NULL,
    first_name TEXT NOT NULL,
    last_name TEXT NOT NULL,
    email TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS models (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    owner_id TEXT NOT NULL REFERENCES users(id),
    round INTEGER NOT NULL DEFAULT 0,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    format TEXT NOT NULL,
    signature TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS trainings (
    id TEXT PRIMARY KEY,
    model_id TEXT NOT NULL REFERENCES models(id),
    actor_id TEXT NOT NULL REFERENCES users(id),
    state TEXT NOT NULL,
    phase TEXT NOT NULL,
    target_num_updates INTEGER NOT NULL,
    metric_names TEXT NOT NULL,
    aggregation_method TEXT NOT NULL,
    error TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS participants (
    training_id TEXT NOT NULL REFERENCES trainings(id),
    user_id TEXT NOT NULL REFERENCES users(id),
    PRIMARY KEY (training_id, user_id)
);
CREATE TABLE IF NOT EXISTS local_models (
    id TEXT PRIMARY KEY,
    training_id TEXT NOT NULL REFERENCES trainings(id),
    round INTEGER NOT NULL,
    owner_id TEXT NOT NULL REFERENCES users(id),
    sample_size INTEGER NOT NULL,
    path TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (training_id, round, owner_id)
);
CREATE TABLE IF NOT EXISTS metrics (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    model_id TEXT NOT NULL,
    training_id TEXT,
    round INTEGER NOT NULL,
    reporter_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value REAL NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS test_reports (
    training_id TEXT NOT NULL,
    round INTEGER NOT NULL,
    reporter_id TEXT NOT NULL,
    PRIMARY KEY (training_id, round, reporter_id)
);
CREATE INDEX IF NOT EXISTS trainings_by_model ON trainings(model_id);
"""


_INSERT_METRIC = (
    "INSERT INTO metrics (model_id, training_id, round, reporter_id, kind, key, value, created)"
    " VALUES (?,?,?,?,?,?,?,?)"
)


class DuplicateUploadError(Exception):
    """The user already uploaded a local model for this round (nothing was written)."""


class RoundProgress(NamedTuple):
    """Where a training's current round stands."""

    round: int
    local_models_arrived: int
    test_reports_arrived: int


class StartOutcome(NamedTuple):
    """What :meth:`Store.start_training` found; ``model_round`` is ``None`` unless it started."""

    state: str
    participants: int
    model_round: Optional[int]


class Store:
    """Thread-safe access to the dev server's SQLite database.

    Args:
        db: a file path, or ``":memory:"`` (the default) for a throwaway database.

    Raises:
        sqlite3.Error: the database cannot be opened or its schema created.
    """

    def __init__(self, db: str = ":memory:") -> None:
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(db, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA foreign_keys = ON")
            if db != ":memory:":
                self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.executescript(_SCHEMA)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Hold the lock and run the block in one transaction (rolled back on error)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    # --- generic access (tests inspect the database with these) ---------------

    def one(self, sql: str, params: Sequence[Any] = ()) -> Optional[Row]:
        """The first row of a query, or ``None``."""
        with self._lock:
            row: Optional[Row] = self._conn.execute(sql, params).fetchone()
            return row

    def all(self, sql: str, params: Sequence[Any] = ()) -> List[Row]:
        """Every row of a query."""
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run one statement in its own transaction; returns the number of rows changed."""
        with self._lock:
            return self._conn.execute(sql, params).rowcount

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    # --- users ---------------------------------------------------------------

    def add_user(
        self,
        user_id: str,
        username: str,
        password_hash: str,
        token: str,
        message_endpoint: str,
        *,
        actor: bool,
        client: bool,
        first_name: str,
        last_name: str,
        email: str,
        created: float,
    ) -> bool:
        """Insert a user; False (nothing written) when the username or token is taken.

        ``created`` is in seconds since the epoch.
        """
        try:
            self.execute(
                "INSERT INTO users VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    user_id,
                    username,
                    password_hash,
                    token,
                    message_endpoint,
                    int(actor),
                    int(client),
                    first_name,
                    last_name,
                    email,
                    created,
                ),
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def user_by_token(self, token: str) -> Optional[Row]:
        """The user whose API token is ``token``, or ``None``."""
        return self.one("SELECT * FROM users WHERE token = ?", (token,))

    def user_by_username(self, username: str) -> Optional[Row]:
        """The user called ``username``, or ``None``."""
        return self.one("SELECT * FROM users WHERE username = ?", (username,))

    def user_exists(self, user_id: str) -> bool:
        """Whether a user with id ``user_id`` (a normalised UUID) exists."""
        return self.one("SELECT id FROM users WHERE id = ?", (user_id,)) is not None

    def message_endpoints(self, user_ids: Sequence[str]) -> List[str]:
        """The non-empty notification URLs of these users, in their order (unknown ids skipped)."""
        result = []
        for user_id in user_ids:
            row = self.one("SELECT message_endpoint FROM users WHERE id = ?", (user_id,))
            if row is not None and row["message_endpoint"]:
                result.append(str(row["message_endpoint"]))
        return result

    # --- models --------------------------------------------------------------

    def add_model(
        self,
        model_id: str,
        name: str,
        description: str,
        owner_id: str,
        path: str,
        size: int,
        fmt: str,
        signature: str,
        created: float,
    ) -> None:
        """Insert a global model at round 0 (``size`` in bytes, ``created`` epoch seconds)."""
        self.execute(
            "INSERT INTO models VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                model_id,
                name,
                description,
                owner_id,
                0,
                path,
                size,
                fmt,
                signature,
                created,
                created,
            ),
        )

    def model(self, model_id: str) -> Optional[Row]:
        """The global model with id ``model_id`` (a normalised UUID), or ``None``."""
        return self.one("SELECT * FROM models WHERE id = ?", (model_id,))

    def metrics_of_model(self, model_id: str) -> List[Row]:
        """Every metric stored for a model, in the order they arrived."""
        return self.all("SELECT * FROM metrics WHERE model_id = ? ORDER BY id", (model_id,))

    # --- trainings -----------------------------------------------------------

    def training(self, training_id: str) -> Optional[Row]:
        """The training with id ``training_id`` (a normalised UUID), or ``None``."""
        return self.one("SELECT * FROM trainings WHERE id = ?", (training_id,))

    def latest_training_of_model(self, model_id: str) -> Optional[Row]:
        """The newest training that uses the global model, or ``None``."""
        return self.one(
            "SELECT * FROM trainings WHERE model_id = ? ORDER BY created DESC", (model_id,)
        )

    def participant_ids(self, training_id: str) -> List[str]:
        """The training's participants' user ids, in the order they were added."""
        rows = self.all(
            "SELECT user_id FROM participants WHERE training_id = ? ORDER BY rowid", (training_id,)
        )
        return [r["user_id"] for r in rows]

    def create_training(
        self,
        training_id: str,
        model_id: str,
        actor_id: str,
        *,
        target_num_updates: int,
        metric_names: Sequence[str],
        aggregation_method: str,
        clients: Sequence[str],
        created: float,
    ) -> Optional[str]:
        """Insert a training in state I with its participants.

        Returns:
            ``None`` when created; else the id of the training that already
            uses the model (and nothing is written).
        """
        with self.transaction() as conn:
            used = conn.execute(
                "SELECT id FROM trainings WHERE model_id = ?", (model_id,)
            ).fetchone()
            if used is not None:
                return str(used["id"])
            conn.execute(
                "INSERT INTO trainings VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    training_id,
                    model_id,
                    actor_id,
                    "I",
                    "initial",
                    target_num_updates,
                    json.dumps(list(metric_names)),
                    aggregation_method,
                    None,
                    created,
                    created,
                ),
            )
            for client in clients:
                conn.execute(
                    "INSERT OR IGNORE INTO participants VALUES (?,?)", (training_id, client)
                )
        return None

    def round_progress(self, training_id: str, model_id: str) -> RoundProgress:
        """The model's round and how many local models and test reports arrived for it."""
        model = self.one("SELECT round FROM models WHERE id = ?", (model_id,))
        model_round = int(model["round"]) if model is not None else 0
        arrived = self.one(
            "SELECT COUNT(*) FROM local_models WHERE training_id = ? AND round = ?",
            (training_id, model_round),
        )
        reported = self.one(
            "SELECT COUNT(*) FROM test_reports WHERE training_id = ? AND round = ?",
            (training_id, model_round),
        )
        return RoundProgress(
            model_round,
            int(arrived[0]) if arrived is not None else 0,
            int(reported[0]) if reported is not None else 0,
        )

    def change_participants(self, training_id: str, user_ids: Sequence[str], *, add: bool) -> str:
        """Add (or remove) participants while the training is in state I.

        Returns:
            the training's state; anything but ``"I"`` means nothing was changed.
        """
        with self.transaction() as conn:
            state = str(
                conn.execute("SELECT state FROM trainings WHERE id = ?", (training_id,)).fetchone()[
                    "state"
                ]
            )
            if state != "I":
                return state
            for user_id in user_ids:
                if add:
                    conn.execute(
                        "INSERT OR IGNORE INTO participants VALUES (?,?)", (training_id, user_id)
                    )
                else:
                    conn.execute(
                        "DELETE FROM participants WHERE training_id = ? AND user_id = ?",
                        (training_id, user_id),
                    )
        return state

    def start_training(self, training_id: str, model_id: str, now: float) -> StartOutcome:
        """Move a training from state I with participants to O, phase update.

        Returns:
            what was found; ``model_round`` is the global model's round when
            the training started, ``None`` when it did not (its state was not
            I, or it has no participants).
        """
        with self.transaction() as conn:
            state = str(
                conn.execute("SELECT state FROM trainings WHERE id = ?", (training_id,)).fetchone()[
                    "state"
                ]
            )
            if state != "I":
                return StartOutcome(state, 0, None)
            count = int(
                conn.execute(
                    "SELECT COUNT(*) FROM participants WHERE training_id = ?", (training_id,)
                ).fetchone()[0]
            )
            if count == 0:
                return StartOutcome(state, 0, None)
            conn.execute(
                "UPDATE trainings SET state = 'O', phase = 'update', updated = ? WHERE id = ?",
                (now, training_id),
            )
            model_round = conn.execute(
                "SELECT round FROM models WHERE id = ?", (model_id,)
            ).fetchone()[0]
        return StartOutcome(state, count, int(model_round))

    def mark_training_failed(self, training_id: str, error: str, now: float) -> None:
        """Put the training in state E with ``error`` as its reason."""
        self.execute(
            "UPDATE trainings SET state = 'E', error = ?, updated = ? WHERE id = ?",
            (error, now, training_id),
        )

    # --- local models and metrics --------------------------------------------

    def add_local_model(
        self,
        *,
        local_id: str,
        training_id: str,
        model_id: str,
        owner_id: str,
        upload_round: int,
        sample_size: int,
        path: str,
        metrics: Sequence[Tuple[str, MetricValue]],
        recheck: Callable[[Row, Row], None],
        now: float,
    ) -> bool:
        """Store a local model and its training metrics in one transaction.

        ``recheck(training, model)`` runs first on the rows as they are under
        the lock (the state may have moved since the caller's check); what it
        raises propagates and nothing is written.

        Returns:
            True when it was the last local model of the round (the training's
            phase is then ``aggregating``).

        Raises:
            DuplicateUploadError: the owner already uploaded one for this round.
        """
        with self.transaction() as conn:
            fresh_training = conn.execute(
                "SELECT * FROM trainings WHERE id = ?", (training_id,)
            ).fetchone()
            fresh_model = conn.execute("SELECT * FROM models WHERE id = ?", (model_id,)).fetchone()
            recheck(fresh_training, fresh_model)
            try:
                conn.execute(
                    "INSERT INTO local_models VALUES (?,?,?,?,?,?,?)",
                    (local_id, training_id, upload_round, owner_id, sample_size, path, now),
                )
            except sqlite3.IntegrityError:
                raise DuplicateUploadError(training_id, upload_round) from None
            for name, value in metrics:
                conn.execute(
                    _INSERT_METRIC,
                    (model_id, training_id, upload_round, owner_id, "train", name, value, now),
                )
            arrived = conn.execute(
                "SELECT COUNT(*) FROM local_models WHERE training_id = ? AND round = ?",
                (training_id, upload_round),
            ).fetchone()[0]
            expected = conn.execute(
                "SELECT COUNT(*) FROM participants WHERE training_id = ?", (training_id,)
            ).fetchone()[0]
            if arrived < expected:
                return False
            conn.execute(
                "UPDATE trainings SET phase = 'aggregating', updated = ? WHERE id = ?",
                (now, training_id),
            )
            return True

    def add_test_metrics(
        self,
        model_id: str,
        training_id: Optional[str],
        reporter_id: str,
        metrics: Sequence[Tuple[str, MetricValue]],
        now: float,
    ) -> Optional[Tuple[str, int]]:
        """Store test metrics at the model's current round, in one transaction.

        A report of a participant while the training tests counts once per
        round; the last one ends the test phase: the training completes (state
        C) when the round reached its target, else its next round starts.

        Returns:
            (training id, round) when this report completed a test round, else ``None``.
        """
        with self.transaction() as conn:
            model_round = int(
                conn.execute("SELECT round FROM models WHERE id = ?", (model_id,)).fetchone()[
                    "round"
                ]
            )
            for name, value in metrics:
                conn.execute(
                    _INSERT_METRIC,
                    (model_id, training_id, model_round, reporter_id, "test", name, value, now),
                )
            if training_id is None:
                return None
            fresh = conn.execute("SELECT * FROM trainings WHERE id = ?", (training_id,)).fetchone()
            participants = [
                r[0]
                for r in conn.execute(
                    "SELECT user_id FROM participants WHERE training_id = ?", (training_id,)
                )
            ]
            if fresh["state"] != "O" or fresh["phase"] != "test" or reporter_id not in participants:
                return None
            conn.execute(
                "INSERT OR IGNORE INTO test_reports VALUES (?,?,?)",
                (training_id, model_round, reporter_id),
            )
            reported = conn.execute(
                "SELECT COUNT(*) FROM test_reports WHERE training_id = ? AND round = ?",
                (training_id, model_round),
            ).fetchone()[0]
            if reported < len(participants):
                return None
            if model_round >= int(fresh["target_num_updates"]):
                conn.execute(
                    "UPDATE trainings SET state = 'C', phase = 'done', updated = ? WHERE id = ?",
                    (now, training_id),
                )
            else:
                conn.execute(
                    "UPDATE trainings SET phase = 'update', updated = ? WHERE id = ?",
                    (now, training_id),
                )
            return (str(training_id), model_round)

    # --- aggregation ---------------------------------------------------------

    def local_models_of_round(self, training_id: str, upload_round: int) -> List[Row]:
        """The local models uploaded for a round, oldest first.

        Two uploads with the same timestamp come in upload order (rowid).
        """
        return self.all(
            "SELECT * FROM local_models WHERE training_id = ? AND round = ? "
            "ORDER BY created, rowid",
            (training_id, upload_round),
        )

    def finish_aggregation(
        self, training_id: str, model_id: str, upload_round: int, size: int, now: float
    ) -> None:
        """After averaging: the model moves to the next round (``size`` in bytes), the
        round's local models are forgotten and the training enters its test phase."""
        with self.transaction() as conn:
            conn.execute(
                "UPDATE models SET round = ?, size = ?, updated = ? WHERE id = ?",
                (upload_round + 1, size, now, model_id),
            )
            conn.execute(
                "DELETE FROM local_models WHERE training_id = ? AND round = ?",
                (training_id, upload_round),
            )
            conn.execute(
                "UPDATE trainings SET phase = 'test', updated = ? WHERE id = ?", (now, training_id)
            )
