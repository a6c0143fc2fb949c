"""The exporter thread: keeps the SQLite copy up to date beside the ingest worker."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

from moneylion.export import close_sqlite, export_new, interrupt_export
from moneylion.priority import lower_thread_priority
from moneylion.tuning import DEFAULT, Tuning

log = logging.getLogger(__name__)

EXPORT_MIN_INTERVAL = 0.25  # seconds between two SQLite exports while commits keep coming
INTERRUPTED_SECONDS = 5.0  # the longest an interrupted export is waited for at stop


class SqliteExporter(threading.Thread):
    """Keeps the SQLite copy up to date in its own thread, so that exporting never delays the
    next file. Each export copies everything committed since the last one: pokes coalesce, and
    a failed export loses nothing (it is retried with backoff).

    ``export`` is what each export runs; by default ``export_new`` with ``tuning``, whose
    SQLite connection the thread closes when it ends."""

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        sqlite_path: Path,
        export: Callable[[duckdb.DuckDBPyConnection, Path], object] | None = None,
        *,
        tuning: Tuning = DEFAULT,
        min_interval: float = EXPORT_MIN_INTERVAL,
        nice: int = 0,
    ) -> None:
        super().__init__(name="sqlite-exporter", daemon=True)
        self.min_interval = min_interval
        self.nice = nice
        self.conn = conn
        self.sqlite_path = sqlite_path
        self.export = export or functools.partial(export_new, tuning=tuning)
        self._owns_writer = export is None
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
        if self._owns_writer:
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
            # An interrupted statement stops at its next check, later on a busy machine; the
            # warehouse must not be closed under it (DuckDB aborts the process).
            self.join(INTERRUPTED_SECONDS)
        if self.is_alive():
            log.error("export_still_running", extra={"fields": {"sqlite": str(self.sqlite_path)}})
        return not self.is_alive()
