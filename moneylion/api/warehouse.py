"""The API's handle on the warehouse: one shared connection, a fresh read cursor per query."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import anyio.to_thread
import duckdb

from moneylion.api.cache import SnapshotCache, file_token
from moneylion.api.queries import UserSummary, user_summary
from moneylion.api.replica import SqliteReplica
from moneylion.config import Config

T = TypeVar("T")


class WarehouseUnavailable(RuntimeError):
    """The warehouse is not open (yet, or any more); the API answers 503."""


@dataclass
class ApiContext:
    """What the handlers share, kept on ``app.state.moneylion``.

    ``committed``, given by the daemon, returns the id of the last file its ingest worker
    committed. It keys the answer cache exactly and lets user summaries come from the SQLite
    export while that has caught up (``replica``); without it every read goes to DuckDB.
    """

    config: Config
    db: duckdb.DuckDBPyConnection | None = None
    readiness: Callable[[], bool] | None = None
    committed: Callable[[], int] | None = None
    cache: SnapshotCache = field(init=False)
    replica: SqliteReplica | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.committed is not None:
            self.cache = SnapshotCache(self.committed, max_age=None)
            if self.config.sqlite_export:
                self.replica = SqliteReplica(self.config.sqlite_path)
        else:
            path = self.config.duckdb_path
            self.cache = SnapshotCache(file_token((path, path.with_name(path.name + ".wal"))))

    def ready(self) -> bool:
        """Ready when the warehouse is open and the daemon's own check (if any) passes."""
        if self.db is None:
            return False
        return self.readiness() if self.readiness is not None else True

    def run(self, query: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``query`` on a fresh cursor (call from a worker thread)."""
        with self.cursor() as cursor:
            return query(cursor)

    @contextmanager
    def cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A fresh cursor on the shared connection; each statement sees a committed snapshot."""
        db = self.db
        if db is None:
            raise WarehouseUnavailable("the warehouse is not open")
        cursor = db.cursor()
        try:
            yield cursor
        finally:
            cursor.close()

    async def user_summary(self, user_id: int) -> UserSummary | None:
        """From the SQLite export if it holds the last commit (a point read on the event loop,
        ~50 us), else from DuckDB in a worker thread."""
        if self.replica is not None and self.committed is not None and self.db is not None:
            answered, found = self.replica.user_summary(user_id, self.committed())
            if answered:
                return found
        return await anyio.to_thread.run_sync(lambda: self.run(lambda c: user_summary(c, user_id)))
