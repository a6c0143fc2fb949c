"""Private SQLite files filled in bulk from DuckDB queries, through ADBC's SQLite driver.

A full export writes its new file aside (``<name>.rebuild``); a large increment stages its rows
in a side file (``<name>.side``) that the live file then copies from, and so does a large full
export for the tables it writes beside its transactions. Nobody else opens these
files, and a crash leaves only files that are deleted next time: no journal and no fsync while
they are built.

Why ADBC: its SQLite driver binds Arrow columns to the INSERT in C, with the GIL released, where
Python's sqlite3 binds every value from Python objects while holding the GIL that the API's
threads also need; it is also the faster of the two (docs/performance.md).

The driver carries its own SQLite library. Two SQLite libraries in one process must never have
the same file open at once (each keeps its own POSIX locks, and closing a file in one drops the
locks of the other), so ADBC only ever opens these private files, one connection at a time, and
Python's sqlite3 (which keeps the live file) opens them only after it closed them.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Mapping
from pathlib import Path

import adbc_driver_sqlite.dbapi as adbc_sqlite
import duckdb

from moneylion.export.schema import SQLITE_SCHEMA

CACHE_KIB = 65_536  # page cache of the connection building a private file
ARROW_BATCH_ROWS = 200_000


def aside_path(sqlite_path: Path) -> Path:
    """Where a full export builds the new file before renaming it over the live one."""
    return sqlite_path.with_name(sqlite_path.name + ".rebuild")


def side_path(sqlite_path: Path) -> Path:
    """Where rows are staged before ``sqlite_path`` copies them in."""
    return sqlite_path.with_name(sqlite_path.name + ".side")


def create(path: Path) -> None:
    """A new private file with the export's schema (any earlier one at ``path`` is removed)."""
    remove(path)
    lite = sqlite3.connect(path, isolation_level=None)
    try:
        lite.executescript(SQLITE_SCHEMA)
    finally:
        lite.close()


def append(
    path: Path,
    cur: duckdb.DuckDBPyConnection,
    tables: Iterable[tuple[str, str]],
    params: Mapping[str, object],
) -> dict[str, int]:
    """Append the rows of each (table, DuckDB query) to the private file ``path``, in one
    transaction; the rows written per table.

    A query's column names must be the table's (the driver matches them by name); it may use any
    of ``params`` (``$lo``, ``$hi``). Queries run one after the other on ``cur`` (its snapshot),
    each streamed in Arrow batches while the driver writes them.
    """
    counts: dict[str, int] = {}
    try:
        with adbc_sqlite.connect(str(path), autocommit=True) as db, db.cursor() as lite:
            for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{CACHE_KIB}"):
                lite.execute(f"PRAGMA {pragma}")
                lite.fetchall()
            lite.execute("BEGIN")
            for table, query in tables:
                named = {name: value for name, value in params.items() if f"${name}" in query}
                rows = cur.sql(query, params=named or None).to_arrow_reader(ARROW_BATCH_ROWS)
                written = lite.adbc_ingest(table, rows, mode="append")
                counts[table] = counts.get(table, 0) + written
            lite.execute("COMMIT")
    except adbc_sqlite.Error as exc:  # one error family for the exporter's callers
        raise sqlite3.OperationalError(f"{path}: {exc}") from exc
    return counts


def remove(path: Path) -> None:
    """Delete a SQLite file with its journal, WAL and shared-memory files, if any."""
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).unlink()
