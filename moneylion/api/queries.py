"""The read queries behind the API: one function per question, each on a caller's cursor.

Every function takes a fresh read cursor (``db.cursor()``); DuckDB gives each statement a
committed snapshot, and the functions that need two statements run them in one read
transaction so they cannot straddle a file's commit. Parameters are always bound.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import duckdb

TRANSACTION_TYPES = ("deposit", "withdrawal", "purchase")


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

# Two point lookups by primary key; a join here would scan the larger table.
_USER = "SELECT country, signup_date FROM users WHERE user_id = $id"
_USER_TOTALS = """
SELECT tx_count, total_amount, total_deposit, total_withdrawal, total_purchase,
       first_date, last_date
FROM user_totals WHERE user_id = $id
"""


def user_summary(cursor: duckdb.DuckDBPyConnection, user_id: int) -> UserSummary | None:
    """The user's totals (zeros if no transactions), or None if neither a user nor any totals."""
    with snapshot(cursor):
        user = cursor.execute(_USER, {"id": user_id}).fetchone()
        totals = cursor.execute(_USER_TOTALS, {"id": user_id}).fetchone()
    if user is None and totals is None:
        return None
    country, signup_date = user if user is not None else (None, None)
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


_LAST_FILE_ID = "SELECT coalesce(max(file_id), 0) FROM files"
_TOP = "SELECT rank, user_id, tx_count FROM top_users ORDER BY rank"
_COUNTRIES = "SELECT user_id, country FROM users WHERE user_id IN (SELECT unnest($ids))"


class TopUsersCache:
    """The ranked top_users list with countries, recomputed only after a file commits.

    A file's rows, aggregate deltas and ledger row commit together, so the newest ledger
    file_id names the committed state: while it is unchanged, so are top_users and the users
    in it. Looking the countries up costs a few ms on a large users table; checking the
    file_id costs a fraction of one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = -1
        self._ranked: list[TopUser] = []

    def ranked(self, cursor: duckdb.DuckDBPyConnection) -> list[TopUser]:
        """Every kept top user, best first (read in one snapshot, cached per ledger state)."""
        with snapshot(cursor):
            version = _count(cursor.execute(_LAST_FILE_ID).fetchone())
            with self._lock:
                if version == self._version:
                    return self._ranked
            rows = cursor.execute(_TOP).fetchall()
            ids = [row[1] for row in rows]
            countries: dict[int, str] = (
                dict(cursor.execute(_COUNTRIES, {"ids": ids}).fetchall()) if ids else {}
            )
        ranked = [
            TopUser(int(rank), user_id, countries.get(user_id), int(count), user_id in countries)
            for rank, user_id, count in rows
        ]
        with self._lock:
            if version >= self._version:
                self._version, self._ranked = version, ranked
        return ranked

    def top(
        self, cursor: duckdb.DuckDBPyConnection, limit: int, *, known_only: bool = False
    ) -> list[TopUser]:
        """The ``limit`` users with most transactions (ties: smaller id first).

        ``known_only`` leaves out orphans (users with transactions but no profile), as the
        seed did; ranks are then renumbered 1..n.
        """
        ranked = self.ranked(cursor)
        if not known_only:
            return ranked[:limit]
        known = [user for user in ranked if user.known][:limit]
        return [
            TopUser(index + 1, u.user_id, u.country, u.tx_count, True)
            for index, u in enumerate(known)
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
"""


def daily_totals(
    cursor: duckdb.DuckDBPyConnection,
    date_from: dt.date,
    date_to: dt.date,
    transaction_type: str | None = None,
) -> list[DailyTotal]:
    """Per-day, per-type totals for dates in [date_from, date_to], ordered by date then type."""
    rows = cursor.execute(
        _DAILY, {"from": date_from, "to": date_to, "type": transaction_type}
    ).fetchall()
    return [DailyTotal(day, kind, int(count), total) for day, kind, count, total in rows]


_FILE_COLUMNS = """
file_id, name, sha256, kind, status, rows_total, rows_loaded, rows_duplicate, rows_rejected,
size_bytes, received_at, finished_at, seconds, error_reason, error
"""
_FILE_NAMES = [name.strip() for name in _FILE_COLUMNS.split(",")]
_FILES_PAGE = f"SELECT {_FILE_COLUMNS} FROM files ORDER BY file_id LIMIT $limit OFFSET $offset"
_FILES_COUNT = "SELECT count(*) FROM files"
_FILE = f"SELECT {_FILE_COLUMNS} FROM files WHERE file_id = $id"
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


def file_detail(
    cursor: duckdb.DuckDBPyConnection, file_id: int
) -> tuple[dict[str, Any], dict[str, int]] | None:
    """(ledger row, rejected rows per reason) for one file, or None."""
    with snapshot(cursor):
        row = cursor.execute(_FILE, {"id": file_id}).fetchone()
        if row is None:
            return None
        reasons = cursor.execute(_FILE_REJECT_REASONS, {"id": file_id}).fetchall()
    return dict(zip(_FILE_NAMES, row, strict=True)), {r: int(n) for r, n in reasons}


@dataclass(frozen=True)
class RejectRow:
    line_number: int
    reason: str
    message: str
    raw_line: str | None


_FILE_EXISTS = "SELECT count(*) FROM files WHERE file_id = $id"
_REJECTS_COUNT = "SELECT count(*) FROM rejects WHERE file_id = $id"
_REJECTS_PAGE = """
SELECT line_number, reason, message, raw_line FROM rejects
WHERE file_id = $id ORDER BY line_number, reason LIMIT $limit OFFSET $offset
"""


def rejects_page(
    cursor: duckdb.DuckDBPyConnection, file_id: int, limit: int, offset: int
) -> tuple[int, list[RejectRow]] | None:
    """(total rejects of the file, one page in line order), or None if the file is unknown."""
    with snapshot(cursor):
        if not _count(cursor.execute(_FILE_EXISTS, {"id": file_id}).fetchone()):
            return None
        total = _count(cursor.execute(_REJECTS_COUNT, {"id": file_id}).fetchone())
        rows = cursor.execute(
            _REJECTS_PAGE, {"id": file_id, "limit": limit, "offset": offset}
        ).fetchall()
    return total, [
        RejectRow(int(line), reason, message, raw) for line, reason, message, raw in rows
    ]


def _count(row: tuple[Any, ...] | None) -> int:
    return int(row[0]) if row is not None else 0
