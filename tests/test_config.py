"""config.toml -> Config, with MONEYLION_* overrides."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from moneylion.config import ConfigError, load_config
from moneylion.rules import latest_date
from moneylion.schema import migrate, migrations, open_warehouse, schema_version


def test_defaults_come_from_the_project_config_toml() -> None:
    config = load_config(environ={})
    project = Path(__file__).resolve().parent.parent
    assert config.inbox == project / "inbox"
    assert config.duckdb_path == project / "warehouse" / "moneylion.duckdb"
    assert (config.host, config.port, config.sqlite_export) == ("127.0.0.1", 8000, True)


def test_environment_overrides_each_key_with_its_type(tmp_path: Path) -> None:
    config = load_config(
        environ={
            "MONEYLION_PORT": "9001",
            "MONEYLION_WAREHOUSE": str(tmp_path / "w"),
            "MONEYLION_SQLITE_EXPORT": "false",
            "MONEYLION_SETTLE_SECONDS": "0.25",
        }
    )
    assert (config.port, config.sqlite_export, config.settle_seconds) == (9001, False, 0.25)
    assert config.sqlite_path == tmp_path / "w" / "moneylion.sqlite"


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "other.toml"
    path.write_text('inbox = "drop"\nport = 9100\n')
    config = load_config(path, environ={})
    assert (config.inbox, config.warehouse, config.port) == (
        tmp_path / "drop",
        tmp_path / "warehouse",
        9100,
    )


def test_unknown_keys_and_bad_values_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("prot = 1\n")
    with pytest.raises(ConfigError, match="unknown config keys"):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="'duckdb_threads'"):
        load_config(environ={"MONEYLION_DUCKDB_THREADS": "two"})
    for nice in ("-1", "20"):
        with pytest.raises(ConfigError, match="'ingest_nice'"):
            load_config(environ={"MONEYLION_INGEST_NICE": nice})
    assert load_config(environ={"MONEYLION_INGEST_NICE": "0"}).ingest_nice == 0
    with pytest.raises(ConfigError, match="'max_future_days'"):
        load_config(environ={"MONEYLION_MAX_FUTURE_DAYS": "-1"})
    # Past the last date there is, the bound is that date (no overflow).
    far = load_config(environ={"MONEYLION_MAX_FUTURE_DAYS": "3000000"})
    assert latest_date(dt.datetime(2026, 3, 10), far.max_future_days) == dt.date.max


def test_migrations_apply_once_and_record_the_version(tmp_path: Path) -> None:
    config = load_config(environ={}).with_overrides(warehouse=tmp_path, inbox=tmp_path / "in")
    conn = open_warehouse(config)
    latest = migrations()[-1][0]
    assert schema_version(conn) == latest
    assert migrate(conn) == latest  # nothing left to apply
    assert conn.execute("SELECT count(*) FROM schema_version").fetchall() == [(latest,)]
    conn.close()
