"""Rows pending their verdict: those that passed their own rules wait in the temp table
``pending`` (one row per record, with its file and line) and refused ones in ``pending_rejects``,
whichever path read them, until ``resolve`` decides them; and the two writes every path shares:
rejects into ``rejects``, and profiles over stored ones.

(A file's private copy on disk is "staged", ``source.stage``; rows in these tables are
"pending".)
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict

import duckdb
import pyarrow as pa

from moneylion import aggregates, candidates
from moneylion.db import append_arrow
from moneylion.model import COLUMNS, DOMAINS, TABLES, FileKind
from moneylion.rules import RejectReason
from moneylion.validate import Reject, ValidatedRows


def create_pending(conn: duckdb.DuckDBPyConnection, kind: FileKind) -> None:
    """Empty ``pending`` and ``pending_rejects`` temp tables for rows of ``kind``."""
    columns = ", ".join(f"{c.name} {c.domain.pending}" for c in TABLES[kind].columns)
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE pending (file_id BIGINT, {columns}, "
        "line BIGINT, raw_line VARCHAR)"
    )
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE pending_rejects (file_id BIGINT, line_number BIGINT, "
        "reason VARCHAR, message VARCHAR, raw_line VARCHAR)"
    )


class GatheredRows:
    """Good rows and rejects of any number of files of one kind, gathered in Python and made
    pending in one Arrow append each (a batch of small files costs two statements, not two per
    file)."""

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
        """Append what was gathered to ``pending`` / ``pending_rejects``; start afresh."""
        if self.lines:
            arrays = {"file_id": pa.array(self.file_ids, type=pa.int64())}
            for name, values in self.columns.items():
                arrays[name] = pa.array(values, type=DOMAINS[name].arrow)
            arrays["line"] = pa.array(self.lines, type=pa.int64())
            arrays["raw_line"] = pa.array(self.raw_lines, type=pa.string())
            append_arrow(conn, "pending", pa.table(arrays))
        if self.rejects:
            append_arrow(conn, "pending_rejects", arrow_rejects(self.rejects))
        self.clear()


def arrow_rejects(rejects: list[tuple[int, Reject]]) -> pa.Table:
    """(file id, Reject) pairs as a table of ``pending_rejects``' columns."""
    return pa.table(
        {
            "file_id": pa.array([f for f, _ in rejects], type=pa.int64()),
            "line_number": pa.array([r.line_number for _, r in rejects], type=pa.int64()),
            "reason": pa.array([str(r.reason) for _, r in rejects], type=pa.string()),
            "message": pa.array([r.message for _, r in rejects], type=pa.string()),
            "raw_line": pa.array([r.raw_line for _, r in rejects], type=pa.string()),
        }
    )


# Every reject reaches ``rejects`` through this statement, from a relation of pending_rejects'
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
    """Store the rejects ``rows`` selects (pending_rejects' columns), each raw line kept up to
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
    """``pending_rejects`` into ``rejects`` (in line order, raw lines kept up to ``line_bytes``);
    per file id, rejects by reason."""
    insert_rejects(conn, "SELECT * FROM pending_rejects", line_bytes)
    by_file: dict[int, dict[str, int]] = defaultdict(dict)
    for file_id, reason, count in conn.execute(
        "SELECT file_id, reason, count(*) FROM pending_rejects GROUP BY ALL"
    ).fetchall():
        by_file[file_id][reason] = int(count)
    conn.execute("DROP TABLE pending_rejects")
    return dict(by_file)


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
    conn.execute(candidates.KEEP_REPLACED.format(rows=rows))
    conn.execute(_USERS_UPSERT.format(rows=rows), {"now": now})
