"""Corrections (retract, restore): the warehouse after any mix of files and corrections equals
the one built by ingesting the files that remain, in ledger order, into a fresh warehouse.

The property test draws files with every kind of row the rules decide (duplicates, conflicts,
orphans, users that move, bad rows), ingests them through every ladder, and interleaves
retractions and restores; the reference is built from scratch from the files left. Every run
ends with ``verify``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from tempfile import TemporaryDirectory

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

from moneylion import corrections, ledger
from moneylion.aggregates import MAINTAINED, verify
from moneylion.api import create_app
from moneylion.batch import ingest_batch, item_of
from moneylion.config import Config
from moneylion.corrections import CorrectionRefused
from moneylion.ingest import ingest_file
from moneylion.ledger import FileStatus
from moneylion.source import stage
from tests.conftest import TEST_CLIENT_HOST, TX_HEADER, USERS_HEADER, write_csv
from tests.daemon_process import run_cli_on
from tests.test_properties import LADDERS_TRIED, file_sets, fresh, write_files

Rows = list[tuple[object, ...]]
_FILE_REF = re.compile(r"file #(\d+)")


def snapshot(conn: duckdb.DuckDBPyConnection, order: dict[int, int]) -> dict[str, Rows]:
    """Everything the invariant covers, file ids replaced by their place among the active files
    (``order``: file id -> place), rows sorted."""

    def place(value: object) -> object:
        return order.get(int(value), -1) if value is not None else None  # type: ignore[arg-type]

    def rows(sql: str) -> Rows:
        return conn.execute(sql).fetchall()

    active = f"file_id IN ({', '.join(map(str, order)) or 'NULL'})"
    rejects = []
    for file_id, line, reason, message, raw in rows(
        f"SELECT file_id, line_number, reason, message, raw_line FROM rejects WHERE {active}"
    ):
        message = _FILE_REF.sub(lambda m: f"file #{place(m.group(1))}", message)
        # A row that had loaded when its file came keeps no line: rejected later, at line 0.
        rejects.append((place(file_id), line, reason, message, raw) if line else None)
        if not line:
            rejects[-1] = (place(file_id), "?", reason, message, "?")
    return {
        "transactions": sorted(
            (*row[:-1], place(row[-1])) for row in rows("SELECT * FROM transactions")
        ),
        "users": sorted(
            (*row[:3], place(row[3]))
            for row in rows("SELECT user_id, signup_date, country, file_id FROM users")
        ),
        "user_totals": sorted(rows("SELECT * FROM user_totals")),
        "daily_totals": sorted(rows("SELECT * FROM daily_totals")),
        "top_users": sorted(rows("SELECT * FROM top_users")),
        "country_monthly_totals": sorted(rows(MAINTAINED["country_monthly_totals"]), key=repr),
        "rejects": sorted(rejects, key=repr),
        "ledger": sorted(
            (place(row[0]), *row[1:])
            for row in rows(
                "SELECT file_id, kind, rows_loaded, rows_duplicate, rows_rejected FROM files "
                f"WHERE {active}"
            )
        ),
    }


def active_order(conn: duckdb.DuckDBPyConnection) -> dict[int, int]:
    """The files whose rows count (status loaded), by their place in the order (a replacement
    takes the place of the file it replaced: file_order)."""
    ids = [
        r[0]
        for r in conn.execute(
            "SELECT file_id FROM files LEFT JOIN file_order USING (file_id) "
            "WHERE status = 'loaded' ORDER BY coalesce(order_key, file_id), file_id"
        ).fetchall()
    ]
    return {file_id: place for place, file_id in enumerate(ids)}


def without_line_zero(found: dict[str, Rows], reference: dict[str, Rows]) -> None:
    """A reject at line 0 (its row's line was not kept) stands for the reference's reject of the
    same file, reason and message at its real line."""
    loose = [r for r in found["rejects"] if r[1] == "?"]
    for r in loose:
        match = next((x for x in reference["rejects"] if x[0] == r[0] and x[2:4] == r[2:4]), None)
        assert match is not None, r
        reference["rejects"].remove(match)
        found["rejects"].remove(r)


def assert_equals_reference(
    conn: duckdb.DuckDBPyConnection, paths: dict[int, Path], folder: Path, kept: int = 1000
) -> None:
    order = active_order(conn)
    found = snapshot(conn, order)
    config, ref = fresh(folder)
    config = config.with_overrides(top_users_kept=kept)
    for file_id in order:  # in their order
        ingest_file(ref, paths[file_id], config)
    reference = snapshot(ref, active_order(ref))
    assert verify(ref, top_users_kept=kept) == []
    ref.close()
    without_line_zero(found, reference)
    for table in found:
        assert found[table] == reference[table], table


@pytest.mark.slow  # a property test: hypothesis runs it many times
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    files=file_sets(ids=8),  # few ids: most are shared, the cross-file rules decide them
    spares=file_sets(ids=8),  # the replacements
    steps=st.lists(
        st.tuples(
            st.sampled_from(["ingest", "batch", "retract", "restore", "replace"]),
            st.integers(0, 20),
        ),
        max_size=14,
    ),
    ladder=st.sampled_from(sorted(LADDERS_TRIED)),
    seed=st.randoms(use_true_random=False),
    kept=st.sampled_from([1, 2, 3, 1000]),  # a short top list: users fall out of it and in
)
def test_retractions_and_restores_equal_the_remaining_files_from_scratch(
    files: list[tuple[str, list[str]]],
    spares: list[tuple[str, list[str]]],
    steps: list[tuple[str, int]],
    ladder: str,
    seed: random.Random,
    kept: int,
) -> None:
    seed.shuffle(files)
    with TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config, conn = fresh(folder / "corrected")
        config = config.with_overrides(top_users_kept=kept)
        waiting = write_files(folder, files)
        (folder / "spares").mkdir()
        replacements = dict(zip(write_files(folder / "spares", spares), spares, strict=True))
        paths: dict[int, Path] = {}

        def replace_with_a_spare(pick: int) -> None:
            """A loaded file replaced by a spare of its kind (bytes the ledger does not have)."""
            loaded = conn.execute(
                "SELECT file_id, kind FROM files WHERE status = 'loaded' ORDER BY file_id"
            ).fetchall()
            if not loaded:
                return
            file_id, kind = loaded[pick % len(loaded)]
            spare = next((p for p, (k, _) in replacements.items() if k == kind), None)
            if spare is None:
                return
            del replacements[spare]
            staged = stage(spare, folder)
            if ledger.known(conn, [staged.sha256]):  # the same bytes as a file in the ledger
                with pytest.raises(CorrectionRefused, match="already file"):
                    corrections.replace(conn, file_id, staged, config)
                return
            done = corrections.replace(conn, file_id, staged, config)
            assert done.by_file_id is not None
            paths[done.by_file_id] = spare

        def ingest_next() -> None:
            path = waiting.pop(0)
            outcome = ingest_file(conn, path, config, ladders=LADDERS_TRIED[ladder])
            if outcome.committed:
                paths[outcome.file_id] = path

        def ingest_batch_of(count: int) -> None:
            """The next ``count`` files in one commit (the daemon's way for small files)."""
            taken, waiting[:] = waiting[:count], waiting[count:]
            items = [item_of(path, config) for path in taken]
            outcomes, left = ingest_batch(conn, items, config)
            assert not left
            for outcome, path in zip(outcomes, taken, strict=True):
                if outcome.committed:
                    paths[outcome.file_id] = path

        for action, pick in steps:
            if action == "ingest":
                if waiting:
                    ingest_next()
                continue
            if action == "batch":
                if waiting:
                    ingest_batch_of(1 + pick % 3)
                continue
            if action == "replace":
                replace_with_a_spare(pick)
                assert verify(conn, top_users_kept=kept) == []
                continue
            wanted = FileStatus.LOADED if action == "retract" else FileStatus.RETRACTED
            candidates = [
                r[0]
                for r in conn.execute(
                    "SELECT file_id FROM files WHERE status = ? AND file_id IN "
                    f"({', '.join(map(str, paths)) or 'NULL'}) ORDER BY file_id",
                    [str(wanted)],
                ).fetchall()
            ]
            if not candidates:
                continue
            target = candidates[pick % len(candidates)]
            if action == "retract":
                corrections.retract(conn, target, "drawn", top_users_kept=kept)
            else:
                corrections.restore(conn, target, top_users_kept=kept)
            assert verify(conn, top_users_kept=kept) == []
        while waiting:
            ingest_next()
        assert verify(conn, top_users_kept=kept) == []
        assert_equals_reference(conn, paths, folder / "reference", kept)
        conn.close()


# --- examples ---------------------------------------------------------------------------------

TX = [
    "1,1,2024-01-01,10.00,deposit",
    "2,2,2024-01-02,5.00,purchase",
    "3,3,2024-02-01,1.00,deposit",
]
TX_LATER = [
    "1,1,2024-01-01,10.00,deposit",  # duplicate of the first file's
    "2,2,2024-01-02,7.00,purchase",  # conflicts with the first file's
    "4,1,2024-03-01,2.50,withdrawal",
]


def test_a_retracted_file_takes_its_rows_out_and_later_rows_take_their_place(
    warehouse: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    first = ingest_file(warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, TX))
    later = ingest_file(warehouse, write_csv(tmp_path / "b.csv", TX_HEADER, TX_LATER))
    assert (later.rows_loaded, later.rows_duplicate, later.rows_rejected) == (1, 1, 1)

    done = corrections.retract(warehouse, first.file_id, "sent by mistake")
    assert (done.rows_out, done.rows_in, done.files_changed) == (3, 2, 1)
    rows = warehouse.execute(
        "SELECT transaction_id, amount, file_id FROM transactions ORDER BY 1"
    ).fetchall()
    assert [(r[0], str(r[1]), r[2]) for r in rows] == [
        (1, "10.00", later.file_id),
        (2, "7.00", later.file_id),
        (4, "2.50", later.file_id),
    ]
    assert warehouse.execute("SELECT count(*) FROM rejects").fetchall() == [(0,)]
    ledger = warehouse.execute(
        "SELECT file_id, status, rows_loaded, rows_duplicate, rows_rejected FROM files ORDER BY 1"
    ).fetchall()
    assert ledger == [(first.file_id, "retracted", 0, 0, 0), (later.file_id, "loaded", 3, 0, 0)]
    reason = warehouse.execute("SELECT action, reason FROM corrections").fetchall()
    assert reason == [("retract", "sent by mistake")]
    assert verify(warehouse) == []

    corrections.restore(warehouse, first.file_id)
    assert warehouse.execute(
        "SELECT line_number, reason FROM rejects WHERE file_id = ?", [later.file_id]
    ).fetchall() == [(3, "conflicts_with_stored")]
    assert verify(warehouse) == []


def test_the_same_bytes_dropped_after_a_retraction_are_seen_and_not_loaded(
    warehouse: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    path = write_csv(tmp_path / "a.csv", TX_HEADER, TX)
    first = ingest_file(warehouse, path)
    corrections.retract(warehouse, first.sha256 or "", "test file")
    again = ingest_file(warehouse, write_csv(tmp_path / "again.csv", TX_HEADER, TX))
    assert again.seen_before
    assert again.status is FileStatus.DUPLICATE_FILE
    assert again.error_reason == "retracted"
    assert again.error == f"same bytes as file #{first.file_id}, which is retracted"
    assert warehouse.execute("SELECT count(*) FROM transactions").fetchall() == [(0,)]
    corrections.restore(warehouse, first.file_id)
    assert warehouse.execute("SELECT count(*) FROM transactions").fetchall() == [(3,)]
    assert verify(warehouse) == []


def test_a_users_file_retracted_gives_each_profile_back_its_previous_version(
    warehouse: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    ingest_file(warehouse, write_csv(tmp_path / "t.csv", TX_HEADER, TX))
    old = ingest_file(
        warehouse,
        write_csv(tmp_path / "u1.csv", USERS_HEADER, ["1,2020-01-01,Chile", "2,2020-01-01,Japan"]),
    )
    new = ingest_file(
        warehouse,
        write_csv(tmp_path / "u2.csv", USERS_HEADER, ["1,2020-01-01,France", "3,2020-01-01,Japan"]),
    )
    corrections.retract(warehouse, new.file_id, "wrong countries")
    users = warehouse.execute("SELECT user_id, country, file_id FROM users ORDER BY 1").fetchall()
    assert users == [(1, "Chile", old.file_id), (2, "Japan", old.file_id)]
    countries = warehouse.execute(
        "SELECT country, sum(tx_count) FROM country_monthly_totals WHERE tx_count <> 0 "
        "GROUP BY ALL ORDER BY ALL"
    ).fetchall()
    assert countries == [("Chile", 1), ("Japan", 1), (None, 1)]
    assert verify(warehouse) == []


def test_a_correction_is_refused_for_a_file_not_in_that_state(
    warehouse: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    first = ingest_file(warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, TX))
    with pytest.raises(CorrectionRefused, match="restore applies to a file that is retracted"):
        corrections.restore(warehouse, first.file_id)
    with pytest.raises(CorrectionRefused, match="no file #99"):
        corrections.retract(warehouse, 99, "x")
    corrections.retract(warehouse, first.file_id, "x")
    with pytest.raises(CorrectionRefused, match="is retracted"):
        corrections.retract(warehouse, first.file_id, "x")


def test_replace_over_http_and_the_command_line(
    config: Config, warehouse: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    """``POST /v1/files/{id}/replace`` takes the CSV as its body, keeps the new bytes in done/;
    ``moneylion replace`` does the same on the warehouse; refusals answer 409."""
    first = ingest_file(warehouse, write_csv(tmp_path / "a.csv", TX_HEADER, TX), config)
    later = ingest_file(warehouse, write_csv(tmp_path / "b.csv", TX_HEADER, TX_LATER), config)
    fixed = "\n".join([TX_HEADER, "1,1,2024-01-01,10.00,deposit", "2,2,2024-01-02,7.00,purchase"])
    with TestClient(app=create_app(config, warehouse)) as client:
        answer = client.post(
            f"/v1/files/{first.file_id}/replace?name=a-fixed.csv&reason=amount%20of%202",
            content=fixed.encode(),
            headers={"Host": TEST_CLIENT_HOST},
        )
        assert answer.status_code == 200, answer.text
        done = answer.json()
        again = client.post(
            f"/v1/files/{first.file_id}/replace",
            content=f"{TX_HEADER}\n9,1,2024-01-01,1.00,deposit\n".encode(),
            headers={"Host": TEST_CLIENT_HOST},
        )
        assert again.status_code == 409
        assert "is replaced" in again.json()["detail"]
        broken = client.post(
            f"/v1/files/{later.file_id}/replace", content=b"x", headers={"Host": TEST_CLIENT_HOST}
        )
        assert broken.status_code == 409
        assert "the new file is refused" in broken.json()["detail"]
    assert done["status"] == "replaced"
    assert done["action"] == "replace"
    new_id = warehouse.execute(
        "SELECT by_file_id FROM corrections WHERE file_id = ?", [first.file_id]
    ).fetchall()[0][0]
    rows = warehouse.execute(
        "SELECT transaction_id, CAST(amount AS VARCHAR), file_id FROM transactions ORDER BY 1"
    ).fetchall()
    # The new bytes hold id 2 with the later file's content: the later file's copy is a duplicate.
    assert rows == [(1, "10.00", new_id), (2, "7.00", new_id), (4, "2.50", later.file_id)]
    ledger_rows = warehouse.execute(
        "SELECT file_id, status, rows_loaded, rows_duplicate, rows_rejected FROM files ORDER BY 1"
    ).fetchall()
    assert ledger_rows == [
        (first.file_id, "replaced", 0, 0, 0),
        (later.file_id, "loaded", 1, 2, 0),
        (new_id, "loaded", 2, 0, 0),
    ]
    assert [p.name for p in config.done_dir.glob("*/*")] == ["a-fixed.csv"]
    assert verify(warehouse) == []
    warehouse.close()

    newer = write_csv(tmp_path / "newer.csv", TX_HEADER, ["1,1,2024-01-01,10.00,deposit"])
    shown = run_cli_on(config, "replace", str(new_id), str(newer), "--reason", "one row only")
    assert shown.returncode == 0, shown.stderr
    assert "replace done, now replaced" in shown.stdout
    refused = run_cli_on(config, "replace", str(new_id), str(newer))
    assert refused.returncode == 1
    assert "these bytes are already file" in refused.stderr
