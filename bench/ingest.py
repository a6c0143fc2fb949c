"""Ingest throughput and small-file latency, on generated data (``make bench``).

Prints rows/s for a 1M-row and a 10M-row transactions file (with 1M users loaded first), the
process's peak RSS, and the seconds to ingest 1,000-row files into a warehouse already holding
11M transactions. Targets on the 2-core machine: 10M rows at >= 1.5M rows/s with peak RSS
<= 1.5 GB, and a 1,000-row file in <= 50 ms. Inputs are generated once into bench/out/ingest
(by a child process, so generation does not count in the RSS).
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moneylion.aggregates import verify
from moneylion.config import load_config
from moneylion.ingest import ingest_file
from moneylion.schema import open_warehouse

OUT = Path(__file__).resolve().parent / "out" / "ingest"
USERS = 1_000_000
SMALL_FILES = 30

INPUTS = {
    # name: (kind, rows, first id, seed)
    "users_1m.csv": ("users", USERS, 1, 1),
    "tx_1m.csv": ("transactions", 1_000_000, 1, 2),
    "tx_10m.csv": ("transactions", 10_000_000, 1_000_001, 3),
    **{
        f"small_{n:02d}.csv": ("transactions", 1_000, 20_000_001 + n * 1_000, 100 + n)
        for n in range(SMALL_FILES)
    },
}


def make_inputs() -> None:
    """Generate what is missing, in a child process."""
    missing = {name: spec for name, spec in INPUTS.items() if not (OUT / name).exists()}
    if not missing:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    script = "\n".join(
        ["from pathlib import Path", "from moneylion import generate as g"]
        + [
            f"g.write_users(Path({str(OUT / name)!r}), {rows}, seed={seed}, first_id={first})"
            if kind == "users"
            else f"g.write_transactions(Path({str(OUT / name)!r}), {rows}, users={USERS}, "
            f"seed={seed}, first_id={first})"
            for name, (kind, rows, first, seed) in missing.items()
        ]
    )
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], check=True)
    print(f"generated {len(missing)} input files in {time.perf_counter() - started:.1f} s")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    make_inputs()
    folder = Path(tempfile.mkdtemp(prefix="moneylion-bench-ingest-"))
    config = load_config(environ={}).with_overrides(
        warehouse=folder / "warehouse", inbox=folder / "inbox"
    )
    conn = open_warehouse(config)
    try:
        print(
            f"machine: {len(os.sched_getaffinity(0))} cores; "
            f"duckdb memory_limit {config.duckdb_memory_limit}, threads {config.duckdb_threads}"
        )
        for name in ("users_1m.csv", "tx_1m.csv", "tx_10m.csv"):
            started = time.perf_counter()
            outcome = ingest_file(conn, OUT / name, config)
            seconds = time.perf_counter() - started
            assert outcome.rows_rejected == 0, outcome.summary()
            rate = outcome.rows_loaded / seconds
            line = (
                f"{name:<14} {outcome.rows_loaded:>10,} rows in {seconds:6.2f} s "
                f"= {rate / 1e6:5.2f}M rows/s"
            )
            if name == "tx_10m.csv":
                line += f"   (target >= 1.5M rows/s: ratio {rate / 1.5e6:.2f})"
            print(line, flush=True)
        rss = peak_rss_mb()
        print(
            f"peak RSS after the 10M-row file: {rss:,.0f} MB   "
            f"(target <= 1,536 MB: ratio {rss / 1536:.2f})"
        )

        timings = []
        for n in range(SMALL_FILES):
            started = time.perf_counter()
            outcome = ingest_file(conn, OUT / f"small_{n:02d}.csv", config)
            timings.append(time.perf_counter() - started)
            assert outcome.rows_loaded == 1_000, outcome.summary()
        stored = conn.execute("SELECT count(*) FROM transactions").fetchall()[0][0]
        median = statistics.median(timings)
        print(
            f"1,000-row file into {stored - 1_000 * SMALL_FILES:,} stored transactions, "
            f"{SMALL_FILES} files: median {median * 1000:.1f} ms, max {max(timings) * 1000:.1f} ms"
            f", first {timings[0] * 1000:.1f} ms   (target <= 50 ms: ratio {median / 0.05:.2f})"
        )
        started = time.perf_counter()
        differences = verify(conn)
        print(
            f"verify: {'exact' if not differences else differences[:3]} "
            f"({time.perf_counter() - started:.1f} s)"
        )
    finally:
        conn.close()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
