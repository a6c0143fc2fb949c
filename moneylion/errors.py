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
