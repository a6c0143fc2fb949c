"""Access with an api_token: bearer or the dashboard's cookie on every route but liveness, 401
problem details otherwise (logged without the token), and ``serve`` refusing to leave loopback
without a token. The app runs under real uvicorn on 127.0.0.1; ``serve`` as a real process."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from moneylion.api import create_app
from moneylion.api.access import (
    allowed_host_names,
    cross_origin,
    forwarded_client,
    is_loopback,
    split_host,
    trusted_networks,
)
from moneylion.api.lockout import AuthFailures, client_key
from moneylion.api.sessions import Sessions
from moneylion.config import ConfigError, load_config
from tests.conftest import Loaded, serving
from tests.daemon_process import DaemonProcess, run_cli

TOKEN = "access-test-token-0123456789abcdef"  # noqa: S105 - a test token
WRONG = "not-the-token-but-long-enough-42"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
DASHBOARD_PAGES = [
    "/",
    "/partials/state",
    "/partials/files",
    "/partials/reasons",
    "/partials/daily",
    "/partials/top",
    "/partials/user?user_id=1",
    "/files/1",
]


@pytest.fixture(scope="module")
def base_url(loaded: Loaded) -> Iterator[str]:
    # This module counts refusals one by one; the limit on failures has its own tests (below,
    # and tests/test_hostile_access.py against a real daemon).
    config = loaded.config.with_overrides(api_token=TOKEN, auth_failures_per_minute=0)
    with serving(create_app(config, loaded.conn)) as url:
        yield url


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


def operations(http: httpx.Client) -> list[tuple[str, str]]:
    """(method, path with its parameters filled in) for every operation of the OpenAPI schema."""
    schema = http.get("/schema/openapi.json", headers=BEARER).json()
    found = []
    for path, item in schema["paths"].items():
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                filled = re.sub(r"\{sha256\}", "a" * 64, path)
                found.append((method.upper(), re.sub(r"\{[a-z_]+\}", "1", filled)))
    return found


def test_every_route_but_liveness_answers_401_without_the_token(
    http: httpx.Client, loaded: Loaded
) -> None:
    found = operations(http)
    # 17 GETs, the upload, the check, and the corrections (retract, restore, release, replace)
    assert len(found) == 23
    assert ("POST", "/v1/files") in found
    assert ("POST", "/v1/files/1/retract") in found
    for method, path in found:
        if path == "/v1/health/live":
            continue
        for headers in (
            {},
            {"Authorization": f"Bearer {WRONG}"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": "Bearer"},
            {"Cookie": f"moneylion_session={TOKEN}"},
        ):
            response = http.request(method, path, headers=headers, content=b"a,b\n1,2\n")
            assert response.status_code == 401, (method, path, headers, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.headers["www-authenticate"] == 'Bearer realm="moneylion"'
            assert response.json()["status"] == 401
        response = http.request(method, path, headers=BEARER)
        assert response.status_code != 401, (method, path)
    # Only the authorized upload (an empty body) got into the inbox.
    assert sorted(os.listdir(loaded.config.inbox)) == [".uploads", "upload-e3b0c44298fc.csv"]


def test_liveness_answers_without_the_token(http: httpx.Client) -> None:
    assert http.get("/v1/health/live").json() == {"status": "alive"}


def test_dashboard_pages_answer_the_login_form_with_401(http: httpx.Client) -> None:
    for path in DASHBOARD_PAGES:
        response = http.get(path)
        assert response.status_code == 401, path
        assert response.headers["content-type"].startswith("text/html")
        assert 'action="/login"' in response.text
        assert "script-src 'self'" in response.headers["content-security-policy"]
    upload = http.post("/upload", files={"file": ("x.csv", b"a\n")})
    assert upload.status_code == 401
    assert http.get("/static/dashboard.css").status_code == 200  # vendored files hold no data


def test_the_login_form_sets_a_strict_http_only_cookie_that_opens_every_route(
    base_url: str,
) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as browser:
        refused = browser.post("/login", data={"token": WRONG, "next": "/"})
        assert refused.status_code == 401
        assert "set-cookie" not in refused.headers
        answer = browser.post("/login", data={"token": TOKEN, "next": "/?top=5"})
        assert answer.status_code == 303
        assert answer.headers["location"] == "/?top=5"
        cookie = answer.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "samesite=strict" in cookie.lower()
        assert "Max-Age=43200" in cookie  # session_max_age_seconds
        assert TOKEN not in cookie
        assert "secure" not in cookie.lower()  # plain HTTP here: a Secure cookie would not return
        for path in [*DASHBOARD_PAGES, "/v1/files", "/api/top_users", "/metrics"]:
            assert browser.get(path).status_code in (200, 404), path
        kept = browser.cookies["moneylion_session"]
        # An unsafe request on the cookie alone: only with the browser's same-origin Origin.
        assert browser.post("/logout").status_code == 403
        assert browser.get("/v1/files").status_code == 200
        assert browser.post("/logout", headers={"Origin": base_url}).status_code == 303
        assert browser.get("/v1/files").status_code == 401
    # The value kept from before the logout is revoked server-side, not just dropped.
    stale = httpx.get(
        f"{base_url}/v1/files", headers={"Cookie": f"moneylion_session={kept}"}, timeout=10
    )
    assert stale.status_code == 401


def test_after_the_login_only_local_paths_are_followed(http: httpx.Client) -> None:
    for target in ("//elsewhere.example/", "https://elsewhere.example/", "/\\elsewhere"):
        answer = http.post("/login", data={"token": TOKEN, "next": target})
        assert answer.headers["location"] == "/"


def test_refusals_are_logged_without_what_was_presented(
    http: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="moneylion.api.access"):
        http.get("/v1/files", headers={"Authorization": f"Bearer {WRONG}"})
        http.get("/api/top_users", headers={"Cookie": f"moneylion_session={WRONG}"})
    records = [r for r in caplog.records if r.getMessage() == "api_unauthorized"]
    assert [r.fields["presented"] for r in records] == ["bearer", "cookie"]  # type: ignore[attr-defined]
    for record in records:
        text = repr(record.__dict__)
        assert WRONG not in text
        assert TOKEN not in text


def test_serve_refuses_a_public_host_without_a_token(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.0.2.10"):  # noqa: S104 - refused, never bound
        env = {
            **os.environ,
            "MONEYLION_HOST": host,
            "MONEYLION_INBOX": str(tmp_path / "inbox"),
            "MONEYLION_WAREHOUSE": str(tmp_path / "warehouse"),
        }
        env.pop("MONEYLION_API_TOKEN", None)
        result = run_cli("serve", env=env)
        assert result.returncode == 2, result.stderr
        assert f"refusing to serve on {host}:" in result.stderr
        assert "MONEYLION_API_TOKEN" in result.stderr
        assert not (tmp_path / "warehouse").exists()  # refused before opening anything


def test_serve_refuses_a_bad_host_or_proxy_entry_before_opening_anything(tmp_path: Path) -> None:
    for key, value in (("ALLOWED_HOSTS", "https://money.example/"), ("TRUSTED_PROXIES", "proxy")):
        env = {
            **os.environ,
            "MONEYLION_API_TOKEN": TOKEN,
            f"MONEYLION_{key}": value,
            "MONEYLION_INBOX": str(tmp_path / "inbox"),
            "MONEYLION_WAREHOUSE": str(tmp_path / "warehouse"),
        }
        result = run_cli("serve", env=env)
        assert result.returncode == 2, result.stderr
        assert key.lower() in result.stderr
        assert not (tmp_path / "warehouse").exists()


def test_serve_on_a_public_host_with_a_token_requires_it(tmp_path: Path) -> None:
    daemon = DaemonProcess(
        tmp_path / "inbox",
        tmp_path / "warehouse",
        env={"MONEYLION_HOST": "0.0.0.0", "MONEYLION_API_TOKEN": TOKEN},  # noqa: S104
    )
    daemon.inbox.mkdir()
    daemon.client.headers.update(BEARER)
    try:
        daemon.start()
        assert httpx.get(f"http://127.0.0.1:{daemon.port}/v1/files").status_code == 401
        assert daemon.get("/v1/files")["total"] == 0
        # Bound to every address, it says which names it answers for until told more.
        assert "allowed_hosts" in daemon.stderr_text()
    finally:
        daemon.close()


def test_a_short_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        load_config(environ={"MONEYLION_API_TOKEN": "short"})
    assert load_config(environ={"MONEYLION_API_TOKEN": TOKEN}).api_token == TOKEN
    assert TOKEN not in repr(load_config(environ={"MONEYLION_API_TOKEN": TOKEN}))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),  # noqa: S104 - only classified
        ("::", False),
        ("10.0.0.1", False),
        ("example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "query",
    [
        "user_id=²",
        "user_id=-1",
        "user_id=99999999999999999999",
        "files=²&top=1e3",
        "from=2022-02-30&to=x",
        "from=9999-12-31&to=0001-01-01",
        "to=0001-01-01",
    ],
)
def test_odd_dashboard_parameters_still_give_a_page(http: httpx.Client, query: str) -> None:
    page = http.get(f"/?{query}", headers=BEARER)
    assert page.status_code == 200, page.text
    assert "<h1>Dashboard</h1>" in page.text
    assert http.get("/files/4?offset=²", headers=BEARER).status_code == 200


# --- hosts, origins, proxies, sessions and the failure limit, unit by unit --------------------


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("127.0.0.1:8000", ("127.0.0.1", 8000)),
        ("LocalHost.", ("localhost", None)),
        ("[::1]:8000", ("[::1]", 8000)),
        ("::1", ("[::1]", None)),
        ("money.example", ("money.example", None)),
        ("evil.example:99999", None),
        ("evil.example:80x", None),
        ("[::1", None),
        ("a b", None),
        ("", None),
        ("user@host", None),
    ],
)
def test_host_values_parse_to_a_name_and_port(value: str, parsed: object) -> None:
    assert split_host(value) == parsed


def test_allowed_hosts_are_the_loopback_names_host_and_the_list(tmp_path: Path) -> None:
    base = load_config(environ={})
    assert allowed_host_names(base) == {("localhost", None), ("127.0.0.1", None), ("[::1]", None)}
    public = base.with_overrides(host="0.0.0.0", allowed_hosts=["money.example:443"])  # noqa: S104
    assert ("money.example", 443) in allowed_host_names(public)
    assert ("0.0.0.0", None) not in allowed_host_names(public)  # noqa: S104 - no client names it
    with pytest.raises(ConfigError, match="allowed_hosts"):
        allowed_host_names(base.with_overrides(allowed_hosts=["http://money.example/"]))
    with pytest.raises(ConfigError, match="trusted_proxies"):
        trusted_networks(base.with_overrides(trusted_proxies=["10.0.0.0/33"]))


def _scope(method: str, host: str, scheme: str = "http", **headers: str) -> Any:
    pairs = [(b"host", host.encode())] + [
        (k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()
    ]
    return {"type": "http", "method": method, "scheme": scheme, "headers": pairs, "path": "/"}


@pytest.mark.parametrize(
    ("host", "scheme", "headers", "refused"),
    [
        ("127.0.0.1:8000", "http", {}, False),  # curl: no Origin
        ("127.0.0.1:8000", "http", {"origin": "http://127.0.0.1:8000"}, False),
        ("money.example", "https", {"origin": "https://money.example"}, False),
        ("money.example", "https", {"origin": "https://money.example:443"}, False),
        ("127.0.0.1:8000", "http", {"sec_fetch_site": "same-origin"}, False),
        ("127.0.0.1:8000", "http", {"sec_fetch_site": "none"}, False),
        ("127.0.0.1:8000", "http", {"origin": "http://evil.example"}, True),
        ("127.0.0.1:8000", "http", {"origin": "http://127.0.0.1:3000"}, True),  # another port
        ("127.0.0.1:8000", "http", {"origin": "http://localhost:8000"}, True),  # another name
        ("money.example", "https", {"origin": "http://money.example"}, True),  # another scheme
        ("127.0.0.1:8000", "http", {"origin": "null"}, True),
        ("127.0.0.1:8000", "http", {"sec_fetch_site": "cross-site"}, True),
        ("127.0.0.1:8000", "http", {"sec_fetch_site": "same-site"}, True),
    ],
)
def test_unsafe_requests_pass_only_from_their_own_origin(
    host: str, scheme: str, headers: dict[str, str], refused: bool
) -> None:
    assert (cross_origin(_scope("POST", host, scheme, **headers)) is not None) is refused


def test_x_forwarded_for_is_read_from_trusted_proxies_only() -> None:
    proxies = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))
    assert forwarded_client("127.0.0.1", ["203.0.113.7"], proxies) == "203.0.113.7"
    # The rightmost hop that is not a proxy: what a client writes itself is to its left.
    assert forwarded_client("127.0.0.1", ["198.51.100.1, 203.0.113.7, 10.1.2.3"], proxies) == (
        "203.0.113.7"
    )
    assert forwarded_client("127.0.0.1", ["198.51.100.1", "203.0.113.7"], proxies) == (
        "203.0.113.7"
    )
    assert forwarded_client("192.0.2.1", ["203.0.113.7"], proxies) is None  # not a proxy
    assert forwarded_client("127.0.0.1", ["203.0.113.7"], ()) is None  # none trusted
    assert forwarded_client("127.0.0.1", [], proxies) is None


def test_a_session_expires_ends_at_logout_and_with_another_process_or_token() -> None:
    now = [1_000_000.0]
    sessions = Sessions(TOKEN, 3600, clock=lambda: now[0])
    value = sessions.issue()
    assert TOKEN not in value
    assert sessions.valid(value)
    assert not sessions.valid(value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1])
    assert not sessions.valid("garbage")
    assert not Sessions(TOKEN, 3600, clock=lambda: now[0]).valid(value)  # a restart
    assert not Sessions(WRONG, 3600, clock=lambda: now[0]).valid(value)  # another token
    now[0] += 3599
    assert sessions.valid(value)
    now[0] += 1
    assert not sessions.valid(value)  # Max-Age reached
    other = sessions.issue()
    sessions.revoke(other)
    assert not sessions.valid(other)
    assert sessions.valid(sessions.issue())  # a new login still works


def test_only_failures_are_limited_per_client_and_each_lockout_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    failures = AuthFailures(3, clock=lambda: now[0], max_clients=100)
    with caplog.at_level(logging.WARNING, logger="moneylion.api.lockout"):
        for second in (0.0, 1.0, 2.0):
            now[0] = second
            assert failures.refuse("192.0.2.1") is None
        now[0] = 10.0
        assert failures.refuse("192.0.2.1") == 50  # the first failure leaves the window at 60
        assert failures.refuse("192.0.2.1") == 50
        assert failures.refuse("192.0.2.2") is None  # another client
        now[0] = 60.0
        assert failures.refuse("192.0.2.1") is None  # one failure left the window
        assert failures.refuse("192.0.2.1") == 1  # the failure at 1 s leaves at 61 s
    locked = [r for r in caplog.records if r.getMessage() == "auth_locked_out"]
    assert len(locked) == 1  # the failures went on without a quiet minute: one lockout
    assert client_key("2001:db8::1") == client_key("2001:db8::2") == "2001:db8::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"


def test_the_failure_count_is_bounded_in_clients() -> None:
    failures = AuthFailures(1, max_clients=100)
    for n in range(1000):
        failures.refuse(f"10.0.{n // 256}.{n % 256}")
    assert len(failures._clients) == 100
    assert AuthFailures(0).refuse("192.0.2.1") is None  # 0: no limit
