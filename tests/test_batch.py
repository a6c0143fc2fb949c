"""Micro-batches: any sequence of files, split into batches in any way, gives exactly what the
same files give one by one (``ingest_file``): the same ledger rows, rows, rejects, aggregates
and outcomes; and every run ends with ``verify``."""

from __future__ import annotations

from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moneylion.aggregates import verify
from moneylion.batch import Item, ingest_batch, item_of
from moneylion.config import Config
from moneylion.ingest import FileOutcome, ingest_file
from moneylion.ladder import from_each_rung
from tests.conftest import TX_HEADER, USERS_HEADER
from tests.test_properties import file_sets, fresh

WHOLE_FILE_FAILURES = [
    b"no,such,header\n1,2,3\n",  # unknown_header
    b"transaction_id,user_id,transaction_date,amount,transaction_type\n1,2,\xff\xfe,1,deposit\n",
    b"",  # empty
]


LADDERS_TRIED = from_each_rung()  # every declared ladder, from each of its rungs


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[bytes], list[int]]:
    """File contents (good and bad rows, copies, conflicts, orphans, user updates, exact
    re-sends, whole-file failures), and where the batches are cut."""
    files = [
        ("\n".join([header_of(kind), *lines]) + "\n").encode() for kind, lines in draw(file_sets())
    ]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(files)))
        if draw(st.booleans()) and files:
            files.insert(at, draw(st.sampled_from(files)))  # the same bytes again
        else:
            files.insert(at, draw(st.sampled_from(WHOLE_FILE_FAILURES)))
    cuts = sorted(draw(st.sets(st.integers(1, max(1, len(files) - 1)), max_size=len(files))))
    return files, cuts


def header_of(kind: str) -> str:
    return TX_HEADER if kind == "transactions" else USERS_HEADER


def state(conn: duckdb.DuckDBPyConnection) -> dict[str, list[tuple[Any, ...]]]:
    """Everything a file leaves behind, but the clock."""
    queries = {
        "files": "SELECT file_id, name, sha256, kind, status, rows_total, rows_loaded, "
        "rows_duplicate, rows_rejected, size_bytes, error_reason, error FROM files",
        "users": "SELECT user_id, signup_date, country, file_id FROM users",
        "transactions": "SELECT * FROM transactions",
        "rejects": "SELECT * FROM rejects",
        "user_totals": "SELECT * FROM user_totals",
        "daily_totals": "SELECT * FROM daily_totals",
        "top_users": "SELECT * FROM top_users",
        # A batch stamps the rows it changes with its last file, and leaves fewer rows at zero.
        "country_monthly_totals": "SELECT month, country, transaction_type, tx_count, "
        "total_amount FROM country_monthly_totals WHERE tx_count <> 0",
    }
    return {name: conn.execute(f"{sql} ORDER BY ALL").fetchall() for name, sql in queries.items()}


def comparable(outcome: FileOutcome) -> tuple[Any, ...]:
    return (
        outcome.name,
        outcome.sha256,
        outcome.status,
        outcome.file_id,
        outcome.kind,
        outcome.rows_total,
        outcome.rows_loaded,
        outcome.rows_duplicate,
        outcome.rows_rejected,
        dict(outcome.rejected_by_reason),
        outcome.error_reason,
        outcome.error,
    )


def items_of(paths: list[Path], config: Config) -> list[Item]:
    return [item_of(path, config) for path in paths]


@pytest.mark.slow
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=streams(), ladder=st.sampled_from(sorted(LADDERS_TRIED)))
def test_any_files_split_into_any_batches_equal_the_files_one_by_one(
    stream: tuple[list[bytes], list[int]], ladder: str
) -> None:
    """Batches against files one by one on every declared ladder (from each of its rungs)."""
    contents, cuts = stream
    with TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = []
        for number, content in enumerate(contents):
            path = folder / f"{number:03d}.csv"
            path.write_bytes(content)
            paths.append(path)

        (folder / "one").mkdir()
        config, conn = fresh(folder / "one")
        ladders = LADDERS_TRIED[ladder]
        one_by_one = [ingest_file(conn, path, config, ladders=ladders) for path in paths]
        expected = state(conn)
        assert verify(conn) == []
        conn.close()

        (folder / "batched").mkdir()
        config, conn = fresh(folder / "batched")
        items = items_of(paths, config)
        batched: list[FileOutcome] = []
        for start, end in zip([0, *cuts], [*cuts, len(items)], strict=True):
            outcomes, left = ingest_batch(conn, items[start:end], config)
            assert left == []
            batched += outcomes
        assert state(conn) == expected
        assert [comparable(o) for o in batched] == [comparable(o) for o in one_by_one]
        assert verify(conn) == []
        conn.close()


def test_a_batch_bounded_in_rows_leaves_the_rest_for_the_next(
    config: Config, warehouse: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    paths = []
    for n in range(5):
        path = tmp_path / f"f{n}.csv"
        rows = [f"{n * 100 + i},1,2022-01-01,1.00,deposit" for i in range(1, 51)]
        path.write_text("\n".join([header_of("transactions"), *rows]) + "\n")
        paths.append(path)
    items = items_of(paths, config)
    outcomes, left = ingest_batch(warehouse, items, config, max_rows=120)
    assert [o.rows_loaded for o in outcomes] == [50, 50, 50]  # taken until past the bound
    assert left == items[3:]
    outcomes, left = ingest_batch(warehouse, left, config, max_rows=120)
    assert ([o.rows_loaded for o in outcomes], left) == ([50, 50], [])
    assert verify(warehouse) == []
