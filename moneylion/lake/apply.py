"""Committed lake files -> the local DuckDB warehouse, in ledger order, exactly once.

A replica applies the ledger's files in ``file_id`` order (the ledger's commit order) with the
code local mode runs for a batch of files: the rows each file's reader kept are staged, then
``resolve`` decides the rules that need other files (a transaction id stored before is a
``duplicate`` or ``conflicts_with_stored``, the latest users file wins, orphans load), then
``apply_deltas`` folds the appended rows into the aggregates, then the ledger rows. Those rules
read only what earlier files left, so every replica, whatever it applied before and however it
split the ledger into commits, derives the same state.

The mark (``lake_applied``: the lake version and the last file applied) is written in the same
DuckDB transaction as the rows: a crash loses neither, and nothing is applied twice.

Nothing read from the lake is believed for more than its content shows (``screen.py``): a
ledger entry whose ledger row or rows break a rule is skipped whole, and recorded as such in
the same transaction as the mark.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import itertools
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from moneylion import aggregates, ledger
from moneylion.append import stored_ids_among
from moneylion.config import ConfigError
from moneylion.db import one_row, rollback
from moneylion.lake.screen import QUARANTINE_DDL, Quarantined, record, screen_rows
from moneylion.lake.store import Lake
from moneylion.lake.tables import ROW_TABLES, SHA256, WRITE_ID
from moneylion.ledger import FileOutcome
from moneylion.model import COLUMNS, FileKind
from moneylion.resolve import (
    Applied,
    Stager,
    create_staging,
    insert_rejects,
    resolve,
    resolve_gathered,
    store_rejects,
    utc_now,
)
from moneylion.rules import RejectReason
from moneylion.validate import Reject, ValidatedRows

log = logging.getLogger(__name__)

# Not a numbered migration: only lake mode has it, and it is made when a replica starts.
MARK_DDL = """
CREATE TABLE IF NOT EXISTS lake_applied (
    version    BIGINT NOT NULL,   -- every ledger commit up to this version of files is applied
    file_id    BIGINT NOT NULL,   -- the last file applied (later versions may be partly applied)
    applied_at TIMESTAMP NOT NULL
)"""


class NotAReplica(ConfigError):
    """The local warehouse holds files that did not come from the lake (local mode): the
    config points a lake daemon at the wrong warehouse (the CLI says so, exit code 2)."""


@dataclass(frozen=True)
class Mark:
    version: int = -1
    file_id: int = 0


def open_mark(conn: duckdb.DuckDBPyConnection) -> Mark:
    """The replica's mark (made if missing); refuses a warehouse filled in local mode."""
    conn.execute(MARK_DDL)
    conn.execute(QUARANTINE_DDL)
    rows = conn.execute("SELECT version, file_id FROM lake_applied").fetchall()
    if rows:
        return Mark(int(rows[0][0]), int(rows[0][1]))
    (files,) = one_row(conn, "SELECT count(*) FROM files")
    if files:
        raise NotAReplica(
            "this warehouse holds files ingested in local mode: a lake replica needs an empty "
            "warehouse (it rebuilds itself from the lake)"
        )
    return Mark()


Entry = tuple[dict[str, Any], Quarantined | None]  # a ledger row, skipped (and why) or not


def apply_files(
    conn: duckdb.DuckDBPyConnection,
    lake: Lake,
    entries: list[Entry],
    mark: Mark,
    *,
    top_users_kept: int,
    reject_line_bytes: int,
) -> tuple[list[FileOutcome], list[Quarantined]]:
    """Apply ``entries`` (ledger rows screened by ``screen.screen_ledger``, in order, their
    file ids increasing) in one local transaction that also moves the mark to ``mark``; the
    outcomes of the files applied, and the entries skipped (theirs, and those whose rows
    break a rule)."""
    skipped = [entry for _, entry in entries if entry is not None]
    of_kind: dict[FileKind, list[dict[str, Any]]] = defaultdict(list)
    for row, entry in entries:
        if entry is None and row["status"] == "loaded" and row[WRITE_ID] is not None:
            of_kind[FileKind(row["kind"])].append(row)
    for kind, files in of_kind.items():
        broken = screen_rows(conn, lake, kind, files)
        skipped += broken.values()
        of_kind[kind] = [row for row in files if row["file_id"] not in broken]
    gone = {id(entry.row) for entry in skipped}
    ledger_rows = [row for row, _ in entries if id(row) not in gone]
    ids = [int(row["file_id"]) for row in ledger_rows]
    if any(b <= a for a, b in itertools.pairwise(ids)) or ids[-1:] > [mark.file_id]:
        raise RuntimeError(f"ledger files {ids} do not increase up to file {mark.file_id}")
    first, last = (ids[0], ids[-1]) if ids else (mark.file_id, mark.file_id)
    started = time.perf_counter()
    applied: dict[int, Applied] = {}
    rejected: dict[int, dict[str, int]] = {}
    conn.execute("BEGIN TRANSACTION")
    try:
        for kind, files in of_kind.items():
            if not files:
                continue
            alone = _append_alone(conn, lake, kind, files, reject_line_bytes)
            if alone is not None:
                applied[files[0]["file_id"]], rejected[files[0]["file_id"]] = alone
                continue
            if sum(int(r["rows_loaded"] or 0) for r in files) <= GATHERED_ROWS:
                # Few rows: decided in Python with a lookup or two, as local mode's batches.
                gathered = _gather(conn, lake, kind, files)
                found = resolve_gathered(conn, gathered, utc_now(), reject_line_bytes)
                applied.update(found)
                rejected.update({f: a.rejected_by_reason for f, a in found.items()})
                continue
            create_staging(conn, kind)
            _stage(conn, lake, kind, files)
            applied.update(resolve(conn, kind))
            rejected.update(store_rejects(conn, reject_line_bytes))
        loaded = {
            kind: sum(applied.get(r["file_id"], Applied()).loaded for r in of_kind.get(kind, []))
            for kind in FileKind
        }
        if any(loaded.values()):
            aggregates.apply_deltas(
                conn,
                first,
                last,
                transactions=loaded[FileKind.TRANSACTIONS],
                users=loaded[FileKind.USERS],
                top_users_kept=top_users_kept,
            )
        outcomes = [_outcome(row, applied, rejected) for row in ledger_rows]
        ledger.insert(conn, outcomes)
        record(conn, skipped)
        conn.execute("DELETE FROM lake_applied")
        conn.execute(
            "INSERT INTO lake_applied VALUES ($version, $file_id, $now)",
            {"version": mark.version, "file_id": mark.file_id, "now": dt.datetime.now(dt.UTC)},
        )
        conn.execute("COMMIT")
    except BaseException:
        rollback(conn)
        raise
    log.info(
        "lake_applied",
        extra={
            "fields": {
                "files": len(ledger_rows),
                "first": first,
                "last": last,
                "version": mark.version,
                "rows": sum(o.rows_loaded for o in outcomes),
                "skipped": len(skipped),
                "seconds": round(time.perf_counter() - started, 4),
            }
        },
    )
    return outcomes, skipped


def move_mark(conn: duckdb.DuckDBPyConnection, mark: Mark) -> None:
    """Record that every ledger commit up to ``mark.version`` is applied (no file in between:
    versions of maintenance, or files applied by earlier transactions)."""
    conn.execute(
        "UPDATE lake_applied SET version = $version, applied_at = $now WHERE file_id = $file_id",
        {"version": mark.version, "file_id": mark.file_id, "now": dt.datetime.now(dt.UTC)},
    )
    if not conn.execute("SELECT count(*) FROM lake_applied").fetchall()[0][0]:
        conn.execute(
            "INSERT INTO lake_applied VALUES ($version, $file_id, $now)",
            {"version": mark.version, "file_id": mark.file_id, "now": dt.datetime.now(dt.UTC)},
        )


# A file's rows and rejects come from the lake's data files through DuckDB's scan of the
# Arrow dataset (parallel, the write id bounds pushed down), joined to the files being applied.
_STAGE_ROWS = """
INSERT INTO staged BY NAME
SELECT o.file_id, {columns}, r.line, r.raw_line
FROM lake_rows r JOIN lake_owners o ON o.{sha} = r.{sha} AND o.{write_id} = r.{write_id}
WHERE r.{write_id} BETWEEN $low AND $high
"""
_STAGE_REJECTS = """
INSERT INTO staged_rejects BY NAME
SELECT o.file_id, r.line_number, r.reason, r.message, r.raw_line
FROM lake_rows r JOIN lake_owners o ON o.{sha} = r.{sha} AND o.{write_id} = r.{write_id}
WHERE r.{write_id} BETWEEN $low AND $high
"""


# A large transactions file alone in its chunk, none of whose ids is stored: what ``resolve``
# would decide is known (its reader kept one copy of each id, so every row loads), and its rows
# are appended straight from the lake's scan, as local mode's fast path appends a clean file.
ALONE_ROWS = 100_000
_ALONE_WHERE = f"{SHA256} = $sha AND {WRITE_ID} = $write_id"
_ALONE_RANGE = f"SELECT min({{key}}), max({{key}}), count(*) FROM lake_rows WHERE {_ALONE_WHERE}"
_APPEND_ALONE = (
    "INSERT INTO transactions BY NAME SELECT {columns}, $file_id AS file_id "
    f"FROM lake_rows WHERE {_ALONE_WHERE}"
)
_REJECTS_ALONE = (
    "SELECT $file_id AS file_id, line_number, reason, message, raw_line "
    f"FROM lake_rows WHERE {_ALONE_WHERE}"
)


def _append_alone(
    conn: duckdb.DuckDBPyConnection,
    lake: Lake,
    kind: FileKind,
    files: list[dict[str, Any]],
    reject_line_bytes: int,
) -> tuple[Applied, dict[str, int]] | None:
    """The fast way for a large transactions file alone (see above); None: not this one."""
    if kind is not FileKind.TRANSACTIONS or len(files) != 1:
        return None
    row = files[0]
    if int(row["rows_loaded"] or 0) < ALONE_ROWS:
        return None
    owner = [(row["sha256"], row[WRITE_ID])]
    key = COLUMNS[kind][0]
    params: dict[str, object] = {"sha": row["sha256"], "write_id": row[WRITE_ID]}
    conn.register("lake_rows", lake.rows_of(ROW_TABLES[kind], owner))
    try:
        low, high, count = one_row(conn, _ALONE_RANGE.format(key=key), params)
        if not count:
            return None
        ids = f"SELECT {key} FROM lake_rows WHERE {_ALONE_WHERE}"
        if stored_ids_among(conn, ids, params, int(low), int(high)):
            return None  # some ids are stored: resolve decides them
        columns = ", ".join(COLUMNS[kind])
        conn.execute(_APPEND_ALONE.format(columns=columns), {**params, "file_id": row["file_id"]})
    finally:
        conn.unregister("lake_rows")
    reasons: dict[str, int] = {}
    if int(row["rows_rejected"] or 0):
        conn.register("lake_rows", lake.rows_of("rejects", owner))
        try:
            insert_rejects(
                conn, _REJECTS_ALONE, reject_line_bytes, {**params, "file_id": row["file_id"]}
            )
            found = conn.execute(
                f"SELECT reason, count(*) FROM lake_rows WHERE {_ALONE_WHERE} GROUP BY ALL",
                params,
            ).fetchall()
        finally:
            conn.unregister("lake_rows")
        reasons = {reason: int(n) for reason, n in found}
    return Applied(loaded=int(count)), reasons


# Up to this many rows of one kind per chunk are resolved in Python (resolve_gathered: a
# statement or two, but Python's cost per row); more by the SQL rules (resolve: a dozen
# statements per chunk, next to nothing per row). Where they cross: docs/performance.md.
GATHERED_ROWS = 2_000
_GATHER = """
SELECT o.file_id, {columns}, r.{line}, r.raw_line
FROM lake_rows r JOIN lake_owners o ON o.{sha} = r.{sha} AND o.{write_id} = r.{write_id}
WHERE r.{write_id} BETWEEN $low AND $high ORDER BY o.file_id, r.{line}
"""


def _gather(
    conn: duckdb.DuckDBPyConnection, lake: Lake, kind: FileKind, files: list[dict[str, Any]]
) -> Stager:
    """The rows and rejects of ``files`` (of one kind) gathered in memory, file by file."""
    stager = Stager(kind)
    names = {"sha": SHA256, "write_id": WRITE_ID}
    columns = ", ".join(f"r.{name}" for name in COLUMNS[kind])
    with _owners(conn, files) as bounds:
        batches: dict[int, ValidatedRows] = {
            int(r["file_id"]): ValidatedRows(kind, {c: [] for c in COLUMNS[kind]}) for r in files
        }
        for table, line, select in (
            (ROW_TABLES[kind], "line", f"{columns}, "),
            ("rejects", "line_number", "r.reason, r.message, "),
        ):
            conn.register(
                "lake_rows", lake.rows_of(table, [(r["sha256"], r[WRITE_ID]) for r in files])
            )
            try:
                sql = _GATHER.format(columns=select.rstrip(", "), line=line, **names)
                found = conn.execute(sql, bounds).fetchall()
            finally:
                conn.unregister("lake_rows")
            for file_id, *values, at, raw in found:
                batch = batches[file_id]
                if table == "rejects":
                    reason, message = values
                    batch.rejects.append(Reject(at, RejectReason(reason), message, raw))
                    continue
                for column, value in zip(batch.columns.values(), values, strict=True):
                    column.append(value)
                batch.lines.append(at)
                batch.raw_lines.append(raw)
    for file_id, batch in batches.items():
        stager.add(file_id, batch)
    return stager


@contextlib.contextmanager
def _owners(
    conn: duckdb.DuckDBPyConnection, files: list[dict[str, Any]]
) -> Iterator[dict[str, int]]:
    """``lake_owners`` (sha256, write id, global file id of ``files``) registered on ``conn``
    for the joins; the bounds of their write ids."""
    ids = pa.table(
        {
            SHA256: pa.array([r["sha256"] for r in files], pa.string()),
            WRITE_ID: pa.array([r[WRITE_ID] for r in files], pa.int64()),
            "file_id": pa.array([r["file_id"] for r in files], pa.int64()),
        }
    )
    conn.register("lake_owners", ids)
    try:
        yield {"low": min(r[WRITE_ID] for r in files), "high": max(r[WRITE_ID] for r in files)}
    finally:
        conn.unregister("lake_owners")


def _stage(
    conn: duckdb.DuckDBPyConnection, lake: Lake, kind: FileKind, files: list[dict[str, Any]]
) -> None:
    """The staged rows and rejects of ``files`` (of one kind), with their global file id."""
    owners = [(r["sha256"], r[WRITE_ID]) for r in files]
    names = {"sha": SHA256, "write_id": WRITE_ID}
    columns = ", ".join(f"r.{name}" for name in COLUMNS[kind])
    with _owners(conn, files) as bounds:
        for table, sql in (
            (ROW_TABLES[kind], _STAGE_ROWS.format(columns=columns, **names)),
            ("rejects", _STAGE_REJECTS.format(**names)),
        ):
            conn.register("lake_rows", lake.rows_of(table, owners))
            try:
                conn.execute(sql, bounds)
            finally:
                conn.unregister("lake_rows")


def _outcome(
    row: dict[str, Any], applied: dict[int, Applied], rejected: dict[int, dict[str, int]]
) -> FileOutcome:
    """The local ledger row of a lake file: the reader's facts, the counts decided here."""
    file_id = int(row["file_id"])
    found = applied.get(file_id, Applied())
    reasons = rejected.get(file_id, {})
    outcome = FileOutcome(
        name=row["name"],
        path=Path(row["name"]),
        sha256=row["sha256"],
        status=row["status"],
        file_id=file_id,
        kind=row["kind"],
        rows_total=int(row["rows_total"]),
        size_bytes=int(row["size_bytes"]),
        seconds=float(row["seconds"]),
        error_reason=row["error_reason"],
        error=row["error"],
        finished_at=row["finished_at"],
        received_at=row["received_at"],
    )
    if row["status"] != "loaded":
        return outcome
    return dataclasses.replace(
        outcome,
        rows_loaded=found.loaded,
        rows_duplicate=int(row["rows_duplicate"]) + found.duplicate,
        rows_rejected=sum(reasons.values()),
        rejected_by_reason=reasons,
    )
