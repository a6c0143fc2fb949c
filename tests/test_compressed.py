"""Compressed inbox files (``*.csv.gz``, ``*.csv.zst``): read as the CSV they hold on every path
(a file alone: DuckDB's reader or the reference rules; a batch of small files), identified by the
sha256 of their compressed bytes, refused whole as ``bad_compression`` when the archive is broken
and as ``too_large`` when the CSV would pass max_file_bytes. Rejects carry the CSV's line numbers.
Every test that ingests ends with ``verify``."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import duckdb
import pytest
import zstandard
from litestar.testing import TestClient

from moneylion.aggregates import verify
from moneylion.api import create_app
from moneylion.batch import Unread, ingest_batch, item_of
from moneylion.config import Config
from moneylion.inbox import safe_name
from moneylion.ingest import FileOutcome, ingest_file
from moneylion.schema import connect
from moneylion.source import csv_name
from moneylion.validate import LINE_MAX_BYTES
from tests.conftest import TX_HEADER, parse_metrics
from tests.daemon_process import (
    DaemonProcess,
    assert_api_totals,
    logged_events,
    random_transactions,
    run_cli,
    run_cli_on,
    wait_for,
    write_transactions,
)
from tests.expected import Expected

# Stored first: what the file conflicts with, and a row it repeats.
STORED = f"{TX_HEADER}\n1,1,2024-01-01,10.00,deposit\n13,2,2024-01-01,3.00,deposit\n"

# Every row-level reason once (duplicate_in_file twice: both copies), at known lines of the CSV,
# with a blank line among them so that lines and records differ.
ROWS: list[tuple[str, str | None]] = [
    (TX_HEADER, None),
    ("2,1,2024-01-02,5.00,deposit", None),
    ("", None),
    (",1,2024-01-02,5.00,deposit", "missing_field"),
    ("abc,1,2024-01-02,5.00,deposit", "bad_integer"),
    ("-3,1,2024-01-02,5.00,deposit", "non_positive_id"),
    ("4,1,2024-02-30,5.00,deposit", "bad_date"),
    ("5,1,2024-01-02,$5,deposit", "bad_amount"),
    ("6,1,2024-01-02,0,deposit", "non_positive_amount"),
    ("7,1,2024-01-02,1.234,deposit", "too_many_decimals"),
    ("8,1,2024-01-02,5.00,bonus", "unknown_type"),
    ("9,2,2024-01-03,5.00,deposit", "duplicate_in_file"),
    ("9,2,2024-01-03,6.00,deposit", "duplicate_in_file"),
    ("1,1,2024-01-01,11.00,deposit", "conflicts_with_stored"),
    ("10,1,2024-01-02,5.00", "wrong_field_count"),
    ("13,2,2024-01-01,3.00,deposit", None),  # a stored row again: a duplicate
    ("11,2,2024-03-04,7.25,purchase", None),
]
LONG_LINE = ("12,2,2024-01-02,5.00," + "x" * (LINE_MAX_BYTES + 10), "line_too_long")


def compress(codec: str, data: bytes) -> bytes:
    if codec == "gz":
        return gzip.compress(data)
    return zstandard.ZstdCompressor().compress(data)


def csv_of(rows: list[tuple[str, str | None]]) -> bytes:
    return ("\n".join(text for text, _ in rows) + "\n").encode()


def expected_rejects(rows: list[tuple[str, str | None]]) -> list[tuple[int, str]]:
    return [(line, reason) for line, (_, reason) in enumerate(rows, start=1) if reason]


def load(
    conn: duckdb.DuckDBPyConnection, config: Config, paths: list[Path], how: str
) -> list[FileOutcome]:
    """``paths`` ingested one by one (``file``: the single-file paths) or as one batch."""
    if how == "file":
        return [ingest_file(conn, path, config) for path in paths]
    items = [item_of(path, config) for path in paths]
    outcomes, left = ingest_batch(conn, items, config)
    for item in items:
        if not isinstance(item, Unread):
            item.discard()
    assert left == []
    return outcomes


def rejects(conn: duckdb.DuckDBPyConnection, file_id: int | None) -> list[tuple[Any, ...]]:
    return conn.execute(
        "SELECT line_number, reason, message, raw_line FROM rejects WHERE file_id = ? "
        "ORDER BY line_number, reason",
        [file_id],
    ).fetchall()


def write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


HOW = ["file", "batch"]
CODECS = ["gz", "zst"]


@pytest.mark.parametrize("long_line", [False, True], ids=["short_lines", "a_line_too_long"])
@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("codec", CODECS)
def test_every_reject_reason_of_a_compressed_file_has_the_csv_line_and_the_plain_verdict(
    tmp_path: Path, config: Config, warehouse: duckdb.DuckDBPyConnection, codec: str, how: str,
    long_line: bool,
) -> None:  # fmt: skip
    rows = [*ROWS[:-1], LONG_LINE, ROWS[-1]] if long_line else ROWS
    plain_bytes = csv_of(rows)
    folder = tmp_path / "files"
    stored = write(folder, "stored.csv", STORED.encode())
    packed = write(folder, f"rows.csv.{codec}", compress(codec, plain_bytes))
    plain = write(folder, "rows.csv", plain_bytes)

    first, outcome = load(warehouse, config, [stored, packed], how)

    assert first.rows_loaded == 2
    assert outcome.status == "loaded", outcome.error
    assert outcome.sha256 == hashlib.sha256(packed.read_bytes()).hexdigest()
    assert outcome.size_bytes == packed.stat().st_size
    assert (outcome.rows_loaded, outcome.rows_duplicate) == (2, 1)
    assert [(line, reason) for line, reason, _, _ in rejects(warehouse, outcome.file_id)] == (
        expected_rejects(rows)
    )
    assert verify(warehouse) == []
    # The plain file, alone in a warehouse of its own, gets the same verdicts word for word.
    other = connect(tmp_path / "plain.duckdb")
    try:
        _, plain_outcome = load(other, config, [stored, plain], how)
        assert rejects(other, plain_outcome.file_id) == rejects(warehouse, outcome.file_id)
        assert verify(other) == []
    finally:
        other.close()
    assert list(config.staging_dir.glob("*")) == []  # no private copy left behind


def broken_archives() -> dict[str, tuple[str, bytes]]:
    text = (
        "\n".join([TX_HEADER, *(f"{i},1,2024-01-02,{i}.00,deposit" for i in range(1, 400))]) + "\n"
    )
    data = text.encode()
    zst = zstandard.ZstdCompressor().compress(data)
    return {
        "gzip_truncated": ("gz", gzip.compress(data)[:-7]),
        "gzip_cut_in_half": ("gz", gzip.compress(data)[: len(gzip.compress(data)) // 2]),
        "gzip_garbage": ("gz", b"\x1f\x8bthis is not deflate at all"),
        "gzip_trailing_garbage": ("gz", gzip.compress(data) + b"junk"),
        "gzip_plain_text": ("gz", data),
        "gzip_empty": ("gz", b""),
        "zstd_truncated": ("zst", zst[:-9]),
        "zstd_garbage": ("zst", b"\x28\xb5\x2f\xfd" + b"garbage" * 5),
        "zstd_trailing_garbage": ("zst", zst + b"junk"),
        "zstd_plain_text": ("zst", data),
        "zstd_empty": ("zst", b""),
    }


BROKEN = broken_archives()


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_archive_is_refused_whole_as_bad_compression_and_known_by_its_bytes(
    tmp_path: Path, config: Config, warehouse: duckdb.DuckDBPyConnection, case: str, how: str
) -> None:
    codec, data = BROKEN[case]
    broken = write(tmp_path / "files", f"{case}.csv.{codec}", data)
    again = write(tmp_path / "files", f"{case}-again.csv.{codec}", data)
    good = write(
        tmp_path / "files", "good.csv", f"{TX_HEADER}\n500,1,2024-01-02,1.00,deposit\n".encode()
    )

    outcomes = load(warehouse, config, [broken, good, again], how)

    refused, loaded, resent = outcomes
    assert (refused.status, refused.error_reason) == ("failed", "bad_compression")
    assert refused.error is not None
    assert refused.error.startswith(broken.name)
    assert refused.sha256 == hashlib.sha256(data).hexdigest()
    assert refused.rows_loaded == refused.rows_total == 0
    assert loaded.rows_loaded == 1  # the others of a batch load
    assert resent.status == "failed"
    assert resent.file_id == refused.file_id  # seen before
    ledger = warehouse.execute(
        "SELECT error_reason, sha256 FROM files WHERE file_id = ?", [refused.file_id]
    ).fetchall()
    assert ledger == [("bad_compression", refused.sha256)]
    assert warehouse.execute("SELECT count(*) FROM transactions").fetchall() == [(1,)]
    assert verify(warehouse) == []
    assert list(config.staging_dir.glob("*")) == []


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("codec", CODECS)
def test_a_file_that_decompresses_past_max_file_bytes_is_too_large(
    tmp_path: Path, config: Config, warehouse: duckdb.DuckDBPyConnection, codec: str, how: str
) -> None:
    limited = config.with_overrides(max_file_bytes=200_000)
    # 2 MB of CSV (a bomb in miniature: a few kB compressed), and one just under the limit.
    rows = "1,1,2024-01-02,1.00,deposit\n" * 80_000
    bomb = write(
        tmp_path / "files", f"bomb.csv.{codec}", compress(codec, f"{TX_HEADER}\n{rows}".encode())
    )
    small = "".join(f"{i},1,2024-01-02,1.00,deposit\n" for i in range(100_000, 105_000))
    fits = write(
        tmp_path / "files", f"fits.csv.{codec}", compress(codec, f"{TX_HEADER}\n{small}".encode())
    )
    assert bomb.stat().st_size < 200_000 < len(rows)

    refused, loaded = load(warehouse, limited, [bomb, fits], how)

    assert (refused.status, refused.error_reason) == ("failed", "too_large")
    assert refused.error is not None
    assert "decompresses to more than max_file_bytes" in refused.error
    assert refused.sha256 == hashlib.sha256(bomb.read_bytes()).hexdigest()
    assert loaded.rows_loaded == 5_000
    assert verify(warehouse) == []
    assert list(limited.staging_dir.glob("*")) == []


@pytest.mark.parametrize("how", HOW)
def test_the_same_rows_plain_gzip_and_zstd_are_duplicates_row_by_row(
    tmp_path: Path, config: Config, warehouse: duckdb.DuckDBPyConnection, how: str
) -> None:
    users = b"user_id,signup_date,country\n1,2023-01-01,France\n2,2023-01-02,Chile\n"
    text = f"{TX_HEADER}\n1,1,2024-01-01,10.00,deposit\n2,2,2024-01-02,2.50,purchase\n".encode()
    folder = tmp_path / "files"
    paths = [
        write(folder, "tx.csv.gz", gzip.compress(text)),
        write(folder, "tx.csv", text),
        write(folder, "tx.csv.zst", compress("zst", text)),
        write(folder, "users.csv.zst", compress("zst", users)),
        write(folder, "users.csv", users),
    ]

    outcomes = load(warehouse, config, paths, how)

    assert [(o.status, o.rows_loaded, o.rows_duplicate) for o in outcomes] == [
        ("loaded", 2, 0),
        ("loaded", 0, 2),
        ("loaded", 0, 2),
        ("loaded", 2, 0),
        ("loaded", 0, 2),
    ]
    assert len({o.sha256 for o in outcomes}) == 5  # each its own bytes, each its own file
    assert warehouse.execute("SELECT count(*) FROM transactions").fetchall() == [(2,)]
    assert verify(warehouse) == []


@pytest.mark.parametrize("codec", CODECS)
def test_a_large_compressed_file_takes_the_fast_paths_with_csv_line_numbers(
    tmp_path: Path, config: Config, warehouse: duckdb.DuckDBPyConnection, codec: str
) -> None:
    def rows(first: int, count: int) -> list[str]:
        return [f"{i},{i % 300 + 1},2024-0{i % 9 + 1}-1{i % 10},{i % 997 + 1}.25,deposit"
                for i in range(first, first + count)]  # fmt: skip

    count = 60_000  # ~2.5 MB of CSV: past the memory threshold, into a private plain copy
    clean = write(
        tmp_path / "files", f"clean.csv.{codec}",
        compress(codec, "\n".join([TX_HEADER, *rows(1, count)]).encode()),
    )  # fmt: skip
    faulty_rows = rows(count + 1, count)
    faulty_rows[45_000] = faulty_rows[45_000].replace("deposit", "bonus")
    faulty = write(
        tmp_path / "files", f"faulty.csv.{codec}",
        compress(codec, "\n".join([TX_HEADER, "", *faulty_rows]).encode()),
    )  # fmt: skip

    loaded, second = load(warehouse, config, [clean, faulty], "file")

    assert (loaded.status, loaded.rows_loaded, loaded.rows_rejected) == ("loaded", count, 0)
    assert (second.rows_loaded, second.rows_rejected) == (count - 1, 1)
    found = [(line, reason) for line, reason, _, _ in rejects(warehouse, second.file_id)]
    assert found == [(45_000 + 3, "unknown_type")]  # header, blank line, then the rows
    assert verify(warehouse) == []
    assert list(config.staging_dir.glob("*")) == []


def test_moneylion_ingest_reads_gzip_and_zstd_files(tmp_path: Path, config: Config) -> None:
    text = f"{TX_HEADER}\n1,1,2024-01-01,10.00,deposit\n2,1,2024-01-02,bad,deposit\n".encode()
    gz = write(tmp_path / "files", "a.csv.gz", gzip.compress(text))
    zst = write(tmp_path / "files", "b.csv.zst", compress("zst", text))
    broken = write(tmp_path / "files", "c.csv.gz", gzip.compress(text)[:-4])

    result = run_cli_on(config, "ingest", str(gz), str(zst), str(broken))

    lines = result.stdout.splitlines()
    assert lines[0].startswith("a.csv.gz: transactions file #1: loaded 1, duplicate 0")
    assert "(bad_amount 1)" in lines[0]
    assert lines[1].startswith("b.csv.zst: transactions file #2: loaded 0, duplicate 1")
    assert lines[2].startswith("c.csv.gz: failed (bad_compression)")
    assert result.returncode == 1
    conn = connect(config.duckdb_path)
    try:
        assert conn.execute("SELECT line_number FROM rejects ORDER BY ALL").fetchall() == [
            (3,),
            (3,),
        ]
        assert verify(conn) == []
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("name", "plain"),
    [("x.csv.gz", "x.csv"), ("X.CSV.ZST", "X.CSV"), ("x.csv", "x.csv"), ("x.gz.csv", "x.gz.csv")],
)
def test_the_csv_name_is_the_name_without_its_compression_suffix(name: str, plain: str) -> None:
    assert csv_name(name) == plain


@pytest.mark.slow
def test_the_daemon_ingests_compressed_files_dropped_in_the_inbox(tmp_path: Path) -> None:
    rng = random.Random(12)
    parts = tmp_path / "parts"
    plain = write_transactions(write(parts, "plain.csv", b""), random_transactions(rng, 1, 3000))
    zst_text = write_transactions(
        write(parts, "zst.csv", b""), random_transactions(rng, 10_001, 3000)
    ).read_bytes()
    expected = Expected()
    expected.add_transactions_file(plain)
    expected.add_transactions(zst_text.decode())
    users = b"user_id,signup_date,country\n1,2023-01-01,France\n2,2023-01-02,Chile\n"
    expected.add_users(users.decode())
    gz_bytes = gzip.compress(plain.read_bytes())
    # Under 1 MiB compressed (a batch's file), over it as CSV: ingested alone, on the fast paths.
    large = write_transactions(
        write(parts, "large.csv", b""), random_transactions(rng, 20_001, 40_000)
    )
    expected.add_transactions_file(large)
    large_gz = gzip.compress(large.read_bytes())
    assert len(large_gz) < 1024 * 1024 < large.stat().st_size
    daemon = DaemonProcess(
        tmp_path / "inbox",
        tmp_path / "warehouse",
        settle_seconds=0.2,
        env={"MONEYLION_LOG_LEVEL": "INFO"},  # file_started: a file ingested alone
    )
    daemon.inbox.mkdir()
    inbox = daemon.inbox
    try:
        daemon.start()
        (inbox / "tx.csv.gz").write_bytes(gz_bytes)  # written in place
        os.rename(write(parts, "tx.csv.zst", compress("zst", zst_text)), inbox / "tx.csv.zst")
        (inbox / "users.csv.gz.part").write_bytes(gzip.compress(users))  # a temp name, then
        os.rename(inbox / "users.csv.gz.part", inbox / "users.csv.gz")  # renamed in place
        (inbox / "broken.csv.gz").write_bytes(gz_bytes[:-10])
        (inbox / "large.csv.gz").write_bytes(large_gz)
        wait_for(
            lambda: daemon.get("/v1/files", limit=1)["total"] >= 5 and not daemon.inbox_waiting(),
            60,
            "the compressed files ingested and moved",
        )
        assert daemon.folder("done") == ["large.csv.gz", "tx.csv.gz", "tx.csv.zst", "users.csv.gz"]
        assert daemon.folder("failed") == ["broken.csv.gz", "broken.csv.gz.reason.json"]
        reason = json.loads(next((inbox / "failed").rglob("*.reason.json")).read_text())
        assert reason["reason"] == "bad_compression"
        rows = {r["name"]: r for r in daemon.get("/v1/files", limit=10)["items"]}
        assert rows["tx.csv.gz"]["sha256"] == hashlib.sha256(gz_bytes).hexdigest()
        assert rows["tx.csv.gz"]["rows_loaded"] == 3000
        assert_api_totals(daemon, expected)
        summary = daemon.get("/v1/users/1/summary")
        assert summary["country"] == "France"
        alone = [e for e in logged_events(daemon.warehouse) if e["event"] == "file_started"]
        assert [e["file"] for e in alone] == ["large.csv.gz"]
        assert daemon.stop() == 0
        result = run_cli("verify", env=daemon.environ())
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        daemon.close()


def test_a_compressed_name_too_long_to_set_aside_keeps_both_suffixes() -> None:
    name = "x" * 300 + ".csv.zst"
    short = safe_name(name)
    assert short.endswith(".csv.zst")
    assert len(short.encode()) <= 255 - len(".reason.json.9999")


def test_metrics_count_failed_files_by_reason_bad_compression_included(
    tmp_path: Path, config: Config, warehouse: duckdb.DuckDBPyConnection
) -> None:
    broken = write(tmp_path / "files", "broken.csv.zst", b"\x28\xb5\x2f\xfd" + b"x" * 20)
    bomb = write(tmp_path / "files", "bomb.csv.gz", gzip.compress(b"1" * 300_000))
    load(warehouse, config, [broken], "file")
    load(warehouse, config.with_overrides(max_file_bytes=100_000), [bomb], "file")
    with TestClient(app=create_app(config, warehouse)) as client:
        samples = parse_metrics(client.get("/metrics").text)
    assert samples['moneylion_failed_files_total{reason="bad_compression"}'] == 1
    assert samples['moneylion_failed_files_total{reason="too_large"}'] == 1
    assert verify(warehouse) == []


@pytest.mark.slow
def test_compressed_files_waiting_before_start_are_ingested_on_start(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    rng = random.Random(5)
    expected = Expected()
    plain = write_transactions(write(tmp_path, "w.csv", b""), random_transactions(rng, 1, 500))
    expected.add_transactions_file(plain)
    write(inbox, "waiting.csv.zst", compress("zst", plain.read_bytes()))
    write(inbox, "waiting.csv.gz", gzip.compress(plain.read_bytes()))  # the same rows again
    write(inbox, "half.csv.gz.part", gzip.compress(plain.read_bytes()))  # a temp name: ignored
    daemon = DaemonProcess(inbox, tmp_path / "warehouse", settle_seconds=0.2)
    try:
        daemon.start()
        wait_for(
            lambda: daemon.get("/v1/files", limit=1)["total"] >= 2 and not daemon.inbox_waiting(),
            60,
            "the waiting files ingested",
        )
        assert daemon.folder("done") == ["waiting.csv.gz", "waiting.csv.zst"]
        rows = daemon.get("/v1/files", limit=10)["items"]
        assert sorted((r["rows_loaded"], r["rows_duplicate"]) for r in rows) == [(0, 500), (500, 0)]
        assert (inbox / "half.csv.gz.part").exists()
        assert_api_totals(daemon, expected)
        assert daemon.stop() == 0
        result = run_cli("verify", env=daemon.environ())
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        daemon.close()
