"""Fixtures that build real things in tmp_path: a config, a warehouse, an inbox."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

from moneylion.config import Config, load_config
from moneylion.schema import open_warehouse
from moneylion.stream import StreamStats

SEED_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
CASES_DIR = Path(__file__).resolve().parent / "cases"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The project's defaults with inbox and warehouse inside tmp_path."""
    base = load_config(environ={})
    cfg = base.with_overrides(inbox=tmp_path / "inbox", warehouse=tmp_path / "warehouse")
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
