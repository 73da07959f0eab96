"""SQLite storage of the dev server: users, models, trainings, local models, metrics.

One connection (``check_same_thread=False``) guarded by a lock: the dev server
is for local runs and tests, and SQLite serialises writers anyway. Model bytes
live as files in the data directory; the database holds their paths.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from typing import Any, Iterator, List, Optional, Sequence

__all__ = ["Row", "Store"]

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
