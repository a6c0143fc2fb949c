"""future_date: a transaction dated more than ``max_future_days`` after its file's arrival day
(the UTC date of the ledger's ``received_at``) is refused, at its own line, whichever path reads
it: every ladder from each of its rungs, a batch, the lake's publisher and a replica, a replay
through the CLI and the daemon. A users file is not bounded. Every test that ingests ends with
verify."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import duckdb
import pytest

from moneylion.aggregates import verify
from moneylion.batch import ingest_batch, item_of
from moneylion.config import Config
from moneylion.ingest import ingest_file
from moneylion.ladder import from_each_rung
from moneylion.lake.publish import LakePublisher
from moneylion.lake.tailer import lake_for
from moneylion.model import TABLES, FileKind
from moneylion.schema import open_warehouse
from tests.conftest import TX_HEADER, USERS_HEADER, write_csv
from tests.daemon_process import DaemonProcess, run_cli, wait_for, warehouse_totals
from tests.test_lake import catch_up, state

LADDERS = from_each_rung()  # every declared ladder, from each of its rungs
# Late in its UTC day: the bound (max_future_days = 1, the default) is 2026-03-11.
ARRIVAL = dt.datetime(2026, 3, 10, 23, 59)
FAR_FUTURE = "9999-12-31"  # the last date there is: past any real bound

Rejects = list[tuple[int, str, str]]


def rejects_of(conn: duckdb.DuckDBPyConnection, file_id: int | None) -> Rejects:
    """(line, reason, message) of a file's rejects, in line order."""
    return conn.execute(
        "SELECT line_number, reason, message FROM rejects WHERE file_id = $f ORDER BY line_number",
        {"f": file_id},
    ).fetchall()


def stored_ids(conn: duckdb.DuckDBPyConnection) -> list[int]:
    rows = conn.execute("SELECT transaction_id FROM transactions ORDER BY 1").fetchall()
    return [row[0] for row in rows]


def after(day: object, bound: object) -> str:
    """The start of a future_date message: the row's date, then the last date that loads."""
    return f"transaction_date {day} is after {bound}"


def assert_rejects(rejects: Rejects, expected: Rejects) -> None:
    """``rejects`` are ``expected``'s (line, reason), each message starting with the expected
    one's (a future_date one: ``after(day, bound)``, naming the key too)."""
    assert [(line, reason) for line, reason, _ in rejects] == [
        (line, reason) for line, reason, _ in expected
    ]
    for (line, reason, message), (_, _, start) in zip(rejects, expected, strict=True):
        assert message.startswith(start), (line, message)
        if reason == "future_date":
            assert "max_future_days" in message, (line, message)


# --- each ladder, each rung -------------------------------------------------------------------


PLAIN = [
    "1,1,2026-03-10,10.00,deposit",  # line 2: the arrival day
    "2,1,2026-03-11,20.00,withdrawal",  # line 3: the bound itself loads
    "3,1,2026-03-12,30.00,purchase",  # line 4: a day past it
    f"4,2,{FAR_FUTURE},40.00,deposit",  # line 5
    "5,2,2026-03-13,abc,deposit",  # line 6: future and a bad amount; the date comes first
    "x6,2,2999-01-01,1.00,deposit",  # line 7: a bad id and future; the id comes first
    "7,2,2020-02-29,0.01,deposit",  # line 8: the past loads
    "2,1,2026-03-12,20.00,withdrawal",  # line 9: id 2 again, refused alone: no in-file clash
]


@pytest.mark.parametrize("rung", sorted(LADDERS))
def test_every_ladder_refuses_rows_past_the_bound_at_their_lines(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, rung: str
) -> None:
    columns = [c.name for c in TABLES[FileKind.TRANSACTIONS].columns]
    assert columns.index("transaction_date") < columns.index("amount")  # line 6's premise
    path = write_csv(tmp_path / "plain.csv", TX_HEADER, PLAIN)

    outcome = ingest_file(warehouse, path, config, received_at=ARRIVAL, ladders=LADDERS[rung])

    assert (outcome.status, outcome.rows_total, outcome.rows_loaded) == ("loaded", 8, 3)
    assert (outcome.rows_duplicate, outcome.rows_rejected) == (0, 5)
    assert dict(outcome.rejected_by_reason) == {"future_date": 4, "bad_integer": 1}
    assert_rejects(
        rejects_of(warehouse, outcome.file_id),
        [
            (4, "future_date", after("2026-03-12", "2026-03-11")),
            (5, "future_date", after(FAR_FUTURE, "2026-03-11")),
            (6, "future_date", after("2026-03-13", "2026-03-11")),
            (7, "bad_integer", "transaction_id 'x6'"),
            (9, "future_date", after("2026-03-12", "2026-03-11")),
        ],
    )
    lines = path.read_text().splitlines()
    raw = warehouse.execute(
        "SELECT line_number, raw_line FROM rejects WHERE file_id = $f", {"f": outcome.file_id}
    ).fetchall()
    assert [(n, text) for n, text in raw if lines[n - 1] != text] == []
    assert stored_ids(warehouse) == [1, 2, 7]
    day_of_2 = "SELECT transaction_date FROM transactions WHERE transaction_id = 2"
    assert warehouse.execute(day_of_2).fetchall() == [(dt.date(2026, 3, 11),)]
    assert warehouse.execute("SELECT received_at FROM files").fetchall() == [(ARRIVAL,)]
    assert verify(warehouse) == []


# Columns out of canonical order, an extra one holding quotes, commas and line breaks: only the
# reference rules read this file, and a record's line is the one it starts on.
QUOTED_HEADER = "amount,transaction_date,note,transaction_id,user_id,transaction_type"
QUOTED = [
    '"10.00",2026-03-11,"plain",11,1,deposit',  # line 2
    'abc,2026-03-12,"two\nlines",12,1,deposit',  # lines 3-4: future_date before bad_amount
    f'"1,000.00",{FAR_FUTURE},"a, comma",13,1,purchase',  # line 5: likewise
    '5.00,2026-03-10,"x ""quoted"" y",14,1,withdrawal',  # line 6
    '7.00,2026-03-12,"three\nlines\nhere",15,1,Deposit',  # lines 7-9
    '8.00,2026-03-09,"",16,1,deposit',  # line 10
]


@pytest.mark.parametrize("rung", sorted(LADDERS))
def test_quoted_multi_line_records_are_refused_at_their_first_line(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, rung: str
) -> None:
    path = write_csv(tmp_path / "quoted.csv", QUOTED_HEADER, QUOTED)

    outcome = ingest_file(warehouse, path, config, received_at=ARRIVAL, ladders=LADDERS[rung])

    assert (outcome.status, outcome.rows_total, outcome.rows_loaded) == ("loaded", 6, 3)
    assert dict(outcome.rejected_by_reason) == {"future_date": 3}
    assert_rejects(
        rejects_of(warehouse, outcome.file_id),
        [
            (3, "future_date", after("2026-03-12", "2026-03-11")),
            (5, "future_date", after(FAR_FUTURE, "2026-03-11")),
            (7, "future_date", after("2026-03-12", "2026-03-11")),
        ],
    )
    assert stored_ids(warehouse) == [11, 14, 16]
    assert verify(warehouse) == []


@pytest.mark.parametrize("rung", sorted(LADDERS))
@pytest.mark.parametrize("days", [0, 1, 36_500])
def test_the_bound_moves_with_max_future_days_and_is_inclusive(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, rung: str, days: int
) -> None:
    bound = ARRIVAL.date() + dt.timedelta(days=days)
    past = bound + dt.timedelta(days=1)
    path = write_csv(
        tmp_path / "bounded.csv",
        TX_HEADER,
        [
            f"1,1,{ARRIVAL.date()},1.00,deposit",
            f"2,1,{bound},2.00,deposit",
            f"3,1,{past},3.00,deposit",
            f"4,1,{FAR_FUTURE},4.00,deposit",
        ],
    )
    tuned = config.with_overrides(max_future_days=days)

    outcome = ingest_file(warehouse, path, tuned, received_at=ARRIVAL, ladders=LADDERS[rung])

    assert (outcome.rows_loaded, dict(outcome.rejected_by_reason)) == (2, {"future_date": 2})
    assert_rejects(
        rejects_of(warehouse, outcome.file_id),
        [(4, "future_date", after(past, bound)), (5, "future_date", after(FAR_FUTURE, bound))],
    )
    assert stored_ids(warehouse) == [1, 2]
    assert verify(warehouse) == []


@pytest.mark.parametrize("rung", sorted(LADDERS))
def test_a_users_file_is_not_bounded(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, rung: str
) -> None:
    path = write_csv(
        tmp_path / "users.csv",
        USERS_HEADER,
        ["1,2026-03-12,Japan", f"2,{FAR_FUTURE},France", "3,2999-01-01,Canada"],
    )
    tuned = config.with_overrides(max_future_days=0)

    outcome = ingest_file(warehouse, path, tuned, received_at=ARRIVAL, ladders=LADDERS[rung])

    assert (outcome.status, outcome.rows_loaded, outcome.rows_rejected) == ("loaded", 3, 0)
    signups = warehouse.execute("SELECT user_id, signup_date FROM users ORDER BY 1").fetchall()
    assert signups == [
        (1, dt.date(2026, 3, 12)),
        (2, dt.date(9999, 12, 31)),
        (3, dt.date(2999, 1, 1)),
    ]
    assert verify(warehouse) == []


# --- a batch ----------------------------------------------------------------------------------


def far_files(folder: Path) -> list[Path]:
    """Files whose verdicts do not depend on today: dates far in the past or the future."""
    folder.mkdir()
    return [
        write_csv(folder / "users.csv", USERS_HEADER, ["1,2999-01-01,Japan", "2,2001-01-01,UK"]),
        write_csv(
            folder / "a.csv",
            TX_HEADER,
            [
                "1,1,2001-01-01,1.00,deposit",
                "2,1,2999-01-01,2.00,deposit",
                f"3,2,{FAR_FUTURE},oops,deposit",
                "4,2,2001-01-02,4.00,purchase",
            ],
        ),
        write_csv(
            folder / "quoted.csv",
            QUOTED_HEADER,
            [q.replace("2026-03-12", "2999-03-12").replace("2026", "2001") for q in QUOTED],
        ),
        # Ids again: 2 was refused above, so here it loads; 4 is the same row (a duplicate).
        write_csv(
            folder / "b.csv",
            TX_HEADER,
            [
                "2,1,2001-01-03,2.00,deposit",
                "4,2,2001-01-02,4.00,purchase",
                "5,1,2999-01-01,5,deposit",
            ],
        ),
    ]


def outcomes_and_rows(conn: duckdb.DuckDBPyConnection) -> dict[str, list[Any]]:
    """What the files left, but the clock."""
    queries = {
        "files": "SELECT file_id, name, kind, status, rows_total, rows_loaded, rows_duplicate, "
        "rows_rejected FROM files ORDER BY file_id",
        "rejects": "SELECT file_id, line_number, reason, message, raw_line FROM rejects "
        "ORDER BY ALL",
        "transactions": "SELECT * FROM transactions ORDER BY ALL",
        "users": "SELECT user_id, signup_date, country, file_id FROM users ORDER BY ALL",
    }
    return {name: conn.execute(sql).fetchall() for name, sql in queries.items()}


def test_a_batch_refuses_what_the_files_one_by_one_refuse(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    paths = far_files(tmp_path / "src")
    alone = [ingest_file(warehouse, path, config) for path in paths]
    other = config.with_overrides(warehouse=tmp_path / "batched")
    other.warehouse.mkdir()
    batched = open_warehouse(other)

    outcomes, left = ingest_batch(batched, [item_of(path, other) for path in paths], other)

    assert left == []
    assert [dict(o.rejected_by_reason) for o in alone] == [
        {},
        {"future_date": 2},
        {"future_date": 3},
        {"future_date": 1},
    ]
    assert [dict(o.rejected_by_reason) for o in outcomes] == [
        dict(o.rejected_by_reason) for o in alone
    ]
    assert outcomes_and_rows(batched) == outcomes_and_rows(warehouse)
    assert stored_ids(batched) == [1, 2, 4, 11, 14, 16]
    assert verify(warehouse) == []
    assert verify(batched) == []
    batched.close()


# --- lake mode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["small", "large"])
def test_a_replica_holds_the_future_date_rejects_local_mode_holds(
    config: Config, tmp_path: Path, size: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A small file goes through the publisher's reference rules; a large one (past
    batch_file_max_bytes) through DuckDB's reader first, whose checks must hold the bound: a
    future row is the file's only fault, so a reader blind to it would stream the row."""
    lake_config = config.with_overrides(lake_uri=str(tmp_path / "lake"))
    if size == "large":
        lake_config = lake_config.with_overrides(batch_file_max_bytes=40)
    lake_config.staging_dir.mkdir(parents=True, exist_ok=True)
    lake_for(lake_config).create()
    path = write_csv(
        tmp_path / "future.csv",
        TX_HEADER,
        [
            "1,1,2001-01-01,1.00,deposit",
            f"2,1,{FAR_FUTURE},2.00,deposit",
            "3,2,2001-01-02,3.00,purchase",
            "4,2,2999-01-01,4.00,withdrawal",
        ],
    )
    local = lake_config.with_overrides(lake_uri="", warehouse=tmp_path / "local")
    local.warehouse.mkdir()
    local_conn = open_warehouse(local)
    ingest_file(local_conn, path, local)

    with caplog.at_level("INFO", logger="moneylion.lake.publish"):
        [published] = LakePublisher(lake_for(lake_config), lake_config).publish_paths(
            [path], lake_config
        )
    conn = open_warehouse(lake_config)
    assert catch_up(conn, lake_config).lag().files == 0

    fell_back = [
        r.fields["path"]  # type: ignore[attr-defined]
        for r in caplog.records
        if r.getMessage() == "ingest_fallback" and r.name == "moneylion.lake.publish"
    ]  # the publisher's own (the local ingest above may log its ladder's, at INFO)
    assert fell_back == (["lake_large"] if size == "large" else [])
    assert (published.rows_loaded, published.rows_rejected) == (2, 2)
    reasons = conn.execute("SELECT line_number, reason FROM rejects ORDER BY 1").fetchall()
    assert reasons == [(3, "future_date"), (5, "future_date")]
    assert stored_ids(conn) == [1, 3]
    assert state(conn) == state(local_conn)
    assert verify(local_conn) == []
    assert verify(conn) == []
    conn.close()
    local_conn.close()


# --- a replay through the CLI -----------------------------------------------------------------


def cli_ingest(config: Config, received_at: str, path: Path) -> None:
    """``moneylion ingest --received-at`` in a child whose local zone is not UTC: the day
    counted from is the UTC one whatever the machine's zone."""
    config.warehouse.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "MONEYLION_WAREHOUSE": str(config.warehouse),
        "MONEYLION_INBOX": str(config.inbox),
        "TZ": "Pacific/Kiritimati",  # UTC+14
    }
    result = run_cli("ingest", "--quiet", "--received-at", received_at, str(path), env=env)
    assert result.returncode == 0, result.stderr


def replayed(config: Config) -> tuple[list[Any], Rejects, list[int]]:
    """(ledger rows but the run's clock, the first file's rejects, stored ids), once verify
    finds nothing."""
    conn = open_warehouse(config)
    try:
        assert verify(conn) == []
        files = conn.execute(
            "SELECT file_id, name, sha256, received_at, rows_loaded, rows_rejected FROM files"
        ).fetchall()
        return files, rejects_of(conn, 1), stored_ids(conn)
    finally:
        conn.close()


def test_a_replay_with_the_same_received_at_decides_the_same_and_a_later_one_loads(
    config: Config, tmp_path: Path
) -> None:
    path = write_csv(
        tmp_path / "done.csv",
        TX_HEADER,
        [
            "1,1,2026-03-11,1.00,deposit",
            "2,1,2026-03-12,2.00,deposit",
            f"3,1,{FAR_FUTURE},3.00,deposit",
        ],
    )
    # 01:30 at +02:00 is 2026-03-10 23:30 UTC: the bound is 2026-03-11, not 2026-03-12.
    first_run = "2026-03-11T01:30:00+02:00"
    replay = config.with_overrides(warehouse=tmp_path / "replay")
    later = config.with_overrides(warehouse=tmp_path / "later")

    cli_ingest(config, first_run, path)
    cli_ingest(replay, first_run, path)
    cli_ingest(later, "2026-03-11T00:00:00Z", path)

    files, rejects, ids = replayed(config)
    assert [f[3] for f in files] == [dt.datetime(2026, 3, 10, 23, 30)]
    assert_rejects(
        rejects,
        [
            (3, "future_date", after("2026-03-12", "2026-03-11")),
            (4, "future_date", after(FAR_FUTURE, "2026-03-11")),
        ],
    )
    assert ids == [1]
    assert replayed(replay) == (files, rejects, ids)
    later_files, later_rejects, later_ids = replayed(later)
    assert [f[2] for f in later_files] == [f[2] for f in files]  # the same bytes
    assert_rejects(later_rejects, [(4, "future_date", after(FAR_FUTURE, "2026-03-12"))])
    assert later_ids == [1, 2]


# --- the daemon ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_daemon_refuses_a_far_future_row_dropped_in_its_inbox(
    tmp_path: Path, outside: Path
) -> None:
    daemon = DaemonProcess(tmp_path / "inbox", tmp_path / "warehouse", settle_seconds=0.05)
    daemon.inbox.mkdir()
    staged = write_csv(
        outside / "drop.csv",
        TX_HEADER,
        ["1,1,2001-01-01,1.00,deposit", f"2,1,{FAR_FUTURE},2.00,deposit"],
    )
    try:
        daemon.start()
        os.rename(staged, daemon.inbox / "future.csv")  # complete at once
        wait_for(lambda: bool(daemon.ledger()), 30, "the file in the ledger")
        [row] = daemon.ledger()
        page = daemon.get(f"/v1/files/{row['file_id']}/rejects")
        assert daemon.stop() == 0
    finally:
        daemon.close()

    assert (row["status"], row["rows_loaded"], row["rows_rejected"]) == ("loaded", 1, 1)
    [reject] = page["items"]
    assert (reject["line"], reject["reason"]) == (3, "future_date")
    assert reject["message"].startswith(after(FAR_FUTURE, ""))
    assert reject["raw_line"] == f"2,1,{FAR_FUTURE},2.00,deposit"
    count, _, differences = warehouse_totals(daemon.warehouse)
    assert (count, differences) == (1, [])
