"""Aggregate deltas per commit (one file or a batch), and ``recompute``/``verify``.

``apply_deltas`` is what a commit runs: the transaction aggregates when it appended
transactions, the country totals when it appended transactions or wrote profiles.

Deltas read only the rows a commit really appended (``file_id BETWEEN $first AND $last``: a
commit's files have consecutive ids, appends are in file-id order, so DuckDB's zone maps skip
the rest), so the cost follows the commit's size, not the warehouse's.
Money is DECIMAL: an incremental total equals a full recompute to the cent, always.
"""

from __future__ import annotations

import contextlib

import duckdb
import pyarrow as pa

from moneylion.db import (
    INDEX_LOOKUP_MAX,
    append_arrow,
    int_constants,
    one_row,
    registered,
    transaction,
)
from moneylion.model import DAILY_TOTALS, TYPE_COLUMN, USER_TOTALS, Aggregate, Fold, Measure
from moneylion.tuning import DEFAULT, Tuning


def _measure_sql(measure: Measure) -> str:
    """A measure as a DuckDB aggregate over transactions (an empty filtered sum is 0)."""
    if measure.of is None:
        return "count(*)"
    if measure.only is None:
        return f"{measure.fold}({measure.of})"
    only = f"FILTER (WHERE {TYPE_COLUMN} = '{measure.only}')"
    return f"coalesce({measure.fold}({measure.of}) {only}, 0)"


def aggregate_of(aggregate: Aggregate) -> str:
    """The aggregate's rows over the transactions ``{where}`` selects: a commit's delta reads
    the rows it appended (FILE_ROWS), the recompute every row."""
    key = ", ".join(aggregate.key)
    measures = ", ".join(f"{_measure_sql(m)} AS {m.name}" for m in aggregate.measures)
    return f"SELECT {key}, {measures} FROM transactions {{where}} GROUP BY {key}"


def fold_into(aggregate: Aggregate, stored: str, new: str) -> str:
    """SQL assignments folding the measures of ``new`` rows into the ``stored`` ones."""
    fold = {
        Fold.SUM: "{stored}.{name} + {new}.{name}",
        Fold.MIN: "least({stored}.{name}, {new}.{name})",
        Fold.MAX: "greatest({stored}.{name}, {new}.{name})",
    }
    return ", ".join(
        f"{m.name} = " + fold[m.fold].format(stored=stored, new=new, name=m.name)
        for m in aggregate.measures
    )


USER_TOTALS_OF = aggregate_of(USER_TOTALS)
DAILY_TOTALS_OF = aggregate_of(DAILY_TOTALS)
FILE_ROWS = "WHERE file_id BETWEEN $first AND $last"

# Per-user totals of the rows a commit appended.
USER_TOTALS_OF_FILE_SELECT = USER_TOTALS_OF.format(where=FILE_ROWS)

# A file appends its per-user sums to the log (file_id > 0 marks rows not yet compacted).
USER_TOTALS_APPEND = (
    "INSERT INTO user_totals_log SELECT *, $last FROM (" + USER_TOTALS_OF_FILE_SELECT + ")"
)

# Compaction: one row per user again, sorted by user_id so zone maps serve point lookups.
# Written as a new table that then takes the log's name: the view reads the old one meanwhile
# (staging in a temp table instead measured slower: one more copy of every user's row).
USER_TOTALS_COMPACT = (
    """CREATE TABLE user_totals_log_compacted AS
    SELECT *, CAST(0 AS BIGINT) AS file_id FROM user_totals ORDER BY user_id""",
    "DROP TABLE user_totals_log",
    "ALTER TABLE user_totals_log_compacted RENAME TO user_totals_log",
)
# The log's indexes (sql/005) are dropped before a compaction's large append and made again on
# the compacted table, as the catalog describes them.
LOG_INDEXES = "SELECT index_name, sql FROM duckdb_indexes() WHERE table_name = 'user_totals_log'"

DAILY_TOTALS_DELTA = (
    f"INSERT INTO {DAILY_TOTALS.table} "
    + DAILY_TOTALS_OF.format(where=FILE_ROWS)
    + f" ON CONFLICT ({', '.join(DAILY_TOTALS.key)}) DO UPDATE SET "
    + fold_into(DAILY_TOTALS, DAILY_TOTALS.table, "excluded")
)

# Counts only grow: a user neither in the old top list nor touched by this commit still ranks
# below every user of the old list, so the new list is drawn from those two sets alone: the old
# list (its counts exact) and the touched users' counts summed from the log after the commit's
# append. The touched users are looked up by their ``ids`` (_user_ids_sql): a few through the
# log's index on user_id (a list of constants, which DuckDB serves from the index), many by one
# join (a scan of the log's two columns costs less than a long list of constants).
TOUCHED_COUNTS = """
SELECT user_id, CAST(sum(tx_count) AS BIGINT) FROM user_totals_log
WHERE user_id IN ({ids}) GROUP BY user_id
"""
# Right after a compaction the log has one row per user: rank it whole (a top-N, one scan).
TOP_USERS_FROM_ALL = """
CREATE OR REPLACE TEMP TABLE top_users_next AS
SELECT CAST(row_number() OVER (ORDER BY tx_count DESC, user_id) AS INTEGER) AS rank,
       user_id, tx_count
FROM (SELECT user_id, tx_count FROM user_totals_log ORDER BY tx_count DESC, user_id LIMIT $kept)
"""

# --- country_monthly_totals ---------------------------------------------------------------------

# The one definition of country_monthly_totals: per month, country and type, the count and total
# of ``rows`` (transaction_date, country, transaction_type, amount, sign: +1 counts a transaction
# in, -1 takes it out). The recompute reads every transaction with its user's current country
# (NULL: an orphan); a commit's delta reads its new transactions so, and the earlier
# transactions of the users whose country it changed (a late profile: from NULL), out of the old
# country (-1) and into the new (+1). The exports copy the rows this maintains.
COUNTRY_MONTHLY_OF = """
SELECT CAST(date_trunc('month', transaction_date) AS DATE) AS month, country, transaction_type,
       CAST(sum(sign) AS BIGINT) AS tx_count,
       CAST(sum(sign * amount) AS DECIMAL(38, 2)) AS total_amount
FROM ({rows}) GROUP BY ALL
"""
_WITH_COUNTRY_FROM = """
SELECT t.transaction_date, u.country, t.transaction_type, t.amount, 1 AS sign
FROM transactions t LEFT JOIN ({users}) u ON u.user_id = t.user_id"""
# The users a commit touched, registered as the Arrow relation ``user_ids`` (_user_ids).
USER_IDS = "SELECT user_id FROM user_ids"
_WITH_COUNTRY = _WITH_COUNTRY_FROM.format(users="SELECT user_id, country FROM users")
# A commit's new transactions with the profiles of the users they touch (``ids``, from
# _user_ids_sql): a few through the users' primary key (a list of constants, written in), more
# by a join with them, so that DuckDB builds its hash table of those users and probes it with a
# scan of the profiles. A join of the commit's rows with every profile built a hash table of all
# of them (docs/performance.md).
_WITH_COUNTRY_OF = _WITH_COUNTRY_FROM.format(
    users="SELECT user_id, country FROM users WHERE user_id IN ({ids})"
)
_MOVED = """
SELECT t.transaction_date, m.{side} AS country, t.transaction_type, t.amount, {sign} AS sign
FROM transactions t JOIN country_moves m ON m.user_id = t.user_id WHERE t.file_id < $first"""
COUNTRY_ROWS = {
    "all": _WITH_COUNTRY,
    "new": _WITH_COUNTRY + " WHERE t.file_id BETWEEN $first AND $last",
    "new_of": _WITH_COUNTRY_OF + " WHERE t.file_id BETWEEN $first AND $last",
    "moved": _MOVED.format(side="old_country", sign=-1)
    + " UNION ALL "
    + _MOVED.format(side="new_country", sign=1),
}

# The profiles a commit replaces, as they were (their country), noted before the upsert
# (resolve.upsert_users): a TEMP table, rolled back with the commit, emptied by its delta.
_REPLACED_TABLE = "CREATE TEMP TABLE IF NOT EXISTS users_replaced (user_id BIGINT, country VARCHAR)"
_NOTE_REPLACED = """
INSERT INTO users_replaced SELECT user_id, country FROM users
WHERE user_id IN (SELECT user_id FROM ({rows}))
  AND user_id NOT IN (SELECT user_id FROM users_replaced)
"""
# Users the commit wrote whose country changed (new ones: from NULL), among those with
# transactions (the commit's own included; only the earlier ones move).
_COUNTRY_MOVES = """
CREATE OR REPLACE TEMP TABLE country_moves AS
SELECT u.user_id, r.country AS old_country, u.country AS new_country
FROM users u LEFT JOIN users_replaced r ON r.user_id = u.user_id
WHERE u.file_id BETWEEN $first AND $last AND r.country IS DISTINCT FROM u.country
  AND u.user_id IN (SELECT user_id FROM user_totals_log)
"""
_COUNTRY_MERGE = """
MERGE INTO country_monthly_totals c
USING (SELECT * FROM ({delta}) WHERE tx_count <> 0 OR total_amount <> 0) d
ON c.month = d.month AND c.country IS NOT DISTINCT FROM d.country
   AND c.transaction_type = d.transaction_type
WHEN MATCHED THEN UPDATE SET tx_count = c.tx_count + d.tx_count,
    total_amount = c.total_amount + d.total_amount, file_id = $last
WHEN NOT MATCHED THEN INSERT VALUES
    (d.month, d.country, d.transaction_type, d.tx_count, d.total_amount, $last)
"""


def merge_country(conn: duckdb.DuckDBPyConnection, delta: str, stamp: int) -> None:
    """Fold ``delta`` (COUNTRY_MONTHLY_OF's rows, signed) into country_monthly_totals, the rows
    it changes stamped with ``stamp`` (the export copies the rows changed since its mark)."""
    conn.execute(_COUNTRY_MERGE.format(delta=delta), {"last": stamp})


def note_replaced_users(conn: duckdb.DuckDBPyConnection, rows: str) -> None:
    """Before profiles are upserted from the relation ``rows``: note the countries of those
    they replace (inside the caller's transaction), for ``apply_country_deltas``."""
    conn.execute(_REPLACED_TABLE)
    conn.execute(_NOTE_REPLACED.format(rows=rows))


def apply_country_deltas(
    conn: duckdb.DuckDBPyConnection,
    first: int,
    last: int,
    *,
    users_written: bool,
    touched: str | None = None,
) -> None:
    """Fold the commit of files ``first`` .. ``last`` into country_monthly_totals: its new
    transactions, and (``users_written``) the moves of the users whose country it changed.
    ``touched``: SQL selecting the users of its new transactions, when known (_user_ids_sql:
    then their profiles are looked up, not joined whole)."""
    params = {"first": first, "last": last}
    rows = COUNTRY_ROWS["new"] if touched is None else COUNTRY_ROWS["new_of"].format(ids=touched)
    if users_written:
        conn.execute(_REPLACED_TABLE)
        conn.execute(_COUNTRY_MOVES, params)
        if conn.execute("SELECT count(*) FROM country_moves").fetchall()[0][0]:
            rows += " UNION ALL " + COUNTRY_ROWS["moved"]
    conn.execute(_COUNTRY_MERGE.format(delta=COUNTRY_MONTHLY_OF.format(rows=rows)), params)
    if users_written:
        conn.execute("DROP TABLE country_moves")
        conn.execute("DELETE FROM users_replaced")


def apply_deltas(
    conn: duckdb.DuckDBPyConnection,
    first: int,
    last: int,
    *,
    transactions: int,
    users: int,
    top_users_kept: int,
    tuning: Tuning = DEFAULT,
) -> None:
    """Everything a commit of files ``first`` .. ``last`` (one file, or a batch) changes in
    the aggregates, given the transactions it appended and the profiles it wrote."""
    with contextlib.ExitStack() as relations:  # the touched users' relation, for both
        touched: str | None = int_constants([])  # no new transactions: no users to look up
        if transactions:
            touched = apply_transaction_deltas(
                conn,
                first,
                transactions,
                top_users_kept,
                last_file_id=last,
                tuning=tuning,
                relations=relations,
            )
        if transactions or users:
            apply_country_deltas(conn, first, last, users_written=bool(users), touched=touched)


RECOMPUTED = {
    "user_totals": USER_TOTALS_OF.format(where=""),
    "daily_totals": DAILY_TOTALS_OF.format(where=""),
    "top_users": """
        SELECT CAST(row_number() OVER (ORDER BY tx_count DESC, user_id) AS INTEGER) AS rank,
               user_id, tx_count
        FROM (SELECT user_id, count(*) AS tx_count FROM transactions GROUP BY user_id
              ORDER BY tx_count DESC, user_id LIMIT $kept)""",
    "country_monthly_totals": COUNTRY_MONTHLY_OF.format(rows=COUNTRY_ROWS["all"]),
}
# What verify compares with a recompute, where it is not the whole table: the rows a count fell
# to zero in stay (tombstones for the export), the file_id stamp is not a total.
MAINTAINED = {
    "country_monthly_totals": """
        SELECT month, country, transaction_type, tx_count, total_amount
        FROM country_monthly_totals WHERE tx_count <> 0 OR total_amount <> 0""",
}
# Columns a recompute adds after the totals: user_totals' log marks compacted rows (0), the
# country totals are stamped with the last file (an export then copies them all).
_RECOMPUTE_TARGETS = {
    "user_totals": ("user_totals_log", ", CAST(0 AS BIGINT)"),
    "country_monthly_totals": (
        "country_monthly_totals",
        ", (SELECT coalesce(max(file_id), 0) FROM files)",
    ),
}

KEYS = {
    **{a.table: ", ".join(a.key) for a in (USER_TOTALS, DAILY_TOTALS)},
    "top_users": "rank",
    "country_monthly_totals": "month, country, transaction_type",
}


def apply_transaction_deltas(
    conn: duckdb.DuckDBPyConnection,
    file_id: int,
    rows: int,
    top_users_kept: int,
    *,
    last_file_id: int | None = None,
    tuning: Tuning,
    relations: contextlib.ExitStack,
) -> str | None:
    """Fold the ``rows`` transactions appended by files ``file_id`` .. ``last_file_id`` (one
    file, or a batch) into every aggregate (inside the caller's transaction); SQL selecting the
    users they touched (_user_ids_sql: valid until ``relations`` closes), when the commit was
    small enough to list them.

    The log is compacted once ``tuning.compact_after_rows`` rows wait in it (a few hundred
    1,000-row files), so a user's totals stay a handful of rows and compaction (a rewrite of
    every user's row) stays rare; and right after a commit of more rows than
    ``tuning.rebuild_threshold`` (its delta touches many users anyway)."""
    params = {"first": file_id, "last": file_id if last_file_id is None else last_file_id}
    if rows > tuning.rebuild_threshold:
        indexes = _drop_log_indexes(conn)  # else the append would update them row by row
        conn.execute(USER_TOTALS_APPEND, params)
        _compact(conn, indexes, top_users_kept)
        conn.execute(DAILY_TOTALS_DELTA, params)
        return None
    appended = conn.execute(USER_TOTALS_APPEND + " RETURNING user_id, tx_count", params)
    touched = _user_ids_sql(conn, [user for user, _ in appended.fetchall()], relations)
    if _rows_waiting(conn) > tuning.compact_after_rows:
        _compact(conn, _drop_log_indexes(conn), top_users_kept)
    else:
        rerank(conn, touched, top_users_kept)
    conn.execute(DAILY_TOTALS_DELTA, params)
    return touched


def _compact(conn: duckdb.DuckDBPyConnection, indexes: list[str], kept: int) -> None:
    """The log back to one row per user (its indexes made again), the top list ranked whole."""
    for statement in USER_TOTALS_COMPACT:
        conn.execute(statement)
    for sql in indexes:
        conn.execute(sql)
    conn.execute(TOP_USERS_FROM_ALL, {"kept": kept})
    conn.execute("DELETE FROM top_users")
    conn.execute("INSERT INTO top_users SELECT rank, user_id, tx_count FROM top_users_next")
    conn.execute("DROP TABLE top_users_next")


def _drop_log_indexes(conn: duckdb.DuckDBPyConnection) -> list[str]:
    """Drop the log's indexes (before a large append or a compaction); the SQL that makes
    each again."""
    indexes = conn.execute(LOG_INDEXES).fetchall()
    for name, _ in indexes:
        conn.execute(f'DROP INDEX "{name}"')
    return [sql for _, sql in indexes]


def rerank(conn: duckdb.DuckDBPyConnection, touched: str, kept: int) -> None:
    """The top list after a commit that added to the counts of the users ``touched`` selects;
    only the ranks that changed are written."""
    old: list[tuple[int, int]] = conn.execute(
        "SELECT user_id, tx_count FROM top_users ORDER BY rank"
    ).fetchall()
    counts = dict(old)
    counts.update(conn.execute(TOUCHED_COUNTS.format(ids=touched)).fetchall())
    # Sorted by (-count, user): a tuple's own order, no key function per item.
    ranked = [(user, -minus) for minus, user in sorted((-c, u) for u, c in counts.items())]
    del ranked[kept:]
    changed = [n for n, (new, was) in enumerate(zip(ranked, old, strict=False)) if new != was]
    if len(ranked) != len(old):  # the ranks past the shorter list changed too
        changed += [min(len(ranked), len(old)), max(len(ranked), len(old)) - 1]
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
        append_arrow(conn, "top_users", ranks)


def _rows_waiting(conn: duckdb.DuckDBPyConnection) -> int:
    """Rows appended to the log since its last compaction."""
    return int(one_row(conn, "SELECT count(*) FROM user_totals_log WHERE file_id > 0")[0])


def _user_ids_sql(
    conn: duckdb.DuckDBPyConnection, users: list[int], relations: contextlib.ExitStack
) -> str:
    """SQL selecting ``users``: a few as constants, more as the Arrow relation ``user_ids``
    (registered until ``relations`` closes)."""
    if len(users) <= INDEX_LOOKUP_MAX:
        return int_constants(users)
    relations.enter_context(registered(conn, "user_ids", _user_ids(users)))
    return USER_IDS


def _user_ids(users: list[int]) -> pa.Table:
    """The relation ``user_ids`` (USER_IDS): an Arrow column, read faster than a list passed as
    a parameter (each item converted) or written in as constants."""
    return pa.table({"user_id": pa.array(users, type=pa.int64())})


def recompute(conn: duckdb.DuckDBPyConnection, top_users_kept: int = 1000) -> None:
    """Rebuild every aggregate from the base tables, in one transaction."""
    with transaction(conn):
        for table, query in RECOMPUTED.items():
            # user_totals is a view over its log: the log gets one row per user again.
            target, extra = _RECOMPUTE_TARGETS.get(table, (table, ""))
            conn.execute(f"DELETE FROM {target}")
            params = {"kept": top_users_kept} if "$kept" in query else {}
            conn.execute(f"INSERT INTO {target} SELECT *{extra} FROM ({query})", params)


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
            maintained = MAINTAINED.get(table, f"SELECT * FROM {table}")
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
