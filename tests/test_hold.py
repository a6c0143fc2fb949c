"""``max_reject_share``: a file whose refused rows pass the share loads nothing (held: its rejects
and ledger row kept, its bytes set aside in held/), and ``release`` loads it later as the last
file; the warehouse then equals ingesting the same files with the held one last.

Every test that ingests ends with ``verify``.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import duckdb
import pytest

from moneylion import corrections, inbox
from moneylion.aggregates import MAINTAINED, verify
from moneylion.batch import ingest_batch, item_of
from moneylion.config import Config, ConfigError, load_config
from moneylion.corrections import CorrectionRefused
from moneylion.ingest import ingest_file
from moneylion.ledger import FileOutcome, FileStatus
from moneylion.release import release
from moneylion.schema import open_warehouse
from tests.conftest import TX_HEADER, USERS_HEADER, write_csv
from tests.daemon_process import DaemonProcess, logged_events, run_cli, wait_for

SHARE = 0.5
Rows = list[tuple[Any, ...]]
_FILE_REF = re.compile(r"file #(\d+)")


def held_config(config: Config, tmp_path: Path, name: str = "held") -> Config:
    """``config`` with max_reject_share set, on a warehouse of its own under ``tmp_path``."""
    base = tmp_path / name
    changed = config.with_overrides(
        inbox=base / "inbox", warehouse=base / "warehouse", max_reject_share=SHARE
    )
    changed.inbox.mkdir(parents=True)
    changed.warehouse.mkdir(parents=True)
    return changed


def place_in_order(conn: duckdb.DuckDBPyConnection, statuses: tuple[str, ...]) -> dict[int, int]:
    """file id -> its place in the order among the files of ``statuses`` (a released file is
    last: its file_order key is the release's change id)."""
    listed = ", ".join(f"'{status}'" for status in statuses)
    rows = conn.execute(
        "SELECT file_id FROM files LEFT JOIN file_order USING (file_id) "
        f"WHERE status IN ({listed}) ORDER BY coalesce(order_key, file_id), file_id"
    ).fetchall()
    return {file_id: place for place, (file_id,) in enumerate(rows)}


def snapshot(
    conn: duckdb.DuckDBPyConnection, statuses: tuple[str, ...] = ("loaded", "held")
) -> dict[str, Rows]:
    """The base tables, the aggregates, the candidates, the rejects and the ledger's counts of
    the files of ``statuses``, each file id (in messages too) replaced by its place."""
    order = place_in_order(conn, statuses)
    active = f"file_id IN ({', '.join(map(str, order)) or 'NULL'})"

    def place(value: object) -> object:
        return order.get(int(str(value)), -1)

    def rows(sql: str) -> Rows:
        return conn.execute(sql).fetchall()

    def placed(sql: str) -> Rows:
        """Rows whose last column is a file id, and whose text may name files."""
        found = []
        for *values, file_id in rows(sql):
            values = [
                _FILE_REF.sub(lambda m: f"file #{place(m.group(1))}", v)
                if isinstance(v, str)
                else v
                for v in values
            ]
            found.append((*values, place(file_id)))
        return sorted(found, key=repr)

    return {
        "transactions": placed("SELECT * FROM transactions"),
        "users": placed("SELECT user_id, signup_date, country, file_id FROM users"),
        "transaction_candidates": placed(
            "SELECT transaction_id, user_id, transaction_date, amount, transaction_type, "
            f"line_number, raw_line, file_id FROM transaction_candidates WHERE {active}"
        ),
        "user_versions": placed(f"SELECT * FROM user_versions WHERE {active}"),
        "rejects": placed(
            f"SELECT line_number, reason, message, raw_line, file_id FROM rejects WHERE {active}"
        ),
        "ledger": placed(
            "SELECT kind, status, rows_total, rows_loaded, rows_duplicate, rows_rejected, "
            f"error_reason, file_id FROM files WHERE {active}"
        ),
        "user_totals": sorted(rows("SELECT * FROM user_totals")),
        "daily_totals": sorted(rows("SELECT * FROM daily_totals")),
        "top_users": sorted(rows("SELECT * FROM top_users")),
        "country_monthly_totals": sorted(rows(MAINTAINED["country_monthly_totals"]), key=repr),
    }


def one_by_one(config: Config, paths: list[Path]) -> dict[str, Rows]:
    """The snapshot of ``paths`` ingested one after the other into a fresh warehouse."""
    conn = open_warehouse(config)
    try:
        for path in paths:
            ingest_file(conn, path, config)
        assert verify(conn) == []
        return snapshot(conn)
    finally:
        conn.close()


# --- holding -----------------------------------------------------------------------------------

GOOD = ["1,1,2022-01-01,1.00,deposit", "2,1,2022-01-02,2.00,deposit"]
MOSTLY_BAD = ["3,1,2022-01-01,3.00,deposit", "4,1,2022-01-01,x,deposit", "5,1,2022-02-30,1,deposit"]
# One refused row, one duplicate of a stored row: a half refused, not more (duplicates are no
# rejects), so it loads.
HALF = ["1,1,2022-01-01,1.00,deposit", "6,1,2022-01-01,-1,deposit"]


def test_a_file_above_the_share_is_held_and_one_at_the_share_loads(
    config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = held_config(config, tmp_path)
    conn = open_warehouse(config)
    good = ingest_file(conn, write_csv(tmp_path / "good.csv", TX_HEADER, GOOD), config)
    with caplog.at_level(logging.WARNING, logger="moneylion.ledger"):
        bad = ingest_file(conn, write_csv(tmp_path / "bad.csv", TX_HEADER, MOSTLY_BAD), config)
    half = ingest_file(conn, write_csv(tmp_path / "half.csv", TX_HEADER, HALF), config)

    assert good.status is FileStatus.LOADED
    assert half.status is FileStatus.LOADED
    assert (half.rows_duplicate, half.rows_rejected) == (1, 1)
    assert bad.status is FileStatus.HELD
    assert bad.error_reason == "reject_share"
    assert bad.error is not None
    assert "2 of 3 rows refused (66.7%), more than max_reject_share (0.5)" in bad.error
    assert (bad.rows_total, bad.rows_loaded, bad.rows_duplicate, bad.rows_rejected) == (3, 1, 0, 2)
    assert conn.execute(
        "SELECT status, rows_total, rows_rejected, error_reason FROM files WHERE file_id = ?",
        [bad.file_id],
    ).fetchall() == [("held", 3, 2, "reject_share")]
    assert conn.execute(
        "SELECT line_number, reason FROM rejects WHERE file_id = ? ORDER BY 1", [bad.file_id]
    ).fetchall() == [(3, "bad_amount"), (4, "bad_date")]
    assert conn.execute("SELECT transaction_id FROM transactions ORDER BY 1").fetchall() == [
        (1,),
        (2,),
    ]
    assert conn.execute("SELECT count(*) FROM transaction_candidates").fetchall() == [(1,)]
    # Only the warnings: INFO events of the other ingests are captured too when an earlier test
    # in this process left moneylion's loggers at INFO.
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == ["file_held"]
    assert verify(conn) == []
    conn.close()


def test_the_share_is_off_by_default(config: Config, warehouse: duckdb.DuckDBPyConnection) -> None:
    assert config.max_reject_share == 0
    path = write_csv(config.inbox / "bad.csv", TX_HEADER, MOSTLY_BAD)
    assert ingest_file(warehouse, path, config).status is FileStatus.LOADED
    assert verify(warehouse) == []


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "half"])
def test_a_bad_max_reject_share_is_a_clear_error(value: str) -> None:
    with pytest.raises(ConfigError, match="max_reject_share"):
        load_config(environ={"MONEYLION_MAX_REJECT_SHARE": value})


def test_a_batch_with_a_held_file_equals_its_files_one_by_one(
    config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    held = [*MOSTLY_BAD, "7,2,2022-01-03,7.00,purchase", "8,2,2022-01-03,,purchase"]  # 3 of 5
    paths = [
        write_csv(folder / "a.csv", TX_HEADER, GOOD),
        # Held: its id 7 must not hold back the later file's id 7.
        write_csv(folder / "b.csv", TX_HEADER, held),
        write_csv(folder / "c.csv", TX_HEADER, ["7,2,2022-01-03,8.00,purchase"]),
        write_csv(folder / "b_again.csv", TX_HEADER, held),
        write_csv(folder / "u.csv", USERS_HEADER, ["1,2020-01-01,Chile", "2,2020-x-01,Peru"]),
    ]
    batched_config = held_config(config, tmp_path, "batched")
    conn = open_warehouse(batched_config)
    with caplog.at_level(logging.INFO, logger="moneylion.batch"):
        outcomes, left = ingest_batch(
            conn, [item_of(p, batched_config) for p in paths], batched_config
        )
    assert not left
    assert "batch_file_by_file" in [r.getMessage() for r in caplog.records]
    assert [o.status for o in outcomes] == ["loaded", "held", "loaded", "duplicate_file", "loaded"]
    assert outcomes[3].error == f"same bytes as file #{outcomes[1].file_id}, which is held"
    assert verify(conn) == []
    found = snapshot(conn)
    conn.close()
    assert found == one_by_one(held_config(config, tmp_path, "one_by_one"), paths)

    alone_config = held_config(config, tmp_path, "alone")  # a batch of the held file alone
    conn = open_warehouse(alone_config)
    (alone,), _ = ingest_batch(conn, [item_of(paths[1], alone_config)], alone_config)
    assert alone.status is FileStatus.HELD
    assert conn.execute("SELECT count(*) FROM rejects").fetchall() == [(3,)]
    assert conn.execute("SELECT count(*) FROM transactions").fetchall() == [(0,)]
    assert verify(conn) == []
    conn.close()


# --- releasing ---------------------------------------------------------------------------------

USERS = ["1,2020-01-01,France", "2,2020-01-01,Chile"]
TX_FIRST = [
    "10,1,2022-01-01,1.00,deposit",
    "11,2,2022-01-02,2.00,purchase",
    "12,5,2022-01-03,3.00,deposit",  # user 5 has no profile yet
]
# Held (3 of 5 refused): user 1 moves to Japan, user 5 gets a profile.
USERS_HELD = [
    "1,2020-01-01,Japan",
    "5,2021-05-05,Peru",
    "6,2020-13-01,Chad",
    "7,x,Chad",
    "8,2020-01-01,",
]
# Held (3 of 5 refused): its id 100 comes before the later file's in the order, until held.
TX_HELD = [
    "100,2,2022-01-05,5.00,deposit",
    "101,1,2022-01-06,1.50,withdrawal",
    "102,1,2022-01-06,x,deposit",
    "103,1,2022-13-06,1,deposit",
    "104,1,2022-01-06,1,refund",
]
TX_LATER = [
    "100,2,2022-01-05,6.00,deposit",
    "13,1,2022-02-01,4.00,purchase",
    "14,5,2022-02-02,5.00,deposit",
]


def drop_and_ingest(
    conn: duckdb.DuckDBPyConnection, config: Config, name: str, header: str, lines: list[str]
) -> FileOutcome:
    """Ingest a file written into the inbox, then set it aside as the worker does."""
    outcome = ingest_file(conn, write_csv(config.inbox / name, header, lines), config)
    folder = config.held_dir if outcome.status is FileStatus.HELD else config.done_dir
    inbox.move_without_overwrite(outcome.path, inbox.day_folder(folder))
    return outcome


FILES = {
    "users.csv": (USERS_HEADER, USERS),
    "tx_first.csv": (TX_HEADER, TX_FIRST),
    "users_held.csv": (USERS_HEADER, USERS_HELD),
    "tx_held.csv": (TX_HEADER, TX_HELD),
    "tx_later.csv": (TX_HEADER, TX_LATER),
}


def reference(config: Config, tmp_path: Path, names: list[str]) -> dict[str, Rows]:
    """The files ``names`` ingested in that order into a fresh warehouse, nothing held."""
    base = tmp_path / f"reference-{len(names)}"
    fresh = config.with_overrides(
        inbox=base / "inbox", warehouse=base / "warehouse", max_reject_share=0.0
    )
    fresh.inbox.mkdir(parents=True)
    fresh.warehouse.mkdir(parents=True)
    paths = [write_csv(base / name, *FILES[name]) for name in names]
    return one_by_one(fresh, paths)


def test_a_released_file_loads_as_the_last_file_and_the_warehouse_equals_it_ingested_last(
    config: Config, tmp_path: Path
) -> None:
    config = held_config(config, tmp_path)
    conn = open_warehouse(config)
    outcomes = {name: drop_and_ingest(conn, config, name, *FILES[name]) for name in FILES}
    held = [name for name, outcome in outcomes.items() if outcome.status is FileStatus.HELD]
    assert held == ["users_held.csv", "tx_held.csv"]
    assert sorted(p.name for p in inbox.set_aside_files(config.held_dir)) == sorted(held)
    assert verify(conn) == []

    users_id, tx_id = outcomes["users_held.csv"].file_id, outcomes["tx_held.csv"].file_id
    assert users_id is not None
    assert tx_id is not None
    first = release(conn, users_id, config, "checked by hand")
    second = release(conn, str(tx_id), config)
    assert verify(conn) == []

    assert (first.action, first.status, first.rows_in) == ("release", "loaded", 2)
    assert (second.rows_in, second.files) == (1, (tx_id,))
    assert conn.execute(
        "SELECT change_id, action, file_id, reason, rows_in FROM corrections ORDER BY 1"
    ).fetchall() == [
        (first.change_id, "release", users_id, "checked by hand", 2),
        (second.change_id, "release", tx_id, None, 1),
    ]
    assert conn.execute("SELECT * FROM file_order ORDER BY 1").fetchall() == [
        (users_id, first.change_id),
        (tx_id, second.change_id),
    ]
    # The earlier rejects are replaced by the load's: id 100 now conflicts with the later file's.
    assert conn.execute(
        "SELECT line_number, reason FROM rejects WHERE file_id = ? ORDER BY 1", [tx_id]
    ).fetchall() == [
        (2, "conflicts_with_stored"),
        (4, "bad_amount"),
        (5, "bad_date"),
        (6, "unknown_type"),
    ]
    assert conn.execute(
        "SELECT status, rows_loaded, rows_rejected, error_reason FROM files WHERE file_id = ?",
        [tx_id],
    ).fetchall() == [("loaded", 1, 4, None)]
    assert inbox.set_aside_files(config.held_dir) == []
    assert sorted(p.name for p in inbox.set_aside_files(config.done_dir)) == sorted(FILES)

    names = ["users.csv", "tx_first.csv", "tx_later.csv", "users_held.csv", "tx_held.csv"]
    assert snapshot(conn, ("loaded",)) == reference(config, tmp_path, names)

    # The released file has its place in the order: a retraction takes it out from there.
    corrections.retract(conn, tx_id, "after all")
    assert verify(conn) == []
    assert snapshot(conn, ("loaded",)) == reference(config, tmp_path, names[:-1])
    conn.close()


def test_a_release_is_refused_for_a_file_not_held_or_whose_bytes_are_gone(
    config: Config, tmp_path: Path
) -> None:
    config = held_config(config, tmp_path)
    conn = open_warehouse(config)
    loaded = drop_and_ingest(conn, config, "users.csv", *FILES["users.csv"])
    held = drop_and_ingest(conn, config, "tx_held.csv", *FILES["tx_held.csv"])
    assert held.file_id is not None
    before = snapshot(conn)

    with pytest.raises(CorrectionRefused, match="is loaded: release applies to a file that is"):
        release(conn, loaded.file_id or 0, config)
    with pytest.raises(CorrectionRefused, match="no file #999"):
        release(conn, 999, config)
    with pytest.raises(CorrectionRefused, match="is held: retract applies to a file that is"):
        corrections.retract(conn, held.file_id, "never mind")
    (kept,) = inbox.set_aside_files(config.held_dir)
    content = kept.read_bytes()
    kept.write_bytes(content.replace(b"5.00", b"6.00"))  # other bytes, same name and size
    with pytest.raises(CorrectionRefused, match="its bytes are not in"):
        release(conn, held.file_id, config)
    kept.unlink()
    with pytest.raises(CorrectionRefused, match="put them back there to release it"):
        release(conn, held.file_id, config)
    assert snapshot(conn) == before

    elsewhere = inbox.day_folder(config.held_dir).with_name("2020-01-01")  # any day folder
    elsewhere.mkdir()
    (elsewhere / "tx_held.csv").write_bytes(content)
    assert release(conn, held.file_id, config).rows_in == 2
    assert verify(conn) == []
    conn.close()


# --- the daemon --------------------------------------------------------------------------------


@pytest.mark.slow  # a real `moneylion serve` child
def test_the_daemon_holds_a_mostly_bad_file_in_held_and_releases_it_over_http(
    tmp_path: Path,
) -> None:
    daemon = DaemonProcess(
        tmp_path / "inbox",
        tmp_path / "warehouse",
        settle_seconds=0.1,
        env={"MONEYLION_MAX_REJECT_SHARE": str(SHARE)},
    )
    daemon.inbox.mkdir()
    daemon.start()
    try:
        write_csv(daemon.inbox / "good.csv", TX_HEADER, GOOD)
        wait_for(lambda: daemon.folder("done") == ["good.csv"], 30, "good.csv in done/")
        bad = write_csv(tmp_path / "bad.csv", TX_HEADER, MOSTLY_BAD)

        # Checked first, by the daemon (over HTTP, and by the command line through it).
        answer = daemon.client.post(
            "/v1/checks", params={"name": "bad.csv"}, content=bad.read_bytes()
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["outcome"] == "would_hold"
        shown = run_cli("check", str(bad), "--json", env=daemon.environ())
        assert shown.returncode == 1, shown.stderr
        assert json.loads(shown.stdout)["rows"] == answer.json()["rows"]

        shutil.move(bad, daemon.inbox / "bad.csv")
        wait_for(lambda: daemon.folder("held") == ["bad.csv"], 30, "bad.csv in held/")
        (row,) = [f for f in daemon.ledger() if f["name"] == "bad.csv"]
        assert (row["status"], row["error_reason"], row["rows_rejected"]) == (
            "held",
            "reject_share",
            2,
        )
        assert daemon.get(f"/v1/files/{row['file_id']}/rejects")["total"] == 2
        assert daemon.get("/v1/users/1/summary")["transaction_count"] == 2

        released = daemon.client.post(f"/v1/files/{row['file_id']}/release", json={})
        assert released.status_code == 200, released.text
        assert (released.json()["status"], released.json()["rows_in"]) == ("loaded", 1)
        assert daemon.folder("held") == []
        assert daemon.folder("done") == ["bad.csv", "good.csv"]
        assert daemon.get(f"/v1/files/{row['file_id']}")["status"] == "loaded"
        assert daemon.get("/v1/users/1/summary")["transaction_count"] == 3

        again = run_cli("release", str(row["file_id"]), env=daemon.environ())
        assert again.returncode == 1
        assert "is loaded: release applies to a file that is held" in again.stderr
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert "file_held" in [event["event"] for event in logged_events(daemon.warehouse)]
    config = load_config(environ={}).with_overrides(inbox=daemon.inbox, warehouse=daemon.warehouse)
    conn = open_warehouse(config)
    assert conn.execute("SELECT action FROM corrections").fetchall() == [("release",)]
    assert verify(conn) == []
    conn.close()
