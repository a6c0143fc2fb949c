"""The SQLite file's tables, the SQL that adds to its exact totals, and its ``export_state``.

Money in the aggregate tables stays exact: totals are TEXT decimal strings with two decimals
(``"1234.50"``, the form of the ``/v1`` API), never REAL; increments add integer cents to them
inside SQLite (``printf('%d.%02d', ...)``). For exact arithmetic in SQL use
``CAST(replace(total_amount, '.', '') AS INTEGER)`` (cents). Only the seed's
``transactions.amount`` is REAL, for compatibility.

``user_totals`` is a VIEW with the columns and TEXT totals it had as a table:
``user_totals_base`` (one row per user, TEXT totals: what a full export writes) LEFT JOIN
``user_totals_delta`` (at most one row per user, only for users the base has: the integer cents
that small increments added since the last compaction). Why: 1,000 scattered users dirty ~1,000
of the base's ~16k pages, and writing those to the WAL at COMMIT (~9 ms) plus the TEXT upserts
(~9 ms) alone broke the 20 ms target; the delta's few hundred pages and integer upserts cost
~2 + ~3 ms. Read cost: a point lookup or a join on ``user_id`` reads one base row and one delta
row by key (~12 vs ~11 us for a table); a scan joins each base row to the small delta (~0.44 vs
~0.24 s for 1M users with 3,000 in the delta); rows come in ``user_id`` order.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Final

# Stored in export_state; a file of another format is rebuilt by a full export.
EXPORT_FORMAT: Final = "moneylion-sqlite-export 4"


def cents(text: str) -> str:
    """SQL for a two-decimal TEXT total as integer cents."""
    return f"CAST(replace({text}, '.', '') AS INTEGER)"


def text(cents_sql: str) -> str:
    """SQL for integer cents (>= 0) as a two-decimal TEXT total."""
    return f"printf('%d.%02d', ({cents_sql}) / 100, ({cents_sql}) % 100)"


def _plus(column: str, cents_sql: str) -> str:
    """SQL setting a TEXT total to itself plus ``cents_sql``."""
    return f"{column} = " + text(f"{cents(column)} + {cents_sql}")


def _sum_of(kind: str) -> str:
    """A ``user_totals`` view column: the base total plus the delta's cents, if any."""
    total = text(cents(f"b.total_{kind}") + f" + d.{kind}_cents")
    return f"CASE WHEN d.user_id IS NULL THEN b.total_{kind} ELSE {total} END AS total_{kind}"


SQLITE_SCHEMA: Final = f"""
CREATE TABLE IF NOT EXISTS users (
    user_id INTEGER PRIMARY KEY, signup_date TEXT, country TEXT);
CREATE TABLE IF NOT EXISTS transactions (
    transaction_id INTEGER PRIMARY KEY, user_id INTEGER, transaction_date TEXT,
    amount REAL, transaction_type TEXT);
CREATE TABLE IF NOT EXISTS files (
    file_id INTEGER PRIMARY KEY, name TEXT NOT NULL, sha256 TEXT, kind TEXT,
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
CREATE TABLE IF NOT EXISTS country_monthly_totals (
    month TEXT NOT NULL, country TEXT, transaction_type TEXT NOT NULL,
    tx_count INTEGER NOT NULL, total_amount TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS country_monthly_totals_key
    ON country_monthly_totals (month, country, transaction_type);
CREATE TABLE IF NOT EXISTS export_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

# Per-user sums are rows of numbered parameters: user_id, count, total, deposit, withdrawal,
# purchase cents, first date, last date. Users already in the base get them added in the delta
# table (integer sums, no TEXT to parse and print); new users get their row in the base.
ADD_USER_DELTAS: Final = """
INSERT INTO user_totals_delta (user_id, tx_count, amount_cents, deposit_cents, withdrawal_cents,
    purchase_cents, first_date, last_date)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
ON CONFLICT (user_id) DO UPDATE SET tx_count = tx_count + ?2,
    amount_cents = amount_cents + ?3, deposit_cents = deposit_cents + ?4,
    withdrawal_cents = withdrawal_cents + ?5, purchase_cents = purchase_cents + ?6,
    first_date = min(first_date, ?7), last_date = max(last_date, ?8)"""
ADD_USER_TOTALS: Final = f"""
INSERT INTO user_totals_base (user_id, tx_count, total_amount, total_deposit, total_withdrawal,
    total_purchase, first_date, last_date)
VALUES (?1, ?2, {text("?3")}, {text("?4")}, {text("?5")}, {text("?6")}, ?7, ?8)
ON CONFLICT (user_id) DO UPDATE SET tx_count = tx_count + ?2,
    {_plus("total_amount", "?3")}, {_plus("total_deposit", "?4")},
    {_plus("total_withdrawal", "?5")}, {_plus("total_purchase", "?6")},
    first_date = min(first_date, ?7), last_date = max(last_date, ?8)"""
# Compaction: the delta folded into the base in user_id order (then emptied), as one UPSERT
# that scans the delta and looks up the base (an UPDATE ... FROM would scan the 1M base rows).
FOLD_DELTAS: Final = f"""
INSERT INTO user_totals_base (user_id, tx_count, total_amount, total_deposit, total_withdrawal,
    total_purchase, first_date, last_date)
SELECT user_id, tx_count, {text("amount_cents")}, {text("deposit_cents")},
    {text("withdrawal_cents")}, {text("purchase_cents")}, first_date, last_date
FROM user_totals_delta WHERE true
ON CONFLICT (user_id) DO UPDATE SET tx_count = tx_count + excluded.tx_count,
    {_plus("total_amount", cents("excluded.total_amount"))},
    {_plus("total_deposit", cents("excluded.total_deposit"))},
    {_plus("total_withdrawal", cents("excluded.total_withdrawal"))},
    {_plus("total_purchase", cents("excluded.total_purchase"))},
    first_date = min(first_date, excluded.first_date),
    last_date = max(last_date, excluded.last_date)"""
# Rows of DuckDB's country_monthly_totals that changed replace the SQLite file's (by month,
# country, type; country NULL for orphans, which no key would match): deleted, then inserted
# again unless their count fell to zero.
DELETE_COUNTRY_MONTHLY: Final = """
DELETE FROM country_monthly_totals WHERE month = ?1 AND country IS ?2 AND transaction_type = ?3"""
INSERT_COUNTRY_MONTHLY: Final = """
INSERT INTO country_monthly_totals (month, country, transaction_type, tx_count, total_amount)
VALUES (?1, ?2, ?3, ?4, ?5)"""
# date, type, count, cents
ADD_DAILY_TOTALS: Final = f"""
INSERT INTO daily_totals (transaction_date, transaction_type, tx_count, total_amount)
VALUES (?1, ?2, ?3, {text("?4")})
ON CONFLICT (transaction_date, transaction_type) DO UPDATE SET tx_count = tx_count + ?3,
    {_plus("total_amount", "?4")}"""


class RebuildNeeded(Exception):
    """The SQLite file is not an export of this warehouse (or of this format)."""


def state(lite: sqlite3.Connection, key: str) -> str | None:
    """One value of ``export_state``, None if unset."""
    row = lite.execute("SELECT value FROM export_state WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def watermark(lite: sqlite3.Connection) -> int:
    """The last exported file id; raises RebuildNeeded for a file of another format."""
    fmt = state(lite, "format")
    if fmt != EXPORT_FORMAT:
        raise RebuildNeeded(f"export format {fmt!r}, expected {EXPORT_FORMAT!r}")
    return int(state(lite, "last_file_id") or 0)


def write_state(lite: sqlite3.Connection, last_file_id: int, last_sha: str | None) -> None:
    """Store the watermark, in the open transaction that wrote what it describes."""
    lite.executemany(
        "INSERT OR REPLACE INTO export_state (key, value) VALUES (?, ?)",
        [
            ("format", EXPORT_FORMAT),
            ("last_file_id", str(last_file_id)),
            ("last_file_sha256", last_sha or ""),
            ("exported_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        ],
    )
