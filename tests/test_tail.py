"""Continuations (tail.py) against a real daemon: a part's rejects carry the file's own line
numbers, the whole log dropped again is a duplicate of the whole, and a headerless file with
nothing to continue is refused with its reason. Every test ends with verify."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from moneylion.inbox import set_aside_files
from tests.conftest import TX_COLUMNS
from tests.daemon_process import DaemonProcess, wait_for, warehouse_totals

HEADER = ",".join(TX_COLUMNS) + "\n"
SETTLE = 0.3


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = DaemonProcess(
        tmp_path / "inbox",
        tmp_path / "warehouse",
        settle_seconds=SETTLE,
        env={"MONEYLION_RESCAN_SECONDS": "1"},
    )
    process.start()
    yield process
    process.close()


def rows(first: int, count: int) -> str:
    return "".join(
        f"{n},{n % 7 + 1},2024-03-{n % 28 + 1:02d},{n}.25,deposit\n"
        for n in range(first, first + count)
    )


def append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(text)


def loaded_rows(daemon: DaemonProcess) -> int:
    return sum(int(item["rows_loaded"]) for item in daemon.ledger())


def done_file(daemon: DaemonProcess, name: str) -> Path:
    (found,) = [p for p in set_aside_files(daemon.inbox / "done") if p.name == name]
    return found


def stop_and_verify(daemon: DaemonProcess) -> duckdb.DuckDBPyConnection:
    """Stop the daemon, check verify, and open its warehouse read-only for more checks."""
    assert daemon.stop() == 0
    _, _, differences = warehouse_totals(daemon.warehouse)
    assert differences == []
    return duckdb.connect(str(daemon.warehouse / "moneylion.duckdb"), read_only=True)


def test_a_rejected_row_in_a_later_part_is_numbered_by_the_files_own_lines(
    daemon: DaemonProcess,
) -> None:
    log = daemon.inbox / "events.csv"
    log.write_text(HEADER + rows(1, 20), encoding="utf-8")
    wait_for(lambda: loaded_rows(daemon) == 20, 30, "the first part")
    append(log, rows(21, 5) + "26,1,2024-02-30,1.00,deposit\n" + rows(27, 4))
    wait_for(lambda: loaded_rows(daemon) == 29, 30, "the second part")
    ledger = daemon.ledger()
    assert [(i["part_of"], i["part"]) for i in ledger] == [(None, 1), (ledger[0]["file_id"], 2)]
    part = ledger[1]
    rejects = daemon.get(f"/v1/files/{part['file_id']}/rejects")["items"]
    assert [(r["line"], r["reason"]) for r in rejects] == [(27, "bad_date")]
    lines = done_file(daemon, "events.csv").read_text(encoding="utf-8").splitlines()
    assert lines[27 - 1] == rejects[0]["raw_line"] == "26,1,2024-02-30,1.00,deposit"
    detail = daemon.get(f"/v1/files/{ledger[0]['file_id']}")
    size = done_file(daemon, "events.csv").stat().st_size
    assert detail["bytes_loaded"] == size
    assert [(p["part"], p["offset_start"]) for p in detail["parts"]] == [
        (1, 0),
        (2, len(HEADER + rows(1, 20))),
    ]
    conn = stop_and_verify(daemon)
    try:
        assert conn.execute("SELECT count(*) FROM transactions").fetchone() == (29,)
        whole = conn.execute("SELECT parts, bytes_loaded, sha256 FROM whole_files").fetchall()
        data = done_file(daemon, "events.csv").read_bytes()
        assert whole == [(2, len(data), hashlib.sha256(data).hexdigest())]
    finally:
        conn.close()


def test_the_whole_log_dropped_again_is_a_duplicate_of_the_whole(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    log = daemon.inbox / "log.csv"
    log.write_text(HEADER + rows(1, 10), encoding="utf-8")
    wait_for(lambda: loaded_rows(daemon) == 10, 30, "the first part")
    for first in (11, 21):
        append(log, rows(first, 10))
        wait_for(lambda f=first: loaded_rows(daemon) == f + 9, 30, "the next part")
    data = done_file(daemon, "log.csv").read_bytes()
    again = tmp_path / "again.csv"
    again.write_bytes(data)
    os.rename(again, daemon.inbox / "again.csv")
    wait_for(lambda: "again.csv" in daemon.folder("done"), 30, "the copy to be taken")
    last = daemon.ledger()[-1]
    assert last["sha256"] == hashlib.sha256(data).hexdigest()
    assert loaded_rows(daemon) == 30  # nothing twice
    conn = stop_and_verify(daemon)
    try:
        assert conn.execute("SELECT count(*) FROM transactions").fetchone() == (30,)
    finally:
        conn.close()


def test_a_headerless_file_with_nothing_to_continue_is_refused_as_unknown_header(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    stray = tmp_path / "stray.csv"
    stray.write_text(rows(1, 3), encoding="utf-8")
    os.rename(stray, daemon.inbox / "stray.csv")
    wait_for(lambda: "stray.csv" in daemon.folder("failed"), 30, "the refusal")
    (item,) = daemon.ledger()
    assert (item["status"], item["error_reason"]) == ("failed", "unknown_header")
    conn = stop_and_verify(daemon)
    conn.close()


def test_an_empty_file_closed_before_it_is_written_is_not_taken_empty(
    daemon: DaemonProcess,
) -> None:
    path = daemon.inbox / "later.csv"
    path.touch()  # ": > later.csv": created, opened and closed, still empty
    time.sleep(SETTLE * 4)
    append(path, HEADER + rows(1, 5))
    wait_for(lambda: "later.csv" in daemon.folder("done"), 30, "the file to be taken")
    assert [(i["status"], i["rows_loaded"]) for i in daemon.ledger()] == [("loaded", 5)]
    conn = stop_and_verify(daemon)
    conn.close()
