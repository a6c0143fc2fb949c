"""A batch of small files -> one DuckDB transaction: a file is the unit of identity and outcome,
a batch the unit of commit.

Each file keeps its own ledger row, counts and rejects with line numbers, exactly as if it had
been ingested alone: its records are checked by the reference rules (``validate_rows``: Python,
exact line numbers; for small files that costs less than DuckDB's per-statement overhead), the
rows of every file of the batch are gathered in memory, and ``resolve_gathered`` applies the
rules that need other rows in file order (the first wins, a differing later copy conflicts, the
latest users file wins). A file refused as a whole (bad header, not UTF-8, not a regular file)
fails alone: it gets its ledger row, the others load. The aggregate deltas run once, over the
batch's file ids.
A file whose refused rows pass ``max_reject_share`` is held (``ingest.py``): alone in its batch,
its rejects and ledger row commit and nothing else; beside other files, its rows took part in
deciding theirs, so the batch is rolled back and its files go one at a time (what a batch must
equal anyway).
Large files do not come here: they take ``ingest_file``'s fast paths, one at a time.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import duckdb

from moneylion import aggregates, ledger
from moneylion.config import Config
from moneylion.db import transaction, utc_now
from moneylion.errors import FileRefused
from moneylion.ingest import keep_rejects_only
from moneylion.ledger import FileOutcome, FileStatus
from moneylion.load import Applied
from moneylion.model import FileKind
from moneylion.pending import GatheredRows
from moneylion.resolve import resolve_gathered
from moneylion.rules import latest_date
from moneylion.source import MEMORY_BYTES, Bounds, StagedFile, stage
from moneylion.validate import Header, ValidatedRows, read_header, validate_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Unread:
    """An inbox entry refused without being read (not a regular file, too large)."""

    name: str
    origin: Path
    refused: FileRefused


Item = StagedFile | Unread


def item_of(path: Path, config: Config, *, memory_bytes: int = MEMORY_BYTES) -> Item:
    """``path`` staged (``source.stage``), or an ``Unread`` if it is refused unread (not a
    regular file, larger than ``max_file_bytes``). Errors of the environment propagate (DiskLow
    included: the file waits)."""
    try:
        return stage(path, config.staging_dir, bounds=Bounds.of(config), memory_bytes=memory_bytes)
    except FileRefused as refused:
        return Unread(path.name, path, refused)


@dataclass
class _New:
    """A file of the batch that gets a ledger row."""

    item: Item
    file_id: int = 0
    header: Header | None = None
    refused: FileRefused | None = None
    batches: list[ValidatedRows] = dataclasses.field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(rows.rows_total for rows in self.batches)


def ingest_batch(
    conn: duckdb.DuckDBPyConnection,
    items: Sequence[Item],
    config: Config,
    *,
    max_rows: int = 0,
) -> tuple[list[FileOutcome], list[Item]]:
    """Ingest ``items`` in order, in one transaction; (their outcomes, the items left over).

    ``max_rows``: once the files read hold more records than this, the rest are left for the
    next batch (at least one file is always taken). Bad input is never an exception; OSError
    and DuckDB errors propagate after rollback, and then nothing of the batch is committed.
    """
    started = time.perf_counter()
    received_at = utc_now()
    shas = [item.sha256 for item in items if isinstance(item, StagedFile)]
    in_ledger = ledger.known(conn, shas)
    plans: list[_New | FileOutcome | tuple[Item, int]] = []  # new, seen before, or same as #k
    first_of: dict[str, int] = {}  # sha256 -> index in plans of its first new file
    new_items: list[Item] = []
    rows = 0
    taken = 0
    for item in items:
        if max_rows and rows > max_rows and taken:
            break
        taken += 1
        if isinstance(item, StagedFile):
            found = in_ledger.get(item.sha256)
            if found is not None:
                plans.append(
                    ledger.seen_before(
                        item.name, item.origin, item.sha256, found, item.size, 0.0, received_at
                    )
                )
                continue
            if item.sha256 in first_of:
                plans.append((item, first_of[item.sha256]))
                continue
            first_of[item.sha256] = len(plans)
        fresh = _New(item)
        _read(fresh, config, received_at)
        plans.append(fresh)
        new_items.append(item)
        rows += fresh.rows
    ids = iter(ledger.next_file_ids(conn, len(new_items)))
    gathered = {kind: GatheredRows(kind) for kind in FileKind}
    for plan in plans:
        if isinstance(plan, _New):
            plan.file_id = next(ids)
            if plan.header is not None:
                for validated in plan.batches:
                    gathered[plan.header.kind].add(plan.file_id, validated)
    try:
        outcomes = _commit(conn, plans, gathered, config, started, received_at)
    except _OneByOne as held:
        log.info(
            "batch_file_by_file",
            extra={"fields": {"files": taken, "held": held.names, "reason": "reject_share"}},
        )
        outcomes = []
        for item in items[:taken]:
            outcomes += ingest_batch(conn, [item], config)[0]
    return outcomes, list(items[taken:])


class _OneByOne(Exception):
    """A file of a batch of several is held: the batch is rolled back, its files go one by
    one."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(names)
        self.names = names


def _read(plan: _New, config: Config, received_at: dt.datetime) -> None:
    """The file's header and records, checked by the reference rules; or the reason it is
    refused whole (then nothing of it is kept)."""
    item = plan.item
    if isinstance(item, Unread) or item.refused is not None:
        plan.refused = item.refused
        return
    try:
        plan.header = read_header(item, latest_date(received_at, config.max_future_days))
        rows = config.tuning.reference_batch_rows
        plan.batches = list(validate_rows(item, plan.header, rows))
    except FileRefused as refused:
        plan.refused = refused
        plan.batches = []


def _commit(
    conn: duckdb.DuckDBPyConnection,
    plans: list[_New | FileOutcome | tuple[Item, int]],
    gathered: dict[FileKind, GatheredRows],
    config: Config,
    started: float,
    received_at: dt.datetime,
) -> list[FileOutcome]:
    """One transaction: rows, rejects, deltas and ledger rows of every new file; outcomes."""
    new = [plan for plan in plans if isinstance(plan, _New)]
    applied: dict[int, Applied] = {}
    with transaction(conn):
        for rows_in in gathered.values():
            if rows_in.lines or rows_in.rejects:
                found = resolve_gathered(conn, rows_in, utc_now(), config.reject_line_bytes)
                applied.update(found)
        held = _held(new, applied, config)
        if held:
            if sum(p.header is not None for p in new) > 1:
                raise _OneByOne([p.item.name for p in new if p.file_id in held])
            keep_rejects_only(conn, list(held))  # the one file read: nothing of it loads
        loaded = {
            kind: sum(
                applied[p.file_id].loaded
                for p in new
                if p.header is not None
                and p.header.kind is kind
                and p.file_id in applied
                and p.file_id not in held
            )
            for kind in FileKind
        }
        if any(loaded.values()):
            ids = [p.file_id for p in new]
            aggregates.apply_deltas(
                conn,
                min(ids),
                max(ids),
                transactions=loaded[FileKind.TRANSACTIONS],
                users=loaded[FileKind.USERS],
                top_users_kept=config.top_users_kept,
                tuning=config.tuning,
            )
        finished_at = utc_now()
        seconds = time.perf_counter() - started
        done = {
            p.file_id: _outcome(p, applied, seconds, finished_at, received_at, held.get(p.file_id))
            for p in new
        }
        ledger.insert(conn, list(done.values()))
    outcomes: list[FileOutcome] = []
    for plan in plans:
        if isinstance(plan, _New):
            outcome = done[plan.file_id]
            ledger.log_committed(outcome)
        elif isinstance(plan, FileOutcome):
            outcome = plan
        else:  # the same bytes as an earlier file of this batch
            item, first = plan
            assert isinstance(item, StagedFile)  # only read files have bytes to repeat
            earlier = outcomes[first]
            outcome = ledger.seen_before(
                item.name,
                item.origin,
                item.sha256,
                (earlier.file_id or 0, earlier.status, earlier.error_reason, earlier.error),
                item.size,
                seconds,
                finished_at,
            )
        outcomes.append(outcome)
    return outcomes


def _held(new: list[_New], applied: dict[int, Applied], config: Config) -> dict[int, str]:
    """The files of the batch to hold (max_reject_share), with why; a continuation of a loaded
    file (tail.py) is never held."""
    held: dict[int, str] = {}
    for plan in new:
        found = applied.get(plan.file_id)
        if found is None or not isinstance(plan.item, StagedFile) or plan.item.part is not None:
            continue
        total = found.loaded + found.duplicate + found.rejected
        message = ledger.hold_message(found.rejected, total, config.max_reject_share)
        if message is not None:
            held[plan.file_id] = message
    return held


def _outcome(
    plan: _New,
    applied: dict[int, Applied],
    seconds: float,
    finished_at: dt.datetime,
    received_at: dt.datetime,
    held: str | None = None,
) -> FileOutcome:
    item = plan.item
    read = item if isinstance(item, StagedFile) else None
    outcome = FileOutcome(
        name=item.name,
        path=item.origin,
        sha256=read.sha256 if read else None,
        status=FileStatus.LOADED,
        file_id=plan.file_id,
        kind=str(plan.header.kind) if plan.header else None,
        size_bytes=read.size if read else 0,
        seconds=seconds,
        finished_at=finished_at,
        received_at=received_at,
        part=read.part if read else None,
        extra_columns=plan.header.extra_columns if plan.header else (),
    )
    if plan.refused is not None:
        return dataclasses.replace(
            outcome,
            status=FileStatus.FAILED,
            error_reason=str(plan.refused.reason),
            error=plan.refused.message,
        )
    found = applied.get(plan.file_id, Applied())
    return dataclasses.replace(
        outcome,
        status=FileStatus.LOADED if held is None else FileStatus.HELD,
        error_reason=None if held is None else ledger.HOLD_REASON,
        error=held,
        rows_total=found.loaded + found.duplicate + found.rejected,
        rows_loaded=found.loaded,
        rows_duplicate=found.duplicate,
        rows_rejected=found.rejected,
        rejected_by_reason=found.rejected_by_reason,
    )
