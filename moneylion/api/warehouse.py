"""The API's handle on the warehouse: one shared connection, a fresh read cursor per query."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import anyio.to_thread
import duckdb

from moneylion.api.cache import SnapshotCache, file_token
from moneylion.api.queries import UserSummary, user_summary
from moneylion.api.replica import SqliteReplica
from moneylion.config import Config
from moneylion.errors import MoneylionError
from moneylion.health import inbox_waiting
from moneylion.lake.lag import LakeLag
from moneylion.schema import open_warehouse
from moneylion.stream import StreamStats

T = TypeVar("T")


class WarehouseUnavailable(MoneylionError, RuntimeError):
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

    def lake_lag(self) -> LakeLag | None:
        """Lake mode: how far the local replica is behind the lake; None in local mode."""

    def between_batches(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``work`` on the warehouse between two of the worker's batches (a correction, a
        check); the change token then covers what it committed."""


class WarehouseView(Protocol):
    """How this process sees the warehouse the API reads: its connection, and what it knows of
    the writer. Two kinds: ``DaemonView`` (the daemon writes it, in this process) and
    ``Standalone`` (nobody here does)."""

    @property
    def db(self) -> duckdb.DuckDBPyConnection | None:
        """The shared connection, None while the warehouse is not open."""

    @property
    def replica(self) -> SqliteReplica | None:
        """The SQLite export, read while it holds the last commit; None when no commit is known."""

    def open(self) -> None:
        """At the app's start (in a worker thread): open what the view owns."""

    def close(self) -> None:
        """At the app's end: close what the view owns."""

    def ready(self) -> bool:
        """The writer's threads run (a standalone view has none to wait for)."""

    def backlog(self) -> tuple[int, int]:
        """(files, bytes) waiting in the inbox."""

    def stream(self) -> StreamStats | None:
        """The writer's last commit and rates; None without a writer here."""

    def files_stuck(self) -> int:
        """Inbox files left alone after failing for reasons of the environment."""

    def committed_file_id(self) -> int | None:
        """The id of the last file committed, exactly; None when this process cannot know."""

    def answer_cache(self) -> SnapshotCache:
        """An answer cache whose token moves whenever the warehouse may have changed."""

    def lake_lag(self) -> LakeLag | None:
        """Lake mode: the writer's replica's lag behind the lake; None otherwise."""

    def between_batches(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``work`` that writes the warehouse (a correction, a check), where no ingest runs
        beside it: between two of the daemon's batches, or on a cursor when nobody here
        writes."""


@dataclass
class DaemonView:
    """The daemon's warehouse: its connection (never closed here) and its ingest worker, the one
    writer. The id of the last file it committed keys the answer cache exactly and says when the
    SQLite export has caught up, so user summaries can come from the export."""

    config: Config
    ingest: IngestView
    db: duckdb.DuckDBPyConnection
    replica: SqliteReplica | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.config.sqlite_export:
            self.replica = SqliteReplica(self.config.sqlite_path)

    def open(self) -> None:
        pass  # the daemon opened the warehouse before the API

    def close(self) -> None:
        if self.replica is not None:
            self.replica.close()

    def ready(self) -> bool:
        return self.ingest.ready()

    def backlog(self) -> tuple[int, int]:
        return self.ingest.backlog()

    def stream(self) -> StreamStats:
        return self.ingest.stream()

    def files_stuck(self) -> int:
        return self.ingest.files_stuck()

    def committed_file_id(self) -> int:
        return self.ingest.committed_file_id()

    def lake_lag(self) -> LakeLag | None:
        return self.ingest.lake_lag()

    def answer_cache(self) -> SnapshotCache:
        return SnapshotCache(self.ingest.committed_file_id, max_age=None)

    def between_batches(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        return self.ingest.between_batches(work)


@dataclass
class Standalone:
    """A warehouse nobody in this process writes (an app opened on it by itself). Answers are
    cached by the DuckDB file's stat (and reloaded after the cache's ``max_age``, as a stat can
    also move without a commit), every read goes to DuckDB, the backlog is the inbox folder's
    entries. Given no connection, it opens the warehouse at the app's start and closes it at the
    end."""

    config: Config
    db: duckdb.DuckDBPyConnection | None = None
    replica: None = field(init=False, default=None)
    owned: bool = field(init=False)

    def __post_init__(self) -> None:
        self.owned = self.db is None

    def open(self) -> None:
        if self.owned:
            self.db = open_warehouse(self.config)

    def close(self) -> None:
        if self.owned and self.db is not None:
            conn, self.db = self.db, None
            conn.close()

    def ready(self) -> bool:
        return True

    def backlog(self) -> tuple[int, int]:
        return inbox_waiting(self.config.inbox)

    def stream(self) -> None:
        return None

    def files_stuck(self) -> int:
        return 0

    def committed_file_id(self) -> None:
        return None

    def lake_lag(self) -> None:
        return None

    def between_batches(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        if self.db is None:
            raise WarehouseUnavailable("the warehouse is not open")
        cursor = self.db.cursor()
        try:
            return work(cursor)
        finally:
            cursor.close()

    def answer_cache(self) -> SnapshotCache:
        path = self.config.duckdb_path
        return SnapshotCache(file_token((path, path.with_name(path.name + ".wal"))))


@dataclass
class ApiContext:
    """What the handlers share, kept on ``app.state.moneylion``: the config, the view of the
    warehouse (see ``WarehouseView``) and the answer cache it keys."""

    config: Config
    view: WarehouseView
    cache: SnapshotCache = field(init=False)

    def __post_init__(self) -> None:
        self.cache = self.view.answer_cache()

    @property
    def db(self) -> duckdb.DuckDBPyConnection | None:
        return self.view.db

    @property
    def replica(self) -> SqliteReplica | None:
        return self.view.replica

    def ready(self) -> bool:
        """Ready when the warehouse is open and the writer's threads (if any) run."""
        return self.db is not None and self.view.ready()

    def lake_lag(self) -> LakeLag | None:
        """How far the daemon's replica is behind the lake (None: local mode, or no daemon)."""
        return self.view.lake_lag()

    def run(self, query: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``query`` on a fresh cursor (call from a worker thread)."""
        with self.cursor() as cursor:
            return query(cursor)

    async def cached(self, query: Callable[..., T], *args: Hashable) -> T:
        """``query(cursor, *args)`` from the answer cache (keyed by the query and its
        arguments), else run once in a worker thread."""
        return await self.cache.get(
            (query.__qualname__, *args), lambda: self.run(lambda c: query(c, *args))
        )

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
        """From the SQLite export if it holds the last commit (a point read, cheap enough for
        the event loop), else from DuckDB in a worker thread."""
        replica, committed = self.view.replica, self.view.committed_file_id()
        if replica is not None and committed is not None and self.db is not None:
            answered, found = replica.user_summary(user_id, committed)
            if answered:
                return found
        return await anyio.to_thread.run_sync(lambda: self.run(lambda c: user_summary(c, user_id)))
