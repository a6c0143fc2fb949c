"""Crash safety: a ``moneylion serve`` child SIGKILLed at random moments while it ingests a
stream of files (fresh files, exact re-sends, overlapping files), restarted until every file is
in; each file ends in done/ once and the totals equal an independent computation."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.daemon_process import (
    DaemonProcess,
    Expected,
    crash_trial,
    logged_events,
    random_transactions,
    run_cli,
    wait_for,
    warehouse_totals,
    write_transactions,
)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_moments_then_restart_counts_every_file_exactly_once(
    tmp_path: Path, seed: int
) -> None:
    result = crash_trial(tmp_path, seed, files=30, rows=200)
    assert result.kills >= 3
    assert result.problems == []


@pytest.mark.slow
def test_files_committed_but_not_moved_before_a_crash_are_moved_on_restart_not_counted_again(
    tmp_path: Path,
) -> None:
    # `moneylion ingest` commits exactly like the worker and never moves the file: the state a
    # crash between commit and move leaves behind.
    inbox, warehouse = tmp_path / "inbox", tmp_path / "warehouse"
    inbox.mkdir()
    rng = random.Random(5)
    expected = Expected()
    committed = []
    for n in range(3):
        path = write_transactions(inbox / f"c{n}.csv", random_transactions(rng, n * 50 + 1, 50))
        expected.add_csv(path)
        committed.append(path)
    bad = inbox / "bad.csv"
    bad.write_text("not,a,header\n", encoding="utf-8")
    daemon = DaemonProcess(
        inbox, warehouse, settle_seconds=0.05, env={"MONEYLION_LOG_LEVEL": "INFO"}
    )
    env = daemon.environ()
    ingested = run_cli("ingest", "--quiet", *map(str, [*committed, bad]), env=env)
    assert ingested.returncode == 1, ingested.stdout + ingested.stderr  # bad.csv failed
    fresh = write_transactions(inbox / "fresh.csv", random_transactions(rng, 1000, 50))
    expected.add_csv(fresh)
    try:
        daemon.start()
        wait_for(lambda: not daemon.inbox_waiting(), 30, "the inbox to empty")
        assert daemon.folder("done") == ["c0.csv", "c1.csv", "c2.csv", "fresh.csv"]
        assert daemon.folder("failed") == ["bad.csv", "bad.csv.reason.json"]
        reason = json.loads((inbox / "failed" / "bad.csv.reason.json").read_text())
        assert reason["reason"] == "unknown_header"
        assert reason["sha256"]
        assert daemon.stop() == 0
    finally:
        daemon.close()
    moves = [e for e in logged_events(warehouse) if e.get("event") == "file_moved"]
    assert sorted((e["file"], e["status"]) for e in moves) == [
        ("bad.csv", "failed"),
        ("c0.csv", "duplicate_file"),
        ("c1.csv", "duplicate_file"),
        ("c2.csv", "duplicate_file"),
        ("fresh.csv", "loaded"),
    ]
    count, users, differences = warehouse_totals(warehouse)
    assert differences == []
    assert count == expected.transactions
    assert users == {
        u: (expected.user_count[u], expected.user_total[u]) for u in expected.user_count
    }
