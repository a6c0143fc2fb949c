"""The rows of one file into the base tables, inside the caller's transaction.

Three ways, tried in order by ingest.py:
* ``append_fast``: a clean, new file straight from DuckDB's reader in one statement.
* ``append_located``: DuckDB stages the file; only the rows failing a fast check go through the
  reference rules (validate.Batcher), and line numbers are found for the rejects alone.
* ``append_reference``: validate_rows reads every record itself (wrong field counts, odd lines).
The last two share ``_resolve_staged``: copies within the file, rows already stored, the append.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow as pa

from moneylion.schema import one_row
from moneylion.validate import (
    BATCH_ROWS,
    COLUMNS,
    Batcher,
    FileFailure,
    FileKind,
    FileRefused,
    Header,
    Reject,
    ValidatedRows,
    lines_are_records,
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
    if _reader_errors(conn, path):
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
IN_FILE_COPIES = """
CREATE OR REPLACE TEMP TABLE staged_copies AS
SELECT {key} AS id, count(*) AS copies,
       count(DISTINCT ({content})) AS variants, min(line) AS first_line
FROM staged GROUP BY {key} HAVING count(*) > 1
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

    A record's ordinal stands in for its line until the end. Records the reader set aside (a
    wrong field count, or a blank line of spaces) are placed by their line when every line of
    the file is one record (no quotes, carriage returns or empty lines: _place_reader_rejects);
    otherwise None (the caller rolls back and takes the reference path).
    """
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE staged_raw AS " + located_select_sql(header),
        {"path": str(path), "skip": header.line_number},
    )
    set_aside = _reader_errors(conn, path)
    if set_aside and not (lines_are_records(path) and _place_reader_rejects(conn, header)):
        return None
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
    lines = record_lines(path, header, {ordinal for ordinal, _ in found})
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
    if set_aside:
        conn.execute(READER_REJECTS, {"fields": header.field_count})  # already by their line
        # The reader appends to these tables: the next file must find only its own rows.
        conn.execute("DELETE FROM ingest_csv_errors")
        conn.execute("DELETE FROM ingest_csv_scans")
    return _store_rejects(conn, file_id, applied)


# The lines DuckDB's reader set aside (DISTINCT: a line may have several error rows), as offsets
# after the header line; ``skipped``: how many of them come before the reader's rows numbered
# above ``accepted`` (the rows it kept before that line).
READER_GAPS = """
CREATE OR REPLACE TEMP TABLE reader_gaps AS
SELECT offset_ - k AS accepted, max(k) AS skipped
FROM (SELECT line - $header_line AS offset_, row_number() OVER (ORDER BY line) AS k
      FROM (SELECT DISTINCT line FROM ingest_csv_errors))
GROUP BY ALL
"""
# Row n of the reader becomes the offset of its line after the header.
PLACED_RAW = """
CREATE OR REPLACE TEMP TABLE staged_raw_next AS
SELECT r.* REPLACE (r.ordinal + coalesce(g.skipped, 0) AS ordinal)
FROM staged_raw r ASOF LEFT JOIN reader_gaps g ON r.ordinal > g.accepted
"""
# The lines set aside are wrong_field_count rejects, in the reference's words (a line without
# quotes has one comma fewer than fields), but for blank lines of spaces and tabs, which
# validate_rows skips.
READER_REJECTS = """
INSERT INTO staged_rejects
SELECT line, 'wrong_field_count',
       'expected ' || $fields || ' fields, found '
           || (length(csv_line) - length(replace(csv_line, ',', '')) + 1),
       csv_line
FROM (SELECT DISTINCT line, csv_line FROM ingest_csv_errors)
WHERE trim(csv_line, ' \t') <> ''
"""


def _place_reader_rejects(conn: duckdb.DuckDBPyConnection, header: Header) -> bool:
    """Renumber ``staged_raw`` around the lines the reader set aside (a file of one record per
    line); False if it set a line aside for another reason than its field count."""
    other = one_row(
        conn,
        "SELECT count(*) FROM ingest_csv_errors WHERE error_type NOT IN $types",
        {"types": ["TOO MANY COLUMNS", "MISSING COLUMNS"]},
    )[0]
    if other:
        return False
    conn.execute(READER_GAPS, {"header_line": header.line_number})
    conn.execute(PLACED_RAW)
    conn.execute("DROP TABLE reader_gaps")
    _replace_staged_raw(conn)
    return True


def _replace_staged_raw(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute("DROP TABLE staged_raw")
    conn.execute("ALTER TABLE staged_raw_next RENAME TO staged_raw")


def _reader_errors(conn: duckdb.DuckDBPyConnection, path: Path) -> int:
    """Rows DuckDB's reader set aside (wrong field count); invalid UTF-8 fails the file."""
    structural, not_utf8 = one_row(
        conn,
        "SELECT count(*), count(*) FILTER (WHERE error_type = 'INVALID UNICODE') "
        "FROM ingest_csv_errors",
    )
    if not_utf8:
        raise FileRefused(FileFailure.NOT_UTF8, f"{path.name} is not UTF-8")
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
