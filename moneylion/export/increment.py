"""``export_new``: what files committed since the last export added, in one SQLite transaction.

Exactly once: an export reads one DuckDB snapshot, bounded by the highest ``file_id`` it sees,
and writes what files ``last_file_id < file_id <= high`` added in ONE SQLite transaction that
also stores ``high`` as ``export_state.last_file_id``. A crash before that COMMIT leaves the old
watermark and none of the rows, so the next export redoes the range; a crash after it leaves
nothing to redo. Readers (WAL) never see half a file and are not blocked. This relies on file
ids committing in increasing order, which holds with the one ingest writer. Transactions are
appended with plain INSERT: a row exported twice fails loudly (the SQLite transaction rolls
back), it can never be counted twice. A SQLite file that is missing, not ours, or of another
warehouse (the sha256 of the last file at or before the watermark differs) is rebuilt in full.

Corrections (``corrections.py``) take their change ids from the files' sequence, so the
watermark is the last change exported, a file or a correction. A range holding retractions,
restores or replacements is a third way (``corrected.py``): the rows of the ids they decided
again and of the new files, the totals those touch and the ledger rows they changed, copied from
DuckDB in the same one transaction. Other corrections, and corrections of many rows, go to a
full rebuild (``full.py``: written aside, renamed over, as crash-safe).

Two ways, by the rows the range loaded:

* **small** (up to ``Tuning.large_increment_rows``, the daemon's usual file): rows are read
  from DuckDB as tuples and bound by Python's sqlite3; the aggregates are not copied but ADDED:
  the new transactions' per-user and per-day sums, in integer cents, summed in Python from the
  rows being copied anyway (a DuckDB statement costs milliseconds however few its rows, and
  copying the touched totals out of DuckDB costs more; docs/performance.md). Users the SQLite
  base has get them in ``user_totals_delta``, folded into the base after
  ``Tuning.compact_delta_users`` users (see schema.py).
* **large**: the bulk writer (ADBC, in C, off the GIL) writes the new rows, and DuckDB's totals
  of the users and days they touched, into a side file; the live file copies them in with a
  few ``INSERT ... SELECT`` statements (C again: sqlite3 releases the GIL while a statement
  runs). Python binding a large file's rows would hold the GIL for seconds, and the API (same
  process) with it.

Between two corrections transactions are immutable and only appended, so adding the sums of
the new rows gives DuckDB's maintained totals; the tests compare every kind of increment with a
full export, which copies.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import duckdb

from moneylion.export import bulk, corrected, writer
from moneylion.export.full import rebuild
from moneylion.export.outcome import ExportResult, log_result, reached
from moneylion.export.schema import (
    ADD_DAILY_TOTALS,
    ADD_USER_DELTAS,
    ADD_USER_TOTALS,
    DELETE_COUNTRY_MONTHLY,
    FOLD_DELTAS,
    INSERT_COUNTRY_MONTHLY,
    RebuildNeeded,
    state,
    watermark,
    write_state,
)
from moneylion.export.snapshot import (
    AS_SQLITE,
    select_as_sqlite,
    snapshot,
)
from moneylion.export.sums import cents_of, compile_summer
from moneylion.ledger import AT, LEDGER_COLUMNS
from moneylion.model import AMOUNT, DAILY_TOTALS, TABLES, USER_TOTALS, FileKind
from moneylion.tuning import DEFAULT, Tuning

log = logging.getLogger(__name__)

ROWS_PER_STATEMENT = 100  # multi-row VALUES: fewer statements, each of fixed cost

_FILE_COLUMNS = ", ".join(LEDGER_COLUMNS)
_ID, _SHA256 = AT["file_id"], AT["sha256"]
# The ledger from the watermark on: the file at it (its sha256 tells whether the SQLite file
# belongs to this warehouse), then the range. Each row also brings the last correction's change
# id (in the same statement: each DuckDB statement has a fixed cost). No ORDER BY: a DuckDB sort
# has a fixed cost even for a few rows, Python sorts them.
_LEDGER_WITH_LAST_CHANGE = (
    f"SELECT {AS_SQLITE['files']}, (SELECT coalesce(max(change_id), 0) FROM corrections) "
    "FROM files WHERE {where}"
)
_LEDGER = _LEDGER_WITH_LAST_CHANGE.format(where="file_id >= $lo")
# A watermark that is a correction's change id: the last file before it is the one checked.
_FILE_BEFORE = _LEDGER_WITH_LAST_CHANGE.format(
    where="file_id = (SELECT max(file_id) FROM files WHERE file_id < $lo)"
)

# Small increments: tuples in the order of the SQLite columns. Users are updated in place by
# later files (latest file wins, file_id follows), so the users the range wrote are exactly
# those whose file_id is in it. The transactions' extra ``cents`` column is summed, not written.
_RANGE = "file_id > $lo AND file_id <= $hi"
_USER_COLUMNS = ", ".join(TABLES[FileKind.USERS].names)
_NEW_USERS = f"{select_as_sqlite('users')} WHERE {_RANGE}"
_TRANSACTION_NAMES = TABLES[FileKind.TRANSACTIONS].names
_TRANSACTION_COLUMNS = ", ".join(_TRANSACTION_NAMES)
_MONEY = [c.name for c in TABLES[FileKind.TRANSACTIONS].columns if c.domain is AMOUNT]
_NEW_TRANSACTIONS = f"""SELECT {AS_SQLITE["transactions"]},
    {", ".join(f"({name} * 100)::BIGINT AS {cents_of(name)}" for name in _MONEY)}
FROM transactions WHERE {_RANGE}"""
# What the new transactions add to the per-user and per-day totals, summed from the rows being
# copied (money in cents).
_USER_SUMS = compile_summer(USER_TOTALS)
_DAILY_SUMS = compile_summer(DAILY_TOTALS)
_TOP_USERS = select_as_sqlite("top_users")  # 1,000 rows, replaced whole
# The country totals the range changed (stamped with the file of the commit that changed them:
# months x countries x types at most, so both ways copy them as tuples).
_CHANGED_COUNTRY_MONTHLY = f"""SELECT {AS_SQLITE["country_monthly_totals"]}
FROM country_monthly_totals WHERE {_RANGE}"""

# Large increments: the side file's tables, filled by the bulk writer (columns by name), then
# copied into the live file's.
_SIDE_USERS = (
    "users",
    f"{select_as_sqlite('users')} WHERE {_RANGE} ORDER BY user_id",
)
_SIDE_TRANSACTIONS = (
    (
        "transactions",
        f"{select_as_sqlite('transactions')} WHERE {_RANGE} ORDER BY transaction_id",
    ),
    (
        "user_totals_base",
        f"""{select_as_sqlite("user_totals")}
        WHERE user_id IN (SELECT user_id FROM transactions WHERE {_RANGE}) ORDER BY user_id""",
    ),
    (
        "daily_totals",
        f"""{select_as_sqlite("daily_totals")}
        WHERE transaction_date IN (SELECT transaction_date FROM transactions WHERE {_RANGE})
        ORDER BY 1, 2""",
    ),
    ("top_users", f"{select_as_sqlite('top_users')} ORDER BY rank"),
)
# Users the side brings that the base lacks (the writer's bitmap learns them after the commit).
_NEW_IN_BASE = """SELECT user_id FROM side.user_totals_base
WHERE user_id NOT IN (SELECT user_id FROM main.user_totals_base)"""
_USERS_FROM_SIDE = "INSERT OR REPLACE INTO main.users SELECT * FROM side.users"
_TRANSACTIONS_FROM_SIDE = (
    # Plain INSERT, never OR REPLACE: exporting a row twice must fail, not count twice.
    "INSERT INTO main.transactions SELECT * FROM side.transactions",
    # DuckDB's totals of the users and days the range touched replace what the file had (a
    # user's base row and its delta), the others stay as they are.
    "DELETE FROM main.user_totals_delta WHERE user_id IN"
    " (SELECT user_id FROM side.user_totals_base)",
    "INSERT OR REPLACE INTO main.user_totals_base SELECT * FROM side.user_totals_base",
    "INSERT OR REPLACE INTO main.daily_totals SELECT * FROM side.daily_totals",
    "DELETE FROM main.top_users",
    "INSERT INTO main.top_users SELECT * FROM side.top_users",
)


def export_new(
    conn: duckdb.DuckDBPyConnection, sqlite_path: Path, *, tuning: Tuning = DEFAULT
) -> ExportResult:
    """Copy what files committed since the last export added, in one SQLite transaction.

    Cheap when nothing is new (a watermark comparison). Rebuilds with a full export when the
    SQLite file is missing or belongs to another warehouse, and after a correction.
    """
    started = time.perf_counter()
    sqlite_path = Path(sqlite_path)
    with writer.LOCK:
        if not sqlite_path.exists():
            return rebuild(conn, sqlite_path, started, tuning)
        try:
            return _export_increment(conn, sqlite_path, started, tuning)
        except RebuildNeeded as reason:
            log.warning(
                "sqlite_export_rebuild",
                extra={"fields": {"sqlite": str(sqlite_path), "reason": str(reason)}},
            )
            return rebuild(conn, sqlite_path, started, tuning)


def _export_increment(
    conn: duckdb.DuckDBPyConnection, sqlite_path: Path, started: float, tuning: Tuning
) -> ExportResult:
    opened = writer.writer(sqlite_path)
    lite = opened.lite
    side: Path | None = None
    try:
        with snapshot(conn) as cur:
            last, ledger, (high, high_sha), corrections = _range(cur, lite, tuning)
            if high == last:
                return ExportResult(
                    sqlite_path, False, 0, 0, 0, last, last, time.perf_counter() - started
                )
            loaded = _rows_loaded(ledger)
            if corrections is None and sum(loaded.values()) > tuning.large_increment_rows:
                side = bulk.side_path(sqlite_path)
                written = _write_side(cur, side, last, high, loaded)
                lite.execute("ATTACH DATABASE ? AS side", (str(side),))  # not in a transaction
            # IMMEDIATE: the write lock, then the watermark again: two exporters can never both
            # export the same range.
            lite.execute("BEGIN IMMEDIATE")
            if watermark(lite) != last:
                raise sqlite3.OperationalError(f"{sqlite_path} was exported to meanwhile")
            reached("sqlite_begun")
            _insert_flat(
                lite,
                "files",
                _FILE_COLUMNS,
                [v for row in ledger for v in row],
                "INSERT OR REPLACE",
            )
            new_users: list[tuple[int]] = []
            if corrections is not None:
                users, transactions = corrected.copy(
                    cur, lite, corrections, last, opened.base_users
                )
            elif side is None:
                users, transactions = _copy_small(
                    cur, lite, last, high, loaded, opened.base_users, tuning
                )
            else:
                users, transactions = written.get("users", 0), written.get("transactions", 0)
                new_users = _copy_side(lite, transactions)
            if corrections is not None or any(loaded.values()):
                _copy_country_monthly(cur, lite, last, high)
            reached("rows_written")
            write_state(lite, high, high_sha)
            reached("before_commit")
            lite.execute("COMMIT")
            reached("committed")
        if side is not None:
            opened.base_users.add_all(new_users)
            lite.execute("DETACH DATABASE side")
    except BaseException:
        writer.drop()  # rolls back whatever is open; the next export reopens
        raise
    finally:
        if side is not None:
            bulk.remove(side)
    result = ExportResult(
        sqlite_path, False, len(ledger), users, transactions, last, high,
        time.perf_counter() - started,
    )  # fmt: skip
    opened.after_commit(tuning.checkpoint_every_changes)
    log_result(result)
    _compact_user_totals(opened, tuning)
    return result


def _range(
    cur: duckdb.DuckDBPyConnection, lite: sqlite3.Connection, tuning: Tuning
) -> tuple[int, list[tuple[Any, ...]], tuple[int, str | None], corrected.Touched | None]:
    """The watermark, the ledger rows of the files after it (in order), the high mark with the
    sha256 of its last file, and what the corrections after the watermark touched (None: none).

    RebuildNeeded when the SQLite file is not this warehouse's export (no file or correction at
    the watermark, or the file at or before it has other bytes), and for corrections that
    ``corrected`` leaves to a full export.
    """
    last = watermark(lite)
    rows = cur.execute(_LEDGER, {"lo": last}).fetchall()
    a_file = any(row[_ID] == last for row in rows)
    if last > 0 and not a_file:  # a correction's change id, or not this warehouse's
        rows += cur.execute(_FILE_BEFORE, {"lo": last}).fetchall()
    last_change = max((int(row[-1]) for row in rows), default=0)
    ledger = sorted(row[:-1] for row in rows)
    checked: str | None = None
    if last > 0:
        if not ledger or ledger[0][_ID] > last or (not a_file and last_change < last):
            raise RebuildNeeded(f"the warehouse has no file or correction #{last}")
        checked = ledger.pop(0)[_SHA256]
        if (checked or "") != state(lite, "last_file_sha256"):
            raise RebuildNeeded(f"the file at or before #{last} differs from the warehouse's")
    high, high_sha = (int(ledger[-1][_ID]), ledger[-1][_SHA256]) if ledger else (last, checked)
    if last_change <= last:
        return last, ledger, (high, high_sha), None
    rows_loaded = sum(_rows_loaded(ledger).values())
    limit = max(0, tuning.large_increment_rows - rows_loaded)
    touched = corrected.touched(cur, last, limit)
    return last, ledger, (max(high, last_change), high_sha), touched


def _rows_loaded(ledger: list[tuple[Any, ...]]) -> dict[str, int]:
    """Rows added by kind ("users", "transactions") by the files of the range that loaded."""
    loaded: dict[str, int] = {}
    for row in ledger:
        if row[AT["status"]] == "loaded":
            kind = row[AT["kind"]]
            loaded[kind] = loaded.get(kind, 0) + int(row[AT["rows_loaded"]])
    return loaded


def _copy_small(
    cur: duckdb.DuckDBPyConnection,
    lite: sqlite3.Connection,
    lo: int,
    hi: int,
    loaded: dict[str, int],
    base_users: writer.BaseUsers,
    tuning: Tuning,
) -> tuple[int, int]:
    """A small range's users and transactions, and the sums they add; (users, transactions)."""
    params = {"lo": lo, "hi": hi}
    users = transactions = 0
    if loaded.get("users"):
        rows = cur.execute(_NEW_USERS, params).fetchall()
        flat = [v for row in rows for v in row]
        _insert_flat(lite, "users", _USER_COLUMNS, flat, "INSERT OR REPLACE")
        users = len(rows)
    if loaded.get("transactions"):
        rows = cur.execute(_NEW_TRANSACTIONS, params).fetchall()
        if rows:
            lists = [list(column) for column in zip(*rows, strict=True)]
            _insert_lists(lite, "transactions", _TRANSACTION_COLUMNS, lists, "INSERT")
            transactions = len(rows)
            columns = dict(zip((*_TRANSACTION_NAMES, *map(cents_of, _MONEY)), lists, strict=True))
            _add_user_sums(lite, _USER_SUMS(columns), base_users, tuning)
            lite.executemany(ADD_DAILY_TOTALS, _DAILY_SUMS(columns))
            top = [v for row in cur.execute(_TOP_USERS).fetchall() for v in row]
            lite.execute("DELETE FROM top_users")
            _insert_flat(lite, "top_users", "rank, user_id, tx_count", top, "INSERT")
    return users, transactions


def _copy_country_monthly(
    cur: duckdb.DuckDBPyConnection, lite: sqlite3.Connection, lo: int, hi: int
) -> None:
    """The country totals changed by files ``lo < file_id <= hi`` replace the SQLite file's."""
    rows = cur.execute(_CHANGED_COUNTRY_MONTHLY, {"lo": lo, "hi": hi}).fetchall()
    lite.executemany(DELETE_COUNTRY_MONTHLY, [row[:3] for row in rows])
    lite.executemany(INSERT_COUNTRY_MONTHLY, [row for row in rows if row[3]])


def _write_side(
    cur: duckdb.DuckDBPyConnection, side: Path, lo: int, hi: int, loaded: dict[str, int]
) -> dict[str, int]:
    """A large range's rows, and DuckDB's totals of what they touched, into a new side file."""
    tables = []
    if loaded.get("users"):
        tables.append(_SIDE_USERS)
    if loaded.get("transactions"):
        tables.extend(_SIDE_TRANSACTIONS)
    bulk.create(side)
    written = bulk.append(side, cur, tables, {"lo": lo, "hi": hi})
    reached("side_written")
    return written


def _copy_side(lite: sqlite3.Connection, transactions: int) -> list[tuple[int]]:
    """Copy the attached side file into the live file, in the open transaction; the users new
    to ``user_totals_base``."""
    lite.execute(_USERS_FROM_SIDE)
    if not transactions:
        return []
    new_users: list[tuple[int]] = lite.execute(_NEW_IN_BASE).fetchall()
    for statement in _TRANSACTIONS_FROM_SIDE:
        lite.execute(statement)
    return new_users


def _add_user_sums(
    lite: sqlite3.Connection, rows: list[Any], base_users: writer.BaseUsers, tuning: Tuning
) -> None:
    """Add per-user sums to what the ``user_totals`` view shows.

    The delta takes the users the base has; the others, and every user of an increment touching
    ``tuning.compact_delta_users`` users or more (it dirties most base pages anyway), are
    upserted into the base (new users are rare: a user's first transactions).
    """
    known: list[Any] = []
    others = rows
    if len(rows) < tuning.compact_delta_users:
        known, others = base_users.split(rows)
    lite.executemany(ADD_USER_DELTAS, known)
    lite.executemany(ADD_USER_TOTALS, others)
    for row in others:
        base_users.add(row[0])


def _compact_user_totals(opened: writer.Writer, tuning: Tuning) -> None:
    """Fold the user_totals delta into the base once it holds ``tuning.compact_delta_users``
    users (after the export that crossed it), in a transaction of its own, so that it stays a
    few hundred pages.

    The view shows the same totals before and after; a crash rolls it back, changing nothing.
    """
    lite = opened.lite
    (waiting,) = lite.execute("SELECT count(*) FROM user_totals_delta").fetchone()
    if waiting < tuning.compact_delta_users:
        return
    started = time.perf_counter()
    try:
        lite.execute("BEGIN IMMEDIATE")
        lite.execute(FOLD_DELTAS)
        lite.execute("DELETE FROM user_totals_delta")
        lite.execute("COMMIT")
    except BaseException:
        writer.drop()
        raise
    opened.after_commit(tuning.checkpoint_every_changes)
    log.info(
        "sqlite_user_totals_compacted",
        extra={
            "fields": {
                "sqlite": str(opened.path),
                "users": waiting,
                "seconds": round(time.perf_counter() - started, 4),
            }
        },
    )


def _insert_lists(
    lite: sqlite3.Connection, table: str, columns: str, lists: list[list[Any]], verb: str
) -> None:
    """Insert rows given as one list per column (the leading ones, extra lists are ignored).

    The lists are interleaved into one flat list by slice assignment (C speed).
    """
    width = columns.count(",") + 1
    flat: list[Any] = [None] * (len(lists[0]) * width)
    for position in range(width):
        flat[position::width] = lists[position]
    _insert_flat(lite, table, columns, flat, verb)


def _insert_flat(
    lite: sqlite3.Connection, table: str, columns: str, flat: list[Any], verb: str
) -> None:
    """Insert rows laid end to end in ``flat``.

    ``ROWS_PER_STATEMENT`` rows go in each statement, cheaper per row than sqlite3's
    ``executemany`` of one row each (``bench/micro.py --only values``); the rest one by one. Rows
    of one statement apply in order, so an INSERT OR REPLACE of a key twice keeps the later.
    """
    width = columns.count(",") + 1
    one_row = "(" + ", ".join("?" * width) + ")"
    head = f"{verb} INTO {table} ({columns}) VALUES "
    per_statement = width * ROWS_PER_STATEMENT
    whole = len(flat) // per_statement * per_statement
    if whole:
        multi = head + ", ".join([one_row] * ROWS_PER_STATEMENT)
        groups = itertools.islice(flat, whole)
        lite.executemany(multi, zip(*[groups] * per_statement, strict=False))
    if whole < len(flat):
        rest = iter(flat[whole:])
        lite.executemany(head + one_row, zip(*[rest] * width, strict=False))
