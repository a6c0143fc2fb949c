"""Lake mode: throughput with one daemon and with two, a large file in lake mode against local
mode, drop -> visible in the other daemon's API, SIGKILL trials, and other engines reading the
lake (Polars through deltalake; Spark, local mode, from the table's active file list).

    .venv/bin/python bench/lake.py [--burst 1000] [--burst-rows 20] [--repeat 3]
                                   [--large-rows 10000000]
                                   [--latency-files 20] [--trials 20] [--no-spark]

Spark needs the bench extra (``pip install -c constraints.txt -e '.[bench]'``) and a Java 17+.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import cached_transactions, print_table, ratio  # noqa: E402
from tests.daemon_process import (  # noqa: E402
    DaemonProcess,
    random_transactions,
    wait_for,
    write_transactions,
)
from tests.lake_scenario import (  # noqa: E402
    caught_up,
    drop,
    lake_crash_trial,
    lake_daemon,
    ledger_rows,
    polars_totals,
)

OUT = REPO / "bench" / "out" / "lake"


def small_files(folder: Path, count: int, rows: int, first_id: int = 1) -> list[Path]:
    rng = random.Random(count)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n in range(count):
        batch = random_transactions(rng, first_id + n * rows, rows, users=500)
        paths.append(write_transactions(folder / f"burst-{n:05d}.csv", batch))
    return paths


def burst(base: Path, paths: list[Path], daemons: int, *, pin: bool) -> tuple[float, float]:
    """Seconds until every file of the burst is in the lake's ledger, and until every replica
    has applied all of them; the files split between ``daemons`` inboxes. ``pin``: daemon i
    runs on core i alone (all its threads), as if each had a machine of one core."""
    shutil.rmtree(base, ignore_errors=True)
    lake = base / "lake"
    running = [
        lake_daemon(
            base,
            f"d{i}",
            lake,
            preamble=f"import os; os.sched_setaffinity(0, {{{i}}})" if pin else None,
            MONEYLION_LOG_LEVEL="WARNING",
        )
        for i in range(daemons)
    ]
    try:
        for daemon in running:
            daemon.start()
        started = time.monotonic()
        for i, daemon in enumerate(running):
            drop(paths[i::daemons], daemon.inbox)
        # Files leave the inbox once their ledger row is committed (a cheap poll: a listing).
        wait_for(lambda: not any(d.inbox_waiting() for d in running), 600, "inboxes", step=0.02)
        committed = time.monotonic() - started
        wait_for(lambda: all(caught_up(d, len(paths)) for d in running), 600, "replicas", step=0.05)
        visible = time.monotonic() - started
        assert len(ledger_rows(lake)) == len(paths)
        for daemon in running:
            daemon.stop()
    finally:
        for daemon in running:
            daemon.close()
    return committed, visible


def _median(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The run of median commit time."""
    return sorted(runs)[len(runs) // 2]


def large_file(base: Path, rows: int) -> tuple[float, float, float]:
    """(local ingest, lake publish, lake apply) seconds for one ``rows``-row file, in this
    process, through the functions the daemon runs."""
    from moneylion.aggregates import verify
    from moneylion.config import load_config
    from moneylion.ingest import ingest_file
    from moneylion.lake.publish import LakePublisher
    from moneylion.lake.tailer import LakeTailer, lake_for
    from moneylion.schema import open_warehouse

    path = cached_transactions(rows, users=max(1, rows // 10), first_id=1)
    shutil.rmtree(base, ignore_errors=True)
    local = load_config(environ={}).with_overrides(inbox=base / "inbox", warehouse=base / "local")
    local.staging_dir.mkdir(parents=True)
    conn = open_warehouse(local)
    started = time.perf_counter()
    ingest_file(conn, path, local)
    local_seconds = time.perf_counter() - started
    assert verify(conn) == []
    conn.close()
    lake_config = local.with_overrides(warehouse=base / "replica", lake_uri=str(base / "lake"))
    lake_config.staging_dir.mkdir(parents=True)
    lake = lake_for(lake_config)
    lake.create()
    conn = open_warehouse(lake_config)
    started = time.perf_counter()
    LakePublisher(lake, lake_config).publish_paths([path], lake_config)
    published = time.perf_counter() - started
    started = time.perf_counter()
    LakeTailer(conn.cursor(), lake_config).catch_up(lake_for(lake_config))
    applied = time.perf_counter() - started
    assert verify(conn) == []
    conn.close()
    return local_seconds, published, applied


def latency(base: Path, files: int, rows: int) -> list[float]:
    """Seconds from a file's drop into daemon a's inbox until daemon b's API has it."""
    shutil.rmtree(base, ignore_errors=True)
    lake = base / "lake"
    a = lake_daemon(base, "a", lake, MONEYLION_LOG_LEVEL="WARNING")
    b = lake_daemon(base, "b", lake, MONEYLION_LOG_LEVEL="WARNING")
    paths = small_files(base / "src", files, rows, first_id=10_000_000)
    seconds = []
    try:
        a.start()
        b.start()
        for n, path in enumerate(paths, start=1):
            started = time.monotonic()
            drop([path], a.inbox)
            wait_for(lambda n=n: _applied(b) >= n, 60, "the other daemon", step=0.005)
            seconds.append(time.monotonic() - started)
        a.stop()
        b.stop()
    finally:
        a.close()
        b.close()
    return seconds


def _applied(daemon: DaemonProcess) -> int:
    try:
        return int(daemon.get("/v1/health/ready")["lake"]["applied_files"])
    except Exception:
        return 0


def spark_totals(lake: Path) -> Any:
    """Per-user totals with Spark (local mode) from the tables' active parquet files: the
    ledger's loaded files, their rows, the first copy of each transaction id in file order."""
    from deltalake import DeltaTable
    from pyspark.sql import SparkSession, Window
    from pyspark.sql import functions as F

    spark = (
        SparkSession.builder.master("local[2]")
        .appName("moneylion-lake")
        .config("spark.ui.enabled", "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    try:
        files = spark.read.parquet(*DeltaTable(str(lake / "files")).file_uris())
        rows = spark.read.parquet(*DeltaTable(str(lake / "transactions")).file_uris())
        loaded = files.where(F.col("status") == "loaded").select(
            F.col("sha256").alias("file_sha256"), "write_id", "file_id"
        )
        first = Window.partitionBy("transaction_id").orderBy("file_id", "line")
        kept = (
            rows.join(loaded, ["file_sha256", "write_id"])
            .withColumn("n", F.row_number().over(first))
            .where(F.col("n") == 1)
        )
        users = kept.groupBy("user_id").agg(F.count("*").alias("n"), F.sum("amount").alias("t"))
        daily = kept.groupBy("transaction_date", "transaction_type").agg(
            F.count("*").alias("n"), F.sum("amount").alias("t")
        )
        return (
            {int(r["user_id"]): (int(r["n"]), f"{r['t']:.2f}") for r in users.collect()},
            sorted(
                (
                    r["transaction_date"].isoformat(),
                    r["transaction_type"],
                    int(r["n"]),
                    f"{r['t']:.2f}",
                )
                for r in daily.collect()
            ),
        )
    finally:
        spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--burst-rows", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each burst (median)")
    parser.add_argument("--large-rows", type=int, default=10_000_000)
    parser.add_argument("--latency-files", type=int, default=20)
    parser.add_argument("--latency-rows", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--no-spark", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, str]] = []

    paths = small_files(OUT / "burst-src", args.burst, args.burst_rows)
    cores = len(os.sched_getaffinity(0))
    for pin in (False, True) if cores >= 2 else (False,):
        # Interleaved and repeated: a burst lasts 1-3 s, and the machine is shared.
        ones, twos = [], []
        for _ in range(args.repeat):
            ones.append(burst(OUT / "burst-1", paths, 1, pin=pin))
            twos.append(burst(OUT / "burst-2", paths, 2, pin=pin))
        one, two = _median(ones), _median(twos)
        where = "each daemon on a core of its own" if pin else f"sharing {cores} cores"
        for label, (committed, visible) in (("one daemon", one), ("two daemons", two)):
            figures.append(
                (
                    f"burst of {len(paths)} files, {label}, {where}",
                    f"{len(paths) / committed:.0f} files/s committed, "
                    f"{len(paths) / visible:.0f} files/s visible in every replica",
                    "",
                )
            )
        speedup = one[0] / two[0]
        figures.append(
            (
                f"two daemons / one (committed), {where}",
                f"{speedup:.2f}x",
                ratio(speedup, 1.6, lower_is_better=False),
            )
        )

    local_s, published, applied = large_file(OUT / "large", args.large_rows)
    lake_s = published + applied
    figures.append(
        (
            f"{args.large_rows:,}-row file",
            f"local {local_s:.2f} s, lake {lake_s:.2f} s "
            f"(publish {published:.2f} + apply {applied:.2f})",
            ratio(lake_s / local_s, 2.0, lower_is_better=True),
        )
    )

    seconds = latency(OUT / "latency", args.latency_files, args.latency_rows)
    p50 = statistics.median(seconds)
    p90 = sorted(seconds)[int(0.9 * (len(seconds) - 1))]
    figures.append(
        (
            f"drop -> other daemon's API, {args.latency_rows}-row file",
            f"p50 {p50 * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms, max {max(seconds) * 1000:.0f} ms",
            ratio(p50, 0.5, lower_is_better=True),
        )
    )

    exact = 0
    started = time.perf_counter()
    trial_lake = None
    for n in range(args.trials):
        base = OUT / f"trial-{n}"
        shutil.rmtree(base, ignore_errors=True)
        try:
            problems = lake_crash_trial(base, 2000 + n)
        except Exception as exc:  # a trial that cannot finish is not exact; say why, go on
            problems = [f"{type(exc).__name__}: {exc}"]
        exact += not problems
        print(f"trial {n}: {problems or 'exact'}", flush=True)
        trial_lake = base / "lake"
    figures.append(
        (
            "SIGKILL trials (daemon b killed 3-4 times)",
            f"{exact}/{args.trials} exact in {time.perf_counter() - started:.0f} s",
            "",
        )
    )

    if trial_lake is not None:
        polars = polars_totals(trial_lake)
        figures.append(
            (
                "Polars over the last trial's lake",
                f"{len(polars[0])} users, {len(polars[1])} days x types",
                "",
            )
        )
        if not args.no_spark:
            try:
                spark = spark_totals(trial_lake)
            except ImportError:
                figures.append(("Spark", "pyspark not installed (the bench extra)", ""))
            else:
                same = (
                    "same totals as Polars" if spark == polars else "DIFFERENT totals from Polars"
                )
                figures.append(
                    ("Spark (local[2], from file_uris())", f"{len(spark[0])} users: {same}", "")
                )
                print("Spark per-user totals (first 5):", sorted(spark[0].items())[:5])
    print_table(("measure", "figure", "target"), figures)


if __name__ == "__main__":
    main()
