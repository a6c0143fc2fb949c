"""A real ``python -m moneylion serve`` child on tmp dirs and a free port, for the end-to-end and
crash tests and the daemon benchmarks; plus small generated CSV streams with their exact totals
computed independently (csv + Decimal), and one crash trial."""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx

from moneylion.config import Config
from moneylion.inbox import set_aside_files
from moneylion.watcher import scan_inbox
from tests.conftest import TX_COLUMNS, TYPES
from tests.expected import Expected

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    """Poll ``predicate`` until true; raise AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


class DaemonProcess:
    """One ``moneylion serve`` child process with its inbox, warehouse and port."""

    def __init__(
        self,
        inbox: Path,
        warehouse: Path,
        *,
        port: int | None = None,
        settle_seconds: float = 0.2,
        env: dict[str, str] | None = None,
        preamble: str | None = None,
        tree: Path = REPO,
        python: Path | None = None,
    ) -> None:
        """``preamble``: Python run in the child before ``serve`` (a test hook, say). ``tree``
        and ``python``: another checkout's package and interpreter (a benchmark's baseline)."""
        self.preamble = preamble
        self.tree = tree
        self.python = str(python or sys.executable)
        self.inbox = inbox
        self.warehouse = warehouse
        self.port = port or free_port()
        self.settle_seconds = settle_seconds
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10.0)

    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "MONEYLION_INBOX": str(self.inbox),
                "MONEYLION_WAREHOUSE": str(self.warehouse),
                "MONEYLION_PORT": str(self.port),
                "MONEYLION_SETTLE_SECONDS": str(self.settle_seconds),
                "MONEYLION_LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, *, wait_ready: bool = True, timeout: float = 60.0) -> None:
        self.warehouse.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = (self.warehouse / f"child-{self.starts}.err").open("wb")
        command = [self.python, "-m", "moneylion", "serve"]
        if self.preamble is not None:
            main = "from moneylion.cli import main\nraise SystemExit(main(['serve']))"
            command = [self.python, "-c", f"{self.preamble}\n{main}"]
        self.proc = subprocess.Popen(
            command,
            cwd=self.tree,
            env=self.environ(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        if wait_ready:
            self.wait_ready(timeout)

    def stderr_text(self) -> str:
        path = self.warehouse / f"child-{self.starts}.err"
        return path.read_text(errors="replace") if path.exists() else ""

    def ready(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"moneylion serve exited early:\n{self.stderr_text()}")
        try:
            return self.client.get("/v1/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 60.0) -> None:
        wait_for(self.ready, timeout, "the daemon to be ready")

    def get(self, path: str, **params: Any) -> Any:
        response = self.client.get(path, params=params or None)
        response.raise_for_status()
        return response.json()

    def pages(self, path: str, key: str, **params: Any) -> list[Any]:
        """Every row of a paged answer (``/v1/daily``, ``/v1/countries/monthly``): the ``key``
        rows of each page, following ``next`` until it is null."""
        body = self.get(path, **params)
        rows: list[Any] = list(body[key])
        while body["next"] is not None:
            response = self.client.get(body["next"])
            response.raise_for_status()
            body = response.json()
            rows.extend(body[key])
        return rows

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        self.client.close()

    def inbox_waiting(self) -> list[str]:
        """Files in the inbox the daemon should take (ignored names left out)."""
        return [p.name for p in scan_inbox(self.inbox)]

    def folder(self, name: str) -> list[str]:
        """The names of the files set aside in done/ or failed/ (in their day folders)."""
        return sorted(p.name for p in set_aside_files(self.inbox / name))

    def ledger(self) -> list[dict[str, Any]]:
        """Every row of the files ledger as ``/v1/files`` pages it, in file_id order."""
        page = self.get("/v1/files", limit=1000)
        items: list[dict[str, Any]] = page["items"]
        while len(items) < page["total"]:
            page = self.get("/v1/files", limit=1000, offset=len(items))
            if not page["items"]:
                break
            items.extend(page["items"])
        return items


def assert_api_totals(daemon: DaemonProcess, expected: Expected, sample: int = 60) -> None:
    """Every day's totals, and a sample of users', as the API shows them, equal ``expected``."""
    days = daemon.pages("/v1/daily", "days", **{"from": "2000-01-01", "to": "2099-12-31"})
    shown = {(d["date"], d["type"]): Decimal(d["total_amount"]) for d in days}
    assert shown == {key: value for key, value in expected.daily.items()}
    counts = {(d["date"], d["type"]): d["transaction_count"] for d in days}
    assert counts == dict(expected.daily_count)
    users = sorted(expected.total)
    for user in random.Random(7).sample(users, min(sample, len(users))):
        summary = daemon.get(f"/v1/users/{user}/summary")
        assert Decimal(summary["total_amount"]) == expected.total[user], user
        assert summary["transaction_count"] == expected.count[user], user
        for kind in TYPES:
            want = expected.by_type.get((user, kind), Decimal(0))
            assert Decimal(summary[f"total_{kind}"]) == want, (user, kind)


def run_cli_on(config: Config, *args: str) -> subprocess.CompletedProcess[str]:
    """``run_cli`` on ``config``'s warehouse and inbox."""
    env = {
        **os.environ,
        "MONEYLION_WAREHOUSE": str(config.warehouse),
        "MONEYLION_INBOX": str(config.inbox),
    }
    return run_cli(*args, env=env)


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m moneylion <args>`` to completion, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "moneylion", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# -- independent totals ------------------------------------------------------------------------


def write_transactions(path: Path, rows: Iterable[Sequence[object]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(TX_COLUMNS)
        writer.writerows(rows)
    return path


def random_transactions(
    rng: random.Random, first_id: int, count: int, users: int = 200
) -> list[tuple[int, int, str, str, str]]:
    start = dt.date(2022, 1, 1)
    return [
        (
            first_id + i,
            rng.randint(1, users),
            (start + dt.timedelta(days=rng.randrange(365))).isoformat(),
            f"{rng.randint(1, 500_000) / 100:.2f}",
            rng.choice(TYPES),
        )
        for i in range(count)
    ]


def transaction_stream(
    folder: Path, rng: random.Random, files: int, rows: int, resend_every: int = 5
) -> list[Path]:
    """``files`` small transaction files; every ``resend_every``-th is an exact re-send of an
    earlier file under a new name, or a file overlapping an earlier one (identical rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    history: list[list[tuple[int, int, str, str, str]]] = []
    next_id = 1
    for n in range(files):
        name = folder / f"tx-{n:04d}.csv"
        if history and n % resend_every == resend_every - 1:
            earlier = rng.choice(history)
            if n % 2:
                batch = earlier  # the same bytes again: a duplicate file
            else:
                fresh = random_transactions(rng, next_id, rows // 2)
                next_id += len(fresh)
                batch = earlier[: rows // 2] + fresh  # half duplicates, half new rows
        else:
            batch = random_transactions(rng, next_id, rows)
            next_id += len(batch)
        history.append(batch)
        written.append(write_transactions(name, batch))
    return written


# -- crash trial ----------------------------------------------------------------------------------


@dataclass
class TrialResult:
    kills: int
    exact: bool
    problems: list[str]
    recovered: int = 0  # files committed by a killed run and only moved by the next one


def warehouse_totals(warehouse: Path) -> tuple[int, dict[int, tuple[int, Decimal]], list[str]]:
    """(transactions, {user: (count, total)}, verify differences) read straight from DuckDB."""
    from moneylion.aggregates import verify
    from moneylion.config import load_config
    from moneylion.schema import open_warehouse

    config = load_config(environ={}).with_overrides(inbox=warehouse / "unused", warehouse=warehouse)
    conn = open_warehouse(config)
    try:
        count = conn.execute("SELECT count(*) FROM transactions").fetchone()
        users = conn.execute("SELECT user_id, tx_count, total_amount FROM user_totals").fetchall()
        differences = verify(conn, top_users_kept=config.top_users_kept)
    finally:
        conn.close()
    return (
        int(count[0]) if count else 0,
        {int(u): (int(c), Decimal(t)) for u, c, t in users},
        differences,
    )


def crash_trial(base: Path, seed: int, *, files: int = 30, rows: int = 200) -> TrialResult:
    """Feed a stream of files to a daemon that is SIGKILLed at random moments while it ingests
    and is restarted, until every file is in done/; then compare with the independent totals."""
    rng = random.Random(seed)
    staging = base / "staging"
    stream = transaction_stream(staging, rng, files, rows)
    resent = len(stream) - len({p.read_bytes() for p in stream})
    expected = Expected()
    for path in stream:
        expected.add_transactions_file(path)
    inbox = base / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    daemon = DaemonProcess(
        inbox, base / "warehouse", settle_seconds=0.05, env={"MONEYLION_LOG_LEVEL": "INFO"}
    )
    pending = list(stream)
    kills_planned = rng.randint(3, 5)
    kills = 0
    problems: list[str] = []

    def feed(until: float) -> None:
        while time.monotonic() < until and (pending or until != float("inf")):
            for _ in range(rng.randint(0, 2)):
                if pending:  # move-in (a bare Created) and in-place writes, mixed
                    path = pending.pop(0)
                    if rng.random() < 0.5:
                        os.rename(path, inbox / path.name)
                    else:
                        (inbox / path.name).write_bytes(path.read_bytes())
                        path.unlink()
            time.sleep(rng.uniform(0.01, 0.06))

    try:
        while kills < kills_planned:
            if rng.random() < 0.25:  # now and then while it starts up (backlog scan, first files)
                daemon.start(wait_ready=False)
                feed(time.monotonic() + rng.uniform(0.3, 1.2))
            else:  # mostly while it ingests what is being fed
                daemon.start(wait_ready=True)
                feed(time.monotonic() + rng.uniform(0.0, 0.6))
            daemon.kill()
            kills += 1
        daemon.start(wait_ready=True)
        feed(float("inf"))
        wait_for(
            lambda: len(daemon.folder("done")) + len(daemon.folder("failed")) >= len(stream),
            180,
            "every file in done/",
        )
        code = daemon.stop()
        if code != 0:
            problems.append(f"exit code {code} after SIGTERM")
    finally:
        daemon.close()
    done = daemon.folder("done")
    if done != sorted(p.name for p in stream):
        problems.append(f"done/ holds {len(done)} files, not each of the {len(stream)} once")
    if daemon.folder("failed"):
        problems.append(f"failed/ holds {daemon.folder('failed')}")
    count, users, differences = warehouse_totals(base / "warehouse")
    problems.extend(f"verify: {line}" for line in differences)
    if count != expected.transactions:
        problems.append(f"{count} transactions stored, {expected.transactions} expected")
    want = {u: (expected.count[u], expected.total[u]) for u in expected.count}
    if users != want:
        wrong = [u for u in set(users) | set(want) if users.get(u) != want.get(u)]
        problems.append(f"{len(wrong)} users with wrong totals, e.g. {sorted(wrong)[:5]}")
    duplicate_moves = sum(
        1
        for event in logged_events(base / "warehouse")
        if event.get("event") == "file_moved" and event.get("status") == "duplicate_file"
    )
    return TrialResult(kills, not problems, problems, max(duplicate_moves - resent, 0))


def logged_events(warehouse: Path) -> list[dict[str, Any]]:
    """The JSON-lines log of every run on ``warehouse`` (rotated files included)."""
    events = []
    for path in sorted((warehouse / "logs").glob("moneylion.log*")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


@contextlib.contextmanager
def running_daemon(
    inbox: Path, warehouse: Path, **kwargs: Any
) -> Any:  # Iterator[DaemonProcess]; Any keeps the import light for bench scripts
    daemon = DaemonProcess(inbox, warehouse, **kwargs)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.close()
