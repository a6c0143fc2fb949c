"""The API's handle on the warehouse: one shared connection, a fresh read cursor per query."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

import duckdb

from moneylion.api.cache import SnapshotCache
from moneylion.config import Config

T = TypeVar("T")


class WarehouseUnavailable(RuntimeError):
    """The warehouse is not open (yet, or any more); the API answers 503."""


@dataclass
class ApiContext:
    """What the handlers share, kept on ``app.state.moneylion``."""

    config: Config
    db: duckdb.DuckDBPyConnection | None = None
    readiness: Callable[[], bool] | None = None
    cache: SnapshotCache = field(init=False)

    def __post_init__(self) -> None:
        path = self.config.duckdb_path
        self.cache = SnapshotCache((path, path.with_name(path.name + ".wal")))

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
