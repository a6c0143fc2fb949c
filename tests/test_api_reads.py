"""How the API reads: user summaries from the SQLite export while it has caught up with DuckDB,
and answers cached until the next commit. Real DuckDB and SQLite files in tmp_path; the seed
data; the daemon's ``committed`` mark played by a variable the tests move."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest
from litestar.testing import TestClient

from moneylion.aggregates import verify
from moneylion.api import create_app
from moneylion.api.cache import SnapshotCache, answer_bytes
from moneylion.api.queries import user_summary
from moneylion.api.replica import SqliteReplica
from moneylion.config import Config
from moneylion.export import close_sqlite, export_full, export_new
from moneylion.ingest import ingest_file
from tests.conftest import IngestStandIn
from tests.expected import Expected

PROFILE_ONLY = "user_id,signup_date,country\n20001,2023-01-01,Norway\n"
ORPHAN_ROWS = (
    "transaction_id,user_id,transaction_date,amount,transaction_type\n"
    "900001,30001,2023-05-05,10.10,deposit\n"
    "900002,30001,2023-05-06,5.05,purchase\n"
)


@pytest.fixture
def seeded(
    tmp_path: Path,
    seed_files: tuple[Path, Path],
    config: Config,
    warehouse: duckdb.DuckDBPyConnection,
) -> int:
    """Seed, a profile without transactions and an orphan's rows, exported; the last file id."""
    (tmp_path / "profile.csv").write_text(PROFILE_ONLY)
    (tmp_path / "orphan.csv").write_text(ORPHAN_ROWS)
    last = 0
    for path in (*seed_files, tmp_path / "profile.csv", tmp_path / "orphan.csv"):
        outcome = ingest_file(warehouse, path, config)
        assert outcome.status == "loaded"
        assert outcome.file_id is not None
        last = outcome.file_id
    assert export_new(warehouse, config.sqlite_path).last_file_id == last
    return last


def new_transactions(path: Path, user_id: int, count: int, first_id: int) -> Path:
    path.write_text(
        "transaction_id,user_id,transaction_date,amount,transaction_type\n"
        + "".join(f"{first_id + i},{user_id},2024-02-29,0.01,withdrawal\n" for i in range(count))
    )
    return path


def test_replica_summaries_equal_duckdb_and_an_independent_sum_to_the_cent(
    seeded: int, config: Config, warehouse: duckdb.DuckDBPyConnection, seed_files: tuple[Path, Path]
) -> None:
    expected = Expected()
    expected.add_transactions(seed_files[1].read_text(encoding="utf-8-sig"))
    replica = SqliteReplica(config.sqlite_path)
    try:
        for user_id in (1, 2, 777, 5000, 9999, 10000, 20001, 30001, 424242):
            answered, found = replica.user_summary(user_id, seeded)
            assert answered
            assert found == user_summary(warehouse, user_id)
        for user_id in (1, 777, 9999):
            found = replica.user_summary(user_id, seeded)[1]
            assert found is not None
            assert found.known
            assert found.total_amount == expected.total[user_id]
            assert found.total_deposit == expected.by_type[user_id, "deposit"]
            assert found.tx_count == expected.count[user_id]
        orphan = replica.user_summary(30001, seeded)[1]
        assert orphan is not None
        assert not orphan.known
        assert orphan.country is None
        assert str(orphan.total_amount) == "15.15"
        assert orphan.tx_count == 2
        assert replica.user_summary(424242, seeded) == (True, None)
        assert replica.answered == 14
        assert replica.behind == 0
    finally:
        replica.close()
        close_sqlite()


def test_replica_behind_the_last_commit_is_not_used(
    tmp_path: Path, seeded: int, config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    replica = SqliteReplica(config.sqlite_path)
    try:
        assert replica.user_summary(1, seeded + 1) == (False, None)
        more = ingest_file(
            warehouse, new_transactions(tmp_path / "more.csv", 1, 3, 950_000), config
        )
        assert more.file_id == seeded + 1
        assert replica.user_summary(1, seeded + 1) == (False, None)  # committed, not exported
        export_new(warehouse, config.sqlite_path)
        answered, found = replica.user_summary(1, seeded + 1)
        assert answered
        assert found == user_summary(warehouse, 1)
        assert replica.behind == 2
    finally:
        replica.close()
        close_sqlite()
    assert verify(warehouse, top_users_kept=config.top_users_kept) == []


def test_replica_reopens_a_file_replaced_by_a_full_export(
    tmp_path: Path, seeded: int, config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    replica = SqliteReplica(config.sqlite_path)
    try:
        before = replica.user_summary(2, seeded)[1]
        more = ingest_file(
            warehouse, new_transactions(tmp_path / "more.csv", 2, 4, 960_000), config
        )
        assert more.file_id is not None
        close_sqlite()
        export_full(warehouse, config.sqlite_path)  # a new file renamed over the old one
        answered, after = replica.user_summary(2, more.file_id)
        assert answered
        assert before is not None
        assert after is not None
        assert after.tx_count == before.tx_count + 4
        assert after.total_withdrawal == before.total_withdrawal + Decimal("0.04")
    finally:
        replica.close()
        close_sqlite()


def test_missing_or_foreign_sqlite_files_are_not_used_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = SqliteReplica(tmp_path / "none.sqlite")
    assert missing.user_summary(1, 0) == (False, None)
    foreign_path = tmp_path / "foreign.sqlite"
    with sqlite3.connect(foreign_path) as foreign:
        foreign.execute("CREATE TABLE users (user_id INTEGER PRIMARY KEY, country TEXT)")
    foreign.close()
    replica = SqliteReplica(foreign_path)
    with caplog.at_level(logging.WARNING, logger="moneylion.api.replica"):
        for _ in range(3):
            assert replica.user_summary(1, 0) == (False, None)
    assert [r.getMessage() for r in caplog.records] == ["sqlite_replica_unreadable"]


def test_the_api_reads_the_replica_until_a_commit_it_lacks_then_duckdb(
    tmp_path: Path, seeded: int, config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    committed = [seeded]
    app = create_app(config, warehouse, ingest=IngestStandIn(committed=lambda: committed[0]))
    ctx = app.state.moneylion
    try:
        with TestClient(app=app) as client:
            first = client.get("/api/user_transaction_summary?user_id=3").json()[0]
            v1 = client.get("/v1/users/30001/summary").json()
            assert v1["total_amount"] == "15.15"
            assert v1["known_user"] is False
            assert ctx.replica.answered == 2
            assert ctx.replica.behind == 0

            more = ingest_file(
                warehouse, new_transactions(tmp_path / "m.csv", 3, 5, 970_000), config
            )
            committed[0] = more.file_id  # what the daemon's worker does after a commit
            second = client.get("/api/user_transaction_summary?user_id=3").json()[0]
            assert ctx.replica.behind == 1  # not exported yet: DuckDB answered, with the file
            assert round(second["total_withdrawal"] - first["total_withdrawal"], 2) == 0.05

            export_new(warehouse, config.sqlite_path)
            assert client.get("/api/user_transaction_summary?user_id=3").json()[0] == second
            assert ctx.replica.answered == 3
    finally:
        close_sqlite()


def test_concurrent_misses_share_one_load_and_a_new_token_reloads() -> None:
    token = [1]
    loads: list[int] = []

    def load() -> int:
        loads.append(token[0])
        time.sleep(0.05)
        return token[0] * 10

    cache = SnapshotCache(lambda: token[0], max_age=None)

    async def many() -> list[int]:
        return list(await asyncio.gather(*(cache.get("top", load) for _ in range(20))))

    assert asyncio.run(many()) == [10] * 20
    assert asyncio.run(many()) == [10] * 20  # hits
    assert loads == [1]
    token[0] = 2
    assert asyncio.run(many()) == [20] * 20
    assert loads == [1, 2]
    assert cache.hits == 20
    assert cache.misses == 40  # the waiters of a shared load missed too


def test_a_failed_load_reaches_every_waiter_and_is_not_cached() -> None:
    calls = threading.Semaphore(0)
    cache = SnapshotCache(lambda: 1, max_age=None)

    def broken() -> int:
        calls.release()
        time.sleep(0.02)
        raise duckdb.IOException("disk gone")

    async def many() -> list[BaseException | int]:
        return list(
            await asyncio.gather(
                *(cache.get("k", broken) for _ in range(5)), return_exceptions=True
            )
        )

    results = asyncio.run(many())
    assert all(isinstance(r, duckdb.IOException) for r in results)
    assert calls.acquire(blocking=False)
    assert not calls.acquire(blocking=False)
    assert asyncio.run(cache.get("k", lambda: 7)) == 7


def test_the_cache_is_bounded_in_bytes_dropping_the_least_recently_used() -> None:
    answer = ["x" * 1000]  # about a kilobyte encoded
    one = answer_bytes(answer)
    cache = SnapshotCache(lambda: 1, max_age=None, max_bytes=3 * one)
    loads: list[str] = []

    def load(key: str) -> list[str]:
        loads.append(key)
        return list(answer)

    async def get(key: str) -> list[str]:
        return await cache.get(key, lambda: load(key))

    for key in ("a", "b", "c"):
        asyncio.run(get(key))
    assert cache.bytes == 3 * one
    asyncio.run(get("a"))  # a hit: "a" is now the most recently used
    asyncio.run(get("d"))  # one answer too many: "b", the least recently used, goes
    assert cache.bytes == 3 * one
    assert loads == ["a", "b", "c", "d"]
    asyncio.run(get("a"))
    asyncio.run(get("c"))
    assert loads == ["a", "b", "c", "d"]  # still kept
    asyncio.run(get("b"))
    assert loads == ["a", "b", "c", "d", "b"]  # dropped, so loaded again


def test_an_answer_larger_than_the_cache_is_served_but_not_kept() -> None:
    cache = SnapshotCache(lambda: 1, max_age=None, max_bytes=100)
    big = "y" * 1000
    assert asyncio.run(cache.get("big", lambda: big)) == big
    assert cache.bytes == 0
    assert asyncio.run(cache.get("big", lambda: big)) == big
    assert cache.hits == 0
