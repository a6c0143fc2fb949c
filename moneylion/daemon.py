"""``moneylion serve``: the watcher, the ingest worker, the exporter and the API in one process.

This module wires them together and owns the process: start and stop, signals, uvicorn. The
worker (``worker.py``) is the only DuckDB writer; where files go after their commit is
``inbox.py``'s; the exporter thread is ``export/exporter.py``'s.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeVar, cast

import duckdb

from moneylion import inbox
from moneylion.config import Config
from moneylion.corrections import CorrectionRefused
from moneylion.export.exporter import SqliteExporter
from moneylion.lake.request import LakeCorrection
from moneylion.priority import lower_thread_priority
from moneylion.schema import WarehouseLocked, open_warehouse
from moneylion.source import clear_staging
from moneylion.stream import StreamStats
from moneylion.tail import Tails, put_back_continuing
from moneylion.watcher import InboxQueue, InboxWatcher
from moneylion.worker import IngestWorker

T = TypeVar("T")

if TYPE_CHECKING:
    from moneylion.lake.lag import LakeLag
    from moneylion.lake.mode import LakeMode

log = logging.getLogger(__name__)

RETENTION_CHECK_SECONDS = 3600.0  # how often done/'s day folders past retention are pruned


class Daemon:
    """The watcher and the worker around one warehouse connection; started and stopped with the
    API through its lifespan."""

    def __init__(self, conn: duckdb.DuckDBPyConnection, config: Config) -> None:
        self.config = config
        self.conn = conn
        # The worker writes through its own cursor; the API reads through others of ``conn``.
        self.worker_conn = conn.cursor()
        self.queue = InboxQueue(
            config.settle_seconds,
            writing_timeout=config.writer_timeout_seconds,
            empty_file_seconds=config.empty_file_seconds,
            order_wait=config.order_wait_seconds,
        )
        self.watcher = InboxWatcher(config.inbox, self.queue, rescan_seconds=config.rescan_seconds)
        self.tails: Tails | None = None
        self.exporter = (
            SqliteExporter(
                conn.cursor(), config.sqlite_path, tuning=config.tuning, nice=config.ingest_nice
            )
            if config.sqlite_export
            else None
        )
        self.lake: LakeMode | None = None
        if config.lake_uri:
            # Lake mode: the worker writes the lake, the tailer (the one local writer) applies
            # what the lake's ledger commits, the exporter follows the tailer.
            from moneylion.lake.mode import LakeMode  # deltalake loads in lake mode only

            self.lake = LakeMode(conn.cursor(), config, self.exporter)
            self.worker = self.lake.worker(self.worker_conn, self.queue)
        else:
            # Taken files are tailed by inode (tail.py); lake mode takes whole files only.
            self.tails = Tails(
                settle_seconds=config.settle_seconds,
                continuation_seconds=config.continuation_seconds,
                rescan_seconds=config.rescan_seconds,
                staging=config.staging_dir,
                enqueue=self.queue.file_continues,
            )
            self.worker = IngestWorker(
                self.worker_conn,
                config,
                self.queue,
                on_commit=self.exporter.poke if self.exporter is not None else None,
                tails=self.tails,
            )
        self._started = False
        self._stopped = False
        self._maintenance_stop = threading.Event()
        self.stopped_cleanly = True
        self.exporter_stopped = True

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self.config.done_dir.mkdir(parents=True, exist_ok=True)
        self.config.failed_dir.mkdir(parents=True, exist_ok=True)
        clear_staging(self.config.staging_dir)  # this process holds the warehouse: ours only
        if self.lake is not None:
            self.lake.start()
        if self.tails is not None:
            self.tails.recover(self.worker_conn, self.config.done_dir)
            put_back_continuing(self.config.inbox)
            self.tails.start()
        self.watcher.start()
        self.worker.start()
        if self.exporter is not None:
            self.exporter.start()
        if self.config.done_retention_days > 0:
            threading.Thread(target=self._prune_done, name="done-retention", daemon=True).start()

    def _prune_done(self) -> None:
        """Remove done/'s day folders older than done_retention_days, now and every hour."""
        lower_thread_priority(self.config.ingest_nice)
        while True:
            try:
                inbox.prune_days(self.config.done_dir, self.config.done_retention_days)
            except OSError as exc:
                log.warning("done_prune_failed", extra={"fields": {"error": str(exc)}})
            if self._maintenance_stop.wait(RETENTION_CHECK_SECONDS):
                return

    def stop(self) -> None:
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        self._maintenance_stop.set()
        started = time.monotonic()
        if self.exporter is not None:
            self.exporter.request_stop()  # it winds down while the worker finishes its file
        self.stopped_cleanly = self.worker.stop()
        if self.lake is not None:
            self.stopped_cleanly = self.lake.stop() and self.stopped_cleanly
        self.exporter_stopped = self.exporter is None or self.exporter.stop(grace=0.5)
        self.watcher.stop()
        if self.tails is not None:
            self.tails.stop()
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
        """Ready = the watcher is running and the worker (and in lake mode the tailer) alive."""
        alive = self.lake is None or self.lake.alive()
        return self.watcher.running and self.worker.is_alive() and alive and not self._stopped

    def committed_file_id(self) -> int:
        """The id of the last file committed to the warehouse (0: none yet)."""
        if self.lake is not None:
            return self.lake.tailer.applied_file_id
        return self.worker.committed_file_id

    def between_batches(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``work`` (a correction, a check) on the warehouse between two of the worker's
        batches. Lake mode: a correction is a ledger entry of the lake, not a change of this
        warehouse: a ``LakeCorrection`` is published and answered once this replica applied it
        (``lake/correct.py``); anything else is refused."""
        if self.lake is not None:
            if isinstance(work, LakeCorrection):
                return cast(T, self.lake.correct(work))
            raise CorrectionRefused("checks and releases are not available in lake mode yet")
        return self.worker.between_batches(work)

    def lake_lag(self) -> LakeLag | None:
        """How far this replica is behind the lake (None: local mode)."""
        return self.lake.tailer.lag() if self.lake is not None else None

    def backlog(self) -> tuple[int, int]:
        """(files, bytes) waiting in the inbox to be committed, being ingested included."""
        return self.queue.backlog()

    def stream(self) -> StreamStats:
        """The worker's last commit and its rates."""
        return self.worker.stats.snapshot()

    def files_stuck(self) -> int:
        """Inbox files left alone: they kept failing and could not be set aside either."""
        return self.queue.given_up

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
        if self.lake is not None and not self.lake.tailer.is_alive():
            cursors.append(self.lake.tailer.conn)
        if self.lake is not None:
            cursors.append(self.lake.corrector.reader)  # the API, its one user, has stopped
        if self.exporter is not None and self.exporter_stopped:
            cursors.append(self.exporter.conn)
        for cursor in cursors:
            try:
                cursor.close()
            except duckdb.Error:
                log.exception("close_failed", extra={"fields": {"what": "cursor"}})
        tailer_stopped = self.lake is None or not self.lake.tailer.is_alive()
        return not self.worker.is_alive() and self.exporter_stopped and tailer_stopped


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


def _stop_signal_seen(signum: int, frame: object) -> None:
    log.info("stop_signal", extra={"fields": {"signal": signal.Signals(signum).name}})


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop, 3 if another daemon holds the warehouse."""
    import uvicorn

    from moneylion.api.app import create_app
    from moneylion.api.metrics import ConnectionsCollector
    from moneylion.api.server import HttpLimits, bounded_protocol
    from moneylion.logs import setup_logging

    # Before any file is made: DuckDB's and SQLite's own files (WAL, -shm) and the logs take
    # the process's umask; files that exist keep their mode.
    os.umask(config.umask_bits)
    setup_logging(config)
    try:
        conn = open_at_lower_priority(config)
    except WarehouseLocked as exc:
        print(f"moneylion: {exc}", file=sys.stderr)
        return 3
    daemon = Daemon(conn, config)
    try:
        app = create_app(config, db=conn, ingest=daemon, lifespan=[daemon.lifespan])
        protocol = bounded_protocol(HttpLimits.from_config(config))
        app.state.metrics_registry.register(ConnectionsCollector(protocol.gate))
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_config=None,
                access_log=False,
                lifespan="on",
                timeout_graceful_shutdown=1,
                http=protocol,  # bounds on heads, bodies and connections (api/server.py)
                ws="none",  # no websocket routes: an upgrade would leave the connection count
                # X-Forwarded-* are trusted from Config.trusted_proxies only (api/access.py).
                proxy_headers=False,
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
