"""The DuckDB side of the row rules: ``read_csv`` over a pending file, and SQL for each field's
check and typed value, the same rules as ``validate.parse_field`` (``validate.RULES`` holds both
forms of each rule; ``tests/test_validate.py`` holds them equal on every field).

DuckDB's casts are lenient (``'12.0'`` -> 12, ``'1.234'`` -> 1.23, ``'1e3'`` -> 1000), so every
cast is guarded by a string check; a row failing one goes to the reference rules.
"""

from __future__ import annotations

from moneylion.model import COLUMNS, DOMAINS
from moneylion.validate import LINE_MAX_BYTES, RULES, Header

# DuckDB's reader reads an empty field as NULL by default, and then drops extra fields that
# are NULL (``1,2,3,,`` reads as 3 fields when 3 are declared). With no text reading as NULL,
# every record with another field count than the header's is set aside, as our policy wants.
NULL_TEXT = "\x01moneylion: never a field\x01"


def read_csv_sql(header: Header) -> str:
    """A DuckDB ``read_csv`` over ``$path`` with an explicit dialect and all-VARCHAR columns.

    The path is always a plain CSV (the Source decompressed it), whatever its name says.
    Explicit columns skip the sniffer (most of a small file's read time); ``store_rejects`` turns
    rows with a wrong field count or invalid UTF-8 into ``reject_errors`` instead of an error;
    empty fields read as ``''`` (NULL_TEXT).
    """
    columns = ", ".join(f"'c{i}': 'VARCHAR'" for i in range(header.field_count))
    return (
        "read_csv($path, header = false, skip = $skip, delim = ',', quote = '\"', escape = '\"', "
        "compression = 'none', "
        f"auto_detect = false, strict_mode = true, null_padding = false, "
        f"max_line_size = {LINE_MAX_BYTES}, "
        f"nullstr = '{NULL_TEXT}', allow_quoted_nulls = false, "
        "all_varchar = true, store_rejects = true, rejects_table = 'ingest_csv_errors', "
        f"rejects_scan = 'ingest_csv_scans', columns = {{{columns}}})"
    )


def _fill(template: str, **values: str) -> str:
    """A rule's SQL template with its ``{name}`` slots filled (the patterns' own braces stay)."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def _typed(name: str, raw: str) -> str:
    """SQL for the typed value of a raw field (meaningful only where ``_check`` holds)."""
    domain = DOMAINS[name]
    return _fill(RULES[domain.rule].typed, raw=raw, type=domain.duckdb)


def _check(name: str, raw: str) -> str:
    """SQL that is true only when the raw field passes the same rule as ``parse_field``."""
    test = _fill(RULES[DOMAINS[name].rule].check, raw=raw, typed=_typed(name, raw))
    return f"coalesce({test}, false)"


def _typed_items(header: Header) -> str:
    """The typed canonical columns and ``ok`` (every field passes its check), as select items
    over ``read_csv``'s raw columns."""
    parts = []
    checks = []
    bounded = header.bounded
    for name in COLUMNS[header.kind]:
        raw = f"c{header.positions[name]}"
        checks.append(_check(name, raw))
        if bounded and bounded[0] == name:  # future_date (a date's text is only digits and -)
            checks.append(
                f"coalesce({_typed(name, raw)} <= DATE '{bounded[1].isoformat()}', false)"
            )
        parts.append(f"{_typed(name, raw)} AS {name}")
    return f"{', '.join(parts)}, ({' AND '.join(checks)}) AS ok"


def typed_select_sql(header: Header) -> str:
    """Typed canonical columns plus ``ok`` (every field passes its check) from ``read_csv``."""
    return f"SELECT {_typed_items(header)} FROM {read_csv_sql(header)}"


def located_select_sql(header: Header) -> str:
    """Like typed_select_sql, plus each record's ordinal in the file and its raw fields.

    DuckDB keeps a file's order through the scan (preserve_insertion_order), so
    ``row_number() OVER ()`` numbers the records as they stand in the file.
    """
    raw = ", ".join(f"c{i}" for i in range(header.field_count))
    return (
        f"SELECT row_number() OVER () AS ordinal, {_typed_items(header)}, [{raw}] AS raw_fields "
        f"FROM {read_csv_sql(header)}"
    )


def marked_select_sql(header: Header, wanted: str) -> str:
    """Every record of the file as ``wanted`` (a condition on the typed columns and ``ok``)
    and, for the records it holds for alone, the raw fields (NULL for the others: a table of
    this costs a flag and an empty list per record, not a copy of the file; typed columns,
    even NULL, would take their full width). ``located_of_marked_sql`` reads it back.

    Made a table (in parallel; preserve_insertion_order keeps the file's order), its records
    are then numbered by ``row_number() OVER ()`` over the table, as located_select_sql numbers
    the file's: over the file, that window makes the scan and the checks run on one thread.
    ``wanted`` must not hold a join (``IN (SELECT ...)``, a long IN list): a join in the read
    does not keep the file's order, and the ordinals would be wrong (tests/test_ingest.py
    holds every reject of a large file to its line).
    """
    raw = ", ".join(f"c{i}" for i in range(header.field_count))
    return (
        f"SELECT wanted, CASE WHEN wanted THEN [{raw}] END AS raw_fields "
        f"FROM (SELECT coalesce({wanted}, false) AS wanted, {raw} "
        f"FROM (SELECT {_typed_items(header)}, {raw} FROM {read_csv_sql(header)}))"
    )


def located_of_marked_sql(header: Header, marked: str) -> str:
    """The records ``wanted`` in the table ``marked`` (marked_select_sql) as located_select_sql
    gives them: ordinal, typed columns and ``ok`` (the same rules, over the same text), raw
    fields."""
    fields = ", ".join(f"raw_fields[{i + 1}] AS c{i}" for i in range(header.field_count))
    numbered = f"SELECT row_number() OVER () AS ordinal, * FROM {marked}"
    return (
        f"SELECT ordinal, {_typed_items(header)}, raw_fields "
        f"FROM (SELECT ordinal, raw_fields, {fields} FROM ({numbered}) WHERE wanted)"
    )


def field_check_sql(column: str) -> str:
    """For tests: the fast path's verdict and typed value for one bound raw field ``$v``."""
    return f"SELECT {_check(column, '$v')}, {_typed(column, '$v')}"


def stored_check_sql(column: str, value: str) -> str:
    """SQL true only where ``value``, a typed value of ``column`` read from elsewhere (a lake
    row), is one these rules give: not NULL, and what they make of its own text (the same
    check and typed value as a CSV field's, over ``CAST(value AS VARCHAR)``)."""
    raw = f"CAST({value} AS VARCHAR)"
    return f"coalesce({_check(column, raw)} AND {_typed(column, raw)} = {value}, false)"
