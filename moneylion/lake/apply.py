"""Committed lake files -> the local DuckDB warehouse, in ledger order, exactly once.

A replica applies the ledger's files in ``file_id`` order (the ledger's commit order) with the
rules local mode runs for a batch of files (``paths.apply_chunk`` picks the way): the rows each
file's reader kept are pending, then ``resolve`` decides the rules that need other files (a
transaction id stored before is a ``duplicate`` or ``conflicts_with_stored``, the latest users
file wins, orphans load), then
``apply_deltas`` folds the appended rows into the aggregates, then the ledger rows. Those rules
read only what earlier files left, so every replica, whatever it applied before and however it
split the ledger into commits, derives the same state.

The mark (``lake_applied``: the lake version and the last file applied) is written in the same
DuckDB transaction as the rows: a crash loses neither, and nothing is applied twice.

A correction's entry (retract, restore) is applied alone, in its place, by local mode's
``corrections.correct``: its change id is its file id in the lake (so every replica gives it the
same), the mark written in its transaction. One that does not apply there (no such file, or not
in a status it applies to) is refused alike by every replica (they hold the same prefix): it is
recorded as a quarantined entry and the replica goes on.

Nothing read from the lake is believed for more than its content shows (``screen.py``): a
ledger entry whose ledger row or rows break a rule is skipped whole, and recorded as such in
the same transaction as the mark.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from moneylion import aggregates, corrections, ledger
from moneylion.config import ConfigError
from moneylion.db import one_row, transaction
from moneylion.lake.paths import Chunk, apply_chunk
from moneylion.lake.request import ACTIONS
from moneylion.lake.screen import QUARANTINE_DDL, Quarantine, Quarantined, record, screen_rows
from moneylion.lake.store import Lake
from moneylion.lake.tables import CORRECTION, CORRECTS, REASON, WRITE_ID
from moneylion.ledger import FileOutcome, FileStatus
from moneylion.load import Applied
from moneylion.model import FileKind
from moneylion.tuning import DEFAULT as DEFAULT_TUNING
from moneylion.tuning import Tuning

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
    tuning: Tuning = DEFAULT_TUNING,
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
    paths: list[str] = []  # the way each kind's files went (paths.LAKE_APPLY)
    with transaction(conn):
        for kind, files in of_kind.items():
            if files:
                chunk = Chunk(conn, lake, kind, files, reject_line_bytes, tuning)
                path, found = apply_chunk(chunk)
                paths.append(path)
                applied.update(found)
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
                tuning=tuning,
            )
        outcomes = [_outcome(row, applied) for row in ledger_rows]
        ledger.insert(conn, outcomes)
        record(conn, skipped)
        write_mark(conn, mark)
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
                "paths": paths,
                "seconds": round(time.perf_counter() - started, 4),
            }
        },
    )
    return outcomes, skipped


def write_mark(conn: duckdb.DuckDBPyConnection, mark: Mark) -> None:
    """The replica's mark is ``mark`` (in the open transaction)."""
    conn.execute("DELETE FROM lake_applied")
    conn.execute(
        "INSERT INTO lake_applied VALUES ($version, $file_id, $now)",
        {"version": mark.version, "file_id": mark.file_id, "now": dt.datetime.now(dt.UTC)},
    )


def apply_correction(
    conn: duckdb.DuckDBPyConnection,
    row: dict[str, Any],
    mark: Mark,
    *,
    top_users_kept: int,
    line_bytes: int,
) -> corrections.Correction | Quarantined:
    """Apply the correction's entry ``row`` (screened) with the mark moved to ``mark`` in the
    same transaction: what it did, or, when it does not apply here, the entry as skipped (then
    recorded, and the mark moved past it)."""
    try:
        return corrections.correct(
            conn,
            ACTIONS[row[CORRECTION]],
            int(row[CORRECTS]),
            row[REASON],
            top_users_kept,
            line_bytes,
            also=lambda c: write_mark(c, mark),
            change_id=int(row["file_id"]),
        )
    except corrections.CorrectionRefused as refused:
        skipped = Quarantined(row, Quarantine.CORRECTION_REFUSED, str(refused))
    with transaction(conn):
        record(conn, [skipped])
        write_mark(conn, mark)
    return skipped


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


def _outcome(row: dict[str, Any], applied: dict[int, Applied]) -> FileOutcome:
    """The local ledger row of a lake file: the reader's facts, the counts decided here."""
    file_id = int(row["file_id"])
    found = applied.get(file_id, Applied())
    reasons = found.rejected_by_reason
    outcome = FileOutcome(
        name=row["name"],
        path=Path(row["name"]),
        sha256=row["sha256"],
        status=FileStatus(row["status"]),
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
    if outcome.status is not FileStatus.LOADED:
        return outcome
    return dataclasses.replace(
        outcome,
        rows_loaded=found.loaded,
        rows_duplicate=int(row["rows_duplicate"]) + found.duplicate,
        rows_rejected=sum(reasons.values()),
        rejected_by_reason=reasons,
    )
