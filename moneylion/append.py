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
import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from moneylion.errors import FileFailure, FileRefused
from moneylion.schema import one_row
from moneylion.validate import (
    BATCH_ROWS,
    COLUMNS,
    QUOTE_CHARS,
    Batcher,
    FileKind,
    Header,
    LongRecord,
    Reject,
    ValidatedRows,
    data_lines,
    is_blank,
    located_select_sql,
    raw_text,
    record_lines,
    typed_select_sql,
    validate_rows,
)

ARROW_TYPES: dict[str, pa.DataType] = {
    "transaction_id": pa.int64(),
    "user_id": pa.int64(),
    "transaction_date": pa.date32(),
    "amount": pa.decimal128(18, 2),
    "transaction_type": pa.string(),
    "signup_date": pa.date32(),
    "country": pa.string(),
}


def utc_now() -> dt.datetime:
    """Now, in UTC, without a zone (DuckDB TIMESTAMP)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


@dataclass
class Applied:
    loaded: int = 0
    duplicate: int = 0
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def rejected(self) -> int:
        return sum(self.rejected_by_reason.values())


# --- fast path --------------------------------------------------------------------------------


NOT_CLEAN = "moneylion: row needs the reference path"


def append_fast(
    conn: duckdb.DuckDBPyConnection, path: Path, header: Header, file_id: int
) -> Applied | None:
    """Append a clean, new file straight from DuckDB's reader in one statement.

    None when the file has anything to reject or skip (the caller rolls back): a field failing
    its check aborts the statement through error(), a wrong field count lands in the reader's
    reject table, a repeated id shows in the count check (transactions) or the PRIMARY KEY
    (users). Only then is the file read again, row by row.
    """
    columns = ", ".join(COLUMNS[header.kind])
    key = COLUMNS[header.kind][0]
    guarded = columns.replace(key, f"CASE WHEN ok THEN {key} ELSE error('{NOT_CLEAN}') END", 1)
    table = "transactions" if header.kind is FileKind.TRANSACTIONS else "users"
    extra = "$file_id" if header.kind is FileKind.TRANSACTIONS else "$file_id, $now"
    params: dict[str, object] = {"path": str(path), "skip": header.line_number, "file_id": file_id}
    if header.kind is FileKind.USERS:
        params["now"] = utc_now()
    try:
        inserted = conn.execute(
            f"INSERT INTO {table} SELECT {guarded}, {extra} FROM ({typed_select_sql(header)})",
            params,
        ).fetchall()[0][0]
    except duckdb.ConstraintException:
        return None  # a user id repeated in the file or already stored
    except duckdb.InvalidInputException as exc:
        if NOT_CLEAN in str(exc):
            return None
        raise
    if _reader_errors(conn, header.file_name):
        return None
    # Transaction ids must be new and unique: no copies within the file, none stored before.
    if header.kind is FileKind.TRANSACTIONS and inserted:
        low, high = _id_range(conn, file_id)
        if _has_copies(conn, file_id, int(inserted), low, high) or _stored_ids_among(
            conn, file_id, low, high
        ):
            return None
    return Applied(loaded=int(inserted))


# Distinct ids are counted with a bitmap over the file's id range when it is dense enough:
# 10M ids in 0.05 s, against 0.9 s for count(DISTINCT).
BITMAP_MAX_BITS = 1 << 28  # 32 MiB


def _id_range(conn: duckdb.DuckDBPyConnection, file_id: int) -> tuple[int, int]:
    low, high = one_row(
        conn,
        "SELECT min(transaction_id), max(transaction_id) FROM transactions WHERE file_id = $f",
        {"f": file_id},
    )
    return int(low), int(high)


def _has_copies(
    conn: duckdb.DuckDBPyConnection, file_id: int, rows: int, low: int, high: int
) -> bool:
    """Whether an id appears more than once among the rows this file appended (ids in
    ``low``..``high``)."""
    if high - low < BITMAP_MAX_BITS:
        distinct = one_row(
            conn,
            "SELECT bit_count(bitstring_agg(transaction_id, $low, $high)) "
            "FROM transactions WHERE file_id = $f",
            {"f": file_id, "low": low, "high": high},
        )[0]
    else:
        distinct = one_row(
            conn,
            "SELECT count(DISTINCT transaction_id) FROM transactions WHERE file_id = $f",
            {"f": file_id},
        )[0]
    return int(distinct) != rows


def _stored_ids_among(conn: duckdb.DuckDBPyConnection, file_id: int, low: int, high: int) -> int:
    """How many of this file's transaction ids earlier files already stored. The id range and
    ``file_id <`` (earlier files have smaller ids) let zone maps skip the other row groups;
    only when earlier rows fall in the range are the file's ids matched against them."""
    params = {"file_id": file_id, "low": low, "high": high}
    in_range = """FROM transactions t
        WHERE t.transaction_id BETWEEN $low AND $high AND t.file_id < $file_id"""
    if not one_row(conn, "SELECT count(*) " + in_range, params)[0]:
        return 0
    return int(
        one_row(
            conn,
            f"""SELECT count(*) {in_range} AND t.transaction_id IN
                (SELECT transaction_id FROM transactions WHERE file_id = $file_id)""",
            params,
        )[0]
    )


# --- reference path ---------------------------------------------------------------------------


def _arrow_rows(rows: ValidatedRows) -> pa.Table:
    arrays = {
        name: pa.array(values, type=ARROW_TYPES[name]) for name, values in rows.columns.items()
    }
    arrays["line"] = pa.array(rows.lines, type=pa.int64())
    arrays["raw_line"] = pa.array(rows.raw_lines, type=pa.string())
    return pa.table(arrays)


def _arrow_rejects(rejects: list[Reject]) -> pa.Table:
    return pa.table(
        {
            "line_number": pa.array([r.line_number for r in rejects], type=pa.int64()),
            "reason": pa.array([str(r.reason) for r in rejects], type=pa.string()),
            "message": pa.array([r.message for r in rejects], type=pa.string()),
            "raw_line": pa.array([r.raw_line for r in rejects], type=pa.string()),
        }
    )


def _append_arrow(conn: duckdb.DuckDBPyConnection, table: str, rows: pa.Table) -> None:
    conn.register("arrow_batch", rows)
    try:
        conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM arrow_batch")
    finally:
        conn.unregister("arrow_batch")


STAGED_COLUMNS = {
    FileKind.TRANSACTIONS: "transaction_id BIGINT, user_id BIGINT, transaction_date DATE, "
    "amount DECIMAL(18, 2), transaction_type VARCHAR",
    FileKind.USERS: "user_id BIGINT, signup_date DATE, country VARCHAR",
}

# Copies of one id within the file: identical copies load once (the first), differing copies
# are all rejected.
# The ids seen more than once are found first (one BIGINT grouped): comparing the contents of
# every id cost 4.4 s of a 10M-row file, those of the few repeated ones nothing.
IN_FILE_COPIES = """
CREATE OR REPLACE TEMP TABLE staged_copies AS
SELECT {key} AS id, count(*) AS copies,
       count(DISTINCT ({content})) AS variants, min(line) AS first_line
FROM staged
WHERE {key} IN (SELECT {key} FROM staged GROUP BY {key} HAVING count(*) > 1)
GROUP BY {key}
"""

STORED_TRANSACTION_CONFLICTS = """
INSERT INTO staged_rejects
SELECT s.line, 'conflicts_with_stored',
       'transaction_id ' || s.transaction_id || ' is stored (file #' || t.file_id
           || ') with different content',
       s.raw_line
FROM candidates s JOIN transactions t USING (transaction_id)
WHERE (s.user_id, s.transaction_date, s.amount, s.transaction_type)
      IS DISTINCT FROM (t.user_id, t.transaction_date, t.amount, t.transaction_type)
"""


def _create_staging(conn: duckdb.DuckDBPyConnection, kind: FileKind) -> None:
    conn.execute(
        f"CREATE OR REPLACE TEMP TABLE staged ({STAGED_COLUMNS[kind]}, line BIGINT, "
        "raw_line VARCHAR)"
    )
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE staged_rejects (line_number BIGINT, reason VARCHAR, "
        "message VARCHAR, raw_line VARCHAR)"
    )


def _stage_batch(conn: duckdb.DuckDBPyConnection, batch: ValidatedRows) -> None:
    if batch.lines:
        _append_arrow(conn, "staged", _arrow_rows(batch))
    if batch.rejects:
        _append_arrow(conn, "staged_rejects", _arrow_rejects(batch.rejects))


def append_reference(
    conn: duckdb.DuckDBPyConnection, path: Path, header: Header, file_id: int
) -> Applied:
    """Stage the whole file through validate_rows (Python, line numbers), then resolve it."""
    _create_staging(conn, header.kind)
    for batch in validate_rows(path, header):
        _stage_batch(conn, batch)
    applied = _resolve_staged(conn, header.kind, file_id)
    return _store_rejects(conn, file_id, applied)


def append_located(
    conn: duckdb.DuckDBPyConnection, path: Path, header: Header, file_id: int
) -> Applied | None:
    """Stage with DuckDB's reader, send only the rows failing a fast check through the
    reference rules, and find line numbers for the rejects alone.

    A record's ordinal (its row number in the reader's output) stands in for its line until
    the end. When every line after the header is one record or one line the reader set aside
    (no record spans lines, no empty line but at the end: ``_by_line``), lines follow from
    ordinals and the lines set aside (``_lines_around``), and records set aside (a wrong field
    count, a line of spaces) are rejected by the line DuckDB reports. Otherwise records are
    counted as validate_rows counts them, and a file with records set aside is left to the
    reference path (None: the caller rolls back, the reader's reject table with it).
    """
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE staged_raw AS " + located_select_sql(header),
        {"path": str(path), "skip": header.line_number},
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
        found_aside = (
            _reader_rejects(conn, header, aside) if _by_line(conn, path, header, aside) else None
        )
        if found_aside is None:
            return None
        reader_rejects = found_aside
    kind = header.kind
    columns = ", ".join(COLUMNS[kind])
    _create_staging(conn, kind)
    conn.execute(f"INSERT INTO staged SELECT {columns}, ordinal, NULL FROM staged_raw WHERE ok")
    # Rows failing a fast check go through the reference rules, a page at a time (a cursor
    # would not see this transaction's temp tables).
    batcher = Batcher(header)
    after = 0
    while rows := conn.execute(
        "SELECT ordinal, raw_fields FROM staged_raw WHERE NOT ok AND ordinal > $after "
        "ORDER BY ordinal LIMIT $page",
        {"after": after, "page": BATCH_ROWS},
    ).fetchall():
        for ordinal, fields in rows:
            batcher.add(ordinal, [f or "" for f in fields])
        after = rows[-1][0]
        _stage_batch(conn, batcher.take())
    applied = _resolve_staged(conn, kind, file_id)
    # Ordinals -> lines, for the rejects only; raw text for those found in SQL.
    found = conn.execute(
        """SELECT s.line_number, r.raw_fields FROM staged_rejects s
           JOIN staged_raw r ON r.ordinal = s.line_number"""
    ).fetchall()
    ordinals = {ordinal for ordinal, _ in found}
    if aside:  # lines are records (checked above)
        lines = _lines_around(header, ordinals, [line for line, _, _ in aside])
    else:
        by_line = bool(found) and _by_line(conn, path, header, aside)
        lines = record_lines(path, header, ordinals, by_line=by_line)
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
            _append_arrow(conn, "staged_rejects", _arrow_rejects(reader_rejects))
        # The reader appends to these tables: the next file must find only its own rows.
        conn.execute("DELETE FROM ingest_csv_errors")
        conn.execute("DELETE FROM ingest_csv_scans")
    return _store_rejects(conn, file_id, applied)


READER_REJECT_TYPES = ["TOO MANY COLUMNS", "MISSING COLUMNS", "LINE SIZE OVER MAXIMUM"]
_TOO_LONG = "LINE SIZE OVER MAXIMUM"


def _by_line(
    conn: duckdb.DuckDBPyConnection,
    path: Path,
    header: Header,
    aside: list[tuple[int, str, str]],
) -> bool:
    """Whether every line after the header is one record the reader kept or one of the lines
    it set aside: then no record spans lines, and DuckDB's line numbers are the file's."""
    (kept,) = one_row(conn, "SELECT count(*) FROM staged_raw")
    return int(kept) + len(aside) == data_lines(path) - header.line_number


def _reader_rejects(
    conn: duckdb.DuckDBPyConnection, header: Header, aside: list[tuple[int, str, str]]
) -> list[Reject] | None:
    """The lines the reader set aside as the reference path rejects them (blank lines of
    spaces skipped, lines over LINE_MAX_BYTES rejected as too long); None if it set one aside
    for another reason than its field count or length, or if Python's csv reads a line
    otherwise."""
    other = one_row(
        conn,
        "SELECT count(*) FROM ingest_csv_errors WHERE error_type NOT IN $types",
        {"types": READER_REJECT_TYPES},
    )[0]
    if other:
        return None
    batcher = Batcher(header)
    for line, text, error_type in aside:
        if error_type == _TOO_LONG:
            batcher.add(int(line), LongRecord(text.rstrip("\r\n")[:QUOTE_CHARS]))
            continue
        fields = next(csv.reader([text.rstrip("\r\n")]), [])
        if is_blank(fields):
            continue
        if len(fields) == header.field_count:
            return None
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


def _resolve_staged(conn: duckdb.DuckDBPyConnection, kind: FileKind, file_id: int) -> Applied:
    """From ``staged`` (good rows, with their line) to the base tables: copies within the file,
    rows already stored, the append. Rejects go to ``staged_rejects``."""
    key = COLUMNS[kind][0]
    content = ", ".join(COLUMNS[kind][1:])
    conn.execute(IN_FILE_COPIES.format(key=key, content=content))
    conn.execute(
        f"""INSERT INTO staged_rejects
        SELECT s.line, 'duplicate_in_file',
               '{key} ' || s.{key} || ' appears in this file with different content',
               s.raw_line
        FROM staged s JOIN staged_copies c ON s.{key} = c.id WHERE c.variants > 1"""
    )
    # One row per id that survives: no differing copies, first line among identical copies.
    conn.execute(
        f"""CREATE OR REPLACE TEMP TABLE candidates AS
        SELECT s.* FROM staged s LEFT JOIN staged_copies c ON s.{key} = c.id
        WHERE c.id IS NULL OR (c.variants = 1 AND s.line = c.first_line)"""
    )
    in_file_copies = one_row(
        conn, "SELECT coalesce(sum(copies - 1), 0) FROM staged_copies WHERE variants = 1"
    )
    applied = Applied(duplicate=int(in_file_copies[0]))
    if kind is FileKind.TRANSACTIONS:
        _resolve_transactions(conn, file_id, applied)
    else:
        _resolve_users(conn, file_id, applied)
    for table in ("staged", "staged_copies", "candidates"):
        conn.execute(f"DROP TABLE {table}")
    return applied


def _store_rejects(conn: duckdb.DuckDBPyConnection, file_id: int, applied: Applied) -> Applied:
    conn.execute(
        "INSERT INTO rejects SELECT $file_id, line_number, reason, message, raw_line "
        "FROM staged_rejects ORDER BY line_number",
        {"file_id": file_id},
    )
    applied.rejected_by_reason = dict(
        conn.execute("SELECT reason, count(*) FROM staged_rejects GROUP BY reason").fetchall()
    )
    conn.execute("DROP TABLE staged_rejects")
    return applied


def _resolve_transactions(conn: duckdb.DuckDBPyConnection, file_id: int, applied: Applied) -> None:
    conflicts = conn.execute(STORED_TRANSACTION_CONFLICTS).fetchall()[0][0]
    stored = one_row(
        conn, "SELECT count(*) FROM candidates s SEMI JOIN transactions t USING (transaction_id)"
    )
    applied.duplicate += int(stored[0]) - int(conflicts)
    inserted = conn.execute(
        """INSERT INTO transactions
        SELECT transaction_id, user_id, transaction_date, amount, transaction_type, $file_id
        FROM candidates s ANTI JOIN transactions t USING (transaction_id)""",
        {"file_id": file_id},
    ).fetchall()
    applied.loaded = int(inserted[0][0])


def _resolve_users(conn: duckdb.DuckDBPyConnection, file_id: int, applied: Applied) -> None:
    # Latest file wins; a profile identical to the stored one is a duplicate, not an update.
    conn.execute(
        """CREATE OR REPLACE TEMP TABLE users_identical AS
        SELECT s.user_id FROM candidates s JOIN users u USING (user_id)
        WHERE s.signup_date = u.signup_date AND s.country = u.country"""
    )
    applied.duplicate += int(one_row(conn, "SELECT count(*) FROM users_identical")[0])
    inserted = conn.execute(
        """INSERT INTO users
        SELECT user_id, signup_date, country, $file_id, $now
        FROM candidates s ANTI JOIN users_identical i USING (user_id)
        ON CONFLICT (user_id) DO UPDATE SET
            signup_date = excluded.signup_date,
            country = excluded.country,
            file_id = excluded.file_id,
            updated_at = excluded.updated_at""",
        {"file_id": file_id, "now": utc_now()},
    ).fetchall()
    applied.loaded = int(inserted[0][0])
    conn.execute("DROP TABLE users_identical")
