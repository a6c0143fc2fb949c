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

A compressed file (``*.csv.gz``, ``*.csv.zst``: COMPRESSIONS, by the name's last suffix) is hashed
as it arrived, and decompressed once while it is read: every reader reads the CSV, and line
numbers are the CSV's. A broken archive is ``bad_compression``. A decompression bomb is stopped
while it inflates, before more than its limit is held or written (``Bounds``): past
``max_decompressed_bytes`` (or ``max_file_bytes``, the smaller) it is ``too_large``, and past
RATIO_FROM_BYTES inflated, more than ``max_compression_ratio`` bytes out per byte in is
``compression_ratio``. Either way the whole file is still hashed, so the ledger knows the bytes.

Staging never leaves the warehouse's disk with less than ``min_free_disk_bytes`` free: a plain
file is measured before it is copied, a compressed one as it inflates (its partial copy is then
removed). That raises ``DiskLow``: not the file's fault, it waits in the inbox.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import itertools
import mmap
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import zstandard

from moneylion.config import Config
from moneylion.errors import DiskLow, FileChanged, FileFailure, FileRefused

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

# The compression ratio is bounded only once this much has been inflated: small files
# legitimately compress very well (a CSV of one repeated row inflates thousands of times), and the
# ratio only matters when the output is large enough to hurt.
RATIO_FROM_BYTES = 1 << 30
# A compressed file being inflated to disk looks at the free space again after this many bytes,
# and needs this much room beyond min_free_disk_bytes to go on (so it never writes past the floor).
DISK_CHECK_BYTES = 8 * 1024 * 1024


# The config keys of Bounds' fields, in order.
_BOUND_KEYS = (
    "max_file_bytes",
    "max_decompressed_bytes",
    "max_compression_ratio",
    "min_free_disk_bytes",
)


@dataclass(frozen=True)
class Bounds:
    """What reading one inbox file may take (config.py's keys; 0: no limit)."""

    file_bytes: int = 0  # max_file_bytes: the file as it arrived, and the CSV it holds
    decompressed_bytes: int = 0  # max_decompressed_bytes: the CSV a compressed file holds
    compression_ratio: int = 0  # max_compression_ratio, past RATIO_FROM_BYTES inflated
    min_free_disk: int = 0  # min_free_disk_bytes: left free on the staging folder's disk

    @classmethod
    def of(cls, config: Config | None) -> Bounds:
        """``config``'s bounds; config.py's defaults for None (a file read without a config)."""
        if config is None:
            defaults: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Config)}
            return cls(*(int(defaults[key]) for key in _BOUND_KEYS))
        return cls(*(int(getattr(config, key)) for key in _BOUND_KEYS))

    def csv_limit(self) -> tuple[int, str]:
        """(bytes, config key) of the CSV a compressed file may hold: the smaller limit set;
        (0, "") for none."""
        limits = [
            (limit, key)
            for limit, key in (
                (self.decompressed_bytes, "max_decompressed_bytes"),
                (self.file_bytes, "max_file_bytes"),
            )
            if limit
        ]
        return min(limits) if limits else (0, "")


NO_BOUNDS = Bounds()


def free_disk_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still write on the file system of ``path`` (or of its
    nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    found = os.statvfs(probe)
    return found.f_bavail * found.f_frsize


def ensure_room(name: str, staging: Path, needed: int, min_free: int) -> None:
    """DiskLow unless writing ``needed`` more bytes under ``staging`` leaves ``min_free`` free."""
    if not min_free:
        return
    free = free_disk_bytes(staging)
    if free - needed < min_free:
        raise DiskLow(name, free, needed, min_free)


@dataclass(frozen=True)
class Part:
    """A continuation of a taken file (tail.py): its bytes [start, end) of the file, loaded with
    the file's header. Reject line numbers are the file's: ``line_shift`` is added to the line
    numbers read from the header-and-records copy."""

    first_file_id: int  # the ledger row of the file's first part
    number: int  # 2, 3, ...
    start: int
    end: int
    line_shift: int
    lines: int  # line breaks in [start, end)
    digest: Any  # sha256 of the file's bytes [0, end), to go on from


# (dev, inode, size, mtime_ns) of an inbox file when it was read.
Seen = tuple[int, int, int, int]


@dataclass
class StagedFile:
    """An inbox file's bytes, read once, with their sha256: what every reader reads.

    A small file is held in memory (creating a file costs more than reading a small one); a
    large one in a private copy under ``staging``. DuckDB's reader needs a path:
    ``disk_path`` writes the private copy on first need.
    """

    name: str  # the name in the inbox (the ledger's)
    origin: Path  # the inbox entry it came from
    sha256: str  # of the bytes as they arrived (compressed, for a compressed file)
    size: int  # the bytes as they arrived
    staging: Path
    data: bytes | None = None  # the CSV's bytes, for a file held in memory
    path: Path | None = None  # the private copy of the CSV, once there is one
    csv_size: int = -1  # the CSV's bytes (decompressed); -1: the same as ``size``
    refused: FileRefused | None = None  # read and hashed, but refused whole (bad_compression)
    seen: Seen | None = None  # the inbox file as it was read
    part: Part | None = None  # a continuation of a file already loaded (tail.py)

    def __post_init__(self) -> None:
        if self.csv_size < 0:
            self.csv_size = self.size

    def open_binary(self) -> BinaryIO:
        """A fresh stream of the CSV's bytes (in memory, or the private copy)."""
        if self.data is not None:
            return io.BytesIO(self.data)
        return self.disk_path().open("rb")

    def disk_path(self) -> Path:
        """The private copy's path (written now if the bytes are in memory)."""
        if self.path is None:
            assert self.data is not None
            self.path = private_name(self.staging)
            self.path.write_bytes(self.data)
        return self.path

    def discard(self) -> None:
        """Remove the private copy, if any (the ingest is over, committed or not)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def private_name(staging: Path) -> Path:
    """A new private file: always a plain CSV (DuckDB's reader is told ``compression='none'``)."""
    staging.mkdir(parents=True, exist_ok=True)
    return staging / f"{os.getpid()}-{next(_counter)}.csv"


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
    origin: Path,
    staging: Path,
    *,
    bounds: Bounds = NO_BOUNDS,
    memory_bytes: int = MEMORY_BYTES,
) -> StagedFile:
    """Read the inbox file ``origin`` once while hashing it: into memory when it holds at most
    ``memory_bytes``, else into a private copy in ``staging``; a compressed one decompressed on
    the way (the CSV held to ``bounds`` as it inflates).

    Raises FileRefused (not a regular file, larger than ``max_file_bytes`` when that is set),
    DiskLow (no room to stage it now: nothing of it is kept), FileChanged (it moved while being
    read), or OSError (vanished, unreadable). A compressed file that is broken or inflates past
    its bounds comes back hashed, with ``refused``.
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
        if bounds.file_bytes and before.st_size > bounds.file_bytes:
            raise FileRefused(
                FileFailure.TOO_LARGE,
                f"{origin.name} holds {before.st_size} bytes, more than max_file_bytes "
                f"({bounds.file_bytes})",
            )
        inflater = inflater_for(origin.name)
        # A compressed file is measured as it inflates; a plain one by the copy it needs, if any.
        copied = 0 if inflater is not None or before.st_size <= memory_bytes else before.st_size
        ensure_room(origin.name, staging, copied, bounds.min_free_disk)
        if fault_hook is not None:
            fault_hook("opened", origin)
        data: bytes | None = None
        copy: Path | None = None
        inflated: _CsvSink | None = None
        try:
            if inflater is not None:
                inflated = _CsvSink(origin.name, staging, memory_bytes, bounds)
                sha256, size = _inflate_hashing(fd, before.st_size, inflater, inflated)
            elif before.st_size <= memory_bytes:
                data = _read_all(fd, before.st_size)
                sha256, size = hashlib.sha256(data).hexdigest(), len(data)
            else:
                copy = private_name(staging)
                sha256, size = _copy_hashing(fd, copy, before.st_size)
            after = os.fstat(fd)
            if size != before.st_size or _identity(after) != _identity(before):
                raise FileChanged(f"{origin.name} changed while it was being read")
        except BaseException:
            if copy is not None:
                copy.unlink(missing_ok=True)
            if inflated is not None:
                inflated.discard()
            raise
    finally:
        os.close(fd)
    seen = (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns)
    if inflated is not None:
        staged = StagedFile(
            origin.name, origin, sha256, size, staging, inflated.data, inflated.path,
            csv_size=inflated.size, refused=inflated.refused, seen=seen,
        )  # fmt: skip
    else:
        staged = StagedFile(origin.name, origin, sha256, size, staging, data, copy, seen=seen)
    if fault_hook is not None:
        fault_hook("staged", origin)
    return staged


# --- records ----------------------------------------------------------------------------------

_QUOTE_PIECE = 1 << 23


def records_end(data: bytes | mmap.mmap, start: int = 0, *, last: bool = False) -> int:
    """Where the last complete record of ``data[start:]`` ends (``start`` is a record's start):
    just after a line break outside quotes (RFC 4180: a quoted field may hold line breaks, and
    an escaped quote is two quotes, so quotes are balanced exactly where an even number of them
    came before). ``start`` if no record is complete. With ``last`` (nothing more is expected
    soon), a trailing record without its line break counts as complete too, unless it ends
    inside quotes."""
    end = len(data)
    unterminated = last and end > start and data[end - 1 : end] != b"\n"
    if unterminated and (data.find(b'"', start) < 0 or _quotes(data, start, end) % 2 == 0):
        return end
    newline = data.rfind(b"\n", start)
    if newline < 0:
        return start
    if data.find(b'"', start, newline) < 0:  # no quotes: the common case, one memchr
        return newline + 1
    quotes = _quotes(data, start, newline)
    while True:
        if quotes % 2 == 0:
            return newline + 1
        before = data.rfind(b"\n", start, newline)
        if before < 0:
            return start
        quotes -= _quotes(data, before, newline)
        newline = before


def _quotes(data: bytes | mmap.mmap, start: int, end: int) -> int:
    if isinstance(data, bytes):
        return data.count(b'"', start, end)
    return sum(
        data[at : min(at + _QUOTE_PIECE, end)].count(b'"') for at in range(start, end, _QUOTE_PIECE)
    )


def header_bytes(head: bytes) -> bytes:
    """The bytes of a file's header (blank lines before it included) with its line break, from
    the file's first bytes ``head``: what a continuation of the file is read with."""
    at = 0
    while True:
        end = head.find(b"\n", at)
        if end < 0:
            return head
        line = head[at:end].strip(b" \t\r").removeprefix(b"\xef\xbb\xbf").strip(b" \t\r")
        if line:
            return head[: end + 1]
        at = end + 1


def complete_records(staged: StagedFile, *, last: bool) -> int:
    """Where the last complete record of a plain staged file ends (``records_end``): what may be
    loaded of it while its writer may still be at work."""
    if staged.data is not None:
        return records_end(staged.data, last=last)
    assert staged.path is not None
    with staged.path.open("rb") as handle:
        if not staged.size:
            return 0
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return records_end(mapped, last=last)


def keep_complete(staged: StagedFile, end: int) -> None:
    """Cut a plain staged file to its first ``end`` bytes (the records complete when it was
    read): its sha256 and size are then those of what is kept, the bytes that load."""
    if staged.data is not None:
        staged.data = staged.data[:end]
        staged.sha256, staged.size = hashlib.sha256(staged.data).hexdigest(), end
    else:
        assert staged.path is not None
        os.truncate(staged.path, end)
        staged.sha256, staged.size = file_sha256(staged.path)
    staged.csv_size = staged.size


# --- compressed files -------------------------------------------------------------------------

# What one call of an inflater may return at most: zstd expands up to ~32,768:1 (an RLE block),
# so it is fed pieces of ZSTD_PIECE_BYTES; zlib takes an output bound itself.
INFLATE_PIECE_BYTES = 1 << 20
ZSTD_PIECE_BYTES = 1024


class Inflater(Protocol):
    """A streaming decompressor with bounded output per piece."""

    consumed: int  # compressed bytes taken in so far (by the pieces yielded so far)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        """The CSV bytes ``chunk`` completes, in pieces; raises ValueError if it is broken."""
        ...

    def finish(self) -> None:
        """Raises ValueError unless the archive ended where its format says it ends."""
        ...


class _Gzip:
    """gzip (RFC 1952), several members one after the other included (as ``gzip`` reads them)."""

    def __init__(self) -> None:
        self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
        self._started = False
        self.consumed = 0

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        data = chunk
        try:
            while data:
                self._started = True
                out = self._obj.decompress(data, INFLATE_PIECE_BYTES)
                ended = self._obj.eof
                rest = self._obj.unused_data if ended else self._obj.unconsumed_tail
                self.consumed += len(data) - len(rest)
                if out:
                    yield out
                if ended:  # a member ended: what follows is the next member
                    data = rest
                    self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
                    self._started = False
                    continue
                data = rest
                while not data and len(out) == INFLATE_PIECE_BYTES:  # output still pending
                    out = self._obj.decompress(b"", INFLATE_PIECE_BYTES)
                    if out:
                        yield out
        except zlib.error as exc:
            raise ValueError(f"not a valid gzip stream ({exc})") from exc

    def finish(self) -> None:
        if self._started and not self._obj.eof:
            raise ValueError("the gzip stream is truncated (it ends inside a member)")


class _Zstd:
    """Zstandard (RFC 8878), several frames one after the other included."""

    def __init__(self) -> None:
        self._decompressor = zstandard.ZstdDecompressor()
        self._obj = self._decompressor.decompressobj()
        self._started = False
        self.consumed = 0

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        view = memoryview(chunk)
        try:
            for start in range(0, len(view), ZSTD_PIECE_BYTES):
                data = bytes(view[start : start + ZSTD_PIECE_BYTES])
                while data:
                    self._started = True
                    self.consumed += len(data)
                    out = self._obj.decompress(data)
                    data = b""
                    if self._obj.eof:  # a frame ended: what follows is the next frame
                        data = self._obj.unused_data
                        self.consumed -= len(data)
                        self._obj = self._decompressor.decompressobj()
                        self._started = False
                    if out:
                        yield out
        except zstandard.ZstdError as exc:
            raise ValueError(f"not a valid zstd stream ({exc})") from exc

    def finish(self) -> None:
        if self._started and not self._obj.eof:
            raise ValueError("the zstd stream is truncated (it ends inside a frame)")


# The one declaration of the compressed inputs: the name's last suffix -> its inflater.
COMPRESSIONS: dict[str, Callable[[], Inflater]] = {".gz": _Gzip, ".zst": _Zstd}


def compression_suffix(name: str) -> str | None:
    """The compression suffix of an inbox name (``.gz``, ``.zst``), or None for a plain file."""
    suffix = os.path.splitext(name)[1].lower()
    return suffix if suffix in COMPRESSIONS else None


def csv_name(name: str) -> str:
    """The name of the CSV a file holds: ``x.csv.gz`` -> ``x.csv``."""
    suffix = compression_suffix(name)
    return name[: -len(suffix)] if suffix else name


def inflater_for(name: str) -> Inflater | None:
    """A fresh inflater for a compressed name, None for a plain one."""
    suffix = compression_suffix(name)
    return COMPRESSIONS[suffix]() if suffix else None


class _Refusal(Exception):
    def __init__(self, refused: FileRefused) -> None:
        self.refused = refused


class _CsvSink:
    """The decompressed CSV: in memory up to ``memory_bytes``, then in a private copy. A piece
    that would take it past its bounds is refused before it is kept: never more than the limit
    is held or written, and never past the disk's floor."""

    def __init__(self, name: str, staging: Path, memory_bytes: int, bounds: Bounds) -> None:
        self.name = name
        self.staging = staging
        self.memory_bytes = memory_bytes
        self.bounds = bounds
        self.limit, self.limit_key = bounds.csv_limit()
        self.chunks: list[bytes] = []
        self.size = 0
        self.path: Path | None = None
        self._fd: int | None = None
        self._written = 0  # bytes in the private copy
        self._room_until = 0  # the size up to which the disk was seen to have room
        self.refused: FileRefused | None = None

    def write(self, piece: bytes, consumed: int) -> None:
        """Keep ``piece``, the CSV's next bytes, inflated from the first ``consumed`` bytes of
        the compressed file. Raises _Refusal past the bounds, DiskLow past the disk's floor."""
        size = self.size + len(piece)
        if self.limit and size > self.limit:
            raise _Refusal(
                FileRefused(
                    FileFailure.TOO_LARGE,
                    f"{self.name} decompresses to more than {self.limit_key} ({self.limit} bytes)",
                )
            )
        ratio = self.bounds.compression_ratio
        if ratio and size > RATIO_FROM_BYTES and size > ratio * consumed:
            raise _Refusal(
                FileRefused(
                    FileFailure.COMPRESSION_RATIO,
                    f"{self.name} inflates to more than {ratio} bytes per compressed byte past "
                    f"{RATIO_FROM_BYTES} bytes, more than max_compression_ratio ({ratio})",
                )
            )
        to_disk = self._fd is not None or size > self.memory_bytes
        if to_disk and self.bounds.min_free_disk and size > self._room_until:
            # Room for what this write adds and a window beyond: until the next look, nothing
            # written can take the disk below its floor.
            ensure_room(
                self.name,
                self.staging,
                size - self._written + DISK_CHECK_BYTES,
                self.bounds.min_free_disk,
            )
            self._room_until = size + DISK_CHECK_BYTES
        self.size = size
        if self._fd is None and self.size > self.memory_bytes:
            self.path = private_name(self.staging)
            self._fd = os.open(
                self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
            for chunk in self.chunks:
                write_all(self._fd, chunk)
            self.chunks = []
        if self._fd is None:
            self.chunks.append(piece)
        else:
            write_all(self._fd, piece)
            self._written = self.size

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def data(self) -> bytes | None:
        return None if self.path is not None or self.refused else b"".join(self.chunks)

    def refuse(self, refused: FileRefused) -> None:
        """Keep nothing of the CSV: the file is refused whole."""
        self.discard()
        self.refused = refused

    def discard(self) -> None:
        self.close()
        self.chunks = []
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


def write_all(fd: int, chunk: bytes | memoryview) -> None:
    """Write all of ``chunk`` to ``fd`` (a write may take only part of it)."""
    written = 0
    while written < len(chunk):
        written += os.write(fd, chunk[written:])


def _inflate_hashing(fd: int, expected: int, inflater: Inflater, sink: _CsvSink) -> tuple[str, int]:
    """(sha256, bytes) of everything read from ``fd``, decompressed into ``sink``. A broken
    archive or a CSV past its bounds leaves ``sink.refused`` set; the rest is still hashed (not
    inflated). DiskLow propagates: the caller removes the partial copy."""
    digest = hashlib.sha256()
    size = 0
    chunk_bytes = min(CHUNK_BYTES, expected + 1)
    try:
        while chunk := os.read(fd, chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
            if sink.refused is None:
                try:
                    for piece in inflater.feed(chunk):
                        sink.write(piece, inflater.consumed)
                except ValueError as exc:
                    sink.refuse(_broken(sink.name, str(exc)))
                except _Refusal as refusal:
                    sink.refuse(refusal.refused)
        if sink.refused is None:
            try:
                inflater.finish()
                if size == 0:
                    raise ValueError("the file is empty")
            except ValueError as exc:
                sink.refuse(_broken(sink.name, str(exc)))
    finally:
        sink.close()
    return digest.hexdigest(), size


def _broken(name: str, why: str) -> FileRefused:
    return FileRefused(FileFailure.BAD_COMPRESSION, f"{name}: {why}")


def _read_all(fd: int, expected: int) -> bytes:
    """Everything ``fd`` holds (``expected`` bytes, or what it turns out to hold)."""
    chunks = []
    while chunk := os.read(fd, max(expected + 1, 65536)):
        chunks.append(chunk)
    return b"".join(chunks)


def _copy_hashing(fd: int, copy: Path, expected: int) -> tuple[str, int]:
    """(sha256, bytes) of everything read from ``fd``, copied to the new file ``copy``.

    The kernel copies (``copy_file_range``: the bytes never pass through this process; right
    after a large load, writing the copy through this process cost several times more, see
    docs/performance.md and bench/micro.py --only staging), and the hash is then taken of the
    private copy itself: exactly the bytes every reader will read. Where the kernel cannot
    copy between the two files, the bytes are read, hashed and written.
    """
    out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        try:
            _kernel_copy(fd, out)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            os.ftruncate(out, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.lseek(out, 0, os.SEEK_SET)
            return _read_hash_write(fd, out, expected)
    finally:
        os.close(out)
    return file_sha256(copy)


def file_sha256(path: Path) -> tuple[str, int]:
    """(hex digest, size) of a regular file's bytes, never following a link nor opening anything
    else. Raises OSError if it cannot be read (or is not a regular file)."""
    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb", buffering=0) as handle:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise IsADirectoryError(f"{path.name} is not a regular file")
        # Sized to the file (a small file must not pay for zeroing a large buffer), plus a byte
        # to see the end at once.
        buffer = bytearray(min(CHUNK_BYTES, status.st_size + 1))
        view = memoryview(buffer)
        while read := handle.readinto(buffer):
            digest.update(view[:read])  # releases the GIL for large chunks
            size += read
    return digest.hexdigest(), size


# copy_file_range refused: another file system (older kernels), a file system or kernel
# without it. The descriptors are still at their start then (nothing was copied).
_NO_KERNEL_COPY = {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def _kernel_copy(fd: int, out: int) -> None:
    """Copy everything ``fd`` holds to ``out`` inside the kernel."""
    while os.copy_file_range(fd, out, CHUNK_BYTES * 16):
        pass


def _read_hash_write(fd: int, out: int, expected: int) -> tuple[str, int]:
    """(sha256, bytes) of everything read from ``fd``, written to ``out`` on the way."""
    digest = hashlib.sha256()
    # Sized to the file (a small file must not pay for zeroing a large buffer), plus a byte to
    # see the end at once.
    buffer = bytearray(min(CHUNK_BYTES, expected + 1))
    view = memoryview(buffer)
    size = 0
    while read := os.readv(fd, [buffer]):
        chunk = view[:read]
        digest.update(chunk)
        written = 0
        while written < read:
            written += os.write(out, chunk[written:])
        size += read
    return digest.hexdigest(), size


def clear_staging(staging: Path) -> None:
    """Remove private copies left by a process that was killed (called at start)."""
    if not staging.is_dir():
        return
    for entry in os.scandir(staging):
        if entry.is_file(follow_symlinks=False):
            Path(entry.path).unlink(missing_ok=True)
