"""CSV -> typed rows + rejected rows: the header's rules, and each field's rule twice over.

* ``validate_rows`` (``Batcher`` for records read elsewhere) is the reference: Python's csv
  module, every rule, the 1-based line number where each record starts. It decides every row
  that has anything to reject.
* ``RULES`` holds each field rule's reference (``parse``) beside its SQL form (``typed`` and
  ``check``), which ``reader.py`` writes into DuckDB's read; ``tests/test_validate.py`` holds
  both equal on every field.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from moneylion.errors import FileFailure, FileRefused
from moneylion.model import COLUMNS, DOMAINS, TRANSACTION_TYPES, FileKind, Rule
from moneylion.rules import ARRIVAL_BOUNDED, RejectReason, future_date_message


class Source(Protocol):
    """One input, read once (``source.StagedFile``): every reader here opens it through this."""

    @property
    def name(self) -> str:
        """The file's name in the inbox (for messages)."""
        ...

    @property
    def csv_size(self) -> int:
        """The CSV's bytes (decompressed, if it was compressed)."""
        ...

    def open_binary(self) -> BinaryIO:
        """A fresh stream of the file's bytes (as a CSV: decompressed, if it was compressed)."""
        ...

    def disk_path(self) -> Path:
        """A path holding the CSV's bytes (never compressed), for DuckDB's reader."""
        ...


def open_text(source: Source) -> io.TextIOWrapper:
    """The source as RFC 4180 text: UTF-8 with or without BOM, line breaks untranslated."""
    return io.TextIOWrapper(source.open_binary(), encoding="utf-8-sig", newline="")


BIGINT_MAX = 2**63 - 1
BIGINT_DIGITS = len(str(BIGINT_MAX))  # more significant digits than this: past BIGINT
AMOUNT_MAX_INTEGER_DIGITS = 16  # DECIMAL(18,2)
TRIM_CHARS = " \t"
HEADER_PROBE_BYTES = 64 * 1024
# The longest line any reader takes (DuckDB's max_line_size; the reference rules measure the same
# bytes, line break excluded): a longer record is rejected as line_too_long, a longer header
# refuses the file. One limit, so that every path gives a long line the same verdict.
LINE_MAX_BYTES = 2 * 1024 * 1024
# What a refusal or a too-long line's reject quotes of the file's own text, at most (escaped).
QUOTE_CHARS = 80


@dataclass(frozen=True)
class Header:
    """What the header line says: the kind, where each needed column is, what is extra."""

    kind: FileKind
    file_name: str  # the file's name in the inbox (the ledger's), for messages
    line_number: int  # 1-based line of the header itself
    field_count: int
    positions: dict[str, int]  # canonical column -> 0-based field index
    extra_columns: tuple[str, ...]
    # The last date the kind's arrival-bounded column may hold (rules.ARRIVAL_BOUNDED); None:
    # not bounded (a kind without one, or a file read outside an ingest).
    latest_date: dt.date | None = None

    @property
    def bounded(self) -> tuple[str, dt.date] | None:
        """The column ``future_date`` applies to and its last date, if any."""
        column = ARRIVAL_BOUNDED.get(self.kind)
        if column is None or self.latest_date is None:
            return None
        return column, self.latest_date


@dataclass(frozen=True)
class Reject:
    line_number: int
    reason: RejectReason
    message: str
    raw_line: str


@dataclass
class ValidatedRows:
    """A batch of a file: good rows as typed columns (canonical order) with their line numbers
    and raw text, and the rejects."""

    kind: FileKind
    columns: dict[str, list[object]] = field(default_factory=dict)
    lines: list[int] = field(default_factory=list)
    raw_lines: list[str] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)

    @property
    def rows_total(self) -> int:
        return len(self.lines) + len(self.rejects)


# --- file level -------------------------------------------------------------------------------


def read_header(source: Source, latest_date: dt.date | None = None) -> Header:
    """Classify the file from its header, read whole (up to LINE_MAX_BYTES), or raise
    FileRefused. ``latest_date``: the bound of ``future_date`` (``rules.latest_date``)."""
    name = source.name
    with source.open_binary() as handle:
        head = handle.read(HEADER_PROBE_BYTES)
        if b"\x00" in head:
            raise FileRefused(FileFailure.BINARY, f"{name} holds NUL bytes: not a CSV text file")
        try:
            head.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            # A multi-byte character may be cut at the probe's end; only earlier errors count.
            if exc.start < len(head) - 4:
                raise FileRefused(
                    FileFailure.NOT_UTF8, f"{name} is not UTF-8 (byte {exc.start})"
                ) from exc
        handle.seek(0)
        line_number, header_line = _header_line(handle, name)
    names = next(csv.reader([header_line]))
    header = parse_header(names, line_number, name, header_line)
    return dataclasses.replace(header, latest_date=latest_date)


def _header_line(handle: BinaryIO, name: str) -> tuple[int, str]:
    """(1-based line number, text) of the first line that is not blank."""
    number = 0
    while line := handle.readline(LINE_MAX_BYTES + 1):
        if len(line.rstrip(b"\r\n")) > LINE_MAX_BYTES:
            raise FileRefused(
                FileFailure.HEADER_TOO_LONG,
                f"{name}: the header line is longer than {LINE_MAX_BYTES} bytes",
            )
        try:
            text = line.decode("utf-8-sig" if number == 0 else "utf-8")
        except UnicodeDecodeError as exc:
            raise FileRefused(FileFailure.NOT_UTF8, f"{name} is not UTF-8 (its header)") from exc
        # splitlines: a line ending in a lone CR holds several lines for readline.
        for offset, part in enumerate(text.splitlines() or [""]):
            if part.strip(TRIM_CHARS):
                return number + offset + 1, part
        number += max(1, len(text.splitlines()))
    raise FileRefused(FileFailure.EMPTY, f"{name} is empty")


def quote(text: str) -> str:
    """At most QUOTE_CHARS of the file's own text, escaped (repr): safe in any message."""
    return repr(text[:QUOTE_CHARS] + ("..." if len(text) > QUOTE_CHARS else ""))


# A header is of the kind whose own columns (those no other kind has) it names.
_OWN_COLUMNS = {
    kind: set(columns).difference(*(COLUMNS[other] for other in FileKind if other is not kind))
    for kind, columns in COLUMNS.items()
}


def parse_header(
    names: Sequence[str], line_number: int, file_name: str, line: str | None = None
) -> Header:
    """Kind from header names: any order, trimmed, case-insensitive; extras ignored.

    A refusal quotes at most a short escaped prefix of the header ``line`` (or of the names).
    """
    cleaned = [name.strip(TRIM_CHARS).lower() for name in names]
    present = set(cleaned)
    kind = next((kind for kind, own in _OWN_COLUMNS.items() if present & own), None)
    if kind is None:
        raise FileRefused(
            FileFailure.UNKNOWN_HEADER,
            f"{file_name}: header {quote(','.join(names) if line is None else line)} names "
            "neither a users file "
            f"({','.join(COLUMNS[FileKind.USERS])}) nor a transactions file "
            f"({','.join(COLUMNS[FileKind.TRANSACTIONS])})",
        )
    wanted = COLUMNS[kind]
    missing = [name for name in wanted if name not in present]
    if missing:
        raise FileRefused(
            FileFailure.MISSING_COLUMN,
            f"{file_name}: a {kind} file needs the column(s) {', '.join(missing)}",
        )
    doubled = sorted({name for name in cleaned if name in wanted and cleaned.count(name) > 1})
    if doubled:
        raise FileRefused(
            FileFailure.DUPLICATE_COLUMN,
            f"{file_name}: the column(s) {', '.join(doubled)} appear more than once",
        )
    positions = {name: cleaned.index(name) for name in wanted}
    extra = tuple(name for name in cleaned if name not in wanted)
    return Header(kind, file_name, line_number, len(cleaned), positions, extra)


# --- fields -----------------------------------------------------------------------------------


def _is_digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_id(text: str, column: str) -> tuple[int | None, RejectReason | None, str]:
    """A positive BIGINT written as digits. Digits past what a BIGINT can hold are refused by
    their count, before any conversion (int() refuses long text: sys.get_int_max_str_digits)."""
    if text.startswith("-") and _is_digits(text[1:]):
        return None, RejectReason.NON_POSITIVE_ID, f"{column} {quote(text)} is not positive"
    if not _is_digits(text):
        return None, RejectReason.BAD_INTEGER, f"{column} {quote(text)} is not an integer"
    significant = text.lstrip("0")
    if not significant:
        return None, RejectReason.NON_POSITIVE_ID, f"{column} {quote(text)} is not positive"
    if len(significant) > BIGINT_DIGITS or int(significant) > BIGINT_MAX:
        return None, RejectReason.BAD_INTEGER, f"{column} {quote(text)} is past BIGINT"
    return int(significant), None, ""


def parse_date(text: str, column: str) -> tuple[dt.date | None, RejectReason | None, str]:
    """An existing ISO date, YYYY-MM-DD exactly."""
    if len(text) == 10 and text[4] == "-" and text[7] == "-" and _is_digits(text.replace("-", "")):
        try:
            return dt.date.fromisoformat(text), None, ""
        except ValueError:
            pass
    return (
        None,
        RejectReason.BAD_DATE,
        f"{column} {quote(text)} is not an existing YYYY-MM-DD date",
    )


def parse_amount(text: str, column: str) -> tuple[Decimal | None, RejectReason | None, str]:
    """A plain positive decimal with at most 2 decimals that fits DECIMAL(18,2). Decided on the
    digits' text alone: only a value that fits is converted (never long text)."""
    negative = text.startswith("-")
    body = text[1:] if negative else text
    whole, dot, fraction = body.partition(".")
    if not _is_digits(whole) or (dot and not _is_digits(fraction)):
        return None, RejectReason.BAD_AMOUNT, f"{column} {quote(text)} is not a plain decimal"
    significant = whole.lstrip("0")
    if negative or not (significant or fraction.strip("0")):
        return None, RejectReason.NON_POSITIVE_AMOUNT, f"{column} {quote(text)} is not positive"
    if len(fraction) > 2:
        return (
            None,
            RejectReason.TOO_MANY_DECIMALS,
            f"{column} {quote(text)} has more than 2 decimals",
        )
    if len(significant) > AMOUNT_MAX_INTEGER_DIGITS:
        return None, RejectReason.BAD_AMOUNT, f"{column} {quote(text)} does not fit DECIMAL(18,2)"
    return Decimal((significant or "0") + dot + fraction), None, ""


def parse_type(text: str, column: str) -> tuple[str | None, RejectReason | None, str]:
    """One of TRANSACTION_TYPES, in any case."""
    lowered = text.lower()
    if lowered in TRANSACTION_TYPES:
        return lowered, None, ""
    return (
        None,
        RejectReason.UNKNOWN_TYPE,
        f"{column} {quote(text)} is not one of " + (", ".join(TRANSACTION_TYPES)),
    )


def parse_text(text: str, column: str) -> tuple[str, None, str]:
    """Any non-empty text (the caller has refused an empty field)."""
    return text, None, ""


FieldResult = tuple[object, RejectReason | None, str]


# The fast path accepts a subset of what the reference accepts; anything else takes the
# reference path. Ids and dates must be the canonical text of their typed value (no sign, leading
# zero or space): a round trip is cheaper than a regular expression there. Amounts may drop
# trailing zeros ("12", "12.5"), so they get a regex.
AMOUNT_PATTERN = "[0-9]{1,16}(\\.[0-9]{1,2})?"
TEXT_PATTERN = "(?s)[^ \t](.*[^ \t])?"


@dataclass(frozen=True)
class FieldRule:
    """A domain's rule, twice: ``parse`` (the reference, for a trimmed non-empty field) and,
    for DuckDB's reader, ``typed`` (SQL for the value, meaningful where the check holds) and
    ``check`` (SQL true only where ``parse`` accepts the field and gives that value). The SQL
    templates take the raw field (``{raw}``), the column's DuckDB type (``{type}``) and, in a
    check, the typed value (``{typed}``)."""

    parse: Callable[[str, str], FieldResult]
    typed: str
    check: str


_CAST = "TRY_CAST({raw} AS {type})"  # to the column's DuckDB type
RULES: dict[Rule, FieldRule] = {
    Rule.ID: FieldRule(parse_id, _CAST, "CAST({typed} AS VARCHAR) = {raw} AND {typed} > 0"),
    # The length too: DuckDB writes a year past 9999 with more digits, and reads it back.
    Rule.DATE: FieldRule(
        parse_date, _CAST, "length({raw}) = 10 AND CAST({typed} AS VARCHAR) = {raw}"
    ),
    Rule.AMOUNT: FieldRule(
        parse_amount,
        _CAST,
        f"regexp_full_match({{raw}}, '{AMOUNT_PATTERN}') AND {{typed}} > 0",
    ),
    # Most files write the types in lower case already: skip lower() for those rows.
    Rule.TYPE: FieldRule(
        parse_type,
        "lower({raw})",
        f"({{raw}} IN {TRANSACTION_TYPES!r} OR {{typed}} IN {TRANSACTION_TYPES!r})",
    ),
    Rule.TEXT: FieldRule(parse_text, "{raw}", f"regexp_full_match({{raw}}, '{TEXT_PATTERN}')"),
}


def _field_parser(column: str) -> Callable[[str], FieldResult]:
    """The rule of one canonical column, for a non-empty trimmed field."""
    parse = RULES[DOMAINS[column].rule].parse
    return lambda text: parse(text, column)


FIELD_PARSERS = {column: _field_parser(column) for column in DOMAINS}


def parse_field(column: str, text: str) -> FieldResult:
    """One trimmed field of a canonical column -> (value, None, "") or (None, reason, message)."""
    if not text:
        return None, RejectReason.MISSING_FIELD, f"{column} is empty"
    return FIELD_PARSERS[column](text)


# --- rows -------------------------------------------------------------------------------------


def is_blank(fields: Sequence[str]) -> bool:
    """Whether a parsed line is blank (nothing, or one field of spaces and tabs): skipped."""
    return not fields or (len(fields) == 1 and not fields[0].strip(TRIM_CHARS))


class LongRecord(NamedTuple):
    """A record with a line over LINE_MAX_BYTES, read to its end but not kept: its start."""

    prefix: str


Record = list[str] | LongRecord


def long_line_reject(line_number: int, prefix: str) -> Reject:
    """The reject of a record longer than LINE_MAX_BYTES, whichever reader found it."""
    return Reject(
        line_number,
        RejectReason.LINE_TOO_LONG,
        f"the line is longer than {LINE_MAX_BYTES} bytes (the limit of every reader)",
        prefix[:QUOTE_CHARS] + "...",
    )


class _BoundedLines:
    """The physical lines of a text stream, none kept longer than LINE_MAX_BYTES: a longer one
    is read to its end in pieces and handed on as a one-field stand-in, its number noted."""

    STAND_IN = "-\n"

    def __init__(self, handle: io.TextIOBase) -> None:
        self.handle = handle
        self.number = 0
        self.long: dict[int, str] = {}  # line number -> its first characters

    def __iter__(self) -> Iterator[str]:
        readline = self.handle.readline
        while line := readline(LINE_MAX_BYTES + 1):
            self.number += 1
            body = line.rstrip("\r\n")
            if len(body) == len(line) and len(line) > LINE_MAX_BYTES:  # cut: more to come
                while (rest := readline(1 << 20)) and not rest.endswith(("\n", "\r")):
                    pass
            elif len(body) <= LINE_MAX_BYTES // 4 or len(body.encode()) <= LINE_MAX_BYTES:
                yield line
                continue
            self.long[self.number] = body[:QUOTE_CHARS]
            yield self.STAND_IN


# A field can only pass this when its record spans lines; such a record is too long anyway.
csv.field_size_limit(LINE_MAX_BYTES)


def _records(handle: io.TextIOBase, *, bounded: bool = False) -> Iterator[tuple[int, Record]]:
    """(line where the record starts, fields) for every non-blank record, RFC 4180.

    ``bounded`` (a file larger than LINE_MAX_BYTES, which may hold a longer line): lines are
    read in bounded pieces, and a record with a line over the limit comes as a LongRecord.
    """
    lines = _BoundedLines(handle) if bounded else None
    reader = csv.reader(lines if lines is not None else handle, strict=False)
    previous_end = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error:  # a field over the limit, in a record spanning lines
            start, previous_end = previous_end + 1, reader.line_num
            yield start, LongRecord("")
            continue
        start = previous_end + 1
        previous_end = reader.line_num
        if lines is not None and lines.long:
            cut = next((n for n in range(start, previous_end + 1) if n in lines.long), None)
            if cut is not None:
                yield start, LongRecord(lines.long.pop(cut))
                continue
        if is_blank(fields):
            continue
        yield start, fields


def may_hold_long_lines(source: Source) -> bool:
    """Whether the file is large enough to hold a line over LINE_MAX_BYTES."""
    return source.csv_size > LINE_MAX_BYTES


def raw_text(fields: Sequence[str]) -> str:
    """The record as CSV text again (quoted only where a field needs it)."""
    line = ",".join(fields)
    if line.count(",") == len(fields) - 1 and not any(c in line for c in '"\r\n'):
        return line
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(fields)
    return out.getvalue()[:-2]


class Batcher:
    """Checks records one by one into batches of typed good rows and rejects."""

    def __init__(self, header: Header) -> None:
        self.header = header
        bounded = header.bounded
        # (column, field index, parser, the last date it may hold or None)
        self.rules = [
            (
                name,
                header.positions[name],
                FIELD_PARSERS[name],
                bounded[1] if bounded and bounded[0] == name else None,
            )
            for name in COLUMNS[header.kind]
        ]
        self.batch = self._new_batch()

    def _new_batch(self) -> ValidatedRows:
        batch = ValidatedRows(self.header.kind, {name: [] for name, *_ in self.rules})
        self._columns = list(batch.columns.values())
        return batch

    def take(self) -> ValidatedRows:
        """The batch so far; a new one starts."""
        batch, self.batch = self.batch, self._new_batch()
        return batch

    def add(self, line_number: int, fields: Sequence[str] | LongRecord) -> None:
        """Check one record (its fields untrimmed) and file it as a good row or a reject."""
        batch = self.batch
        if isinstance(fields, LongRecord):
            batch.rejects.append(long_line_reject(line_number, fields.prefix))
            return
        if len(fields) != self.header.field_count:
            batch.rejects.append(
                Reject(
                    line_number,
                    RejectReason.WRONG_FIELD_COUNT,
                    f"expected {self.header.field_count} fields, found {len(fields)}",
                    raw_text(fields),
                )
            )
            return
        values = []
        for name, position, parse, latest in self.rules:
            text = fields[position].strip(TRIM_CHARS)
            value, reason, message = (
                parse(text) if text else (None, RejectReason.MISSING_FIELD, f"{name} is empty")
            )
            if latest is not None and isinstance(value, dt.date) and value > latest:
                reason = RejectReason.FUTURE_DATE
                message = future_date_message(name, value, latest)
            if reason is not None:
                batch.rejects.append(Reject(line_number, reason, message, raw_text(fields)))
                return
            values.append(value)
        for column, value in zip(self._columns, values, strict=True):
            column.append(value)
        batch.lines.append(line_number)
        batch.raw_lines.append(raw_text(fields))


def validate_rows(source: Source, header: Header, batch_rows: int) -> Iterator[ValidatedRows]:
    """Every record after the header -> typed good rows or a Reject, in file order, in batches
    of at most ``batch_rows`` records (``Tuning.reference_batch_rows``: memory stays flat
    whatever the file's size).

    Raises FileRefused(NOT_UTF8) when a byte sequence is not UTF-8.
    """
    batcher = Batcher(header)
    try:
        with open_text(source) as handle:
            for line_number, fields in _records(handle, bounded=may_hold_long_lines(source)):
                if line_number <= header.line_number:
                    continue
                if batcher.batch.rows_total >= batch_rows:
                    yield batcher.take()
                batcher.add(line_number, fields)
    except UnicodeDecodeError as exc:
        raise FileRefused(
            FileFailure.NOT_UTF8, f"{header.file_name} is not UTF-8: {exc.reason}"
        ) from exc
    yield batcher.take()


def data_lines(source: Source) -> int:
    """The lines of the file, a last line without a line break included and the empty lines
    at its end left out (the reader and validate_rows both skip those)."""
    lines = 0
    tail = b""
    with source.open_binary() as handle:
        while chunk := handle.read(4 << 20):
            lines += chunk.count(b"\n")
            # The last 4 KiB read, without copying every chunk into it.
            tail = chunk[-4096:] if len(chunk) >= 4096 else (tail + chunk)[-4096:]
    if tail and not tail.endswith(b"\n"):
        lines += 1
    ending = tail[len(tail.rstrip(b"\r\n")) :]  # the line breaks after the last text
    return lines - max(0, ending.count(b"\n") - 1)


def record_lines(
    source: Source, header: Header, ordinals: set[int], *, by_line: bool = False
) -> dict[int, int]:
    """The line where each given record starts (record 1 is the first after the header).

    ``by_line``: every line after the header is one record, so record k is on line
    ``header line + k``; otherwise the records are counted as validate_rows reads them.
    """
    if not ordinals:
        return {}
    if by_line:
        return {k: header.line_number + k for k in ordinals}
    found: dict[int, int] = {}
    ordinal = 0
    with open_text(source) as text:
        for line_number, _fields in _records(text, bounded=may_hold_long_lines(source)):
            if line_number <= header.line_number:
                continue
            ordinal += 1
            if ordinal in ordinals:
                found[ordinal] = line_number
                if len(found) == len(ordinals):
                    break
    return found
