"""Corrections in lake mode: a retraction or a restore is a ledger entry of the lake, with its own
place in the order, applied by every replica in that place; every replica then holds what a fresh
local warehouse holds after ingesting the files that remain, in ledger order (the oracle of
tests/test_corrections.py). A correction that does not apply where it stands is skipped and
recorded alike by every replica, which goes on.

The first tests drive publishers, tailers and the daemon's corrector in this process on a real
lake and real DuckDB files; the last runs two real daemons and corrects over HTTP.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from moneylion.aggregates import verify
from moneylion.config import Config, load_config
from moneylion.corrections import CorrectionRefused
from moneylion.lake.correct import LakeCorrector, publish_correction
from moneylion.lake.publish import LakePublisher
from moneylion.lake.request import CorrectionPending, LakeCorrection
from moneylion.lake.tailer import LakeTailer, lake_for
from moneylion.schema import open_warehouse
from tests.daemon_process import DaemonProcess
from tests.lake_scenario import (
    USERS,
    api_answers,
    drop,
    lake_daemon,
    ledger_rows,
    make_scenario,
    settled,
)
from tests.test_corrections import assert_equals_reference
from tests.test_lake import catch_up, files_of, lake_config, replica, state

__all__ = ["lake_config"]  # the fixture, shared with test_lake.py

CORRECTIONS = "SELECT change_id, action, file_id, reason, rows_out, rows_in FROM corrections"


def agreed(conn: duckdb.DuckDBPyConnection) -> dict[str, list[Any]]:
    """What every replica must hold alike: base tables, aggregates, the ledger with its
    statuses, the corrections (by their change ids) and the entries skipped."""
    return {
        **state(conn),
        "corrections": conn.execute(f"{CORRECTIONS} ORDER BY change_id").fetchall(),
        "quarantine": conn.execute(
            "SELECT lake_version, file_id, reason, message FROM lake_quarantine ORDER BY ALL"
        ).fetchall(),
    }


def by_file_id(conn: duckdb.DuckDBPyConnection, paths: list[Path]) -> dict[int, Path]:
    """Each ledger file of the replica, by its file id: the source file with its bytes."""
    by_sha = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in paths}
    rows = conn.execute("SELECT file_id, sha256 FROM files WHERE sha256 IS NOT NULL").fetchall()
    return {int(file_id): by_sha[sha] for file_id, sha in rows if sha in by_sha}


def overlapped(conn: duckdb.DuckDBPyConnection) -> int:
    """The loaded transactions file whose ids most later files also hold (so retracting it
    makes their rows decide again)."""
    rows = conn.execute(
        "SELECT t.file_id FROM transactions t JOIN transaction_candidates c USING "
        "(transaction_id) WHERE c.file_id > t.file_id GROUP BY 1 ORDER BY count(*) DESC, 1 "
        "LIMIT 1"
    ).fetchall()
    assert rows, "the scenario has no transaction id in two files"
    return int(rows[0][0])


def users_file(conn: duckdb.DuckDBPyConnection) -> int:
    """The first loaded users file (a later one moved some of its users to other countries)."""
    rows = conn.execute(
        "SELECT min(file_id) FROM files WHERE kind = 'users' AND status = 'loaded'"
    ).fetchall()
    return int(rows[0][0])


def ask(action: str, file_id: int, reason: str | None, config: Config) -> LakeCorrection:
    return LakeCorrection(action, file_id, reason, config.top_users_kept, config.reject_line_bytes)


def test_a_retraction_and_a_restore_apply_in_order_on_every_replica_as_files_remaining(
    lake_config: Config, tmp_path: Path
) -> None:
    paths = files_of(tmp_path / "src", seed=21)
    half = len(paths) // 2
    # Two daemons' publishers on one lake; replica b applies one file per transaction.
    a_config, a = replica(lake_config, "a")
    b_config, b = replica(lake_config, "b")
    b_config = b_config.with_overrides(tuning=replace(b_config.tuning, lake_chunk_files=1))
    LakePublisher(lake_for(a_config), a_config).publish_paths(paths[:half], a_config)
    LakePublisher(lake_for(b_config), b_config).publish_paths(paths[half:], b_config)
    catch_up(a, a_config)
    # Daemon a's corrector, its replica applying the ledger in its own thread (as in a daemon).
    tailer = LakeTailer(a.cursor(), a_config)
    tailer.start()
    corrector = LakeCorrector(lake_for(a_config), tailer, a.cursor(), wait_seconds=60)
    try:
        target = overlapped(a)
        retracted = corrector.correct(ask("retract", target, "sent by mistake", a_config))
        assert retracted.file_id == target
        assert str(retracted.status) == "retracted"
        assert retracted.rows_out > 0
        assert retracted.files_changed > 0  # later files' rows took the place of its rows
        assert retracted.change_id == len(ledger_rows(Path(lake_config.lake_uri)))
        # More files after it, then a users file retracted, then the first one restored.
        extra = files_of(tmp_path / "later", seed=22)[:3]
        LakePublisher(lake_for(b_config), b_config).publish_paths(extra, b_config)
        profiles = corrector.correct(ask("retract", users_file(a), "wrong countries", a_config))
        assert profiles.rows_out > 0
        restored = corrector.correct(ask("restore", target, None, a_config))
        assert str(restored.status) == "loaded"
        assert restored.rows_in == retracted.rows_out
        assert restored.change_id > profiles.change_id > retracted.change_id
        with pytest.raises(CorrectionRefused, match="is loaded: restore applies"):
            corrector.correct(ask("restore", target, None, a_config))  # refused here first
        with pytest.raises(CorrectionRefused, match="no file #10000 in the ledger"):
            corrector.correct(ask("retract", 10_000, "no such file", a_config))
    finally:
        tailer.stop()
    catch_up(b, b_config)
    ledger = ledger_rows(Path(lake_config.lake_uri))
    assert [r["correction"] for r in ledger if r["correction"]] == ["retract", "retract", "restore"]
    assert [r["file_id"] for r in ledger] == list(range(1, len(ledger) + 1))  # one order
    assert agreed(a) == agreed(b)
    every = paths + extra
    for n, conn in enumerate((a, b)):
        assert verify(conn) == []
        assert_equals_reference(conn, by_file_id(conn, every), tmp_path / f"reference-{n}")
    # A replica built later, from the lake alone, holds the same.
    c_config, c = replica(lake_config, "c")
    catch_up(c, c_config)
    assert agreed(c) == agreed(a)
    for conn in (a, b, c):
        conn.close()


def test_a_correction_that_does_not_apply_where_it_stands_is_skipped_by_every_replica(
    lake_config: Config, tmp_path: Path
) -> None:
    """Two daemons retract the same file at once: the second entry in the order finds it
    retracted. It is recorded (not applied) on every replica, which goes on with what follows."""
    paths = files_of(tmp_path / "src", seed=23)[:6]
    lake = lake_for(lake_config)
    publisher = LakePublisher(lake, lake_config)
    publisher.publish_paths(paths[:4], lake_config)
    a_config, a = replica(lake_config, "a")
    catch_up(a, a_config)
    target = int(
        a.execute("SELECT min(file_id) FROM files WHERE status = 'loaded'").fetchall()[0][0]
    )
    first = publish_correction(lake, ask("retract", target, "twice", lake_config), key="one")
    again = publish_correction(lake, ask("retract", target, "twice", lake_config), key="one")
    assert again == first  # the same request committed again: found, not added
    second = publish_correction(lake_for(lake_config), ask("retract", target, "me too", a_config))
    gone = publish_correction(lake, ask("restore", first, "a change id", lake_config))
    with pytest.raises(CorrectionRefused, match="no file"):  # beyond the ledger: not committed
        publish_correction(lake, ask("retract", gone + 5, "later", lake_config))
    publisher.publish_paths(paths[4:], lake_config)
    b_config, b = replica(lake_config, "b")
    catch_up(a, a_config)
    catch_up(b, b_config)
    for conn in (a, b):
        skipped = conn.execute(
            "SELECT file_id, reason, message FROM lake_quarantine ORDER BY file_id"
        ).fetchall()
        assert skipped == [
            (
                second,
                "correction_refused",
                f"file #{target} is retracted: retract applies to a file that is loaded",
            ),
            (gone, "correction_refused", f"no file #{first} in the ledger"),
        ]
        assert conn.execute(f"{CORRECTIONS} ORDER BY 1").fetchall()[0][:3] == (
            first,
            "retract",
            target,
        )
        assert verify(conn) == []
    assert agreed(a) == agreed(b)
    assert len(ledger_rows(Path(lake_config.lake_uri))) == len(paths) + 3
    assert_equals_reference(a, by_file_id(a, paths), tmp_path / "reference")
    a.close()
    b.close()


def test_a_correction_not_applied_within_the_wait_is_pending_and_applies_later(
    lake_config: Config, tmp_path: Path
) -> None:
    paths = files_of(tmp_path / "src", seed=24)[:3]
    LakePublisher(lake_for(lake_config), lake_config).publish_paths(paths, lake_config)
    conn = open_warehouse(lake_config)
    tailer = catch_up(conn, lake_config)  # not started: nothing applies what comes next
    corrector = LakeCorrector(lake_for(lake_config), tailer, conn.cursor(), wait_seconds=0.2)
    target = int(conn.execute("SELECT min(file_id) FROM files").fetchall()[0][0])
    with pytest.raises(CorrectionPending) as pending:
        corrector.correct(ask("retract", target, "slow replica", lake_config))
    assert pending.value.change_id == len(paths) + 1
    tailer.catch_up(lake_for(lake_config))
    assert tailer.settled(pending.value.change_id, 0) is not None
    status = conn.execute("SELECT status FROM files WHERE file_id = ?", [target]).fetchall()
    assert status == [("retracted",)]
    assert verify(conn) == []
    conn.close()


def test_a_lake_made_before_corrections_gets_their_columns(
    lake_config: Config, tmp_path: Path
) -> None:
    import pyarrow as pa
    from deltalake import DeltaTable

    from moneylion.lake.tables import CORRECTION_FIELDS, FILES_SCHEMA

    old = tmp_path / "old-lake"
    before = pa.schema([f for f in FILES_SCHEMA if f not in CORRECTION_FIELDS])
    DeltaTable.create(str(old / "files"), before)
    config = lake_config.with_overrides(lake_uri=str(old))
    lake_for(config).create()
    names = {f.name for f in DeltaTable(str(old / "files")).schema().fields}
    assert {f.name for f in CORRECTION_FIELDS} <= names
    paths = files_of(tmp_path / "src", seed=25)[:2]
    LakePublisher(lake_for(config), config).publish_paths(paths, config)
    publish_correction(lake_for(config), ask("retract", 1, "old lake", config))
    conn = open_warehouse(config)
    catch_up(conn, config)
    assert conn.execute("SELECT action, file_id FROM corrections").fetchall() == [("retract", 1)]
    conn.close()


# --- two real daemons, over HTTP -----------------------------------------------------------------


def post(daemon: DaemonProcess, path: str, reason: str | None = None) -> httpx.Response:
    body = {} if reason is None else {"reason": reason}
    return httpx.post(f"http://127.0.0.1:{daemon.port}{path}", json=body, timeout=120.0)


def test_two_daemons_retract_and_restore_over_http_and_every_replica_follows(
    tmp_path: Path,
) -> None:
    lake = tmp_path / "lake"
    scenario = make_scenario(tmp_path / "src", seed=26, files=12, rows=40)
    daemons = [lake_daemon(tmp_path, name, lake) for name in ("a", "b")]
    try:
        for daemon in daemons:
            daemon.start()
        drop([*scenario.shared, *scenario.only[0]], daemons[0].inbox)
        drop(scenario.only[1], daemons[1].inbox)
        settled(daemons, lake)
        files = [r for r in ledger_rows(lake) if r["status"] == "loaded"]
        target = next(r["file_id"] for r in files if r["kind"] == "transactions")
        answer = post(daemons[0], f"/v1/files/{target}/retract", "sent by mistake")
        assert answer.status_code == 200, answer.text
        done = answer.json()
        assert done["status"] == "retracted"
        assert done["rows_out"] > 0
        assert done["change_id"] == len(ledger_rows(lake))  # its place in the lake's order
        settled(daemons, lake)
        assert api_answers(daemons[0], USERS) == api_answers(daemons[1], USERS)
        assert daemons[1].get(f"/v1/files/{target}")["status"] == "retracted"
        refused = post(daemons[1], f"/v1/files/{target}/retract", "again")
        assert refused.status_code == 409, refused.text
        assert post(daemons[1], "/v1/files/9999/retract", "none").status_code == 404
        back = post(daemons[1], f"/v1/files/{target}/restore")
        assert back.status_code == 200, back.text
        assert back.json()["rows_in"] == done["rows_out"]
        settled(daemons, lake)
        assert api_answers(daemons[0], USERS) == api_answers(daemons[1], USERS)
        assert daemons[0].get(f"/v1/files/{target}")["status"] == "loaded"
        codes = [d.stop() for d in daemons]
        assert codes == [0, 0]
    finally:
        for daemon in daemons:
            daemon.close()
    for n, daemon in enumerate(daemons):
        local = load_config(environ={}).with_overrides(
            inbox=daemon.warehouse / "unused", warehouse=daemon.warehouse
        )
        conn = open_warehouse(local)
        assert verify(conn) == []
        assert conn.execute("SELECT count(*) FROM lake_quarantine").fetchall() == [(0,)]
        assert_equals_reference(conn, by_file_id(conn, scenario.all), tmp_path / f"ref-{n}")
        conn.close()
