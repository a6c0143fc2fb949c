"""Hostile clients and inputs, one test per case of the table below, each against a real
``moneylion serve`` (real uvicorn, real sockets, real files; an "evil" origin in the headers,
real zstd and gzip bombs built here, real Delta tables written by another writer). Every case
is followed by an ordinary request or file that must still work, and every test that ingests
ends with ``verify`` (incremental aggregates equal a full recompute, to the cent).

| row | what a hostile client or input tries | tests |
|---|---|---|
| 1 | a decompression bomb; a disk about to fill | ``test_a_zstd_bomb_...``, |
|   |   | ``test_a_gzip_bomb_...``, ``test_files_wait_...`` |
| 2 | a foreign Host (DNS rebinding), a cross-site upload | ``test_a_foreign_host_is_421_...`` |
| 3 | the login cookie from another origin | ``test_the_login_cookie_changes_nothing_...`` |
| 4 | a session cookie after logout | ``test_a_session_ends_at_logout_...`` |
| 5 | a silent connection, a drip-fed head, a slow body, a flood | ``test_a_connection_that_...`` |
|   |   | and the four tests after it |
| 6 | a 9.8 MB login body | ``test_a_huge_login_body_is_refused_413_...`` |
| 7 | a 5,000-digit id or amount | ``test_a_number_of_5000_digits_...`` (one per numeric field) |
| 8 | a 400 KB field | ``test_a_400_kb_field_...``, ``test_a_page_of_rejects_ends_...`` |
| 9 | a forged log line in a path | ``test_a_forged_log_line_in_a_path_...`` |
| 10 | the API docs page from a CDN | ``test_the_api_docs_page_...`` (two) |
| 11 | every date in one answer | ``test_daily_and_monthly_pages_...`` |
| 12 | warehouse files readable by other users | ``test_warehouse_files_give_other_users_...`` |
| 13 | failed tokens in a loop | ``test_failed_tokens_are_limited_per_client_...`` |
| 14 | a malformed or rule-breaking row in the shared lake | ``test_a_hostile_lake_row_...`` |
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gzip
import hashlib
import os
import random
import re
import select
import socket
import sqlite3
import stat
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pyarrow as pa
import pytest
import zstandard
from deltalake import DeltaTable, write_deltalake

from moneylion.api.server import BODY_WINDOW_SECONDS, CONNECTION_RESERVE
from moneylion.api.v1 import AGGREGATE_MAX_PAGE, AGGREGATE_PAGE
from moneylion.config import Config, load_config
from moneylion.source import RATIO_FROM_BYTES
from tests.browser import chromium
from tests.conftest import TX_HEADER, TYPES, USERS_HEADER
from tests.daemon_process import (
    DaemonProcess,
    assert_api_totals,
    logged_events,
    random_transactions,
    wait_for,
    warehouse_totals,
    write_transactions,
)
from tests.expected import Expected
from tests.lake_scenario import (
    USERS,
    Independent,
    answered,
    api_answers,
    expected_answers,
    lake_daemon,
    ledger_rows,
    settled,
    verify_differences,
)
from tests.lake_scenario import drop as drop_in_lake_inbox
from tests.test_compressed import zstd_bomb
from tests.test_hostile_inbox import (
    drop,
    entries,
    finish,
    make_daemon,
    ordinary,
    reason_file,
    transactions_csv,
    wait_done,
)

pytestmark = pytest.mark.slow  # each starts real daemons


# -- row 1: decompression bombs and a full disk ----------------------------------------------------

MIB = 1024 * 1024


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], DaemonProcess]]:
    """Start a daemon on tmp_path's inbox and warehouse with extra MONEYLION_* settings."""
    started: list[DaemonProcess] = []

    def start(env: dict[str, str]) -> DaemonProcess:
        process = make_daemon(tmp_path, env)
        started.append(process)
        process.start()
        return process

    yield start
    for process in started:
        process.close()


class StagingWatch:
    """The largest total size of the files in a staging folder, sampled until stopped."""

    def __init__(self, staging: Path) -> None:
        self.staging = staging
        self.largest = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _size(self) -> int:
        total = 0
        try:
            entries = list(os.scandir(self.staging))
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                total += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.largest = max(self.largest, self._size())
            self.samples += 1
            time.sleep(0.0005)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.largest


def staged(daemon: DaemonProcess) -> list[Path]:
    """The private copies in the daemon's staging folder (none before it was first needed)."""
    folder = daemon.warehouse / "staging"
    return sorted(folder.iterdir()) if folder.exists() else []


def disk_low(daemon: DaemonProcess) -> dict[str, Any] | None:
    found: dict[str, Any] | None = daemon.get("/v1/health/ready")["disk_low"]
    return found


def test_a_zstd_bomb_dropped_in_the_inbox_is_too_large_and_never_staged_past_its_cap(
    daemons: Callable[[dict[str, str]], DaemonProcess], outside: Path
) -> None:
    cap = 32 * MIB  # a few of the inflater's pieces (each up to ~32 MiB)
    daemon = daemons(
        {"MONEYLION_MAX_DECOMPRESSED_BYTES": str(cap), "MONEYLION_MIN_FREE_DISK_BYTES": str(MIB)}
    )
    bomb = zstd_bomb(outside / "bomb", 512 * MIB)  # a valid CSV: one row repeated
    assert bomb.stat().st_size < 64 * 1024
    watch = StagingWatch(daemon.warehouse / "staging")
    os.rename(bomb, daemon.inbox / "bomb.csv.zst")
    wait_done(daemon, "bomb.csv.zst", timeout=60)
    largest = watch.stop()

    [row] = entries(daemon, "bomb.csv.zst")
    assert (row["status"], row["error_reason"]) == ("failed", "too_large")
    assert f"max_decompressed_bytes ({cap} bytes)" in row["error"]
    assert reason_file(daemon, "bomb.csv.zst")["reason"] == "too_large"
    assert watch.samples > 0
    assert largest <= cap
    assert staged(daemon) == []

    expected = Expected()
    content = transactions_csv(1, 20)
    expected.add_transactions(content.decode())
    drop(daemon, outside, "after-bomb.csv", content)
    wait_done(daemon, "after-bomb.csv")
    assert entries(daemon, "after-bomb.csv")[0]["rows_loaded"] == 20
    finish(daemon, expected)


def gzip_bomb(inflated: int) -> bytes:
    """A gzip file of a CSV header then ``inflated`` bytes of zeros: one member of 64 MiB of
    zeros (deflate's best ratio, about 1030:1) repeated, each a valid gzip member."""
    header = gzip.compress(f"{TX_HEADER}\n".encode())
    deflate = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    member = deflate.compress(bytes(64 * MIB)) + deflate.flush()
    return header + member * -(-inflated // (64 * MIB))


def test_a_gzip_bomb_uploaded_is_refused_for_its_compression_ratio_past_1_gib(
    daemons: Callable[[dict[str, str]], DaemonProcess], outside: Path
) -> None:
    daemon = daemons({"MONEYLION_MIN_FREE_DISK_BYTES": str(MIB)})
    body = gzip_bomb(RATIO_FROM_BYTES + 128 * MIB)
    ratio = (RATIO_FROM_BYTES + 128 * MIB) / len(body)
    assert ratio > 1000  # the default max_compression_ratio
    answer = daemon.client.post("/v1/files", params={"name": "bomb.csv.gz"}, content=body)
    assert answer.status_code == 202, answer.text
    name = answer.json()["name"]
    poll = answer.json()["poll"]
    wait_for(
        lambda: daemon.client.get(poll).status_code == 200, 120, "the bomb in the ledger", step=0.5
    )
    row = daemon.get(poll)
    assert (row["status"], row["error_reason"]) == ("failed", "compression_ratio")
    assert "max_compression_ratio (1000)" in row["error"]
    wait_for(lambda: not daemon.inbox_waiting(), 30, "the bomb set aside")
    assert reason_file(daemon, name)["reason"] == "compression_ratio"
    assert staged(daemon) == []

    expected = Expected()
    content = transactions_csv(1, 20)
    expected.add_transactions(content.decode())
    after = daemon.client.post("/v1/files", params={"name": "after-bomb.csv"}, content=content)
    assert after.status_code == 202, after.text
    wait_done(daemon, after.json()["name"])
    assert daemon.get(after.json()["poll"])["rows_loaded"] == 20
    finish(daemon, expected)


def test_files_wait_in_the_inbox_while_the_disk_is_low_and_load_once_there_is_room(
    tmp_path: Path, daemons: Callable[[dict[str, str]], DaemonProcess], outside: Path
) -> None:
    stats = os.statvfs(tmp_path)
    floor = stats.f_bavail * stats.f_frsize + 1024**4  # more than the test's disk has free
    rescan = 0.3
    env = {"MONEYLION_MIN_FREE_DISK_BYTES": str(floor), "MONEYLION_RESCAN_SECONDS": str(rescan)}
    daemon = daemons(env)
    expected = Expected()
    plain = transactions_csv(1, 20, seed=1)
    packed = transactions_csv(100, 30, seed=2)
    expected.add_transactions(plain.decode())
    expected.add_transactions(packed.decode())
    drop(daemon, outside, "plain.csv", plain)
    drop(daemon, outside, "packed.csv.zst", zstandard.ZstdCompressor().compress(packed))

    wait_for(lambda: (disk_low(daemon) or {}).get("files_waiting") == 2, 30, "two files waiting")
    shown = disk_low(daemon)
    assert shown is not None
    assert shown["min_free_disk_bytes"] == floor
    assert 0 < shown["free_bytes"] < floor

    def low_events() -> list[dict[str, Any]]:
        return [e for e in logged_events(daemon.warehouse) if e.get("event") == "disk_low"]

    wait_for(lambda: len(low_events()) == 2, 10, "disk_low logged for both files")
    event = low_events()[0]
    assert event["min_free_disk_bytes"] == floor
    assert event["free_bytes"] < floor
    # Several rescans later: still waiting, never refused, and logged once per file.
    time.sleep(5 * rescan)
    assert sorted(e["file"] for e in low_events()) == ["packed.csv.zst", "plain.csv"]
    assert sorted(daemon.inbox_waiting()) == ["packed.csv.zst", "plain.csv"]
    assert daemon.get("/v1/files")["total"] == 0
    assert daemon.folder("failed") == []
    assert staged(daemon) == []
    assert daemon.stop() == 0

    # Room again (the floor lowered): both load as they are, and the answer says no more.
    roomy = daemons({**env, "MONEYLION_MIN_FREE_DISK_BYTES": str(MIB)})
    wait_done(roomy, "plain.csv", "packed.csv.zst")
    rows = {e["name"]: e for e in roomy.ledger()}
    assert {n: (r["status"], r["rows_loaded"]) for n, r in rows.items()} == {
        "plain.csv": ("loaded", 20),
        "packed.csv.zst": ("loaded", 30),
    }
    assert disk_low(roomy) is None
    content = transactions_csv(1000, 20, seed=3)
    expected.add_transactions(content.decode())
    drop(roomy, outside, "after.csv", content)
    wait_done(roomy, "after.csv")
    finish(roomy, expected)


# -- rows 2, 3, 4, 6, 13: hosts, origins, sessions, login bodies, failed tokens --------------------

TOKEN = "hostile-access-token-0123456789"  # noqa: S105 - a test token


WRONG = "not-the-token-but-long-enough-42"


EVIL = "http://evil.example"


BEARER = {"Authorization": f"Bearer {TOKEN}"}


SESSION = "moneylion_session"


BIG_BODY = 9_800_000  # bytes: the login body that once held the event loop for 4.5 s


PROMPT_SECONDS = 1.0  # liveness must answer within this while a big body is refused


def access_daemon(tmp_path: Path, token: bool = True, **env: str) -> DaemonProcess:
    settings = {**env, "MONEYLION_API_TOKEN": TOKEN} if token else env
    process = make_daemon(tmp_path, settings)
    if token:
        process.client.headers.update(BEARER)
    return process


@contextlib.contextmanager
def running(process: DaemonProcess) -> Iterator[DaemonProcess]:
    process.start()
    try:
        yield process
    finally:
        process.close()


def own_origin(daemon: DaemonProcess) -> str:
    return f"http://127.0.0.1:{daemon.port}"


def is_problem(response: httpx.Response, status: int) -> bool:
    return (
        response.status_code == status
        and response.headers["content-type"] == "application/problem+json"
        and response.json()["status"] == status
    )


def uploaded(daemon: DaemonProcess, answer: httpx.Response) -> None:
    """An accepted upload: 202, then its ledger row, loaded."""
    assert answer.status_code == 202, answer.text
    poll = answer.json()["poll"]
    wait_for(lambda: daemon.client.get(poll).status_code == 200, 60, f"{poll} in the ledger")
    assert daemon.get(poll)["status"] == "loaded"


def upload(daemon: DaemonProcess, expected: Expected, first_id: int, **headers: str) -> None:
    """An ordinary upload (curl-like unless ``headers`` say otherwise) that must be accepted."""
    content = transactions_csv(first_id, 20)
    answer = daemon.client.post(
        "/v1/files", params={"name": f"ordinary-{first_id}.csv"}, content=content, headers=headers
    )
    uploaded(daemon, answer)
    expected.add_transactions(content.decode())


def inbox_files(daemon: DaemonProcess) -> list[str]:
    return sorted(p.name for p in daemon.inbox.iterdir() if p.is_file())


def login(daemon: DaemonProcess) -> str:
    """Log in as the dashboard's form does (the browser sends its own Origin): the session."""
    answer = httpx.post(
        f"{own_origin(daemon)}/login",
        data={"token": TOKEN, "next": "/"},
        headers={"Origin": own_origin(daemon)},
        timeout=10,
    )
    assert answer.status_code == 303, answer.text
    value: str = answer.cookies[SESSION]
    return value


def with_session(value: str, **headers: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION}={value}", **headers}


def raw(port: int, request: bytes) -> bytes:
    """Send ``request`` on a fresh connection; everything read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := conn.recv(65536):
                answer += chunk
    return answer


def test_a_foreign_host_is_421_a_cross_site_write_403_and_scripts_still_upload(
    tmp_path: Path,
) -> None:
    """Default mode (loopback, no token): a DNS-rebinding page names its own host; a page on
    another site posts a CSV to the loopback API. Both are refused; curl and the dashboard's
    own pages still upload."""
    expected = Expected()
    with running(access_daemon(tmp_path, token=False)) as daemon:
        port = daemon.port
        for host in ("evil.example", f"evil.example:{port}", f"evil.example:{port}", "other.test"):
            assert is_problem(daemon.client.get("/v1/files", headers={"Host": host}), 421)
        assert is_problem(daemon.client.get("/", headers={"Host": "evil.example"}), 421)
        no_host = raw(port, b"GET /v1/files HTTP/1.0\r\n\r\n")
        assert no_host.startswith(b"HTTP/1.1 400 "), no_host[:200]
        # A probe naming the pod's address still learns that the daemon is alive, nothing more.
        assert daemon.client.get("/v1/health/live", headers={"Host": "10.1.2.3"}).status_code == 200

        content = transactions_csv(1, 20)
        for headers in (
            {"Origin": EVIL},
            {"Origin": "null"},
            {"Origin": f"http://127.0.0.1:{port + 1}"},  # another port is another origin
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site", "Origin": f"http://localhost:{port}"},
        ):
            refused = daemon.client.post("/v1/files", content=content, headers=headers)
            assert is_problem(refused, 403), (headers, refused.text)
        form = daemon.client.post(
            "/upload", files={"file": ("x.csv", content)}, headers={"Origin": EVIL}
        )
        assert is_problem(form, 403)
        assert is_problem(daemon.client.post("/login", headers={"Origin": EVIL}), 403)
        assert is_problem(daemon.client.post("/logout", headers={"Origin": EVIL}), 403)
        assert inbox_files(daemon) == []

        # Each refused host is logged once, as a warning naming the config key to set.
        refusals = [e for e in logged_events(daemon.warehouse) if e["event"] == "host_refused"]
        assert sorted(e["host"] for e in refusals) == sorted(
            ["evil.example", f"evil.example:{port}", "other.test"]
        )
        assert {e["level"] for e in refusals} == {"WARNING"}
        assert {e["config_key"] for e in refusals} == {"allowed_hosts"}
        assert "allowed_hosts" in daemon.stderr_text()

        upload(daemon, expected, 100)  # curl: no Origin
        upload(
            daemon, expected, 200, Origin=own_origin(daemon), **{"Sec-Fetch-Site": "same-origin"}
        )
        finish(daemon, expected)


def test_the_login_cookie_changes_nothing_from_another_origin_and_the_token_still_uploads(
    tmp_path: Path,
) -> None:
    expected = Expected()
    with running(access_daemon(tmp_path)) as daemon:
        session = login(daemon)
        anonymous = httpx.Client(base_url=own_origin(daemon), timeout=10)
        with anonymous:
            # Safe methods: the cookie opens every page and the API docs the dashboard links.
            for path in ("/", "/v1/files", "/schema/openapi.json"):
                assert anonymous.get(path, headers=with_session(session)).status_code == 200
            content = transactions_csv(1, 20)
            for headers in (
                with_session(session, Origin=EVIL),
                with_session(session, **{"Sec-Fetch-Site": "cross-site"}),
                with_session(session),  # no Origin at all: not a browser's same-origin post
                {**BEARER, "Origin": EVIL},  # the Origin rule holds for the token too
            ):
                refused = anonymous.post("/v1/files", content=content, headers=headers)
                assert is_problem(refused, 403), (headers, refused.text)
            form = anonymous.post(
                "/upload",
                files={"file": ("x.csv", content)},
                headers=with_session(session, Origin=EVIL),
            )
            assert is_problem(form, 403)
            assert inbox_files(daemon) == []
            assert is_problem(
                anonymous.get("/v1/files", headers={**BEARER, "Host": "evil.example"}), 421
            )
            # The dashboard's own form (its origin, as the browser sends it) and a script's token.
            own = with_session(session, Origin=own_origin(daemon))
            uploaded(daemon, anonymous.post("/v1/files", content=content, headers=own))
            expected.add_transactions(content.decode())
        upload(daemon, expected, 100)
        finish(daemon, expected)


@pytest.mark.serial  # a session of 6 s must still open pages before it expires
def test_a_session_ends_at_logout_at_its_max_age_and_at_a_restart(tmp_path: Path) -> None:
    expected = Expected()
    daemon = access_daemon(tmp_path, MONEYLION_SESSION_MAX_AGE_SECONDS="6")
    base = own_origin(daemon)
    page = httpx.Client(base_url=base, timeout=10)
    try:
        daemon.start()
        answer = page.post("/login", data={"token": TOKEN, "next": "/"}, headers={"Origin": base})
        assert "Max-Age=6" in answer.headers["set-cookie"]
        first = answer.cookies[SESSION]
        page.cookies.clear()
        second = login(daemon)
        assert first != second
        assert TOKEN not in first
        assert page.get("/v1/files", headers=with_session(first)).status_code == 200
        out = page.post("/logout", headers=with_session(first, Origin=base))
        assert out.status_code == 303
        assert "Max-Age=0" in out.headers["set-cookie"]
        # The value kept after the logout (a copy, a stolen cookie) no longer opens anything.
        assert page.get("/v1/files", headers=with_session(first)).status_code == 401
        assert page.get("/", headers=with_session(first)).status_code == 401
        # Another login's session is not affected, until its own Max-Age passes.
        assert page.get("/v1/files", headers=with_session(second)).status_code == 200
        wait_for(
            lambda: page.get("/v1/files", headers=with_session(second)).status_code == 401,
            30,
            "the session to expire after its Max-Age",
        )
        third = login(daemon)
        assert page.get("/v1/files", headers=with_session(third)).status_code == 200
        # A restart ends every session (a new per-process secret).
        assert daemon.stop() == 0
        daemon.start()
        assert page.get("/v1/files", headers=with_session(third)).status_code == 401
        fresh = login(daemon)
        assert page.get("/v1/files", headers=with_session(fresh)).status_code == 200
        upload(daemon, expected, 1)
        finish(daemon, expected)
    finally:
        page.close()
        daemon.close()
    logs = "".join(p.read_text() for p in daemon.warehouse.glob("child-*.err")) + "".join(
        p.read_text() for p in (daemon.warehouse / "logs").glob("moneylion.log*")
    )
    for secret in (TOKEN, first, second, third, fresh):
        assert secret not in logs


def _post_big_login(port: int, chunked: bool) -> bytes:
    """A 9.8 MB login form, sent whole (as fast as the server takes it); the answer."""
    origin = f"http://127.0.0.1:{port}"
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BIG_BODY}"
    head = (
        f"POST /login HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {origin}\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\n{framing}\r\n\r\n"
    ).encode()
    piece = b"token=" + b"a" * (64 * 1024 - 6)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head)
        with contextlib.suppress(OSError):  # the server may answer and close before the end
            for _ in range(BIG_BODY // len(piece)):
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            if chunked:
                conn.sendall(b"0\r\n\r\n")
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while chunk := conn.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and b"}" in answer:
                    break
    return answer


@pytest.mark.serial  # asserts how long an answer takes
def test_a_huge_login_body_is_refused_413_while_liveness_answers_promptly(tmp_path: Path) -> None:
    with running(access_daemon(tmp_path)) as daemon:
        for chunked in (False, True):
            answers: list[bytes] = []
            sender = threading.Thread(
                target=lambda c=chunked, a=answers: a.append(_post_big_login(daemon.port, c))
            )
            waits: list[float] = []
            with httpx.Client(base_url=own_origin(daemon), timeout=30) as probe:
                sender.start()
                while sender.is_alive() or len(waits) < 5:
                    started = time.monotonic()
                    assert probe.get("/v1/health/live").status_code == 200
                    waits.append(time.monotonic() - started)
                sender.join()
            assert answers[0].startswith(b"HTTP/1.1 413 "), answers[0][:300]
            assert b"application/problem+json" in answers[0]
            assert max(waits) < PROMPT_SECONDS, (chunked, max(waits))
        # An ordinary login still works, and so does what its session opens.
        session = login(daemon)
        answer = httpx.get(f"{own_origin(daemon)}/", headers=with_session(session))
        assert answer.status_code == 200


def test_failed_tokens_are_limited_per_client_while_the_right_token_always_passes(
    tmp_path: Path,
) -> None:
    """127.0.0.2 plays a trusted proxy (its X-Forwarded-For names the client); 127.0.0.1 is a
    client that is not a proxy, whose X-Forwarded-For is its own claim and ignored."""
    limit = load_config(environ={}).auth_failures_per_minute
    expected = Expected()
    daemon = access_daemon(tmp_path, MONEYLION_TRUSTED_PROXIES="127.0.0.2")
    with running(daemon):
        base = own_origin(daemon)
        proxy = httpx.Client(
            base_url=base, timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.2")
        )
        direct = httpx.Client(base_url=base, timeout=10)
        with proxy, direct:

            def wrong(client: httpx.Client, forwarded: str | None = None) -> httpx.Response:
                headers = {"Authorization": f"Bearer {WRONG}"}
                if forwarded is not None:
                    headers["X-Forwarded-For"] = forwarded
                return client.get("/v1/files", headers=headers)

            # A client behind the proxy: `limit` failures answered 401, then 429.
            for _ in range(limit):
                assert wrong(proxy, "203.0.113.7").status_code == 401
            locked = wrong(proxy, "203.0.113.7")
            assert is_problem(locked, 429)
            assert 1 <= int(locked.headers["retry-after"]) <= 60
            # Prepending another address does not escape: the proxy's own hop is the rightmost.
            assert wrong(proxy, "198.51.100.9, 203.0.113.7").status_code == 429
            form = proxy.post(
                "/login",
                data={"token": WRONG},
                headers={"X-Forwarded-For": "203.0.113.7", "Origin": base},
            )
            assert form.status_code == 429
            assert "Too many failed attempts" in form.text
            assert form.headers["retry-after"]
            # The right token is never refused, locked out or not.
            right = {**BEARER, "X-Forwarded-For": "203.0.113.7"}
            assert proxy.get("/v1/files", headers=right).status_code == 200
            passed = proxy.post(
                "/login",
                data={"token": TOKEN},
                headers={"X-Forwarded-For": "203.0.113.7", "Origin": base},
            )
            assert passed.status_code == 303
            # Other clients behind the same proxy, and the proxy itself, are not locked out.
            assert wrong(proxy, "203.0.113.8").status_code == 401
            assert wrong(proxy).status_code == 401

            # A client that is not a trusted proxy cannot pose as many with X-Forwarded-For.
            for n in range(limit):
                assert wrong(direct, f"192.0.2.{n}").status_code == 401
            assert wrong(direct, "192.0.2.200").status_code == 429
            assert direct.get("/v1/files", headers=BEARER).status_code == 200

        lockouts = [e for e in logged_events(daemon.warehouse) if e["event"] == "auth_locked_out"]
        assert sorted(e["client"] for e in lockouts) == ["127.0.0.1", "203.0.113.7"]  # once each
        assert {e["level"] for e in lockouts} == {"WARNING"}
        upload(daemon, expected, 1)
        finish(daemon, expected)


# -- row 5: slow clients and the connection bound --------------------------------------------------

HEAD_SECONDS = 1.0


MIN_RATE = 16 * 1024  # bytes/s: high enough that a test body can be slow in a few seconds


MAX_CONNECTIONS = 8


SLACK = 3.0  # seconds a timeout may be late by on a busy machine


def slow_daemon_process(tmp_path: Path, head_seconds: float = HEAD_SECONDS) -> DaemonProcess:
    return make_daemon(
        tmp_path,
        {
            "MONEYLION_REQUEST_HEAD_SECONDS": str(head_seconds),
            "MONEYLION_REQUEST_BODY_MIN_RATE": str(MIN_RATE),
            "MONEYLION_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        },
    )


@pytest.fixture
def slow_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = slow_daemon_process(tmp_path)
    process.start()
    yield process
    process.close()


def connect(daemon: DaemonProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", daemon.port), timeout=30)


def head(daemon: DaemonProcess, method: str, target: str, *extra: str) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{daemon.port}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_to_eof(sock: socket.socket, timeout: float = 30.0) -> bytes:
    """Everything the server sends until it closes (a reset counts as the end)."""
    sock.settimeout(timeout)
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def status_of(answer: bytes) -> int:
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split(b" ", 2)[1])


def exchange(daemon: DaemonProcess, method: str, target: str, body: bytes = b"") -> bytes:
    """One request on a new connection (``Connection: close``): the whole answer."""
    with connect(daemon) as sock:
        extra = ["Connection: close", f"Content-Length: {len(body)}"]
        sock.sendall(head(daemon, method, target, *extra) + body)
        return read_to_eof(sock)


def ordinary_request_works(daemon: DaemonProcess) -> None:
    answer = exchange(daemon, "GET", "/v1/files")
    assert status_of(answer) == 200
    assert status_of(exchange(daemon, "GET", "/v1/health/live")) == 200


def events(daemon: DaemonProcess, name: str, at_least: int = 0) -> list[dict[str, Any]]:
    """The logged events of that name, once at least ``at_least`` of them are written."""

    def found() -> list[dict[str, Any]]:
        return [e for e in logged_events(daemon.warehouse) if e.get("event") == name]

    wait_for(lambda: len(found()) >= at_least, 10, f"{at_least} {name} events logged")
    return found()


def send_paced(sock: socket.socket, data: bytes, rate: int, step: float = 0.1) -> bool:
    """Send ``data`` at ``rate`` bytes/s in steady steps; False once the server has answered
    (or closed) before the end."""
    chunk = max(1, int(rate * step))
    start = time.monotonic()
    for n, offset in enumerate(range(0, len(data), chunk)):
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            return False
        try:
            sock.sendall(data[offset : offset + chunk])
        except (BrokenPipeError, ConnectionResetError):
            return False
        pause = start + (n + 1) * step - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return True


@pytest.mark.serial  # asserts how long an answer takes
def test_a_connection_that_sends_nothing_is_closed_after_the_head_timeout(
    slow_daemon: DaemonProcess,
) -> None:
    with connect(slow_daemon) as sock:
        opened = time.monotonic()
        answer = read_to_eof(sock)
        waited = time.monotonic() - opened
    assert answer == b""  # nothing was asked: closed without an answer
    assert HEAD_SECONDS * 0.9 <= waited <= HEAD_SECONDS + SLACK
    assert [e["answer"] for e in events(slow_daemon, "http_head_timeout", 1)] == ["close"]
    ordinary_request_works(slow_daemon)


@pytest.mark.serial  # asserts how long an answer takes
def test_a_head_drip_fed_a_line_at_a_time_is_answered_408_within_the_head_timeout(
    slow_daemon: DaemonProcess,
) -> None:
    """Each line comes well within the timeout; the head as a whole does not."""
    with connect(slow_daemon) as sock:
        opened = time.monotonic()
        sock.sendall(f"GET /v1/files HTTP/1.1\r\nHost: 127.0.0.1:{slow_daemon.port}\r\n".encode())
        lines = 0
        while not select.select([sock], [], [], 0.4)[0]:
            assert time.monotonic() - opened < HEAD_SECONDS + SLACK, "no answer to a slow head"
            sock.sendall(b"X-Drip-%d: 1\r\n" % lines)
            lines += 1
        answered = time.monotonic() - opened
        answer = read_to_eof(sock)
    assert lines >= 2
    assert HEAD_SECONDS * 0.9 <= answered <= HEAD_SECONDS + SLACK
    assert status_of(answer) == 408
    assert b"\r\nconnection: close\r\n" in answer
    assert b"content-type: application/problem+json" in answer
    assert b'"status": 408' in answer
    assert [e["answer"] for e in events(slow_daemon, "http_head_timeout", 1)] == [408]
    ordinary_request_works(slow_daemon)


@pytest.mark.serial  # asserts how long an answer takes
def test_a_body_below_the_minimum_rate_is_answered_408_and_nothing_is_kept(
    slow_daemon: DaemonProcess,
) -> None:
    body = transactions_csv(1, 4000, seed=3)  # sent at an eighth of the rate: never whole
    with connect(slow_daemon) as sock:
        extra = [f"Content-Length: {len(body)}", "Content-Type: text/csv"]
        sock.sendall(head(slow_daemon, "POST", "/v1/files?name=slow.csv", *extra))
        started = time.monotonic()
        assert not send_paced(sock, body, MIN_RATE // 8), "a body below the rate was all sent"
        answered = time.monotonic() - started
        answer = read_to_eof(sock)
    assert BODY_WINDOW_SECONDS * 0.9 <= answered <= BODY_WINDOW_SECONDS + SLACK
    assert status_of(answer) == 408
    assert b"request_body_min_rate" in answer
    assert [e["answer"] for e in events(slow_daemon, "http_body_too_slow", 1)] == [408]
    uploads = slow_daemon.inbox / ".uploads"
    wait_for(lambda: not list(uploads.iterdir()), 10, "the partial upload removed")
    assert not (slow_daemon.inbox / "slow.csv").exists()
    ordinary_request_works(slow_daemon)
    assert slow_daemon.ledger() == []


@pytest.mark.serial  # asserts how long an answer takes
def test_a_slow_upload_above_the_minimum_rate_is_taken_whole_and_loads(
    slow_daemon: DaemonProcess,
) -> None:
    """Twice the minimum rate for longer than one window: the upload is never cut off."""
    body = transactions_csv(1, 9000, seed=4)
    rate = MIN_RATE * 2
    assert len(body) / rate > BODY_WINDOW_SECONDS  # the pace is judged at least once
    expected = Expected()
    expected.add_transactions(body.decode())
    with connect(slow_daemon) as sock:
        extra = ["Connection: close", f"Content-Length: {len(body)}", "Content-Type: text/csv"]
        sock.sendall(head(slow_daemon, "POST", "/v1/files?name=paced.csv", *extra))
        assert send_paced(sock, body, rate), "the server answered before the body was sent"
        answer = read_to_eof(sock)
    assert status_of(answer) == 202, answer
    assert not events(slow_daemon, "http_body_too_slow")
    wait_for(
        lambda: (
            [f["status"] for f in slow_daemon.ledger() if f["name"] == "paced.csv"] == ["loaded"]
        ),
        30,
        "the paced upload loaded",
    )
    ordinary_request_works(slow_daemon)
    finish(slow_daemon, expected)


def open_idle(daemon: DaemonProcess, count: int) -> list[socket.socket]:
    return [connect(daemon) for _ in range(count)]


def metric(daemon: DaemonProcess, name: str) -> float:
    """A sample of ``/metrics``, read on a new connection."""
    answer = exchange(daemon, "GET", "/metrics")
    assert status_of(answer) == 200
    for line in answer.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.serial  # asserts how long an answer takes
def test_past_max_connections_liveness_still_answers_and_other_routes_answer_503(
    tmp_path: Path,
) -> None:
    """Idle connections up to the bound (a head time long enough to hold them): a new one may
    only ask for liveness; past the reserve a new one is closed at once; once they close,
    everything is answered again."""
    daemon = slow_daemon_process(tmp_path, head_seconds=30.0)
    daemon.start()
    idle: list[socket.socket] = []
    try:
        daemon.client.close()  # its kept-alive connection would count too
        wait_for(
            lambda: metric(daemon, "moneylion_http_connections_open") == 1,
            15,
            "only the scraping connection open",
        )
        idle = open_idle(daemon, MAX_CONNECTIONS)
        live = exchange(daemon, "GET", "/v1/health/live")
        assert status_of(live) == 200
        assert b'"alive"' in live
        refused = exchange(daemon, "GET", "/v1/files")
        assert status_of(refused) == 503
        assert b"\r\nretry-after: " in refused
        assert b"\r\nconnection: close\r\n" in refused
        assert b"max_connections" in refused
        upload = exchange(daemon, "POST", "/v1/files?name=x.csv", transactions_csv(1, 5, 5))
        assert status_of(upload) == 503
        idle += open_idle(daemon, CONNECTION_RESERVE)  # the reserve, all taken
        with connect(daemon) as past:  # past the ceiling: closed before any answer
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                past.sendall(head(daemon, "GET", "/v1/health/live", "Connection: close"))
            assert read_to_eof(past, timeout=5) == b""
    finally:
        for sock in idle:
            sock.close()
    wait_for(
        lambda: metric(daemon, "moneylion_http_connections_open") == 1,
        15,
        "the idle connections closed",
    )
    ordinary_request_works(daemon)
    assert metric(daemon, "moneylion_http_connections_refused_total") >= 3
    assert len(events(daemon, "http_connections_bound_hit", 1)) == 1
    [cleared] = events(daemon, "http_connections_bound_cleared", 1)
    assert cleared["refused"] >= 3
    assert daemon.stop() == 0
    daemon.close()


# -- rows 7, 8: huge numbers and long fields -------------------------------------------------------

HUGE = "9" * 5000


GOOD_TRANSACTIONS = [
    "1,7,2024-01-02,10.25,deposit",
    "2,8,2024-01-02,5.50,purchase",
    "3,7,2024-01-03,1.05,withdrawal",
]


GOOD_USERS = ["7,2023-05-06,Chile", "8,2023-05-07,Peru"]


HUGE_ROWS = {
    "transactions.transaction_id": (TX_HEADER, f"{HUGE},7,2024-01-02,1.00,deposit", "bad_integer"),
    "transactions.user_id": (TX_HEADER, f"50,{HUGE},2024-01-02,1.00,deposit", "bad_integer"),
    "transactions.amount": (TX_HEADER, f"51,7,2024-01-02,{HUGE},deposit", "bad_amount"),
    "users.user_id": (USERS_HEADER, f"{HUGE},2023-05-06,Chile", "bad_integer"),
}


def csv_bytes(header: str, lines: list[str]) -> bytes:
    return ("\n".join([header, *lines]) + "\n").encode()


def rejects_page(daemon: DaemonProcess, file_id: int, **params: Any) -> tuple[dict[str, Any], int]:
    """The API's page of a file's rejects, and its size in bytes."""
    response = daemon.client.get(f"/v1/files/{file_id}/rejects", params=params)
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body, len(response.content)


def loaded_entry(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    wait_done(daemon, name)
    (entry,) = entries(daemon, name)
    assert entry["status"] == "loaded", entry
    return entry


@pytest.mark.parametrize("field", list(HUGE_ROWS))
def test_a_number_of_5000_digits_rejects_its_row_and_the_good_rows_load(
    tmp_path: Path, outside: Path, field: str
) -> None:
    header, huge_row, reason = HUGE_ROWS[field]
    good = GOOD_TRANSACTIONS if header == TX_HEADER else GOOD_USERS
    content = csv_bytes(header, [good[0], huge_row, *good[1:]])
    daemon = make_daemon(tmp_path)
    daemon.start()
    try:
        expected = Expected()
        drop(daemon, outside, "huge.csv", content)
        entry = loaded_entry(daemon, "huge.csv")
        assert (entry["rows_loaded"], entry["rows_rejected"]) == (len(good), 1)
        page, _ = rejects_page(daemon, entry["file_id"])
        (reject,) = page["items"]
        assert (reject["line"], reject["reason"]) == (3, reason)
        assert len(reject["message"]) < 200  # a short escaped prefix, not 5,000 digits
        if header == TX_HEADER:
            expected.add_transactions(csv_bytes(header, good).decode())
        else:
            expected.add_users(csv_bytes(header, good).decode())
            # The users loaded: their transactions find their country.
            transactions = csv_bytes(TX_HEADER, GOOD_TRANSACTIONS)
            expected.add_transactions(transactions.decode())
            drop(daemon, outside, "for-users.csv", transactions)
            loaded_entry(daemon, "for-users.csv")
            for user, country in expected.countries.items():
                assert daemon.get(f"/v1/users/{user}/summary")["country"] == country
        assert_api_totals(daemon, expected)  # the good rows' totals, exact

        ordinary(daemon, outside, expected, 1000, "ordinary.csv")
        loaded_entry(daemon, "ordinary.csv")
        assert_api_totals(daemon, expected)
        finish(daemon, expected)
    finally:
        daemon.close()


def test_a_400_kb_field_gives_a_short_reject_and_small_pages(tmp_path: Path, outside: Path) -> None:
    line_bytes = Config.reject_line_bytes  # the default
    long_lines = [f"{60 + k},7,2024-01-02," + "é" * 200_000 + ",deposit" for k in range(5)]
    content = csv_bytes(TX_HEADER, [GOOD_TRANSACTIONS[0], *long_lines, *GOOD_TRANSACTIONS[1:]])
    daemon = make_daemon(tmp_path)
    daemon.start()
    try:
        expected = Expected()
        expected.add_transactions(csv_bytes(TX_HEADER, GOOD_TRANSACTIONS).decode())
        drop(daemon, outside, "wide.csv", content)
        entry = loaded_entry(daemon, "wide.csv")
        assert (entry["rows_loaded"], entry["rows_rejected"]) == (3, 5)

        page, size = rejects_page(daemon, entry["file_id"], limit=1000)
        assert size < 8 * line_bytes  # five rejects of 4 KiB, escaped: not 5 x 400 KB
        assert page["total"] == 5
        assert page["next"] is None
        for reject, line in zip(page["items"], long_lines, strict=True):
            assert reject["reason"] == "bad_amount"
            assert len(reject["message"]) < 200
            assert line.startswith(reject["raw_line"])
            assert line_bytes - 4 < len(reject["raw_line"].encode()) <= line_bytes
            assert reject["raw_line_truncated"] is True
            assert reject["raw_line_bytes"] == len(line.encode())

        html = daemon.client.get(f"/files/{entry['file_id']}")
        assert html.status_code == 200
        assert len(html.content) < 16 * line_bytes  # the file page: not 5 x 400 KB
        assert f"{len(long_lines[0].encode()):,} bytes" in html.text  # the true length shown
        assert_api_totals(daemon, expected)

        ordinary(daemon, outside, expected, 1000, "ordinary.csv")
        loaded_entry(daemon, "ordinary.csv")
        assert_api_totals(daemon, expected)
        finish(daemon, expected)
    finally:
        daemon.close()


def test_a_page_of_rejects_ends_at_its_byte_bound_and_next_reaches_the_rest(
    tmp_path: Path, outside: Path
) -> None:
    """Raw lines kept up to 1 MiB each (configured): a page ends past its byte bound."""
    from moneylion.api.queries import REJECTS_PAGE_BYTES

    long_lines = [f"{60 + k},7,2024-01-02,{'x' * 400_000},deposit" for k in range(6)]
    content = csv_bytes(TX_HEADER, [GOOD_TRANSACTIONS[0], *long_lines, *GOOD_TRANSACTIONS[1:]])
    daemon = make_daemon(tmp_path)
    daemon.extra_env["MONEYLION_REJECT_LINE_BYTES"] = str(1024 * 1024)
    daemon.start()
    try:
        expected = Expected()
        expected.add_transactions(csv_bytes(TX_HEADER, GOOD_TRANSACTIONS).decode())
        drop(daemon, outside, "wide.csv", content)
        entry = loaded_entry(daemon, "wide.csv")
        assert entry["rows_rejected"] == 6

        page, size = rejects_page(daemon, entry["file_id"], limit=1000)
        shown = page["items"]
        assert 0 < len(shown) < 6  # ended early: its bytes passed the bound
        assert size < REJECTS_PAGE_BYTES + 2 * 400_100
        assert all(r["raw_line_truncated"] is False for r in shown)  # kept whole (1 MiB)
        while page["next"] is not None:
            response = daemon.client.get(page["next"])
            response.raise_for_status()
            page = response.json()
            assert page["items"]
            shown.extend(page["items"])
        assert [r["line"] for r in shown] == list(range(3, 9))  # every reject, once, in order
        assert [r["raw_line"] for r in shown] == long_lines

        ordinary(daemon, outside, expected, 1000, "ordinary.csv")
        loaded_entry(daemon, "ordinary.csv")
        assert_api_totals(daemon, expected)
        assert Decimal(daemon.get("/v1/users/7/summary")["total_amount"]) == expected.total[7]
        finish(daemon, expected)
    finally:
        daemon.close()


# -- rows 9, 10, 11: console lines, the API docs page, paged aggregates ----------------------------

DOCS_TOKEN = "hostile-reads-token-0123456789"  # noqa: S105 - the test daemon's token


FORGED = "2030-01-01 00:00:00 ERROR    moneylion.worker disk_full warehouse=gone wiped=true"


@pytest.fixture
def reads_daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = make_daemon(tmp_path)
    process.start()
    yield process
    process.close()


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[DaemonProcess]:
    """A daemon with an api_token: the docs page needs the dashboard's login."""
    process = make_daemon(tmp_path, {"MONEYLION_API_TOKEN": DOCS_TOKEN})
    process.client.headers["Authorization"] = f"Bearer {DOCS_TOKEN}"
    process.start()
    yield process
    process.close()


def ordinary_reads_work(daemon: DaemonProcess) -> None:
    assert daemon.get("/v1/health/live") == {"status": "alive"}
    assert daemon.client.get("/v1/daily", params={"from": "2022-01-01"}).status_code == 200


@pytest.mark.parametrize(
    ("separator", "shown"),
    [("\n", "\\n"), ("\r\n", "\\r\\n"), ("\x1b[2K\r", "\\x1b[2K\\r"), ("\u2028", "\\u2028")],
)
def test_a_forged_log_line_in_a_path_is_escaped_on_the_console(
    reads_daemon: DaemonProcess, separator: str, shown: str
) -> None:
    path = "/v1/users/1" + quote(separator + FORGED, safe="") + "/summary"
    response = reads_daemon.client.get(path)
    assert response.status_code == 400  # not an id; logged as api_client_error with its path
    wait_for(lambda: FORGED in reads_daemon.stderr_text(), 15, "the refused request on the console")
    console = reads_daemon.stderr_text()
    lines = console.splitlines()  # every line break a terminal or a log viewer would honour
    assert not [line for line in lines if line.startswith(FORGED[:19])]
    assert f"path=/v1/users/1{shown}{FORGED}/summary" in console
    assert "\x1b" not in console
    # The JSON log keeps the path as it came (JSON escapes it itself).
    logged = [
        e for e in logged_events(reads_daemon.warehouse) if e.get("event") == "api_client_error"
    ]
    assert logged[-1]["path"] == f"/v1/users/1{separator}{FORGED}/summary"
    ordinary_reads_work(reads_daemon)


ASSET = re.compile(r"""(?:src|href)="([^"]+)\"""")


def test_the_api_docs_page_loads_only_vendored_files_under_a_strict_policy(
    guarded: DaemonProcess,
) -> None:
    for path in ("/schema", "/schema/swagger"):
        response = guarded.client.get(path)
        assert response.status_code == 200
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "script-src 'self';" in policy
        assert "unsafe-inline" not in policy
        assert "http:" not in response.text
        assert "https:" not in response.text
        assert "<script>" not in response.text  # every script has a src
        assets = ASSET.findall(response.text)
        assert len(assets) == 4
        for asset in assets:
            assert asset.startswith("/static/")
            fetched = httpx.get(f"http://127.0.0.1:{guarded.port}{asset}", timeout=10)
            assert fetched.status_code == 200, asset  # public: no token needed
            assert fetched.content
    # Only the docs page renders the schema: no other renderer is served.
    for other in ("/schema/redoc", "/schema/elements", "/schema/rapidoc", "/schema/scalar"):
        assert guarded.client.get(other).status_code == 404
    assert httpx.get(f"http://127.0.0.1:{guarded.port}/schema", timeout=10).status_code == 401
    ordinary_reads_work(guarded)


def test_the_api_docs_page_renders_in_a_browser_with_no_network(guarded: DaemonProcess) -> None:
    origin = f"http://127.0.0.1:{guarded.port}"
    operations = sum(len(item) for item in guarded.get("/schema/openapi.json")["paths"].values())
    requested: list[str] = []
    errors: list[str] = []

    def only_this_origin(route: Any) -> None:
        requested.append(route.request.url)
        if route.request.url.startswith(origin + "/"):
            route.continue_()
        else:
            route.abort("internetdisconnected")

    with chromium() as browser:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.route("**/*", only_this_origin)
        tab = context.new_page()
        tab.set_default_timeout(20_000)
        tab.on("console", lambda m: m.type == "error" and errors.append(m.text))
        tab.on("pageerror", lambda exc: errors.append(str(exc)))
        tab.goto(f"{origin}/")  # the dashboard's login first (a token is set)
        tab.fill("#token", DOCS_TOKEN)
        tab.click("form[action='/login'] button")
        tab.wait_for_selector("h1:text('Dashboard')")
        errors.clear()  # the 401 of the login page itself
        tab.click("a[href='/schema']")  # the dashboard's link to the docs
        tab.wait_for_selector(".opblock")
        tab.wait_for_timeout(500)  # anything it would still load
        shown = tab.locator(".opblock").count()
        summary = tab.locator(".opblock-summary-path").all_inner_texts()
        context.close()
    assert shown == operations
    assert any("/v1/daily" in path for path in summary)
    assert [url for url in requested if not url.startswith(origin + "/")] == []
    assert errors == []  # a content security policy violation would be one
    ordinary_reads_work(guarded)


COUNTRIES = ("Norway", "Chile", "Kenya", "Japan", "Peru")


FIRST_DAY = dt.date(2019, 1, 1)


DAYS = 4 * 365 + 1  # four years: more daily rows than any page holds


def spread_transactions(rng: random.Random, first_id: int, count: int) -> list[list[str]]:
    """Rows over DAYS days, users 1-200 (151-200 without a profile: orphans)."""
    return [
        [
            str(first_id + n),
            str(rng.randint(1, 200)),
            (FIRST_DAY + dt.timedelta(days=rng.randrange(DAYS))).isoformat(),
            f"{rng.randint(1, 9_999_999) / 100:.2f}",
            rng.choice(TYPES),
        ]
        for n in range(count)
    ]


def read_pages(daemon: DaemonProcess, path: str, key: str, limit: int) -> list[list[Any]]:
    """Each page's rows, following ``next``; every page at most ``limit`` rows."""
    body = daemon.get(path, limit=limit)
    pages = [body[key]]
    while body["next"] is not None:
        assert len(pages) < 10_000, "next never ends"
        response = daemon.client.get(body["next"])
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body[key])
    assert all(len(page) <= limit for page in pages)
    assert all(len(page) == limit for page in pages[:-1])
    return pages


def test_daily_and_monthly_pages_are_bounded_and_add_up_to_the_whole(
    reads_daemon: DaemonProcess, tmp_path: Path
) -> None:
    rng = random.Random(11)
    expected = Expected()
    users = USERS_HEADER + "\n"
    users += "".join(f"{u},2018-06-01,{COUNTRIES[u % len(COUNTRIES)]}\n" for u in range(1, 151))
    expected.add_users(users)
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "users.csv").write_text(users)
    (staging / "users.csv").rename(reads_daemon.inbox / "users.csv")
    by_month: dict[tuple[str, str | None], dict[str, tuple[int, Decimal]]] = defaultdict(dict)
    for part in range(3):
        rows = spread_transactions(rng, 1 + part * 4000, 4000)
        text = TX_HEADER + "\n" + "".join(",".join(row) + "\n" for row in rows)
        expected.add_transactions(text)
        for _, user, day, amount, kind in rows:
            cell = by_month[day[:7], expected.countries.get(int(user))]
            count, total = cell.get(kind, (0, Decimal(0)))
            cell[kind] = (count + 1, total + Decimal(amount))
        (staging / f"tx-{part}.csv").write_text(text)
        (staging / f"tx-{part}.csv").rename(reads_daemon.inbox / f"tx-{part}.csv")
    wait_for(lambda: len(reads_daemon.folder("done")) == 4, 120, "the four files loaded")
    assert len(expected.daily) > AGGREGATE_PAGE  # the whole table is more than one page

    # /v1/daily: the default page is bounded and says where the rest is; a wider one is refused.
    first = reads_daemon.get("/v1/daily")
    assert (len(first["days"]), first["limit"], first["offset"]) == (
        AGGREGATE_PAGE,
        AGGREGATE_PAGE,
        0,
    )
    assert first["next"] is not None
    too_wide = reads_daemon.client.get("/v1/daily", params={"limit": AGGREGATE_MAX_PAGE + 1})
    assert too_wide.status_code == 400
    pages = read_pages(reads_daemon, "/v1/daily", "days", 700)
    days = [day for page in pages for day in page]
    keys = [(d["date"], d["type"]) for d in days]
    assert keys == sorted(set(keys))  # in order, none twice
    assert {k: Decimal(d["total_amount"]) for k, d in zip(keys, days, strict=True)} == dict(
        expected.daily
    )
    assert {k: d["transaction_count"] for k, d in zip(keys, days, strict=True)} == dict(
        expected.daily_count
    )
    assert_api_totals(reads_daemon, expected)  # the test helper follows the pages too

    # /v1/countries/monthly: (month, country) rows, orphans (null) last in each month.
    pages = read_pages(reads_daemon, "/v1/countries/monthly", "months", 17)
    months = [row for page in pages for row in page]
    assert len(months) == len(by_month) > 17
    shown = {
        (row["month"], row["country"]): {
            kind: (row[f"{kind}_count"], Decimal(row[f"total_{kind}"]))
            for kind in TYPES
            if row[f"{kind}_count"]
        }
        for row in months
    }
    assert shown == dict(by_month)
    order = [(row["month"], row["country"] is None, row["country"] or "") for row in months]
    assert order == sorted(order)
    ordinary_reads_work(reads_daemon)
    stop_and_verify(reads_daemon, expected)


def stop_and_verify(daemon: DaemonProcess, expected: Expected) -> None:
    """SIGTERM -> exit 0; the warehouse holds exactly the expected rows and its aggregates
    equal a full recompute (``verify``)."""
    assert daemon.stop() == 0
    count, users, differences = warehouse_totals(daemon.warehouse)
    assert differences == []
    assert count == expected.transactions
    assert users == {u: (expected.count[u], expected.total[u]) for u in expected.count}


# -- row 12: file modes ----------------------------------------------------------------------------

OTHERS = stat.S_IRWXO


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _made(warehouse: Path, inbox: Path) -> list[Path]:
    """What the daemon made: the warehouse folder and what it holds (the database, its WAL,
    the export and its WAL and -shm, the logs, staging), and the reason file of a failed file."""
    found = [warehouse, warehouse / "moneylion.duckdb", warehouse / "moneylion.sqlite"]
    found += [warehouse / name for name in ("moneylion.duckdb.wal",) if (warehouse / name).exists()]
    found += [p for p in warehouse.glob("moneylion.sqlite-*")]
    found += [warehouse / "staging", warehouse / "logs", *(warehouse / "logs").glob("*.log")]
    found += list((inbox / "failed").rglob("*.reason.json"))
    return found


def _run(tmp_path: Path, name: str, **env: str) -> tuple[DaemonProcess, Path, dict[Path, int]]:
    """A daemon whose warehouse does not exist yet (the child makes it), fed one ordinary file
    and one refused whole; the modes of what it made, read while it runs."""
    warehouse = tmp_path / name / "warehouse"
    inbox = tmp_path / name / "inbox"
    inbox.mkdir(parents=True)
    # DaemonProcess keeps its child's stderr in its own "warehouse": another folder here.
    daemon = DaemonProcess(
        inbox, tmp_path / name / "run", env={"MONEYLION_WAREHOUSE": str(warehouse), **env}
    )
    # Past source.MEMORY_BYTES: read through a private copy in staging/.
    rows = random_transactions(random.Random(12), 1, 30_000)

    def exported() -> bool:
        try:
            with sqlite3.connect(warehouse / "moneylion.sqlite") as db:
                return bool(db.execute("SELECT count(*) FROM transactions").fetchone()[0])
        except sqlite3.Error:
            return False

    try:
        daemon.start()
        write_transactions(inbox / "ordinary.csv", rows)
        (inbox / "refused.csv").write_text("not,a,header\n1,2,3\n")
        wait_for(lambda: daemon.folder("done") == ["ordinary.csv"], 60, "the file in done/")
        wait_for(lambda: any((inbox / "failed").rglob("*.reason.json")), 60, "a reason file")
        wait_for(exported, 60, "the SQLite export")
        assert daemon.get("/v1/daily")["days"], "an ordinary request answers"
        modes = {path: _mode(path) for path in _made(warehouse, inbox)}
        assert daemon.stop() == 0
    finally:
        daemon.close()
    count, _, differences = warehouse_totals(warehouse)
    assert count == len(rows)
    assert differences == []
    return daemon, warehouse, modes


def test_warehouse_files_give_other_users_no_access_unless_the_umask_says(tmp_path: Path) -> None:
    _, warehouse, modes = _run(tmp_path, "default")
    assert len(modes) >= 8, sorted(modes)
    open_to_others = {str(p): oct(m) for p, m in modes.items() if m & OTHERS}
    assert open_to_others == {}
    # Group members keep read access (027), the owner everything it had.
    assert modes[warehouse / "moneylion.sqlite"] & stat.S_IRGRP

    _, shared, modes = _run(tmp_path, "shared", MONEYLION_UMASK="022")
    unreadable = {str(p): oct(m) for p, m in modes.items() if not m & stat.S_IROTH}
    assert unreadable == {}
    for folder in (shared, shared / "logs", shared / "staging"):
        assert modes[folder] & stat.S_IXOTH

    # Files that exist keep their mode: a restart under the default does not chmod them.
    before = _mode(shared / "moneylion.sqlite")
    daemon = DaemonProcess(
        tmp_path / "shared" / "inbox",
        tmp_path / "shared" / "run",
        env={"MONEYLION_WAREHOUSE": str(shared)},
    )
    try:
        daemon.start()
        assert daemon.get("/v1/daily")["days"]
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert _mode(shared / "moneylion.sqlite") == before
    assert _mode(shared / "moneylion.duckdb") & stat.S_IROTH
    assert warehouse_totals(shared)[2] == []


# -- row 14: a hostile lake ------------------------------------------------------------------------


def _append(lake: Path, table: str, rows: list[dict[str, Any]]) -> None:
    """Append ``rows`` to one of the lake's tables with deltalake alone (the table's schema)."""
    path = str(lake / table)
    schema = DeltaTable(path).to_pyarrow_dataset().schema
    write_deltalake(path, pa.Table.from_pylist(rows, schema=schema), mode="append")


def _next_ledger_place(lake: Path) -> tuple[int, int]:
    """(the next file id, the version the next commit of ``files`` lands as)."""
    files = DeltaTable(str(lake / "files"))
    return max(row["file_id"] for row in ledger_rows(lake)) + 1, files.version() + 1


def _ledger_row(lake: Path, **columns: Any) -> dict[str, Any]:
    file_id, version = _next_ledger_place(lake)
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    row: dict[str, Any] = {
        "file_id": file_id,
        "name": f"forged-{file_id}.csv",
        "sha256": hashlib.sha256(f"forged {file_id}".encode()).hexdigest(),
        "kind": "transactions",
        "status": "loaded",
        "rows_total": 1,
        "rows_loaded": 1,
        "rows_duplicate": 0,
        "rows_rejected": 0,
        "size_bytes": 100,
        "received_at": now,
        "finished_at": now,
        "seconds": 0.01,
        "error_reason": None,
        "error": None,
        "write_id": None,
        "lake_version": version,
    }
    row.update(columns)
    return row


def forge_bad_ledger_row(lake: Path) -> int:
    """A ledger row no daemon writes (a kind that does not exist): its file id."""
    row = _ledger_row(lake, kind="spreadsheet")
    _append(lake, "files", [row])
    return int(row["file_id"])


def forge_file(lake: Path, transaction_id: int, **field: Any) -> int:
    """A file of one transaction written to the lake as a daemon would (rows, then the ledger
    row), but with ``field`` set to a value the row rules refuse: its file id."""
    write_id = 7_000_000 + transaction_id
    row = _ledger_row(lake, write_id=write_id)
    transaction = {
        "file_sha256": row["sha256"],
        "write_id": write_id,
        "transaction_id": transaction_id,
        "user_id": 3,
        "transaction_date": dt.date(2022, 5, 1),
        "amount": Decimal("10.00"),
        "transaction_type": "deposit",
        "line": 2,
        "raw_line": "forged",
        **field,
    }
    _append(lake, "transactions", [transaction])
    row["lake_version"] = DeltaTable(str(lake / "files")).version() + 1
    _append(lake, "files", [row])
    return int(row["file_id"])


def _readiness(daemon: DaemonProcess) -> dict[str, Any]:
    lake: dict[str, Any] = daemon.get("/v1/health/ready")["lake"]
    return lake


def _gauges(daemon: DaemonProcess) -> dict[str, float]:
    text = daemon.client.get("/metrics").text
    return {
        name: float(value)
        for name, value in (line.split(" ", 1) for line in text.splitlines() if line[:1] != "#")
        if name.startswith("moneylion_lake")
    }


def _quarantined_ids(daemon: DaemonProcess) -> list[int]:
    events = logged_events(daemon.warehouse)
    return sorted(e["file_id"] for e in events if e.get("event") == "lake_entry_quarantined")


def test_a_hostile_lake_row_is_skipped_alike_by_every_replica_and_reported(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    rng = random.Random(14)
    source = tmp_path / "src"
    source.mkdir()
    good = [
        write_transactions(
            source / f"good-{n}.csv", random_transactions(rng, 1 + 100 * n, 40, users=40)
        )
        for n in range(3)
    ]
    a, b = lake_daemon(tmp_path, "a", lake), lake_daemon(tmp_path, "b", lake)
    c = lake_daemon(tmp_path, "c", lake)  # built afterwards, from the lake alone
    try:
        a.start()
        b.start()
        drop_in_lake_inbox([good[0]], a.inbox)
        settled([a, b], lake)
        forged = [
            forge_bad_ledger_row(lake),
            forge_file(lake, 9_001, transaction_type="gift"),
            forge_file(lake, 9_002, amount=Decimal("-5.00")),
        ]
        # Later files still apply, from either daemon.
        drop_in_lake_inbox([good[1]], b.inbox)
        settled([a, b], lake)
        drop_in_lake_inbox([good[2]], a.inbox)
        total = settled([a, b], lake)
        c.start()
        settled([a, b, c], lake)

        loaded = [row for row in ledger_rows(lake) if row["file_id"] not in forged]
        assert len(loaded) == len(good)
        assert total == len(good) + len(forged)
        want = Independent()
        by_sha = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in good}
        for row in loaded:
            want.add_file(by_sha[row["sha256"]].read_text(encoding="utf-8"))
        answers = [api_answers(d, USERS) for d in (a, b, c)]
        assert answers[0] == answers[1] == answers[2]
        assert answered(answers[0]) == expected_answers(want)
        shown = [item["file_id"] for item in answers[0]["files"]["items"]]
        assert sorted(shown) == sorted(row["file_id"] for row in loaded)

        for daemon in (a, b, c):
            ready = _readiness(daemon)
            assert ready["quarantined_files"] == len(forged)
            assert ready["apply_error"] is None
            assert ready["lag_files"] == 0
            gauges = _gauges(daemon)
            assert gauges["moneylion_lake_quarantined_files"] == len(forged)
            assert gauges["moneylion_lake_apply_failing"] == 0
            assert _quarantined_ids(daemon) == sorted(forged)
        reasons = {
            e["file_id"]: e["reason"]
            for e in logged_events(c.warehouse)
            if e.get("event") == "lake_entry_quarantined"
        }
        assert reasons == dict(zip(forged, ["bad_ledger_row", "bad_row", "bad_row"], strict=True))
        # An ordinary request still answers.
        assert a.get("/v1/daily")["days"]
        for daemon in (a, b, c):
            assert daemon.stop() == 0
    finally:
        for daemon in (a, b, c):
            daemon.close()
    for daemon in (a, b, c):
        assert verify_differences(daemon) == []
