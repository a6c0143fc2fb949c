"""Open the DuckDB warehouse and apply the numbered migrations in ``sql/``.

The schema version lives in the database (``schema_version``), so opening an older warehouse
brings it up to date and opening a current one changes nothing.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import duckdb

from moneylion.config import Config
from moneylion.db import one_row, transaction
from moneylion.errors import MoneylionError

_MIGRATION_NAME = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")


class WarehouseLocked(MoneylionError, RuntimeError):
    """Another process holds the DuckDB file (usually a second daemon)."""


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every migration shipped in the package, in order."""
    found = []
    for entry in resources.files("moneylion.sql").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append((int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def schema_version(conn: duckdb.DuckDBPyConnection) -> int:
    """The highest migration applied to this database, 0 for a new one."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_version ("
        " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
        " applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
    )
    return int(one_row(conn, "SELECT coalesce(max(version), 0) FROM schema_version")[0])


def migrate(conn: duckdb.DuckDBPyConnection) -> int:
    """Apply every migration newer than the database, each in its own transaction."""
    current = schema_version(conn)
    for version, name, sql in migrations():
        if version <= current:
            continue
        with transaction(conn):
            conn.execute(sql)
            conn.execute(
                "INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, name]
            )
        current = version
    return current


def connect(path: Path, memory_limit: str = "1GB", threads: int = 2) -> duckdb.DuckDBPyConnection:
    """Open (creating if needed) the warehouse at ``path`` and bring its schema up to date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        conn = duckdb.connect(
            str(path),
            config={
                "memory_limit": memory_limit,
                "threads": threads,
                # Nothing may download at run time (the machine may be offline).
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
            },
        )
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            raise WarehouseLocked(
                f"the warehouse {path} is in use by another process "
                "(is a moneylion daemon already running on it?)"
            ) from exc
        raise
    # A daemon's console is for its log lines; the CLI turns the bar on itself.
    conn.execute("SET enable_progress_bar = false")
    migrate(conn)
    return conn


def open_warehouse(config: Config) -> duckdb.DuckDBPyConnection:
    """The warehouse named by ``config``, migrated."""
    return connect(config.duckdb_path, config.duckdb_memory_limit, config.duckdb_threads)
