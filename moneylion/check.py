"""``moneylion check`` / ``POST /v1/checks``: what ingesting a file now would do, keeping nothing.

Exact by construction: the file takes the real ingest (``ingest.ingest_staged``: the same ledger
check, ladder, rules, hold and aggregate deltas), the report is read inside its transaction, and
the transaction is then rolled back (``ingest.Finish(commit=False)``). The inbox file is only
read (a private copy is staged, as for an ingest). The values before are read on a second cursor,
which sees the committed warehouse while the check's transaction holds the new one.

A check writes the worker's tables in its transaction: in the daemon it runs between two of the
worker's batches (``between_batches``), never beside one.

It takes a file id from the sequence like any new file: DuckDB sequences do not roll back, so the
id is gone (a gap in the ledger's ids, which nothing needs dense). A provisional id would have to
be above every stored file's (the fast paths count the stored rows of files before the id), that
is the sequence's next value, which the next real file takes too; a real one keeps the check on
the ingest's own path, with nothing to tell apart.

The report (``CheckReport``) is the API's answer and ``moneylion check --json``'s output. Money is
an exact decimal string. ``effect`` says what the file changes:

* a transactions file: the users and the (day, type) pairs its loaded rows touch (how many, and
  the first 20 by id, by day and type) with their totals before and after; the top 10 users
  before and after;
* a users file: the profiles it writes (``users``: how many, the first 20 by id), each with its
  country and signup date before (null: a new user) and after; their totals do not change, nor
  do the days or the top list.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import duckdb
import msgspec

from moneylion import ledger
from moneylion.config import Config
from moneylion.db import int_constants
from moneylion.errors import FileRefused
from moneylion.ingest import Finish, ingest_staged
from moneylion.ledger import FileOutcome, FileStatus
from moneylion.model import FileKind
from moneylion.source import Bounds, StagedFile, stage

LISTED = 20  # users and days listed in an effect (the counts cover them all)
TOP = 10  # ranks of the top lists
REJECTS_SHOWN = 5  # rejected lines shown per reason

Money = Annotated[str, msgspec.Meta(pattern=r"^-?[0-9]+\.[0-9]{2}$", examples=["1234.50"])]
Outcome = Literal["would_load", "would_hold", "would_fail", "seen_before"]
_CENT = Decimal("0.01")


class UserState(msgspec.Struct):
    """A user's totals, with its profile (null: no profile, an orphan or a new user)."""

    tx_count: int
    total_amount: Money
    country: str | None
    signup_date: dt.date | None


class UserEffect(msgspec.Struct):
    user_id: int
    before: UserState
    after: UserState


class DayTotals(msgspec.Struct):
    tx_count: int
    total_amount: Money


class DayEffect(msgspec.Struct):
    transaction_date: dt.date
    transaction_type: str
    before: DayTotals
    after: DayTotals


class Ranked(msgspec.Struct):
    rank: int
    user_id: int
    tx_count: int


class Effect(msgspec.Struct):
    """What the file changes (see the module's docstring for each kind)."""

    users_touched: int
    users: list[UserEffect]
    days_touched: int
    days: list[DayEffect]
    top_users_before: list[Ranked]
    top_users_after: list[Ranked]


class RowCounts(msgspec.Struct):
    total: int
    loaded: int
    duplicate: int
    rejected: int


class RejectedLine(msgspec.Struct):
    line: int
    message: str
    raw_line: str | None


class RejectGroup(msgspec.Struct):
    """The rows refused for one reason: how many, and the first few by line."""

    reason: str
    count: int
    first: list[RejectedLine]


class CheckReport(msgspec.Struct):
    """What ingesting the file now would do. ``file_id``: for ``seen_before``, the ledger's file
    with these bytes (else null: a check keeps no ledger row)."""

    name: str
    sha256: str | None
    size_bytes: int
    outcome: Outcome
    kind: str | None
    error_reason: str | None
    error: str | None
    rows: RowCounts
    rejects: list[RejectGroup]
    effect: Effect
    seconds: float
    file_id: int | None = None

    def summary(self) -> list[str]:
        """Readable lines for the command line."""
        return summary_lines(msgspec.to_builtins(self))


_OUTCOMES: dict[FileStatus, Outcome] = {
    FileStatus.LOADED: "would_load",
    FileStatus.HELD: "would_hold",
    FileStatus.FAILED: "would_fail",
}


def check_file(
    conn: duckdb.DuckDBPyConnection, path: Path, config: Config, *, name: str = ""
) -> CheckReport:
    """The report for the file at ``path`` (read, never moved or changed); ``name``: the one
    to report, if not its own."""
    started = time.perf_counter()
    try:
        staged = stage(path, config.staging_dir, bounds=Bounds.of(config))
    except FileRefused as refused:  # refused unread (not a regular file, too large)
        try:
            size = os.lstat(path).st_size
        except OSError:
            size = 0
        return _unread(name or path.name, size, refused, started)
    try:
        return check_staged(conn, staged, config, name=name, started=started)
    finally:
        staged.discard()


def check_staged(
    conn: duckdb.DuckDBPyConnection,
    staged: StagedFile,
    config: Config,
    *,
    name: str = "",
    started: float | None = None,
) -> CheckReport:
    """The report for a file already read (``source.stage``); ``name``: the one to report (an
    upload's), else the staged file's."""
    started = time.perf_counter() if started is None else started
    shown = name or staged.name
    found = ledger.known(conn, [staged.sha256]).get(staged.sha256)
    if found is not None:
        return _seen_before(conn, shown, staged, found, started)
    reports: list[CheckReport] = []

    def inspect(inside: duckdb.DuckDBPyConnection, outcome: FileOutcome) -> None:
        reports.append(_report(inside, shown, outcome))

    ingest_staged(conn, staged, config, finish=Finish(inspect=inspect, commit=False))
    return msgspec.structs.replace(reports[0], seconds=round(time.perf_counter() - started, 6))


# --- reading the effect inside the transaction -------------------------------------------------

_REJECT_COUNTS = "SELECT reason, count(*) FROM rejects WHERE file_id = $f GROUP BY ALL ORDER BY 1"
_REJECTS_FIRST = """
SELECT reason, line_number, message, raw_line FROM rejects WHERE file_id = $f
QUALIFY row_number() OVER (PARTITION BY reason ORDER BY line_number) <= $n
ORDER BY reason, line_number
"""
_TOUCHED = {
    FileKind.TRANSACTIONS: (
        "SELECT count(DISTINCT user_id) FROM transactions WHERE file_id = $f",
        "SELECT DISTINCT user_id FROM transactions WHERE file_id = $f ORDER BY 1 LIMIT $n",
    ),
    FileKind.USERS: (
        "SELECT count(*) FROM users WHERE file_id = $f",
        "SELECT user_id FROM users WHERE file_id = $f ORDER BY 1 LIMIT $n",
    ),
}
_DAYS_TOUCHED = """
SELECT count(*) FROM (SELECT DISTINCT transaction_date, transaction_type FROM transactions
                      WHERE file_id = $f)
"""
_DAYS_FIRST = """
SELECT DISTINCT transaction_date, transaction_type FROM transactions WHERE file_id = $f
ORDER BY 1, 2 LIMIT $n
"""
_DAY_TOTALS = """
SELECT transaction_date, CAST(transaction_type AS VARCHAR), tx_count, total_amount
FROM daily_totals WHERE transaction_date IN (SELECT unnest($dates))
"""
_TOP = "SELECT rank, user_id, tx_count FROM top_users ORDER BY rank LIMIT $n"


def _report(conn: duckdb.DuckDBPyConnection, name: str, outcome: FileOutcome) -> CheckReport:
    """The report of ``outcome``, read inside its transaction (``conn``), with the values before
    read on a sibling cursor (the committed warehouse)."""
    before = conn.cursor()
    try:
        effect = _effect(conn, before, outcome)
    finally:
        before.close()
    return CheckReport(
        name=name,
        sha256=outcome.sha256,
        size_bytes=outcome.size_bytes,
        outcome=_OUTCOMES[outcome.status],
        kind=outcome.kind,
        error_reason=outcome.error_reason,
        error=outcome.error,
        rows=RowCounts(
            outcome.rows_total, outcome.rows_loaded, outcome.rows_duplicate, outcome.rows_rejected
        ),
        rejects=_rejects(conn, outcome.file_id) if outcome.rows_rejected else [],
        effect=effect,
        seconds=0.0,
    )


def _rejects(conn: duckdb.DuckDBPyConnection, file_id: int | None) -> list[RejectGroup]:
    counts = conn.execute(_REJECT_COUNTS, {"f": file_id}).fetchall()
    first: dict[str, list[RejectedLine]] = {reason: [] for reason, _ in counts}
    for reason, line, message, raw in conn.execute(
        _REJECTS_FIRST, {"f": file_id, "n": REJECTS_SHOWN}
    ).fetchall():
        first[reason].append(RejectedLine(int(line), message, raw))
    return [RejectGroup(reason, int(count), first[reason]) for reason, count in counts]


def _effect(
    after: duckdb.DuckDBPyConnection, before: duckdb.DuckDBPyConnection, outcome: FileOutcome
) -> Effect:
    top = (_top(before), _top(after))
    if outcome.status is not FileStatus.LOADED or outcome.kind is None:
        return Effect(0, [], 0, [], *top)
    kind, mine = FileKind(outcome.kind), {"f": outcome.file_id}
    count_sql, first_sql = _TOUCHED[kind]
    touched = int(after.execute(count_sql, mine).fetchall()[0][0])
    ids = [int(r[0]) for r in after.execute(first_sql, {**mine, "n": LISTED}).fetchall()]
    was, now = _user_states(before, ids), _user_states(after, ids)
    users = [UserEffect(user_id, was[user_id], now[user_id]) for user_id in ids]
    if kind is FileKind.USERS:
        return Effect(touched, users, 0, [], *top)
    days_touched = int(after.execute(_DAYS_TOUCHED, mine).fetchall()[0][0])
    keys = [(d, str(t)) for d, t in after.execute(_DAYS_FIRST, {**mine, "n": LISTED}).fetchall()]
    dates = sorted({d for d, _ in keys})
    day_was, day_now = _day_totals(before, dates), _day_totals(after, dates)
    days = [
        DayEffect(d, t, day_was.get((d, t), _NO_DAY), day_now.get((d, t), _NO_DAY)) for d, t in keys
    ]
    return Effect(touched, users, days_touched, days, *top)


def _money(value: Any) -> str:
    return format(Decimal(value).quantize(_CENT), "f")


_NO_DAY = DayTotals(0, "0.00")


def _user_states(conn: duckdb.DuckDBPyConnection, ids: list[int]) -> dict[int, UserState]:
    listed = int_constants(ids)
    totals = {
        int(user): (int(count), amount)
        for user, count, amount in conn.execute(
            f"SELECT user_id, tx_count, total_amount FROM user_totals WHERE user_id IN ({listed})"
        ).fetchall()
    }
    profiles = {
        int(user): (country, signup)
        for user, country, signup in conn.execute(
            f"SELECT user_id, country, signup_date FROM users WHERE user_id IN ({listed})"
        ).fetchall()
    }
    states = {}
    for user in ids:
        count, amount = totals.get(user, (0, 0))
        country, signup = profiles.get(user, (None, None))
        states[user] = UserState(count, _money(amount), country, signup)
    return states


def _day_totals(
    conn: duckdb.DuckDBPyConnection, dates: list[dt.date]
) -> dict[tuple[dt.date, str], DayTotals]:
    return {
        (day, kind): DayTotals(int(count), _money(amount))
        for day, kind, count, amount in conn.execute(_DAY_TOTALS, {"dates": dates}).fetchall()
    }


def _top(conn: duckdb.DuckDBPyConnection) -> list[Ranked]:
    return [Ranked(*map(int, row)) for row in conn.execute(_TOP, {"n": TOP}).fetchall()]


# --- files that load nothing without a transaction ---------------------------------------------


def _seen_before(
    conn: duckdb.DuckDBPyConnection,
    name: str,
    staged: StagedFile,
    found: ledger.Known,
    started: float,
) -> CheckReport:
    file_id, status, _, _ = found
    kind = conn.execute("SELECT kind FROM files WHERE file_id = ?", [file_id]).fetchall()[0][0]
    top = _top(conn)
    return CheckReport(
        name=name,
        sha256=staged.sha256,
        size_bytes=staged.size,
        outcome="seen_before",
        kind=kind,
        error_reason=None,
        error=f"the ledger has these bytes already: file #{file_id}, {status}; nothing would "
        "change",
        rows=RowCounts(0, 0, 0, 0),
        rejects=[],
        effect=Effect(0, [], 0, [], top, top),
        seconds=round(time.perf_counter() - started, 6),
        file_id=file_id,
    )


def _unread(name: str, size: int, refused: FileRefused, started: float) -> CheckReport:
    return CheckReport(
        name=name,
        sha256=None,
        size_bytes=size,
        outcome="would_fail",
        kind=None,
        error_reason=str(refused.reason),
        error=refused.message,
        rows=RowCounts(0, 0, 0, 0),
        rejects=[],
        effect=Effect(0, [], 0, [], [], []),
        seconds=round(time.perf_counter() - started, 6),
    )


# --- for people ------------------------------------------------------------------------------


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A report (as JSON gives it: the daemon's answer, or ``msgspec.to_builtins``) in words."""
    rows, effect = report["rows"], report["effect"]
    lines = [f"{report['name']} ({report['kind'] or 'unknown kind'}): {report['outcome']}"]
    if report["error"]:
        lines.append(f"  {report['error_reason'] or 'note'}: {report['error']}")
    if rows["total"]:
        lines.append(
            f"  rows {rows['total']}: loaded {rows['loaded']}, duplicate {rows['duplicate']}, "
            f"rejected {rows['rejected']}"
        )
    for group in report["rejects"]:
        lines.append(f"  {group['reason']}: {group['count']}")
        lines += [f"    line {r['line']}: {r['message']}" for r in group["first"]]
    if report["outcome"] != "would_load":
        return lines
    if report["kind"] == FileKind.USERS:
        lines.append(f"  profiles written: {effect['users_touched']}")
        lines += [
            f"    user {u['user_id']}: {_profile(u['before'])} -> {_profile(u['after'])}"
            for u in effect["users"]
        ]
        return lines
    lines.append(f"  users touched: {effect['users_touched']}")
    lines += [
        f"    user {u['user_id']}: {_totals(u['before'])} -> {_totals(u['after'])}"
        for u in effect["users"]
    ]
    lines.append(f"  days touched (day and type): {effect['days_touched']}")
    lines += [
        f"    {d['transaction_date']} {d['transaction_type']}: {_totals(d['before'])} -> "
        f"{_totals(d['after'])}"
        for d in effect["days"]
    ]
    if effect["top_users_before"] != effect["top_users_after"]:
        lines.append("  top users after: " + _ranks(effect["top_users_after"]))
    return lines


def _totals(state: dict[str, Any]) -> str:
    return f"{state['tx_count']} tx, {state['total_amount']}"


def _profile(state: dict[str, Any]) -> str:
    if state["signup_date"] is None:
        return "no profile"
    return f"{state['country']} since {state['signup_date']}"


def _ranks(ranked: list[dict[str, Any]]) -> str:
    return ", ".join(f"#{r['rank']} user {r['user_id']} ({r['tx_count']})" for r in ranked)
