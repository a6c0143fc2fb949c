"""Host and process readings for the health endpoints; every call returns at once.

``psutil.cpu_percent(interval=None)`` reports usage since the previous call and never sleeps, so
``prime()`` makes one throw-away call at start-up (the first call always says 0.0). Nothing here
lists OS users or processes other than our own.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import duckdb
import psutil

from moneylion.config import Config
from moneylion.ledger import FileStatus
from moneylion.watcher import is_candidate, is_inbox_file, regular_bytes, scan_inbox

# The ledger stores finished_at as a naive UTC timestamp, so its epoch is UTC.
_LAST_FILE_EPOCH_MS = "SELECT epoch_ms(max(finished_at)) FROM files"
_HELD_FILES = f"SELECT count(*) FROM files WHERE status = '{FileStatus.HELD}'"


@dataclass(frozen=True)
class HealthReading:
    """One snapshot of host, process and inbox health."""

    cpu_usage_percent: float
    num_cores: int
    memory_usage_percent: float
    disk_usage_percent: float
    process_rss_bytes: int
    process_cpu_percent: float  # this process, of one core (2 busy cores: 200)
    uptime_seconds: float
    inbox_backlog: int
    inbox_backlog_bytes: int
    seconds_since_last_file: float | None


_process: psutil.Process | None = None
_cpu_lock = threading.Lock()
_cpu_sample: tuple[float, float] | None = None  # (monotonic time, CPU seconds used)
_cpu_percent = 0.0
CPU_WINDOW_SECONDS = 1.0  # the process's CPU usage is measured over at least this long


def _self() -> psutil.Process:
    global _process
    if _process is None:
        _process = psutil.Process(os.getpid())
    return _process


def prime() -> None:
    """Start the CPU-usage interval so later non-blocking readings are meaningful."""
    psutil.cpu_percent(interval=None)
    _self()
    process_cpu_percent()


def process_cpu_percent() -> float:
    """This process's CPU usage over the last CPU_WINDOW_SECONDS or more (never waits): a
    reading per window, so frequent callers all see the same figure rather than noise."""
    global _cpu_sample, _cpu_percent
    now = time.monotonic()
    times = _self().cpu_times()
    used = float(times.user + times.system)
    with _cpu_lock:
        if _cpu_sample is None:
            _cpu_sample = (now, used)
        elif now - _cpu_sample[0] >= CPU_WINDOW_SECONDS:
            _cpu_percent = max(0.0, (used - _cpu_sample[1]) / (now - _cpu_sample[0]) * 100)
            _cpu_sample = (now, used)
        return _cpu_percent


def inbox_waiting(inbox: Path) -> tuple[int, int]:
    """(entries, bytes) the daemon would take from the inbox folder: the watcher's own rule
    (``watcher.scan_inbox``), so both count the same files. Lists the inbox alone."""
    waiting = scan_inbox(inbox)
    return len(waiting), regular_bytes(waiting)


def inbox_backlog(inbox: Path) -> int:
    """How many entries wait in the inbox folder (see ``inbox_waiting``)."""
    return inbox_waiting(inbox)[0]


def inbox_backlog_age(inbox: Path) -> float:
    """Seconds the oldest entry waiting in the inbox has been there, 0 when none waits.

    Its ctime says when it came: a rename or a hard link into the inbox sets it, and so does
    every write, so a file still being written is young. Lists the inbox alone."""
    oldest: float | None = None
    try:
        entries = list(os.scandir(inbox))
    except FileNotFoundError:
        return 0.0
    for entry in entries:
        if not is_inbox_file(Path(entry.path), inbox):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if is_candidate(st.st_mode) and (oldest is None or st.st_ctime < oldest):
            oldest = st.st_ctime
    return 0.0 if oldest is None else max(0.0, time.time() - oldest)


def held_files(cursor: duckdb.DuckDBPyConnection) -> int:
    """Files held back whole (too many rows refused, ``max_reject_share``) until released."""
    row = cursor.execute(_HELD_FILES).fetchone()
    return 0 if row is None else int(row[0])


def last_file_finished(cursor: duckdb.DuckDBPyConnection) -> float | None:
    """When the newest file in the ledger finished (epoch seconds), None for an empty ledger."""
    row = cursor.execute(_LAST_FILE_EPOCH_MS).fetchone()
    if row is None or row[0] is None:
        return None
    return float(row[0]) / 1000.0


def seconds_since(epoch: float | None) -> float | None:
    return None if epoch is None else max(0.0, time.time() - epoch)


def seconds_since_last_file(cursor: duckdb.DuckDBPyConnection) -> float | None:
    """Age of the newest finished file in the ledger, None when the ledger is empty."""
    return seconds_since(last_file_finished(cursor))


def _disk_percent(path: Path) -> float:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return float(psutil.disk_usage(str(probe)).percent)


def read_health(
    config: Config, last_finished: float | None, backlog: tuple[int, int] | None = None
) -> HealthReading:
    """All readings; ``last_finished`` is last_file_finished() of the ledger (epoch seconds),
    ``backlog`` the (files, bytes) waiting (default: read from the inbox folder)."""
    process = _self()
    files, size = inbox_waiting(config.inbox) if backlog is None else backlog
    return HealthReading(
        cpu_usage_percent=float(psutil.cpu_percent(interval=None)),
        num_cores=psutil.cpu_count() or 1,
        memory_usage_percent=float(psutil.virtual_memory().percent),
        disk_usage_percent=_disk_percent(config.warehouse),
        process_rss_bytes=int(process.memory_info().rss),
        process_cpu_percent=process_cpu_percent(),
        uptime_seconds=max(0.0, time.time() - float(process.create_time())),
        inbox_backlog=files,
        inbox_backlog_bytes=size,
        seconds_since_last_file=seconds_since(last_finished),
    )
