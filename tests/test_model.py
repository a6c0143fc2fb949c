"""The data model's declarations against what is really stored: the migrated warehouse, a real
SQLite export, the API's documents, and the export's compiled sums against DuckDB's."""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
from decimal import Decimal
from pathlib import Path

import duckdb
import msgspec

from moneylion import aggregates
from moneylion.api import models
from moneylion.config import Config
from moneylion.export import export_full
from moneylion.export.sums import cents_of, compile_summer
from moneylion.ingest import ingest_file
from moneylion.ledger import LEDGER_COLUMNS
from moneylion.model import (
    DAILY_TOTALS,
    TABLES,
    TRANSACTION_TYPES,
    USER_TOTALS,
    FileKind,
    TransactionType,
)


def _columns(conn: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str]]:
    return conn.execute(
        "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = $t"
        " ORDER BY column_index",
        {"t": table},
    ).fetchall()


def test_the_migrated_warehouse_holds_the_declared_columns_and_types(
    warehouse: duckdb.DuckDBPyConnection,
) -> None:
    enum = warehouse.execute("SELECT enum_range(NULL::transaction_type)").fetchall()[0][0]
    assert tuple(enum) == TRANSACTION_TYPES == tuple(TransactionType)
    # DuckDB names an ENUM column's type by its values, without spaces after commas in DECIMAL.
    spelled = {"transaction_type": "ENUM(" + ", ".join(map(repr, TRANSACTION_TYPES)) + ")"}
    for table in TABLES.values():
        stored = _columns(warehouse, table.name)
        declared = [
            (c.name, spelled.get(c.domain.duckdb, c.domain.duckdb.replace(", ", ",")))
            for c in table.columns
        ]
        assert stored[: len(declared)] == declared
        # After the declared columns, a base table holds the row's file (a user, its time).
        assert stored[len(declared)][0] == "file_id"
    for aggregate in (USER_TOTALS, DAILY_TOTALS):
        assert tuple(name for name, _ in _columns(warehouse, aggregate.table)) == aggregate.columns
    assert tuple(name for name, _ in _columns(warehouse, "files")) == LEDGER_COLUMNS


def test_the_sqlite_export_holds_the_declared_columns(
    config: Config, warehouse: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    users = tmp_path / "users.csv"
    users.write_text("user_id,signup_date,country\n1,2024-01-02,FR\n")
    transactions = tmp_path / "transactions.csv"
    transactions.write_text(
        "transaction_id,user_id,transaction_date,amount,transaction_type\n"
        "1,1,2024-01-03,10.50,deposit\n2,1,2024-01-04,2.25,purchase\n"
    )
    for path in (users, transactions):
        ingest_file(warehouse, path, config)
    export_full(warehouse, config.sqlite_path)
    lite = sqlite3.connect(config.sqlite_path)
    try:
        for table in TABLES.values():
            info = lite.execute(f"PRAGMA table_info({table.name})").fetchall()
            assert [(row[1], row[2]) for row in info] == [
                (c.name, c.domain.sqlite) for c in table.columns
            ]
        for aggregate in (USER_TOTALS, DAILY_TOTALS):
            info = lite.execute(f"PRAGMA table_info({aggregate.table})").fetchall()
            assert tuple(row[1] for row in info) == aggregate.columns
        info = lite.execute("PRAGMA table_info(files)").fetchall()
        assert tuple(row[1] for row in info) == LEDGER_COLUMNS
        assert lite.execute("SELECT * FROM user_totals").fetchall() == [
            (1, 2, "12.75", "10.50", "0.00", "2.25", "2024-01-03", "2024-01-04")
        ]
    finally:
        lite.close()
    assert aggregates.verify(warehouse) == []


def test_the_api_documents_carry_a_total_per_declared_type() -> None:
    summary = {field.name for field in msgspec.structs.fields(models.UserSummary)}
    month = {field.name for field in msgspec.structs.fields(models.CountryMonth)}
    for kind in TRANSACTION_TYPES:
        assert f"total_{kind}" in summary
        assert {f"total_{kind}", f"{kind}_count"} <= month
    per_type = {name for name in summary if name.startswith("total_")} - {"total_amount"}
    assert per_type == {m.name for m in USER_TOTALS.measures if m.only}


def test_the_compiled_sums_equal_duckdbs_aggregates_of_the_same_rows() -> None:
    rng = random.Random(7)
    rows = [
        (
            n,
            rng.randrange(1, 40),
            dt.date(2024, 1, 1) + dt.timedelta(rng.randrange(60)),
            Decimal(rng.randrange(1, 10**7)) / 100,
            rng.choice(TRANSACTION_TYPES),
        )
        for n in range(1, 2001)
    ]
    names = TABLES[FileKind.TRANSACTIONS].names
    conn = duckdb.connect()
    conn.execute(f"CREATE TYPE transaction_type AS ENUM {TRANSACTION_TYPES!r}")
    conn.execute(
        "CREATE TABLE transactions ("
        + ", ".join(f"{c.name} {c.domain.duckdb}" for c in TABLES[FileKind.TRANSACTIONS].columns)
        + ")"
    )
    conn.executemany(f"INSERT INTO transactions VALUES ({', '.join('?' * len(names))})", rows)
    columns: dict[str, list[object]] = {
        name: [row[i] for row in rows] for i, name in enumerate(names)
    }
    columns[cents_of("amount")] = [int(row[3] * 100) for row in rows]
    for aggregate in (USER_TOTALS, DAILY_TOTALS):
        width = len(aggregate.key)
        query = aggregates.aggregate_of(aggregate).format(where="")
        expected = {
            tuple(row[:width]): [
                int(value * 100) if measure.money else value
                for value, measure in zip(row[width:], aggregate.measures, strict=True)
            ]
            for row in conn.execute(query).fetchall()
        }
        got = compile_summer(aggregate)(columns)
        assert {tuple(row[:width]): row[width:] for row in got} == expected
        assert len(got) == len(expected)
        assert [row[:width] for row in got] == sorted(row[:width] for row in got)
    conn.close()
