"""The rows of one file into the base tables, inside the caller's transaction.

Three ways, tried in order by ingest.py:
* ``append_fast``: a clean, new file straight from DuckDB's reader in one statement.
* ``append_located``: DuckDB stages the file; only the rows failing a fast check go through the
  reference rules (validate.Batcher), and line numbers are found for the rejects alone.
* ``append_reference``: validate_rows reads every record itself (wrong field counts, odd lines).
The last two share ``_resolve_staged``: copies within the file, rows already stored, the append.
"""

from __future__ import annotations

import bisect
import csv
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from moneylion.errors import FileFailure, FileRefused
from moneylion.model import COLUMNS, TABLES, FileKind
from moneylion.resolve import (
    Applied,
    Stager,
    append_arrow,
    arrow_rejects,
    create_staging,
    resolve,
    store_rejects,
    utc_now,
)
from moneylion.schema import one_row
from moneylion.validate import (
    BATCH_ROWS,
    QUOTE_CHARS,
    Batcher,
    Header,
    LongRecord,
    Reject,
    Source,
    data_lines,
    is_blank,
    located_select_sql,
    raw_text,
    record_lines,
    typed_select_sql,
    validate_rows,
)

# --- fast path --------------------------------------------------------------------------------


NOT_CLEAN = "moneylion: row needs the reference path"


def abort_unless(condition: str, column: str) -> str:
    """SQL: ``column``, or an error() aborting the statement (NOT_CLEAN) on a row where
    ``condition`` does not hold; ``not_clean`` recognises that error."""
    return f"CASE WHEN {condition} THEN {column} ELSE error('{NOT_CLEAN}') END"


def not_clean(exc: BaseException) -> bool:
    """Whether a statement was aborted by a row ``abort_unless`` refused."""
    return NOT_CLEAN in str(exc)


@dataclass(frozen=True)
class Fallback:
    """A path gave up on a file (the caller rolls back and takes the next one): why, for the
    log."""

    reason: str


def append_fast(
    conn: duckdb.DuckDBPyConnection, source: Source, header: Header, file_id: int
) -> Applied | Fallback:
    """Append a clean, new file straight from DuckDB's reader in one statement.

    A Fallback when the file has anything to reject or skip: a field failing its check aborts
    the statement through error(), a wrong field count lands in the reader's reject table, a
    repeated id shows in the count check (transactions) or the PRIMARY KEY (users). Only then
    is the file read again, row by row.
    """
    key, *rest = COLUMNS[header.kind]
    guarded = ", ".join([abort_unless("ok", key), *rest])
    table = TABLES[header.kind].name
    extra = "$file_id" if header.kind is FileKind.TRANSACTIONS else "$file_id, $now"
    params: dict[str, object] = {
        "path": str(source.disk_path()),
        "skip": header.line_number,
        "file_id": file_id,
    }
    if header.kind is FileKind.USERS:
        params["now"] = utc_now()
    try:
        inserted = conn.execute(
            f"INSERT INTO {table} SELECT {guarded}, {extra} FROM ({typed_select_sql(header)})",
            params,
        ).fetchall()[0][0]
    except duckdb.ConstraintException:
        return Fallback("a user id is repeated in the file or already stored")
    except duckdb.InvalidInputException as exc:
        if not_clean(exc):
            return Fallback("a field fails its check")
        raise
    if aside := _reader_errors(conn, header.file_name):
        return Fallback(f"the reader set {aside} line(s) aside (field count or length)")
    # Transaction ids must be new and unique: no copies within the file, none stored before.
    if header.kind is FileKind.TRANSACTIONS and inserted:
        low, high = _id_range(conn, file_id)
        appended = "SELECT transaction_id FROM transactions WHERE file_id = $f"
        mine: dict[str, object] = {"f": file_id}
        if distinct_ids(conn, "transaction_id", appended, mine, low, high) != int(inserted):
            return Fallback("a transaction id is repeated in the file")
        if stored_ids_among(conn, appended, mine, low, high, before_file=file_id):
            return Fallback("transaction ids are already stored")
    return Applied(loaded=int(inserted))


# Distinct ids are counted with a bitmap over the file's id range when it is dense enough: one
# pass setting bits, no hash table as count(DISTINCT) builds (bench/micro.py --only copies).
BITMAP_MAX_BITS = 1 << 28  # 32 MiB


def _id_range(conn: duckdb.DuckDBPyConnection, file_id: int) -> tuple[int, int]:
    low, high = one_row(
        conn,
        "SELECT min(transaction_id), max(transaction_id) FROM transactions WHERE file_id = $f",
        {"f": file_id},
    )
    return int(low), int(high)


def distinct_ids(
    conn: duckdb.DuckDBPyConnection,
    key: str,
    rows_sql: str,
    params: dict[str, object],
    low: int,
    high: int,
) -> int:
    """How many distinct ``key`` values the rows of ``rows_sql`` hold (ids in ``low``..``high``):
    by a bitmap over the range when it is dense enough."""
    if high - low < BITMAP_MAX_BITS:
        query = f"SELECT bit_count(bitstring_agg({key}, {low}, {high})) FROM ({rows_sql})"
    else:
        query = f"SELECT count(DISTINCT {key}) FROM ({rows_sql})"
    return int(one_row(conn, query, params)[0])


def stored_ids_among(
    conn: duckdb.DuckDBPyConnection,
    ids_sql: str,
    params: dict[str, object],
    low: int,
    high: int,
    *,
    before_file: int | None = None,
) -> int:
    """How many of the transaction ids ``ids_sql`` selects (all in ``low``..``high``) are
    stored, by files before ``before_file`` if it is given (earlier files have smaller ids).
    The id range (and file bound) let zone maps skip the other row groups; only when stored
    rows fall in the range are the ids matched against them."""
    bounds: dict[str, object] = {"low": low, "high": high}
    in_range = "FROM transactions t WHERE t.transaction_id BETWEEN $low AND $high"
    if before_file is not None:
        in_range += " AND t.file_id < $before"
        bounds["before"] = before_file
    if not one_row(conn, "SELECT count(*) " + in_range, bounds)[0]:
        return 0
    among = f"SELECT count(*) {in_range} AND t.transaction_id IN ({ids_sql})"
    return int(one_row(conn, among, {**params, **bounds})[0])


# --- reference path ---------------------------------------------------------------------------


def append_reference(
    conn: duckdb.DuckDBPyConnection, source: Source, header: Header, file_id: int
) -> Applied:
    """Stage the whole file through validate_rows (Python, line numbers), then resolve it."""
    create_staging(conn, header.kind)
    stager = Stager(header.kind)
    for batch in validate_rows(source, header):
        stager.add(file_id, batch)
        stager.flush(conn)  # a batch at a time: memory stays flat
    return _one_file(conn, header.kind, file_id)


def _one_file(conn: duckdb.DuckDBPyConnection, kind: FileKind, file_id: int) -> Applied:
    """``resolve`` and ``store_rejects`` for the one file staged."""
    applied = resolve(conn, kind).get(file_id, Applied())
    applied.rejected_by_reason = store_rejects(conn).get(file_id, {})
    return applied


def append_located(
    conn: duckdb.DuckDBPyConnection, source: Source, header: Header, file_id: int
) -> Applied | Fallback:
    """Stage with DuckDB's reader, send only the rows failing a fast check through the
    reference rules, and find line numbers for the rejects alone.

    A record's ordinal (its row number in the reader's output) stands in for its line until
    the end. When every line after the header is one record or one line the reader set aside
    (no record spans lines, no empty line but at the end: ``_by_line``), lines follow from
    ordinals and the lines set aside (``_lines_around``), and records set aside (a wrong field
    count, a line of spaces) are rejected by the line DuckDB reports. Otherwise records are
    counted as validate_rows counts them, and a file with records set aside is left to the
    reference path (a Fallback: the caller rolls back, the reader's reject table with it).
    """
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE staged_raw AS " + located_select_sql(header),
        {"path": str(source.disk_path()), "skip": header.line_number},
    )
    # The lines the reader set aside (DISTINCT: a line may have an error row per column).
    aside: list[tuple[int, str, str]] = []
    if _reader_errors(conn, header.file_name):
        # A line may have an error row per column: one per line, a too-long line's first.
        aside = conn.execute(
            "SELECT line, arg_min(csv_line, error_type <> $long), min(error_type) "
            "FROM ingest_csv_errors GROUP BY line ORDER BY line",
            {"long": _TOO_LONG},
        ).fetchall()
    reader_rejects: list[Reject] = []
    if aside:
        if not _by_line(conn, source, header, aside):
            return Fallback("records span lines and the reader set some aside")
        found_aside = _reader_rejects(conn, header, aside)
        if isinstance(found_aside, Fallback):
            return found_aside
        reader_rejects = found_aside
    kind = header.kind
    columns = ", ".join(COLUMNS[kind])
    create_staging(conn, kind)
    conn.execute(
        f"INSERT INTO staged SELECT $file_id, {columns}, ordinal, NULL FROM staged_raw WHERE ok",
        {"file_id": file_id},
    )
    # Rows failing a fast check go through the reference rules, a page at a time (a cursor
    # would not see this transaction's temp tables).
    batcher = Batcher(header)
    stager = Stager(kind)
    after = 0
    while rows := conn.execute(
        "SELECT ordinal, raw_fields FROM staged_raw WHERE NOT ok AND ordinal > $after "
        "ORDER BY ordinal LIMIT $page",
        {"after": after, "page": BATCH_ROWS},
    ).fetchall():
        for ordinal, fields in rows:
            batcher.add(ordinal, [f or "" for f in fields])
        after = rows[-1][0]
        stager.add(file_id, batcher.take())
        stager.flush(conn)
    applied = resolve(conn, kind).get(file_id, Applied())
    # Ordinals -> lines, for the rejects only; raw text for those found in SQL.
    found = conn.execute(
        """SELECT s.line_number, r.raw_fields FROM staged_rejects s
           JOIN staged_raw r ON r.ordinal = s.line_number"""
    ).fetchall()
    ordinals = {ordinal for ordinal, _ in found}
    if aside:  # lines are records (checked above)
        lines = _lines_around(header, ordinals, [line for line, _, _ in aside])
    else:
        by_line = bool(found) and _by_line(conn, source, header, aside)
        lines = record_lines(source, header, ordinals, by_line=by_line)
    mapping = pa.table(
        {
            "ordinal": pa.array([o for o, _ in found], type=pa.int64()),
            "line": pa.array([lines[o] for o, _ in found], type=pa.int64()),
            "raw": pa.array([raw_text([f or "" for f in fields]) for _, fields in found]),
        }
    )
    conn.register("reject_lines", mapping)
    try:
        conn.execute(
            """UPDATE staged_rejects SET
                   raw_line = coalesce(staged_rejects.raw_line, m.raw), line_number = m.line
               FROM reject_lines m WHERE m.ordinal = staged_rejects.line_number"""
        )
    finally:
        conn.unregister("reject_lines")
    conn.execute("DROP TABLE staged_raw")
    if aside:
        if reader_rejects:  # already by their line
            append_arrow(
                conn, "staged_rejects", arrow_rejects([(file_id, r) for r in reader_rejects])
            )
        # The reader appends to these tables: the next file must find only its own rows.
        conn.execute("DELETE FROM ingest_csv_errors")
        conn.execute("DELETE FROM ingest_csv_scans")
    applied.rejected_by_reason = store_rejects(conn).get(file_id, {})
    return applied


READER_REJECT_TYPES = ["TOO MANY COLUMNS", "MISSING COLUMNS", "LINE SIZE OVER MAXIMUM"]
_TOO_LONG = "LINE SIZE OVER MAXIMUM"


def _by_line(
    conn: duckdb.DuckDBPyConnection,
    source: Source,
    header: Header,
    aside: list[tuple[int, str, str]],
) -> bool:
    """Whether every line after the header is one record the reader kept or one of the lines
    it set aside: then no record spans lines, and DuckDB's line numbers are the file's."""
    (kept,) = one_row(conn, "SELECT count(*) FROM staged_raw")
    return int(kept) + len(aside) == data_lines(source) - header.line_number


def _reader_rejects(
    conn: duckdb.DuckDBPyConnection, header: Header, aside: list[tuple[int, str, str]]
) -> list[Reject] | Fallback:
    """The lines the reader set aside as the reference path rejects them (blank lines of
    spaces skipped, lines over LINE_MAX_BYTES rejected as too long); a Fallback if it set one
    aside for another reason than its field count or length, or if Python's csv reads a line
    otherwise."""
    other = one_row(
        conn,
        "SELECT count(*) FROM ingest_csv_errors WHERE error_type NOT IN $types",
        {"types": READER_REJECT_TYPES},
    )[0]
    if other:
        return Fallback("the reader set a line aside for another reason than its field count")
    batcher = Batcher(header)
    for line, text, error_type in aside:
        if error_type == _TOO_LONG:
            batcher.add(int(line), LongRecord(text.rstrip("\r\n")[:QUOTE_CHARS]))
            continue
        fields = next(csv.reader([text.rstrip("\r\n")]), [])
        if is_blank(fields):
            continue
        if len(fields) == header.field_count:
            return Fallback(f"line {line} set aside by the reader has the header's field count")
        batcher.add(int(line), fields)
    return batcher.take().rejects


def _lines_around(header: Header, ordinals: set[int], aside: list[int]) -> dict[int, int]:
    """The line of each of the reader's rows (``ordinals``: its row numbers) in a file of one
    record per line, given the lines it set aside (sorted): row n is on the n-th line after
    the header that was not set aside."""
    # Rows the reader kept before each line set aside (non-decreasing): row n comes after as
    # many set-aside lines as there are of these below n.
    kept_before = [line - header.line_number - k for k, line in enumerate(aside, start=1)]
    return {n: header.line_number + n + bisect.bisect_left(kept_before, n) for n in ordinals}


def _reader_errors(conn: duckdb.DuckDBPyConnection, name: str) -> int:
    """Rows DuckDB's reader set aside (wrong field count); invalid UTF-8 fails the file."""
    structural, not_utf8 = one_row(
        conn,
        "SELECT count(*), count(*) FILTER (WHERE error_type = 'INVALID UNICODE') "
        "FROM ingest_csv_errors",
    )
    if not_utf8:
        raise FileRefused(FileFailure.NOT_UTF8, f"{name} is not UTF-8")
    return int(structural)
