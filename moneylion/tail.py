"""Taken files, tailed by inode: no byte a producer writes into a file after it was taken is lost.

A file is taken once it looks complete (readiness.py), but a producer may not be done with it: a
writer that paused, an event log appended with ``>>`` again and again, a write through another
hard link. Moving a file keeps its inode, so whatever is written into it later -- in the inbox,
or in ``done/`` after the move -- is still in that inode. Each loaded file is therefore watched
by (dev, inode) for ``continuation_seconds`` after it last changed: the complete records past the
byte offset already loaded are read with the file's header and ingested as the file's next
*part*, in arrival order with every other file, in the same micro-batches. A record is complete
at a line break outside quotes; a trailing record without its line break waits for the next
append, or is taken as the last record once the file has been quiet for ``settle_seconds``
(unless it ends inside quotes, or a writer held the file open past ``writer_timeout_seconds``:
it may be cut mid-field; then it waits until the tail ends, quiet for ``continuation_seconds``).

A producer that reopens the path after the move (``>>`` creates a new, headerless file in the
inbox) continues the file of that name taken within ``continuation_seconds``: its bytes are
appended to the file in ``done/`` (which so holds everything the producer wrote, as it wrote it)
and loaded from there.

Every part has its own ledger row (its rows, rejects and aggregate deltas commit together, like
any file's), ``file_parts`` says which file and which bytes it is, and its sha256 is that of the
file's bytes from offset 0 through the part's end: the last part's is the whole file's, so the
same bytes dropped again are still a duplicate of the whole. A restart finds the files committed
within ``continuation_seconds`` from the ledger and goes on tailing them; the loaded prefix is
hashed again (once) only when a file has grown, to check it is the file that was loaded.

How often: files that changed within ``HOT_SECONDS`` are looked at every ``HOT_POLL_SECONDS``,
the others every ``rescan_seconds`` (writes into a moved file raise no event in the inbox).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import mmap
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from moneylion.inbox import candidate_names, day_folder
from moneylion.source import (
    CHUNK_BYTES,
    MEMORY_BYTES,
    Part,
    StagedFile,
    compression_suffix,
    header_bytes,
    private_name,
    records_end,
    write_all,
)

log = logging.getLogger(__name__)

HOT_SECONDS = 5.0  # a file taken or changed this recently is looked at often
HOT_POLL_SECONDS = 0.1
MAX_PART_ATTEMPTS = 5  # failed tries of one part (errors of the environment) before giving up
# A headerless inbox file being appended to the file it continues is renamed to this prefix and
# its name first (hidden: the watcher ignores it); one left by a stop is put back at start.
CONTINUING_PREFIX = ".continuing-"


@dataclass(slots=True)
class Tail:
    """One taken file being tailed."""

    first_file_id: int  # the ledger row of its first part
    name: str  # its name in the inbox (the ledger's)
    path: Path  # where it is now: the inbox, then done/<day>/
    dev: int
    ino: int
    loaded: int  # bytes [0, loaded) are loaded
    parts: int
    sha256: str  # of bytes [0, loaded)
    changed_at: float  # monotonic time it was registered or last seen to change
    size: int = -1  # at the last look
    mtime_ns: int = 0
    digest: Any = None  # running sha256 of [0, loaded); None: to be made from the file once
    lines: int = 0  # line breaks in [0, loaded), known with the digest
    header: bytes = b""  # the header's bytes, line break included, known with the digest
    queued: bool = False  # its new bytes are queued or being loaded
    waiting: tuple[int, bool] = (-1, False)  # (size, quiet) when nothing was complete
    errors: int = 0  # failed tries of its current part
    held: bool = False  # a writer held it open: a last record without line break may be cut
    finishing: bool = False  # quiet for continuation_seconds: what is left loads as is
    not_before: float = 0.0  # monotonic time before which it is not tried again


class Tails:
    """The files being tailed, by (dev, inode) and by name.

    The worker thread registers files after their move, reads their new bytes as parts and
    records each part's commit; the tailer thread looks at the files and queues what is ready.
    """

    def __init__(
        self,
        *,
        settle_seconds: float,
        continuation_seconds: float,
        rescan_seconds: float,
        staging: Path,
        enqueue: Callable[[Path, int], bool],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settle = settle_seconds
        self.keep = continuation_seconds
        self.rescan = rescan_seconds
        self.staging = staging
        self.enqueue = enqueue
        self._clock = clock
        self._by_inode: dict[tuple[int, int], Tail] = {}
        self._by_path: dict[Path, Tail] = {}
        self._by_name: dict[str, Tail] = {}
        self._hot: dict[tuple[int, int], Tail] = {}  # looked at every HOT_POLL_SECONDS
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._swept = 0.0

    # -- registering (worker thread) --------------------------------------------------------

    def register(
        self, staged: StagedFile, file_id: int, path: Path, *, renamed: bool, held: bool
    ) -> None:
        """A new file was loaded from ``staged`` (ledger row ``file_id``) and is now at ``path``:
        tail it. Compressed files are not tailed (an appended archive member is not records).
        A file renamed in was handed over whole: it is looked at with the rescan only, until it
        is seen to change."""
        if self.keep <= 0 or compression_suffix(staged.name) or staged.seen is None:
            return
        dev, ino = staged.seen[0], staged.seen[1]
        tail = Tail(
            file_id, staged.name, path, dev, ino, staged.size, 1, staged.sha256, self._clock()
        )
        tail.held = held
        self._add(tail, hot=not renamed)

    def _add(self, tail: Tail, *, hot: bool) -> None:
        with self._lock:
            old = self._by_inode.pop((tail.dev, tail.ino), None)
            if old is not None:
                self._by_path.pop(old.path, None)
            self._by_inode[(tail.dev, tail.ino)] = tail
            self._by_path[tail.path] = tail
            self._by_name[tail.name] = tail
        if hot:
            self._heat(tail)

    def _heat(self, tail: Tail) -> None:
        """Look at ``tail`` often from now on (for HOT_SECONDS after its last change)."""
        with self._lock:
            was_cold = not self._hot
            self._hot[(tail.dev, tail.ino)] = tail
        if was_cold:
            self._wake.set()

    def of_path(self, path: Path) -> Tail | None:
        with self._lock:
            return self._by_path.get(path)

    def recent(self, name: str) -> Tail | None:
        """The file of this inbox name still tailed (taken within continuation_seconds)."""
        with self._lock:
            tail = self._by_name.get(name)
        return tail if tail is not None and not self._expired(tail, self._clock()) else None

    def _expired(self, tail: Tail, now: float) -> bool:
        return now - tail.changed_at > self.keep

    def adopt(self, tail: Tail, path: Path, inode: int) -> bool:
        """A headerless inbox file ``path`` (``inode``) of a tailed file's name (a producer
        reopened the path with ``>>`` after the move): its bytes go onto the end of the tailed
        file, where they load as its continuation, and it leaves the inbox. False if it is not
        that inode any more (then it is left, to be taken again).

        It is first renamed to a hidden name: a later ``>>`` creates a new file, and a writer
        that opened it before writes into the renamed one, which is copied until it stops
        growing (after the copy is on disk), then removed."""
        hidden = path.with_name(f"{CONTINUING_PREFIX}{path.name}")
        os.rename(path, hidden)
        try:
            source = os.open(hidden, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                if os.fstat(source).st_ino != inode:  # replaced meanwhile: put it back
                    _put_back(hidden, path)
                    return False
                copied = _append_growing(source, tail)
            finally:
                os.close(source)
        except FileNotFoundError:  # the tailed file is gone: not a continuation after all
            _put_back(hidden, path)
            self._drop(tail, "gone")
            return False
        os.unlink(hidden)
        log.info(
            "file_continued_by_name",
            extra={"fields": {"file": tail.name, "file_id": tail.first_file_id, "bytes": copied}},
        )
        self._look_at(tail, self._clock())
        return True

    # -- parts (worker thread) --------------------------------------------------------------

    def read_part(self, path: Path) -> StagedFile | None:
        """The new complete records of the tailed file at ``path`` as a part to ingest (the
        file's header, then those records), or None if there is nothing to load now."""
        tail = self.of_path(path)
        if tail is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            self._drop(tail, "gone")
            return None
        try:
            found = os.fstat(fd)
            if (found.st_dev, found.st_ino) != (tail.dev, tail.ino) or not stat.S_ISREG(
                found.st_mode
            ):
                self._drop(tail, "replaced")
                return None
            if found.st_size < tail.loaded:
                self._drop(tail, "truncated")
                return None
            if tail.digest is None and not self._known_prefix(fd, tail):
                return None
            quiet = time.time() - found.st_mtime_ns / 1e9 >= self.settle
            last = tail.finishing or (quiet and not tail.held)
            seen = (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)
            staged = self._part(
                fd, tail, found.st_size - tail.loaded, last=last, everything=tail.finishing
            )
        finally:
            os.close(fd)
        if staged is None:
            with self._lock:
                tail.waiting = (found.st_size, quiet)
            return None
        staged.origin, staged.seen = path, seen
        return staged

    def _part(
        self, fd: int, tail: Tail, pending: int, *, last: bool, everything: bool
    ) -> StagedFile | None:
        """The part holding the complete records of ``pending`` bytes from the offset loaded
        (``records_end``; with ``everything``, all of them): in memory when small, else a
        private copy."""
        digest = tail.digest.copy()
        if pending <= MEMORY_BYTES:
            data = _read_from(fd, tail.loaded, pending)
            end = len(data) if everything else records_end(data, last=last)
            chunk = memoryview(data)[:end]
            digest.update(chunk)
            lines = data.count(b"\n", 0, end)
            body: bytes | None = tail.header + chunk
            copy = None
        else:
            copy = private_name(self.staging)
            end, lines = _copy_records(
                fd,
                tail.loaded,
                pending,
                tail.header,
                copy,
                digest,
                last=last,
                everything=everything,
            )
            body = None
        if end == 0:
            if copy is not None:
                copy.unlink(missing_ok=True)
            return None
        part = Part(
            first_file_id=tail.first_file_id,
            number=tail.parts + 1,
            start=tail.loaded,
            end=tail.loaded + end,
            line_shift=tail.lines - tail.header.count(b"\n"),
            lines=lines,
            digest=digest,
        )
        return StagedFile(
            tail.name, tail.path, digest.hexdigest(), end, self.staging, body, copy, part=part
        )

    def _known_prefix(self, fd: int, tail: Tail) -> bool:
        """Hash the loaded prefix once (after a restart, or at the first continuation) and check
        it is the file that was loaded; learn its header and line count on the way."""
        digest = hashlib.sha256()
        lines = 0
        head = b""
        position = 0
        while position < tail.loaded:
            chunk = os.pread(fd, min(CHUNK_BYTES, tail.loaded - position), position)
            if not chunk:
                break
            digest.update(chunk)
            lines += chunk.count(b"\n")
            if len(head) < 65536:
                head += chunk[: 65536 - len(head)]
            position += len(chunk)
        if position != tail.loaded or digest.hexdigest() != tail.sha256:
            self._drop(tail, "rewritten")
            return False
        tail.digest, tail.lines, tail.header = digest, lines, header_bytes(head)
        return True

    def committed(self, staged: StagedFile, file_id: int | None) -> None:
        """A part of ``staged`` was committed (ledger row ``file_id``): its bytes are loaded."""
        part = staged.part
        assert part is not None
        tail = self.of_path(staged.origin)
        if tail is None or tail.loaded != part.start:
            return
        with self._lock:
            tail.loaded = part.end
            tail.parts = part.number
            tail.sha256 = staged.sha256
            tail.digest = part.digest
            tail.lines += part.lines
            tail.queued = False
            tail.waiting = (-1, False)
            tail.finishing = False
            tail.errors = 0
            tail.changed_at = self._clock()
        log.info(
            "file_part_loaded",
            extra={
                "fields": {
                    "file": tail.name,
                    "file_id": tail.first_file_id,
                    "part": part.number,
                    "part_file_id": file_id,
                    "bytes_loaded": part.end,
                }
            },
        )
        self._look_at(tail, self._clock())  # more may have come meanwhile

    def released(self, path: Path, *, error: bool = False) -> None:
        """The worker is done with ``path``'s queued bytes without a commit (nothing complete
        yet, or an error: then it is tried again after a pause, a bounded number of times)."""
        tail = self.of_path(path)
        if tail is None:
            return
        with self._lock:
            tail.queued = False
            if error:
                tail.errors += 1
                tail.not_before = self._clock() + min(2.0**tail.errors, 60.0)
        if tail.errors >= MAX_PART_ATTEMPTS:
            self._drop(tail, "error")

    def _drop(self, tail: Tail, why: str) -> None:
        with self._lock:
            if self._by_inode.get((tail.dev, tail.ino)) is tail:
                del self._by_inode[(tail.dev, tail.ino)]
            if self._by_path.get(tail.path) is tail:
                del self._by_path[tail.path]
            if self._by_name.get(tail.name) is tail:
                del self._by_name[tail.name]
            if self._hot.get((tail.dev, tail.ino)) is tail:
                del self._hot[(tail.dev, tail.ino)]
        level = logging.DEBUG if why == "quiet" else logging.WARNING
        log.log(
            level,
            "file_tail_ended",
            extra={
                "fields": {
                    "file": tail.name,
                    "file_id": tail.first_file_id,
                    "why": why,
                    "parts": tail.parts,
                    "bytes_loaded": tail.loaded,
                }
            },
        )

    # -- looking (tailer thread) -------------------------------------------------------------

    def look(self, *, everything: bool) -> None:
        """Look at the tailed files (the recently changed ones, or all) and queue new bytes."""
        now = self._clock()
        with self._lock:
            for key, tail in list(self._hot.items()):
                if now - tail.changed_at > HOT_SECONDS:
                    del self._hot[key]
            looked = self._by_inode if everything else self._hot
            tails = [t for t in looked.values() if not t.queued and t.not_before <= now]
        for tail in tails:
            self._look_at(tail, now)

    def _look_at(self, tail: Tail, now: float) -> None:
        try:
            found = os.lstat(tail.path)
        except FileNotFoundError:
            self._drop(tail, "gone")
            return
        except OSError:
            return
        if (found.st_dev, found.st_ino) != (tail.dev, tail.ino):
            self._drop(tail, "replaced")
            return
        changed = (found.st_size, found.st_mtime_ns) != (tail.size, tail.mtime_ns)
        if changed and tail.size >= 0:  # changed since the last look: somebody writes it
            self._heat(tail)
        with self._lock:
            if changed:
                tail.size, tail.mtime_ns = found.st_size, found.st_mtime_ns
                tail.changed_at = now
            pending = found.st_size - tail.loaded
            quiet = time.time() - found.st_mtime_ns / 1e9 >= self.settle
            if pending > 0 and self._expired(tail, now):
                tail.finishing = True  # quiet for continuation_seconds: the rest loads as is
            # Looked at again only once it changed or went quiet since nothing was complete.
            ready = pending > 0 and (tail.finishing or tail.waiting != (found.st_size, quiet))
            if ready:
                tail.queued = True
        if ready:
            if not self.enqueue(tail.path, pending):
                with self._lock:
                    tail.queued = False
        elif pending < 0:
            self._drop(tail, "truncated")
        elif self._expired(tail, now):
            self._drop(tail, "quiet")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inbox-tail", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            now = self._clock()
            everything = now - self._swept >= self.rescan
            if everything:
                self._swept = now
            try:
                self.look(everything=everything)
            except Exception:  # a bug: log it, keep tailing
                log.exception("tail_look_failed")
            with self._lock:
                hot = bool(self._hot)
            sweep_in = self._swept + self.rescan - self._clock()
            self._wake.wait(HOT_POLL_SECONDS if hot else max(sweep_in, 0.0))
            self._wake.clear()

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- after a restart ---------------------------------------------------------------------

    def recover(self, conn: duckdb.DuckDBPyConnection, done: Path) -> int:
        """Tail again the files committed within continuation_seconds (from the ledger): each
        is looked for in done/'s day folders of its commit, under the names its move may have
        given it; its loaded prefix is checked when it next grows. (One still in the inbox, a
        stop between its commit and its move, is read again: the same bytes are seen before,
        grown ones load as a new file whose known rows count as duplicates.)"""
        if self.keep <= 0:
            return 0
        since = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(seconds=self.keep)
        rows = conn.execute(_RECENT_FILES, {"since": since}).fetchall()
        found = 0
        for first, name, sha256, loaded, parts, finished_at in rows:
            if compression_suffix(name):
                continue
            for path in _places(name, finished_at, done):
                try:
                    seen = os.lstat(path)
                except OSError:
                    continue
                if not stat.S_ISREG(seen.st_mode) or seen.st_size < loaded:
                    continue
                self._add(
                    Tail(
                        first, name, path, seen.st_dev, seen.st_ino, loaded, parts, sha256,
                        self._clock(), seen.st_size, seen.st_mtime_ns,
                    ),
                    hot=False,
                )  # fmt: skip
                found += 1
        if found:
            log.info("file_tails_recovered", extra={"fields": {"files": found}})
        return found


# The files with a part committed within the window (the ledger is in commit order: zone maps
# skip the older rows): where their loaded bytes end, and those bytes' sha256 (the last part's).
_RECENT_FILES = """
SELECT coalesce(p.first_file_id, f.file_id), arg_max(f.name, coalesce(p.part, 1)),
       arg_max(f.sha256, coalesce(p.part, 1)), max(coalesce(p.offset_end, f.size_bytes)),
       max(coalesce(p.part, 1)), max(f.finished_at)
FROM files f LEFT JOIN file_parts p USING (file_id)
WHERE f.finished_at >= $since AND f.sha256 IS NOT NULL
GROUP BY 1
"""


def _places(name: str, finished_at: dt.datetime, done: Path) -> Iterator[Path]:
    """Where a file committed at ``finished_at`` may be now: in done/ under a name its move
    chose, that day or the next."""
    day = finished_at.replace(tzinfo=dt.UTC)
    for when in (day, day + dt.timedelta(days=1)):
        yield from candidate_names(name, day_folder(done, when))


def _copy_records(
    fd: int,
    offset: int,
    count: int,
    header: bytes,
    copy: Path,
    digest: Any,
    *,
    last: bool,
    everything: bool,
) -> tuple[int, int]:
    """Write ``header`` and the complete records of ``count`` bytes of ``fd`` from ``offset``
    into the new file ``copy``, hashing the records into ``digest``; (their bytes, lines)."""
    out = os.open(copy, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        write_all(out, header)
        copied = _copy_range(fd, out, offset, count)
        with mmap.mmap(out, 0, access=mmap.ACCESS_READ) as mapped:
            end = (
                copied if everything else records_end(mapped, len(header), last=last) - len(header)
            )
            lines = 0
            for start in range(len(header), len(header) + end, CHUNK_BYTES):
                piece = mapped[start : min(start + CHUNK_BYTES, len(header) + end)]
                digest.update(piece)
                lines += piece.count(b"\n")
        os.ftruncate(out, len(header) + end)
    finally:
        os.close(out)
    return end, lines


def _put_back(hidden: Path, path: Path) -> None:
    """Give a hidden continuing file its inbox name back (never over a file of that name)."""
    with contextlib.suppress(OSError):
        os.link(hidden, path)
        os.unlink(hidden)


def put_back_continuing(inbox: Path) -> int:
    """At start: headerless files a stop left half appended to the file they continue get their
    inbox names back, to be taken again (records appended twice count as duplicates)."""
    count = 0
    with contextlib.suppress(FileNotFoundError), os.scandir(inbox) as entries:
        for entry in entries:
            if entry.name.startswith(CONTINUING_PREFIX) and entry.is_file(follow_symlinks=False):
                _put_back(Path(entry.path), inbox / entry.name[len(CONTINUING_PREFIX) :])
                count += 1
    return count


def _append_growing(source: int, tail: Tail) -> int:
    """Append everything ``source`` holds to the tailed file, until it holds no more after the
    appended bytes are on disk; the bytes appended."""
    out = os.open(tail.path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        found = os.fstat(out)
        if (found.st_dev, found.st_ino) != (tail.dev, tail.ino):
            raise FileNotFoundError(f"{tail.path.name} is no longer the tailed file")
        copied = 0
        while (size := os.fstat(source).st_size) > copied:
            copied += _copy_range(source, out, copied, size - copied)
            os.fsync(out)
        return copied
    finally:
        os.close(out)


def _copy_range(source: int, out: int, offset: int, count: int) -> int:
    """Copy ``count`` bytes of ``source`` from ``offset`` onto ``out``; the bytes copied (fewer
    if ``source`` ends first)."""
    copied = 0
    while copied < count:
        chunk = os.pread(source, min(CHUNK_BYTES, count - copied), offset + copied)
        if not chunk:
            break
        write_all(out, chunk)
        copied += len(chunk)
    return copied


def _read_from(fd: int, offset: int, count: int) -> bytes:
    chunks = []
    while count > 0:
        chunk = os.pread(fd, min(count, CHUNK_BYTES * 4), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        count -= len(chunk)
    return b"".join(chunks)
