"""The worker's recent commits, as the API shows them: the last batch, the rates, and the files
waiting for room on the disk.

The worker records each commit; the API reads a snapshot (thread-safe). Nothing here reads the
warehouse: these are the figures of this process since it started.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

RATE_WINDOW_SECONDS = 60.0  # commits counted in the rates


@dataclass(frozen=True)
class StreamStats:
    """What the worker has done lately: its last commit and the rates over RATE_WINDOW_SECONDS."""

    last_batch_files: int
    last_batch_rows: int
    last_batch_seconds: float
    files_per_second: float
    rows_per_second: float
    commits: int
    files_set_aside: int  # given up for reasons of the environment since the start
    files_waiting_for_disk: int = 0  # inbox files waiting for min_free_disk_bytes to be free


class IngestStats:
    """Commits of the worker, for the rates (thread-safe; the API reads, the worker writes)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: deque[tuple[float, int, int]] = deque()  # (when, files, rows)
        self._last = (0, 0, 0.0)
        self._commits = 0
        self._set_aside = 0
        self._waiting_for_disk: frozenset[Path] = frozenset()

    def committed(self, files: int, rows: int, seconds: float) -> None:
        now = self._clock()
        with self._lock:
            self._recent.append((now, files, rows))
            self._last = (files, rows, seconds)
            self._commits += 1
            self._trim(now)

    def set_aside(self) -> None:
        with self._lock:
            self._set_aside += 1

    def waiting_for_disk(self, paths: Iterable[Path]) -> None:
        """The inbox files that wait for room on the disk (worker.py's DiskLow)."""
        with self._lock:
            self._waiting_for_disk = frozenset(paths)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - RATE_WINDOW_SECONDS:
            self._recent.popleft()

    def snapshot(self) -> StreamStats:
        now = self._clock()
        # A waiting file removed from the inbox meanwhile waits no more (the worker may not hear
        # of it: the queue forgets a deleted file).
        waiting = sum(os.path.lexists(path) for path in self._waiting_for_disk)
        with self._lock:
            self._trim(now)
            files = sum(f for _, f, _ in self._recent)
            rows = sum(r for _, _, r in self._recent)
            last_files, last_rows, last_seconds = self._last
            return StreamStats(
                last_files,
                last_rows,
                last_seconds,
                files / RATE_WINDOW_SECONDS,
                rows / RATE_WINDOW_SECONDS,
                self._commits,
                self._set_aside,
                waiting,
            )
