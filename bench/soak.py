"""A daemon left running: a steady stream of small files for an hour, its memory and latency.

A ``moneylion serve`` child of this tree runs on a copy of the 1M-user / 10M-transaction
warehouse this tree built (bench/compare.py's cache). Files of 10 rows (new transaction ids)
are written outside the inbox and renamed into it at --rate files/s for --minutes. Nothing asks
the daemon anything while the stream runs: a file's latency is drop -> committed (it leaves
the inbox only after the commit that holds it; this process lists the inbox every 2 ms), and
the daemon's resident memory and CPU are read with psutil every --sample seconds.

Prints, per --window minutes: files, drop -> committed p50/p99/max, the daemon's CPU as % of a
core, its RSS at the window's end. Then the summary the targets are about: RSS growth over the
last half of the run (its last sample less its first in that half, and the most it rose above
that first sample), and the p99 drift (the last half's p99 over the first half's, after the
first --warm-up minutes). Finally the daemon is stopped and the warehouse checked: every file
loaded exactly once (the ledger), and ``verify`` (maintained aggregates == a full recompute).

Targets (issue: a daemon left running for weeks): RSS growth <= 20 MB over the last 30 minutes
of 60; p99 drift <= 10 %; the daemon's CPU <= 25 % of a core at 50 files/s.

    .venv/bin/python bench/soak.py [--minutes 60] [--rate 50] [--window 5] [--sample 10]
    .venv/bin/python bench/soak.py --minutes 10 --where   # where the daemon's memory goes
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cached_transactions, cached_users, print_table  # noqa: E402
from bench.compare import this_tree  # noqa: E402
from bench.stream import (  # noqa: E402
    OUT,
    ROWS,
    TRANSACTIONS,
    USERS,
    InboxWatcher,
    make_files,
    percentile,
    wait_exported,
    wait_idle,
)
from tests.daemon_process import DaemonProcess  # noqa: E402

AHEAD = 200  # files written ahead of their drop (outside the inbox)

# --where: run in the daemon before ``serve``. Every --sample seconds a thread notes the RSS,
# DuckDB's memory by tag (``duckdb_memory()``, through a connection to the daemon's own
# database instance), the Python heap traced by tracemalloc and its largest allocation sites.
WHERE_PREAMBLE = r"""
import json, os, threading, time, tracemalloc
import psutil
tracemalloc.start(1)
def _where():
    from moneylion.config import load_config
    from moneylion.schema import open_warehouse
    config = load_config()
    every = float(os.environ["MONEYLION_SOAK_SAMPLE"])
    with open(os.environ["MONEYLION_SOAK_WHERE"], "a") as out:
        while True:
            time.sleep(every)
            try:
                conn = open_warehouse(config)
                duck = dict(conn.execute(
                    "SELECT tag, memory_usage_bytes FROM duckdb_memory()").fetchall())
                conn.close()
            except Exception as exc:
                duck = {"error": str(exc)}
            sites = tracemalloc.take_snapshot().statistics("lineno")[:15]
            out.write(json.dumps({
                "at": time.time(),
                "rss": psutil.Process().memory_info().rss,
                "duckdb": duck,
                "python": tracemalloc.get_traced_memory()[0],
                "sites": {str(s.traceback): s.size for s in sites},
            }) + "\n")
            out.flush()
threading.Thread(target=_where, daemon=True, name="soak-where").start()
"""


class Producer(threading.Thread):
    """Writes the files a little ahead of their time, so that dropping one is a rename."""

    def __init__(self, folder: Path, count: int) -> None:
        super().__init__(daemon=True)
        self.folder = folder
        self.count = count
        self.ready: list[Path] = []
        self.taken = 0  # files handed to the dropper
        self.rng = random.Random(17)
        self.stopping = threading.Event()

    def run(self) -> None:
        made = 0
        while made < self.count and not self.stopping.is_set():
            if len(self.ready) - self.taken >= AHEAD:
                time.sleep(0.05)
                continue
            batch = min(50, self.count - made)
            self.ready.extend(make_files(self.folder, batch, 10_000_000 + made, self.rng))
            made += batch

    def take(self, timeout: float = 30.0) -> Path:
        deadline = time.monotonic() + timeout
        while len(self.ready) <= self.taken:
            if time.monotonic() > deadline:
                raise SystemExit("the producer fell behind: a file was not written in time")
            time.sleep(0.001)
        path = self.ready[self.taken]
        self.taken += 1
        return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--rate", type=float, default=50.0, help="files per second")
    parser.add_argument("--window", type=float, default=5.0, help="minutes per printed row")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--warm-up", type=float, default=5.0, help="minutes left out of p99s")
    parser.add_argument(
        "--where",
        action="store_true",
        help="where the daemon's memory goes: DuckDB's by tag, Python's by site (slower)",
    )
    args = parser.parse_args()

    side = this_tree()
    users = cached_users(USERS, seed=1)
    transactions = cached_transactions(TRANSACTIONS, users=USERS, first_id=1_000_001, seed=3)
    warehouse = side.warehouse(users, transactions)
    run = OUT / "soak-run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "inbox").mkdir(parents=True)
    (run / "warehouse").mkdir()
    for name in ("moneylion.duckdb", "moneylion.sqlite"):
        if (warehouse / name).exists():
            shutil.copyfile(warehouse / name, run / "warehouse" / name)
    os.sync()

    count = int(args.minutes * 60 * args.rate)
    producer = Producer(run / "staging", count)
    producer.start()
    where = run / "where.jsonl"
    daemon = DaemonProcess(
        run / "inbox",
        run / "warehouse",
        settle_seconds=0.5,
        env={"MONEYLION_SOAK_WHERE": str(where), "MONEYLION_SOAK_SAMPLE": str(args.sample)},
        preamble=WHERE_PREAMBLE if args.where else None,
    )
    samples: list[tuple[float, float, float]] = []  # seconds since start, RSS MB, CPU seconds
    dropped: dict[str, float] = {}
    try:
        daemon.start(timeout=120)
        wait_exported(daemon, run / "warehouse" / "moneylion.sqlite", timeout=600)
        wait_idle(daemon)
        process = psutil.Process(daemon.proc.pid if daemon.proc else 0)
        watcher = InboxWatcher(daemon.inbox)
        watcher.start()
        started = time.perf_counter()
        next_sample = 0.0
        print(f"soak: {count:,} files of {ROWS} rows at {args.rate:g} files/s", flush=True)
        for n in range(count):
            due = started + n / args.rate
            while (now := time.perf_counter()) < due:
                if now - started >= next_sample:
                    cpu = sum(process.cpu_times()[:2])
                    samples.append((now - started, process.memory_info().rss / 2**20, cpu))
                    next_sample += args.sample
                time.sleep(min(0.005, max(0.0, due - now)))
            path = producer.take()
            dropped[path.name] = time.perf_counter()
            os.rename(path, daemon.inbox / path.name)
            watcher.dropped.append(path.name)
        complete = watcher.wait_left(list(dropped), 120)
        end = time.perf_counter()
        samples.append(
            (end - started, process.memory_info().rss / 2**20, sum(process.cpu_times()[:2]))
        )
        watcher.stopping.set()
        watcher.join()
        code = daemon.stop()
    finally:
        producer.stopping.set()
        daemon.close()

    # Per window: files dropped in it, their latencies, the CPU and RSS over it.
    window = args.window * 60
    rows = []
    latency = {
        name: (watcher.left[name] - at) * 1000
        for name, at in dropped.items()
        if name in watcher.left
    }
    for first in range(0, int(samples[-1][0]), int(window)):
        last = first + window
        names = [n for n, at in dropped.items() if first <= at - started < last]
        values = [latency[n] for n in names if n in latency]
        inside = [s for s in samples if first <= s[0] <= last]
        if not values or len(inside) < 2:
            continue
        cpu = (inside[-1][2] - inside[0][2]) / (inside[-1][0] - inside[0][0]) * 100
        rows.append(
            [
                f"{first / 60:g}-{last / 60:g}",
                f"{len(names):,}",
                f"{percentile(values, 0.5):.1f}",
                f"{percentile(values, 0.99):.1f}",
                f"{max(values):.1f}",
                f"{cpu:.0f} %",
                f"{inside[-1][1]:.0f}",
            ]
        )
    print_table(["minutes", "files", "p50 ms", "p99 ms", "max ms", "CPU", "RSS MB"], rows)

    half = samples[-1][0] / 2
    late = [s for s in samples if s[0] >= half]
    growth = late[-1][1] - late[0][1]
    rise = max(s[1] for s in late) - late[0][1]
    warm = min(args.warm_up * 60, half / 2)  # a short run keeps half its first half
    first_half = [v for n, v in latency.items() if warm <= dropped[n] - started < half]
    second_half = [v for n, v in latency.items() if dropped[n] - started >= half]
    drift = percentile(second_half, 0.99) / percentile(first_half, 0.99) - 1
    cpu_all = (samples[-1][2] - samples[0][2]) / (samples[-1][0] - samples[0][0]) * 100
    print(
        f"\nRSS over the last half ({half / 60:.0f} min): {late[0][1]:.0f} -> {late[-1][1]:.0f} MB "
        f"(growth {growth:+.1f} MB, at most {rise:+.1f} MB above its start; target <= 20 MB)"
    )
    print(
        f"p99 drop -> committed: first half (after {args.warm_up:g} min) "
        f"{percentile(first_half, 0.99):.1f} ms, last half {percentile(second_half, 0.99):.1f} "
        f"ms: drift {drift * 100:+.1f} % (target <= 10 %)"
    )
    print(f"daemon CPU over the run: {cpu_all:.0f} % of a core (target <= 25 %)")
    print(
        f"files committed: {len(latency):,} of {len(dropped):,}"
        + ("" if complete else " (NOT all)")
        + f"; daemon exit code {code}"
    )
    if args.where:
        print_where(where)
    check(run / "warehouse", len(dropped))


def print_where(where: Path) -> None:
    """The daemon's memory over the run: RSS, DuckDB's (its largest tags), Python's traced
    heap, the rest (the allocator's own, Arrow buffers, thread stacks); then the Python sites
    that grew most from the first sample to the last."""
    samples = [json.loads(line) for line in where.read_text().splitlines()]
    if not samples:
        print("where: no samples")
        return
    start = samples[0]["at"]
    mb = 2**20
    rows = []
    for sample in [*samples[:: max(1, len(samples) // 12)], samples[-1]]:
        duck = {k: v for k, v in sample["duckdb"].items() if isinstance(v, int)}
        top = sorted(duck.items(), key=lambda item: -item[1])[:3]
        rest = sample["rss"] - sum(duck.values()) - sample["python"]
        rows.append(
            [
                f"{(sample['at'] - start) / 60:.0f}",
                f"{sample['rss'] / mb:.0f}",
                f"{sum(duck.values()) / mb:.0f} ("
                + ", ".join(f"{k} {v / mb:.0f}" for k, v in top)
                + ")",
                f"{sample['python'] / mb:.0f}",
                f"{rest / mb:.0f}",
            ]
        )
    print_table(["minute", "RSS MB", "DuckDB MB (largest tags)", "Python MB", "rest MB"], rows)
    first, last = samples[0]["sites"], samples[-1]["sites"]
    grew = sorted(last, key=lambda site: -(last[site] - first.get(site, 0)))[:5]
    print("Python allocation sites that grew most, first -> last sample:")
    for site in grew:
        print(f"  {first.get(site, 0) / mb:7.1f} -> {last[site] / mb:7.1f} MB  {site}")


def check(warehouse: Path, files: int) -> None:
    """Every file loaded once, and the aggregates equal a full recompute."""
    from moneylion.aggregates import verify
    from moneylion.config import load_config
    from moneylion.schema import open_warehouse

    config = load_config(environ={}).with_overrides(
        warehouse=warehouse, inbox=warehouse.parent / "inbox"
    )
    conn = open_warehouse(config)
    try:
        loaded = conn.execute(
            "SELECT count(*), sum(rows_loaded) FROM files WHERE name LIKE 's-%' "
            "AND status = 'loaded'"
        ).fetchall()[0]
        differences = verify(conn)
    finally:
        conn.close()
    print(
        f"ledger: {loaded[0]:,} stream files loaded of {files:,} dropped, {loaded[1] or 0:,} rows; "
        f"verify: {'clean' if not differences else differences[:5]}"
    )


if __name__ == "__main__":
    main()
