"""Inbox events -> an arrival-ordered queue of files ready to ingest.

inotify via watchdog 7.1 tells us how a file arrived: written in place (Created, Opened,
Modified..., Closed), renamed inside the inbox (Moved), or moved in from elsewhere on the same
file system (Moved with no source: the observer reports unpaired moves as such). The watcher only
turns events into "look at this path"; when a file may be taken is readiness.py's rule, and bytes
written into a file after it was taken are tail.py's. The watch is on the inbox alone, never on
done/ or failed/. The startup scan and a periodic rescan (inotify drops events when its kernel
queue overflows) find the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CLOSED_NO_WRITE,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_OPENED,
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
from watchdog.observers.api import BaseObserver

from moneylion.readiness import Arrival, Rules, Watch

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


def regular_bytes(paths: list[Path]) -> int:
    """The bytes of those of ``paths`` that are regular files now (links are not followed:
    their size is not the inbox's; a path gone meanwhile counts nothing)."""
    size = 0
    for path in paths:
        with contextlib.suppress(OSError):
            found = os.lstat(path)
            if stat.S_ISREG(found.st_mode):
                size += found.st_size
    return size


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


@dataclass
class _Entry:
    path: Path
    watch: Watch
    first_seen: float = 0.0  # monotonic time of its first event: its place in the order
    not_before: float = 0.0  # monotonic time before which a retry must not start
    attempts: int = 0
    pending: int = -1  # a tailed file's bytes not loaded yet (-1: an inbox file, sized by lstat)


@dataclass(frozen=True)
class TakenFile:
    """A file handed to the worker; ``attempts`` counts earlier tries that hit an error."""

    path: Path
    attempts: int
    size: int = 0  # bytes when it was taken (0 for what is not a regular file)
    renamed: bool = False  # it came by a rename: complete, its last record included
    tail: bool = False  # bytes written into a taken file after it was taken (tail.py)
    closed: bool = False  # its writer's close was seen
    held: bool = False  # a writer held it open past writer_timeout (its last record may be cut)


@dataclass(frozen=True)
class BatchLimits:
    """How much one batch may take: files, bytes, and the size from which a file goes alone
    (through the single-file fast paths)."""

    files: int = 1000
    bytes: int = 64 * 1024 * 1024
    alone_bytes: int = 1024 * 1024


ONE_FILE = BatchLimits(files=1)


class InboxQueue:
    """Files waiting to be ingested, in arrival order, each at most once (queued or in progress).

    The observer thread reports events; the single worker thread ``take_batch``es the files at
    the head of the queue that are ready (readiness.py), in order, and ``finish``es each. A file
    that is not ready yet holds back the files that arrived after it, for at most ``order_wait``
    seconds from its first event (a file still settling, or still being written); after that
    they pass it. A file backing off after an error holds nothing back. Events for a file in
    progress are kept: the worker decides, by the file's identity, whether it may still be
    moved (``settle_taken``). Tailed files (tail.py) queue their new bytes here too, so that
    they take their turn with everything else.
    """

    def __init__(
        self,
        settle_seconds: float,
        *,
        writing_timeout: float = 60.0,
        empty_file_seconds: float = 60.0,
        order_wait: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rules = Rules(settle_seconds, writing_timeout, empty_file_seconds)
        self.order_wait = order_wait
        self._clock = clock
        self._entries: dict[Path, _Entry] = {}  # insertion order = arrival order
        self._open_handles: dict[Path, int] = {}  # Opened minus Closed events, per file
        self._given_up: dict[Path, tuple[int, int]] = {}  # path -> (inode, mtime_ns) left alone
        # Files handed to the worker -> how they changed meanwhile (None: they did not).
        self._in_progress: dict[Path, Arrival | None] = {}
        self._closed = False
        self._cond = threading.Condition()

    # -- events (observer thread) -------------------------------------------------------------

    def file_complete(self, path: Path) -> None:
        """Closed after writing: ready now."""
        self._closed_handle(path)
        self._note(path, Arrival.COMPLETE)

    def file_renamed(self, path: Path) -> None:
        """Renamed into place (within the inbox, or moved in): complete, its last record too."""
        self._note(path, Arrival.COMPLETE, renamed=True)

    def file_created(self, path: Path) -> None:
        """A bare Created: the start of an in-place write, or a link or pipe made in place."""
        self._note(path, Arrival.SETTLING)

    def file_modified(self, path: Path) -> None:
        """Bytes were written: while a writer holds the file open, wait for its Closed; with no
        handle open (a truncate by path, a write through a map), wait until it is quiet."""
        with self._cond:
            writing = self._open_handles.get(path, 0) > 0
        self._note(path, Arrival.WRITING if writing else Arrival.SETTLING)

    def file_opened(self, path: Path) -> None:
        """Somebody opened the file (to write, or to read). A queued file not known complete
        waits for the close: ``cp`` reports nothing between its open and its final close."""
        with self._cond:
            self._open_handles[path] = self._open_handles.get(path, 0) + 1
            entry = self._entries.get(path)
            if entry is not None and entry.watch.arrival is Arrival.SETTLING:
                entry.watch.event(Arrival.WRITING, self._clock())

    def file_closed_unwritten(self, path: Path) -> None:
        """A handle that wrote nothing was closed."""
        self._closed_handle(path)

    def _closed_handle(self, path: Path) -> None:
        """One handle fewer; with none left nobody can be writing: a file waiting for its
        writer's Closed (it may have been a reader's handle) is settled instead."""
        with self._cond:
            left = self._open_handles.pop(path, 0) - 1
            if left > 0:
                self._open_handles[path] = left
                return
            if self._in_progress.get(path) is Arrival.WRITING:
                self._in_progress[path] = Arrival.SETTLING
            entry = self._entries.get(path)
            if entry is not None and entry.watch.arrival is Arrival.WRITING:
                entry.watch.arrival = Arrival.SETTLING
                entry.watch.since = self._clock()
                self._cond.notify_all()

    def file_found(self, path: Path) -> None:
        """Found by a scan: queue it (settling) unless it is already known or was given up."""
        with self._cond:
            if self._closed or path in self._entries or path in self._in_progress:
                return
            if path in self._given_up and not self._changed_since_given_up(path):
                return
            now = self._clock()
            self._entries[path] = _Entry(path, Watch(Arrival.SETTLING, now), now)
            self._cond.notify_all()

    def file_continues(self, path: Path, pending: int) -> bool:
        """A tailed file (tail.py) has ``pending`` new bytes ready: queue them at the back.
        False if they cannot be queued now (a part of it is in progress, or the queue closed)."""
        with self._cond:
            if self._closed or path in self._in_progress:
                return False  # the tail looks again once the part in progress is done
            entry = self._entries.get(path)
            if entry is not None:
                entry.pending = pending
                return True
            now = self._clock()
            self._entries[path] = _Entry(path, Watch(Arrival.COMPLETE, now), now, pending=pending)
            self._cond.notify_all()
            return True

    def file_gone(self, path: Path) -> None:
        """Deleted or renamed away: forget it."""
        with self._cond:
            entry = self._entries.get(path)
            if entry is None or entry.pending < 0:
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

    def _note(self, path: Path, arrival: Arrival, *, renamed: bool = False) -> None:
        with self._cond:
            if self._closed:
                return
            now = self._clock()
            if path in self._in_progress:
                self._in_progress[path] = arrival
                return
            entry = self._entries.get(path)
            if entry is None or entry.pending >= 0:
                self._entries[path] = _Entry(path, Watch(arrival, now, renamed), now)
            else:
                entry.watch.event(arrival, now)
                entry.watch.renamed = entry.watch.renamed or renamed
            self._cond.notify_all()

    # -- the worker ---------------------------------------------------------------------------

    def take(self, timeout: float | None = None) -> TakenFile | None:
        """The oldest ready file, marked in progress; None on timeout or once closed."""
        batch = self.take_batch(ONE_FILE, timeout)
        return batch[0] if batch else None

    def take_batch(self, limits: BatchLimits, timeout: float | None = None) -> list[TakenFile]:
        """The ready files at the head of the queue, in arrival order, within ``limits``,
        marked in progress; [] on timeout or once closed."""
        deadline = None if timeout is None else self._clock() + timeout
        with self._cond:
            while not self._closed:
                now = self._clock()
                taken, wake = self._pick_batch(now, limits)
                if taken:
                    for item in taken:
                        del self._entries[item.path]
                        self._in_progress[item.path] = None
                    return taken
                if deadline is not None:
                    if now >= deadline:
                        return []
                    wake = min(wake, deadline) if wake is not None else deadline
                self._cond.wait(None if wake is None else max(wake - now, 0.001))
            return []

    def _pick_batch(self, now: float, limits: BatchLimits) -> tuple[list[TakenFile], float | None]:
        """The ready files from the head on, or the monotonic time at which to look again."""
        wake: float | None = None
        vanished: list[Path] = []
        chosen: list[TakenFile] = []
        total = 0
        for entry in self._entries.values():
            at, size = self._ready_at(entry, now)
            if at is None:
                vanished.append(entry.path)
                continue
            if at > now:
                wake = at if wake is None else min(wake, at)
                if entry.not_before > now:
                    continue  # backing off after an error: holds nothing back
                holds_until = entry.first_seen + self.order_wait
                if now < holds_until:  # it came first: the ones behind it wait for it
                    wake = min(wake, holds_until)
                    break
                continue  # it held the others back long enough: they pass it
            alone = size > limits.alone_bytes
            if chosen and (alone or len(chosen) >= limits.files or total + size > limits.bytes):
                break
            watch = entry.watch
            chosen.append(
                TakenFile(
                    entry.path,
                    entry.attempts,
                    size,
                    renamed=watch.renamed,
                    tail=entry.pending >= 0,
                    closed=watch.arrival is Arrival.COMPLETE and not watch.renamed,
                    held=watch.held,
                )
            )
            total += size
            if alone or len(chosen) >= limits.files:
                break
        for path in vanished:
            log.info("file_vanished", extra={"fields": {"file": path.name, "stage": "queued"}})
            del self._entries[path]
        return chosen, wake

    def _ready_at(self, entry: _Entry, now: float) -> tuple[float | None, int]:
        """(when ``entry`` may be taken (monotonic), its size); (None, 0) if its file is gone."""
        if entry.pending >= 0:  # a tailed file's new bytes: the tail found them ready
            return entry.not_before, entry.pending
        try:
            found = os.lstat(entry.path)  # never follows a link
        except FileNotFoundError:
            # A complete file that vanished is still handed over: the worker records that.
            complete = entry.watch.arrival is Arrival.COMPLETE
            return (entry.not_before, 0) if complete else (None, 0)
        writing = entry.watch.arrival is Arrival.WRITING
        at = entry.watch.ready_at(self.rules, now, found)
        if writing and entry.watch.arrival is not Arrival.WRITING:
            log.warning(
                "file_close_not_seen",
                extra={"fields": {"file": entry.path.name, "seconds": self.rules.writer_timeout}},
            )
            at = entry.watch.ready_at(self.rules, now, found)
        size = found.st_size if stat.S_ISREG(found.st_mode) else 0
        return max(at, entry.not_before), size

    def finish(self, path: Path, then: Callable[[], None] | None = None) -> bool:
        """End the work on ``path``. If it changed meanwhile, queue it again and return False;
        otherwise run ``then`` (moving the file away) before any new event is taken in."""
        with self._cond:
            changed = self._in_progress.pop(path, None)
            if changed is not None and not self._closed:
                self._requeue(path, changed)
                return False
            if then is not None:
                then()
            return True

    def settle_taken(self, path: Path, settle: Callable[[Arrival | None], bool]) -> bool:
        """End the work on ``path`` by ``settle`` (given what events said of the file while it
        was in progress, None: nothing), run before any new event is taken in: it moves the file
        out and returns True, or leaves it (replaced or rewritten meanwhile) and returns False;
        then the file is queued again, to be taken as a new file."""
        with self._cond:
            changed = self._in_progress.pop(path, None)
            moved = settle(changed)
            if not moved and not self._closed:
                self._requeue(path, changed or Arrival.SETTLING)
            return moved

    def _requeue(self, path: Path, arrival: Arrival) -> None:
        now = self._clock()
        self._entries[path] = _Entry(path, Watch(arrival, now), now)
        self._cond.notify_all()

    def retry(self, path: Path, attempts: int, delay: float) -> None:
        """Queue ``path`` again (at the back) after an environment error, not before ``delay``."""
        with self._cond:
            self._in_progress.pop(path, None)
            if self._closed:
                return
            now = self._clock()
            self._entries.pop(path, None)
            self._entries[path] = _Entry(
                path,
                Watch(Arrival.COMPLETE, now),
                now,
                not_before=now + delay,
                attempts=attempts,
            )
            self._cond.notify_all()

    def untake(self, taken: list[TakenFile]) -> None:
        """Put files handed over but not worked on back at the head of the queue, in order."""
        with self._cond:
            now = self._clock()
            head: dict[Path, _Entry] = {}
            for item in taken:
                changed = self._in_progress.pop(item.path, None)
                watch = Watch(changed or Arrival.COMPLETE, now, item.renamed, held=item.held)
                head[item.path] = _Entry(item.path, watch, 0.0, attempts=item.attempts, pending=-1)
                if item.tail:
                    head[item.path].pending = item.size
            if not self._closed:
                head.update((p, e) for p, e in self._entries.items() if p not in head)
                self._entries = head
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
            return len(self._entries) + len(self._in_progress)

    def queued(self) -> list[Path]:
        """The queued files in arrival order (not the ones in progress)."""
        with self._cond:
            return list(self._entries)

    def backlog(self) -> tuple[int, int]:
        """(files, bytes) waiting: queued or in progress (bytes of the regular files; of a
        tailed file's queued part, its new bytes)."""
        with self._cond:
            pending = sum(e.pending for e in self._entries.values() if e.pending >= 0)
            paths = [p for p, e in self._entries.items() if e.pending < 0]
            paths += self._in_progress
            files = len(self._entries) + len(self._in_progress)
        return files, regular_bytes(paths) + pending


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

    def on_any_event(self, event: FileSystemEvent) -> None:
        """Every event but a move: the queue's call for its type, for a file in the inbox."""
        call = _QUEUE_CALLS.get(event.event_type)
        path = None if call is None or event.is_directory else self._candidate(event.src_path)
        if call is not None and path is not None:
            call(self.queue, path)

    def on_moved(self, event: FileSystemEvent) -> None:
        """A rename within the inbox, or (one side empty) a move in from elsewhere or out."""
        if event.is_directory:
            return
        source = self._candidate(event.src_path)
        if source is not None:
            self.queue.file_gone(source)
        dest = self._candidate(event.dest_path)
        if dest is not None:  # a rename is atomic: what arrives by one is complete
            self.queue.file_renamed(dest)


# What each watchdog event of an inbox file (but a move, see on_moved) tells the queue.
_QUEUE_CALLS: dict[str, Callable[[InboxQueue, Path], None]] = {
    EVENT_TYPE_CREATED: InboxQueue.file_created,
    EVENT_TYPE_MODIFIED: InboxQueue.file_modified,
    EVENT_TYPE_CLOSED: InboxQueue.file_complete,
    EVENT_TYPE_DELETED: InboxQueue.file_gone,
    EVENT_TYPE_OPENED: InboxQueue.file_opened,
    EVENT_TYPE_CLOSED_NO_WRITE: InboxQueue.file_closed_unwritten,
}


def _observer() -> BaseObserver:
    """inotify with unpaired moves reported as moves (a file moved in from elsewhere is
    complete, not a bare Created to settle); the platform's default observer elsewhere."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # not Linux
        return Observer()
    return InotifyObserver(generate_full_events=True)


class InboxWatcher:
    """The observer on the inbox, the startup scan and a periodic rescan, feeding ``queue``."""

    def __init__(self, inbox: Path, queue: InboxQueue, *, rescan_seconds: float = 10.0) -> None:
        self.inbox = inbox
        self.queue = queue
        self.rescan_seconds = rescan_seconds
        self._observer: BaseObserver | None = None
        self._stop = threading.Event()
        self._rescanner: threading.Thread | None = None

    def start(self) -> int:
        """Watch, then scan for files that arrived while we were down; returns how many."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        observer = _observer()
        # The inbox alone: a recursive watch would walk done/ and failed/ at every start, and
        # they hold every file ever loaded. Files leave by link + unlink (inbox.py).
        observer.schedule(
            InboxEventHandler(self.inbox, self.queue),
            str(self.inbox),
            recursive=False,
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
