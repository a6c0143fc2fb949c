"""Health readings: non-blocking CPU, process RSS, uptime, inbox backlog, last file age."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import psutil
import pytest

from moneylion import health
from moneylion.config import Config
from moneylion.ingest import ingest_file


def test_backlog_counts_the_files_the_daemon_would_take_directly_in_the_inbox(
    config: Config,
) -> None:
    inbox = config.inbox
    for name in ("a.csv", "B.CSV", ".hidden.csv", "c.csv.tmp", "d.csv.part", "notes.txt"):
        (inbox / name).write_text("x")
    for folder in ("done", "failed", "sub.csv"):
        (inbox / folder).mkdir()
    (inbox / "done" / "e.csv").write_text("x")
    (inbox / "failed" / "f.csv").write_text("x")
    # One rule with the watcher's: any name but hidden and temporary ones (the kind comes from
    # the header), never what is in done/ or failed/, never a directory.
    assert health.inbox_backlog(inbox) == 3
    assert health.inbox_waiting(inbox) == (3, 3)


def test_backlog_of_a_missing_inbox_is_zero(tmp_path: Path) -> None:
    assert health.inbox_backlog(tmp_path / "nowhere") == 0


def test_seconds_since_last_file_comes_from_the_ledger(
    config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    assert health.seconds_since_last_file(warehouse) is None
    path = config.inbox / "users.csv"
    path.write_text("user_id,signup_date,country\n1,2022-01-01,France\n")
    ingest_file(warehouse, path, config)
    age = health.seconds_since_last_file(warehouse)
    assert age is not None
    assert 0 <= age < 60


def test_a_reading_never_waits_for_cpu_and_is_plausible(
    config: Config, warehouse: duckdb.DuckDBPyConnection, monkeypatch: pytest.MonkeyPatch
) -> None:
    intervals: list[object] = []
    real = psutil.cpu_percent

    def recording(*args: Any, **kwargs: Any) -> Any:
        intervals.append(kwargs.get("interval", args[0] if args else 0.0))
        return real(*args, **kwargs)

    monkeypatch.setattr(psutil, "cpu_percent", recording)
    health.prime()
    reading = health.read_health(config, health.last_file_finished(warehouse.cursor()))
    assert intervals == [None, None]  # interval=None returns at once; anything else sleeps
    assert 0 <= reading.cpu_usage_percent <= 100
    assert reading.num_cores >= 1
    assert 0 < reading.memory_usage_percent <= 100
    assert 0 < reading.disk_usage_percent <= 100
    assert reading.process_rss_bytes > 1_000_000
    assert reading.uptime_seconds > 0
    assert reading.inbox_backlog == 0
    assert reading.seconds_since_last_file is None
    assert not any("user" in name for name in vars(reading))  # never lists OS users
