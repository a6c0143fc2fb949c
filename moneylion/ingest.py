"""One file -> one DuckDB transaction: ledger check, header, rows, deltas, ledger row.

Exactly once: a file is its sha256. Bytes already in the ledger change nothing. Everything a
file writes (rows, rejects, aggregate deltas, its ledger row) commits together or not at all.
This module never moves the file: the caller does, after the commit (see daemon.py).

A file whose refused rows pass ``max_reject_share`` loads nothing: it is ``held`` (its ledger row
and rejects commit, nothing else) until ``release.py`` loads it. A caller may also end the
transaction otherwise than by a commit (``Finish``): ``check.py`` rolls it back after reading
what the file did, ``release.py`` loads a held file again under its ledger id.

The rows themselves go in by the first path of the kind's ladder that takes them
(``ladder.climb``; ``ladder.LADDERS`` declares the paths).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from moneylion import aggregates, ledger
from moneylion.config import Config
from moneylion.db import append_arrow, int_constants, restart, transaction, utc_now
from moneylion.errors import FileRefused
from moneylion.ladder import LADDERS, REFERENCE_ONLY, Ladders, climb
from moneylion.ledger import FileOutcome, FileStatus
from moneylion.load import Load
from moneylion.model import FileKind
from moneylion.rules import latest_date
from moneylion.source import Bounds, Part, StagedFile, stage
from moneylion.tuning import DEFAULT as DEFAULT_TUNING
from moneylion.validate import Header, read_header

__all__ = [
    "COMMIT",
    "FileOutcome",
    "Finish",
    "Reload",
    "ingest_file",
    "ingest_staged",
    "keep_rejects_only",
    "record_unread",
    "warehouse_status",
]

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
DEFAULT_TOP_USERS_KEPT = 1000


@dataclass(frozen=True)
class Reload:
    """A file the ledger has (a held one: ``release.py``) loaded again under its own id, as the
    latest file in the order. Its transaction begins with ``clear`` (its old ledger row and
    rejects go), and it takes the reference rules: they decide against every stored row, where
    the fast paths count only the rows of files before its id (later files have larger ids);
    and they never give up, so the transaction is never begun again without ``clear``'s writes.
    It is never held."""

    file_id: int
    clear: Callable[[duckdb.DuckDBPyConnection], None]


@dataclass(frozen=True)
class Finish:
    """How a new file's transaction ends, for the callers that do more than commit it.

    ``inspect`` runs last inside it, with the file's outcome: a check (``check.py``) reads what
    the file did; a release writes its correction row, or refuses (an exception rolls all back).
    ``commit=False`` rolls everything back after ``inspect``: nothing stays, nothing is logged as
    committed. ``reload``: the file is one the ledger has (``Reload``)."""

    inspect: Callable[[duckdb.DuckDBPyConnection, FileOutcome], None] | None = None
    commit: bool = True
    reload: Reload | None = None

    def end(self, conn: duckdb.DuckDBPyConnection, outcome: FileOutcome) -> None:
        """Last inside the transaction: ``inspect``, then the rollback of a trial (the block's
        COMMIT then ends an empty transaction)."""
        if self.inspect is not None:
            self.inspect(conn, outcome)
        if not self.commit:
            restart(conn)


COMMIT = Finish()  # the usual end: commit


def ingest_file(
    conn: duckdb.DuckDBPyConnection,
    path: Path,
    config: Config | None = None,
    *,
    progress: Progress | None = None,
    received_at: dt.datetime | None = None,
    ladders: Ladders = LADDERS,
) -> FileOutcome:
    """Ingest one CSV file in one DuckDB transaction; return what happened.

    ``received_at``: when the file arrived (UTC, no zone; default now): the ledger's
    ``received_at``, and the day ``future_date`` counts from (a replay of ``done/`` passes the
    original's, so that it decides the same).

    The file is read once, into a private copy hashed on the way (source.stage), and only that
    copy is loaded. Bad input is never an exception: a refused file comes back with status
    ``failed`` and its reason. OSError (file vanished, unreadable, changed while read:
    source.FileChanged) and DuckDB errors propagate, after rollback. ``ladders``: the paths
    each kind of file may take (tests hold one ladder to another).
    """
    started = time.perf_counter()
    received_at = utc_now() if received_at is None else received_at
    path = Path(path)
    with contextlib.ExitStack() as stack:
        if config is not None:
            staging = config.staging_dir
        else:
            staging = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moneylion-")))
        try:
            staged = stage(path, staging, bounds=Bounds.of(config))
        except FileRefused as refused:
            return record_unread(conn, path, refused, started=started, received_at=received_at)
        stack.callback(staged.discard)
        return ingest_staged(
            conn,
            staged,
            config,
            started=started,
            received_at=received_at,
            progress=progress,
            ladders=ladders,
        )


def record_unread(
    conn: duckdb.DuckDBPyConnection,
    path: Path,
    refused: FileRefused,
    *,
    started: float | None = None,
    received_at: dt.datetime | None = None,
) -> FileOutcome:
    """The ledger row of an inbox entry refused without being read: no bytes, no sha256."""
    started = time.perf_counter() if started is None else started
    received_at = utc_now() if received_at is None else received_at
    arrival = _Arrival(path, path.name, None, 0, received_at, started, _next_file_id(conn))
    return _record_failure(conn, arrival, None, refused)


def ingest_staged(
    conn: duckdb.DuckDBPyConnection,
    staged: StagedFile,
    config: Config | None = None,
    *,
    started: float | None = None,
    received_at: dt.datetime | None = None,
    progress: Progress | None = None,
    ladders: Ladders = LADDERS,
    finish: Finish = COMMIT,
) -> FileOutcome:
    """``ingest_file`` of a file already read (``source.stage``): every reader reads ``staged``.
    ``finish``: how its transaction ends, when not by a plain commit (``Finish``)."""
    started = time.perf_counter() if started is None else started
    received_at = utc_now() if received_at is None else received_at
    report = progress or (lambda stage: None)
    sha256, size = staged.sha256, staged.size
    if finish.reload is None:
        found = ledger.known(conn, [sha256]).get(sha256)
        if found is not None:
            return ledger.seen_before(
                staged.name,
                staged.origin,
                sha256,
                found,
                size,
                time.perf_counter() - started,
                utc_now(),
            )
        # One id per new file, taken outside the transaction: DuckDB sequences do not roll
        # back, and a file that falls back from the fast path must keep the number it started
        # with.
        file_id = _next_file_id(conn)
    else:
        file_id, ladders = finish.reload.file_id, REFERENCE_ONLY
    arrival = _Arrival(
        staged.origin, staged.name, sha256, size, received_at, started, file_id, staged.part
    )
    if staged.refused is not None:  # read and hashed, refused whole (a broken archive)
        return _record_failure(conn, arrival, None, staged.refused, finish)
    max_future_days = (config or Config).max_future_days
    try:
        header = read_header(staged, latest_date(received_at, max_future_days))
    except FileRefused as refused:
        return _record_failure(conn, arrival, None, refused, finish)

    report(f"{header.kind} file, {size} bytes")
    try:
        outcome = _load(conn, arrival, staged, header, config, ladders, report, finish)
    except FileRefused as refused:
        return _record_failure(conn, arrival, header, refused, finish)
    if finish.commit:
        ledger.log_committed(outcome)
    return outcome


@dataclass(frozen=True)
class _Arrival:
    """A new file being ingested: what is known before its rows are read."""

    path: Path  # the inbox entry (moved by the daemon)
    name: str
    sha256: str | None
    size: int
    received_at: dt.datetime
    started: float
    file_id: int
    part: Part | None = None  # a continuation of a file loaded before (tail.py)

    def outcome(self, status: FileStatus, header: Header | None, **found: Any) -> FileOutcome:
        """Its ledger row, with what was ``found`` (counts, or why it was refused)."""
        return FileOutcome(
            name=self.name,
            path=self.path,
            sha256=self.sha256,
            status=status,
            file_id=self.file_id,
            kind=str(header.kind) if header else None,
            seconds=time.perf_counter() - self.started,
            size_bytes=self.size,
            finished_at=utc_now(),
            received_at=self.received_at,
            part=self.part,
            **found,
        )


def _load(
    conn: duckdb.DuckDBPyConnection,
    arrival: _Arrival,
    source: StagedFile,
    header: Header,
    config: Config | None,
    ladders: Ladders,
    report: Progress,
    finish: Finish,
) -> FileOutcome:
    """Apply the file (read from ``source``, its bytes as read once) and write its ledger row,
    in one transaction; or, past ``max_reject_share``, only its rejects and its ledger row
    (held)."""
    file_id = arrival.file_id
    tuning = config.tuning if config else DEFAULT_TUNING
    line_bytes = (config or Config).reject_line_bytes
    load = Load(conn, source, header, file_id, line_bytes, tuning)
    with transaction(conn):
        if finish.reload is not None:
            finish.reload.clear(conn)
        applied = climb(load, ladders[header.kind], report)
        total = applied.loaded + applied.duplicate + applied.rejected
        # Decided on the counts the ledger keeps, before any aggregate. A continuation of a
        # loaded file (tail.py) loads as its file did; a release is not held again.
        held = None
        if config is not None and arrival.part is None and finish.reload is None:
            held = ledger.hold_message(applied.rejected, total, config.max_reject_share)
        if held is not None:
            report(held)
            keep_rejects_only(conn, [file_id])
        elif applied.loaded:
            report(f"appended {applied.loaded} rows: updating aggregates")
            fold_into_aggregates(conn, file_id, header.kind, applied.loaded, config)
        outcome = arrival.outcome(
            FileStatus.LOADED if held is None else FileStatus.HELD,
            header,
            rows_total=total,
            rows_loaded=applied.loaded,
            rows_duplicate=applied.duplicate,
            rows_rejected=applied.rejected,
            rejected_by_reason=applied.rejected_by_reason,
            extra_columns=header.extra_columns,
            error_reason=None if held is None else ledger.HOLD_REASON,
            error=held,
        )
        ledger.insert(conn, [outcome])
        finish.end(conn, outcome)
    return outcome


def fold_into_aggregates(
    conn: duckdb.DuckDBPyConnection,
    file_id: int,
    kind: FileKind,
    loaded: int,
    config: Config | None,
) -> None:
    """The ``loaded`` rows file ``file_id`` appended (of ``kind``) into every aggregate, inside
    its transaction (an ingest, a replacement's new bytes)."""
    transactions = kind is FileKind.TRANSACTIONS
    aggregates.apply_deltas(
        conn,
        file_id,
        file_id,
        transactions=loaded if transactions else 0,
        users=0 if transactions else loaded,
        top_users_kept=config.top_users_kept if config else DEFAULT_TOP_USERS_KEPT,
        tuning=config.tuning if config else DEFAULT_TUNING,
    )


def keep_rejects_only(conn: duckdb.DuckDBPyConnection, file_ids: Sequence[int]) -> None:
    """Undo what the open transaction wrote, but the rejects of ``file_ids`` (files held: their
    rejects stay browsable). DuckDB has no savepoints: the rejects are read out, the transaction
    is begun again, and they are written back."""
    kept = conn.sql(
        f"SELECT * FROM rejects WHERE file_id IN ({int_constants(file_ids)})"
    ).to_arrow_table()
    restart(conn)
    if kept.num_rows:
        append_arrow(conn, "rejects", kept)


def _next_file_id(conn: duckdb.DuckDBPyConnection) -> int:
    return ledger.next_file_ids(conn, 1)[0]


def _record_failure(
    conn: duckdb.DuckDBPyConnection,
    arrival: _Arrival,
    header: Header | None,
    refused: FileRefused,
    finish: Finish = COMMIT,
) -> FileOutcome:
    """A file-level failure: only its ledger row is written."""
    with transaction(conn):
        if finish.reload is not None:
            finish.reload.clear(conn)
        outcome = arrival.outcome(
            FileStatus.FAILED, header, error_reason=str(refused.reason), error=refused.message
        )
        ledger.insert(conn, [outcome])
        finish.end(conn, outcome)
    if finish.commit:
        ledger.log_committed(outcome)
    return outcome


# --- status -----------------------------------------------------------------------------------


def warehouse_status(conn: duckdb.DuckDBPyConnection, last: int = 10) -> dict[str, Any]:
    """Counts of every table and the most recent files of the ledger."""
    cursor = conn.cursor()
    try:
        row = cursor.execute(
            """SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM transactions),
                      (SELECT count(*) FROM files),
                      (SELECT count(*) FROM files WHERE status = 'failed'),
                      (SELECT count(*) FROM rejects)"""
        ).fetchall()[0]
        names = ["users", "transactions", "files", "files_failed", "rejects"]
        result = cursor.execute(
            """SELECT file_id, name, kind, status, rows_loaded, rows_duplicate, rows_rejected,
                      finished_at, error_reason
               FROM files ORDER BY file_id DESC LIMIT ?""",
            [last],
        )
        columns = [d[0] for d in result.description]
        files = [dict(zip(columns, r, strict=True)) for r in result.fetchall()]
    finally:
        cursor.close()
    return {"counts": dict(zip(names, row, strict=True)), "last_files": files}
