"""``/metrics`` and readiness after corrections: files by status, corrections by action, each
file's reject share, the inbox backlog's age and the SQLite export's lag, on a real app (and a
real daemon for the export), a file retracted and restored over HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from moneylion.api import create_app
from moneylion.config import Config
from moneylion.export.full import export_full
from moneylion.ingest import ingest_file
from moneylion.ledger import FileStatus
from tests.conftest import TX_HEADER, IngestStandIn, parse_metrics, write_csv
from tests.daemon_process import running_daemon, wait_for, write_transactions

# Three files of transactions: clean, a quarter rejected, three quarters rejected.
CLEAN = [f"{100 + n},1,2022-01-0{n + 1},1.00,deposit" for n in range(4)]
QUARTER = [*(f"{200 + n},2,2022-01-05,2.00,purchase" for n in range(3)), "299,2,2022-01-05,x,bonus"]
MOSTLY_BAD = ["300,3,2022-01-06,3.00,deposit", *(f"{310 + n},3,bad,1,bonus" for n in range(3))]


@pytest.fixture
def files(config: Config, warehouse: duckdb.DuckDBPyConnection, tmp_path: Path) -> list[int]:
    ids = []
    for name, lines in (("clean.csv", CLEAN), ("quarter.csv", QUARTER), ("bad.csv", MOSTLY_BAD)):
        outcome = ingest_file(warehouse, write_csv(tmp_path / name, TX_HEADER, lines), config)
        assert outcome.status == FileStatus.LOADED
        assert outcome.file_id is not None
        ids.append(outcome.file_id)
    return ids


@pytest.fixture
def client(config: Config, warehouse: duckdb.DuckDBPyConnection) -> Iterator[TestClient[Litestar]]:
    with TestClient(app=create_app(config, warehouse)) as test_client:
        yield test_client


def scrape(client: TestClient[Litestar]) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    return parse_metrics(response.text)


def by_status(samples: dict[str, float]) -> dict[str, float]:
    return {
        status: samples[f'moneylion_files_by_status{{status="{status}"}}'] for status in FileStatus
    }


def test_a_retraction_moves_the_file_between_status_gauges_and_counts_as_a_correction(
    client: TestClient[Litestar], files: list[int]
) -> None:
    before = scrape(client)
    assert by_status(before) == {**dict.fromkeys(FileStatus, 0), "loaded": 3}
    for action in ("retract", "restore", "replace", "hold", "release"):
        assert before[f'moneylion_corrections_total{{action="{action}"}}'] == 0

    answer = client.post(f"/v1/files/{files[0]}/retract", json={"reason": "sent twice"})
    assert answer.status_code == 200, answer.text
    after = scrape(client)
    assert by_status(after) == {**dict.fromkeys(FileStatus, 0), "loaded": 2, "retracted": 1}
    assert after['moneylion_corrections_total{action="retract"}'] == 1
    assert after['moneylion_corrections_total{action="restore"}'] == 0

    assert client.post(f"/v1/files/{files[0]}/restore", json={}).status_code == 200
    restored = scrape(client)
    assert by_status(restored) == by_status(before)
    assert restored['moneylion_corrections_total{action="retract"}'] == 1
    assert restored['moneylion_corrections_total{action="restore"}'] == 1


def test_each_files_reject_share_is_in_the_histogram(
    client: TestClient[Litestar], files: list[int]
) -> None:
    samples = scrape(client)

    def bucket(bound: str) -> float:
        return samples[f'moneylion_file_reject_share_bucket{{le="{bound}"}}']

    # Shares 0, 0.25 and 0.75: cumulative counts per upper bound.
    assert [bucket(b) for b in ("0.0", "0.1", "0.25", "0.5", "0.75", "1.0", "+Inf")] == [
        1,
        1,
        2,
        2,
        3,
        3,
        3,
    ]
    assert samples["moneylion_file_reject_share_count"] == 3
    assert samples["moneylion_file_reject_share_sum"] == pytest.approx(1.0)

    # A retracted file keeps its rejected rows (its own rows' faults): the same share, and the
    # count of files does not fall.
    assert client.post(f"/v1/files/{files[2]}/retract", json={"reason": "bad"}).status_code == 200
    after = scrape(client)
    shares = {k: v for k, v in samples.items() if k.startswith("moneylion_file_reject_share")}
    assert {k: after[k] for k in shares} == shares


def test_readiness_and_the_metrics_count_held_files(
    client: TestClient[Litestar],
    config: Config,
    warehouse: duckdb.DuckDBPyConnection,
    files: list[int],
    tmp_path: Path,
) -> None:
    assert client.get("/v1/health/ready").json()["held_files"] == 0
    strict = config.with_overrides(max_reject_share=0.5)
    bad = write_csv(tmp_path / "held.csv", TX_HEADER, [f"9{line}" for line in MOSTLY_BAD])
    assert ingest_file(warehouse, bad, strict).status == FileStatus.HELD
    ready = client.get("/v1/health/ready")
    assert ready.status_code == 200  # held files wait for a person: still ready
    assert ready.json()["held_files"] == 1
    assert scrape(client)['moneylion_files_by_status{status="held"}'] == 1


def test_the_backlog_age_is_the_oldest_waiting_files(
    client: TestClient[Litestar], config: Config, tmp_path: Path
) -> None:
    assert scrape(client)["moneylion_inbox_backlog_age_seconds"] == 0
    (config.inbox / ".hidden.csv").write_text("ignored\n")  # never taken: not waiting
    assert scrape(client)["moneylion_inbox_backlog_age_seconds"] == 0
    write_csv(config.inbox / "waiting.csv", TX_HEADER, CLEAN)
    time.sleep(0.3)
    samples = scrape(client)
    assert samples["moneylion_inbox_backlog"] == 1
    assert 0.3 <= samples["moneylion_inbox_backlog_age_seconds"] < 60


def test_the_sqlite_exports_lag_counts_the_commits_it_does_not_hold(
    config: Config, warehouse: duckdb.DuckDBPyConnection, files: list[int]
) -> None:
    """The daemon's view with the export on and nothing exported yet: every file is behind,
    since the first one's commit; once exported, nothing."""
    app = create_app(config, warehouse, ingest=IngestStandIn(committed=lambda: files[-1]))
    with TestClient(app=app) as client:
        time.sleep(0.2)
        behind = scrape(client)
        assert behind["moneylion_sqlite_export_lag_changes"] == 3
        assert behind["moneylion_sqlite_export_lag_seconds"] >= 0.2
        export_full(warehouse, config.sqlite_path)
        caught_up = scrape(client)
        assert caught_up["moneylion_sqlite_export_lag_changes"] == 0
        assert caught_up["moneylion_sqlite_export_lag_seconds"] == 0


def test_the_sqlite_exports_lag_is_zero_once_it_holds_every_commit(tmp_path: Path) -> None:
    """A real daemon: its export catches up with a file and with a correction of it."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    with running_daemon(inbox, tmp_path / "warehouse", settle_seconds=0.1) as daemon:

        def lag() -> tuple[float, float]:
            samples = parse_metrics(daemon.client.get("/metrics").text)
            return (
                samples["moneylion_sqlite_export_lag_changes"],
                samples["moneylion_sqlite_export_lag_seconds"],
            )

        rows = [(500 + n, 1, "2022-02-01", "1.00", "deposit") for n in range(5)]
        source = write_transactions(tmp_path / "lag.csv", rows)
        source.rename(inbox / "lag.csv")
        wait_for(lambda: len(daemon.ledger()) == 1, 30, "the file to be ingested")
        wait_for(lambda: lag() == (0, 0), 30, "the export to hold the file")
        file_id = daemon.ledger()[0]["file_id"]
        retracted = daemon.client.post(f"/v1/files/{file_id}/retract", json={"reason": "test"})
        assert retracted.status_code == 200, retracted.text
        wait_for(lambda: lag() == (0, 0), 30, "the export to hold the correction")
