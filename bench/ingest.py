"""Ingest throughput and small-file latency on generated data (``make bench``; prints, no asserts).

Loads 1M users, then a 1M-row and a 10M-row transactions file (rows/s each), reads the
process's peak RSS, times 1,000-row files (distinct ids) into the warehouse that now holds 11M
transactions, and finally files with rows to reject (the located path): 1M rows with 1% bad
rows of every reason, 1M rows with 0.2% of wrong field counts, and 10M rows with 1% bad rows
(time and peak RSS). Targets on the
2-core machine: the 10M-row file at >= 1.5M rows/s with peak RSS <= 1.5 GB; a 1,000-row file in
<= 50 ms whatever the warehouse holds. Inputs are generated once into bench/out/generated/.

    .venv/bin/python bench/ingest.py [--small-files 30] [--skip-bad]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

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
TARGET_ROWS_PER_S = 1.5e6
TARGET_RSS_MB = 1536.0
TARGET_SMALL_S = 0.050
BAD_RATE = 0.01
# Id ranges never overlap: 1M-row file, 10M-row file, the bad file, the small files, the file
# with wrong field counts.
FIRST_ID_1M, FIRST_ID_10M, FIRST_ID_BAD, FIRST_ID_SMALL = 1, 1_000_001, 20_000_001, 30_000_001
FIRST_ID_COUNTS, FIRST_ID_BAD_10M = 40_000_001, 50_000_001
COUNTS_EVERY = 500  # every 500th row gets a wrong field count: too few, empty extras, an extra


def wrong_counts_file(source: Path) -> tuple[Path, int]:
    """``source`` with every COUNTS_EVERY-th row's field count made wrong (written once); the
    file and how many rows it spoils."""
    path = source.with_name(source.stem + f"-counts{COUNTS_EVERY}.csv")
    with source.open() as lines:
        rows = sum(1 for _ in lines) - 1
    spoiled = rows // COUNTS_EVERY
    if path.exists():
        return path, spoiled
    partial = path.with_suffix(".part")
    with source.open() as lines, partial.open("w") as out:
        for number, line in enumerate(lines):
            if number and number % COUNTS_EVERY == 0:
                body = line.rstrip("\n")
                kind = number // COUNTS_EVERY % 3
                line = (body.rsplit(",", 1)[0], body + ",,", body + ",extra")[kind] + "\n"
            out.write(line)
    partial.rename(path)
    return path, spoiled


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
    bad = counts = bad_10m = None
    if not args.skip_bad:
        bad = cached_transactions(
            1_000_000, users=USERS, first_id=FIRST_ID_BAD, seed=4, bad_rate=BAD_RATE
        )
        counts = wrong_counts_file(
            cached_transactions(1_000_000, users=USERS, first_id=FIRST_ID_COUNTS, seed=5)
        )
        bad_10m = cached_transactions(
            10_000_000, users=USERS, first_id=FIRST_ID_BAD_10M, seed=7, bad_rate=BAD_RATE
        )

    folder = Path(tempfile.mkdtemp(prefix="moneylion-bench-ingest-"))
    config = load_config(environ={}).with_overrides(
        warehouse=folder / "warehouse", inbox=folder / "inbox"
    )
    print(
        f"machine: {len(os.sched_getaffinity(0))} cores; duckdb memory_limit "
        f"{config.duckdb_memory_limit}, threads {config.duckdb_threads}; RSS before ingest "
        f"{peak_rss_mb():,.0f} MB",
        flush=True,
    )
    conn = open_warehouse(config)
    rows: list[list[object]] = []
    try:
        for label, path in [("1M users", users_csv), *big]:
            started = time.perf_counter()
            outcome = ingest_file(conn, path, config)
            seconds = time.perf_counter() - started
            rate = outcome.rows_loaded / seconds
            verdict = ""
            if label == "10M rows":
                verdict = ratio(rate, TARGET_ROWS_PER_S, lower_is_better=False)
            loaded = f"{outcome.rows_loaded:,}"
            rows.append([label, loaded, f"{seconds:.2f} s", f"{rate / 1e6:.2f}M/s", verdict])
            if outcome.rows_rejected or outcome.status != "loaded":
                print(f"  unexpected: {outcome.summary()}")
        rss = peak_rss_mb()

        timings = []
        stored = conn.execute("SELECT count(*) FROM transactions").fetchall()[0][0]
        for path in small:
            started = time.perf_counter()
            outcome = ingest_file(conn, path, config)
            timings.append(time.perf_counter() - started)
            if outcome.rows_loaded != 1_000:
                print(f"  unexpected: {outcome.summary()}")
        median = statistics.median(timings)

        if bad is not None:
            started = time.perf_counter()
            outcome = ingest_file(conn, bad, config)
            seconds = time.perf_counter() - started
            expected = expected_transactions_outcome(1_000_000, BAD_RATE)
            same = dict(outcome.rejected_by_reason) == dict(expected.rejected_by_reason) and (
                outcome.rows_loaded == expected.rows_loaded
            )
            rows.append(
                [
                    "1M rows, 1% bad",
                    f"{outcome.rows_loaded:,}",
                    f"{seconds:.2f} s",
                    f"{outcome.rows_total / seconds / 1e6:.2f}M/s",
                    f"{outcome.rows_rejected:,} rejected, "
                    f"{outcome.rows_duplicate:,} duplicate "
                    f"({'as expected' if same else 'NOT AS EXPECTED'})",
                ]
            )
        if counts is not None:
            path, spoiled = counts
            started = time.perf_counter()
            outcome = ingest_file(conn, path, config)
            seconds = time.perf_counter() - started
            same = outcome.rejected_by_reason == {"wrong_field_count": spoiled}
            rows.append(
                [
                    "1M rows, 0.2% wrong field counts, no quotes",
                    f"{outcome.rows_loaded:,}",
                    f"{seconds:.2f} s",
                    f"{outcome.rows_total / seconds / 1e6:.2f}M/s",
                    f"{outcome.rows_rejected:,} rejected "
                    f"({'as expected' if same else 'NOT AS EXPECTED'})",
                ]
            )
        rss_before_bad_10m = peak_rss_mb()
        if bad_10m is not None:
            started = time.perf_counter()
            outcome = ingest_file(conn, bad_10m, config)
            seconds = time.perf_counter() - started
            expected = expected_transactions_outcome(10_000_000, BAD_RATE)
            same = dict(outcome.rejected_by_reason) == dict(expected.rejected_by_reason)
            rows.append(
                [
                    "10M rows, 1% bad",
                    f"{outcome.rows_loaded:,}",
                    f"{seconds:.2f} s",
                    f"{outcome.rows_total / seconds / 1e6:.2f}M/s",
                    f"{outcome.rows_rejected:,} rejected "
                    f"({'as expected' if same else 'NOT AS EXPECTED'}); peak RSS "
                    f"{peak_rss_mb():,.0f} MB (before it: {rss_before_bad_10m:,.0f} MB)",
                ]
            )
        rss_all = peak_rss_mb()

        print_table(["file", "rows loaded", "time", "rows/s", "vs target"], rows)
        print(
            f"peak RSS after the 10M-row file: {rss:,.0f} MB   "
            f"{ratio(rss, TARGET_RSS_MB, lower_is_better=True)} <= {TARGET_RSS_MB:,.0f} MB; "
            f"after everything: {rss_all:,.0f} MB"
        )
        print(
            f"1,000-row file into {stored:,} stored transactions, {len(small)} distinct files: "
            f"median {median * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms, "
            f"first {timings[0] * 1000:.1f} ms   median "
            f"{ratio(median, TARGET_SMALL_S, lower_is_better=True)} <= 50 ms"
        )
        started = time.perf_counter()
        differences = verify(conn, top_users_kept=config.top_users_kept)
        print(
            f"verify: {'aggregates equal a full recompute' if not differences else differences[:3]}"
            f" ({time.perf_counter() - started:.1f} s)",
            flush=True,
        )
    finally:
        conn.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
