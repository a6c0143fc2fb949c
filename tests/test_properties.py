"""The invariant that matters most: any files, in any order, give exact aggregates.

Random files mix good rows, bad rows of every reason, identical copies, conflicting copies,
conflicts with stored rows, orphan transactions and users arriving after their transactions.
Loaded one by one they must (1) leave the base tables exactly as the policies say (a small model
of DESIGN.md's rules, written here), (2) keep the aggregates equal to a full recompute, and
(3) when no two files disagree about an id, give the same aggregates as their union loaded at once.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from tempfile import TemporaryDirectory

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moneylion.aggregates import verify
from moneylion.config import Config, load_config
from moneylion.ingest import ingest_file
from moneylion.ladder import from_each_rung
from moneylion.schema import open_warehouse
from tests.conftest import TX_HEADER, TYPES, USERS_HEADER, write_csv

# Every declared ladder, started at each of its rungs: each path is held to the others.
LADDERS_TRIED = from_each_rung()

BAD_TX_ROWS = [
    "{id},7,2022-01-01,,deposit",  # missing_field
    "{id}.0,7,2022-01-01,1.00,deposit",  # bad_integer
    "{id},0,2022-01-01,1.00,deposit",  # non_positive_id
    "{id},7,2022-02-30,1.00,deposit",  # bad_date
    "{id},7,2022-01-01,1e3,deposit",  # bad_amount
    "{id},7,2022-01-01,-4,deposit",  # non_positive_amount
    "{id},7,2022-01-01,1.001,deposit",  # too_many_decimals
    "{id},7,2022-01-01,1.00,refund",  # unknown_type
    "{id},7,2022-01-01,1.00",  # wrong_field_count
    "{id},7,2022-01-01,1.00,deposit,,",  # wrong_field_count (empty extra fields)
]

TxContent = tuple[int, dt.date, Decimal, str]


@dataclass(frozen=True)
class TxRow:
    transaction_id: int
    content: TxContent

    def line(self) -> str:
        user, day, amount, kind = self.content
        return f"{self.transaction_id},{user},{day.isoformat()},{amount},{kind}"


@st.composite
def tx_content(draw: st.DrawFn) -> TxContent:
    user = draw(st.integers(1, 12))  # users 9..12 never get a profile: orphans
    day = dt.date(2022, 1, 1) + dt.timedelta(days=draw(st.integers(0, 5)))
    cents = draw(st.integers(1, 10**9))
    amount = Decimal(cents).scaleb(-2)
    return user, day, amount, draw(st.sampled_from(TYPES))


@st.composite
def tx_file(draw: st.DrawFn, truth: dict[int, TxContent], ids: int = 40) -> list[str]:
    """Rows drawn around a shared truth (id -> content) of ids 1..``ids``; some rows disagree
    with it."""
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        choice = draw(st.integers(0, 9))
        ident = draw(st.integers(1, ids))
        if choice <= 5:
            lines.append(TxRow(ident, truth[ident]).line())  # agrees with the truth
        elif choice == 6:
            lines.append(TxRow(ident, draw(tx_content())).line())  # may disagree
        elif choice == 7:
            lines.append(draw(st.sampled_from(BAD_TX_ROWS)).format(id=ident))
        else:
            row = TxRow(ident, truth[ident]).line()
            lines += [row, row]  # identical copies within the file
    return lines


@st.composite
def users_file(draw: st.DrawFn) -> list[str]:
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        user = draw(st.integers(1, 8))
        country = draw(st.sampled_from(["Japan", "France", "Chile"]))
        if draw(st.booleans()):
            lines.append(f"{user},2021-01-0{user % 9 + 1},{country}")
        else:
            lines.append(f"{user},2021-13-01,{country}")  # bad_date
    return lines


@st.composite
def file_sets(draw: st.DrawFn, ids: int = 40) -> list[tuple[str, list[str]]]:
    """Up to 6 files, a quarter of them users files; transactions of ids 1..``ids`` (fewer ids:
    more of them shared between files)."""
    truth = {i: draw(tx_content()) for i in range(1, ids + 1)}
    files: list[tuple[str, list[str]]] = []
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.integers(0, 3)) == 0:
            files.append(("users", draw(users_file())))
        else:
            files.append(("transactions", draw(tx_file(truth, ids))))
    return files


def write_files(folder: Path, files: list[tuple[str, list[str]]]) -> list[Path]:
    paths = []
    for number, (kind, lines) in enumerate(files):
        header = TX_HEADER if kind == "transactions" else USERS_HEADER
        paths.append(write_csv(folder / f"{number:03d}_{kind}.csv", header, lines))
    return paths


def parse_tx(line: str) -> TxRow | None:
    """The model's reading of a generated row: only rows built by TxRow.line() are good."""
    parts = line.split(",")
    if len(parts) != 5 or parts[4] not in TYPES or "." not in parts[3]:
        return None
    try:
        day = dt.date.fromisoformat(parts[2])
        content = (int(parts[1]), day, Decimal(parts[3]), parts[4])
        ident = int(parts[0])
    except ValueError:
        return None
    if content[0] <= 0 or content[2] <= 0 or content[2] != content[2].quantize(Decimal("0.01")):
        return None
    return TxRow(ident, content)


def model(files: list[tuple[str, list[str]]]) -> tuple[dict[int, TxContent], dict[int, str]]:
    """DESIGN.md's policies, sequentially: first stored content wins for transactions, latest
    file wins for users, conflicting copies within a file are all dropped."""
    stored: dict[int, TxContent] = {}
    users: dict[int, str] = {}
    seen_bytes: set[str] = set()
    for kind, lines in files:
        text = "\n".join(lines) + kind
        if text in seen_bytes:
            continue
        seen_bytes.add(text)
        if kind == "users":
            by_user: dict[int, set[str]] = {}
            for line in lines:
                user, signup, country = line.split(",")
                if signup.startswith("2021-13"):
                    continue
                by_user.setdefault(int(user), set()).add(country)
            for user, countries in by_user.items():
                if len(countries) == 1:
                    users[user] = countries.pop()
            continue
        by_id: dict[int, set[TxContent]] = {}
        for line in lines:
            row = parse_tx(line)
            if row is not None:
                by_id.setdefault(row.transaction_id, set()).add(row.content)
        for ident, variants in by_id.items():
            if len(variants) == 1 and ident not in stored:
                stored[ident] = variants.pop()
    return stored, users


def fresh(folder: Path) -> tuple[Config, duckdb.DuckDBPyConnection]:
    config = load_config(environ={}).with_overrides(
        warehouse=folder / "warehouse", inbox=folder / "inbox"
    )
    return config, open_warehouse(config)


def aggregates_of(conn: duckdb.DuckDBPyConnection) -> list[list[tuple[object, ...]]]:
    return [
        conn.execute(f"SELECT * FROM {table} ORDER BY ALL").fetchall()
        for table in ("user_totals", "daily_totals", "top_users")
    ]


@pytest.mark.slow  # a property test: hypothesis runs it many times
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    files=file_sets(),
    order=st.randoms(use_true_random=False),
    ladder=st.sampled_from(sorted(LADDERS_TRIED)),
    ids_back=st.booleans(),
)
def test_any_files_in_any_order_keep_aggregates_exact(
    files: list[tuple[str, list[str]]], order: random.Random, ladder: str, ids_back: bool
) -> None:
    """Whichever path each file takes (every declared ladder, from each of its rungs), and
    whether its appended ids come back to Python or are asked for (``Tuning.ids_back_bytes``:
    the small files here take the way of a large one when it is 0)."""
    order.shuffle(files)
    expected_tx, expected_users = model(files)
    ladders = LADDERS_TRIED[ladder]
    with TemporaryDirectory() as tmp:
        folder = Path(tmp)
        config, conn = fresh(folder)
        if not ids_back:
            config = config.with_overrides(tuning=replace(config.tuning, ids_back_bytes=0))
        outcomes = [
            ingest_file(conn, path, config, ladders=ladders) for path in write_files(folder, files)
        ]

        stored = {
            row[0]: (row[1], row[2], row[3], row[4])
            for row in conn.execute(
                "SELECT transaction_id, user_id, transaction_date, amount, "
                "CAST(transaction_type AS VARCHAR) FROM transactions"
            ).fetchall()
        }
        assert stored == expected_tx
        assert dict(conn.execute("SELECT user_id, country FROM users").fetchall()) == expected_users
        assert sum(o.rows_loaded for o in outcomes if o.kind == "transactions") == len(stored)
        assert verify(conn) == []
        conn.close()


@pytest.mark.slow  # a property test: hypothesis runs it many times
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    files=file_sets(),
    one=st.sampled_from(sorted(LADDERS_TRIED)),
    union=st.sampled_from(sorted(LADDERS_TRIED)),
)
def test_files_one_by_one_equal_their_union_at_once(
    files: list[tuple[str, list[str]]], one: str, union: str
) -> None:
    # Keep only rows that agree with each other across files, so order cannot matter.
    tx_lines: list[str] = []
    first_seen: dict[int, str] = {}
    for kind, lines in files:
        if kind != "transactions":
            continue
        for line in lines:
            row = parse_tx(line)
            if row is None:
                continue
            if first_seen.setdefault(row.transaction_id, line) == line:
                tx_lines.append(line)
    chunks = [tx_lines[i::3] for i in range(3)]
    with TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "one").mkdir()
        (folder / "all").mkdir()
        config, conn = fresh(folder / "one")
        for path in write_files(folder / "one", [("transactions", c) for c in chunks]):
            ingest_file(conn, path, config, ladders=LADDERS_TRIED[one])
        config_all, conn_all = fresh(folder / "all")
        for path in write_files(folder / "all", [("transactions", tx_lines)]):
            ingest_file(conn_all, path, config_all, ladders=LADDERS_TRIED[union])

        assert aggregates_of(conn) == aggregates_of(conn_all)
        assert verify(conn) == []
        assert verify(conn_all) == []
        conn.close()
        conn_all.close()
