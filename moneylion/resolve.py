"""The rules that need other rows: copies within a file, rows already stored, and files in order.

Rows that passed their own field rules are staged (``staged``: one row per record, with its file
and line) by whichever path read them, for one file or for a batch of files; ``resolve`` then
decides every staged row's verdict in one set of statements and appends the rows that load:

* within a file, identical copies of an id load once (the first), differing copies are all
  rejected (``duplicate_in_file``);
* transactions are immutable: an id already stored, or already loaded by an earlier file of the
  batch, is a ``duplicate`` with the same content and ``conflicts_with_stored`` otherwise;
* users: the latest file wins; a profile identical to the one it would replace (stored, or left
  by an earlier file of the batch) is a ``duplicate``.

So a batch of files gives exactly what the same files one after the other give. Ids staged only
once (nearly all of them) are decided by one join with the stored rows; only the few ids staged
more than once go through the ordering rules.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

from moneylion import aggregates
from moneylion.db import INDEX_LOOKUP_MAX, append_arrow, int_constants, utc_now
from moneylion.model import COLUMNS, DOMAINS, TABLES, FileKind
from moneylion.rules import RejectReason
from moneylion.validate import Reject, ValidatedRows

REJECTED_HERE = ("duplicate_in_file", "conflicts_with_stored")
DUPLICATES = ("duplicate", "copy")  # the same row again: stored, earlier in the batch, or a copy


@dataclass
class Applied:
    loaded: int = 0
    duplicate: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())


# --- staging ----------------------------------------------------------------------------------


def create_staging(conn: duckdb.DuckDBPyConnection, kind: FileKind) -> None:
    """Empty ``staged`` and ``staged_rejects`` temp tables for rows of ``kind``."""
    columns = ", ".join(f"{c.name} {c.domain.staged}" for c in TABLES[kind].columns)
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE staged (file_id BIGINT, {columns}, "
        "line BIGINT, raw_line VARCHAR)"
    )
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE staged_rejects (file_id BIGINT, line_number BIGINT, "
        "reason VARCHAR, message VARCHAR, raw_line VARCHAR)"
    )


class Stager:
    """Good rows and rejects of any number of files of one kind, gathered in Python and staged
    in one Arrow append each (a batch of small files costs two statements, not two per file)."""

    def __init__(self, kind: FileKind) -> None:
        self.kind = kind
        self.clear()

    def clear(self) -> None:
        """Start afresh: nothing gathered."""
        kind = self.kind
        self.columns: dict[str, list[object]] = {name: [] for name in COLUMNS[kind]}
        self.file_ids: list[int] = []
        self.lines: list[int] = []
        self.raw_lines: list[str] = []
        self.rejects: list[tuple[int, Reject]] = []

    def add(self, file_id: int, rows: ValidatedRows) -> None:
        for name, values in rows.columns.items():
            self.columns[name].extend(values)
        self.file_ids.extend([file_id] * len(rows.lines))
        self.lines.extend(rows.lines)
        self.raw_lines.extend(rows.raw_lines)
        self.rejects.extend((file_id, reject) for reject in rows.rejects)

    def flush(self, conn: duckdb.DuckDBPyConnection) -> None:
        """Append what was gathered to ``staged`` / ``staged_rejects``; start afresh."""
        if self.lines:
            arrays = {"file_id": pa.array(self.file_ids, type=pa.int64())}
            for name, values in self.columns.items():
                arrays[name] = pa.array(values, type=DOMAINS[name].arrow)
            arrays["line"] = pa.array(self.lines, type=pa.int64())
            arrays["raw_line"] = pa.array(self.raw_lines, type=pa.string())
            append_arrow(conn, "staged", pa.table(arrays))
        if self.rejects:
            append_arrow(conn, "staged_rejects", arrow_rejects(self.rejects))
        self.clear()


def arrow_rejects(rejects: list[tuple[int, Reject]]) -> pa.Table:
    """(file id, Reject) pairs as a table of ``staged_rejects``' columns."""
    return pa.table(
        {
            "file_id": pa.array([f for f, _ in rejects], type=pa.int64()),
            "line_number": pa.array([r.line_number for _, r in rejects], type=pa.int64()),
            "reason": pa.array([str(r.reason) for _, r in rejects], type=pa.string()),
            "message": pa.array([r.message for _, r in rejects], type=pa.string()),
            "raw_line": pa.array([r.raw_line for _, r in rejects], type=pa.string()),
        }
    )


# --- verdicts ---------------------------------------------------------------------------------

# Ids staged more than once (in one file or in several): comparing the contents of every id
# would cost seconds for a large file, those of the few repeated ones nothing.
_REPEATED = """
CREATE OR REPLACE TEMP TABLE staged_repeated AS
SELECT {key} AS id FROM staged GROUP BY ALL HAVING count(*) > 1
"""
# Per file and repeated id: how many variants its copies in that file have, the first line.
_COPIES = """
CREATE OR REPLACE TEMP TABLE staged_copies AS
SELECT file_id, {key} AS id, count(DISTINCT ({content})) AS variants, min(line) AS first_line
FROM staged WHERE {key} IN (SELECT id FROM staged_repeated) GROUP BY ALL
"""
_STORED = """
CREATE OR REPLACE TEMP TABLE staged_stored AS
SELECT {key} AS id, {content}, file_id FROM {table}
WHERE {key} IN (SELECT {key} FROM staged)
"""
# The copy of a repeated id that survives each file's copies, its place among the files (nth)
# and the surviving copy of the file before it (previous).
_SURVIVORS = """
SELECT s.file_id, s.line, s.{key} AS id,
       row_number() OVER (PARTITION BY s.{key} ORDER BY s.file_id) AS nth,
       lag(({content})) OVER (PARTITION BY s.{key} ORDER BY s.file_id) AS previous
FROM staged s JOIN staged_copies p ON p.file_id = s.file_id AND p.id = s.{key}
WHERE p.variants = 1 AND s.line = p.first_line
"""
# Every staged row's verdict: rows of an id staged once against the stored rows alone; rows of
# a repeated id against their copies in their file, then the stored row, then (by the kind's
# rule) the surviving copies of earlier files. {unique} and {repeated} are the kind's cases.
_VERDICTS = """
CREATE OR REPLACE TEMP TABLE staged_verdicts AS
WITH survivors AS ({survivors})
SELECT s.*, CASE {unique} END AS verdict, t.file_id AS against
FROM staged s LEFT JOIN staged_stored t ON t.id = s.{key}
WHERE s.{key} NOT IN (SELECT id FROM staged_repeated)
UNION ALL
SELECT s.*,
       CASE WHEN c.variants > 1 THEN 'duplicate_in_file'
            WHEN s.line <> c.first_line THEN 'copy'
            {repeated} END AS verdict,
       {against} AS against
FROM staged s
JOIN staged_copies c ON c.file_id = s.file_id AND c.id = s.{key}
LEFT JOIN survivors v ON v.file_id = s.file_id AND v.line = s.line
LEFT JOIN staged_stored t ON t.id = s.{key}
{joins}"""
_VERDICT_CASES = {
    # Transactions are immutable: the first copy among the files loads, a later one is a
    # duplicate if it has the same content, else a conflict.
    FileKind.TRANSACTIONS: {
        "unique": """WHEN t.id IS NULL THEN 'load'
            WHEN ({s_content}) IS NOT DISTINCT FROM ({t_content}) THEN 'duplicate'
            ELSE 'conflicts_with_stored'""",
        "repeated": """WHEN t.id IS NOT NULL AND ({s_content}) IS NOT DISTINCT FROM ({t_content})
                THEN 'duplicate'
            WHEN t.id IS NOT NULL THEN 'conflicts_with_stored'
            WHEN v.nth = 1 THEN 'load'
            WHEN ({s_content}) IS NOT DISTINCT FROM ({f_content}) THEN 'duplicate'
            ELSE 'conflicts_with_stored'""",
        "against": "coalesce(t.file_id, f.file_id)",
        "joins": """LEFT JOIN survivors fv ON fv.id = s.{key} AND fv.nth = 1
LEFT JOIN staged f ON f.file_id = fv.file_id AND f.line = fv.line""",
    },
    # Users: latest wins; a profile equal to the one it would replace is a duplicate.
    FileKind.USERS: {
        "unique": """WHEN t.id IS NOT NULL AND ({s_content}) IS NOT DISTINCT FROM ({t_content})
            THEN 'duplicate' ELSE 'load'""",
        "repeated": """WHEN ({s_content}) IS NOT DISTINCT FROM coalesce(v.previous, ({t_content}))
                THEN 'duplicate'
            ELSE 'load'""",
        "against": "t.file_id",
        "joins": "",
    },
}
_REJECTS = """
INSERT INTO staged_rejects
SELECT file_id, line, verdict,
       CASE verdict
           WHEN 'duplicate_in_file'
               THEN '{key} ' || {key} || ' appears in this file with different content'
           ELSE '{key} ' || {key} || ' is stored (file #' || against || ') with different content'
       END,
       raw_line
FROM staged_verdicts WHERE verdict IN $rejected
"""
_APPEND_TRANSACTIONS = """
INSERT INTO {table} SELECT {columns}, file_id FROM staged_verdicts WHERE verdict = 'load'
"""
# The latest file's profile of each user lands; earlier ones of the batch were overwritten.
_USERS_LOADED = """
SELECT * FROM staged_verdicts WHERE verdict = 'load'
QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY file_id DESC) = 1"""
_COUNTS = "SELECT file_id, verdict, count(*) FROM staged_verdicts GROUP BY ALL"
_TEMPORARY = ("staged", "staged_repeated", "staged_copies", "staged_stored", "staged_verdicts")


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
    )


def resolve(conn: duckdb.DuckDBPyConnection, kind: FileKind) -> dict[int, Applied]:
    """Decide every staged row, append those that load, put the rejects found here in
    ``staged_rejects``; per file id, what was loaded and duplicated (rejects: ``store_rejects``)."""
    conn.execute(_sql(_REPEATED, kind))
    conn.execute(_sql(_COPIES, kind))
    conn.execute(_sql(_STORED, kind))
    cases = {part: _sql(text, kind) for part, text in _VERDICT_CASES[kind].items()}
    conn.execute(_sql(_VERDICTS, kind, **cases))
    conn.execute(_sql(_REJECTS, kind), {"rejected": list(REJECTED_HERE)})
    if kind is FileKind.USERS:
        upsert_users(conn, _USERS_LOADED, utc_now())
    else:
        conn.execute(_sql(_APPEND_TRANSACTIONS, kind))
    applied: dict[int, Applied] = defaultdict(Applied)
    for file_id, verdict, count in conn.execute(_COUNTS).fetchall():
        if verdict == "load":
            applied[file_id].loaded += int(count)
        elif verdict in DUPLICATES:
            applied[file_id].duplicate += int(count)
    conn.execute("; ".join(f"DROP TABLE {table}" for table in _TEMPORARY))
    return dict(applied)


# Every reject reaches ``rejects`` through this statement, from a relation of staged_rejects'
# columns ({rows}), in line order. Its raw line is kept up to $line_bytes bytes, cut at a
# character boundary (valid UTF-8 has one among any four consecutive cuts), with the line's own
# length and whether it was cut. A line_too_long reject holds only the line's start: cut, its
# length not measured (NULL).
_STORE_REJECTS = """
INSERT INTO rejects (file_id, line_number, reason, message, raw_line, raw_line_bytes,
                     raw_line_truncated)
SELECT file_id, line_number, reason, message,
       CASE WHEN strlen(raw_line) <= $line_bytes THEN raw_line
            ELSE coalesce({cuts}) END,
       CASE WHEN reason <> $too_long THEN strlen(raw_line) END,
       coalesce(reason = $too_long OR strlen(raw_line) > $line_bytes, false)
FROM ({rows}) ORDER BY file_id, line_number
""".replace(
    "{cuts}",
    ", ".join(
        f"try(decode(encode(raw_line)[1:greatest($line_bytes - {back}, 0)]))" for back in range(4)
    ),
)


def insert_rejects(
    conn: duckdb.DuckDBPyConnection,
    rows: str,
    line_bytes: int,
    params: dict[str, object] | None = None,
) -> None:
    """Store the rejects ``rows`` selects (staged_rejects' columns), each raw line kept up to
    ``line_bytes`` bytes (Config.reject_line_bytes)."""
    conn.execute(
        _STORE_REJECTS.replace("{rows}", rows),
        {
            **(params or {}),
            "line_bytes": line_bytes,
            "too_long": str(RejectReason.LINE_TOO_LONG),
        },
    )


def store_rejects(conn: duckdb.DuckDBPyConnection, line_bytes: int) -> dict[int, dict[str, int]]:
    """``staged_rejects`` into ``rejects`` (in line order, raw lines kept up to ``line_bytes``);
    per file id, rejects by reason."""
    insert_rejects(conn, "SELECT * FROM staged_rejects", line_bytes)
    by_file: dict[int, dict[str, int]] = defaultdict(dict)
    for file_id, reason, count in conn.execute(
        "SELECT file_id, reason, count(*) FROM staged_rejects GROUP BY ALL"
    ).fetchall():
        by_file[file_id][reason] = int(count)
    conn.execute("DROP TABLE staged_rejects")
    return dict(by_file)


# --- the same rules over rows held in memory (a batch of small files) --------------------------

# What ``resolve`` decides with a dozen statements, decided here in Python over the gathered rows
# with one lookup of the stored copies: for a batch of small files each statement's fixed cost,
# not the rows, is what a batch pays. tests/test_batch.py's property test holds
# these verdicts to the single-file paths', which use ``resolve``.


def resolve_gathered(
    conn: duckdb.DuckDBPyConnection, stager: Stager, now: dt.datetime, line_bytes: int
) -> dict[int, Applied]:
    """Decide the rows gathered in ``stager`` (files in order), append those that load, store
    every reject (the field rules' and these) in line order, raw lines kept up to
    ``line_bytes``; per file id, what was applied."""
    kind = stager.kind
    key, *rest = COLUMNS[kind]
    ids = stager.columns[key]
    contents = list(zip(*(stager.columns[name] for name in rest), strict=True))
    stored = _stored(conn, kind, ids)
    # (file, id) -> its first row; the pairs seen again, and those whose copies differ.
    first_line: dict[tuple[int, object], int] = {}
    repeated: dict[tuple[int, object], set[tuple[object, ...]]] = {}
    for i, pair in enumerate(zip(stager.file_ids, ids, strict=True)):
        first = first_line.setdefault(pair, i)
        if first != i:
            repeated.setdefault(pair, {contents[first]}).add(contents[i])
    differing = {pair for pair, copies in repeated.items() if len(copies) > 1}
    earlier: dict[object, tuple[tuple[object, ...], int]] = {}  # id -> the batch's survivor
    applied: dict[int, Applied] = defaultdict(Applied)
    loaded: list[int] = []
    rejects = list(stager.rejects)
    for i, (file_id, row_id) in enumerate(zip(stager.file_ids, ids, strict=True)):
        content = contents[i]
        if (file_id, row_id) in differing:
            verdict, against = "duplicate_in_file", None
        elif first_line[file_id, row_id] != i:
            verdict, against = "copy", None
        elif kind is FileKind.TRANSACTIONS:
            # Immutable: the stored copy, else the batch's first, decides.
            reference = stored.get(row_id) or earlier.get(row_id)
            if reference is None:
                verdict, against = "load", None
                earlier[row_id] = (content, file_id)
            elif reference[0] == content:
                verdict, against = "duplicate", reference[1]
            else:
                verdict, against = "conflicts_with_stored", reference[1]
        else:
            # Users: the latest wins; the same profile as the one it replaces is a duplicate.
            reference = earlier.get(row_id) or stored.get(row_id)
            verdict = "duplicate" if reference and reference[0] == content else "load"
            earlier[row_id] = (content, file_id)
        if verdict == "load":
            applied[file_id].loaded += 1
            loaded.append(i)
        elif verdict in DUPLICATES:
            applied[file_id].duplicate += 1
        else:
            message = (
                f"{key} {row_id} appears in this file with different content"
                if against is None
                else f"{key} {row_id} is stored (file #{against}) with different content"
            )
            reject = Reject(stager.lines[i], RejectReason(verdict), message, stager.raw_lines[i])
            rejects.append((file_id, reject))
    if kind is FileKind.USERS:  # the latest file's profile of each user lands
        latest = {ids[i]: i for i in loaded}
        loaded = sorted(latest.values())
    if loaded:
        _append_loaded(conn, stager, loaded, now)
    if rejects:
        conn.register("gathered_rejects", arrow_rejects(rejects))
        try:
            insert_rejects(conn, "SELECT * FROM gathered_rejects", line_bytes)
        finally:
            conn.unregister("gathered_rejects")
        for file_id, reject in rejects:
            reasons = applied[file_id].rejected_by_reason
            reasons[reject.reason] = reasons.get(reject.reason, 0) + 1
    stager.clear()
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
        conn.register("batch_ids", pa.table({"id": pa.array(ids, type=DOMAINS[key].arrow)}))
        try:
            found = conn.execute(f"{select} WHERE {key} IN (SELECT id FROM batch_ids)").fetchall()
        finally:
            conn.unregister("batch_ids")
    return {row[0]: (tuple(row[1:-1]), row[-1]) for row in found}


def _append_loaded(
    conn: duckdb.DuckDBPyConnection, stager: Stager, rows: list[int], now: dt.datetime
) -> None:
    arrays = {
        name: pa.array([values[i] for i in rows], type=DOMAINS[name].arrow)
        for name, values in stager.columns.items()
    }
    arrays["file_id"] = pa.array([stager.file_ids[i] for i in rows], type=pa.int64())
    if stager.kind is FileKind.TRANSACTIONS:
        append_arrow(conn, TABLES[FileKind.TRANSACTIONS].name, pa.table(arrays))
        return
    conn.register("arrow_batch", pa.table(arrays))
    try:
        upsert_users(conn, "SELECT * FROM arrow_batch", now)
    finally:
        conn.unregister("arrow_batch")


# The one write of profiles over stored ones (latest wins), from a relation of user_id,
# signup_date, country and file_id; the fast path only ever inserts new users.
_USERS_UPSERT = """
INSERT INTO users
SELECT user_id, signup_date, country, file_id, $now FROM ({rows})
ON CONFLICT (user_id) DO UPDATE SET
    signup_date = excluded.signup_date,
    country = excluded.country,
    file_id = excluded.file_id,
    updated_at = excluded.updated_at
"""


def upsert_users(conn: duckdb.DuckDBPyConnection, rows: str, now: dt.datetime) -> None:
    """Upsert the profiles of the relation ``rows``; the countries they replace are noted
    first (the country totals move those users' transactions)."""
    aggregates.note_replaced_users(conn, rows)
    conn.execute(_USERS_UPSERT.format(rows=rows), {"now": now})
