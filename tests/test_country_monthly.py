"""Monthly totals per country: ``country_monthly_totals`` and ``GET /v1/countries/monthly``.

Expected values come from plain Python over the input rows (latest profile wins, the first copy
of a transaction id counts, the country is the user's current one, None for orphans), never
from the warehouse. Files go in one by one and in batches; after every commit the API, the
maintained table (``verify``) and the SQLite export (small increments, then a full export) agree
with that computation.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import random
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from moneylion.aggregates import verify
from moneylion.api import create_app
from moneylion.batch import ingest_batch
from moneylion.config import Config
from moneylion.export import close_sqlite, export_full, export_new
from moneylion.ingest import FileOutcome, ingest_file
from moneylion.schema import migrate
from moneylion.source import stage
from tests.conftest import TX_HEADER, TYPES, USERS_HEADER, IngestStandIn, write_csv

COUNTRIES = ("France", "Chile", "Japan", "Kenya")

Totals = dict[tuple[str, str | None], dict[str, tuple[int, Decimal]]]


class Independent:
    """The totals computed over the input rows as they are sent, in order."""

    def __init__(self) -> None:
        self.countries: dict[int, str] = {}
        self.transactions: dict[int, tuple[int, str, Decimal, str]] = {}

    def add(self, kind: str, rows: list[tuple[Any, ...]]) -> None:
        if kind == "users":
            for user_id, _signup, country in rows:
                self.countries[user_id] = country
        else:
            for tx_id, user_id, day, amount, kind_of in rows:
                self.transactions.setdefault(tx_id, (user_id, day, Decimal(amount), kind_of))

    def totals(self) -> Totals:
        found: dict[tuple[str, str | None], dict[str, list[Any]]] = defaultdict(dict)
        for user_id, day, amount, kind in self.transactions.values():
            cell = found[day[:7], self.countries.get(user_id)].setdefault(kind, [0, Decimal(0)])
            cell[0] += 1
            cell[1] += amount
        return {key: {k: (n, s) for k, (n, s) in cells.items()} for key, cells in found.items()}


def api_totals(client: TestClient[Litestar], **params: str) -> Totals:
    response = client.get("/v1/countries/monthly", params=params)
    assert response.status_code == 200, response.text
    rows = response.json()["months"]
    while response.json()["next"] is not None:  # every page
        response = client.get(response.json()["next"])
        assert response.status_code == 200, response.text
        rows.extend(response.json()["months"])
    found: Totals = {}
    for row in rows:
        cells = {
            kind: (row[f"{kind}_count"], Decimal(row[f"total_{kind}"]))
            for kind in TYPES
            if row[f"{kind}_count"]
        }
        assert row["transaction_count"] == sum(n for n, _ in cells.values())
        assert Decimal(row["total_amount"]) == sum((s for _, s in cells.values()), Decimal(0))
        found[row["month"], row["country"]] = cells
    return found


def sqlite_totals(path: Path) -> Totals:
    found: Totals = defaultdict(dict)
    with contextlib.closing(sqlite3.connect(path)) as lite:
        for month, country, kind, count, total in lite.execute(
            "SELECT month, country, transaction_type, tx_count, total_amount "
            "FROM country_monthly_totals"
        ):
            assert kind not in found[month, country]  # one row per month, country and type
            found[month, country][kind] = (count, Decimal(total))
    return dict(found)


@pytest.fixture
def committed() -> list[int]:
    return [0]


@pytest.fixture
def client(
    config: Config, warehouse: duckdb.DuckDBPyConnection, committed: list[int]
) -> Iterator[TestClient[Litestar]]:
    # The stand-in's committed file id is the API cache's change token.
    ingest = IngestStandIn(committed=lambda: committed[0])
    with TestClient(app=create_app(config, warehouse, ingest=ingest)) as test_client:
        yield test_client
    close_sqlite()


def csv_file(folder: Path, name: str, kind: str, rows: list[tuple[Any, ...]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = USERS_HEADER if kind == "users" else TX_HEADER
    return write_csv(folder / name, header, (",".join(map(str, r)) for r in rows))


class Feed:
    """Files into the warehouse, one by one or as batches, the independent totals alongside."""

    def __init__(
        self, tmp_path: Path, config: Config, conn: duckdb.DuckDBPyConnection, committed: list[int]
    ) -> None:
        self.folder = tmp_path / "files"
        self.config = config
        self.conn = conn
        self.committed = committed
        self.independent = Independent()
        self.names = 0

    def commit(self, files: list[tuple[str, list[tuple[Any, ...]]]], *, batch: bool) -> None:
        paths = []
        for kind, rows in files:
            self.names += 1
            paths.append(csv_file(self.folder, f"f{self.names}.csv", kind, rows))
            self.independent.add(kind, rows)
        outcomes: list[FileOutcome]
        if batch:
            items = [stage(path, self.config.staging_dir) for path in paths]
            outcomes, left = ingest_batch(self.conn, list(items), self.config)
            assert left == []
            for item in items:
                item.discard()
        else:
            outcomes = [ingest_file(self.conn, path, self.config) for path in paths]
        assert all(o.status in ("loaded", "duplicate_file") for o in outcomes), outcomes
        self.committed[0] = max(o.file_id or 0 for o in outcomes)
        assert verify(self.conn) == []


def test_orphans_late_profiles_and_moves_shift_a_users_totals_exactly(
    tmp_path: Path,
    config: Config,
    warehouse: duckdb.DuckDBPyConnection,
    committed: list[int],
    client: TestClient[Litestar],
) -> None:
    feed = Feed(tmp_path, config, warehouse, committed)
    sqlite_path = config.sqlite_path

    # Transactions of users nobody knows yet: all under country null.
    feed.commit(
        [
            (
                "transactions",
                [
                    (1, 7, "2024-01-05", "10.00", "deposit"),
                    (2, 7, "2024-02-05", "2.50", "purchase"),
                    (3, 8, "2024-01-09", "4.00", "withdrawal"),
                ],
            )
        ],
        batch=False,
    )
    assert api_totals(client) == {
        ("2024-01", None): {"deposit": (1, Decimal("10.00")), "withdrawal": (1, Decimal("4.00"))},
        ("2024-02", None): {"purchase": (1, Decimal("2.50"))},
    }
    export_new(warehouse, sqlite_path)
    assert sqlite_totals(sqlite_path) == api_totals(client)

    # User 7's profile arrives late: its two months move out of null into France.
    feed.commit([("users", [(7, "2023-01-01", "France")])], batch=False)
    assert api_totals(client) == {
        ("2024-01", "France"): {"deposit": (1, Decimal("10.00"))},
        ("2024-01", None): {"withdrawal": (1, Decimal("4.00"))},
        ("2024-02", "France"): {"purchase": (1, Decimal("2.50"))},
    }
    export_new(warehouse, sqlite_path)
    assert sqlite_totals(sqlite_path) == api_totals(client)

    # User 7 moves to Chile (with a new transaction in the same batch), user 8 arrives.
    feed.commit(
        [
            ("users", [(7, "2023-01-01", "Chile"), (8, "2023-02-02", "Japan")]),
            ("transactions", [(4, 7, "2024-02-20", "1.25", "purchase")]),
        ],
        batch=True,
    )
    assert api_totals(client) == {
        ("2024-01", "Chile"): {"deposit": (1, Decimal("10.00"))},
        ("2024-01", "Japan"): {"withdrawal": (1, Decimal("4.00"))},
        ("2024-02", "Chile"): {"purchase": (2, Decimal("3.75"))},
    }
    assert api_totals(client) == feed.independent.totals()
    export_new(warehouse, sqlite_path)
    assert sqlite_totals(sqlite_path) == api_totals(client)
    assert api_totals(client, country="Chile") == {
        ("2024-01", "Chile"): {"deposit": (1, Decimal("10.00"))},
        ("2024-02", "Chile"): {"purchase": (2, Decimal("3.75"))},
    }
    assert api_totals(client, **{"from": "2024-02", "to": "2024-02"}) == {
        ("2024-02", "Chile"): {"purchase": (2, Decimal("3.75"))},
    }
    export_full(warehouse, sqlite_path)
    assert sqlite_totals(sqlite_path) == api_totals(client)


def random_files(rng: random.Random, count: int) -> list[tuple[str, list[tuple[Any, ...]]]]:
    """Users files (new users, changes of country, identical re-sends) and transactions files
    (new ids, exact copies of earlier rows, orphans) in a random order."""
    contents: dict[int, tuple[Any, ...]] = {}
    files: list[tuple[str, list[tuple[Any, ...]]]] = []
    for _ in range(count):
        if rng.random() < 0.35:
            ids = rng.sample(range(1, 41), rng.randint(1, 12))
            rows = [
                (u, "2023-01-01", rng.choice(COUNTRIES)) for u in sorted(ids)
            ]  # a user's country may change
            files.append(("users", rows))
            continue
        rows = []
        for _ in range(rng.randint(1, 40)):
            if contents and rng.random() < 0.2:  # a copy of an earlier row: a duplicate
                tx_id = rng.choice(sorted(contents))
                if any(r[0] == tx_id for r in rows):
                    continue
                rows.append(contents[tx_id])
                continue
            tx_id = len(contents) + 1
            day = dt.date(2024, 1, 1) + dt.timedelta(days=rng.randrange(200))
            contents[tx_id] = (
                tx_id,
                rng.randint(1, 50),  # users 41-50 never get a profile: orphans for good
                day.isoformat(),
                f"{rng.randint(1, 99_999) / 100:.2f}",
                rng.choice(TYPES),
            )
            rows.append(contents[tx_id])
        files.append(("transactions", rows))
    return files


@pytest.mark.parametrize("seed", range(6))
def test_random_files_one_by_one_and_in_batches_equal_an_independent_computation(
    tmp_path: Path,
    config: Config,
    warehouse: duckdb.DuckDBPyConnection,
    committed: list[int],
    client: TestClient[Litestar],
    seed: int,
) -> None:
    rng = random.Random(seed)
    files = random_files(rng, 16)
    feed = Feed(tmp_path, config, warehouse, committed)
    at = 0
    while at < len(files):
        take = rng.randint(1, 4)
        feed.commit(files[at : at + take], batch=rng.random() < 0.6)
        at += take
        assert api_totals(client) == feed.independent.totals()
        export_new(warehouse, config.sqlite_path)
        assert sqlite_totals(config.sqlite_path) == feed.independent.totals()
    export_full(warehouse, config.sqlite_path)
    assert sqlite_totals(config.sqlite_path) == feed.independent.totals()
    assert verify(warehouse) == []


def test_an_older_warehouse_gets_its_country_totals_when_migrated(
    tmp_path: Path, config: Config, warehouse: duckdb.DuckDBPyConnection, committed: list[int]
) -> None:
    feed = Feed(tmp_path, config, warehouse, committed)
    files = random_files(random.Random(99), 10)
    for kind_rows in files:
        feed.commit([kind_rows], batch=False)
    # As it was before migration 004: no table, version 3.
    warehouse.execute("DROP TABLE country_monthly_totals")
    warehouse.execute("DELETE FROM schema_version WHERE version >= 4")

    assert migrate(warehouse) >= 4

    assert verify(warehouse) == []
    rows = warehouse.execute(
        "SELECT strftime(month, '%Y-%m'), country, transaction_type::VARCHAR, tx_count, "
        "total_amount FROM country_monthly_totals"
    ).fetchall()
    found: Totals = defaultdict(dict)
    for month, country, kind, count, total in rows:
        found[month, country][kind] = (count, total)
    assert dict(found) == feed.independent.totals()


@pytest.mark.parametrize(
    "params",
    [
        {"from": "2024-13"},
        {"from": "2024-00"},
        {"to": "2024-1"},
        {"to": "24-01"},
        {"from": "2024-01-01"},
        {"from": "abcd-ef"},
        {"to": "0000-01"},
        {"country": ""},
    ],
)
def test_a_malformed_month_or_country_is_a_400_problem(
    client: TestClient[Litestar], params: dict[str, str]
) -> None:
    response = client.get("/v1/countries/monthly", params=params)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == 400
    assert "detail" in body


def test_an_empty_warehouse_or_an_inverted_range_has_no_months(
    client: TestClient[Litestar],
) -> None:
    response = client.get("/v1/countries/monthly", params={"from": "2024-05", "to": "2024-01"})
    assert response.status_code == 200
    assert response.json() == {
        "from": "2024-05",
        "to": "2024-01",
        "country": None,
        "limit": 1000,
        "offset": 0,
        "next": None,
        "months": [],
    }
    assert client.get("/v1/countries/monthly").json()["months"] == []
