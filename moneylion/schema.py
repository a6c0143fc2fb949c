"""Open the DuckDB warehouse and apply the numbered migrations in ``sql/``.

The schema version lives in the database (``schema_version``), so opening an older warehouse
brings it up to date and opening a current one changes nothing.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, cast

import duckdb

from moneylion.config import Config
from moneylion.errors import MoneylionError

_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


class WarehouseLocked(MoneylionError, RuntimeError):
    """Another process holds the DuckDB file (usually a second daemon)."""


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped in the package, in order."""
    found = []
    for entry in resources.files("moneylion.sql").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


# Up to this many keys are looked up as a list of constants written into the statement, which
# DuckDB serves from the column's index; more are joined (a long list of constants costs more
# than the scan a join does).
INDEX_LOOKUP_MAX = 256


def int_constants(values: Iterable[object]) -> str:
    """Integer keys as a SQL list of constants, each through ``int()``: only digits are
    written into the statement. ``NULL`` for none (an IN list that matches nothing)."""
    return ", ".join(str(int(cast(int, value))) for value in values) or "NULL"


def one_row(conn: duckdb.DuckDBPyConnection, sql: str, params: object = None) -> tuple[Any, ...]:
    """The single row a query returns, read to the end.

    DuckDB 2 keeps a result read with ``fetchone()`` open, and then refuses ``register()`` and
    similar calls on that connection; ``fetchall()`` finishes it.
    """
    rows = conn.execute(sql, params).fetchall()
    if len(rows) != 1:
        raise LookupError(f"expected one row, got {len(rows)}: {sql[:80]}")
    return tuple(rows[0])


def rollback(conn: duckdb.DuckDBPyConnection) -> None:
    """Roll back if a transaction is open (it may already be, after a failed statement)."""
    with contextlib.suppress(duckdb.TransactionException):
        conn.execute("ROLLBACK")


def schema_version(conn: duckdb.DuckDBPyConnection) -> int:
    """The highest migration applied to this database, 0 for a new one."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
        " applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
    )
    return int(one_row(conn, "SELECT coalesce(max(version), 0) FROM schema_version")[0])


def migrate(conn: duckdb.DuckDBPyConnection) -> int:
    """Apply every migration newer than the database, each in its own transaction."""
    current = schema_version(conn)
    for version, name, sql in migrations():
        if version <= current:
            continue
        conn.execute("BEGIN TRANSACTION")
        try:
            conn.execute(sql)
            conn.execute(
                "INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, name]
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        current = version
    return current


def connect(path: Path, memory_limit: str = "1GB", threads: int = 2) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) the warehouse at ``path`` and bring its schema up to date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = duckdb.connect(
            str(path),
            config={
                "memory_limit": memory_limit,
                "threads": threads,
                # Nothing may download at run time (the machine may be offline).
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
            },
        )
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise WarehouseLocked(
                f"the warehouse {path} is in use by another process "
                "(is a moneylion daemon already running on it?)"
            ) from exc
        raise
    # A daemon's console is for its log lines; the CLI turns the bar on itself.
    conn.execute("SET enable_progress_bar = false")
    migrate(conn)
    return conn


def open_warehouse(config: Config) -> duckdb.DuckDBPyConnection:
    """The warehouse named by ``config``, migrated."""
    return connect(config.duckdb_path, config.duckdb_memory_limit, config.duckdb_threads)
