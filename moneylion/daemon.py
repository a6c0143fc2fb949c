"""``moneylion serve``: the watcher, the ingest worker, the exporter and the API in one process.

The worker thread is the only DuckDB writer. Each file is committed by ``ingest_file`` first and
moved out of the inbox after: a crash in between leaves a committed file in the inbox, which the
ledger recognises on restart (duplicate_file) and which is then simply moved.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import duckdb

from moneylion.config import NICEST, Config
from moneylion.errors import FileChanged
from moneylion.export import close_sqlite, export_new, interrupt_export
from moneylion.ingest import FileOutcome, file_sha256, ingest_file
from moneylion.schema import WarehouseLocked, one_row, open_warehouse
from moneylion.source import clear_staging
from moneylion.watcher import InboxQueue, InboxWatcher, TakenFile

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5  # tries per file for errors of the environment before it goes to failed/
BACKOFF_SECONDS = (0.5, 1.0, 2.0, 4.0)
# Let the current file finish this long; after that it is interrupted and rolled back.
STOP_GRACE_SECONDS = 2.0
EXPORT_MIN_INTERVAL = 0.25  # seconds between two SQLite exports while commits keep coming


# The longest name the usual file systems take (ext4, xfs, btrfs, tmpfs: 255 bytes), and what a
# name in done/ or failed/ may have to carry besides its own: ".<n>" on a clash, ".reason.json".
NAME_MAX_BYTES = 255
REASON_SUFFIX = ".reason.json"
_NAME_RESERVE = len(REASON_SUFFIX) + len(".9999")


def safe_name(name: str) -> str:
    """``name`` if it fits a folder of set-aside files with its suffixes, else a shortened
    name that stays unique and traceable: a prefix of it, ``~`` and 12 hex digits of its
    sha256, its extension. The ledger and the reason file keep the full name."""
    raw = os.fsencode(name)
    if len(raw) + _NAME_RESERVE <= NAME_MAX_BYTES:
        return name
    stem, suffix = os.path.splitext(name)
    if len(os.fsencode(suffix)) > 16:
        stem, suffix = name, ""
    tag = "~" + hashlib.sha256(raw).hexdigest()[:12]
    budget = NAME_MAX_BYTES - _NAME_RESERVE - len(tag) - len(os.fsencode(suffix))
    prefix = os.fsencode(stem)[:budget].decode("utf-8", errors="ignore")
    return prefix + tag + suffix


def move_without_overwrite(path: Path, folder: Path, *, companion_suffix: str = "") -> Path:
    """Move ``path`` into ``folder`` under its own name (shortened by ``safe_name`` if it is
    too long), or ``<stem>.<n><suffix>`` on a clash.

    With ``companion_suffix`` (".reason.json") the companion's name must be free as well. Only
    the worker writes into done/ and failed/, so check-then-rename cannot race. A link or a
    pipe is moved itself (rename never follows a link).
    """
    folder.mkdir(parents=True, exist_ok=True)
    name = safe_name(path.name)
    stem, suffix = os.path.splitext(name)
    target = folder / name
    n = 0
    while os.path.lexists(target) or (
        companion_suffix and os.path.lexists(target.with_name(target.name + companion_suffix))
    ):
        n += 1
        target = folder / f"{stem}.{n}{suffix}"
    os.rename(path, target)
    return target


def write_reason(target: Path, document: dict[str, object]) -> Path:
    """Write ``<target>.reason.json`` atomically (temp file, then rename)."""
    reason = target.with_name(target.name + REASON_SUFFIX)
    temp = reason.with_name("." + reason.name + ".tmp")
    temp.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(temp, reason)
    return reason


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


class IngestWorker(threading.Thread):
    """Takes files from the queue in arrival order, ingests each, moves it out, and pokes the
    exporter after every commit."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        config: Config,
        queue: InboxQueue,
        on_commit: Callable[[], None] | None = None,
        *,
        ingest: Callable[[duckdb.DuckDBPyConnection, Path, Config], FileOutcome] = ingest_file,
        backoff: tuple[float, ...] = BACKOFF_SECONDS,
    ) -> None:
        super().__init__(name="ingest-worker", daemon=True)
        self.ingest = ingest
        self.backoff = backoff
        self.conn = conn
        self.config = config
        self.queue = queue
        self.on_commit = on_commit
        self.stopping = threading.Event()
        self.files_done = 0
        self.last_file_at: float | None = None
        # The id of the last file committed in DuckDB: the API's change token and the mark the
        # SQLite export must reach before user summaries are read from it.
        self.committed_file_id = last_file_id(conn)

    def run(self) -> None:
        lower_thread_priority(self.config.ingest_nice)
        log.info("worker_started", extra={"fields": {"inbox": str(self.config.inbox)}})
        while True:
            taken = self.queue.take()
            if taken is None:  # closed
                break
            try:
                self._handle(taken)
            except Exception:  # a bug: log it with context, keep the daemon up
                log.exception("worker_error", extra={"fields": {"file": taken.path.name}})
                self.queue.finish(taken.path)
        log.info("worker_stopped", extra={"fields": {"files": self.files_done}})

    def _handle(self, taken: TakenFile) -> None:
        path = taken.path
        log.info(
            "file_started", extra={"fields": {"file": path.name, "attempt": taken.attempts + 1}}
        )
        try:
            outcome = self.ingest(self.conn, path, self.config)
        except FileNotFoundError:
            log.info("file_vanished", extra={"fields": {"file": path.name, "stage": "ingest"}})
            self.queue.finish(path)
            return
        except FileChanged:  # nothing was recorded: take it again once it is quiet
            log.info("file_changed_while_reading", extra={"fields": {"file": path.name}})
            self.queue.finish(path)
            self.queue.file_found(path)
            return
        except Exception as exc:
            if self.stopping.is_set():
                log.info("file_rolled_back", extra={"fields": {"file": path.name}})
                self.queue.finish(path)
                return
            reason = "unreadable" if isinstance(exc, OSError) else "ingest_error"
            self._retry_or_fail(taken, reason, exc)
            return
        if outcome.status != "duplicate_file":  # a new ledger row (loaded or failed) committed
            if outcome.file_id is not None:
                self.committed_file_id = max(self.committed_file_id, outcome.file_id)
            if self.on_commit is not None:
                self.on_commit()  # there is something to export
        try:
            moved = self.queue.finish(path, then=lambda: self._move(outcome))
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

    def _move(self, outcome: FileOutcome) -> None:
        """Loaded and duplicate files go to done/, failed ones to failed/ with their reason."""
        if outcome.status == "failed":
            target = move_without_overwrite(
                outcome.path, self.config.failed_dir, companion_suffix=REASON_SUFFIX
            )
            try:
                write_reason(target, outcome.reason_document())
            except OSError as exc:  # the file is set aside; the ledger still has the reason
                log.error(
                    "reason_not_written",
                    extra={"fields": {"file": outcome.name, "error": str(exc)}},
                )
        else:
            target = move_without_overwrite(outcome.path, self.config.done_dir)
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

    def _retry_or_fail(
        self, taken: TakenFile, reason: str, exc: BaseException, *, finished: bool = False
    ) -> None:
        """Retry with backoff a bounded number of times, then give the file up to failed/."""
        attempts = taken.attempts + 1
        fields: dict[str, Any] = {
            "file": taken.path.name,
            "reason": reason,
            "error": f"{type(exc).__name__}: {exc}",
            "attempt": attempts,
        }
        if isinstance(exc, OSError) and exc.errno is not None:
            fields["errno"] = errno.errorcode.get(exc.errno, exc.errno)
        if attempts < MAX_ATTEMPTS:
            delay = self.backoff[min(attempts - 1, len(self.backoff) - 1)]
            log.warning("file_retry", extra={"fields": {**fields, "delay": delay}})
            self.queue.retry(taken.path, attempts, delay)
            return
        log.error("file_given_up", extra={"fields": fields})
        if not finished:
            self.queue.finish(taken.path)
        try:
            target = move_without_overwrite(
                taken.path, self.config.failed_dir, companion_suffix=REASON_SUFFIX
            )
            write_reason(target, environment_failure(target, reason, exc))
        except OSError as move_exc:
            # It cannot be set aside either: leave it alone (no endless retry) until it changes.
            self.queue.give_up(taken.path)
            log.error(
                "file_stuck",
                extra={"fields": {"file": taken.path.name, "error": str(move_exc)}},
            )

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> bool:
        """Stop taking files, let the current one finish within ``grace`` seconds, otherwise
        interrupt it (its transaction rolls back, the file stays in the inbox). True if stopped."""
        self.stopping.set()
        self.queue.close()
        self.join(grace)
        if self.is_alive():
            log.warning("worker_interrupting", extra={"fields": {"grace": grace}})
            self.conn.interrupt()
            self.join(1.0)
        return not self.is_alive()


class SqliteExporter(threading.Thread):
    """Keeps the SQLite copy up to date in its own thread, so that exporting never delays the
    next file. Each export copies everything committed since the last one: pokes coalesce, and
    a failed export loses nothing (it is retried with backoff)."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        sqlite_path: Path,
        export: Callable[[duckdb.DuckDBPyConnection, Path], object] = export_new,
        *,
        min_interval: float = EXPORT_MIN_INTERVAL,
        nice: int = 0,
    ) -> None:
        super().__init__(name="sqlite-exporter", daemon=True)
        self.min_interval = min_interval
        self.nice = nice
        self.conn = conn
        self.sqlite_path = sqlite_path
        self.export = export
        self.exports = 0
        self._wanted = threading.Event()
        self._stopping = threading.Event()

    def poke(self) -> None:
        """Something new was committed."""
        self._wanted.set()

    def run(self) -> None:
        lower_thread_priority(self.nice)
        failures = 0
        last_export = -self.min_interval
        self._wanted.set()  # catch up first: a crash may have come between commit and export
        while not self._stopping.is_set():
            if not self._wanted.wait(timeout=0.5):
                continue
            # While a backlog drains, commits come every few ms: gather them into one export.
            pause = last_export + self.min_interval - time.monotonic()
            if pause > 0 and self._stopping.wait(pause):
                break
            if self._stopping.is_set():
                break
            self._wanted.clear()
            last_export = time.monotonic()
            try:
                self.export(self.conn, self.sqlite_path)
            except Exception:  # never stops ingest; the next export catches up
                failures += 1
                delay = min(60.0, 2.0**failures)
                log.exception(
                    "export_failed",
                    extra={"fields": {"sqlite": str(self.sqlite_path), "retry_in": delay}},
                )
                self._wanted.set()
                self._stopping.wait(delay)
                continue
            failures = 0
            self.exports += 1
        if self.export is export_new:
            # Checkpoint and close the SQLite file cleanly (its WAL is folded back in).
            try:
                close_sqlite()
            except Exception:
                log.exception("export_close_failed", extra={"fields": {}})

    def request_stop(self) -> None:
        """Take no new export; the one running may finish."""
        self._stopping.set()
        self._wanted.set()

    def stop(self, grace: float = 1.0) -> bool:
        """Let a running export finish within ``grace``, else interrupt it (SQLite rolls it
        back; the next start exports it again). True if stopped."""
        self.request_stop()
        if not self.is_alive():
            return True
        self.join(grace)
        if self.is_alive():
            log.warning("export_interrupting", extra={"fields": {"grace": grace}})
            self.conn.interrupt()  # a DuckDB read, or the bulk writer streaming one
            interrupt_export()  # a statement of the SQLite writer
            self.join(0.5)
        if self.is_alive():
            log.error("export_still_running", extra={"fields": {"sqlite": str(self.sqlite_path)}})
        return not self.is_alive()


class Daemon:
    """The watcher and the worker around one warehouse connection; started and stopped with the
    API through its lifespan."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, config: Config) -> None:
        self.config = config
        self.conn = conn
        # The worker writes through its own cursor; the API reads through others of ``conn``.
        self.worker_conn = conn.cursor()
        self.queue = InboxQueue(config.settle_seconds)
        self.watcher = InboxWatcher(config.inbox, self.queue)
        self.exporter = (
            SqliteExporter(conn.cursor(), config.sqlite_path, nice=config.ingest_nice)
            if config.sqlite_export
            else None
        )
        self.worker = IngestWorker(
            self.worker_conn,
            config,
            self.queue,
            on_commit=self.exporter.poke if self.exporter is not None else None,
        )
        self._started = False
        self._stopped = False
        self.stopped_cleanly = True
        self.exporter_stopped = True

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.config.done_dir.mkdir(parents=True, exist_ok=True)
        self.config.failed_dir.mkdir(parents=True, exist_ok=True)
        clear_staging(self.config.staging_dir)  # this process holds the warehouse: ours only
        self.watcher.start()
        self.worker.start()
        if self.exporter is not None:
            self.exporter.start()

    def stop(self) -> None:
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        started = time.monotonic()
        if self.exporter is not None:
            self.exporter.request_stop()  # it winds down while the worker finishes its file
        self.stopped_cleanly = self.worker.stop()
        self.exporter_stopped = self.exporter is None or self.exporter.stop(grace=0.5)
        self.watcher.stop()
        log.info(
            "daemon_stopped",
            extra={
                "fields": {
                    "seconds": round(time.monotonic() - started, 3),
                    "backlog": len(self.queue.queued()),
                    "clean": self.stopped_cleanly,
                }
            },
        )

    def ready(self) -> bool:
        """Ready = the watcher is running and the worker is alive."""
        return self.watcher.running and self.worker.is_alive() and not self._stopped

    def backlog(self) -> int:
        """Files queued or being ingested."""
        return len(self.queue)

    def committed_file_id(self) -> int:
        """The id of the last file committed to the warehouse (0: none yet)."""
        return self.worker.committed_file_id

    @asynccontextmanager
    async def lifespan(self, app: object) -> AsyncIterator[None]:
        """Start with the API, stop with it (uvicorn runs this on SIGTERM/SIGINT)."""
        await asyncio.to_thread(self.start)
        try:
            yield
        finally:
            await asyncio.to_thread(self.stop)

    def close(self) -> bool:
        """Stop, close our cursors; False if a thread still uses the connection (then the
        caller must not close it: the process exits and DuckDB replays its WAL next time)."""
        self.stop()
        cursors = [] if self.worker.is_alive() else [self.worker_conn]
        if self.exporter is not None and self.exporter_stopped:
            cursors.append(self.exporter.conn)
        for cursor in cursors:
            try:
                cursor.close()
            except duckdb.Error:
                log.exception("close_failed", extra={"fields": {"what": "cursor"}})
        return not self.worker.is_alive() and self.exporter_stopped


def lower_thread_priority(nice: int) -> None:
    """Make the calling thread ``nice`` steps nicer (Linux keeps a nice value per thread, and
    threads it starts inherit it). Elsewhere, or for 0, nothing changes."""
    if nice <= 0 or not sys.platform.startswith("linux"):
        return
    thread = threading.get_native_id()
    try:
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(NICEST, current + nice))
    except OSError as exc:  # a sandbox may refuse it: run at the same priority
        log.warning("priority_unchanged", extra={"fields": {"nice": nice, "error": str(exc)}})


def open_at_lower_priority(config: Config) -> duckdb.DuckDBPyConnection:
    """Open the warehouse from a thread made ``config.ingest_nice`` nicer: DuckDB starts its
    worker threads there, and they inherit that priority, so a large ingest yields the CPU to
    the API (which runs at the process's own priority)."""
    opened: list[duckdb.DuckDBPyConnection] = []
    failed: list[BaseException] = []

    def open_it() -> None:
        lower_thread_priority(config.ingest_nice)
        try:
            opened.append(open_warehouse(config))
        except BaseException as exc:
            failed.append(exc)

    opener = threading.Thread(target=open_it, name="warehouse-opener")
    opener.start()
    opener.join()
    if failed:
        raise failed[0]
    return opened[0]


def last_file_id(conn: duckdb.DuckDBPyConnection) -> int:
    """The highest file id in the ledger (0 for an empty one)."""
    cursor = conn.cursor()
    try:
        return int(one_row(cursor, "SELECT coalesce(max(file_id), 0) FROM files")[0])
    finally:
        cursor.close()


def _stop_signal_seen(signum: int, frame: object) -> None:
    log.info("stop_signal", extra={"fields": {"signal": signal.Signals(signum).name}})


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, 3 if another daemon holds the warehouse."""
    import uvicorn

    from moneylion.api.app import create_app
    from moneylion.api.server import BoundedHttpProtocol
    from moneylion.logs import setup_logging

    setup_logging(config)
    try:
        conn = open_at_lower_priority(config)
    except WarehouseLocked as exc:
        print(f"moneylion: {exc}", file=sys.stderr)
        return 3
    daemon = Daemon(conn, config)
    try:
        app = create_app(
            config,
            db=conn,
            readiness=daemon.ready,
            committed=daemon.committed_file_id,
            lifespan=[daemon.lifespan],
        )
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_config=None,
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=1,
                http=BoundedHttpProtocol,
            )
        )
        log.info(
            "daemon_starting",
            extra={"fields": {"pid": os.getpid(), "host": config.host, "port": config.port}},
        )
        # uvicorn re-raises the stop signal after its shutdown, under the handler it found when
        # it started: make that one a no-op so a SIGTERM/SIGINT stop ends with exit code 0.
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _stop_signal_seen)
        server.run()
    finally:
        if daemon.close():
            conn.close()  # last: every commit is in the file, the WAL checkpointed
            log.info("warehouse_closed", extra={"fields": {"path": str(config.duckdb_path)}})
        else:
            log.error("warehouse_left_open", extra={"fields": {"path": str(config.duckdb_path)}})
    if not server.started:
        print(f"moneylion: the API could not start on {config.host}:{config.port}", file=sys.stderr)
        return 1
    return 0 if daemon.stopped_cleanly else 1
