"""The DuckDB side of an export: one read transaction, so a concurrent commit cannot split it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import duckdb
import pyarrow as pa

from moneylion.ledger import LEDGER
from moneylion.model import DAILY_TOTALS, DOMAINS, TABLES, USER_TOTALS, Aggregate, Column


@contextlib.contextmanager
def snapshot(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor inside one read transaction."""
    cur = conn.cursor()
    try:
        cur.execute("BEGIN TRANSACTION")
        try:
            yield cur
        finally:
            # Read only: nothing to keep. After an error a result may still be open on the
            # cursor and refuse the ROLLBACK; closing the cursor ends the transaction anyway.
            with contextlib.suppress(duckdb.Error):
                cur.execute("ROLLBACK")
    finally:
        cur.close()


# Files and corrections take their ids from one sequence (sql/008), so the greatest of both is
# the last change the snapshot holds; the last file's sha256 ties an export to its warehouse.
_HIGH_MARK = """
SELECT greatest(coalesce(max(file_id), 0), (SELECT coalesce(max(change_id), 0) FROM corrections)),
       arg_max(sha256, file_id)
FROM files"""


def high_mark(cur: duckdb.DuckDBPyConnection) -> tuple[int, str | None]:
    """The last change in the snapshot, a file's id or a correction's (0 when empty), and the
    sha256 of its last file."""
    rows = cur.execute(_HIGH_MARK).fetchall()
    return int(rows[0][0]), rows[0][1]


def aggregate_as_sqlite(aggregate: Aggregate) -> str:
    """An aggregate's columns as the SQLite file stores them: exact totals and dates as TEXT."""
    keys = [Column(name, DOMAINS[name]).as_sqlite() for name in aggregate.key]
    measures = [
        m.name if m.of is None else f"{m.name}::VARCHAR AS {m.name}" for m in aggregate.measures
    ]
    return ", ".join(keys + measures)


# Each exported DuckDB table's columns as the SQLite file's (names, and types SQLite stores:
# dates and exact totals as TEXT, the seed's amount as REAL), for the bulk writer, which
# matches columns by name.
AS_SQLITE = {
    "files": ", ".join(
        f"{name}::VARCHAR AS {name}" if pa.types.is_timestamp(kind) else name
        for name, kind in LEDGER.items()
    ),
    **{table.name: table.as_sqlite() for table in TABLES.values()},
    USER_TOTALS.table: aggregate_as_sqlite(USER_TOTALS),
    DAILY_TOTALS.table: aggregate_as_sqlite(DAILY_TOTALS),
    "top_users": "rank, user_id, tx_count",
    # Months as TEXT ``YYYY-MM`` (the API's form); a row whose count fell to zero is a
    # tombstone of DuckDB's (see sql/004), never a row of the SQLite file.
    "country_monthly_totals": """strftime(month, '%Y-%m') AS month, country,
    transaction_type::VARCHAR AS transaction_type, tx_count,
    total_amount::VARCHAR AS total_amount""",
}


def select_as_sqlite(table: str) -> str:
    """``SELECT <table's columns as SQLite stores them> FROM <table>``."""
    return f"SELECT {AS_SQLITE[table]} FROM {table}"
