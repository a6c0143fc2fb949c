"""A stream of small files into the real daemon on a warehouse of 1M users and 10M transactions.

A ``moneylion serve`` child runs on a copy of the cached warehouse (bench/api.py builds it). Files
of 10 rows (new transaction ids) are written outside the inbox and renamed into it (complete at
once, as a producer that moves finished files in). One HTTP poller follows the ledger
(``/v1/files`` from the last offset seen, every --poll-ms) and notes when each file is first
visible. Prints:

1. the seconds to drain --burst files moved in at once (files/s);
2. for each offered rate (files/s, for --seconds each): drop -> visible over HTTP p50/p99/max,
   and the backlog's peak (files dropped and not yet visible);
3. the batch sizes the worker chose (from its log).

Targets on the 2-core machine: >= 1,000 files/s drained; at 200 files/s p50 <= 25 ms and p99 <=
100 ms; at 1,000 files/s the backlog stays bounded (p99 <= 1 s). Prints figures; no asserts.

    .venv/bin/python bench/stream.py [--burst 1000] [--rates 10,200,1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import sqlite3
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.api import base_warehouse  # noqa: E402
from tests.daemon_process import (  # noqa: E402
    DaemonProcess,
    logged_events,
    random_transactions,
    write_transactions,
)

OUT = REPO / "bench" / "out"
USERS = 1_000_000
TRANSACTIONS = 10_000_000
IDS_FROM = 10**12  # far above the generated ids: every row is new
ROWS = 10


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class LedgerPoller(threading.Thread):
    """Follows /v1/files and notes the time each file name is first visible."""

    def __init__(self, daemon: DaemonProcess, poll_seconds: float) -> None:
        super().__init__(daemon=True)
        self.daemon_process = daemon
        self.poll_seconds = poll_seconds
        self.offset = daemon.get("/v1/files", limit=1)["total"]
        self.seen: dict[str, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        client = self.daemon_process.client
        while not self.stopping.is_set():
            page = client.get("/v1/files", params={"limit": 1000, "offset": self.offset}).json()
            now = time.perf_counter()
            for item in page["items"]:
                self.seen.setdefault(item["name"], now)
            self.offset += len(page["items"])
            if len(page["items"]) < 1000:
                time.sleep(self.poll_seconds)


def make_files(folder: Path, count: int, first: int, rng: random.Random) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        first_id = IDS_FROM + (first + n) * ROWS
        rows = random_transactions(rng, first_id, ROWS, USERS)
        paths.append(write_transactions(folder / f"s-{first + n:07d}.csv", rows))
    return paths


def drop_at_rate(paths: list[Path], inbox: Path, rate: float) -> dict[str, float]:
    """Rename each file into the inbox on a fixed schedule; name -> when it was dropped."""
    dropped: dict[str, float] = {}
    start = time.perf_counter()
    for n, path in enumerate(paths):
        due = start + n / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        dropped[path.name] = time.perf_counter()
        os.rename(path, inbox / path.name)
    return dropped


def wait_seen(poller: LedgerPoller, names: list[str], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(name in poller.seen for name in names):
            return True
        time.sleep(0.01)
    return False


def wait_exported(daemon: DaemonProcess, sqlite: Path, timeout: float = 120.0) -> None:
    """Until the SQLite export holds every file committed so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        total = daemon.get("/v1/files", limit=1)["total"]
        with contextlib.closing(sqlite3.connect(f"file:{sqlite}?mode=ro", uri=True)) as lite:
            row = lite.execute("SELECT count(*) FROM files").fetchone()
        if row and row[0] >= total:
            return
        time.sleep(0.05)


def wait_idle(daemon: DaemonProcess, timeout: float = 120.0) -> None:
    """Until the daemon's CPU is idle (its start-up reads, a previous phase's export): each
    phase starts on an idle daemon."""
    process = psutil.Process(daemon.proc.pid if daemon.proc else 0)
    deadline = time.monotonic() + timeout
    used = sum(process.cpu_times()[:2])
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = sum(process.cpu_times()[:2])
        if now - used < 0.15:  # under 30 % of a core: the poller's requests, no more
            return
        used = now


def backlog_peak(dropped: dict[str, float], seen: dict[str, float]) -> int:
    """The most files dropped and not yet visible at any moment."""
    events = [(t, 1) for t in dropped.values()] + [(seen[n], -1) for n in dropped if n in seen]
    waiting = peak = 0
    for _, step in sorted(events):
        waiting += step
        peak = max(peak, waiting)
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--rates", default="10,200,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--poll-ms", type=float, default=5.0)
    parser.add_argument("--transactions", type=int, default=TRANSACTIONS)
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r]

    cached = base_warehouse(USERS, args.transactions)
    run = OUT / "stream-run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "inbox").mkdir(parents=True)
    (run / "warehouse").mkdir()
    for name in ("moneylion.duckdb", "moneylion.sqlite"):
        shutil.copyfile(cached / name, run / "warehouse" / name)
    os.sync()  # the copies written back now, not during the first drops

    rng = random.Random(7)
    staging = run / "staging"
    burst = make_files(staging / "burst", args.burst, 0, rng)
    phases = []
    first = args.burst
    for rate in rates:
        count = int(rate * args.seconds)
        phases.append((rate, make_files(staging / f"rate-{rate:g}", count, first, rng)))
        first += count

    env = {"MONEYLION_LOG_LEVEL": "INFO"}
    daemon = DaemonProcess(run / "inbox", run / "warehouse", settle_seconds=0.5, env=env)
    rows: list[tuple[str, str]] = []
    try:
        daemon.start(timeout=120)
        poller = LedgerPoller(daemon, args.poll_ms / 1000)
        poller.start()

        wait_idle(daemon)
        process = psutil.Process(daemon.proc.pid if daemon.proc else 0)
        cpu_before = sum(process.cpu_times()[:2])
        started = time.perf_counter()
        for path in burst:
            os.rename(path, daemon.inbox / path.name)
        moved_in = time.perf_counter() - started
        names = [p.name for p in burst]
        drained = wait_seen(poller, names, 600)
        last_seen = max(poller.seen[n] for n in names if n in poller.seen)
        seconds = last_seen - started
        rows.append(
            (
                f"drain {args.burst} files x {ROWS} rows moved in at once"
                + ("" if drained else " (NOT all seen)"),
                f"{seconds:.2f} s = {args.burst / seconds:.0f} files/s "
                f"(moving them in took {moved_in:.2f} s)",
            )
        )
        wait_exported(daemon, run / "warehouse" / "moneylion.sqlite")
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        rows.append(
            (
                "  daemon CPU for that burst (ingest, export, the poller's requests)",
                f"{cpu:.2f} s = {cpu / args.burst * 1000:.2f} ms a file "
                "(less sensitive than wall time to other load on the machine)",
            )
        )
        for rate, paths in phases:
            wait_exported(daemon, run / "warehouse" / "moneylion.sqlite")
            wait_idle(daemon)
            dropped = drop_at_rate(paths, daemon.inbox, rate)
            names = list(dropped)
            complete = wait_seen(poller, names, 120)
            latencies = [(poller.seen[n] - dropped[n]) * 1000 for n in names if n in poller.seen]
            rows.append(
                (
                    f"{rate:g} files/s for {args.seconds:g} s, drop -> visible over HTTP"
                    + ("" if complete else " (NOT all seen)"),
                    f"p50 {percentile(latencies, 0.5):.1f} ms, p99 "
                    f"{percentile(latencies, 0.99):.1f} ms, max {max(latencies):.1f} ms, "
                    f"mean {statistics.mean(latencies):.1f} ms; backlog peak "
                    f"{backlog_peak(dropped, poller.seen)} files",
                )
            )
        poller.stopping.set()
        poller.join()
        code = daemon.stop()
    finally:
        daemon.close()
    batches = [
        int(e["files"])
        for e in logged_events(run / "warehouse")
        if e.get("event") == "batch_committed"
    ]
    width = max(len(name) for name, _ in rows)
    print(f"stream of {ROWS}-row files into {USERS:,} users / {args.transactions:,} transactions:")
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}")
    if batches:
        print(
            f"  batches: {len(batches)}, files per batch p50 {percentile(batches, 0.5):g}, "
            f"max {max(batches)}"
        )
    print(
        "  targets: >= 1,000 files/s drained; 200 files/s p50 <= 25 ms, p99 <= 100 ms; "
        f"1,000 files/s p99 <= 1 s; daemon exit code {code}"
    )


if __name__ == "__main__":
    main()
