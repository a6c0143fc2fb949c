"""The rules that need other rows (``rules.py``), evaluated: copies within a file, rows already
stored, files in order.

Rows that passed their own rules wait in the pending tables (``pending.py``) or, for a batch
of small files, in ``GatheredRows`` in memory. ``resolve`` decides every pending row's verdict in
one set of statements (ids pending only once, nearly all of them, by one join with the stored
rows; only the few ids pending more than once go through the ordering rules);
``resolve_gathered`` decides the same in Python with one lookup of the stored rows, where a
statement's fixed cost would be most of the work. Both append the rows that load, so a batch
of files gives exactly what the same files one after the other give.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

import duckdb
import pyarrow as pa

from moneylion import candidates
from moneylion.db import INDEX_LOOKUP_MAX, append_arrow, int_constants, registered, utc_now
from moneylion.load import Applied
from moneylion.model import COLUMNS, DOMAINS, TABLES, FileKind
from moneylion.pending import GatheredRows, arrow_rejects, insert_rejects, upsert_users
from moneylion.rules import (
    IMMUTABLE,
    REJECTED,
    VERDICTS,
    Verdict,
    copies_in_file,
    message,
    message_sql,
    versus,
    versus_sql,
)
from moneylion.validate import Reject

# --- verdicts ---------------------------------------------------------------------------------

# Ids pending more than once (in one file or in several): comparing the contents of every id
# would cost seconds for a large file, those of the few repeated ones nothing.
_REPEATED = """
CREATE OR REPLACE TEMP TABLE pending_repeated AS
SELECT {key} AS id FROM pending GROUP BY ALL HAVING count(*) > 1
"""
# Per file and repeated id: how many variants its copies in that file have, the first line.
_COPIES = """
CREATE OR REPLACE TEMP TABLE pending_copies AS
SELECT file_id, {key} AS id, count(DISTINCT ({content})) AS variants, min(line) AS first_line
FROM pending WHERE {key} IN (SELECT id FROM pending_repeated) GROUP BY ALL
"""
_STORED = """
CREATE OR REPLACE TEMP TABLE pending_stored AS
SELECT {key} AS id, {content}, file_id FROM {table}
WHERE {key} IN (SELECT {key} FROM pending)
"""
# The copy of a repeated id that survives each file's copies, its place among the files (nth)
# and the surviving copy of the file before it (previous).
_SURVIVORS = """
SELECT s.file_id, s.line, s.{key} AS id,
       row_number() OVER (PARTITION BY s.{key} ORDER BY s.file_id) AS nth,
       lag(({content})) OVER (PARTITION BY s.{key} ORDER BY s.file_id) AS previous
FROM pending s JOIN pending_copies p ON p.file_id = s.file_id AND p.id = s.{key}
WHERE p.variants = 1 AND s.line = p.first_line
"""
# Every pending row's verdict: rows of an id pending once against the stored rows alone; rows of
# a repeated id against their copies in their file, then the stored row, then (by the kind's
# rule) the surviving copies of earlier files. {unique} and {repeated} are the kind's cases.
_VERDICTS = """
CREATE OR REPLACE TEMP TABLE pending_verdicts AS
WITH survivors AS ({survivors})
SELECT s.*, CASE {unique} END AS verdict, t.file_id AS against
FROM pending s LEFT JOIN pending_stored t ON t.id = s.{key}
WHERE s.{key} NOT IN (SELECT id FROM pending_repeated)
UNION ALL
SELECT s.*,
       CASE WHEN c.variants > 1 THEN '{in_file}'
            WHEN s.line <> c.first_line THEN '{copy}'
            {repeated} END AS verdict,
       {against} AS against
FROM pending s
JOIN pending_copies c ON c.file_id = s.file_id AND c.id = s.{key}
LEFT JOIN survivors v ON v.file_id = s.file_id AND v.line = s.line
LEFT JOIN pending_stored t ON t.id = s.{key}
{joins}"""
# The row an id already has, for a row of a repeated id that survived its file's copies: of an
# immutable kind the first (stored, else the first file's survivor: f), of the others the
# latest (the survivor of the file before, else stored).
_HELD = {
    True: {
        "held": "CASE WHEN t.id IS NOT NULL THEN ({t_content}) ELSE ({f_content}) END",
        "has_held": "(t.id IS NOT NULL OR v.nth > 1)",
        "against": "coalesce(t.file_id, f.file_id)",
        "joins": """LEFT JOIN survivors fv ON fv.id = s.{key} AND fv.nth = 1
LEFT JOIN pending f ON f.file_id = fv.file_id AND f.line = fv.line""",
    },
    False: {
        "held": "coalesce(v.previous, ({t_content}))",
        "has_held": "(v.nth > 1 OR t.id IS NOT NULL)",
        "against": "t.file_id",
        "joins": "",
    },
}
_REJECTS = """
INSERT INTO pending_rejects
SELECT file_id, line, verdict, CASE verdict {messages} END, raw_line
FROM pending_verdicts WHERE verdict IN $rejected
"""
_APPEND_TRANSACTIONS = """
INSERT INTO {table} SELECT {columns}, file_id FROM pending_verdicts WHERE verdict = '{load}'
"""
# The latest file's profile of each user lands; earlier ones of the batch were overwritten.
_USERS_LOADED = """
SELECT * FROM pending_verdicts WHERE verdict = '{load}'
QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY file_id DESC) = 1"""
_COUNTS = "SELECT file_id, verdict, count(*) FROM pending_verdicts GROUP BY ALL"
_TEMPORARY = ("pending", "pending_repeated", "pending_copies", "pending_stored", "pending_verdicts")


def _sql(template: str, kind: FileKind, **parts: str) -> str:
    key, *rest = COLUMNS[kind]
    return template.format(
        **parts,
        key=key,
        table=TABLES[kind].name,
        columns=", ".join(COLUMNS[kind]),
        content=", ".join(rest),
        s_content=", ".join(f"s.{c}" for c in rest),
        t_content=", ".join(f"t.{c}" for c in rest),
        f_content=", ".join(f"f.{c}" for c in rest),
        survivors=_SURVIVORS.format(key=key, content=", ".join(rest)),
        load=Verdict.LOAD,
        copy=Verdict.COPY,
        in_file=Verdict.DUPLICATE_IN_FILE,
    )


def _verdicts_sql(kind: FileKind) -> str:
    """``pending_verdicts``: the rule book's rules (``rules.versus``) over the pending rows."""
    held = {part: _sql(text, kind) for part, text in _HELD[IMMUTABLE[kind]].items()}
    content = _sql("{s_content}", kind)
    unique = versus_sql(kind, content, _sql("{t_content}", kind), "t.id IS NOT NULL")
    repeated = versus_sql(kind, content, held["held"], held["has_held"])
    return _sql(
        _VERDICTS,
        kind,
        unique=unique,
        repeated=repeated,
        against=held["against"],
        joins=held["joins"],
    )


def resolve(conn: duckdb.DuckDBPyConnection, kind: FileKind) -> dict[int, Applied]:
    """Decide every pending row, append those that load, put the rejects found here in
    ``pending_rejects``; per file id, what was loaded and duplicated (the rejects are counted
    by ``store_rejects``)."""
    key = COLUMNS[kind][0]
    conn.execute(_sql(_REPEATED, kind))
    conn.execute(_sql(_COPIES, kind))
    conn.execute(_sql(_STORED, kind))
    conn.execute(_verdicts_sql(kind))
    candidates.keep_pending(conn, kind)
    messages = " ".join(
        f"WHEN '{verdict}' THEN {message_sql(verdict, key, 'against')}" for verdict in REJECTED
    )
    conn.execute(_REJECTS.format(messages=messages), {"rejected": [str(v) for v in REJECTED]})
    if kind is FileKind.USERS:
        upsert_users(conn, _sql(_USERS_LOADED, kind), utc_now())
    else:
        conn.execute(_sql(_APPEND_TRANSACTIONS, kind))
    applied: dict[int, Applied] = defaultdict(Applied)
    for file_id, verdict, count in conn.execute(_COUNTS).fetchall():
        applied[file_id].count(Verdict(verdict), int(count))
    conn.execute("; ".join(f"DROP TABLE {table}" for table in _TEMPORARY))
    return dict(applied)


# --- the same rules over rows held in memory (a batch of small files) --------------------------

# What ``resolve`` decides with a dozen statements, decided here in Python over the gathered rows
# with one lookup of the stored copies: for a batch of small files each statement's fixed cost,
# not the rows, is what a batch pays. tests/test_batch.py's property test holds
# these verdicts to the single-file paths', which use ``resolve``.


def resolve_gathered(
    conn: duckdb.DuckDBPyConnection, rows_in: GatheredRows, now: dt.datetime, line_bytes: int
) -> dict[int, Applied]:
    """Decide the rows gathered in ``rows_in`` (files in order), append those that load, store
    every reject (the field rules' and these) in line order, raw lines kept up to
    ``line_bytes``; per file id, what was applied."""
    kind = rows_in.kind
    key, *rest = COLUMNS[kind]
    ids = rows_in.columns[key]
    contents = list(zip(*(rows_in.columns[name] for name in rest), strict=True))
    stored = _stored(conn, kind, ids)
    in_file = copies_in_file(list(zip(rows_in.file_ids, ids, strict=True)), contents)
    immutable = IMMUTABLE[kind]
    earlier: dict[object, tuple[tuple[object, ...], int]] = {}  # id -> the batch's row for it
    applied: dict[int, Applied] = defaultdict(Applied)
    loaded: list[int] = []
    kept: list[int] = []  # candidates that do not load (candidates.py)
    rejects = list(rows_in.rejects)
    for i, (file_id, row_id) in enumerate(zip(rows_in.file_ids, ids, strict=True)):
        verdict, against = in_file[i], None
        if verdict is None:
            # The row its id already has: the first for an immutable kind, else the latest.
            first, last = stored.get(row_id), earlier.get(row_id)
            held = (first or last) if immutable else (last or first)
            verdict = versus(kind, contents[i], held[0] if held else None)
            against = held[1] if held else None
            if verdict is Verdict.LOAD or (verdict is Verdict.DUPLICATE and not immutable):
                earlier[row_id] = (contents[i], file_id)
        applied[file_id].count(verdict)
        if verdict in candidates.KEPT:
            kept.append(i)
        if verdict is Verdict.LOAD:
            loaded.append(i)
        elif verdict in REJECTED:
            reject = Reject(
                rows_in.lines[i],
                VERDICTS[verdict].reason,
                message(verdict, key, row_id, against),
                rows_in.raw_lines[i],
            )
            rejects.append((file_id, reject))
    if kind is FileKind.USERS:  # the latest file's profile of each user lands
        latest = {ids[i]: i for i in loaded}
        kept += set(loaded) - set(latest.values())
        loaded = sorted(latest.values())
    candidates.keep_gathered(
        conn,
        kind,
        rows_in.columns,
        rows_in.file_ids,
        sorted(kept),
        rows_in.lines,
        rows_in.raw_lines,
    )
    if loaded:
        _append_loaded(conn, rows_in, loaded, now)
    if rejects:
        with registered(conn, "gathered_rejects", arrow_rejects(rejects)):
            insert_rejects(conn, "SELECT * FROM gathered_rejects", line_bytes)
        for file_id, reject in rejects:
            reasons = applied[file_id].rejected_by_reason
            reasons[reject.reason] = reasons.get(reject.reason, 0) + 1
    rows_in.clear()
    return dict(applied)


def _stored(
    conn: duckdb.DuckDBPyConnection, kind: FileKind, ids: list[object]
) -> dict[object, tuple[tuple[object, ...], int]]:
    """id -> (stored content, file id) for the ``ids`` already stored."""
    key, *rest = COLUMNS[kind]
    select = f"SELECT {key}, {', '.join(rest)}, file_id FROM {TABLES[kind].name}"
    if kind is FileKind.USERS and len(ids) <= INDEX_LOOKUP_MAX:
        # Through the users' primary key index, where a joined list would scan every user.
        found = conn.execute(f"{select} WHERE {key} IN ({int_constants(ids)})").fetchall()
    else:  # transactions have no index: the join's bounds on the ids prune by zone maps
        with registered(conn, "batch_ids", pa.table({"id": pa.array(ids, DOMAINS[key].arrow)})):
            found = conn.execute(f"{select} WHERE {key} IN (SELECT id FROM batch_ids)").fetchall()
    return {row[0]: (tuple(row[1:-1]), row[-1]) for row in found}


def _append_loaded(
    conn: duckdb.DuckDBPyConnection, rows_in: GatheredRows, rows: list[int], now: dt.datetime
) -> None:
    arrays = {
        name: pa.array([values[i] for i in rows], type=DOMAINS[name].arrow)
        for name, values in rows_in.columns.items()
    }
    arrays["file_id"] = pa.array([rows_in.file_ids[i] for i in rows], type=pa.int64())
    if rows_in.kind is FileKind.TRANSACTIONS:
        append_arrow(conn, TABLES[FileKind.TRANSACTIONS].name, pa.table(arrays))
        return
    with registered(conn, "arrow_batch", pa.table(arrays)):
        upsert_users(conn, "SELECT * FROM arrow_batch", now)
