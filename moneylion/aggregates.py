"""Aggregate deltas per commit (one file or a batch), and ``recompute``/``verify``.

Deltas read only the rows a commit really appended (``file_id BETWEEN $first AND $last``: a
commit's files have consecutive ids, appends are in file-id order, so DuckDB's zone maps skip
the rest), so the cost follows the commit's size, not the warehouse's.
Money is DECIMAL: an incremental total equals a full recompute to the cent, always.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

# Per-user totals of the rows one file appended.
USER_TOTALS_OF_FILE_SELECT = """
SELECT user_id,
       count(*) AS tx_count,
       sum(amount) AS total_amount,
       coalesce(sum(amount) FILTER (WHERE transaction_type = 'deposit'), 0) AS total_deposit,
       coalesce(sum(amount) FILTER (WHERE transaction_type = 'withdrawal'), 0) AS total_withdrawal,
       coalesce(sum(amount) FILTER (WHERE transaction_type = 'purchase'), 0) AS total_purchase,
       min(transaction_date) AS first_date,
       max(transaction_date) AS last_date
FROM transactions
WHERE file_id BETWEEN $first AND $last
GROUP BY user_id
"""

# A file appends its per-user sums to the log (file_id > 0 marks rows not yet compacted).
USER_TOTALS_APPEND = (
    "INSERT INTO user_totals_log SELECT *, $last FROM (" + USER_TOTALS_OF_FILE_SELECT + ")"
)

# Compaction: one row per user again, sorted by user_id so zone maps serve point lookups.
# Written as a new table that then takes the log's name: the view reads the old one meanwhile
# (staging in a temp table instead cost 0.35 s more per 1M users).
USER_TOTALS_COMPACT = (
    """CREATE TABLE user_totals_log_compacted AS
    SELECT *, CAST(0 AS BIGINT) AS file_id FROM user_totals ORDER BY user_id""",
    "DROP TABLE user_totals_log",
    "ALTER TABLE user_totals_log_compacted RENAME TO user_totals_log",
)
# The log's indexes (sql/005) are dropped before a compaction's large append and made again on
# the compacted table, as the catalog describes them.
LOG_INDEXES = "SELECT index_name, sql FROM duckdb_indexes() WHERE table_name = 'user_totals_log'"
# Compact once this many rows wait in the log (a few hundred 1,000-row files), so a user's
# totals stay a handful of rows and compaction (~0.5 s per 1M users) stays rare; and right
# after a file of more rows than REBUILD_THRESHOLD (its delta touches many users anyway).
COMPACT_AFTER_ROWS = 250_000
REBUILD_THRESHOLD = 20_000

DAILY_TOTALS_DELTA = """
INSERT INTO daily_totals
SELECT transaction_date, transaction_type, count(*), sum(amount)
FROM transactions
WHERE file_id BETWEEN $first AND $last
GROUP BY transaction_date, transaction_type
ON CONFLICT (transaction_date, transaction_type) DO UPDATE SET
    tx_count = tx_count + excluded.tx_count,
    total_amount = total_amount + excluded.total_amount
"""

# Counts only grow: a user neither in the old top list nor touched by this commit still ranks
# below every user of the old list, so the new list is drawn from those two sets alone. The old
# list's counts are exact and the commit's per-user counts come back from its log append; only
# the touched users outside the list are looked up: a few through the log's index on user_id
# (a list of constants, which DuckDB serves from the index), many by one join (a scan of the
# log's two columns costs less than a long list of constants).
TOUCHED_COUNTS = """
SELECT user_id, CAST(sum(tx_count) AS BIGINT) FROM user_totals_log
WHERE user_id IN ({ids}) GROUP BY user_id
"""
TOUCHED_BY_INDEX_MAX = 256
# Right after a compaction the log has one row per user: rank it whole (a top-N, ~10 ms per
# 1M users).
TOP_USERS_FROM_ALL = """
CREATE OR REPLACE TEMP TABLE top_users_next AS
SELECT CAST(row_number() OVER (ORDER BY tx_count DESC, user_id) AS INTEGER) AS rank,
       user_id, tx_count
FROM (SELECT user_id, tx_count FROM user_totals_log ORDER BY tx_count DESC, user_id LIMIT $kept)
"""

RECOMPUTED = {
    "user_totals": """
        SELECT user_id, count(*) AS tx_count, sum(amount) AS total_amount,
               coalesce(sum(amount) FILTER (WHERE transaction_type = 'deposit'), 0)
                   AS total_deposit,
               coalesce(sum(amount) FILTER (WHERE transaction_type = 'withdrawal'), 0)
                   AS total_withdrawal,
               coalesce(sum(amount) FILTER (WHERE transaction_type = 'purchase'), 0)
                   AS total_purchase,
               min(transaction_date) AS first_date, max(transaction_date) AS last_date
        FROM transactions GROUP BY user_id""",
    "daily_totals": """
        SELECT transaction_date, transaction_type, count(*) AS tx_count,
               sum(amount) AS total_amount
        FROM transactions GROUP BY transaction_date, transaction_type""",
    "top_users": """
        SELECT CAST(row_number() OVER (ORDER BY tx_count DESC, user_id) AS INTEGER) AS rank,
               user_id, tx_count
        FROM (SELECT user_id, count(*) AS tx_count FROM transactions GROUP BY user_id
              ORDER BY tx_count DESC, user_id LIMIT $kept)""",
}

KEYS = {
    "user_totals": "user_id",
    "daily_totals": "transaction_date, transaction_type",
    "top_users": "rank",
}


def apply_transaction_deltas(
    conn: duckdb.DuckDBPyConnection,
    file_id: int,
    rows: int,
    top_users_kept: int,
    *,
    last_file_id: int | None = None,
) -> None:
    """Fold the ``rows`` transactions appended by files ``file_id`` .. ``last_file_id`` (one
    file, or a batch) into every aggregate (inside the caller's transaction)."""
    params = {"first": file_id, "last": file_id if last_file_id is None else last_file_id}
    large = rows > REBUILD_THRESHOLD
    indexes = _drop_log_indexes(conn) if large else []
    if large:
        conn.execute(USER_TOTALS_APPEND, params)
    else:
        appended = conn.execute(USER_TOTALS_APPEND + " RETURNING user_id, tx_count", params)
        touched = dict(appended.fetchall())
    if large or _rows_waiting(conn) > COMPACT_AFTER_ROWS:
        indexes = indexes or _drop_log_indexes(conn)
        for statement in USER_TOTALS_COMPACT:
            conn.execute(statement)
        for sql in indexes:
            conn.execute(sql)
        conn.execute(TOP_USERS_FROM_ALL, {"kept": top_users_kept})
        conn.execute("DELETE FROM top_users")
        conn.execute("INSERT INTO top_users SELECT rank, user_id, tx_count FROM top_users_next")
        conn.execute("DROP TABLE top_users_next")
    else:
        _rerank(conn, touched, top_users_kept)
    conn.execute(DAILY_TOTALS_DELTA, params)


def _drop_log_indexes(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """Drop the log's indexes (before a large append or a compaction); the SQL that makes
    each again."""
    indexes = conn.execute(LOG_INDEXES).fetchall()
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    return [sql for _, sql in indexes]


def _rerank(conn: duckdb.DuckDBPyConnection, touched: dict[int, int], kept: int) -> None:
    """The top list after a commit that added ``touched`` (user -> transactions) to counts;
    only the ranks that changed are written (usually none: few commits touch a top user)."""
    old: list[tuple[int, int]] = conn.execute(
        "SELECT user_id, tx_count FROM top_users ORDER BY rank"
    ).fetchall()
    counts = dict(old)
    outside = [user for user in touched if user not in counts]
    for user, added in touched.items():
        if user in counts:
            counts[user] += added
    if outside:
        counts.update(_counts_of(conn, outside))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:kept]
    changed = [n for n in range(max(len(ranked), len(old))) if _at(ranked, n) != _at(old, n)]
    if not changed:
        return
    first, last = changed[0], changed[-1]
    conn.execute(
        "DELETE FROM top_users WHERE rank BETWEEN $first AND $last",
        {"first": first + 1, "last": last + 1},
    )
    rows = ranked[first : last + 1]
    if rows:
        ranks = pa.table(
            {
                "rank": pa.array(range(first + 1, first + 1 + len(rows)), type=pa.int32()),
                "user_id": pa.array([user for user, _ in rows], type=pa.int64()),
                "tx_count": pa.array([count for _, count in rows], type=pa.int64()),
            }
        )
        conn.register("top_users_changed", ranks)
        try:
            conn.execute("INSERT INTO top_users BY NAME SELECT * FROM top_users_changed")
        finally:
            conn.unregister("top_users_changed")


def _counts_of(conn: duckdb.DuckDBPyConnection, users: list[int]) -> list[tuple[int, int]]:
    """Each user's transaction count, summed from the log."""
    if len(users) <= TOUCHED_BY_INDEX_MAX:  # ints only: written into the statement
        ids = ",".join(str(int(user)) for user in users)
        return conn.execute(TOUCHED_COUNTS.format(ids=ids)).fetchall()
    conn.register("touched_users", pa.table({"user_id": pa.array(users, type=pa.int64())}))
    try:
        return conn.execute(
            TOUCHED_COUNTS.format(ids="SELECT user_id FROM touched_users")
        ).fetchall()
    finally:
        conn.unregister("touched_users")


def _at(ranked: list[tuple[int, int]], n: int) -> tuple[int, int] | None:
    return ranked[n] if n < len(ranked) else None


def _rows_waiting(conn: duckdb.DuckDBPyConnection) -> int:
    """Rows appended to the log since its last compaction."""
    row = conn.execute("SELECT count(*) FROM user_totals_log WHERE file_id > 0").fetchall()
    return int(row[0][0])


def recompute(conn: duckdb.DuckDBPyConnection, top_users_kept: int = 1000) -> None:
    """Rebuild every aggregate from the base tables, in one transaction."""
    conn.execute("BEGIN TRANSACTION")
    try:
        for table, query in RECOMPUTED.items():
            # user_totals is a view over its log: the log gets one row per user again.
            target, extra = (
                ("user_totals_log", ", CAST(0 AS BIGINT)")
                if table == "user_totals"
                else (table, "")
            )
            conn.execute(f"DELETE FROM {target}")
            params = {"kept": top_users_kept} if "$kept" in query else {}
            conn.execute(f"INSERT INTO {target} SELECT *{extra} FROM ({query})", params)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def verify(
    conn: duckdb.DuckDBPyConnection, top_users_kept: int = 1000, limit: int = 20
) -> list[str]:
    """Differences between the maintained aggregates and a full recompute; [] when equal.

    Each line names the table and a row present on one side only (``maintained`` or
    ``recomputed``), up to ``limit`` rows per table and side.
    """
    cursor = conn.cursor()
    differences: list[str] = []
    try:
        cursor.execute("BEGIN TRANSACTION")  # one snapshot for both sides
        for table, query in RECOMPUTED.items():
            params = {"kept": top_users_kept} if "$kept" in query else {}
            maintained = f"SELECT * FROM {table}"
            for side, left, right in (
                ("maintained", maintained, query),
                ("recomputed", query, maintained),
            ):
                rows = cursor.execute(
                    f"SELECT * FROM ({left} EXCEPT ALL {right}) ORDER BY {KEYS[table]} "
                    f"LIMIT {int(limit)}",
                    params,
                ).fetchall()
                differences += [f"{table}: only {side}: {row}" for row in rows]
        cursor.execute("COMMIT")
    finally:
        cursor.close()
    return differences
