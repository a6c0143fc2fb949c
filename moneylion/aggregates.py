"""Aggregate deltas per file, and ``recompute``/``verify`` from the base tables.

Deltas read only the rows one file really appended (``transactions.file_id = $file_id``; appends
are in file-id order, so DuckDB's zone maps skip the rest), so the cost follows the file's size.
Money is DECIMAL: an incremental total equals a full recompute to the cent, always.
"""

from __future__ import annotations

import duckdb

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
WHERE file_id = $file_id
GROUP BY user_id
"""
USER_TOTALS_OF_FILE = (
    "CREATE OR REPLACE TEMP TABLE user_totals_delta AS " + USER_TOTALS_OF_FILE_SELECT
)

# A small delta, in one statement: the file's per-user sums, the touched users' stored rows
# (found with one scan, kept with their rowids) and the new totals. Then the old rows are
# deleted by rowid and the new ones appended. DuckDB's UPDATE cost ~35 ms for 1,000 rows plus
# a 140 ms commit, an ON CONFLICT upsert on an indexed table the same; this ~15 ms.
USER_TOTALS_TOUCHED = (
    f"""CREATE OR REPLACE TEMP TABLE user_totals_touched AS
    WITH delta AS ({USER_TOTALS_OF_FILE_SELECT}),
         stored AS (SELECT u.rowid AS row_id, u.*
                    FROM user_totals u SEMI JOIN delta USING (user_id))
    SELECT u.row_id,
           user_id,
           coalesce(u.tx_count, 0) + d.tx_count AS tx_count,
           coalesce(u.total_amount, 0) + d.total_amount AS total_amount,
           coalesce(u.total_deposit, 0) + d.total_deposit AS total_deposit,
           coalesce(u.total_withdrawal, 0) + d.total_withdrawal AS total_withdrawal,
           coalesce(u.total_purchase, 0) + d.total_purchase AS total_purchase,
           coalesce(least(u.first_date, d.first_date), d.first_date) AS first_date,
           coalesce(greatest(u.last_date, d.last_date), d.last_date) AS last_date
    FROM delta d LEFT JOIN stored u USING (user_id)""",
    "DELETE FROM user_totals WHERE rowid IN "
    "(SELECT row_id FROM user_totals_touched WHERE row_id IS NOT NULL)",
    "INSERT INTO user_totals SELECT * EXCLUDE (row_id) FROM user_totals_touched",
)

# A large delta: DuckDB updates row by row (24 s for 630k users), so rebuild the table instead
# (0.3 s for 1M users). Sorted by user_id so zone maps serve point lookups.
USER_TOTALS_REBUILD = """
CREATE OR REPLACE TABLE user_totals AS
SELECT user_id,
       coalesce(u.tx_count, 0) + coalesce(d.tx_count, 0) AS tx_count,
       coalesce(u.total_amount, 0) + coalesce(d.total_amount, 0) AS total_amount,
       coalesce(u.total_deposit, 0) + coalesce(d.total_deposit, 0) AS total_deposit,
       coalesce(u.total_withdrawal, 0) + coalesce(d.total_withdrawal, 0) AS total_withdrawal,
       coalesce(u.total_purchase, 0) + coalesce(d.total_purchase, 0) AS total_purchase,
       coalesce(least(u.first_date, d.first_date), u.first_date, d.first_date) AS first_date,
       coalesce(greatest(u.last_date, d.last_date), u.last_date, d.last_date) AS last_date
FROM user_totals u FULL JOIN user_totals_delta d USING (user_id)
ORDER BY user_id
"""
# Above this many appended rows (so possibly as many touched users), rebuilding beats
# delete-and-append.
REBUILD_THRESHOLD = 20_000

DAILY_TOTALS_DELTA = """
INSERT INTO daily_totals
SELECT transaction_date, transaction_type, count(*), sum(amount)
FROM transactions
WHERE file_id = $file_id
GROUP BY transaction_date, transaction_type
ON CONFLICT (transaction_date, transaction_type) DO UPDATE SET
    tx_count = tx_count + excluded.tx_count,
    total_amount = total_amount + excluded.total_amount
"""

# Counts only grow: a user neither in the old top list nor touched by this file still ranks
# below every user of the old list, so the new list is drawn from those two sets alone.
TOP_USERS_FROM_TOUCHED = """
CREATE OR REPLACE TEMP TABLE top_users_next AS
SELECT CAST(row_number() OVER (ORDER BY tx_count DESC, user_id) AS INTEGER) AS rank,
       user_id, tx_count
FROM (
    SELECT user_id, tx_count FROM user_totals_touched
    UNION ALL
    SELECT user_id, tx_count FROM top_users t ANTI JOIN user_totals_touched USING (user_id)
    ORDER BY tx_count DESC, user_id
    LIMIT $kept
)
"""
# After a rebuild every user may have moved: rank the whole table (a top-N, ~10 ms per 1M).
TOP_USERS_FROM_ALL = """
CREATE OR REPLACE TEMP TABLE top_users_next AS
SELECT CAST(row_number() OVER (ORDER BY tx_count DESC, user_id) AS INTEGER) AS rank,
       user_id, tx_count
FROM (SELECT user_id, tx_count FROM user_totals ORDER BY tx_count DESC, user_id LIMIT $kept)
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
    conn: duckdb.DuckDBPyConnection, file_id: int, rows: int, top_users_kept: int
) -> None:
    """Fold the ``rows`` transactions appended by ``file_id`` into every aggregate (inside the
    caller's transaction)."""
    params = {"file_id": file_id}
    if rows > REBUILD_THRESHOLD:
        conn.execute(USER_TOTALS_OF_FILE, params)
        conn.execute(USER_TOTALS_REBUILD)
        conn.execute("DROP TABLE user_totals_delta")
        conn.execute(TOP_USERS_FROM_ALL, {"kept": top_users_kept})
    else:
        for statement in USER_TOTALS_TOUCHED:
            conn.execute(statement, params if "$file_id" in statement else None)
        conn.execute(TOP_USERS_FROM_TOUCHED, {"kept": top_users_kept})
        conn.execute("DROP TABLE user_totals_touched")
    conn.execute(DAILY_TOTALS_DELTA, params)
    conn.execute("DELETE FROM top_users")
    conn.execute("INSERT INTO top_users SELECT rank, user_id, tx_count FROM top_users_next")
    conn.execute("DROP TABLE top_users_next")


def recompute(conn: duckdb.DuckDBPyConnection, top_users_kept: int = 1000) -> None:
    """Rebuild every aggregate from the base tables, in one transaction."""
    conn.execute("BEGIN TRANSACTION")
    try:
        for table, query in RECOMPUTED.items():
            conn.execute(f"DELETE FROM {table}")
            params = {"kept": top_users_kept} if "$kept" in query else {}
            conn.execute(f"INSERT INTO {table} {query}", params)
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
