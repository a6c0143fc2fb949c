"""The load paths: one file's rows into the base tables, inside the caller's transaction. Which
are tried, in which order, for which kind of file: ``ladder.py``.

* ``Fast``: a file whose every field passes its check, straight from DuckDB's reader in one
  statement. Users: only a clean file of new users. Transactions: then ``_reconcile`` sees to
  ids repeated in the file or stored and lines the reader set aside.
* ``Checked`` (transactions): every row passing the fast checks in one statement; then
  ``_reconcile`` reads the file again for the rows that need more (those failing a check, those
  of a contested id), which go through the reference rules and ``resolve``.
* ``Located`` (users): DuckDB stages the file; only the rows failing a fast check go through the
  reference rules (validate.Batcher), and line numbers are found for the rejects alone.
* ``Reference``: validate_rows reads every record itself (wrong field counts in a file whose
  records span lines, odd lines, wide files). It never gives up.
All but the fast one share ``resolve``: copies within the file, rows already stored, the append.
Every path stores its rejects through ``pending.store_rejects``, raw lines kept up to
``Load.line_bytes``.
"""

from __future__ import annotations

import bisect
import contextlib
import csv
from collections.abc import Iterator
from dataclasses import dataclass

import duckdb
import pyarrow as pa

from moneylion import candidates
from moneylion.db import append_arrow, one_row, utc_now
from moneylion.errors import FileFailure, FileRefused
from moneylion.load import Applied, Fallback, Load
from moneylion.model import COLUMNS, TABLES, FileKind
from moneylion.pending import GatheredRows, arrow_rejects, create_pending, store_rejects
from moneylion.reader import (
    located_of_marked_sql,
    located_select_sql,
    marked_select_sql,
    typed_select_sql,
)
from moneylion.resolve import resolve
from moneylion.validate import (
    QUOTE_CHARS,
    Batcher,
    Header,
    LongRecord,
    Reject,
    Source,
    data_lines,
    is_blank,
    raw_text,
    record_lines,
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


class Fast:
    """Append a file whose every field passes its check straight from DuckDB's reader in one
    statement: a field failing its check aborts the statement through error() (a Fallback: the
    next path appends the rows that pass, and reads again for the others).

    Users: a Fallback too when a line is set aside (a wrong field count lands in the reader's
    reject table) or a user id is repeated or stored (the PRIMARY KEY). Transactions: then
    ``_reconcile`` decides the rest.
    """

    name = "append_fast"
    uses_reader = True

    def run(self, load: Load) -> Applied | Fallback:
        conn, source, header, file_id = load.conn, load.source, load.header, load.file_id
        key, *rest = COLUMNS[header.kind]
        guarded = ", ".join([abort_unless("ok", key), *rest])
        users = header.kind is FileKind.USERS
        params = {**_read_params(source, header), "file_id": file_id}
        if users:
            params["now"] = utc_now()
        insert = (
            f"INSERT INTO {TABLES[header.kind].name} SELECT {guarded}, $file_id"
            f"{', $now' if users else ''} FROM ({typed_select_sql(header)})"
        )
        try:
            if not users:
                return _reconcile(load, _append(load, insert, params), failing=False)
            inserted = conn.execute(insert, params).fetchall()[0][0]
        except duckdb.ConstraintException:
            return Fallback("a user id is repeated in the file or already stored")
        except duckdb.InvalidInputException as exc:
            if not_clean(exc):
                return Fallback("a field fails its check")
            raise
        if aside := _reader_errors(conn, header.file_name):
            return Fallback(f"the reader set {aside} line(s) aside (field count or length)")
        return Applied(loaded=int(inserted))


def _read_params(source: Source, header: Header) -> dict[str, object]:
    """The parameters of ``read_csv_sql``: the file DuckDB reads, the lines up to the header."""
    return {"path": str(source.disk_path()), "skip": header.line_number}


class Checked:
    """Append a file of transactions with fields failing their checks: every row passing them
    in one statement from DuckDB's reader, then (``_reconcile``) the rest."""

    name = "append_checked"
    uses_reader = True

    def run(self, load: Load) -> Applied | Fallback:
        conn, source, header, file_id = load.conn, load.source, load.header, load.file_id
        kind = header.kind
        with _without_filter_pushdown(conn):
            appended = _append(
                load,
                f"INSERT INTO {TABLES[kind].name} SELECT {', '.join(COLUMNS[kind])}, $file_id "
                f"FROM ({typed_select_sql(header)}) WHERE ok",
                {**_read_params(source, header), "file_id": file_id},
            )
        return _reconcile(load, appended, failing=True)


@dataclass(frozen=True)
class _Appended:
    """The rows of transactions a path appended from the reader: how many, their ids' range
    (0, 0 when none), and whether an id is repeated among them."""

    rows: int
    low: int = 0
    high: int = 0
    repeated: bool = False


def _append(load: Load, insert: str, params: dict[str, object]) -> _Appended:
    """Run ``insert`` (rows of transactions from the reader, with ``file_id``) and describe
    what it appended. A file up to ``Tuning.ids_back_bytes`` hands its ids back (RETURNING):
    their range and copies are known without another statement; a larger one is asked for
    them (a range lookup, a bitmap count)."""
    conn, file_id = load.conn, load.file_id
    if load.source.csv_size <= load.tuning.ids_back_bytes:
        ids = [
            row[0] for row in conn.execute(f"{insert} RETURNING transaction_id", params).fetchall()
        ]
        if not ids:
            return _Appended(0)
        return _Appended(len(ids), min(ids), max(ids), len(set(ids)) != len(ids))
    inserted = int(conn.execute(insert, params).fetchall()[0][0])
    if not inserted:
        return _Appended(0)
    low, high = _id_range(conn, file_id)
    mine: dict[str, object] = {"f": file_id}
    repeated = distinct_ids(conn, "transaction_id", _APPENDED, mine, low, high) != inserted
    return _Appended(inserted, low, high, repeated)


@contextlib.contextmanager
def _without_filter_pushdown(conn: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Inside: DuckDB does not push a filter on a computed column (``ok``) into the projection
    computing it, where it would substitute the expression and cast every field twice, before
    and after the filter (bench/micro.py --only pushdown)."""
    (before,) = one_row(conn, "SELECT current_setting('disabled_optimizers')")
    names = ", ".join(name for name in (before, "filter_pushdown") if name)
    conn.execute(f"SET disabled_optimizers = '{names}'")
    try:
        yield
    finally:
        conn.execute(
            f"SET disabled_optimizers = '{before}'" if before else "RESET disabled_optimizers"
        )


def _reconcile(load: Load, appended: _Appended, *, failing: bool) -> Applied | Fallback:
    """After the rows of a transactions file that pass the fast checks were ``appended``
    (``failing``: others may have failed them), the rest.

    A file is done when nothing else is left: no line set aside by the reader, no id repeated
    in the file or stored (a bitmap count, a range lookup), and, if rows may have failed, the
    rows appended account for every line after the header. Otherwise the file is read a second
    time for the rows that need more (those failing a check, with their ordinal and raw fields;
    those of an id repeated in the file or stored before, which leave the table again): a few
    rows, whatever the file's size. They go through the reference rules and ``resolve`` as the
    located path's do, and line numbers are found for the rejects alone. A Fallback only where
    lines cannot follow from the reader's rows (records span lines and the reader set some
    aside), or where the contested ids span too wide a range for their bitmap.
    """
    conn, source, header, file_id = load.conn, load.source, load.header, load.file_id
    kind = header.kind
    read = _read_params(source, header)
    inserted, span = appended.rows, (appended.low, appended.high)
    # One statement for the common case: the lines the reader set aside, the stored ids in
    # the appended ids' range (zone maps skip the other row groups).
    set_aside, not_utf8, stored = one_row(
        conn,
        f"SELECT ({_READER_ERRORS_SQL}), ({_NOT_UTF8_SQL}), "
        f"({f'SELECT count(*) {_IN_RANGE}{_BEFORE}' if inserted else 'SELECT 0'})",
        {"low": appended.low, "high": appended.high, "before": file_id} if inserted else {},
    )
    _refuse_not_utf8(not_utf8, header.file_name)
    aside = _lines_set_aside(conn) if set_aside else []
    # The lines after the header, counted only when rows may have failed or lines were set
    # aside: else every record the reader read was appended.
    records = data_lines(source) - header.line_number if failing or aside else None
    if not appended.repeated and not stored and not aside and records in (None, inserted):
        return Applied(loaded=inserted)
    contested = _contested_ids(conn, file_id, appended, stored=bool(stored))
    if contested and span[1] - span[0] >= BITMAP_MAX_BITS:
        return Fallback("ids repeated or stored, in a range too wide to mark them", final=True)
    spanning = Fallback("records span lines and the reader set some aside", final=True)
    if aside and not failing and inserted + len(aside) != records:
        return spanning  # known before reading again: the reader kept the rows appended
    # The rows that need more than the fast checks, read again: those failing a check and
    # those of a contested id.
    _read_again(conn, header, read, span, failing=failing, create=True)
    (failed,) = one_row(conn, "SELECT count(*) FILTER (WHERE NOT ok) FROM pending_raw")
    reader_rows = inserted + int(failed)  # the reader's rows
    reader_rejects: list[Reject] = []
    if aside:
        if reader_rows + len(aside) != records:  # records span lines: DuckDB's line numbers are not
            return spanning
        found_aside = _reader_rejects(conn, header, aside)
        if isinstance(found_aside, Fallback):
            return found_aside
        reader_rejects = found_aside
    create_pending(conn, kind)
    moved = _unappend(conn, file_id)
    _recheck_failing(conn, header, file_id, load.tuning.reference_batch_rows)
    # A row that failed a fast check but passes the reference rules may share its id with a row
    # appended: those ids are contested too.
    conn.execute(
        "INSERT INTO contested SELECT DISTINCT transaction_id FROM pending "
        f"WHERE transaction_id IN ({_APPENDED})",
        {"f": file_id},
    )
    if one_row(conn, f"SELECT count(*) FROM ({_NOT_UNAPPENDED})")[0]:  # contested late
        _read_again(conn, header, read, span, failing=False)
        moved += _unappend(conn, file_id)
    conn.execute(
        f"INSERT INTO pending SELECT $f, {', '.join(COLUMNS[kind])}, ordinal, NULL "
        "FROM pending_raw WHERE ok AND transaction_id IN (SELECT id FROM unappended)",
        {"f": file_id},
    )
    applied = resolve(conn, kind).get(file_id, Applied())
    applied.loaded += inserted - moved
    _place_rejects(
        conn,
        source,
        header,
        file_id,
        aside,
        reader_rejects,
        reader_rows=reader_rows,
        records=records,
    )
    conn.execute("DROP TABLE contested; DROP TABLE unappended")
    applied.rejected_by_reason = store_rejects(conn, load.line_bytes).get(file_id, {})
    return applied


_APPENDED = "SELECT transaction_id FROM transactions WHERE file_id = $f"  # a file's ids
# The contested ids whose appended rows are still in the table.
_NOT_UNAPPENDED = "SELECT id FROM contested WHERE id NOT IN (SELECT id FROM unappended)"


def _read_again(
    conn: duckdb.DuckDBPyConnection,
    header: Header,
    read: dict[str, object],
    span: tuple[int, int],
    *,
    failing: bool,
    create: bool = False,
) -> None:
    """Add to ``pending_raw`` (``create``: a new one) the records of the contested ids not yet
    taken out of the table, and (``failing``) those failing a fast check: ordinal, typed
    columns, ``ok`` and raw fields, as ``located_select_sql`` gives them.

    The ids are marked by a bitmap over ``span`` (the file's id range) passed as a constant,
    not matched by a join: a join in the read would not keep the file's order, hence the
    ordinals (marked_select_sql).
    """
    (bits,) = one_row(
        conn,
        f"SELECT CAST(bitstring_agg(id, $low, $high) AS VARCHAR) FROM ({_NOT_UNAPPENDED})",
        {"low": span[0], "high": span[1]},
    )
    wanted = ["NOT ok"] if failing else []
    params = dict(read)
    if bits is not None:
        # CASE, not AND: only an id in the range may index the bitmap.
        wanted.append(
            "CASE WHEN transaction_id BETWEEN $low AND $high "
            "THEN get_bit(CAST($bits AS BIT), CAST(transaction_id - $low AS INTEGER)) = 1 END"
        )
        params.update(bits=bits, low=span[0], high=span[1])
    conn.execute(
        "CREATE OR REPLACE TEMP TABLE marked AS "
        + marked_select_sql(header, " OR ".join(wanted) or "false"),
        params,
    )
    rows = located_of_marked_sql(header, "marked")
    if create:
        conn.execute(f"CREATE OR REPLACE TEMP TABLE pending_raw AS {rows}")
    else:
        conn.execute(f"INSERT INTO pending_raw {rows}")
    conn.execute("DROP TABLE marked")


def _contested_ids(
    conn: duckdb.DuckDBPyConnection, file_id: int, appended: _Appended, *, stored: bool
) -> int:
    """Fill the temp table ``contested`` with the ids of the file's ``appended`` rows that
    ``resolve`` must decide (repeated in the file, or ``stored`` by an earlier file), and make
    ``unappended`` (those taken out of the table again) empty; how many ids are contested."""
    conn.execute("CREATE OR REPLACE TEMP TABLE contested (id BIGINT)")
    conn.execute("CREATE OR REPLACE TEMP TABLE unappended (id BIGINT)")
    mine: dict[str, object] = {"f": file_id}
    if appended.repeated:
        conn.execute(
            f"INSERT INTO contested SELECT transaction_id FROM ({_APPENDED}) "
            "GROUP BY ALL HAVING count(*) > 1",
            mine,
        )
    if stored:
        low, high = appended.low, appended.high
        stored_ids_among(conn, _APPENDED, mine, low, high, before_file=file_id, into="contested")
    if not (appended.repeated or stored):
        return 0
    return int(one_row(conn, "SELECT count(*) FROM contested")[0])


def _unappend(conn: duckdb.DuckDBPyConnection, file_id: int) -> int:
    """Take the file's appended rows of the contested ids not yet taken out of the table again
    (``resolve`` decides them, from their pending copies); how many rows left it."""
    conn.execute(f"INSERT INTO unappended SELECT DISTINCT id FROM ({_NOT_UNAPPENDED})")
    return int(
        conn.execute(
            "DELETE FROM transactions WHERE file_id = $f "
            "AND transaction_id IN (SELECT id FROM unappended)",
            {"f": file_id},
        ).fetchall()[0][0]
    )


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


# Stored rows with an id in $low..$high (zone maps skip the other row groups); _BEFORE: stored
# by files before $before.
_IN_RANGE = "FROM transactions t WHERE t.transaction_id BETWEEN $low AND $high"
_BEFORE = " AND t.file_id < $before"


def stored_ids_among(
    conn: duckdb.DuckDBPyConnection,
    ids_sql: str,
    params: dict[str, object],
    low: int,
    high: int,
    *,
    before_file: int | None = None,
    into: str | None = None,
) -> int:
    """How many of the transaction ids ``ids_sql`` selects (all in ``low``..``high``) are
    stored, by files before ``before_file`` if it is given (earlier files have smaller ids);
    ``into``: those ids, each once, are also put into that table (how many: the result).
    The id range (and file bound) let zone maps skip the other row groups; only when stored
    rows fall in the range are the ids matched against them."""
    bounds: dict[str, object] = {"low": low, "high": high}
    in_range = _IN_RANGE
    if before_file is not None:
        in_range += _BEFORE
        bounds["before"] = before_file
    if not one_row(conn, "SELECT count(*) " + in_range, bounds)[0]:
        return 0
    among = f"{in_range} AND t.transaction_id IN ({ids_sql})"
    if into is not None:
        among = f"INSERT INTO {into} SELECT DISTINCT t.transaction_id {among}"
    else:
        among = f"SELECT count(*) {among}"
    return int(one_row(conn, among, {**params, **bounds})[0])


# --- reference path ---------------------------------------------------------------------------


class Reference:
    """Stage the whole file through validate_rows (Python, line numbers), then resolve it."""

    name = "append_reference"
    uses_reader = False

    def run(self, load: Load) -> Applied:
        conn, header = load.conn, load.header
        create_pending(conn, header.kind)
        rows_in = GatheredRows(header.kind)
        for batch in validate_rows(load.source, header, load.tuning.reference_batch_rows):
            rows_in.add(load.file_id, batch)
            rows_in.flush(conn)  # a batch at a time: memory stays flat
        return _one_file(conn, header.kind, load.file_id, load.line_bytes)


def _one_file(
    conn: duckdb.DuckDBPyConnection, kind: FileKind, file_id: int, line_bytes: int
) -> Applied:
    """``resolve`` and ``store_rejects`` for the one file staged."""
    applied = resolve(conn, kind).get(file_id, Applied())
    applied.rejected_by_reason = store_rejects(conn, line_bytes).get(file_id, {})
    return applied


class Located:
    """Stage with DuckDB's reader, send only the rows failing a fast check through the
    reference rules, and find line numbers for the rejects alone.

    A record's ordinal (its row number in the reader's output) stands in for its line until
    the end. When every line after the header is one record or one line the reader set aside
    (no record spans lines, no empty line but at the end), lines follow from ordinals and the
    lines set aside (``_lines_around``), and records set aside (a wrong field count, a line of
    spaces) are rejected by the line DuckDB reports. Otherwise records are counted as
    validate_rows counts them, and a file with records set aside is left to the reference path
    (a Fallback: the caller rolls back, the reader's reject table with it).
    """

    name = "append_located"
    uses_reader = True

    def run(self, load: Load) -> Applied | Fallback:
        conn, source, header, file_id = load.conn, load.source, load.header, load.file_id
        conn.execute(
            "CREATE OR REPLACE TEMP TABLE pending_raw AS " + located_select_sql(header),
            _read_params(source, header),
        )
        aside = _aside_lines(conn, header.file_name)
        reader_rows = int(one_row(conn, "SELECT count(*) FROM pending_raw")[0])
        reader_rejects: list[Reject] = []
        if aside:
            if reader_rows + len(aside) != data_lines(source) - header.line_number:
                return Fallback("records span lines and the reader set some aside")
            found_aside = _reader_rejects(conn, header, aside)
            if isinstance(found_aside, Fallback):
                return found_aside
            reader_rejects = found_aside
        kind = header.kind
        columns = ", ".join(COLUMNS[kind])
        create_pending(conn, kind)
        conn.execute(
            f"INSERT INTO pending SELECT $file_id, {columns}, ordinal, NULL "
            "FROM pending_raw WHERE ok",
            {"file_id": file_id},
        )
        _recheck_failing(conn, header, file_id, load.tuning.reference_batch_rows)
        applied = resolve(conn, kind).get(file_id, Applied())
        _place_rejects(
            conn, source, header, file_id, aside, reader_rejects, reader_rows=reader_rows
        )
        applied.rejected_by_reason = store_rejects(conn, load.line_bytes).get(file_id, {})
        return applied


def _recheck_failing(
    conn: duckdb.DuckDBPyConnection, header: Header, file_id: int, page_rows: int
) -> None:
    """The rows of ``pending_raw`` failing a fast check through the reference rules, into the
    staging tables, a page at a time (a cursor would not see this transaction's temp
    tables); a record's ordinal stands in for its line."""
    batcher = Batcher(header)
    rows_in = GatheredRows(header.kind)
    after = 0
    while rows := conn.execute(
        "SELECT ordinal, raw_fields FROM pending_raw WHERE NOT ok AND ordinal > $after "
        "ORDER BY ordinal LIMIT $page",
        {"after": after, "page": page_rows},
    ).fetchall():
        for ordinal, fields in rows:
            batcher.add(ordinal, [f or "" for f in fields])
        after = rows[-1][0]
        rows_in.add(file_id, batcher.take())
        rows_in.flush(conn)


def _place_rejects(
    conn: duckdb.DuckDBPyConnection,
    source: Source,
    header: Header,
    file_id: int,
    aside: list[tuple[int, str, str]],
    reader_rejects: list[Reject],
    *,
    reader_rows: int,
    records: int | None = None,
) -> None:
    """The rejects pending by ordinal moved to their lines, with the raw text of those found in
    SQL (from ``pending_raw``, then dropped); the lines the reader set aside added by their own
    line. ``reader_rows``: the reader's records (when every line after the header is one of them,
    lines follow from ordinals; else records are counted as validate_rows counts them);
    ``records``: the lines after the header, if the caller counted them."""
    # The file's kept candidates (candidates.py) were pending by ordinal too: they get their
    # lines and raw text the same way, for the rejects a correction may make of them.
    kept = candidates.TABLE[header.kind] if candidates.WITH_LINE[header.kind] else None
    of_kept = f" UNION SELECT line_number FROM {kept} WHERE file_id = $f" if kept else ""
    found = conn.execute(
        f"""SELECT s.line_number, r.raw_fields
            FROM (SELECT line_number FROM pending_rejects{of_kept}) s
            JOIN pending_raw r ON r.ordinal = s.line_number""",
        {"f": file_id} if kept else {},
    ).fetchall()
    ordinals = {ordinal for ordinal, _ in found}
    if aside:  # lines are records (the caller checked)
        lines = _lines_around(header, ordinals, [line for line, _, _ in aside])
    else:
        if found and records is None:
            records = data_lines(source) - header.line_number
        by_line = bool(found) and reader_rows == records
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
            """UPDATE pending_rejects SET
                   raw_line = coalesce(pending_rejects.raw_line, m.raw), line_number = m.line
               FROM reject_lines m WHERE m.ordinal = pending_rejects.line_number"""
        )
        if kept:
            conn.execute(
                f"""UPDATE {kept} SET raw_line = coalesce({kept}.raw_line, m.raw),
                       line_number = m.line
                    FROM reject_lines m
                    WHERE {kept}.file_id = $f AND m.ordinal = {kept}.line_number""",
                {"f": file_id},
            )
    finally:
        conn.unregister("reject_lines")
    conn.execute("DROP TABLE pending_raw")
    if aside:
        if reader_rejects:  # already by their line
            append_arrow(
                conn, "pending_rejects", arrow_rejects([(file_id, r) for r in reader_rejects])
            )
        # The reader appends to these tables: the next file must find only its own rows.
        conn.execute("DELETE FROM ingest_csv_errors")
        conn.execute("DELETE FROM ingest_csv_scans")


READER_REJECT_TYPES = ["TOO MANY COLUMNS", "MISSING COLUMNS", "LINE SIZE OVER MAXIMUM"]
_TOO_LONG = "LINE SIZE OVER MAXIMUM"


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


def _aside_lines(conn: duckdb.DuckDBPyConnection, name: str) -> list[tuple[int, str, str]]:
    """The lines the reader set aside, one per line (it may report one error per column): its
    line number, text (a too-long line's first) and error type, in line order."""
    return _lines_set_aside(conn) if _reader_errors(conn, name) else []


def _lines_set_aside(conn: duckdb.DuckDBPyConnection) -> list[tuple[int, str, str]]:
    """``_aside_lines``, the reader's errors known to be there (and none of invalid UTF-8)."""
    return [
        (int(line), text, kind)
        for line, text, kind in conn.execute(
            "SELECT line, arg_min(csv_line, error_type <> $long), min(error_type) "
            "FROM ingest_csv_errors GROUP BY line ORDER BY line",
            {"long": _TOO_LONG},
        ).fetchall()
    ]


_READER_ERRORS_SQL = "SELECT count(*) FROM ingest_csv_errors"
_NOT_UTF8_SQL = "SELECT count(*) FROM ingest_csv_errors WHERE error_type = 'INVALID UNICODE'"


def _reader_errors(conn: duckdb.DuckDBPyConnection, name: str) -> int:
    """Rows DuckDB's reader set aside (wrong field count); invalid UTF-8 fails the file."""
    structural, not_utf8 = one_row(conn, f"SELECT ({_READER_ERRORS_SQL}), ({_NOT_UTF8_SQL})")
    _refuse_not_utf8(not_utf8, name)
    return int(structural)


def _refuse_not_utf8(not_utf8: int, name: str) -> None:
    """A file the reader found invalid UTF-8 in is refused whole."""
    if not_utf8:
        raise FileRefused(FileFailure.NOT_UTF8, f"{name} is not UTF-8")
