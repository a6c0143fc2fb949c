"""Inbox events -> an arrival-ordered queue of files ready to ingest.

inotify via watchdog 7.1 tells us how a file arrived: written in place (Created, Modified...,
Closed), renamed inside the inbox (Moved), or moved in from elsewhere (only Created). A Closed or
Moved file is complete; a bare Created one is taken once it has stopped changing (settle), and one
that is still being written (Modified without Closed) waits for its Closed. The startup scan and a
periodic rescan (inotify drops events when its kernel queue overflows) find the rest.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileClosedNoWriteEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (".tmp", ".part")

# Opened and ClosedNoWrite only count the handles open on a file: a Modified with none open (a
# truncate(2) by path, say) is settled like a bare Created instead of waiting for a Closed.
WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    FileOpenedEvent,
    FileClosedNoWriteEvent,
]


def is_inbox_file(path: Path, inbox: Path) -> bool:
    """A file directly in the inbox that may be ingested (not hidden, not a temp, not in done/)."""
    name = path.name
    return (
        path.parent == inbox
        and not name.startswith(".")
        and not name.lower().endswith(IGNORED_SUFFIXES)
    )


def is_candidate(mode: int) -> bool:
    """Whether an inbox entry (its ``lstat`` mode) is handed to the worker: everything but a
    directory. One rule for the events and the scans; the worker reads regular files only and
    refuses the rest (links, pipes, sockets, devices) unread."""
    return not stat.S_ISDIR(mode)


def scan_inbox(inbox: Path) -> list[Path]:
    """The entries waiting in the inbox, oldest first (mtime, then name): the arrival order.

    Lists the inbox itself only, never ``done/`` or ``failed/``.
    """
    found: list[tuple[int, str, Path]] = []
    try:
        entries = list(os.scandir(inbox))
    except FileNotFoundError:
        return []
    for entry in entries:
        path = Path(entry.path)
        if not is_inbox_file(path, inbox):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if is_candidate(st.st_mode):
            found.append((st.st_mtime_ns, entry.name, path))
    return [path for _, _, path in sorted(found)]


class Arrival(Enum):
    """What we know about a queued file's writer."""

    COMPLETE = "complete"  # Closed or Moved in: take it
    SETTLING = "settling"  # bare Created or found by a scan: take it once it stops changing
    WRITING = "writing"  # Modified and not yet Closed: wait for the Closed


@dataclass
class _Entry:
    path: Path
    arrival: Arrival
    since: float  # monotonic time of the last event or observed change
    not_before: float = 0.0  # monotonic time before which a retry must not start
    attempts: int = 0


@dataclass(frozen=True)
class TakenFile:
    """A file handed to the worker; ``attempts`` counts earlier tries that hit an error."""

    path: Path
    attempts: int


class InboxQueue:
    """Files waiting to be ingested, in arrival order, each at most once (queued or in progress).

    The observer thread reports events; the single worker thread ``take``s the oldest file that
    is ready and ``finish``es it. An event for a file in progress means it changed under us: the
    file is queued again instead of being moved away.
    """

    def __init__(
        self,
        settle_seconds: float,
        *,
        writing_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settle_seconds = settle_seconds
        self.writing_timeout = writing_timeout
        self._clock = clock
        self._entries: dict[Path, _Entry] = {}  # insertion order = arrival order
        self._open_handles: dict[Path, int] = {}  # Opened minus Closed events, per file
        self._given_up: dict[Path, tuple[int, int]] = {}  # path -> (inode, mtime_ns) left alone
        self._in_progress: Path | None = None
        self._changed_in_progress: Arrival | None = None
        self._closed = False
        self._cond = threading.Condition()

    # -- events (observer thread) -------------------------------------------------------------

    def file_complete(self, path: Path) -> None:
        """Closed after writing, or renamed into place: ready now."""
        self._closed_handle(path)
        self._note(path, Arrival.COMPLETE)

    def file_created(self, path: Path) -> None:
        """A bare Created: moved in from elsewhere, or the start of an in-place write."""
        self._note(path, Arrival.SETTLING)

    def file_modified(self, path: Path) -> None:
        """Bytes were written: while a writer holds the file open, wait for its Closed; with no
        handle open (a truncate by path, a write through a map), wait until it is quiet."""
        with self._cond:
            writing = self._open_handles.get(path, 0) > 0
        self._note(path, Arrival.WRITING if writing else Arrival.SETTLING)

    def file_opened(self, path: Path) -> None:
        """Somebody opened the file (to write, or to read: this process's own reads too)."""
        with self._cond:
            self._open_handles[path] = self._open_handles.get(path, 0) + 1

    def file_closed_unwritten(self, path: Path) -> None:
        """A handle that wrote nothing was closed."""
        self._closed_handle(path)

    def _closed_handle(self, path: Path) -> None:
        """One handle fewer; with none left nobody can be writing: a file waiting for its
        writer's Closed (it may have been this process's own read) is settled instead."""
        with self._cond:
            left = self._open_handles.pop(path, 0) - 1
            if left > 0:
                self._open_handles[path] = left
                return
            if path == self._in_progress and self._changed_in_progress is Arrival.WRITING:
                self._changed_in_progress = Arrival.SETTLING
            entry = self._entries.get(path)
            if entry is not None and entry.arrival is Arrival.WRITING:
                entry.arrival = Arrival.SETTLING
                entry.since = self._clock()
                self._cond.notify_all()

    def file_found(self, path: Path) -> None:
        """Found by a scan: queue it (settling) unless it is already known or was given up."""
        with self._cond:
            if self._closed or path in self._entries or path == self._in_progress:
                return
            if path in self._given_up and not self._changed_since_given_up(path):
                return
            self._entries[path] = _Entry(path, Arrival.SETTLING, self._clock())
            self._cond.notify_all()

    def file_gone(self, path: Path) -> None:
        """Deleted or renamed away: forget it."""
        with self._cond:
            self._entries.pop(path, None)
            self._open_handles.pop(path, None)
            self._given_up.pop(path, None)

    def give_up(self, path: Path) -> None:
        """Leave ``path`` alone (it kept failing for reasons of the environment and could not
        be set aside either): scans skip it until it is replaced or changed."""
        with self._cond:
            try:
                st = os.lstat(path)
            except OSError:
                return
            self._given_up[path] = (st.st_ino, st.st_mtime_ns)

    def _changed_since_given_up(self, path: Path) -> bool:
        try:
            st = os.lstat(path)
        except OSError:
            self._given_up.pop(path, None)
            return False
        if self._given_up[path] == (st.st_ino, st.st_mtime_ns):
            return False
        del self._given_up[path]
        return True

    @property
    def given_up(self) -> int:
        """How many inbox files are left alone (shown in /metrics)."""
        with self._cond:
            return len(self._given_up)

    def _note(self, path: Path, arrival: Arrival) -> None:
        with self._cond:
            if self._closed:
                return
            now = self._clock()
            if path == self._in_progress:
                self._changed_in_progress = arrival
                return
            entry = self._entries.get(path)
            if entry is None:
                self._entries[path] = _Entry(path, arrival, now)
            elif arrival is Arrival.SETTLING and entry.arrival is not Arrival.SETTLING:
                # A late Created never downgrades what a Closed or Modified already told us.
                entry.since = now
            else:
                entry.arrival = arrival
                entry.since = now
            self._cond.notify_all()

    # -- the worker ---------------------------------------------------------------------------

    def take(self, timeout: float | None = None) -> TakenFile | None:
        """The oldest ready file, marked in progress; None on timeout or once closed."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while not self._closed:
                now = self._clock()
                taken, wake = self._pick_ready(now)
                if taken is not None:
                    del self._entries[taken.path]
                    self._in_progress = taken.path
                    self._changed_in_progress = None
                    return TakenFile(taken.path, taken.attempts)
                if deadline is not None:
                    if now >= deadline:
                        return None
                    wake = min(wake, deadline) if wake is not None else deadline
                self._cond.wait(None if wake is None else max(wake - now, 0.001))
            return None

    def _pick_ready(self, now: float) -> tuple[_Entry | None, float | None]:
        """The first ready entry, or the monotonic time at which one may become ready."""
        wake: float | None = None
        vanished: list[Path] = []
        chosen: _Entry | None = None
        for entry in self._entries.values():
            at = self._ready_at(entry, now)
            if at is None:
                vanished.append(entry.path)
            elif at <= now:
                chosen = entry
                break
            else:
                wake = at if wake is None else min(wake, at)
        for path in vanished:
            log.info("file_vanished", extra={"fields": {"file": path.name, "stage": "queued"}})
            del self._entries[path]
        return chosen, wake

    def _ready_at(self, entry: _Entry, now: float) -> float | None:
        """When ``entry`` may be taken (monotonic), or None if its file is gone."""
        if entry.arrival is Arrival.WRITING:
            if now - entry.since < self.writing_timeout:
                return max(entry.not_before, entry.since + self.writing_timeout)
            # No Closed for a long time (a lost event?): fall back to the settle rule.
            log.warning(
                "file_close_not_seen",
                extra={"fields": {"file": entry.path.name, "seconds": self.writing_timeout}},
            )
            entry.arrival = Arrival.SETTLING
            entry.since = now
        if entry.arrival is Arrival.COMPLETE:
            return entry.not_before
        try:
            found = os.lstat(entry.path)  # never follows a link
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(found.st_mode):  # nothing to wait for: refused unread
            return entry.not_before
        # Settled = no write for settle_seconds (every write moves the mtime). An empty file
        # may be a writer that opened and has not written yet: watch it for settle_seconds too.
        quiet_for = time.time() - found.st_mtime_ns / 1e9
        ready = now + max(self.settle_seconds - quiet_for, 0.0)
        if found.st_size == 0:
            ready = max(ready, entry.since + self.settle_seconds)
        return max(ready, entry.not_before)

    def finish(self, path: Path, then: Callable[[], None] | None = None) -> bool:
        """End the work on ``path``. If it changed meanwhile, queue it again and return False;
        otherwise run ``then`` (moving the file away) before any new event is taken in."""
        with self._cond:
            if self._in_progress == path:
                self._in_progress = None
            changed = self._changed_in_progress
            self._changed_in_progress = None
            if changed is not None and not self._closed:
                self._entries[path] = _Entry(path, changed, self._clock())
                self._cond.notify_all()
                return False
            if then is not None:
                then()
            return True

    def retry(self, path: Path, attempts: int, delay: float) -> None:
        """Queue ``path`` again (at the back) after an environment error, not before ``delay``."""
        with self._cond:
            if self._in_progress == path:
                self._in_progress = None
            self._changed_in_progress = None
            if self._closed:
                return
            now = self._clock()
            self._entries.pop(path, None)
            self._entries[path] = _Entry(
                path, Arrival.COMPLETE, now, not_before=now + delay, attempts=attempts
            )
            self._cond.notify_all()

    def close(self) -> None:
        """Stop handing out files; ``take`` returns None from now on."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        """Files queued or in progress."""
        with self._cond:
            return len(self._entries) + (self._in_progress is not None)

    def queued(self) -> list[Path]:
        """The queued files in arrival order (not the one in progress)."""
        with self._cond:
            return list(self._entries)

    def waiting(self) -> int:
        """How many files are queued (not counting the one in progress)."""
        with self._cond:
            return len(self._entries)


class InboxEventHandler(FileSystemEventHandler):
    """Translates watchdog events on the inbox into ``InboxQueue`` calls."""

    def __init__(self, inbox: Path, queue: InboxQueue) -> None:
        self.inbox = inbox
        self.queue = queue

    def _candidate(self, raw: bytes | str) -> Path | None:
        if not raw:
            return None
        path = Path(os.fsdecode(raw))
        return path if is_inbox_file(path, self.inbox) else None

    def on_created(self, event: FileSystemEvent) -> None:
        path = None if event.is_directory else self._candidate(event.src_path)
        if path is not None:
            self.queue.file_created(path)

    def on_modified(self, event: FileSystemEvent) -> None:
        path = None if event.is_directory else self._candidate(event.src_path)
        if path is not None:
            self.queue.file_modified(path)

    def on_closed(self, event: FileSystemEvent) -> None:
        path = None if event.is_directory else self._candidate(event.src_path)
        if path is not None:
            self.queue.file_complete(path)

    def on_moved(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        source = self._candidate(event.src_path)
        if source is not None:
            self.queue.file_gone(source)
        dest = self._candidate(event.dest_path)
        if dest is not None:
            self.queue.file_complete(dest)

    def on_deleted(self, event: FileSystemEvent) -> None:
        path = None if event.is_directory else self._candidate(event.src_path)
        if path is not None:
            self.queue.file_gone(path)

    def on_opened(self, event: FileSystemEvent) -> None:
        path = None if event.is_directory else self._candidate(event.src_path)
        if path is not None:
            self.queue.file_opened(path)

    def on_closed_no_write(self, event: FileSystemEvent) -> None:
        path = None if event.is_directory else self._candidate(event.src_path)
        if path is not None:
            self.queue.file_closed_unwritten(path)


class InboxWatcher:
    """The observer on the inbox, the startup scan and a periodic rescan, feeding ``queue``."""

    def __init__(self, inbox: Path, queue: InboxQueue, *, rescan_seconds: float = 10.0) -> None:
        self.inbox = inbox
        self.queue = queue
        self.rescan_seconds = rescan_seconds
        self._observer: Observer | None = None  # type: ignore[valid-type]
        self._stop = threading.Event()
        self._rescanner: threading.Thread | None = None

    def start(self) -> int:
        """Watch, then scan for files that arrived while we were down; returns how many."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        observer = Observer()
        # Recursive, so that our own moves into done/ and failed/ pair up at once: an unpaired
        # IN_MOVED_FROM is held 0.5 s by watchdog and delays every event queued behind it.
        observer.schedule(
            InboxEventHandler(self.inbox, self.queue),
            str(self.inbox),
            recursive=True,
            event_filter=WATCHED_EVENTS,
        )
        observer.daemon = True
        observer.start()
        self._observer = observer
        found = self.scan()
        self._rescanner = threading.Thread(
            target=self._rescan_loop, name="inbox-rescan", daemon=True
        )
        self._rescanner.start()
        log.info("watch_started", extra={"fields": {"inbox": str(self.inbox), "backlog": found}})
        return found

    def scan(self) -> int:
        """Queue every waiting file not yet known; returns how many files are waiting."""
        waiting = scan_inbox(self.inbox)
        for path in waiting:
            self.queue.file_found(path)
        return len(waiting)

    def _rescan_loop(self) -> None:
        while not self._stop.wait(self.rescan_seconds):
            try:
                self.scan()
            except OSError as exc:
                log.warning("rescan_failed", extra={"fields": {"error": str(exc)}})

    @property
    def running(self) -> bool:
        observer = self._observer
        return observer is not None and observer.is_alive() and not self._stop.is_set()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        observer, self._observer = self._observer, None
        if observer is not None:
            observer.stop()
            observer.join(timeout)
        if self._rescanner is not None:
            self._rescanner.join(timeout)
        log.info("watch_stopped", extra={"fields": {"inbox": str(self.inbox)}})
