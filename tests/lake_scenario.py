"""Lake mode with real ``moneylion serve`` children: two daemons on one lake, the files they
race on, an independent computation of the answers (csv + Decimal over the files in the
ledger's order), and the checks both tests and ``bench/lake.py`` run.

The independent side knows the policies, not the code: a transaction id whose copies differ
within a file loads nowhere from that file; otherwise its first file in the ledger's order
wins and every later copy (identical or not) adds nothing; users: the latest file in the
ledger's order wins; orphans count.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import os
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from tests.daemon_process import (
    DaemonProcess,
    logged_events,
    random_transactions,
    wait_for,
    warehouse_totals,
    write_transactions,
)

TYPES = ("deposit", "withdrawal", "purchase")
COUNTRIES = ("US", "FR", "DE", "JP", "BR")


def lake_daemon(
    base: Path, name: str, lake: Path, *, preamble: str | None = None, **env: str
) -> DaemonProcess:
    """A daemon with its own inbox and warehouse under ``base/name``, on the shared ``lake``
    (``preamble``: Python the child runs before ``serve``)."""
    environ = {
        "MONEYLION_LAKE_URI": str(lake),
        "MONEYLION_LOG_LEVEL": "INFO",
        "MONEYLION_LAKE_POLL_SECONDS": "0.05",
        "MONEYLION_LAKE_MAINTENANCE_SECONDS": "3",
        "MONEYLION_INGEST_NICE": "0",
        **env,
    }
    inbox = base / name / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    return DaemonProcess(
        inbox, base / name / "warehouse", settle_seconds=0.05, env=environ, preamble=preamble
    )


# --- the files --------------------------------------------------------------------------------


@dataclass
class Scenario:
    """Files to drop: ``shared`` into every inbox at once, ``only[i]`` into daemon i's alone."""

    shared: list[Path] = field(default_factory=list)
    only: list[list[Path]] = field(default_factory=lambda: [[], []])

    @property
    def all(self) -> list[Path]:
        return [*self.shared, *self.only[0], *self.only[1]]


def _users(path: Path, rows: list[tuple[int, str, str]], extra: str = "") -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["user_id", "signup_date", "country"])
        writer.writerows(rows)
        handle.write(extra)
    return path


def make_scenario(folder: Path, seed: int, *, files: int = 24, rows: int = 60) -> Scenario:
    """Transactions files (fresh, re-sent under another name, overlapping, conflicting with
    another file, with a bad row and an in-file conflict), users files that update each other
    (a profile changes country), orphans (users that never arrive), spread over the two
    inboxes: some in both, some in one only."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    scenario = Scenario()
    next_id = 1
    history: list[list[tuple[int, int, str, str, str]]] = []
    written: list[Path] = []
    for n in range(files):
        path = folder / f"s{seed}-tx-{n:03d}.csv"
        roll = rng.random()
        if history and roll < 0.15:  # the same bytes under another name
            path.write_bytes(written[rng.randrange(len(written))].read_bytes())
        elif history and roll < 0.35:  # some rows of another file again, some changed
            earlier = rng.choice(history)
            changed = [
                (t, u, d, f"{Decimal(a) + Decimal('0.01')}", k) if i % 3 == 0 else (t, u, d, a, k)
                for i, (t, u, d, a, k) in enumerate(earlier[: rows // 2])
            ]
            fresh = random_transactions(rng, next_id, rows // 2, users=40)
            next_id += len(fresh)
            write_transactions(path, changed + fresh)
            history.append(changed + fresh)
        else:
            batch = random_transactions(rng, next_id, rows, users=40)
            next_id += len(batch)
            if n % 7 == 3:  # a copy that differs within the file, and a bad amount
                t, u, d, a, k = batch[0]
                batch.append((t, u, d, "1.00" if a != "1.00" else "2.00", k))
                batch.append((next_id, 1, "2022-03-01", "1.234", "deposit"))
                next_id += 1
            write_transactions(path, batch)
            history.append(batch)
        written.append(path)
    # Users: three files, each later one moving some users to another country; ids past 30
    # never get a profile (orphans).
    for n in range(3):
        profiles = [
            (u, f"2021-0{1 + u % 9}-1{u % 10}", COUNTRIES[(u + n * (u % 2)) % len(COUNTRIES)])
            for u in range(1, 31)
            if (u + n) % 3
        ]
        written.append(_users(folder / f"s{seed}-users-{n}.csv", profiles))
    rng.shuffle(written)
    for path in written:
        place = rng.random()
        if place < 0.5:
            scenario.shared.append(path)
        else:
            scenario.only[0 if place < 0.75 else 1].append(path)
    return scenario


def drop(paths: list[Path], inbox: Path) -> None:
    """Copy files into an inbox the way a producer does: written aside, then renamed in."""
    for path in paths:
        temporary = inbox / f".{path.name}.part"
        temporary.write_bytes(path.read_bytes())
        os.rename(temporary, inbox / path.name)


def drop_together(scenario: Scenario, inboxes: list[Path]) -> None:
    """Each daemon's files dropped by its own thread at the same time, shared ones first in
    each (so both daemons read them together)."""
    threads = [
        threading.Thread(target=drop, args=([*scenario.shared, *scenario.only[i]], inbox))
        for i, inbox in enumerate(inboxes)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


# --- the independent side ------------------------------------------------------------------------


@dataclass
class Independent:
    count: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    total: dict[int, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    by_type: dict[tuple[int, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    daily: dict[tuple[str, str], tuple[int, Decimal]] = field(default_factory=dict)
    countries: dict[int, str] = field(default_factory=dict)
    stored: dict[int, tuple[str, ...]] = field(default_factory=dict)

    def add_file(self, text: str) -> None:
        reader = csv.reader(io.StringIO(text))
        header = [h.strip().lower() for h in next(reader)]
        rows = [dict(zip(header, (f.strip() for f in r), strict=True)) for r in reader if r]
        if "country" in header:
            for row in rows:  # the latest wins (the scenario's users files are clean)
                self.countries[int(row["user_id"])] = row["country"]
            return
        good = [r for r in rows if _clean(r)]
        contents: dict[int, set[tuple[str, ...]]] = defaultdict(set)
        for r in good:
            contents[int(r["transaction_id"])].add(_content(r))
        kept: set[int] = set()
        for r in good:
            ident = int(r["transaction_id"])
            if len(contents[ident]) > 1 or ident in kept or ident in self.stored:
                continue
            kept.add(ident)
            self.stored[ident] = _content(r)
            user, day, kind = int(r["user_id"]), r["transaction_date"], r["transaction_type"]
            amount = Decimal(r["amount"])
            self.count[user] += 1
            self.total[user] += amount
            self.by_type[user, kind] += amount
            n, t = self.daily.get((day, kind), (0, Decimal(0)))
            self.daily[day, kind] = (n + 1, t + amount)


def _clean(row: dict[str, str]) -> bool:
    amount = row["amount"]
    return "." not in amount or len(amount.split(".")[1]) <= 2


def _content(row: dict[str, str]) -> tuple[str, ...]:
    return (
        row["user_id"],
        row["transaction_date"],
        f"{Decimal(row['amount']):.2f}",
        row["transaction_type"],
    )


def ledger_rows(lake: Path) -> list[dict[str, Any]]:
    """The lake's ledger, in its order (read with deltalake, not with moneylion)."""
    from deltalake import DeltaTable

    table = DeltaTable(str(lake / "files")).to_pyarrow_table()
    return sorted(table.to_pylist(), key=lambda row: row["file_id"])


def independent(lake: Path, files: list[Path]) -> Independent:
    """The answers computed from the files' own bytes, in the order of the lake's ledger."""
    import hashlib

    by_sha = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in files}
    result = Independent()
    for row in ledger_rows(lake):
        if row["status"] == "loaded":
            result.add_file(by_sha[row["sha256"]].read_text(encoding="utf-8"))
    return result


# --- the daemons' answers ------------------------------------------------------------------


def api_answers(daemon: DaemonProcess, users: range) -> dict[str, Any]:
    """Everything both replicas must answer alike (per-user, per-day, top, countries, files)."""
    files = daemon.get("/v1/files", limit=1000)
    summaries = {}
    for user in users:
        response = daemon.client.get(f"/v1/users/{user}/summary")
        summaries[user] = response.json() if response.status_code == 200 else None
    rejects = {
        entry["file_id"]: [
            (r["line"], r["reason"], r["message"])
            for r in daemon.get(f"/v1/files/{entry['file_id']}/rejects", limit=1000)["items"]
        ]
        for entry in files["items"]
        if entry["rows_rejected"]
    }
    return {
        "rejects": rejects,
        "users": summaries,
        "daily": daemon.pages("/v1/daily", "days"),
        "top": daemon.get("/v1/users/top", limit=50)["users"],
        "countries": daemon.pages("/v1/countries/monthly", "months"),
        "files": files,
    }


def caught_up(daemon: DaemonProcess, files: int) -> bool:
    """The replica has applied ``files`` ledger files (and nothing is left behind)."""
    try:
        lake = daemon.get("/v1/health/ready").get("lake") or {}
    except Exception:
        return False
    return bool(lake) and lake["applied_files"] >= files and lake["lag_files"] == 0


def settled(daemons: list[DaemonProcess], lake: Path, timeout: float = 120) -> int:
    """Wait until every inbox is empty (each file's ledger row is committed: files move only
    after it) and every replica has applied the whole ledger; the ledger's files."""
    wait_for(lambda: all(not d.inbox_waiting() for d in daemons), timeout, "empty inboxes")
    total = len(ledger_rows(lake))
    wait_for(lambda: all(caught_up(d, total) for d in daemons), timeout, "replicas caught up")
    return total


def raced(daemons: list[DaemonProcess]) -> list[str]:
    """The log events that show two daemons racing: a ledger commit lost to the other daemon,
    or a file whose bytes the other committed first."""
    events = [e for d in daemons for e in logged_events(d.warehouse)]
    return [
        e["event"]
        for e in events
        if e.get("event") in ("lake_commit_conflict", "lake_duplicate_found")
    ]


def verify_differences(daemon: DaemonProcess) -> list[str]:
    """``verify`` on a stopped daemon's warehouse."""
    return warehouse_totals(daemon.warehouse)[2]


def expected_answers(
    result: Independent,
) -> tuple[dict[int, tuple[int, str]], list[tuple[str, str, int, str]]]:
    users = {u: (result.count[u], f"{result.total[u]:.2f}") for u in result.count}
    daily = [
        (day, kind, n, f"{total:.2f}") for (day, kind), (n, total) in sorted(result.daily.items())
    ]
    return users, daily


def answered(
    answers: dict[str, Any],
) -> tuple[dict[int, tuple[int, str]], list[tuple[str, str, int, str]]]:
    users = {
        u: (s["transaction_count"], s["total_amount"])
        for u, s in answers["users"].items()
        if s is not None and s["transaction_count"]
    }
    daily = [
        (d["date"], d["type"], d["transaction_count"], d["total_amount"]) for d in answers["daily"]
    ]
    return users, daily


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def elapsed(since: float) -> float:
    return time.monotonic() - since


# --- a second engine ---------------------------------------------------------------------------


def polars_totals(lake: Path) -> tuple[dict[int, tuple[int, str]], list[tuple[str, str, int, str]]]:
    """Per-user and per-day totals read from the lake with Polars (through deltalake): the
    rows named by a loaded ledger row, the first copy of each id in the ledger's order."""
    import polars as pl

    files = (
        pl.scan_delta(str(lake / "files"))
        .filter(pl.col("status") == "loaded")
        .select(pl.col("sha256").alias("file_sha256"), "write_id", "file_id")
    )
    rows = (
        pl.scan_delta(str(lake / "transactions"))
        .join(files, on=["file_sha256", "write_id"])
        .sort("file_id", "line")
        .unique("transaction_id", keep="first", maintain_order=True)
    )
    users = rows.group_by("user_id").agg(pl.len().alias("n"), pl.col("amount").sum()).collect()
    daily = (
        rows.group_by("transaction_date", "transaction_type")
        .agg(pl.len().alias("n"), pl.col("amount").sum())
        .sort("transaction_date", "transaction_type")
        .collect()
    )
    return (
        {int(u): (int(n), f"{a:.2f}") for u, n, a in users.iter_rows()},
        [(d.isoformat(), k, int(n), f"{a:.2f}") for d, k, n, a in daily.iter_rows()],
    )


# --- crash trial --------------------------------------------------------------------------------


def feed(paths: list[Path], inbox: Path, rng: random.Random, stop: threading.Event) -> None:
    for path in paths:
        if stop.is_set():
            return
        drop([path], inbox)
        time.sleep(rng.uniform(0.02, 0.15))  # spread over the kills


def lake_crash_trial(base: Path, seed: int, *, files: int = 20, rows: int = 60) -> list[str]:
    """Two daemons on one lake, fed at once; daemon b is SIGKILLed at random moments and
    restarted (now and then while it starts). Then: every sha256 once in the ledger, both
    replicas answer alike and as the independent computation, verify passes on both. The
    problems found ([] for an exact trial)."""
    rng = random.Random(seed)
    lake = base / "lake"
    scenario = make_scenario(base / "src", seed, files=files, rows=rows)
    a, b = lake_daemon(base, "a", lake), lake_daemon(base, "b", lake)
    problems: list[str] = []
    stop = threading.Event()
    try:
        a.start()
        b.start()
        feeders = [
            threading.Thread(
                target=feed,
                args=(
                    [*scenario.shared, *scenario.only[i]],
                    d.inbox,
                    random.Random(seed + i),
                    stop,
                ),
            )
            for i, d in enumerate((a, b))
        ]
        for thread in feeders:
            thread.start()
        for _ in range(rng.randint(3, 4)):
            time.sleep(rng.uniform(0.05, 0.8))  # while it reads, writes rows, commits, applies
            b.kill()
            b.start(wait_ready=rng.random() < 0.7)  # else killed again while it starts
        for thread in feeders:
            thread.join()
        b.wait_ready()
        settled([a, b], lake)
        problems += compare_replicas(a, b, lake, scenario)
    finally:
        stop.set()
        for daemon in (a, b):
            with_code = daemon.proc is not None and daemon.proc.poll() is None
            if with_code and daemon.stop() != 0:
                problems.append(f"{daemon.warehouse.parent.name}: exit code after SIGTERM")
            daemon.close()
    for daemon in (a, b):
        problems += [
            f"verify {daemon.warehouse.parent.name}: {d}" for d in verify_differences(daemon)
        ]
    return problems


USERS = range(1, 46)


def compare_replicas(
    a: DaemonProcess, b: DaemonProcess, lake: Path, scenario: Scenario
) -> list[str]:
    """What must hold once both replicas caught up: the problems found."""
    problems = []
    shas = [row["sha256"] for row in ledger_rows(lake)]
    if len(shas) != len(set(shas)):
        problems.append("a sha256 is in the ledger more than once")
    distinct = {p.read_bytes() for p in scenario.all}
    if len(shas) != len(distinct):
        problems.append(f"{len(shas)} files in the ledger, {len(distinct)} distinct files dropped")
    first, second = api_answers(a, USERS), api_answers(b, USERS)
    if first != second:
        differing = [key for key in first if first[key] != second[key]]
        problems.append(f"the replicas answer {differing} differently")
    want = expected_answers(independent(lake, scenario.all))
    if answered(first) != want:
        problems.append("the answers differ from the independent computation")
    return problems
