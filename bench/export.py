"""SQLite export: a 1,000-row file into a SQLite file already holding 10M transactions (target
<= 20 ms) and a full 10M-row export (target <= 10 s).

The warehouse (1M users, 10M transactions) is built once and cached in bench/out/export-<n>/;
each run copies it, writes a full export, then ingests ``--files`` files of 1,000 new rows and
times ``export_new`` after each one, as the daemon does. Prints figures; no asserts.

    .venv/bin/python bench/export.py [--transactions 10000000] [--files 40]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moneylion.config import Config, load_config  # noqa: E402
from moneylion.export import close_sqlite, export_full, export_new  # noqa: E402
from moneylion.generate import generate  # noqa: E402
from moneylion.ingest import ingest_file  # noqa: E402
from moneylion.schema import open_warehouse  # noqa: E402

OUT = REPO / "bench" / "out"
TX_HEADER = "transaction_id,user_id,transaction_date,amount,transaction_type\n"


def source_csvs(folder: Path, users: int, transactions: int) -> list[Path]:
    """users.csv and transactions.csv from moneylion.generate, written once."""
    done = folder / "csv.done"
    if done.exists():
        return [folder / "users.csv", folder / "transactions.csv"]
    written = generate(folder, users=users, transactions=transactions, bad_rate=0.0, seed=1)
    done.touch()
    return written


def bench_config(warehouse: Path) -> Config:
    return load_config(environ={}).with_overrides(
        warehouse=warehouse, inbox=warehouse.parent / "inbox"
    )


def cached_warehouse(folder: Path, users: int, transactions: int) -> Path:
    """A warehouse directory holding the source files, ingested once."""
    cached = folder / "warehouse"
    if (cached / "ready").exists():
        return cached
    shutil.rmtree(cached, ignore_errors=True)
    config = bench_config(cached)
    conn = open_warehouse(config)
    try:
        for path in source_csvs(folder / "csv", users, transactions):
            print(f"  built: {ingest_file(conn, path, config).summary()}")
    finally:
        conn.close()
    (cached / "ready").touch()
    return cached


def small_file(folder: Path, first_id: int, rows: int, users: int, number: int) -> Path:
    """``rows`` new transactions of users spread over the whole id range."""
    lines = [
        f"{first_id + k},{1 + (first_id + k) * 7919 % users},2023-01-{1 + k % 28:02},"
        f"{(k % 9000) + 1}.{k % 100:02},{('deposit', 'withdrawal', 'purchase')[k % 3]}\n"
        for k in range(rows)
    ]
    path = folder / f"small_{number:03}.csv"
    path.write_text(TX_HEADER + "".join(lines))
    return path


def delta_users(sqlite_path: Path) -> int:
    """Users waiting in the SQLite file's user_totals delta (a drop means it was folded)."""
    lite = sqlite3.connect(sqlite_path)
    try:
        return int(lite.execute("SELECT count(*) FROM user_totals_delta").fetchone()[0])
    finally:
        lite.close()


def figures(millis: list[float]) -> str:
    ordered = sorted(millis)
    p90 = ordered[max(0, round(len(ordered) * 0.9) - 1)]
    return (
        f"median {statistics.median(ordered):.1f} ms, p90 {p90:.1f} ms, "
        f"max {ordered[-1]:.1f} ms, mean {statistics.fmean(ordered):.1f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--transactions", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=40, help="1,000-row files to export")
    parser.add_argument("--rows", type=int, default=1_000)
    args = parser.parse_args()

    folder = OUT / f"export-{args.transactions}"
    cached = cached_warehouse(folder, args.users, args.transactions)
    run = folder / "run"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(cached, run / "warehouse")
    (run / "files").mkdir()
    config = bench_config(run / "warehouse")
    conn = open_warehouse(config)
    try:
        full = export_full(conn, config.sqlite_path)
        size = config.sqlite_path.stat().st_size / 1e6
        print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(
            f"full export: {full.transactions:,} transactions, {full.users:,} users, "
            f"{full.seconds:.2f} s, {size:,.0f} MB  [target <= 10 s]"
        )

        first = export_new(conn, config.sqlite_path)
        print(
            f"first export_new (opens the writer, warms its page cache): "
            f"{first.seconds * 1000:.0f} ms"
        )
        idle = [export_new(conn, config.sqlite_path).seconds * 1000 for _ in range(20)]
        print(f"export_new with nothing new: {figures(idle)}")

        next_id = conn.execute("SELECT max(transaction_id) + 1 FROM transactions").fetchall()[0][0]
        committed: list[float] = []
        calls: list[float] = []
        cpus: list[float] = []
        folds: list[float] = []  # the whole calls that folded the user_totals delta
        waiting = delta_users(config.sqlite_path)
        for number in range(args.files):
            first = next_id + number * args.rows
            path = small_file(run / "files", first, args.rows, args.users, number)
            outcome = ingest_file(conn, path, config)
            started, cpu = time.perf_counter(), time.process_time()
            result = export_new(conn, config.sqlite_path)
            calls.append((time.perf_counter() - started) * 1000)
            cpus.append((time.process_time() - cpu) * 1000)
            assert outcome.rows_loaded == result.transactions == args.rows, outcome.summary()
            committed.append(result.seconds * 1000)
            now_waiting = delta_users(config.sqlite_path)
            if now_waiting < waiting:
                folds.append(calls[-1])
            waiting = now_waiting
        print(
            f"export_new of a {args.rows:,}-row file into {full.transactions:,} transactions "
            f"[target <= 20 ms], {len(calls)} files:\n"
            f"  until the SQLite COMMIT (rows visible): {figures(committed)}\n"
            f"  whole call:                             {figures(calls)}\n"
            f"  process CPU time of the call:           {figures(cpus)}\n"
            f"  calls that folded the user_totals delta into the base: {len(folds)} "
            f"({', '.join(f'{m:.0f} ms' for m in folds) or '-'})"
        )
        print(f"load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    finally:
        close_sqlite()
        conn.close()
    shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
