"""How every module talks to DuckDB: one way to hold a transaction, read one row, append Arrow
rows, write integer keys into a statement, and stamp a time.

A DuckDB transaction is all or nothing and has no savepoints: ``transaction()`` is the only
place that begins, commits or rolls one back on an error, so no caller writes ROLLBACK by hand.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Iterable, Iterator
from typing import Any, cast

import duckdb
import pyarrow as pa


@contextlib.contextmanager
def transaction(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN; COMMIT when the block ends, ROLLBACK (and re-raise) on any exception, a
    KeyboardInterrupt included: nothing of a failed block stays."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield conn
    except BaseException:
        rollback(conn)
        raise
    conn.execute("COMMIT")


def restart(conn: duckdb.DuckDBPyConnection) -> None:
    """Roll back the open transaction and begin another (DuckDB has no savepoints: a load path
    that gives up is undone whole, and the next starts afresh)."""
    rollback(conn)
    conn.execute("BEGIN TRANSACTION")


def rollback(conn: duckdb.DuckDBPyConnection) -> None:
    """Roll back if a transaction is open (it may already be, after a failed statement)."""
    with contextlib.suppress(duckdb.TransactionException):
        conn.execute("ROLLBACK")


def one_row(conn: duckdb.DuckDBPyConnection, sql: str, params: object = None) -> tuple[Any, ...]:
    """The single row a query returns, read to the end.

    DuckDB 2 keeps a result read with ``fetchone()`` open, and then refuses ``register()`` and
    similar calls on that connection; ``fetchall()`` finishes it.
    """
    rows = conn.execute(sql, params).fetchall()
    if len(rows) != 1:
        raise LookupError(f"expected one row, got {len(rows)}: {sql[:80]}")
    return tuple(rows[0])


def append_arrow(conn: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    """Insert ``rows`` into ``table`` by column name, in one statement."""
    with registered(conn, "arrow_batch", rows):
        conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM arrow_batch")


@contextlib.contextmanager
def registered(conn: duckdb.DuckDBPyConnection, name: str, rows: object) -> Iterator[None]:
    """Inside: ``rows`` (an Arrow table, dataset or reader) is the relation ``name``."""
    conn.register(name, rows)
    try:
        yield
    finally:
        conn.unregister(name)


# Up to this many keys are looked up as a list of constants written into the statement, which
# DuckDB serves from the column's index; more are joined (a long list of constants costs more
# than the scan a join does).
INDEX_LOOKUP_MAX = 256


def int_constants(values: Iterable[object]) -> str:
    """Integer keys as a SQL list of constants, each through ``int()``: only digits are
    written into the statement. ``NULL`` for none (an IN list that matches nothing)."""
    return ", ".join(str(int(cast(int, value))) for value in values) or "NULL"


def utc_now() -> dt.datetime:
    """Now, in UTC, without a zone (DuckDB TIMESTAMP)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)
