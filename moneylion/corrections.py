"""Corrections: retract a file, restore it, replace it; in one DuckDB transaction each, as signed
deltas.

The invariant (and the tests' oracle): after any mix of files and corrections the warehouse
equals the one built by ingesting the files that remain, in their order, into a fresh one. A
file's rows leave the base tables (or come back), and the rules that need other rows
(``rules.py``: duplicates, conflicts, users' latest-wins) are decided again for the ids it
touched only, from every candidate of those ids (``candidates.py``): the base row and the kept
ones. Each candidate's verdict is computed twice, with the files active before and after the
correction; what differs is the correction:

* base rows out (old ``load``, new not) and in (new ``load``, old not); their signed rows fold
  into the daily and country totals; the touched users' totals (their first and last dates are
  minima and maxima, which a negative delta cannot undo) and the top list are computed again;
* ``conflicts_with_stored`` rejects that end or begin, and the ledger counts of each file whose
  rows changed verdict (a retracted file's counts say what of it is in the warehouse: nothing);
* users: each touched user's profile is its latest remaining version, or none; those whose
  country changed move their transactions between the country totals.

A correction's cost follows the rows of the ids it touches, not the warehouse: its file's rows are
found by their file id (zone maps), the other candidates by those ids. Its ``change_id`` comes
from the file id sequence, so files and corrections share one order (the API's change token).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from moneylion import aggregates, candidates, ledger
from moneylion.config import Config
from moneylion.db import append_arrow, int_constants, one_row, transaction, utc_now
from moneylion.errors import FileRefused, MoneylionError
from moneylion.ingest import DEFAULT_TOP_USERS_KEPT, fold_into_aggregates
from moneylion.ladder import LADDERS, climb
from moneylion.ledger import OUT_OF_ORDER, FileOutcome, FileStatus
from moneylion.load import Load
from moneylion.model import COLUMNS, DAILY_TOTALS, TABLES, FileKind
from moneylion.pending import insert_rejects
from moneylion.rules import (
    IMMUTABLE,
    VERDICTS,
    Verdict,
    latest_date,
    message_sql,
    versus_sql,
)
from moneylion.source import StagedFile
from moneylion.tuning import DEFAULT as DEFAULT_TUNING
from moneylion.validate import read_header

log = logging.getLogger(__name__)

DEFAULT_LINE_BYTES = Config.reject_line_bytes


class CorrectionRefused(MoneylionError, ValueError):
    """The correction cannot apply to that file (unknown, or not in a state it applies to)."""


@dataclass(frozen=True)
class Action:
    """A correction's name, the statuses of a file it applies to, and the status it leaves."""

    name: str
    applies_to: tuple[FileStatus, ...]
    leaves: FileStatus


RETRACT = Action("retract", (FileStatus.LOADED,), FileStatus.RETRACTED)
RESTORE = Action("restore", (FileStatus.RETRACTED,), FileStatus.LOADED)
REPLACE = Action("replace", (FileStatus.LOADED,), FileStatus.REPLACED)


@dataclass(frozen=True)
class Correction:
    """What a correction did (its ``corrections`` row, and the ledger rows it changed)."""

    change_id: int
    action: str
    file_id: int
    kind: str
    status: FileStatus
    files: tuple[int, ...]  # the ledger rows whose status changed (a file and its parts)
    rows_out: int
    rows_in: int
    files_changed: int  # other files whose rows changed verdict
    seconds: float
    by_file_id: int | None = None  # replace: the new bytes' file

    def summary(self) -> str:
        return (
            f"file #{self.file_id} ({self.kind}): {self.action} done, now {self.status}; "
            f"{self.rows_out} rows out, {self.rows_in} rows in, {self.files_changed} other "
            f"files' verdicts changed, {self.seconds:.3f} s"
        )


def retract(
    conn: duckdb.DuckDBPyConnection,
    file: int | str,
    reason: str,
    *,
    top_users_kept: int = DEFAULT_TOP_USERS_KEPT,
    line_bytes: int = DEFAULT_LINE_BYTES,
) -> Correction:
    """Take file ``file`` (its id or sha256; with its parts) out of the warehouse."""
    return correct(conn, RETRACT, file, reason, top_users_kept, line_bytes)


def restore(
    conn: duckdb.DuckDBPyConnection,
    file: int | str,
    reason: str | None = None,
    *,
    top_users_kept: int = DEFAULT_TOP_USERS_KEPT,
    line_bytes: int = DEFAULT_LINE_BYTES,
) -> Correction:
    """Undo the retraction of ``file``: it is back in its place in the order."""
    return correct(conn, RESTORE, file, reason, top_users_kept, line_bytes)


def find_file(conn: duckdb.DuckDBPyConnection, file: int | str) -> tuple[int, str | None, str]:
    """(file id, kind, status) of the file named by its id or sha256 (a part: its file's)."""
    if isinstance(file, str) and not file.isdigit():
        found = conn.execute("SELECT file_id FROM files WHERE sha256 = ?", [file]).fetchall()
        if not found:
            raise CorrectionRefused(f"no file with sha256 {file} in the ledger")
        file = found[0][0]
    rows = conn.execute(
        "SELECT coalesce(p.first_file_id, f.file_id) FROM files f "
        "LEFT JOIN file_parts p USING (file_id) WHERE f.file_id = ?",
        [int(file)],
    ).fetchall()
    if not rows:
        raise CorrectionRefused(f"no file #{file} in the ledger")
    first = int(rows[0][0])
    kind, status = one_row(conn, "SELECT kind, status FROM files WHERE file_id = ?", [first])
    return first, kind, status


def replace(
    conn: duckdb.DuckDBPyConnection,
    file: int | str,
    staged: StagedFile,
    config: Config | None = None,
    reason: str | None = None,
) -> Correction:
    """Put the bytes ``staged`` in the place of ``file`` (its id or sha256): the warehouse then
    equals the ledger with the old bytes swapped for the new ones. The new bytes get a ledger
    row of their own (a new file id) whose place in the order is the old file's (``file_order``);
    the old row is ``replaced``, and its ``corrections`` row names the new one (``by_file_id``).
    Refused: bytes the ledger has, a file of another kind, one that would be refused whole."""
    tuning = config.tuning if config else DEFAULT_TUNING
    line_bytes = (config or Config).reject_line_bytes
    kept = config.top_users_kept if config else DEFAULT_TOP_USERS_KEPT
    known = ledger.known(conn, [staged.sha256]).get(staged.sha256)
    if known is not None:
        raise CorrectionRefused(f"these bytes are already file #{known[0]} ({known[1]})")
    received_at = utc_now()
    if staged.refused is not None:
        raise CorrectionRefused(f"the new file is refused: {staged.refused.message}")
    try:
        header = read_header(staged, latest_date(received_at, (config or Config).max_future_days))
    except FileRefused as refused:
        raise CorrectionRefused(f"the new file is refused: {refused.message}") from None
    new_id = ledger.next_file_ids(conn, 1)[0]

    def load_first(conn: duckdb.DuckDBPyConnection, file_id: int, kind: str) -> int:
        """The new bytes appended as the last file (before anything else of the transaction:
        a load path that gives up rolls it back whole), then given the old file's place."""
        if header.kind != kind:
            raise CorrectionRefused(
                f"file #{file_id} holds {kind}: its replacement holds {header.kind}"
            )
        load = Load(conn, staged, header, new_id, line_bytes, tuning)
        applied = climb(load, LADDERS[header.kind], lambda stage: None)
        if applied.loaded:
            fold_into_aggregates(conn, new_id, header.kind, applied.loaded, config)
        ledger.insert(
            conn,
            [
                FileOutcome(
                    name=staged.name,
                    path=staged.origin,
                    sha256=staged.sha256,
                    status=FileStatus.LOADED,
                    file_id=new_id,
                    kind=str(header.kind),
                    rows_total=applied.loaded + applied.duplicate + applied.rejected,
                    rows_loaded=applied.loaded,
                    rows_duplicate=applied.duplicate,
                    rows_rejected=applied.rejected,
                    size_bytes=staged.size,
                    received_at=received_at,
                    finished_at=utc_now(),
                )
            ],
        )
        conn.execute(
            "INSERT INTO file_order SELECT ?, coalesce("
            "(SELECT order_key FROM file_order WHERE file_id = ?), ?)",
            [new_id, file_id, file_id],
        )
        return new_id

    return correct(
        conn,
        REPLACE,
        file,
        reason,
        kept,
        line_bytes,
        first=load_first,
    )


def correct(
    conn: duckdb.DuckDBPyConnection,
    action: Action,
    file: int | str,
    reason: str | None,
    top_users_kept: int = DEFAULT_TOP_USERS_KEPT,
    line_bytes: int = DEFAULT_LINE_BYTES,
    *,
    first: Callable[[duckdb.DuckDBPyConnection, int, str], int] | None = None,
    also: Callable[[duckdb.DuckDBPyConnection], None] | None = None,
    change_id: int | None = None,
) -> Correction:
    """Apply ``action`` to ``file`` and everything it changes, in one transaction. ``first``:
    what a replacement does before the rest (its new file, given the old one's place): the id
    of the file it moved there. ``also``: more to write in the same transaction (a lake
    replica's mark of what it applied). ``change_id``: the correction's place in the order when
    it was given one elsewhere (a lake's ledger); by default the next of the file id sequence."""
    started = dt.datetime.now(dt.UTC)
    if change_id is None:
        change_id = ledger.next_file_ids(conn, 1)[0]  # outside the transaction (sequences)
    with transaction(conn):
        file_id, kind, status = find_file(conn, file)
        if kind is None or status not in action.applies_to:
            raise CorrectionRefused(
                f"file #{file_id} is {status}: {action.name} applies to a file that is "
                + " or ".join(action.applies_to)
            )
        moved = None if first is None else first(conn, file_id, kind)
        members = [
            int(row[0])
            for row in conn.execute(
                "SELECT file_id FROM files WHERE status = ? AND (file_id = ? OR file_id IN "
                "(SELECT file_id FROM file_parts WHERE first_file_id = ?))",
                [status, file_id, file_id],
            ).fetchall()
        ]
        conn.execute(
            f"UPDATE files SET status = ? WHERE file_id IN ({int_constants(members)})",
            [str(action.leaves)],
        )
        redecided = redecide(
            conn,
            FileKind(kind),
            members,
            was_active=status not in OUT_OF_ORDER,
            change_id=change_id,
            top_users_kept=top_users_kept,
            line_bytes=line_bytes,
            moved=moved,
        )
        conn.execute(
            "INSERT INTO corrections (change_id, action, file_id, by_file_id, reason, made_at, "
            "rows_out, rows_in) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                change_id,
                action.name,
                file_id,
                moved,
                reason,
                utc_now(),
                redecided.rows_out,
                redecided.rows_in,
            ],
        )
        if also is not None:
            also(conn)
    done = Correction(
        change_id=change_id,
        action=action.name,
        file_id=file_id,
        kind=str(kind),
        status=action.leaves,
        files=tuple(members),
        rows_out=redecided.rows_out,
        rows_in=redecided.rows_in,
        files_changed=len(redecided.files_changed - {*members, moved}),
        by_file_id=moved,
        seconds=(dt.datetime.now(dt.UTC) - started).total_seconds(),
    )
    log.info(
        "file_corrected",
        extra={
            "fields": {
                "action": done.action,
                "file_id": done.file_id,
                "change_id": done.change_id,
                "status": str(done.status),
                "reason": reason,
                "rows_out": done.rows_out,
                "rows_in": done.rows_in,
                "files_changed": done.files_changed,
                "by_file_id": done.by_file_id,
                "seconds": round(done.seconds, 4),
            }
        },
    )
    return done


# --- deciding the touched ids again ------------------------------------------------------------


@dataclass
class Redecided:
    files_changed: set[int]  # files whose rows changed verdict
    rows_out: int = 0  # base rows taken out
    rows_in: int = 0  # base rows put in


_IDS = """
CREATE OR REPLACE TEMP TABLE fix_ids AS
SELECT {key} AS id FROM {table} WHERE file_id IN ({files})
UNION SELECT {key} FROM {kept} WHERE file_id IN ({files})
"""
# Every candidate of the touched ids (candidates.py: the kept ones, and the base rows not among
# them), with its file's place in the order and whether its file is active after the correction
# (new_active: the statuses are already written) and before it (the corrected files: was_active);
# a replacement (``$moved``) was last in the order before it and takes its place after.
_CANDIDATES = """
CREATE OR REPLACE TEMP TABLE fix_candidates AS
WITH c AS (
    SELECT {columns}, file_id, {line}, true AS kept FROM {kept}
    WHERE {key} IN (SELECT id FROM fix_ids)
    UNION ALL
    SELECT {columns}, file_id, {no_line}, false FROM {table} b
    WHERE {key} IN (SELECT id FROM fix_ids)
      AND NOT EXISTS (SELECT 1 FROM {kept} x WHERE x.{key} = b.{key} AND x.file_id = b.file_id)
)
SELECT c.*, coalesce(o.order_key, c.file_id) AS order_key,
       CASE WHEN c.file_id = $moved THEN c.file_id
            ELSE coalesce(o.order_key, c.file_id) END AS old_order,
       f.status NOT IN ({inactive}) AS new_active,
       CASE WHEN c.file_id IN ({files}) THEN $was_active
            ELSE f.status NOT IN ({inactive}) END AS old_active
FROM c JOIN files f USING (file_id) LEFT JOIN file_order o USING (file_id)
"""
# Each candidate's verdict before and after (NULL: its file is not active), by the rule book's
# ``versus`` against the row its id already had: of an immutable kind the first active candidate
# in the order, of the others the latest before it.
# An id with one candidate (nearly every id of a large file) has no row before it: it needs no
# window, which would sort every candidate.
_VERDICTS = """
CREATE OR REPLACE TEMP TABLE fix_verdicts AS
WITH several AS (SELECT {key} AS id FROM fix_candidates GROUP BY ALL HAVING count(*) > 1)
SELECT *,
    CASE WHEN NOT old_active THEN NULL {old_versus} END AS old_verdict,
    CASE WHEN NOT new_active THEN NULL {new_versus} END AS new_verdict
FROM (
    SELECT *, CASE WHEN false THEN row({content}) END AS old_held,
           CAST(NULL AS BIGINT) AS old_against,
           CASE WHEN false THEN row({content}) END AS new_held,
           CAST(NULL AS BIGINT) AS new_against
    FROM fix_candidates WHERE {key} NOT IN (SELECT id FROM several)
    UNION ALL
    SELECT *,
        {pick}(CASE WHEN old_active THEN row({content}) END IGNORE NULLS) OVER o AS old_held,
        {pick}(CASE WHEN old_active THEN file_id END IGNORE NULLS) OVER o AS old_against,
        {pick}(CASE WHEN new_active THEN row({content}) END IGNORE NULLS) OVER n AS new_held,
        {pick}(CASE WHEN new_active THEN file_id END IGNORE NULLS) OVER n AS new_against
    FROM fix_candidates WHERE {key} IN (SELECT id FROM several)
    WINDOW o AS (PARTITION BY {key} ORDER BY old_order, file_id
                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING),
           n AS (PARTITION BY {key} ORDER BY order_key, file_id
                 ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
)
"""
_VERDICT_COUNTS = """
SELECT file_id, verdict, CAST(sum(n) AS BIGINT) FROM (
    SELECT file_id, old_verdict AS verdict, -1 AS n FROM fix_verdicts WHERE old_verdict IS NOT NULL
    UNION ALL
    SELECT file_id, new_verdict, 1 FROM fix_verdicts WHERE new_verdict IS NOT NULL)
GROUP BY ALL HAVING sum(n) <> 0
"""
_LEDGER_COUNTS = (
    "UPDATE files SET rows_loaded = rows_loaded + $loaded, "
    "rows_duplicate = rows_duplicate + $duplicate, rows_rejected = rows_rejected + $rejected "
    "WHERE file_id = $file_id"
)
_LOAD = f"'{Verdict.LOAD}'"
_OUT = f"old_verdict = {_LOAD} AND new_verdict IS DISTINCT FROM {_LOAD}"
_IN = f"new_verdict = {_LOAD} AND old_verdict IS DISTINCT FROM {_LOAD}"


def _sql(template: str, kind: FileKind, files: list[int]) -> str:
    key, *content = COLUMNS[kind]
    with_line = candidates.WITH_LINE[kind]
    return template.format(
        key=key,
        table=TABLES[kind].name,
        kept=candidates.TABLE[kind],
        columns=", ".join(COLUMNS[kind]),
        content=", ".join(content),
        files=int_constants(files),
        line="line_number, raw_line" if with_line else "NULL AS line_number, NULL AS raw_line",
        no_line="NULL, NULL",
        inactive=", ".join(f"'{status}'" for status in OUT_OF_ORDER),
        pick="first_value" if IMMUTABLE[kind] else "last_value",
        old_versus=versus_sql(
            kind, f"row({', '.join(content)})", "old_held", "old_held IS NOT NULL"
        ),
        new_versus=versus_sql(
            kind, f"row({', '.join(content)})", "new_held", "new_held IS NOT NULL"
        ),
    )


def redecide(
    conn: duckdb.DuckDBPyConnection,
    kind: FileKind,
    files: list[int],
    *,
    was_active: bool,
    change_id: int,
    top_users_kept: int,
    line_bytes: int,
    moved: int | None = None,
) -> Redecided:
    """Decide again every candidate of the ids that ``files`` (whose status just changed; active
    before the change if ``was_active``) and ``moved`` (a file given an earlier place in the
    order: ``file_order``) have candidates of, and apply what changed."""
    touched = [*files, *([] if moved is None else [moved])]
    conn.execute(_sql(_IDS, kind, touched))
    conn.execute(_sql(_CANDIDATES, kind, files), {"was_active": was_active, "moved": moved or -1})
    conn.execute(_sql(_VERDICTS, kind, files))
    done = Redecided(files_changed=_count_in_ledger(conn))
    if kind is FileKind.TRANSACTIONS:
        gone = files if was_active and not _active_now(conn, files) else []
        _apply_transactions(conn, done, change_id, top_users_kept, line_bytes, gone)
    else:
        _apply_users(conn, done, change_id)
    conn.execute("DROP TABLE fix_verdicts; DROP TABLE fix_candidates; DROP TABLE fix_ids")
    return done


def _active_now(conn: duckdb.DuckDBPyConnection, files: list[int]) -> bool:
    """Whether ``files`` (whose status changed together) count now."""
    status = one_row(conn, "SELECT status FROM files WHERE file_id = ?", [files[0]])[0]
    return status not in OUT_OF_ORDER


def _count_in_ledger(conn: duckdb.DuckDBPyConnection) -> set[int]:
    """Each file's ledger counts follow its rows' verdicts; the files whose counts changed."""
    by_file: dict[int, dict[str, int]] = defaultdict(
        lambda: {"loaded": 0, "duplicate": 0, "rejected": 0}
    )
    for file_id, verdict, n in conn.execute(_VERDICT_COUNTS).fetchall():
        by_file[int(file_id)][VERDICTS[Verdict(verdict)].counted] += int(n)
    if by_file:
        conn.executemany(
            _LEDGER_COUNTS,
            [{"file_id": file_id, **counts} for file_id, counts in by_file.items()],
        )
    return set(by_file)


# --- transactions ------------------------------------------------------------------------------

_KEY = COLUMNS[FileKind.TRANSACTIONS][0]
_TX_COLUMNS = ", ".join(COLUMNS[FileKind.TRANSACTIONS])
# The base rows that change: out (sign -1) and in (+1).
_DELTA = f"""
CREATE OR REPLACE TEMP TABLE fix_delta AS
SELECT {_TX_COLUMNS}, file_id, -1 AS sign FROM fix_verdicts WHERE {_OUT}
UNION ALL
SELECT {_TX_COLUMNS}, file_id, 1 FROM fix_verdicts WHERE {_IN}
"""
# A candidate that leaves the base table and was not kept yet is kept now (a restore needs it).
_KEEP_LEAVING = f"""
INSERT INTO transaction_candidates
SELECT {_TX_COLUMNS}, file_id, NULL, NULL FROM fix_verdicts WHERE NOT kept AND {_OUT}
"""
# The rows of files taken out go by their file id (zone maps: no join); the others that go out
# (a later file's rows, when an earlier one comes back) by their id and file.
_DELETE_OUT = f"""
DELETE FROM transactions t USING (
    SELECT {_KEY}, file_id FROM fix_delta WHERE sign < 0 AND file_id NOT IN ({{gone}})) o
WHERE t.{_KEY} = o.{_KEY} AND t.file_id = o.file_id AND t.file_id BETWEEN $low AND $high
"""
_DELETE_GONE = "DELETE FROM transactions WHERE file_id IN ({gone})"
_INSERT_IN = f"INSERT INTO transactions SELECT {_TX_COLUMNS}, file_id FROM fix_delta WHERE sign > 0"
_CONFLICT = f"'{Verdict.CONFLICTS_WITH_STORED}'"
# A conflict's reject ends when its verdict or the row it conflicts with changes, and begins so.
# A row kept without its line (it had loaded when its file came) is rejected at line 0.
_REJECT_CHANGE = (
    "{side}_verdict = " + _CONFLICT + " AND (old_verdict IS DISTINCT FROM new_verdict"
    " OR old_against IS DISTINCT FROM new_against)"
)
_REJECTS_END = f"""
DELETE FROM rejects r USING (
    SELECT file_id, coalesce(line_number, 0) AS line_number, {{message}} AS message
    FROM fix_verdicts WHERE {_REJECT_CHANGE.format(side="old")}) o
WHERE r.file_id = o.file_id AND r.line_number = o.line_number
  AND r.reason = {_CONFLICT} AND r.message = o.message
"""
_REJECTS_BEGIN = f"""
SELECT file_id, coalesce(line_number, 0) AS line_number, {_CONFLICT} AS reason,
       {{message}} AS message, raw_line
FROM fix_verdicts WHERE {_REJECT_CHANGE.format(side="new")}
ORDER BY file_id, line_number
"""
# The daily totals by signed rows (a day and type whose count reaches 0 goes).
_DAILY_SIGNED = f"""
INSERT INTO daily_totals
SELECT transaction_date, transaction_type, CAST(sum(sign) AS BIGINT),
       CAST(sum(sign * amount) AS DECIMAL(38, 2))
FROM fix_delta GROUP BY ALL
ON CONFLICT (transaction_date, transaction_type) DO UPDATE SET
    {aggregates.fold_into(DAILY_TOTALS, "daily_totals", "excluded")}
"""
_DAILY_EMPTY = """
DELETE FROM daily_totals WHERE tx_count = 0
  AND transaction_date IN (SELECT DISTINCT transaction_date FROM fix_delta)
"""
_COUNTRY_SIGNED = """
SELECT t.transaction_date, u.country, t.transaction_type, t.amount, t.sign
FROM fix_delta t LEFT JOIN (SELECT user_id, country FROM users
                            WHERE user_id IN (SELECT user_id FROM fix_delta)) u
     ON u.user_id = t.user_id
"""
_FIX_USERS = "CREATE OR REPLACE TEMP TABLE fix_users AS SELECT DISTINCT user_id FROM fix_delta"
# The touched users' totals computed again from their rows (a minimum or maximum cannot be undone
# by a delta): their log rows are replaced by one row each.
_USER_TOTALS_AGAIN = (
    "DELETE FROM user_totals_log WHERE user_id IN (SELECT user_id FROM fix_users)",
    "INSERT INTO user_totals_log SELECT *, CAST(0 AS BIGINT) FROM ("
    + aggregates.USER_TOTALS_OF.format(where="WHERE user_id IN (SELECT user_id FROM fix_users)")
    + ")",
)
# Counts that fell: the users that may now be in the top list. Every user of the new list has at
# least $least transactions (the old list and the touched users give ``kept`` users with that
# many): those with a log row of that many, and those with rows not compacted yet (their count is
# a sum), are the candidates; a scan of the log's two columns, not a sum over every user.
_TOP_CANDIDATES = """
SELECT user_id, CAST(sum(tx_count) AS BIGINT) FROM user_totals_log
WHERE user_id IN (SELECT user_id FROM user_totals_log WHERE tx_count >= $least OR file_id > 0)
GROUP BY user_id HAVING sum(tx_count) >= $least
"""


def _apply_transactions(
    conn: duckdb.DuckDBPyConnection,
    done: Redecided,
    change_id: int,
    top_users_kept: int,
    line_bytes: int,
    gone: list[int],
) -> None:
    """Apply the verdicts that changed; ``gone``: the files taken out (all their base rows go)."""
    conn.execute(_DELTA)
    out_of_gone = gone or [-1]
    out, into, others, low, high = one_row(
        conn,
        "SELECT count(*) FILTER (WHERE sign < 0), count(*) FILTER (WHERE sign > 0), "
        f"count(*) FILTER (WHERE sign < 0 AND file_id NOT IN ({int_constants(out_of_gone)})), "
        "coalesce(min(file_id) FILTER (WHERE sign < 0), 0), "
        "coalesce(max(file_id) FILTER (WHERE sign < 0), 0) FROM fix_delta",
    )
    done.rows_out, done.rows_in = int(out), int(into)
    conn.execute(_KEEP_LEAVING)
    if gone:  # every base row of a file taken out goes
        conn.execute(_DELETE_GONE.format(gone=int_constants(gone)))
    if others:
        conn.execute(
            _DELETE_OUT.format(gone=int_constants(out_of_gone)), {"low": low, "high": high}
        )
    if into:
        conn.execute(_INSERT_IN)
    message = {
        side: message_sql(Verdict.CONFLICTS_WITH_STORED, _KEY, f"{side}_against")
        for side in ("old", "new")
    }
    conn.execute(_REJECTS_END.format(message=message["old"]))
    insert_rejects(conn, _REJECTS_BEGIN.format(message=message["new"]), line_bytes)
    if out or into:
        conn.execute(_DAILY_SIGNED)
        conn.execute(_DAILY_EMPTY)
        _country_merge(conn, _COUNTRY_SIGNED, change_id)
        conn.execute(_FIX_USERS)
        for statement in _USER_TOTALS_AGAIN:
            conn.execute(statement)
        if not out:  # counts only grew
            aggregates.rerank(conn, "SELECT user_id FROM fix_users", top_users_kept)
        else:
            _rerank_after_out(conn, top_users_kept)
        conn.execute("DROP TABLE fix_users")
    conn.execute("DROP TABLE fix_delta")


def _rerank_after_out(conn: duckdb.DuckDBPyConnection, kept: int) -> None:
    """The top list after counts fell. From the old list and the touched users' new counts when
    that is exact: a user neither listed nor touched ranked below the old list's last entry and
    kept its count, so the new list is exact if its last entry still ranks at least as high as
    that (or the old list held every user). Else from the users that may be in it
    (_TOP_CANDIDATES)."""
    old: list[tuple[int, int, int]] = conn.execute(
        "SELECT rank, user_id, tx_count FROM top_users ORDER BY rank"
    ).fetchall()
    counts = {user: count for _, user, count in old}
    for (user,) in conn.execute("SELECT user_id FROM fix_users").fetchall():
        counts.pop(user, None)
    counts.update(
        conn.execute(
            aggregates.TOUCHED_COUNTS.format(ids="SELECT user_id FROM fix_users")
        ).fetchall()
    )
    ranked = sorted((-count, user) for user, count in counts.items() if count > 0)[:kept]
    if len(old) >= kept and (len(ranked) < kept or ranked[-1] > (-old[-1][2], old[-1][1])):
        least = -ranked[-1][0] if len(ranked) >= kept else 1
        found = conn.execute(_TOP_CANDIDATES, {"least": least}).fetchall()
        ranked = sorted((-count, user) for user, count in found)[:kept]
    if [(user, -minus) for minus, user in ranked] == [(u, c) for _, u, c in old]:
        return
    conn.execute("DELETE FROM top_users")
    append_arrow(
        conn,
        "top_users",
        pa.table(
            {
                "rank": pa.array(range(1, len(ranked) + 1), type=pa.int32()),
                "user_id": pa.array([user for _, user in ranked], type=pa.int64()),
                "tx_count": pa.array([-minus for minus, _ in ranked], type=pa.int64()),
            }
        ),
    )


def _country_merge(conn: duckdb.DuckDBPyConnection, rows: str, change_id: int) -> None:
    """Fold signed ``rows`` (COUNTRY_MONTHLY_OF's input) into the country totals, stamped with
    the correction's change id (the export's watermark)."""
    aggregates.merge_country(conn, aggregates.COUNTRY_MONTHLY_OF.format(rows=rows), change_id)


# --- users -------------------------------------------------------------------------------------

_USER_COLUMNS = ", ".join(COLUMNS[FileKind.USERS])
# Per touched user, its profile after the correction: the latest active candidate that loaded.
_PROFILES = f"""
CREATE OR REPLACE TEMP TABLE fix_profiles AS
SELECT {_USER_COLUMNS}, file_id FROM fix_verdicts WHERE new_verdict = {_LOAD}
QUALIFY row_number() OVER (PARTITION BY user_id ORDER BY order_key DESC, file_id DESC) = 1
"""
# Users whose country changes (a profile gone: to NULL, an orphan's), among those with
# transactions: aggregates' COUNTRY_ROWS["moved"] moves their transactions.
_MOVES = """
CREATE OR REPLACE TEMP TABLE country_moves AS
SELECT i.id AS user_id, u.country AS old_country, p.country AS new_country
FROM fix_ids i LEFT JOIN users u ON u.user_id = i.id LEFT JOIN fix_profiles p ON p.user_id = i.id
WHERE u.country IS DISTINCT FROM p.country AND i.id IN (SELECT user_id FROM user_totals_log)
"""
_PROFILES_WRITE = (
    "DELETE FROM users WHERE user_id IN (SELECT id FROM fix_ids)",
    f"INSERT INTO users SELECT {_USER_COLUMNS}, file_id, $now FROM fix_profiles",
    "DELETE FROM user_versions WHERE user_id IN (SELECT id FROM fix_ids)",
    f"""INSERT INTO user_versions SELECT {_USER_COLUMNS}, file_id FROM fix_verdicts v
    WHERE NOT EXISTS (SELECT 1 FROM fix_profiles p
                      WHERE p.user_id = v.user_id AND p.file_id = v.file_id)""",
)


def _apply_users(conn: duckdb.DuckDBPyConnection, done: Redecided, change_id: int) -> None:
    conn.execute(_PROFILES)
    out, into = one_row(
        conn,
        f"SELECT count(*) FILTER (WHERE {_OUT}), count(*) FILTER (WHERE {_IN}) FROM fix_verdicts",
    )
    done.rows_out, done.rows_in = int(out), int(into)
    conn.execute(_MOVES)
    moved = one_row(conn, "SELECT count(*) FROM country_moves")[0]
    for statement in _PROFILES_WRITE:
        conn.execute(statement, {"now": utc_now()} if "$now" in statement else {})
    if moved:
        rows = aggregates.COUNTRY_ROWS["moved"].replace("$first", str(change_id + 1))
        _country_merge(conn, rows, change_id)
    conn.execute("DROP TABLE country_moves; DROP TABLE fix_profiles")
