"""Every endpoint over real HTTP: the app under uvicorn on 127.0.0.1 (free port), httpx client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from moneylion.api import create_app
from tests.conftest import (
    ORPHAN,
    USER_WITHOUT_TRANSACTIONS,
    Loaded,
    cents,
    money,
    parse_metrics,
    serving,
)


@pytest.fixture(scope="module")
def base_url(loaded: Loaded) -> Iterator[str]:
    with serving(create_app(loaded.config, loaded.conn)) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


def test_every_seed_endpoint_over_http(http: httpx.Client, loaded: Loaded) -> None:
    exp = loaded.expected
    user_id = exp.top(1, known_only=True)[0][0]
    assert http.get(f"/api/user_transaction_summary?user_id={user_id}").json() == [
        {
            "user_id": user_id,
            "country": exp.countries[user_id],
            "total_transaction_amount": cents(exp.total[user_id]),
            "total_deposit": cents(exp.by_type[user_id, "deposit"]),
            "total_withdrawal": cents(exp.by_type[user_id, "withdrawal"]),
            "total_purchase": cents(exp.by_type[user_id, "purchase"]),
        }
    ]
    assert http.get("/api/top_users").json() == [
        {"user_id": u, "country": exp.countries[u], "transaction_count": n}
        for u, n in exp.top(10, known_only=True)
    ]
    day = min(d for d, _ in exp.daily)
    assert http.get(f"/api/daily_transactions?date={day}").json() == [
        {"transaction_date": day, "transaction_type": k, "daily_total": cents(exp.daily[day, k])}
        for k in sorted(k for d, k in exp.daily if d == day)
    ]
    health = http.get("/api/health").json()
    assert health["num_cores"] >= 1
    assert "cpu_usage_%" in health
    assert set(http.get("/api/log_monitor").json()) == {
        "info_count",
        "warning_count",
        "error_count",
        "critical_count",
    }


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        ("/api/user_transaction_summary", 400, {"error": "user_id is required"}),
        (
            "/api/user_transaction_summary?user_id=x1",
            400,
            {"error": "user_id must be a positive integer"},
        ),
        (f"/api/user_transaction_summary?user_id={ORPHAN}", 404, {"error": "User not found"}),
        ("/api/daily_transactions", 400, {"error": "Missing required query parameter: date"}),
        (
            "/api/daily_transactions?date=1999-01-01",
            404,
            {"error": "No transactions found for date: 1999-01-01"},
        ),
    ],
)
def test_seed_errors_over_http(
    http: httpx.Client, path: str, status: int, body: dict[str, str]
) -> None:
    response = http.get(path)
    assert response.status_code == status
    assert response.json() == body


def test_every_v1_endpoint_over_http(http: httpx.Client, loaded: Loaded) -> None:
    exp = loaded.expected
    user_id = exp.top(1, known_only=True)[0][0]
    summary = http.get(f"/v1/users/{user_id}/summary").json()
    assert summary["total_amount"] == money(exp.total[user_id])
    assert http.get(f"/v1/users/{USER_WITHOUT_TRANSACTIONS}/summary").json()["total_amount"] == (
        "0.00"
    )
    top = http.get("/v1/users/top?limit=5").json()["users"]
    assert [(u["user_id"], u["transaction_count"]) for u in top] == exp.top(5, known_only=False)
    days = http.get("/v1/daily?from=2022-01-01&to=2022-01-31&type=purchase").json()["days"]
    assert {d["date"]: d["total_amount"] for d in days} == {
        d: money(v)
        for (d, k), v in exp.daily.items()
        if k == "purchase" and "2022-01-01" <= d <= "2022-01-31"
    }
    files = http.get("/v1/files").json()
    assert files["total"] == 5
    extra = loaded.file_ids["transactions_extra.csv"]
    assert http.get(f"/v1/files/{extra}").json()["rows_rejected"] == 2
    assert http.get(f"/v1/files/{extra}/rejects").json()["total"] == 2
    assert http.get("/v1/health/live").json() == {"status": "alive"}
    assert http.get("/v1/health/ready").status_code == 200
    assert set(http.get("/v1/logs/stats").json()) == {
        "debug",
        "info",
        "warning",
        "error",
        "critical",
    }
    metrics = parse_metrics(http.get("/metrics").text)
    assert metrics['moneylion_files_total{status="loaded"}'] == 4
    assert "/v1/users/{user_id}/summary" in http.get("/schema/openapi.json").json()["paths"]


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/users/987654321/summary", 404),
        ("/v1/users/-4/summary", 400),
        ("/v1/users/top?limit=1001", 400),
        ("/v1/daily?from=2022-02-30", 400),
        ("/v1/files/12345", 404),
        ("/v1/files/12345/rejects", 404),
        ("/v1/files?limit=0", 400),
        ("/nothing/here", 404),
    ],
)
def test_v1_errors_over_http_are_problem_details(
    http: httpx.Client, path: str, status: int
) -> None:
    response = http.get(path)
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["status"] == status
