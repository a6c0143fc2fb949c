"""The ways a replica applies one chunk of lake files of one kind (``apply.apply_files``), as
load paths: ``LAKE_APPLY`` tries them in order (``apply_chunk``). Each decides before it writes,
so a path that gives up leaves the transaction as it found it (nothing to roll back).

* ``Alone``: a large transactions file alone in its chunk, none of whose ids is stored: what
  ``resolve`` would decide is known (its reader kept one copy of each id, so every row loads),
  and its rows are appended straight from the lake's scan, as local mode's fast path appends a
  clean file.
* ``Gathered``: at most ``Tuning.gathered_rows`` rows: gathered in memory and decided in Python
  (a statement or two, Python's cost per row), as local mode's batches.
* ``Resolved``: pending from the lake's scan and decided by the SQL rules (``resolve``: a dozen
  statements, next to nothing per row). Where the two cross: docs/performance.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import duckdb
import pyarrow as pa

from moneylion.append import stored_ids_among
from moneylion.db import one_row, registered, utc_now
from moneylion.ladder import LadderExhausted, names
from moneylion.lake.store import Lake
from moneylion.lake.tables import ROW_TABLES, SHA256, WRITE_ID
from moneylion.load import Applied, Fallback
from moneylion.model import COLUMNS, FileKind
from moneylion.pending import GatheredRows, create_pending, insert_rejects, store_rejects
from moneylion.resolve import resolve, resolve_gathered
from moneylion.rules import RejectReason
from moneylion.tuning import Tuning
from moneylion.validate import Reject, ValidatedRows


@dataclass(frozen=True)
class Chunk:
    """Lake files of one kind to apply, in ledger order, inside the caller's transaction."""

    conn: duckdb.DuckDBPyConnection
    lake: Lake
    kind: FileKind
    files: list[dict[str, Any]]  # their ledger rows
    line_bytes: int
    tuning: Tuning

    @property
    def rows(self) -> int:
        return sum(int(r["rows_loaded"] or 0) for r in self.files)


Found = dict[int, Applied]  # per global file id


class ChunkPath(Protocol):
    @property
    def name(self) -> str: ...

    def run(self, chunk: Chunk) -> Found | Fallback:
        """Apply the chunk, or give up before writing anything."""
        ...


class Alone:
    name = "lake_alone"

    def run(self, chunk: Chunk) -> Found | Fallback:
        return _append_alone(chunk)


class Gathered:
    name = "lake_gathered"

    def run(self, chunk: Chunk) -> Found | Fallback:
        if chunk.rows > chunk.tuning.gathered_rows:
            return Fallback(f"{chunk.rows} rows: more than gathered_rows")
        gathered = _gather(chunk.conn, chunk.lake, chunk.kind, chunk.files)
        return resolve_gathered(chunk.conn, gathered, utc_now(), chunk.line_bytes)


class Resolved:
    name = "lake_resolved"

    def run(self, chunk: Chunk) -> Found:
        conn = chunk.conn
        create_pending(conn, chunk.kind)
        _make_pending(conn, chunk.lake, chunk.kind, chunk.files)
        found = resolve(conn, chunk.kind)
        for file_id, reasons in store_rejects(conn, chunk.line_bytes).items():
            found.setdefault(file_id, Applied()).rejected_by_reason = reasons
        return found


# A file's rows and rejects come from the lake's data files through DuckDB's scan of the
# Arrow dataset (parallel, the write id bounds pushed down), joined to the files being applied.
_STAGE_ROWS = """
INSERT INTO pending BY NAME
SELECT o.file_id, {columns}, r.line, r.raw_line
FROM lake_rows r JOIN lake_owners o ON o.{sha} = r.{sha} AND o.{write_id} = r.{write_id}
WHERE r.{write_id} BETWEEN $low AND $high
"""
_STAGE_REJECTS = """
INSERT INTO pending_rejects BY NAME
SELECT o.file_id, r.line_number, r.reason, r.message, r.raw_line
FROM lake_rows r JOIN lake_owners o ON o.{sha} = r.{sha} AND o.{write_id} = r.{write_id}
WHERE r.{write_id} BETWEEN $low AND $high
"""


_ALONE_WHERE = f"{SHA256} = $sha AND {WRITE_ID} = $write_id"
_ALONE_RANGE = f"SELECT min({{key}}), max({{key}}), count(*) FROM lake_rows WHERE {_ALONE_WHERE}"
_APPEND_ALONE = (
    "INSERT INTO transactions BY NAME SELECT {columns}, $file_id AS file_id "
    f"FROM lake_rows WHERE {_ALONE_WHERE}"
)
_REJECTS_ALONE = (
    "SELECT $file_id AS file_id, line_number, reason, message, raw_line "
    f"FROM lake_rows WHERE {_ALONE_WHERE}"
)


def _append_alone(chunk: Chunk) -> Found | Fallback:
    """The fast way for a large transactions file alone (see above)."""
    conn, lake, kind, files = chunk.conn, chunk.lake, chunk.kind, chunk.files
    if kind is not FileKind.TRANSACTIONS or len(files) != 1:
        return Fallback("not a transactions file alone")
    row = files[0]
    if int(row["rows_loaded"] or 0) < chunk.tuning.alone_rows:
        return Fallback("fewer rows than alone_rows")
    owner = [(row["sha256"], row[WRITE_ID])]
    key = COLUMNS[kind][0]
    params: dict[str, object] = {"sha": row["sha256"], "write_id": row[WRITE_ID]}
    with registered(conn, "lake_rows", lake.rows_of(ROW_TABLES[kind], owner)):
        low, high, count = one_row(conn, _ALONE_RANGE.format(key=key), params)
        if not count:
            return Fallback("no rows")
        ids = f"SELECT {key} FROM lake_rows WHERE {_ALONE_WHERE}"
        if stored_ids_among(conn, ids, params, int(low), int(high)):
            return Fallback("some ids are stored: resolve decides them")
        columns = ", ".join(COLUMNS[kind])
        conn.execute(_APPEND_ALONE.format(columns=columns), {**params, "file_id": row["file_id"]})
    reasons: dict[str, int] = {}
    if int(row["rows_rejected"] or 0):
        with registered(conn, "lake_rows", lake.rows_of("rejects", owner)):
            insert_rejects(
                conn, _REJECTS_ALONE, chunk.line_bytes, {**params, "file_id": row["file_id"]}
            )
            found = conn.execute(
                f"SELECT reason, count(*) FROM lake_rows WHERE {_ALONE_WHERE} GROUP BY ALL",
                params,
            ).fetchall()
        reasons = {reason: int(n) for reason, n in found}
    return {int(row["file_id"]): Applied(loaded=int(count), rejected_by_reason=reasons)}


_GATHER = """
SELECT o.file_id, {columns}, r.{line}, r.raw_line
FROM lake_rows r JOIN lake_owners o ON o.{sha} = r.{sha} AND o.{write_id} = r.{write_id}
WHERE r.{write_id} BETWEEN $low AND $high ORDER BY o.file_id, r.{line}
"""


def _gather(
    conn: duckdb.DuckDBPyConnection, lake: Lake, kind: FileKind, files: list[dict[str, Any]]
) -> GatheredRows:
    """The rows and rejects of ``files`` (of one kind) gathered in memory, file by file."""
    rows_in = GatheredRows(kind)
    names = {"sha": SHA256, "write_id": WRITE_ID}
    columns = ", ".join(f"r.{name}" for name in COLUMNS[kind])
    with _owners(conn, files) as bounds:
        batches: dict[int, ValidatedRows] = {
            int(r["file_id"]): ValidatedRows(kind, {c: [] for c in COLUMNS[kind]}) for r in files
        }
        for table, line, select in (
            (ROW_TABLES[kind], "line", f"{columns}, "),
            ("rejects", "line_number", "r.reason, r.message, "),
        ):
            owned = lake.rows_of(table, [(r["sha256"], r[WRITE_ID]) for r in files])
            with registered(conn, "lake_rows", owned):
                sql = _GATHER.format(columns=select.rstrip(", "), line=line, **names)
                found = conn.execute(sql, bounds).fetchall()
            for file_id, *values, at, raw in found:
                batch = batches[file_id]
                if table == "rejects":
                    reason, message = values
                    batch.rejects.append(Reject(at, RejectReason(reason), message, raw))
                    continue
                for column, value in zip(batch.columns.values(), values, strict=True):
                    column.append(value)
                batch.lines.append(at)
                batch.raw_lines.append(raw)
    for file_id, batch in batches.items():
        rows_in.add(file_id, batch)
    return rows_in


@contextlib.contextmanager
def _owners(
    conn: duckdb.DuckDBPyConnection, files: list[dict[str, Any]]
) -> Iterator[dict[str, int]]:
    """``lake_owners`` (sha256, write id, global file id of ``files``) registered on ``conn``
    for the joins; the bounds of their write ids."""
    ids = pa.table(
        {
            SHA256: pa.array([r["sha256"] for r in files], pa.string()),
            WRITE_ID: pa.array([r[WRITE_ID] for r in files], pa.int64()),
            "file_id": pa.array([r["file_id"] for r in files], pa.int64()),
        }
    )
    with registered(conn, "lake_owners", ids):
        yield {"low": min(r[WRITE_ID] for r in files), "high": max(r[WRITE_ID] for r in files)}


def _make_pending(
    conn: duckdb.DuckDBPyConnection, lake: Lake, kind: FileKind, files: list[dict[str, Any]]
) -> None:
    """The pending rows and rejects of ``files`` (of one kind), with their global file id."""
    owners = [(r["sha256"], r[WRITE_ID]) for r in files]
    names = {"sha": SHA256, "write_id": WRITE_ID}
    columns = ", ".join(f"r.{name}" for name in COLUMNS[kind])
    with _owners(conn, files) as bounds:
        for table, sql in (
            (ROW_TABLES[kind], _STAGE_ROWS.format(columns=columns, **names)),
            ("rejects", _STAGE_REJECTS.format(**names)),
        ):
            with registered(conn, "lake_rows", lake.rows_of(table, owners)):
                conn.execute(sql, bounds)


LAKE_APPLY: tuple[ChunkPath, ...] = (Alone(), Gathered(), Resolved())


def apply_chunk(chunk: Chunk, ladder: tuple[ChunkPath, ...] = LAKE_APPLY) -> tuple[str, Found]:
    """Apply a chunk of lake files by the first path of ``ladder`` that takes it (each decides
    before it writes: one that gives up leaves nothing to roll back); that path's name, and
    what each file came to."""
    for path in ladder:
        found = path.run(chunk)
        if not isinstance(found, Fallback):
            return path.name, found
    raise LadderExhausted(f"every path of {names(ladder)} gave up on a lake chunk")
