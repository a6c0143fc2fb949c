"""The read queries behind the API: one function per question, each on a caller's cursor.

Every function takes a fresh read cursor (``db.cursor()``); DuckDB gives each statement a
committed snapshot, and the functions that need two statements run them in one read
transaction so they cannot straddle a file's commit. Parameters are always bound.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import duckdb

from moneylion.db import int_constants
from moneylion.ledger import LEDGER_COLUMNS
from moneylion.model import TRANSACTION_TYPES, USER_TOTALS


@contextmanager
def snapshot(cursor: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """Run several statements against one committed snapshot."""
    cursor.execute("BEGIN TRANSACTION")
    try:
        yield cursor
    finally:
        cursor.execute("ROLLBACK")  # read-only: nothing to commit


@dataclass(frozen=True)
class UserSummary:
    """A user's totals; ``known`` says whether the user is in ``users`` (else an orphan)."""

    user_id: int
    known: bool
    country: str | None
    signup_date: dt.date | None
    tx_count: int
    total_amount: Decimal
    total_deposit: Decimal
    total_withdrawal: Decimal
    total_purchase: Decimal
    first_date: dt.date | None
    last_date: dt.date | None


_ZERO = Decimal("0.00")

# Two point lookups in one statement (one snapshot, and a DuckDB statement has a fixed cost
# whatever it does); a join would scan the larger table.
# USER_TOTALS' measures, in order: what ``summary_of`` takes as a user's totals.
TOTALS_COLUMNS = ", ".join(measure.name for measure in USER_TOTALS.measures)
_USER_SUMMARY = f"""
SELECT true, country, signup_date, {", ".join(["NULL"] * len(USER_TOTALS.measures))}
FROM users WHERE user_id = $id
UNION ALL
SELECT false, NULL, NULL, {TOTALS_COLUMNS}
FROM user_totals WHERE user_id = $id
"""


def user_summary(cursor: duckdb.DuckDBPyConnection, user_id: int) -> UserSummary | None:
    """The user's totals (zeros if no transactions), or None if neither a user nor any totals."""
    rows = cursor.execute(_USER_SUMMARY, {"id": user_id}).fetchall()
    user = next((row[1:3] for row in rows if row[0]), None)
    totals = next((row[3:] for row in rows if not row[0]), None)
    return summary_of(user_id, user, totals)


def summary_of(
    user_id: int, user: Sequence[Any] | None, totals: Sequence[Any] | None
) -> UserSummary | None:
    """A summary from the user's (country, signup_date) and totals (count, amount, deposit,
    withdrawal, purchase, first date, last date) rows, either missing; None if both are."""
    if user is None and totals is None:
        return None
    country, signup_date = (user[0], user[1]) if user is not None else (None, None)
    if totals is None:
        return UserSummary(
            user_id, True, country, signup_date, 0, _ZERO, _ZERO, _ZERO, _ZERO, None, None
        )
    count, amount, deposit, withdrawal, purchase, first, last = totals
    return UserSummary(
        user_id,
        user is not None,
        country,
        signup_date,
        int(count),
        amount,
        deposit,
        withdrawal,
        purchase,
        first,
        last,
    )


@dataclass(frozen=True)
class TopUser:
    rank: int
    user_id: int
    country: str | None
    tx_count: int
    known: bool


_TOP = "SELECT rank, user_id, tx_count FROM top_users ORDER BY rank"
_COUNTRIES = "SELECT user_id, country FROM users WHERE user_id IN (SELECT unnest($ids))"


def ranked_users(cursor: duckdb.DuckDBPyConnection) -> list[TopUser]:
    """Every kept top user (Config.top_users_kept), best first, with countries, one snapshot."""
    with snapshot(cursor):
        rows = cursor.execute(_TOP).fetchall()
        ids = [row[1] for row in rows]
        countries: dict[int, str] = (
            dict(cursor.execute(_COUNTRIES, {"ids": ids}).fetchall()) if ids else {}
        )
    return [
        TopUser(int(rank), user_id, countries.get(user_id), int(count), user_id in countries)
        for rank, user_id, count in rows
    ]


def top_of(ranked: list[TopUser], limit: int, *, known_only: bool = False) -> list[TopUser]:
    """The first ``limit`` of ``ranked``; ``known_only`` leaves out orphans and renumbers ranks
    (the seed listed only users with a profile)."""
    if not known_only:
        return ranked[:limit]
    known = [user for user in ranked if user.known][:limit]
    return [
        TopUser(index + 1, u.user_id, u.country, u.tx_count, True) for index, u in enumerate(known)
    ]


@dataclass(frozen=True)
class DailyTotal:
    transaction_date: dt.date
    transaction_type: str
    tx_count: int
    total_amount: Decimal


# ENUM columns sort by declaration order; the seed ordered by the type's text.
_DAILY = """
SELECT transaction_date, transaction_type::VARCHAR AS type, tx_count, total_amount
FROM daily_totals
WHERE transaction_date BETWEEN $from AND $to
  AND ($type IS NULL OR transaction_type::VARCHAR = $type)
ORDER BY transaction_date, type
LIMIT $limit OFFSET $offset
"""


@dataclass(frozen=True)
class Span:
    """Days (or months, by their first days) from ``first`` to ``last``, inclusive; empty when
    ``first`` is after ``last``."""

    first: dt.date
    last: dt.date

    def bounds(self) -> dict[str, dt.date]:
        return {"from": self.first, "to": self.last}


def daily_totals(
    cursor: duckdb.DuckDBPyConnection,
    days: Span,
    transaction_type: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[DailyTotal]:
    """Per-day, per-type totals of ``days``, ordered by date then type; at most ``limit`` rows
    (None: all) after the first ``offset``."""
    bound = {**days.bounds(), "type": transaction_type, "limit": limit, "offset": offset}
    rows = cursor.execute(_DAILY, bound).fetchall()
    return [DailyTotal(day, kind, int(count), total) for day, kind, count, total in rows]


@dataclass(frozen=True)
class CountryMonth:
    """One month and country (None: orphans): count and total per type."""

    month: dt.date  # its first day
    country: str | None
    tx_count: dict[str, int]
    total_amount: dict[str, Decimal]


# Rows a count fell to zero in are kept for the export (tombstones): never shown. A page is
# ``$limit`` (month, country) pairs, each with its rows of every type (one statement: one
# snapshot).
_COUNTRY_MONTHLY = """
WITH shown AS (
    SELECT month, country, transaction_type, tx_count, total_amount
    FROM country_monthly_totals
    WHERE month BETWEEN $from AND $to AND tx_count > 0
      AND ($country IS NULL OR country = $country)
), page AS (
    SELECT DISTINCT month, country FROM shown
    ORDER BY month, country NULLS LAST LIMIT $limit OFFSET $offset
)
SELECT s.month, s.country, s.transaction_type::VARCHAR, s.tx_count, s.total_amount
FROM shown s JOIN page p ON s.month = p.month AND s.country IS NOT DISTINCT FROM p.country
ORDER BY s.month, s.country NULLS LAST
"""


def country_monthly(
    cursor: duckdb.DuckDBPyConnection,
    months: Span,
    country: str | None = None,
    limit: int | None = None,
    offset: int = 0,
) -> list[CountryMonth]:
    """Per month of ``months`` (first days) and country, ordered by month then country
    (orphans last): count and total per type, zeros for a type without transactions; at most
    ``limit`` (month, country) pairs (None: all) after the first ``offset``."""
    bound = {**months.bounds(), "country": country, "limit": limit, "offset": offset}
    rows = cursor.execute(_COUNTRY_MONTHLY, bound).fetchall()
    found: dict[tuple[dt.date, str | None], CountryMonth] = {}
    for month, where, kind, count, total in rows:
        entry = found.get((month, where))
        if entry is None:
            entry = found[(month, where)] = CountryMonth(
                month,
                where,
                dict.fromkeys(TRANSACTION_TYPES, 0),
                dict.fromkeys(TRANSACTION_TYPES, _ZERO),
            )
        entry.tx_count[kind] = int(count)
        entry.total_amount[kind] = total
    return list(found.values())


# A ledger row, and which file it continues (tail.py: a part has a row in file_parts).
_FILE_COLUMNS = ", ".join(f"f.{name}" for name in LEDGER_COLUMNS)
_FILE_NAMES = (*LEDGER_COLUMNS, "part_of", "part")
_FILE_ROWS = f"""SELECT {_FILE_COLUMNS}, p.first_file_id, coalesce(p.part, 1)
FROM files f LEFT JOIN file_parts p USING (file_id)"""
_FILES_PAGE = f"{_FILE_ROWS} ORDER BY f.file_id LIMIT $limit OFFSET $offset"
_LATEST_FILES = f"{_FILE_ROWS} ORDER BY f.file_id DESC LIMIT $limit"
_FILES_COUNT = "SELECT count(*) FROM files"
_FILE_BY_SHA256 = "SELECT file_id FROM files WHERE sha256 = $sha256"
_FILE = f"{_FILE_ROWS} WHERE f.file_id = $id"
# The parts of a file after its first, by the first's id; their ledger rows by id (constants:
# the primary key's index).
_LATER_PARTS = """SELECT file_id, part, offset_start, offset_end FROM file_parts
WHERE first_file_id = $first ORDER BY part"""
_PART_ROWS = """SELECT file_id, status, rows_loaded, rows_duplicate, rows_rejected, size_bytes,
finished_at FROM files WHERE file_id IN ({ids})"""
_FILE_REJECT_REASONS = """
SELECT reason, count(*) FROM rejects WHERE file_id = $id GROUP BY reason ORDER BY reason
"""


def files_page(
    cursor: duckdb.DuckDBPyConnection, limit: int, offset: int
) -> tuple[int, list[dict[str, Any]]]:
    """(total files, one page of ledger rows in file_id order)."""
    with snapshot(cursor):
        total = _count(cursor.execute(_FILES_COUNT).fetchone())
        rows = cursor.execute(_FILES_PAGE, {"limit": limit, "offset": offset}).fetchall()
    return total, [dict(zip(_FILE_NAMES, row, strict=True)) for row in rows]


def latest_files(cursor: duckdb.DuckDBPyConnection, limit: int) -> list[dict[str, Any]]:
    """The newest ``limit`` ledger rows, newest first."""
    rows = cursor.execute(_LATEST_FILES, {"limit": limit}).fetchall()
    return [dict(zip(_FILE_NAMES, row, strict=True)) for row in rows]


def file_id_of(cursor: duckdb.DuckDBPyConnection, sha256: str) -> int | None:
    """The ledger's file id for these bytes (their sha256, lower-case hex), or None."""
    row = cursor.execute(_FILE_BY_SHA256, {"sha256": sha256}).fetchone()
    return None if row is None else int(row[0])


def file_detail(
    cursor: duckdb.DuckDBPyConnection, file_id: int
) -> tuple[dict[str, Any], dict[str, int]] | None:
    """(ledger row, rejected rows per reason) for one file, or None."""
    with snapshot(cursor):
        row = cursor.execute(_FILE, {"id": file_id}).fetchone()
        if row is None:
            return None
        reasons = cursor.execute(_FILE_REJECT_REASONS, {"id": file_id}).fetchall()
        detail = dict(zip(_FILE_NAMES, row, strict=True))
        detail["parts"] = _parts(cursor, detail["part_of"] or file_id)
    detail["bytes_loaded"] = detail["parts"][-1]["offset_end"]
    return detail, {r: int(n) for r, n in reasons}


def _parts(cursor: duckdb.DuckDBPyConnection, first: int) -> list[dict[str, Any]]:
    """Every part of the file whose first ledger row is ``first``, in order, with its bytes."""
    later = cursor.execute(_LATER_PARTS, {"first": first}).fetchall()
    places = {first: (1, 0, None)} | {i: (n, start, end) for i, n, start, end in later}
    rows = cursor.execute(_PART_ROWS.format(ids=int_constants(places))).fetchall()
    parts = []
    for file_id, status, loaded, duplicate, rejected, size, finished_at in rows:
        number, start, end = places[file_id]
        parts.append(
            {
                "file_id": file_id,
                "part": number,
                "offset_start": start,
                "offset_end": size if end is None else end,
                "status": status,
                "rows_loaded": loaded,
                "rows_duplicate": duplicate,
                "rows_rejected": rejected,
                "finished_at": finished_at,
            }
        )
    return sorted(parts, key=lambda part: part["part"])


@dataclass(frozen=True)
class RejectRow:
    line_number: int
    reason: str
    message: str
    raw_line: str | None  # at most Config.reject_line_bytes bytes of the line
    raw_line_bytes: int | None  # the whole line's (None: line_too_long, not measured)
    raw_line_truncated: bool  # raw_line is the start of the line, not all of it


_FILE_EXISTS = "SELECT count(*) FROM files WHERE file_id = $id"
_REJECTS_COUNT = "SELECT count(*) FROM rejects WHERE file_id = $id"
# A page of rejects ends early after the row whose message and raw line take it past this many
# bytes (it always holds one row): the answer stays small whatever the page size and however
# long the lines kept (Config.reject_line_bytes). Pages go on from offset + rows shown.
REJECTS_PAGE_BYTES = 1024 * 1024
_REJECT_SIZE = "strlen(message) + coalesce(strlen(raw_line), 0)"
_REJECTS_PAGE = f"""
SELECT line_number, reason, message, raw_line, raw_line_bytes, raw_line_truncated FROM (
    SELECT *, sum({_REJECT_SIZE}) OVER (ORDER BY line_number, reason ROWS UNBOUNDED PRECEDING)
              - {_REJECT_SIZE} AS before
    FROM (SELECT * FROM rejects WHERE file_id = $id
          ORDER BY line_number, reason LIMIT $limit OFFSET $offset)
) WHERE before < $max_bytes ORDER BY line_number, reason
"""


def rejects_page(
    cursor: duckdb.DuckDBPyConnection,
    file_id: int,
    limit: int,
    offset: int,
    max_bytes: int = REJECTS_PAGE_BYTES,
) -> tuple[int, list[RejectRow]] | None:
    """(total rejects of the file, one page in line order: at most ``limit`` rows, fewer when
    their bytes pass ``max_bytes``), or None if the file is unknown."""
    with snapshot(cursor):
        if not _count(cursor.execute(_FILE_EXISTS, {"id": file_id}).fetchone()):
            return None
        total = _count(cursor.execute(_REJECTS_COUNT, {"id": file_id}).fetchone())
        bound = {"id": file_id, "limit": limit, "offset": offset, "max_bytes": max_bytes}
        rows = cursor.execute(_REJECTS_PAGE, bound).fetchall()
    return total, [
        RejectRow(int(line), reason, message, raw, None if size is None else int(size), cut)
        for line, reason, message, raw, size, cut in rows
    ]


FAILED_BY_REASON = """
SELECT coalesce(error_reason, 'unknown'), count(*) FROM files
WHERE status = 'failed' GROUP BY ALL ORDER BY 1
"""
REJECTS_BY_REASON = "SELECT reason, count(*) FROM rejects GROUP BY reason ORDER BY reason"


def failed_files_by_reason(cursor: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
    """(reason, files) of the files refused whole, by reason."""
    return [(r, int(n)) for r, n in cursor.execute(FAILED_BY_REASON).fetchall()]


def rejects_by_reason(cursor: duckdb.DuckDBPyConnection) -> list[tuple[str, int]]:
    """(reason, rows) of the rejected rows of every file, by reason."""
    return [(r, int(n)) for r, n in cursor.execute(REJECTS_BY_REASON).fetchall()]


_DAILY_RANGE = "SELECT min(transaction_date), max(transaction_date) FROM daily_totals"


def daily_range(cursor: duckdb.DuckDBPyConnection) -> tuple[dt.date, dt.date] | None:
    """(first, last) day with any transaction, None when there is none."""
    row = cursor.execute(_DAILY_RANGE).fetchone()
    if row is None or row[0] is None:
        return None
    return row[0], row[1]


def _count(row: tuple[Any, ...] | None) -> int:
    return int(row[0]) if row is not None else 0
