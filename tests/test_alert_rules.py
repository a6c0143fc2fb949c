"""The alert rules in ``docs/prometheus/``: Prometheus' own ``promtool`` checks the rule file and
runs its unit tests (series in, alerts out), and every metric the rules name is one a real app's
``/metrics`` serves.

promtool comes with Debian's ``prometheus`` package: without it these tests are skipped on a
developer's machine and fail under ``CI=true`` (``.ci/run`` installs it with apt-get).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import duckdb
import pytest
from litestar.testing import TestClient

from moneylion.api import create_app
from moneylion.config import Config
from moneylion.ingest import ingest_file
from tests.conftest import TX_HEADER, IngestStandIn, write_csv

RULES_DIR = Path(__file__).resolve().parent.parent / "docs" / "prometheus"
RULES = RULES_DIR / "moneylion.rules.yml"
RULES_TESTS = RULES_DIR / "moneylion.rules.test.yml"
METRIC_NAME = re.compile(r"\bmoneylion_[a-z_]+\b")


def promtool() -> str:
    """The promtool on the PATH, or a skip (a failure under CI=true) saying how to get it."""
    found = shutil.which("promtool")
    if found is None:
        message = "promtool not found: apt-get install -y --no-install-recommends prometheus"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=RULES_DIR, capture_output=True, text=True, timeout=120, check=False
    )


def test_the_rule_file_passes_promtool_check() -> None:
    checked = run_promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout


def test_each_alert_fires_on_its_series_after_its_for_and_not_otherwise() -> None:
    tested = run_promtool("test", "rules", RULES_TESTS.name)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_every_metric_the_rules_name_is_served_by_metrics(
    config: Config, warehouse: duckdb.DuckDBPyConnection, tmp_path: Path
) -> None:
    """A real app in the daemon's view (the export's lag and the worker's figures appear only
    there) on a warehouse with a file that has a rejected row."""
    lines = ["1,1,2022-01-01,1.00,deposit", "2,1,2022-01-01,x,deposit"]
    ingest_file(warehouse, write_csv(tmp_path / "one.csv", TX_HEADER, lines), config)
    with TestClient(app=create_app(config, warehouse, ingest=IngestStandIn())) as client:
        served = {
            line.partition("{")[0].partition(" ")[0]
            for line in client.get("/metrics").text.splitlines()
            if line and not line.startswith("#")
        }
    named = set(
        METRIC_NAME.findall(RULES.read_text()) + METRIC_NAME.findall(RULES_TESTS.read_text())
    )
    assert len(named) >= 10
    assert named - served == set()
