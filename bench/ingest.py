"""Ingest throughput and small-file latency on generated data (``make bench``; prints, no asserts).

First times DuckDB's own typed parse of the 10M-row file (every column converted: the yardstick
of the targets, measured in this run). Then loads 1M users, a 1M-row and a 10M-row transactions
file (rows/s each), reads the process's peak RSS, times 1,000-row files (distinct ids) into the
warehouse that now holds 11M transactions, and then files with rows to reject: 1M rows with 1%
bad rows of every reason, 1M rows with 0.2% of wrong field counts, 1M rows whose records span
lines (a quoted line break in an extra column) with 0.2% of wrong field counts, and 10M rows with
1% bad rows; the 10M-row bad file once more into an empty warehouse, in a process of its own
(its own peak RSS).

Targets on the 2-core machine: the clean 10M-row file in <= 4x the parse with peak RSS <= 512
MB; the 10M-row file with 1% bad rows in <= 1.5x the clean one with peak RSS <= 768 MB, into the
warehouse holding 11M transactions and into an empty one; the file of spanning records with
wrong field counts in <= 2x the clean 1M-row file; a 1,000-row file in <= 50 ms whatever the
warehouse holds. Inputs are generated once into bench/out/generated/.

    .venv/bin/python bench/ingest.py [--small-files 30] [--skip-bad]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import (  # noqa: E402
    cached_transactions,
    cached_users,
    peak_rss_mb,
    print_table,
    ratio,
)
from moneylion.aggregates import verify  # noqa: E402
from moneylion.config import load_config  # noqa: E402
from moneylion.generate import expected_transactions_outcome  # noqa: E402
from moneylion.ingest import ingest_file  # noqa: E402
from moneylion.schema import open_warehouse  # noqa: E402

USERS = 1_000_000
TARGET_PARSE_RATIO = 4.0  # the clean 10M-row file, to DuckDB's typed parse of it
TARGET_RSS_MB = 512.0
TARGET_BAD_RATIO = 1.5  # the 10M-row file with 1% bad rows, to the clean one
TARGET_BAD_RSS_MB = 768.0
TARGET_SPANNING_RATIO = 2.0  # spanning records with wrong field counts, to the clean 1M rows
TARGET_SMALL_S = 0.050
BAD_RATE = 0.01
# Id ranges never overlap: 1M-row file, 10M-row file, the bad file, the small files, the file
# with wrong field counts.
FIRST_ID_1M, FIRST_ID_10M, FIRST_ID_BAD, FIRST_ID_SMALL = 1, 1_000_001, 20_000_001, 30_000_001
FIRST_ID_COUNTS, FIRST_ID_BAD_10M, FIRST_ID_SPANNING = 40_000_001, 50_000_001, 60_000_001
COUNTS_EVERY = 500  # every 500th row gets a wrong field count: too few, empty extras, an extra
SPAN_EVERY = 1_000  # every 1,000th row's note holds a quoted line break

TYPED_COLUMNS = {
    "transaction_id": "BIGINT",
    "user_id": "BIGINT",
    "transaction_date": "DATE",
    "amount": "DECIMAL(18, 2)",
    "transaction_type": "VARCHAR",
}


def typed_parse_seconds(path: Path, threads: int) -> float:
    """The median of three runs of DuckDB's typed parse of ``path``: every column converted
    (a bare count(*) converts none), on ``threads`` threads, in memory."""
    conn = duckdb.connect(config={"threads": threads})
    columns = ", ".join(f"'{name}': '{kind}'" for name, kind in TYPED_COLUMNS.items())
    maxima = ", ".join(f"max({name})" for name in TYPED_COLUMNS)
    query = (
        f"SELECT count(*), {maxima} FROM read_csv($path, header = true, auto_detect = false, "
        f"columns = {{{columns}}})"
    )
    times = []
    for _ in range(3):
        started = time.perf_counter()
        conn.execute(query, {"path": str(path)}).fetchall()
        times.append(time.perf_counter() - started)
    conn.close()
    return statistics.median(times)


def ingest_alone(path: Path) -> tuple[float, int, dict[str, int], float]:
    """In a process of its own (spawned: nothing inherited): ``path`` into an empty warehouse;
    seconds, rows loaded, rejects by reason, the process's peak RSS (MB)."""
    folder = Path(tempfile.mkdtemp(prefix="moneylion-bench-alone-"))
    config = load_config(environ={}).with_overrides(
        warehouse=folder / "warehouse", inbox=folder / "inbox"
    )
    conn = open_warehouse(config)
    try:
        started = time.perf_counter()
        outcome = ingest_file(conn, path, config)
        seconds = time.perf_counter() - started
        differences = verify(conn, top_users_kept=config.top_users_kept)
        assert not differences, differences[:3]
    finally:
        conn.close()
        shutil.rmtree(folder, ignore_errors=True)
    return seconds, outcome.rows_loaded, dict(outcome.rejected_by_reason), peak_rss_mb()


def rewritten_file(
    source: Path, suffix: str, rewrite: Callable[[int, str], str]
) -> tuple[Path, int]:
    """``source`` with each line (number 0: the header; the line break stripped) replaced by
    ``rewrite(number, line)``, written once beside it; the file and how many rows the
    COUNTS_EVERY-th rows' wrong field counts spoil."""
    path = source.with_name(f"{source.stem}-{suffix}.csv")
    with source.open() as lines:
        spoiled = (sum(1 for _ in lines) - 1) // COUNTS_EVERY
    if not path.exists():
        partial = path.with_suffix(".part")
        with source.open() as lines, partial.open("w") as out:
            for number, line in enumerate(lines):
                out.write(rewrite(number, line.rstrip("\n")) + "\n")
        partial.rename(path)  # only a complete file gets the name
    return path, spoiled


def wrong_counts_file(source: Path) -> tuple[Path, int]:
    """``source`` with every COUNTS_EVERY-th row's field count made wrong: too few, empty
    extras, an extra, in turn."""

    def rewrite(number: int, line: str) -> str:
        if not number or number % COUNTS_EVERY:
            return line
        return (line.rsplit(",", 1)[0], line + ",,", line + ",extra")[number // COUNTS_EVERY % 3]

    return rewritten_file(source, f"counts{COUNTS_EVERY}", rewrite)


def spanning_file(source: Path) -> tuple[Path, int]:
    """``source`` with an extra ``note`` column: every SPAN_EVERY-th note holds a quoted line
    break (the record spans two lines), and every COUNTS_EVERY-th row has no note (a field too
    few)."""

    def rewrite(number: int, line: str) -> str:
        if not number:
            return line + ",note"
        if number % COUNTS_EVERY == 0:
            return line
        return line + (',"first line\nsecond line"' if number % SPAN_EVERY == 1 else ",ok")

    return rewritten_file(source, f"spanning{SPAN_EVERY}-counts{COUNTS_EVERY}", rewrite)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small-files", type=int, default=30)
    parser.add_argument("--skip-bad", action="store_true", help="skip the files with bad rows")
    args = parser.parse_args()

    users_csv = cached_users(USERS, seed=1)
    big = [
        ("1M rows", cached_transactions(1_000_000, users=USERS, first_id=FIRST_ID_1M, seed=2)),
        ("10M rows", cached_transactions(10_000_000, users=USERS, first_id=FIRST_ID_10M, seed=3)),
    ]
    small = [
        cached_transactions(1_000, users=USERS, first_id=FIRST_ID_SMALL + n * 1_000, seed=100 + n)
        for n in range(args.small_files)
    ]
    bad = counts = bad_10m = spanning = None
    if not args.skip_bad:
        bad = cached_transactions(
            1_000_000, users=USERS, first_id=FIRST_ID_BAD, seed=4, bad_rate=BAD_RATE
        )
        counts = wrong_counts_file(
            cached_transactions(1_000_000, users=USERS, first_id=FIRST_ID_COUNTS, seed=5)
        )
        spanning = spanning_file(
            cached_transactions(1_000_000, users=USERS, first_id=FIRST_ID_SPANNING, seed=8)
        )
        bad_10m = cached_transactions(
            10_000_000, users=USERS, first_id=FIRST_ID_BAD_10M, seed=7, bad_rate=BAD_RATE
        )

    folder = Path(tempfile.mkdtemp(prefix="moneylion-bench-ingest-"))
    config = load_config(environ={}).with_overrides(
        warehouse=folder / "warehouse", inbox=folder / "inbox"
    )
    print(
        f"machine: {len(os.sched_getaffinity(0))} cores, load average {os.getloadavg()[0]:.1f}; "
        f"duckdb memory_limit {config.duckdb_memory_limit}, threads {config.duckdb_threads}; "
        f"RSS before ingest {peak_rss_mb():,.0f} MB",
        flush=True,
    )
    parse = typed_parse_seconds(big[1][1], config.duckdb_threads)
    print(f"DuckDB's typed parse of the 10M-row file (every column converted): {parse:.2f} s")
    conn = open_warehouse(config)
    rows: list[list[object]] = []
    seconds_of: dict[str, float] = {}
    rss_of: dict[str, float] = {}
    try:
        for label, path in [("1M users", users_csv), *big]:
            started = time.perf_counter()
            outcome = ingest_file(conn, path, config)
            seconds = seconds_of[label] = time.perf_counter() - started
            rate = outcome.rows_loaded / seconds
            loaded = f"{outcome.rows_loaded:,}"
            rows.append([label, loaded, f"{seconds:.2f} s", f"{rate / 1e6:.2f}M/s", ""])
            if outcome.rows_rejected or outcome.status != "loaded":
                print(f"  unexpected: {outcome.summary()}")
        rss = rss_of["10M rows"] = peak_rss_mb()

        timings = []
        stored = conn.execute("SELECT count(*) FROM transactions").fetchall()[0][0]
        for path in small:
            started = time.perf_counter()
            outcome = ingest_file(conn, path, config)
            timings.append(time.perf_counter() - started)
            if outcome.rows_loaded != 1_000:
                print(f"  unexpected: {outcome.summary()}")
        median = statistics.median(timings)

        def ingest_row(label: str, path: Path, expected: dict[str, int], note: str = "") -> None:
            started = time.perf_counter()
            outcome = ingest_file(conn, path, config)
            seconds = seconds_of[label] = time.perf_counter() - started
            rss_of[label] = peak_rss_mb()
            same = dict(outcome.rejected_by_reason) == expected
            rows.append(
                [
                    label,
                    f"{outcome.rows_loaded:,}",
                    f"{seconds:.2f} s",
                    f"{outcome.rows_total / seconds / 1e6:.2f}M/s",
                    f"{outcome.rows_rejected:,} rejected, {outcome.rows_duplicate:,} duplicate "
                    f"({'as expected' if same else 'NOT AS EXPECTED'}){note}",
                ]
            )

        if bad is not None:
            expected = expected_transactions_outcome(1_000_000, BAD_RATE)
            ingest_row("1M rows, 1% bad", bad, dict(expected.rejected_by_reason))
        if counts is not None:
            path, spoiled = counts
            ingest_row("1M rows, 0.2% wrong field counts", path, {"wrong_field_count": spoiled})
        if spanning is not None:
            path, spoiled = spanning
            ingest_row(
                "1M rows spanning lines, 0.2% wrong field counts",
                path,
                {"wrong_field_count": spoiled},
            )
        if bad_10m is not None:
            expected = expected_transactions_outcome(10_000_000, BAD_RATE)
            ingest_row(
                "10M rows, 1% bad, into 11M stored", bad_10m, dict(expected.rejected_by_reason)
            )
        rss_all = peak_rss_mb()

        started = time.perf_counter()
        differences = verify(conn, top_users_kept=config.top_users_kept)
        verified = (
            f"verify: {'aggregates equal a full recompute' if not differences else differences[:3]}"
            f" ({time.perf_counter() - started:.1f} s)"
        )
    finally:
        conn.close()
        shutil.rmtree(folder, ignore_errors=True)
    if bad_10m is not None:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            seconds, loaded, reasons, alone_rss = pool.apply(ingest_alone, (bad_10m,))
        label = "10M rows, 1% bad, into an empty warehouse"
        seconds_of[label], rss_of[label] = seconds, alone_rss
        same = reasons == dict(
            expected_transactions_outcome(10_000_000, BAD_RATE).rejected_by_reason
        )
        rows.append(
            [
                label,
                f"{loaded:,}",
                f"{seconds:.2f} s",
                f"{10_000_000 / seconds / 1e6:.2f}M/s",
                f"{sum(reasons.values()):,} rejected "
                f"({'as expected' if same else 'NOT AS EXPECTED'}); a process of its own",
            ]
        )

    print_table(["file", "rows loaded", "time", "rows/s", "outcome"], rows)
    print(
        f"1,000-row file into {stored:,} stored transactions, {len(small)} distinct files: "
        f"median {median * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms, "
        f"first {timings[0] * 1000:.1f} ms   median "
        f"{ratio(median, TARGET_SMALL_S, lower_is_better=True)} <= 50 ms"
    )
    print(f"peak RSS after everything: {rss_all:,.0f} MB")
    print(verified, flush=True)

    clean = seconds_of["10M rows"]
    targets = [
        [
            "clean 10M rows",
            f"{clean:.2f} s",
            f"{clean / parse:.2f}x the parse",
            f"{ratio(clean / parse, TARGET_PARSE_RATIO, lower_is_better=True)} <= 4x",
            f"{rss:,.0f} MB",
            ratio(rss, TARGET_RSS_MB, lower_is_better=True),
        ]
    ]
    for label in ("10M rows, 1% bad, into 11M stored", "10M rows, 1% bad, into an empty warehouse"):
        if label in seconds_of:
            took = seconds_of[label]
            targets.append(
                [
                    label,
                    f"{took:.2f} s",
                    f"{took / parse:.2f}x the parse, {took / clean:.2f}x clean",
                    f"{ratio(took / clean, TARGET_BAD_RATIO, lower_is_better=True)} <= 1.5x",
                    f"{rss_of[label]:,.0f} MB",
                    ratio(rss_of[label], TARGET_BAD_RSS_MB, lower_is_better=True),
                ]
            )
    label = "1M rows spanning lines, 0.2% wrong field counts"
    if label in seconds_of:
        took, clean_1m = seconds_of[label], seconds_of["1M rows"]
        targets.append(
            [
                label,
                f"{took:.2f} s",
                f"{took / parse:.2f}x the parse, {took / clean_1m:.2f}x clean 1M rows",
                f"{ratio(took / clean_1m, TARGET_SPANNING_RATIO, lower_is_better=True)} <= 2x",
                f"{rss_of[label]:,.0f} MB",
                "",
            ]
        )
    print(f"\ntargets (the parse: {parse:.2f} s, this run):")
    print_table(["target", "time", "ratio", "time target", "peak RSS", "RSS target"], targets)


if __name__ == "__main__":
    main()
