"""The exception family of moneylion, and the reasons a whole file is refused.

Bad input is data, not an exception that escapes: a refused file has a FileFailure in its ledger
row and reason file. What raises is either the environment (``Transient``: a full disk, a file
that vanished or changed while being read; worth retrying after a pause) or a bug (anything
else: retrying cannot help). ``MoneylionError`` is the root of the project's own exceptions.
"""

from __future__ import annotations

import enum

import duckdb


class MoneylionError(Exception):
    """Root of moneylion's own exceptions."""


class Transient(MoneylionError):
    """An error of the environment, not of the file nor of the code: retried after a pause."""


class FileChanged(Transient):
    """An inbox file changed while it was being read: taken again once it is quiet."""


class DiskLow(Transient):
    """Staging a file would leave the warehouse's disk with less than ``min_free_disk_bytes``
    free. Not the file's fault: it waits in the inbox and is taken again later."""

    def __init__(self, name: str, free_bytes: int, needed_bytes: int, min_free_bytes: int) -> None:
        super().__init__(
            f"{name}: staging needs {needed_bytes} more bytes; {free_bytes} bytes are free on the "
            f"warehouse's disk, and min_free_disk_bytes ({min_free_bytes}) must stay free"
        )
        self.name = name
        self.free_bytes = free_bytes
        self.needed_bytes = needed_bytes
        self.min_free_bytes = min_free_bytes


class FileFailure(enum.StrEnum):
    """Why a whole file was refused (nothing of it is loaded)."""

    EMPTY = "empty"
    BINARY = "binary"
    NOT_UTF8 = "not_utf8"
    UNKNOWN_HEADER = "unknown_header"
    MISSING_COLUMN = "missing_column"
    DUPLICATE_COLUMN = "duplicate_column"
    HEADER_TOO_LONG = "header_too_long"
    NOT_A_REGULAR_FILE = "not_a_regular_file"
    TOO_LARGE = "too_large"
    BAD_COMPRESSION = "bad_compression"
    COMPRESSION_RATIO = "compression_ratio"


# What each reason means, for people (the README's table is made from it: ``make docs``).
FILE_FAILURES: dict[FileFailure, str] = {
    FileFailure.EMPTY: "the file has no line but blank ones",
    FileFailure.BINARY: "the file's start holds a NUL byte: not CSV text",
    FileFailure.NOT_UTF8: "the file is not UTF-8 (a BOM is allowed)",
    FileFailure.UNKNOWN_HEADER: "the header names neither a users file nor a transactions file",
    FileFailure.MISSING_COLUMN: "the header lacks a column of its kind",
    FileFailure.DUPLICATE_COLUMN: "the header names a column of its kind twice",
    FileFailure.HEADER_TOO_LONG: "the header line is over the line limit (2 MiB)",
    FileFailure.NOT_A_REGULAR_FILE: (
        "the entry is a symbolic link, a named pipe, a socket or a device: never opened, never "
        "followed; its ledger row has no sha256"
    ),
    FileFailure.TOO_LARGE: (
        "the file is larger than `max_file_bytes` when that is set (not read either), or the CSV "
        "of a `.gz` / `.zst` file would pass `max_decompressed_bytes`"
    ),
    FileFailure.BAD_COMPRESSION: "a `.gz` / `.zst` file's archive is broken or truncated",
    FileFailure.COMPRESSION_RATIO: (
        "a `.gz` / `.zst` file inflates more than `max_compression_ratio` times past 1 GiB"
    ),
}


class FileRefused(MoneylionError):
    """A file-level failure: carries the reason code and a message naming the file."""

    def __init__(self, reason: FileFailure, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


# DuckDB's errors of the environment: I/O (a full disk), memory, a write conflict, a stop.
_DUCKDB_TRANSIENT = (
    duckdb.IOException,
    duckdb.OutOfMemoryException,
    duckdb.TransactionException,
    duckdb.InterruptException,
)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is an error of the environment (worth retrying after a pause), not a bug
    (which would fail the same way again)."""
    return isinstance(exc, (Transient, OSError, *_DUCKDB_TRANSIENT))
