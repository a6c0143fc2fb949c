"""A large clean file's rows for the lake, straight from DuckDB's reader as Arrow batches.

The reference rules (``publish.prepare``) hold every row in Python: fine for small files, far
too slow and large for a file of millions of rows. Like ``append.append_fast`` in local mode,
this path takes a file only when nothing in it needs the reference rules, and otherwise says
why (a ``Fallback``, or a stream aborted by ``error()``): every field passes its fast check,
the reader set no line aside, every line after the header is one record (so a record's line
is the header's line plus its ordinal), no field holds a quote, comma or line break (so its raw
text is its fields joined by commas, as ``validate.raw_text`` writes it), and no id appears
twice (no copies to decide).
The ids are checked by a scan of their column alone; the fields' checks run in the scan that
streams the rows to the lake in batches (a row failing one aborts the stream before its commit:
nothing is visible, and the reference rules take the file). The file is never held whole in
memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa

from moneylion.append import abort_unless, distinct_ids
from moneylion.config import Config
from moneylion.db import one_row
from moneylion.lake.tables import SHA256, WRITE_ID, row_schema
from moneylion.load import Fallback
from moneylion.model import COLUMNS, TABLES, Rule
from moneylion.reader import located_select_sql
from moneylion.source import StagedFile
from moneylion.validate import Header, data_lines


def _special(header: Header) -> str:
    """SQL: a raw field holds a quote, a comma or a line break (its raw text would be quoted).
    Only free text can: a field of any other domain that passed its check holds none."""
    fields = [
        f"raw_fields[{header.positions[c.name] + 1}]"
        for c in TABLES[header.kind].columns
        if c.domain.rule is Rule.TEXT
    ]
    return " OR ".join(f"regexp_matches({f}, '[\",\\r\\n]')" for f in fields) or "false"


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
    """Whether the fast path may take the file, as far as a scan of its ids tells (the lines
    set aside, one record per line, no id twice), or why not. The fields' checks run in the
    scan that streams the rows (``clean_rows``): a row failing one aborts it."""
    key = COLUMNS[header.kind][0]
    params: dict[str, object] = {"path": str(source.disk_path()), "skip": header.line_number}
    located = located_select_sql(header)
    # Only the id column is read here (DuckDB reads no other): a tenth of the full checks.
    rows, low, high = one_row(
        conn, f"SELECT count(*), min({key}), max({key}) FROM ({located})", params
    )
    (aside,) = one_row(conn, "SELECT count(*) FROM ingest_csv_errors")
    # The reader appends to these tables: the next file must find only its own rows.
    conn.execute("DELETE FROM ingest_csv_errors")
    conn.execute("DELETE FROM ingest_csv_scans")
    if aside:
        return Fallback(f"the reader set {aside} line(s) aside")
    if int(rows) != data_lines(source) - header.line_number:
        return Fallback("records do not stand one per line")
    if rows and (
        low is None or distinct_ids(conn, key, located, params, int(low), int(high)) != rows
    ):
        return Fallback("an id appears more than once in the file (or is not an id)")
    key_first, *rest = COLUMNS[header.kind]
    guarded = abort_unless(f"ok AND NOT ({_special(header)})", key_first)
    sql = (
        f"SELECT $sha AS {SHA256}, $write_id AS {WRITE_ID}, {guarded} AS {key_first}, "
        f"{', '.join(rest)}, $skip + ordinal AS line, "
        f"array_to_string(raw_fields, ',') AS raw_line FROM ({located})"
    )
    return CleanFile(int(rows), sql, params)


def clean_rows(
    conn: duckdb.DuckDBPyConnection,
    clean: CleanFile,
    header: Header,
    sha256: str,
    write_id: int,
    batch_rows: int,
) -> pa.RecordBatchReader:
    """The file's rows as the lake's row table takes them, in batches of ``batch_rows``."""
    params = {**clean.params, "sha": sha256, "write_id": write_id}
    reader: pa.RecordBatchReader = conn.sql(clean.sql, params=params).to_arrow_reader(batch_rows)
    schema = row_schema(header.kind)
    batches = (batch.cast(schema) for batch in reader)
    return pa.RecordBatchReader.from_batches(schema, batches)
