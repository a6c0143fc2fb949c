"""A large clean file's rows for the lake, straight from DuckDB's reader as Arrow batches.

The reference rules (``publish.prepare``) hold every row in Python: fine for small files, far
too slow and large for a file of millions of rows. Like ``append.append_fast`` in local mode,
this path takes a file only when nothing in it needs the reference rules, and otherwise says
why (a ``Fallback``): every field passes its fast check, the reader set no line aside, every
line after the header is one record (so a record's line is the header's line plus its
ordinal), no field holds a quote, comma or line break (so its raw text is its fields joined by
commas, as ``validate.raw_text`` writes it), and no id appears twice (no copies to decide).
The rows then stream to the lake in batches: the file is read twice (the checks, the rows),
never held whole in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa

from moneylion.append import BITMAP_MAX_BITS, Fallback
from moneylion.config import Config
from moneylion.lake.tables import SHA256, WRITE_ID, row_schema
from moneylion.model import COLUMNS
from moneylion.schema import one_row
from moneylion.source import StagedFile
from moneylion.validate import Header, data_lines, located_select_sql

BATCH_ROWS = 1_000_000  # rows per Arrow batch handed to delta-rs
_SPECIAL = "regexp_matches(array_to_string(raw_fields, ''), '[\",\\r\\n]')"


@dataclass(frozen=True)
class CleanFile:
    """A large file that passed every check: its row count, and how to read its rows."""

    rows: int
    sql: str
    params: dict[str, object]


def scratch(config: Config) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB for reading files (it spills to the staging folder)."""
    return duckdb.connect(
        config={
            "memory_limit": config.duckdb_memory_limit,
            "threads": config.duckdb_threads,
            "temp_directory": str(config.staging_dir),
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
    )


def check_clean(
    conn: duckdb.DuckDBPyConnection, source: StagedFile, header: Header
) -> CleanFile | Fallback:
    """Whether the fast path can take the file (see the module's docstring), or why not."""
    key = COLUMNS[header.kind][0]
    params: dict[str, object] = {"path": str(source.disk_path()), "skip": header.line_number}
    located = located_select_sql(header)
    rows, failing, special, low, high = one_row(
        conn,
        f"SELECT count(*), count(*) FILTER (WHERE NOT ok), count(*) FILTER (WHERE {_SPECIAL}), "
        f"min({key}) FILTER (WHERE ok), max({key}) FILTER (WHERE ok) FROM ({located})",
        params,
    )
    if failing:
        return Fallback(f"{failing} row(s) fail a fast check")
    (aside,) = one_row(conn, "SELECT count(*) FROM ingest_csv_errors")
    if aside:
        return Fallback(f"the reader set {aside} line(s) aside")
    if special:
        return Fallback(f"{special} row(s) hold a quote, a comma or a line break in a field")
    if int(rows) != data_lines(source) - header.line_number:
        return Fallback("records do not stand one per line")
    if rows and _distinct(conn, key, located, params, int(low), int(high)) != rows:
        return Fallback("an id appears more than once in the file")
    typed = ", ".join(COLUMNS[header.kind])
    sql = (
        f"SELECT $sha AS {SHA256}, $write_id AS {WRITE_ID}, {typed}, "
        f"$skip + ordinal AS line, array_to_string(raw_fields, ',') AS raw_line FROM ({located})"
    )
    return CleanFile(int(rows), sql, params)


def _distinct(
    conn: duckdb.DuckDBPyConnection,
    key: str,
    located: str,
    params: dict[str, object],
    low: int,
    high: int,
) -> int:
    """Distinct ids of the file: a bitmap over their range when it is dense enough."""
    if high - low < BITMAP_MAX_BITS:
        query = f"SELECT bit_count(bitstring_agg({key}, {low}, {high})) FROM ({located})"
    else:
        query = f"SELECT count(DISTINCT {key}) FROM ({located})"
    return int(one_row(conn, query, params)[0])


def clean_rows(
    conn: duckdb.DuckDBPyConnection, clean: CleanFile, header: Header, sha256: str, write_id: int
) -> pa.RecordBatchReader:
    """The file's rows as the lake's row table takes them, in batches."""
    params = {**clean.params, "sha": sha256, "write_id": write_id}
    reader: pa.RecordBatchReader = conn.sql(clean.sql, params=params).to_arrow_reader(BATCH_ROWS)
    schema = row_schema(header.kind)
    batches = (batch.cast(schema) for batch in reader)
    return pa.RecordBatchReader.from_batches(schema, batches)
