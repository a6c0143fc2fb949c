"""API latency on 1M users / 10M transactions, idle and while a 10M-row file is ingested.

A ``moneylion serve`` child (the real daemon: API, watcher, the one ingest worker, exporter)
runs on a warehouse built once with ``moneylion.generate`` + ``ingest_file`` and cached in
bench/out/api/. A separate process drives an open-loop load (requests sent on a fixed schedule
over keep-alive connections, whatever the answers' speed) mixing the seed endpoints, and prints
requests/s and p50/p99 per endpoint:

1. idle, for --seconds;
2. while the daemon ingests another 10M-row file dropped into its inbox (the window between the
   worker's ``file_started`` and ``file_moved`` log events), then while it exports to SQLite.

Beside it, a second load process asks for the dashboard at --dashboard-rate (the page ``/`` and
the partials it polls, as browsers showing it would), reported per view in the same windows.

Targets on this 2-core machine: p99 <= 20 ms at 500 req/s during ingest for user summary, top
users and daily; /api/health p99 <= 5 ms; the dashboard's page and partials p99 <= 20 ms at
50 req/s during ingest. Prints figures; no asserts.

    .venv/bin/python bench/api.py [--rate 500] [--dashboard-rate 50] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from moneylion.config import Config, load_config  # noqa: E402
from moneylion.export import close_sqlite, export_new  # noqa: E402
from moneylion.generate import write_transactions, write_users  # noqa: E402
from moneylion.ingest import ingest_file  # noqa: E402
from moneylion.schema import open_warehouse  # noqa: E402
from tests.daemon_process import DaemonProcess, logged_events  # noqa: E402

OUT = REPO / "bench" / "out" / "api"
CONNECTIONS = 16
# (name, when it sent, when the answer ended, HTTP status) for every request.
Sample = tuple[str, float, float, int]


# --- the warehouse ---------------------------------------------------------------------------


def bench_config(warehouse: Path, inbox: Path) -> Config:
    return load_config(environ={}).with_overrides(inbox=inbox, warehouse=warehouse)


def base_warehouse(users: int, transactions: int) -> Path:
    """users + transactions loaded with ingest_file, built once and cached."""
    folder = OUT / f"{users}-{transactions}"
    cached = folder / "warehouse"
    if (cached / "moneylion.duckdb").exists():
        # Up to date in a few ms, or rebuilt when of an older export format: the daemon must
        # start with nothing to export.
        config = bench_config(cached, folder / "unused-inbox")
        conn = open_warehouse(config)
        try:
            result = export_new(conn, config.sqlite_path)
        finally:
            close_sqlite()
            conn.close()
        if result.exported_anything:
            print(f"  exported to SQLite ({result.seconds:.1f} s)")
        return cached
    csv_dir = folder / "csv"
    csv_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    users_csv = write_users(csv_dir / "users.csv", users, seed=1)
    tx_csv = write_transactions(csv_dir / "transactions.csv", transactions, users=users, seed=1)
    print(f"generated {users:,} users and {transactions:,} transactions", end="")
    print(f" ({time.perf_counter() - started:.1f} s)")
    building = folder / "warehouse.building"
    shutil.rmtree(building, ignore_errors=True)
    config = bench_config(building, folder / "unused-inbox")
    conn = open_warehouse(config)
    for path in (users_csv, tx_csv):
        outcome = ingest_file(conn, path, config)
        print(f"  {outcome.summary()}")
    started = time.perf_counter()
    export_new(conn, config.sqlite_path)  # so the daemon starts with nothing left to export
    print(f"  exported to SQLite ({time.perf_counter() - started:.1f} s)")
    close_sqlite()
    conn.close()
    tx_csv.unlink()  # 430 MB; the warehouse holds it now
    os.rename(building, cached)
    return cached


def second_file(users: int, transactions: int, first_id: int) -> Path:
    """Another ``transactions``-row file with new ids, for the during-ingest phase (cached)."""
    path = OUT / f"drop-{transactions}-from-{first_id}.csv"
    if not path.exists():
        partial = path.with_suffix(".partial")
        write_transactions(partial, transactions, users=users, seed=2, first_id=first_id)
        os.rename(partial, path)
    return path


# --- the load, in its own process ------------------------------------------------------------


def drive(port: int, plan: list[tuple[str, str]], rate: float) -> tuple[list[Sample], float]:
    """Send ``plan`` (name, path) at ``rate`` req/s; samples and the worst lag behind schedule."""
    return asyncio.run(_drive(port, plan, rate))


async def _drive(port: int, plan: list[tuple[str, str]], rate: float) -> tuple[list[Sample], float]:
    pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
    for _ in range(CONNECTIONS):
        pool.put_nowait(await asyncio.open_connection("127.0.0.1", port))
    samples: list[Sample] = []
    worst_lag = 0.0

    async def one(name: str, path: str) -> None:
        reader, writer = await pool.get()
        sent = time.perf_counter()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        status = int((await reader.readline()).split()[1])
        length = 0
        while (line := await reader.readline()) not in (b"\r\n", b""):
            key, _, value = line.decode("latin-1").partition(":")
            if key.strip().lower() == "content-length":
                length = int(value)
        await reader.readexactly(length)
        samples.append((name, sent, time.perf_counter(), status))
        pool.put_nowait((reader, writer))

    tasks = []
    start = time.perf_counter()
    rate = rate if rate > 0 else 1.0  # an empty plan (rate 0) sends nothing
    for index, (name, path) in enumerate(plan):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        worst_lag = max(worst_lag, time.perf_counter() - due)
        tasks.append(asyncio.create_task(one(name, path)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        _, writer = pool.get_nowait()
        writer.close()
    return samples, worst_lag


def make_plan(count: int, users: int, days: list[str], seed: int) -> list[tuple[str, str]]:
    """An even mix of the seed endpoints (random users and days)."""
    rng = random.Random(seed)
    plan = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            user_id = rng.randint(1, users)
            plan.append(("user summary", f"/api/user_transaction_summary?user_id={user_id}"))
        elif kind == 1:
            plan.append(("top users", "/api/top_users"))
        elif kind == 2:
            plan.append(("daily", f"/api/daily_transactions?date={rng.choice(days)}"))
        else:
            plan.append(("health", "/api/health"))
    return plan


def make_dashboard_plan(
    count: int, users: int, days: list[str], seed: int
) -> list[tuple[str, str]]:
    """The dashboard's page and the partials it polls, in turn (random users, a month's chart)."""
    rng = random.Random(seed)
    first, last = days[0], days[min(30, len(days) - 1)]
    chart = f"from={first}&to={last}"
    plan = []
    for index in range(count):
        user_id = rng.randint(1, users)
        views = [
            ("dash page", f"/?{chart}&user_id={user_id}"),
            ("dash state", "/partials/state"),
            ("dash files", "/partials/files"),
            ("dash reasons", "/partials/reasons"),
            ("dash daily", f"/partials/daily?{chart}"),
            ("dash top", "/partials/top"),
            ("dash user", f"/partials/user?user_id={user_id}"),
        ]
        plan.append(views[index % len(views)])
    return plan


# --- report ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def report(title: str, samples: list[Sample], start: float, end: float) -> None:
    """Figures for the requests sent in [start, end] (perf_counter clock of the load process)."""
    inside = [s for s in samples if start <= s[1] <= end]
    if not inside:
        print(f"{title}: no requests in the window")
        return
    seconds = max(end - start, 1e-9)
    errors = sum(1 for s in inside if s[3] >= 500)
    print(
        f"{title}: {len(inside):,} requests in {seconds:.1f} s = {len(inside) / seconds:.0f} req/s"
    )
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, sent, done, _ in inside:
        by_name[name].append((done - sent) * 1000)
    for name, values in sorted(by_name.items()):
        print(
            f"  {name:<13} n={len(values):>6,}  p50 {percentile(values, 0.5):6.2f} ms"
            f"  p99 {percentile(values, 0.99):6.2f} ms  max {max(values):7.2f} ms"
        )
    if errors:
        print(f"  5xx answers: {errors}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second")
    parser.add_argument(
        "--dashboard-rate", type=float, default=50.0, help="dashboard requests per second"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="idle phase length")
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--transactions", type=int, default=10_000_000)
    parser.add_argument("--drop", type=int, default=10_000_000, help="rows of the ingested file")
    parser.add_argument("--ingest-seconds", type=float, default=40.0, help="load while ingesting")
    parser.add_argument("--export", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--duckdb-threads", type=int, default=None, help="the daemon's DuckDB threads"
    )
    parser.add_argument(
        "--ingest-nice", type=int, default=None, help="the daemon's ingest_nice (0: no priority)"
    )
    args = parser.parse_args()

    cached = base_warehouse(args.users, args.transactions)
    drop = second_file(args.users, args.drop, first_id=10 * args.transactions)
    run = OUT / "run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "inbox").mkdir(parents=True)
    shutil.copytree(cached, run / "warehouse")

    env = {"MONEYLION_LOG_LEVEL": "INFO", "MONEYLION_SQLITE_EXPORT": str(args.export).lower()}
    if args.duckdb_threads is not None:
        env["MONEYLION_DUCKDB_THREADS"] = str(args.duckdb_threads)
    if args.ingest_nice is not None:
        env["MONEYLION_INGEST_NICE"] = str(args.ingest_nice)
    daemon = DaemonProcess(run / "inbox", run / "warehouse", settle_seconds=0.2, env=env)
    context = multiprocessing.get_context("spawn")
    try:
        daemon.start(timeout=300)
        days = [d["date"] for d in daemon.pages("/v1/daily", "days", type="deposit")]
        with ProcessPoolExecutor(max_workers=2, mp_context=context) as loader:
            loader.submit(drive, daemon.port, make_plan(400, args.users, days, 0), 200.0).result()
            warm = make_dashboard_plan(70, args.users, days, 0)
            loader.submit(drive, daemon.port, warm, 50.0).result()
            idle_plan = make_plan(int(args.rate * args.seconds), args.users, days, 1)
            idle_dash = make_dashboard_plan(
                int(args.dashboard_rate * args.seconds), args.users, days, 1
            )
            server = psutil.Process(daemon.proc.pid) if daemon.proc is not None else None
            cpu_before = sum(server.cpu_times()[:2]) if server is not None else 0.0
            dash_future = loader.submit(drive, daemon.port, idle_dash, args.dashboard_rate)
            samples, lag = loader.submit(drive, daemon.port, idle_plan, args.rate).result()
            dash_idle, _ = dash_future.result()
            cpu_per_request = (
                (sum(server.cpu_times()[:2]) - cpu_before) / (len(samples) + len(dash_idle)) * 1000
                if server
                else 0.0
            )
            sent = [s[1] for s in samples + dash_idle]
            first, last = min(sent), max(sent)
            print(
                f"\nAPI on {args.users:,} users / {args.transactions:,} transactions, "
                f"open loop at {args.rate:.0f} req/s over {CONNECTIONS} keep-alive connections "
                f"(worst client lag behind schedule {lag * 1000:.1f} ms)"
            )
            report("idle", samples, first, last)
            report(f"  dashboard at {args.dashboard_rate:.0f} req/s, idle", dash_idle, first, last)
            print(
                f"  server CPU {cpu_per_request:.2f} ms per request; load average "
                + " ".join(f"{x:.1f}" for x in os.getloadavg())
                + " (other processes on the machine included)"
            )

            busy_plan = make_plan(int(args.rate * args.ingest_seconds), args.users, days, 2)
            busy_dash = make_dashboard_plan(
                int(args.dashboard_rate * args.ingest_seconds), args.users, days, 2
            )
            future = loader.submit(drive, daemon.port, busy_plan, args.rate)
            dash_future = loader.submit(drive, daemon.port, busy_dash, args.dashboard_rate)
            time.sleep(1.0)
            offset = time.perf_counter() - time.time()  # wall clock (log) -> perf_counter
            temp = daemon.inbox / (drop.name + ".tmp")
            shutil.copyfile(drop, temp)
            os.rename(temp, daemon.inbox / drop.name)
            samples, lag = future.result()
            dash_busy, _ = dash_future.result()
        events = {
            e["event"]: e for e in logged_events(run / "warehouse") if e.get("file") == drop.name
        }
        exported = [
            e for e in logged_events(run / "warehouse") if e.get("event") == "sqlite_exported"
        ]
        code = daemon.stop(timeout=120)
    finally:
        daemon.close()

    def clock(event: dict[str, object]) -> float:
        return dt.datetime.fromisoformat(str(event["ts"])).timestamp() + offset

    print(f"(worst client lag behind schedule {lag * 1000:.1f} ms)")
    sent = [s[1] for s in samples + dash_busy]
    begin, end = min(sent), max(sent)
    if "file_started" in events and "file_moved" in events:
        started, moved = clock(events["file_started"]), clock(events["file_moved"])
        report(f"during ingest of a {args.drop:,}-row file", samples, started, moved)
        report("  dashboard, during the ingest", dash_busy, started, moved)
        after = [clock(e) for e in exported if clock(e) > moved]
        if after:
            report("during the SQLite export that follows", samples, moved, after[0])
            report("  dashboard, during the export", dash_busy, moved, after[0])
            report("after the export", samples, after[0], end)
            report("  dashboard, after the export", dash_busy, after[0], end)
        else:
            report("after the ingest", samples, moved, end)
            report("  dashboard, after the ingest", dash_busy, moved, end)
    else:
        print("the dropped file was not ingested while the load ran; found:", sorted(events))
        report("whole busy run", samples, begin, end)
        report("  dashboard, whole busy run", dash_busy, begin, end)
    print(
        "targets: p99 <= 20 ms at 500 req/s during ingest (user summary, top users, daily); "
        "/api/health p99 <= 5 ms; dashboard page and partials p99 <= 20 ms at 50 req/s during "
        f"ingest.  daemon exit code {code}"
    )


if __name__ == "__main__":
    main()
