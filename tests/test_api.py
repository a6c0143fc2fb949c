"""The API through Litestar's TestClient, on the seed data ingested with ingest_file.

Expected values come from an independent computation in this file (csv module + Decimal) over
the same CSV files, never from the warehouse.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import duckdb
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from moneylion import logs
from moneylion.aggregates import verify
from moneylion.api import create_app
from moneylion.config import Config
from moneylion.ingest import ingest_file
from moneylion.schema import open_warehouse
from tests.conftest import (
    EXTRA_REJECTS,
    ORPHAN,
    USER_WITHOUT_TRANSACTIONS,
    IngestStandIn,
    Loaded,
    cents,
    money,
    parse_metrics,
)
from tests.expected import Expected


@pytest.fixture(scope="module")
def client(loaded: Loaded) -> Iterator[TestClient[Litestar]]:
    with TestClient(app=create_app(loaded.config, loaded.conn)) as test_client:
        yield test_client


def sample_users(expected: Expected) -> list[int]:
    """Users worth checking: extremes, every 97th user and the special cases."""
    ids = sorted(expected.count)
    return sorted({ids[0], ids[-1], *ids[::97], *[u for u, _ in expected.top(3, known_only=True)]})


# --- /api/user_transaction_summary ------------------------------------------------------------


def test_seed_user_summary_equals_an_independent_sum_to_the_cent(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    exp = loaded.expected
    for user_id in sample_users(exp):
        if user_id not in exp.countries:
            continue
        response = client.get("/api/user_transaction_summary", params={"user_id": user_id})
        assert response.status_code == 200, response.text
        assert response.json() == [
            {
                "user_id": user_id,
                "country": exp.countries[user_id],
                "total_transaction_amount": cents(exp.total[user_id]),
                "total_deposit": cents(exp.by_type[user_id, "deposit"]),
                "total_withdrawal": cents(exp.by_type[user_id, "withdrawal"]),
                "total_purchase": cents(exp.by_type[user_id, "purchase"]),
            }
        ]


def test_seed_user_summary_of_a_profile_without_transactions_is_zeros(
    client: TestClient[Litestar],
) -> None:
    response = client.get(f"/api/user_transaction_summary?user_id={USER_WITHOUT_TRANSACTIONS}")
    assert response.status_code == 200
    assert response.json() == [
        {
            "user_id": USER_WITHOUT_TRANSACTIONS,
            "country": "Norway",
            "total_transaction_amount": 0,
            "total_deposit": 0,
            "total_withdrawal": 0,
            "total_purchase": 0,
        }
    ]


@pytest.mark.parametrize("user_id", [ORPHAN, 987654321, 0])
def test_seed_user_summary_of_an_orphan_or_unknown_user_is_404(
    client: TestClient[Litestar], user_id: int
) -> None:
    response = client.get(f"/api/user_transaction_summary?user_id={user_id}")
    assert response.status_code == 404
    assert response.json() == {"error": "User not found"}


@pytest.mark.parametrize("query", ["", "?user_id=", "?user_id=%20", "?other=3"])
def test_seed_user_summary_without_user_id_is_400(client: TestClient[Litestar], query: str) -> None:
    response = client.get(f"/api/user_transaction_summary{query}")
    assert response.status_code == 400
    assert response.json() == {"error": "user_id is required"}


@pytest.mark.parametrize("raw", ["abc", "-1", "1.5", "1e3", "99999999999999999999", "0x10"])
def test_seed_user_summary_with_malformed_user_id_is_400_not_500(
    client: TestClient[Litestar], raw: str
) -> None:
    response = client.get("/api/user_transaction_summary", params={"user_id": raw})
    assert response.status_code == 400
    assert response.json() == {"error": "user_id must be a positive integer"}


# --- /api/top_users -----------------------------------------------------------------------------


def test_seed_top_users_are_ten_by_count_then_user_id(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    exp = loaded.expected
    response = client.get("/api/top_users")
    assert response.status_code == 200
    assert response.json() == [
        {"user_id": u, "country": exp.countries[u], "transaction_count": n}
        for u, n in exp.top(10, known_only=True)
    ]


# --- /api/daily_transactions --------------------------------------------------------------------


def test_seed_daily_transactions_equal_an_independent_sum_ordered_by_type(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    exp = loaded.expected
    days = sorted({day for day, _ in exp.daily})
    for day in [*days[::17], days[-1], "2023-05-05"]:
        response = client.get("/api/daily_transactions", params={"date": day})
        assert response.status_code == 200
        kinds = sorted(kind for d, kind in exp.daily if d == day)
        assert response.json() == [
            {
                "transaction_date": day,
                "transaction_type": kind,
                "daily_total": cents(exp.daily[day, kind]),
            }
            for kind in kinds
        ]


def test_seed_daily_transactions_for_a_day_without_any_is_404(
    client: TestClient[Litestar],
) -> None:
    response = client.get("/api/daily_transactions?date=1999-01-01")
    assert response.status_code == 404
    assert response.json() == {"error": "No transactions found for date: 1999-01-01"}


@pytest.mark.parametrize("query", ["", "?date=", "?day=2022-01-01"])
def test_seed_daily_transactions_without_date_is_400(
    client: TestClient[Litestar], query: str
) -> None:
    response = client.get(f"/api/daily_transactions{query}")
    assert response.status_code == 400
    assert response.json() == {"error": "Missing required query parameter: date"}


@pytest.mark.parametrize("raw", ["2022-02-30", "2022-13-01", "2022-1-5", "yesterday", "20220105"])
def test_seed_daily_transactions_with_malformed_date_is_400_not_500(
    client: TestClient[Litestar], raw: str
) -> None:
    response = client.get("/api/daily_transactions", params={"date": raw})
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert raw in response.json()["error"]


# --- /api/health and /api/log_monitor -----------------------------------------------------------


def test_seed_health_has_the_seed_fields_and_our_readings(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    body = client.get("/api/health").json()
    assert set(body) == {
        "cpu_usage_%",
        "num_cores",
        "memory_usage_%",
        "disk_usage_%",
        "process_rss_bytes",
        "uptime_seconds",
        "inbox_backlog",
        "inbox_backlog_bytes",
        "seconds_since_last_file",
        "last_batch_files",
        "last_batch_rows",
        "files_per_second",
        "rows_per_second",
    }
    assert 0 <= body["cpu_usage_%"] <= 100 * body["num_cores"]
    assert body["num_cores"] >= 1
    assert 0 < body["memory_usage_%"] <= 100
    assert 0 < body["disk_usage_%"] <= 100
    assert body["process_rss_bytes"] > 10_000_000
    assert body["uptime_seconds"] > 0
    assert body["inbox_backlog"] == 0
    assert 0 <= body["seconds_since_last_file"] < 3600
    (loaded.config.inbox / "waiting.csv").write_text("user_id,signup_date,country\n")
    (loaded.config.inbox / "partial.csv.part").write_text("")
    try:
        assert client.get("/api/health").json()["inbox_backlog"] == 1
    finally:
        (loaded.config.inbox / "waiting.csv").unlink()
        (loaded.config.inbox / "partial.csv.part").unlink()


def test_seed_log_monitor_counts_parsed_levels_including_api_errors(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    console = io.StringIO()
    logs.setup_logging(loaded.config, console=console)
    try:
        before = client.get("/api/log_monitor").json()
        assert set(before) == {"info_count", "warning_count", "error_count", "critical_count"}
        logger = logging.getLogger("tests.api")
        logger.warning("disk_nearly_full", extra={"fields": {"note": "ERROR CRITICAL in text"}})
        logger.error("something_broke")
        client.get("/api/user_transaction_summary?user_id=987654321")  # a 404 is a log event
        after = client.get("/api/log_monitor").json()
        assert after["warning_count"] == before["warning_count"] + 1
        assert after["error_count"] == before["error_count"] + 1
        assert after["critical_count"] == before["critical_count"]
        assert after["info_count"] >= before["info_count"] + 1
        assert "api_client_error" in console.getvalue()
        stats = client.get("/v1/logs/stats").json()
        assert set(stats) == {"debug", "info", "warning", "error", "critical"}
        assert (stats["warning"], stats["error"], stats["critical"]) == (
            after["warning_count"],
            after["error_count"],
            after["critical_count"],
        )
        assert stats["info"] >= after["info_count"]  # the client's own request lines count too
    finally:
        logs.teardown_logging()


# --- /v1 users ------------------------------------------------------------------------------------


def test_v1_user_summary_gives_exact_decimal_strings(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    exp = loaded.expected
    for user_id in sample_users(exp)[:40]:
        body = client.get(f"/v1/users/{user_id}/summary").json()
        assert body["user_id"] == user_id
        assert body["transaction_count"] == exp.count[user_id]
        assert body["total_amount"] == money(exp.total[user_id])
        for kind in ("deposit", "withdrawal", "purchase"):
            assert body[f"total_{kind}"] == money(exp.by_type[user_id, kind])
        assert body["country"] == exp.countries.get(user_id)


def test_v1_user_summary_serves_orphans_with_null_country(client: TestClient[Litestar]) -> None:
    body = client.get(f"/v1/users/{ORPHAN}/summary").json()
    assert body["known_user"] is False
    assert body["country"] is None
    assert body["total_amount"] == "15.15"
    assert body["total_deposit"] == "10.10"
    assert body["total_purchase"] == "5.05"
    assert body["total_withdrawal"] == "0.00"
    assert body["first_transaction_date"] == body["last_transaction_date"] == "2023-05-05"


def test_v1_user_summary_of_a_profile_without_transactions_is_zeros(
    client: TestClient[Litestar],
) -> None:
    body = client.get(f"/v1/users/{USER_WITHOUT_TRANSACTIONS}/summary").json()
    assert body["known_user"] is True
    assert body["country"] == "Norway"
    assert body["transaction_count"] == 0
    assert body["total_amount"] == "0.00"
    assert body["last_transaction_date"] is None


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/users/987654321/summary", 404),
        ("/v1/users/0/summary", 400),
        ("/v1/users/99999999999999999999/summary", 400),
        ("/v1/users/abc/summary", 400),
        ("/v1/users/1e3/summary", 400),
    ],
)
def test_v1_user_summary_errors_are_problem_details(
    client: TestClient[Litestar], path: str, status: int
) -> None:
    response = client.get(path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["title"]
    assert "Traceback" not in response.text


def test_v1_top_users_rank_everyone_including_orphans(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    exp = loaded.expected
    body = client.get("/v1/users/top?limit=25").json()
    assert body["limit"] == 25
    assert [(u["user_id"], u["transaction_count"]) for u in body["users"]] == exp.top(
        25, known_only=False
    )
    assert [u["rank"] for u in body["users"]] == list(range(1, 26))
    assert client.get("/v1/users/top").json()["users"] == body["users"][:10]


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "ten"])
def test_v1_top_users_limit_out_of_range_is_400(client: TestClient[Litestar], limit: str) -> None:
    response = client.get("/v1/users/top", params={"limit": limit})
    assert response.status_code == 400
    assert response.json()["status"] == 400


# --- /v1/daily -----------------------------------------------------------------------------------


def test_v1_daily_over_everything_equals_an_independent_sum(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    exp = loaded.expected
    days = [day for page in follow_pages(client, "/v1/daily", "days") for day in page]
    got = {(d["date"], d["type"]): (d["transaction_count"], d["total_amount"]) for d in days}
    assert got == {key: (exp.daily_count[key], money(total)) for key, total in exp.daily.items()}
    order = [(d["date"], d["type"]) for d in days]
    assert order == sorted(order)


def test_v1_daily_filters_by_range_and_type(client: TestClient[Litestar], loaded: Loaded) -> None:
    exp = loaded.expected
    body = client.get("/v1/daily?from=2022-03-01&to=2022-03-31&type=withdrawal").json()
    expected = {
        day: money(total)
        for (day, kind), total in exp.daily.items()
        if kind == "withdrawal" and "2022-03-01" <= day <= "2022-03-31"
    }
    assert {d["date"]: d["total_amount"] for d in body["days"]} == expected
    assert body["from"] == "2022-03-01"
    assert body["type"] == "withdrawal"
    empty = client.get("/v1/daily?from=2022-03-05&to=2022-03-01").json()
    assert empty["days"] == []  # an inverted range is empty, not an error


def follow_pages(client: TestClient[Litestar], url: str, key: str) -> list[list[Any]]:
    """Every page's ``key`` list, following ``next`` from ``url`` until it is null."""
    pages: list[list[Any]] = []
    next_url: str | None = url
    while next_url is not None:
        response = client.get(next_url)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body[key])
        next_url = body["next"]
        assert len(pages) <= 1000, "next never ends"
    return pages


def test_v1_daily_pages_together_equal_the_whole_range(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    first = client.get("/v1/daily").json()
    assert (first["limit"], first["offset"], len(first["days"])) == (1000, 0, 1000)
    assert first["next"] == "/v1/daily?from=0001-01-01&to=9999-12-31&limit=1000&offset=1000"
    whole = client.get("/v1/daily?limit=10000").json()
    assert whole["next"] is None
    assert len(whole["days"]) > 1000  # more than one default page
    pages = follow_pages(client, "/v1/daily?limit=97", "days")
    assert [len(page) for page in pages[:-1]] == [97] * (len(pages) - 1)
    assert 1 <= len(pages[-1]) <= 97
    assert [day for page in pages for day in page] == whole["days"]
    filtered = follow_pages(client, "/v1/daily?type=deposit&from=2022-03-01&limit=5", "days")
    assert [d for page in filtered for d in page] == [
        d for d in whole["days"] if d["type"] == "deposit" and d["date"] >= "2022-03-01"
    ]


def test_v1_countries_monthly_pages_together_equal_the_whole_range(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    whole = client.get("/v1/countries/monthly").json()
    assert whole["next"] is None
    rows = whole["months"]
    assert len(rows) > 2
    pages = follow_pages(client, "/v1/countries/monthly?limit=2", "months")
    assert [len(page) for page in pages[:-1]] == [2] * (len(pages) - 1)
    assert [row for page in pages for row in page] == rows
    past = client.get("/v1/countries/monthly", params={"offset": len(rows)}).json()
    assert (past["months"], past["next"]) == ([], None)


@pytest.mark.parametrize("path", ["/v1/daily", "/v1/countries/monthly"])
@pytest.mark.parametrize("query", ["limit=0", "limit=10001", "offset=-1", "limit=many"])
def test_v1_aggregate_pages_are_bounded(
    client: TestClient[Litestar], path: str, query: str
) -> None:
    response = client.get(f"{path}?{query}")
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")


def test_the_openapi_schema_documents_the_aggregate_pages(client: TestClient[Litestar]) -> None:
    schema = client.get("/schema/openapi.json").json()
    for path, body in (
        ("/v1/daily", "DailyTotals"),
        ("/v1/countries/monthly", "CountryMonthlyTotals"),
    ):
        params = {p["name"]: p for p in schema["paths"][path]["get"]["parameters"]}
        assert params["limit"]["schema"]["maximum"] == 10_000
        assert "offset" in params
        fields = schema["components"]["schemas"][body]["properties"]
        assert {"limit", "offset", "next"} <= set(fields)


@pytest.mark.parametrize(
    "query",
    ["from=2022-02-30", "to=yesterday", "from=2022-3-1", "type=bonus"],
)
def test_v1_daily_bad_parameters_are_400_problems(client: TestClient[Litestar], query: str) -> None:
    response = client.get(f"/v1/daily?{query}")
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/problem+json")


# --- /v1/files ----------------------------------------------------------------------------------


def test_v1_files_pages_the_ledger(client: TestClient[Litestar], loaded: Loaded) -> None:
    body = client.get("/v1/files").json()
    assert body["total"] == 5
    assert [f["file_id"] for f in body["items"]] == sorted(loaded.file_ids.values())
    statuses = {f["name"]: f["status"] for f in body["items"]}
    assert statuses["broken.csv"] == "failed"
    assert statuses["transactions.csv"] == "loaded"
    page = client.get("/v1/files?limit=2&offset=2").json()
    assert page["items"] == body["items"][2:4]
    assert (page["total"], page["limit"], page["offset"]) == (5, 2, 2)


def test_v1_file_detail_counts_rejects_by_reason(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    file_id = loaded.file_ids["transactions_extra.csv"]
    body = client.get(f"/v1/files/{file_id}").json()
    assert body["rows_total"] == 5
    assert body["rows_loaded"] == 3
    assert body["rows_rejected"] == 2
    assert body["rejected_by_reason"] == {"too_many_decimals": 1, "unknown_type": 1}
    broken = client.get(f"/v1/files/{loaded.file_ids['broken.csv']}").json()
    assert broken["status"] == "failed"
    assert broken["error_reason"]


def test_v1_file_rejects_give_line_reason_and_message(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    file_id = loaded.file_ids["transactions_extra.csv"]
    body = client.get(f"/v1/files/{file_id}/rejects").json()
    assert body["total"] == 2
    assert [(r["line"], r["reason"]) for r in body["items"]] == EXTRA_REJECTS
    assert all(r["message"] for r in body["items"])
    assert "900004" in body["items"][1]["raw_line"]
    second = client.get(f"/v1/files/{file_id}/rejects?limit=1&offset=1").json()
    assert second["items"] == body["items"][1:]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/files/999", 404),
        ("/v1/files/999/rejects", 404),
        ("/v1/files/0", 400),
        ("/v1/files?limit=0", 400),
        ("/v1/files?offset=-1", 400),
        ("/v1/files/1/rejects?limit=5000", 400),
    ],
)
def test_v1_files_errors_are_problem_details(
    client: TestClient[Litestar], path: str, status: int
) -> None:
    response = client.get(path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == status


# --- health, metrics, schema ----------------------------------------------------------------------


def test_v1_liveness_and_readiness(client: TestClient[Litestar]) -> None:
    assert client.get("/v1/health/live").json() == {"status": "alive"}
    response = client.get("/v1/health/ready")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_metrics_expose_the_ledger_rows_rejects_and_ingest_times(
    client: TestClient[Litestar], loaded: Loaded
) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = parse_metrics(response.text)
    assert samples['moneylion_files_total{status="loaded"}'] == 4
    assert samples['moneylion_files_total{status="failed"}'] == 1
    loaded_rows = 10000 + 1 + sum(loaded.expected.count.values())
    assert samples['moneylion_rows_total{outcome="loaded"}'] == loaded_rows
    assert samples['moneylion_rows_total{outcome="rejected"}'] == 2
    assert samples['moneylion_rejects_total{reason="too_many_decimals"}'] == 1
    assert samples['moneylion_rejects_total{reason="unknown_type"}'] == 1
    assert samples['moneylion_ingest_seconds_bucket{le="+Inf"}'] == 4
    assert samples["moneylion_ingest_seconds_count"] == 4
    assert samples["moneylion_inbox_backlog"] == 0
    assert samples["moneylion_seconds_since_last_file"] >= 0
    assert samples["moneylion_warehouse_up"] == 1
    client.get("/v1/health/live")
    http = parse_metrics(client.get("/metrics").text)
    assert any(key.startswith("moneylion_http_requests_total") for key in http)


def test_openapi_schema_lists_every_endpoint(client: TestClient[Litestar]) -> None:
    schema = client.get("/schema/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/api/user_transaction_summary",
        "/api/top_users",
        "/api/daily_transactions",
        "/api/health",
        "/api/log_monitor",
        "/v1/users/{user_id}/summary",
        "/v1/users/top",
        "/v1/daily",
        "/v1/countries/monthly",
        "/v1/files",
        "/v1/files/{file_id}",
        "/v1/files/{file_id}/rejects",
        "/v1/health/live",
        "/v1/health/ready",
        "/v1/logs/stats",
        "/metrics",
    }


def test_unknown_path_is_a_problem_detail(client: TestClient[Litestar]) -> None:
    response = client.get("/v2/anything")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")


# --- lifecycle, readiness, failures ---------------------------------------------------------------


def test_app_opens_and_closes_the_warehouse_itself_when_given_none(config: Config) -> None:
    entered: list[bool] = []

    @asynccontextmanager
    async def extra(app: Litestar) -> AsyncIterator[None]:
        entered.append(app.state.moneylion.db is not None)  # the warehouse is already open
        yield

    app = create_app(config, lifespan=[extra])
    with TestClient(app=app) as test_client:
        assert test_client.get("/v1/health/ready").status_code == 200
        assert test_client.get("/api/top_users").json() == []
        assert test_client.get("/v1/files").json()["total"] == 0
    assert entered == [True]
    assert app.state.moneylion.db is None
    reopened = open_warehouse(config)  # the app closed its connection
    reopened.close()


def test_readiness_is_503_until_the_daemon_says_ready(
    loaded: Loaded,
) -> None:
    watcher_running = threading.Event()
    app = create_app(
        loaded.config, loaded.conn, ingest=IngestStandIn(is_ready=watcher_running.is_set)
    )
    with TestClient(app=app) as test_client:
        response = test_client.get("/v1/health/ready")
        assert response.status_code == 503
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["status"] == 503
        watcher_running.set()
        assert test_client.get("/v1/health/ready").status_code == 200
    assert loaded.conn.execute("SELECT count(*) FROM files").fetchone() != (0,)  # still open


def test_a_failing_warehouse_gives_500_without_a_stack_trace(config: Config) -> None:
    conn = open_warehouse(config)
    conn.close()
    console = io.StringIO()
    logs.setup_logging(config, console=console)
    try:
        with TestClient(app=create_app(config, conn)) as test_client:
            v1 = test_client.get("/v1/users/1/summary")
            seed = test_client.get("/api/user_transaction_summary?user_id=1")
            ready = test_client.get("/v1/health/ready")
            host = test_client.get("/api/health")
            metrics = parse_metrics(test_client.get("/metrics").text)
        assert ready.status_code == 503
        assert ready.json()["detail"] == "not ready: the warehouse does not answer"
        assert host.status_code == 200  # host readings without the ledger's last file
        assert host.json()["seconds_since_last_file"] is None
        assert metrics["moneylion_warehouse_up"] == 0
        assert v1.status_code == 500
        assert v1.headers["content-type"].startswith("application/problem+json")
        assert "Traceback" not in v1.text
        assert seed.status_code == 500
        assert seed.json() == {"error": "Internal Server Error"}
        assert logs.level_counts(config)["ERROR"] == 3  # two 500s and the failed scrape
        assert "Traceback" in console.getvalue()  # the trace goes to the log, not the client
    finally:
        logs.teardown_logging()


def test_reads_see_a_file_entirely_or_not_at_all(
    tmp_path: Path,
    seed_files: tuple[Path, Path],
    config: Config,
    warehouse: duckdb.DuckDBPyConnection,
) -> None:
    """Poll while a 300,000-row file commits: counts jump from before to after, never between."""
    conn = warehouse
    ingest_file(conn, seed_files[0], config)
    big = tmp_path / "big.csv"
    with big.open("w") as handle:
        handle.write("transaction_id,user_id,transaction_date,amount,transaction_type\n")
        for i in range(300_000):
            handle.write(f"{2_000_000 + i},{1 + i % 5000},2022-06-{1 + i % 28:02d},1.25,deposit\n")
    seen: set[int] = set()
    with TestClient(app=create_app(config, conn)) as test_client:
        worker = threading.Thread(target=ingest_file, args=(conn, big, config))
        worker.start()
        while worker.is_alive() or not seen:
            days = test_client.get("/v1/daily?from=2022-06-01&to=2022-06-28").json()["days"]
            seen.add(sum(d["transaction_count"] for d in days))
        worker.join()
        days = test_client.get("/v1/daily?from=2022-06-01&to=2022-06-28").json()["days"]
        seen.add(sum(d["transaction_count"] for d in days))
    assert seen <= {0, 300_000}
    assert 300_000 in seen
    assert verify(conn, top_users_kept=config.top_users_kept) == []


def test_cached_answers_change_as_soon_as_a_file_commits(
    tmp_path: Path,
    seed_files: tuple[Path, Path],
    config: Config,
    warehouse: duckdb.DuckDBPyConnection,
) -> None:
    conn = warehouse
    ingest_file(conn, seed_files[0], config)
    ingest_file(conn, seed_files[1], config)
    burst = tmp_path / "burst.csv"
    burst.write_text(
        "transaction_id,user_id,transaction_date,amount,transaction_type\n"
        + "".join(f"{5_000_000 + i},7777,1999-12-31,1.00,deposit\n" for i in range(500))
    )
    with TestClient(app=create_app(config, conn)) as test_client:
        before = test_client.get("/api/top_users").json()
        assert before == test_client.get("/api/top_users").json()  # served from the cache
        assert test_client.get("/api/daily_transactions?date=1999-12-31").status_code == 404
        burst_started = time.time()
        ingest_file(conn, burst, config)
        after = test_client.get("/api/top_users").json()
        seed_count = sum(1 for line in seed_files[1].open() if line.split(",")[1] == "7777")
        assert after[0]["user_id"] == 7777
        assert after[0]["transaction_count"] == seed_count + 500
        assert after[1:] == before[:9]
        day = test_client.get("/api/daily_transactions?date=1999-12-31").json()
        assert day == [
            {"transaction_date": "1999-12-31", "transaction_type": "deposit", "daily_total": 500.0}
        ]
        # The newest file is the burst: its age is within the time since its ingest began
        # (the seed's would be older by the app's start and the requests above); to the
        # millisecond the answer is rounded to.
        age = test_client.get("/api/health").json()["seconds_since_last_file"]
        assert age <= time.time() - burst_started + 0.001
    assert verify(conn) == []


def test_each_section_is_served_as_its_own_partial_and_no_other_name_is(
    client: TestClient[Litestar],
) -> None:
    for part, marker in (
        ("state", 'id="state-live"'),
        ("files", 'id="files-live"'),
        ("reasons", "data-reject-reason="),
        ("daily", 'id="daily-live"'),
        ("top", 'id="top-live"'),
        ("user?user_id=1", 'id="user-live"'),
    ):
        response = client.get(f"/partials/{part}")
        assert response.status_code == 200, part
        assert marker in response.text, part
    assert client.get("/partials/base").status_code == 404
    assert client.get("/partials/..%2fdashboard").status_code == 404
