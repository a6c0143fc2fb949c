"""Every way a producer writes a file into the inbox, against a real ``moneylion serve``: each
ends with every row the producer wrote loaded exactly once, one file per log in done/ holding
exactly the producer's bytes, and a ledger (``files`` + ``file_parts``, and the API's view of
them) saying exactly which bytes were loaded. ``check_producers`` is the one judge.

A file taken by the daemon is tailed by inode: bytes written into it afterwards (in the inbox,
in done/, or through another hard link) are loaded as its next part, and a headerless file a
``>>`` producer recreates in the inbox continues the file in done/. See docs/daemon.md.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest

from moneylion.aggregates import verify
from moneylion.config import load_config
from moneylion.inbox import set_aside_files
from moneylion.schema import open_warehouse
from tests.conftest import TX_HEADER
from tests.daemon_process import (
    DaemonProcess,
    assert_api_totals,
    logged_events,
    random_transactions,
    wait_for,
)
from tests.expected import Expected

pytestmark = pytest.mark.slow

SETTLE = 0.2  # the daemon's settle_seconds in these tests
HEADER = f"{TX_HEADER}\n".encode()

StartDaemon = Callable[..., DaemonProcess]


# -- producers and their data -------------------------------------------------------------------


def records(rng: random.Random, first_id: int, count: int, *, note: bool = False) -> bytes:
    """``count`` transaction records (ids from ``first_id``), LF-ended; with ``note``, a sixth
    field (an extra column the daemon ignores)."""
    extra = ",ok" if note else ""
    return "".join(
        f"{tx},{user},{day},{amount},{kind}{extra}\n"
        for tx, user, day, amount, kind in random_transactions(rng, first_id, count, users=2000)
    ).encode()


def cut_mid_record(data: bytes, pieces: int) -> list[bytes]:
    """``data`` in ``pieces`` chunks, each cut a few bytes into a record (as a buffered writer
    flushes), never at a line break."""
    cuts = [0]
    for n in range(1, pieces):
        at = data.index(b"\n", n * len(data) // pieces) + 6
        cuts.append(at)
    cuts.append(len(data))
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


class Log:
    """An event log written with ``open(path, 'ab')``, a write and a close per append (a shell's
    ``>>``); ``data`` is every byte it ever wrote."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = bytearray()

    def append(self, chunk: bytes) -> None:
        with self.path.open("ab") as out:
            out.write(chunk)
        self.data += chunk


@contextlib.contextmanager
def busy_cores(count: int) -> Iterator[None]:
    """``count`` child processes spinning on a core each, killed by pid at the end."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            os.kill(hog.pid, signal.SIGKILL)
            hog.wait(10)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[StartDaemon]:
    """Starts the test's daemon; keyword arguments are config keys set through the environment
    (``rescan_seconds=1`` -> ``MONEYLION_RESCAN_SECONDS=1``)."""
    made: list[DaemonProcess] = []

    def start_daemon(**config: float) -> DaemonProcess:
        env = {"MONEYLION_LOG_LEVEL": "INFO"}
        env.update({f"MONEYLION_{key.upper()}": str(value) for key, value in config.items()})
        daemon = DaemonProcess(
            tmp_path / "inbox", tmp_path / "warehouse", settle_seconds=SETTLE, env=env
        )
        daemon.inbox.mkdir(exist_ok=True)
        daemon.start()
        made.append(daemon)
        return daemon

    yield start_daemon
    for daemon in made:
        daemon.close()


# -- the judge ----------------------------------------------------------------------------------


def some(items: list[Any], shown: int = 6) -> str:
    """A list for a message: its first few items, and how many there are."""
    if len(items) <= shown:
        return repr(items)
    return f"{items[:shown]} ... ({len(items)} in all)"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def done_files(daemon: DaemonProcess) -> dict[str, list[Path]]:
    """The files in done/<day>/ by name."""
    found: dict[str, list[Path]] = {}
    for path in set_aside_files(daemon.inbox / "done"):
        found.setdefault(path.name, []).append(path)
    return found


def wait_finished(daemon: DaemonProcess, logs: dict[str, bytes], rows: int, timeout: float) -> bool:
    """Until the inbox is empty, the ledger counts ``rows`` loaded and each log's file in done/
    is as long as what its producer wrote; False on timeout (the checks then say what is off)."""

    def finished() -> bool:
        if daemon.inbox_waiting():
            return False
        if sum(int(item["rows_loaded"]) for item in daemon.ledger()) < rows:
            return False
        done = done_files(daemon)
        return all(
            len(done.get(name, [])) == 1 and done[name][0].stat().st_size == len(data)
            for name, data in logs.items()
        )

    with contextlib.suppress(AssertionError):
        wait_for(finished, timeout, "the producers' files loaded", step=0.2)
        return True
    return False


def check_api_parts(
    daemon: DaemonProcess,
    items: list[dict[str, Any]],
    name: str,
    data: bytes,
    rows: int,
    problems: list[str],
) -> bool:
    """The API's view of one log's parts; False if the API has no parts fields (legacy)."""
    mine = [item for item in items if item["name"] == name]
    if not mine:
        problems.append(f"API: {name} is not in /v1/files")
        return True
    if "part_of" not in mine[0]:
        return False
    firsts = [item for item in mine if item.get("part_of") is None]
    if len(firsts) != 1:
        problems.append(f"API: {name} has {len(firsts)} ledger rows with part_of null, not 1")
        return True
    first = firsts[0]["file_id"]
    detail = daemon.get(f"/v1/files/{first}")
    if (detail.get("part_of"), detail.get("part")) != (None, 1):
        problems.append(
            f"API: {name}'s first part says part_of={detail.get('part_of')} "
            f"part={detail.get('part')}, not null and 1"
        )
    if detail.get("bytes_loaded") != len(data):
        problems.append(
            f"API: {name}: bytes_loaded {detail.get('bytes_loaded')}, producer wrote {len(data)}"
        )
    parts = detail.get("parts") or []
    spans = [(p["part"], p["offset_start"], p["offset_end"]) for p in parts]
    want_spans = []
    offset = 0
    for n, (_, _start, end) in enumerate(spans, 1):
        want_spans.append((n, offset, end))
        offset = end
    if not parts or spans != want_spans or offset != len(data):
        problems.append(f"API: {name}'s parts {spans} do not cover 0..{len(data)} in order")
    if sorted(p["file_id"] for p in parts) != sorted(item["file_id"] for item in mine):
        problems.append(
            f"API: {name}'s parts are files {[p['file_id'] for p in parts]}, the ledger lists "
            f"{[item['file_id'] for item in mine]} under its name"
        )
    if sum(int(p["rows_loaded"]) for p in parts) != rows:
        problems.append(
            f"API: {name}'s parts loaded {sum(int(p['rows_loaded']) for p in parts)} rows, "
            f"its producer wrote {rows}"
        )
    by_id = {item["file_id"]: item for item in mine}
    for part in parts[1:]:
        item = by_id.get(part["file_id"], {})
        shown = daemon.get(f"/v1/files/{part['file_id']}")
        for what, got in (("/v1/files", item), (f"/v1/files/{part['file_id']}", shown)):
            if (got.get("part_of"), got.get("part")) != (first, part["part"]):
                problems.append(
                    f"API: {what} says part_of={got.get('part_of')} part={got.get('part')} for "
                    f"{name}'s part {part['part']} (first part {first})"
                )
    return True


def check_ledger_parts(
    name: str,
    data: bytes,
    files: dict[int, tuple[Any, ...]],
    parts: list[tuple[int, int, int, int, int]],
    want_parts: int | None,
    problems: list[str],
) -> tuple[str, int] | None:
    """DuckDB's ledger of one log: its chain of parts, each row's size and sha256 (of the bytes
    from 0 through the part's end). Returns (last part's sha256, bytes loaded)."""
    later = {file_id for file_id, *_ in parts}
    mine = [f for f in files.values() if f[1] == name]
    firsts = [f for f in mine if f[0] not in later]
    if len(firsts) != 1:
        problems.append(
            f"ledger: {name} has {len(firsts)} first parts (files rows not in file_parts): "
            f"{some([(f[0], f[3], f[4]) for f in firsts])}"
        )
        return None
    first = firsts[0]
    chain = [(first[0], 1, 0, int(first[4]))]
    chain += sorted(
        ((fid, part, start_, end) for fid, head, part, start_, end in parts if head == first[0]),
        key=lambda p: p[1],
    )
    offset = 0
    for n, (file_id, part, start_, end) in enumerate(chain, 1):
        row = files.get(file_id)
        if part != n or start_ != offset or row is None:
            problems.append(f"ledger: {name}'s parts {chain} are not 1, 2, ... end to end")
            return None
        _, row_name, digest, status, size = row
        if row_name != name or status != "loaded" or size != end - start_:
            problems.append(
                f"ledger: {name}'s part {n} (file {file_id}) is {row_name!r} {status} "
                f"{size} bytes, for offsets {start_}..{end}"
            )
        if digest != sha256(data[:end]):
            problems.append(
                f"ledger: {name}'s part {n} sha256 is not that of the producer's bytes 0..{end}"
            )
        offset = end
    stray = sorted({f[0] for f in mine} - {c[0] for c in chain})
    if stray:
        problems.append(f"ledger: rows {stray} named {name} are not parts of file {first[0]}")
    if want_parts is not None and len(chain) != want_parts:
        problems.append(f"ledger: {name} has {len(chain)} parts, {want_parts} expected")
    return files[chain[-1][0]][2], offset


def check_producers(
    daemon: DaemonProcess,
    logs: dict[str, bytes],
    *,
    parts: dict[str, int] | None = None,
    rejects: int = 0,
    timeout: float = 20.0,
    linger: float = 1.0,
) -> None:
    """What every producer test ends with. ``logs``: each file's name in the inbox -> every byte
    its producer wrote into it; ``parts``: how many parts a log must be, where that is known.
    Waits for the daemon to load it all (at most ``timeout``), then ``linger``s (a late second
    load would show), checks the API, stops the daemon (SIGTERM), checks done/, failed/, the
    inbox and DuckDB: every row exactly once with exact Decimal totals, ``rejects`` rejected
    rows, each log one file in done/ equal to the producer's bytes and to the bytes the ledger
    says were loaded, and ``verify`` (incremental aggregates == full recompute)."""
    expected = Expected()
    ids: list[int] = []
    rows_of: dict[str, int] = {}
    for name, data in logs.items():
        text = data.decode("utf-8-sig")
        expected.add_transactions(text)
        found = [int(row["transaction_id"]) for row in csv.DictReader(io.StringIO(text))]
        rows_of[name] = len(found)
        ids += found
    assert len(ids) == len(set(ids)), "the test's producers wrote an id twice"
    problems: list[str] = []

    # -- while it runs: the API
    if not wait_finished(daemon, logs, len(ids), timeout):
        done = {
            name: [p.stat().st_size for p in paths] for name, paths in done_files(daemon).items()
        }
        problems.append(
            f"not finished after {timeout} s: inbox waiting {daemon.inbox_waiting()}, done/ "
            f"sizes {done}, producers wrote { ({n: len(d) for n, d in logs.items()}) }"
        )
    time.sleep(linger)
    items = daemon.ledger()
    loaded = sum(int(item["rows_loaded"]) for item in items)
    if loaded != len(ids):
        problems.append(f"rows: the ledger says {loaded} loaded, the producers wrote {len(ids)}")
    duplicate = sum(int(item["rows_duplicate"]) for item in items)
    if duplicate:
        problems.append(f"rows: {duplicate} counted as duplicates (bytes read twice)")
    rejected = sum(int(item["rows_rejected"]) for item in items)
    if rejected != rejects:
        problems.append(f"rows: {rejected} rejected, {rejects} expected")
    refused = [(i["file_id"], i["name"], i["status"], i["error_reason"]) for i in items]
    refused = [entry for entry in refused if entry[2] != "loaded"]
    if refused:
        problems.append(f"ledger rows not loaded: {some(refused)}")
    days = daemon.pages("/v1/daily", "days", **{"from": "2000-01-01", "to": "2099-12-31"})
    shown = (
        sum(int(day["transaction_count"]) for day in days),
        sum((Decimal(day["total_amount"]) for day in days), Decimal(0)),
    )
    if shown != (len(ids), expected.grand_total):
        problems.append(
            f"API: /v1/daily adds up to {shown[0]} transactions, {shown[1]}; the producers "
            f"wrote {len(ids)}, {expected.grand_total}"
        )
    else:
        try:
            assert_api_totals(daemon, expected)
        except AssertionError as exc:
            problems.append(f"API: a day's or a user's totals differ from what was written {exc}")
    api_parts = True
    for name, data in logs.items():
        api_parts &= check_api_parts(daemon, items, name, data, rows_of[name], problems)
    strangers = sorted({item["name"] for item in items} - set(logs))
    if strangers:
        problems.append(f"ledger rows for files no producer wrote: {strangers}")

    # -- stopped: the folders and DuckDB
    code = daemon.stop()
    if code != 0:
        problems.append(f"exit code {code} after SIGTERM")
    if daemon.inbox_waiting():
        problems.append(f"left in the inbox: {daemon.inbox_waiting()}")
    if daemon.folder("failed"):
        problems.append(f"failed/ holds {some(daemon.folder('failed'))}")
    if daemon.folder("done") != sorted(logs):
        problems.append(f"done/ holds {some(daemon.folder('done'))}, not {sorted(logs)} once each")
    done = done_files(daemon)
    config = load_config(environ={}).with_overrides(inbox=daemon.inbox, warehouse=daemon.warehouse)
    conn = open_warehouse(config)
    try:
        stored = [
            int(i) for (i,) in conn.execute("SELECT transaction_id FROM transactions").fetchall()
        ]
        (total,) = conn.execute("SELECT coalesce(sum(amount), 0) FROM transactions").fetchone() or (
            0,
        )
        users = conn.execute(
            "SELECT user_id, count(*), sum(amount) FROM transactions GROUP BY user_id"
        ).fetchall()
        (reject_rows,) = conn.execute("SELECT count(*) FROM rejects").fetchone() or (0,)
        files = {
            int(row[0]): row
            for row in conn.execute(
                "SELECT file_id, name, sha256, status, size_bytes FROM files ORDER BY file_id"
            ).fetchall()
        }
        try:
            file_parts = conn.execute(
                "SELECT file_id, first_file_id, part, offset_start, offset_end FROM file_parts"
            ).fetchall()
            has_parts = True
        except duckdb.CatalogException:
            file_parts, has_parts = [], False
        differences = verify(conn, top_users_kept=config.top_users_kept)
    finally:
        conn.close()
    missing, extra = set(ids) - set(stored), set(stored) - set(ids)
    if missing:
        problems.append(f"DuckDB: {len(missing)} rows missing, e.g. ids {sorted(missing)[:5]}")
    if extra:
        problems.append(f"DuckDB: {len(extra)} ids nobody wrote, e.g. {sorted(extra)[:5]}")
    if len(stored) != len(set(stored)):
        problems.append(f"DuckDB: {len(stored) - len(set(stored))} rows stored twice")
    if Decimal(total) != expected.grand_total:
        problems.append(f"DuckDB: total amount {total}, the producers wrote {expected.grand_total}")
    per_user = {int(u): (int(c), Decimal(t)) for u, c, t in users}
    if per_user != {u: (expected.count[u], expected.total[u]) for u in expected.count}:
        problems.append("DuckDB: per-user counts or totals differ from what was written")
    if reject_rows != rejects:
        problems.append(f"DuckDB: {reject_rows} rows in rejects, {rejects} expected")
    if has_parts and not api_parts:
        problems.append("API: /v1/files has no part_of/part (file_parts exists in DuckDB)")
    for name, data in logs.items():
        want = None if parts is None else parts.get(name)
        last = check_ledger_parts(name, data, files, file_parts, want, problems)
        paths = done.get(name, [])
        if len(paths) != 1:
            continue
        on_disk = paths[0].read_bytes()
        if on_disk != data:
            problems.append(
                f"done/{name}: {len(on_disk)} bytes, not the {len(data)} its producer wrote"
            )
        if last is not None and (last[0] != sha256(on_disk) or last[1] != len(on_disk)):
            problems.append(
                f"done/{name}: {len(on_disk)} bytes, the ledger says {last[1]} were loaded "
                f"(sha256 {'equal' if last[0] == sha256(on_disk) else 'differs'})"
            )
    problems.extend(f"verify: {line}" for line in differences)
    assert not problems, "\n".join(problems)


# -- the producers ------------------------------------------------------------------------------


def test_moved_in_whole_or_renamed_from_tmp_is_one_part(tmp_path: Path, start: StartDaemon) -> None:
    daemon = start()
    rng = random.Random(1)
    moved = HEADER + records(rng, 1, 20_000)
    renamed = HEADER + records(rng, 20_001, 20_000)
    outside = tmp_path / "producer"
    outside.mkdir()
    (outside / "moved.csv").write_bytes(moved)
    os.rename(outside / "moved.csv", daemon.inbox / "moved.csv")
    (daemon.inbox / "renamed.csv.tmp").write_bytes(renamed)
    os.rename(daemon.inbox / "renamed.csv.tmp", daemon.inbox / "renamed.csv")
    check_producers(
        daemon,
        {"moved.csv": moved, "renamed.csv": renamed},
        parts={"moved.csv": 1, "renamed.csv": 1},
    )


def test_copyfile_of_a_large_file_while_both_cores_are_busy(
    tmp_path: Path, start: StartDaemon
) -> None:
    daemon = start()
    data = HEADER + records(random.Random(2), 1, 200_000)
    source = tmp_path / "big.csv"
    source.write_bytes(data)
    logs = {"big.csv": data}
    with busy_cores(2):
        shutil.copyfile(source, daemon.inbox / "big.csv")
        wait_finished(daemon, logs, 200_000, timeout=60)
    check_producers(daemon, logs, timeout=30)


def test_a_writer_whose_first_byte_comes_after_more_than_a_second(start: StartDaemon) -> None:
    daemon = start()
    data = HEADER + records(random.Random(3), 1, 30_000)
    with (daemon.inbox / "query.csv").open("wb") as out:  # slow_query > inbox/query.csv
        time.sleep(1.5)
        out.write(data)
    check_producers(daemon, {"query.csv": data}, parts={"query.csv": 1})


def test_a_writer_in_place_while_another_process_reads_the_file(start: StartDaemon) -> None:
    daemon = start()
    data = HEADER + records(random.Random(4), 1, 40_000)
    path = daemon.inbox / "report.csv"
    with path.open("wb") as out:
        for chunk in cut_mid_record(data, 4):
            out.write(chunk)
            out.flush()
            pause_until = time.monotonic() + 3 * SETTLE
            while time.monotonic() < pause_until:  # `head report.csv`, now and then
                # (check=False: once the daemon has set the file aside, head finds nothing)
                subprocess.run(
                    ["head", "-c", "200", str(path)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    check=False,
                )
                time.sleep(0.1)
    check_producers(daemon, {"report.csv": data})


def test_an_event_log_appended_fifty_times_with_pauses_short_and_long(start: StartDaemon) -> None:
    daemon = start(rescan_seconds=1)
    rng = random.Random(5)
    log = Log(daemon.inbox / "events.csv")
    pauses = (0.05, 3 * SETTLE, SETTLE / 2, 2 * SETTLE)  # shorter and longer than settle
    for n in range(50):
        log.append((HEADER if n == 0 else b"") + records(rng, n * 1000 + 1, 1000))
        time.sleep(1.5 if n == 24 else pauses[n % len(pauses)])  # one longer than the rescan
    check_producers(daemon, {"events.csv": bytes(log.data)})


def test_a_hard_link_in_the_inbox_written_through_its_other_name(
    tmp_path: Path, start: StartDaemon
) -> None:
    daemon = start(rescan_seconds=1)
    rng = random.Random(6)
    outside = tmp_path / "producer"
    outside.mkdir()
    other = outside / "linked.csv"
    data = HEADER + records(rng, 1, 10_000)
    other.write_bytes(data)
    os.link(other, daemon.inbox / "linked.csv")
    time.sleep(4 * SETTLE)
    with other.open("ab") as out:  # no event in the inbox for these writes
        for first_id in (10_001, 20_001):
            chunk = records(rng, first_id, 10_000)
            out.write(chunk)
            out.flush()
            data += chunk
            time.sleep(1.5)
    check_producers(daemon, {"linked.csv": data})


def test_a_writer_holding_the_file_open_pauses_longer_than_settle(start: StartDaemon) -> None:
    daemon = start()
    data = HEADER + records(random.Random(7), 1, 30_000)
    with (daemon.inbox / "held.csv").open("wb") as out:
        for chunk in cut_mid_record(data, 3):
            out.write(chunk)
            out.flush()
            time.sleep(4 * SETTLE)
    check_producers(daemon, {"held.csv": data}, parts={"held.csv": 1})


def test_a_writer_pausing_longer_than_writer_timeout(start: StartDaemon) -> None:
    daemon = start(writer_timeout_seconds=1)
    data = HEADER + records(random.Random(8), 1, 30_000)
    with (daemon.inbox / "stalled.csv").open("wb") as out:
        for chunk in cut_mid_record(data, 2):
            out.write(chunk)
            out.flush()
            time.sleep(2.0)
    check_producers(daemon, {"stalled.csv": data})


def test_a_log_appended_while_its_first_part_is_being_ingested(start: StartDaemon) -> None:
    daemon = start()
    rng = random.Random(9)
    log = Log(daemon.inbox / "growing.csv")
    log.append(HEADER + records(rng, 1, 100_000))
    wait_for(
        lambda: any(e.get("file") == "growing.csv" for e in logged_events(daemon.warehouse)),
        30,
        "the daemon to take growing.csv",
        step=0.01,
    )
    log.append(records(rng, 100_001, 10_000))
    time.sleep(0.5)
    log.append(records(rng, 110_001, 10_000))
    check_producers(daemon, {"growing.csv": bytes(log.data)})


def test_a_record_split_by_a_quoted_line_break_across_two_appends(start: StartDaemon) -> None:
    daemon = start(rescan_seconds=1)
    rng = random.Random(10)
    header = f"{TX_HEADER},note\n".encode()
    log = Log(daemon.inbox / "notes.csv")
    split = b'5001,7,2022-03-04,12.34,deposit,"a note, on two lines'
    log.append(header + records(rng, 1, 5000, note=True) + split + b"\n")
    time.sleep(1.5)  # taken meanwhile: its writer closed it
    log.append(b'the second line"\n' + records(rng, 5002, 5000, note=True))
    time.sleep(1.5)
    log.append(records(rng, 10_002, 1000, note=True))
    check_producers(daemon, {"notes.csv": bytes(log.data)})


def test_sigkill_between_two_parts_of_a_log_loses_nothing_and_counts_nothing_twice(
    start: StartDaemon,
) -> None:
    daemon = start(rescan_seconds=1)
    rng = random.Random(11)
    log = Log(daemon.inbox / "killed.csv")
    log.append(HEADER + records(rng, 1, 10_000))
    wait_for(
        lambda: sum(int(i["rows_loaded"]) for i in daemon.ledger()) >= 10_000,
        30,
        "the log's first part loaded",
    )
    log.append(records(rng, 10_001, 10_000))
    time.sleep(0.3)
    daemon.kill()
    log.append(records(rng, 20_001, 10_000))  # while the daemon is down
    daemon.start()
    log.append(records(rng, 30_001, 10_000))
    time.sleep(0.5)
    log.append(records(rng, 40_001, 10_000))
    check_producers(daemon, {"killed.csv": bytes(log.data)})


def test_the_seed_copied_by_a_writer_that_stalls_before_its_first_byte_and_midway(
    start: StartDaemon, seed_files: tuple[Path, Path]
) -> None:
    """The fresh-clone flake: taken at 0 bytes (refused `empty`) or half written."""
    daemon = start()
    data = seed_files[1].read_bytes()
    with (daemon.inbox / "transactions.csv").open("wb") as out:
        time.sleep(1.2)
        for chunk in cut_mid_record(data, 2):
            out.write(chunk)
            out.flush()
            time.sleep(1.2)
    check_producers(daemon, {"transactions.csv": data}, parts={"transactions.csv": 1})
