"""The take-home's ``/api/*`` endpoints: same paths, parameters, field names and error bodies.

Semantics kept from the seed (which started every user query from ``users``):

* a user in ``users`` with no transactions gets a summary of zeros (the seed's LEFT JOIN);
* a user id that has transactions but no profile in ``users`` (an orphan) is ``404 User not
  found``, as in the seed; ``/v1/users/{id}/summary`` does serve orphans (country null);
* ``/api/top_users`` likewise lists only users in ``users`` (the seed joined them), ten of them,
  most transactions first, ties by smaller user_id.

Malformed parameters are a seed-style 400 (``{"error": ...}``), never a 500. Amounts are JSON
numbers rounded to cents.
"""

from __future__ import annotations

import datetime as dt
import re

from litestar import Router, get
from litestar.datastructures import State
from litestar.params import FromQuery

from moneylion import health, logs
from moneylion.api.errors import SEED_EXCEPTION_HANDLERS, SeedApiError, seed_spec
from moneylion.api.models import (
    SeedDailyTotal,
    SeedHealth,
    SeedLogCounts,
    SeedTopUser,
    SeedUserSummary,
    seed_number,
)
from moneylion.api.queries import daily_totals, user_summary
from moneylion.api.warehouse import ApiContext

SEED_TOP_USERS = 10
MAX_BIGINT = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")
_ISO_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def context(state: State) -> ApiContext:
    ctx: ApiContext = state.moneylion
    return ctx


def parse_user_id(raw: str | None) -> int:
    """The seed's user_id check, made strict: required, digits only, within BIGINT."""
    if raw is None or not raw.strip():
        raise SeedApiError(400, "user_id is required")
    text = raw.strip()
    if not _DIGITS.fullmatch(text) or int(text) > MAX_BIGINT:
        raise SeedApiError(400, "user_id must be a positive integer")
    return int(text)


def parse_date(raw: str | None) -> dt.date:
    """A real calendar date written YYYY-MM-DD."""
    if raw is None or not raw.strip():
        raise SeedApiError(400, "Missing required query parameter: date")
    text = raw.strip()
    try:
        if not _ISO_DATE.fullmatch(text):
            raise ValueError(text)
        return dt.date.fromisoformat(text)
    except ValueError:
        raise SeedApiError(400, f"Invalid date: {text!r} (expected YYYY-MM-DD)") from None


@get(
    "/user_transaction_summary",
    sync_to_thread=True,
    responses={
        400: seed_spec("user_id missing or not a positive integer"),
        404: seed_spec("User not found"),
    },
)
def user_transaction_summary(
    state: State, user_id: FromQuery[str | None] = None
) -> list[SeedUserSummary]:
    """Totals of one user's transactions (zeros if the user has none)."""
    uid = parse_user_id(user_id)
    with context(state).cursor() as cursor:
        found = user_summary(cursor, uid)
    if found is None or not found.known:
        raise SeedApiError(404, "User not found")
    return [
        SeedUserSummary(
            user_id=found.user_id,
            country=found.country,
            total_transaction_amount=seed_number(found.total_amount),
            total_deposit=seed_number(found.total_deposit),
            total_withdrawal=seed_number(found.total_withdrawal),
            total_purchase=seed_number(found.total_purchase),
        )
    ]


@get("/top_users", sync_to_thread=True)
def top_users(state: State) -> list[SeedTopUser]:
    """The ten users with most transactions (ties: smaller user_id first)."""
    ctx = context(state)
    with ctx.cursor() as cursor:
        ranked = ctx.top_users.top(cursor, SEED_TOP_USERS, known_only=True)
    return [SeedTopUser(u.user_id, u.country, u.tx_count) for u in ranked]


@get(
    "/daily_transactions",
    sync_to_thread=True,
    responses={
        400: seed_spec("date missing or not a YYYY-MM-DD date"),
        404: seed_spec("No transactions on that date"),
    },
)
def daily_transactions(state: State, date: FromQuery[str | None] = None) -> list[SeedDailyTotal]:
    """Per-type totals of one day, ordered by type."""
    day = parse_date(date)
    with context(state).cursor() as cursor:
        rows = daily_totals(cursor, day, day)
    if not rows:
        raise SeedApiError(404, f"No transactions found for date: {date.strip() if date else day}")
    return [
        SeedDailyTotal(
            r.transaction_date.isoformat(), r.transaction_type, seed_number(r.total_amount)
        )
        for r in rows
    ]


@get("/health", sync_to_thread=True)
def api_health(state: State) -> SeedHealth:
    """Host, process and inbox readings; never waits (CPU usage is since the previous call)."""
    ctx = context(state)
    if ctx.db is not None:
        with ctx.cursor() as cursor:
            reading = health.read_health(ctx.config, cursor)
    else:
        reading = health.read_health(ctx.config, None)
    return SeedHealth(
        cpu_usage=reading.cpu_usage_percent,
        num_cores=reading.num_cores,
        memory_usage=reading.memory_usage_percent,
        disk_usage=reading.disk_usage_percent,
        process_rss_bytes=reading.process_rss_bytes,
        uptime_seconds=round(reading.uptime_seconds, 3),
        inbox_backlog=reading.inbox_backlog,
        seconds_since_last_file=(
            round(reading.seconds_since_last_file, 3)
            if reading.seconds_since_last_file is not None
            else None
        ),
    )


@get("/log_monitor", sync_to_thread=True)
def log_monitor(state: State) -> SeedLogCounts:
    """Records per level in the retained JSON log files (parsed levels, not substrings)."""
    counts = logs.level_counts(context(state).config)
    return SeedLogCounts(
        info_count=counts["INFO"],
        warning_count=counts["WARNING"],
        error_count=counts["ERROR"],
        critical_count=counts["CRITICAL"],
    )


seed_router = Router(
    path="/api",
    route_handlers=[
        user_transaction_summary,
        top_users,
        daily_transactions,
        api_health,
        log_monitor,
    ],
    exception_handlers=SEED_EXCEPTION_HANDLERS,
    tags=["seed-compatible"],
)
