"""Deterministic synthetic users.csv and transactions.csv shaped like the seed's.

Rows are computed by DuckDB from ``hash(row, seed)`` and written with COPY, so 10M rows take
about 10 s, not minutes, and the same arguments give the same bytes. With ``bad_rate`` > 0, one
row in every ``round(1 / bad_rate)`` of each file is special: a bad row (the row-level reasons of
DESIGN.md that the file's kind can have, in turn) or an identical copy of the row before it.
``expected_users_outcome`` / ``expected_transactions_outcome`` say what ingesting such a file
into a warehouse without those ids must report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import duckdb

from moneylion.model import TRANSACTION_TYPES

USERS_HEADER = "user_id,signup_date,country"
TRANSACTIONS_HEADER = "transaction_id,user_id,transaction_date,amount,transaction_type"
COUNTRIES = ("Canada", "Japan", "France", "India", "UK", "Germany", "Australia", "USA")
FIRST_TRANSACTION_ID = 1001  # as in the seed
ORPHANS_PER_MILLE = 1  # transactions whose user is above the users file's ids
FORMAT_VERSION = 3  # bump when the bytes for given arguments change (bench caches key on it)

# The seed's shape: dates 2022-01-01..2023-01-01, amounts 10.00-4999.99 written as Python floats
# print them ("3982.0", "1444.7", "788.95"), three types in about equal parts.
_DAYS = 366
_USER_EXPR = (
    "CASE WHEN hash({j}, $seed, 'orphan') % 1000 < " + str(ORPHANS_PER_MILLE) + " "
    "THEN $users + 1 + CAST({j} % 100 AS BIGINT) "
    "ELSE 1 + CAST(hash({j}, $seed, 'user') % $users AS BIGINT) END"
)
_CENTS_EXPR = "(1000 + CAST(hash({j}, $seed, 'amount') % 499000 AS BIGINT))"
_TYPE_EXPR = (
    f"{list(TRANSACTION_TYPES)!r}[CAST(hash({{j}}, $seed, 'type') % {len(TRANSACTION_TYPES)}"
    " AS INTEGER) + 1]"
)


def _user_fields(j: str) -> dict[str, str]:
    """SQL for the text of each field of the good users row number ``j`` (an SQL expression)."""
    day = f"DATE '2022-01-01' + CAST(hash({j}, $seed, 'signup') % {_DAYS} AS INTEGER)"
    country = f"CAST(hash({j}, $seed, 'country') % {len(COUNTRIES)} AS INTEGER) + 1"
    return {
        "id": f"CAST({j} + $first AS VARCHAR)",
        "day": f"CAST({day} AS VARCHAR)",
        "country": f"{list(COUNTRIES)!r}[{country}]",
    }


def _transaction_fields(j: str) -> dict[str, str]:
    """SQL for the text of each field of the good row number ``j`` (an SQL expression)."""
    cents = _CENTS_EXPR.format(j=j)
    # As a float prints: two decimals, or one when the last is 0 ("12.30" -> "12.3", "12.0").
    amount = (
        f"CAST({cents} // 100 AS VARCHAR) || '.' || CASE WHEN {cents} % 10 = 0 "
        f"THEN CAST({cents} % 100 // 10 AS VARCHAR) "
        f"ELSE lpad(CAST({cents} % 100 AS VARCHAR), 2, '0') END"
    )
    return {
        "id": f"CAST({j} + $first AS VARCHAR)",
        "user": f"CAST({_USER_EXPR.format(j=j)} AS VARCHAR)",
        "day": f"CAST(DATE '2022-01-01' + CAST(hash({j}, $seed, 'day') % {_DAYS} AS INTEGER) "
        "AS VARCHAR)",
        "amount": amount,
        "type": _TYPE_EXPR.format(j=j),
    }


# Special rows, by turns: {id}, {user}, {day}, {amount}, {type} are the good row's fields, {p_*}
# those of the row before (which is always a good row).
SpecialRows = tuple[tuple[str, str], ...]
SPECIAL_ROWS: SpecialRows = (
    ("missing_field", "{id} || ',' || {user} || ',' || {day} || ',,' || {type}"),
    ("bad_integer", "{id} || '.0,' || {user} || ',' || {day} || ',' || {amount} || ',' || {type}"),
    ("non_positive_id", "{id} || ',0,' || {day} || ',' || {amount} || ',' || {type}"),
    ("bad_date", "{id} || ',' || {user} || ',2022-02-30,' || {amount} || ',' || {type}"),
    # The last date there is: later than any real arrival day plus max_future_days.
    ("future_date", "{id} || ',' || {user} || ',9999-12-31,' || {amount} || ',' || {type}"),
    ("bad_amount", "{id} || ',' || {user} || ',' || {day} || ',\"1,000\",' || {type}"),
    (
        "non_positive_amount",
        "{id} || ',' || {user} || ',' || {day} || ',-' || {amount} || ',' || {type}",
    ),
    (
        "too_many_decimals",
        "{id} || ',' || {user} || ',' || {day} || ',' || {amount} || '01,' || {type}",
    ),
    ("unknown_type", "{id} || ',' || {user} || ',' || {day} || ',' || {amount} || ',refund'"),
    ("wrong_field_count", "{id} || ',' || {user} || ',' || {day} || ',' || {amount}"),
    # The previous row's id with another amount (real ones are >= 10.00): both copies are rejected.
    (
        "duplicate_in_file",
        "{p_id} || ',' || {p_user} || ',' || {p_day} || ',0.01,' || {p_type}",
    ),
    # The previous row again, byte for byte: it loads once and the copy counts as a duplicate.
    (
        "identical_copy",
        "{p_id} || ',' || {p_user} || ',' || {p_day} || ',' || {p_amount} || ',' || {p_type}",
    ),
)
USER_SPECIAL_ROWS: SpecialRows = (
    ("missing_field", "{id} || ',' || {day} || ','"),
    ("bad_integer", "{id} || 'abc,' || {day} || ',' || {country}"),
    ("non_positive_id", "'-' || {id} || ',' || {day} || ',' || {country}"),
    ("bad_date", "{id} || ',2022-13-01,' || {country}"),
    ("wrong_field_count", "{id} || ',' || {day} || ',' || {country} || ',extra'"),
    # The previous user again with another country: both copies are rejected.
    ("duplicate_in_file", "{p_id} || ',' || {p_day} || ',Atlantis'"),
    ("identical_copy", "{p_id} || ',' || {p_day} || ',' || {p_country}"),
)
BAD_VARIANTS = tuple(row for row in SPECIAL_ROWS if row[0] != "identical_copy")
"""The (reason, template) pairs that make a row-level reject: every reason but
``conflicts_with_stored``, which needs a warehouse, not a file."""


@dataclass(frozen=True)
class ExpectedOutcome:
    """What ingesting a generated transactions file into a warehouse without its ids reports."""

    rows_total: int
    rows_loaded: int
    rows_duplicate: int
    rejected_by_reason: Mapping[str, int]

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected_by_reason.values())


def special_row_period(bad_rate: float) -> int | None:
    """One row in this many is special (None: no special rows). Never two in a row, so the row
    before a special one is always good; rates above 0.5 act as 0.5."""
    if bad_rate <= 0:
        return None
    return max(2, round(1 / min(bad_rate, 1.0)))


def _expected(rows: int, bad_rate: float, specials_table: SpecialRows) -> ExpectedOutcome:
    period = special_row_period(bad_rate)
    specials = rows // period if period else 0
    per_kind = {
        name: specials // len(specials_table) + (1 if n < specials % len(specials_table) else 0)
        for n, (name, _) in enumerate(specials_table)
    }
    copies = per_kind.pop("identical_copy")
    # A conflicting copy rejects the row it copies too.
    rejected = {
        name: count * (2 if name == "duplicate_in_file" else 1)
        for name, count in per_kind.items()
        if count
    }
    return ExpectedOutcome(
        rows_total=rows,
        rows_loaded=rows - copies - sum(rejected.values()),
        rows_duplicate=copies,
        rejected_by_reason=rejected,
    )


def expected_transactions_outcome(transactions: int, bad_rate: float = 0.0) -> ExpectedOutcome:
    """The counts ``write_transactions(path, transactions, bad_rate=bad_rate)`` implies."""
    return _expected(transactions, bad_rate, SPECIAL_ROWS)


def expected_users_outcome(users: int, bad_rate: float = 0.0) -> ExpectedOutcome:
    """The counts ``write_users(path, users, bad_rate=bad_rate)`` implies (into a warehouse
    without those users; a stored user is updated, not counted as a duplicate)."""
    return _expected(users, bad_rate, USER_SPECIAL_ROWS)


def _connect() -> duckdb.DuckDBPyConnection:
    # One thread keeps the output order identical from run to run.
    conn = duckdb.connect(config={"threads": 1, "preserve_insertion_order": True})
    conn.execute("SET enable_progress_bar = false")
    return conn


def _copy_lines(
    select_line: str,
    header: str,
    path: Path,
    params: dict[str, object],
    source: str = "range($n) AS r(i)",
) -> None:
    """COPY one pre-joined text column per row of ``source``, unquoted, header first."""
    # A tab delimiter and no quoting: the column's text (commas and quotes included) is the line.
    query = f"""
    COPY (SELECT {select_line} AS "{header}" FROM {source})
    TO '{_quoted(path)}' (HEADER true, QUOTE '', ESCAPE '', DELIMITER '\t')
    """
    with _connect() as conn:
        conn.execute(query, params)


def _special_lines(
    fields: Callable[[str], dict[str, str]], bad_rate: float, table: SpecialRows
) -> tuple[str, str]:
    """(inner columns, line expression) for rows whose good fields are ``fields(row)``."""
    # The row's fields are columns of an inner query, computed once; the previous row's only
    # inside the special rows' branch (that keeps 10M rows with bad ones near the clean speed).
    inner = ", ".join(f"{expr} AS f_{name}" for name, expr in fields("i").items())
    current = {name: f"f_{name}" for name in fields("i")}
    previous = {f"p_{name}": expr for name, expr in fields("(i - 1)").items()}
    good = " || ',' || ".join(current.values())
    period = special_row_period(bad_rate)
    if period is None:
        return inner, good
    cases = " ".join(
        f"WHEN {n} THEN {template.format(**current, **previous)}"
        for n, (_, template) in enumerate(table)
    )
    line = (
        f"CASE WHEN i % {period} = {period - 1} "
        f"THEN CASE CAST(i // {period} % {len(table)} AS INTEGER) {cases} END "
        f"ELSE {good} END"
    )
    return inner, line


def write_users(
    path: Path, users: int, *, seed: int = 0, first_id: int = 1, bad_rate: float = 0.0
) -> Path:
    """``users`` rows with ids ``first_id`` on; with ``bad_rate`` > 0, special rows of
    USER_SPECIAL_ROWS in turn (see ``expected_users_outcome``)."""
    inner, line = _special_lines(_user_fields, bad_rate, USER_SPECIAL_ROWS)
    params: dict[str, object] = {"n": users, "seed": seed, "first": first_id}
    source = f"(SELECT i, {inner} FROM range($n) AS r(i))"
    _copy_lines(line, USERS_HEADER, path, params, source=source)
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
    """``transactions`` rows with ids ``first_id`` on, for users 1..``users`` (and about one in a
    thousand orphans, users ``users``+1 to ``users``+100).

    With ``bad_rate`` > 0, row i is special when ``i % period == period - 1``; the special rows
    take the kinds of SPECIAL_ROWS in turn (see ``expected_transactions_outcome``).
    """
    inner, line = _special_lines(_transaction_fields, bad_rate, SPECIAL_ROWS)
    params: dict[str, object] = {
        "n": transactions,
        "seed": seed,
        "first": first_id,
        "users": max(users, 1),
    }
    _copy_lines(
        line,
        TRANSACTIONS_HEADER,
        path,
        params,
        source=f"(SELECT i, {inner} FROM range($n) AS r(i))",
    )
    return path


def generate(
    out_dir: Path, *, users: int, transactions: int, bad_rate: float = 0.0, seed: int = 0
) -> list[Path]:
    """Write ``out_dir/users.csv`` and ``out_dir/transactions.csv``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        write_users(out_dir / "users.csv", users, seed=seed, bad_rate=bad_rate),
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
