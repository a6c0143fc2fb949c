"""Time from a 1,000-row file appearing in the inbox to its rows being visible over HTTP.

A ``moneylion serve`` child runs on a warehouse already holding 10M transactions (built once and
cached in bench/out/). Each drop is written under a temp name and renamed into the inbox (the
producer protocol the README recommends); the clock runs from the rename to the first HTTP
answer that shows the file's rows. Prints p50/p99 over 50 drops; no asserts.

    .venv/bin/python bench/latency.py [--drops 50] [--transactions 10000000]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moneylion.config import Config, load_config  # noqa: E402
from moneylion.export import close_sqlite, export_new  # noqa: E402
from moneylion.generate import write_transactions as write_generated  # noqa: E402
from moneylion.ingest import ingest_file  # noqa: E402
from moneylion.schema import open_warehouse  # noqa: E402
from tests.daemon_process import (  # noqa: E402
    DaemonProcess,
    logged_events,
    random_transactions,
    write_transactions,
)

OUT = REPO / "bench" / "out"
USERS = 1_000_000
DROP_IDS_FROM = 10**12


def base_csv(transactions: int) -> Path:
    """A transactions CSV of ``transactions`` rows from moneylion.generate, cached."""
    path = OUT / f"latency-{transactions}" / "transactions.csv"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        write_generated(path.with_suffix(".building"), transactions, users=USERS, seed=1)
        os.rename(path.with_suffix(".building"), path)
        print(f"generated {transactions:,} transactions ({time.perf_counter() - started:.1f} s)")
    return path


def base_warehouse(transactions: int) -> Path:
    """The DuckDB file holding ``transactions`` rows and its SQLite export, built once, cached."""
    cached = OUT / f"latency-{transactions}" / "warehouse"
    if not (cached / "moneylion.duckdb").exists():
        csv_path = base_csv(transactions)
        building = cached.with_name("warehouse.building")
        shutil.rmtree(building, ignore_errors=True)
        config = bench_config(building)
        conn = open_warehouse(config)
        started = time.perf_counter()
        outcome = ingest_file(conn, csv_path, config)
        print(
            f"built the base warehouse: {outcome.summary()} ({time.perf_counter() - started:.1f} s)"
        )
        conn.close()
        os.rename(building, cached)
    # Up to date in a few ms, or rebuilt when missing or of an older export format.
    config = bench_config(cached)
    conn = open_warehouse(config)
    try:
        result = export_new(conn, config.sqlite_path)
    finally:
        close_sqlite()
        conn.close()
    if result.exported_anything:
        print(f"exported the base warehouse to SQLite ({result.seconds:.1f} s)")
    return cached


def bench_config(warehouse: Path) -> Config:
    return load_config(environ={}).with_overrides(inbox=warehouse / "unused", warehouse=warehouse)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drops", type=int, default=50)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--transactions", type=int, default=10_000_000)
    parser.add_argument(
        "--no-export", dest="export", action="store_false", help="turn the SQLite export off"
    )
    parser.add_argument("--poll-ms", type=float, default=2.0, help="pause between HTTP probes")
    args = parser.parse_args()

    cached = base_warehouse(args.transactions)
    run = OUT / "latency-run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "inbox").mkdir(parents=True)
    (run / "warehouse").mkdir()
    for name in ("moneylion.duckdb", "moneylion.sqlite"):
        shutil.copyfile(cached / name, run / "warehouse" / name)
    # Flush the copies now: otherwise the daemon's first fsync (the first SQLite checkpoint)
    # writes back the whole freshly copied 0.5 GB and stalls the drop it coincides with.
    os.sync()

    rng = random.Random(42)
    staging = run / "staging"
    staging.mkdir()
    probes: list[tuple[Path, int]] = []
    for n in range(args.drops):
        first_id = DROP_IDS_FROM + n * args.rows  # far above the generated ids
        rows = random_transactions(rng, first_id, args.rows, USERS)
        probe_user = 2 * USERS + n  # a user only this file mentions: visible iff the file is
        rows[-1] = (rows[-1][0], probe_user, *rows[-1][2:])
        probes.append((write_transactions(staging / f"drop-{n:03d}.csv", rows), probe_user))

    env = {
        "MONEYLION_SQLITE_EXPORT": "true" if args.export else "false",
        "MONEYLION_LOG_LEVEL": "INFO",  # the breakdown below reads the JSON log
    }
    daemon = DaemonProcess(run / "inbox", run / "warehouse", settle_seconds=0.5, env=env)
    latencies: list[float] = []
    dropped_at: dict[str, float] = {}
    try:
        daemon.start(timeout=120)
        for path, probe_user in probes:
            temp = daemon.inbox / (path.name + ".tmp")
            shutil.copyfile(path, temp)
            started = time.perf_counter()
            dropped_at[path.name] = time.time()
            os.rename(temp, daemon.inbox / path.name)
            while daemon.client.get(f"/v1/users/{probe_user}/summary").status_code != 200:
                time.sleep(args.poll_ms / 1000)
            latencies.append(time.perf_counter() - started)
            time.sleep(0.2)
        files = daemon.get("/v1/files", limit=args.drops, offset=1)["items"]
        code = daemon.stop()
    finally:
        daemon.close()
    ingest = [float(f["seconds"]) for f in files]
    ms = [v * 1000 for v in latencies]
    print(
        f"latency over {len(ms)} drops of {args.rows} rows into {args.transactions:,} transactions"
        f" (export {'on' if args.export else 'off'}):"
    )
    print(
        f"  file appears -> rows visible over HTTP: p50 {percentile(ms, 0.5):.1f} ms, "
        f"p99 {percentile(ms, 0.99):.1f} ms, max {max(ms):.1f} ms, "
        f"mean {statistics.mean(ms):.1f} ms"
    )
    ingest_ms = [v * 1000 for v in ingest]
    print(
        f"  of which ingest_file (ledger seconds): p50 {percentile(ingest_ms, 0.5):.1f} ms, "
        f"p99 {percentile(ingest_ms, 0.99):.1f} ms"
    )
    # From the JSON log (millisecond timestamps): rename -> worker starts -> file committed+moved.
    seen: dict[tuple[str, str], float] = {}
    for event in logged_events(run / "warehouse"):
        if event.get("event") == "batch_started":  # small files: the batch that took them
            for name in event.get("files", []):
                if name in dropped_at:
                    seen.setdefault(
                        (name, "file_started"),
                        dt.datetime.fromisoformat(str(event["ts"])).timestamp(),
                    )
            continue
        name = str(event.get("file"))
        if name in dropped_at and event.get("event") in ("file_started", "file_moved"):
            seen[(name, str(event["event"]))] = dt.datetime.fromisoformat(
                str(event["ts"])
            ).timestamp()
    waits = [
        (seen[(n, "file_started")] - t) * 1000
        for n, t in dropped_at.items()
        if (n, "file_started") in seen
    ]
    works = [
        (seen[(n, "file_moved")] - seen[(n, "file_started")]) * 1000
        for n in dropped_at
        if (n, "file_started") in seen and (n, "file_moved") in seen
    ]
    if waits and works:
        print(
            f"  rename -> worker starts: p50 {percentile(waits, 0.5):.1f} ms, "
            f"p99 {percentile(waits, 0.99):.1f} ms; worker starts -> committed and moved: "
            f"p50 {percentile(works, 0.5):.1f} ms, p99 {percentile(works, 0.99):.1f} ms"
        )
    slowest = sorted(zip(ms, ingest_ms, strict=True), reverse=True)[:5]
    print(
        "  slowest drops (visible ms / ingest ms):",
        ", ".join(f"{a:.0f}/{b:.0f}" for a, b in slowest),
    )
    print("  target: p50 <= 100 ms, p99 <= 300 ms; daemon exit code", code)


if __name__ == "__main__":
    main()
