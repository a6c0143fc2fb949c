"""Every endpoint over real HTTP: the app under uvicorn on 127.0.0.1 (free port), httpx client."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import httpx
import pytest
import uvicorn

from moneylion.api import create_app
from moneylion.api.server import (
    CONNECTION_RESERVE,
    Admission,
    BodyPace,
    ConnectionGate,
    HttpLimits,
    PausedClock,
    bounded_protocol,
)
from tests.conftest import (
    ORPHAN,
    USER_WITHOUT_TRANSACTIONS,
    Loaded,
    cents,
    money,
    parse_metrics,
    serving,
)
from tests.daemon_process import wait_for


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


# -- the server's own bounds (moneylion.api.server) under a real uvicorn --------------------------


def test_a_body_pace_needs_the_rate_in_every_window_of_reading_time() -> None:
    pace = BodyPace(min_rate=1024, window=10.0, reading_time=0.0)
    assert pace.check(4.0) == 6.0  # a window not over yet
    pace.received = 10 * 1024 - 1
    assert pace.check(10.0) is None
    slow_link = BodyPace(min_rate=1024, window=10.0, reading_time=0.0)
    for second in range(1, (64 << 20) // (100 << 10) + 1):  # 64 MiB at 100 KiB/s
        slow_link.received += 100 << 10
        assert slow_link.check(float(second)) is not None


def test_the_reading_clock_stands_still_while_the_server_pauses_reading() -> None:
    now = [100.0]

    class Transport:
        def pause_reading(self) -> None: ...

        def resume_reading(self) -> None: ...

    clock = PausedClock(cast("asyncio.Transport", Transport()), clock=lambda: now[0])
    now[0] = 103.0
    assert clock.reading_time() == 103.0
    clock.pause_reading()
    now[0] = 160.0
    assert clock.reading_time() == 103.0
    clock.resume_reading()
    now[0] = 161.0
    assert clock.reading_time() == 104.0


async def _echo_size(scope: Any, receive: Any, send: Any, *, delay: float) -> None:
    """A tiny ASGI app: waits ``delay`` s before reading the body, answers its size."""
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await asyncio.sleep(delay)
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(size).encode()
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextmanager
def bounded_serving(limits: HttpLimits, delay: float = 0.0) -> Iterator[int]:
    """uvicorn with ``bounded_protocol(limits)`` serving ``_echo_size`` in a thread: its port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    app = functools.partial(_echo_size, delay=delay)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        http=bounded_protocol(limits),
        ws="none",
        interface="asgi3",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn started")
    try:
        yield int(sock.getsockname()[1])
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    answer = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_time_the_server_does_not_read_a_body_is_not_held_against_the_client() -> None:
    """The app reads nothing for longer than several windows: uvicorn pauses reading, and the
    client, who sent everything at once, is not answered 408."""
    limits = HttpLimits(
        head_seconds=5.0, body_min_rate=1 << 20, max_connections=8, body_window_seconds=0.3
    )
    body = b"x" * (4 << 20)
    head = b"POST / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    with (
        bounded_serving(limits, delay=1.5) as port,
        socket.create_connection(("127.0.0.1", port)) as sock,
    ):
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        answer = _read_answer(sock)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert answer.endswith(str(len(body)).encode())


def test_a_body_below_the_rate_is_408_and_bytes_between_requests_do_not_hold_a_connection() -> None:
    limits = HttpLimits(
        head_seconds=0.5, body_min_rate=64 << 10, max_connections=8, body_window_seconds=0.5
    )
    with bounded_serving(limits) as port:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 100000\r\n\r\n")
            for _ in range(10):  # 1 KB every 0.1 s: a sixth of the rate
                with contextlib.suppress(OSError):
                    sock.sendall(b"y" * 1000)
                time.sleep(0.1)
            answer = _read_answer(sock)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            sock.settimeout(10)
            first = b""
            while not first.endswith(b"\r\n\r\n0"):  # the answer: an empty body's size
                first += sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ")
            opened = time.monotonic()
            sock.sendall(b"\r\n")  # a keep-alive connection fed line ends only
            assert _read_answer(sock).startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - opened < 5


def test_the_gate_allows_liveness_past_the_bound_closes_past_the_reserve_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="moneylion.api.server")
    gate = ConnectionGate(HttpLimits(head_seconds=1.0, body_min_rate=1, max_connections=2))
    admitted = [gate.admit() for _ in range(2 + CONNECTION_RESERVE + 1)]
    assert admitted == (
        [Admission.SERVED] * 2 + [Admission.LIVENESS_ONLY] * CONNECTION_RESERVE + [Admission.CLOSED]
    )
    for _ in admitted:
        gate.release()
    assert (gate.open, gate.refused) == (0, 1)
    events = [r.getMessage() for r in caplog.records if r.name == "moneylion.api.server"]
    assert events == ["http_connections_bound_hit", "http_connections_bound_cleared"]
    unbounded = ConnectionGate(HttpLimits(head_seconds=1.0, body_min_rate=1, max_connections=0))
    assert {unbounded.admit() for _ in range(1000)} == {Admission.SERVED}
