"""Reading an inbox entry safely: checked once, read once, through the descriptor that was checked.

An entry is read only if ``lstat`` says it is a regular file: symbolic links are never followed
(``O_NOFOLLOW``), and a FIFO, socket or device is refused without being opened, so nothing in the
inbox can block the worker or make it read outside the inbox. ``O_NONBLOCK`` guards the window
between the check and the open. The bytes are copied into a private staging file while they are
hashed, and every reader (the header, DuckDB, the reference rules, the line counts) reads that
copy: a file's identity is the sha256 of exactly the bytes that were loaded, whatever its producer
does to the inbox file meanwhile. A file whose size or times moved while it was copied raises
``FileChanged``, and is taken again once it is quiet: never half recorded.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from moneylion.errors import FileChanged, FileFailure, FileRefused

CHUNK_BYTES = 4 * 1024 * 1024
# What is known of a file before and after the copy: any write, truncation or replacement moves
# one of these (size, modification and change times, the inode itself).
_Identity = tuple[int, int, int, int, int]

# Fault injection for the tests: called with the point ("opened": checked and opened, nothing
# read yet; "staged": copied and hashed, not yet loaded) and the inbox path. None in production.
fault_hook: Callable[[str, Path], None] | None = None

_counter = itertools.count()


@dataclass(frozen=True)
class StagedFile:
    """An inbox file's bytes in a private copy, with their sha256: what every reader reads."""

    name: str  # the name in the inbox (the ledger's)
    origin: Path  # the inbox entry it came from
    path: Path  # the private copy
    sha256: str
    size: int

    def discard(self) -> None:
        """Remove the private copy (the ingest is over, committed or not)."""
        if self.path != self.origin:
            self.path.unlink(missing_ok=True)


def describe(mode: int) -> str:
    """What a non-regular entry is, in words (for the refusal's message)."""
    if stat.S_ISLNK(mode):
        return "a symbolic link (not followed)"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev)


def refuse_unless_regular(path: Path) -> os.stat_result:
    """``lstat`` of ``path``; FileRefused(NOT_A_REGULAR_FILE) unless it is a regular file.

    The message names the entry and what it is, never anything it points to.
    """
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(
            FileFailure.NOT_A_REGULAR_FILE,
            f"{path.name} is {describe(st.st_mode)}: only regular files are read",
        )
    return st


def stage(origin: Path, staging: Path, *, max_bytes: int = 0) -> StagedFile:
    """Copy the inbox file ``origin`` into ``staging`` while hashing it.

    Raises FileRefused (not a regular file, larger than ``max_bytes`` when that is set),
    FileChanged (it moved while being read), or OSError (vanished, unreadable).
    """
    checked = refuse_unless_regular(origin)
    fd = os.open(origin, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode) or (before.st_dev, before.st_ino) != (
            checked.st_dev,
            checked.st_ino,
        ):
            raise FileChanged(f"{origin.name} was replaced while it was being opened")
        if max_bytes and before.st_size > max_bytes:
            raise FileRefused(
                FileFailure.TOO_LARGE,
                f"{origin.name} holds {before.st_size} bytes, more than max_file_bytes "
                f"({max_bytes})",
            )
        if fault_hook is not None:
            fault_hook("opened", origin)
        staging.mkdir(parents=True, exist_ok=True)
        copy = staging / f"{os.getpid()}-{next(_counter)}{_suffixes(origin.name)}"
        try:
            sha256, size = _copy_hashing(fd, copy)
            after = os.fstat(fd)
            if size != before.st_size or _identity(after) != _identity(before):
                raise FileChanged(f"{origin.name} changed while it was being read")
        except BaseException:
            copy.unlink(missing_ok=True)
            raise
    finally:
        os.close(fd)
    staged = StagedFile(origin.name, origin, copy, sha256, size)
    if fault_hook is not None:
        fault_hook("staged", origin)
    return staged


def _suffixes(name: str) -> str:
    """The name's last suffix, lower-cased, if it is a plain one (``.csv``): readers that go by
    the extension (DuckDB's compression detection) see the same one as the inbox file."""
    suffix = Path(name).suffix.lower()
    return suffix if suffix.isascii() and suffix[1:].isalnum() and len(suffix) <= 8 else ".csv"


def _copy_hashing(fd: int, copy: Path) -> tuple[str, int]:
    """(sha256, bytes) of everything read from ``fd``, written to the new file ``copy``."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    size = 0
    out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        while read := os.readv(fd, [buffer]):
            chunk = view[:read]
            digest.update(chunk)  # releases the GIL for large chunks
            written = 0
            while written < read:
                written += os.write(out, chunk[written:])
            size += read
    finally:
        os.close(out)
    return digest.hexdigest(), size


def clear_staging(staging: Path) -> None:
    """Remove private copies left by a process that was killed (called at start)."""
    if not staging.is_dir():
        return
    for entry in os.scandir(staging):
        if entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
