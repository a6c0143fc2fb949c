"""The file ledger (``files``): one row per file whose outcome was committed, and its events.

A file is the sha256 of its bytes: bytes already in the ledger change nothing. A file's ledger
row commits in the same transaction as its rows, rejects and aggregate deltas, so the ledger is
what counts. ``LEDGER_COLUMNS`` is the one list of its columns, in the table's order; everything
that reads or writes a ledger row goes by these names.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import duckdb
import pyarrow as pa

from moneylion.db import append_arrow
from moneylion.source import Part

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_BY_INDEX_MAX = 64  # sha256s looked up as constants (index), more by a join

# The ledger's columns in the table's order, each with its Arrow type (its SQLite type follows:
# integers INTEGER, seconds REAL, the rest TEXT).
LEDGER: dict[str, pa.DataType] = {
    "file_id": pa.int64(),
    "name": pa.string(),
    "sha256": pa.string(),
    "kind": pa.string(),
    "status": pa.string(),
    "rows_total": pa.int64(),
    "rows_loaded": pa.int64(),
    "rows_duplicate": pa.int64(),
    "rows_rejected": pa.int64(),
    "size_bytes": pa.int64(),
    "received_at": pa.timestamp("us"),
    "finished_at": pa.timestamp("us"),
    "seconds": pa.float64(),
    "error_reason": pa.string(),
    "error": pa.string(),
}
LEDGER_COLUMNS = tuple(LEDGER)
# A column's position in a ledger row selected as LEDGER_COLUMNS (rows read by name, not number).
AT = {name: position for position, name in enumerate(LEDGER_COLUMNS)}


class FileStatus(enum.StrEnum):
    """A file's outcome in the ledger (and the API's ``status``)."""

    LOADED = "loaded"  # its rows went in (some may be duplicates or refused)
    FAILED = "failed"  # refused whole: nothing of it loaded
    DUPLICATE_FILE = "duplicate_file"  # bytes the ledger had: nothing written (never stored)
    # Corrections (corrections.py): the file's rows are out of the warehouse, its row stays.
    RETRACTED = "retracted"  # taken out (`moneylion retract`); `restore` puts it back
    REPLACED = "replaced"  # another file took its place (`moneylion replace`)
    HELD = "held"  # loaded nothing: too many of its rows were refused (max_reject_share)


# The statuses of a file whose rows are not in the warehouse although it was read whole: the
# cross-file rules skip its rows, and the same bytes dropped again load nothing.
OUT_OF_ORDER = (FileStatus.RETRACTED, FileStatus.REPLACED, FileStatus.HELD)

HOLD_REASON = "reject_share"  # the error_reason of a held file


def hold_message(rows_rejected: int, rows_total: int, max_share: float) -> str | None:
    """Why a file is held: its refused rows are more than ``max_share`` (max_reject_share; 0:
    off) of its rows, as the ledger counts them (a duplicate is not refused); None if not. The
    share is compared exactly, with the limit as written (0.1 is a tenth, not its float)."""
    if max_share <= 0 or rows_total == 0:
        return None
    if Fraction(rows_rejected, rows_total) <= Fraction(str(max_share)):
        return None
    return (
        f"{rows_rejected} of {rows_total} rows refused ({rows_rejected / rows_total:.1%}), "
        f"more than max_reject_share ({max_share:g}): held, nothing loaded; its rejects are "
        "kept, and `moneylion release` loads it"
    )


@dataclass(frozen=True)
class FileOutcome:
    """What happened to one file; the daemon moves the file and logs from this."""

    name: str
    path: Path
    sha256: str | None  # None for an entry that was never read (not a regular file, too large)
    status: FileStatus
    file_id: int | None
    kind: str | None = None
    rows_total: int = 0
    rows_loaded: int = 0
    rows_duplicate: int = 0
    rows_rejected: int = 0
    rejected_by_reason: Mapping[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    error_reason: str | None = None
    error: str | None = None
    size_bytes: int = 0
    finished_at: dt.datetime | None = None
    received_at: dt.datetime | None = None
    seen_before: bool = False  # the ledger had these bytes: nothing was written
    part: Part | None = None  # a continuation of a file loaded before (tail.py)
    extra_columns: tuple[str, ...] = ()  # header columns the file had beyond its kind's: ignored

    @property
    def committed(self) -> bool:
        """Whether this outcome wrote a new ledger row."""
        return not self.seen_before

    def summary(self) -> str:
        """One line for the CLI."""
        if self.status is FileStatus.FAILED:
            return f"{self.name}: failed ({self.error_reason}): {self.error}"
        if self.status is FileStatus.HELD:
            return f"{self.name}: {self.kind} file #{self.file_id}: held: {self.error}"
        if self.status is FileStatus.DUPLICATE_FILE:
            why = f" ({self.error})" if self.error else ""
            return f"{self.name}: duplicate of file #{self.file_id}{why}, nothing loaded"
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected_by_reason.items()))
        return (
            f"{self.name}: {self.kind} file #{self.file_id}: loaded {self.rows_loaded}, "
            f"duplicate {self.rows_duplicate}, rejected {self.rows_rejected}"
            + (f" ({reasons})" if reasons else "")
            + f", {self.seconds:.3f} s"
        )

    def reason_document(self) -> dict[str, object]:
        """The content of ``<name>.reason.json`` for a file moved to ``failed/``."""
        return {
            "file": self.name,
            "reason": self.error_reason,
            "message": self.error,
            "sha256": self.sha256,
            "file_id": self.file_id,
            "time": (self.finished_at or dt.datetime.now(dt.UTC)).isoformat(),
        }

    def row(self) -> dict[str, object]:
        """The ledger row, by LEDGER_COLUMNS."""
        return {name: getattr(self, name) for name in LEDGER_COLUMNS}


def insert(conn: duckdb.DuckDBPyConnection, outcomes: Sequence[FileOutcome]) -> None:
    """Write the ledger rows of ``outcomes`` (new files) in the open transaction, one statement;
    and for the continuations among them, which file and bytes each is, with their rejects
    numbered by the file's lines."""
    if not outcomes:
        return
    rows = [outcome.row() for outcome in outcomes]
    if len(rows) == 1:  # one file: its values as parameters (an Arrow relation costs more)
        conn.execute(_INSERT_ONE, {name: _plain(value) for name, value in rows[0].items()})
    else:
        table = pa.table(
            {name: pa.array([r[name] for r in rows], type=LEDGER[name]) for name in LEDGER_COLUMNS}
        )
        append_arrow(conn, "files", table)
    parts = [o for o in outcomes if o.part is not None]
    if parts:
        append_arrow(conn, "file_parts", _parts_table(parts))
        shifted = [(o.part.line_shift, o.file_id) for o in parts if o.part and o.rows_rejected]
        if shifted:
            conn.executemany(_REJECT_LINES_SHIFT, shifted)


_INSERT_ONE = (
    f"INSERT INTO files ({', '.join(LEDGER_COLUMNS)}) "
    f"VALUES ({', '.join(f'${name}' for name in LEDGER_COLUMNS)})"
)


def _plain(value: object) -> object:
    """A ledger value as a DuckDB parameter: an enum as its text."""
    return value.value if isinstance(value, enum.Enum) else value


def _parts_table(parts: Sequence[FileOutcome]) -> pa.Table:
    """The ``file_parts`` rows of continuations, in the table's column order."""
    places = [(o.file_id, o.part) for o in parts if o.part is not None]
    return pa.table(
        {
            "file_id": pa.array([i for i, _ in places], pa.int64()),
            "first_file_id": pa.array([p.first_file_id for _, p in places], pa.int64()),
            "part": pa.array([p.number for _, p in places], pa.int32()),
            "offset_start": pa.array([p.start for _, p in places], pa.int64()),
            "offset_end": pa.array([p.end for _, p in places], pa.int64()),
        }
    )


# A part is read as the file's header and then its records: its rejects' line numbers are made
# the file's by the lines of the file before the part, less the header's.
_REJECT_LINES_SHIFT = "UPDATE rejects SET line_number = line_number + ? WHERE file_id = ?"


Known = tuple[int, str, str | None, str | None]  # file_id, status, error_reason, error


def known(conn: duckdb.DuckDBPyConnection, shas: Sequence[str]) -> dict[str, Known]:
    """The ledger's file for each sha256 already in it."""
    if not shas:
        return {}
    query = "SELECT sha256, file_id, status, error_reason, error FROM files WHERE sha256 IN "
    if len(shas) <= _BY_INDEX_MAX:
        # Written into the statement (hex digits only): a few constants are looked up in the
        # UNIQUE index on sha256, where a joined list scans the whole ledger (many files
        # share that scan; a long list of constants costs more than it).
        if not all(_SHA256.fullmatch(sha) for sha in shas):
            raise ValueError("not a sha256 hex digest")
        listed = ", ".join(f"'{sha}'" for sha in shas)
        rows = conn.execute(f"{query}({listed})").fetchall()
    else:
        rows = conn.execute(f"{query}(SELECT unnest($shas))", {"shas": list(shas)}).fetchall()
    return {
        sha: (int(file_id), status, reason, error) for sha, file_id, status, reason, error in rows
    }


def next_file_ids(conn: duckdb.DuckDBPyConnection, count: int) -> list[int]:
    """``count`` new file ids, increasing, taken outside any transaction: DuckDB sequences do
    not roll back, and a file that falls back from one path to another keeps its number."""
    if not count:
        return []
    rows = conn.execute("SELECT nextval('file_id_seq') FROM range($n)", {"n": count}).fetchall()
    return sorted(int(row[0]) for row in rows)


def seen_before(
    name: str,
    path: Path,
    sha256: str,
    found: Known,
    size: int,
    seconds: float,
    finished_at: dt.datetime,
) -> FileOutcome:
    """The outcome of bytes the ledger already has: nothing is written."""
    file_id, status, error_reason, error = found
    log.info(
        "file_seen_before",
        extra={"fields": {"file": name, "file_id": file_id, "status": status}},
    )
    if error is not None:
        error = f"same bytes as file #{file_id}: {error}"
    if status in OUT_OF_ORDER:  # kept out on purpose: seen, not a failure (goes to done/)
        error_reason, error = status, f"same bytes as file #{file_id}, which is {status}"
        log.warning(
            "file_seen_out_of_order",
            extra={"fields": {"file": name, "file_id": file_id, "status": status}},
        )
    return FileOutcome(
        name=name,
        path=path,
        sha256=sha256,
        status=FileStatus.FAILED if status == FileStatus.FAILED else FileStatus.DUPLICATE_FILE,
        file_id=file_id,
        error_reason=error_reason,
        error=error,
        size_bytes=size,
        seconds=seconds,
        finished_at=finished_at,
        seen_before=True,
    )


def log_committed(outcome: FileOutcome) -> None:
    """The event of a new ledger row, after its commit."""
    if outcome.status is FileStatus.FAILED:
        log.warning(
            "file_failed",
            extra={
                "fields": {
                    "file": outcome.name,
                    "file_id": outcome.file_id,
                    "reason": outcome.error_reason,
                    "message": outcome.error,
                }
            },
        )
        return
    if outcome.status is FileStatus.HELD:
        log.warning(
            "file_held",
            extra={
                "fields": {
                    "file": outcome.name,
                    "file_id": outcome.file_id,
                    "kind": outcome.kind,
                    "total": outcome.rows_total,
                    "rejected": outcome.rows_rejected,
                    "reason": outcome.error_reason,
                    "message": outcome.error,
                }
            },
        )
        return
    if outcome.extra_columns:
        log.warning(
            "extra_columns_ignored",
            extra={"fields": {"file": outcome.name, "columns": list(outcome.extra_columns)}},
        )
    part = {} if outcome.part is None else _part_fields(outcome.part)
    log.info(
        "file_loaded",
        extra={
            "fields": {
                "file": outcome.name,
                "file_id": outcome.file_id,
                **part,
                "kind": outcome.kind,
                "loaded": outcome.rows_loaded,
                "duplicate": outcome.rows_duplicate,
                "rejected": outcome.rows_rejected,
                "seconds": round(outcome.seconds, 4),
            }
        },
    )


def _part_fields(part: Part) -> dict[str, int]:
    """A continuation's place, for the log events."""
    return {"part_of": part.first_file_id, "part": part.number, "bytes_loaded": part.end}
