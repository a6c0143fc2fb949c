"""The ingest worker: the one DuckDB writer. It takes the ready files at the head of the inbox
queue, commits them (small ones together in one batch, a large one alone), moves each out, and
pokes the exporter after every commit. Bytes written into a file after it was taken come back
through the same queue as the file's next part (tail.py).

Commit first, then move: a crash in between leaves committed files in the inbox, which the
ledger recognises on restart (seen before) and which are then only moved. The bytes that were
read and hashed are what loads; just before the move the file is compared with what was read:
grown, it is moved and its new records load as its continuation; replaced or rewritten, it is
left in the inbox and taken again as a new file. Nothing is moved from under a change that was
seen. Errors of the environment (``errors.is_transient``) are retried with backoff, a bounded
number of times; a bug fails the file at once. A batch that fails is retried file by file, so
one bad file never holds back the others.
"""

from __future__ import annotations

import datetime as dt
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import duckdb

from moneylion import inbox
from moneylion.batch import Item, ingest_batch, item_of
from moneylion.config import Config
from moneylion.db import one_row
from moneylion.errors import DiskLow, FileChanged, FileRefused, is_transient
from moneylion.ingest import FileOutcome, ingest_file, ingest_staged, record_unread
from moneylion.ladder import goes_alone
from moneylion.ledger import FileStatus
from moneylion.priority import lower_thread_priority
from moneylion.readiness import Arrival
from moneylion.source import (
    MEMORY_BYTES,
    StagedFile,
    complete_records,
    compression_suffix,
    file_sha256,
    keep_complete,
)
from moneylion.stream import IngestStats
from moneylion.tail import Tail, Tails
from moneylion.validate import read_header
from moneylion.watcher import ONE_FILE, BatchLimits, InboxQueue, TakenFile

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # tries per file for errors of the environment before it goes to failed/
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0)
# Let the current batch finish this long; after that it is interrupted and rolled back.
STOP_GRACE_SECONDS = 2.0

T = TypeVar("T")
IngestOne = Callable[[duckdb.DuckDBPyConnection, Path, Config], FileOutcome]
IngestBatch = Callable[..., tuple[list[FileOutcome], list[Item]]]


_DEFAULT_BATCH: Any = object()


class IngestWorker(threading.Thread):
    """Takes files from the queue in arrival order, commits them, moves them out, and pokes the
    exporter after every commit.

    ``ingest`` ingests one file; ``batch`` (``ingest_batch`` unless a stand-in ``ingest`` is
    given, or None: one file at a time) commits several small files together.
    """

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        config: Config,
        queue: InboxQueue,
        on_commit: Callable[[], None] | None = None,
        *,
        ingest: IngestOne = ingest_file,
        batch: IngestBatch | None = _DEFAULT_BATCH,
        backoff: tuple[float, ...] = BACKOFF_SECONDS,
        tails: Tails | None = None,
    ) -> None:
        super().__init__(name="ingest-worker", daemon=True)
        self.ingest = ingest
        if batch is _DEFAULT_BATCH:
            batch = ingest_batch if ingest is ingest_file else None
        self.batch = batch
        self.limits = (
            BatchLimits(config.batch_max_files, config.batch_max_bytes, config.batch_file_max_bytes)
            if batch is not None
            else ONE_FILE
        )
        self.backoff = backoff
        self.conn = conn
        self.config = config
        self.queue = queue
        self.on_commit = on_commit
        self.tails = tails  # None: taken files are not tailed (lake mode, stand-in ingests)
        self.stopping = threading.Event()
        # Held while a batch is handled: work that writes the warehouse outside the worker (a
        # correction, a check) takes it and so runs between two batches, never beside one
        # (DuckDB's optimistic concurrency would fail one of two writers of the same rows).
        self.exclusive = threading.Lock()
        self.stats = IngestStats()
        self.files_done = 0
        self.last_file_at: float | None = None
        self.waiting_for_disk: set[Path] = set()  # inbox files that wait for room (DiskLow)
        # The id of the last file or correction committed in DuckDB: the API's change token and
        # the mark the SQLite export must reach before user summaries are read from it.
        self.committed_file_id = last_change_id(conn)

    def run(self) -> None:
        lower_thread_priority(self.config.ingest_nice)
        log.info("worker_started", extra={"fields": {"inbox": str(self.config.inbox)}})
        while taken := self.queue.take_batch(self.limits):
            try:
                with self.exclusive:
                    if self.batch is None or goes_alone(taken[0].size, self.config):
                        for one in taken:
                            self._handle(one)
                    else:
                        self._handle_batch(taken)
            except Exception:  # a bug: log it with context, keep the daemon up
                log.exception(
                    "worker_error", extra={"fields": {"files": [t.path.name for t in taken]}}
                )
                for one in taken:
                    self.queue.finish(one.path)
        log.info("worker_stopped", extra={"fields": {"files": self.files_done}})

    # -- one file alone (large files, and stand-in ingests) -----------------------------------

    def _handle(self, taken: TakenFile) -> None:
        path = taken.path
        log.info(
            "file_started", extra={"fields": {"file": path.name, "attempt": taken.attempts + 1}}
        )
        item: Item | None = None
        try:
            if self.ingest is ingest_file:  # staged here: the move compares it with the file
                item = self._stage(taken, MEMORY_BYTES)
                if item is None:
                    return
                if isinstance(item, StagedFile):
                    outcome = ingest_staged(self.conn, item, self.config)
                else:
                    outcome = record_unread(self.conn, item.origin, item.refused)
            else:
                outcome = self.ingest(self.conn, path, self.config)
        except Exception as exc:
            self._failed(taken, exc)
            return
        finally:
            if isinstance(item, StagedFile):
                item.discard()
        self._committed([outcome])
        self._put_away(taken, outcome, item)

    def _stage(self, taken: TakenFile, memory_bytes: int) -> Item | None:
        """The bytes to ingest for ``taken``: a tailed file's new part, or an inbox file read
        once; None when there is nothing to ingest now (the file is dealt with here)."""
        if taken.tail:
            assert self.tails is not None
            part = self.tails.read_part(taken.path)
            if part is None:  # nothing complete yet: the tail looks again
                self.queue.finish(taken.path)
                self.tails.released(taken.path)
            return part
        item = item_of(taken.path, self.config, memory_bytes=memory_bytes)
        if self.tails is None or not isinstance(item, StagedFile) or item.refused:
            return item
        if compression_suffix(item.name) or item.seen is None:
            return item
        tail = self.tails.recent(item.name)
        if tail is not None and _headerless(item):
            self._continue_by_name(taken, item, tail)
            return None
        quiet_for = time.time() - item.seen[3] / 1e9
        quiet = quiet_for >= self.config.settle_seconds
        if not taken.renamed:
            # Its writer may be at work: what loads is the records complete when it was read,
            # and a trailing record without its line break once the file is quiet, unless it
            # ends inside quotes or a writer held the file open past writer_timeout (it may be
            # cut mid-field): then it waits for the next append, or the end of the tail.
            end = complete_records(item, last=quiet and not taken.held)
            if end < item.size:
                if end == 0 or (taken.closed and not quiet and item.data is not None):
                    # Nothing complete yet, or a small file just closed: take it again once
                    # quiet (one part rather than two).
                    item.discard()
                    delay = max(self.config.settle_seconds - quiet_for, 0.05)
                    self.queue.retry(taken.path, taken.attempts, delay)
                    return None
                keep_complete(item, end)
        return item

    def _continue_by_name(self, taken: TakenFile, item: StagedFile, tail: Tail) -> None:
        """A headerless file under the name of a file taken within continuation_seconds (a
        producer reopened the path with ``>>`` after the move): its bytes go onto that file,
        where they load as its continuation, and it leaves the inbox."""
        assert self.tails is not None
        assert item.seen is not None
        tails, inode = self.tails, item.seen[1]
        item.discard()

        def append_and_remove(changed: Arrival | None) -> bool:
            try:
                return tails.adopt(tail, taken.path, inode)
            except FileNotFoundError:  # removed by its producer meanwhile
                return True

        self.queue.settle_taken(taken.path, append_and_remove)

    def _failed(self, taken: TakenFile, exc: Exception) -> None:
        """What an exception while ingesting ``taken`` means for it."""
        path = taken.path
        if not isinstance(exc, DiskLow):
            self._disk_wait_over(path)
        if taken.tail:  # a tailed file's new bytes: nothing was recorded, the tail tries again
            assert self.tails is not None
            log.warning(
                "file_part_failed",
                extra={"fields": {"file": path.name, "error": f"{type(exc).__name__}: {exc}"}},
            )
            self.queue.finish(path)
            self.tails.released(path, error=not self.stopping.is_set())
        elif isinstance(exc, DiskLow):
            self._wait_for_disk(taken, exc)
        elif isinstance(exc, FileNotFoundError):
            log.info("file_vanished", extra={"fields": {"file": path.name, "stage": "ingest"}})
            self.queue.finish(path)
        elif isinstance(exc, FileChanged):  # nothing was recorded: take it again once quiet
            log.info("file_changed_while_reading", extra={"fields": {"file": path.name}})
            self.queue.finish(path)
            self.queue.file_found(path)
        elif self.stopping.is_set():
            log.info("file_rolled_back", extra={"fields": {"file": path.name}})
            self.queue.finish(path)
        else:
            reason = "unreadable" if isinstance(exc, OSError) else "ingest_error"
            self._retry_or_fail(taken, reason, exc)

    def _wait_for_disk(self, taken: TakenFile, low: DiskLow) -> None:
        """Staging ``taken`` would take the warehouse's disk below min_free_disk_bytes: not the
        file's fault, so it is not refused. It waits in the inbox (holding back no other file)
        and is taken again after rescan_seconds; logged once per file."""
        if taken.path not in self.waiting_for_disk:
            self.waiting_for_disk.add(taken.path)
            self.stats.waiting_for_disk(self.waiting_for_disk)
            log.warning(
                "disk_low",
                extra={
                    "fields": {
                        "file": taken.path.name,
                        "free_bytes": low.free_bytes,
                        "needed_bytes": low.needed_bytes,
                        "min_free_disk_bytes": low.min_free_bytes,
                    }
                },
            )
        self.queue.retry(taken.path, taken.attempts, self.config.rescan_seconds)

    def _disk_wait_over(self, path: Path) -> None:
        """``path`` no longer waits for room (staged, or gone)."""
        if path in self.waiting_for_disk:
            self.waiting_for_disk.discard(path)
            self.stats.waiting_for_disk(self.waiting_for_disk)
            log.info("disk_wait_over", extra={"fields": {"file": path.name}})

    # -- a batch of small files ---------------------------------------------------------------

    def _handle_batch(self, taken: list[TakenFile]) -> None:
        assert self.batch is not None
        of: dict[Path, TakenFile] = {t.path: t for t in taken}
        started = time.monotonic()
        log.info("batch_started", extra={"fields": {"files": [t.path.name for t in taken]}})
        items: list[Item] = []
        for one in taken:
            try:
                item = self._stage(one, self.config.batch_file_max_bytes)
            except Exception as exc:
                self._failed(one, exc)
                continue
            if item is not None:
                items.append(item)
        if not items:
            return
        # A compressed file small on disk may hold a large CSV: that one goes alone (the fast
        # paths), the files before it as this batch, the ones after it back to the queue.
        large = next(
            (
                at
                for at, item in enumerate(items)
                if isinstance(item, StagedFile) and goes_alone(item.csv_size, self.config)
            ),
            None,
        )
        if large is not None:
            later, items = items[large:], items[:large]
            for item in later:
                if isinstance(item, StagedFile):
                    item.discard()
            self.queue.untake([of[item.origin] for item in later[1 if not items else 0 :]])
            if not items:
                self._handle(of[later[0].origin])
                return
        try:
            try:
                outcomes, left = self.batch(
                    self.conn, items, self.config, max_rows=self.config.batch_max_rows
                )
            except Exception as exc:
                if self.stopping.is_set():
                    log.info("batch_rolled_back", extra={"fields": {"files": len(items)}})
                    for item in items:
                        self.queue.finish(item.origin)
                    return
                log.warning(
                    "batch_failed",
                    extra={
                        "fields": {"files": len(items), "error": f"{type(exc).__name__}: {exc}"}
                    },
                )
                self._one_by_one(items, of)
                return
            self._committed(outcomes)
            log.info(
                "batch_committed",
                extra={
                    "fields": {
                        "files": len(outcomes),
                        "rows": sum(o.rows_loaded for o in outcomes),
                        "seconds": round(time.monotonic() - started, 4),
                    }
                },
            )
            staged = {item.origin: item for item in items}
            for outcome in outcomes:
                self._put_away(of[outcome.path], outcome, staged[outcome.path])
            self.queue.untake([of[item.origin] for item in left])
        finally:
            for item in items:
                if isinstance(item, StagedFile):
                    item.discard()

    def _one_by_one(self, items: Sequence[Item], of: dict[Path, TakenFile]) -> None:
        """After a failed batch: each file in its own batch, so a bad one fails alone."""
        assert self.batch is not None
        for item in items:
            try:
                outcomes, _ = self.batch(self.conn, [item], self.config)
            except Exception as exc:
                self._failed(of[item.origin], exc)
                continue
            self._committed(outcomes)
            self._put_away(of[item.origin], outcomes[0], item)

    # -- after a commit -----------------------------------------------------------------------

    def _committed(self, outcomes: Sequence[FileOutcome]) -> None:
        """Bookkeeping after a commit: the change token, the exporter, the rates."""
        new = [o for o in outcomes if o.committed]
        if not new:
            return
        ids = [o.file_id for o in new if o.file_id is not None]
        if ids:
            self.committed_file_id = max(self.committed_file_id, *ids)
        self.stats.committed(len(new), sum(o.rows_loaded for o in new), max(o.seconds for o in new))
        if self.on_commit is not None:
            self.on_commit()  # there is something to export

    def between_batches(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``work`` on a cursor of the warehouse, between two batches (``exclusive``); then
        the change token moves to what it committed (a correction's change id) and the
        exporter is poked."""
        with self.exclusive:
            cursor = self.conn.cursor()
            try:
                result = work(cursor)
                changed = last_change_id(cursor)
            finally:
                cursor.close()
        if changed > self.committed_file_id:
            self.committed_file_id = changed
            if self.on_commit is not None:
                self.on_commit()
        return result

    def _put_away(self, taken: TakenFile, outcome: FileOutcome, item: Item | None) -> None:
        """After the commit: a part's bytes are loaded; an inbox file is moved out, unless it
        was replaced or rewritten meanwhile (then it is taken again as a new file)."""
        path = taken.path
        self._disk_wait_over(path)
        staged = item if isinstance(item, StagedFile) else None
        if taken.tail:
            assert self.tails is not None
            assert staged is not None
            self.queue.finish(path)
            self.tails.committed(staged, outcome.file_id if outcome.committed else None)
            return
        try:
            moved = self.queue.settle_taken(
                path,
                lambda changed: self._move_unless_changed(outcome, staged, changed, taken),
            )
        except OSError as exc:
            if not path.exists():
                log.info("file_vanished", extra={"fields": {"file": path.name, "stage": "move"}})
                return
            # Committed but still in the inbox: the next try finds it in the ledger and moves it.
            self._retry_or_fail(taken, "cannot_move", exc, finished=True)
            return
        if not moved:
            log.info("file_changed_while_ingesting", extra={"fields": {"file": path.name}})
        self.files_done += 1
        self.last_file_at = time.time()

    def _move_unless_changed(
        self,
        outcome: FileOutcome,
        staged: StagedFile | None,
        changed: Arrival | None,
        taken: TakenFile,
    ) -> bool:
        """Move the file out if it is still the file that was read (grown is fine: a new file's
        new bytes are tailed); False, leaving it, if it was replaced, rewritten or truncated."""
        if staged is None or staged.seen is None:  # read by a stand-in: the events decide
            if changed is not None:
                return False
            self._move(outcome)
            return True
        try:
            now = os.lstat(outcome.path)
        except FileNotFoundError:
            return True  # removed by its producer: nothing left to move
        dev, ino, size, mtime_ns = staged.seen
        tailed = (
            self.tails is not None
            and outcome.committed
            and outcome.status is FileStatus.LOADED
            and not compression_suffix(outcome.name)
        )
        if (now.st_dev, now.st_ino) != (dev, ino):
            return False
        if now.st_size < size or (now.st_size == size and now.st_mtime_ns != mtime_ns):
            return False
        if now.st_size > size and not tailed and outcome.status is not FileStatus.FAILED:
            return False  # grown, and not a file that is tailed: taken again, whole
        target = self._move(outcome)
        if tailed:
            assert self.tails is not None
            assert outcome.file_id is not None
            self.tails.register(
                staged, outcome.file_id, target, renamed=taken.renamed, held=taken.held
            )
        return True

    def _move(self, outcome: FileOutcome) -> Path:
        """Loaded and duplicate files go to done/<day>/, failed ones to failed/<day>/ with their
        reason, held ones to held/<day>/ (their bytes wait there for a release: release.py);
        where it went."""
        if outcome.status is FileStatus.HELD:
            target = inbox.move_without_overwrite(
                outcome.path, inbox.day_folder(self.config.held_dir)
            )
        elif outcome.status is FileStatus.FAILED:
            target = inbox.move_without_overwrite(
                outcome.path,
                inbox.day_folder(self.config.failed_dir),
                companion_suffix=inbox.REASON_SUFFIX,
            )
            try:
                inbox.write_reason(target, outcome.reason_document())
            except OSError as exc:  # the file is set aside; the ledger still has the reason
                log.error(
                    "reason_not_written",
                    extra={"fields": {"file": outcome.name, "error": str(exc)}},
                )
        else:
            target = inbox.move_without_overwrite(
                outcome.path, inbox.day_folder(self.config.done_dir)
            )
        log.info(
            "file_moved",
            extra={
                "fields": {
                    "file": outcome.name,
                    "status": outcome.status,
                    "file_id": outcome.file_id,
                    "to": str(target.relative_to(self.config.inbox)),
                }
            },
        )
        return target

    # -- errors -------------------------------------------------------------------------------

    def _retry_or_fail(
        self, taken: TakenFile, reason: str, exc: BaseException, *, finished: bool = False
    ) -> None:
        """An error of the environment is retried with backoff a bounded number of times; a bug
        is not (it would fail the same way): then the file is set aside in failed/."""
        attempts = taken.attempts + 1
        fields: dict[str, Any] = {
            "file": taken.path.name,
            "reason": reason,
            "error": f"{type(exc).__name__}: {exc}",
            "attempt": attempts,
        }
        if isinstance(exc, OSError) and exc.errno is not None:
            fields["errno"] = errno.errorcode.get(exc.errno, exc.errno)
        transient = is_transient(exc)
        if transient and attempts < MAX_ATTEMPTS:
            delay = self.backoff[min(attempts - 1, len(self.backoff) - 1)]
            log.warning("file_retry", extra={"fields": {**fields, "delay": delay}})
            self.queue.retry(taken.path, attempts, delay)
            return
        if transient:
            log.error("file_given_up", extra={"fields": fields})
        else:
            log.exception("file_failed_by_a_bug", exc_info=exc, extra={"fields": fields})
        if not finished:
            self.queue.finish(taken.path)
        self.stats.set_aside()
        try:
            target = inbox.move_without_overwrite(
                taken.path,
                inbox.day_folder(self.config.failed_dir),
                companion_suffix=inbox.REASON_SUFFIX,
            )
            inbox.write_reason(target, environment_failure(target, reason, exc))
        except OSError as move_exc:
            # It cannot be set aside either: leave it alone (no endless retry) until it changes.
            self.queue.give_up(taken.path)
            log.error(
                "file_stuck",
                extra={"fields": {"file": taken.path.name, "error": str(move_exc)}},
            )

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> bool:
        """Stop taking files, let the current batch finish within ``grace`` seconds, otherwise
        interrupt it (its transaction rolls back, the files stay in the inbox). True if stopped."""
        self.stopping.set()
        self.queue.close()
        self.join(grace)
        if self.is_alive():
            log.warning("worker_interrupting", extra={"fields": {"grace": grace}})
            self.conn.interrupt()
            self.join(1.0)
        return not self.is_alive()


def environment_failure(path: Path, reason: str, exc: BaseException) -> dict[str, object]:
    """A reason document for a file that kept failing for reasons of the environment."""
    try:
        sha256: str | None = file_sha256(path)[0]
    except OSError:
        sha256 = None
    return {
        "file": path.name,
        "reason": reason,
        "message": f"{type(exc).__name__}: {exc}",
        "sha256": sha256,
        "file_id": None,
        "time": dt.datetime.now(dt.UTC).isoformat(),
    }


def last_change_id(conn: duckdb.DuckDBPyConnection) -> int:
    """The last change committed: the highest file id in the ledger or correction id (they
    share one sequence; 0 for an empty warehouse)."""
    cursor = conn.cursor()
    try:
        return int(
            one_row(
                cursor,
                "SELECT greatest((SELECT coalesce(max(file_id), 0) FROM files), "
                "(SELECT coalesce(max(change_id), 0) FROM corrections))",
            )[0]
        )
    finally:
        cursor.close()


def _headerless(item: StagedFile) -> bool:
    """Whether a staged file's first line is no header (of any kind)."""
    try:
        read_header(item)
    except FileRefused:
        return True
    return False
