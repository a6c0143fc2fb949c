"""A stream of small files into the real daemon on a warehouse of 1M users and 10M transactions,
this tree's daemon against a baseline commit's (bench/BASELINE's ``stream`` line), one after
the other in one run, each on its own copy of a warehouse its code built (cached per set of
migrations, as bench/compare.py caches them), with the ratio of every figure.

A ``moneylion serve`` child of each tree runs on its copy. Files of 10 rows (new transaction
ids) are written outside the inbox and renamed into it (complete at once, as a producer that
moves finished files in). Prints, for each side:

1. the seconds to drain --burst files moved in at once (files/s), each file's time being when
   it is first visible over HTTP (a poller follows ``/v1/files`` every --poll-ms), and the
   daemon's CPU for the burst;
2. for each offered rate (files/s, for --seconds each): drop -> committed p50/p99/max (a file
   leaves the inbox only after the commit that holds it; this process lists the inbox every
   2 ms, nothing asks the daemon), the backlog's peak, and the daemon's CPU (psutil, user+sys,
   from the first drop until every file is committed and exported) per file and as % of a core;
3. the batch sizes the worker chose (from its log).

4. event logs that grow in the inbox (after the cases above; ``--only logs`` runs it alone):
   --logs files created directly in the inbox, each appended as a producer appends (every append
   is ``open(path, "a")``, --log-rows-per-append complete lines, close): 10 rows every 200 ms, so
   50 rows/s (--log-rows-per-second), for --log-seconds; the header is written once, in a log's
   first append; the logs' appends are staggered evenly. Each append's rows have a user id and a
   transaction date of their own (new users, days in the 1800s) and new transaction ids.
   "append -> visible" is the time from an append's close to the first answer of
   ``/v1/daily?from=&to=`` (one request a round, every --log-poll-ms, over the days of the
   appends not yet visible) whose count for the append's day reaches its rows: one cheap
   request a round however many appends wait, and appends seen in any order. After the last
   append it waits until all are visible or --log-wait seconds; then asks every append's user
   (``/v1/users/{id}/summary``) whether each appended row is visible exactly once. Prints
   p50/p99/max, appends and rows, that check, the ledger's rows for the logs, and the daemon's
   CPU (psutil, user+sys, from the first append to the end of the wait, the poller's requests
   included) per appended row and as % of one core, and per row without the poller's requests
   (a sample of them replayed afterwards on the idle daemon gives their cost).

Targets on the 2-core machine: >= 3,000 files/s drained; at 50 files/s the daemon's CPU <= 25 %
of a core with p99 <= 100 ms; at 200 files/s p99 <= 50 ms; at 1,000 files/s p99 <= 200 ms; an
append visible p50 <= 250 ms. Prints figures; no asserts.

The warehouse is built the first time by each tree (minutes); the daemon exports it to SQLite
on start, before any case. ``--empty`` starts on an empty warehouse instead; ``--alone`` runs
this tree only. The baseline predates files that grow in the inbox: its event-log figures are
those of a daemon that takes each grown file as new bytes (its "exactly once" line says so).

    .venv/bin/python bench/stream.py [--burst 1000] [--rates 10,50,200,1000] [--seconds 10]
        [--logs 20] [--log-rows-per-second 50] [--log-seconds 10] [--only files|logs] [--empty]
        [--baseline REF] [--alone]
    .venv/bin/python bench/stream.py --only logs --alone    # the event-log case, this tree
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import random
import shutil
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cached_transactions, cached_users, print_table  # noqa: E402
from bench.compare import Side, baseline, checkout, this_tree  # noqa: E402
from tests.conftest import TX_COLUMNS, TYPES  # noqa: E402
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
# The event logs' rows: ids above any the files cases use, a new user and a new day per append.
LOG_IDS_FROM = IDS_FROM + 10**10
LOG_USERS_FROM = 10**9
LOG_FIRST_DAY = dt.date(1800, 1, 1)  # days no other file has (past: never future_date)
Figures = dict[str, float]  # figure -> value, lower is better: compared with the baseline's


def percentile(values: Sequence[float], q: float) -> float:
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


def drop_at_rate(
    paths: list[Path], inbox: Path, rate: float, watcher: InboxWatcher | None = None
) -> dict[str, float]:
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
        if watcher is not None:
            watcher.dropped.append(path.name)
    return dropped


class InboxWatcher(threading.Thread):
    """Notes when each dropped file leaves the inbox: the daemon moves a file out only after
    the commit that holds it, so this is drop -> committed, measured without asking the
    daemon anything (a listing of the inbox every ``poll_seconds``, in this process)."""

    def __init__(self, inbox: Path, poll_seconds: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.inbox = inbox
        self.poll_seconds = poll_seconds
        self.dropped: list[str] = []  # appended by the dropper, in order
        self.left: dict[str, float] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        pending: set[str] = set()
        taken = 0
        while not self.stopping.is_set():
            fresh = self.dropped[taken:]  # read before the listing: each was in the inbox
            taken += len(fresh)
            present = set(os.listdir(self.inbox))
            now = time.perf_counter()
            pending.update(fresh)
            for name in pending - present:
                self.left[name] = now
            pending &= present
            time.sleep(self.poll_seconds)

    def wait_left(self, names: list[str], timeout: float) -> bool:
        return wait_noted(self.left, names, timeout)


def wait_seen(poller: LedgerPoller, names: list[str], timeout: float) -> bool:
    return wait_noted(poller.seen, names, timeout)


def wait_noted(noted: dict[str, float], names: list[str], timeout: float) -> bool:
    """Until every name is in ``noted`` (filled by another thread), or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(name in noted for name in names):
            return True
        time.sleep(0.01)
    return False


def wait_exported(daemon: DaemonProcess, sqlite: Path, timeout: float = 120.0) -> None:
    """Until the SQLite export holds every file committed so far."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        total = daemon.get("/v1/files", limit=1)["total"]
        if total == 0:
            return  # nothing committed (an empty warehouse): nothing to export
        row = None
        with (
            contextlib.suppress(sqlite3.Error),  # not made yet, on an empty warehouse
            contextlib.closing(sqlite3.connect(f"file:{sqlite}?mode=ro", uri=True)) as lite,
        ):
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


# --- event logs growing in the inbox ---------------------------------------------------------


@dataclass
class Append:
    """One append to one log: its text (the header too, in a log's first), its user and day."""

    log: int
    user_id: int
    day: dt.date
    rows: int
    text: str
    due: float  # seconds after the case's start
    closed: float = 0.0  # perf_counter at its close; 0.0 until then
    seen: float = 0.0  # perf_counter of the answer that first showed all its rows


def plan_logs(
    logs: int, rows_per_append: int, rows_per_second: float, seconds: float, rng: random.Random
) -> list[Append]:
    """Every append of every log, in the order they are due (the logs staggered evenly)."""
    interval = rows_per_append / rows_per_second
    per_log = max(1, round(seconds / interval))
    appends = []
    for number in range(per_log):
        for log in range(logs):
            index = number * logs + log  # the append's rank in time: its user, day and ids
            day = LOG_FIRST_DAY + dt.timedelta(days=index)
            lines = [",".join(TX_COLUMNS)] if number == 0 else []
            for n in range(rows_per_append):
                amount = f"{rng.randint(1, 500_000) / 100:.2f}"
                tx_id = LOG_IDS_FROM + index * rows_per_append + n
                user = LOG_USERS_FROM + index
                lines.append(f"{tx_id},{user},{day.isoformat()},{amount},{rng.choice(TYPES)}")
            text = "\n".join(lines) + "\n"
            due = (number + log / logs) * interval
            appends.append(Append(log, LOG_USERS_FROM + index, day, rows_per_append, text, due))
    return appends


def log_path(inbox: Path, log: int) -> Path:
    return inbox / f"events-{log:03d}.csv"


def append_on_schedule(appends: list[Append], inbox: Path) -> None:
    """Each append as a producer makes it: open for append, write whole lines, close."""
    start = time.perf_counter()
    for append in appends:
        pause = start + append.due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        with log_path(inbox, append.log).open("a", encoding="utf-8", newline="") as handle:
            handle.write(append.text)
        append.closed = time.perf_counter()


class AppendPoller(threading.Thread):
    """Notes when each closed append's rows are all visible: one ``/v1/daily`` request a round
    over the days of the appends still waiting (one day per append), on its own HTTP client."""

    def __init__(self, base_url: str, appends: list[Append], poll_seconds: float) -> None:
        super().__init__(daemon=True)
        self.base_url = base_url
        self.appends = appends
        self.poll_seconds = poll_seconds
        self.spans: list[dict[str, str]] = []  # what each request asked
        self.errors = 0
        self.stopping = threading.Event()

    def waiting(self) -> list[Append]:
        return [a for a in self.appends if a.closed and not a.seen]

    def run(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=10.0) as client:
            while not self.stopping.is_set():
                waiting = self.waiting()
                if waiting:
                    self.poll(client, waiting)
                time.sleep(self.poll_seconds)

    def poll(self, client: httpx.Client, waiting: list[Append]) -> None:
        span = {
            "from": min(a.day for a in waiting).isoformat(),
            "to": max(a.day for a in waiting).isoformat(),
        }
        self.spans.append(span)
        try:
            response = client.get("/v1/daily", params=span)
            response.raise_for_status()
        except httpx.HTTPError:
            self.errors += 1
            return
        now = time.perf_counter()
        counts: Counter[str] = Counter()
        for day in response.json()["days"]:
            counts[day["date"]] += day["transaction_count"]
        for append in waiting:
            if counts[append.day.isoformat()] >= append.rows:
                append.seen = now

    def wait_all(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(a.seen for a in self.appends):
                return True
            time.sleep(0.02)
        return all(a.seen for a in self.appends)


def visible_rows(daemon: DaemonProcess, appends: list[Append]) -> list[int]:
    """Each append's user's transaction count over HTTP (0 for a user not known: 404)."""
    counts = []
    for append in appends:
        response = daemon.client.get(f"/v1/users/{append.user_id}/summary")
        if response.status_code == 404:
            counts.append(0)
            continue
        response.raise_for_status()
        counts.append(int(response.json()["transaction_count"]))
    return counts


def request_cpu(daemon: DaemonProcess, spans: list[dict[str, str]], count: int = 200) -> float:
    """The daemon's mean CPU seconds for one of the poller's requests, replaying up to ``count``
    of them (evenly spread; their answers' sizes vary) on the idle daemon: an estimate of the
    poller's share of the case's CPU (a lower bound: during the case, the first request after a
    commit also reads DuckDB)."""
    if not spans:
        return 0.0
    wait_exported(daemon, daemon.warehouse / "moneylion.sqlite")
    wait_idle(daemon)
    process = psutil.Process(daemon.proc.pid if daemon.proc else 0)
    taken = min(count, len(spans))
    sample = [spans[n * len(spans) // taken] for n in range(taken)]
    before = sum(process.cpu_times()[:2])
    for span in sample:
        daemon.client.get("/v1/daily", params=span)
    return float(sum(process.cpu_times()[:2]) - before) / len(sample)


def ledger_since(daemon: DaemonProcess, offset: int) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    while True:
        page = daemon.get("/v1/files", limit=1000, offset=offset + len(items))
        items.extend(page["items"])
        if len(page["items"]) < 1000:
            return items


def run_logs(
    daemon: DaemonProcess, args: argparse.Namespace
) -> tuple[list[tuple[str, str]], Figures]:
    """The event-log case on an idle daemon: rows to print, figures."""
    rng = random.Random(11)
    appends = plan_logs(
        args.logs, args.log_rows_per_append, args.log_rows_per_second, args.log_seconds, rng
    )
    total_rows = sum(a.rows for a in appends)
    names = {log_path(daemon.inbox, log).name for log in range(args.logs)}
    ledger_offset = daemon.get("/v1/files", limit=1)["total"]
    process = psutil.Process(daemon.proc.pid if daemon.proc else 0)
    poller = AppendPoller(str(daemon.client.base_url), appends, args.log_poll_ms / 1000)
    poller.start()
    cpu_before = sum(process.cpu_times()[:2])
    started = time.perf_counter()
    append_on_schedule(appends, daemon.inbox)
    appending = time.perf_counter() - started
    complete = poller.wait_all(args.log_wait)
    wall = time.perf_counter() - started
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    poller.stopping.set()
    poller.join()

    latencies = [(a.seen - a.closed) * 1000 for a in appends if a.seen]
    counts = visible_rows(daemon, appends)
    per_request = request_cpu(daemon, poller.spans)
    net = max(0.0, cpu - per_request * len(poller.spans))
    failed = f" ({poller.errors} failed)" if poller.errors else ""
    exact = sum(1 for a, c in zip(appends, counts, strict=True) if c == a.rows)
    short = sum(1 for a, c in zip(appends, counts, strict=True) if c < a.rows)
    extra = sum(1 for a, c in zip(appends, counts, strict=True) if c > a.rows)
    ledger = [e for e in ledger_since(daemon, ledger_offset) if e["name"] in names]
    outcomes = Counter(
        f"{e['status']}" + (f" ({e['error_reason']})" if e["error_reason"] else "") for e in ledger
    )
    loaded = sum(int(str(e["rows_loaded"])) for e in ledger)
    parts = sum(1 for e in ledger if e.get("part_of") is not None)  # continuation parts

    title = (
        f"{args.logs} logs x {args.log_rows_per_append} rows every "
        f"{args.log_rows_per_append / args.log_rows_per_second * 1000:g} ms "
        f"({args.log_rows_per_second:g} rows/s) for {args.log_seconds:g} s, "
        "appended in the inbox"
    )
    if latencies:
        timing = (
            f"p50 {percentile(latencies, 0.5):.1f} ms, p99 {percentile(latencies, 0.99):.1f} ms, "
            f"max {max(latencies):.1f} ms; {len(latencies)} of {len(appends)} appends visible"
        )
    else:
        timing = f"none of {len(appends)} appends visible"
    if not complete:
        timing += f" (NOT all: waited {args.log_wait:g} s after the last append)"
    every = sum(counts) == total_rows and exact == len(appends)
    figures: Figures = {
        "event logs: daemon CPU a row, without the poller's (us)": net / total_rows * 1e6
    }
    if latencies:
        figures["event logs: append -> visible p50 (ms)"] = percentile(latencies, 0.5)
        figures["event logs: append -> visible p99 (ms)"] = percentile(latencies, 0.99)
    found = [
        (title, ""),
        (
            "  appends, rows",
            f"{len(appends)} appends, {total_rows:,} rows (appending took {appending:.2f} s)",
        ),
        ("  append close -> rows visible over HTTP", timing),
        (
            "  every appended row visible exactly once",
            f"{'yes' if every else 'NO'}: {sum(counts):,} of {total_rows:,} rows over the logs' "
            f"users; appends exact {exact}, short {short}, with extra rows {extra}",
        ),
        (
            "  the ledger's rows for the logs",
            f"{len(ledger)}: "
            + (", ".join(f"{n} {o}" for o, n in outcomes.most_common()) or "none")
            + f"; {parts} of them continuation parts; {loaded:,} rows loaded",
        ),
        (
            "  daemon CPU per appended row",
            f"{cpu / total_rows * 1e6:.0f} us a row ({cpu:.2f} s over {wall:.1f} s = "
            f"{cpu / wall * 100:.0f} % of a core), the poller's {len(poller.spans)} requests "
            f"included{failed}; without them ~{net / total_rows * 1e6:.0f} us a row "
            f"({per_request * 1e6:.0f} us a request, measured afterwards on the idle daemon)",
        ),
    ]
    return found, figures


def run_files(
    daemon: DaemonProcess,
    args: argparse.Namespace,
    run: Path,
    burst: list[Path],
    phases: list[tuple[float, list[Path]]],
) -> tuple[list[tuple[str, str]], Figures]:
    """The burst and the rates (the cases before the event logs): rows to print, figures."""
    rows: list[tuple[str, str]] = []
    figures: Figures = {}
    process = psutil.Process(daemon.proc.pid if daemon.proc else 0)
    sqlite = run / "warehouse" / "moneylion.sqlite"
    if burst:
        poller = LedgerPoller(daemon, args.poll_ms / 1000)
        poller.start()
        wait_idle(daemon)
        cpu_before = sum(process.cpu_times()[:2])
        started = time.perf_counter()
        for path in burst:
            os.rename(path, daemon.inbox / path.name)
        moved_in = time.perf_counter() - started
        names = [p.name for p in burst]
        drained = wait_seen(poller, names, 600)
        poller.stopping.set()
        poller.join()
        last_seen = max(poller.seen[n] for n in names if n in poller.seen)
        seconds = last_seen - started
        rows.append(
            (
                f"drain {len(burst)} files x {ROWS} rows moved in at once"
                + ("" if drained else " (NOT all seen)"),
                f"{seconds:.2f} s = {len(burst) / seconds:.0f} files/s "
                f"(moving them in took {moved_in:.2f} s)",
            )
        )
        wait_exported(daemon, sqlite)
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        rows.append(
            (
                "  daemon CPU for that burst (ingest, export, the poller's requests)",
                f"{cpu:.2f} s = {cpu / len(burst) * 1000:.2f} ms a file",
            )
        )
        figures["burst: seconds per 1,000 files (drop -> visible over HTTP)"] = (
            seconds / len(burst) * 1000
        )
        figures["burst: daemon CPU a file (ms)"] = cpu / len(burst) * 1000
    # The rates: drop -> committed (the file leaves the inbox), nothing polls the daemon; its CPU
    # from the first drop until every file is committed and exported.
    watcher = InboxWatcher(daemon.inbox)
    watcher.start()
    for rate, paths in phases:
        wait_exported(daemon, sqlite)
        wait_idle(daemon)
        cpu_before = sum(process.cpu_times()[:2])
        started = time.perf_counter()
        dropped = drop_at_rate(paths, daemon.inbox, rate, watcher)
        names = list(dropped)
        complete = watcher.wait_left(names, 120)
        wait_exported(daemon, sqlite)
        wall = time.perf_counter() - started
        cpu = sum(process.cpu_times()[:2]) - cpu_before
        latencies = [(watcher.left[n] - dropped[n]) * 1000 for n in names if n in watcher.left]
        per_file = cpu / len(names) * 1000
        rows.append(
            (
                f"{rate:g} files/s for {args.seconds:g} s, drop -> committed"
                + ("" if complete else " (NOT all committed)"),
                f"p50 {percentile(latencies, 0.5):.1f} ms, p99 "
                f"{percentile(latencies, 0.99):.1f} ms, max {max(latencies):.1f} ms; backlog "
                f"peak {backlog_peak(dropped, watcher.left)} files; daemon CPU {per_file:.2f} ms "
                f"a file = {cpu / wall * 100:.0f} % of a core",
            )
        )
        figures[f"{rate:g} files/s: drop -> committed p50 (ms)"] = percentile(latencies, 0.5)
        figures[f"{rate:g} files/s: drop -> committed p99 (ms)"] = percentile(latencies, 0.99)
        figures[f"{rate:g} files/s: daemon CPU a file (ms)"] = per_file
    watcher.stopping.set()
    watcher.join()
    return rows, figures


def batch_sizes(warehouse: Path) -> list[int]:
    return [
        int(e["files"]) for e in logged_events(warehouse) if e.get("event") == "batch_committed"
    ]


def print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, value in rows if value)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}".rstrip())


def run_side(
    side: Side, args: argparse.Namespace, rates: list[float], warehouse: Path | None
) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[int], Figures, int]:
    """Every case on one tree's daemon, on a copy of ``warehouse`` (None: an empty one):
    the files cases' rows, the logs case's rows, the batch sizes, the figures, the exit code."""
    files_case = args.only in (None, "files")
    logs_case = args.only in (None, "logs") and args.logs > 0
    run = OUT / "stream-run"
    shutil.rmtree(run, ignore_errors=True)
    (run / "inbox").mkdir(parents=True)
    (run / "warehouse").mkdir()
    if warehouse is not None:
        for name in ("moneylion.duckdb", "moneylion.sqlite"):
            if (warehouse / name).exists():
                shutil.copyfile(warehouse / name, run / "warehouse" / name)
    os.sync()  # the copies written back now, not during the first drops

    rng = random.Random(7)  # the same files for every side
    staging = run / "staging"
    burst: list[Path] = []
    phases = []
    if files_case:
        burst = make_files(staging / "burst", args.burst, 0, rng)
        first = args.burst
        for rate in rates:
            count = int(rate * args.seconds)
            phases.append((rate, make_files(staging / f"rate-{rate:g}", count, first, rng)))
            first += count

    env = {"MONEYLION_LOG_LEVEL": "INFO"}
    daemon = DaemonProcess(
        run / "inbox",
        run / "warehouse",
        settle_seconds=0.5,
        env=env,
        tree=side.tree,
        python=side.python,
    )
    rows: list[tuple[str, str]] = []
    log_rows: list[tuple[str, str]] = []
    batches: list[int] = []
    figures: Figures = {}
    try:
        daemon.start(timeout=120)
        wait_exported(daemon, run / "warehouse" / "moneylion.sqlite", timeout=600)
        if files_case:
            rows, found = run_files(daemon, args, run, burst, phases)
            figures.update(found)
        if logs_case:
            wait_exported(daemon, run / "warehouse" / "moneylion.sqlite")
            wait_idle(daemon)
            batches = batch_sizes(run / "warehouse")  # the files cases' batches only
            log_rows, found = run_logs(daemon, args)
            figures.update(found)
        code = daemon.stop()
    finally:
        daemon.close()
    if not logs_case:
        batches = batch_sizes(run / "warehouse")
    return rows, log_rows, batches, figures, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--rates", default="10,50,200,1000")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--poll-ms", type=float, default=5.0)
    parser.add_argument("--transactions", type=int, default=TRANSACTIONS)
    parser.add_argument("--logs", type=int, default=20, help="event logs appended in the inbox")
    parser.add_argument("--log-rows-per-second", type=float, default=50.0, help="per log")
    parser.add_argument("--log-rows-per-append", type=int, default=10)
    parser.add_argument("--log-seconds", type=float, default=10.0)
    parser.add_argument("--log-poll-ms", type=float, default=20.0)
    parser.add_argument(
        "--log-wait", type=float, default=30.0, help="longest wait after the last append"
    )
    parser.add_argument("--only", choices=("files", "logs"), help="run one part alone")
    parser.add_argument(
        "--empty", action="store_true", help="an empty warehouse, not the cached 1M/10M one"
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="the commit to compare with (default: bench/BASELINE's stream commit)",
    )
    parser.add_argument("--alone", action="store_true", help="this tree only, no baseline")
    args = parser.parse_args()
    rates = [float(r) for r in args.rates.split(",") if r]

    sides = [this_tree()]
    if not args.alone:
        sides.insert(0, checkout(args.baseline or baseline("stream")))
    users = cached_users(USERS, seed=1)
    transactions = cached_transactions(args.transactions, users=USERS, first_id=1_000_001, seed=3)
    stored = (
        "an empty warehouse"
        if args.empty
        else f"{USERS:,} users / {args.transactions:,} transactions"
    )
    every: list[Figures] = []
    for side in sides:  # the baseline first, then this tree: one run, the same machine
        warehouse = None if args.empty else side.warehouse(users, transactions)
        rows, log_rows, batches, figures, code = run_side(side, args, rates, warehouse)
        every.append(figures)
        print(f"\n{side.name} ({side.commit[:12]}):")
        if rows:
            print(f"stream of {ROWS}-row files into {stored}:")
            print_rows(rows)
            if batches:
                print(
                    f"  batches: {len(batches)}, files per batch p50 "
                    f"{percentile(batches, 0.5):g}, max {max(batches)}"
                )
        if log_rows:
            print(f"event logs growing in the inbox, into {stored}:")
            print_rows(log_rows)
        print(f"  daemon exit code {code}", flush=True)
    print(
        "\ntargets: burst >= 3,000 files/s; 50 files/s: CPU <= 25 % of a core, p99 <= 100 ms; "
        "200 files/s p99 <= 50 ms; 1,000 files/s p99 <= 200 ms; event logs p50 <= 250 ms"
    )
    if len(sides) == 2:
        base, new = every
        table = [
            [
                name,
                f"{base[name]:.2f}" if name in base else "-",
                f"{value:.2f}",
                f"{value / base[name]:.2f}x" if base.get(name) else "-",
            ]
            for name, value in new.items()
        ]
        print(f"\n{sides[0].name} ({sides[0].commit[:12]}) vs {sides[1].name}:")
        print_table(["figure (lower is better)", "baseline", "this tree", "ratio"], table)


if __name__ == "__main__":
    main()
