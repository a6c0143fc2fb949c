"""Point reads from the SQLite export, used while it holds everything DuckDB has committed.

A user summary from DuckDB costs milliseconds of CPU (a columnar engine scans for one key, and
any statement has a fixed cost), and while a large file is being ingested it competes with the
ingest for DuckDB's threads. The SQLite export keeps the same per-user totals in a B-tree keyed
by user id: two point reads cost tens of microseconds, and readers never wait for the exporter
(WAL). ``bench/micro.py --only user_summary`` measures both.

The export trails DuckDB: each export is one SQLite transaction that also stores the last
exported file id (``export_state.last_file_id``). A read opens one SQLite snapshot and uses it
only if that watermark has reached the file id the daemon last committed (read *before* the
snapshot), so the answer is the committed state at some moment during the request, exactly as a
DuckDB read would give. Otherwise (the export is behind, the file is missing, locked, rebuilt,
not ours) the caller falls back to DuckDB. Money stays exact: the export keeps totals as TEXT
decimals, read here into ``Decimal``.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sqlite3
import threading
from decimal import Decimal
from pathlib import Path

from moneylion.api.queries import TOTALS_COLUMNS, UserSummary, summary_of
from moneylion.export import EXPORT_FORMAT

log = logging.getLogger(__name__)

MMAP_BYTES = 1 << 30  # reads through the OS page cache without a read() per page

_STATE = "SELECT key, value FROM export_state WHERE key IN ('format', 'last_file_id')"
_USER = "SELECT country, signup_date FROM users WHERE user_id = ?"
_TOTALS = f"SELECT {TOTALS_COLUMNS} FROM user_totals WHERE user_id = ?"


class SqliteReplica:
    """Read-only connections to the export, one per thread, reopened when the file is replaced
    (a full export renames a new file over it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._failing = False
        self.answered = 0
        self.behind = 0

    def user_summary(self, user_id: int, committed: int) -> tuple[bool, UserSummary | None]:
        """(True, summary or None) from a snapshot holding file ``committed``; (False, None) if
        the export has not reached it or cannot be read (the caller asks DuckDB)."""
        lite = self._connection()
        if lite is None:
            self.behind += 1
            return False, None
        try:
            lite.execute("BEGIN")
            try:
                state = dict(lite.execute(_STATE).fetchall())
                if state.get("format") != EXPORT_FORMAT or int(state["last_file_id"]) < committed:
                    self.behind += 1
                    return False, None
                user = lite.execute(_USER, (user_id,)).fetchone()
                totals = lite.execute(_TOTALS, (user_id,)).fetchone()
            finally:
                lite.execute("COMMIT")
        except (sqlite3.Error, KeyError, ValueError) as exc:
            self._failed(exc)
            return False, None
        self._failing = False
        self.answered += 1
        return True, summary_of(
            user_id,
            None if user is None else (user[0], _date(user[1])),
            None
            if totals is None
            else (totals[0], *map(Decimal, totals[1:5]), *map(_date, totals[5:])),
        )

    def exported_file_id(self) -> int | None:
        """The last file id the export holds (its watermark), None if it cannot be read."""
        lite = self._connection()
        if lite is None:
            return None
        try:
            state = dict(lite.execute(_STATE).fetchall())
            if state.get("format") != EXPORT_FORMAT:
                return None
            return int(state["last_file_id"])
        except (sqlite3.Error, KeyError, ValueError) as exc:
            self._failed(exc)
            return None

    def close(self) -> None:
        """Close this thread's connection (others close with their threads)."""
        opened = getattr(self._local, "opened", None)
        if opened is not None:
            opened[1].close()
            self._local.opened = None

    def _connection(self) -> sqlite3.Connection | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None  # no export yet
        identity = (stat.st_dev, stat.st_ino)
        opened: tuple[tuple[int, int], sqlite3.Connection] | None = getattr(
            self._local, "opened", None
        )
        if opened is not None and opened[0] == identity:
            return opened[1]
        self.close()
        try:
            # timeout=0: a rare busy WAL index is answered from DuckDB rather than waited for.
            lite = sqlite3.connect(
                f"{self.path.as_uri()}?mode=ro", uri=True, isolation_level=None, timeout=0.0
            )
            lite.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
        except sqlite3.Error as exc:
            self._failed(exc)
            return None
        self._local.opened = (identity, lite)
        return lite

    def _failed(self, exc: Exception) -> None:
        self.close()
        if not self._failing:  # once per run of failures, not once per request
            self._failing = True
            log.warning(
                "sqlite_replica_unreadable",
                extra={"fields": {"sqlite": str(self.path), "error": str(exc)}},
            )


def _date(text: str | None) -> dt.date | None:
    return None if text is None else dt.date.fromisoformat(text)
