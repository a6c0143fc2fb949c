"""Every single-file figure of this tree next to a baseline commit's, interleaved, with ratios.

    .venv/bin/python bench/compare.py [REF] [--rounds 3] [--files 15] [--only small,cli,big]
    make bench-compare

REF defaults to the ``single-file`` commit of ``bench/BASELINE``. The baseline is checked out into
``bench/out/trees/<commit>`` (a git worktree) with its own virtual environment, installed from
its own ``constraints.txt``. Both sides are driven through what both trees have —
``load_config``, ``open_warehouse``, ``ingest_file`` and the ``moneylion`` command line — by
this file run in that tree's environment (``--drive``), each on its own warehouse of 1M users
and 10M transactions, built once per set of migrations into ``bench/out/compare/<hash>/`` and
copied afresh for every round. Inputs are generated once by this tree (the same bytes on both
sides). Rounds alternate (baseline, this tree, baseline, ...), so both see the same machine.

Figures: ``small``: a 1,000-row transactions file by ``ingest_file`` into the 10M warehouse
(median and max of ``--files`` distinct files per round); ``cli``: the same through ``moneylion
ingest``, minus a ``moneylion status`` on the same warehouse (the command line's start-up);
``big``: the 10M-row file into a warehouse holding the 1M users, in a process of its own, with
its peak RSS. Each figure prints the medians over rounds and this tree's ratio to the baseline;
a ratio above 1.05 is marked as a regression.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
USERS = 1_000_000
TRANSACTIONS = 10_000_000
SMALL_ROWS = 1_000
FIRST_ID_10M, FIRST_ID_SMALL = 1_000_001, 30_000_001  # as bench/ingest.py: ranges never overlap
REGRESSION = 1.05  # a figure this much worse than the baseline is a regression to fix or justify


# -- the driver: runs inside either tree's environment, imports only that tree's moneylion ------


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _open(warehouse: Path):  # type: ignore[no-untyped-def]  # either tree's connection
    from moneylion.config import load_config
    from moneylion.schema import open_warehouse

    config = load_config(environ={}).with_overrides(
        warehouse=warehouse, inbox=warehouse.parent / "inbox"
    )
    return config, open_warehouse(config)


def _ingest(conn: object, path: Path, config: object) -> float:
    from moneylion.ingest import ingest_file

    started = time.perf_counter()
    outcome = ingest_file(conn, path, config)  # type: ignore[arg-type]
    seconds = time.perf_counter() - started
    if outcome.status != "loaded":
        raise SystemExit(f"{path.name}: {outcome.status} {getattr(outcome, 'error', '')}")
    return seconds


def drive(task: str, args: list[str]) -> dict[str, object]:
    """One measurement in this process (its tree's moneylion on sys.path): a JSON-able dict."""
    if task == "prepare":  # warehouse users transactions
        warehouse, users, transactions = (Path(a) for a in args)
        config, conn = _open(warehouse)
        seconds = _ingest(conn, users, config) + _ingest(conn, transactions, config)
        conn.close()
        return {"seconds": seconds}
    if task == "small":  # warehouse file...
        warehouse, *files = (Path(a) for a in args)
        config, conn = _open(warehouse)
        times = [_ingest(conn, path, config) for path in files]
        conn.close()
        return {"times": times}
    if task == "big":  # warehouse users transactions
        warehouse, users, transactions = (Path(a) for a in args)
        config, conn = _open(warehouse)
        _ingest(conn, users, config)
        seconds = _ingest(conn, transactions, config)
        conn.close()
        return {"seconds": seconds, "rss_mb": _peak_rss_mb()}
    raise SystemExit(f"unknown task {task}")


# -- the comparison: runs in this tree ------------------------------------------------------------


class Side:
    """One tree to measure: its directory, its Python, its cached 10M warehouse."""

    def __init__(self, name: str, tree: Path, python: Path, commit: str) -> None:
        self.name, self.tree, self.python, self.commit = name, tree, python, commit
        self.cache = OUT / "compare" / migrations_key(tree)

    def run(self, task: str, *args: Path) -> dict[str, object]:
        found = subprocess.run(
            [str(self.python), str(Path(__file__).resolve()), "--drive", task, *map(str, args)],
            cwd=self.tree,
            env={**os.environ, "PYTHONPATH": str(self.tree)},
            capture_output=True,
            text=True,
            check=False,
        )
        if found.returncode:
            raise SystemExit(f"{self.name} {task} failed:\n{found.stderr[-3000:]}")
        result: dict[str, object] = json.loads(found.stdout.strip().splitlines()[-1])
        return result

    def command(self, warehouse: Path, *args: str) -> float:
        """Wall seconds of ``moneylion <args>`` on ``warehouse`` in this tree's environment."""
        env = {
            **os.environ,
            "PYTHONPATH": str(self.tree),
            "MONEYLION_WAREHOUSE": str(warehouse),
            "MONEYLION_INBOX": str(warehouse.parent / "inbox"),
        }
        started = time.perf_counter()
        subprocess.run(
            [str(self.python), "-m", "moneylion", *args],
            cwd=self.tree,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
        )
        return time.perf_counter() - started

    def warehouse(self, users: Path, transactions: Path) -> Path:
        """The cached warehouse of 1M users and 10M transactions built by this tree."""
        ready = self.cache / f"{users.stem}--{transactions.stem}"
        if not (ready / "moneylion.duckdb").exists():
            building = self.cache / "building"
            shutil.rmtree(building, ignore_errors=True)
            print(f"building {self.name}'s warehouse {ready.name} ...", flush=True)
            self.run("prepare", building / "warehouse", users, transactions)
            (building / "warehouse").rename(ready)
            shutil.rmtree(building, ignore_errors=True)
        return ready


def migrations_key(tree: Path) -> str:
    """A name for the warehouse layout of ``tree``: a hash of its migrations (the same
    migrations build the same warehouse, so a commit that adds none reuses the cache)."""
    digest = hashlib.sha256()
    for path in sorted((tree / "moneylion" / "sql").glob("*.sql")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout.strip()


def baseline(group: str) -> str:
    for line in (REPO / "bench" / "BASELINE").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 2 and fields[0] == group:
            return fields[1]
    raise SystemExit(f"bench/BASELINE names no {group} commit")


def checkout(ref: str) -> Side:
    """``ref`` in a worktree of its own with a virtual environment of its own (made once)."""
    commit = git("rev-parse", f"{ref}^{{commit}}")
    tree = OUT / "trees" / commit[:12]
    if not (tree / ".git").exists():
        shutil.rmtree(tree, ignore_errors=True)
        git("worktree", "add", "--detach", str(tree), commit)
    python = tree / ".venv" / "bin" / "python"
    stamp = tree / ".venv" / ".installed"
    if not stamp.exists():
        print(f"installing {ref} ({commit[:12]}) into {tree}/.venv ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(tree / ".venv")], check=True)
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "-c",
                "constraints.txt",
                "-e",
                ".[dev]",
            ],
            cwd=tree,
            check=True,
        )
        stamp.touch()
    return Side(f"baseline {ref}", tree, python, commit)


def this_tree() -> Side:
    venv = REPO / ".venv" / "bin" / "python"
    python = venv if venv.exists() else Path(sys.executable)
    dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--", "moneylion") else ""
    return Side(f"this tree{dirty}", REPO, python, git("rev-parse", "HEAD"))


def fresh_copy(warehouse: Path, scratch: Path) -> Path:
    """A copy of ``warehouse`` in ``scratch`` (so every round starts from the same state)."""
    target = scratch / "warehouse"
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(warehouse, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("ref", nargs="?", default=None, help="baseline commit (bench/BASELINE)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--files", type=int, default=15, help="1,000-row files per round")
    parser.add_argument("--only", default="small,cli,big")
    parser.add_argument(
        "--users", type=int, default=USERS, help="a smaller warehouse: a quick check"
    )
    parser.add_argument("--transactions", type=int, default=TRANSACTIONS)
    args = parser.parse_args()
    only = set(args.only.split(","))

    sys.path.insert(0, str(REPO))
    from bench.common import cached_transactions, cached_users, print_table

    users = cached_users(args.users, seed=1)
    big = cached_transactions(args.transactions, users=args.users, first_id=FIRST_ID_10M, seed=3)
    small = [
        cached_transactions(
            SMALL_ROWS, users=args.users, first_id=FIRST_ID_SMALL + n * 1_000, seed=100 + n
        )
        for n in range(args.files + 1)
    ]
    big_rows = f"{args.transactions / 1e6:g}M-row"
    sides = [checkout(args.ref or baseline("single-file")), this_tree()]
    warehouses = {side.name: side.warehouse(users, big) for side in sides}
    scratch = Path(tempfile.mkdtemp(prefix="moneylion-compare-"))
    figures: dict[tuple[str, str], list[float]] = {}

    def record(figure: str, side: Side, value: float) -> None:
        figures.setdefault((figure, side.name), []).append(value)

    for side in sides:  # bytecode written once, as an installed package has it: the command
        # line's figure is then its work, not compiling the sources (PYTHONDONTWRITEBYTECODE)
        subprocess.run([str(side.python), "-m", "compileall", "-q", "moneylion"], cwd=side.tree)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        for number in range(args.rounds):
            for side in sides:  # interleaved: baseline, this tree, baseline, this tree, ...
                if only & {"small", "cli"}:
                    copy = fresh_copy(warehouses[side.name], scratch / "small")
                    if "small" in only:
                        times = side.run("small", copy, *small[:-1])["times"]
                        assert isinstance(times, list)
                        record(
                            "1,000-row file, ingest_file, median (ms)",
                            side,
                            1000 * statistics.median(times),
                        )
                        record("1,000-row file, ingest_file, max (ms)", side, 1000 * max(times))
                    if "cli" in only:
                        status = side.command(copy, "status")
                        ingest = side.command(copy, "ingest", "--quiet", str(small[-1]))
                        record(
                            "1,000-row file, CLI minus status (ms)", side, 1000 * (ingest - status)
                        )
                if "big" in only:
                    empty = scratch / "big" / "warehouse"
                    shutil.rmtree(empty.parent, ignore_errors=True)
                    found = side.run("big", empty, users, big)
                    record(f"{big_rows} file (s)", side, float(found["seconds"]))  # type: ignore[arg-type]
                    record(f"{big_rows} file, peak RSS (MB)", side, float(found["rss_mb"]))  # type: ignore[arg-type]
            print(f"round {number + 1} of {args.rounds} done", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base, new = sides
    rows = []
    for figure in dict.fromkeys(name for name, _ in figures):
        old = figures[(figure, base.name)]
        now = figures[(figure, new.name)]
        change = statistics.median(now) / statistics.median(old)
        rows.append(
            [
                figure,
                " ".join(f"{v:.1f}" for v in old),
                " ".join(f"{v:.1f}" for v in now),
                f"{change:.2f}x",
                "REGRESSION" if change > REGRESSION else "",
            ]
        )
    print(f"\n{base.name} ({base.commit[:12]}) vs {new.name} ({new.commit[:12]}), each round:")
    print_table(["figure", "baseline", "this tree", "ratio (medians)", ""], rows)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--drive":
        print(json.dumps(drive(sys.argv[2], sys.argv[3:])))
    else:
        main()
