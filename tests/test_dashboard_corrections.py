"""Corrections and checks from the dashboard in a real browser: Debian's chromium (Playwright,
``tests/browser.py``) on a real ``moneylion serve`` child with an api_token, logged in through
the login form as in ``test_dashboard_browser.py``.

A file's page retracts it (a dialog asks why; the reason is required), restores it, releases a
held file; the upload form's "Check first" shows what the chosen file would do before it is
uploaded. Every figure shown is checked against the JSON API's answer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import chromium
from tests.daemon_process import DaemonProcess, wait_for, write_transactions

TOKEN = "dashboard-corrections-token-0123456789"  # noqa: S105 - a test token
MAX_REJECT_SHARE = "0.5"
FIRST = [(1000 + n, 1, "2022-03-01", "10.00", "deposit") for n in range(4)]
# Its first row has the id of FIRST's first with another amount: conflicts_with_stored while
# FIRST is in, loaded once FIRST is retracted.
SECOND = [(1000, 2, "2022-03-02", "99.00", "purchase")] + [
    (2000 + n, 2, "2022-03-02", "5.00", "purchase") for n in range(3)
]
# Three rows of four refused: held when max_reject_share is 0.5.
MOSTLY_BAD = [(3000, 3, "2022-03-03", "1.00", "deposit")] + [
    (3001 + n, 3, "2022-03-03", "1.00", "bonus") for n in range(3)
]


def drop(daemon: DaemonProcess, staging: Path, name: str, rows: list[tuple[Any, ...]]) -> int:
    """Move a file of ``rows`` into the inbox whole; its file id once in the ledger."""
    source = write_transactions(staging / name, rows)
    os.rename(source, daemon.inbox / name)
    wait_for(lambda: any(f["name"] == name for f in daemon.ledger()), 30, f"{name} to be ingested")
    return int(next(f["file_id"] for f in daemon.ledger() if f["name"] == name))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    base = tmp_path_factory.mktemp("dashboard-corrections")
    inbox = base / "inbox"
    inbox.mkdir()
    process = DaemonProcess(
        inbox,
        base / "warehouse",
        settle_seconds=0.1,
        env={"MONEYLION_API_TOKEN": TOKEN, "MONEYLION_MAX_REJECT_SHARE": MAX_REJECT_SHARE},
    )
    process.client.headers["Authorization"] = f"Bearer {TOKEN}"
    process.start()
    try:
        yield process
    finally:
        process.close()


@pytest.fixture(scope="module")
def files(daemon: DaemonProcess, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    staging = tmp_path_factory.mktemp("staging")
    return {
        "first": drop(daemon, staging, "first.csv", FIRST),
        "second": drop(daemon, staging, "second.csv", SECOND),
        "mostly_bad": drop(daemon, staging, "mostly_bad.csv", MOSTLY_BAD),
    }


@pytest.fixture(scope="module")
def page(daemon: DaemonProcess) -> Iterator[Any]:
    """One page logged in through the login form, its console errors recorded."""
    with chromium() as browser:
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


def route_exists(daemon: DaemonProcess, path: str) -> bool:
    """Whether the daemon serves ``path`` (its OpenAPI schema lists every route)."""
    return path in daemon.get("/schema/openapi.json")["paths"]


def status_of(daemon: DaemonProcess, file_id: int) -> str:
    return str(daemon.get(f"/v1/files/{file_id}")["status"])


# --- retract and restore -----------------------------------------------------------------------


def test_retract_asks_why_then_takes_the_file_out_and_shows_the_result(
    page: Any, daemon: DaemonProcess, files: dict[str, int]
) -> None:
    first, second = files["first"], files["second"]
    assert daemon.get(f"/v1/files/{second}")["rows_loaded"] == 3  # one row conflicts with first
    page.goto(url(daemon, f"/files/{first}"))
    assert page.locator("[data-figure=status]").inner_text() == "loaded"
    requests: list[str] = []
    page.on("request", lambda r: r.method == "POST" and requests.append(r.url))

    page.click("button[data-opens=correct-dialog]")
    dialog = page.locator("#correct-dialog")
    assert dialog.is_visible()
    assert page.evaluate("document.activeElement.id") == "correct-reason"
    page.click("#correct-dialog button[type=submit]")  # no reason: the form asks for one
    assert dialog.is_visible()
    assert requests == []
    page.click("#correct-dialog [data-closes]")  # cancel: nothing sent
    assert not dialog.is_visible()
    assert requests == []

    page.click("button[data-opens=correct-dialog]")
    page.fill("#correct-reason", "sent by the wrong branch")
    with page.expect_response(lambda r: r.url.endswith(f"/v1/files/{first}/retract")) as sent:
        page.click("#correct-dialog button[type=submit]")
    answer = sent.value.json()
    assert sent.value.status == 200
    # The session's own origin: what the access rules ask of a cookie's unsafe request.
    assert sent.value.request.all_headers()["origin"] == url(daemon, "")
    result = page.locator("#correction-result [data-result=retract]")
    result.wait_for()
    assert result.locator("[data-result-status]").inner_text() == "retracted"
    assert f"change #{answer['change_id']}" in result.inner_text()
    assert "4 rows out, 1 row in" in result.inner_text()

    # The page is the server's again: the status, when and why, the history, the next action.
    page.locator("[data-figure=status]", has_text="retracted").wait_for()
    detail = daemon.get(f"/v1/files/{first}")
    assert detail["status"] == "retracted"
    (correction,) = detail["corrections"]
    assert correction["reason"] == "sent by the wrong branch"
    assert correction["action"] == "retract"
    assert page.locator("[data-figure=why]").inner_text() == "sent by the wrong branch"
    assert f"(change #{answer['change_id']})" in page.locator("[data-figure=since]").inner_text()
    assert correction["made_at"][:19].replace("T", " ") in page.locator("#corrections").inner_text()
    assert page.locator("button[data-opens=correct-dialog]").inner_text() == "Restore…"
    # The row of the second file that conflicted with the first loaded.
    assert daemon.get(f"/v1/files/{second}")["rows_loaded"] == 4


def test_the_files_list_shows_the_retracted_file_apart(
    page: Any, daemon: DaemonProcess, files: dict[str, int]
) -> None:
    page.goto(url(daemon, "/"))
    row = page.locator(f"#files tbody tr[data-file-id='{files['first']}']")
    badge = row.locator(".status")
    assert badge.inner_text() == "retracted"
    assert "status-retracted" in (badge.get_attribute("class") or "")
    assert badge.evaluate("e => getComputedStyle(e).borderTopStyle") == "dashed"
    assert row.locator("[data-col=rows_loaded]").inner_text() == "0"


def test_restore_puts_the_file_back_without_a_reason(
    page: Any, daemon: DaemonProcess, files: dict[str, int]
) -> None:
    first = files["first"]
    if status_of(daemon, first) != "retracted":
        pytest.skip("needs the retraction of the test before")
    page.goto(url(daemon, f"/files/{first}"))
    page.click("button[data-opens=correct-dialog]")
    page.click("#correct-dialog button[type=submit]")  # the reason is optional here
    page.locator("#correction-result [data-result=restore]").wait_for()
    page.locator("[data-figure=status]", has_text="loaded").wait_for()
    assert status_of(daemon, first) == "loaded"
    assert page.locator("#corrections tbody tr").count() == 2
    assert daemon.get(f"/v1/files/{files['second']}")["rows_loaded"] == 3
    assert page.locator("button[data-opens=correct-dialog]").inner_text() == "Retract…"


def test_a_refused_correction_says_why_in_the_dialog(
    page: Any, daemon: DaemonProcess, files: dict[str, int]
) -> None:
    """The page offers what the status allowed when it was drawn; another client may have
    acted since: the API's 409 is shown, nothing changes."""
    first = files["first"]
    page.goto(url(daemon, f"/files/{first}"))
    retracted = daemon.client.post(f"/v1/files/{first}/retract", json={"reason": "elsewhere"})
    assert retracted.status_code == 200
    try:
        page.click("button[data-opens=correct-dialog]")
        page.fill("#correct-reason", "twice")
        page.click("#correct-dialog button[type=submit]")
        error = page.locator("#correct-dialog [data-correction-error]")
        error.wait_for()
        assert error.inner_text().startswith("409: ")
        assert "retract applies to a file that is loaded" in error.inner_text()
        assert page.locator("#correct-dialog").is_visible()
        # The browser logs the refused request itself; nothing else went wrong.
        assert [e for e in page.console_errors if "409" not in e] == []
        page.console_errors.clear()
    finally:
        daemon.client.post(f"/v1/files/{first}/restore", json={})


# --- held files --------------------------------------------------------------------------------


def test_a_held_file_shows_why_and_is_released_from_its_page(
    page: Any, daemon: DaemonProcess, files: dict[str, int]
) -> None:
    if not route_exists(daemon, "/v1/files/{file_id}/release"):
        pytest.skip("POST /v1/files/{id}/release is not served by this tree")
    held = files["mostly_bad"]
    assert status_of(daemon, held) == "held"
    page.goto(url(daemon, "/"))
    assert page.locator("[data-figure=held_files]").inner_text().startswith("1")
    badge = page.locator(f"#files tbody tr[data-file-id='{held}'] .status")
    assert badge.inner_text() == "held"
    page.goto(url(daemon, f"/files/{held}"))
    detail = daemon.get(f"/v1/files/{held}")
    assert page.locator("dt", has_text="Held because").count() == 1
    assert page.locator("[data-figure=error_reason]").inner_text() == detail["error_reason"]
    # The ledger counts its good rows as loaded; none is in the warehouse while it is held.
    assert "1 to load once released, 0 duplicate, 3 rejected" in page.locator("main").inner_text()
    assert page.locator("button[data-opens=correct-dialog]").inner_text() == "Release…"
    page.click("button[data-opens=correct-dialog]")
    page.fill("#correct-reason", "the bonus rows are known; load the rest")
    page.click("#correct-dialog button[type=submit]")
    page.locator("#correction-result [data-result=release]").wait_for()
    page.locator("[data-figure=status]", has_text="loaded").wait_for()
    released = daemon.get(f"/v1/files/{held}")
    assert released["status"] == "loaded"
    assert released["rows_loaded"] == 1
    assert daemon.get("/v1/health/ready")["held_files"] == 0


# --- check first -------------------------------------------------------------------------------


def test_check_first_shows_what_the_file_would_do_and_keeps_nothing(
    page: Any, daemon: DaemonProcess, files: dict[str, int], tmp_path: Path
) -> None:
    if not route_exists(daemon, "/v1/checks"):
        pytest.skip("POST /v1/checks is not served by this tree")
    rows = [(4000 + n, 4, "2022-03-04", "2.50", "withdrawal") for n in range(5)]
    rows += [(4100, 4, "2022-03-04", "2.5x", "withdrawal"), (1001, 1, "2022-03-01", "1.00", "x")]
    source = write_transactions(tmp_path / "to-check.csv", rows)
    expected = daemon.client.post(
        "/v1/checks", params={"name": "to-check.csv"}, content=source.read_bytes()
    ).json()
    ledger_before = daemon.get("/v1/files")["total"]

    page.goto(url(daemon, "/"))
    page.click("#check-first")  # no file chosen yet: the browser asks for one, nothing is sent
    assert page.locator("#check-result").inner_text() == ""
    page.set_input_files("#upload-file", str(source))
    page.click("#check-first")
    outcome = page.locator("#check-result [data-check-outcome]")
    outcome.wait_for()
    assert outcome.get_attribute("data-check-outcome") == expected["outcome"] == "would_load"
    for key in ("total", "loaded", "duplicate", "rejected"):
        shown = page.locator(f"#check-result [data-check-rows={key}]").inner_text()
        assert int(shown.replace(",", "")) == expected["rows"][key]
    assert expected["rows"]["rejected"] == 2
    shown_rejects = {
        row.get_attribute("data-check-reject"): int(row.locator("td").nth(1).inner_text())
        for row in page.locator("#check-result tr[data-check-reject]").all()
    }
    assert shown_rejects == {g["reason"]: g["count"] for g in expected["rejects"]}
    effect = expected["effect"]
    assert page.locator("[data-check-effect=users]").inner_text() == str(effect["users_touched"])
    assert page.locator("[data-check-effect=days]").inner_text() == str(effect["days_touched"])
    assert daemon.get("/v1/files")["total"] == ledger_before  # nothing kept

    # Then the upload itself; a new file chosen clears the report.
    page.click("#upload button[type=submit]")
    assert "to-check.csv" in page.locator("[data-upload=queued]").inner_text()
    wait_for(lambda: daemon.get("/v1/files")["total"] == ledger_before + 1, 30, "the upload")
    other = write_transactions(tmp_path / "another.csv", rows[:1])
    page.set_input_files("#upload-file", str(other))
    assert page.locator("#check-result").inner_text() == ""


def test_check_first_of_bytes_in_the_ledger_links_their_file(
    page: Any, daemon: DaemonProcess, files: dict[str, int], tmp_path: Path
) -> None:
    if not route_exists(daemon, "/v1/checks"):
        pytest.skip("POST /v1/checks is not served by this tree")
    source = write_transactions(tmp_path / "first-again.csv", FIRST)
    page.goto(url(daemon, "/"))
    page.set_input_files("#upload-file", str(source))
    page.click("#check-first")
    page.locator("#check-result [data-check-outcome=seen_before]").wait_for()
    link = page.locator("#check-result a")
    assert link.get_attribute("href") == f"/files/{files['first']}"


def test_no_console_errors_through_the_actions(page: Any) -> None:
    """No policy violation (no inline script or style) and no script error on the way."""
    assert page.console_errors == []
