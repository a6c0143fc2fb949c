"""Corrections: a file retracted and restored on the 1M-user / 10M-transaction warehouse, timed.

Figures, each with its target and its ratio to it, measured in one run (``make bench``; prints,
no asserts):

1. a 1,000-row transactions file (ids of its own) ingested into a copy of bench/compare.py's
   cached warehouse of ``--rows`` transactions, then retracted and restored, alternately,
   ``--rounds`` times each: median, max and first of each; target: a retraction <= 100 ms;
2. a dry run (``moneylion.check.check_file``) of another 1,000-row file on that warehouse, if
   this tree has one, ``--rounds`` times; target <= 50 ms;
3. where the 1,000-row retraction's time goes: ``--rounds`` more retractions (and restores) on
   a connection that times each statement (bench/steps.py's ``Timed``), each statement named by
   the line of moneylion that runs it and the SQL constant its text starts with;
4. the ``--rows`` file itself: ingested into a warehouse holding only the users, then retracted
   and restored, each timed (on the timing connection: their top statements are printed), with
   peak RSS; target: the retraction <= 2x this run's ingest.

``verify`` (the aggregates against a full recompute) runs after parts 1 to 3, and after the
large file's retraction and its restore. A quick check of the script: ``--rows 200000`` (20,000
users: users are a tenth of the rows), under a minute.

    .venv/bin/python bench/corrections.py [--rows 10000000] [--rounds 15]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import os
import shutil
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    OUT,
    cached_transactions,
    cached_users,
    peak_rss_mb,
    print_table,
    ratio,
)
from bench.compare import FIRST_ID_10M, FIRST_ID_SMALL, this_tree  # noqa: E402
from bench.steps import BLANKS, Timed, _Read  # noqa: E402
from moneylion import corrections  # noqa: E402
from moneylion.aggregates import verify  # noqa: E402
from moneylion.config import Config, load_config  # noqa: E402
from moneylion.ingest import ingest_file  # noqa: E402
from moneylion.schema import open_warehouse  # noqa: E402

TARGET_RETRACT_S = 0.100  # a 1,000-row file out of the 10M warehouse
TARGET_LARGE_RATIO = 2.0  # the 10M-row file's retraction, to its ingest (this run)
TARGET_CHECK_S = 0.050  # a dry run of a 1,000-row file
SMALL_ROWS = 1_000
RUN = OUT / "corrections-run"
# The modules whose SQL constants name the statements a correction runs.
SQL_MODULES = ("corrections", "aggregates", "candidates", "ledger", "pending", "rules")
SQL_VERBS = {"SELECT", "INSERT", "UPDATE", "DELETE", "CREATE", "WITH", "MERGE", "DROP", "ALTER"}


# -- statements named by where they come from --------------------------------------------------


@functools.cache
def statement_names() -> list[tuple[str, str]]:
    """(text before the first placeholder, whitespace folded; ``module.CONSTANT``) of each SQL
    constant of SQL_MODULES, longest text first (the first that starts a statement names it)."""
    found: dict[str, str] = {}
    for module_name in SQL_MODULES:
        module = importlib.import_module(f"moneylion.{module_name}")
        for name, value in vars(module).items():
            texts = value if isinstance(value, tuple) else (value,)
            for number, text in enumerate(texts):
                if not isinstance(text, str):
                    continue
                start = " ".join(text.split("{", 1)[0].split())
                if len(start) >= 16 and start.split(" ", 1)[0] in SQL_VERBS:
                    label = f"{module_name}.{name}" + (f"[{number}]" if len(texts) > 1 else "")
                    found.setdefault(start, label)
    return sorted(found.items(), key=lambda item: -len(item[0]))


def moneylion_site() -> str:
    """``module.function:line`` of the innermost moneylion frame that runs a statement (db.py's
    helpers stand for their caller's statement, so they are passed over)."""
    package = REPO / "moneylion"
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(package) and path.name != "db.py":
            return f"{path.stem}.{frame.f_code.co_name}:{frame.f_lineno}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


class Sited(Timed):
    """bench/steps.py's ``Timed``, each statement noted under where it runs and the constant
    its text comes from (``executemany`` too): ``spent[(site, constant, text)]``."""

    def execute(self, sql: str, *args: Any) -> Any:
        return self._timed(sql, self._conn.execute, *args)

    def executemany(self, sql: str, *args: Any) -> Any:
        return self._timed(sql, self._conn.executemany, *args)

    def cursor(self) -> Sited:
        return Sited(self._conn.cursor(), self.spent)

    def _timed(self, sql: str, run: Callable[..., Any], *args: Any) -> Any:
        site = moneylion_site()
        text = " ".join(sql.split())
        constant = next((label for start, label in statement_names() if text.startswith(start)), "")
        started = time.perf_counter()
        result = run(sql, *args)
        rows = result.fetchall() if result is not None and result.description else None
        self.spent[(site, constant, BLANKS.sub("N", text)[:72])].append(  # type: ignore[index]
            time.perf_counter() - started
        )
        return _Read(rows, result) if rows is not None else result


def print_statements(
    title: str,
    spent: dict[Any, list[float]],
    walls: list[float],
    top: int,
    *,
    legend: bool = False,
) -> None:
    """The statements by total time: ms per correction (mean) and median, how many per
    correction, share of the wall time; then the time outside them."""
    count = len(walls)
    mean_wall = statistics.mean(walls)
    ordered = sorted(spent.items(), key=lambda item: -sum(item[1]))
    rows = []
    for (site, constant, text), times in ordered[:top]:
        rows.append(
            [
                f"{1000 * sum(times) / count:.2f}",
                f"{1000 * statistics.median(times):.2f}",
                f"{len(times) / count:g}",
                f"{100 * sum(times) / count / mean_wall:.0f} %",
                site,
                constant or "-",
                text,
            ]
        )
    rest = ordered[top:]
    if rest:
        seconds = sum(sum(times) for _, times in rest)
        rows.append(
            [
                f"{1000 * seconds / count:.2f}",
                "",
                f"{sum(len(times) for _, times in rest) / count:g}",
                f"{100 * seconds / count / mean_wall:.0f} %",
                f"{len(rest)} other statements",
                "",
                "",
            ]
        )
    inside = sum(sum(times) for times in spent.values()) / count
    print(
        f"\n{title}: {count} timed, wall median {1000 * statistics.median(walls):.1f} ms, "
        f"mean {1000 * mean_wall:.1f} ms; statements {1000 * inside:.1f} ms "
        f"({sum(len(t) for t in spent.values()) / count:g} of them), outside them "
        f"(Python, Arrow registrations) {1000 * (mean_wall - inside):.1f} ms"
    )
    if legend:
        print(
            "  ms each: mean ms per correction; median: of that statement's runs; count: runs per "
            "correction; share: of the mean wall time; where: the line of moneylion that runs it"
        )
    print_table(["ms each", "median", "count", "share", "where", "constant", "statement"], rows)


# -- the parts -----------------------------------------------------------------------------------


def fresh_peak() -> None:
    """Start the kernel's high-water mark of this process's memory afresh (Linux: VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def bench_config(folder: Path) -> Config:
    return load_config(environ={}).with_overrides(
        warehouse=folder / "warehouse", inbox=folder / "inbox"
    )


def correct(conn: Any, action: str, file_id: int, config: Config) -> corrections.Correction:
    """``corrections.retract`` or ``restore`` of ``file_id``, with the config's top list size
    and reject line bytes (what the daemon passes)."""
    run = corrections.retract if action == "retract" else corrections.restore
    return run(
        conn,
        file_id,
        "bench",
        top_users_kept=config.top_users_kept,
        line_bytes=config.reject_line_bytes,
    )


@dataclass(frozen=True)
class Took:
    """Seconds of a call: wall, and CPU (this process's, DuckDB's threads included: on a
    shared machine it moves less than the wall time)."""

    wall: float
    cpu: float


def timed(call: Callable[[], object]) -> tuple[Took, Any]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return Took(time.perf_counter() - wall, time.process_time() - cpu), result


def milliseconds(times: list[Took]) -> str:
    """Median, max and first wall time of ``times``, and the median CPU time, in ms."""
    walls = [t.wall for t in times]
    return (
        f"median {1000 * statistics.median(walls):.1f} ms, max {1000 * max(walls):.1f}, first "
        f"{1000 * walls[0]:.1f} (CPU median {1000 * statistics.median(t.cpu for t in times):.1f})"
    )


def verified(conn: Any, config: Config) -> str:
    took, differences = timed(lambda: verify(conn, top_users_kept=config.top_users_kept))
    state = "aggregates equal a full recompute" if not differences else f"{differences[:3]}"
    return f"verify: {state} ({took.wall:.1f} s)"


def small_file(
    cached: Path, small: Path, probe: Path, rounds: int, only: set[str], targets: list[list[str]]
) -> None:
    """Parts 1 to 3 on a copy of ``cached``: the 1,000-row file ``small`` ingested, retracted
    and restored; ``probe`` checked; the retractions statement by statement."""
    folder = RUN / "small"
    shutil.copytree(cached, folder / "warehouse")
    config = bench_config(folder)
    conn = open_warehouse(config)
    try:
        if "retract" in only:
            file_id = retract_and_restore(conn, config, small, rounds, targets)
        if "check" in only:
            check_probe(conn, config, probe, rounds, targets)
        if "retract" in only:
            statement_by_statement(conn, config, file_id, rounds)
            print(f"  after {4 * rounds} corrections: {verified(conn, config)}", flush=True)
    finally:
        conn.close()
        shutil.rmtree(folder, ignore_errors=True)


def retract_and_restore(
    conn: Any, config: Config, small: Path, rounds: int, targets: list[list[str]]
) -> int:
    """Part 1: ``small`` ingested, then retracted and restored ``rounds`` times; its file id."""
    stored = conn.execute("SELECT count(*) FROM transactions").fetchall()[0][0]
    took, outcome = timed(lambda: ingest_file(conn, small, config))
    assert outcome.status == "loaded", outcome
    assert outcome.rows_loaded == SMALL_ROWS, outcome
    file_id: int = outcome.file_id
    print(
        f"\n1. a {SMALL_ROWS:,}-row file (file #{file_id}) into {stored:,} stored "
        f"transactions: ingested in {1000 * took.wall:.1f} ms; then retracted and restored "
        f"{rounds} times, alternately",
        flush=True,
    )
    times: dict[str, list[Took]] = {"retract": [], "restore": []}
    for _ in range(rounds):
        took, done = timed(functools.partial(correct, conn, "retract", file_id, config))
        assert (done.rows_out, done.rows_in) == (SMALL_ROWS, 0), done
        times["retract"].append(took)
        took, done = timed(functools.partial(correct, conn, "restore", file_id, config))
        assert (done.rows_out, done.rows_in) == (0, SMALL_ROWS), done
        times["restore"].append(took)
    median = statistics.median(t.wall for t in times["retract"])
    met = ratio(median, TARGET_RETRACT_S, lower_is_better=True)
    for action, values in times.items():
        print(
            f"  {action}: {milliseconds(values)}"
            + (f"   median {met} <= 100 ms" if action == "retract" else "")
        )
    targets.append(
        [
            f"1,000-row file retracted from {stored + SMALL_ROWS:,} (of {rounds})",
            milliseconds(times["retract"]),
            "<= 100 ms",
            met,
        ]
    )
    return file_id


def statement_by_statement(conn: Any, config: Config, file_id: int, rounds: int) -> None:
    """Part 3: ``rounds`` more retractions and restores of ``file_id``, each statement timed."""
    spent: dict[str, dict[Any, list[float]]] = {"retract": defaultdict(list)}
    spent["restore"] = defaultdict(list)
    walls: dict[str, list[float]] = {"retract": [], "restore": []}
    for _ in range(rounds):
        for action in ("retract", "restore"):
            sited = Sited(conn, spent[action])
            took, _ = timed(functools.partial(correct, sited, action, file_id, config))
            walls[action].append(took.wall)
    print_statements(
        f"3. where a {SMALL_ROWS:,}-row retraction's time goes",
        spent["retract"],
        walls["retract"],
        top=40,
        legend=True,
    )
    print_statements("   and its restore's (top 12)", spent["restore"], walls["restore"], top=12)


def check_module() -> tuple[Any, str]:
    """``moneylion.check`` of the moneylion imported here, or None and why not."""
    import moneylion

    spec = importlib.util.find_spec("moneylion.check")
    if spec is None or spec.origin is None:
        return None, "no moneylion/check.py"
    if Path(spec.origin).parent != Path(moneylion.__file__).parent:
        return None, f"moneylion/check.py is not in {Path(moneylion.__file__).parent}"
    try:
        return importlib.import_module("moneylion.check"), ""
    except ImportError as error:
        return None, f"moneylion.check does not import: {error}"


def check_probe(
    conn: Any, config: Config, probe: Path, rounds: int, targets: list[list[str]]
) -> None:
    """Part 2: the dry run of ``probe``, a 1,000-row file not ingested, ``rounds`` times."""
    check, why_not = check_module()
    if check is None:
        print(f"\n2. check: not available in this tree ({why_not})")
        targets.append(["1,000-row file checked", "not available in this tree", "<= 50 ms", ""])
        return
    times = []
    for _ in range(rounds):
        took, report = timed(lambda: check.check_file(conn, probe, config))
        assert getattr(report, "outcome", "would_load") == "would_load", report
        times.append(took)
    met = ratio(statistics.median(t.wall for t in times), TARGET_CHECK_S, lower_is_better=True)
    print(
        f"\n2. a {SMALL_ROWS:,}-row file checked (moneylion.check.check_file), {rounds} times: "
        f"{milliseconds(times)}   median {met} <= 50 ms",
        flush=True,
    )
    targets.append([f"1,000-row file checked (of {rounds})", milliseconds(times), "<= 50 ms", met])


def large_file(users: Path, big: Path, rows: int, targets: list[list[str]]) -> None:
    """Part 4: ``big`` ingested into a warehouse of the users alone, retracted, restored."""
    folder = RUN / "large"
    config = bench_config(folder)
    conn = open_warehouse(config)
    label = f"{rows / 1e6:g}M-row file"
    try:
        ingest_file(conn, users, config)
        fresh_peak()
        ingest, outcome = timed(lambda: ingest_file(conn, big, config))
        assert outcome.status == "loaded", outcome
        assert outcome.rows_loaded == rows, outcome
        ingest_rss = peak_rss_mb()
        print(
            f"\n4. the {label} (file #{outcome.file_id}) into a warehouse of the users alone: "
            f"ingested in {ingest.wall:.2f} s (CPU {ingest.cpu:.2f} s), peak RSS "
            f"{ingest_rss:,.0f} MB",
            flush=True,
        )
        spent: dict[str, dict[Any, list[float]]] = {}
        seconds: dict[str, Took] = {}
        for action in ("retract", "restore"):
            spent[action] = defaultdict(list)
            sited = Sited(conn, spent[action])
            fresh_peak()
            seconds[action], done = timed(
                functools.partial(correct, sited, action, outcome.file_id, config)
            )
            moved = done.rows_out if action == "retract" else done.rows_in
            assert moved == rows, done
            versus = seconds[action].wall / ingest.wall
            met = ratio(versus, TARGET_LARGE_RATIO, lower_is_better=True)
            print(
                f"  {action}: {seconds[action].wall:.2f} s ({versus:.2f}x the ingest; CPU "
                f"{seconds[action].cpu:.2f} s, {seconds[action].cpu / ingest.cpu:.2f}x the "
                f"ingest's), peak RSS {peak_rss_mb():,.0f} MB"
                + (f"   {met} <= 2x" if action == "retract" else ""),
                flush=True,
            )
            if action == "retract":
                print(f"  retracted: {verified(conn, config)}", flush=True)
        for action in ("retract", "restore"):
            print_statements(
                f"   the {label}'s {action} (top 10)", spent[action], [seconds[action].wall], top=10
            )
        print(f"  restored: {verified(conn, config)}", flush=True)
        retract = seconds["retract"]
        targets.append(
            [
                f"the {label} retracted, to its ingest",
                f"{retract.wall:.2f} s / {ingest.wall:.2f} s = {retract.wall / ingest.wall:.2f}x "
                f"(CPU {retract.cpu:.2f} s / {ingest.cpu:.2f} s = {retract.cpu / ingest.cpu:.2f}x)",
                "<= 2x",
                ratio(retract.wall / ingest.wall, TARGET_LARGE_RATIO, lower_is_better=True),
            ]
        )
    finally:
        conn.close()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="the large file's rows")
    parser.add_argument("--rounds", type=int, default=15, help="retractions of the small file")
    parser.add_argument(
        "--only", default="retract,check,large", help="retract (parts 1, 3), check (2), large (4)"
    )
    args = parser.parse_args()
    only = set(args.only.split(","))

    count = max(1_000, args.rows // 10)
    users = cached_users(count, seed=1)
    big = cached_transactions(args.rows, users=count, first_id=FIRST_ID_10M, seed=3)
    small, probe = (
        cached_transactions(
            SMALL_ROWS, users=count, first_id=FIRST_ID_SMALL + n * 1_000, seed=100 + n
        )
        for n in range(2)
    )
    config = load_config(environ={})
    print(
        f"machine: {len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}; "
        f"duckdb memory_limit {config.duckdb_memory_limit}, threads {config.duckdb_threads}; "
        f"{count:,} users, {args.rows:,} transactions",
        flush=True,
    )
    shutil.rmtree(RUN, ignore_errors=True)
    RUN.mkdir(parents=True)
    targets: list[list[str]] = []
    if only & {"retract", "check"}:
        small_file(this_tree().warehouse(users, big), small, probe, args.rounds, only, targets)
    if "large" in only:
        large_file(users, big, args.rows, targets)
    shutil.rmtree(RUN, ignore_errors=True)
    print("\ntargets (this run):")
    print_table(["figure", "measured", "target", "ratio"], targets)


if __name__ == "__main__":
    main()
