"""Corrections with the real daemon: a ``moneylion serve`` child, files dropped in its inbox,
corrections over HTTP while other files stream in, and SIGKILL in the middle of a correction."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.daemon_process import (
    DaemonProcess,
    assert_api_totals,
    random_transactions,
    transaction_stream,
    wait_for,
    warehouse_totals,
    write_transactions,
)
from tests.expected import Expected

pytestmark = pytest.mark.slow

LARGE_ID = 50_000_000  # the large file's ids: apart from the stream's


def file_id_of(daemon: DaemonProcess, name: str) -> int:
    found = [f for f in daemon.ledger() if f["name"] == name]
    assert len(found) == 1, found
    return int(found[0]["file_id"])


def drop(inbox: Path, path: Path) -> None:
    path.rename(inbox / path.name)


def post(daemon: DaemonProcess, path: str, reason: str | None = None) -> httpx.Response:
    body = {} if reason is None else {"reason": reason}
    return httpx.post(f"http://127.0.0.1:{daemon.port}{path}", json=body, timeout=300.0)


def test_a_million_row_file_and_a_users_file_retracted_over_http_while_files_stream_in(
    tmp_path: Path, seed_files: tuple[Path, Path]
) -> None:
    rng = random.Random(26)
    users_csv, _ = seed_files
    staging = tmp_path / "staging"
    staging.mkdir()
    large = write_transactions(
        staging / "large.csv", random_transactions(rng, LARGE_ID, 1_000_000, users=20_000)
    )
    users = staging / "users.csv"
    users.write_bytes(users_csv.read_bytes())
    stream = transaction_stream(tmp_path / "stream", rng, files=40, rows=50)
    expected = Expected()  # what remains: the stream alone
    for path in stream:
        expected.add_transactions_file(path)

    daemon = DaemonProcess(tmp_path / "inbox", tmp_path / "warehouse", settle_seconds=0.1)
    daemon.inbox.mkdir()
    daemon.start()
    try:
        drop(daemon.inbox, users)
        drop(daemon.inbox, large)
        wait_for(lambda: len(daemon.folder("done")) == 2, 180, "the large and users files")
        large_id, users_id = file_id_of(daemon, "large.csv"), file_id_of(daemon, "users.csv")

        def feed() -> None:
            for path in stream:
                drop(daemon.inbox, path)
                time.sleep(0.03)

        feeder = threading.Thread(target=feed)
        feeder.start()
        answers = [
            post(daemon, f"/v1/files/{large_id}/retract", "a test export, not production"),
            post(daemon, f"/v1/files/{users_id}/retract", "profiles of another system"),
        ]
        feeder.join()
        for answer in answers:
            assert answer.status_code == 200, answer.text
        assert answers[0].json()["rows_out"] == 1_000_000
        assert answers[1].json()["status"] == "retracted"
        wait_for(
            lambda: len(daemon.folder("done")) == 2 + len(stream) and not daemon.inbox_waiting(),
            120,
            "the stream ingested",
        )
        assert_api_totals(daemon, expected)
        only_in_large = next(
            u for u in range(20_000, 0, -1) if u not in expected.count
        )  # a user whose transactions were all in the retracted file
        assert daemon.client.get(f"/v1/users/{only_in_large}/summary").status_code == 404
        statuses = {f["file_id"]: f["status"] for f in daemon.ledger()}
        assert statuses[large_id] == statuses[users_id] == "retracted"
        assert daemon.stop() == 0
    finally:
        daemon.close()
    count, totals, differences = warehouse_totals(tmp_path / "warehouse")
    assert differences == []
    assert count == expected.transactions
    assert totals == {u: (expected.count[u], expected.total[u]) for u in expected.count}


def test_sigkill_during_a_correction_leaves_it_done_or_not_never_half(tmp_path: Path) -> None:
    """At least 3 trials: a retraction or restore of a large file is under way when the daemon
    is killed; after a restart the file is either retracted or loaded, and the warehouse equals
    the reference of that state (verify clean, every user's totals)."""
    rng = random.Random(2026)
    staging = tmp_path / "staging"
    staging.mkdir()
    rows = random_transactions(rng, LARGE_ID, 300_000, users=5_000)
    large = write_transactions(staging / "large.csv", rows)
    # A later file re-sends some of its rows (duplicates: they load when it is retracted).
    overlap = write_transactions(
        staging / "later.csv", rows[:500] + random_transactions(rng, 1, 500, users=5_000)
    )
    with_large, without = Expected(), Expected()
    for path in (large, overlap):
        with_large.add_transactions_file(path)
    without.add_transactions_file(overlap)
    daemon = DaemonProcess(tmp_path / "inbox", tmp_path / "warehouse", settle_seconds=0.1)
    daemon.inbox.mkdir()
    daemon.start()
    drop(daemon.inbox, large)
    wait_for(lambda: len(daemon.folder("done")) == 1, 120, "the large file")
    drop(daemon.inbox, overlap)
    wait_for(lambda: len(daemon.folder("done")) == 2, 120, "the later file")
    large_id = file_id_of(daemon, "large.csv")
    outcomes = []
    try:
        for trial in range(4):
            status = daemon.get(f"/v1/files/{large_id}")["status"]
            action = "retract" if status == "loaded" else "restore"
            thread = threading.Thread(
                target=lambda a=action: _post_quietly(daemon, large_id, a), daemon=True
            )
            thread.start()
            time.sleep(rng.uniform(0.05, 0.8))
            daemon.kill()
            thread.join(timeout=30)
            count, totals, differences = warehouse_totals(tmp_path / "warehouse")
            assert differences == [], (trial, differences[:5])
            daemon.start()
            after = daemon.get(f"/v1/files/{large_id}")["status"]
            assert after in ("loaded", "retracted")
            reference = with_large if after == "loaded" else without
            assert count == reference.transactions, (trial, action, after)
            assert totals == {u: (reference.count[u], reference.total[u]) for u in reference.count}
            assert_api_totals(daemon, reference, sample=20)
            outcomes.append((action, after))
        assert daemon.stop() == 0
    finally:
        daemon.close()
    assert len(outcomes) >= 3


def _post_quietly(daemon: DaemonProcess, file_id: int, action: str) -> None:
    """A correction whose daemon may be killed before it answers."""
    with contextlib.suppress(httpx.HTTPError):
        post(daemon, f"/v1/files/{file_id}/{action}", "a kill test")
