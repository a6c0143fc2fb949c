"""The API's handle on the warehouse: one shared connection, a fresh read cursor per request."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import duckdb

from moneylion.api.queries import TopUsersCache
from moneylion.config import Config


class WarehouseUnavailable(RuntimeError):
    """The warehouse is not open (yet, or any more); the API answers 503."""


@dataclass
class ApiContext:
    """What the handlers share, kept on ``app.state.moneylion``."""

    config: Config
    db: duckdb.DuckDBPyConnection | None = None
    readiness: Callable[[], bool] | None = None
    top_users: TopUsersCache = field(default_factory=TopUsersCache)

    def ready(self) -> bool:
        """Ready when the warehouse is open and the daemon's own check (if any) passes."""
        if self.db is None:
            return False
        return self.readiness() if self.readiness is not None else True

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
