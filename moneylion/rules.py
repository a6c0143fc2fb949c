"""The rule book: every reason a row is refused, and every verdict on a row that passed its own
fields, each declared once with its message.

A row's own rules (its fields, ``validate.RULES``; its date against its file's arrival,
``future_date``) are decided by whichever reader reads it: ``validate.Batcher`` in Python,
``reader.py``'s checks in DuckDB. The rules that need other rows are
decided here, in two evaluators that read the same declarations: ``resolve.resolve`` (SQL, for
large files and chunks: next to nothing per row) and ``resolve.resolve_gathered`` (Python, for
a batch of small files: a statement's fixed cost is what those pay). The lake's publisher calls
``copies_in_file`` itself. ``tests/test_properties.py`` and ``tests/test_batch.py`` hold the
evaluators equal.

* Within a file, identical copies of an id load once (the first: later ones are ``copy``, counted
  as duplicates), differing copies are all ``duplicate_in_file``.
* Against the row an id already has (stored, or left by an earlier file of the same batch):
  the same content is a ``duplicate``; other content is ``conflicts_with_stored`` for an
  immutable kind (transactions: the first wins) and loads for the others (users: the latest
  file wins).
* Orphans load: a transaction whose user has no profile yet counts, with no country until the
  profile arrives (no rule refuses it).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from moneylion.model import FileKind


class RejectReason(enum.StrEnum):
    MISSING_FIELD = "missing_field"
    BAD_INTEGER = "bad_integer"
    NON_POSITIVE_ID = "non_positive_id"
    BAD_DATE = "bad_date"
    FUTURE_DATE = "future_date"
    BAD_AMOUNT = "bad_amount"
    NON_POSITIVE_AMOUNT = "non_positive_amount"
    TOO_MANY_DECIMALS = "too_many_decimals"
    UNKNOWN_TYPE = "unknown_type"
    DUPLICATE_IN_FILE = "duplicate_in_file"
    CONFLICTS_WITH_STORED = "conflicts_with_stored"
    WRONG_FIELD_COUNT = "wrong_field_count"
    LINE_TOO_LONG = "line_too_long"


# What each reason means, for people (the README's table is made from it: ``make docs``).
REJECT_REASONS: dict[RejectReason, str] = {
    RejectReason.MISSING_FIELD: "a needed field is empty (once trimmed)",
    RejectReason.BAD_INTEGER: "an id is not digits, or is past BIGINT",
    RejectReason.NON_POSITIVE_ID: "an id is 0 or negative",
    RejectReason.BAD_DATE: "a date is not an existing `YYYY-MM-DD`",
    RejectReason.FUTURE_DATE: (
        "a transaction is dated more than `max_future_days` after its file's arrival day (UTC)"
    ),
    RejectReason.BAD_AMOUNT: "an amount is not a plain decimal, or does not fit DECIMAL(18,2)",
    RejectReason.NON_POSITIVE_AMOUNT: "an amount is 0 or negative",
    RejectReason.TOO_MANY_DECIMALS: "an amount has more than 2 decimals (never rounded)",
    RejectReason.UNKNOWN_TYPE: "a type is not `deposit`, `withdrawal` or `purchase` (any case)",
    RejectReason.DUPLICATE_IN_FILE: (
        "an id appears in the file again with other content (all its copies)"
    ),
    RejectReason.CONFLICTS_WITH_STORED: (
        "a transaction id is stored with other content (the first wins)"
    ),
    RejectReason.WRONG_FIELD_COUNT: "the record has another number of fields than the header",
    RejectReason.LINE_TOO_LONG: "a line of the record is over 2 MiB (the reject keeps its start)",
}


class Verdict(enum.StrEnum):
    """What becomes of a row that passed its own rules."""

    LOAD = "load"
    COPY = "copy"  # an identical later copy within its file
    DUPLICATE = "duplicate"  # the same content as the row its id already has
    DUPLICATE_IN_FILE = "duplicate_in_file"
    CONFLICTS_WITH_STORED = "conflicts_with_stored"


class Counted(enum.StrEnum):
    """How a verdict counts in its file's ledger row."""

    LOADED = "loaded"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"


@dataclass(frozen=True)
class VerdictRule:
    verdict: Verdict
    counted: Counted
    # A rejected row's message, from ``{key}`` (the key column), ``{id}`` (the row's key) and
    # ``{against}`` (the file holding the row it conflicts with).
    message: str = ""

    @property
    def reason(self) -> RejectReason:
        """The reject reason of a rejected verdict (the same word)."""
        return RejectReason(self.verdict)


VERDICTS: dict[Verdict, VerdictRule] = {
    rule.verdict: rule
    for rule in (
        VerdictRule(Verdict.LOAD, Counted.LOADED),
        VerdictRule(Verdict.COPY, Counted.DUPLICATE),
        VerdictRule(Verdict.DUPLICATE, Counted.DUPLICATE),
        VerdictRule(
            Verdict.DUPLICATE_IN_FILE,
            Counted.REJECTED,
            "{key} {id} appears in this file with different content",
        ),
        VerdictRule(
            Verdict.CONFLICTS_WITH_STORED,
            Counted.REJECTED,
            "{key} {id} is stored (file #{against}) with different content",
        ),
    )
}
REJECTED: tuple[Verdict, ...] = tuple(
    rule.verdict for rule in VERDICTS.values() if rule.counted is Counted.REJECTED
)
DUPLICATES: tuple[Verdict, ...] = tuple(
    rule.verdict for rule in VERDICTS.values() if rule.counted is Counted.DUPLICATE
)

# Whether a row of this kind may replace the one its id has: transactions are immutable (the
# first wins, other content conflicts), users are not (the latest file wins).
IMMUTABLE: dict[FileKind, bool] = {FileKind.TRANSACTIONS: True, FileKind.USERS: False}


def message(verdict: Verdict, key: str, row_id: object, against: object = None) -> str:
    """A rejected verdict's message for one row."""
    return VERDICTS[verdict].message.format(key=key, id=row_id, against=against)


def message_sql(verdict: Verdict, key: str, against: str) -> str:
    """The same message as SQL over the columns ``key`` and ``against``."""
    parts = VERDICTS[verdict].message.replace("'", "''").split("{")
    pieces = [f"'{parts[0]}'"]
    for part in parts[1:]:
        name, text = part.split("}", 1)
        column = {"key": f"'{key}'", "id": key, "against": against}[name]
        pieces += [f"CAST({column} AS VARCHAR)", f"'{text}'"]
    return " || ".join(pieces)


def versus(kind: FileKind, content: object, held: object | None) -> Verdict:
    """The verdict on a row (the first of its id in its file) against the row its id already
    has (``held``: its content; None when the id has none yet)."""
    if held is None:
        return Verdict.LOAD
    if held == content:
        return Verdict.DUPLICATE
    return Verdict.CONFLICTS_WITH_STORED if IMMUTABLE[kind] else Verdict.LOAD


def versus_sql(kind: FileKind, content: str, held: str, has_held: str) -> str:
    """``versus`` as the ``WHEN`` branches of a SQL ``CASE``, over a row's ``content``, the
    ``held`` content and whether there is one (``has_held``). The id without a row is decided
    first: nearly every row, and the contents are then compared only for the others."""
    other = Verdict.CONFLICTS_WITH_STORED if IMMUTABLE[kind] else Verdict.LOAD
    return (
        f"WHEN NOT ({has_held}) THEN '{Verdict.LOAD}' "
        f"WHEN ({content}) IS NOT DISTINCT FROM ({held}) THEN '{Verdict.DUPLICATE}' "
        f"ELSE '{other}'"
    )


def copies_in_file(ids: Sequence[Hashable], contents: Sequence[object]) -> list[Verdict | None]:
    """The rule within one file, per row: ``DUPLICATE_IN_FILE`` for every copy of an id whose
    copies differ, ``COPY`` for an identical later copy, None for the row that goes on to be
    judged against the rows its id already has (``versus``)."""
    first: dict[Hashable, int] = {}
    differing: set[Hashable] = set()
    for i, row_id in enumerate(ids):
        at = first.setdefault(row_id, i)
        if at != i and contents[at] != contents[i]:
            differing.add(row_id)
    return [
        Verdict.DUPLICATE_IN_FILE
        if row_id in differing
        else (Verdict.COPY if first[row_id] != i else None)
        for i, row_id in enumerate(ids)
    ]


# future_date: a kind's column dated by its producer, which may not run ahead of its file's
# arrival day (the UTC date of the ledger's received_at) by more than max_future_days.
ARRIVAL_BOUNDED: dict[FileKind, str] = {FileKind.TRANSACTIONS: "transaction_date"}


def latest_date(received_at: dt.datetime, max_future_days: int) -> dt.date:
    """The last date a file arriving at ``received_at`` (UTC) may hold in its bounded column
    (at most the last date there is)."""
    days_left = (dt.date.max - received_at.date()).days
    return received_at.date() + dt.timedelta(days=min(max_future_days, days_left))


def future_date_message(column: str, value: dt.date, latest: dt.date) -> str:
    return (
        f"{column} {value.isoformat()} is after {latest.isoformat()} "
        "(more than max_future_days past the file's arrival day)"
    )
