"""The command line, run as a real process on a warehouse in tmp_path."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pytest

from moneylion.aggregates import verify
from moneylion.cli import build_parser
from moneylion.config import Config
from moneylion.schema import open_warehouse

from .conftest import CASES_DIR
from .daemon_process import run_cli, run_cli_on


def test_ingest_prints_each_outcome_and_the_rows_land(config: Config) -> None:
    result = run_cli_on(
        config,
        "ingest",
        str(CASES_DIR / "row_bad_date.csv"),
        str(CASES_DIR / "row_bad_date.csv"),
        str(CASES_DIR / "file_empty.csv"),
    )

    lines = result.stdout.splitlines()
    assert lines[0].startswith("row_bad_date.csv: transactions file #1: loaded 2, duplicate 0")
    assert "(bad_date 1)" in lines[0]
    assert lines[1] == "row_bad_date.csv: duplicate of file #1, nothing loaded"
    assert lines[2].startswith("file_empty.csv: failed (empty)")
    assert result.returncode == 1  # a file failed
    conn = open_warehouse(config)
    assert conn.execute("SELECT count(*) FROM transactions").fetchall() == [(2,)]
    assert verify(conn) == []
    conn.close()


@pytest.mark.parametrize(
    ("value", "stored"),
    [
        ("2023-03-01T01:30:00+02:00", dt.datetime(2023, 2, 28, 23, 30)),  # a zone: to UTC
        ("2023-03-01T01:30:00", dt.datetime(2023, 3, 1, 1, 30)),  # none: already UTC
        ("2023-03-01T01:30:00Z", dt.datetime(2023, 3, 1, 1, 30)),
    ],
)
def test_ingest_received_at_is_the_ledgers(config: Config, value: str, stored: dt.datetime) -> None:
    result = run_cli_on(
        config, "ingest", "--quiet", "--received-at", value, str(CASES_DIR / "row_bad_amount.csv")
    )

    assert result.returncode == 0, result.stderr
    conn = open_warehouse(config)
    assert conn.execute("SELECT received_at FROM files").fetchall() == [(stored,)]
    assert verify(conn) == []
    conn.close()


def test_ingest_refuses_a_bad_received_at_before_anything(config: Config) -> None:
    result = run_cli_on(
        config, "ingest", "--received-at", "yesterday", str(CASES_DIR / "row_bad_amount.csv")
    )

    assert result.returncode == 2
    assert "argument --received-at: 'yesterday' is not an ISO 8601 date-time" in result.stderr
    assert not config.duckdb_path.exists()


def test_ingest_refuses_received_at_in_lake_mode(config: Config) -> None:
    env = {
        **os.environ,
        "MONEYLION_WAREHOUSE": str(config.warehouse),
        "MONEYLION_INBOX": str(config.inbox),
        "MONEYLION_LAKE_URI": str(config.warehouse.parent / "lake"),
    }
    args = (
        "ingest",
        "--received-at",
        "2023-03-01T01:30:00Z",
        str(CASES_DIR / "row_bad_amount.csv"),
    )

    result = run_cli(*args, env=env)

    assert result.returncode == 2
    assert "--received-at is not available in lake mode" in result.stderr
    assert not (config.warehouse.parent / "lake").exists()


def test_verify_exits_1_and_names_the_difference_when_an_aggregate_is_wrong(
    config: Config,
) -> None:
    assert (
        run_cli_on(config, "ingest", "--quiet", str(CASES_DIR / "row_bad_amount.csv")).returncode
        == 0
    )
    assert run_cli_on(config, "verify").returncode == 0
    conn = open_warehouse(config)
    conn.execute("UPDATE user_totals_log SET total_amount = total_amount + 0.01")
    conn.close()

    result = run_cli_on(config, "verify")

    assert result.returncode == 1
    assert "user_totals: only maintained: (10, 2, Decimal('30.51')" in result.stdout
    assert "user_totals: only recomputed: (10, 2, Decimal('30.50')" in result.stdout


def test_status_json_counts_the_ledger(config: Config) -> None:
    run_cli_on(config, "ingest", "--quiet", str(CASES_DIR / "row_bad_amount.csv"))

    status = json.loads(run_cli_on(config, "status", "--json").stdout)

    assert status["counts"]["transactions"] == 2
    assert status["counts"]["rejects"] == 1
    assert status["last_files"][0]["name"] == "row_bad_amount.csv"


def test_a_bad_config_value_is_a_clear_error(config: Config) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moneylion", "status"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "MONEYLION_PORT": "eighty",
            "MONEYLION_WAREHOUSE": str(config.warehouse),
        },
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "config key 'port': cannot use 'eighty'" in result.stderr


@pytest.mark.parametrize("command", ["serve", "ingest", "verify", "status", "export", "generate"])
def test_every_command_has_help(command: str) -> None:
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    helps = {action.dest: action.help for action in subparsers._choices_actions}
    assert helps[command]
    assert len(helps[command] or "") > 20
