"""The inbox watcher with a real watchdog observer on tmp_path: every way a file can arrive ends
in exactly one hand-over to the worker, with complete bytes, and ignored names never do."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from moneylion.watcher import InboxQueue, InboxWatcher, is_inbox_file, scan_inbox

SETTLE = 0.2
CONTENT = (
    b"transaction_id,user_id,transaction_date,amount,transaction_type\n"
    b"1,1,2022-01-01,1.00,deposit\n"
)


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def queue() -> InboxQueue:
    return InboxQueue(SETTLE)


@pytest.fixture
def watcher(inbox: Path, queue: InboxQueue) -> Iterator[InboxWatcher]:
    started = InboxWatcher(inbox, queue, rescan_seconds=3600)
    started.start()
    yield started
    started.stop()
    queue.close()


def _move_to_done(path: Path) -> None:
    (path.parent / "done").mkdir(exist_ok=True)
    path.rename(path.parent / "done" / path.name)


def take_all(queue: InboxQueue, count: int, timeout: float = 10.0) -> list[tuple[Path, bytes]]:
    """Take ``count`` files like the worker does (read, then move to done/), then make sure
    nothing else comes within a few settle periods."""
    taken: list[tuple[Path, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(taken) < count and time.monotonic() < deadline:
        item = queue.take(timeout=0.2)
        if item is None:
            continue
        try:
            content = item.path.read_bytes()
        except FileNotFoundError:  # renamed away after its event: the worker drops it too
            queue.finish(item.path)
            continue
        assert queue.finish(item.path, then=partial(_move_to_done, item.path))
        taken.append((item.path, content))
    extra = queue.take(timeout=SETTLE * 3 + 0.5)
    assert extra is None, f"handed over again: {extra}"
    return taken


def test_file_written_in_place_is_taken_once(
    inbox: Path, queue: InboxQueue, watcher: InboxWatcher
) -> None:
    (inbox / "a.csv").write_bytes(CONTENT)
    assert take_all(queue, 1) == [(inbox / "a.csv", CONTENT)]


def test_file_moved_in_from_the_same_filesystem_is_taken_once(
    tmp_path: Path, inbox: Path, queue: InboxQueue, watcher: InboxWatcher
) -> None:
    outside = tmp_path / "outside.csv"
    outside.write_bytes(CONTENT)
    os.rename(outside, inbox / "moved.csv")
    assert take_all(queue, 1) == [(inbox / "moved.csv", CONTENT)]


@pytest.mark.parametrize("temp_name", ["b.csv.tmp", "b.csv.part", ".b.csv", "b.csv.writing"])
def test_file_renamed_from_a_temp_name_is_taken_once_under_its_final_name(
    inbox: Path, queue: InboxQueue, watcher: InboxWatcher, temp_name: str
) -> None:
    # "b.csv.writing" is not an ignored name: its Closed may queue it, the rename must win.
    temp = inbox / temp_name
    temp.write_bytes(CONTENT)
    os.rename(temp, inbox / "b.csv")
    taken = take_all(queue, 1)
    assert taken == [(inbox / "b.csv", CONTENT)]


def test_file_written_slowly_in_pieces_is_taken_only_when_closed(
    inbox: Path, queue: InboxQueue, watcher: InboxWatcher
) -> None:
    pieces = [CONTENT[:20], CONTENT[20:50], CONTENT[50:]]
    with (inbox / "slow.csv").open("wb") as handle:
        for piece in pieces:
            handle.write(piece)
            handle.flush()
            os.fsync(handle.fileno())
            time.sleep(SETTLE * 2)  # longer than settle: only the missing Closed holds it back
            assert queue.take(timeout=0.01) is None
    assert take_all(queue, 1) == [(inbox / "slow.csv", CONTENT)]


def test_ignored_names_and_subfolders_are_never_taken(
    inbox: Path, queue: InboxQueue, watcher: InboxWatcher
) -> None:
    for sub in ("done", "failed"):
        (inbox / sub).mkdir()
        (inbox / sub / "x.csv").write_bytes(CONTENT)
    (inbox / "failed" / "x.csv.reason.json").write_text("{}")
    for name in (".hidden.csv", "c.tmp", "c.csv.part", "C.CSV.TMP"):
        (inbox / name).write_bytes(CONTENT)
    assert take_all(queue, 0) == []


def test_startup_scan_queues_waiting_files_once_in_arrival_order(
    inbox: Path, queue: InboxQueue
) -> None:
    names = ["3.csv", "1.csv", "2.csv"]
    for age, name in enumerate(names):
        (inbox / name).write_bytes(CONTENT)
        stamp = time.time() - 100 + age
        os.utime(inbox / name, (stamp, stamp))
    (inbox / "skip.tmp").write_bytes(CONTENT)
    started = InboxWatcher(inbox, queue, rescan_seconds=3600)
    assert started.start() == 3
    try:
        assert started.scan() == 3  # a second scan adds nothing already queued
        assert [path.name for path, _ in take_all(queue, 3)] == names
    finally:
        started.stop()


def test_periodic_rescan_picks_up_a_file_whose_events_were_missed(
    inbox: Path, queue: InboxQueue
) -> None:
    started = InboxWatcher(inbox, queue, rescan_seconds=0.2)
    started.start()
    try:
        assert started.running
        started.stop()  # no observer any more: only a scan can find the file
        assert not started.running
        (inbox / "late.csv").write_bytes(CONTENT)
        started.scan()
        assert take_all(queue, 1) == [(inbox / "late.csv", CONTENT)]
    finally:
        started.stop()


def test_many_files_dropped_at_once_are_each_taken_once(
    tmp_path: Path, inbox: Path, queue: InboxQueue, watcher: InboxWatcher
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    names = [f"f{i:04d}.csv" for i in range(300)]
    for name in names:
        (staging / name).write_bytes(CONTENT + name.encode())
    for name in names:
        os.rename(staging / name, inbox / name)
    taken = take_all(queue, len(names), timeout=30)
    assert sorted(path.name for path, _ in taken) == names
    assert all(content == CONTENT + path.name.encode() for path, content in taken)


def test_a_file_changed_while_in_progress_is_queued_again_not_moved(
    inbox: Path, queue: InboxQueue
) -> None:
    path = inbox / "d.csv"
    path.write_bytes(CONTENT)
    queue.file_complete(path)
    item = queue.take(timeout=1)
    assert item is not None
    assert item.path == path
    queue.file_modified(path)
    queue.file_complete(path)
    moved: list[Path] = []
    assert not queue.finish(path, then=lambda: moved.append(path))
    assert moved == []
    again = queue.take(timeout=1)
    assert again is not None
    assert again.path == path
    assert queue.finish(path, then=lambda: moved.append(path))
    assert moved == [path]


def test_duplicate_events_queue_a_file_once_and_deleted_files_are_dropped(
    inbox: Path, queue: InboxQueue
) -> None:
    first, second = inbox / "e1.csv", inbox / "e2.csv"
    for path in (first, second):
        path.write_bytes(CONTENT)
    queue.file_created(first)
    queue.file_modified(first)
    queue.file_complete(second)
    queue.file_complete(first)
    queue.file_found(first)
    queue.file_complete(first)
    assert queue.queued() == [first, second]  # arrival order kept through later events
    queue.file_gone(second)
    assert queue.queued() == [first]
    first.unlink()
    queue.file_found(inbox / "ghost.csv")
    assert queue.take(timeout=SETTLE * 2) is not None  # first was COMPLETE: taken even if gone
    assert queue.take(timeout=SETTLE * 2) is None  # ghost never existed: dropped on its check


def test_a_retried_file_waits_for_its_backoff_and_goes_to_the_back(
    inbox: Path, queue: InboxQueue
) -> None:
    first, second = inbox / "r1.csv", inbox / "r2.csv"
    for path in (first, second):
        path.write_bytes(CONTENT)
        queue.file_complete(path)
    item = queue.take(timeout=1)
    assert item is not None
    assert (item.path, item.attempts) == (first, 0)
    queue.retry(first, attempts=1, delay=0.3)
    nxt = queue.take(timeout=1)
    assert nxt is not None
    assert nxt.path == second
    queue.finish(second)
    assert queue.take(timeout=0.05) is None  # first is still backing off
    retried = queue.take(timeout=2)
    assert retried is not None
    assert (retried.path, retried.attempts) == (first, 1)


def test_close_makes_take_return_none_at_once(inbox: Path, queue: InboxQueue) -> None:
    (inbox / "f.csv").write_bytes(CONTENT)
    queue.close()
    queue.file_complete(inbox / "f.csv")
    assert queue.take() is None
    assert len(queue) == 0


def test_inbox_file_rules(inbox: Path) -> None:
    assert is_inbox_file(inbox / "a.csv", inbox)
    assert is_inbox_file(inbox / "a", inbox)
    assert not is_inbox_file(inbox / "done" / "a.csv", inbox)
    assert not is_inbox_file(inbox / ".a.csv", inbox)
    assert not is_inbox_file(inbox / "a.csv.part", inbox)
    assert not is_inbox_file(inbox / "a.TMP", inbox)
    (inbox / "done").mkdir()
    (inbox / "z.csv").write_bytes(CONTENT)
    assert scan_inbox(inbox) == [inbox / "z.csv"]
