"""The daemon as users run it: a real ``python -m moneylion serve`` child, a real inbox, the API
over HTTP. Every way of dropping a file ends with the file in done/ exactly once and the API
showing totals equal to an independent computation (csv + Decimal)."""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import sqlite3
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

from tests.conftest import TX_HEADER
from tests.daemon_process import (
    DaemonProcess,
    assert_api_totals,
    logged_events,
    random_transactions,
    run_cli,
    wait_for,
    write_transactions,
)
from tests.expected import Expected

pytestmark = pytest.mark.slow

SETTLE = 0.2


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(tmp_path / "inbox", tmp_path / "warehouse", settle_seconds=SETTLE)
    process.inbox.mkdir()
    process.start()
    yield process
    process.close()


def split_csv(source: Path, parts: int, out_dir: Path) -> list[Path]:
    """``source`` cut into ``parts`` files of whole lines, each with the header."""
    header, *lines = source.read_bytes().splitlines(keepends=True)
    size = -(-len(lines) // parts)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for n in range(parts):
        path = out_dir / f"part{n + 1}.csv"
        path.write_bytes(header + b"".join(lines[n * size : (n + 1) * size]))
        written.append(path)
    return written


def sqlite_rows(path: Path) -> int:
    """Transactions in the SQLite export (0 while it does not exist yet)."""
    if not path.exists():
        return 0
    with contextlib.closing(sqlite3.connect(path)) as lite:
        try:
            row = lite.execute("SELECT count(*) FROM transactions").fetchone()
        except sqlite3.OperationalError:
            return 0
    return int(row[0])


def ledger(daemon: DaemonProcess) -> list[dict[str, object]]:
    page = daemon.get("/v1/files", limit=1000)
    items: list[dict[str, object]] = page["items"]
    while len(items) < page["total"]:
        page = daemon.get("/v1/files", limit=1000, offset=len(items))
        items.extend(page["items"])
    return items


def wait_settled(daemon: DaemonProcess, files: int, timeout: float = 60.0) -> None:
    """Until ``files`` ledger rows exist and the inbox holds nothing but done/ and failed/."""
    wait_for(
        lambda: daemon.get("/v1/files", limit=1)["total"] >= files and not daemon.inbox_waiting(),
        timeout,
        f"{files} files ingested and moved",
    )


def test_seed_files_dropped_every_way_each_end_in_done_once_with_exact_api_totals(
    tmp_path: Path, daemon: DaemonProcess, seed_files: tuple[Path, Path]
) -> None:
    users_csv, transactions_csv = seed_files
    inbox = daemon.inbox
    expected = Expected()
    expected.add_transactions_file(transactions_csv)
    parts = split_csv(transactions_csv, 4, tmp_path / "parts")

    # 1. written in place (Created, Modified, Closed)
    shutil.copyfile(parts[0], inbox / "part1.csv")
    # 2. moved in from the same filesystem (only Created: settled by size)
    os.rename(parts[1], inbox / "part2.csv")
    # 3. written under a temp name, then renamed inside the inbox (Moved)
    shutil.copyfile(parts[2], inbox / "part3.csv.tmp")
    os.rename(inbox / "part3.csv.tmp", inbox / "part3.csv")
    # 4. written slowly in pieces, pausing longer than the settle time
    content = parts[3].read_bytes()
    cuts = [0, len(content) // 3, 2 * len(content) // 3, len(content)]
    with (inbox / "part4.csv").open("wb") as handle:
        for start, end in itertools.pairwise(cuts):
            handle.write(content[start:end])
            handle.flush()
            time.sleep(SETTLE * 3)
    # 5. users after their transactions (orphans until then)
    shutil.copyfile(users_csv, inbox / "users.csv")

    wait_settled(daemon, 5)
    names = ["part1.csv", "part2.csv", "part3.csv", "part4.csv", "users.csv"]
    assert daemon.folder("done") == names
    assert daemon.folder("failed") == []
    rows = ledger(daemon)
    assert sorted(str(r["name"]) for r in rows) == names
    assert all(r["status"] == "loaded" and r["rows_rejected"] == 0 for r in rows)
    assert sum(int(str(r["rows_loaded"])) for r in rows if r["kind"] == "transactions") == 100_000
    assert_api_totals(daemon, expected)
    known = daemon.get("/v1/users/1/summary")
    assert known["known_user"] is True
    assert known["country"] is not None

    # The same bytes again under the same name: a duplicate file, moved beside the first copy.
    shutil.copyfile(parts[0], inbox / "part1.csv")
    # The whole seed file again: new bytes, every row a duplicate.
    shutil.copyfile(transactions_csv, inbox / "again.csv")
    # A file that is not CSV of ours: failed/, with its reason beside it.
    (inbox / "notes.csv").write_text("hello,world\n1,2\n", encoding="utf-8")
    wait_for(
        lambda: len(daemon.folder("done")) == 7 and len(daemon.folder("failed")) == 2,
        30,
        "the re-sends in done/ and the bad file in failed/",
    )
    assert daemon.folder("done") == sorted([*names, "part1.1.csv", "again.csv"])
    assert daemon.folder("failed") == ["notes.csv", "notes.csv.reason.json"]
    rows = ledger(daemon)
    again = next(r for r in rows if r["name"] == "again.csv")
    assert (again["rows_loaded"], again["rows_duplicate"]) == (0, 100_000)
    assert len(rows) == 7  # the duplicate file added no ledger row
    assert_api_totals(daemon, expected)

    # The SQLite copy catches up in the background, with the seed's tables.
    sqlite_path = daemon.warehouse / "moneylion.sqlite"
    wait_for(lambda: sqlite_rows(sqlite_path) == 100_000, 30, "the SQLite export to catch up")
    with contextlib.closing(sqlite3.connect(sqlite_path)) as lite:
        totals = lite.execute("SELECT total_amount FROM user_totals").fetchall()
    assert sum((Decimal(t) for (t,) in totals), Decimal(0)) == expected.grand_total

    assert daemon.stop() == 0
    env = daemon.environ()
    verify = run_cli("verify", env=env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    status = run_cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert '"transactions": 100000' in status.stdout


def test_files_waiting_before_start_are_ingested_on_start_and_sigterm_exits_zero(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = random.Random(3)
    expected = Expected()
    for n in range(5):
        path = write_transactions(inbox / f"w{n}.csv", random_transactions(rng, n * 100 + 1, 100))
        expected.add_transactions_file(path)
    (inbox / ".hidden.csv").write_bytes((inbox / "w0.csv").read_bytes())
    (inbox / "half.csv.part").write_text(TX_HEADER + "\n")
    daemon = DaemonProcess(inbox, tmp_path / "warehouse", settle_seconds=SETTLE)
    try:
        daemon.start()
        wait_settled(daemon, 5)
        assert daemon.folder("done") == [f"w{n}.csv" for n in range(5)]
        assert sorted(p.name for p in inbox.iterdir() if p.is_file()) == [
            ".hidden.csv",
            "half.csv.part",
        ]
        assert_api_totals(daemon, expected)
        assert daemon.stop() == 0
    finally:
        daemon.close()


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "inbox", tmp_path / "warehouse", settle_seconds=SETTLE)
    try:
        daemon.start()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.proc.wait(10) == 0
    finally:
        daemon.close()


def test_a_second_daemon_on_the_same_warehouse_exits_at_once_with_a_message(
    tmp_path: Path, daemon: DaemonProcess
) -> None:
    second = DaemonProcess(tmp_path / "inbox2", daemon.warehouse, settle_seconds=SETTLE)
    try:
        second.start(wait_ready=False)
        assert second.proc is not None
        assert second.proc.wait(30) == 3
        assert "in use by another process" in second.stderr_text()
    finally:
        second.close()
    assert daemon.ready()


def test_a_thousand_small_files_dropped_at_once_are_each_ingested_once(
    tmp_path: Path, daemon: DaemonProcess
) -> None:
    rng = random.Random(11)
    staging = tmp_path / "staging"
    staging.mkdir()
    expected = Expected()
    paths = []
    previous: list[tuple[int, int, str, str, str]] = []
    for n in range(1000):
        rows = random_transactions(rng, n * 10 + 1, 10, users=300)
        if n % 10 == 9:  # half of the rows sent again: identical copies count once
            rows = previous[:5] + rows[:5]
        previous = rows
        paths.append(write_transactions(staging / f"s{n:04d}.csv", rows))
        expected.add_transactions_file(paths[-1])
    for path in paths:  # all at once: a thousand bare Created events
        os.rename(path, daemon.inbox / path.name)
    wait_settled(daemon, 1000, timeout=400)  # ~40 ms a file; generous for a loaded machine
    assert daemon.folder("done") == sorted(p.name for p in paths)
    assert daemon.folder("failed") == []
    files = ledger(daemon)
    assert len(files) == 1000
    assert sorted(str(r["name"]) for r in files) == sorted(p.name for p in paths)
    assert sum(int(str(r["rows_loaded"])) for r in files) == expected.transactions
    assert_api_totals(daemon, expected, sample=100)


def test_sigterm_during_a_large_file_rolls_it_back_or_finishes_it_and_the_next_start_loads_it(
    tmp_path: Path,
) -> None:
    rows = 4_000_000
    big = tmp_path / "big.csv"
    duckdb.connect().execute(
        f"""COPY (SELECT i AS transaction_id, 1 + i % 5000 AS user_id,
                         DATE '2022-01-01' + CAST(i % 365 AS INTEGER) AS transaction_date,
                         CAST(1 + i % 1000 AS DECIMAL(18, 2)) AS amount,
                         ['deposit', 'withdrawal', 'purchase'][1 + i % 3] AS transaction_type
                  FROM range(1, {rows + 1}) t(i)) TO '{big}' (HEADER)"""
    )
    daemon = DaemonProcess(
        tmp_path / "inbox",
        tmp_path / "warehouse",
        settle_seconds=SETTLE,
        env={"MONEYLION_LOG_LEVEL": "INFO", "MONEYLION_SQLITE_EXPORT": "false"},
    )
    daemon.inbox.mkdir()
    try:
        daemon.start()
        os.rename(big, daemon.inbox / "big.csv")
        wait_for(
            lambda: any(e.get("event") == "file_started" for e in logged_events(daemon.warehouse)),
            30,
            "the worker to start on big.csv",
        )
        assert daemon.stop(timeout=15) == 0
        finished = daemon.folder("done") == ["big.csv"]
        if not finished:  # rolled back: still waiting, nothing of it stored
            assert daemon.inbox_waiting() == ["big.csv"]
            status = run_cli("status", "--json", env=daemon.environ())
            assert '"transactions": 0' in status.stdout, status.stdout + status.stderr
            daemon.start()
            wait_for(lambda: daemon.folder("done") == ["big.csv"], 120, "big.csv in done/")
            assert daemon.stop(timeout=15) == 0
    finally:
        daemon.close()
    events = [e.get("event") for e in logged_events(daemon.warehouse)]
    assert ("file_rolled_back" in events) is not finished
    status = run_cli("status", "--json", env=daemon.environ())
    assert f'"transactions": {rows}' in status.stdout, status.stdout + status.stderr
    assert run_cli("verify", env=daemon.environ()).returncode == 0


def thread_nice_values(pid: int) -> dict[int, int]:
    """Linux: the nice value of each thread of process ``pid``, by thread id."""
    values = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            values[int(task.name)] = int(fields[16])  # stat field 19: nice
    return values


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="per-thread nice is Linux's")
def test_ingest_threads_run_nicer_than_the_api(daemon: DaemonProcess) -> None:
    assert daemon.proc is not None
    nice = thread_nice_values(daemon.proc.pid)
    assert nice[daemon.proc.pid] == 0  # the main thread: uvicorn's event loop, the API
    # The ingest worker, the exporter and DuckDB's own threads (started by the opening thread).
    assert sum(1 for value in nice.values() if value == 19) >= 3
    assert set(nice.values()) == {0, 19}
