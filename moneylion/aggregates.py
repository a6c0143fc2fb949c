"""Aggregate deltas per file, and ``recompute``/``verify`` from the base tables.

Deltas read only the rows one file really appended (``transactions.file_id = $file_id``; appends
are in file-id order, so DuckDB's zone maps skip the rest), so the cost follows the file's size.
Money is DECIMAL: an incremental total equals a full recompute to the cent, always.
"""

from __future__ import annotations

import duckdb

# Per-user totals of the rows one file appended, added onto what is stored.
USER_TOTALS_DELTA = """
INSERT INTO user_totals
SELECT user_id,
       count(*),
       sum(amount),
       coalesce(sum(amount) FILTER (WHERE transaction_type = 'deposit'), 0),
       coalesce(sum(amount) FILTER (WHERE transaction_type = 'withdrawal'), 0),
       coalesce(sum(amount) FILTER (WHERE transaction_type = 'purchase'), 0),
       min(transaction_date),
       max(transaction_date)
FROM transactions
WHERE file_id = $file_id
GROUP BY user_id
ON CONFLICT (user_id) DO UPDATE SET
    tx_count = tx_count + excluded.tx_count,
    total_amount = total_amount + excluded.total_amount,
    total_deposit = total_deposit + excluded.total_deposit,
    total_withdrawal = total_withdrawal + excluded.total_withdrawal,
    total_purchase = total_purchase + excluded.total_purchase,
    first_date = least(first_date, excluded.first_date),
    last_date = greatest(last_date, excluded.last_date)
"""

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
TOP_USERS_CANDIDATES = """
CREATE OR REPLACE TEMP TABLE top_users_next AS
SELECT CAST(row_number() OVER (ORDER BY tx_count DESC, user_id) AS INTEGER) AS rank,
       user_id, tx_count
FROM (
    SELECT user_id, tx_count FROM user_totals
    WHERE user_id IN (
        SELECT user_id FROM top_users
        UNION
        SELECT user_id FROM transactions WHERE file_id = $file_id
    )
    ORDER BY tx_count DESC, user_id
    LIMIT $kept
)
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
    conn: duckdb.DuckDBPyConnection, file_id: int, top_users_kept: int
) -> None:
    """Fold the transactions appended by ``file_id`` into every aggregate (inside the caller's
    transaction)."""
    params = {"file_id": file_id}
    conn.execute(USER_TOTALS_DELTA, params)
    conn.execute(DAILY_TOTALS_DELTA, params)
    conn.execute(TOP_USERS_CANDIDATES, {"file_id": file_id, "kept": top_users_kept})
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
