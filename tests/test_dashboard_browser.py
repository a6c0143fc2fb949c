"""The dashboard in a real browser: Debian's chromium (Playwright) on a real ``moneylion serve``
child with an api_token, its inbox fed the seed data plus the API tests' extra files.

Every figure the page shows is checked against the JSON API's answer for the same question;
one browser, one daemon and one logged-in page serve the whole module. Screenshots at 1280 and
390 px are written to tmp_path, or to $MONEYLION_SCREENSHOTS (``make screenshots``: docs/).
"""

from __future__ import annotations

import collections
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import chromium
from tests.conftest import BROKEN_FILE, EXTRA_TRANSACTIONS, EXTRA_USERS
from tests.daemon_process import DaemonProcess, wait_for, write_transactions

TOKEN = "dashboard-test-token-0123456789"  # noqa: S105 - a test token
SEED_FILES = 5  # users, transactions, users_extra, transactions_extra, broken
BAD_ROWS = 60  # rows of many_rejects.csv that are rejected (more than a page of 50)


@pytest.fixture(scope="module")
def daemon(
    tmp_path_factory: pytest.TempPathFactory, seed_files: tuple[Path, Path]
) -> Iterator[DaemonProcess]:
    base = tmp_path_factory.mktemp("dashboard")
    inbox = base / "inbox"
    inbox.mkdir()
    process = DaemonProcess(
        inbox, base / "warehouse", settle_seconds=0.1, env={"MONEYLION_API_TOKEN": TOKEN}
    )
    process.client.headers["Authorization"] = f"Bearer {TOKEN}"
    process.start()
    staging = base / "staging"
    staging.mkdir()
    extra = {
        "users_extra.csv": EXTRA_USERS,
        "transactions_extra.csv": EXTRA_TRANSACTIONS,
        "broken.csv": BROKEN_FILE,
    }
    sources = list(seed_files)
    for name, text in extra.items():
        (staging / name).write_text(text)
        sources.append(staging / name)
    for source in sources:  # one at a time: the ledger's order is the order given here
        count = len(process.folder("done")) + len(process.folder("failed"))
        shutil.copyfile(source, staging / f".{source.name}.tmp")
        os.rename(staging / f".{source.name}.tmp", inbox / source.name)
        wait_for(
            lambda c=count: len(process.folder("done")) + len(process.folder("failed")) > c,
            60,
            f"{source.name} to be ingested",
        )
    assert process.get("/v1/files")["total"] == SEED_FILES
    try:
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def page(browser: Any, daemon: DaemonProcess) -> Iterator[Any]:
    """One page logged in through the login form, its console errors recorded."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(15_000)
    tab.console_errors = []
    tab.on("console", lambda m: m.type == "error" and tab.console_errors.append(m.text))
    tab.goto(url(daemon, "/"))
    tab.fill("#token", TOKEN)
    tab.click("form[action='/login'] button")
    tab.wait_for_selector("h1:text('Dashboard')")
    tab.console_errors.clear()  # the 401 of the login page itself
    yield tab
    context.close()


def url(daemon: DaemonProcess, path: str) -> str:
    return f"http://127.0.0.1:{daemon.port}{path}"


def texts(page: Any, selector: str) -> list[str]:
    return [t.strip() for t in page.locator(selector).all_inner_texts()]


def number(text: str) -> int:
    return int(text.replace(",", ""))


# --- access ------------------------------------------------------------------------------------


def test_login_takes_the_token_and_sets_an_http_only_strict_cookie(
    browser: Any, daemon: DaemonProcess
) -> None:
    context = browser.new_context()
    tab = context.new_page()
    response = tab.goto(url(daemon, "/?top=5"))
    assert response.status == 401
    assert tab.locator("h1").inner_text() == "Log in"
    tab.fill("#token", "not-the-token-at-all-0000")
    tab.click("form[action='/login'] button")
    assert tab.locator("[role=alert]").inner_text() == "That is not the token."
    assert context.cookies() == []
    tab.fill("#token", TOKEN)
    tab.click("form[action='/login'] button")
    tab.wait_for_selector("h1:text('Dashboard')")
    assert tab.url.endswith("/?top=5")  # back where the login was asked for
    (cookie,) = context.cookies()
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert TOKEN not in cookie["value"]
    assert tab.evaluate("document.cookie") == ""  # not readable from scripts
    context.close()


def test_log_out_ends_the_session_on_the_server(browser: Any, daemon: DaemonProcess) -> None:
    """The browser's own forms post with its Origin: the login and the logout pass the
    same-origin rule; the cookie kept from before the logout opens nothing."""
    context = browser.new_context()
    tab = context.new_page()
    tab.goto(url(daemon, "/"))
    tab.fill("#token", TOKEN)
    tab.click("form[action='/login'] button")
    tab.wait_for_selector("h1:text('Dashboard')")
    (cookie,) = context.cookies()
    kept = {"Cookie": f"moneylion_session={cookie['value']}"}
    assert httpx.get(url(daemon, "/v1/files"), headers=kept, timeout=10).status_code == 200
    tab.click("form[action='/logout'] button")
    tab.wait_for_selector("h1:text('Log in')")
    assert context.cookies() == []
    assert httpx.get(url(daemon, "/v1/files"), headers=kept, timeout=10).status_code == 401
    assert tab.goto(url(daemon, "/")).status == 401
    context.close()


# --- each section against the API -------------------------------------------------------------


def test_state_shows_ready_and_the_backlog(page: Any, daemon: DaemonProcess) -> None:
    page.goto(url(daemon, "/"))
    assert page.locator("[data-figure=ready]").inner_text() == "ready"
    health = daemon.get("/api/health")
    assert (
        number(page.locator("[data-figure=backlog_files]").inner_text())
        == (health["inbox_backlog"])
    )
    assert (
        number(page.locator("[data-figure=backlog_bytes]").inner_text())
        == (health["inbox_backlog_bytes"])
    )
    since = page.locator("[data-figure=since_last_file]").inner_text()
    assert re.fullmatch(r"[0-9]+\.[0-9] s", since)
    assert re.fullmatch(r"[0-9]+ files", page.locator("[data-figure=export_lag]").inner_text())
    assert "MiB" in page.locator("[data-figure=rss_bytes]").inner_text()


def test_latest_files_equal_the_ledger(page: Any, daemon: DaemonProcess) -> None:
    page.goto(url(daemon, "/"))
    ledger = {f["file_id"]: f for f in daemon.get("/v1/files")["items"]}
    rows = page.locator("#files tbody tr[data-file-id]")
    shown = {}
    for n in range(rows.count()):
        row = rows.nth(n)
        file_id = int(row.get_attribute("data-file-id"))
        shown[file_id] = (
            row.locator("td").nth(1).inner_text(),
            row.locator(".status").inner_text(),
            number(row.locator("[data-col=rows_loaded]").inner_text()),
            number(row.locator("[data-col=rows_duplicate]").inner_text()),
            number(row.locator("[data-col=rows_rejected]").inner_text()),
        )
    assert shown == {
        i: (f["name"], f["status"], f["rows_loaded"], f["rows_duplicate"], f["rows_rejected"])
        for i, f in ledger.items()
        if i in shown
    }
    assert sorted(shown, reverse=True) == sorted(ledger, reverse=True)[: len(shown)]
    assert len(shown) >= SEED_FILES


def test_refusals_by_reason_equal_the_files_answers(page: Any, daemon: DaemonProcess) -> None:
    page.goto(url(daemon, "/"))
    files = daemon.get("/v1/files")["items"]
    rejects: collections.Counter[str] = collections.Counter()
    for entry in files:
        rejects.update(daemon.get(f"/v1/files/{entry['file_id']}")["rejected_by_reason"])
    failed = collections.Counter(f["error_reason"] for f in files if f["status"] == "failed")
    shown_rejects = {
        row.get_attribute("data-reject-reason"): number(row.locator("td").nth(1).inner_text())
        for row in page.locator("tr[data-reject-reason]").all()
    }
    shown_failed = {
        row.get_attribute("data-failed-reason"): number(row.locator("td").nth(1).inner_text())
        for row in page.locator("tr[data-failed-reason]").all()
    }
    assert shown_rejects == dict(rejects)
    assert shown_failed == dict(failed)
    assert shown_failed == {"unknown_header": 1}


def test_daily_chart_and_table_equal_the_daily_answer(page: Any, daemon: DaemonProcess) -> None:
    page.goto(url(daemon, "/?from=2022-01-01&to=2022-01-31"))
    days = daemon.get("/v1/daily", **{"from": "2022-01-01", "to": "2022-01-31"})["days"]
    rows = [  # in a closed <details>: read the text, not what is rendered
        tuple(cell.strip() for cell in row.locator("td").all_text_contents())
        for row in page.locator("#daily-table tbody tr").all()
    ]
    assert rows == [
        (d["date"], d["type"], str(d["transaction_count"]), d["total_amount"]) for d in days
    ]
    for kind in ("deposit", "withdrawal", "purchase"):
        expected = sum((Decimal(d["total_amount"]) for d in days if d["type"] == kind), Decimal(0))
        assert page.locator(f"[data-sum={kind}]").inner_text() == f"{expected:.2f}"
    chart = page.locator("svg.chart")
    assert chart.get_attribute("role") == "img"
    assert "2022-01-01 to 2022-01-31 (31 days)" in page.locator("#chart-desc").text_content()
    assert chart.locator("polyline").count() == 3
    assert page.locator("#daily-from").input_value() == "2022-01-01"


def test_top_users_equal_the_top_answer(page: Any, daemon: DaemonProcess) -> None:
    page.goto(url(daemon, "/?top=20"))
    top = daemon.get("/v1/users/top", limit=20)["users"]
    rows = [
        tuple(cell.strip() for cell in row.locator("td").all_inner_texts())
        for row in page.locator("#top tbody tr[data-rank]").all()
    ]
    assert rows == [
        (str(u["rank"]), str(u["user_id"]), u["country"] or "—", f"{u['transaction_count']:,}")
        for u in top
    ]


def test_a_user_is_looked_up_by_id_and_the_view_is_a_url(page: Any, daemon: DaemonProcess) -> None:
    user_id = daemon.get("/v1/users/top", limit=1)["users"][0]["user_id"]
    page.goto(url(daemon, "/?top=5"))
    page.fill("#user-id", str(user_id))
    page.click("#user button[type=submit]")
    page.wait_for_selector(f"[data-user='{user_id}']")
    assert f"user_id={user_id}" in page.url
    assert "top=5" in page.url  # the other choices are kept
    summary = daemon.get(f"/v1/users/{user_id}/summary")
    for key in ("total_amount", "total_deposit", "total_withdrawal", "total_purchase"):
        assert page.locator(f"[data-figure={key}]").inner_text() == summary[key]
    assert page.locator("[data-figure=country]").inner_text() == summary["country"]
    assert (
        number(page.locator("[data-figure=transaction_count]").inner_text())
        == (summary["transaction_count"])
    )
    page.goto(url(daemon, "/?user_id=987654321"))
    assert "no user 987654321" in page.locator("#user [role=alert]").inner_text()


def test_a_refresh_never_replaces_a_form_being_filled_in(page: Any, daemon: DaemonProcess) -> None:
    page.goto(url(daemon, "/?user_id=2"))
    page.locator("[data-user='2']").wait_for()
    page.fill("#user-id", "12")
    page.focus("#user-id")
    with page.expect_response(lambda r: "/partials/user" in r.url):  # a refresh of that section
        pass
    page.wait_for_timeout(100)  # swapped in
    assert page.input_value("#user-id") == "12"
    assert page.evaluate("document.activeElement.id") == "user-id"


# --- live updates, a file's page, uploads ------------------------------------------------------


def test_a_dropped_file_shows_up_without_a_reload(
    page: Any, daemon: DaemonProcess, tmp_path: Path
) -> None:
    page.goto(url(daemon, "/"))
    page.evaluate("window.notReloaded = true")
    rows = [(700000 + n, 1, "2022-01-05", "1.00", "deposit") for n in range(5)]
    rows += [(710000 + n, 1, "2022-01-05", f"<b>{n}</b>", "deposit") for n in range(BAD_ROWS)]
    source = write_transactions(tmp_path / ".many_rejects.csv.tmp", rows)
    os.rename(source, daemon.inbox / "many_rejects.csv")
    row = page.locator("#files tbody tr", has_text="many_rejects.csv")
    row.wait_for(timeout=20_000)
    assert page.evaluate("window.notReloaded") is True  # htmx swapped the section in place
    assert number(row.locator("[data-col=rows_loaded]").inner_text()) == 5
    assert number(row.locator("[data-col=rows_rejected]").inner_text()) == BAD_ROWS
    page.locator("tr[data-reject-reason=bad_amount]").wait_for()


def test_a_files_page_pages_its_rejects_escaped(page: Any, daemon: DaemonProcess) -> None:
    entry = next(f for f in daemon.get("/v1/files")["items"] if f["name"] == "many_rejects.csv")
    page.goto(url(daemon, "/"))
    page.click("#files a:text('many_rejects.csv')")
    page.wait_for_selector("#rejects")
    assert page.url.endswith(f"/files/{entry['file_id']}")
    api = daemon.get(f"/v1/files/{entry['file_id']}/rejects", limit=50)
    shown = [
        tuple(cell.strip() for cell in row.locator("td").all_inner_texts())
        for row in page.locator("#rejects tbody tr").all()
    ]
    assert shown == [
        (str(r["line"]), r["reason"], r["message"], r["raw_line"]) for r in api["items"]
    ]
    assert page.locator("#rejects b").count() == 0  # raw lines are text, never markup
    page.click("a[rel=next]")
    page.wait_for_selector("a[rel=prev]")
    assert page.locator("#rejects tbody tr").count() == BAD_ROWS - 50
    assert page.url.endswith("?offset=50")


def test_a_refused_files_page_gives_its_reason(page: Any, daemon: DaemonProcess) -> None:
    broken = next(f for f in daemon.get("/v1/files")["items"] if f["name"] == "broken.csv")
    page.goto(url(daemon, "/"))
    page.click("#files a:text('broken.csv')")
    page.wait_for_selector("[data-figure=error_reason]")
    assert page.locator("[data-figure=error_reason]").inner_text() == broken["error_reason"]
    assert page.locator("[data-figure=error]").inner_text() == broken["error"]
    assert "refused whole" in page.locator("main").inner_text()


def test_a_file_uploaded_through_the_form_is_loaded(
    page: Any, daemon: DaemonProcess, tmp_path: Path
) -> None:
    rows = [(800000 + n, 2, "2022-02-02", "2.50", "purchase") for n in range(7)]
    source = write_transactions(tmp_path / "from-the-form.csv", rows)
    sha256 = hashlib.sha256(source.read_bytes()).hexdigest()
    page.goto(url(daemon, "/"))
    page.evaluate("window.notReloaded = true")
    page.set_input_files("#upload-file", str(source))
    page.click("#upload button[type=submit]")
    assert "from-the-form.csv" in page.locator("[data-upload=queued]").inner_text()
    row = page.locator("#files tbody tr", has_text="from-the-form.csv")
    row.wait_for(timeout=20_000)
    assert number(row.locator("[data-col=rows_loaded]").inner_text()) == 7
    assert daemon.get(f"/v1/files/sha256/{sha256}")["rows_loaded"] == 7
    assert page.evaluate("window.notReloaded") is True


# --- screenshots, layout -----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "width", "height"), [("desktop", 1280, 900), ("phone", 390, 844)])
def test_screenshot_and_no_sideways_scroll(
    page: Any, daemon: DaemonProcess, tmp_path: Path, name: str, width: int, height: int
) -> None:
    page.set_viewport_size({"width": width, "height": height})
    try:
        user_id = daemon.get("/v1/users/top", limit=1)["users"][0]["user_id"]
        page.goto(url(daemon, f"/?from=2022-03-01&to=2022-03-31&user_id={user_id}"))
        page.wait_for_selector("svg.chart")
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        folder = Path(os.environ.get("MONEYLION_SCREENSHOTS") or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"dashboard-{name}.png"
        page.screenshot(path=str(target), full_page=True)
        assert target.stat().st_size > 10_000
    finally:
        page.set_viewport_size({"width": 1280, "height": 900})


def test_no_console_errors_and_nothing_from_another_origin(
    page: Any, daemon: DaemonProcess
) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    response = page.goto(url(daemon, "/"))
    # No inline script or style is allowed, so a CSP violation would show in the console.
    assert "script-src 'self'; style-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_timeout(2_500)  # at least one round of polling
    origin = url(daemon, "/")
    assert requested, "the page made no request"
    assert [u for u in requested if not u.startswith(origin)] == []
    assert any("/partials/" in u for u in requested)
    assert page.console_errors == []


def test_the_api_answers_401_to_the_browser_without_the_cookie(daemon: DaemonProcess) -> None:
    response = httpx.get(url(daemon, "/partials/state"), timeout=10)
    assert response.status_code == 401
