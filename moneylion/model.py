"""The data model, declared once: the kinds of file and their columns, each column's domain
(its rule and its DuckDB, Arrow and SQLite types), the transaction types, and the measures of
the aggregates kept per user and per day.

Validation, the pending tables, every load path, the aggregates, the SQLite export and the API
iterate these declarations; no other module writes a column list or a type name out. The
migrations in ``sql/`` are the warehouse's history and cannot import this module:
``tests/test_model.py`` holds the migrated warehouse and a fresh export to it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import pyarrow as pa


class TransactionType(enum.StrEnum):
    """What a transaction is; each type has its own total per user (``total_<type>``)."""

    DEPOSIT = "deposit"
    WITHDRAWAL = "withdrawal"
    PURCHASE = "purchase"


TRANSACTION_TYPES: tuple[str, ...] = tuple(kind.value for kind in TransactionType)


class FileKind(enum.StrEnum):
    USERS = "users"
    TRANSACTIONS = "transactions"


class Rule(enum.StrEnum):
    """The field rule of a domain (``validate.RULES`` holds the reference and the SQL check)."""

    ID = "id"  # a positive BIGINT written as digits
    DATE = "date"  # an existing YYYY-MM-DD date
    AMOUNT = "amount"  # a positive decimal with at most 2 decimals, fitting DECIMAL(18,2)
    TYPE = "type"  # one of TRANSACTION_TYPES, in any case
    TEXT = "text"  # any text that is not empty once trimmed


@dataclass(frozen=True)
class Domain:
    """What a column's values are, in each place they are stored."""

    rule: Rule
    duckdb: str  # the warehouse column's type
    pending: str  # the type rows wait in before their verdict and append (DuckDB)
    arrow: pa.DataType  # the type of pending and appended Arrow columns
    sqlite: str  # the SQLite export's column type
    to_sqlite: str  # DuckDB expression of the value SQLite stores ({} is the column)


ID = Domain(Rule.ID, "BIGINT", "BIGINT", pa.int64(), "INTEGER", "{}")
DATE = Domain(Rule.DATE, "DATE", "DATE", pa.date32(), "TEXT", "{}::VARCHAR")
# The seed's SQLite ``transactions.amount`` is REAL; every total stays exact (TEXT, below).
AMOUNT = Domain(
    Rule.AMOUNT, "DECIMAL(18, 2)", "DECIMAL(18, 2)", pa.decimal128(18, 2), "REAL", "{}::DOUBLE"
)
TYPE = Domain(Rule.TYPE, "transaction_type", "VARCHAR", pa.string(), "TEXT", "{}::VARCHAR")
TEXT = Domain(Rule.TEXT, "VARCHAR", "VARCHAR", pa.string(), "TEXT", "{}")


@dataclass(frozen=True)
class Column:
    name: str
    domain: Domain

    def as_sqlite(self) -> str:
        """A DuckDB select item giving the value as the SQLite export stores it."""
        expression = self.domain.to_sqlite.format(self.name)
        return self.name if expression == self.name else f"{expression} AS {self.name}"


@dataclass(frozen=True)
class Table:
    """A base table filled from one kind of file; its first column is the row's key."""

    name: str
    columns: tuple[Column, ...]  # canonical order: a row's first fault is reported in it

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    @property
    def key(self) -> str:
        return self.columns[0].name

    def as_sqlite(self) -> str:
        """The select list of the table's columns as the SQLite export stores them."""
        return ", ".join(column.as_sqlite() for column in self.columns)


TABLES: dict[FileKind, Table] = {
    FileKind.USERS: Table(
        "users", (Column("user_id", ID), Column("signup_date", DATE), Column("country", TEXT))
    ),
    FileKind.TRANSACTIONS: Table(
        "transactions",
        (
            Column("transaction_id", ID),
            Column("user_id", ID),
            Column("transaction_date", DATE),
            Column("amount", AMOUNT),
            Column("transaction_type", TYPE),
        ),
    ),
}
COLUMNS: dict[FileKind, tuple[str, ...]] = {kind: table.names for kind, table in TABLES.items()}
DOMAINS: dict[str, Domain] = {
    column.name: column.domain for table in TABLES.values() for column in table.columns
}
# The column holding a transaction's type (what a measure's ``only`` filters on).
TYPE_COLUMN = next(name for name, domain in DOMAINS.items() if domain is TYPE)


# --- aggregates -------------------------------------------------------------------------------


class Fold(enum.StrEnum):
    """How a measure of new rows folds into the stored one (both are the same aggregate)."""

    SUM = "sum"  # counts and money: stored + new
    MIN = "min"
    MAX = "max"


@dataclass(frozen=True)
class Measure:
    """One aggregated column over transactions: ``fold(of)``, over the rows of one transaction
    type (TYPE_COLUMN) only if ``only`` is set; ``of`` is ``None`` for a row count."""

    name: str
    fold: Fold
    of: str | None = None
    only: str | None = None

    @property
    def money(self) -> bool:
        """Exact money: DECIMAL in DuckDB, integer cents while summed in Python, two-decimal
        TEXT in SQLite."""
        return self.of is not None and DOMAINS[self.of] is AMOUNT


@dataclass(frozen=True)
class Aggregate:
    """An aggregate of transactions kept by key, incrementally: each commit folds in the
    measures of the rows it appended."""

    table: str
    key: tuple[str, ...]
    measures: tuple[Measure, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return (*self.key, *(measure.name for measure in self.measures))


COUNT = Measure("tx_count", Fold.SUM)
TOTAL = Measure("total_amount", Fold.SUM, "amount")

USER_TOTALS = Aggregate(
    "user_totals",
    ("user_id",),
    (
        COUNT,
        TOTAL,
        *(Measure(f"total_{kind}", Fold.SUM, "amount", kind) for kind in TRANSACTION_TYPES),
        Measure("first_date", Fold.MIN, "transaction_date"),
        Measure("last_date", Fold.MAX, "transaction_date"),
    ),
)
DAILY_TOTALS = Aggregate("daily_totals", ("transaction_date", "transaction_type"), (COUNT, TOTAL))
