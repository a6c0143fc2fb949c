"""Access with an api_token: bearer or the dashboard's cookie on every route but liveness, 401
problem details otherwise (logged without the token), and ``serve`` refusing to leave loopback
without a token. The app runs under real uvicorn on 127.0.0.1; ``serve`` as a real process."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moneylion.api import create_app
from moneylion.api.access import is_loopback
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
    with serving(create_app(loaded.config.with_overrides(api_token=TOKEN), loaded.conn)) as url:
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
    assert len(found) == 18  # 17 GETs and the upload
    assert ("POST", "/v1/files") in found
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
        assert TOKEN not in cookie
        assert "secure" not in cookie.lower()  # plain HTTP here: a Secure cookie would not return
        for path in [*DASHBOARD_PAGES, "/v1/files", "/api/top_users", "/metrics"]:
            assert browser.get(path).status_code in (200, 404), path
        assert browser.post("/logout").status_code == 303
        assert browser.get("/v1/files").status_code == 401


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
