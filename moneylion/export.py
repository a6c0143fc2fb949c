"""Incremental, crash-safe copy of what is new in the warehouse into ``warehouse/moneylion.sqlite``.

The SQLite file is what older tools read. It holds the seed's tables with the seed's columns and
types (``users``, ``transactions``: dates as TEXT ``YYYY-MM-DD``, ``amount`` REAL), the file ledger
(``files``), the aggregates (``user_totals``, ``daily_totals``, ``top_users``) and ``export_state``
(``last_file_id``, its sha256, the format).

Exactly once: each export reads one DuckDB snapshot (one read transaction on a cursor), bounded by
the highest ``file_id`` it sees, and writes what files ``last_file_id < file_id <= high`` added in
ONE SQLite transaction that also stores ``high`` as ``export_state.last_file_id``. A crash before
that COMMIT leaves the old watermark and none of the rows, so the next export redoes the range; a
crash after it leaves nothing to redo. Readers (WAL) never see half a file and are not blocked.
This relies on file ids committing in increasing order, which holds with the one ingest writer.
Transactions are appended with plain INSERT: a row exported twice fails loudly (the SQLite
transaction rolls back), it can never be counted twice. A SQLite file that is missing, not ours,
or of another warehouse (the sha256 of file ``last_file_id`` differs) is rebuilt in full.

Money in the aggregate tables stays exact: totals are TEXT decimal strings with two decimals
(``"1234.50"``, the form of the ``/v1`` API), never REAL. A full export copies DuckDB's
DECIMAL(38,2) totals; an increment adds the new transactions' per-user and per-day sums to them in
integer cents inside SQLite (``printf('%d.%02d', ...)``) instead of fetching the touched rows out
of DuckDB's 1M user totals (~12 ms for 1,000 users). For exact arithmetic in SQLite use
``CAST(replace(total_amount, '.', '') AS INTEGER)`` (cents). Only the seed's
``transactions.amount`` is REAL, for compatibility. The tests check increments against full exports.

Per-user totals. ``user_totals`` is a VIEW with the columns and TEXT totals it had as a table:
``user_totals_base`` (one row per user, TEXT totals; what a full export writes) LEFT JOIN
``user_totals_delta`` (at most one row per user: the integer cents increments added since the last
compaction). Why: 1,000 scattered users dirty ~1,000 of the base's ~16k pages, and writing those
to the WAL at COMMIT (~9 ms) plus the TEXT upserts (~9 ms) alone broke the 20 ms target; the
delta's few hundred pages and integer upserts cost ~2 + ~3 ms. An increment adds a user's sums to
the delta when the base has the user (a bitmap of the base's ids, built when the writer opens,
saves a ~3 us lookup per user), else upserts the base; one touching COMPACT_DELTA_USERS users or
more upserts the base directly. After the export whose COMMIT leaves the delta at
COMPACT_DELTA_USERS users or more, a second transaction folds it into the base (the view shows
the same rows before and after; ~0.3-0.6 s for 20,000 users, once per ~20 files of 1,000 users).
Read cost: a point lookup or a join on ``user_id`` reads one base row and one delta row by key
(~12 vs ~11 us for a table); a scan joins each base row to the small delta (summing every
total: ~0.44 vs ~0.24 s for 1M users with 3,000 in the delta); rows come in ``user_id`` order.

The exporter keeps one SQLite connection open between exports (page cache of up to CACHE_KIB,
warmed with the base's user totals when opened; ``close_sqlite()`` closes it) and checkpoints the
WAL on a background thread, so an export never waits for a checkpoint.

``export_full`` writes a new file aside (no journal: nobody sees it yet), switches it to WAL,
fsyncs it and renames it over the old one. Before the rename the old file's WAL is checkpointed
and truncated so no stale WAL frames can be replayed onto the new file. A reader that keeps a
connection open across a full rebuild must reopen it (as with any rename-based replace).
From CHILD_MIN_TRANSACTIONS transactions on it uses both cores: a child process writes the
transactions of the lowest id ranges into the aside file (fed Arrow IPC on its stdin), while this
process writes every other table and the transactions of the highest ranges into a side file,
which is then copied in (``INSERT ... SELECT *``: SQLite's transfer optimization copies records
without decoding them, ~0.4 us per row) while the child's pages are fsynced. The ranges are
shared out as the work goes (_Chunks), so a child slowed down by a busy machine writes fewer.
Threads do not help: binding and ``to_pylist`` hold the GIL (measured 13.4 s against 13.9 s in
one thread). 10M transactions + 1M users: the two writers ~7-8.5 s each, the copy-in ~2 s, the
final fsync ~0.4 s; 9.8-12.6 s in all on this 2-core machine, whose speed varies by half.

Why the standard library's sqlite3 and not DuckDB's sqlite extension. The project pins duckdb
2.0.1 (faster at ingest: 3.6 s vs 4.8 s for a 10M-row file) and the offline extension wheels stop
at 1.5.5, so the extension would mean a second DuckDB in another process reading a copy of the
data. Measured here (2 cores) with duckdb 1.5.5 + ``duckdb-extension-sqlite-scanner`` 1.5.5
LOADed from its wheel: 10M transactions into a table with INTEGER PRIMARY KEY 12.7 s (WAL file,
quiet machine); 10M transactions + 1M users 19.0 s (rollback journal) and 32.2 s (WAL) at load
~3; CREATE TABLE AS without a primary key 7.8 s; a 1,000-row append 8.1 ms (rollback journal) /
20.9 ms (WAL). The sqlite3 path: ``executemany`` one row per statement ~0.75M rows/s, multi-row
``VALUES`` (100 rows per statement) fed from Arrow columns ~1.37M rows/s; per transaction row
~1.1 us in one process (``to_pylist`` ~0.25, binding ~0.4, SQLite's b-tree ~0.35), so one
process needs ~14 s for 10M transactions + 1M users + 1M user totals. The extension is not
faster for what we need, cannot set our PRAGMAs, and does not upsert, so: sqlite3.
``bench/export.py`` prints the current figures.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from moneylion.config import Config
from moneylion.schema import open_warehouse

log = logging.getLogger(__name__)

EXPORT_FORMAT = "moneylion-sqlite-export 2"
ROWS_PER_STATEMENT = 100  # multi-row VALUES: ~1.8x the throughput of one row per statement
ARROW_BATCH_ROWS = 200_000
CACHE_KIB = 262_144  # page cache of the exporter's connection: holds 1M users' totals
DELTAS_IN_PYTHON_ROWS = 50_000
# Fold the user_totals delta into the base once it holds this many users (after the export that
# crossed it, in a transaction of its own), so that it stays a few hundred pages. An increment
# touching this many users adds to the base directly: it dirties most base pages anyway.
COMPACT_DELTA_USERS = 20_000
# A full export of this many transactions or more writes them in two processes.
CHILD_MIN_TRANSACTIONS = 1_000_000
CHUNK_TRANSACTIONS = 500_000  # about this many rows per id range handed to either process
CHILD_SHARE = 0.7  # of the ranges, at first: the parent writes every other table too
ASIDE_CACHE_KIB = 65_536  # page cache of each connection building a full export
CHECKPOINT_EVERY_CHANGES = 20_000  # rows written between two background WAL checkpoints
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is cut back to this after a checkpoint


def _cents(text: str) -> str:
    """SQL for a two-decimal TEXT total as integer cents."""
    return f"CAST(replace({text}, '.', '') AS INTEGER)"


def _text(cents: str) -> str:
    """SQL for integer cents (>= 0) as a two-decimal TEXT total."""
    return f"printf('%d.%02d', ({cents}) / 100, ({cents}) % 100)"


def _plus(column: str, cents: str) -> str:
    """SQL setting a TEXT total to itself plus ``cents``."""
    return f"{column} = " + _text(f"{_cents(column)} + {cents}")


def _sum_of(kind: str) -> str:
    """A ``user_totals`` view column: the base total plus the delta's cents, if any."""
    total = _text(_cents(f"b.total_{kind}") + f" + d.{kind}_cents")
    return f"CASE WHEN d.user_id IS NULL THEN b.total_{kind} ELSE {total} END AS total_{kind}"


# ``user_totals`` is a view: ``user_totals_base`` (written by a full export and by compaction)
# plus ``user_totals_delta``, the cents that increments added since the last compaction, at most
# one row per user and only for users already in the base (new users go to the base). See
# "Per-user totals" in the module docstring.
SQLITE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS users (
    user_id INTEGER PRIMARY KEY, signup_date TEXT, country TEXT);
CREATE TABLE IF NOT EXISTS transactions (
    transaction_id INTEGER PRIMARY KEY, user_id INTEGER, transaction_date TEXT,
    amount REAL, transaction_type TEXT);
CREATE TABLE IF NOT EXISTS files (
    file_id INTEGER PRIMARY KEY, name TEXT NOT NULL, sha256 TEXT NOT NULL, kind TEXT,
    status TEXT NOT NULL, rows_total INTEGER, rows_loaded INTEGER, rows_duplicate INTEGER,
    rows_rejected INTEGER, size_bytes INTEGER, received_at TEXT, finished_at TEXT,
    seconds REAL, error_reason TEXT, error TEXT);
CREATE TABLE IF NOT EXISTS user_totals_base (
    user_id INTEGER PRIMARY KEY, tx_count INTEGER NOT NULL, total_amount TEXT NOT NULL,
    total_deposit TEXT NOT NULL, total_withdrawal TEXT NOT NULL, total_purchase TEXT NOT NULL,
    first_date TEXT NOT NULL, last_date TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS user_totals_delta (
    user_id INTEGER PRIMARY KEY, tx_count INTEGER NOT NULL, amount_cents INTEGER NOT NULL,
    deposit_cents INTEGER NOT NULL, withdrawal_cents INTEGER NOT NULL,
    purchase_cents INTEGER NOT NULL, first_date TEXT NOT NULL, last_date TEXT NOT NULL);
CREATE VIEW IF NOT EXISTS user_totals AS
SELECT b.user_id AS user_id, b.tx_count + ifnull(d.tx_count, 0) AS tx_count,
    {_sum_of("amount")}, {_sum_of("deposit")},
    {_sum_of("withdrawal")}, {_sum_of("purchase")},
    CASE WHEN d.user_id IS NULL THEN b.first_date
        ELSE min(b.first_date, d.first_date) END AS first_date,
    CASE WHEN d.user_id IS NULL THEN b.last_date
        ELSE max(b.last_date, d.last_date) END AS last_date
FROM user_totals_base AS b LEFT JOIN user_totals_delta AS d ON d.user_id = b.user_id;
CREATE TABLE IF NOT EXISTS daily_totals (
    transaction_date TEXT NOT NULL, transaction_type TEXT NOT NULL, tx_count INTEGER NOT NULL,
    total_amount TEXT NOT NULL, PRIMARY KEY (transaction_date, transaction_type)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS top_users (
    rank INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, tx_count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS export_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class _Copy:
    """One SQLite table filled from one DuckDB query over the file-id range ($lo, $hi]."""

    table: str
    columns: str  # the SQLite columns, comma-separated, in the query's order
    new_rows: str  # only what files in the range added or changed
    all_rows: str  # everything, in primary-key order (appends to SQLite's b-tree are cheapest)


# DuckDB's sort costs ~1 ms even for a few rows, so the queries of small increments have no ORDER
# BY: the ledger is sorted in Python, and only large increments read transactions in key order
# (_IN_KEY_ORDER; appending to SQLite's b-tree is cheapest).
#
# Incrementally: the ledger rows from the last exported file on, read first. The last exported
# file's sha256 tells whether the SQLite file belongs to this warehouse; the others are the range.
_FILES = _Copy(
    "files",
    "file_id, name, sha256, kind, status, rows_total, rows_loaded, rows_duplicate, rows_rejected,"
    " size_bytes, received_at, finished_at, seconds, error_reason, error",
    """SELECT file_id, name, sha256, kind, status, rows_total, rows_loaded, rows_duplicate,
        rows_rejected, size_bytes, received_at::VARCHAR, finished_at::VARCHAR, seconds,
        error_reason, error
    FROM files WHERE file_id >= $lo""",
    """SELECT file_id, name, sha256, kind, status, rows_total, rows_loaded, rows_duplicate,
        rows_rejected, size_bytes, received_at::VARCHAR, finished_at::VARCHAR, seconds,
        error_reason, error
    FROM files WHERE file_id <= $hi ORDER BY file_id""",
)

# Users are updated in place by later files (latest file wins, file_id follows), so the users
# written by the range are exactly those whose file_id is in it.
_USERS = _Copy(
    "users",
    "user_id, signup_date, country",
    """SELECT user_id, signup_date::VARCHAR, country FROM users
    WHERE file_id > $lo AND file_id <= $hi ORDER BY user_id""",
    """SELECT user_id, signup_date::VARCHAR, country FROM users
    WHERE file_id <= $hi ORDER BY user_id""",
)

# The extra ``cents`` column is not written to SQLite: small increments add it up per user and
# per day in Python (see _Deltas).
_TRANSACTIONS = _Copy(
    "transactions",
    "transaction_id, user_id, transaction_date, amount, transaction_type",
    """SELECT transaction_id, user_id, transaction_date::VARCHAR, amount::DOUBLE,
        transaction_type::VARCHAR, (amount * 100)::BIGINT AS cents
    FROM transactions WHERE file_id > $lo AND file_id <= $hi""",
    """SELECT transaction_id, user_id, transaction_date::VARCHAR, amount::DOUBLE,
        transaction_type
    FROM transactions WHERE file_id <= $hi ORDER BY transaction_id""",
)

# Incrementally the aggregates are not copied but ADDED: the new transactions' per-user and
# per-day sums, in integer cents, are added to the stored TEXT totals inside SQLite
# (_ADD_USER_TOTALS, _ADD_DAILY_TOTALS). Copying the touched user_totals rows out of DuckDB
# instead costs a join with its 1M rows (~12 ms for 1,000 users). Transactions are immutable and
# only appended, so the sums of the deltas equal DuckDB's maintained totals; the tests compare
# with a full export, which copies. Up to DELTAS_IN_PYTHON_ROWS new rows the deltas are summed
# in Python from the rows being copied anyway (a DuckDB GROUP BY costs ~3 ms even for 1,000
# rows); above it by DuckDB, with these queries (same columns as _Deltas' rows).
_USER_DELTAS = """
SELECT user_id, count(*)::BIGINT, sum(cents)::BIGINT,
    coalesce(sum(cents) FILTER (transaction_type = 'deposit'), 0)::BIGINT,
    coalesce(sum(cents) FILTER (transaction_type = 'withdrawal'), 0)::BIGINT,
    coalesce(sum(cents) FILTER (transaction_type = 'purchase'), 0)::BIGINT,
    min(transaction_date)::VARCHAR, max(transaction_date)::VARCHAR
FROM (SELECT *, (amount * 100)::BIGINT AS cents FROM transactions
      WHERE file_id > $lo AND file_id <= $hi)
GROUP BY user_id ORDER BY user_id"""
_DAILY_DELTAS = """
SELECT transaction_date::VARCHAR, transaction_type::VARCHAR, count(*)::BIGINT,
    sum((amount * 100)::BIGINT)::BIGINT
FROM transactions WHERE file_id > $lo AND file_id <= $hi
GROUP BY ALL ORDER BY 1, 2"""

_USER_TOTALS = _Copy(
    "user_totals_base",
    "user_id, tx_count, total_amount, total_deposit, total_withdrawal, total_purchase,"
    " first_date, last_date",
    _USER_DELTAS,
    """SELECT user_id, tx_count, total_amount::VARCHAR, total_deposit::VARCHAR,
        total_withdrawal::VARCHAR, total_purchase::VARCHAR, first_date::VARCHAR,
        last_date::VARCHAR
    FROM user_totals ORDER BY user_id""",
)

_DAILY_TOTALS = _Copy(
    "daily_totals",
    "transaction_date, transaction_type, tx_count, total_amount",
    _DAILY_DELTAS,
    """SELECT transaction_date::VARCHAR, transaction_type::VARCHAR, tx_count,
        total_amount::VARCHAR
    FROM daily_totals ORDER BY 1, 2""",
)


# Per-user sums are rows of numbered parameters: user_id, count, total, deposit, withdrawal,
# purchase cents, first date, last date; one row per statement. Users already in the base get
# them added in the delta table: integer sums, no TEXT to parse and print, and the delta's few
# pages are all an increment dirties (the base's 1M rows span ~16k pages, and 1,000 scattered
# users dirty ~1,000 of them: ~9 ms of COMMIT). New users get their row in the base directly.
_ADD_USER_DELTAS = """
INSERT INTO user_totals_delta (user_id, tx_count, amount_cents, deposit_cents, withdrawal_cents,
    purchase_cents, first_date, last_date)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
ON CONFLICT (user_id) DO UPDATE SET tx_count = tx_count + ?2,
    amount_cents = amount_cents + ?3, deposit_cents = deposit_cents + ?4,
    withdrawal_cents = withdrawal_cents + ?5, purchase_cents = purchase_cents + ?6,
    first_date = min(first_date, ?7), last_date = max(last_date, ?8)"""
_ADD_USER_TOTALS = f"""
INSERT INTO user_totals_base (user_id, tx_count, total_amount, total_deposit, total_withdrawal,
    total_purchase, first_date, last_date)
VALUES (?1, ?2, {_text("?3")}, {_text("?4")}, {_text("?5")}, {_text("?6")}, ?7, ?8)
ON CONFLICT (user_id) DO UPDATE SET tx_count = tx_count + ?2,
    {_plus("total_amount", "?3")}, {_plus("total_deposit", "?4")},
    {_plus("total_withdrawal", "?5")}, {_plus("total_purchase", "?6")},
    first_date = min(first_date, ?7), last_date = max(last_date, ?8)"""
# Compaction: the delta folded into the base in user_id order (then emptied), as one UPSERT
# that scans the delta and looks up the base (an UPDATE ... FROM would scan the 1M base rows).
_FOLD_DELTAS = f"""
INSERT INTO user_totals_base (user_id, tx_count, total_amount, total_deposit, total_withdrawal,
    total_purchase, first_date, last_date)
SELECT user_id, tx_count, {_text("amount_cents")}, {_text("deposit_cents")},
    {_text("withdrawal_cents")}, {_text("purchase_cents")}, first_date, last_date
FROM user_totals_delta WHERE true
ON CONFLICT (user_id) DO UPDATE SET tx_count = tx_count + excluded.tx_count,
    {_plus("total_amount", _cents("excluded.total_amount"))},
    {_plus("total_deposit", _cents("excluded.total_deposit"))},
    {_plus("total_withdrawal", _cents("excluded.total_withdrawal"))},
    {_plus("total_purchase", _cents("excluded.total_purchase"))},
    first_date = min(first_date, excluded.first_date),
    last_date = max(last_date, excluded.last_date)"""
# date, type, count, cents
_ADD_DAILY_TOTALS = f"""
INSERT INTO daily_totals (transaction_date, transaction_type, tx_count, total_amount)
VALUES (?1, ?2, ?3, {_text("?4")})
ON CONFLICT (transaction_date, transaction_type) DO UPDATE SET tx_count = tx_count + ?3,
    {_plus("total_amount", "?4")}"""

# Small (Config.top_users_kept rows): replaced whole whenever transactions arrived.
_TOP_USERS = _Copy(
    "top_users",
    "rank, user_id, tx_count",
    "SELECT rank, user_id, tx_count FROM top_users",
    "SELECT rank, user_id, tx_count FROM top_users ORDER BY rank",
)

_IN_KEY_ORDER = " ORDER BY transaction_id"

# A large full export runs in two processes (see _TransactionsChild and _Chunks): a child
# writes the transactions of the lowest id ranges into the aside file, the parent those of the
# highest and every other table into a side file, which is then copied in.
_TRANSACTIONS_CHUNK = """
SELECT transaction_id, user_id, transaction_date::VARCHAR, amount::DOUBLE, transaction_type
FROM transactions WHERE file_id <= $hi AND transaction_id >= $first AND transaction_id < $stop
ORDER BY transaction_id"""
_TRANSACTION_IDS = """
SELECT count(*), min(transaction_id), max(transaction_id) FROM transactions WHERE file_id <= $hi"""

_TYPE_COLUMN = {"deposit": 2, "withdrawal": 3, "purchase": 4}  # in a _Deltas.users entry


class _Deltas:
    """Per-user and per-day sums of new transactions, in integer cents."""

    def __init__(self) -> None:
        # user_id -> [count, total, deposit, withdrawal, purchase, first_date, last_date]
        self.users: dict[int, list[Any]] = {}
        self.daily: dict[tuple[str, str], list[int]] = {}  # (date, type) -> [count, cents]

    def add(self, columns: list[list[Any]]) -> None:
        """Columns of a transactions batch: id, user_id, date, amount, type, cents."""
        users, daily = self.users, self.daily
        for user_id, date, kind, cents in zip(
            columns[1], columns[2], columns[4], columns[5], strict=True
        ):
            entry = users.get(user_id)
            if entry is None:
                entry = users[user_id] = [0, 0, 0, 0, 0, date, date]
            entry[0] += 1
            entry[1] += cents
            entry[_TYPE_COLUMN[kind]] += cents
            if date < entry[5]:
                entry[5] = date
            if date > entry[6]:
                entry[6] = date
            day = daily.get((date, kind))
            if day is None:
                day = daily[(date, kind)] = [0, 0]
            day[0] += 1
            day[1] += cents

    def user_rows(self) -> list[list[Any]]:
        """Rows for _ADD_USER_TOTALS, by user id."""
        return [[user_id, *entry] for user_id, entry in sorted(self.users.items())]

    def daily_rows(self) -> list[tuple[Any, ...]]:
        """Rows for _ADD_DAILY_TOTALS, by date and type."""
        return [(*key, count, cents) for key, (count, cents) in sorted(self.daily.items())]


# Fault injection for the crash tests: called with the name of each step as it is reached
# ("sqlite_begun", "rows_written", "before_commit", "committed", "aside_written",
# "before_rename"). None in production.
fault_hook: Callable[[str], None] | None = None


def _reached(point: str) -> None:
    if fault_hook is not None:
        fault_hook(point)


@dataclass(frozen=True)
class ExportResult:
    """What one export wrote into the SQLite file."""

    sqlite_path: Path
    full: bool
    files: int
    users: int
    transactions: int
    first_file_id: int  # exclusive: the watermark before this export
    last_file_id: int  # the watermark after it
    seconds: float

    @property
    def exported_anything(self) -> bool:
        return self.last_file_id > self.first_file_id or self.full

    def summary(self) -> str:
        kind = "full export" if self.full else "export"
        if not self.exported_anything:
            return f"{kind}: {self.sqlite_path} is up to date (file #{self.last_file_id})"
        return (
            f"{kind}: files #{self.first_file_id + 1}..#{self.last_file_id} -> {self.sqlite_path}: "
            f"{self.files} files, {self.users} users, {self.transactions} transactions "
            f"in {self.seconds:.3f} s"
        )


class _RebuildNeeded(Exception):
    """The SQLite file is not an export of this warehouse (or of this format)."""


def export_new(conn: duckdb.DuckDBPyConnection, sqlite_path: Path) -> ExportResult:
    """Copy what files committed since the last export added, in one SQLite transaction.

    Cheap when nothing is new (a watermark comparison). Rebuilds with ``export_full`` when the
    SQLite file is missing or belongs to another warehouse.
    """
    started = time.perf_counter()
    sqlite_path = Path(sqlite_path)
    with _writer_lock:
        if not sqlite_path.exists():
            return _export_full_locked(conn, sqlite_path, started)
        try:
            return _export_increment(conn, sqlite_path, started)
        except _RebuildNeeded as reason:
            log.warning(
                "sqlite_export_rebuild",
                extra={"fields": {"sqlite": str(sqlite_path), "reason": str(reason)}},
            )
            return _export_full_locked(conn, sqlite_path, started)


def _export_increment(
    conn: duckdb.DuckDBPyConnection, sqlite_path: Path, started: float
) -> ExportResult:
    writer = _writer(sqlite_path)
    lite = writer.lite
    try:
        # IMMEDIATE: take the write lock before reading the watermark, so two exporters could
        # never both export the same range.
        lite.execute("BEGIN IMMEDIATE")
        last = _watermark(lite)
        with _snapshot(conn) as cur:
            ledger = sorted(cur.execute(_FILES.new_rows, {"lo": last}).fetchall())
            if last > 0:
                if not ledger or ledger[0][0] != last:
                    raise _RebuildNeeded(f"the warehouse has no file #{last}")
                if ledger[0][2] != _state(lite, "last_file_sha256"):
                    raise _RebuildNeeded(f"file #{last} differs from the warehouse's")
                ledger = ledger[1:]
            if not ledger:
                lite.execute("ROLLBACK")
                return ExportResult(
                    sqlite_path, False, 0, 0, 0, last, last, time.perf_counter() - started
                )
            high, high_sha = int(ledger[-1][0]), str(ledger[-1][2])
            _reached("sqlite_begun")
            counts = _copy_range(cur, lite, last, high, ledger, writer.base_users)
        _write_state(lite, high, high_sha)
        _reached("before_commit")
        lite.execute("COMMIT")
        _reached("committed")
    except BaseException:
        _drop_writer()  # rolls back whatever is open; the next export reopens
        raise
    result = ExportResult(sqlite_path, False, *counts, last, high, time.perf_counter() - started)
    _after_commit(writer)
    _log_result(result)
    _compact_user_totals(writer)
    return result


def export_full(conn: duckdb.DuckDBPyConnection, sqlite_path: Path) -> ExportResult:
    """Rebuild the SQLite file from one DuckDB snapshot: write aside, then rename over it."""
    started = time.perf_counter()
    with _writer_lock:
        return _export_full_locked(conn, Path(sqlite_path), started)


def _export_full_locked(
    conn: duckdb.DuckDBPyConnection, sqlite_path: Path, started: float
) -> ExportResult:
    sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    aside, side = _aside(sqlite_path), _side(sqlite_path)
    _remove_database(aside)
    _remove_database(side)
    try:
        with _snapshot(conn) as cur:
            high, high_sha = _high_file(cur)
            chunks = _chunks(cur, high)
            child = None if chunks is None else _TransactionsChild(conn, aside, high, chunks)
            try:
                lite = _open_aside(aside if child is None else side)
                try:
                    lite.execute("BEGIN")
                    files, users, transactions = _copy_range(
                        cur, lite, 0, high, None, chunks=chunks
                    )
                    lite.execute("COMMIT")
                finally:
                    lite.close()
                if child is not None:
                    transactions += child.wait()
            except BaseException:
                if child is not None:
                    child.kill()
                _remove_database(aside)
                raise
        # The child's rows go to disk while the side file is copied in (fsync of 0.5 GB: ~1 s).
        flush = threading.Thread(target=_fsync, args=(aside,), name="sqlite-export-flush")
        if child is not None:
            flush.start()
        lite = _open_aside(aside)
        try:
            if child is not None:
                _merge_side(lite, side)
            lite.execute("BEGIN")
            _write_state(lite, high, high_sha)
            lite.execute("COMMIT")
            lite.execute("PRAGMA journal_mode=WAL")
        finally:
            lite.close()
            if flush.is_alive():
                flush.join()
    finally:
        _remove_database(side)
    counts = files, users, transactions
    _fsync(aside)
    _reached("aside_written")
    _drop_writer()
    _retire_wal(sqlite_path)
    _reached("before_rename")
    os.replace(aside, sqlite_path)
    _fsync(sqlite_path.parent)
    result = ExportResult(sqlite_path, True, *counts, 0, high, time.perf_counter() - started)
    _log_result(result)
    return result


def _open_aside(path: Path) -> sqlite3.Connection:
    """A connection to a full export's aside or side file, with the schema.

    Nobody can see these files, and a crash leaves only files we delete next time: no journal
    and no fsync while building them.
    """
    lite = sqlite3.connect(path, isolation_level=None)
    try:
        lite.execute("PRAGMA journal_mode=OFF")
        lite.execute("PRAGMA synchronous=OFF")
        lite.execute(f"PRAGMA cache_size=-{ASIDE_CACHE_KIB}")
        lite.executescript(SQLITE_SCHEMA)
    except BaseException:
        lite.close()
        raise
    return lite


def _chunks(cur: duckdb.DuckDBPyConnection, high: int) -> _Chunks | None:
    """The id ranges of a full export's transactions for two processes, or None when the export
    is too small for a second process to pay."""
    rows = cur.execute(_TRANSACTION_IDS, {"hi": high}).fetchall()
    count, first, last = rows[0]
    if count < CHILD_MIN_TRANSACTIONS:
        return None
    return _Chunks(first, last, max(2, count // CHUNK_TRANSACTIONS))


class _Chunks:
    """Transaction id ranges of a full export shared by the two processes.

    The child takes the ranges below CHILD_SHARE of them from the bottom up; this process (once
    its other tables are written) takes those above, from the bottom up too (appending to the
    b-tree is cheapest), then helps the child from the top of what the child has left, so a
    child slowed down on a busy machine simply writes fewer. Ours all lie above the child's, so
    copying them in appends them.
    """

    def __init__(self, first: int, last: int, count: int) -> None:
        width = (last - first) // count + 1
        self._bounds = [(first + k * width, first + (k + 1) * width) for k in range(count)]
        self._lock = threading.Lock()
        self._low = 0  # the child's next range
        self._high = round(count * CHILD_SHARE)  # ranges [_low, _high) are left for the child
        self._ours = self._high  # our next range of our own

    def lowest(self) -> tuple[int, int] | None:
        """The child's next range."""
        with self._lock:
            if self._low == self._high:
                return None
            self._low += 1
            return self._bounds[self._low - 1]

    def ours(self) -> tuple[int, int] | None:
        """This process's next range: its own upwards, then the child's from the top down."""
        with self._lock:
            if self._ours < len(self._bounds):
                self._ours += 1
                return self._bounds[self._ours - 1]
            if self._low == self._high:
                return None
            self._high -= 1
            return self._bounds[self._high]


def _merge_side(lite: sqlite3.Connection, side: Path) -> None:
    """Copy every table of the side file into the aside file, in one transaction.

    Same schema and a plain ``INSERT INTO t SELECT * FROM side.t``: SQLite copies the records
    without decoding them (its transfer optimization); the side's transactions all come after
    the child's ids, so they are appended.
    """
    lite.execute("ATTACH DATABASE ? AS side", (str(side),))
    lite.execute("BEGIN")
    for table in _FULL_TABLES:
        lite.execute(f"INSERT INTO main.{table} SELECT * FROM side.{table}")
    lite.execute("COMMIT")
    lite.execute("DETACH DATABASE side")


_FULL_TABLES = (
    "files",
    "users",
    "transactions",
    "user_totals_base",
    "daily_totals",
    "top_users",
)


class _TransactionsChild:
    """A child process writing a full export's lowest transaction id ranges into ``aside``.

    Binding rows in Python's sqlite3 holds the GIL, so threads barely overlap (measured: 13.4 s
    against 13.9 s); a process of its own uses the second core. A thread of ours reads the rows
    from DuckDB on a cursor of its own and streams them to the child's stdin as Arrow IPC. That
    cursor reads outside the export's snapshot, which is the same for these rows: transactions
    are only appended, and every file up to ``high`` is committed.
    """

    def __init__(
        self, conn: duckdb.DuckDBPyConnection, aside: Path, high: int, chunks: _Chunks
    ) -> None:
        self.rows = 0
        self._error: BaseException | None = None
        # The aside file exists before the child starts, and the child writes only into that
        # very file: one left behind by an exporter killed meanwhile may be a newer run's.
        _open_aside(aside).close()
        self._process = subprocess.Popen(
            [sys.executable, "-c", _CHILD_MAIN, str(aside), _identity(aside)],
            stdin=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._cursor = conn.cursor()
        self._thread = threading.Thread(
            target=self._feed, args=(high, chunks), name="sqlite-export-feed", daemon=True
        )
        self._thread.start()

    def _feed(self, high: int, chunks: _Chunks) -> None:
        stdin = self._process.stdin
        assert stdin is not None

        def rows_of(first: int, stop: int) -> Any:
            params = {"hi": high, "first": first, "stop": stop}
            return self._cursor.sql(_TRANSACTIONS_CHUNK, params=params).to_arrow_reader(
                ARROW_BATCH_ROWS
            )

        try:
            # The schema from an empty range: the child may get no range at all.
            stream = pa.ipc.new_stream(stdin, rows_of(0, 0).schema)
            while (chunk := chunks.lowest()) is not None:
                for batch in rows_of(*chunk):
                    stream.write_batch(batch)
                    self.rows += batch.num_rows
            stream.close()  # the end-of-stream marker, only once every range is sent
        except BaseException as exc:  # reported by wait(); the child's file is then discarded
            self._error = exc
        finally:
            with contextlib.suppress(OSError):
                stdin.close()
            self._cursor.close()

    def wait(self) -> int:
        """The rows the child wrote, once it committed them; raises if anything failed."""
        self._thread.join()
        stderr = b""
        if self._process.stderr is not None:
            with self._process.stderr:
                stderr = self._process.stderr.read()
        code = self._process.wait()
        if self._error is not None:
            raise self._error
        if code != 0:
            tail = stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise sqlite3.OperationalError(f"the export's child process failed ({code}): {tail}")
        return self.rows

    def kill(self) -> None:
        self._process.kill()
        self._thread.join()
        self._process.wait()
        if self._process.stderr:
            self._process.stderr.close()


_CHILD_MAIN = "from moneylion.export import _child_main; _child_main()"


def _identity(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_dev}:{stat.st_ino}"


def _child_main() -> None:
    """The child process of a full export: Arrow IPC batches of transactions from stdin into the
    aside file named by ``sys.argv[1]``, in one transaction; exit status 0 once committed.

    It first waits for the stream to start, and writes only if the file is still the one its
    parent made (``sys.argv[2]``): an orphan of a killed exporter must not touch a newer run's.
    """
    aside, identity = Path(sys.argv[1]), sys.argv[2]
    with pa.ipc.open_stream(sys.stdin.buffer) as reader:
        if _identity(aside) != identity:
            sys.exit(f"{aside} is not the file this export made")
        lite = _open_aside(aside)
        try:
            if _identity(aside) != identity:
                sys.exit(f"{aside} is not the file this export made")
            lite.execute("BEGIN")
            _insert_batches(lite, "transactions", _TRANSACTIONS.columns, reader, "INSERT")
            lite.execute("COMMIT")
        finally:
            lite.close()


def run_export(config: Config, full: bool) -> int:
    """``moneylion export [--full]``: bring the SQLite file up to date, print one line."""
    conn = open_warehouse(config)
    try:
        if full:
            result = export_full(conn, config.sqlite_path)
        else:
            result = export_new(conn, config.sqlite_path)
    except (sqlite3.Error, OSError) as exc:
        print(f"moneylion export: {config.sqlite_path}: {exc}", file=sys.stderr)
        return 1
    finally:
        close_sqlite()
        conn.close()
    print(result.summary())
    return 0


# --- reading DuckDB -------------------------------------------------------------------------


@contextlib.contextmanager
def _snapshot(conn: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """A cursor inside one read transaction: a concurrent ingest commit cannot split the export."""
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


def _high_file(cur: duckdb.DuckDBPyConnection) -> tuple[int, str | None]:
    """The highest file id in the snapshot (0 when empty) and its sha256."""
    rows = cur.execute(
        "SELECT coalesce(max(file_id), 0), arg_max(sha256, file_id) FROM files"
    ).fetchall()
    return int(rows[0][0]), rows[0][1]


def _copy_range(
    cur: duckdb.DuckDBPyConnection,
    lite: sqlite3.Connection,
    lo: int,
    hi: int,
    ledger: list[tuple[Any, ...]] | None,
    base_users: _BaseUsers | None = None,
    *,
    chunks: _Chunks | None = None,
) -> tuple[int, int, int]:
    """Copy files (lo, hi] into the open SQLite transaction; (files, users, transactions).

    ``ledger``: the range's ``files`` rows for an increment (with the writer's ``base_users``),
    None for a full export; ``chunks``: a full export's transactions shared with a child
    process, which writes the lowest id ranges (this one writes the others, after the rest).
    """
    bounds = {"lo": lo, "hi": hi}

    def read(query: str) -> Any:
        params = {name: value for name, value in bounds.items() if f"${name}" in query}
        return cur.sql(query, params=params or None).to_arrow_reader(ARROW_BATCH_ROWS)

    if ledger is None:
        counts = {}
        for spec in (_FILES, _USERS, _TRANSACTIONS, _USER_TOTALS, _DAILY_TOTALS, _TOP_USERS):
            if spec is not _TRANSACTIONS or chunks is None:
                batches = read(spec.all_rows)
                counts[spec.table] = _insert_batches(
                    lite, spec.table, spec.columns, batches, "INSERT"
                )
        while chunks is not None and (chunk := chunks.ours()) is not None:
            params = {"hi": hi, "first": chunk[0], "stop": chunk[1]}
            batches = cur.sql(_TRANSACTIONS_CHUNK, params=params).to_arrow_reader(ARROW_BATCH_ROWS)
            counts["transactions"] = counts.get("transactions", 0) + _insert_batches(
                lite, "transactions", _TRANSACTIONS.columns, batches, "INSERT"
            )
        _reached("rows_written")
        return counts["files"], counts["users"], counts.get("transactions", 0)

    assert base_users is not None
    _insert_flat(
        lite, "files", _FILES.columns, [v for row in ledger for v in row], "INSERT OR REPLACE"
    )
    loaded: dict[str, int] = {}
    for row in ledger:  # rows added, by kind, of the files that loaded
        if row[4] == "loaded":
            loaded[row[3]] = loaded.get(row[3], 0) + int(row[6])
    users = transactions = 0
    in_python, deltas = True, _Deltas()
    if loaded.get("users"):
        users = _insert_batches(
            lite, "users", _USERS.columns, read(_USERS.new_rows), "INSERT OR REPLACE"
        )
    if loaded.get("transactions"):
        in_python = loaded["transactions"] <= DELTAS_IN_PYTHON_ROWS
        # Plain INSERT, never OR REPLACE: exporting a row twice must fail, not count twice.
        if in_python:  # a few rows: tuples cost less than a round trip through Arrow
            rows = cur.execute(_TRANSACTIONS.new_rows, {"lo": lo, "hi": hi}).fetchall()
            if rows:
                lists = [list(column) for column in zip(*rows, strict=True)]
                deltas.add(lists)
                _insert_lists(lite, "transactions", _TRANSACTIONS.columns, lists, "INSERT")
                transactions = len(rows)
        else:
            query = _TRANSACTIONS.new_rows + _IN_KEY_ORDER
            transactions = _insert_batches(
                lite, "transactions", _TRANSACTIONS.columns, read(query), "INSERT"
            )
    if transactions:
        if in_python:
            _add_user_sums(lite, deltas.user_rows(), base_users)
            lite.executemany(_ADD_DAILY_TOTALS, deltas.daily_rows())
        else:
            for batch in read(_USER_DELTAS):
                columns = [column.to_pylist() for column in batch.columns]
                _add_user_sums(lite, list(zip(*columns, strict=True)), base_users)
            for batch in read(_DAILY_DELTAS):
                columns = [column.to_pylist() for column in batch.columns]
                lite.executemany(_ADD_DAILY_TOTALS, zip(*columns, strict=True))
        top = cur.execute(_TOP_USERS.new_rows).fetchall()  # 1,000 rows: tuples beat Arrow
        lite.execute("DELETE FROM top_users")
        _insert_flat(
            lite, "top_users", _TOP_USERS.columns, [v for row in top for v in row], "INSERT"
        )
    _reached("rows_written")
    return len(ledger), users, transactions


def _add_user_sums(lite: sqlite3.Connection, rows: list[Any], base_users: _BaseUsers) -> None:
    """Add per-user sums (rows for _ADD_USER_DELTAS) to what the ``user_totals`` view shows.

    The delta takes the users the base has; the others, and every user of a large increment,
    are upserted into the base (new users are rare: a user's first transactions).
    """
    known: list[Any] = []
    others = rows
    if len(rows) < COMPACT_DELTA_USERS:
        known, others = base_users.split(rows)
    lite.executemany(_ADD_USER_DELTAS, known)
    lite.executemany(_ADD_USER_TOTALS, others)
    for row in others:
        base_users.add(row[0])


class _BaseUsers:
    """The user ids that have a row in ``user_totals_base``: a bitmap over ids 0..LIMIT-1.

    Looking a user up in the base costs ~3 us in SQLite, more than adding its delta; ids outside
    the bitmap count as unknown (their sums are upserted into the base, which is always right).
    The bitmap belongs to the writer: it is dropped with it when an export fails.
    """

    LIMIT = 1 << 27  # ids below 134M: 16 MiB at most

    def __init__(self, lite: sqlite3.Connection) -> None:
        (highest,) = lite.execute("SELECT max(user_id) FROM user_totals_base").fetchone()
        self._bits = bytearray(min(highest or 0, self.LIMIT) // 8 + 1)
        bits = self._bits
        for (user_id,) in lite.execute("SELECT user_id FROM user_totals_base"):
            if 0 <= user_id < self.LIMIT:
                bits[user_id >> 3] |= 1 << (user_id & 7)

    def add(self, user_id: int) -> None:
        if 0 <= user_id < self.LIMIT:
            byte = user_id >> 3
            if byte >= len(self._bits):
                self._bits.extend(bytes(byte + 1 - len(self._bits)))
            self._bits[byte] |= 1 << (user_id & 7)

    def split(self, rows: list[Any]) -> tuple[list[Any], list[Any]]:
        """Rows whose first value is a known user id, and the others (a hot loop: inlined)."""
        bits, size = self._bits, len(self._bits)
        known: list[Any] = []
        others: list[Any] = []
        for row in rows:
            user_id = row[0]
            byte = user_id >> 3
            if 0 <= byte < size and bits[byte] >> (user_id & 7) & 1:
                known.append(row)
            else:
                others.append(row)
        return known, others


def _compact_user_totals(writer: _Writer) -> None:
    """Fold the user_totals delta into the base once it is large, in a transaction of its own.

    The view shows the same totals before and after; a crash rolls it back, changing nothing.
    """
    lite = writer.lite
    (waiting,) = lite.execute("SELECT count(*) FROM user_totals_delta").fetchone()
    if waiting < COMPACT_DELTA_USERS:
        return
    started = time.perf_counter()
    try:
        lite.execute("BEGIN IMMEDIATE")
        lite.execute(_FOLD_DELTAS)
        lite.execute("DELETE FROM user_totals_delta")
        lite.execute("COMMIT")
    except BaseException:
        _drop_writer()
        raise
    _after_commit(writer)
    log.info(
        "sqlite_user_totals_compacted",
        extra={
            "fields": {
                "sqlite": str(writer.path),
                "users": waiting,
                "seconds": round(time.perf_counter() - started, 4),
            }
        },
    )


# --- writing SQLite -------------------------------------------------------------------------

# The exporter keeps one connection open between exports, its page cache warmed with the user
# totals: 1,000 random users touch ~1,000 pages, and reading them cold costs ~40 ms per export.
# WAL checkpoints run on a thread of their own (_Checkpointer), so no export waits for one.
_writer_lock = threading.RLock()


@dataclass
class _Writer:
    path: Path
    identity: tuple[int, int]  # (st_dev, st_ino): a full export replaces the file
    lite: sqlite3.Connection
    checkpointer: _Checkpointer
    base_users: _BaseUsers
    changes_at_checkpoint: int = 0

    def close(self) -> None:
        self.checkpointer.close()
        self.lite.close()  # an open transaction rolls back


_open_writer: _Writer | None = None


def _writer(path: Path) -> _Writer:
    """The cached writer for ``path``, reopened if the file was replaced meanwhile."""
    global _open_writer
    stat = path.stat()
    identity = (stat.st_dev, stat.st_ino)
    if _open_writer is not None:
        if _open_writer.path == path and _open_writer.identity == identity:
            return _open_writer
        _drop_writer()
    _remove_database(_aside(path))  # left by a full export that was killed
    _remove_database(_side(path))
    try:
        lite = _open_sqlite(path)
    except sqlite3.OperationalError:  # locked, unreadable: the environment, not the file
        raise
    except sqlite3.DatabaseError as exc:  # not a database, malformed
        raise _RebuildNeeded(str(exc)) from exc
    base_users = _BaseUsers(lite)  # reads the base's ids: warms the page cache too
    lite.execute("SELECT max(tx_count) FROM user_totals_delta").fetchall()
    _open_writer = _Writer(
        path, identity, lite, _Checkpointer(path), base_users, lite.total_changes
    )
    return _open_writer


def _drop_writer() -> None:
    global _open_writer
    if _open_writer is not None:
        _open_writer.close()
        _open_writer = None


def close_sqlite() -> None:
    """Close the exporter's SQLite connection (the daemon calls this when it stops)."""
    with _writer_lock:
        _drop_writer()


def _open_sqlite(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN/COMMIT), WAL, synchronous=NORMAL."""
    lite = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    try:
        lite.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may lose the last commits, never consistency. The
        # watermark rolls back with the rows it describes, so the next export redoes them.
        lite.execute("PRAGMA synchronous=NORMAL")
        lite.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # The automatic checkpoint (every 1,000 pages) would run inside nearly every COMMIT.
        lite.execute("PRAGMA wal_autocheckpoint=0")
        lite.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        lite.executescript(SQLITE_SCHEMA)
    except BaseException:
        lite.close()
        raise
    return lite


def _after_commit(writer: _Writer) -> None:
    """Ask for a checkpoint once enough rows changed since the last one."""
    changes = writer.lite.total_changes
    if changes - writer.changes_at_checkpoint >= CHECKPOINT_EVERY_CHANGES:
        writer.changes_at_checkpoint = changes
        writer.checkpointer.request()


class _Checkpointer:
    """Copies the WAL back into the database on its own thread and connection.

    PASSIVE checkpoints never block readers or the writer; the writer keeps appending meanwhile.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        lite = sqlite3.connect(self._path, isolation_level=None, timeout=30.0)
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                self._checkpoint(lite)
        finally:
            lite.close()

    def _checkpoint(self, lite: sqlite3.Connection) -> None:
        started = time.perf_counter()
        try:
            busy, frames, copied = lite.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            log.exception("sqlite_checkpoint_failed", extra={"fields": {"sqlite": str(self._path)}})
            return
        log.debug(
            "sqlite_checkpoint",
            extra={
                "fields": {
                    "sqlite": str(self._path),
                    "frames": frames,
                    "copied": copied,
                    "busy": busy,
                    "seconds": round(time.perf_counter() - started, 4),
                }
            },
        )


def _state(lite: sqlite3.Connection, key: str) -> str | None:
    row = lite.execute("SELECT value FROM export_state WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def _watermark(lite: sqlite3.Connection) -> int:
    """The last exported file id; raises _RebuildNeeded for a file of another format."""
    fmt = _state(lite, "format")
    if fmt != EXPORT_FORMAT:
        raise _RebuildNeeded(f"export format {fmt!r}, expected {EXPORT_FORMAT!r}")
    return int(_state(lite, "last_file_id") or 0)


def _write_state(lite: sqlite3.Connection, last_file_id: int, last_sha: str | None) -> None:
    lite.executemany(
        "INSERT OR REPLACE INTO export_state (key, value) VALUES (?, ?)",
        [
            ("format", EXPORT_FORMAT),
            ("last_file_id", str(last_file_id)),
            ("last_file_sha256", last_sha or ""),
            ("exported_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        ],
    )


def _insert_batches(
    lite: sqlite3.Connection,
    table: str,
    columns: str,
    batches: Iterable[Any],
    verb: str,
) -> int:
    """Insert Arrow record batches (their leading columns); returns the row count."""
    total = 0
    for batch in batches:
        if batch.num_rows:
            lists = [_python_list(column) for column in batch.columns]
            _insert_lists(lite, table, columns, lists, verb)
            total += batch.num_rows
    return total


def _python_list(column: Any) -> list[Any]:
    """An Arrow column as a Python list.

    A dictionary-encoded column (a DuckDB ENUM such as ``transaction_type``) maps its indices to
    its few words: every row shares one str object instead of a new one, ~35 ns less per row.
    """
    if pa.types.is_dictionary(column.type) and not column.null_count:
        return list(map(column.dictionary.to_pylist().__getitem__, column.indices.to_pylist()))
    values: list[Any] = column.to_pylist()
    return values


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
    lite: sqlite3.Connection,
    table: str,
    columns: str,
    flat: list[Any],
    verb: str,
) -> None:
    """Insert rows laid end to end in ``flat``.

    Plain INSERTs put ``ROWS_PER_STATEMENT`` rows in each statement: that nearly halves the
    per-row cost of sqlite3's ``executemany`` (1.37M vs 0.75M rows/s). INSERT OR REPLACE goes
    one row per statement, which measured faster for it (3.1 vs 5.8 ms for 1,000 rows).
    """
    width = columns.count(",") + 1
    one_row = "(" + ", ".join("?" * width) + ")"
    head = f"{verb} INTO {table} ({columns}) VALUES "
    per_statement = width * ROWS_PER_STATEMENT
    whole = len(flat) // per_statement * per_statement if verb == "INSERT" else 0
    if whole:
        multi = head + ", ".join([one_row] * ROWS_PER_STATEMENT)
        groups = itertools.islice(flat, whole)
        lite.executemany(multi, zip(*[groups] * per_statement, strict=False))
    if whole < len(flat):
        rest = iter(flat[whole:])
        lite.executemany(head + one_row, zip(*[rest] * width, strict=False))


def _retire_wal(sqlite_path: Path) -> None:
    """Checkpoint and truncate the live file's WAL before a rename replaces the file.

    WAL frames are not tied to a database file: frames left in ``<name>-wal`` would be replayed
    onto the new file and corrupt it.
    """
    if not sqlite_path.exists():
        return
    wal = sqlite_path.with_name(sqlite_path.name + "-wal")
    lite = sqlite3.connect(sqlite_path, isolation_level=None, timeout=30.0)
    try:
        busy = lite.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError:  # not a database: nobody can be reading it, drop its WAL
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                sqlite_path.with_name(sqlite_path.name + suffix).unlink()
        return
    finally:
        lite.close()
    if busy and busy[0] and wal.exists() and wal.stat().st_size > 0:
        raise sqlite3.OperationalError(
            f"cannot replace {sqlite_path}: a reader holds its WAL (busy checkpoint)"
        )


def _aside(sqlite_path: Path) -> Path:
    return sqlite_path.with_name(sqlite_path.name + ".rebuild")


def _side(sqlite_path: Path) -> Path:
    return sqlite_path.with_name(sqlite_path.name + ".rebuild-side")


def _remove_database(path: Path) -> None:
    for suffix in ("", "-journal", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _log_result(result: ExportResult) -> None:
    log.info(
        "sqlite_exported",
        extra={
            "fields": {
                "sqlite": str(result.sqlite_path),
                "full": result.full,
                "files": result.files,
                "users": result.users,
                "transactions": result.transactions,
                "last_file_id": result.last_file_id,
                "seconds": round(result.seconds, 4),
            }
        },
    )
