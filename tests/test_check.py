"""``moneylion check`` / ``POST /v1/checks``: the report says what the real ingest then does, and
the check itself changes nothing.

Each test takes the warehouse's every table before and after the check (equal), then ingests the
same file and holds the report to what the ingest did: its counts, its stored rejects, and the
totals read before and after it. Every test that ingests ends with ``verify``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pytest
from litestar.testing import TestClient

from moneylion.aggregates import verify
from moneylion.api import create_app
from moneylion.check import LISTED, REJECTS_SHOWN, TOP, CheckReport, check_file
from moneylion.config import Config
from moneylion.ingest import ingest_file
from moneylion.ledger import FileOutcome
from moneylion.rules import RejectReason
from moneylion.schema import open_warehouse
from tests.conftest import TX_HEADER, USERS_HEADER, write_csv
from tests.daemon_process import run_cli, run_cli_on
from tests.test_properties import BAD_TX_ROWS

Tables = dict[str, list[tuple[Any, ...]]]


def tables(conn: duckdb.DuckDBPyConnection) -> Tables:
    """Every table of the warehouse, its rows sorted."""
    names = [
        name
        for (name,) in conn.execute(
            "SELECT table_name FROM duckdb_tables() WHERE NOT temporary ORDER BY 1"
        ).fetchall()
    ]
    return {name: conn.execute(f"SELECT * FROM {name} ORDER BY ALL").fetchall() for name in names}


def checked_then_ingested(
    conn: duckdb.DuckDBPyConnection, path: Path, config: Config
) -> tuple[CheckReport, FileOutcome]:
    """Check ``path`` (the warehouse unchanged by it), then ingest it."""
    before = tables(conn)
    report = check_file(conn, path, config)
    assert tables(conn) == before
    assert verify(conn) == []
    return report, ingest_file(conn, path, config)


def assert_report_is_the_outcome(
    conn: duckdb.DuckDBPyConnection, report: CheckReport, outcome: FileOutcome
) -> None:
    """The report's outcome, counts and rejects are what the ingest did and stored."""
    assert report.outcome == {"loaded": "would_load", "held": "would_hold"}[outcome.status]
    assert (report.kind, report.sha256, report.size_bytes) == (
        outcome.kind,
        outcome.sha256,
        outcome.size_bytes,
    )
    assert (report.error_reason, report.error) == (outcome.error_reason, outcome.error)
    rows = report.rows
    assert (rows.total, rows.loaded, rows.duplicate, rows.rejected) == (
        outcome.rows_total,
        outcome.rows_loaded,
        outcome.rows_duplicate,
        outcome.rows_rejected,
    )
    stored: dict[str, list[tuple[int, str, str | None]]] = defaultdict(list)
    for reason, line, message, raw in conn.execute(
        "SELECT reason, line_number, message, raw_line FROM rejects WHERE file_id = ? "
        "ORDER BY reason, line_number",
        [outcome.file_id],
    ).fetchall():
        stored[reason].append((line, message, raw))
    assert {g.reason: g.count for g in report.rejects} == {r: len(v) for r, v in stored.items()}
    assert {r: v[:REJECTS_SHOWN] for r, v in stored.items()} == {
        g.reason: [(x.line, x.message, x.raw_line) for x in g.first] for g in report.rejects
    }
    assert {g.reason: g.count for g in report.rejects} == dict(outcome.rejected_by_reason)


def every_reason_file(path: Path, first_id: int) -> Path:
    """Good rows, and at least one row refused for every reason the rules have (the
    ``conflicts_with_stored`` one against id 1 of ``stored_file``)."""
    ids = iter(range(first_id, first_id + 1000))
    lines = [row.format(id=next(ids)) for row in BAD_TX_ROWS]
    lines += [f"{next(ids)},{user},2022-01-0{user},{user}.50,deposit" for user in range(1, 6)]
    lines += [f"{next(ids)},2,2999-01-01,3.00,deposit"]  # future_date
    twice = next(ids)
    lines += [f"{twice},3,2022-01-03,1.00,deposit", f"{twice},3,2022-01-03,2.00,deposit"]
    lines += ["1,9,2022-02-02,9.99,purchase"]  # conflicts_with_stored
    lines += ["2,1,2022-01-01,2.00,withdrawal"]  # a duplicate of a stored row
    lines += [f"{next(ids)},4,2022-01-04,{'9' * (2 * 1024 * 1024 + 10)},deposit"]  # too long
    return write_csv(path, TX_HEADER, lines)


def stored_file(path: Path) -> Path:
    return write_csv(
        path,
        TX_HEADER,
        [
            "1,1,2022-01-01,1.00,deposit",
            "2,1,2022-01-01,2.00,withdrawal",
            "3,7,2022-01-05,4,purchase",
        ],
    )


def test_checking_the_seed_files_changes_nothing_and_says_what_their_ingest_does(
    warehouse: duckdb.DuckDBPyConnection, config: Config, seed_files: tuple[Path, Path]
) -> None:
    for path in seed_files:
        report, outcome = checked_then_ingested(warehouse, path, config)
        assert report.name == path.name
        assert_report_is_the_outcome(warehouse, report, outcome)
        assert report.rows.loaded > 0
    assert verify(warehouse) == []

    again = check_file(warehouse, seed_files[1], config)  # the same bytes: nothing would change
    assert again.outcome == "seen_before"
    assert again.file_id == outcome.file_id
    assert again.effect.top_users_before == again.effect.top_users_after


@pytest.mark.parametrize("max_reject_share", [0.0, 0.2])
def test_a_file_with_every_reject_reason_is_reported_as_its_ingest_stores_it(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, max_reject_share: float
) -> None:
    config = config.with_overrides(max_reject_share=max_reject_share)
    ingest_file(warehouse, stored_file(tmp_path / "stored.csv"), config)
    path = every_reason_file(tmp_path / "every_reason.csv", 100)

    report, outcome = checked_then_ingested(warehouse, path, config)

    assert {g.reason for g in report.rejects} == set(RejectReason)
    assert_report_is_the_outcome(warehouse, report, outcome)
    assert report.outcome == ("would_hold" if max_reject_share else "would_load")
    assert verify(warehouse) == []


def test_a_refused_file_is_reported_as_failing_and_nothing_is_written(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    path = tmp_path / "colours.csv"
    path.write_text("colour,size\nred,3\n")
    before = tables(warehouse)
    report = check_file(warehouse, path, config)
    assert tables(warehouse) == before
    assert (report.outcome, report.error_reason) == ("would_fail", "unknown_header")
    outcome = ingest_file(warehouse, path, config)
    assert (outcome.error_reason, outcome.error) == (report.error_reason, report.error)
    assert verify(warehouse) == []


def user_totals(conn: duckdb.DuckDBPyConnection) -> dict[int, tuple[int, Decimal]]:
    rows = conn.execute("SELECT user_id, tx_count, total_amount FROM user_totals").fetchall()
    return {user: (count, amount) for user, count, amount in rows}


def daily_totals(conn: duckdb.DuckDBPyConnection) -> dict[tuple[str, str], tuple[int, Decimal]]:
    rows = conn.execute(
        "SELECT CAST(transaction_date AS VARCHAR), CAST(transaction_type AS VARCHAR), tx_count, "
        "total_amount FROM daily_totals"
    ).fetchall()
    return {(day, kind): (count, amount) for day, kind, count, amount in rows}


def profiles(conn: duckdb.DuckDBPyConnection) -> dict[int, tuple[str, str]]:
    rows = conn.execute(
        "SELECT user_id, country, CAST(signup_date AS VARCHAR) FROM users"
    ).fetchall()
    return {user: (country, signup) for user, country, signup in rows}


def top(conn: duckdb.DuckDBPyConnection) -> list[tuple[int, int, int]]:
    return conn.execute(
        f"SELECT rank, user_id, tx_count FROM top_users ORDER BY rank LIMIT {TOP}"
    ).fetchall()


def test_the_effect_is_the_totals_before_and_after_the_real_ingest(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    seed_files: tuple[Path, Path],
) -> None:
    users_csv, transactions_csv = seed_files
    header, *lines = transactions_csv.read_text(encoding="utf-8-sig").splitlines()
    half = len(lines) // 2
    first = write_csv(tmp_path / "first.csv", header, lines[:half])
    # The second half, with some of the first again (duplicates) and a few conflicting copies.
    second = write_csv(
        tmp_path / "second.csv",
        header,
        lines[half:] + lines[:50] + [line.replace(".", "9.", 1) for line in lines[50:55]],
    )
    ingest_file(warehouse, users_csv, config)
    ingest_file(warehouse, first, config)

    users_was, days_was, top_was = user_totals(warehouse), daily_totals(warehouse), top(warehouse)
    report, outcome = checked_then_ingested(warehouse, second, config)
    assert_report_is_the_outcome(warehouse, report, outcome)
    users_now, days_now = user_totals(warehouse), daily_totals(warehouse)

    effect = report.effect
    touched = warehouse.execute(
        "SELECT DISTINCT user_id FROM transactions WHERE file_id = ? ORDER BY 1", [outcome.file_id]
    ).fetchall()
    assert effect.users_touched == len(touched)
    assert [u.user_id for u in effect.users] == [user for (user,) in touched[:LISTED]]
    assert any(u.before.tx_count for u in effect.users)  # users the first half had
    zero = (0, Decimal(0))
    for user in effect.users:
        assert (user.before.tx_count, Decimal(user.before.total_amount)) == users_was.get(
            user.user_id, zero
        )
        assert (user.after.tx_count, Decimal(user.after.total_amount)) == users_now[user.user_id]
        assert user.before.country == user.after.country == profiles(warehouse)[user.user_id][0]
    days = warehouse.execute(
        "SELECT DISTINCT CAST(transaction_date AS VARCHAR), transaction_type FROM transactions "
        "WHERE file_id = ? ORDER BY 1, 2",
        [outcome.file_id],
    ).fetchall()
    assert effect.days_touched == len(days)
    assert [(str(d.transaction_date), d.transaction_type) for d in effect.days] == [
        (day, str(kind)) for day, kind in days[:LISTED]
    ]
    for day in effect.days:
        key = (str(day.transaction_date), day.transaction_type)
        assert (day.before.tx_count, Decimal(day.before.total_amount)) == days_was.get(key, zero)
        assert (day.after.tx_count, Decimal(day.after.total_amount)) == days_now[key]
    assert [(r.rank, r.user_id, r.tx_count) for r in effect.top_users_before] == top_was
    assert [(r.rank, r.user_id, r.tx_count) for r in effect.top_users_after] == top(warehouse)
    assert verify(warehouse) == []


def test_a_users_files_effect_is_the_profiles_it_writes(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    ingest_file(warehouse, stored_file(tmp_path / "stored.csv"), config)
    ingest_file(
        warehouse,
        write_csv(
            tmp_path / "users.csv", USERS_HEADER, ["1,2020-01-01,Chile", "2,2020-02-02,Peru"]
        ),
        config,
    )
    moves = write_csv(
        tmp_path / "moves.csv",
        USERS_HEADER,
        ["1,2020-01-01,Japan", "2,2020-02-02,Peru", "7,2021-07-07,France", "8,2021-08-08,Chad"],
    )
    was = profiles(warehouse)
    report, outcome = checked_then_ingested(warehouse, moves, config)
    assert_report_is_the_outcome(warehouse, report, outcome)
    now = profiles(warehouse)
    assert report.effect.users_touched == 3  # user 2's profile is the same: a duplicate
    assert [u.user_id for u in report.effect.users] == [1, 7, 8]
    for user in report.effect.users:
        before = (user.before.country, str(user.before.signup_date))
        assert before == was.get(user.user_id, (None, "None"))
        assert (user.after.country, str(user.after.signup_date)) == now[user.user_id]
        assert user.before.tx_count == user.after.tx_count
    assert report.effect.days == []
    assert verify(warehouse) == []


def test_post_checks_answers_the_same_report_and_refuses_a_body_too_large(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    ingest_file(warehouse, stored_file(tmp_path / "stored.csv"), config)
    path = every_reason_file(tmp_path / "every_reason.csv", 100)
    body = path.read_bytes()
    expected = msgspec.to_builtins(check_file(warehouse, path, config))
    before = tables(warehouse)
    limited = config.with_overrides(max_check_bytes=len(body) - 1)

    with TestClient(app=create_app(config, warehouse)) as client:
        answer = client.post(
            "/v1/checks",
            params={"name": "every_reason.csv"},
            content=body,
            headers={"content-type": "text/csv"},
        )
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found.pop("seconds") >= 0
    expected.pop("seconds")
    assert found == expected
    assert tables(warehouse) == before

    with TestClient(app=create_app(limited, warehouse)) as client:
        declared = client.post("/v1/checks", content=body)
        streamed = client.post("/v1/checks", content=iter([body[:1000], body[1000:]]))
    for refused in (declared, streamed):
        assert refused.status_code == 413
        assert refused.headers["content-type"].startswith("application/problem+json")
        assert "max_check_bytes" in refused.json()["detail"]
    assert tables(warehouse) == before
    assert list(config.staging_dir.glob("check-*")) == []
    assert verify(warehouse) == []


def test_the_check_command_prints_the_report_and_exits_1_for_a_file_that_would_be_held(
    config: Config, tmp_path: Path
) -> None:
    conn = open_warehouse(config)
    ingest_file(conn, stored_file(tmp_path / "stored.csv"), config)
    conn.close()
    path = every_reason_file(tmp_path / "every_reason.csv", 100)

    shown = run_cli_on(config, "check", str(path))
    as_json = run_cli_on(config, "check", str(path), "--json")
    env = {
        **os.environ,
        "MONEYLION_WAREHOUSE": str(config.warehouse),
        "MONEYLION_INBOX": str(config.inbox),
        "MONEYLION_MAX_REJECT_SHARE": "0.5",
    }
    held = run_cli("check", str(path), env=env)

    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("every_reason.csv (transactions): would_load")
    assert "conflicts_with_stored: 1" in shown.stdout
    assert json.loads(as_json.stdout)["rows"]["rejected"] == len(BAD_TX_ROWS) + 5
    assert held.returncode == 1
    assert "would_hold" in held.stdout.splitlines()[0]
    assert "max_reject_share (0.5)" in held.stdout
    conn = open_warehouse(config)
    assert conn.execute("SELECT count(*) FROM files").fetchall() == [(1,)]
    assert verify(conn) == []
    conn.close()
