"""Incremental, crash-safe copy of what is new in the warehouse into ``warehouse/moneylion.sqlite``.

The SQLite file is what older tools read. It holds the seed's tables with the seed's columns and
types (``users``, ``transactions``: dates as TEXT ``YYYY-MM-DD``, ``amount`` REAL), the file ledger
(``files``), the aggregates (``user_totals``, ``daily_totals``, ``top_users``) with exact TEXT
totals, and ``export_state`` (``last_file_id``: the last change exported, a file's id or a
correction's change id; the sha256 of the last file; the format).

| module | owns |
|---|---|
| ``schema`` | the SQLite tables and views, the SQL adding cents to TEXT totals, the watermark |
| ``increment`` | ``export_new``: one SQLite transaction per export, small or large (side file) |
| ``corrected`` | an increment holding corrections: the rows and totals they touched, copied |
| ``full`` | ``export_full``: a new file written aside and renamed over the old one |
| ``bulk`` | private SQLite files written from DuckDB's Arrow streams by ADBC's SQLite driver |
| ``writer`` | the exporter's long-lived connection to the live file, its WAL checkpoints |
| ``snapshot`` | the DuckDB read transaction an export reads, the columns as SQLite stores them |
| ``outcome`` | ``ExportResult``, its log event, the crash tests' fault hook |

Why Python's sqlite3 and ADBC, and not DuckDB's sqlite extension: the extension cannot be
downloaded at run time and its offline wheels stop at an older DuckDB, on which moneylion's
ingest is markedly slower; using it would also mean a second DuckDB in another process, fed a
copy of the data. It writes no faster than ADBC's SQLite driver, which releases the GIL.
Python's sqlite3 keeps the live file: small increments and the API's reads. The measurements
are in docs/performance.md; ``bench/export.py`` prints the current figures.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys

from moneylion.config import Config
from moneylion.export import writer
from moneylion.export.full import export_full
from moneylion.export.increment import export_new
from moneylion.export.outcome import ExportResult
from moneylion.export.schema import EXPORT_FORMAT
from moneylion.schema import open_warehouse

__all__ = [
    "EXPORT_FORMAT",
    "ExportResult",
    "close_sqlite",
    "export_full",
    "export_new",
    "interrupt_export",
    "run_export",
]


def close_sqlite() -> None:
    """Close the exporter's SQLite connection (the daemon calls this when it stops)."""
    with writer.LOCK:
        writer.drop()


def interrupt_export() -> None:
    """Abort a running export's SQLite statement from another thread; it rolls back whole."""
    with contextlib.suppress(sqlite3.ProgrammingError):  # closed meanwhile: nothing to stop
        writer.interrupt()


def run_export(config: Config, full: bool) -> int:
    """``moneylion export [--full]``: bring the SQLite file up to date, print one line."""
    conn = open_warehouse(config)
    try:
        if full:
            result = export_full(conn, config.sqlite_path, tuning=config.tuning)
        else:
            result = export_new(conn, config.sqlite_path, tuning=config.tuning)
    except (sqlite3.Error, OSError) as exc:
        print(f"moneylion export: {config.sqlite_path}: {exc}", file=sys.stderr)
        return 1
    finally:
        close_sqlite()
        conn.close()
    print(result.summary())
    return 0
