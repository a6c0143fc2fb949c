"""Export crash safety: an exporter SIGKILLed between the DuckDB commit and the SQLite commit (or
at random moments), restarted, leaves a SQLite file equal to a full export: nothing twice,
nothing missed, and a reader never sees half a file."""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moneylion.aggregates import verify
from moneylion.config import Config
from moneylion.export import bulk, export_new
from moneylion.ingest import ingest_file
from moneylion.schema import open_warehouse
from tests.test_export import (  # noqa: F401 (close_exporter: an autouse fixture)
    assert_equals_full_export,
    close_exporter,
    dump_sqlite,
    random_files,
)

# A child process: ingest the files (the DuckDB commits), then export; SIGKILL itself when the
# exporter reaches the named step ("-" never).
CHILD = r"""
import dataclasses, os, signal, sys
from pathlib import Path
from moneylion import export
from moneylion.export import outcome
from moneylion.config import load_config
from moneylion.ingest import ingest_file
from moneylion.schema import open_warehouse

warehouse, inbox, mode, point, *files = sys.argv[1:]
config = load_config(environ={}).with_overrides(warehouse=warehouse, inbox=inbox)

def die(reached):
    if reached == point:
        os.kill(os.getpid(), signal.SIGKILL)

outcome.fault_hook = die
if mode == "large":  # every increment through a side file
    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, large_increment_rows=0)
    )
if mode == "full_parallel":  # a full export of any size in two threads
    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, parallel_min_transactions=1)
    )
conn = open_warehouse(config)
print("started", flush=True)
for name in files:
    ingest_file(conn, Path(name), config)
    if mode == "each":
        export.export_new(conn, config.sqlite_path, tuning=config.tuning)
if mode.startswith("full"):
    export.export_full(conn, config.sqlite_path, tuning=config.tuning)
else:
    export.export_new(conn, config.sqlite_path, tuning=config.tuning)
conn.close()
"""


def child(config: Config, mode: str, point: str, files: list[Path]) -> subprocess.Popen[bytes]:
    args = [str(config.warehouse), str(config.inbox), mode, point, *map(str, files)]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def watermark(path: Path) -> int:
    lite = sqlite3.connect(path)
    try:
        row = lite.execute("SELECT value FROM export_state WHERE key = 'last_file_id'").fetchone()
        return int(row[0])
    finally:
        lite.close()


def load_and_export(config: Config, files: list[Path]) -> None:
    conn = open_warehouse(config)
    try:
        for path in files:
            ingest_file(conn, path, config)
        export_new(conn, config.sqlite_path)
    finally:
        conn.close()


def catch_up_and_compare(config: Config) -> int:
    """Restart: export what is new, then compare with a full export; the transactions added."""
    conn = open_warehouse(config)
    try:
        result = export_new(conn, config.sqlite_path)
        assert_equals_full_export(conn, config.sqlite_path)
        assert verify(conn) == []
        return result.transactions
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("mode", "point", "committed"),
    [
        ("new", "sqlite_begun", False),
        ("new", "rows_written", False),
        ("new", "before_commit", False),
        ("new", "committed", True),
        ("large", "side_written", False),
        ("large", "rows_written", False),
        ("large", "before_commit", False),
        ("large", "committed", True),
    ],
)
def test_exporter_killed_after_the_duckdb_commit_catches_up_exactly_once_on_restart(
    config: Config, tmp_path: Path, mode: str, point: str, committed: bool
) -> None:
    files = random_files(tmp_path / "files", 8, seed=11)
    load_and_export(config, files[:4])
    before = dump_sqlite(config.sqlite_path)

    process = child(config, mode, point, files[4:])
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, stderr.decode()

    if point == "side_written":  # killed between the side file and the live file's transaction
        assert bulk.side_path(config.sqlite_path).exists()
    if committed:
        assert watermark(config.sqlite_path) == 8
    else:  # the SQLite transaction rolled back whole: old rows, old watermark
        assert dump_sqlite(config.sqlite_path) == before
        assert watermark(config.sqlite_path) == 4
    added = catch_up_and_compare(config)
    assert (added == 0) == committed
    assert len(dump_sqlite(config.sqlite_path)["files"]) == 8
    assert sorted(path.name for path in config.warehouse.glob("moneylion.sqlite.*")) == []


@pytest.mark.parametrize(
    ("mode", "point"),
    [
        ("full", "rows_written"),
        ("full", "aside_written"),
        ("full", "before_rename"),
        ("full_parallel", "rows_written"),
        ("full_parallel", "before_rename"),
    ],
)
def test_full_export_killed_before_the_rename_leaves_the_old_file_whole(
    config: Config, tmp_path: Path, mode: str, point: str
) -> None:
    files = random_files(tmp_path / "files", 6, seed=12)
    load_and_export(config, files[:3])
    before = dump_sqlite(config.sqlite_path)

    process = child(config, mode, point, files[3:])
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == -signal.SIGKILL, stderr.decode()

    assert dump_sqlite(config.sqlite_path) == before
    assert catch_up_and_compare(config) > 0
    assert sorted(path.name for path in config.warehouse.glob("moneylion.sqlite.*")) == []


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_exporter_killed_at_random_moments_ends_equal_to_a_full_export(
    config: Config, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    files = random_files(tmp_path / "files", 40, seed=seed)
    kills = 0
    for round_ in range(12):
        # Each round brings new files, so the child is still busy when the kill comes; the
        # kill is timed from the child's start of work, not from its (slower) interpreter start.
        process = child(config, "each", "-", files[: 4 * (round_ + 1)])
        assert process.stdout is not None
        assert process.stdout.readline() == b"started\n"
        time.sleep(rng.uniform(0.0, 0.1))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate(timeout=120)
        if config.sqlite_path.exists():
            lite = sqlite3.connect(config.sqlite_path)
            try:  # whatever the moment, the file is whole and consistent with its watermark
                assert lite.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
                (highest,) = lite.execute("SELECT coalesce(max(file_id), 0) FROM files").fetchone()
                assert highest == watermark(config.sqlite_path)
            finally:
                lite.close()
    assert kills >= 3
    process = child(config, "each", "-", files)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()
    catch_up_and_compare(config)
    assert len(dump_sqlite(config.sqlite_path)["files"]) == len(files)
