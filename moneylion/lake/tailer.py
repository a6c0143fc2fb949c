"""The replica's thread: tail the lake's ledger and apply every committed file, in order.

It is the only writer of the local warehouse in lake mode (the worker writes the lake). It
wakes when this daemon commits a ledger row (``poke``) and otherwise polls the ``files`` table's
version every ``lake_poll_seconds``; new ledger rows are applied in chunks of bounded rows,
each one local transaction with its mark (``apply.py``). A new replica, or one whose warehouse
was deleted, starts from mark (-1, 0): it rebuilds itself from the whole ledger.

A correction's entry is applied alone, in its place (``apply.apply_correction``); what it did
(or why it was refused) is kept a while for the request that published it, which waits here
(``settled``). A ledger entry that breaks a rule (``screen.py``) is skipped, and counted; an
error of this side (a full disk, a lock, the lake out of reach) is retried after a pause, and
counted too: both show in health and metrics.

A second thread runs the lake's maintenance (compaction, checkpoints) every
``lake_maintenance_seconds``, on its own ``Lake`` (DeltaTable objects are not shared).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

import duckdb

from moneylion.config import Config
from moneylion.corrections import Correction
from moneylion.db import rollback, transaction
from moneylion.lake.apply import (
    Entry,
    Mark,
    apply_correction,
    apply_files,
    move_mark,
    open_mark,
)
from moneylion.lake.lag import LakeLag
from moneylion.lake.screen import (
    Quarantined,
    is_correction,
    log_quarantined,
    quarantined_count,
    screen_ledger,
)
from moneylion.lake.store import Lake
from moneylion.priority import lower_thread_priority
from moneylion.tuning import Tuning

log = logging.getLogger(__name__)

ERROR_BACKOFF_SECONDS = 1.0
SETTLED_KEPT = 1024  # corrections whose outcome is kept for a request waiting on it

Settled = Correction | Quarantined  # a correction's entry: applied, or skipped (and why)


def lake_for(config: Config) -> Lake:
    """A new handle on the configured lake (one per thread)."""
    return Lake(config.lake_uri, dict(config.lake_storage_options) or None)


class LakeTailer(threading.Thread):
    """Applies the lake's ledger to the local warehouse through ``conn`` (see the module)."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        config: Config,
        on_applied: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name="lake-tailer", daemon=True)
        self.conn = conn
        self.config = config
        self.on_applied = on_applied
        self.mark = open_mark(conn)
        self.quarantined = quarantined_count(conn)
        self.apply_errors = 0
        self.apply_error: str | None = None  # the kind of error the last attempt ended in
        self.lake_version = -1
        self.lake_files = 0
        self.checked_at = time.monotonic()
        self.stopping = threading.Event()
        self._poked = threading.Event()
        self._settled: OrderedDict[int, Settled] = OrderedDict()
        self._settled_changed = threading.Condition()

    @property
    def applied_file_id(self) -> int:
        return self.mark.file_id

    def poke(self) -> None:
        """This daemon committed a ledger row: look now."""
        self._poked.set()

    def settled(self, change_id: int, timeout: float) -> Settled | None:
        """What became of the correction whose entry is ``change_id`` (its file id in the lake),
        once this replica has applied or skipped it; None if not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._settled_changed:
            while (found := self._settled.get(change_id)) is None:
                left = deadline - time.monotonic()
                if left <= 0 or (not self.is_alive() and self.stopping.is_set()):
                    return None
                self._settled_changed.wait(min(left, 1.0))
            return found

    def _settle(self, change_id: int, outcome: Settled) -> None:
        with self._settled_changed:
            self._settled[change_id] = outcome
            while len(self._settled) > SETTLED_KEPT:
                self._settled.popitem(last=False)
            self._settled_changed.notify_all()

    def lag(self) -> LakeLag:
        return LakeLag(
            self.lake_version,
            self.mark.version,
            self.lake_files,
            self.mark.file_id,
            time.monotonic() - self.checked_at,
            self.quarantined,
            self.apply_errors,
            self.apply_error,
        )

    def run(self) -> None:
        lower_thread_priority(self.config.ingest_nice)
        lake = lake_for(self.config)
        log.info(
            "lake_tailer_started",
            extra={
                "fields": {
                    "lake": lake.uri,
                    "version": self.mark.version,
                    "file_id": self.mark.file_id,
                }
            },
        )
        while not self.stopping.is_set():
            try:
                self.catch_up(lake)
            except Exception as exc:
                self.apply_errors += 1
                self.apply_error = type(exc).__name__
                log.exception("lake_apply_failed", extra={"fields": {"file_id": self.mark.file_id}})
                rollback(self.conn)
                self.stopping.wait(ERROR_BACKOFF_SECONDS)
                lake = lake_for(self.config)
                continue
            self.apply_error = None
            self._poked.wait(self.config.lake_poll_seconds)
            self._poked.clear()
        log.info("lake_tailer_stopped", extra={"fields": {"file_id": self.mark.file_id}})

    def catch_up(self, lake: Lake) -> int:
        """Apply every ledger commit not applied yet; the files applied."""
        files = lake.table("files")
        version = files.version()
        self.lake_version, self.checked_at = version, time.monotonic()
        if version <= self.mark.version:
            return 0
        rows = lake.ledger_since(self.mark.version, files)
        screened = screen_ledger(self.conn, rows.to_pylist(), self.mark.file_id)
        self.lake_files = max(self.lake_files, screened.last_file_id or 0)
        pending = screened.entries
        done = 0
        while pending and not self.stopping.is_set():
            chunk = _chunk(pending, self.config.tuning)
            pending = pending[len(chunk) :]
            # The mark's version moves only with the last chunk: until then, later versions
            # are only partly applied (the file id says how far).
            through = version if not pending else self.mark.version
            passed = [int(row["file_id"]) for row, skipped in chunk if skipped is None]
            mark = Mark(through, passed[-1] if passed else self.mark.file_id)
            head, head_skipped = chunk[0]
            if head_skipped is None and is_correction(head):
                outcome = apply_correction(
                    self.conn,
                    head,
                    mark,
                    top_users_kept=self.config.top_users_kept,
                    line_bytes=self.config.reject_line_bytes,
                )
                skipped = [outcome] if isinstance(outcome, Quarantined) else []
                self._settle(int(head["file_id"]), outcome)
            else:
                _, skipped = apply_files(
                    self.conn,
                    lake,
                    chunk,
                    mark,
                    top_users_kept=self.config.top_users_kept,
                    reject_line_bytes=self.config.reject_line_bytes,
                    tuning=self.config.tuning,
                )
                for entry in skipped:
                    if is_correction(entry.row) and isinstance(entry.row["file_id"], int):
                        self._settle(entry.row["file_id"], entry)
            self.mark = mark
            if skipped:
                self.quarantined = quarantined_count(self.conn)
                log_quarantined(skipped)
            done += len(chunk)
            if self.on_applied is not None:
                self.on_applied()
        if not pending and self.mark.version < version:
            with transaction(self.conn):
                move_mark(self.conn, Mark(version, self.mark.file_id))
            self.mark = Mark(version, self.mark.file_id)
        self.lake_files = max(self.lake_files, self.mark.file_id)
        return done

    def stop(self, grace: float = 2.0) -> bool:
        self.stopping.set()
        self._poked.set()
        self.join(grace)
        if self.is_alive():
            self.conn.interrupt()
            self.join(1.0)
        return not self.is_alive()


def _chunk(pending: list[Entry], tuning: Tuning) -> list[Entry]:
    """The files at the head of ``pending`` that one local transaction takes (at least one):
    past ``tuning.lake_chunk_rows`` rows or ``tuning.lake_chunk_files`` files, the next
    transaction takes the rest (memory stays bounded while a replica catches up). A correction
    to apply goes alone (its own transaction, ``corrections.correct``'s)."""
    rows = 0
    for at, (row, skipped) in enumerate(pending):
        if skipped is None and is_correction(row):
            return pending[: at or 1]
        if skipped is None:
            rows += int(row["rows_loaded"])
        if at and (rows > tuning.lake_chunk_rows or at >= tuning.lake_chunk_files):
            return pending[:at]
    return pending


class LakeMaintenance(threading.Thread):
    """Compaction and checkpoints of the lake's tables, now and then (see store.maintain)."""

    def __init__(self, config: Config) -> None:
        super().__init__(name="lake-maintenance", daemon=True)
        self.config = config
        self.stopping = threading.Event()

    def run(self) -> None:
        lower_thread_priority(self.config.ingest_nice)
        while not self.stopping.wait(self.config.lake_maintenance_seconds):
            try:
                lake_for(self.config).maintain()
            except Exception:
                log.exception("lake_maintenance_failed")

    def stop(self) -> None:
        self.stopping.set()
