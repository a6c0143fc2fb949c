"""The synthetic data generator: deterministic, seed-shaped, and bad in every way asked for."""

from __future__ import annotations

import csv
import datetime as dt
import re
from collections import Counter
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from moneylion.aggregates import verify
from moneylion.config import Config
from moneylion.generate import (
    COUNTRIES,
    ExpectedOutcome,
    expected_transactions_outcome,
    expected_users_outcome,
    generate,
    write_transactions,
    write_users,
)
from moneylion.ingest import ingest_file
from moneylion.rules import RejectReason

# conflicts_with_stored needs stored rows; line_too_long a 2 MiB line (tests/test_validate.py).
ROW_REASONS = {r.value for r in RejectReason} - {"conflicts_with_stored", "line_too_long"}
# Reasons about amounts and types cannot happen in a users file, nor future_date (a signup
# date is not bounded by the arrival).
USER_ROW_REASONS = ROW_REASONS - {
    "future_date",
    "bad_amount",
    "non_positive_amount",
    "too_many_decimals",
    "unknown_type",
}


def _id_fault(text: str) -> str | None:
    if not re.fullmatch(r"-?[0-9]+", text):
        return "bad_integer"
    if int(text) > 2**63 - 1:
        return "bad_integer"
    return "non_positive_id" if int(text) <= 0 else None


def latest_loaded_date() -> dt.date:
    """The last transaction_date a file arriving now loads: today (UTC) plus the default
    max_future_days, 1 (written out, not taken from moneylion.rules)."""
    return dt.datetime.now(dt.UTC).date() + dt.timedelta(days=1)


def _date_fault(text: str, latest: dt.date | None) -> str | None:
    if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", text):
        return "bad_date"
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        return "bad_date"
    return "future_date" if latest is not None and day > latest else None


def _amount_fault(text: str) -> str | None:
    match = re.fullmatch(r"-?([0-9]+)(?:\.([0-9]+))?", text)
    if not match or len(match.group(1)) > 16:
        return "bad_amount"
    if len(match.group(2) or "") > 2:
        return "too_many_decimals"
    return "non_positive_amount" if Decimal(text) <= 0 else None


def _field_fault(column: str, text: str, latest: dt.date) -> str | None:
    if not text:
        return "missing_field"
    if column in ("transaction_id", "user_id"):
        return _id_fault(text)
    if column == "transaction_date":  # bounded by the arrival; a signup date is not
        return _date_fault(text, latest)
    if column == "signup_date":
        return _date_fault(text, None)
    if column == "country":
        return None
    if column == "amount":
        return _amount_fault(text)
    return None if text.lower() in ("deposit", "withdrawal", "purchase") else "unknown_type"


def classify(path: Path, latest: dt.date | None = None) -> ExpectedOutcome:
    """DESIGN.md's row policies, read with the csv module, independently of the generator,
    for a file arriving now (``latest``: the last transaction_date that loads)."""
    latest = latest_loaded_date() if latest is None else latest
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        columns = next(reader)
        rejected: Counter[str] = Counter()
        copies: dict[str, list[tuple[str, ...]]] = {}
        total = 0
        for record in reader:
            total += 1
            fields = tuple(f.strip() for f in record)
            if len(fields) != len(columns):
                rejected["wrong_field_count"] += 1
                continue
            # The first fault in canonical column order wins: the generator writes that order.
            faults = [_field_fault(c, f, latest) for c, f in zip(columns, fields, strict=True)]
            fault = next((f for f in faults if f), None)
            if fault:
                rejected[fault] += 1
            else:
                copies.setdefault(fields[0], []).append(fields)
    duplicates = 0
    for rows in copies.values():
        if len(set(rows)) > 1:
            rejected["duplicate_in_file"] += len(rows)
        else:
            duplicates += len(rows) - 1
    loaded = total - duplicates - sum(rejected.values())
    return ExpectedOutcome(total, loaded, duplicates, dict(rejected))


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    first = generate(tmp_path / "a", users=50, transactions=500, bad_rate=0.1, seed=7)
    again = generate(tmp_path / "b", users=50, transactions=500, bad_rate=0.1, seed=7)
    other = generate(tmp_path / "c", users=50, transactions=500, bad_rate=0.1, seed=8)

    assert [p.name for p in first] == ["users.csv", "transactions.csv"]
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    assert first[0].read_bytes() != other[0].read_bytes()
    assert first[1].read_bytes() != other[1].read_bytes()


def test_clean_files_have_the_seed_shape(tmp_path: Path) -> None:
    users_csv, transactions_csv = generate(tmp_path, users=200, transactions=5_000, seed=1)

    assert users_csv.read_text().splitlines()[0] == "user_id,signup_date,country"
    header = transactions_csv.read_text().splitlines()[0]
    assert header == "transaction_id,user_id,transaction_date,amount,transaction_type"
    with users_csv.open(newline="") as handle:
        users = list(csv.DictReader(handle))
    with transactions_csv.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(u["user_id"]) for u in users] == list(range(1, 201))
    assert {u["country"] for u in users} == set(COUNTRIES)
    assert [int(r["transaction_id"]) for r in rows] == list(range(1001, 6001))
    for r in rows:
        # The seed writes amounts as Python floats print them: "3982.0", "1444.7", "788.95".
        assert re.fullmatch(r"[1-9][0-9]{1,3}\.[0-9]{1,2}", r["amount"]), r
        assert Decimal("10.00") <= Decimal(r["amount"]) < Decimal("5000")
        assert "2022-01-01" <= r["transaction_date"] <= "2023-01-01"
    assert {r["transaction_type"] for r in rows} == {"deposit", "withdrawal", "purchase"}
    assert any(re.fullmatch(r".*\.[0-9]", r["amount"]) for r in rows)
    user_ids = [int(r["user_id"]) for r in rows]
    assert min(user_ids) == 1
    assert 0 < sum(u > 200 for u in user_ids) < 50  # a few orphans, about one in a thousand
    assert classify(transactions_csv) == expected_transactions_outcome(5_000)


@pytest.mark.parametrize("bad_rate", [0.01, 0.05, 0.5, 0.9])
def test_bad_rows_cover_every_row_reason_and_match_the_expected_counts(
    tmp_path: Path, bad_rate: float
) -> None:
    path = write_transactions(tmp_path / "t.csv", 3_000, users=100, seed=4, bad_rate=bad_rate)

    found = classify(path)

    assert found == expected_transactions_outcome(3_000, bad_rate)
    assert set(found.rejected_by_reason) == ROW_REASONS
    assert found.rows_duplicate > 0  # identical copies too
    share = (found.rows_rejected + found.rows_duplicate) / found.rows_total
    assert share == pytest.approx(min(bad_rate, 0.5), rel=0.2)


@pytest.mark.parametrize("bad_rate", [0.02, 0.3])
def test_bad_users_rows_cover_every_users_reason_and_match_the_expected_counts(
    tmp_path: Path, bad_rate: float
) -> None:
    path = write_users(tmp_path / "u.csv", 2_000, seed=5, bad_rate=bad_rate)

    found = classify(path)

    assert found == expected_users_outcome(2_000, bad_rate)
    assert set(found.rejected_by_reason) == USER_ROW_REASONS
    assert found.rows_duplicate > 0


def test_ingesting_bad_rows_reports_every_reason_and_the_expected_counts(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    users_csv, transactions_csv = generate(
        tmp_path, users=140, transactions=3_000, bad_rate=0.05, seed=2
    )
    users = ingest_file(warehouse, users_csv, config)
    outcome = ingest_file(warehouse, transactions_csv, config)

    expected_users = expected_users_outcome(140, 0.05)
    assert set(users.rejected_by_reason) == USER_ROW_REASONS
    assert dict(users.rejected_by_reason) == dict(expected_users.rejected_by_reason)
    assert (users.rows_total, users.rows_loaded, users.rows_duplicate) == (
        expected_users.rows_total,
        expected_users.rows_loaded,
        expected_users.rows_duplicate,
    )
    expected = expected_transactions_outcome(3_000, 0.05)
    assert outcome.status == "loaded"
    assert set(outcome.rejected_by_reason) == ROW_REASONS
    assert dict(outcome.rejected_by_reason) == dict(expected.rejected_by_reason)
    assert (outcome.rows_total, outcome.rows_loaded, outcome.rows_duplicate) == (
        expected.rows_total,
        expected.rows_loaded,
        expected.rows_duplicate,
    )
    stored = warehouse.execute("SELECT count(*) FROM transactions").fetchall()[0][0]
    assert stored == expected.rows_loaded
    assert verify(warehouse) == []


def test_id_offsets_let_files_follow_each_other(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    first = write_transactions(tmp_path / "a.csv", 1_000, users=10, first_id=1)
    second = write_transactions(tmp_path / "b.csv", 1_000, users=10, first_id=1_001, seed=1)

    loaded = [ingest_file(warehouse, path, config).rows_loaded for path in (first, second)]

    assert loaded == [1_000, 1_000]
    assert verify(warehouse) == []
