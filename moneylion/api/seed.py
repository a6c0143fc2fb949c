"""The take-home's ``/api/*`` endpoints: same paths, parameters, field names and error bodies.

Semantics kept from the seed (which started every user query from ``users``):

* a user in ``users`` with no transactions gets a summary of zeros (the seed's LEFT JOIN);
* a user id that has transactions but no profile in ``users`` (an orphan) is ``404 User not
  found``, as in the seed; ``/v1/users/{id}/summary`` does serve orphans (country null);
* ``/api/top_users`` likewise lists only users in ``users`` (the seed joined them), ten of them,
  most transactions first, ties by smaller user_id.

Parameters are validated by Litestar against the documented schema (``user_id``: 1-18 digits,
nothing else; ``date``: a real ``YYYY-MM-DD`` day) and any failure is answered in the seed's
words and shape (``{"error": "user_id is required"}``, ...), never a 500. Amounts are JSON
numbers rounded to cents. Top users, a day's totals and the last file's age are served from
``cache.SnapshotCache`` until the next commit.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Annotated, Any, overload

from litestar import Request, Response, Router, get
from litestar.datastructures import State
from litestar.exceptions import HTTPException, ValidationException
from litestar.params import QueryParameter

from moneylion import health, logs
from moneylion.api.errors import SeedApiError, seed_spec
from moneylion.api.models import (
    SeedDailyTotal,
    SeedError,
    SeedHealth,
    SeedLogCounts,
    SeedTopUser,
    SeedUserSummary,
    seed_number,
    type_totals,
)
from moneylion.api.queries import Span, daily_totals, ranked_users, top_of
from moneylion.api.warehouse import ApiContext, WarehouseUnavailable

log = logging.getLogger(__name__)

SEED_TOP_USERS = 10
# Digits only: a lenient int parse would take "1e3" or " 12" (DuckDB and msgspec both do).
# 18 digits always fit a BIGINT.
USER_ID_PATTERN = r"^[0-9]{1,18}$"

# (message when missing or empty, message when malformed) per query parameter, in the seed's words.
PARAMETER_ERRORS = {
    "user_id": ("user_id is required", "user_id must be a positive integer"),
    "date": ("Missing required query parameter: date", "Invalid date (expected YYYY-MM-DD): {raw}"),
}


def context(state: State) -> ApiContext:
    ctx: ApiContext = state.moneylion
    return ctx


def seed_error_response(request: Request[Any, Any, Any], exc: Exception) -> Response[SeedError]:
    """Any error on an /api route as the seed's ``{"error": message}``."""
    if isinstance(exc, ValidationException):
        return Response(SeedError(_parameter_error(request, exc)), status_code=400)
    if isinstance(exc, SeedApiError):
        return Response(SeedError(exc.message), status_code=exc.status)
    if isinstance(exc, WarehouseUnavailable):
        return Response(SeedError(str(exc)), status_code=503)
    if isinstance(exc, HTTPException):
        return Response(SeedError(exc.detail), status_code=exc.status_code)
    return Response(SeedError("Internal Server Error"), status_code=500)


def _parameter_error(request: Request[Any, Any, Any], exc: ValidationException) -> str:
    # Each seed route takes one query parameter, so the route says which one was wrong.
    parameters = request.route_handler.parsed_fn_signature.parameters
    for key, (missing, malformed) in PARAMETER_ERRORS.items():
        if key in parameters:
            raw = request.query_params.get(key)
            return missing if raw is None or not raw.strip() else malformed.format(raw=raw)
    return exc.detail


@get(
    "/user_transaction_summary",
    responses={
        400: seed_spec("user_id missing or not a positive integer"),
        404: seed_spec("User not found"),
    },
)
async def user_transaction_summary(
    state: State,
    user_id: Annotated[
        str, QueryParameter(pattern=USER_ID_PATTERN, description="digits only (up to 18)")
    ],
) -> list[SeedUserSummary]:
    """Totals of one user's transactions (zeros if the user has none)."""
    found = await context(state).user_summary(int(user_id))
    if found is None or not found.known:
        raise SeedApiError(404, "User not found")
    return [
        SeedUserSummary(
            user_id=found.user_id,
            country=found.country,
            total_transaction_amount=seed_number(found.total_amount),
            **type_totals(found, seed_number),
        )
    ]


@get("/top_users")
async def top_users(state: State) -> list[SeedTopUser]:
    """The ten users with most transactions (ties: smaller user_id first)."""
    ctx = context(state)
    ranked = await ctx.cached(ranked_users)
    return [
        SeedTopUser(u.user_id, u.country, u.tx_count)
        for u in top_of(ranked, SEED_TOP_USERS, known_only=True)
    ]


@get(
    "/daily_transactions",
    responses={
        400: seed_spec("date missing or not a YYYY-MM-DD date"),
        404: seed_spec("No transactions on that date"),
    },
)
async def daily_transactions(
    state: State, date: Annotated[dt.date, QueryParameter(description="YYYY-MM-DD")]
) -> list[SeedDailyTotal]:
    """Per-type totals of one day, ordered by type."""
    ctx = context(state)
    rows = await ctx.cached(daily_totals, Span(date, date), None)
    if not rows:
        raise SeedApiError(404, f"No transactions found for date: {date.isoformat()}")
    return [
        SeedDailyTotal(
            r.transaction_date.isoformat(), r.transaction_type, seed_number(r.total_amount)
        )
        for r in rows
    ]


@get("/health")
async def api_health(state: State) -> SeedHealth:
    """Host, process and inbox readings; never waits (CPU usage is since the previous call)."""
    ctx = context(state)
    last = None
    if ctx.db is not None:
        try:
            last = await ctx.cached(health.last_file_finished)
        except Exception as exc:  # host readings are still worth answering with
            log.warning("health_ledger_unreadable", extra={"fields": {"error": str(exc)}})
    reading = health.read_health(ctx.config, last, ctx.view.backlog())
    stream = ctx.view.stream()
    measured = dataclasses.asdict(reading)
    shown = {name: measured[name] for name in SeedHealth.__struct_fields__ if name in measured}
    shown["uptime_seconds"] = _rounded(reading.uptime_seconds)
    shown["seconds_since_last_file"] = _rounded(reading.seconds_since_last_file)
    if stream is not None:
        shown["last_batch_files"] = stream.last_batch_files
        shown["last_batch_rows"] = stream.last_batch_rows
        shown["files_per_second"] = _rounded(stream.files_per_second)
        shown["rows_per_second"] = _rounded(stream.rows_per_second)
    return SeedHealth(**shown)


@overload
def _rounded(seconds: float) -> float: ...
@overload
def _rounded(seconds: float | None) -> float | None: ...
def _rounded(seconds: float | None) -> float | None:
    """Seconds and rates to the millisecond (None stays None)."""
    return None if seconds is None else round(seconds, 3)


@get("/log_monitor", sync_to_thread=True)
def log_monitor(state: State) -> SeedLogCounts:
    """Records per level in the retained JSON log files (parsed levels, not substrings)."""
    counts = logs.level_counts(context(state).config)
    fields = SeedLogCounts.__struct_fields__  # <level>_count
    return SeedLogCounts(**{f: counts[f.removesuffix("_count").upper()] for f in fields})


seed_router = Router(
    path="/api",
    route_handlers=[
        user_transaction_summary,
        top_users,
        daily_transactions,
        api_health,
        log_monitor,
    ],
    # Handlers are looked up by the exception's MRO over all layers merged, so every class the
    # app maps to problem details (HTTPException, ...) is mapped again here to the seed's shape.
    exception_handlers=dict.fromkeys(
        (HTTPException, WarehouseUnavailable, SeedApiError, Exception), seed_error_response
    ),
    tags=["seed-compatible"],
)
