"""A careless or hostile inbox against the real daemon (a ``moneylion serve`` child): pipes,
links, sockets, files cut while read, huge headers and fields, names too long to set aside,
oversized HTTP requests. Each case is followed by an ordinary file that must still load, and
ends with the daemon stopping cleanly, ``verify`` clean and no good row lost."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from moneylion.inbox import set_aside_files
from tests.conftest import TX_COLUMNS, TX_HEADER
from tests.daemon_process import (
    DaemonProcess,
    logged_events,
    random_transactions,
    wait_for,
    warehouse_totals,
)
from tests.expected import Expected

pytestmark = pytest.mark.slow

SECRET = "vm-7f3a9c-outside-the-inbox"  # noqa: S105 - text to look for, not a password


def make_daemon(tmp_path: Path, env: dict[str, str] | None = None, **kwargs: Any) -> DaemonProcess:
    """A daemon (not started) on ``tmp_path``'s inbox and warehouse, logging at INFO, with
    ``env``'s MONEYLION_* settings besides."""
    process = DaemonProcess(
        tmp_path / "inbox",
        tmp_path / "warehouse",
        env={"MONEYLION_LOG_LEVEL": "INFO", **(env or {})},
        **kwargs,
    )
    process.inbox.mkdir(exist_ok=True)
    return process


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    process = make_daemon(tmp_path)
    process.start()
    yield process
    process.close()


def drop(daemon: DaemonProcess, outside: Path, name: str, content: bytes) -> Path:
    """Write ``content`` outside the inbox, then move it in under ``name`` (complete at once)."""
    staged = outside / f"drop-{random.getrandbits(40):x}"
    staged.write_bytes(content)
    target = daemon.inbox / name
    os.rename(staged, target)
    return target


def transactions_csv(first_id: int, count: int, seed: int = 1) -> bytes:
    rows = random_transactions(random.Random(seed), first_id, count)
    lines = [TX_HEADER] + [",".join(map(str, row)) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def ordinary(
    daemon: DaemonProcess, outside: Path, expected: Expected, first_id: int, name: str
) -> None:
    """An ordinary file dropped after the hostile one: it must load."""
    content = transactions_csv(first_id, 20, seed=first_id)
    expected.add_transactions(content.decode())
    drop(daemon, outside, name, content)


def ledger(daemon: DaemonProcess) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = daemon.get("/v1/files", limit=1000)["items"]
    return items


def entries(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [row for row in ledger(daemon) if row["name"] == name]


def wait_done(daemon: DaemonProcess, *names: str, timeout: float = 30.0) -> None:
    """Until every name has a ledger row and nothing waits in the inbox."""
    wait_for(
        lambda: all(entries(daemon, n) for n in names) and not daemon.inbox_waiting(),
        timeout,
        f"{names} in the ledger and an empty inbox",
    )


def finish(daemon: DaemonProcess, expected: Expected) -> None:
    """SIGTERM -> exit 0 and a clean stop; then the warehouse holds exactly the expected rows
    and its aggregates equal a full recompute."""
    assert daemon.stop() == 0
    stopped = [e for e in logged_events(daemon.warehouse) if e.get("event") == "daemon_stopped"]
    assert stopped
    assert stopped[-1]["clean"] is True
    assert not [e for e in logged_events(daemon.warehouse) if e.get("event") == "file_stuck"]
    count, users, differences = warehouse_totals(daemon.warehouse)
    assert differences == []
    assert count == expected.transactions
    assert users == {u: (expected.count[u], expected.total[u]) for u in expected.count}


def set_aside(daemon: DaemonProcess, folder: str) -> list[Path]:
    """The entries moved into done/ or failed/ (reason files left out)."""
    return [
        p for p in set_aside_files(daemon.inbox / folder) if not p.name.endswith(".reason.json")
    ]


def reason_file(daemon: DaemonProcess, name: str) -> dict[str, Any]:
    found = [p for p in (daemon.inbox / "failed").rglob(name + ".reason.json")]
    assert len(found) == 1, found
    document: dict[str, Any] = json.loads(found[0].read_text())
    return document


def test_a_fifo_is_refused_at_once_unread_and_the_stream_goes_on(
    daemon: DaemonProcess, outside: Path
) -> None:
    os.mkfifo(daemon.inbox / "pipe.csv")
    expected = Expected()
    ordinary(daemon, outside, expected, 1, "after.csv")
    wait_done(daemon, "pipe.csv", "after.csv", timeout=15)
    [row] = entries(daemon, "pipe.csv")
    assert (row["status"], row["error_reason"], row["sha256"]) == (
        "failed",
        "not_a_regular_file",
        None,
    )
    assert "named pipe" in row["error"]
    assert reason_file(daemon, "pipe.csv")["reason"] == "not_a_regular_file"
    [moved] = [p for p in set_aside(daemon, "failed") if p.name == "pipe.csv"]
    assert stat.S_ISFIFO(os.lstat(moved).st_mode)  # the pipe itself, set aside, never opened
    [after] = entries(daemon, "after.csv")
    assert after["rows_loaded"] == 20
    finish(daemon, expected)


def test_sigterm_with_pipes_waiting_stops_cleanly(tmp_path: Path, outside: Path) -> None:
    daemon = make_daemon(tmp_path)
    try:
        daemon.start()
        for n in range(3):
            os.mkfifo(daemon.inbox / f"pipe{n}.csv")
        expected = Expected()
        ordinary(daemon, outside, expected, 1, "after.csv")
        wait_done(daemon, "after.csv", timeout=15)
        os.mkfifo(daemon.inbox / "late.csv")  # and one more right before the stop
        finish(daemon, expected)
        events = [e["event"] for e in logged_events(daemon.warehouse)]
        assert "warehouse_left_open" not in events
        assert "warehouse_closed" in events
    finally:
        daemon.close()


def test_links_sockets_and_devices_are_refused_without_reading_what_they_point_to(
    daemon: DaemonProcess, outside: Path
) -> None:
    secret = outside / "secret.csv"
    secret.write_text(f"{SECRET},header\n{SECRET},1\n")
    secret_dir = outside / "folder"
    secret_dir.mkdir()
    (secret_dir / "inside.csv").write_text(SECRET + "\n")
    os.symlink(secret, daemon.inbox / "link.csv")
    os.symlink(secret_dir, daemon.inbox / "dirlink.csv")
    os.symlink(outside / "missing.csv", daemon.inbox / "dangling.csv")
    names = ["link.csv", "dirlink.csv", "dangling.csv", "sock.csv"]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(daemon.inbox / "sock.csv"))
    with contextlib.suppress(PermissionError):  # a device needs the right to make one
        os.mknod(daemon.inbox / "null.csv", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        names.append("null.csv")
    (daemon.inbox / "a-folder.csv").mkdir()  # a directory is not an inbox file: left alone
    expected = Expected()
    ordinary(daemon, outside, expected, 1, "after.csv")
    try:
        wait_done(daemon, *names, "after.csv", timeout=15)
    finally:
        listener.close()
    for name in names:
        [row] = entries(daemon, name)
        assert (row["status"], row["error_reason"], row["sha256"]) == (
            "failed",
            "not_a_regular_file",
            None,
        ), name
    assert (daemon.inbox / "a-folder.csv").is_dir()
    assert not entries(daemon, "a-folder.csv")
    # Nothing a refusal says, over the API, in a reason file or in the log, holds bytes of what
    # a link points to (nor its path).
    said = [json.dumps(daemon.get("/v1/files", limit=1000))]
    for row in ledger(daemon):
        said.append(json.dumps(daemon.get(f"/v1/files/{row['file_id']}")))
        said.append(json.dumps(daemon.get(f"/v1/files/{row['file_id']}/rejects")))
    said += [p.read_text() for p in (daemon.inbox / "failed").rglob("*.reason.json")]
    said += [p.read_text(errors="replace") for p in (daemon.warehouse / "logs").glob("*.log*")]
    for text in said:
        assert SECRET not in text
        assert str(outside) not in text
    assert secret.read_text().startswith(SECRET)  # untouched, still where it was
    for name in ("link.csv", "dirlink.csv", "dangling.csv"):
        [moved] = [p for p in set_aside(daemon, "failed") if p.name == name]
        assert moved.is_symlink()  # the link itself was set aside
    finish(daemon, expected)


HOOK = """
import os
from pathlib import Path
from moneylion import source

def cut_once(point, path):
    marker = Path({marker!r})
    if point == {point!r} and path.name == "big.csv" and not marker.exists():
        marker.touch()
        os.truncate(path, {keep})  # the producer cuts the file while moneylion reads it

source.fault_hook = cut_once
"""


@pytest.mark.parametrize("point", ["opened", "staged"])
def test_a_file_cut_while_it_is_read_is_recorded_by_the_bytes_loaded_and_never_half(
    tmp_path: Path, outside: Path, point: str
) -> None:
    full = transactions_csv(1, 4_000, seed=5)
    lines = full.splitlines(keepends=True)
    cut = b"".join(lines[: len(lines) // 2])  # whole lines: the cut file is a valid CSV too
    daemon = make_daemon(
        tmp_path,
        preamble=HOOK.format(marker=str(tmp_path / "cut-done"), point=point, keep=len(cut)),
    )
    try:
        daemon.start()
        drop(daemon, outside, "big.csv", full)
        wait_done(daemon, "big.csv")
        first, *later = entries(daemon, "big.csv")
        if point == "staged":  # cut after the copy: the copy's bytes are what loaded
            assert (first["sha256"], first["rows_loaded"]) == (
                hashlib.sha256(full).hexdigest(),
                4_000,
            )
            # The inbox file changed meanwhile: it was taken again as the file it now is.
            assert [(r["sha256"], r["rows_loaded"]) for r in later] == [
                (hashlib.sha256(cut).hexdigest(), 0)
            ]
        else:  # cut before the copy was read: seen changing, taken again once quiet
            assert later == []
            assert (first["sha256"], first["rows_loaded"]) == (
                hashlib.sha256(cut).hexdigest(),
                len(lines) // 2 - 1,
            )
            events = [e["event"] for e in logged_events(daemon.warehouse)]
            assert "file_changed_while_reading" in events
        # The producer sends the whole file again: nothing is lost, nothing counts twice.
        drop(daemon, outside, "big-again.csv", full)
        wait_for(lambda: not daemon.inbox_waiting(), 30, "the re-sent file taken")
        assert "big-again.csv" in [p.name for p in set_aside(daemon, "done")]
        again = [(r["rows_loaded"], r["rows_duplicate"]) for r in entries(daemon, "big-again.csv")]
        if point == "staged":
            assert again == []  # the very bytes recorded first: seen before
        else:  # new bytes: the half that was missing loads, the other half is known
            assert again == [(4_000 - (len(lines) // 2 - 1), len(lines) // 2 - 1)]
        expected = Expected()
        expected.add_transactions(full.decode())
        ordinary(daemon, outside, expected, 100_000, "after.csv")
        wait_done(daemon, "after.csv")
        finish(daemon, expected)
    finally:
        daemon.close()


def test_a_file_truncated_just_after_it_was_closed_is_not_stalled_nor_half_recorded(
    daemon: DaemonProcess, outside: Path
) -> None:
    full = transactions_csv(1, 2_000, seed=9)
    lines = full.splitlines(keepends=True)
    cut = b"".join(lines[:500])
    versions = {
        hashlib.sha256(full).hexdigest(): len(lines) - 1,
        hashlib.sha256(cut).hexdigest(): 499,
    }
    started = time.monotonic()
    path = daemon.inbox / "written.csv"
    with path.open("wb") as handle:
        handle.write(full)
    time.sleep(0.05)
    os.truncate(path, len(cut))  # by path: a Modified with no writer holding the file
    wait_done(daemon, "written.csv", timeout=20)
    assert time.monotonic() - started < 10  # no minute-long wait for a Closed
    rows = entries(daemon, "written.csv")
    for row in rows:  # each ledger row: the sha256 of one version, with that version's rows
        assert versions[row["sha256"]] == row["rows_total"]
    expected = Expected()
    loaded = {row["sha256"] for row in rows}
    expected.add_transactions(
        (full if hashlib.sha256(full).hexdigest() in loaded else cut).decode()
    )
    assert "file_close_not_seen" not in [e["event"] for e in logged_events(daemon.warehouse)]
    ordinary(daemon, outside, expected, 100_000, "after.csv")
    wait_done(daemon, "after.csv")
    finish(daemon, expected)


def test_a_header_of_5000_columns_is_read_whole_and_its_rows_load(
    daemon: DaemonProcess, outside: Path
) -> None:
    extras = [f"extra_column_{n:05d}" for n in range(4_995)]
    header = ",".join(extras + list(TX_COLUMNS))  # the columns that matter come last, past 64 KiB
    assert len(header) > 90_000
    rows = random_transactions(random.Random(3), 1, 100)
    filler = ",".join("x" * len(extras))
    body = "".join(filler + "," + ",".join(map(str, row)) + "\n" for row in rows)
    expected = Expected()
    expected.add_transactions(
        "\n".join([TX_HEADER, *(",".join(map(str, row)) for row in rows)]) + "\n"
    )
    drop(daemon, outside, "wide.csv", (header + "\n" + body).encode())
    ordinary(daemon, outside, expected, 1_000, "after.csv")
    wait_done(daemon, "wide.csv", "after.csv", timeout=60)
    [row] = entries(daemon, "wide.csv")
    assert (row["status"], row["rows_loaded"], row["rows_rejected"]) == ("loaded", 100, 0)
    finish(daemon, expected)


def test_a_row_with_a_10_mb_field_is_refused_by_its_line_and_the_good_rows_load(
    daemon: DaemonProcess, outside: Path
) -> None:
    rows = random_transactions(random.Random(4), 1, 10)
    lines = [",".join(map(str, row)) for row in rows]
    long_line = f"99,1,2022-01-01,1.00,{'d' * 10_000_000}"
    text = "\n".join([TX_HEADER, *lines[:5], long_line, *lines[5:]]) + "\n"
    expected = Expected()
    expected.add_transactions("\n".join([TX_HEADER, *lines]) + "\n")
    drop(daemon, outside, "long.csv", text.encode())
    ordinary(daemon, outside, expected, 1_000, "after.csv")
    wait_done(daemon, "long.csv", "after.csv", timeout=60)
    [row] = entries(daemon, "long.csv")
    assert (row["status"], row["rows_loaded"], row["rows_rejected"]) == ("loaded", 10, 1)
    [reject] = daemon.get(f"/v1/files/{row['file_id']}/rejects")["items"]
    assert (reject["line"], reject["reason"]) == (7, "line_too_long")
    assert len(reject["raw_line"]) < 200  # a prefix, never the 10 MB
    assert reject["raw_line"].startswith("99,1,2022-01-01,1.00,ddd")
    finish(daemon, expected)


def _raw_request(port: int, request: bytes) -> bytes:
    """Send ``request`` as is and read the answer until the server closes or 5 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        with contextlib.suppress(OSError):  # the server may close before all is sent
            conn.sendall(request)
        answer = b""
        with contextlib.suppress(TimeoutError):
            while chunk := conn.recv(65536):
                answer += chunk
    return answer


def test_a_request_head_over_64_kib_is_refused_431_and_a_long_url_414(
    daemon: DaemonProcess, outside: Path
) -> None:
    port = daemon.port
    big_header = (
        b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n"
    )
    assert _raw_request(port, big_header).startswith(b"HTTP/1.1 431 ")
    many = b"".join(b"X-%d: %s\r\n" % (n, b"b" * 1000) for n in range(100))
    refused = _raw_request(port, b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    assert refused.startswith(b"HTTP/1.1 431 ")
    assert b'"status": 431' in refused
    long_url = b"GET /v1/files?x=" + b"c" * (1 << 20) + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    assert _raw_request(port, long_url).startswith(b"HTTP/1.1 414 ")
    fine = _raw_request(
        port, b"GET /v1/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert fine.startswith(b"HTTP/1.1 200 ")
    expected = Expected()
    ordinary(daemon, outside, expected, 1, "after.csv")
    wait_done(daemon, "after.csv")
    finish(daemon, expected)


def test_names_too_long_to_set_aside_are_moved_under_a_short_unique_name(
    daemon: DaemonProcess, outside: Path
) -> None:
    long_name = "n" * 246 + ".csv"  # 250 bytes: with ".reason.json" or ".1" it would not fit
    widest = "w" * 250 + ".csv"  # 254 bytes, twice, different bytes each time
    refused_name = "r" * 248 + ".csv"
    expected = Expected()
    first = transactions_csv(1, 10, seed=11)
    expected.add_transactions(first.decode())
    drop(daemon, outside, long_name, first)
    drop(daemon, outside, refused_name, b"no,such,header\n1,2,3\n")
    wait_done(daemon, long_name, refused_name)
    for n, first_id in enumerate((100, 200)):
        content = transactions_csv(first_id, 10, seed=first_id)
        expected.add_transactions(content.decode())
        drop(daemon, outside, widest, content)
        wait_for(lambda n=n: len(entries(daemon, widest)) == n + 1, 30, "the widest name loaded")
        wait_done(daemon, widest)
    ordinary(daemon, outside, expected, 1_000, "after.csv")
    wait_done(daemon, "after.csv")
    assert [row["status"] for row in entries(daemon, long_name)] == ["loaded"]
    assert [row["status"] for row in entries(daemon, widest)] == ["loaded", "loaded"]
    done = [p.name for p in set_aside(daemon, "done")]
    assert len(done) == 4
    assert len(set(done)) == 4
    assert all(len(os.fsencode(name)) <= 255 - len(".reason.json") for name in done)
    assert sum(name.startswith("w" * 100) for name in done) == 2
    [refused] = [p for p in set_aside(daemon, "failed")]
    assert refused.name.startswith("r" * 100)
    assert reason_file(daemon, refused.name)["file"] == refused_name  # the full name, traceable
    finish(daemon, expected)


def test_what_already_held_still_holds_and_the_stream_goes_on(
    daemon: DaemonProcess, outside: Path
) -> None:
    """Binary and NUL-filled files, a 30 MB single line, unbalanced quotes, odd names, a file
    deleted right after its drop, the same bytes under 20 names: each ends with a reason or a
    load, and an ordinary file still loads after them."""
    expected = Expected()
    plain = transactions_csv(1, 5, seed=21)
    expected.add_transactions(plain.decode())
    refused = {
        "binary.csv": bytes(range(256)) * 64,
        "zeros.csv": b"\x00" * 100_000,
        "one-line.csv": b"a" * 30_000_000,
        "quotes.csv": b'transaction_id,user_id,"transaction_date,amount,transaction_type\n1,2,3\n',
    }
    odd = ["with space.csv", "ünïcödé-€.csv", "new\nline.csv", "-leading-dash.csv"]
    for name, content in refused.items():
        drop(daemon, outside, name, content)
    header = TX_HEADER.encode()
    drop(daemon, outside, "quote-row.csv", header + b'\n7,1,"2022-01-01,5.00,deposit\n8,1\n')
    for name in odd:
        drop(daemon, outside, name, plain)  # the same bytes under every odd name
    for n in range(15):
        drop(daemon, outside, f"copy-{n}.csv", plain)
    drop(daemon, outside, "..dots.csv", plain)  # a hidden name: never taken, left as it is
    gone = drop(daemon, outside, "gone.csv", transactions_csv(500, 5, seed=22))
    gone.unlink()  # deleted right after the drop: nothing of it may count
    ordinary(daemon, outside, expected, 1_000, "after.csv")
    wait_done(daemon, *refused, "quote-row.csv", odd[0], "after.csv", timeout=60)
    reasons = {name: entries(daemon, name)[0]["error_reason"] for name in refused}
    assert reasons == {
        "binary.csv": "binary",
        "zeros.csv": "binary",
        "one-line.csv": "header_too_long",
        "quotes.csv": "missing_column",  # the open quote swallows the other names
    }
    [quoted] = entries(daemon, "quote-row.csv")  # an open quote in a row: that record refused
    assert (quoted["status"], quoted["rows_loaded"], quoted["rows_rejected"]) == ("loaded", 0, 1)
    loaded = [row for row in ledger(daemon) if row["status"] == "loaded"]
    assert sorted(row["name"] for row in loaded) == sorted(["after.csv", odd[0], "quote-row.csv"])
    done = {p.name for p in set_aside(daemon, "done")}
    assert set(odd) | {f"copy-{n}.csv" for n in range(15)} | {"after.csv"} <= done
    assert "gone.csv" not in done | {p.name for p in set_aside(daemon, "failed")}
    assert (daemon.inbox / "..dots.csv").read_bytes() == plain
    assert not entries(daemon, "..dots.csv")
    finish(daemon, expected)
