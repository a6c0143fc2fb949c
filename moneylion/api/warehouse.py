"""The API's handle on the warehouse: one shared connection, a fresh read cursor per query."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import anyio.to_thread
import duckdb

from moneylion.api.cache import SnapshotCache, file_token
from moneylion.api.queries import UserSummary, user_summary
from moneylion.api.replica import SqliteReplica
from moneylion.config import Config
from moneylion.health import inbox_waiting
from moneylion.lake.lag import LakeLag
from moneylion.stream import StreamStats

T = TypeVar("T")


class WarehouseUnavailable(RuntimeError):
    """The warehouse is not open (yet, or any more); the API answers 503."""


class IngestView(Protocol):
    """What the API sees of the daemon that writes the warehouse in this process."""

    def ready(self) -> bool:
        """The watcher and the worker run."""

    def committed_file_id(self) -> int:
        """The id of the last file the worker committed (the one writer: exact)."""

    def backlog(self) -> tuple[int, int]:
        """(files, bytes) waiting in the inbox, being ingested included."""

    def stream(self) -> StreamStats:
        """The worker's last commit and rates."""

    def files_stuck(self) -> int:
        """Inbox files left alone after failing for reasons of the environment."""


@dataclass
class ApiContext:
    """What the handlers share, kept on ``app.state.moneylion``.

    Two ways to read a warehouse. With ``ingest`` (the daemon's view), the id of the last file
    it committed keys the answer cache exactly and lets user summaries come from the SQLite
    export while that has caught up (``replica``). Without it (an app on a warehouse that this
    process does not write) answers are cached by the DuckDB file's stat, every read goes to
    DuckDB, and the backlog is read from the inbox folder.
    """

    config: Config
    db: duckdb.DuckDBPyConnection | None = None
    ingest: IngestView | None = None
    cache: SnapshotCache = field(init=False)
    replica: SqliteReplica | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.ingest is not None:
            self.cache = SnapshotCache(self.ingest.committed_file_id, max_age=None)
            if self.config.sqlite_export:
                self.replica = SqliteReplica(self.config.sqlite_path)
        else:
            path = self.config.duckdb_path
            self.cache = SnapshotCache(file_token((path, path.with_name(path.name + ".wal"))))

    def ready(self) -> bool:
        """Ready when the warehouse is open and the daemon's workers (if any) run."""
        if self.db is None:
            return False
        return self.ingest.ready() if self.ingest is not None else True

    def backlog(self) -> tuple[int, int]:
        """(files, bytes) waiting in the inbox: the daemon's queue, or the folder's entries."""
        if self.ingest is not None:
            return self.ingest.backlog()
        return inbox_waiting(self.config.inbox)

    def lake_lag(self) -> LakeLag | None:
        """The daemon's lag behind the lake it replicates (None: local mode, or no daemon)."""
        lag = getattr(self.ingest, "lake_lag", None)
        found = lag() if callable(lag) else None
        return found if isinstance(found, LakeLag) else None

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
        if self.replica is not None and self.ingest is not None and self.db is not None:
            answered, found = self.replica.user_summary(user_id, self.ingest.committed_file_id())
            if answered:
                return found
        return await anyio.to_thread.run_sync(lambda: self.run(lambda c: user_summary(c, user_id)))
