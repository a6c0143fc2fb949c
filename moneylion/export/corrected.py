"""An export range holding corrections (retract, restore, replace): what they decided again.

A correction decides again the ids its files (the file, and a replacement's new one) have
candidates of (``corrections.py``), and only those: their base rows, the totals of the users
and days of those rows before and after, the top list, the ledger rows of the files with a
candidate among them, and the country totals it changed (stamped with its change id, copied as
the range's). So the SQLite rows of the touched ids are deleted and DuckDB's rows of those ids
and of the range's new files copied; the totals of every user and day they touch, before and
after, are DuckDB's, not sums added. All of it in the export's one SQLite transaction, with the
watermark.

Other actions (a release) and corrections touching more rows than an increment takes
(``Tuning.large_increment_rows``) go to a full rebuild.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb

from moneylion import candidates
from moneylion.export.schema import RebuildNeeded
from moneylion.export.snapshot import select_as_sqlite
from moneylion.export.writer import BaseUsers
from moneylion.ledger import LEDGER_COLUMNS
from moneylion.model import DAILY_TOTALS, TABLES, USER_TOTALS, FileKind

TARGETED = ("retract", "restore", "replace")

# The files each correction of the range acted on (a replacement: the old and the new), with
# their parts.
_CORRECTED = """
WITH named AS (
    SELECT action, file_id FROM corrections WHERE change_id > $lo
    UNION ALL
    SELECT action, by_file_id FROM corrections WHERE change_id > $lo AND by_file_id IS NOT NULL)
SELECT n.action, f.file_id, f.kind FROM named n JOIN files f USING (file_id)
UNION ALL
SELECT n.action, p.file_id, f.kind FROM named n
JOIN file_parts p ON p.first_file_id = n.file_id JOIN files f ON f.file_id = p.file_id
"""
# Every candidate (id, file) of the ids those files have candidates of, at most $limit + 1.
_TOUCHED = """
WITH ids AS (
    SELECT {key} AS id FROM {table} WHERE file_id IN (SELECT unnest($files::BIGINT[]))
    UNION SELECT {key} FROM {kept} WHERE file_id IN (SELECT unnest($files::BIGINT[])))
SELECT {key}, file_id FROM {table} WHERE {key} IN (SELECT id FROM ids)
UNION SELECT {key}, file_id FROM {kept} WHERE {key} IN (SELECT id FROM ids)
LIMIT $limit + 1
"""
_IN_LIST = "IN (SELECT unnest(${name}::{kind}[]))"  # DuckDB: a list parameter
_IN_IDS = _IN_LIST.format(name="ids", kind="BIGINT")
_IN_JSON = "IN (SELECT value FROM json_each(?))"  # SQLite: a list bound as one JSON parameter


@dataclass(frozen=True)
class Touched:
    """What the range's corrections decided again: ids by kind, and the ledger rows changed."""

    ids: dict[FileKind, list[int]]
    files: list[int]


def touched(cur: duckdb.DuckDBPyConnection, lo: int, limit: int) -> Touched:
    """The ids and ledger rows the corrections after ``lo`` changed; RebuildNeeded for another
    action, or more than ``limit`` candidates."""
    files: dict[FileKind, list[int]] = {kind: [] for kind in FileKind}
    changed: set[int] = set()
    for action, file_id, kind in cur.execute(_CORRECTED, {"lo": lo}).fetchall():
        if action not in TARGETED:
            raise RebuildNeeded(f"a correction ({action}) since the last export")
        files[FileKind(kind)].append(int(file_id))
        changed.add(int(file_id))
    ids: dict[FileKind, list[int]] = {}
    for kind, corrected in files.items():
        if not corrected:
            continue
        query = _TOUCHED.format(
            key=TABLES[kind].key, table=TABLES[kind].name, kept=candidates.TABLE[kind]
        )
        pairs = cur.execute(query, {"files": corrected, "limit": limit}).fetchall()
        if len(pairs) > limit:
            raise RebuildNeeded(f"corrections of more than {limit} rows since the last export")
        ids[kind] = sorted({int(pair[0]) for pair in pairs})
        changed.update(int(pair[1]) for pair in pairs)
    return Touched(ids, sorted(changed))


def copy(
    cur: duckdb.DuckDBPyConnection,
    lite: sqlite3.Connection,
    done: Touched,
    lo: int,
    base_users: BaseUsers,
) -> tuple[int, int]:
    """In the open SQLite transaction: the rows of the touched ids and of the files after
    ``lo``, the totals they touch, the ledger rows changed before ``lo``; (users, transactions).
    The range's own ledger rows and country totals are the caller's."""
    users = _copy_base(cur, lite, FileKind.USERS, done.ids.get(FileKind.USERS, []), lo)
    transactions = _copy_base(
        cur, lite, FileKind.TRANSACTIONS, done.ids.get(FileKind.TRANSACTIONS, []), lo
    )
    if transactions.written or transactions.before:
        _copy_totals(cur, lite, [*transactions.before, *transactions.written], base_users)
    files = [file_id for file_id in done.files if file_id <= lo]
    if files:
        rows = cur.execute(
            f"{select_as_sqlite('files')} WHERE file_id {_IN_IDS}",
            {"ids": files},
        ).fetchall()
        _insert(lite, "files", ", ".join(LEDGER_COLUMNS), rows, "INSERT OR REPLACE")
    return len(users.written), len(transactions.written)


@dataclass(frozen=True)
class Copied:
    before: list[tuple[Any, ...]]  # the SQLite rows of the touched ids, deleted
    written: list[tuple[Any, ...]]  # DuckDB's rows of those ids and of the new files


def _copy_base(
    cur: duckdb.DuckDBPyConnection,
    lite: sqlite3.Connection,
    kind: FileKind,
    ids: list[int],
    lo: int,
) -> Copied:
    """Replace the SQLite rows of ``ids`` by DuckDB's, and add the rows of files after ``lo``."""
    table = TABLES[kind]
    names = ", ".join(table.names)
    before: list[tuple[Any, ...]] = []
    if ids:
        bound = (json.dumps(ids),)
        where = f"WHERE {table.key} {_IN_JSON}"
        before = lite.execute(f"SELECT {names} FROM {table.name} {where}", bound).fetchall()
        lite.execute(f"DELETE FROM {table.name} {where}", bound)
    in_ids = f"{table.key} {_IN_IDS}"
    written = cur.execute(
        f"{select_as_sqlite(table.name)} WHERE file_id > $lo"
        f" UNION ALL {select_as_sqlite(table.name)} WHERE file_id <= $lo AND {in_ids}",
        {"lo": lo, "ids": ids},
    ).fetchall()
    # Users are updated in place by later files; a transaction's id is its row's, once.
    verb = "INSERT OR REPLACE" if kind is FileKind.USERS else "INSERT"
    _insert(lite, table.name, names, written, verb)
    return Copied(before, written)


def _copy_totals(
    cur: duckdb.DuckDBPyConnection,
    lite: sqlite3.Connection,
    rows: list[tuple[Any, ...]],
    base_users: BaseUsers,
) -> None:
    """DuckDB's totals of the users and days of ``rows`` (transactions as SQLite stores them)
    replace the SQLite file's; the top list whole."""
    names = TABLES[FileKind.TRANSACTIONS].names
    user_at, day_at = names.index(USER_TOTALS.key[0]), names.index(DAILY_TOTALS.key[0])
    users = sorted({row[user_at] for row in rows})
    days = sorted({row[day_at] for row in rows})
    # A user may leave the base: its bit goes first (an unknown user's sums are upserted into
    # the base, always right), before the COMMIT, so that a rollback cannot leave it set.
    base_users.discard_all(users)
    for table in ("user_totals_delta", "user_totals_base"):
        lite.execute(
            f"DELETE FROM {table} WHERE {USER_TOTALS.key[0]} {_IN_JSON}", (json.dumps(users),)
        )
    totals = cur.execute(
        f"{select_as_sqlite(USER_TOTALS.table)} WHERE {USER_TOTALS.key[0]} "
        + _IN_LIST.format(name="users", kind="BIGINT"),
        {"users": users},
    ).fetchall()
    _insert(lite, "user_totals_base", ", ".join(USER_TOTALS.columns), totals, "INSERT")
    day = DAILY_TOTALS.key[0]
    lite.execute(f"DELETE FROM {DAILY_TOTALS.table} WHERE {day} {_IN_JSON}", (json.dumps(days),))
    daily = cur.execute(
        f"{select_as_sqlite(DAILY_TOTALS.table)} WHERE {day} "
        + _IN_LIST.format(name="days", kind="DATE"),
        {"days": days},
    ).fetchall()
    _insert(lite, DAILY_TOTALS.table, ", ".join(DAILY_TOTALS.columns), daily, "INSERT")
    top = cur.execute(select_as_sqlite("top_users")).fetchall()
    lite.execute("DELETE FROM top_users")
    _insert(lite, "top_users", "rank, user_id, tx_count", top, "INSERT")


def _insert(
    lite: sqlite3.Connection, table: str, columns: str, rows: Iterable[Sequence[Any]], verb: str
) -> None:
    """One row per statement: a correction's rows are few (the small increments' multi-row
    VALUES matter for the files that keep coming)."""
    marks = ", ".join("?" * (columns.count(",") + 1))
    lite.executemany(f"{verb} INTO {table} ({columns}) VALUES ({marks})", rows)
