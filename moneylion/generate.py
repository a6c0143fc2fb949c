"""Deterministic synthetic users.csv and transactions.csv shaped like the seed's.

Rows are computed by DuckDB from ``hash(row, seed)`` and written with COPY, so 10M rows take
seconds, not minutes, and the same arguments give the same bytes. With ``bad_rate`` > 0 about
that share of transaction rows is bad, cycling through every row-level reason code.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

USERS_HEADER = "user_id,signup_date,country"
TRANSACTIONS_HEADER = "transaction_id,user_id,transaction_date,amount,transaction_type"
COUNTRIES = ("Canada", "Japan", "France", "India", "UK", "Germany", "Australia", "USA")
FIRST_TRANSACTION_ID = 1001  # as in the seed

# The seed's shape: dates through 2022, amounts 10.00-4999.99, three types in equal parts.
_DAY = "DATE '2022-01-01' + CAST(hash(i, $seed, 'day') % 365 AS INTEGER)"
_CENTS = "1000 + CAST(hash(i, $seed, 'amount') % 499000 AS BIGINT)"
_AMOUNT = (
    f"CAST(({_CENTS}) // 100 AS VARCHAR) || '.' || lpad(CAST(({_CENTS}) % 100 AS VARCHAR), 2, '0')"
)
_TYPE = "['deposit', 'withdrawal', 'purchase'][CAST(hash(i, $seed, 'type') % 3 AS INTEGER) + 1]"
# About one transaction in a thousand belongs to a user the users file does not have.
_USER = (
    "CASE WHEN hash(i, $seed, 'orphan') % 1000 = 0 THEN $users + 1 + CAST(i % 100 AS BIGINT) "
    "ELSE 1 + CAST(hash(i, $seed, 'user') % $users AS BIGINT) END"
)

# Bad rows, one variant per reason, chosen by the row's number: {id}, {user}, {day}, {amount},
# {type} are the good row's fields.
BAD_VARIANTS = (
    ("missing_field", "{id} || ',' || {user} || ',' || {day} || ',,' || {type}"),
    ("bad_integer", "{id} || '.0,' || {user} || ',' || {day} || ',' || {amount} || ',' || {type}"),
    ("non_positive_id", "{id} || ',0,' || {day} || ',' || {amount} || ',' || {type}"),
    ("bad_date", "{id} || ',' || {user} || ',2022-02-30,' || {amount} || ',' || {type}"),
    ("bad_amount", "{id} || ',' || {user} || ',' || {day} || ',\"1,000\",' || {type}"),
    (
        "non_positive_amount",
        "{id} || ',' || {user} || ',' || {day} || ',-' || {amount} || ',' || {type}",
    ),
    (
        "too_many_decimals",
        "{id} || ',' || {user} || ',' || {day} || ',' || {amount} || '1,' || {type}",
    ),
    ("unknown_type", "{id} || ',' || {user} || ',' || {day} || ',' || {amount} || ',refund'"),
    ("wrong_field_count", "{id} || ',' || {user} || ',' || {day} || ',' || {amount}"),
    # A second copy of the previous row's id with another amount: both copies are rejected.
    ("duplicate_in_file", "{previous_id} || ',' || {user} || ',' || {day} || ',0.01,' || {type}"),
)


def _connect() -> duckdb.DuckDBPyConnection:
    # One thread keeps the output order identical from run to run.
    conn = duckdb.connect(config={"threads": 1, "preserve_insertion_order": True})
    conn.execute("SET enable_progress_bar = false")
    return conn


def write_users(path: Path, users: int, *, seed: int = 0, first_id: int = 1) -> Path:
    """``users`` rows with ids ``first_id`` on."""
    query = f"""
    COPY (
        SELECT CAST(i + $first AS VARCHAR) || ',' ||
               CAST(DATE '2022-01-01' + CAST(hash(i, $seed, 'signup') % 365 AS INTEGER) AS VARCHAR)
               || ',' || {list(COUNTRIES)!r}[CAST(hash(i, $seed, 'country') % 8 AS INTEGER) + 1]
               AS "{USERS_HEADER}"
        FROM range($n) AS r(i)
    ) TO '{_quoted(path)}' (HEADER true, QUOTE '', ESCAPE '', DELIMITER '\t')
    """
    with _connect() as conn:
        conn.execute(query, {"n": users, "seed": seed, "first": first_id})
    return path


def write_transactions(
    path: Path,
    transactions: int,
    *,
    users: int,
    seed: int = 0,
    first_id: int = FIRST_TRANSACTION_ID,
    bad_rate: float = 0.0,
) -> Path:
    """``transactions`` rows with ids ``first_id`` on, for users 1..``users`` (and a few orphans).

    With ``bad_rate`` > 0, about that share of rows is replaced by a bad variant; consecutive bad
    rows take the reasons of BAD_VARIANTS in turn.
    """
    fields = {
        "id": "CAST(i + $first AS VARCHAR)",
        "user": f"CAST({_USER} AS VARCHAR)",
        "day": f"CAST({_DAY} AS VARCHAR)",
        "amount": _AMOUNT,
        "type": _TYPE,
    }
    good = " || ',' || ".join(fields.values())
    previous_id = "CAST(i + $first - 1 AS VARCHAR)"
    bad_cases = " ".join(
        f"WHEN {n} THEN {template.format(previous_id=previous_id, **fields)}"
        for n, (_, template) in enumerate(BAD_VARIANTS)
    )
    threshold = round(max(0.0, min(bad_rate, 1.0)) * 1_000_000)
    query = f"""
    COPY (
        SELECT CASE WHEN i > 0 AND hash(i, $seed, 'bad') % 1000000 < $threshold
                    THEN CASE CAST(i % {len(BAD_VARIANTS)} AS INTEGER) {bad_cases} END
                    ELSE {good} END AS "{TRANSACTIONS_HEADER}"
        FROM range($n) AS r(i)
    ) TO '{_quoted(path)}' (HEADER true, QUOTE '', ESCAPE '', DELIMITER '\t')
    """
    with _connect() as conn:
        conn.execute(
            query,
            {
                "n": transactions,
                "seed": seed,
                "first": first_id,
                "users": max(users, 1),
                "threshold": threshold,
            },
        )
    return path


def generate(
    out_dir: Path, *, users: int, transactions: int, bad_rate: float = 0.0, seed: int = 0
) -> list[Path]:
    """Write ``out_dir/users.csv`` and ``out_dir/transactions.csv``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        write_users(out_dir / "users.csv", users, seed=seed),
        write_transactions(
            out_dir / "transactions.csv",
            transactions,
            users=users,
            seed=seed,
            bad_rate=bad_rate,
        ),
    ]


def _quoted(path: Path) -> str:
    """A path as the body of a SQL string literal (COPY TO takes no bound parameter)."""
    return str(path).replace("'", "''")
