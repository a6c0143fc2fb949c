"""Answers that only change when a file commits, kept until the next commit.

A DuckDB statement has a fixed CPU cost whatever it does, and the hot read-mostly answers
(top users, a day's totals, the age of the last file) change only when the ingest worker commits.
The cache drops everything when its change token moves:

* in the daemon, the token is the id of the last file the ingest worker committed (exact: the
  worker is the only writer), so answers stay cached for as long as nothing commits;
* without a daemon (an app opened on a warehouse by itself), it is the (inode, size, mtime) of
  ``moneylion.duckdb`` and its WAL, which every commit writes; as that can also move without a
  commit, entries are also reloaded after ``max_age`` seconds.

The token is taken *before* a load, so a commit racing the load makes the entry look stale,
never fresh. Concurrent misses of one key share one load (no stampede into DuckDB).

The cache is bounded in entries and in bytes: each answer is measured when it is loaded (the
length of its MessagePack encoding, in the worker thread that loaded it) and the least recently
used answers are dropped past ``MAX_BYTES``; an answer larger than that is served, not kept.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import msgspec

T = TypeVar("T")

# What the kept answers may add up to, in encoded bytes (Python objects take a few times more).
MAX_BYTES = 32 * 1024 * 1024
MAX_ENTRIES = 1024

# Values MessagePack has no type for (a dashboard's Markup is a str and passes) count as their
# repr: a size estimate, not a serialization anyone reads.
_MEASURE = msgspec.msgpack.Encoder(enc_hook=repr)


def answer_bytes(value: object) -> int:
    """An estimate of ``value``'s size: the length of its MessagePack encoding."""
    return len(_MEASURE.encode(value))


def file_token(files: tuple[Path, ...]) -> Callable[[], Hashable]:
    """A token of (inode, size, mtime_ns) per file, None for a missing one."""

    def token() -> Hashable:
        found: list[tuple[int, int, int] | None] = []
        for path in files:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                found.append(None)
            else:
                found.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return tuple(found)

    return token


class SnapshotCache:
    """A small LRU of answers (at most ``size`` of them, ``max_bytes`` together), all dropped
    when the change token moves."""

    def __init__(
        self,
        token: Callable[[], Hashable],
        *,
        max_age: float | None = 1.0,
        size: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.token = token
        self.max_age = max_age
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0  # of the entries kept, as answer_bytes measured them
        self._entries: OrderedDict[Hashable, tuple[float, Any, int]] = OrderedDict()
        self._token: Hashable = object()  # equal to no token: the first lookup clears
        self._lock = threading.Lock()
        self._loading: dict[tuple[Hashable, Hashable], asyncio.Future[Any]] = {}
        self.hits = 0
        self.misses = 0

    def lookup(self, key: Hashable, token: Hashable) -> tuple[bool, Any]:
        """(True, answer) if cached under ``token`` and young enough, else (False, None)."""
        now = time.monotonic()
        with self._lock:
            if token != self._token:
                self._entries.clear()
                self.bytes = 0
                self._token = token
            entry = self._entries.get(key)
            if entry is not None and (self.max_age is None or now - entry[0] <= self.max_age):
                self._entries.move_to_end(key)
                self.hits += 1
                return True, entry[1]
            self.misses += 1
            return False, None

    def store(
        self, key: Hashable, token: Hashable, value: Any, loaded_at: float, size: int = 0
    ) -> None:
        """Keep ``value`` (``size`` bytes, ``answer_bytes``) if the token is still the one taken
        before it was loaded and it fits; drop the least recently used past the bounds."""
        with self._lock:
            if token != self._token:
                return  # something committed meanwhile (or the cache moved on): don't keep it
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[2]
            if size > self.max_bytes:
                return  # larger than the whole cache: served, never kept
            self._entries[key] = (loaded_at, value, size)
            self.bytes += size
            while len(self._entries) > self.size or self.bytes > self.max_bytes:
                self.bytes -= self._entries.popitem(last=False)[1][2]

    async def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The cached answer, or ``load()`` run in a worker thread (never on the event loop);
        requests missing the same key under the same token wait for one load."""
        token = self.token()
        hit, value = self.lookup(key, token)
        if hit:
            cached: T = value
            return cached
        pending = self._loading.get((key, token))
        if pending is not None:
            shared: T = await asyncio.shield(pending)
            return shared
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._loading[(key, token)] = future
        try:
            loaded_at = time.monotonic()
            fresh, size = await anyio.to_thread.run_sync(lambda: _measured(load))
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        else:
            future.set_result(fresh)
            self.store(key, token, fresh, loaded_at, size)
            return fresh
        finally:
            del self._loading[(key, token)]


def _measured(load: Callable[[], T]) -> tuple[T, int]:
    """``load()`` and its size, both off the event loop."""
    value = load()
    return value, answer_bytes(value)
