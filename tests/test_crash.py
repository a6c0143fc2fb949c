"""Crash safety: a ``moneylion serve`` child SIGKILLed at random moments while it ingests a
stream of files (fresh files, exact re-sends, overlapping files), restarted until every file is
in; each file ends in done/ once and the totals equal an independent computation. And errors
of the environment (disk full, permission denied, a vanishing file, a failing move): retried
with backoff, then set aside with a reason, the worker staying up."""

from __future__ import annotations

import contextlib
import errno
import json
import random
import sqlite3
from pathlib import Path

import duckdb
import pytest

from moneylion.aggregates import verify
from moneylion.config import Config
from moneylion.export import export_new
from moneylion.export.exporter import SqliteExporter
from moneylion.inbox import move_without_overwrite, set_aside_files, write_reason
from moneylion.ingest import FileOutcome, ingest_file
from moneylion.watcher import InboxQueue
from moneylion.worker import MAX_ATTEMPTS, IngestWorker
from tests.daemon_process import (
    DaemonProcess,
    crash_trial,
    logged_events,
    random_transactions,
    run_cli,
    wait_for,
    warehouse_totals,
    write_transactions,
)
from tests.expected import Expected


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
        expected.add_transactions_file(path)
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
    expected.add_transactions_file(fresh)
    try:
        daemon.start()
        wait_for(lambda: not daemon.inbox_waiting(), 30, "the inbox to empty")
        reason = reason_of(inbox / "failed", "bad.csv")
        assert daemon.folder("done") == ["c0.csv", "c1.csv", "c2.csv", "fresh.csv"]
        assert daemon.folder("failed") == ["bad.csv", "bad.csv.reason.json"]
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
    assert users == {u: (expected.count[u], expected.total[u]) for u in expected.count}


# -- errors of the environment: retried with backoff, then failed with a reason; the worker lives


class FlakyIngest:
    """ingest_file, but the first ``failures`` calls per file raise ``error`` instead."""

    def __init__(self, error: Exception, failures: int) -> None:
        self.error = error
        self.failures = failures
        self.calls: dict[str, int] = {}

    def __call__(self, conn: duckdb.DuckDBPyConnection, path: Path, config: Config) -> FileOutcome:
        self.calls[path.name] = self.calls.get(path.name, 0) + 1
        if self.calls[path.name] <= self.failures:
            raise self.error
        return ingest_file(conn, path, config)


def run_worker(
    config: Config, conn: duckdb.DuckDBPyConnection, ingest: FlakyIngest, names: list[str]
) -> IngestWorker:
    """Queue ``names`` (already in the inbox), run a worker until they left the inbox."""
    queue = InboxQueue(config.settle_seconds)
    worker = IngestWorker(conn, config, queue, ingest=ingest, backoff=(0.01, 0.02))
    worker.start()
    for name in names:
        queue.file_complete(config.inbox / name)
    wait_for(lambda: not any((config.inbox / n).exists() for n in names), 30, "the inbox to empty")
    wait_for(lambda: len(queue) == 0, 5, "the queue to drain")
    return worker


def reason_of(failed: Path, name: str) -> dict[str, object]:
    """The reason document of a refused file: the worker moves the file to failed/ first, then
    writes its reason beside it, so a test that saw the inbox empty may have to wait for it."""
    wanted = f"{name}.reason.json"

    def found() -> list[Path]:  # in failed/<day>/
        return [p for p in set_aside_files(failed) if p.name == wanted]

    wait_for(lambda: len(found()) == 1, 5, wanted)
    document: dict[str, object] = json.loads(found()[0].read_text())
    return document


def small_file(config: Config, name: str, first_id: int) -> Path:
    rows = random_transactions(random.Random(first_id), first_id, 20)
    return write_transactions(config.inbox / name, rows)


def test_a_transient_environment_error_is_retried_and_the_file_then_loads(
    config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    small_file(config, "a.csv", 1)
    ingest = FlakyIngest(OSError(errno.ENOSPC, "No space left on device"), failures=2)
    worker = run_worker(config, warehouse, ingest, ["a.csv"])
    assert ingest.calls == {"a.csv": 3}
    assert [p.name for p in set_aside_files(config.done_dir)] == ["a.csv"]
    assert worker.is_alive()
    worker.stop()
    assert verify(warehouse) == []


def test_a_persistent_environment_error_fails_the_file_with_a_reason_and_the_worker_goes_on(
    config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    small_file(config, "locked.csv", 1)
    ingest = FlakyIngest(PermissionError(errno.EACCES, "Permission denied"), failures=99)
    worker = run_worker(config, warehouse, ingest, ["locked.csv"])
    assert ingest.calls == {"locked.csv": MAX_ATTEMPTS}
    reason = reason_of(config.failed_dir, "locked.csv")
    assert reason["reason"] == "unreadable"
    assert "Permission denied" in str(reason["message"])
    assert reason["sha256"]
    assert worker.is_alive()
    ingest.failures = 0
    small_file(config, "next.csv", 100)
    worker.queue.file_complete(config.inbox / "next.csv")
    wait_for(
        lambda: "next.csv" in [p.name for p in set_aside_files(config.done_dir)],
        30,
        "next.csv in done/",
    )
    worker.stop()


def test_a_database_error_is_retried_then_failed_as_an_ingest_error(
    config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    small_file(config, "b.csv", 1)
    ingest = FlakyIngest(duckdb.IOException("could not write WAL: disk full"), failures=99)
    worker = run_worker(config, warehouse, ingest, ["b.csv"])
    reason = reason_of(config.failed_dir, "b.csv")
    assert reason["reason"] == "ingest_error"
    assert worker.is_alive()
    worker.stop()


def test_a_file_vanishing_mid_read_is_dropped_without_a_trace(
    config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    path = small_file(config, "gone.csv", 1)

    class Vanishing(FlakyIngest):
        def __call__(self, conn: duckdb.DuckDBPyConnection, p: Path, cfg: Config) -> FileOutcome:
            p.unlink()
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(p))

    worker = run_worker(config, warehouse, Vanishing(OSError(), 0), [path.name])
    assert set_aside_files(config.failed_dir) == []
    assert set_aside_files(config.done_dir) == []
    assert worker.is_alive()
    worker.stop()


def test_a_committed_file_that_cannot_be_moved_is_retried_then_set_aside_counted_once(
    config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    config.done_dir.write_text("done/ is a file here, so nothing can be moved into it")
    path = small_file(config, "c.csv", 1)
    expected = Expected()
    expected.add_transactions_file(path)
    ingest = FlakyIngest(OSError(), failures=0)
    worker = run_worker(config, warehouse, ingest, ["c.csv"])
    assert ingest.calls == {"c.csv": MAX_ATTEMPTS}  # first loaded, then found in the ledger
    reason = reason_of(config.failed_dir, "c.csv")
    assert reason["reason"] == "cannot_move"
    worker.stop()
    count = warehouse.execute("SELECT count(*) FROM transactions").fetchone()
    assert count == (expected.transactions,)
    assert verify(warehouse) == []


def test_failed_names_never_overwrite_and_reason_files_pair_with_their_file(tmp_path: Path) -> None:
    folder = tmp_path / "failed"
    for n in range(3):
        source = tmp_path / "x.csv"
        source.write_text(f"copy {n}")
        target = move_without_overwrite(source, folder, companion_suffix=".reason.json")
        write_reason(target, {"reason": "empty", "n": n})
    assert sorted(p.name for p in folder.iterdir()) == [
        "x.1.csv",
        "x.1.csv.reason.json",
        "x.2.csv",
        "x.2.csv.reason.json",
        "x.csv",
        "x.csv.reason.json",
    ]
    assert json.loads((folder / "x.2.csv.reason.json").read_text())["n"] == 2
    assert (folder / "x.2.csv").read_text() == "copy 2"


def test_a_failing_sqlite_export_is_retried_in_the_background_while_ingest_goes_on(
    config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    calls: list[int] = []

    def flaky_export(conn: duckdb.DuckDBPyConnection, path: Path) -> object:
        calls.append(len(calls))
        if len(calls) == 1:
            raise sqlite3.OperationalError("disk I/O error")
        return export_new(conn, path)

    exporter = SqliteExporter(warehouse.cursor(), config.sqlite_path, export=flaky_export)
    exporter.start()
    try:
        small_file(config, "a.csv", 1)
        small_file(config, "b.csv", 100)
        worker = run_worker(config, warehouse, FlakyIngest(OSError(), 0), ["a.csv", "b.csv"])
        worker.on_commit = exporter.poke
        assert sorted(p.name for p in set_aside_files(config.done_dir)) == ["a.csv", "b.csv"]
        worker.stop()

        def exported() -> int:
            if not config.sqlite_path.exists():
                return 0
            with contextlib.closing(sqlite3.connect(config.sqlite_path)) as lite:
                row = lite.execute("SELECT count(*) FROM transactions").fetchone()
            return int(row[0])

        wait_for(lambda: exported() == 40, 30, "the export to succeed after its failure")
        assert len(calls) >= 2
    finally:
        assert exporter.stop()
