"""Where one commit's time goes, statement by statement, on the 1M-user / 10M-transaction warehouse.

Two commits are measured, each over --files commits on a fresh copy of the warehouse this tree
built (bench/compare.py's cache), after one unmeasured commit:

* ``file``: a 1,000-row transactions file by ``ingest_file`` (what bench/compare.py times);
* ``batch``: one 10-row file by ``batch.ingest_batch`` (what the daemon commits in a slow
  stream: a file staged, read by the reference rules, then one commit).

The connection is wrapped so that every statement's wall time is noted (its text with numbers
and hashes blanked is its name); each statement's result is read to the end inside the timing.
Prints per statement: ms per commit (mean), its median, statements per commit; then the commit's
wall and CPU (process time: DuckDB's threads included) medians and the time outside statements
(Python: staging, the rules, the top list).

    .venv/bin/python bench/steps.py [--files 30] [--only file,batch]
"""

from __future__ import annotations

import argparse
import functools
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cached_transactions, cached_users  # noqa: E402
from bench.compare import FIRST_ID_SMALL, this_tree  # noqa: E402
from bench.stream import TRANSACTIONS, USERS, make_files  # noqa: E402

BLANKS = re.compile(r"\d{4,}|'[0-9a-f]{64}'")


class Timed:
    """A DuckDB connection whose statements are timed into ``spent`` (name -> seconds each)."""

    def __init__(self, conn: Any, spent: dict[str, list[float]]) -> None:
        self._conn, self.spent = conn, spent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    def execute(self, sql: str, *args: Any) -> Any:
        started = time.perf_counter()
        result = self._conn.execute(sql, *args)
        rows = result.fetchall() if result.description else None
        self.spent[BLANKS.sub("N", " ".join(sql.split()))[:100]].append(
            time.perf_counter() - started
        )
        return _Read(rows, result) if rows is not None else result

    def cursor(self) -> Timed:
        return Timed(self._conn.cursor(), self.spent)


class _Read:
    """A result already read to the end (inside the statement's time)."""

    def __init__(self, rows: list[tuple[Any, ...]], result: Any) -> None:
        self.rows, self.description = rows, result.description

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self.rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None


def measure(name: str, commits: list[Callable[[Any], None]], conn: Any) -> None:
    spent: dict[str, list[float]] = defaultdict(list)
    timed = Timed(conn, spent)
    walls, cpus = [], []
    for number, commit in enumerate(commits):
        wall, cpu = time.perf_counter(), time.process_time()
        commit(timed)
        if number == 0:  # the first: caches warm up
            spent.clear()
            continue
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    count = len(walls)
    print(
        f"\n{name}: {count} commits, wall median {1000 * statistics.median(walls):.1f} ms, "
        f"CPU median {1000 * statistics.median(cpus):.1f} ms"
    )
    total = 0.0
    for text, times in sorted(spent.items(), key=lambda item: -sum(item[1])):
        total += sum(times)
        print(
            f"  {1000 * sum(times) / count:6.2f} ms  median {1000 * statistics.median(times):6.2f}"
            f"  x{len(times) / count:4.1f}  {text}"
        )
    outside = statistics.mean(walls) - total / count
    print(
        f"  statements {1000 * total / count:.1f} ms a commit (mean); outside them "
        f"{1000 * outside:.1f} ms"
    )


def _one_file(path: Path, config: Any, timed: Any) -> None:
    from moneylion.ingest import ingest_file

    outcome = ingest_file(timed, path, config)
    assert outcome.status == "loaded", outcome


def _one_batch(path: Path, config: Any, timed: Any) -> None:
    from moneylion.batch import ingest_batch, item_of

    outcomes, left = ingest_batch(timed, [item_of(path, config)], config)
    assert not left
    assert outcomes[0].status == "loaded", outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=30)
    parser.add_argument("--only", default="file,batch")
    args = parser.parse_args()
    only = set(args.only.split(","))

    from moneylion.config import load_config
    from moneylion.schema import open_warehouse

    users = cached_users(USERS, seed=1)
    transactions = cached_transactions(TRANSACTIONS, users=USERS, first_id=1_000_001, seed=3)
    cached = this_tree().warehouse(users, transactions)
    scratch = Path(tempfile.mkdtemp(prefix="moneylion-steps-"))
    try:
        for case in ("file", "batch"):
            if case not in only:
                continue
            warehouse = scratch / case / "warehouse"
            shutil.copytree(cached, warehouse)
            config = load_config(environ={}).with_overrides(
                warehouse=warehouse, inbox=scratch / case / "inbox"
            )
            conn = open_warehouse(config)
            if case == "file":
                files = [
                    cached_transactions(
                        1_000, users=USERS, first_id=FIRST_ID_SMALL + n * 1_000, seed=100 + n
                    )
                    for n in range(args.files + 1)
                ]
                commits = [functools.partial(_one_file, path, config) for path in files]
                measure("a 1,000-row file, ingest_file", commits, conn)
            else:
                small = make_files(scratch / "small", args.files + 1, 0, random.Random(5))
                commits = [functools.partial(_one_batch, path, config) for path in small]
                measure("a 10-row file, a batch of one (the daemon's slow stream)", commits, conn)
            conn.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
