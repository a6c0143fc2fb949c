"""Lake mode: several daemons on one Delta Lake, each file counted once, every replica alike.

The race, the crash trials and the rebuild run real ``moneylion serve`` children (separate
inboxes and warehouses, one lake path in tmp); the rest drive the publisher and the tailer in
this process on a real lake and real DuckDB files. Every test that ingests ends with verify.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import duckdb
import pytest

from moneylion.aggregates import verify
from moneylion.config import Config, ConfigError, load_config
from moneylion.ingest import ingest_file
from moneylion.ladder import from_each_rung
from moneylion.lake import apply
from moneylion.lake.publish import LakePublisher
from moneylion.lake.store import Lake
from moneylion.lake.tailer import LakeTailer, lake_for
from moneylion.schema import open_warehouse
from tests.daemon_process import DaemonProcess, logged_events, run_cli
from tests.lake_scenario import (
    USERS,
    Scenario,
    answered,
    api_answers,
    compare_replicas,
    drop,
    drop_together,
    expected_answers,
    independent,
    lake_crash_trial,
    lake_daemon,
    ledger_rows,
    make_scenario,
    polars_totals,
    raced,
    settled,
    verify_differences,
)

# --- configuration ------------------------------------------------------------------------------


def test_lake_config_resolves_a_path_and_passes_storage_options_through(tmp_path: Path) -> None:
    config_file = tmp_path / "config.toml"
    config_file.write_text(
        'lake_uri = "shared/lake"\n[lake_storage_options]\naws_region = "eu-west-1"\n'
    )
    found = load_config(config_file, environ={})
    assert found.lake_uri == str(tmp_path / "shared" / "lake")
    assert found.lake_storage_options == {"aws_region": "eu-west-1"}
    environ = {
        "MONEYLION_LAKE_URI": "s3://bucket/lake",
        "MONEYLION_LAKE_STORAGE_OPTIONS": '{"aws_conditional_put": "etag"}',
    }
    remote = load_config(config_file, environ=environ)
    assert remote.lake_uri == "s3://bucket/lake"  # a URI is passed to delta-rs as it is
    assert remote.lake_storage_options == {"aws_conditional_put": "etag"}
    assert lake_for(remote).storage_options == {"aws_conditional_put": "etag"}
    with pytest.raises(ConfigError, match="lake_storage_options"):
        load_config(config_file, environ={"MONEYLION_LAKE_STORAGE_OPTIONS": "not json"})
    assert load_config(tmp_path / "none.toml", environ={}).lake_uri == ""  # local mode


# --- in this process: the publisher and the tailer ------------------------------------------------


@pytest.fixture
def lake_config(config: Config, tmp_path: Path) -> Config:
    lake = config.with_overrides(lake_uri=str(tmp_path / "lake"))
    lake.staging_dir.mkdir(parents=True, exist_ok=True)
    lake_for(lake).create()
    return lake


def replica(config: Config, name: str) -> tuple[Config, duckdb.DuckDBPyConnection]:
    """Another warehouse on the same lake."""
    other = config.with_overrides(warehouse=config.warehouse.parent / name)
    other.warehouse.mkdir(parents=True, exist_ok=True)
    return other, open_warehouse(other)


def catch_up(conn: duckdb.DuckDBPyConnection, config: Config) -> LakeTailer:
    tailer = LakeTailer(conn.cursor(), config)
    tailer.catch_up(lake_for(config))
    return tailer


STATE = {
    "files": "SELECT file_id, name, sha256, kind, status, rows_total, rows_loaded, "
    "rows_duplicate, rows_rejected, error_reason FROM files ORDER BY file_id",
    "rejects": "SELECT * FROM rejects ORDER BY file_id, line_number",
    "users": "SELECT user_id, signup_date, country, file_id FROM users ORDER BY user_id",
    "transactions": "SELECT * FROM transactions ORDER BY transaction_id",
    "user_totals": "SELECT * FROM user_totals ORDER BY user_id",
    "daily_totals": "SELECT * FROM daily_totals ORDER BY ALL",
    "top_users": "SELECT * FROM top_users ORDER BY rank",
    "country_monthly_totals": "SELECT month, country, transaction_type, tx_count, total_amount "
    "FROM country_monthly_totals WHERE tx_count <> 0 ORDER BY ALL",
}


def state(conn: duckdb.DuckDBPyConnection) -> dict[str, list[Any]]:
    return {name: conn.execute(sql).fetchall() for name, sql in STATE.items()}


def files_of(folder: Path, seed: int) -> list[Path]:
    scenario = make_scenario(folder, seed, files=14, rows=40)
    paths = scenario.all
    (folder / "broken.csv").write_text("no,header,here\n1,2,3\n")
    (folder / "header-only.csv").write_text("user_id,signup_date,country\n")
    (folder / "all-bad.csv").write_text(
        "transaction_id,user_id,transaction_date,amount,transaction_type\n"
        "0,1,2022-01-01,1.00,deposit\n5,1,2022-02-30,1.00,deposit\n6,1,2022-01-01,-1,gift\n"
    )
    paths += [folder / "header-only.csv", folder / "all-bad.csv"]
    # A file again later, one again right after itself (in one batch), one refused whole.
    return [*paths, paths[0], paths[-1], folder / "broken.csv"]


# Each declared way of applying a lake chunk (lake/paths.py LAKE_APPLY), paired with a local ladder
# started at one of its rungs: (the local ladders' name, the tuning that leads chunks there).
LAKE_WAYS = {
    "lake_gathered": ("from_0", {}),
    "lake_resolved": ("from_1", {"gathered_rows": 0}),
    "lake_alone": ("from_2", {"gathered_rows": 0, "alone_rows": 1, "lake_chunk_files": 1}),
}


@pytest.mark.parametrize("way", sorted(LAKE_WAYS))
def test_a_replica_holds_what_local_mode_holds_for_the_same_files(
    lake_config: Config, tmp_path: Path, way: str, caplog: pytest.LogCaptureFixture
) -> None:
    rung, tuned = LAKE_WAYS[way]
    lake_config = lake_config.with_overrides(tuning=replace(lake_config.tuning, **tuned))
    paths = files_of(tmp_path / "src", seed=5)
    local = lake_config.with_overrides(lake_uri="", warehouse=tmp_path / "local")
    local.warehouse.mkdir()
    local_conn = open_warehouse(local)
    for path in paths:
        ingest_file(local_conn, path, local, ladders=from_each_rung()[rung])
    publisher = LakePublisher(lake_for(lake_config), lake_config)
    half = len(paths) // 2  # one file at a time, then the rest as one batch (a file twice)
    outcomes = [publisher.ingest_file(local_conn, path, lake_config) for path in paths[:half]]
    outcomes += publisher.publish_paths(paths[half:], lake_config)
    distinct = len({p.read_bytes() for p in paths})
    assert [o.status for o in outcomes].count("duplicate_file") == len(paths) - distinct
    conn = open_warehouse(lake_config)
    with caplog.at_level("INFO", logger="moneylion.lake.apply"):
        tailer = catch_up(conn, lake_config)
    assert tailer.lag().files == 0
    taken = [
        path
        for r in caplog.records
        if r.getMessage() == "lake_applied"
        for path in r.fields["paths"]  # type: ignore[attr-defined]
    ]
    assert way in taken
    assert state(conn) == state(local_conn)
    assert verify(conn) == []
    assert verify(local_conn) == []
    local_conn.close()
    conn.close()


def test_large_files_stream_from_the_reader_and_hold_what_local_mode_holds(
    lake_config: Config,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past batch_file_max_bytes a clean file's rows stream from DuckDB's reader; a file with
    anything the reference rules must decide falls back to them (and says why). The replica
    appends a large file alone straight from the lake unless some of its ids are stored."""
    # Alone from one row on; the SQL rules for any other chunk, as for large ones.
    large = lake_config.with_overrides(
        batch_file_max_bytes=40,
        tuning=replace(lake_config.tuning, alone_rows=1, gathered_rows=0),
    )
    paths = files_of(tmp_path / "src", seed=8)
    (tmp_path / "src" / "quoted.csv").write_text(
        'user_id,signup_date,country\n7,2021-01-01,"Korea, Republic of"\n'
    )
    (tmp_path / "src" / "copies.csv").write_text(
        "transaction_id,user_id,transaction_date,amount,transaction_type\n"
        "900001,3,2022-05-01,10.00,deposit\n900001,3,2022-05-01,10.00,deposit\n"
    )
    paths += [tmp_path / "src" / "quoted.csv", tmp_path / "src" / "copies.csv"]
    local = large.with_overrides(lake_uri="", warehouse=tmp_path / "local")
    local.warehouse.mkdir()
    local_conn = open_warehouse(local)
    for path in paths:
        ingest_file(local_conn, path, local)
    publisher = LakePublisher(lake_for(large), large)
    with caplog.at_level("INFO", logger="moneylion.lake.publish"):
        for path in paths:
            publisher.publish_paths([path], large)
    reasons = [r.fields["reason"] for r in caplog.records if r.getMessage() == "ingest_fallback"]
    assert any("more than once" in reason for reason in reasons)
    assert any("fails its check or holds a quote" in reason for reason in reasons)
    assert len(reasons) < len(paths)  # the others took the reader's path
    conn = open_warehouse(large)
    # A file per transaction, as a large one.
    large = large.with_overrides(tuning=replace(large.tuning, lake_chunk_files=1))
    caplog.clear()
    with caplog.at_level("INFO", logger="moneylion.lake.apply"):
        catch_up(conn, large)
    taken = {
        way
        for r in caplog.records
        if r.getMessage() == "lake_applied"
        for way in r.fields["paths"]  # type: ignore[attr-defined]
    }
    assert "lake_alone" in taken  # straight from the lake
    assert "lake_resolved" in taken  # ids already stored, or users: resolve decided
    assert state(conn) == state(local_conn)
    assert verify(conn) == []
    conn.close()
    local_conn.close()


def test_rows_of_a_crashed_attempt_are_reused_and_count_once(
    lake_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = files_of(tmp_path / "src", seed=6)[:6]
    lake = lake_for(lake_config)
    conn = open_warehouse(lake_config)

    def crash(self: Lake, candidates: object) -> object:
        raise OSError("killed between the rows and the ledger row")

    monkeypatch.setattr(Lake, "commit_ledger", crash)
    with pytest.raises(OSError, match="killed"):
        LakePublisher(lake, lake_config).publish_paths(paths, lake_config)
    rows_before = lake.status()["transactions"]["rows"]
    assert rows_before > 0
    catch_up(conn, lake_config)  # rows without a ledger row are invisible
    assert conn.execute("SELECT count(*) FROM transactions").fetchall() == [(0,)]
    monkeypatch.undo()
    fresh = lake_for(lake_config)  # a new process: its own Lake
    outcomes = LakePublisher(fresh, lake_config).publish_paths(paths, lake_config)
    assert all(o.status == "loaded" for o in outcomes)
    assert fresh.status()["transactions"]["rows"] == rows_before  # reused, not appended again
    catch_up(conn, lake_config)
    local = lake_config.with_overrides(lake_uri="", warehouse=tmp_path / "local")
    local.warehouse.mkdir()
    local_conn = open_warehouse(local)
    for path in paths:
        ingest_file(local_conn, path, local)
    assert state(conn) == state(local_conn)
    assert verify(conn) == []
    conn.close()
    local_conn.close()


def test_compaction_and_checkpoints_keep_every_replica_exact(
    lake_config: Config, tmp_path: Path
) -> None:
    paths = files_of(tmp_path / "src", seed=7)
    lake = lake_for(lake_config)
    publisher = LakePublisher(lake, lake_config)
    first, conn = replica(lake_config, "first")
    for n, path in enumerate(paths):
        publisher.publish_paths([path], lake_config)
        if n % 5 == 4:
            catch_up(conn, first)  # a reader between the maintenances
            lake.maintain(compact_after_files=2)
    catch_up(conn, first)
    lake.maintain(compact_after_files=2)
    assert lake.status()["transactions"]["files"] == 1  # compacted
    catch_up(conn, first)
    second, rebuilt = replica(lake_config, "second")
    catch_up(rebuilt, second)  # a new replica: from the compacted lake alone
    assert state(rebuilt) == state(conn)
    assert verify(conn) == []
    assert verify(rebuilt) == []
    conn.close()
    rebuilt.close()


def test_ingest_in_lake_mode_publishes_to_the_lake_and_a_daemon_applies_it(
    tmp_path: Path,
) -> None:
    paths = files_of(tmp_path / "src", seed=9)[:5]
    daemon = lake_daemon(tmp_path, "a", tmp_path / "lake")
    result = run_cli("ingest", *map(str, paths), env=daemon.environ())
    assert result.returncode == 0, result.stderr
    assert not (daemon.warehouse / "moneylion.duckdb").exists()  # the lake only
    assert len(ledger_rows(tmp_path / "lake")) == len({p.read_bytes() for p in paths})
    daemon.start()
    try:
        settled([daemon], tmp_path / "lake")
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert verify_differences(daemon) == []


def test_a_lake_daemon_refuses_a_warehouse_filled_in_local_mode(
    tmp_path: Path, lake_config: Config
) -> None:
    local = lake_config.with_overrides(lake_uri="")
    conn = open_warehouse(local)
    ingest_file(conn, files_of(tmp_path / "src", seed=10)[0], local)
    assert verify(conn) == []
    conn.close()
    daemon = lake_daemon(tmp_path, "x", tmp_path / "lake")
    daemon.warehouse = lake_config.warehouse
    daemon.start(wait_ready=False)
    try:
        assert daemon.proc is not None
        assert daemon.proc.wait(60) == 2
        assert "local mode" in daemon.stderr_text()
    finally:
        daemon.close()


# --- two real daemons racing on one lake ---------------------------------------------------------


@dataclass
class Race:
    lake: Path
    scenario: Scenario
    daemons: list[DaemonProcess]
    answers: list[dict[str, Any]]
    problems: list[str]
    raced: list[str]
    verified: list[list[str]]
    base: Path
    ready: list[dict[str, Any]]
    metrics: list[str]


# Run in each racing daemon before it serves: its first ledger commit waits (30 s at most) until
# the other daemon has come to its own, so both commit the files they share at the same time
# and the race the tests below are about happens every time, not when the scheduler allows it
# (on a busy machine one daemon could otherwise commit everything before the other starts).
MEET_AT_THE_FIRST_COMMIT = """
import time
from pathlib import Path
from moneylion.lake import store
_commit = store.Lake.commit_ledger
def _meet(self, candidates):
    here = Path({base!r}) / "at-first-commit-{me}"
    if not here.exists():
        here.touch()
        others = [p for p in Path({base!r}).glob("at-first-commit-*") if p != here]
        deadline = time.monotonic() + 30
        while not others and time.monotonic() < deadline:
            time.sleep(0.01)
            others = [p for p in Path({base!r}).glob("at-first-commit-*") if p != here]
    return _commit(self, candidates)
store.Lake.commit_ledger = _meet
"""


@pytest.fixture(scope="module")
def race(tmp_path_factory: pytest.TempPathFactory) -> Race:
    """Two daemons, the same files dropped into both inboxes at once plus files only one sees;
    answers read once both caught up, then both stopped and verified."""
    base = tmp_path_factory.mktemp("race")
    lake = base / "lake"
    scenario = make_scenario(base / "src", seed=11, files=30, rows=80)
    daemons = [
        lake_daemon(
            base, name, lake, preamble=MEET_AT_THE_FIRST_COMMIT.format(base=str(base), me=name)
        )
        for name in ("a", "b")
    ]
    try:
        for daemon in daemons:
            daemon.start()
        drop_together(scenario, [d.inbox for d in daemons])
        settled(daemons, lake)
        problems = compare_replicas(daemons[0], daemons[1], lake, scenario)
        answers = [api_answers(d, USERS) for d in daemons]
        ready = [d.get("/v1/health/ready") for d in daemons]
        metrics = [d.client.get("/metrics").text for d in daemons]
        codes = [d.stop() for d in daemons]
        assert codes == [0, 0]
    finally:
        for daemon in daemons:
            daemon.close()
    verified = [verify_differences(d) for d in daemons]
    return Race(
        lake, scenario, daemons, answers, problems, raced(daemons), verified, base, ready, metrics
    )


def test_racing_daemons_commit_every_file_once_and_answer_alike(race: Race) -> None:
    assert race.problems == []
    shas = [row["sha256"] for row in ledger_rows(race.lake)]
    assert len(shas) == len(set(shas)) == len({p.read_bytes() for p in race.scenario.all})
    assert race.answers[0] == race.answers[1]
    assert answered(race.answers[0]) == expected_answers(independent(race.lake, race.scenario.all))
    # Cross-file rules were met: conflicts across files, files sent twice, users updated.
    files = race.answers[0]["files"]["items"]
    reasons = {reason for found in race.answers[0]["rejects"].values() for _, reason, _ in found}
    assert {"conflicts_with_stored", "duplicate_in_file", "too_many_decimals"} <= reasons
    assert sum(f["rows_duplicate"] for f in files) > 0
    countries = {u: s["country"] for u, s in race.answers[0]["users"].items() if s}
    assert len({c for c in countries.values() if c}) > 1
    assert any(s and not s["known_user"] for s in race.answers[0]["users"].values())  # orphans


def test_the_log_shows_the_daemons_really_raced(race: Race) -> None:
    assert race.raced, "neither a lost ledger commit nor a duplicate found by the second"


def test_verify_passes_on_both_replicas(race: Race) -> None:
    assert race.verified == [[], []]


def test_polars_reads_the_same_totals_from_the_lake_as_the_api(race: Race) -> None:
    assert polars_totals(race.lake) == answered(race.answers[0])


def test_health_and_metrics_show_each_replicas_lag_behind_the_lake(race: Race) -> None:
    files = len(ledger_rows(race.lake))
    for ready, metrics in zip(race.ready, race.metrics, strict=True):
        assert ready["lake"]["applied_files"] == ready["lake"]["lake_files"] == files
        assert ready["lake"]["lag_files"] == 0
        assert ready["lake"]["applied_version"] >= 1
        gauges = dict(
            line.split(" ", 1) for line in metrics.splitlines() if line.startswith("moneylion_lake")
        )
        assert float(gauges["moneylion_lake_lag_files"]) == 0
        # Read a moment later: maintenance may have added a version since.
        assert float(gauges["moneylion_lake_applied_version"]) >= ready["lake"]["applied_version"]
        assert float(gauges["moneylion_lake_version"]) >= float(
            gauges["moneylion_lake_applied_version"]
        )


def test_lake_status_prints_versions_files_size_and_each_tables_lag(race: Race) -> None:
    daemon = race.daemons[0]
    result = run_cli("lake", "status", "--json", env=daemon.environ())
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["files"] == len(ledger_rows(race.lake))
    assert report["applied"]["file_id"] == report["files"]
    for name in ("transactions", "users", "rejects", "files"):
        table = report["tables"][name]
        assert table["version"] >= 1
        assert table["bytes"] > 0
        assert table["lag"]["rows"] == 0
    text = run_cli("lake", "status", env=daemon.environ())
    assert "transactions" in text.stdout
    assert "lag" in text.stdout


def test_a_deleted_warehouse_is_rebuilt_from_the_lake(race: Race) -> None:
    shutil.rmtree(race.daemons[1].warehouse)
    daemon = lake_daemon(race.base, "b", race.lake)  # the same folders, a new process
    daemon.start()
    try:
        settled([daemon], race.lake)
        assert api_answers(daemon, USERS) == race.answers[0]
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert verify_differences(daemon) == []


# --- SIGKILL ----------------------------------------------------------------------------------

# Run in a daemon before it serves: it dies by SIGKILL where a file's rows are in the lake and
# its ledger row is not yet.
KILLED_BEFORE_THE_LEDGER = """
import os, signal
from moneylion.lake import store
store.Lake.commit_ledger = lambda self, candidates: os.kill(os.getpid(), signal.SIGKILL)
"""


def lake_rows(lake: Path) -> int:
    """Rows in the lake's row tables (rows and rejects), whoever names them."""
    tables = Lake(str(lake)).status()
    return sum(tables[name]["rows"] for name in ("transactions", "users", "rejects"))


def test_a_daemon_killed_between_rows_and_ledger_row_reuses_the_rows_after_restart(
    tmp_path: Path,
) -> None:
    lake = tmp_path / "lake"
    scenario = make_scenario(tmp_path / "src", seed=12, files=8, rows=30)
    doomed = lake_daemon(tmp_path, "a", lake, preamble=KILLED_BEFORE_THE_LEDGER)
    doomed.start()
    try:
        drop(scenario.all, doomed.inbox)
        assert doomed.proc is not None
        assert doomed.proc.wait(60) == -9  # killed with its rows in the lake
    finally:
        doomed.close()
    assert ledger_rows(lake) == []
    written = lake_rows(lake)
    assert written > 0
    daemon = lake_daemon(tmp_path, "a", lake)  # the same folders, restarted
    daemon.start()
    try:
        settled([daemon], lake)
        answers = api_answers(daemon, USERS)
        assert daemon.stop() == 0
    finally:
        daemon.close()
    events = [e["event"] for e in logged_events(daemon.warehouse)]
    assert lake_rows(lake) >= written  # the later files' rows came
    assert "lake_rows_reused" in events
    assert lake_rows(lake) == sum(  # and no file's rows twice
        r["rows_loaded"] + r["rows_rejected"] for r in ledger_rows(lake)
    )
    assert answered(answers) == expected_answers(independent(lake, scenario.all))
    assert verify_differences(daemon) == []


@pytest.mark.parametrize("seed", [101, 102, 103])
def test_a_daemon_killed_at_random_moments_leaves_every_replica_exact(
    tmp_path: Path, seed: int
) -> None:
    assert lake_crash_trial(tmp_path, seed) == []


def test_the_scenario_is_not_trivial(tmp_path: Path) -> None:
    """The independent computation sees what the cross-file rules are for."""
    scenario = make_scenario(tmp_path, seed=11, files=30, rows=80)
    contents = [p.read_bytes() for p in scenario.all]
    assert len(contents) > len(set(contents))  # files sent twice
    assert scenario.shared
    assert scenario.only[0]
    assert scenario.only[1]


def test_a_local_error_while_applying_is_retried_never_a_quarantine(
    lake_config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk or a lock while a replica applies says nothing of the lake's rows: the
    entry stays pending (no quarantine, the mark unmoved) and applies once the error is gone."""
    paths = files_of(tmp_path / "src", seed=6)[:4]
    LakePublisher(lake_for(lake_config), lake_config).publish_paths(paths, lake_config)
    conn = open_warehouse(lake_config)
    tailer = LakeTailer(conn.cursor(), lake_config)
    screen_rows = apply.screen_rows

    def disk_full(*args: Any, **kwargs: Any) -> Any:
        raise duckdb.IOException("No space left on device")

    monkeypatch.setattr(apply, "screen_rows", disk_full)
    with pytest.raises(duckdb.IOException):
        tailer.catch_up(lake_for(lake_config))
    assert tailer.mark == apply.Mark()
    assert tailer.lag().quarantined_files == 0
    monkeypatch.setattr(apply, "screen_rows", screen_rows)
    tailer.catch_up(lake_for(lake_config))
    assert tailer.lag().files == 0
    assert tailer.lag().quarantined_files == 0
    assert conn.execute("SELECT count(*) FROM lake_quarantine").fetchall() == [(0,)]
    (files,) = conn.execute("SELECT count(*) FROM files").fetchall()[0]
    assert files == len(ledger_rows(Path(lake_config.lake_uri)))
    assert verify(conn) == []
    conn.close()
