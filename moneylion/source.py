"""Reading an inbox entry safely: checked once, read once, through the descriptor that was checked.

An entry is read only if ``lstat`` says it is a regular file: symbolic links are never followed
(``O_NOFOLLOW``), and a FIFO, socket or device is refused without being opened, so nothing in the
inbox can block the worker or make it read outside the inbox. ``O_NONBLOCK`` guards the window
between the check and the open. The bytes are hashed as they are read, and every reader (the
header, DuckDB, the reference rules, the line counts) reads what was hashed: a small file held in
memory, a larger one copied into a private staging file. A file's identity is the sha256 of
exactly the bytes that were loaded, whatever its producer does to the inbox file meanwhile. A file
whose size or times moved while it was read raises ``FileChanged``, and is taken again once it is
quiet: never half recorded.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from moneylion.errors import FileChanged, FileFailure, FileRefused

CHUNK_BYTES = 4 * 1024 * 1024
# Files up to this size are read into memory rather than copied: creating the private file
# costs more than the whole read of a small one (the bench figures are in docs/performance.md).
MEMORY_BYTES = 1024 * 1024
# What is known of a file before and after the copy: any write, truncation or replacement moves
# one of these (size, modification and change times, the inode itself).
_Identity = tuple[int, int, int, int, int]

# Fault injection for the tests: called with the point ("opened": checked and opened, nothing
# read yet; "staged": copied and hashed, not yet loaded) and the inbox path. None in production.
fault_hook: Callable[[str, Path], None] | None = None

_counter = itertools.count()


@dataclass
class StagedFile:
    """An inbox file's bytes, read once, with their sha256: what every reader reads.

    A small file is held in memory (creating a file costs more than reading a small one); a
    large one in a private copy under ``staging``. DuckDB's reader needs a path:
    ``disk_path`` writes the private copy on first need.
    """

    name: str  # the name in the inbox (the ledger's)
    origin: Path  # the inbox entry it came from
    sha256: str
    size: int
    staging: Path
    data: bytes | None = None  # the bytes, for a file held in memory
    path: Path | None = None  # the private copy, once there is one

    def open_binary(self) -> BinaryIO:
        """A fresh stream of the bytes (in memory, or the private copy)."""
        if self.data is not None:
            return io.BytesIO(self.data)
        return self.disk_path().open("rb")

    def disk_path(self) -> Path:
        """The private copy's path (written now if the bytes are in memory)."""
        if self.path is None:
            assert self.data is not None
            self.path = _private_name(self.staging, self.name)
            self.path.write_bytes(self.data)
        return self.path

    def discard(self) -> None:
        """Remove the private copy, if any (the ingest is over, committed or not)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def _private_name(staging: Path, name: str) -> Path:
    staging.mkdir(parents=True, exist_ok=True)
    return staging / f"{os.getpid()}-{next(_counter)}{_suffixes(name)}"


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


def stage(
    origin: Path, staging: Path, *, max_bytes: int = 0, memory_bytes: int = MEMORY_BYTES
) -> StagedFile:
    """Read the inbox file ``origin`` once while hashing it: into memory when it holds at most
    ``memory_bytes``, else into a private copy in ``staging``.

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
        data: bytes | None = None
        copy: Path | None = None
        try:
            if before.st_size <= memory_bytes:
                data = _read_all(fd, before.st_size)
                sha256, size = hashlib.sha256(data).hexdigest(), len(data)
            else:
                copy = _private_name(staging, origin.name)
                sha256, size = _copy_hashing(fd, copy, before.st_size)
            after = os.fstat(fd)
            if size != before.st_size or _identity(after) != _identity(before):
                raise FileChanged(f"{origin.name} changed while it was being read")
        except BaseException:
            if copy is not None:
                copy.unlink(missing_ok=True)
            raise
    finally:
        os.close(fd)
    staged = StagedFile(origin.name, origin, sha256, size, staging, data, copy)
    if fault_hook is not None:
        fault_hook("staged", origin)
    return staged


def _suffixes(name: str) -> str:
    """The name's last suffix, lower-cased, if it is a plain one (``.csv``): readers that go by
    the extension (DuckDB's compression detection) see the same one as the inbox file."""
    suffix = Path(name).suffix.lower()
    return suffix if suffix.isascii() and suffix[1:].isalnum() and len(suffix) <= 8 else ".csv"


def _read_all(fd: int, expected: int) -> bytes:
    """Everything ``fd`` holds (``expected`` bytes, or what it turns out to hold)."""
    chunks = []
    while chunk := os.read(fd, max(expected + 1, 65536)):
        chunks.append(chunk)
    return b"".join(chunks)


def _copy_hashing(fd: int, copy: Path, expected: int) -> tuple[str, int]:
    """(sha256, bytes) of everything read from ``fd``, written to the new file ``copy``."""
    digest = hashlib.sha256()
    # Sized to the file (a small file must not pay for zeroing a large buffer), plus a byte to
    # see the end at once.
    buffer = bytearray(min(CHUNK_BYTES, expected + 1))
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
