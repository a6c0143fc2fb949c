"""When a queued inbox file may be taken: what its events say of its writer, checked on the file.

Events say when to look; they do not prove a file complete (inotify and watchdog merge repeats of
an event, so two opens can look like one; ``cp`` reports nothing between its open and its close;
writes through another hard link report nothing at all). So:

- a file renamed or moved in is complete: taken at once;
- a file whose writer's close was seen is taken at once;
- a file seen open for writing (written while a handle was open, or opened right after it was
  created) waits for that close, at most ``writer_timeout`` seconds after its last event;
- any other file (a bare create, one found by a scan, one whose writer was not seen to close) is
  taken once it has been quiet for ``settle`` seconds and showed the same (dev, inode, size,
  mtime, ctime) at two looks ``settle`` seconds apart;
- an empty file (not renamed in) is never taken while it may still be written, not even at its
  close (``: > x.csv`` then ``cat >> x.csv``): it is handed over, and refused as ``empty``, once it
  has stayed empty for ``empty_file`` seconds after its last event.

None of this has to be perfect to lose nothing: bytes written after a file was taken are tailed
(tail.py). These rules decide how many parts a file takes.
"""

from __future__ import annotations

import enum
import os
import stat
import time
from dataclasses import dataclass

# What any write, truncation or replacement of a file moves.
Identity = tuple[int, int, int, int, int]


def identity(found: os.stat_result) -> Identity:
    """(dev, inode, size, mtime, ctime) of an ``lstat``."""
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)


class Arrival(enum.Enum):
    """What the events told of a queued file's writer."""

    COMPLETE = "complete"  # its writer closed it, or it was renamed in: take it
    SETTLING = "settling"  # nothing known: take it once quiet and unchanged at two looks
    WRITING = "writing"  # open for writing: wait for the close, at most writer_timeout


@dataclass(frozen=True)
class Rules:
    """The readiness settings (config: settle_seconds, writer_timeout_seconds,
    empty_file_seconds)."""

    settle: float = 0.5
    writer_timeout: float = 60.0
    empty_file: float = 60.0


@dataclass
class Watch:
    """What is known of one queued file: its last event and its last look."""

    arrival: Arrival
    since: float  # monotonic time of the last event or observed change
    renamed: bool = False  # it came by a rename: final, whatever its last record looks like
    held: bool = False  # a writer held it open past writer_timeout: its last record may be cut
    look: Identity | None = None  # the identity at the last look
    looked_at: float = 0.0  # monotonic time of that look

    def event(self, arrival: Arrival, now: float) -> None:
        """An event of the file: a late create never downgrades what a close or a write said."""
        if not (arrival is Arrival.SETTLING and self.arrival is not Arrival.SETTLING):
            self.arrival = arrival
        if arrival is Arrival.COMPLETE:
            self.held = False
        self.since = now

    def ready_at(self, rules: Rules, now: float, found: os.stat_result) -> float:
        """The monotonic time from which the file (``found``: its ``lstat``) may be taken."""
        if self.renamed or not stat.S_ISREG(found.st_mode):
            return now  # complete; or not a regular file: refused unread, nothing to wait for
        if found.st_size == 0:  # a writer may have opened it and not written yet, even closed
            return self.since + rules.empty_file
        if self.arrival is Arrival.COMPLETE:
            return now
        if self.arrival is Arrival.WRITING:
            if now - self.since < rules.writer_timeout:
                return self.since + rules.writer_timeout
            # No close for a long time (a lost event, a writer that keeps its handle): the
            # settle rule decides, and whatever it writes later is tailed.
            self.arrival, self.held = Arrival.SETTLING, True
        seen = identity(found)
        if seen != self.look:  # the first look, or changed since the last one: look again
            self.look, self.looked_at = seen, now
        quiet_for = time.time() - found.st_mtime_ns / 1e9
        return max(now + rules.settle - quiet_for, self.looked_at + rules.settle)
