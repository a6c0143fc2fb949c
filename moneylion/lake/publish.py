"""A daemon's reading side in lake mode: a file's rows into the lake, then its ledger row.

Stands in for ``ingest_file`` / ``ingest_batch`` in the worker (same signatures), so the
watcher, the queue, the retries and the moves of local mode stay as they are. Per file:

1. the rules on its own rows, decided here once for everyone: the fields (``validate_rows``,
   the reference rules) and the copies within the file (identical ones load once, differing
   ones are all ``duplicate_in_file``), exactly as local mode decides them;
2. its rows and rejects appended to the lake's tables, recorded per file as an application
   transaction (app id from the sha256, version = the write id): after a crash the retry finds
   them (``Lake.written``) and reuses them instead of appending them again;
3. its ledger row, last (``Lake.commit_ledger``): the file counts from that commit on, once,
   whichever daemon made it. A daemon that finds the sha256 already there (another daemon, or
   its own run before a crash) moves the file as a duplicate; the rows it wrote stay invisible.

The rules that need other files are decided later, in ledger order, by every replica
(``apply.py``). This module never writes the local warehouse.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from deltalake.exceptions import DeltaError

from moneylion import ledger
from moneylion.append import not_clean
from moneylion.batch import Item, Unread, item_of
from moneylion.config import Config
from moneylion.db import utc_now
from moneylion.errors import FileRefused
from moneylion.ladder import goes_alone
from moneylion.lake.large import CleanFile, check_clean, clean_rows, scratch
from moneylion.lake.store import Candidate, Lake, LakeUnavailable
from moneylion.lake.tables import REJECTS_SCHEMA, ROW_TABLES, SHA256, WRITE_ID, row_schema
from moneylion.ledger import FileOutcome, FileStatus
from moneylion.model import COLUMNS, DOMAINS, FileKind
from moneylion.rules import VERDICTS, Verdict, copies_in_file, latest_date
from moneylion.rules import message as rule_message
from moneylion.source import StagedFile
from moneylion.validate import Header, Reject, read_header, validate_rows

log = logging.getLogger(__name__)

_KIND_OF = {name: kind for kind, name in ROW_TABLES.items()}

_last_write_id = 0
_write_id_lock = threading.Lock()


def new_write_id() -> int:
    """A write id: microseconds since the epoch, then 12 random bits; increasing in time, so
    a table's data files cover narrow ranges and reads of a few files skip the rest. Rows are
    owned by (sha256, write id): two attempts at the same file would share rows only if they
    picked the same microsecond and the same random bits (one chance in 4,096 for attempts
    that are that close), never two attempts of one process."""
    global _last_write_id
    with _write_id_lock:
        candidate = (time.time_ns() // 1000) << 12 | secrets.randbits(12)
        _last_write_id = max(candidate, _last_write_id + 1)
        return _last_write_id


@dataclass
class Prepared:
    """A file read and checked by this daemon, waiting for its rows and its ledger row."""

    item: Item
    received_at: object
    header: Header | None = None
    refused: FileRefused | None = None
    columns: dict[str, list[object]] = field(default_factory=dict)
    lines: list[int] = field(default_factory=list)
    raw_lines: list[str] = field(default_factory=list)
    copies: int = 0
    rejects: list[Reject] = field(default_factory=list)
    write_id: int | None = None
    clean: CleanFile | None = None  # a large clean file: its rows stream from DuckDB's reader

    @property
    def to_lake(self) -> int:
        """Rows that go to the lake (the file's own rules passed)."""
        return self.clean.rows if self.clean is not None else len(self.lines)

    @property
    def sha256(self) -> str | None:
        return self.item.sha256 if isinstance(self.item, StagedFile) else None

    @property
    def rows_total(self) -> int:
        return self.to_lake + self.copies + len(self.rejects)


def prepare(
    item: Item, config: Config, scratch: duckdb.DuckDBPyConnection | None = None
) -> Prepared:
    """Read ``item`` and apply the rules on its own rows (fields, copies within the file).
    With ``scratch`` (a large file) DuckDB's reader checks it first: a clean file's rows are
    then streamed from it (``large.py``), any other goes through the reference rules."""
    received_at = utc_now()
    plan = Prepared(item, received_at)
    if isinstance(item, Unread) or item.refused is not None:
        plan.refused = item.refused
        return plan
    try:
        plan.header = read_header(item, latest_date(received_at, config.max_future_days))
        kind = plan.header.kind
        if scratch is not None:
            clean = check_clean(scratch, item, plan.header)
            if isinstance(clean, CleanFile):
                plan.clean = clean
                return plan
            log.info(
                "ingest_fallback",
                extra={"fields": {"file": item.name, "path": "lake_large", "reason": clean.reason}},
            )
        key, *rest = COLUMNS[kind]
        columns: dict[str, list[object]] = {name: [] for name in COLUMNS[kind]}
        lines: list[int] = []
        raw_lines: list[str] = []
        for batch in validate_rows(item, plan.header, config.tuning.reference_batch_rows):
            for name, values in batch.columns.items():
                columns[name].extend(values)
            lines.extend(batch.lines)
            raw_lines.extend(batch.raw_lines)
            plan.rejects.extend(batch.rejects)
    except FileRefused as refused:
        plan.refused = refused
        plan.rejects = []
        return plan
    # Copies within the file: the rule book's, as local mode decides them.
    ids = columns[key]
    contents = list(zip(*(columns[name] for name in rest), strict=True))
    keep: list[int] = []
    for i, verdict in enumerate(copies_in_file(ids, contents)):
        if verdict is None:
            keep.append(i)
        elif verdict is Verdict.COPY:
            plan.copies += 1
        else:
            message = rule_message(verdict, key, ids[i])
            plan.rejects.append(Reject(lines[i], VERDICTS[verdict].reason, message, raw_lines[i]))
    plan.columns = {name: [values[i] for i in keep] for name, values in columns.items()}
    plan.lines = [lines[i] for i in keep]
    plan.raw_lines = [raw_lines[i] for i in keep]
    plan.rejects.sort(key=lambda reject: reject.line_number)
    return plan


class LakePublisher:
    """The worker's ``ingest`` and ``batch`` in lake mode (the ``conn`` they are given, the
    local warehouse, is not written here: the tailer applies what the ledger commits)."""

    def __init__(
        self,
        lake: Lake,
        config: Config,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.lake = lake
        self.config = config
        self.on_commit = on_commit
        self._scratch: duckdb.DuckDBPyConnection | None = None
        # Rows an earlier attempt may have written: of files already in the inbox when this
        # process started (a run before it may have crashed between their rows and their
        # ledger row), and of files whose attempt here raised. Only those are looked up
        # (``Lake.written`` costs a scan of the table's application transactions).
        self.started_at = time.time()
        self._attempted: set[str] = set()

    def _scratch_for(self, item: Item) -> duckdb.DuckDBPyConnection | None:
        """The scratch DuckDB for a file past ``batch_file_max_bytes`` (None: a small one)."""
        if not isinstance(item, StagedFile) or not goes_alone(item.csv_size, self.config):
            return None
        if self._scratch is None:
            self._scratch = scratch(self.config)
        return self._scratch

    def ingest_file(
        self, conn: duckdb.DuckDBPyConnection, path: Path, config: Config
    ) -> FileOutcome:
        """One file (a large one: the worker takes those alone)."""
        staged = item_of(path, config)
        try:
            return self.publish([staged])[0]
        finally:
            if isinstance(staged, StagedFile):
                staged.discard()

    def ingest_batch(
        self,
        conn: duckdb.DuckDBPyConnection,
        items: Sequence[Item],
        config: Config,
        *,
        max_rows: int = 0,
    ) -> tuple[list[FileOutcome], list[Item]]:
        """Several files: their rows in one commit per table, their ledger rows in one. All
        are taken: ``max_rows`` bounds local mode's transaction, here the worker's bounds on
        files and bytes bound the rows held in memory."""
        return self.publish(items), []

    def publish_paths(self, paths: Sequence[Path], config: Config) -> list[FileOutcome]:
        """``publish`` of files read from ``paths`` (the CLI and tests)."""
        items = [item_of(path, config) for path in paths]
        try:
            return self.publish(items)
        finally:
            for item in items:
                if isinstance(item, StagedFile):
                    item.discard()

    def publish(self, items: Sequence[Item]) -> list[FileOutcome]:
        """Rows first, ledger rows last; each item's outcome, in order."""
        started = time.perf_counter()
        try:
            return self._publish(items, started)
        except BaseException as exc:
            self._attempted.update(i.sha256 for i in items if isinstance(i, StagedFile))
            if isinstance(exc, DeltaError):
                raise LakeUnavailable(f"the lake at {self.lake.uri}: {exc}") from exc
            raise

    def _may_have_rows(self, plan: Prepared) -> bool:
        """Whether an earlier attempt may have written this file's rows (see __init__)."""
        if plan.sha256 in self._attempted:
            return True
        try:
            # A rename into the inbox sets ctime: a later one arrived after this start.
            return os.stat(plan.item.origin).st_ctime <= self.started_at
        except OSError:
            return True

    def _publish(self, items: Sequence[Item], started: float) -> list[FileOutcome]:
        self.lake.refresh_index()
        known = self.lake.index.files
        outcomes: dict[int, FileOutcome] = {}
        plans: dict[int, Prepared] = {}
        again: dict[int, int] = {}  # the same bytes as an earlier item of this batch
        first_of: dict[str, int] = {}
        for at, item in enumerate(items):
            sha = item.sha256 if isinstance(item, StagedFile) else None
            if sha is not None and sha in known:  # committed before: nothing to write
                assert isinstance(item, StagedFile)
                outcomes[at] = ledger.seen_before(
                    item.name, item.origin, sha, known[sha], item.size, 0.0, utc_now()
                )
            elif sha is not None and sha in first_of:
                again[at] = first_of[sha]
            else:
                if sha is not None:
                    first_of[sha] = at
                plans[at] = prepare(item, self.config, self._scratch_for(item))
        for at, plan in plans.items():
            if plan.clean is not None and not self._stream(plan):
                plans[at] = prepare(plan.item, self.config)  # the reference rules decide it
        self._write_rows([plan for plan in plans.values() if plan.clean is None])
        candidates = [self._candidate(plan, started) for plan in plans.values()]
        placed = self.lake.commit_ledger(candidates)
        for (at, plan), candidate, where in zip(plans.items(), candidates, placed, strict=True):
            item = plan.item
            if where.new:
                outcomes[at] = self._outcome(plan, candidate.row, where.file_id)
                continue
            # Another commit has these bytes: a duplicate found at commit time (a race).
            assert isinstance(item, StagedFile)
            log.info(
                "lake_duplicate_found",
                extra={"fields": {"file": item.name, "file_id": where.file_id}},
            )
            outcomes[at] = ledger.seen_before(
                item.name, item.origin, item.sha256, where.known, item.size, 0.0, utc_now()
            )
        for at, first in again.items():
            item, earlier = items[at], outcomes[first]
            assert isinstance(item, StagedFile)
            found = (earlier.file_id or 0, earlier.status, earlier.error_reason, earlier.error)
            outcomes[at] = ledger.seen_before(
                item.name, item.origin, item.sha256, found, item.size, 0.0, utc_now()
            )
        if any(where.new for where in placed) and self.on_commit is not None:
            self.on_commit()
        return [outcomes[at] for at in range(len(items))]

    def _write_rows(self, plans: list[Prepared]) -> None:
        """Append the rows and rejects of the files that have any, per table in one commit.
        Rows an earlier attempt committed in full (found by their application transactions)
        are reused with their write id, never appended again."""
        by_table: dict[str, list[Prepared]] = {}
        for plan in plans:
            if plan.header is None or plan.refused is not None or plan.sha256 is None:
                continue
            needed = [ROW_TABLES[plan.header.kind]] if plan.to_lake else []
            if plan.rejects:
                needed.append("rejects")
            if not needed:
                continue
            found = (
                {self.lake.written(name, plan.sha256) for name in needed}
                if self._may_have_rows(plan)
                else {None}
            )
            if len(found) == 1 and None not in found:
                # Every table holds this file's rows under one write id: an earlier attempt
                # (ours before a crash, or another daemon's) finished them. Reused as they are.
                plan.write_id = found.pop()
                log.info("lake_rows_reused", extra={"fields": {"file": plan.item.name}})
                continue
            # None or part of them: all written afresh under a write id no one else uses, so
            # two writers never add rows under the same (sha256, write id).
            plan.write_id = new_write_id()
            for name in needed:
                by_table.setdefault(name, []).append(plan)
        for name, owners in by_table.items():
            if name == "rejects":
                rows = _rejects_table(owners)
            else:
                rows = _rows_table(_KIND_OF[name], owners)
            self.lake.append_rows(name, rows, [(p.sha256 or "", p.write_id or 0) for p in owners])

    def _stream(self, plan: Prepared) -> bool:
        """Stream a large clean file's rows to the lake (unless an earlier attempt did: then
        reused); False when a row failed its checks on the way (nothing was committed)."""
        assert plan.clean is not None
        assert plan.header is not None
        assert plan.sha256 is not None
        assert self._scratch is not None
        name = ROW_TABLES[plan.header.kind]
        found = self.lake.written(name, plan.sha256) if self._may_have_rows(plan) else None
        if found is not None and plan.clean.rows:
            plan.write_id = found
            log.info("lake_rows_reused", extra={"fields": {"file": plan.item.name}})
            return True
        if not plan.clean.rows:
            return True
        plan.write_id = new_write_id()
        try:
            rows = clean_rows(
                self._scratch,
                plan.clean,
                plan.header,
                plan.sha256,
                plan.write_id,
                self.config.tuning.lake_stream_batch_rows,
            )
            self.lake.append_rows(name, rows, [(plan.sha256, plan.write_id)])
        except Exception as exc:
            if not not_clean(exc):
                raise
            log.info(
                "ingest_fallback",
                extra={
                    "fields": {
                        "file": plan.item.name,
                        "path": "lake_large",
                        "reason": "a field fails its check or holds a quote, comma or line break",
                    }
                },
            )
            return False
        return True

    def _candidate(self, plan: Prepared, started: float) -> Candidate:
        item = plan.item
        size = item.size if isinstance(item, StagedFile) else 0
        refused = plan.refused
        row = {
            "name": item.name,
            "sha256": plan.sha256,
            "kind": str(plan.header.kind) if plan.header else None,
            "status": str(FileStatus.FAILED if refused else FileStatus.LOADED),
            "rows_total": 0 if refused else plan.rows_total,
            "rows_loaded": 0 if refused else plan.to_lake,
            "rows_duplicate": 0 if refused else plan.copies,
            "rows_rejected": 0 if refused else len(plan.rejects),
            "size_bytes": size,
            "received_at": plan.received_at,
            "finished_at": utc_now(),
            "seconds": time.perf_counter() - started,
            "error_reason": str(refused.reason) if refused else None,
            "error": refused.message if refused else None,
        }
        return Candidate(plan.sha256, row, plan.write_id)

    def _outcome(self, plan: Prepared, row: dict[str, Any], file_id: int) -> FileOutcome:
        outcome = FileOutcome(
            name=plan.item.name,
            path=plan.item.origin,
            sha256=plan.sha256,
            status=FileStatus(row["status"]),
            file_id=file_id,
            kind=row["kind"],
            rows_total=int(row["rows_total"]),
            rows_loaded=int(row["rows_loaded"]),
            rows_duplicate=int(row["rows_duplicate"]),
            rows_rejected=int(row["rows_rejected"]),
            seconds=float(row["seconds"]),
            error_reason=row["error_reason"],
            error=row["error"],
            size_bytes=int(row["size_bytes"]),
            finished_at=row["finished_at"],
        )
        log.info(
            "lake_file_committed",
            extra={
                "fields": {
                    "file": outcome.name,
                    "file_id": file_id,
                    "status": outcome.status,
                    "rows": outcome.rows_loaded,
                    "rejected": outcome.rows_rejected,
                }
            },
        )
        return outcome


def _rows_table(kind: FileKind, plans: list[Prepared]) -> pa.Table:
    schema = row_schema(kind)
    arrays: dict[str, pa.Array] = {
        SHA256: pa.array([p.sha256 for p in plans for _ in p.lines], pa.string()),
        WRITE_ID: pa.array([p.write_id for p in plans for _ in p.lines], pa.int64()),
    }
    for name in COLUMNS[kind]:
        arrays[name] = pa.array(
            [v for p in plans for v in p.columns[name]], type=DOMAINS[name].arrow
        )
    arrays["line"] = pa.array([v for p in plans for v in p.lines], pa.int64())
    arrays["raw_line"] = pa.array([v for p in plans for v in p.raw_lines], pa.string())
    return pa.table(arrays).cast(schema)


def _rejects_table(plans: list[Prepared]) -> pa.Table:
    rows = [(p, r) for p in plans for r in p.rejects]
    return pa.table(
        {
            SHA256: pa.array([p.sha256 for p, _ in rows], pa.string()),
            WRITE_ID: pa.array([p.write_id for p, _ in rows], pa.int64()),
            "line_number": pa.array([r.line_number for _, r in rows], pa.int64()),
            "reason": pa.array([str(r.reason) for _, r in rows], pa.string()),
            "message": pa.array([r.message for _, r in rows], pa.string()),
            "raw_line": pa.array([r.raw_line for _, r in rows], pa.string()),
        }
    ).cast(REJECTS_SCHEMA)
