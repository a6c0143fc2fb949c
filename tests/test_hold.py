"""``max_reject_share``: a file whose refused rows pass the share loads nothing (held: its rejects
and ledger row kept, its bytes set aside in held/).

Every test that ingests ends with ``verify``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import duckdb
import pytest

from moneylion.aggregates import MAINTAINED, verify
from moneylion.batch import ingest_batch, item_of
from moneylion.config import Config, ConfigError, load_config
from moneylion.ingest import ingest_file
from moneylion.ledger import FileStatus
from moneylion.schema import open_warehouse
from tests.conftest import TX_HEADER, USERS_HEADER, write_csv

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
    assert [r.getMessage() for r in caplog.records] == ["file_held"]
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
