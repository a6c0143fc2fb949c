"""The dashboard at ``/``: server-rendered HTML (Jinja) that refreshes its sections with htmx.

Each section (``templates/sections/``) holds its heading and form, and a live part: a partial
(``/partials/<name>``, ``templates/partials/``) that the page includes once and then polls
(``hx-trigger="every 2s"``, swapping itself), so a refresh never replaces a form being used.
Every view is a URL: the page's query parameters (``from``, ``to``, ``top``, ``files``,
``user_id``) are carried into the forms and the polling URLs, and a file's page is
``/files/{id}`` (``offset``: its rejects 50 a page). The figures come from the same query
functions as the JSON API (``queries.py``), through the same commit-keyed cache, so a page costs
no DuckDB statement while nothing commits. htmx is vendored in ``static/``.

What changes data goes through the JSON API, from ``static/dashboard.js`` (same-origin
``fetch()``: the session cookie with the browser's Origin): a file's page offers the correction
its status allows (retract, restore, release; a dialog asks why), and the upload form's "Check
first" sends the chosen file to ``POST /v1/checks`` and shows what ingesting it would do."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from litestar import Request, Response, Router, get, post
from litestar.datastructures import CacheControlHeader, Cookie, ResponseHeader, State
from litestar.exceptions import NotFoundException
from litestar.params import PathParameter, QueryParameter
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from markupsafe import Markup

from moneylion import health
from moneylion.api.access import (
    PAGE_POLICY,
    SESSION_COOKIE,
    Access,
    client_address,
    token_matches,
    too_many_failures,
)
from moneylion.api.charts import SERIES, daily_chart, daily_table_rows, series_of
from moneylion.api.models import money
from moneylion.api.queries import (
    Span,
    daily_range,
    daily_totals,
    failed_files_by_reason,
    file_detail,
    latest_files,
    ranked_users,
    rejects_by_reason,
    rejects_page,
    top_of,
)
from moneylion.api.uploads import receive_upload
from moneylion.api.v1 import file_corrections
from moneylion.api.warehouse import ApiContext
from moneylion.ledger import FileStatus

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
REFRESH_SECONDS = 2
DEFAULT_DAYS = 31  # the chart's range when none is chosen: the last month with data
MAX_DAYS = 366  # a longer range is cut to its last MAX_DAYS days
FILES_SHOWN = (10, 20, 50, 100)
TOP_SHOWN = (5, 10, 20, 50)
REJECTS_PAGE = 50
ONE_DAY = dt.timedelta(days=1)
LOGIN_BODY_MAX_BYTES = 4096  # the login form: a token, a path to go back to
LOGIN_FIELDS_MAX = 8
Text = Annotated[str | None, QueryParameter(required=False)]


@dataclass(frozen=True)
class Correction:
    """A correction a file's page offers: its route's last segment, its button, what it does."""

    action: str
    label: str
    reason_required: bool
    explains: str


# The correction a file's status allows (corrections.py's Actions, release.py).
CORRECTIONS = {
    FileStatus.LOADED: Correction(
        "retract",
        "Retract",
        True,
        "Take the file's rows out of every figure, as if it had never arrived: rows of later "
        "files it held back take their place. The ledger keeps the file, retracted, with your "
        "reason; it can be restored.",
    ),
    FileStatus.RETRACTED: Correction(
        "restore",
        "Restore",
        False,
        "Put the file back in its place in the order: its rows come back, and later rows that "
        "conflict with them are refused again.",
    ),
    FileStatus.HELD: Correction(
        "release",
        "Release",
        False,
        "Load the held file now, as the latest file: its good rows load, the rows refused stay "
        "rejects.",
    ),
}


def context(state: State) -> ApiContext:
    ctx: ApiContext = state.moneylion
    return ctx


def _digits(raw: str | None, most: int = 18) -> bool:
    """At most ``most`` ASCII digits (``str.isdigit`` also takes '²', which ``int`` refuses)."""
    return raw is not None and 0 < len(raw) <= most and raw.isascii() and raw.isdigit()


def _choice(raw: str | None, allowed: tuple[int, ...], default: int) -> int:
    return int(raw) if raw is not None and _digits(raw, 4) and int(raw) in allowed else default


def _date(raw: str | None) -> dt.date | None:
    try:
        return dt.date.fromisoformat(raw) if raw else None
    except ValueError:
        return None


class View:
    """The page's parameters as given (kept for the URLs) and as used."""

    def __init__(self, params: Mapping[str, str]) -> None:
        self.params = {k: v for k, v in params.items() if v}
        self.files = _choice(params.get("files"), FILES_SHOWN, 20)
        self.top = _choice(params.get("top"), TOP_SHOWN, 10)
        self.user_id = (params.get("user_id") or "").strip()

    def url(self, path: str, **changes: str | None) -> str:
        merged = {**self.params, **changes}
        query = urlencode({k: v for k, v in merged.items() if v})
        return f"{path}?{query}" if query else path


# --- what each section shows -------------------------------------------------------------------


async def state_section(ctx: ApiContext, view: View) -> dict[str, Any]:
    last = None
    if ctx.db is not None:
        last = await ctx.cached(health.last_file_finished)
    reading = health.read_health(ctx.config, last, ctx.view.backlog())
    stream = ctx.view.stream()
    committed = ctx.view.committed_file_id()
    exported = ctx.replica.exported_file_id() if ctx.replica is not None else None
    lag = None if committed is None or exported is None else max(committed - exported, 0)
    held = await ctx.cached(health.held_files) if ctx.db is not None else 0
    return {
        "ready": ctx.ready(),
        "held_files": held,
        "reading": reading,
        "stream": stream,
        "sqlite_export": ctx.config.sqlite_export,
        "exported": exported,
        "committed": committed,
        "export_lag": lag,
    }


async def files_section(ctx: ApiContext, view: View) -> dict[str, Any]:
    limit = view.files
    rows = await ctx.cached(latest_files, limit)
    return {"files": rows, "files_limit": limit}


async def reasons_section(ctx: ApiContext, view: View) -> dict[str, Any]:
    rejects = await ctx.cached(rejects_by_reason)
    failed = await ctx.cached(failed_files_by_reason)
    return {"rejects_by_reason": rejects, "failed_by_reason": failed}


async def daily_section(ctx: ApiContext, view: View) -> dict[str, Any]:
    params = view.params
    notes = []
    bounds = await ctx.cached(daily_range)
    latest = bounds[1] if bounds is not None else dt.datetime.now(dt.UTC).date()
    last = _date(params.get("to"))
    first = _date(params.get("from"))
    if params.get("to") and last is None:
        notes.append(f"'to' is not a YYYY-MM-DD date: {params['to']}")
    if params.get("from") and first is None:
        notes.append(f"'from' is not a YYYY-MM-DD date: {params['from']}")
    last = last or latest
    first = first or _days_before(last, DEFAULT_DAYS - 1)
    if first > last:
        notes.append("'from' is after 'to': the range is empty")
    elif (last - first).days + 1 > MAX_DAYS:
        first = _days_before(last, MAX_DAYS - 1)
        notes.append(f"ranges are at most {MAX_DAYS} days: showing {first} to {last}")
    built = await ctx.cache.get(("dashboard_daily", first, last), lambda: _daily(ctx, first, last))
    return {
        "date_from": first,
        "date_to": last,
        "data_range": bounds,
        "daily_notes": notes,
        **built,
    }


def _days_before(day: dt.date, days: int) -> dt.date:
    try:
        return day - dt.timedelta(days)
    except OverflowError:  # before year 1
        return dt.date.min


def _daily(ctx: ApiContext, first: dt.date, last: dt.date) -> dict[str, Any]:
    """The range's rows, sums and chart: built once per commit (in a worker thread)."""
    rows = ctx.run(lambda c: daily_totals(c, Span(first, last))) if first <= last else []
    series = (
        series_of(rows, first, last) if first <= last else series_of([], first, first - ONE_DAY)
    )
    return {
        "daily_count": len(rows),
        "daily_table": Markup(daily_table_rows(rows)),  # noqa: S704 - escaped in charts.py
        "daily_sums": {k: money(sum(v, Decimal(0))) for k, v in series.totals.items()},
        "series": SERIES,
        "chart": Markup(daily_chart(series)),  # noqa: S704 - built from escaped, numeric parts
    }


async def top_section(ctx: ApiContext, view: View) -> dict[str, Any]:
    limit = view.top
    ranked = await ctx.cached(ranked_users)
    return {"top": top_of(ranked, limit), "top_limit": limit}


async def user_section(ctx: ApiContext, view: View) -> dict[str, Any]:
    raw = view.user_id
    if not raw:
        return {"user_query": "", "user": None, "user_error": None}
    if not (_digits(raw) and int(raw) > 0):
        return {"user_query": raw, "user": None, "user_error": "a user id is a positive integer"}
    found = await ctx.user_summary(int(raw))
    error = None if found is not None else f"no user {raw} (no profile and no transactions)"
    return {"user_query": raw, "user": found, "user_error": error}


Section = Callable[[ApiContext, View], Awaitable[dict[str, Any]]]

# Each section's live part, by the name its partial is served under (partials/<name>.html).
SECTIONS: dict[str, Section] = {
    "state": state_section,
    "files": files_section,
    "reasons": reasons_section,
    "daily": daily_section,
    "top": top_section,
    "user": user_section,
}


def _base(ctx: ApiContext, view: View) -> dict[str, Any]:
    return {
        "view": view,
        "refresh": REFRESH_SECONDS,
        "auth": bool(ctx.config.api_token),
        "money": money,
        "files_choices": FILES_SHOWN,
        "top_choices": TOP_SHOWN,
    }


# --- routes ----------------------------------------------------------------------------------


@get("/", include_in_schema=False)
async def dashboard_page(request: Request[Any, Any, Any], state: State) -> Template:
    """The whole dashboard, each section as its partial renders it."""
    ctx = context(state)
    view = _view(request)
    page = _base(ctx, view)
    for section in SECTIONS.values():
        page.update(await section(ctx, view))
    return Template(template_name="dashboard.html", context=page)


def _view(request: Request[Any, Any, Any]) -> View:
    return View({k: request.query_params.get(k, "") for k in request.query_params})


@get("/partials/{part:str}", include_in_schema=False)
async def partial(
    request: Request[Any, Any, Any], state: State, part: Annotated[str, PathParameter()]
) -> Template:
    """One section's live part, polled by the page."""
    section = SECTIONS.get(part)
    if section is None:
        raise NotFoundException(f"no section {part!r}")
    ctx, view = context(state), _view(request)
    page = {**_base(ctx, view), **await section(ctx, view)}
    return Template(template_name=f"partials/{part}.html", context=page)


@get("/files/{file_id:int}", include_in_schema=False)
async def file_page(
    request: Request[Any, Any, Any],
    state: State,
    file_id: Annotated[int, PathParameter()],
    offset: Text = None,
) -> Template:
    """One file: its ledger row, its reason if refused, its rejected rows (paged)."""
    ctx, view = context(state), _view(request)
    start = int(offset) if offset is not None and _digits(offset, 15) else 0
    found = await ctx.cached(file_detail, file_id)
    rejects = await ctx.cached(rejects_page, file_id, REJECTS_PAGE, start)
    row = found[0] if found else None
    first = (row["part_of"] or file_id) if row else file_id  # corrections act on the first part
    fixes = await ctx.cached(file_corrections, first) if row else []
    page = _base(ctx, view)
    page.update(
        {
            "file_id": file_id,
            "file": row,
            "first_id": first,
            "corrections": fixes,
            # The correction that gave the file its status (the last one acting on it).
            "since": next((c for c in reversed(fixes) if c.file_id == first), None),
            "correction": CORRECTIONS.get(row["status"]) if row and row["kind"] else None,
            "reasons": found[1] if found else {},
            "rejects_total": rejects[0] if rejects else 0,
            "rejects": rejects[1] if rejects else [],
            "offset": start,
            "page_size": REJECTS_PAGE,
        }
    )
    return Template(template_name="file.html", context=page, status_code=200 if found else 404)


@post("/upload", include_in_schema=False, request_max_body_size=None, status_code=200)
async def upload_form(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    """The dashboard's upload form: the same path as ``POST /v1/files``; htmx gets a partial,
    a plain form post goes back to the dashboard."""
    ctx = context(state)
    upload = await receive_upload(request, ctx)
    if request.headers.get("hx-request") != "true":
        return Redirect("/", status_code=303)
    page = {**_base(ctx, _view(request)), "upload": upload}
    return Template(template_name="partials/uploaded.html", context=page)


@get("/login", include_in_schema=False)
async def login_form(state: State, next: Text = None) -> Response[Any]:
    if _access(state) is None:
        return Redirect("/", status_code=303)
    return Template(template_name="login.html", context={"next": _local(next), "error": None})


@post(
    "/login",
    include_in_schema=False,
    status_code=303,
    request_max_body_size=LOGIN_BODY_MAX_BYTES,  # larger: 413 before anything is parsed
)
async def login(request: Request[Any, Any, Any], state: State) -> Response[Any]:
    """Check the token; set a session cookie (HttpOnly, SameSite=Strict, Max-Age) and go on.
    Failed attempts count towards ``auth_failures_per_minute``: past it, 429."""
    access = _access(state)
    if access is None:
        return Redirect("/", status_code=303)
    form = _login_form(await request.body())
    target = _local(form.get("next"))
    if not token_matches(form.get("token", ""), access.token):
        retry = access.failures.refuse(client_address(request.scope))
        log.info(
            "login_refused",
            extra={"fields": {"client": client_address(request.scope), "limited": bool(retry)}},
        )
        return Template(
            template_name="login.html",
            context={
                "next": target,
                "error": "That is not the token." if retry is None else too_many_failures(retry),
            },
            status_code=401 if retry is None else 429,
            headers={"retry-after": str(retry)} if retry is not None else None,
        )
    return Redirect(
        target,
        status_code=303,
        cookies=[
            Cookie(
                key=SESSION_COOKIE,
                value=access.sessions.issue(),
                max_age=access.sessions.max_age_seconds,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",  # behind a TLS proxy passing the scheme
                path="/",
            )
        ],
    )


@post("/logout", include_in_schema=False, status_code=303)
async def logout(request: Request[Any, Any, Any], state: State) -> Redirect:
    """End the session server-side (its cookie no longer works, even if kept) and drop it."""
    access = _access(state)
    value = request.cookies.get(SESSION_COOKIE)
    if access is not None and value:
        access.sessions.revoke(value)
    return Redirect(
        "/login",
        status_code=303,
        cookies=[Cookie(key=SESSION_COOKIE, value="", max_age=0, path="/")],
    )


def _access(state: State) -> Access | None:
    access: Access | None = state.get("access")
    return access


def _login_form(body: bytes) -> dict[str, str]:
    """The login form's fields (the first value of each); a malformed body has none."""
    try:
        pairs = parse_qsl(body.decode("utf-8", "replace"), max_num_fields=LOGIN_FIELDS_MAX)
    except ValueError:
        return {}
    form: dict[str, str] = {}
    for key, value in pairs:
        form.setdefault(key, value)
    return form


def _local(target: str | None) -> str:
    """Only a path on this site (``/...``, not ``//host``) is followed after the login."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


static_router = create_static_files_router(
    path="/static",
    directories=[STATIC_DIR],
    include_in_schema=False,
    cache_control=CacheControlHeader(max_age=300),
)

# Everything the pages use comes from here; no inline script or style (htmx is told not to add its
# indicator styles in base.html), so nothing injected into a page could run.
SECURITY_HEADERS = [
    ResponseHeader(name="content-security-policy", value=PAGE_POLICY),
    ResponseHeader(name="x-content-type-options", value="nosniff"),
    ResponseHeader(name="referrer-policy", value="same-origin"),
    ResponseHeader(name="cache-control", value="no-store"),
]

dashboard_router = Router(
    path="/",
    response_headers=SECURITY_HEADERS,
    route_handlers=[
        dashboard_page,
        partial,
        file_page,
        upload_form,
        login_form,
        login,
        logout,
    ],
)
