"""A stream of small files through the real daemon: micro-batches commit every file exactly once,
a SIGKILL in the middle of a batch leaves none of it, files apply in arrival order, and replaying
done/ by hand in ledger order gives the daemon's state again. Every test ends with ``verify``."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from moneylion.aggregates import verify
from moneylion.config import load_config
from moneylion.health import inbox_waiting
from moneylion.inbox import prune_days, set_aside_files
from moneylion.schema import open_warehouse
from moneylion.watcher import scan_inbox
from tests.conftest import USERS_HEADER, write_csv
from tests.daemon_process import (
    DaemonProcess,
    logged_events,
    random_transactions,
    run_cli,
    wait_for,
    warehouse_totals,
    write_transactions,
)
from tests.expected import Expected

pytestmark = pytest.mark.slow


def write_users(path: Path, rows: list[tuple[int, str, str]]) -> Path:
    return write_csv(path, USERS_HEADER, (f"{u},{d},{c}" for u, d, c in rows))


@contextlib.contextmanager
def warehouse_conn(warehouse: Path) -> Iterator[duckdb.DuckDBPyConnection]:
    """The warehouse opened directly (the daemon stopped), as ``moneylion verify`` opens it."""
    config = load_config(environ={}).with_overrides(inbox=warehouse / "unused", warehouse=warehouse)
    conn = open_warehouse(config)
    try:
        yield conn
    finally:
        conn.close()


def ledger_rows(warehouse: Path) -> list[tuple[object, ...]]:
    with warehouse_conn(warehouse) as conn:
        return conn.execute("SELECT name, status FROM files ORDER BY file_id").fetchall()


def test_two_thousand_small_files_dropped_at_once_commit_in_batches_each_exactly_once(
    tmp_path: Path,
) -> None:
    rng = random.Random(23)
    staging = tmp_path / "staging"
    staging.mkdir()
    expected = Expected()
    paths = []
    for n in range(2000):
        rows = random_transactions(rng, n * 10 + 1, 10, users=500)
        paths.append(write_transactions(staging / f"e{n:04d}.csv", rows))
        expected.add_transactions_file(paths[-1])
    daemon = DaemonProcess(
        tmp_path / "inbox",
        tmp_path / "warehouse",
        settle_seconds=0.2,
        env={"MONEYLION_LOG_LEVEL": "INFO"},
    )
    daemon.inbox.mkdir()
    try:
        daemon.start()
        for path in paths:  # moved in at once: two thousand bare Created events
            os.rename(path, daemon.inbox / path.name)
        wait_for(
            lambda: len(daemon.folder("done")) == len(paths) and not daemon.inbox_waiting(),
            300,
            "every file in done/",
        )
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert daemon.folder("done") == sorted(p.name for p in paths)
    assert daemon.folder("failed") == []
    files = ledger_rows(daemon.warehouse)
    assert sorted(str(name) for name, _ in files) == sorted(p.name for p in paths)
    assert {status for _, status in files} == {"loaded"}
    batches = [e for e in logged_events(daemon.warehouse) if e.get("event") == "batch_committed"]
    assert sum(int(e["files"]) for e in batches) == len(paths)
    assert max(int(e["files"]) for e in batches) > 1  # they were batched, not one by one
    count, users, differences = warehouse_totals(daemon.warehouse)
    assert differences == []
    assert count == expected.transactions
    assert users == {u: (expected.count[u], expected.total[u]) for u in expected.count}


# A hook in the child: the first batch of several files stops just before its ledger rows are
# written (inside the transaction, its rows and deltas applied) and tells the test its files.
_STALL_BATCH = """
import json, pathlib, time
import moneylion.ledger as _ledger
_insert = _ledger.insert
_mark = pathlib.Path({mark!r})
def _stalled(conn, outcomes):
    if len(outcomes) > 1 and not _mark.exists():
        _mark.write_text(json.dumps([o.name for o in outcomes]))
        time.sleep(120)
    return _insert(conn, outcomes)
_ledger.insert = _stalled
"""


def test_sigkill_in_the_middle_of_a_batch_commits_none_of_it_and_the_restart_loads_each_once(
    tmp_path: Path,
) -> None:
    rng = random.Random(31)
    inbox, warehouse = tmp_path / "inbox", tmp_path / "warehouse"
    inbox.mkdir()
    expected = Expected()
    paths = []
    for n in range(60):
        rows = random_transactions(rng, n * 10 + 1, 10)
        paths.append(write_transactions(inbox / f"k{n:03d}.csv", rows))
        expected.add_transactions_file(paths[-1])
    users = write_users(inbox / "users.csv", [(u, "2022-01-01", "Chile") for u in range(1, 50)])
    expected.add_users_file(users)
    mark = tmp_path / "stalled.json"
    daemon = DaemonProcess(
        inbox,
        warehouse,
        settle_seconds=0.05,
        env={"MONEYLION_LOG_LEVEL": "INFO"},
        preamble=_STALL_BATCH.format(mark=str(mark)),
    )
    try:
        daemon.start(wait_ready=False)
        wait_for(mark.exists, 60, "a batch to stall inside its transaction")
        in_batch = json.loads(mark.read_text())
        daemon.kill()
    finally:
        daemon.close()
    assert len(in_batch) > 1
    committed = {str(name) for name, _ in ledger_rows(warehouse)}
    assert committed.isdisjoint(in_batch)  # nothing of the killed batch
    waiting = {p.name for p in scan_inbox(inbox)}
    assert set(in_batch) <= waiting  # every file of it still in the inbox
    assert set(daemon.folder("done")) == committed  # what committed before it was moved
    with warehouse_conn(warehouse) as conn:
        assert verify(conn, top_users_kept=load_config(environ={}).top_users_kept) == []

    restarted = DaemonProcess(inbox, warehouse, settle_seconds=0.05)
    try:
        restarted.start()
        wait_for(lambda: not restarted.inbox_waiting(), 60, "the inbox to empty")
        assert restarted.stop() == 0
    finally:
        restarted.close()
    everything = sorted([p.name for p in paths] + [users.name])
    assert restarted.folder("done") == everything
    names = [str(name) for name, _ in ledger_rows(warehouse)]
    assert sorted(names) == everything  # each file's ledger row exactly once
    count, totals, differences = warehouse_totals(warehouse)
    assert differences == []
    assert count == expected.transactions
    assert totals == {u: (expected.count[u], expected.total[u]) for u in expected.count}


def test_a_file_moved_in_then_one_copied_in_apply_in_arrival_order(tmp_path: Path) -> None:
    # mv is a bare Created: the file is complete, but the watcher cannot know it until it has
    # settled; cp's file is closed (complete) 0.1 s later. Arrival order is the first event's:
    # Monday's countries, then Tuesday's, which stay.
    users = list(range(1, 21))
    staging = tmp_path / "staging"
    staging.mkdir()
    monday = write_users(staging / "users_monday.csv", [(u, "2022-01-01", "Peru") for u in users])
    tuesday = write_users(staging / "users_tuesday.csv", [(u, "2022-01-01", "Fiji") for u in users])
    daemon = DaemonProcess(tmp_path / "inbox", tmp_path / "warehouse", settle_seconds=1.0)
    daemon.inbox.mkdir()
    try:
        daemon.start()
        os.rename(monday, daemon.inbox / monday.name)
        time.sleep(0.1)
        shutil.copyfile(tuesday, daemon.inbox / tuesday.name)
        wait_for(lambda: len(daemon.folder("done")) == 2, 30, "both files in done/")
        shown = {u: daemon.get(f"/v1/users/{u}/summary")["country"] for u in users}
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert shown == dict.fromkeys(users, "Fiji")
    assert [str(n) for n, _ in ledger_rows(daemon.warehouse)] == [monday.name, tuesday.name]
    _, _, differences = warehouse_totals(daemon.warehouse)
    assert differences == []


def _stream_with_conflicts_and_updates(folder: Path, rng: random.Random) -> list[Path]:
    """Transaction files with re-sends, conflicting copies and orphans; users files that change
    countries and arrive late; one file refused whole."""
    folder.mkdir()
    written: list[Path] = []
    sent: list[tuple[int, int, str, str, str]] = []
    next_id = 1
    countries = ("Chile", "Japan", "Kenya", "Norway")
    for n in range(80):
        name = folder / f"{n:03d}"
        if n % 9 == 4:  # a users file: some new users, some moving country
            ids = rng.sample(range(1, 60), 15)
            rows = [(u, "2022-02-02", rng.choice(countries)) for u in ids]
            written.append(write_users(name.with_suffix(".users.csv"), rows))
            continue
        if n == 41:
            written.append(name.with_suffix(".csv"))
            written[-1].write_text("no,such,columns\n1,2,3\n", "utf-8")
            continue
        rows = random_transactions(rng, next_id, 10, users=80)  # users 60..80 stay orphans
        next_id += len(rows)
        if sent and n % 5 == 3:  # copies of earlier rows: identical (duplicates) or changed
            for earlier in rng.sample(sent, 4):
                if rng.random() < 0.5:
                    rows.append(earlier)
                else:
                    changed = f"{float(earlier[3]) + 1:.2f}"
                    rows.append((earlier[0], earlier[1], earlier[2], changed, earlier[4]))
        sent.extend(rows)
        written.append(write_transactions(name.with_suffix(".csv"), rows))
    return written


_STATE = {
    "user_totals": "SELECT * FROM user_totals ORDER BY ALL",
    "daily_totals": "SELECT * FROM daily_totals ORDER BY ALL",
    "top_users": "SELECT * FROM top_users ORDER BY ALL",
    "users": "SELECT user_id, signup_date, country FROM users ORDER BY ALL",
    "transactions": "SELECT * EXCLUDE (file_id) FROM transactions ORDER BY ALL",
    "rejects": "SELECT f.name, r.line_number, r.reason FROM rejects r JOIN files f USING (file_id)"
    " ORDER BY ALL",
    "files": "SELECT name, status, rows_loaded, rows_duplicate, rows_rejected FROM files"
    " WHERE status <> 'failed' ORDER BY ALL",
}


def _state(warehouse: Path) -> dict[str, list[tuple[object, ...]]]:
    with warehouse_conn(warehouse) as conn:
        assert verify(conn, top_users_kept=load_config(environ={}).top_users_kept) == []
        return {table: conn.execute(query).fetchall() for table, query in _STATE.items()}


def test_replaying_done_in_ledger_order_by_hand_gives_the_daemons_state(tmp_path: Path) -> None:
    rng = random.Random(47)
    stream = _stream_with_conflicts_and_updates(tmp_path / "staging", rng)
    daemon = DaemonProcess(tmp_path / "inbox", tmp_path / "warehouse", settle_seconds=0.05)
    daemon.inbox.mkdir()
    try:
        daemon.start()
        for path in stream:  # in bursts, so that batches of several files form
            os.rename(path, daemon.inbox / path.name)
            if rng.random() < 0.2:
                time.sleep(rng.uniform(0.05, 0.3))
        wait_for(
            lambda: len(daemon.folder("done")) + len(daemon.folder("failed")) >= len(stream) + 1,
            60,
            "every file set aside",  # failed/ also holds the refused file's reason
        )
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert daemon.folder("failed") == ["041.csv", "041.csv.reason.json"]
    live = _state(daemon.warehouse)
    assert any(reason == "conflicts_with_stored" for _, _, reason in live["rejects"])
    assert live["transactions"]
    assert live["users"]

    with warehouse_conn(daemon.warehouse) as conn:
        order = [
            str(name)
            for (name,) in conn.execute(
                "SELECT name FROM files WHERE status <> 'failed' ORDER BY file_id"
            ).fetchall()
        ]
    done = {p.name: p for p in set_aside_files(daemon.inbox / "done")}
    replica = tmp_path / "replay"
    env = DaemonProcess(tmp_path / "unused-inbox", replica).environ()
    replica.mkdir()
    replayed = run_cli("ingest", "--quiet", *(str(done[name]) for name in order), env=env)
    assert replayed.returncode == 0, replayed.stdout + replayed.stderr
    assert _state(replica) == live


def test_done_days_past_retention_are_pruned_and_the_scans_never_list_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    inbox = tmp_path / "inbox"
    done = inbox / "done"
    today = dt.date(2026, 12, 1)
    for age in (0, 1, 2, 6, 7, 8, 30):
        day = done / (today - dt.timedelta(days=age)).isoformat()
        day.mkdir(parents=True)
        (day / f"f{age}.csv").write_text("user_id,signup_date,country\n", "utf-8")
    (done / "notes").mkdir()  # not a day: never touched
    outside = tmp_path / "outside"
    outside.mkdir()
    (done / "2000-01-01").symlink_to(outside)  # a link named like a day: never followed
    (inbox / "waiting.csv").write_text("user_id,signup_date,country\n", "utf-8")

    removed = prune_days(done, keep_days=7, today=today)
    assert sorted(p.name for p in removed) == ["2026-11-01", "2026-11-23"]
    kept = sorted(p.name for p in done.iterdir())
    days_kept = ["2026-11-24", "2026-11-25", "2026-11-29", "2026-11-30", "2026-12-01"]
    assert kept == ["2000-01-01", *days_kept, "notes"]
    assert outside.is_dir()
    assert prune_days(done, keep_days=0, today=today) == []  # 0: keep for ever

    listed: list[str] = []
    real_scandir = os.scandir

    def recording(path: str | os.PathLike[str]) -> object:
        listed.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", recording)
    assert [p.name for p in scan_inbox(inbox)] == ["waiting.csv"]
    assert inbox_waiting(inbox)[0] == 1
    assert listed
    assert all(Path(p) == inbox for p in listed)
