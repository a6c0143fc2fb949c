"""The synthetic data generator: deterministic, seed-shaped, and bad in every way asked for."""

from __future__ import annotations

import csv
from decimal import Decimal
from pathlib import Path

import duckdb

from moneylion.aggregates import verify
from moneylion.config import Config
from moneylion.generate import BAD_VARIANTS, generate, write_transactions
from moneylion.ingest import ingest_file
from moneylion.validate import RejectReason


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", users=50, transactions=500, bad_rate=0.1, seed=7)
    again = generate(tmp_path / "b", users=50, transactions=500, bad_rate=0.1, seed=7)
    other = generate(tmp_path / "c", users=50, transactions=500, bad_rate=0.1, seed=8)

    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert first[1].read_bytes() != other[1].read_bytes()


def test_clean_files_have_the_seed_shape(tmp_path: Path) -> None:
    users_csv, transactions_csv = generate(tmp_path, users=200, transactions=2_000, seed=1)

    with users_csv.open(newline="") as handle:
        users = list(csv.DictReader(handle))
    with transactions_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(u["user_id"]) for u in users] == list(range(1, 201))
    assert {u["country"] for u in users} <= {
        "Canada",
        "Japan",
        "France",
        "India",
        "UK",
        "Germany",
        "Australia",
        "USA",
    }
    assert [int(r["transaction_id"]) for r in rows] == list(range(1001, 3001))
    amounts = [Decimal(r["amount"]) for r in rows]
    assert all(
        Decimal("10.00") <= a < Decimal("5000") and a == a.quantize(Decimal("0.01"))
        for a in amounts
    )
    assert {r["transaction_type"] for r in rows} == {"deposit", "withdrawal", "purchase"}
    assert all(r["transaction_date"].startswith("2022-") for r in rows)


def test_bad_rows_cover_every_row_reason_when_ingested(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    users_csv, transactions_csv = generate(
        tmp_path, users=100, transactions=3_000, bad_rate=0.05, seed=2
    )
    ingest_file(warehouse, users_csv, config)

    outcome = ingest_file(warehouse, transactions_csv, config)

    generated = {reason for reason, _ in BAD_VARIANTS}
    assert set(outcome.rejected_by_reason) == generated
    assert generated == {r.value for r in RejectReason} - {"conflicts_with_stored"}
    assert 100 < outcome.rows_rejected < 300  # about 5% of 3,000, duplicates count twice
    assert outcome.rows_total == 3_000  # every row accounted for
    assert verify(warehouse) == []


def test_id_offsets_let_files_follow_each_other(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    first = write_transactions(tmp_path / "a.csv", 1_000, users=10, first_id=1)
    second = write_transactions(tmp_path / "b.csv", 1_000, users=10, first_id=1_001, seed=1)

    loaded = [ingest_file(warehouse, path, config).rows_loaded for path in (first, second)]

    assert loaded == [1_000, 1_000]
    assert verify(warehouse) == []
