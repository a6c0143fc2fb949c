"""Uploads over HTTP (``POST /v1/files``) to a real ``moneylion serve`` child: the file lands in
the inbox whole and takes the same path as a dropped one."""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from moneylion.api.uploads import inbox_name
from moneylion.watcher import scan_inbox
from tests.conftest import TX_HEADER, csv_text
from tests.daemon_process import DaemonProcess, wait_for

LIMIT = 4096  # max_upload_bytes of the daemons here


def transactions(first: int, count: int) -> bytes:
    rows = (
        f"{first + n},{n % 7 + 1},2022-03-0{n % 9 + 1},{n + 1}.25,deposit" for n in range(count)
    )
    return csv_text(TX_HEADER, rows).encode()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    base = tmp_path_factory.mktemp("uploads")
    process = DaemonProcess(
        base / "inbox",
        base / "warehouse",
        settle_seconds=0.1,
        env={"MONEYLION_MAX_UPLOAD_BYTES": str(LIMIT)},
    )
    process.inbox.mkdir()
    process.start()
    try:
        yield process
    finally:
        process.close()


def settled(daemon: DaemonProcess, answer: httpx.Response) -> dict[str, Any]:
    """The ledger row an upload's poll URL gives once the worker is done with it."""
    poll = answer.json()["poll"]
    assert answer.headers["location"] == poll
    wait_for(lambda: daemon.client.get(poll).status_code == 200, 30, f"{poll} to answer")
    found: dict[str, Any] = daemon.client.get(poll).json()
    return found


def uploads_left(daemon: DaemonProcess) -> list[Path]:
    folder = daemon.inbox / ".uploads"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_a_raw_upload_is_ingested_like_a_dropped_file(daemon: DaemonProcess) -> None:
    body = transactions(1000, 20)
    answer = daemon.client.post(
        "/v1/files",
        params={"name": "raw.csv"},
        content=body,
        headers={"content-type": "text/csv"},
    )
    assert answer.status_code == 202, answer.text
    sha256 = hashlib.sha256(body).hexdigest()
    assert answer.json() == {
        "status": "queued",
        "sha256": sha256,
        "name": "raw.csv",
        "size_bytes": len(body),
        "poll": f"/v1/files/sha256/{sha256}",
        "file": None,
    }
    entry = settled(daemon, answer)
    assert (entry["name"], entry["status"], entry["rows_loaded"]) == ("raw.csv", "loaded", 20)
    assert entry["sha256"] == sha256
    wait_for(lambda: "raw.csv" in daemon.folder("done"), 10, "raw.csv in done/")
    assert uploads_left(daemon) == []


def test_a_multipart_upload_keeps_the_file_name(daemon: DaemonProcess) -> None:
    body = transactions(2000, 10)
    answer = daemon.client.post(
        "/v1/files",
        data={"note": "ignored"},
        files={"file": ("../../etc/form upload.csv", body, "text/csv")},
    )
    assert answer.status_code == 202, answer.text
    assert answer.json()["name"] == "form_upload.csv"  # its last part, made safe
    entry = settled(daemon, answer)
    assert (entry["name"], entry["rows_loaded"]) == ("form_upload.csv", 10)


def test_a_resent_upload_answers_with_the_file_already_in_the_ledger(
    daemon: DaemonProcess,
) -> None:
    body = transactions(3000, 5)
    first = settled(
        daemon, daemon.client.post("/v1/files", params={"name": "once.csv"}, content=body)
    )
    files_before = daemon.get("/v1/files")["total"]
    again = daemon.client.post("/v1/files", params={"name": "twice.csv"}, content=body)
    assert again.status_code == 200, again.text
    answer = again.json()
    assert answer["status"] == "known"
    assert answer["file"]["file_id"] == first["file_id"]
    assert answer["file"]["name"] == "once.csv"
    assert answer["poll"] == f"/v1/files/{first['file_id']}"
    time.sleep(0.5)  # nothing was written: nothing to ingest
    assert daemon.inbox_waiting() == []
    assert daemon.get("/v1/files")["total"] == files_before
    assert uploads_left(daemon) == []


def test_a_bad_csv_uploaded_is_refused_with_the_reason_a_dropped_one_gets(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    uploaded = settled(
        daemon,
        daemon.client.post(
            "/v1/files", params={"name": "bad.csv"}, content=b"colour,size\nred,3\n"
        ),
    )
    temp = tmp_path / "dropped.csv"
    temp.write_bytes(b"colour,size\nblue,4\n")
    temp.rename(daemon.inbox / "dropped-bad.csv")
    wait_for(lambda: "dropped-bad.csv" in daemon.folder("failed"), 30, "the dropped file to fail")
    dropped = next(f for f in daemon.get("/v1/files")["items"] if f["name"] == "dropped-bad.csv")
    assert uploaded["status"] == dropped["status"] == "failed"
    assert uploaded["error_reason"] == dropped["error_reason"] == "unknown_header"
    assert "bad.csv" in daemon.folder("failed")


@pytest.mark.parametrize("how", ["raw", "multipart", "chunked"])
def test_a_body_over_max_upload_bytes_is_refused_413(daemon: DaemonProcess, how: str) -> None:
    body = transactions(5000, 400)
    assert len(body) > LIMIT
    if how == "raw":
        answer = daemon.client.post("/v1/files", params={"name": "big.csv"}, content=body)
    elif how == "multipart":
        answer = daemon.client.post("/v1/files", files={"file": ("big.csv", body)})
    else:  # no content-length: counted while it arrives
        chunks = (body[n : n + 1000] for n in range(0, len(body), 1000))
        answer = daemon.client.post("/v1/files", params={"name": "big.csv"}, content=chunks)
    assert answer.status_code == 413, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert str(LIMIT) in answer.json()["detail"]
    assert "big.csv" not in [p.name for p in daemon.inbox.iterdir()]
    wait_for(lambda: uploads_left(daemon) == [], 5, ".uploads/ to be empty")


def test_exactly_max_upload_bytes_is_accepted(daemon: DaemonProcess) -> None:
    body = transactions(6000, 400)[:LIMIT]
    body = body[: body.rindex(b"\n") + 1]
    body += b"#" * (LIMIT - len(body) - 1) + b"\n"  # a last line of padding: rejected, not lost
    assert len(body) == LIMIT
    answer = daemon.client.post("/v1/files", params={"name": "limit.csv"}, content=body)
    assert answer.status_code == 202, answer.text
    assert settled(daemon, answer)["size_bytes"] == LIMIT


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"no boundary"),
        (
            "multipart/form-data; boundary=xyz",
            b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n--xyz--\r\n',
        ),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\ngarbage"),
    ],
)
def test_a_malformed_form_is_400_and_leaves_nothing(
    daemon: DaemonProcess, content_type: str, body: bytes
) -> None:
    answer = daemon.client.post("/v1/files", content=body, headers={"content-type": content_type})
    assert answer.status_code == 400, answer.text
    assert uploads_left(daemon) == []


def test_a_kill_during_an_upload_leaves_no_partial_file_in_the_inbox(tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path / "inbox", tmp_path / "warehouse", settle_seconds=0.1)
    daemon.inbox.mkdir()
    body = transactions(9000, 2000)
    half = len(body) // 2
    try:
        daemon.start()
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            head = (
                "POST /v1/files?name=interrupted.csv HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: text/csv\r\nContent-Length: {len(body)}\r\n\r\n"
            )
            sock.sendall(head.encode() + body[:half])
            wait_for(
                lambda: [p.stat().st_size for p in uploads_left(daemon)] == [half],
                10,
                "half the upload to be written",
            )
            daemon.kill()
        assert [p.name for p in daemon.inbox.iterdir() if not p.is_dir()] == []
        assert scan_inbox(daemon.inbox) == []
        daemon.start()
        assert uploads_left(daemon) == []  # cleared at start
        assert daemon.get("/v1/files")["total"] == 0
        answer = daemon.client.post("/v1/files", params={"name": "interrupted.csv"}, content=body)
        assert settled(daemon, answer)["rows_loaded"] == 2000
    finally:
        daemon.close()


@pytest.mark.parametrize(
    ("requested", "expected"),
    [
        ("users.csv", "users.csv"),
        (".hidden.csv", "hidden.csv"),
        ("a/b\\c.csv", "c.csv"),
        ("x.tmp", "x.tmp.csv"),
        ("ünï cödé.csv", "_n_c_d_.csv"),
        ("...", "upload-0123456789ab.csv"),
        (None, "upload-0123456789ab.csv"),
    ],
)
def test_upload_names_are_made_safe_for_the_inbox(requested: str | None, expected: str) -> None:
    assert inbox_name(requested, "0123456789ab" + "0" * 52) == expected


def test_the_dashboard_form_takes_the_same_path(daemon: DaemonProcess) -> None:
    body = transactions(12000, 3)
    plain = daemon.client.post("/upload", files={"file": ("form.csv", body)})
    assert plain.status_code == 303  # a form posted without htmx goes back to the dashboard
    assert plain.headers["location"] == "/"
    sha256 = hashlib.sha256(body).hexdigest()
    wait_for(
        lambda: daemon.client.get(f"/v1/files/sha256/{sha256}").status_code == 200, 30, "form.csv"
    )
    again = daemon.client.post(
        "/upload", files={"file": ("form.csv", body)}, headers={"HX-Request": "true"}
    )
    assert again.status_code == 200
    file_id = daemon.get(f"/v1/files/sha256/{sha256}")["file_id"]
    assert 'data-upload="known"' in again.text
    assert f'href="/files/{file_id}"' in again.text


def test_without_hard_links_a_finished_upload_is_renamed_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moneylion.api import uploads

    def no_links(source: object, target: object) -> None:
        raise PermissionError("no hard links here")

    inbox = tmp_path / "inbox"
    (inbox / ".uploads").mkdir(parents=True)
    (inbox / "taken.csv").write_bytes(b"another file\n")
    staged = inbox / ".uploads" / "upload-1.part"
    staged.write_bytes(b"user_id,signup_date,country\n")
    monkeypatch.setattr(uploads.os, "link", no_links)
    name = uploads._publish(staged, inbox, "taken.csv", "ab" * 32)
    assert name == "taken-abababababab.csv"
    assert (inbox / name).read_bytes() == b"user_id,signup_date,country\n"
    assert (inbox / "taken.csv").read_bytes() == b"another file\n"  # never replaced
    assert not staged.exists()
