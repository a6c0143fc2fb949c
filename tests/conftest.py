"""Fixtures that build real things in tmp_path: a config, a warehouse, an inbox."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TypeVar

import duckdb
import pytest
import uvicorn
from litestar import Litestar

from moneylion.aggregates import verify
from moneylion.config import Config, load_config
from moneylion.ingest import ingest_file
from moneylion.schema import open_warehouse
from moneylion.stream import StreamStats
from tests.expected import Expected

T = TypeVar("T")
SEED_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CASES_DIR = Path(__file__).resolve().parent / "cases"


# The seed's CSV columns and types, spelled here rather than taken from moneylion.model, so that
# a change of the model that would refuse the seed's files fails the tests.
TX_COLUMNS = ("transaction_id", "user_id", "transaction_date", "amount", "transaction_type")
USERS_COLUMNS = ("user_id", "signup_date", "country")
TX_HEADER = ",".join(TX_COLUMNS)
USERS_HEADER = ",".join(USERS_COLUMNS)
TYPES = ("deposit", "withdrawal", "purchase")


def csv_text(header: str, lines: Iterable[str]) -> str:
    """A CSV file's text: the header line, then each line, each ended by a newline."""
    return "".join(f"{line}\n" for line in (header, *lines))


def write_csv(path: Path, header: str, lines: Iterable[str]) -> Path:
    """``path`` written as ``csv_text(header, lines)`` in UTF-8."""
    path.write_text(csv_text(header, lines), "utf-8")
    return path


# The host Litestar's TestClient names in every request: allowed beside the loopback names.
TEST_CLIENT_HOST = "testserver.local"


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder beside the inbox where tests write files before moving them in whole."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The project's defaults with inbox and warehouse inside tmp_path."""
    base = load_config(environ={})
    cfg = base.with_overrides(
        inbox=tmp_path / "inbox",
        warehouse=tmp_path / "warehouse",
        allowed_hosts=[TEST_CLIENT_HOST],
    )
    cfg.inbox.mkdir(parents=True)
    cfg.warehouse.mkdir(parents=True)
    return cfg


@pytest.fixture
def warehouse(config: Config) -> Iterator[duckdb.DuckDBPyConnection]:
    """A fresh, migrated DuckDB warehouse file in tmp_path."""
    conn = open_warehouse(config)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def seed_files() -> tuple[Path, Path]:
    """The take-home's real users.csv and transactions.csv, or a skip saying where to put them."""
    users, transactions = SEED_DIR / "users.csv", SEED_DIR / "transactions.csv"
    if not (users.exists() and transactions.exists()):
        pytest.skip(f"seed data not found in {SEED_DIR} (expected ../shared/data beside the repo)")
    return users, transactions


# Extra files beside the seed: a profile without transactions, orphan transactions, rejected
# rows (at known lines) and a file that fails as a whole.
USER_WITHOUT_TRANSACTIONS = 20001
ORPHAN = 30001
EXTRA_USERS = "user_id,signup_date,country\n20001,2023-01-01,Norway\n"
EXTRA_TRANSACTIONS = (
    "transaction_id,user_id,transaction_date,amount,transaction_type\n"
    "900001,30001,2023-05-05,10.10,deposit\n"
    "900002,30001,2023-05-05,5.05,purchase\n"
    "900003,1,2023-05-05,1.234,deposit\n"  # line 4: too_many_decimals
    "900004,2,2023-05-05,12.00,bonus\n"  # line 5: unknown_type
    "900005,3,2023-05-06,7.00,Withdrawal\n"
)
EXTRA_REJECTS = [(4, "too_many_decimals"), (5, "unknown_type")]
BROKEN_FILE = "colour,size\nred,3\n"


@dataclass
class Loaded:
    config: Config
    conn: duckdb.DuckDBPyConnection
    expected: Expected
    file_ids: dict[str, int]


def build_loaded(base: Path, seed_files: tuple[Path, Path]) -> Loaded:
    """Seed + extra files ingested with ingest_file into a warehouse under ``base``."""
    config = load_config(environ={}).with_overrides(
        inbox=base / "inbox", warehouse=base / "warehouse", allowed_hosts=[TEST_CLIENT_HOST]
    )
    config.inbox.mkdir(parents=True)
    extra_dir = base / "extra"
    extra_dir.mkdir()
    (extra_dir / "users_extra.csv").write_text(EXTRA_USERS)
    (extra_dir / "transactions_extra.csv").write_text(EXTRA_TRANSACTIONS)
    (extra_dir / "broken.csv").write_text(BROKEN_FILE)
    conn = open_warehouse(config)
    users, transactions = seed_files
    file_ids: dict[str, int] = {}
    for path in (
        users,
        transactions,
        extra_dir / "users_extra.csv",
        extra_dir / "transactions_extra.csv",
        extra_dir / "broken.csv",
    ):
        outcome = ingest_file(conn, path, config)
        assert outcome.file_id is not None
        file_ids[path.name] = outcome.file_id
        assert outcome.status == ("failed" if path.name == "broken.csv" else "loaded")
    assert verify(conn, top_users_kept=config.top_users_kept) == []

    expected = Expected()
    expected.add_users(users.read_text(encoding="utf-8-sig"))
    expected.add_users(EXTRA_USERS)
    expected.add_transactions(transactions.read_text(encoding="utf-8-sig"))
    good = [line for i, line in enumerate(EXTRA_TRANSACTIONS.splitlines(), 1) if i not in (4, 5)]
    expected.add_transactions("\n".join(good) + "\n")
    return Loaded(config, conn, expected, file_ids)


@pytest.fixture(scope="module")
def loaded(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    seed_files: tuple[Path, Path],
) -> Iterator[Loaded]:
    """The seed and the extra files ingested once per test module (``build_loaded``)."""
    state = build_loaded(
        tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2]), seed_files
    )
    yield state
    state.conn.close()


@contextmanager
def serving(app: Litestar) -> Iterator[str]:
    """uvicorn serving ``app`` in a thread on a free loopback port: its base URL; stopped (and
    its thread joined) at the end."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive()


@dataclass
class IngestStandIn:
    """The daemon's view (``api.warehouse.IngestView``) for API tests without a daemon."""

    is_ready: Callable[[], bool] = lambda: True
    committed: Callable[[], int] = lambda: 0

    def ready(self) -> bool:
        return self.is_ready()

    def committed_file_id(self) -> int:
        return self.committed()

    def backlog(self) -> tuple[int, int]:
        return 0, 0

    def stream(self) -> StreamStats:
        return StreamStats(0, 0, 0.0, 0.0, 0.0, 0, 0)

    def files_stuck(self) -> int:
        return 0

    def lake_lag(self) -> None:
        return None

    def between_batches(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        raise AssertionError("this stand-in has no worker to run work between batches")


def parse_metrics(text: str) -> dict[str, float]:
    """A Prometheus text page as {sample with its labels: value}."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def cents(value: Decimal) -> float:
    """An expected amount as the seed's API shows it: a JSON number of cents."""
    return float(value.quantize(Decimal("0.01")))


def money(value: Decimal) -> str:
    """An expected amount as /v1 shows it: a decimal string with two places."""
    return str(value.quantize(Decimal("0.01")))
