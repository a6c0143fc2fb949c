"""The rows a correction needs to decide the cross-file rules again (sql/008, corrections.py):
every commit keeps here the candidates of an id that did not end up in the base table.

A candidate is a row that passed its file's own rules and the rule within its file (one per id
and file). Transactions keep those judged ``duplicate`` or ``conflicts_with_stored`` (with their
line and raw line: they are rejects again if their verdict comes back); users keep every version
that is not the stored profile: one a later file replaced, the same one sent again, the earlier
ones of a batch. Nothing else changes at ingest: the candidate that loaded is the base row.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from moneylion.db import append_arrow
from moneylion.model import COLUMNS, DOMAINS, TABLES, FileKind
from moneylion.rules import Verdict

# Per kind: the table of kept candidates, and whether it keeps the line (the verdicts that
# reject: only transactions have them).
TABLE = {FileKind.TRANSACTIONS: "transaction_candidates", FileKind.USERS: "user_versions"}
WITH_LINE = {FileKind.TRANSACTIONS: True, FileKind.USERS: False}

# The verdicts of a candidate kept at ingest (a LOAD of users is kept when a later file of the
# same commit replaced it: VERSIONS_OF_PENDING).
KEPT = (Verdict.DUPLICATE, Verdict.CONFLICTS_WITH_STORED)

_KEEP_PENDING = {
    FileKind.TRANSACTIONS: """
INSERT INTO transaction_candidates
SELECT {columns}, file_id, line, raw_line FROM pending_verdicts WHERE verdict IN ({kept})""",
    # A user's profiles of this commit: all but the latest loaded one stay versions.
    FileKind.USERS: """
INSERT INTO user_versions
SELECT {columns}, file_id FROM (
    SELECT *, row_number() OVER (PARTITION BY {key}, verdict ORDER BY file_id DESC) AS nth
    FROM pending_verdicts WHERE verdict IN ('{load}', {kept}))
WHERE verdict <> '{load}' OR nth > 1""",
}
# Before profiles are upserted from the relation ``rows``: the ones they replace become versions.
KEEP_REPLACED = """
INSERT INTO user_versions SELECT {columns}, file_id FROM users
WHERE user_id IN (SELECT user_id FROM ({{rows}}))
""".format(columns=", ".join(COLUMNS[FileKind.USERS]))


def keep_pending(conn: duckdb.DuckDBPyConnection, kind: FileKind) -> None:
    """Keep the candidates among ``pending_verdicts`` (resolve.resolve) that do not load."""
    conn.execute(
        _KEEP_PENDING[kind].format(
            columns=", ".join(COLUMNS[kind]),
            key=COLUMNS[kind][0],
            load=Verdict.LOAD,
            kept=", ".join(f"'{verdict}'" for verdict in KEPT),
        )
    )


def keep_gathered(
    conn: duckdb.DuckDBPyConnection,
    kind: FileKind,
    columns: dict[str, list[object]],
    file_ids: list[int],
    rows: list[int],
    lines: list[int],
    raw_lines: list[str],
) -> None:
    """Keep the candidates at positions ``rows`` of rows gathered in memory
    (resolve.resolve_gathered)."""
    if not rows:
        return
    arrays = {
        name: pa.array([columns[name][i] for i in rows], type=DOMAINS[name].arrow)
        for name in TABLES[kind].names
    }
    arrays["file_id"] = pa.array([file_ids[i] for i in rows], type=pa.int64())
    if WITH_LINE[kind]:
        arrays["line_number"] = pa.array([lines[i] for i in rows], type=pa.int64())
        arrays["raw_line"] = pa.array([raw_lines[i] for i in rows], type=pa.string())
    append_arrow(conn, TABLE[kind], pa.table(arrays))
