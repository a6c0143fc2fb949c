"""What a replica checks of the lake before it applies anything: every daemon holding the lake's
credentials writes it (docs/lake.md, "Trust boundary"), so a lake row is believed only as far as
its content shows.

* ``screen_ledger``: each ledger row must be one a daemon writes (``ledger_fault``: its columns
  in their domains; a correction's, ``correction_fault``), come after the last file applied
  (``file_id`` increasing in the ledger's order) and name bytes the ledger does not hold yet;
* ``screen_rows``: a file's rows must pass the rules a CSV row passes at ingest, the one
  declaration of them (``reader.stored_check_sql``), name each id once, and its rejects give
  a known reason and a line.

A row failing one quarantines its whole ledger entry: nothing of the file is applied, the
replica records why (``lake_quarantine``) and moves on; so does a correction that does not
apply where it stands in the order (``apply.apply_correction``). The verdict depends on the lake's
content alone (and on the earlier verdicts, themselves content), so every replica skips the
same entries and holds the same prefix of the ledger. A local error (a full disk, a lock, a
lake that cannot be read) is never a verdict: it raises, and the tailer retries.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import pyarrow as pa

from moneylion.db import one_row
from moneylion.lake.request import ACTIONS
from moneylion.lake.store import Lake
from moneylion.lake.tables import (
    CORRECTION,
    CORRECTS,
    FILE_ID_MAX,
    LAKE_VERSION,
    REASON,
    ROW_TABLES,
    SHA256,
    WRITE_ID,
)
from moneylion.ledger import LEDGER_COLUMNS
from moneylion.model import COLUMNS, FileKind
from moneylion.reader import stored_check_sql
from moneylion.rules import RejectReason

log = logging.getLogger(__name__)

NAME_MAX_CHARS = 4096  # a ledger row's file name (a path component is at most 255 bytes)
REASON_MAX_CHARS = 4096  # a correction's reason (the API takes at most 1,000 characters)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_STATUSES = ("loaded", "failed")
_COUNTS = ("rows_total", "rows_loaded", "rows_duplicate", "rows_rejected", "size_bytes")


class Quarantine(enum.StrEnum):
    """Why a replica skipped a ledger entry (its file's rows are not applied)."""

    BAD_LEDGER_ROW = "bad_ledger_row"  # a ledger column missing or outside its domain
    OUT_OF_ORDER = "out_of_order"  # its file id does not come after the last file applied
    SHA256_AGAIN = "sha256_again"  # bytes an earlier ledger entry holds
    BAD_ROW = "bad_row"  # a row of the file breaks a column's rule
    BAD_REJECT = "bad_reject"  # a reject of the file without a known reason or a line
    ID_TWICE = "id_twice"  # the file's rows hold an id twice
    # A correction that does not apply where it stands in the order: no such file, or one not
    # in a status it applies to (two daemons retracted the same file: the second).
    CORRECTION_REFUSED = "correction_refused"


@dataclass(frozen=True)
class Quarantined:
    """A ledger entry skipped, and why."""

    row: dict[str, Any]
    reason: Quarantine
    message: str

    @property
    def key(self) -> QuarantineKey:
        return key_of(self.row)


QuarantineKey = tuple[int | None, int | None, str | None, str | None]


def key_of(row: dict[str, Any]) -> QuarantineKey:
    """What tells a ledger row from the others, malformed ones included."""
    return (row.get(LAKE_VERSION), row.get("file_id"), row.get("sha256"), row.get("name"))


# Not a numbered migration: only lake mode has it, made when a replica starts (as the mark).
QUARANTINE_DDL = """
CREATE TABLE IF NOT EXISTS lake_quarantine (
    lake_version   BIGINT,
    file_id        BIGINT,
    sha256         VARCHAR,
    name           VARCHAR,
    reason         VARCHAR NOT NULL,
    message        VARCHAR NOT NULL,
    quarantined_at TIMESTAMP NOT NULL
)"""
_QUARANTINED = "SELECT lake_version, file_id, sha256, name FROM lake_quarantine"
_RECORD = """
INSERT INTO lake_quarantine SELECT $lake_version, $file_id, $sha256, $name, $reason, $message, $now
WHERE NOT EXISTS (SELECT 1 FROM lake_quarantine WHERE lake_version IS NOT DISTINCT FROM
    $lake_version AND file_id IS NOT DISTINCT FROM $file_id AND sha256 IS NOT DISTINCT FROM
    $sha256 AND name IS NOT DISTINCT FROM $name)
"""


def quarantined_keys(conn: duckdb.DuckDBPyConnection) -> set[QuarantineKey]:
    """The entries this replica skipped so far."""
    return {(v, f, s, n) for v, f, s, n in conn.execute(_QUARANTINED).fetchall()}


def quarantined_count(conn: duckdb.DuckDBPyConnection) -> int:
    """How many ledger entries this replica skipped."""
    (count,) = one_row(conn, "SELECT count(*) FROM lake_quarantine")
    return int(count)


def log_quarantined(skipped: Sequence[Quarantined]) -> None:
    """One event per entry skipped, after its commit."""
    for entry in skipped:
        lake_version, file_id, _, name = entry.key
        log.warning(
            "lake_entry_quarantined",
            extra={
                "fields": {
                    "lake_version": lake_version,
                    "file_id": file_id,
                    "file": name,
                    "reason": str(entry.reason),
                    "message": entry.message,
                }
            },
        )


def record(conn: duckdb.DuckDBPyConnection, skipped: Sequence[Quarantined]) -> None:
    """Record ``skipped`` in the open transaction (an entry recorded before is left alone)."""
    now = dt.datetime.now(dt.UTC)
    for entry in skipped:
        lake_version, file_id, sha256, name = entry.key
        conn.execute(
            _RECORD,
            {
                "lake_version": _bigint(lake_version),
                "file_id": _bigint(file_id),
                "sha256": sha256 if isinstance(sha256, str) else None,
                "name": name if isinstance(name, str) else None,
                "reason": str(entry.reason),
                "message": entry.message,
                "now": now,
            },
        )


def _bigint(value: object) -> int | None:
    return value if isinstance(value, int) and -(2**63) <= value < 2**63 else None


# --- the ledger ---------------------------------------------------------------------------------


def _count(value: object) -> bool:
    return isinstance(value, int) and 0 <= value < 2**63


def ledger_fault(row: dict[str, Any]) -> str | None:
    """What makes ``row`` other than a ledger row a daemon writes (None: nothing)."""
    missing = [name for name in LEDGER_COLUMNS if name not in row]
    if missing:
        return f"no column {', '.join(missing)}"
    file_id, status, kind, sha = row["file_id"], row["status"], row["kind"], row["sha256"]
    if not isinstance(file_id, int) or not 0 < file_id <= FILE_ID_MAX:
        return f"file_id {file_id!r} is not a file id (1..{FILE_ID_MAX})"
    if not isinstance(row["name"], str) or not 0 < len(row["name"]) <= NAME_MAX_CHARS:
        return f"name is empty or longer than {NAME_MAX_CHARS} characters"
    if status not in _STATUSES:
        return f"status {status!r} is not one of {', '.join(_STATUSES)}"
    if sha is not None and not (isinstance(sha, str) and _SHA256.fullmatch(sha)):
        return "sha256 is not a sha256 hex digest"
    if kind is not None and kind not in set(FileKind):
        return f"kind {kind!r} is not one of {', '.join(FileKind)}"
    if status == "loaded" and (sha is None or kind is None):
        return "a loaded file without its sha256 or its kind"
    if status == "failed" and not row["error_reason"]:
        return "a failed file without its reason"
    bad = [name for name in _COUNTS if not _count(row[name])]
    if bad:
        return f"{', '.join(bad)}: not a count"
    parts = row["rows_loaded"] + row["rows_duplicate"] + row["rows_rejected"]
    if row["rows_total"] != parts:
        return f"rows_total {row['rows_total']} is not loaded + duplicate + rejected ({parts})"
    if not (isinstance(row["seconds"], float) and math.isfinite(row["seconds"])):
        return "seconds is not a finite number"
    if row["received_at"] is None or row["finished_at"] is None:
        return "a time is missing"
    write_id = row.get(WRITE_ID)
    if write_id is not None and not (isinstance(write_id, int) and write_id > 0):
        return f"write_id {write_id!r} is not positive"
    return None


def is_correction(row: dict[str, Any]) -> bool:
    """Whether a ledger row is a correction's entry (not a file's)."""
    return row.get(CORRECTION) is not None


def correction_fault(row: dict[str, Any]) -> str | None:
    """What makes ``row`` other than a correction's entry a daemon writes (None: nothing)."""
    file_id, action, target, reason = (
        row["file_id"],
        row[CORRECTION],
        row.get(CORRECTS),
        row.get(REASON),
    )
    if not isinstance(file_id, int) or not 0 < file_id <= FILE_ID_MAX:
        return f"file_id {file_id!r} is not a file id (1..{FILE_ID_MAX})"
    if action not in ACTIONS:
        return f"correction {action!r} is not one of {', '.join(ACTIONS)}"
    if not (isinstance(target, int) and 0 < target < file_id):
        return f"corrects {target!r} is not a file id before its own ({file_id})"
    if reason is not None and not (isinstance(reason, str) and len(reason) <= REASON_MAX_CHARS):
        return f"reason is longer than {REASON_MAX_CHARS} characters"
    if not isinstance(row["name"], str) or not 0 < len(row["name"]) <= NAME_MAX_CHARS:
        return f"name is empty or longer than {NAME_MAX_CHARS} characters"
    if row["sha256"] is not None or row.get(WRITE_ID) is not None or row["status"] is not None:
        return "a correction with a sha256, a write id or a status of its own"
    return None


@dataclass(frozen=True)
class Screened:
    """The ledger rows after the mark, in the ledger's order: each to apply, or skipped."""

    entries: list[tuple[dict[str, Any], Quarantined | None]]

    @property
    def last_file_id(self) -> int | None:
        """The last file id a ledger row passed with (its rows are checked later)."""
        ids = [row["file_id"] for row, skipped in self.entries if skipped is None]
        return ids[-1] if ids else None


def screen_ledger(
    conn: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]], applied_file_id: int
) -> Screened:
    """Which of ``rows`` (the ledger after the replica's mark, in order) are applied and which
    are skipped, and why; the entries applied or skipped before are left out.

    Each verdict depends only on the rows before it, whichever pass met them: a file id must
    pass the last one a ledger row passed with (the rows' own checks do not move it), and a
    sha256 any earlier entry named, applied or skipped, is not taken again."""
    done = quarantined_keys(conn)
    earlier = [
        r["file_id"] for r in rows if _is_id(r["file_id"]) and r["file_id"] <= applied_file_id
    ]
    applied = _applied(conn, earlier)
    corrected = _corrected(conn, earlier)
    faults = {
        id(row): correction_fault(row) if is_correction(row) else ledger_fault(row) for row in rows
    }
    seen = _seen_shas(conn, [r["sha256"] for r in rows if isinstance(r["sha256"], str)])
    entries: list[tuple[dict[str, Any], Quarantined | None]] = []
    last = applied_file_id
    for row in rows:
        if key_of(row) in done:
            continue
        file_id, sha = row["file_id"], row["sha256"]
        if _is_id(file_id) and file_id <= applied_file_id:
            # Applied by an earlier chunk of a version applied in part.
            done_here = file_id in corrected if is_correction(row) else applied.get(file_id) == sha
            if done_here:
                continue
        fault = faults[id(row)]
        skipped: Quarantined | None = None
        if fault is not None:
            skipped = Quarantined(row, Quarantine.BAD_LEDGER_ROW, fault)
        elif file_id <= last:
            message = f"file_id {file_id} does not come after file {last}"
            skipped = Quarantined(row, Quarantine.OUT_OF_ORDER, message)
        elif sha is not None and sha in seen:
            message = f"the same sha256 as ledger file #{seen[sha]}"
            skipped = Quarantined(row, Quarantine.SHA256_AGAIN, message)
        else:
            last = file_id
        if isinstance(sha, str):
            seen.setdefault(sha, file_id)
        if skipped is not None:
            done.add(skipped.key)
        entries.append((row, skipped))
    return Screened(entries)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and 0 < value < 2**63


def _applied(conn: duckdb.DuckDBPyConnection, file_ids: list[int]) -> dict[int, str | None]:
    """The sha256 of each of ``file_ids`` this replica applied."""
    if not file_ids:
        return {}
    found = conn.execute(
        "SELECT file_id, sha256 FROM files WHERE file_id IN (SELECT unnest($ids))",
        {"ids": file_ids},
    ).fetchall()
    return {int(file_id): sha for file_id, sha in found}


def _corrected(conn: duckdb.DuckDBPyConnection, file_ids: list[int]) -> set[int]:
    """Those of ``file_ids`` that are corrections this replica applied (their change ids)."""
    if not file_ids:
        return set()
    found = conn.execute(
        "SELECT change_id FROM corrections WHERE change_id IN (SELECT unnest($ids))",
        {"ids": file_ids},
    ).fetchall()
    return {int(change_id) for (change_id,) in found}


def _seen_shas(conn: duckdb.DuckDBPyConnection, shas: list[str]) -> dict[str, object]:
    """Each of ``shas`` an entry applied or skipped here named, with that entry's file id."""
    if not shas:
        return {}
    found = conn.execute(
        "SELECT sha256, file_id FROM files WHERE sha256 IN (SELECT unnest($shas)) UNION ALL "
        "SELECT sha256, file_id FROM lake_quarantine WHERE sha256 IN (SELECT unnest($shas))",
        {"shas": sorted(set(shas))},
    ).fetchall()
    return {sha: file_id for sha, file_id in found}


# --- a file's rows ------------------------------------------------------------------------------


def _rows_sql(kind: FileKind) -> str:
    """Per file of ``lake_owners``: its first row (by line) that breaks a rule, and which."""
    checks = [(name, stored_check_sql(name, f"r.{name}")) for name in COLUMNS[kind]]
    checks.append(("line", "coalesce(r.line > 0, false)"))
    broken = " ".join(f"WHEN NOT {check} THEN '{name}'" for name, check in checks)
    return f"""
SELECT file_id, arg_min(broken, coalesce(line, 0)), min(line) FROM (
    SELECT o.file_id, r.line, CASE {broken} END AS broken
    FROM lake_rows r JOIN lake_owners o ON o.{SHA256} = r.{SHA256} AND o.{WRITE_ID} = r.{WRITE_ID}
    WHERE r.{WRITE_ID} BETWEEN $low AND $high
) WHERE broken IS NOT NULL GROUP BY file_id
"""


def _twice_sql(kind: FileKind) -> str:
    """Per file of ``lake_owners`` whose rows hold an id more than once: one such id."""
    key = COLUMNS[kind][0]
    return f"""
SELECT file_id, min({key}) FROM (
    SELECT o.file_id, r.{key} FROM lake_rows r
    JOIN lake_owners o ON o.{SHA256} = r.{SHA256} AND o.{WRITE_ID} = r.{WRITE_ID}
    WHERE r.{WRITE_ID} BETWEEN $low AND $high
    GROUP BY ALL HAVING count(*) > 1
) GROUP BY file_id
"""


_REASONS = ", ".join(f"'{reason}'" for reason in RejectReason)
_REJECTS_SQL = f"""
SELECT o.file_id, min(coalesce(r.line_number, 0)) FROM lake_rows r
JOIN lake_owners o ON o.{SHA256} = r.{SHA256} AND o.{WRITE_ID} = r.{WRITE_ID}
WHERE r.{WRITE_ID} BETWEEN $low AND $high AND NOT coalesce(
    r.reason IN ({_REASONS}) AND r.line_number > 0 AND r.message IS NOT NULL, false)
GROUP BY o.file_id
"""


def screen_rows(
    conn: duckdb.DuckDBPyConnection, lake: Lake, kind: FileKind, files: list[dict[str, Any]]
) -> dict[int, Quarantined]:
    """The files of ``files`` (ledger rows of one kind, each with rows) whose rows or rejects
    in the lake break a rule, by file id: one scan of each table for them all."""
    owners = [(r["sha256"], r[WRITE_ID]) for r in files if r[WRITE_ID] is not None]
    if not owners:
        return {}
    by_id = {int(r["file_id"]): r for r in files}
    found: dict[int, Quarantined] = {}
    table = pa.table(
        {
            SHA256: pa.array([sha for sha, _ in owners], pa.string()),
            WRITE_ID: pa.array([w for _, w in owners], pa.int64()),
            "file_id": pa.array([r["file_id"] for r in files if r[WRITE_ID] is not None]),
        }
    )
    bounds = {"low": min(w for _, w in owners), "high": max(w for _, w in owners)}
    conn.register("lake_owners", table)
    try:
        conn.register("lake_rows", lake.rows_of(ROW_TABLES[kind], owners))
        try:
            for file_id, column, line in conn.execute(_rows_sql(kind), bounds).fetchall():
                message = f"line {line}: {column} breaks its rule (as a CSV field would)"
                found[file_id] = Quarantined(by_id[file_id], Quarantine.BAD_ROW, message)
            for file_id, key in conn.execute(_twice_sql(kind), bounds).fetchall():
                message = f"{COLUMNS[kind][0]} {key} is in the file's rows more than once"
                found.setdefault(file_id, Quarantined(by_id[file_id], Quarantine.ID_TWICE, message))
        finally:
            conn.unregister("lake_rows")
        conn.register("lake_rows", lake.rows_of("rejects", owners))
        try:
            for file_id, line in conn.execute(_REJECTS_SQL, bounds).fetchall():
                message = f"a reject (line {line}) without a known reason, a line or a message"
                found.setdefault(
                    file_id, Quarantined(by_id[file_id], Quarantine.BAD_REJECT, message)
                )
        finally:
            conn.unregister("lake_rows")
    finally:
        conn.unregister("lake_owners")
    return found
