"""``export_full``: the SQLite file rebuilt from one DuckDB snapshot, written aside, renamed over.

Every table is written by the bulk writer (ADBC: Arrow batches bound in C, the GIL released)
into ``<name>.rebuild``, with no journal (nobody sees it yet); then the watermark, WAL mode, an
fsync, and a rename over the old file. Before the rename the old file's WAL is checkpointed and
truncated, so no stale WAL frames can be replayed onto the new file. A reader that keeps a
connection open across a full rebuild must reopen it (as with any rename-based replace; the
API's reader does so by itself). 10M transactions + 1M users: see ``bench/export.py``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from pathlib import Path

import duckdb

from moneylion.export import bulk, writer
from moneylion.export.outcome import ExportResult, log_result, reached
from moneylion.export.schema import write_state
from moneylion.export.snapshot import (
    high_mark,
    select_as_sqlite,
    snapshot,
)
from moneylion.tuning import DEFAULT, Tuning

# Each table whole as of change $hi (a file or a correction), in primary-key order (appending
# to SQLite's b-tree is cheapest). Every file up to $hi is committed in the snapshot, and none
# after it.
_TRANSACTIONS = (
    "transactions",
    f"{select_as_sqlite('transactions')} WHERE file_id <= $hi ORDER BY transaction_id",
)
_OTHER_TABLES = (
    ("files", f"{select_as_sqlite('files')} WHERE file_id <= $hi ORDER BY file_id"),
    ("users", f"{select_as_sqlite('users')} WHERE file_id <= $hi ORDER BY user_id"),
    ("user_totals_base", f"{select_as_sqlite('user_totals')} ORDER BY user_id"),
    ("daily_totals", f"{select_as_sqlite('daily_totals')} ORDER BY 1, 2"),
    ("top_users", f"{select_as_sqlite('top_users')} ORDER BY rank"),
    (
        "country_monthly_totals",
        f"{select_as_sqlite('country_monthly_totals')} WHERE tx_count > 0 ORDER BY 1, 2, 3",
    ),
)
_TRANSACTION_COUNT = "SELECT count(*) FROM transactions WHERE file_id <= $hi"


def export_full(
    conn: duckdb.DuckDBPyConnection, sqlite_path: Path, *, tuning: Tuning = DEFAULT
) -> ExportResult:
    """Rebuild the SQLite file from one DuckDB snapshot: write aside, then rename over it."""
    started = time.perf_counter()
    with writer.LOCK:
        return rebuild(conn, Path(sqlite_path), started, tuning)


def rebuild(
    conn: duckdb.DuckDBPyConnection, sqlite_path: Path, started: float, tuning: Tuning
) -> ExportResult:
    """``export_full`` with ``writer.LOCK`` held. From ``tuning.parallel_min_transactions``
    transactions on, a thread of their own writes them into the aside file while this one
    writes the other tables into a side file, copied in after."""
    sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    aside = bulk.aside_path(sqlite_path)
    side = bulk.side_path(aside)
    bulk.remove(side)  # of a killed export, if any
    try:
        bulk.create(aside)
        with snapshot(conn) as cur:
            high, high_sha = high_mark(cur)
            (count,) = cur.execute(_TRANSACTION_COUNT, {"hi": high}).fetchall()[0]
            if count < tuning.parallel_min_transactions:
                written = bulk.append(aside, cur, (_TRANSACTIONS, *_OTHER_TABLES), {"hi": high})
                copied_in = None
            else:
                written = _write_in_two_threads(conn, cur, aside, side, (high, high_sha))
                copied_in = side
        reached("rows_written")
        _finish(aside, copied_in, high, high_sha)
        _fsync(aside)
    except BaseException:
        bulk.remove(aside)
        raise
    finally:
        bulk.remove(side)
    reached("aside_written")
    writer.drop()
    _retire_wal(sqlite_path)
    reached("before_rename")
    os.replace(aside, sqlite_path)
    _fsync(sqlite_path.parent)
    result = ExportResult(
        sqlite_path,
        True,
        written["files"],
        written["users"],
        written["transactions"],
        0,
        high,
        time.perf_counter() - started,
    )
    log_result(result)
    return result


def _write_in_two_threads(
    conn: duckdb.DuckDBPyConnection,
    cur: duckdb.DuckDBPyConnection,
    aside: Path,
    side: Path,
    mark: tuple[int, str | None],
) -> dict[str, int]:
    """The transactions into ``aside`` on a thread of their own, the other tables into ``side``
    on this one (``_finish`` copies them in); the rows written per table.

    The bulk writer holds no GIL, so the two use both cores (the transactions are most of the
    work; the copy is cheap: SQLite moves records into empty tables undecoded). The thread reads
    in a snapshot of its own, the export's if it holds the same last change (``mark``: every
    commit brings a new file or change id). A commit between the two (a correction deletes
    transactions) leaves the thread nothing to write: this one writes them after the others.
    """
    transactions: dict[str, int] = {}
    failed: list[BaseException] = []
    reader = conn.cursor()
    params = {"hi": mark[0]}

    def write_transactions() -> None:
        try:
            reader.execute("BEGIN TRANSACTION")
            if high_mark(reader) == mark:
                transactions.update(bulk.append(aside, reader, (_TRANSACTIONS,), params))
        except BaseException as exc:  # raised again by the export's thread
            failed.append(exc)

    thread = threading.Thread(target=write_transactions, name="sqlite-export-transactions")
    thread.start()
    try:
        bulk.create(side)
        written = bulk.append(side, cur, _OTHER_TABLES, params)
    except BaseException:
        reader.interrupt()  # the thread's DuckDB read fails, its write rolls back
        raise
    finally:
        thread.join()
        reader.close()  # ends its read transaction
    if failed:
        raise failed[0]
    if not transactions:
        transactions = bulk.append(aside, cur, (_TRANSACTIONS,), params)
    return written | transactions


def _finish(aside: Path, side: Path | None, high: int, high_sha: str | None) -> None:
    """In one transaction of the aside file: the side file's tables copied into its empty ones
    (if any), and the watermark; then WAL mode, as the live file has."""
    lite = sqlite3.connect(aside, isolation_level=None)
    try:
        lite.execute("PRAGMA journal_mode=OFF")  # nobody sees the file yet
        if side is not None:
            lite.execute("ATTACH DATABASE ? AS side", (str(side),))
        lite.execute("BEGIN")
        if side is not None:
            for table, _ in _OTHER_TABLES:
                lite.execute(f"INSERT INTO main.{table} SELECT * FROM side.{table}")
        write_state(lite, high, high_sha)
        lite.execute("COMMIT")
        if side is not None:
            lite.execute("DETACH DATABASE side")
        lite.execute("PRAGMA journal_mode=WAL")
    finally:
        lite.close()


def _retire_wal(sqlite_path: Path) -> None:
    """Checkpoint and truncate the live file's WAL before a rename replaces the file.

    WAL frames are not tied to a database file: frames left in ``<name>-wal`` would be replayed
    onto the new file and corrupt it.
    """
    if not sqlite_path.exists():
        return
    wal = sqlite_path.with_name(sqlite_path.name + "-wal")
    lite = sqlite3.connect(sqlite_path, isolation_level=None, timeout=30.0)
    try:
        busy = lite.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.OperationalError:
        raise
    except sqlite3.DatabaseError:  # not a database: nobody can be reading it, drop its WAL
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                sqlite_path.with_name(sqlite_path.name + suffix).unlink()
        return
    finally:
        lite.close()
    if busy and busy[0] and wal.exists() and wal.stat().st_size > 0:
        raise sqlite3.OperationalError(
            f"cannot replace {sqlite_path}: a reader holds its WAL (busy checkpoint)"
        )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
