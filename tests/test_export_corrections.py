"""SQLite export after corrections: a retraction or a restore since the last export brings the
SQLite file to what a full export of the same warehouse holds (rows out, totals, ledger rows),
its watermark reaches the correction's change id, and a crash on the way leaves the old file or
the new one whole.

Both ways are held to a full export: the increment that copies what the corrections touched
(``export/corrected.py``), and the full rebuild it leaves larger ones to (``REBUILD``: no
correction is small enough). Every test that ingests ends with ``verify``.
"""

from __future__ import annotations

import dataclasses
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest

from moneylion import corrections, ledger
from moneylion.aggregates import verify
from moneylion.api.queries import user_summary
from moneylion.api.replica import SqliteReplica
from moneylion.config import Config
from moneylion.db import utc_now
from moneylion.export import close_sqlite, export_full, export_new, full
from moneylion.ingest import ingest_file
from moneylion.schema import open_warehouse
from moneylion.source import stage
from moneylion.tuning import DEFAULT, Tuning
from tests.conftest import TX_HEADER, USERS_HEADER, write_csv
from tests.test_export import (  # noqa: F401 (close_exporter: an autouse fixture)
    assert_equals_full_export,
    close_exporter,
    dump_sqlite,
    random_files,
)
from tests.test_export_crash import catch_up_and_compare, load_and_export, watermark

INCREMENT = DEFAULT
REBUILD = dataclasses.replace(DEFAULT, large_increment_rows=0)
WAYS = pytest.mark.parametrize("tuning", [INCREMENT, REBUILD], ids=["increment", "rebuild"])


def loaded_transaction_files(conn: duckdb.DuckDBPyConnection) -> list[int]:
    """The transactions files whose rows are in the warehouse, in order."""
    rows = conn.execute(
        "SELECT file_id FROM files WHERE kind = 'transactions' AND status = 'loaded' "
        "AND rows_loaded > 0 ORDER BY file_id"
    ).fetchall()
    return [int(row[0]) for row in rows]


def sqlite_rows(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    lite = sqlite3.connect(path)
    try:
        return lite.execute(sql, params).fetchall()
    finally:
        lite.close()


def replace_with(
    conn: duckdb.DuckDBPyConnection,
    file_id: int,
    spares: list[Path],
    tmp_path: Path,
    config: Config,
) -> int | None:
    """Replace ``file_id`` by the first spare file of its kind (taken from ``spares``)."""
    (kind,) = conn.execute("SELECT kind FROM files WHERE file_id = ?", [file_id]).fetchall()[0]
    header = USERS_HEADER if kind == "users" else TX_HEADER
    spare = next((path for path in spares if path.read_text().startswith(header)), None)
    if spare is None:
        return None
    spares.remove(spare)
    done = corrections.replace(conn, file_id, stage(spare, tmp_path), config, "new bytes")
    return done.change_id


def exported_rows_of(
    conn: duckdb.DuckDBPyConnection, path: Path, file_id: int
) -> set[tuple[Any, ...]]:
    """The SQLite file's transactions that file ``file_id`` loaded (the export has no file_id)."""
    ids = {
        row[0]
        for row in conn.execute(
            "SELECT transaction_id FROM transactions WHERE file_id = ?", [file_id]
        ).fetchall()
    }
    return {row for row in dump_sqlite(path)["transactions"] if row[0] in ids}


@WAYS
def test_a_retraction_and_a_restore_since_the_last_export_are_exported_whole(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, tuning: Tuning
) -> None:
    for path in random_files(tmp_path / "files", 9, seed=21):
        ingest_file(warehouse, path)
    export_new(warehouse, config.sqlite_path)
    retracted = loaded_transaction_files(warehouse)[1]
    rows = exported_rows_of(warehouse, config.sqlite_path, retracted)
    assert rows

    done = corrections.retract(warehouse, retracted, "sent by mistake")
    result = export_new(warehouse, config.sqlite_path, tuning=tuning)
    assert (result.full, result.last_file_id) == (tuning is REBUILD, done.change_id)
    assert watermark(config.sqlite_path) == done.change_id
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert sqlite_rows(
        config.sqlite_path, "SELECT status, rows_loaded FROM files WHERE file_id = ?", (retracted,)
    ) == [("retracted", 0)]
    assert not rows & set(dump_sqlite(config.sqlite_path)["transactions"])

    again = corrections.restore(warehouse, retracted)
    result = export_new(warehouse, config.sqlite_path, tuning=tuning)
    assert (result.full, result.last_file_id) == (tuning is REBUILD, again.change_id)
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert rows <= set(dump_sqlite(config.sqlite_path)["transactions"])
    assert verify(warehouse) == []


@WAYS
def test_an_export_after_a_correction_is_up_to_date_and_files_after_it_are_increments(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, tuning: Tuning
) -> None:
    files = random_files(tmp_path / "files", 8, seed=22)
    for path in files[:5]:
        ingest_file(warehouse, path)
    export_new(warehouse, config.sqlite_path)
    done = corrections.retract(warehouse, loaded_transaction_files(warehouse)[0], "wrong day")
    export_new(warehouse, config.sqlite_path, tuning=tuning)

    # The watermark is the correction's change id: the file checked is the last one before it.
    result = export_new(warehouse, config.sqlite_path)
    assert not result.full
    assert not result.exported_anything
    assert result.last_file_id == done.change_id
    for path in files[5:]:
        ingest_file(warehouse, path)
    result = export_new(warehouse, config.sqlite_path)
    assert not result.full
    assert (result.first_file_id, result.last_file_id) == (done.change_id, done.change_id + 3)
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


@WAYS
def test_files_and_corrections_in_one_range_are_exported_together(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, tuning: Tuning
) -> None:
    files = random_files(tmp_path / "files", 12, seed=23)
    for path in files[:4]:
        ingest_file(warehouse, path)
    export_new(warehouse, config.sqlite_path)
    ingest_file(warehouse, files[4])
    first, second, third = loaded_transaction_files(warehouse)[:3]
    corrections.retract(warehouse, first, "duplicate upload")
    ingest_file(warehouse, files[5])
    corrections.retract(warehouse, second, "duplicate upload")
    corrections.restore(warehouse, first)
    for path in files[6:9]:
        ingest_file(warehouse, path)
    newest = loaded_transaction_files(warehouse)[-1]
    corrections.retract(warehouse, newest, "never exported, taken out again")
    corrections.retract(warehouse, third, "the last correction")

    result = export_new(warehouse, config.sqlite_path, tuning=tuning)
    assert result.full is (tuning is REBUILD)
    assert_equals_full_export(warehouse, config.sqlite_path)
    for path in files[9:]:  # the small increments' sums after it
        ingest_file(warehouse, path)
        assert not export_new(warehouse, config.sqlite_path).full
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


@WAYS
def test_a_retracted_users_file_leaves_the_exported_users_and_country_totals(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, tuning: Tuning
) -> None:
    ingest_file(warehouse, write_csv(tmp_path / "u1.csv", USERS_HEADER, ["1,2022-01-02,Japan"]))
    moved = ingest_file(
        warehouse,
        write_csv(tmp_path / "u2.csv", USERS_HEADER, ["1,2022-01-02,France", "2,2022-02-03,Kenya"]),
    )
    ingest_file(
        warehouse,
        write_csv(
            tmp_path / "t.csv",
            TX_HEADER,
            ["1,1,2022-03-01,10.50,deposit", "2,2,2022-03-02,4.25,purchase"],
        ),
    )
    export_new(warehouse, config.sqlite_path)
    assert moved.file_id is not None

    corrections.retract(warehouse, moved.file_id, "wrong countries")
    assert export_new(warehouse, config.sqlite_path, tuning=tuning).full is (tuning is REBUILD)
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert dump_sqlite(config.sqlite_path)["users"] == [(1, "2022-01-02", "Japan")]
    assert sorted(
        sqlite_rows(
            config.sqlite_path,
            "SELECT country, tx_count, total_amount FROM country_monthly_totals",
        ),
        key=repr,
    ) == [("Japan", 1, "10.50"), (None, 1, "4.25")]

    corrections.restore(warehouse, moved.file_id)
    export_new(warehouse, config.sqlite_path, tuning=tuning)
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert dump_sqlite(config.sqlite_path)["users"] == [
        (1, "2022-01-02", "France"),
        (2, "2022-02-03", "Kenya"),
    ]
    assert verify(warehouse) == []


@WAYS
def test_a_replacement_since_the_last_export_is_exported_whole(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, tuning: Tuning
) -> None:
    for path in random_files(tmp_path / "files", 7, seed=29):
        ingest_file(warehouse, path)
    export_new(warehouse, config.sqlite_path)
    old = loaded_transaction_files(warehouse)[1]
    rows = exported_rows_of(warehouse, config.sqlite_path, old)
    spares = random_files(tmp_path / "spares", 3, seed=30)  # ids from 1 again: conflicts

    change_id = replace_with(warehouse, old, spares, tmp_path, config)
    result = export_new(warehouse, config.sqlite_path, tuning=tuning)
    assert (result.full, result.last_file_id) == (tuning is REBUILD, change_id)
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert sqlite_rows(
        config.sqlite_path, "SELECT status FROM files WHERE file_id = ?", (old,)
    ) == [("replaced",)]
    assert not rows & set(dump_sqlite(config.sqlite_path)["transactions"])
    assert verify(warehouse) == []


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_any_mix_of_files_corrections_and_exports_equals_a_full_export(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    waiting = random_files(tmp_path / "files", 18, seed=seed)
    spares = random_files(tmp_path / "spares", 6, seed=seed + 100)
    exports = 0
    for _ in range(40):
        draw = rng.random()
        loaded = [
            row[0]
            for row in warehouse.execute(
                "SELECT file_id FROM files WHERE status = 'loaded' ORDER BY file_id"
            ).fetchall()
        ]
        retracted = [
            row[0]
            for row in warehouse.execute(
                "SELECT file_id FROM files WHERE status = 'retracted' ORDER BY file_id"
            ).fetchall()
        ]
        if waiting and draw < 0.35:
            ingest_file(warehouse, waiting.pop(0))
        elif loaded and draw < 0.5:
            corrections.retract(warehouse, rng.choice(loaded), "drawn")
        elif retracted and draw < 0.62:
            corrections.restore(warehouse, rng.choice(retracted))
        elif loaded and spares and draw < 0.7:
            replace_with(warehouse, rng.choice(loaded), spares, tmp_path, config)
        else:  # every way: the targeted increment, the rebuild, the side file of new rows
            rows = rng.choice([0, 60, DEFAULT.large_increment_rows])
            tuning = dataclasses.replace(DEFAULT, large_increment_rows=rows)
            export_new(warehouse, config.sqlite_path, tuning=tuning)
            assert_equals_full_export(warehouse, config.sqlite_path)
            exports += 1
    export_new(warehouse, config.sqlite_path)
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert exports >= 5
    assert verify(warehouse) == []


def test_a_user_whose_totals_left_gets_them_back_from_a_later_small_increment(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    only = ingest_file(
        warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, ["1,7,2022-01-01,5,deposit"])
    )
    ingest_file(warehouse, write_csv(tmp_path / "b.csv", TX_HEADER, ["2,8,2022-01-02,3,purchase"]))
    export_new(warehouse, config.sqlite_path)  # user 7 in the base: the exporter knows it
    assert only.file_id is not None
    corrections.retract(warehouse, only.file_id, "user 7's only file")
    assert not export_new(warehouse, config.sqlite_path).full
    assert sqlite_rows(config.sqlite_path, "SELECT 1 FROM user_totals WHERE user_id = 7") == []

    ingest_file(warehouse, write_csv(tmp_path / "c.csv", TX_HEADER, ["3,7,2022-01-03,2,deposit"]))
    assert not export_new(warehouse, config.sqlite_path).full
    assert sqlite_rows(
        config.sqlite_path, "SELECT tx_count, total_amount FROM user_totals WHERE user_id = 7"
    ) == [(1, "2.00")]
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


def test_a_correction_the_increment_does_not_know_is_exported_by_a_full_rebuild(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    for path in random_files(tmp_path / "files", 4, seed=28):
        ingest_file(warehouse, path)
    export_new(warehouse, config.sqlite_path)
    # An action of a later kind (a release brings rows of its own): only its row is needed here.
    (change_id,) = ledger.next_file_ids(warehouse, 1)
    warehouse.execute(
        "INSERT INTO corrections (change_id, action, file_id, made_at) VALUES (?, 'release', 1, ?)",
        [change_id, utc_now()],
    )
    result = export_new(warehouse, config.sqlite_path)
    assert (result.full, result.last_file_id) == (True, change_id)
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


def test_the_replica_answers_from_the_export_once_it_holds_the_correction(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    a = ingest_file(
        warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, ["1,7,2022-01-01,5,deposit"])
    )
    ingest_file(warehouse, write_csv(tmp_path / "b.csv", TX_HEADER, ["2,7,2022-01-02,3,purchase"]))
    export_new(warehouse, config.sqlite_path)
    assert a.file_id is not None
    done = corrections.retract(warehouse, a.file_id, "test file")
    replica = SqliteReplica(config.sqlite_path)
    try:
        assert replica.user_summary(7, done.change_id) == (False, None)  # not exported yet
        export_new(warehouse, config.sqlite_path)
        answered, summary = replica.user_summary(7, done.change_id)
        assert answered
        assert summary == user_summary(warehouse.cursor(), 7)
        assert summary is not None
        assert summary.tx_count == 1
    finally:
        replica.close()
    assert verify(warehouse) == []


def test_an_export_holding_a_correction_is_rebuilt_for_a_warehouse_without_it(
    warehouse: duckdb.DuckDBPyConnection, config: Config, tmp_path: Path
) -> None:
    files = random_files(tmp_path / "files", 5, seed=24)
    for path in files:
        ingest_file(warehouse, path)
    corrections.retract(warehouse, loaded_transaction_files(warehouse)[0], "test")
    export_new(warehouse, config.sqlite_path)

    # The same files (the file before the watermark has the same bytes), not the correction.
    other_config = config.with_overrides(warehouse=tmp_path / "other")
    other_config.warehouse.mkdir()
    other = open_warehouse(other_config)
    try:
        for path in files:
            ingest_file(other, path)
        result = export_new(other, config.sqlite_path)
        assert result.full
        assert_equals_full_export(other, config.sqlite_path)
        assert verify(other) == []
    finally:
        other.close()
    assert verify(warehouse) == []


def test_a_full_export_in_two_threads_is_one_snapshot_when_a_correction_commits_between(
    warehouse: duckdb.DuckDBPyConnection,
    config: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for path in random_files(tmp_path / "files", 6, seed=26):
        ingest_file(warehouse, path)
    before = tmp_path / "before.sqlite"
    export_full(warehouse, before)
    retracted = loaded_transaction_files(warehouse)[0]
    marks: list[tuple[int, str | None]] = []
    high_mark = full.high_mark

    def correction_between(cur: duckdb.DuckDBPyConnection) -> tuple[int, str | None]:
        if marks:  # the thread's snapshot: a correction commits before it reads
            corrections.retract(warehouse.cursor(), retracted, "between the snapshots")
        marks.append(high_mark(cur))
        return marks[-1]

    monkeypatch.setattr(full, "high_mark", correction_between)
    two_threads = dataclasses.replace(DEFAULT, parallel_min_transactions=1)
    export_full(warehouse, config.sqlite_path, tuning=two_threads)
    monkeypatch.undo()

    assert len(marks) == 2
    assert marks[0] != marks[1]
    assert dump_sqlite(config.sqlite_path) == dump_sqlite(before)
    assert export_new(warehouse, config.sqlite_path).last_file_id == marks[1][0]
    assert_equals_full_export(warehouse, config.sqlite_path)
    assert verify(warehouse) == []


# A child process: apply a correction (its DuckDB commit), then export (``rebuild``: by a full
# export); SIGKILL itself when the exporter reaches the named step.
CHILD = r"""
import dataclasses, os, signal, sys
from moneylion import corrections, export
from moneylion.export import outcome
from moneylion.config import load_config
from moneylion.schema import open_warehouse

warehouse, inbox, way, action, file_id, point = sys.argv[1:]
config = load_config(environ={}).with_overrides(warehouse=warehouse, inbox=inbox)
if way == "rebuild":
    config = config.with_overrides(
        tuning=dataclasses.replace(config.tuning, large_increment_rows=0)
    )

def die(reached):
    if reached == point:
        os.kill(os.getpid(), signal.SIGKILL)

conn = open_warehouse(config)
getattr(corrections, action)(conn, int(file_id), "crash test")
outcome.fault_hook = die
export.export_new(conn, config.sqlite_path, tuning=config.tuning)
conn.close()
"""


@pytest.mark.parametrize(
    ("way", "point", "committed"),
    [
        ("increment", "sqlite_begun", False),
        ("increment", "rows_written", False),
        ("increment", "before_commit", False),
        ("increment", "committed", True),
        ("rebuild", "rows_written", False),
        ("rebuild", "aside_written", False),
        ("rebuild", "before_rename", False),
    ],
)
@pytest.mark.parametrize("action", ["retract", "restore"])
def test_an_export_killed_after_a_correction_leaves_one_whole_file_then_catches_up(
    config: Config, tmp_path: Path, action: str, way: str, point: str, committed: bool
) -> None:
    load_and_export(config, random_files(tmp_path / "files", 7, seed=27))
    conn = open_warehouse(config)
    try:
        file_id = loaded_transaction_files(conn)[1]
        if action == "restore":
            corrections.retract(conn, file_id, "to be restored")
            export_new(conn, config.sqlite_path)
    finally:
        conn.close()
        close_sqlite()  # the exporter that resumes is a new process
    before = dump_sqlite(config.sqlite_path)

    args = [str(config.warehouse), str(config.inbox), way, action, str(file_id), point]
    process = subprocess.run(
        [sys.executable, "-c", CHILD, *args], capture_output=True, timeout=120, check=False
    )
    assert process.returncode == -signal.SIGKILL, process.stderr.decode()

    if committed:  # the new file whole: nothing left to export
        conn = open_warehouse(config)
        try:
            assert not export_new(conn, config.sqlite_path).exported_anything
        finally:
            conn.close()
    else:  # the old file whole
        assert dump_sqlite(config.sqlite_path) == before
    catch_up_and_compare(config)
    assert sorted(path.name for path in config.warehouse.glob("moneylion.sqlite.*")) == []
