"""Micro-benchmarks of the design choices the package's comments justify with figures.

Each case times two ways of doing one thing and prints one row per comparison: the case, what
is compared and on what size, figure A, figure B and A/B. A figure is the median wall time per
call (time.perf_counter) over several repetitions, A's and B's repetitions interleaved so both
see the same load; the process CPU time per call is beside it (above the wall time when DuckDB
works on both threads); A/B is of the wall times. Inputs are generated once and cached
in bench/out/ (a 1M-transaction warehouse over 100k users with its SQLite export, in
bench/out/micro/); the scratch warehouse the small cases use is rebuilt on every run.
Prints figures; no asserts beyond checking that both ways give the same answer.

    .venv/bin/python bench/micro.py [--only NAME] [--transactions 1000000] [--users 100000]

Cases: statement, user_summary, sniffer, copies, wide, values, small_sql, staging,
ordinals, pushdown.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import shutil
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import duckdb

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.common import OUT, cached_transactions, cached_users, print_table  # noqa: E402
from moneylion import source  # noqa: E402
from moneylion.aggregates import USER_TOTALS_OF_FILE_SELECT  # noqa: E402
from moneylion.api.queries import user_summary  # noqa: E402
from moneylion.api.replica import SqliteReplica  # noqa: E402
from moneylion.config import Config, load_config  # noqa: E402
from moneylion.export import close_sqlite, export_full  # noqa: E402
from moneylion.export.increment import ROWS_PER_STATEMENT  # noqa: E402
from moneylion.export.schema import SQLITE_SCHEMA  # noqa: E402
from moneylion.export.sums import cents_of, compile_summer  # noqa: E402
from moneylion.generate import TRANSACTIONS_HEADER  # noqa: E402
from moneylion.ingest import ingest_file  # noqa: E402
from moneylion.model import TABLES, USER_TOTALS, FileKind  # noqa: E402
from moneylion.reader import (  # noqa: E402
    located_of_marked_sql,
    located_select_sql,
    marked_select_sql,
    read_csv_sql,
    typed_select_sql,
)
from moneylion.schema import connect, open_warehouse  # noqa: E402
from moneylion.validate import Header, read_header  # noqa: E402

FOLDER = OUT / "micro"
HEADERS = ("case", "compared", "A", "B", "A/B")
Row = tuple[str, str, str, str, str]


# --- timing -----------------------------------------------------------------------------------


class Timing:
    """Median seconds per call (wall and process CPU) over repetitions of ``number`` calls."""

    def __init__(self, call: Callable[[], object], number: int) -> None:
        self.call = call
        self.number = number
        self.walls: list[float] = []
        self.cpus: list[float] = []

    def repetition(self) -> None:
        started, cpu = time.perf_counter(), time.process_time()
        for _ in range(self.number):
            self.call()
        self.walls.append((time.perf_counter() - started) / self.number)
        self.cpus.append((time.process_time() - cpu) / self.number)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu(self) -> float:
        return statistics.median(self.cpus)

    def __str__(self) -> str:
        return f"{duration(self.wall)} (cpu {duration(self.cpu)})"


def compare(
    case: str,
    compared: str,
    a: tuple[Callable[[], object], int],
    b: tuple[Callable[[], object], int],
    *,
    repeat: int,
) -> Row:
    """A row timing ``a`` and ``b`` (each a call and the calls per repetition), their
    repetitions interleaved so that both see the same load; each warmed by one call first."""
    timings = [Timing(*a), Timing(*b)]
    for timing in timings:
        timing.call()  # warm: plans, caches, pages
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeat):
            for timing in timings:
                timing.repetition()
    finally:
        gc.enable()
    first, second = timings
    return (case, compared, str(first), str(second), f"{first.wall / second.wall:.2f}")


def duration(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def count(n: int) -> str:
    """1000000 -> 1M, 100000 -> 100k."""
    for size, unit in ((1_000_000, "M"), (1_000, "k")):
        if n >= size:
            return f"{n / size:g}{unit}"
    return str(n)


# --- inputs -----------------------------------------------------------------------------------


class PlainFile:
    """A CSV on disk as a ``moneylion.validate.Source`` (what a staged file offers)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def csv_size(self) -> int:
        return self.path.stat().st_size

    def open_binary(self) -> BinaryIO:
        return self.path.open("rb")

    def disk_path(self) -> Path:
        return self.path


def bench_config(warehouse: Path) -> Config:
    return load_config(environ={}).with_overrides(
        warehouse=warehouse, inbox=warehouse.parent / "inbox"
    )


def cached_warehouse(users: int, transactions: int) -> Path:
    """A warehouse of ``users`` users and ``transactions`` transactions with its SQLite export,
    built once with ingest_file and export_full."""
    folder = FOLDER / f"warehouse-{users}-{transactions}"
    if (folder / "ready").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    sources = [
        cached_users(users, seed=1),
        cached_transactions(transactions, users=users, first_id=1, seed=2),
    ]
    config = bench_config(folder)
    conn = open_warehouse(config)
    try:
        for path in sources:
            print(f"  built: {ingest_file(conn, path, config).summary()}", flush=True)
        result = export_full(conn, config.sqlite_path)
        print(f"  exported to SQLite in {result.seconds:.1f} s", flush=True)
    finally:
        close_sqlite()
        conn.close()
    (folder / "ready").touch()
    return folder


def write_once(path: Path, text: str) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".part").write_text(text)
        path.with_suffix(".part").rename(path)
    return path


def wide_file(columns: int, rows: int) -> Path:
    """A transactions CSV of ``rows`` rows with ``columns`` fields (extras after the five)."""
    extra = columns - 5
    head = TRANSACTIONS_HEADER + "".join(f",extra_{n}" for n in range(extra))
    lines = [
        f"{1 + k},{1 + k},2024-01-0{1 + k % 9},{10 + k}.50,deposit" + ",x" * extra
        for k in range(rows)
    ]
    return write_once(FOLDER / f"wide-{columns}x{rows}.csv", "\n".join([head, *lines, ""]))


class Scratch:
    """A file-backed warehouse rebuilt for this run (``moneylion.schema.connect``), and one
    small file ingested into it when a case needs rows."""

    def __init__(self) -> None:
        self.folder = FOLDER / "scratch"
        shutil.rmtree(self.folder, ignore_errors=True)
        self.config = bench_config(self.folder)
        self.conn = connect(self.config.duckdb_path)
        self._file_id: int | None = None

    def file_id(self, rows: int) -> int:
        """The id of a ``rows``-row transactions file ingested into the scratch warehouse."""
        if self._file_id is None:
            path = cached_transactions(rows, users=rows // 2, first_id=1, seed=7)
            outcome = ingest_file(self.conn, path, self.config)
            assert outcome.rows_loaded == rows, outcome.summary()
            assert outcome.file_id is not None
            self._file_id = outcome.file_id
        return self._file_id

    def close(self) -> None:
        self.conn.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# --- the cases --------------------------------------------------------------------------------


def case_statement(scratch: Scratch, args: argparse.Namespace) -> list[Row]:
    """moneylion/api/cache.py, moneylion/api/queries.py: a statement's fixed cost."""
    cursor = scratch.conn.cursor()

    def one_cursor() -> object:
        return cursor.execute("SELECT 1").fetchall()

    def fresh_cursor() -> object:
        fresh = scratch.conn.cursor()
        try:
            return fresh.execute("SELECT 1").fetchall()
        finally:
            fresh.close()

    compared = "SELECT 1 on one cursor vs a fresh cursor each (as the API)"
    out = compare("statement", compared, (one_cursor, 500), (fresh_cursor, 500), repeat=9)
    cursor.close()
    return [out]


def case_user_summary(scratch: Scratch, args: argparse.Namespace) -> list[Row]:
    """moneylion/api/replica.py: a user summary from DuckDB vs from the SQLite export."""
    folder = cached_warehouse(args.users, args.transactions)
    config = bench_config(folder)
    conn = open_warehouse(config)
    replica = SqliteReplica(config.sqlite_path)
    try:
        (committed,) = conn.execute("SELECT max(file_id) FROM files").fetchall()[0]
        ids = iter(random.Random(1).choices(range(1, args.users + 1), k=1_000_000))

        def from_duckdb() -> object:
            cursor = conn.cursor()  # a fresh cursor per read, as ApiContext.run
            try:
                return user_summary(cursor, next(ids))
            finally:
                cursor.close()

        def from_sqlite() -> object:
            answered, found = replica.user_summary(next(ids), committed)
            assert answered
            return found

        probe = random.Random(2).randrange(1, args.users + 1)
        cursor = conn.cursor()
        assert replica.user_summary(probe, committed) == (True, user_summary(cursor, probe))
        cursor.close()
        size = f"{count(args.transactions)} tx, {count(args.users)} users"
        compared = f"queries.user_summary vs SqliteReplica.user_summary, {size}"
        out = compare("user_summary", compared, (from_duckdb, 100), (from_sqlite, 1_000), repeat=9)
    finally:
        replica.close()
        conn.close()
    return [out]


def case_sniffer(scratch: Scratch, args: argparse.Namespace) -> list[Row]:
    """moneylion/reader.py read_csv_sql: explicit columns skip DuckDB's sniffer."""
    path = cached_transactions(100, users=50, first_id=1, seed=3)
    header = read_header(PlainFile(path))
    params = {"path": str(path), "skip": header.line_number}
    conn = scratch.conn
    explicit = f"SELECT * FROM {read_csv_sql(header)}"

    def sniffed() -> list[Any]:
        return conn.execute("SELECT * FROM read_csv($path)", {"path": str(path)}).fetchall()

    def declared() -> list[Any]:
        return conn.execute(explicit, params).fetchall()

    assert len(sniffed()) == len(declared()) == 100
    compared = "read_csv auto-detect vs read_csv_sql(header), 100 rows"
    return [compare("sniffer", compared, (sniffed, 5), (declared, 20), repeat=9)]


def case_copies(scratch: Scratch, args: argparse.Namespace) -> list[Row]:
    """moneylion/append.py distinct_ids: distinct ids by a bitmap vs count(DISTINCT)."""
    n = 10_000_000
    conn = scratch.conn
    bitmap_sql = "SELECT bit_count(bitstring_agg(i, $low, $high)) FROM range($n) AS r(i)"
    distinct_sql = "SELECT count(DISTINCT i) FROM range($n) AS r(i)"

    def bitmap() -> int:
        return int(conn.execute(bitmap_sql, {"n": n, "low": 0, "high": n - 1}).fetchall()[0][0])

    def distinct() -> int:
        return int(conn.execute(distinct_sql, {"n": n}).fetchall()[0][0])

    assert bitmap() == distinct() == n
    compared = "bitstring_agg vs count(DISTINCT), 10M ids"
    return [compare("copies", compared, (bitmap, 1), (distinct, 1), repeat=5)]


def case_wide(scratch: Scratch, args: argparse.Namespace) -> list[Row]:
    """moneylion/tuning.py wide_columns: DuckDB's reader binds every column of a wide file."""
    conn = scratch.conn
    rows = 3

    def reader(columns: int, select: Callable[[Header], str]) -> Callable[[], list[Any]]:
        path = wide_file(columns, rows)
        header = read_header(PlainFile(path))
        sql = select(header)
        params = {"path": str(path), "skip": header.line_number}
        return lambda: conn.execute(sql, params).fetchall()

    out = []
    # typed_select_sql: the fast path's read; located_select_sql: the path that sets rows
    # aside, which also carries every raw field.
    for select in (typed_select_sql, located_select_sql):
        wide, narrow = reader(5_000, select), reader(5, select)
        assert len(wide()) == len(narrow()) == rows
        out.append(
            compare(
                "wide",
                f"{select.__name__} on 5,000 vs 5 columns, {rows} rows",
                (wide, 1),
                (narrow, 20),
                repeat=5,
            )
        )
    return out


def case_values(scratch: Scratch, args: argparse.Namespace) -> list[Row]:
    """moneylion/export/increment.py _insert_flat: rows per SQLite INSERT statement."""
    rows = 1_000
    path = FOLDER / "values.sqlite"
    for stale in FOLDER.glob("values.sqlite*"):
        stale.unlink()
    lite = sqlite3.connect(path, isolation_level=None)
    lite.execute("PRAGMA journal_mode=WAL")  # as the export's writer
    lite.execute("PRAGMA synchronous=NORMAL")
    lite.executescript(SQLITE_SCHEMA)
    transactions = TABLES[FileKind.TRANSACTIONS].names
    users = TABLES[FileKind.USERS].names
    new_tx = [
        v
        for k in range(rows)
        for v in (1 + k, 1 + k * 7919 % 100_000, f"2024-01-{1 + k % 28:02}", k + 0.25, "deposit")
    ]
    # The users replaced are scattered over a table of ``--users`` rows, as a file's would be.
    stored = [v for k in range(args.users) for v in (1 + k, "2020-01-01", "US")]
    insert_all(lite, "users", users, stored)
    scattered = random.Random(3).sample(range(1, args.users + 1), rows)
    new_users = [
        v for k, user in enumerate(scattered) for v in (user, f"2023-02-{1 + k % 28:02}", "FR")
    ]

    def insert(
        table: str, names: tuple[str, ...], flat: list[Any], verb: str, per: int
    ) -> Callable[[], None]:
        def call() -> None:
            lite.execute("BEGIN")
            try:
                insert_rows(lite, table, names, flat, verb, per)
            finally:
                lite.execute("ROLLBACK")  # every repetition writes the same rows again

        before = lite.total_changes
        lite.execute("BEGIN")
        insert_rows(lite, table, names, flat, verb, per)
        assert lite.total_changes - before == rows, (table, per)
        lite.execute("ROLLBACK")
        return call

    out = []
    for table, names, flat, verb in (
        ("transactions", transactions, new_tx, "INSERT"),
        ("users", users, new_users, "INSERT OR REPLACE"),
    ):
        multi = insert(table, names, flat, verb, ROWS_PER_STATEMENT)
        single = insert(table, names, flat, verb, 1)
        what = "into an empty table" if table == "transactions" else f"of {count(args.users)}"
        label = f"{verb} {rows:,} {table} {what}: {ROWS_PER_STATEMENT}/statement vs 1"
        out.append(compare("values", label, (multi, 20), (single, 20), repeat=15))
    lite.close()
    for stale in FOLDER.glob("values.sqlite*"):
        stale.unlink()
    return out


def insert_all(
    lite: sqlite3.Connection, table: str, names: tuple[str, ...], flat: list[Any]
) -> None:
    lite.execute("BEGIN")
    insert_rows(lite, table, names, flat, "INSERT", 1)
    lite.execute("COMMIT")


def insert_rows(
    lite: sqlite3.Connection,
    table: str,
    names: tuple[str, ...],
    flat: list[Any],
    verb: str,
    per_statement: int,
) -> None:
    """``flat`` (rows laid end to end) in statements of ``per_statement`` rows, as
    increment._insert_flat builds them."""
    width = len(names)
    one = "(" + ", ".join("?" * width) + ")"
    sql = f"{verb} INTO {table} ({', '.join(names)}) VALUES " + ", ".join([one] * per_statement)
    values = iter(flat)
    lite.executemany(sql, zip(*[values] * (width * per_statement), strict=False))


def case_small_sql(scratch: Scratch, args: argparse.Namespace) -> list[Row]:
    """moneylion/export/increment.py: small increments sum and sort in Python, not DuckDB."""
    rows = 1_000
    file_id = scratch.file_id(rows)
    cursor = scratch.conn.cursor()
    names = TABLES[FileKind.TRANSACTIONS].names
    select = (
        f"SELECT {', '.join(names)}, (amount * 100)::BIGINT AS {cents_of('amount')} "
        "FROM transactions WHERE file_id = $f"
    )
    params = {"f": file_id}
    fetched = cursor.execute(select, params).fetchall()
    assert len(fetched) == rows
    columns = {
        name: list(values)
        for name, values in zip(
            (*names, cents_of("amount")), zip(*fetched, strict=True), strict=True
        )
    }
    summer = compile_summer(USER_TOTALS)
    assert len(summer(columns)) == len(
        cursor.execute(USER_TOTALS_OF_FILE_SELECT, {"first": file_id, "last": file_id}).fetchall()
    )

    def duck_group() -> object:
        return cursor.execute(
            USER_TOTALS_OF_FILE_SELECT, {"first": file_id, "last": file_id}
        ).fetchall()

    def python_sums() -> object:
        return summer(columns)

    def duck_sorted() -> object:
        return cursor.execute(select + " ORDER BY user_id, transaction_id", params).fetchall()

    def duck_unsorted() -> object:
        return cursor.execute(select, params).fetchall()

    def python_sorted() -> object:
        return sorted(cursor.execute(select, params).fetchall(), key=lambda r: (r[1], r[0]))

    assert duck_sorted() == python_sorted()
    out = [
        compare(
            "small_sql",
            f"DuckDB GROUP BY user (USER_TOTALS) vs sums.compile_summer, {rows:,} rows",
            (duck_group, 20),
            (python_sums, 20),
            repeat=9,
        ),
        compare(
            "small_sql",
            f"SELECT {rows:,} rows ORDER BY in DuckDB vs unordered + Python sorted()",
            (duck_sorted, 20),
            (python_sorted, 20),
            repeat=9,
        ),
        compare(
            "small_sql",
            f"SELECT {rows:,} rows with ORDER BY vs without (A - B: the sort)",
            (duck_sorted, 20),
            (duck_unsorted, 20),
            repeat=9,
        ),
    ]
    cursor.close()
    return out


def case_staging(scratch: Scratch, args: argparse.Namespace) -> list[Row]:
    """moneylion/source.py _copy_hashing: the private copy by copy_file_range, then hashed,
    vs reading, hashing and writing every chunk; on the 10M-row file of bench/ingest.py."""
    path = cached_transactions(10_000_000, users=1_000_000, first_id=1_000_001, seed=3)
    copy = scratch.folder / "staged-copy"

    def staged(kernel: bool) -> Callable[[], str]:
        def call() -> str:
            copy.unlink(missing_ok=True)
            fd = os.open(path, os.O_RDONLY)
            try:
                if kernel:
                    return source._copy_hashing(fd, copy, path.stat().st_size)[0]
                out = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    return source._read_hash_write(fd, out, path.stat().st_size)[0]
                finally:
                    os.close(out)
            finally:
                os.close(fd)

        return call

    assert staged(True)() == staged(False)()
    size = path.stat().st_size / 1e6
    compared = f"copy_file_range + sha256 vs read/sha256/write, {size:.0f} MB"
    return [compare("staging", compared, (staged(True), 1), (staged(False), 1), repeat=5)]


def case_ordinals(scratch: Scratch, args: argparse.Namespace) -> list[Row]:
    """moneylion/reader.py marked_select_sql: the rows failing a check, numbered by a window
    over a table the read makes in parallel, vs by a window over the read itself; on the
    10M-row file with 1% bad rows of bench/ingest.py."""
    path = cached_transactions(
        10_000_000, users=1_000_000, first_id=50_000_001, seed=7, bad_rate=0.01
    )
    conn = scratch.conn
    header = read_header(PlainFile(path))
    params = {"path": str(path), "skip": header.line_number}

    def windowed() -> list[Any]:
        query = f"SELECT ordinal, raw_fields FROM ({located_select_sql(header)}) WHERE NOT ok"
        return conn.execute(query, params).fetchall()

    def marked() -> list[Any]:
        conn.execute(
            "CREATE OR REPLACE TEMP TABLE marked AS " + marked_select_sql(header, "NOT ok"),
            params,
        )
        rows = conn.execute(
            f"SELECT ordinal, raw_fields FROM ({located_of_marked_sql(header, 'marked')})"
        ).fetchall()
        conn.execute("DROP TABLE marked")
        return rows

    assert marked() == windowed()
    compared = "window over a table made in parallel / over the read, 10M rows, 1% bad"
    return [compare("ordinals", compared, (marked, 1), (windowed, 1), repeat=3)]


def case_pushdown(scratch: Scratch, args: argparse.Namespace) -> list[Row]:
    """moneylion/append.py _without_filter_pushdown: the rows passing the fast checks, with
    DuckDB's filter pushdown off / on (on, it casts every field before and after the filter)."""
    path = cached_transactions(args.transactions, users=args.users, first_id=1, seed=2)
    conn = scratch.conn
    header = read_header(PlainFile(path))
    params = {"path": str(path), "skip": header.line_number}
    query = (
        "SELECT count(*), sum(transaction_id), max(user_id), max(transaction_date), "
        f"sum(amount), max(transaction_type) FROM ({typed_select_sql(header)}) WHERE ok"
    )

    def passing(pushdown: bool) -> Callable[[], list[Any]]:
        def call() -> list[Any]:
            if not pushdown:
                conn.execute("SET disabled_optimizers = 'filter_pushdown'")
            try:
                return conn.execute(query, params).fetchall()
            finally:
                conn.execute("RESET disabled_optimizers")

        return call

    assert passing(False)() == passing(True)()
    compared = f"rows passing the checks, pushdown off / on, {count(args.transactions)} rows"
    return [compare("pushdown", compared, (passing(False), 1), (passing(True), 1), repeat=5)]


CASES: dict[str, Callable[[Scratch, argparse.Namespace], list[Row]]] = {
    "statement": case_statement,
    "user_summary": case_user_summary,
    "sniffer": case_sniffer,
    "copies": case_copies,
    "wide": case_wide,
    "values": case_values,
    "small_sql": case_small_sql,
    "staging": case_staging,
    "ordinals": case_ordinals,
    "pushdown": case_pushdown,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--only", choices=sorted(CASES), help="run one case")
    parser.add_argument("--transactions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=100_000)
    args = parser.parse_args()

    started = time.perf_counter()
    print(f"duckdb {duckdb.__version__}, sqlite {sqlite3.sqlite_version}", flush=True)
    print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    scratch = Scratch()
    rows: list[Row] = []
    try:
        for name, case in CASES.items():
            if args.only in (None, name):
                case_started = time.perf_counter()
                rows.extend(case(scratch, args))
                print(f"  {name}: {time.perf_counter() - case_started:.1f} s", flush=True)
    finally:
        scratch.close()
    print()
    print_table(HEADERS, rows)
    print()
    print(f"load average: {os.getloadavg()[0]:.1f}; {time.perf_counter() - started:.1f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
