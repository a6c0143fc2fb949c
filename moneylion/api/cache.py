"""Answers that only change when a file commits, kept until the warehouse files change.

A DuckDB statement costs ~0.5 ms of CPU here whatever it does, and the hot read-mostly answers
(top users, a day's totals, the age of the last file) change only when the ingest worker commits.
Every commit writes the warehouse's WAL (or, at a checkpoint, truncates it and writes the
database file), so the (inode, size, mtime) of ``moneylion.duckdb`` and ``moneylion.duckdb.wal``
is a cheap change token: while it is unchanged, no commit happened and a cached answer is still
the committed state. Staleness is bounded anyway: an entry older than ``max_age`` seconds is
reloaded, whatever the token says. The token is taken *before* a load, so a commit racing the
load makes the entry look stale, never fresh.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread

T = TypeVar("T")
Token = tuple[tuple[int, int, int] | None, ...]


class SnapshotCache:
    """A small LRU of answers, all dropped when the warehouse files change."""

    def __init__(self, files: tuple[Path, ...], *, max_age: float = 1.0, size: int = 1024) -> None:
        self.files = files
        self.max_age = max_age
        self.size = size
        self._entries: OrderedDict[Hashable, tuple[float, Any]] = OrderedDict()
        self._token: Token | None = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def token(self) -> Token:
        """(inode, size, mtime_ns) of each warehouse file, None for a missing one."""
        found: list[tuple[int, int, int] | None] = []
        for path in self.files:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                found.append(None)
            else:
                found.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return tuple(found)

    def lookup(self, key: Hashable) -> tuple[bool, Any]:
        """(True, answer) if cached for the current files and young enough, else (False, None)."""
        token = self.token()
        now = time.monotonic()
        with self._lock:
            if token != self._token:
                self._entries.clear()
                self._token = token
            entry = self._entries.get(key)
            if entry is not None and now - entry[0] <= self.max_age:
                self._entries.move_to_end(key)
                self.hits += 1
                return True, entry[1]
            self.misses += 1
            return False, None

    def store(self, key: Hashable, token: Token, value: Any, loaded_at: float) -> None:
        """Keep ``value`` if the files are still as they were before it was loaded."""
        with self._lock:
            if token != self._token:
                return  # something committed meanwhile (or the cache moved on): don't keep it
            self._entries[key] = (loaded_at, value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    async def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The cached answer, or ``load()`` run in a worker thread (never on the event loop)."""
        hit, value = self.lookup(key)
        if hit:
            result: T = value
            return result
        token = self.token()
        loaded_at = time.monotonic()
        fresh = await anyio.to_thread.run_sync(load)
        self.store(key, token, fresh, loaded_at)
        return fresh
