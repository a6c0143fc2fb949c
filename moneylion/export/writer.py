"""The exporter's one connection to the live SQLite file, kept open between exports.

Its page cache (up to CACHE_KIB) is warmed with the user totals when it opens: a small file's
users are scattered, about a page each, and reading them cold would cost every export. WAL
checkpoints run on a thread and connection of their own (Checkpointer), so no export waits for
one. ``LOCK`` is held by every export: one writer per process.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moneylion.export import bulk
from moneylion.export.schema import SQLITE_SCHEMA, RebuildNeeded

log = logging.getLogger(__name__)

CACHE_KIB = 262_144  # page cache of the writer's connection: holds 1M users' totals
WAL_SIZE_LIMIT = 64 * 1024 * 1024  # the WAL file is cut back to this after a checkpoint

LOCK = threading.RLock()


class BaseUsers:
    """The user ids that have a row in ``user_totals_base``: a bitmap over ids 0..LIMIT-1.

    Looking a user up in the base costs SQLite more than adding its delta; ids outside
    the bitmap count as unknown (their sums are upserted into the base, which is always right).
    The bitmap belongs to the writer: it is dropped with it when an export fails.
    """

    LIMIT = 1 << 27  # ids below 134M: 16 MiB at most

    def __init__(self, lite: sqlite3.Connection) -> None:
        (highest,) = lite.execute("SELECT max(user_id) FROM user_totals_base").fetchone()
        self._bits = bytearray(min(highest or 0, self.LIMIT) // 8 + 1)
        self.add_all(lite.execute("SELECT user_id FROM user_totals_base"))

    def add(self, user_id: int) -> None:
        self.add_all([(user_id,)])

    def add_all(self, rows: Iterable[tuple[int]]) -> None:
        """Add the user id of every 1-tuple (a hot loop: inlined)."""
        bits, limit = self._bits, self.LIMIT
        for (user_id,) in rows:
            if 0 <= user_id < limit:
                byte = user_id >> 3
                if byte >= len(bits):
                    bits.extend(bytes(byte + 1 - len(bits)))
                bits[byte] |= 1 << (user_id & 7)

    def discard_all(self, user_ids: Iterable[int]) -> None:
        """Forget these users (their base rows may go): unknown is always right."""
        bits = self._bits
        for user_id in user_ids:
            byte = user_id >> 3
            if 0 <= byte < len(bits):
                bits[byte] &= ~(1 << (user_id & 7)) & 0xFF

    def split(self, rows: list[Any]) -> tuple[list[Any], list[Any]]:
        """Rows whose first value is a known user id, and the others (a hot loop: inlined)."""
        bits, size = self._bits, len(self._bits)
        known: list[Any] = []
        others: list[Any] = []
        for row in rows:
            user_id = row[0]
            byte = user_id >> 3
            if 0 <= byte < size and bits[byte] >> (user_id & 7) & 1:
                known.append(row)
            else:
                others.append(row)
        return known, others


class Checkpointer:
    """Copies the WAL back into the database on its own thread and connection.

    PASSIVE checkpoints never block readers or the writer; the writer keeps appending meanwhile.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpoint", daemon=True)
        self._thread.start()

    def request(self) -> None:
        self._wake.set()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        lite = sqlite3.connect(self._path, isolation_level=None, timeout=30.0)
        try:
            while True:
                self._wake.wait()
                self._wake.clear()
                if self._stopping:
                    return
                self._checkpoint(lite)
        finally:
            lite.close()

    def _checkpoint(self, lite: sqlite3.Connection) -> None:
        started = time.perf_counter()
        try:
            busy, frames, copied = lite.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            log.exception("sqlite_checkpoint_failed", extra={"fields": {"sqlite": str(self._path)}})
            return
        log.debug(
            "sqlite_checkpoint",
            extra={
                "fields": {
                    "sqlite": str(self._path),
                    "frames": frames,
                    "copied": copied,
                    "busy": busy,
                    "seconds": round(time.perf_counter() - started, 4),
                }
            },
        )


@dataclass
class Writer:
    """The open connection to one live SQLite file, with what it knows of the file."""

    path: Path
    identity: tuple[int, int]  # (st_dev, st_ino): a full export replaces the file
    lite: sqlite3.Connection
    checkpointer: Checkpointer
    base_users: BaseUsers
    changes_at_checkpoint: int = 0

    def after_commit(self, checkpoint_every_changes: int) -> None:
        """Ask for a checkpoint once this many rows changed since the last one."""
        changes = self.lite.total_changes
        if changes - self.changes_at_checkpoint >= checkpoint_every_changes:
            self.changes_at_checkpoint = changes
            self.checkpointer.request()

    def close(self) -> None:
        self.checkpointer.close()
        self.lite.close()  # an open transaction rolls back


_open_writer: Writer | None = None


def writer(path: Path) -> Writer:
    """The cached writer for ``path``, reopened if the file was replaced meanwhile (LOCK held)."""
    global _open_writer
    stat = path.stat()
    identity = (stat.st_dev, stat.st_ino)
    if _open_writer is not None:
        if _open_writer.path == path and _open_writer.identity == identity:
            return _open_writer
        drop()
    aside = bulk.aside_path(path)
    for leftover in (aside, bulk.side_path(aside), bulk.side_path(path)):  # of a killed export
        bulk.remove(leftover)
    try:
        lite = _open_sqlite(path)
    except sqlite3.OperationalError:  # locked, unreadable: the environment, not the file
        raise
    except sqlite3.DatabaseError as exc:  # not a database, malformed
        raise RebuildNeeded(str(exc)) from exc
    base_users = BaseUsers(lite)  # reads the base's ids: warms the page cache too
    lite.execute("SELECT max(tx_count) FROM user_totals_delta").fetchall()
    _open_writer = Writer(path, identity, lite, Checkpointer(path), base_users, lite.total_changes)
    return _open_writer


def drop() -> None:
    """Close the cached writer (an open transaction rolls back); the next export reopens."""
    global _open_writer
    if _open_writer is not None:
        _open_writer.close()
        _open_writer = None


def interrupt() -> None:
    """Abort the statement the writer runs, from any thread (its export then rolls back)."""
    opened = _open_writer
    if opened is not None:
        opened.lite.interrupt()


def _open_sqlite(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (we issue BEGIN/COMMIT), WAL, synchronous=NORMAL."""
    lite = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    try:
        lite.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may lose the last commits, never consistency. The
        # watermark rolls back with the rows it describes, so the next export redoes them.
        lite.execute("PRAGMA synchronous=NORMAL")
        lite.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        # The automatic checkpoint (every 1,000 pages) would run inside nearly every COMMIT.
        lite.execute("PRAGMA wal_autocheckpoint=0")
        lite.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        lite.executescript(SQLITE_SCHEMA)
    except BaseException:
        lite.close()
        raise
    return lite
