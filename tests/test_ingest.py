"""Ingest: exactly once, immutable transactions, latest-wins users, orphans, the seed's answers.

Every test ends with ``verify``: the maintained aggregates equal a full recompute, to the cent.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import shutil
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from moneylion.aggregates import verify
from moneylion.config import Config
from moneylion.ingest import ingest_file, warehouse_status
from tests.conftest import TX_HEADER, USERS_HEADER, write_csv
from tests.expected import Expected


def totals(conn: duckdb.DuckDBPyConnection) -> list[tuple[object, ...]]:
    return (
        conn.execute("SELECT * FROM user_totals ORDER BY user_id").fetchall()
        + conn.execute("SELECT * FROM daily_totals ORDER BY 1, 2").fetchall()
    )


def test_seed_files_give_the_same_answers_as_an_independent_computation(
    warehouse: duckdb.DuckDBPyConnection, config: Config, seed_files: tuple[Path, Path]
) -> None:
    users_csv, transactions_csv = seed_files
    loaded = [ingest_file(warehouse, path, config) for path in (transactions_csv, users_csv)]
    assert [(o.status, o.rows_rejected) for o in loaded] == [("loaded", 0), ("loaded", 0)]
    expected = Expected()
    expected.add_transactions_file(transactions_csv)
    expected.add_users_file(users_csv)

    stored = {
        row[0]: row[1:]
        for row in warehouse.execute(
            "SELECT user_id, total_amount, total_deposit, total_withdrawal, total_purchase, "
            "tx_count FROM user_totals"
        ).fetchall()
    }
    assert stored == {
        user: (
            expected.total[user],
            expected.by_type[user, "deposit"],
            expected.by_type[user, "withdrawal"],
            expected.by_type[user, "purchase"],
            expected.count[user],
        )
        for user in expected.count
    }
    top10 = warehouse.execute("SELECT user_id, tx_count FROM top_users ORDER BY rank LIMIT 10")
    assert top10.fetchall() == expected.top(10)
    stored_daily = {
        (str(day), kind): (total, count)
        for day, kind, total, count in warehouse.execute(
            "SELECT transaction_date, CAST(transaction_type AS VARCHAR), total_amount, tx_count "
            "FROM daily_totals"
        ).fetchall()
    }
    assert stored_daily == {
        key: (total, expected.daily_count[key]) for key, total in expected.daily.items()
    }
    assert dict(warehouse.execute("SELECT user_id, country FROM users").fetchall()) == (
        expected.countries
    )
    assert verify(warehouse) == []


def test_reingesting_a_file_under_any_name_changes_nothing(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    first = write_csv(
        tmp_path / "a.csv", TX_HEADER, ["1,1,2022-01-01,10.00,deposit", "2,2,2022-01-02,5,purchase"]
    )
    loaded = ingest_file(warehouse, first, config)
    before = totals(warehouse)

    same = ingest_file(warehouse, first, config)
    renamed = tmp_path / "b.csv"
    shutil.copy(first, renamed)
    copy = ingest_file(warehouse, renamed, config)

    assert loaded.status == "loaded"
    assert (same.status, copy.status) == ("duplicate_file", "duplicate_file")
    assert same.file_id == copy.file_id == loaded.file_id
    assert totals(warehouse) == before
    assert warehouse.execute("SELECT count(*) FROM files").fetchall() == [(1,)]
    assert verify(warehouse) == []


def test_conflicting_resend_is_rejected_and_totals_unchanged(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    ingest_file(
        warehouse,
        write_csv(tmp_path / "a.csv", TX_HEADER, ["1,1,2022-01-01,10.00,deposit"]),
        config,
    )
    before = totals(warehouse)

    resend = ingest_file(
        warehouse,
        write_csv(
            tmp_path / "b.csv",
            TX_HEADER,
            ["1,1,2022-01-01,10.00,deposit", "1,1,2022-01-01,99.00,deposit"],
        ),
        config,
    )

    assert resend.rejected_by_reason == {"duplicate_in_file": 2}
    conflict = ingest_file(
        warehouse,
        write_csv(tmp_path / "c.csv", TX_HEADER, ["1,1,2022-01-01,99.00,deposit"]),
        config,
    )
    assert conflict.rejected_by_reason == {"conflicts_with_stored": 1}
    assert warehouse.execute(
        "SELECT line_number, message FROM rejects WHERE file_id = ?", [conflict.file_id]
    ).fetchall() == [(2, "transaction_id 1 is stored (file #1) with different content")]
    assert totals(warehouse) == before
    assert verify(warehouse) == []


def test_identical_rows_already_stored_are_duplicates_and_new_rows_load(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    ingest_file(
        warehouse,
        write_csv(tmp_path / "a.csv", TX_HEADER, ["1,1,2022-01-01,10.00,deposit"]),
        config,
    )

    overlap = ingest_file(
        warehouse,
        write_csv(
            tmp_path / "b.csv",
            TX_HEADER,
            ["1,1,2022-01-01,10.0,Deposit", "2,1,2022-01-01,1.00,withdrawal"],
        ),
        config,
    )

    assert (overlap.rows_loaded, overlap.rows_duplicate, overlap.rows_rejected) == (1, 1, 0)
    assert warehouse.execute(
        "SELECT tx_count, total_amount, total_withdrawal FROM user_totals"
    ).fetchall() == [(2, Decimal("11.00"), Decimal("1.00"))]
    assert verify(warehouse) == []


def test_orphan_transactions_count_and_users_arriving_later_get_attached(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    ingest_file(
        warehouse,
        write_csv(tmp_path / "t.csv", TX_HEADER, ["1,42,2022-01-01,3.00,purchase"]),
        config,
    )
    assert warehouse.execute(
        "SELECT t.user_id, u.country FROM user_totals t LEFT JOIN users u USING (user_id)"
    ).fetchall() == [(42, None)]

    ingest_file(
        warehouse, write_csv(tmp_path / "u.csv", USERS_HEADER, ["42,2021-05-01,Chile"]), config
    )

    assert warehouse.execute(
        "SELECT t.user_id, u.country FROM user_totals t JOIN users u USING (user_id)"
    ).fetchall() == [(42, "Chile")]
    assert verify(warehouse) == []


def test_users_are_upserted_latest_file_wins(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    ingest_file(
        warehouse,
        write_csv(tmp_path / "u1.csv", USERS_HEADER, ["1,2021-01-01,Japan", "2,2021-01-02,Peru"]),
        config,
    )

    second = ingest_file(
        warehouse,
        write_csv(tmp_path / "u2.csv", USERS_HEADER, ["1,2021-01-01,France", "2,2021-01-02,Peru"]),
        config,
    )

    assert (second.rows_loaded, second.rows_duplicate) == (1, 1)
    assert warehouse.execute(
        "SELECT user_id, country, file_id FROM users ORDER BY 1"
    ).fetchall() == [
        (1, "France", second.file_id),
        (2, "Peru", 1),
    ]
    assert verify(warehouse) == []


def test_status_lists_counts_and_last_files(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    ingest_file(
        warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, ["1,1,2022-01-01,1,deposit"]), config
    )
    ingest_file(warehouse, write_csv(tmp_path / "b.csv", "nonsense\n", ["x"]), config)

    status = warehouse_status(warehouse, last=5)

    assert status["counts"] == {
        "users": 0,
        "transactions": 1,
        "files": 2,
        "files_failed": 1,
        "rejects": 0,
    }
    assert [(f["name"], f["status"]) for f in status["last_files"]] == [
        ("b.csv", "failed"),
        ("a.csv", "loaded"),
    ]
    assert verify(warehouse) == []


@pytest.mark.parametrize("threshold", [0, 1_000_000])
def test_large_and_small_deltas_give_the_same_totals(
    config: Config, tmp_path: Path, threshold: int
) -> None:
    """Both ways of folding a delta into user_totals (rebuild, delete-and-append) are exact."""
    from moneylion.schema import open_warehouse

    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, rebuild_threshold=threshold)
    )
    conn = open_warehouse(config)
    rows = [
        f"{i},{i % 7 + 1},2022-01-{i % 28 + 1:02d},{i}.{i % 100:02d},deposit" for i in range(1, 60)
    ]
    ingest_file(conn, write_csv(tmp_path / "a.csv", TX_HEADER, rows[:30]), config)
    ingest_file(conn, write_csv(tmp_path / "b.csv", TX_HEADER, rows[30:]), config)
    expected = sum(Decimal(r.split(",")[3]) for r in rows)
    assert conn.execute("SELECT sum(total_amount), sum(tx_count) FROM user_totals").fetchall() == [
        (expected, 59)
    ]
    assert verify(conn) == []
    conn.close()


@pytest.mark.parametrize("far_id", [41, 2**40])
def test_copies_are_found_whether_ids_are_dense_or_sparse(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, far_id: int
) -> None:
    """Dense id ranges are checked with a bitmap, sparse ones with count(DISTINCT)."""
    rows = ["1,1,2022-01-01,1.00,deposit", f"{far_id},1,2022-01-01,2.00,deposit"]
    outcome = ingest_file(
        warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, [*rows, rows[1]]), config
    )

    assert (outcome.rows_loaded, outcome.rows_duplicate) == (2, 1)
    assert warehouse.execute("SELECT tx_count, total_amount FROM user_totals").fetchall() == [
        (2, Decimal("3.00"))
    ]
    assert verify(warehouse) == []


def test_the_user_totals_log_compacts_to_one_row_per_user_with_the_same_totals(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    config = config.with_overrides(tuning=dataclasses.replace(config.tuning, compact_after_rows=14))
    rows = [f"{i},{i % 4 + 1},2022-01-0{i % 9 + 1},{i}.25,purchase" for i in range(1, 41)]
    for n in range(4):  # 4 users a file: 4, 8, 12 rows wait; the fourth file (16) compacts
        ingest_file(
            warehouse,
            write_csv(tmp_path / f"{n}.csv", TX_HEADER, rows[n * 10 : n * 10 + 10]),
            config,
        )
        assert verify(warehouse) == []

    log_rows = warehouse.execute(
        "SELECT count(*), count(*) FILTER (WHERE file_id > 0) FROM user_totals_log"
    ).fetchall()
    assert log_rows == [(4, 0)]
    indexes = "SELECT index_name FROM duckdb_indexes() WHERE table_name = 'user_totals_log'"
    assert warehouse.execute(indexes).fetchall() == [("user_totals_log_user",)]  # made again
    assert warehouse.execute("SELECT sum(total_amount) FROM user_totals").fetchall() == [
        (sum(Decimal(r.split(",")[3]) for r in rows),)
    ]


def test_recompute_repairs_damaged_aggregates(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    from moneylion.aggregates import recompute

    ingest_file(
        warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, ["1,1,2022-01-01,5.00,deposit"]), config
    )
    warehouse.execute("UPDATE user_totals_log SET tx_count = 7")
    warehouse.execute("DELETE FROM daily_totals")
    assert verify(warehouse) != []

    recompute(warehouse)

    assert verify(warehouse) == []
    assert warehouse.execute("SELECT tx_count FROM user_totals").fetchall() == [(1,)]


SPANNING = "records span lines and the reader set some aside"


@pytest.mark.parametrize(
    ("header", "rows", "reasons"),
    [
        # Transactions: the fast path settles copies, stored ids and lines set aside itself;
        # after a field failing its check, the checked path appends the rows that pass and reads
        # again only those needing more. Both give up only where lines cannot follow from the
        # reader's rows, or where contested ids cannot be marked: then the reference path.
        (TX_HEADER, ["9,1,2024-01-01,1.00,deposit"], []),
        (TX_HEADER, ["9,1,2024-01-01,1.0x,deposit"], [("append_fast", "a field fails its check")]),
        (TX_HEADER, ["9,1,2024-01-01,1.00,deposit", "9,1,2024-01-01,1.00,deposit"], []),
        (TX_HEADER, ["1,1,2024-01-01,1.00,deposit", "8,1,2024-01-02,2.00,purchase"], []),
        (TX_HEADER, ["9,1,2024-01-01,1.00,deposit", "7,1,2024-01-01,1.00"], []),
        (
            TX_HEADER,
            ['9,1,2024-01-01,1.00,"deposit\nsplit"', "7,1,2024-01-01,1.00"],
            [("append_fast", "a field fails its check"), ("append_checked", SPANNING)],
        ),
        (
            TX_HEADER,
            ["9,1,2024-01-01,1.00,deposit"] * 2 + ["900000000,1,2024-01-01,1.00,deposit"],
            [("append_fast", "ids repeated or stored, in a range too wide to mark them")],
        ),
        # Users: the fast path, then the located one, then the reference.
        (USERS_HEADER, ["9,2024-01-01,Chile"], []),
        (USERS_HEADER, ["9,2024-01-0x,Chile"], [("append_fast", "a field fails its check")]),
        (
            USERS_HEADER,
            ["9,2024-01-01,Chile", "9,2024-01-01,Peru"],
            [("append_fast", "a user id is repeated in the file or already stored")],
        ),
        (
            USERS_HEADER,
            ["9,2024-01-01,Chile", "7,2024-01-01"],
            [("append_fast", "the reader set 1 line(s) aside (field count or length)")],
        ),
        (
            USERS_HEADER,
            ['9,2024-01-01,"Chi\nle"', "7,2024-01-01"],
            [
                ("append_fast", "the reader set 1 line(s) aside (field count or length)"),
                ("append_located", SPANNING),
            ],
        ),
    ],
    ids=[
        "clean",
        "bad-field",
        "copy-in-file",
        "stored-id",
        "short",
        "spanning-and-short",
        "copy-in-a-wide-range",
        "users-clean",
        "users-bad-field",
        "users-copy-in-file",
        "users-short",
        "users-spanning-and-short",
    ],
)
def test_a_path_that_gives_up_logs_why(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    header: str,
    rows: list[str],
    reasons: list[tuple[str, str]],
) -> None:
    first = write_csv(tmp_path / "first.csv", TX_HEADER, ["1,1,2024-01-01,1.00,deposit"])
    assert ingest_file(warehouse, first, config).status == "loaded"
    caplog.clear()
    with caplog.at_level("INFO", logger="moneylion"):
        outcome = ingest_file(warehouse, write_csv(tmp_path / "next.csv", header, rows), config)
    assert outcome.status == "loaded"
    logged = [
        (r.fields["path"], r.fields["reason"])  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "ingest_fallback"
    ]
    assert logged == reasons
    assert verify(warehouse) == []


@pytest.mark.parametrize("kernel_copies", [True, False], ids=["copy_file_range", "by_hand"])
def test_a_large_file_is_staged_and_known_by_the_same_bytes_however_it_is_copied(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kernel_copies: bool,
) -> None:
    """Past MEMORY_BYTES a file is copied into staging: by the kernel, or (where it cannot copy
    between the two files) read, hashed and written; the ledger's sha256 is the file's either
    way, and the copy's rows are what load."""
    from moneylion import source

    rows = [
        f"{n},{n % 97 + 1},2024-03-{n % 28 + 1:02d},{n % 500 + 1}.25,deposit"
        for n in range(1, 40_001)
    ]
    path = write_csv(tmp_path / "large.csv", TX_HEADER, rows)
    assert path.stat().st_size > source.MEMORY_BYTES
    refused: list[object] = []
    if not kernel_copies:

        def refuse(*args: object) -> int:
            refused.append(args)
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(source.os, "copy_file_range", refuse)
    outcome = ingest_file(warehouse, path, config)
    assert (outcome.status, outcome.rows_loaded) == ("loaded", 40_000)
    assert outcome.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert list(config.staging_dir.iterdir()) == []  # the private copy is gone
    assert bool(refused) is not kernel_copies
    assert verify(warehouse, top_users_kept=config.top_users_kept) == []


def test_the_rejects_of_a_file_read_on_both_threads_are_on_their_own_lines(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    """A file of several of the reader's buffers, read in parallel, with 1% bad rows of every
    reason and copies: the rows needing more than the fast checks are numbered in file order,
    so every reject names the line its raw text is on, and the counts are the generator's."""
    from moneylion.generate import expected_transactions_outcome, write_transactions

    rows = 600_000
    path = write_transactions(tmp_path / "bad.csv", rows, users=5_000, seed=11, bad_rate=0.01)
    assert path.stat().st_size > 2 * 8 * 1024 * 1024  # DuckDB splits a scan in 8 MiB pieces
    outcome = ingest_file(warehouse, path, config)
    expected = expected_transactions_outcome(rows, 0.01)
    assert (outcome.rows_loaded, outcome.rows_duplicate) == (
        expected.rows_loaded,
        expected.rows_duplicate,
    )
    assert dict(outcome.rejected_by_reason) == dict(expected.rejected_by_reason)
    lines = path.read_text().split("\n")
    placed = warehouse.execute(
        "SELECT line_number, raw_line FROM rejects WHERE file_id = $f", {"f": outcome.file_id}
    ).fetchall()
    assert len(placed) == expected.rows_rejected
    assert [(n, raw) for n, raw in placed if lines[n - 1] != raw] == []
    assert verify(warehouse, top_users_kept=config.top_users_kept) == []
