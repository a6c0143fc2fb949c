"""The SQLite file's tables, the SQL that adds to its exact totals, and its ``export_state``.

Money in the aggregate tables stays exact: totals are TEXT decimal strings with two decimals
(``"1234.50"``, the form of the ``/v1`` API), never REAL; increments add integer cents to them
inside SQLite (``printf('%d.%02d', ...)``). For exact arithmetic in SQL use
``CAST(replace(total_amount, '.', '') AS INTEGER)`` (cents). Only the seed's
``transactions.amount`` is REAL, for compatibility.

``user_totals`` is a VIEW with the columns and TEXT totals it had as a table:
``user_totals_base`` (one row per user, TEXT totals: what a full export writes) LEFT JOIN
``user_totals_delta`` (at most one row per user, only for users the base has: the integer cents
that small increments added since the last compaction). Why: a small file's users are scattered,
so adding to the base would dirty about one base page per user, all written to the WAL at
COMMIT, plus TEXT upserts; the delta stays a few hundred pages of integer upserts. Reads pay
little for it: a point lookup or a join on ``user_id`` reads one base row and one delta row by
key, a scan joins each base row to the small delta, and rows come in ``user_id`` order.
docs/performance.md has the figures.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Final

from moneylion.ledger import LEDGER, LEDGER_COLUMNS
from moneylion.model import DAILY_TOTALS, TABLES, USER_TOTALS, FileKind, Fold, Measure, Table

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


def delta_name(measure: Measure) -> str:
    """A measure's column in ``user_totals_delta``: money as integer cents."""
    return measure.name.removeprefix("total_") + "_cents" if measure.money else measure.name


def _sqlite_type(measure: Measure, *, as_cents: bool = False) -> str:
    return "INTEGER" if measure.of is None or (measure.money and as_cents) else "TEXT"


def _fold(measure: Measure, column: str, value: str, *, as_cents: bool = False) -> str:
    """SQL folding ``value`` (money: integer cents) into a stored measure ``column``."""
    if measure.fold is Fold.MIN:
        return f"{column} = min({column}, {value})"
    if measure.fold is Fold.MAX:
        return f"{column} = max({column}, {value})"
    if measure.money and not as_cents:
        return _plus(column, value)
    return f"{column} = {column} + {value}"


def _value(measure: Measure, value: str) -> str:
    """SQL for a new row's stored measure, from ``value`` (money: integer cents)."""
    return text(value) if measure.money else value


def _view_column(measure: Measure) -> str:
    """A ``user_totals`` view column: the base's measure with the delta's folded in, if any."""
    base, delta = f"b.{measure.name}", f"d.{delta_name(measure)}"
    if measure.of is None:
        return f"{base} + ifnull({delta}, 0) AS {measure.name}"
    folded = {
        Fold.MIN: f"min({base}, {delta})",
        Fold.MAX: f"max({base}, {delta})",
        Fold.SUM: text(cents(base) + f" + {delta}") if measure.money else f"{base} + {delta}",
    }[measure.fold]
    return f"CASE WHEN d.user_id IS NULL THEN {base} ELSE {folded} END AS {measure.name}"


def _base_table(table: Table) -> str:
    """A base table as the SQLite export keeps it, its key the rowid."""
    key, *rest = table.columns
    columns = [f"{key.name} INTEGER PRIMARY KEY"] + [f"{c.name} {c.domain.sqlite}" for c in rest]
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(columns)});"


def _files_table() -> str:
    """The ledger as the SQLite export keeps it (what the seed had: name and status required)."""
    required = {"name", "status"}
    columns = [f"{LEDGER_COLUMNS[0]} INTEGER PRIMARY KEY"] + [
        f"{name} {_LEDGER_SQLITE.get(str(kind), 'TEXT')}"
        + (" NOT NULL" if name in required else "")
        for name, kind in list(LEDGER.items())[1:]
    ]
    return f"CREATE TABLE IF NOT EXISTS files ({', '.join(columns)});"


_LEDGER_SQLITE = {"int64": "INTEGER", "double": "REAL"}


def _numbered(count: int, start: int = 1) -> list[str]:
    return [f"?{n}" for n in range(start, start + count)]


_USER_KEY = USER_TOTALS.key[0]
_USER_MEASURES = USER_TOTALS.measures
_DELTA_COLUMNS = ", ".join([_USER_KEY, *(delta_name(m) for m in _USER_MEASURES)])
_USER_COLUMNS = ", ".join(USER_TOTALS.columns)
# Parameters of a per-user sum: ?1 the user, then one per measure in declaration order.
_USER_PARAMETERS = _numbered(len(_USER_MEASURES), start=2)
_USER_FOLDS = tuple(zip(_USER_MEASURES, _USER_PARAMETERS, strict=True))

SQLITE_SCHEMA: Final = "\n".join(
    [
        _base_table(TABLES[FileKind.USERS]),
        _base_table(TABLES[FileKind.TRANSACTIONS]),
        _files_table(),
        f"CREATE TABLE IF NOT EXISTS user_totals_base ({_USER_KEY} INTEGER PRIMARY KEY, "
        + ", ".join(f"{m.name} {_sqlite_type(m)} NOT NULL" for m in _USER_MEASURES)
        + ");",
        f"CREATE TABLE IF NOT EXISTS user_totals_delta ({_USER_KEY} INTEGER PRIMARY KEY, "
        + ", ".join(
            f"{delta_name(m)} {_sqlite_type(m, as_cents=True)} NOT NULL" for m in _USER_MEASURES
        )
        + ");",
        f"CREATE VIEW IF NOT EXISTS {USER_TOTALS.table} AS SELECT b.{_USER_KEY} AS {_USER_KEY}, "
        + ", ".join(_view_column(m) for m in _USER_MEASURES)
        + " FROM user_totals_base AS b LEFT JOIN user_totals_delta AS d"
        f" ON d.{_USER_KEY} = b.{_USER_KEY};",
        f"CREATE TABLE IF NOT EXISTS {DAILY_TOTALS.table} ("
        + ", ".join(f"{name} TEXT NOT NULL" for name in DAILY_TOTALS.key)
        + ", "
        + ", ".join(f"{m.name} {_sqlite_type(m)} NOT NULL" for m in DAILY_TOTALS.measures)
        + f", PRIMARY KEY ({', '.join(DAILY_TOTALS.key)})) WITHOUT ROWID;",
        """CREATE TABLE IF NOT EXISTS top_users (
    rank INTEGER PRIMARY KEY, user_id INTEGER NOT NULL, tx_count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS country_monthly_totals (
    month TEXT NOT NULL, country TEXT, transaction_type TEXT NOT NULL,
    tx_count INTEGER NOT NULL, total_amount TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS country_monthly_totals_key
    ON country_monthly_totals (month, country, transaction_type);
CREATE TABLE IF NOT EXISTS export_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);""",
    ]
)

# Per-user sums are rows of numbered parameters: the user, then each measure of USER_TOTALS
# (money in integer cents). Users already in the base get them added in the delta table
# (integer sums, no TEXT to parse and print); new users get their row in the base.
ADD_USER_DELTAS: Final = (
    f"INSERT INTO user_totals_delta ({_DELTA_COLUMNS}) VALUES (?1, {', '.join(_USER_PARAMETERS)})"
    f" ON CONFLICT ({_USER_KEY}) DO UPDATE SET "
    + ", ".join(_fold(m, delta_name(m), p, as_cents=True) for m, p in _USER_FOLDS)
)
ADD_USER_TOTALS: Final = (
    f"INSERT INTO user_totals_base ({_USER_COLUMNS}) VALUES (?1, "
    + ", ".join(_value(m, p) for m, p in _USER_FOLDS)
    + f") ON CONFLICT ({_USER_KEY}) DO UPDATE SET "
    + ", ".join(_fold(m, m.name, p) for m, p in _USER_FOLDS)
)
# Compaction: the delta folded into the base in user_id order (then emptied), as one UPSERT
# that scans the delta and looks up the base (an UPDATE ... FROM would scan the 1M base rows).
FOLD_DELTAS: Final = (
    f"INSERT INTO user_totals_base ({_USER_COLUMNS}) SELECT {_USER_KEY}, "
    + ", ".join(_value(m, delta_name(m)) for m in _USER_MEASURES)
    + f" FROM user_totals_delta WHERE true ON CONFLICT ({_USER_KEY}) DO UPDATE SET "
    + ", ".join(
        _fold(m, m.name, cents(f"excluded.{m.name}") if m.money else f"excluded.{m.name}")
        for m in _USER_MEASURES
    )
)
# Rows of DuckDB's country_monthly_totals that changed replace the SQLite file's (by month,
# country, type; country NULL for orphans, which no key would match): deleted, then inserted
# again unless their count fell to zero.
DELETE_COUNTRY_MONTHLY: Final = """
DELETE FROM country_monthly_totals WHERE month = ?1 AND country IS ?2 AND transaction_type = ?3"""
INSERT_COUNTRY_MONTHLY: Final = """
INSERT INTO country_monthly_totals (month, country, transaction_type, tx_count, total_amount)
VALUES (?1, ?2, ?3, ?4, ?5)"""
# The key's values, then each measure of DAILY_TOTALS (money in integer cents).
_DAILY_KEYS = _numbered(len(DAILY_TOTALS.key))
_DAILY_FOLDS = tuple(
    zip(
        DAILY_TOTALS.measures,
        _numbered(len(DAILY_TOTALS.measures), start=len(_DAILY_KEYS) + 1),
        strict=True,
    )
)
ADD_DAILY_TOTALS: Final = (
    f"INSERT INTO {DAILY_TOTALS.table} ({', '.join(DAILY_TOTALS.columns)}) VALUES ("
    + ", ".join(_DAILY_KEYS + [_value(m, p) for m, p in _DAILY_FOLDS])
    + f") ON CONFLICT ({', '.join(DAILY_TOTALS.key)}) DO UPDATE SET "
    + ", ".join(_fold(m, m.name, p) for m, p in _DAILY_FOLDS)
)


class RebuildNeeded(Exception):
    """The SQLite file is not an export of this warehouse (or of this format)."""


def state(lite: sqlite3.Connection, key: str) -> str | None:
    """One value of ``export_state``, None if unset."""
    row = lite.execute("SELECT value FROM export_state WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def watermark(lite: sqlite3.Connection) -> int:
    """The last change exported (a file id or a correction's change id: one sequence); raises
    RebuildNeeded for a file of another format."""
    fmt = state(lite, "format")
    if fmt != EXPORT_FORMAT:
        raise RebuildNeeded(f"export format {fmt!r}, expected {EXPORT_FORMAT!r}")
    return int(state(lite, "last_file_id") or 0)


def write_state(lite: sqlite3.Connection, high: int, last_file_sha: str | None) -> None:
    """Store the watermark ``high`` and the sha256 of the last file at or below it (this file
    belongs to the warehouse that has it), in the open transaction that wrote what they describe.

    The key stays ``last_file_id`` (the API's replica and older readers know it): after a
    correction it holds the correction's change id.
    """
    lite.executemany(
        "INSERT OR REPLACE INTO export_state (key, value) VALUES (?, ?)",
        [
            ("format", EXPORT_FORMAT),
            ("last_file_id", str(high)),
            ("last_file_sha256", last_file_sha or ""),
            ("exported_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
        ],
    )
