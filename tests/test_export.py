"""SQLite export: the seed's queries give the warehouse's answers; increments equal a full rebuild.

Every warehouse test ends with ``verify``: the maintained aggregates equal a full recompute.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import sqlite3
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest
from litestar.testing import TestClient

from moneylion.aggregates import verify
from moneylion.api import create_app
from moneylion.config import Config
from moneylion.export import (
    bulk,
    close_sqlite,
    export_full,
    export_new,
    full,
    increment,
    interrupt_export,
    outcome,
    run_export,
    schema,
    writer,
)
from moneylion.ingest import ingest_file
from moneylion.schema import open_warehouse
from tests.conftest import TX_HEADER, USERS_HEADER, IngestStandIn, write_csv
from tests.expected import Expected

CENT = Decimal("0.01")
TABLES = (
    "users",
    "transactions",
    "files",
    "user_totals",
    "daily_totals",
    "top_users",
    "country_monthly_totals",
)

# The seed's own aggregate queries, run as an older tool would run them on the SQLite file.
SEED_USER_TOTALS = """
SELECT u.user_id, u.country, COUNT(t.transaction_id), SUM(t.amount),
       SUM(CASE WHEN t.transaction_type = 'deposit' THEN t.amount ELSE 0 END),
       SUM(CASE WHEN t.transaction_type = 'withdrawal' THEN t.amount ELSE 0 END),
       SUM(CASE WHEN t.transaction_type = 'purchase' THEN t.amount ELSE 0 END)
FROM users u LEFT JOIN transactions t ON u.user_id = t.user_id
GROUP BY u.user_id"""
SEED_TOP_USERS = """
SELECT user_id, COUNT(*) AS n FROM transactions GROUP BY user_id
ORDER BY n DESC, user_id LIMIT 10"""
SEED_DAILY = """
SELECT transaction_type, COUNT(*), SUM(amount) FROM transactions
WHERE transaction_date = ? GROUP BY transaction_type"""


@pytest.fixture(autouse=True)
def close_exporter() -> Iterator[None]:
    """The exporter keeps its SQLite connection open between exports; close it after each test."""
    yield
    close_sqlite()


def cents(value: float | None) -> Decimal:
    """A REAL sum rounded to cents (the seed summed REAL)."""
    return Decimal(repr(value or 0.0)).quantize(CENT)


def dump_sqlite(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every exported table in key order, plus the watermark (not the export time)."""
    lite = sqlite3.connect(path)
    try:
        tables = {
            table: lite.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()
            for table in TABLES
        }
        tables["export_state"] = lite.execute(
            "SELECT key, value FROM export_state WHERE key != 'exported_at' ORDER BY key"
        ).fetchall()
        return tables
    finally:
        lite.close()


def assert_equals_full_export(conn: duckdb.DuckDBPyConnection, sqlite_path: Path) -> None:
    reference = sqlite_path.with_name("reference.sqlite")
    export_full(conn, reference)
    assert dump_sqlite(sqlite_path) == dump_sqlite(reference)
    lite = sqlite3.connect(sqlite_path)
    try:
        assert lite.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        lite.close()


def random_files(directory: Path, count: int, seed: int) -> list[Path]:
    """Small users and transactions files with updates, duplicates, bad rows, orphans."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    next_tx = 1
    countries = ["Japan", "France", "Brazil", "Kenya"]
    types = ["deposit", "withdrawal", "purchase"]
    for number in range(count):
        if number % 3 == 0:
            rows = [
                f"{rng.randint(1, 60)},2022-0{rng.randint(1, 9)}-1{rng.randint(0, 9)},"
                f"{rng.choice(countries)}"
                for _ in range(rng.randint(1, 25))
            ]
            files.append(write_csv(directory / f"users_{number:03}.csv", USERS_HEADER, rows))
            continue
        rows = []
        for _ in range(rng.randint(1, 80)):
            rows.append(
                f"{next_tx},{rng.randint(1, 70)},2022-0{rng.randint(1, 3)}-0{rng.randint(1, 9)},"
                f"{rng.randint(1, 99999) / 100},{rng.choice(types)}"
            )
            next_tx += 1
        if number > 2 and rng.random() < 0.5:
            rows.append(f"{rng.randint(1, next_tx - 1)},1,2022-01-01,1.00,deposit")  # old id
        if rng.random() < 0.3:
            rows.append(f"{next_tx},0,2022-01-01,1.00,deposit")  # non_positive_id
        files.append(write_csv(directory / f"tx_{number:03}.csv", TX_HEADER, rows))
    return files


def test_seed_queries_on_the_export_give_the_maintained_aggregates_and_the_csv_sums(
    warehouse: duckdb.DuckDBPyConnection, config: Config, seed_files: tuple[Path, Path]
) -> None:
    users_csv, transactions_csv = seed_files
    for path in (users_csv, transactions_csv):  # as the daemon does: export after each commit
        assert ingest_file(warehouse, path, config).status == "loaded"
        export_new(warehouse, config.sqlite_path)

    expected = Expected()
    expected.add_transactions_file(transactions_csv)
    expected.add_users_file(users_csv)
    countries = expected.countries
    daily = {key: (expected.daily_count[key], total) for key, total in expected.daily.items()}

    def sums(user_id: int, key: str) -> Decimal:
        return expected.total[user_id] if key == "total" else expected.by_type[user_id, key]

    maintained = {
        row[0]: row[1:]
        for row in warehouse.execute(
            "SELECT user_id, tx_count, total_amount, total_deposit, total_withdrawal,"
            " total_purchase FROM user_totals"
        ).fetchall()
    }
    lite = sqlite3.connect(config.sqlite_path)
    try:
        seed_rows = lite.execute(SEED_USER_TOTALS).fetchall()
        assert len(seed_rows) == len(countries)
        for user_id, country, count, total, deposit, withdrawal, purchase in seed_rows:
            assert country == countries[user_id]
            got = (count, cents(total), cents(deposit), cents(withdrawal), cents(purchase))
            want = (
                expected.count[user_id],
                *(
                    sums(user_id, key).quantize(CENT)
                    for key in ("total", "deposit", "withdrawal", "purchase")
                ),
            )
            assert got == want, user_id
            if count:
                assert got == maintained[user_id], user_id

        # The exact aggregate tables hold decimal strings equal to the CSV sums.
        for user_id, count, total, deposit, withdrawal, purchase in lite.execute(
            "SELECT user_id, tx_count, total_amount, total_deposit, total_withdrawal,"
            " total_purchase FROM user_totals"
        ):
            assert (count, Decimal(total), Decimal(deposit)) == (
                expected.count[user_id],
                sums(user_id, "total"),
                sums(user_id, "deposit"),
            )
            assert (Decimal(withdrawal), Decimal(purchase)) == (
                sums(user_id, "withdrawal"),
                sums(user_id, "purchase"),
            )

        top = lite.execute(SEED_TOP_USERS).fetchall()
        assert top == expected.top(10)
        assert (
            top
            == warehouse.execute(
                "SELECT user_id, tx_count FROM top_users ORDER BY rank LIMIT 10"
            ).fetchall()
        )
        assert (
            top
            == lite.execute(
                "SELECT user_id, tx_count FROM top_users ORDER BY rank LIMIT 10"
            ).fetchall()
        )

        dates = sorted({date for date, _ in daily})
        for date in dates:
            got_daily = {
                kind: (count, cents(total))
                for kind, count, total in lite.execute(SEED_DAILY, (date,)).fetchall()
            }
            want = {kind: (c, s) for (day, kind), (c, s) in daily.items() if day == date}
            assert got_daily == want, date
        stored_daily = {
            (str(day), str(kind)): (count, total)
            for day, kind, count, total in warehouse.execute(
                "SELECT * FROM daily_totals"
            ).fetchall()
        }
        assert stored_daily == {key: (c, s) for key, (c, s) in daily.items()}
        exported_daily = {
            (day, kind): (count, Decimal(total))
            for day, kind, count, total in lite.execute("SELECT * FROM daily_totals")
        }
        assert exported_daily == stored_daily
    finally:
        lite.close()
    assert verify(warehouse) == []


def test_export_keeps_the_seed_column_names_and_types(
    warehouse: duckdb.DuckDBPyConnection, config: Config
) -> None:
    write_csv(config.inbox / "u.csv", USERS_HEADER, ["1,2022-01-02,Japan"])
    write_csv(config.inbox / "t.csv", TX_HEADER, ["7,1,2022-03-04,12.50,Deposit"])
    for name in ("u.csv", "t.csv"):
        ingest_file(warehouse, config.inbox / name, config)
    export_new(warehouse, config.sqlite_path)
    lite = sqlite3.connect(config.sqlite_path)
    try:
        columns = {
            table: [(row[1], row[2]) for row in lite.execute(f"PRAGMA table_info({table})")]
            for table in ("users", "transactions")
        }
        assert columns == {
            "users": [("user_id", "INTEGER"), ("signup_date", "TEXT"), ("country", "TEXT")],
            "transactions": [
                ("transaction_id", "INTEGER"),
                ("user_id", "INTEGER"),
                ("transaction_date", "TEXT"),
                ("amount", "REAL"),
                ("transaction_type", "TEXT"),
            ],
        }
        assert lite.execute(
            "SELECT t.*, typeof(t.amount), typeof(t.transaction_date), u.country "
            "FROM transactions t JOIN users u USING (user_id)"
        ).fetchall() == [(7, 1, "2022-03-04", 12.5, "deposit", "real", "text", "Japan")]
        assert lite.execute("SELECT * FROM user_totals").fetchall() == [
            (1, 1, "12.50", "12.50", "0.00", "0.00", "2022-03-04", "2022-03-04")
        ]
        assert lite.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        lite.close()
    assert verify(warehouse) == []


def test_exports_after_each_file_equal_a_full_export(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    files = random_files(tmp_path / "files", 24, seed=6)
    files.insert(5, write_csv(tmp_path / "broken.csv", "no,header,here\n", ["1,2,3"]))
    files.append(files[1])  # the same bytes again: a duplicate file, nothing new
    exported = []
    for path in files:
        ingest_file(warehouse, path, config)
        exported.append(export_new(warehouse, config.sqlite_path))
        assert_equals_full_export(warehouse, config.sqlite_path)
    assert exported[0].full  # the first export creates the file
    for result in exported[1:]:
        (appended,) = warehouse.execute(
            "SELECT count(*) FROM transactions WHERE file_id > ? AND file_id <= ?",
            [result.first_file_id, result.last_file_id],
        ).fetchall()[0]
        assert result.transactions == appended
    assert sum(r.transactions for r in exported) == len(
        dump_sqlite(config.sqlite_path)["transactions"]
    )
    assert not exported[-1].exported_anything  # the duplicate file added nothing
    assert verify(warehouse) == []


def test_a_later_users_file_updates_the_exported_profile(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    first = write_csv(
        tmp_path / "u1.csv", USERS_HEADER, ["1,2022-01-02,Japan", "2,2022-01-03,Peru"]
    )
    second = write_csv(tmp_path / "u2.csv", USERS_HEADER, ["1,2022-01-02,France"])
    ingest_file(warehouse, first, config)
    export_new(warehouse, config.sqlite_path)
    ingest_file(warehouse, second, config)
    result = export_new(warehouse, config.sqlite_path)
    assert (result.files, result.users, result.transactions) == (1, 1, 0)
    assert dump_sqlite(config.sqlite_path)["users"] == [
        (1, "2022-01-02", "France"),
        (2, "2022-01-03", "Peru"),
    ]
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


def test_nothing_new_leaves_the_sqlite_file_untouched(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    ingest_file(warehouse, write_csv(tmp_path / "t.csv", TX_HEADER, ["1,1,2022-01-01,5,deposit"]))
    export_new(warehouse, config.sqlite_path)
    before = config.sqlite_path.read_bytes(), dump_sqlite(config.sqlite_path)
    result = export_new(warehouse, config.sqlite_path)
    assert not result.exported_anything
    assert (result.files, result.transactions, result.last_file_id) == (0, 0, 1)
    assert (config.sqlite_path.read_bytes(), dump_sqlite(config.sqlite_path)) == before
    assert verify(warehouse) == []


def test_a_reader_sees_the_old_state_until_the_commit_and_is_not_blocked(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingest_file(warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, ["1,1,2022-01-01,5,deposit"]))
    export_new(warehouse, config.sqlite_path)
    ingest_file(
        warehouse, write_csv(tmp_path / "b.csv", TX_HEADER, ["2,1,2022-01-02,7.25,purchase"])
    )
    seen: list[tuple[object, ...]] = []

    def read_now(point: str) -> None:
        if point != "before_commit":
            return
        reader = sqlite3.connect(config.sqlite_path, timeout=0.0)  # would fail if blocked
        try:
            seen.append(
                reader.execute(
                    "SELECT (SELECT count(*) FROM transactions), (SELECT total_amount FROM"
                    " user_totals), (SELECT value FROM export_state WHERE key = 'last_file_id')"
                ).fetchone()
            )
        finally:
            reader.close()

    monkeypatch.setattr(outcome, "fault_hook", read_now)
    export_new(warehouse, config.sqlite_path)
    assert seen == [(1, "5.00", "1")]
    assert dump_sqlite(config.sqlite_path)["user_totals"] == [
        (1, 2, "12.25", "5.00", "0.00", "7.25", "2022-01-01", "2022-01-02")
    ]
    assert verify(warehouse) == []


def test_an_export_of_another_warehouse_is_rebuilt_not_extended(
    config: Config, tmp_path: Path
) -> None:
    other = config.with_overrides(warehouse=tmp_path / "other")
    for cfg, rows in (
        (other, ["1,1,2022-01-01,5,deposit"]),
        (config, ["9,2,2022-02-02,3,purchase"]),
    ):
        conn = open_warehouse(cfg)
        try:
            ingest_file(
                conn, write_csv(tmp_path / f"{cfg.warehouse.name}.csv", TX_HEADER, rows), cfg
            )
            export_new(conn, cfg.sqlite_path)
        finally:
            conn.close()
    config.sqlite_path.write_bytes(other.sqlite_path.read_bytes())  # file #1 there is not ours
    conn = open_warehouse(config)
    try:
        result = export_new(conn, config.sqlite_path)
        assert result.full
        assert dump_sqlite(config.sqlite_path)["transactions"] == [
            (9, 2, "2022-02-02", 3.0, "purchase")
        ]
        assert_equals_full_export(conn, config.sqlite_path)
        assert verify(conn) == []
    finally:
        conn.close()


def test_full_export_replaces_the_file_and_leaves_nothing_aside(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    for number in range(3):
        rows = [f"{number * 10 + k},{k},2022-01-0{k},1.0{k},withdrawal" for k in range(1, 4)]
        ingest_file(warehouse, write_csv(tmp_path / f"t{number}.csv", TX_HEADER, rows), config)
        export_new(warehouse, config.sqlite_path)
    incremental = dump_sqlite(config.sqlite_path)
    reader = sqlite3.connect(config.sqlite_path)
    reader.execute("SELECT count(*) FROM transactions").fetchall()
    reader.close()
    result = export_full(warehouse, config.sqlite_path)
    assert (result.full, result.files, result.transactions, result.last_file_id) == (True, 3, 9, 3)
    assert dump_sqlite(config.sqlite_path) == incremental
    assert sorted(p.name for p in config.warehouse.glob("moneylion.sqlite*")) == [
        "moneylion.sqlite"
    ]
    assert verify(warehouse) == []


def test_cli_export_catches_up_and_full_rebuilds(
    config: Config, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conn = open_warehouse(config)
    try:
        ingest_file(
            conn, write_csv(tmp_path / "t.csv", TX_HEADER, ["1,1,2022-01-01,5,deposit"]), config
        )
    finally:
        conn.close()
    assert run_export(config, full=False) == 0
    assert "1 files, 0 users, 1 transactions" in capsys.readouterr().out
    assert run_export(config, full=False) == 0
    assert "up to date (file #1)" in capsys.readouterr().out
    assert run_export(config, full=True) == 0
    assert "full export" in capsys.readouterr().out
    assert dump_sqlite(config.sqlite_path)["transactions"] == [(1, 1, "2022-01-01", 5.0, "deposit")]
    conn = open_warehouse(config)
    try:
        assert verify(conn) == []
    finally:
        conn.close()


def test_large_increments_through_a_side_file_equal_a_full_export(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Every increment counts as large.
    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, large_increment_rows=0)
    )
    export_new(warehouse, config.sqlite_path, tuning=config.tuning)
    sides: list[bool] = []
    monkeypatch.setattr(
        outcome, "fault_hook", lambda point: sides.append(True) if point == "side_written" else None
    )
    exported = []
    for path in random_files(tmp_path / "files", 12, seed=8):
        ingest_file(warehouse, path, config)
        exported.append(export_new(warehouse, config.sqlite_path, tuning=config.tuning))
        assert_equals_full_export(warehouse, config.sqlite_path)
    loaded = [result for result in exported if result.users or result.transactions]
    assert len(sides) == len(loaded) > 0  # each went through a side file
    assert {bool(r.users) for r in loaded} == {True, False}  # users files and transactions files
    assert not bulk.side_path(config.sqlite_path).exists()
    assert verify(warehouse) == []


def test_small_increments_after_a_large_one_add_to_the_users_it_brought(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
) -> None:
    ingest_file(
        warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, ["1,1,2022-01-05,1.00,deposit"])
    )
    export_new(warehouse, config.sqlite_path)
    rows = [f"{n},{n % 50 + 1},2022-01-0{n % 9 + 1},{n}.25,purchase" for n in range(2, 300)]
    ingest_file(warehouse, write_csv(tmp_path / "b.csv", TX_HEADER, rows), config)
    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, large_increment_rows=100)
    )
    large = export_new(warehouse, config.sqlite_path, tuning=config.tuning)
    assert large.transactions == 298
    assert base_and_delta_users(config.sqlite_path) == (list(range(1, 51)), [])
    ingest_file(warehouse, write_csv(tmp_path / "c.csv", TX_HEADER, ["900,7,2022-02-01,3,deposit"]))
    export_new(warehouse, config.sqlite_path, tuning=config.tuning)
    assert base_and_delta_users(config.sqlite_path)[1] == [7]  # known from the large increment
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


def test_a_large_increment_exporting_a_transaction_twice_fails_and_leaves_the_file_whole(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
) -> None:
    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, large_increment_rows=0)
    )
    ingest_file(warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, ["1,1,2022-01-01,5,deposit"]))
    export_new(warehouse, config.sqlite_path, tuning=config.tuning)
    lite = sqlite3.connect(config.sqlite_path)  # id 2 is already there, as by a bug
    lite.execute("INSERT INTO transactions VALUES (2, 1, '2022-01-02', 7.0, 'deposit')")
    lite.commit()
    lite.close()
    before = dump_sqlite(config.sqlite_path)
    ingest_file(warehouse, write_csv(tmp_path / "b.csv", TX_HEADER, ["2,1,2022-01-02,7,deposit"]))
    with pytest.raises(sqlite3.IntegrityError):
        export_new(warehouse, config.sqlite_path, tuning=config.tuning)
    assert dump_sqlite(config.sqlite_path) == before
    assert not bulk.side_path(config.sqlite_path).exists()
    assert verify(warehouse) == []


@pytest.mark.parametrize("failure", ["bulk_write_refused", "interrupted"])
def test_an_export_failing_midway_leaves_the_file_whole_and_the_next_one_catches_up(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failure: str,
) -> None:
    interrupt_export()  # no export running, no writer open: nothing happens
    ingest_file(warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, ["1,1,2022-01-01,5,deposit"]))
    export_new(warehouse, config.sqlite_path)
    before = dump_sqlite(config.sqlite_path)
    rows = [f"{n},{n % 7 + 1},2022-01-02,7,deposit" for n in range(2, 502)]
    ingest_file(warehouse, write_csv(tmp_path / "b.csv", TX_HEADER, rows), config)
    # A side file, a long INSERT.
    large = config.with_overrides(tuning=dataclasses.replace(config.tuning, large_increment_rows=0))
    if failure == "bulk_write_refused":  # a column the side file lacks: the driver refuses it
        broken = (("transactions", "SELECT 1 AS no_such_column"),)
        monkeypatch.setattr(increment, "_SIDE_TRANSACTIONS", broken)
        message = "no_such_column"
    else:

        def interrupt_while_running(point: str) -> None:
            # As the daemon's stop does from its thread: interrupt while a statement of the
            # export runs (SQLite's progress handler is called from inside a running statement).
            if point == "sqlite_begun":
                lite = writer.writer(config.sqlite_path).lite
                lite.set_progress_handler(lambda: interrupt_export() or 0, 10)

        monkeypatch.setattr(outcome, "fault_hook", interrupt_while_running)
        message = "interrupted"
    with pytest.raises(sqlite3.OperationalError, match=message):
        export_new(warehouse, config.sqlite_path, tuning=large.tuning)
    assert dump_sqlite(config.sqlite_path) == before
    assert not bulk.side_path(config.sqlite_path).exists()
    monkeypatch.undo()
    assert export_new(warehouse, config.sqlite_path).transactions == 500
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


def test_background_checkpoints_keep_the_file_whole_and_close_removes_the_wal(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checkpoints: list[object] = []
    real_checkpoint = writer.Checkpointer._checkpoint

    def counted(self: writer.Checkpointer, lite: sqlite3.Connection) -> None:
        real_checkpoint(self, lite)
        checkpoints.append(lite)

    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, checkpoint_every_changes=1)
    )
    monkeypatch.setattr(writer.Checkpointer, "_checkpoint", counted)
    export_new(warehouse, config.sqlite_path, tuning=config.tuning)
    for path in random_files(tmp_path / "files", 10, seed=9):
        ingest_file(warehouse, path, config)
        export_new(warehouse, config.sqlite_path, tuning=config.tuning)
    close_sqlite()  # joins the checkpoint thread
    assert checkpoints
    assert not config.sqlite_path.with_name("moneylion.sqlite-wal").exists()
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


@pytest.mark.parametrize("content", ["garbage", "seed_sqlite"])
def test_a_file_that_is_not_our_export_is_rebuilt(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, content: str
) -> None:
    if content == "garbage":
        config.sqlite_path.write_bytes(b"not a database at all" * 100)
    else:  # the seed's own SQLite file: its tables, no export_state
        lite = sqlite3.connect(config.sqlite_path)
        lite.execute(
            "CREATE TABLE users (user_id INTEGER PRIMARY KEY, signup_date TEXT, country TEXT)"
        )
        lite.execute("INSERT INTO users VALUES (99, '2020-01-01', 'Chile')")
        lite.commit()
        lite.close()
    ingest_file(
        warehouse, write_csv(tmp_path / "u.csv", USERS_HEADER, ["1,2022-01-02,Japan"]), config
    )
    result = export_new(warehouse, config.sqlite_path)
    assert result.full
    assert dump_sqlite(config.sqlite_path)["users"] == [(1, "2022-01-02", "Japan")]
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


def test_exporting_a_transaction_twice_fails_loudly_instead_of_counting_it_twice(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    ingest_file(warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, ["1,1,2022-01-01,5,deposit"]))
    export_new(warehouse, config.sqlite_path)
    ingest_file(warehouse, write_csv(tmp_path / "b.csv", TX_HEADER, ["2,1,2022-01-02,7,deposit"]))
    export_new(warehouse, config.sqlite_path)
    close_sqlite()
    lite = sqlite3.connect(config.sqlite_path)  # a watermark wound back by hand
    sha_1 = warehouse.execute("SELECT sha256 FROM files WHERE file_id = 1").fetchall()[0][0]
    lite.executemany(
        "UPDATE export_state SET value = ? WHERE key = ?",
        [("1", "last_file_id"), (sha_1, "last_file_sha256")],
    )
    lite.commit()
    lite.close()
    before = dump_sqlite(config.sqlite_path)

    with pytest.raises(sqlite3.IntegrityError):
        export_new(warehouse, config.sqlite_path)
    assert dump_sqlite(config.sqlite_path) == before  # rolled back whole
    assert before["user_totals"] == [
        (1, 2, "12.00", "12.00", "0.00", "0.00", "2022-01-01", "2022-01-02")
    ]
    export_full(warehouse, config.sqlite_path)
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


def base_and_delta_users(path: Path) -> tuple[list[int], list[int]]:
    lite = sqlite3.connect(path)
    try:
        base = lite.execute("SELECT user_id FROM user_totals_base ORDER BY 1").fetchall()
        delta = lite.execute("SELECT user_id FROM user_totals_delta ORDER BY 1").fetchall()
        return [row[0] for row in base], [row[0] for row in delta]
    finally:
        lite.close()


def test_increments_add_known_users_to_the_delta_and_new_users_to_the_base(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    first = ["1,1,2022-01-05,10.10,deposit", "2,2,2022-01-06,20.20,purchase"]
    ingest_file(warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, first), config)
    assert export_new(warehouse, config.sqlite_path).full
    later = ["3,2,2022-01-01,0.90,withdrawal", "4,3,2022-01-07,3.33,deposit"]
    ingest_file(warehouse, write_csv(tmp_path / "b.csv", TX_HEADER, later), config)
    assert not export_new(warehouse, config.sqlite_path).full
    assert base_and_delta_users(config.sqlite_path) == ([1, 2, 3], [2])
    assert dump_sqlite(config.sqlite_path)["user_totals"] == [
        (1, 1, "10.10", "10.10", "0.00", "0.00", "2022-01-05", "2022-01-05"),
        (2, 2, "21.10", "0.00", "0.90", "20.20", "2022-01-01", "2022-01-06"),
        (3, 1, "3.33", "3.33", "0.00", "0.00", "2022-01-07", "2022-01-07"),
    ]
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


def test_a_large_delta_is_folded_into_the_base_with_the_same_totals(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
) -> None:
    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, compact_delta_users=40)
    )
    export_new(warehouse, config.sqlite_path, tuning=config.tuning)
    delta_sizes = []
    for path in random_files(tmp_path / "files", 30, seed=11):
        ingest_file(warehouse, path, config)
        export_new(warehouse, config.sqlite_path, tuning=config.tuning)
        delta_sizes.append(len(base_and_delta_users(config.sqlite_path)[1]))
        assert_equals_full_export(warehouse, config.sqlite_path)
    assert max(delta_sizes) < 40  # folded as soon as it reached 40 users
    shrunk = [later < earlier for earlier, later in itertools.pairwise(delta_sizes)]
    assert any(shrunk)  # a fold emptied it
    assert max(delta_sizes) > 0  # small increments used it
    assert verify(warehouse) == []


def test_increments_touching_many_users_add_to_the_base_directly(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
) -> None:
    config = config.with_overrides(tuning=dataclasses.replace(config.tuning, compact_delta_users=1))
    export_new(warehouse, config.sqlite_path, tuning=config.tuning)
    for path in random_files(tmp_path / "files", 12, seed=12):
        ingest_file(warehouse, path, config)
        export_new(warehouse, config.sqlite_path, tuning=config.tuning)
        assert base_and_delta_users(config.sqlite_path)[1] == []
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


def test_user_totals_lookups_and_joins_read_by_key(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    ingest_file(warehouse, write_csv(tmp_path / "t.csv", TX_HEADER, ["1,1,2022-01-01,5,deposit"]))
    export_new(warehouse, config.sqlite_path)
    lite = sqlite3.connect(config.sqlite_path)
    try:
        for query in (
            "SELECT * FROM user_totals WHERE user_id = 1",
            "SELECT u.country, t.total_amount FROM users u JOIN user_totals t USING (user_id)"
            " WHERE u.user_id = 1",
        ):
            plan = [row[3] for row in lite.execute("EXPLAIN QUERY PLAN " + query)]
            assert not [step for step in plan if step.startswith("SCAN")], plan
        assert lite.execute(
            "SELECT type FROM sqlite_schema WHERE name = 'user_totals'"
        ).fetchall() == [("view",)]
    finally:
        lite.close()
    assert verify(warehouse) == []


def test_an_export_in_the_previous_format_is_rebuilt(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    lite = sqlite3.connect(config.sqlite_path)  # format 1: user_totals was a table
    lite.executescript(
        "CREATE TABLE user_totals (user_id INTEGER PRIMARY KEY, tx_count INTEGER NOT NULL);"
        "CREATE TABLE export_state (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO export_state VALUES ('format', 'moneylion-sqlite-export 1'),"
        " ('last_file_id', '0');"
    )
    lite.close()
    ingest_file(warehouse, write_csv(tmp_path / "t.csv", TX_HEADER, ["1,1,2022-01-01,5,deposit"]))
    assert export_new(warehouse, config.sqlite_path).full
    assert dump_sqlite(config.sqlite_path)["user_totals"] == [
        (1, 1, "5.00", "5.00", "0.00", "0.00", "2022-01-01", "2022-01-01")
    ]
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


def test_the_base_users_bitmap_knows_only_ids_in_the_base(tmp_path: Path) -> None:
    lite = sqlite3.connect(tmp_path / "bits.sqlite")
    try:
        lite.executescript(schema.SQLITE_SCHEMA)
        lite.executemany(
            "INSERT INTO user_totals_base VALUES (?, 1, '1.00', '1.00', '0.00', '0.00', 'd', 'd')",
            [(1,), (9,), (70,)],
        )
        base_users = writer.BaseUsers(lite)
    finally:
        lite.close()
    rows = [[user_id] for user_id in (1, 2, 9, 70, 71, 500, -3, 1 << 40)]
    assert base_users.split(rows) == ([[1], [9], [70]], [[2], [71], [500], [-3], [1 << 40]])
    base_users.add(500)
    base_users.add(1 << 40)  # beyond the bitmap: stays unknown, its sums go to the base
    assert base_users.split(rows)[0] == [[1], [9], [70], [500]]


def test_a_full_export_written_by_two_threads_equals_one_written_by_one(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for path in random_files(tmp_path / "files", 16, seed=13):
        ingest_file(warehouse, path, config)
    one_thread = tmp_path / "one.sqlite"
    export_full(warehouse, one_thread)
    threads: list[str] = []
    real_append = bulk.append

    def append(
        path: Path,
        cur: duckdb.DuckDBPyConnection,
        tables: tuple[tuple[str, str], ...],
        params: dict[str, object],
    ) -> dict[str, int]:
        threads.append(threading.current_thread().name)
        return real_append(path, cur, tables, params)

    monkeypatch.setattr(bulk, "append", append)
    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, parallel_min_transactions=1)
    )
    result = export_full(warehouse, config.sqlite_path, tuning=config.tuning)
    assert sorted(threads) == ["MainThread", "sqlite-export-transactions"]
    transactions = dump_sqlite(config.sqlite_path)["transactions"]
    assert result.transactions == len(transactions) > 0
    assert dump_sqlite(config.sqlite_path) == dump_sqlite(one_thread)
    lite = sqlite3.connect(config.sqlite_path)
    try:
        assert lite.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert lite.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        lite.close()
    assert sorted(p.name for p in config.warehouse.glob("moneylion.sqlite.*")) == []
    assert verify(warehouse) == []


@pytest.mark.parametrize("failing", ["transactions", "user_totals_base"])
def test_a_failing_thread_fails_the_full_export_and_leaves_the_old_file_whole(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    for path in random_files(tmp_path / "files", 6, seed=14):
        ingest_file(warehouse, path, config)
    export_full(warehouse, config.sqlite_path)
    close_sqlite()
    before = dump_sqlite(config.sqlite_path)
    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, parallel_min_transactions=1)
    )
    broken = (failing, "SELECT 1 AS no_such_column")
    if failing == "transactions":
        monkeypatch.setattr(full, "_TRANSACTIONS", broken)
    else:
        monkeypatch.setattr(full, "_OTHER_TABLES", (*full._OTHER_TABLES[:2], broken))
    with pytest.raises(sqlite3.OperationalError, match="no_such_column"):
        export_full(warehouse, config.sqlite_path, tuning=config.tuning)
    assert dump_sqlite(config.sqlite_path) == before
    assert sorted(p.name for p in config.warehouse.glob("moneylion.sqlite.*")) == []
    assert verify(warehouse) == []


SEED_USER_SUMMARY = """
SELECT u.user_id, u.country, SUM(t.amount),
       SUM(CASE WHEN t.transaction_type = 'deposit' THEN t.amount ELSE 0 END),
       SUM(CASE WHEN t.transaction_type = 'withdrawal' THEN t.amount ELSE 0 END),
       SUM(CASE WHEN t.transaction_type = 'purchase' THEN t.amount ELSE 0 END)
FROM users u JOIN transactions t ON u.user_id = t.user_id
WHERE u.user_id = ? GROUP BY u.user_id, u.country"""
SEED_TOP_USERS_WITH_COUNTRY = """
SELECT t.user_id, u.country, COUNT(*) AS n FROM transactions t JOIN users u ON u.user_id = t.user_id
GROUP BY t.user_id, u.country ORDER BY n DESC, t.user_id LIMIT 10"""
SEED_DAILY_BY_TYPE = """
SELECT transaction_date, transaction_type, SUM(amount) FROM transactions
WHERE transaction_date = ? GROUP BY transaction_type ORDER BY transaction_type"""


@pytest.mark.parametrize("summaries_from", ["duckdb", "sqlite_export"])
def test_seed_queries_on_the_export_equal_the_apis_answers_to_the_cent(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    seed_files: tuple[Path, Path],
    summaries_from: str,
) -> None:
    last = 0
    for path in seed_files:  # as the daemon does: export after each commit
        outcome_of_file = ingest_file(warehouse, path, config)
        assert outcome_of_file.file_id is not None
        last = outcome_of_file.file_id
        export_new(warehouse, config.sqlite_path)
    # With ``committed``, user summaries come from the export itself while it is current.
    ingest = IngestStandIn(committed=lambda: last) if summaries_from == "sqlite_export" else None
    lite = sqlite3.connect(config.sqlite_path)
    try:
        with TestClient(app=create_app(config, warehouse, ingest=ingest)) as client:
            user_ids = [row[0] for row in lite.execute("SELECT user_id FROM users ORDER BY 1")]
            for user_id in user_ids[::20]:
                rows = lite.execute(SEED_USER_SUMMARY, (user_id,)).fetchall()
                answer = client.get(f"/api/user_transaction_summary?user_id={user_id}")
                if not rows:  # a profile without transactions
                    assert answer.status_code == 200
                    assert answer.json()[0]["total_transaction_amount"] == 0
                    continue
                ((uid, country, *sums),) = rows
                assert answer.json() == [
                    {
                        "user_id": uid,
                        "country": country,
                        "total_transaction_amount": float(cents(sums[0])),
                        "total_deposit": float(cents(sums[1])),
                        "total_withdrawal": float(cents(sums[2])),
                        "total_purchase": float(cents(sums[3])),
                    }
                ], user_id

            top = client.get("/api/top_users").json()
            assert top == [
                {"user_id": uid, "country": country, "transaction_count": n}
                for uid, country, n in lite.execute(SEED_TOP_USERS_WITH_COUNTRY)
            ]

            dates = [
                row[0] for row in lite.execute("SELECT DISTINCT transaction_date FROM transactions")
            ]
            assert dates
            for date in dates:
                answer = client.get(f"/api/daily_transactions?date={date}")
                assert answer.json() == [
                    {
                        "transaction_date": day,
                        "transaction_type": kind,
                        "daily_total": float(cents(total)),
                    }
                    for day, kind, total in lite.execute(SEED_DAILY_BY_TYPE, (date,))
                ], date
            if summaries_from == "sqlite_export":
                replica = client.app.state["moneylion"].replica
                assert replica.answered > 0
                assert replica.behind == 0
    finally:
        lite.close()
    assert verify(warehouse) == []
