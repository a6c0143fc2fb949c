"""The versioned API: exact decimal strings for money, problem details for every error.

* ``/v1/users/{id}/summary`` serves any user with a profile or with transactions: an orphan
  (transactions, no profile yet) has ``known_user: false`` and ``country: null``; a profile
  without transactions has zero totals. Neither -> 404.
* ``/v1/users/top`` ranks everyone with transactions, orphans included (country null).
* ``/v1/daily`` lists per-day, per-type totals in an inclusive date range (``from`` after
  ``to`` is an empty range, not an error).
* ``/v1/countries/monthly`` lists per-month, per-country totals (the user's current country;
  orphans under ``country: null``) in an inclusive range of ``YYYY-MM`` months.
* Both answer one page (``limit``, ``offset``) and the URL of the next (``next``, null on the
  last): a range of any width is read page by page, never in one unbounded answer.
* ``/v1/files`` pages the ledger; ``/v1/files/{id}/rejects`` pages a file's rejected rows (a
  page also ends when its bytes pass a bound: follow ``next``).

Ids in paths are 1-18 digits (anything else is a 400): every such id fits a BIGINT, and a
digit pattern survives JSON-schema tools that would round an integer bound near 2**63.
Ledger timestamps are UTC (``...Z``).
"""

from __future__ import annotations

import datetime as dt
import logging
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import urlencode

import anyio.to_thread
import duckdb
from litestar import Request, Response, Router, get, post
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import PathParameter, QueryParameter

from moneylion import health, logs
from moneylion.api.errors import problem, problem_spec
from moneylion.api.models import (
    CountryMonth,
    CountryMonthlyTotals,
    DailyTotal,
    DailyTotals,
    DiskLowAnswer,
    FileCorrection,
    FileDetail,
    FileEntry,
    FilePart,
    FilesPage,
    LakeReplica,
    Liveness,
    LogStats,
    Readiness,
    RejectEntry,
    RejectsPage,
    TopUser,
    TopUsers,
    UploadAnswer,
    UserSummary,
    money,
    type_totals,
)
from moneylion.api.queries import (
    Span,
    country_monthly,
    daily_totals,
    file_detail,
    file_id_of,
    files_page,
    ranked_users,
    rejects_page,
    top_of,
)
from moneylion.api.uploads import receive_upload
from moneylion.api.warehouse import ApiContext
from moneylion.model import TRANSACTION_TYPES, TransactionType
from moneylion.source import free_disk_bytes

log = logging.getLogger(__name__)

# Ids travel as digit strings (1 to 18 digits, so they always fit a BIGINT): an integer bound
# near 2**63 is rounded through a float by JSON-schema tools (9223372036854776000) and broken.
ID_PATTERN = r"^[1-9][0-9]{0,17}$"
MAX_OFFSET = 2**53 - 1  # the largest integer a float (so every JSON tool) keeps exact
MAX_PAGE = 1000
# Pages of the aggregates (rows of /v1/daily, month-and-country rows of /v1/countries/monthly):
# the default keeps a year of daily rows in one page, the maximum keeps an answer to a few MB.
AGGREGATE_PAGE = 1000
AGGREGATE_MAX_PAGE = 10_000
# The widest range /v1/daily accepts when a bound is left out.
EARLIEST = dt.date(1, 1, 1)
LATEST = dt.date(9999, 12, 31)

SHA256_PATTERN = r"^[0-9a-f]{64}$"
Id = Annotated[str, PathParameter(pattern=ID_PATTERN, description="a positive integer")]
Sha256 = Annotated[
    str, PathParameter(pattern=SHA256_PATTERN, description="sha256 of the bytes, lower-case hex")
]
Limit = Annotated[int, QueryParameter(ge=1, le=MAX_PAGE, description="page size (1-1000)")]
Offset = Annotated[int, QueryParameter(ge=0, le=MAX_OFFSET, description="rows to skip")]
AggregateLimit = Annotated[
    int,
    QueryParameter(
        ge=1,
        le=AGGREGATE_MAX_PAGE,
        description=f"page size (1-{AGGREGATE_MAX_PAGE}); follow `next` for the rest",
    ),
]
# YYYY-MM from 0001-01 (a date's range) to 9999-12.
MONTH_PATTERN = r"^(000[1-9]|00[1-9][0-9]|0[1-9][0-9]{2}|[1-9][0-9]{3})-(0[1-9]|1[0-2])$"

_BAD_REQUEST = problem_spec("A parameter is missing or malformed")
_NOT_FOUND = problem_spec("Not found")


def utc(row: dict[str, Any]) -> dict[str, Any]:
    """The ledger stores naive UTC timestamps; say so in the JSON (``...Z``)."""
    for key in ("received_at", "finished_at"):
        if isinstance(row.get(key), dt.datetime) and row[key].tzinfo is None:
            row[key] = row[key].replace(tzinfo=dt.UTC)
    return row


def _per_type(counts: dict[str, int], totals: dict[str, Decimal]) -> dict[str, Any]:
    """``<type>_count`` and ``total_<type>`` of every transaction type."""
    fields: dict[str, Any] = {}
    for kind in TRANSACTION_TYPES:
        fields[f"{kind}_count"] = counts[kind]
        fields[f"total_{kind}"] = money(totals[kind])
    return fields


def next_page(
    path: str, params: dict[str, str | None], limit: int, offset: int, shown: int, more: bool
) -> str | None:
    """The URL of the page after one that showed ``shown`` rows from ``offset`` (None when
    there is no more): the same query, the offset moved on."""
    if not more:
        return None
    query = {key: value for key, value in params.items() if value is not None}
    return f"{path}?{urlencode({**query, 'limit': limit, 'offset': offset + shown})}"


def context(state: State) -> ApiContext:
    ctx: ApiContext = state.moneylion
    return ctx


@get(
    "/users/{user_id:str}/summary",
    responses={400: _BAD_REQUEST, 404: _NOT_FOUND},
)
async def user_summary_v1(state: State, user_id: Id) -> UserSummary:
    """A user's transaction totals (zeros for a profile without transactions)."""
    found = await context(state).user_summary(int(user_id))
    if found is None:
        raise problem(404, f"no user {user_id} (no profile and no transactions)")
    return UserSummary(
        user_id=found.user_id,
        known_user=found.known,
        country=found.country,
        signup_date=found.signup_date,
        transaction_count=found.tx_count,
        total_amount=money(found.total_amount),
        **type_totals(found, money),
        first_transaction_date=found.first_date,
        last_transaction_date=found.last_date,
    )


@get("/users/top", responses={400: _BAD_REQUEST})
async def top_users_v1(
    state: State,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE, description="how many (1-1000)")] = 10,
) -> TopUsers:
    """Users by transaction count, most first (ties: smaller user_id), orphans included.

    At most ``Config.top_users_kept`` users are ranked.
    """
    ctx = context(state)
    ranked = await ctx.cached(ranked_users)
    return TopUsers(
        limit=limit,
        users=[TopUser(u.rank, u.user_id, u.country, u.tx_count) for u in top_of(ranked, limit)],
    )


@get("/daily", responses={400: _BAD_REQUEST})
async def daily_v1(
    state: State,
    date_from: Annotated[
        dt.date | None, QueryParameter(name="from", description="first day (inclusive)")
    ] = None,
    date_to: Annotated[
        dt.date | None, QueryParameter(name="to", description="last day (inclusive)")
    ] = None,
    type_: Annotated[TransactionType | None, QueryParameter(name="type")] = None,
    limit: AggregateLimit = AGGREGATE_PAGE,
    offset: Offset = 0,
) -> DailyTotals:
    """Per-day, per-type totals in [from, to], ordered by date then type, one page of at most
    ``limit`` rows; ``next`` is the URL of the next page (null on the last)."""
    transaction_type = None if type_ is None else type_.value
    first = date_from or EARLIEST
    last = date_to or LATEST
    # from > to is an empty range, hence no days (not an error). One row more than the page
    # says whether another page follows.
    found = await context(state).cached(
        daily_totals, Span(first, last), transaction_type, limit + 1, offset
    )
    rows = found[:limit]
    days = [
        DailyTotal(r.transaction_date, r.transaction_type, r.tx_count, money(r.total_amount))
        for r in rows
    ]
    params = {"from": first.isoformat(), "to": last.isoformat(), "type": transaction_type}
    return DailyTotals(
        date_from=first,
        date_to=last,
        type=transaction_type,
        limit=limit,
        offset=offset,
        next_page=next_page("/v1/daily", params, limit, offset, len(rows), len(found) > limit),
        days=days,
    )


def first_day(month: str) -> dt.date:
    """``YYYY-MM`` (MONTH_PATTERN) -> the month's first day."""
    year, number = month.split("-")
    return dt.date(int(year), int(number), 1)


@get("/countries/monthly", responses={400: _BAD_REQUEST})
async def country_monthly_v1(
    state: State,
    month_from: Annotated[
        str | None,
        QueryParameter(name="from", pattern=MONTH_PATTERN, description="first month, YYYY-MM"),
    ] = None,
    month_to: Annotated[
        str | None,
        QueryParameter(name="to", pattern=MONTH_PATTERN, description="last month, YYYY-MM"),
    ] = None,
    country: Annotated[
        str | None, QueryParameter(min_length=1, max_length=200, description="one country")
    ] = None,
    limit: AggregateLimit = AGGREGATE_PAGE,
    offset: Offset = 0,
) -> CountryMonthlyTotals:
    """Per month and country, count and total per type in [from, to] (months, inclusive),
    ordered by month then country; the country is the user's current one (null: orphans).
    One page of at most ``limit`` rows; ``next`` is the URL of the next page (null on the
    last)."""
    first = first_day(month_from) if month_from else EARLIEST
    last = first_day(month_to) if month_to else LATEST
    found = await context(state).cached(
        country_monthly, Span(first, last), country, limit + 1, offset
    )
    rows = found[:limit]
    months = [
        CountryMonth(
            month=r.month.strftime("%Y-%m"),
            country=r.country,
            transaction_count=sum(r.tx_count.values()),
            total_amount=money(sum(r.total_amount.values(), Decimal(0))),
            **_per_type(r.tx_count, r.total_amount),
        )
        for r in rows
    ]
    params = {"from": month_from, "to": month_to, "country": country}
    more = len(found) > limit
    return CountryMonthlyTotals(
        month_from=month_from,
        month_to=month_to,
        country=country,
        limit=limit,
        offset=offset,
        next_page=next_page("/v1/countries/monthly", params, limit, offset, len(rows), more),
        months=months,
    )


@get("/files", sync_to_thread=True, responses={400: _BAD_REQUEST})
def files_v1(state: State, limit: Limit = 100, offset: Offset = 0) -> FilesPage:
    """The files ledger in arrival order (file_id), one page."""
    with context(state).cursor() as cursor:
        total, rows = files_page(cursor, limit, offset)
    return FilesPage(
        total=total, limit=limit, offset=offset, items=[FileEntry(**utc(row)) for row in rows]
    )


@get("/files/{file_id:str}", sync_to_thread=True, responses={400: _BAD_REQUEST, 404: _NOT_FOUND})
def file_v1(state: State, file_id: Id) -> FileDetail:
    """One ledger row, with its rejected rows counted per reason."""
    with context(state).cursor() as cursor:
        found = file_detail_of(cursor, int(file_id))
    if found is None:
        raise problem(404, f"no file {file_id} in the ledger")
    return found


def file_detail_of(cursor: duckdb.DuckDBPyConnection, file_id: int) -> FileDetail | None:
    found = file_detail(cursor, file_id)
    if found is None:
        return None
    row, reasons = found
    parts = [FilePart(**utc(part)) for part in row.pop("parts")]
    fixes = file_corrections(cursor, row["part_of"] or file_id)
    return FileDetail(**utc(row), rejected_by_reason=reasons, parts=parts, corrections=fixes)


# A correction acts on a file's first part (corrections.find_file); a replace also names the
# file that took the place (by_file_id).
_FILE_CORRECTIONS = """
SELECT change_id, action, file_id, by_file_id, reason, made_at, rows_out, rows_in
FROM corrections WHERE file_id = $id OR by_file_id = $id ORDER BY change_id
"""


def file_corrections(cursor: duckdb.DuckDBPyConnection, file_id: int) -> list[FileCorrection]:
    """The corrections of file ``file_id`` (its first part's id), oldest first."""
    rows = cursor.execute(_FILE_CORRECTIONS, {"id": file_id}).fetchall()
    return [
        FileCorrection(
            change_id=int(change),
            action=action,
            file_id=int(target),
            by_file_id=None if by is None else int(by),
            reason=reason,
            made_at=made_at.replace(tzinfo=dt.UTC),
            rows_out=int(out),
            rows_in=int(into),
        )
        for change, action, target, by, reason, made_at, out, into in rows
    ]


@get(
    "/files/sha256/{sha256:str}",
    sync_to_thread=True,
    responses={400: _BAD_REQUEST, 404: problem_spec("No file with these bytes in the ledger yet")},
)
def file_by_sha256_v1(state: State, sha256: Sha256) -> FileDetail:
    """The ledger row of the file with these bytes: what an upload's ``poll`` URL answers
    (404 while the file waits in the inbox)."""
    with context(state).cursor() as cursor:
        file_id = file_id_of(cursor, sha256)
        found = None if file_id is None else file_detail_of(cursor, file_id)
    if found is None:
        raise problem(404, f"no file with sha256 {sha256} in the ledger (yet)")
    return found


@post(
    "/files",
    request_max_body_size=None,  # receive_upload counts the bytes against max_upload_bytes
    responses={
        200: ResponseSpec(UploadAnswer, description="These bytes are in the ledger already"),
        400: _BAD_REQUEST,
        413: problem_spec("Larger than max_upload_bytes"),
    },
    status_code=202,
)
async def upload_v1(request: Request[Any, Any, Any], state: State) -> Response[UploadAnswer]:
    """Upload a CSV into the inbox: the raw body (``?name=`` names it) or the first file of a
    multipart form. 202 with the sha256 and a URL to poll; it is then ingested like a dropped
    file. Bytes already in the ledger are not written again: 200 with their ledger row."""
    ctx = context(state)
    upload = await receive_upload(request, ctx)
    if upload.known_file_id is not None:
        known = upload.known_file_id
        found = await anyio.to_thread.run_sync(lambda: ctx.run(lambda c: file_detail_of(c, known)))
        poll = f"/v1/files/{known}"
        answer = UploadAnswer("known", upload.sha256, upload.name, upload.size_bytes, poll, found)
        return Response(answer, status_code=200, headers={"location": poll})
    poll = f"/v1/files/sha256/{upload.sha256}"
    answer = UploadAnswer("queued", upload.sha256, upload.name, upload.size_bytes, poll)
    return Response(answer, status_code=202, headers={"location": poll})


@get(
    "/files/{file_id:str}/rejects",
    sync_to_thread=True,
    responses={400: _BAD_REQUEST, 404: _NOT_FOUND},
)
def rejects_v1(state: State, file_id: Id, limit: Limit = 100, offset: Offset = 0) -> RejectsPage:
    """A file's rejected rows in line order, one page: line, reason code, message, raw line
    (its start, if ``raw_line_truncated``). A page ends early when its bytes pass a bound:
    ``next`` is the URL of the next page (null on the last)."""
    with context(state).cursor() as cursor:
        found = rejects_page(cursor, int(file_id), limit, offset)
    if found is None:
        raise problem(404, f"no file {file_id} in the ledger")
    total, rows = found
    more = offset + len(rows) < total
    return RejectsPage(
        file_id=int(file_id),
        total=total,
        limit=limit,
        offset=offset,
        next_page=next_page(
            f"/v1/files/{int(file_id)}/rejects", {}, limit, offset, len(rows), more
        ),
        items=[
            RejectEntry(
                r.line_number,
                r.reason,
                r.message,
                r.raw_line,
                r.raw_line_bytes,
                r.raw_line_truncated,
            )
            for r in rows
        ],
    )


@get("/health/live")
async def live() -> Liveness:
    """The process answers."""
    return Liveness(status="alive")


@get(
    "/health/ready",
    responses={503: problem_spec("The warehouse is not open or the watcher is not running")},
)
async def ready(state: State) -> Readiness:
    """200 once the warehouse is open and answers and the daemon's workers run, else 503.
    ``disk_low`` (else null): files wait in the inbox for room on the warehouse's disk.
    ``held_files``: files held back whole until released (still ready: they wait for a
    person)."""
    ctx = context(state)
    if ctx.db is None:
        raise problem(503, "not ready: the warehouse is not open")
    try:
        held = await anyio.to_thread.run_sync(ctx.run, health.held_files)
    except Exception as exc:
        log.warning("warehouse_unusable", extra={"fields": {"error": str(exc)}})
        raise problem(503, "not ready: the warehouse does not answer") from None
    if not ctx.ready():
        raise problem(503, "not ready: the watcher is not running")
    disk = _disk_low(ctx)
    lag = ctx.lake_lag()
    if lag is None:
        return Readiness(status="ready", warehouse_open=True, disk_low=disk, held_files=held)
    replica = LakeReplica(
        lag.lake_version,
        lag.applied_version,
        lag.versions,
        lag.lake_files,
        lag.applied_files,
        lag.files,
        round(lag.seconds_since_check, 3),
        lag.quarantined_files,
        lag.apply_errors,
        lag.apply_error,
    )
    return Readiness(
        status="ready", warehouse_open=True, lake=replica, disk_low=disk, held_files=held
    )


def _disk_low(ctx: ApiContext) -> DiskLowAnswer | None:
    """The disk condition files wait on (None: none); still ready, reads are answered."""
    stream = ctx.view.stream()
    waiting = stream.files_waiting_for_disk if stream is not None else 0
    free = free_disk_bytes(ctx.config.warehouse)
    floor = ctx.config.min_free_disk_bytes
    if not waiting and free >= floor:
        return None
    return DiskLowAnswer(free_bytes=free, min_free_disk_bytes=floor, files_waiting=waiting)


@get("/logs/stats", sync_to_thread=True)
def log_stats(state: State) -> LogStats:
    """Records per level in the retained JSON log files."""
    counts = logs.level_counts(context(state).config)
    return LogStats(**{field: counts[field.upper()] for field in LogStats.__struct_fields__})


v1_router = Router(
    path="/v1",
    route_handlers=[
        user_summary_v1,
        top_users_v1,
        daily_v1,
        country_monthly_v1,
        files_v1,
        file_by_sha256_v1,
        file_v1,
        upload_v1,
        rejects_v1,
        live,
        ready,
        log_stats,
    ],
    tags=["v1"],
)
