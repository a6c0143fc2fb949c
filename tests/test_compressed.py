"""Compressed inbox files (``*.csv.gz``, ``*.csv.zst``): read as the CSV they hold on every path
(a file alone: DuckDB's reader or the reference rules; a batch of small files), identified by the
sha256 of their compressed bytes, refused whole as ``bad_compression`` when the archive is broken
and as ``too_large`` when the CSV would pass max_file_bytes or max_decompressed_bytes (never more
than that staged), ``compression_ratio`` past max_compression_ratio; a file that would take the
disk below min_free_disk_bytes is left unread (DiskLow). Rejects carry the CSV's line numbers.
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

from moneylion import source
from moneylion.aggregates import verify
from moneylion.api import create_app
from moneylion.batch import Unread, ingest_batch, item_of
from moneylion.config import Config
from moneylion.errors import DiskLow
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


# --- bounds while inflating (decompression bombs, the disk's floor) -----------------------------


def zstd_bomb(path: Path, csv_bytes: int) -> Path:
    """A valid CSV of one row repeated to ``csv_bytes``, zstd-compressed as it is written (the
    CSV is never held whole): a few kB on disk."""
    row = b"1,1,2024-01-02,1.00,deposit\n"
    block = row * ((1 << 20) // len(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    compressor = zstandard.ZstdCompressor(level=3)
    with path.open("wb") as handle, compressor.stream_writer(handle) as writer:
        writer.write(f"{TX_HEADER}\n".encode())
        for _ in range(csv_bytes // len(block)):
            writer.write(block)
    return path


@pytest.mark.parametrize("how", HOW)
def test_a_bomb_is_too_large_past_max_decompressed_bytes_and_no_more_is_ever_written(
    tmp_path: Path,
    config: Config,
    warehouse: duckdb.DuckDBPyConnection,
    how: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cap = 24 * 1024 * 1024  # a few of the inflater's pieces (each up to ~32 MiB)
    limited = config.with_overrides(max_decompressed_bytes=cap)
    bomb = zstd_bomb(tmp_path / "files" / "bomb.csv.zst", 64 * 1024 * 1024)
    small = "".join(f"{i},1,2024-01-02,1.00,deposit\n" for i in range(1, 1_001))
    fits = write(
        tmp_path / "files", "fits.csv.zst", compress("zst", f"{TX_HEADER}\n{small}".encode())
    )
    written: list[int] = []  # bytes written into each private copy, as they are written
    real_write_all = source.write_all

    def counting(fd: int, chunk: bytes | memoryview) -> None:
        written.append(len(chunk))
        real_write_all(fd, chunk)

    monkeypatch.setattr(source, "write_all", counting)

    refused, loaded = load(warehouse, limited, [bomb, fits], how)

    assert (refused.status, refused.error_reason) == ("failed", "too_large")
    assert refused.error is not None
    assert f"max_decompressed_bytes ({cap} bytes)" in refused.error
    assert refused.sha256 == hashlib.sha256(bomb.read_bytes()).hexdigest()
    assert 0 < sum(written) <= cap  # what was staged of the bomb: never past the cap
    assert loaded.rows_loaded == 1_000
    assert verify(warehouse) == []
    assert list(limited.staging_dir.glob("*")) == []


def test_the_smaller_of_max_file_bytes_and_max_decompressed_bytes_applies(tmp_path: Path) -> None:
    assert source.Bounds(file_bytes=10, decompressed_bytes=20).csv_limit() == (10, "max_file_bytes")
    assert source.Bounds(file_bytes=30, decompressed_bytes=20).csv_limit() == (
        20,
        "max_decompressed_bytes",
    )
    assert source.Bounds(file_bytes=0, decompressed_bytes=20).csv_limit() == (
        20,
        "max_decompressed_bytes",
    )
    assert source.Bounds().csv_limit() == (0, "")


def test_the_default_bounds_are_configs_defaults(config: Config) -> None:
    assert source.Bounds.of(None) == source.Bounds.of(config)
    assert source.Bounds.of(None).decompressed_bytes > 0  # on by default
    assert source.Bounds.of(None).compression_ratio > 0


def test_the_ratio_bound_applies_only_past_its_threshold(tmp_path: Path) -> None:
    """Below RATIO_FROM_BYTES any ratio passes; past it, more than max_compression_ratio bytes
    out per byte in is refused before the piece is kept. (The same 64 MiB piece is kept by
    reference: the sink holds it in memory, nothing is copied.)"""
    ratio = 1000
    piece = bytes(64 * 1024 * 1024)
    threshold = source.RATIO_FROM_BYTES
    bounds = source.Bounds(compression_ratio=ratio)
    sink = source._CsvSink("x.csv.gz", tmp_path, threshold * 2, bounds)
    while sink.size + len(piece) <= threshold:
        sink.write(piece, 1)  # a ratio of millions, but under the threshold: kept
    # Past the threshold: at exactly `ratio` bytes out per byte in it is kept, past it refused.
    sink.write(piece, -(-(sink.size + len(piece)) // ratio))
    with pytest.raises(source._Refusal) as refusal:
        sink.write(piece, (sink.size + len(piece)) // ratio - 1)
    assert refusal.value.refused.reason == "compression_ratio"
    assert "max_compression_ratio (1000)" in refusal.value.refused.message
    assert sink.size == threshold + len(piece)  # the refused piece was not kept
    sink.discard()


@pytest.mark.parametrize("codec", CODECS)
def test_the_inflaters_count_the_compressed_bytes_they_took_in(codec: str) -> None:
    """Several members (frames), fed in odd pieces: ``consumed`` ends at the file's size."""
    rows = "".join(f"{i},1,2024-01-02,1.00,deposit\n" for i in range(1, 5_000)).encode()
    data = compress(codec, rows) + compress(codec, rows[:1000])
    inflater = source.inflater_for(f"x.csv.{codec}")
    assert inflater is not None
    out = 0
    for start in range(0, len(data), 777):
        for piece in inflater.feed(data[start : start + 777]):
            out += len(piece)
            assert 0 < inflater.consumed <= min(start + 777, len(data))
    inflater.finish()
    assert (out, inflater.consumed) == (len(rows) + 1000, len(data))


def test_a_plain_file_waits_for_room_and_nothing_of_it_is_staged(
    tmp_path: Path, config: Config
) -> None:
    rows = "".join(f"{i},1,2024-01-02,1.00,deposit\n" for i in range(1, 100_000))
    plain = write(tmp_path / "files", "big.csv", f"{TX_HEADER}\n{rows}".encode())
    free = source.free_disk_bytes(config.staging_dir)
    floor = free - plain.stat().st_size // 2  # room for half of it
    with pytest.raises(DiskLow) as low:
        item_of(plain, config.with_overrides(min_free_disk_bytes=floor))
    assert low.value.needed_bytes == plain.stat().st_size
    assert "min_free_disk_bytes" in str(low.value)
    assert list(config.staging_dir.glob("*")) == []
    staged = item_of(plain, config.with_overrides(min_free_disk_bytes=1024 * 1024))
    assert isinstance(staged, source.StagedFile)
    staged.discard()


def test_a_compressed_file_stops_inflating_at_the_disks_floor_and_its_copy_is_removed(
    tmp_path: Path, config: Config
) -> None:
    bomb = zstd_bomb(tmp_path / "files" / "bomb.csv.zst", 64 * 1024 * 1024)
    free = source.free_disk_bytes(config.staging_dir)
    # Room for less than one look's window: it gives up as soon as it writes to disk.
    floor = free - source.DISK_CHECK_BYTES // 2
    with pytest.raises(DiskLow):
        source.stage(
            bomb,
            config.staging_dir,
            bounds=source.Bounds(min_free_disk=floor),
            memory_bytes=1024 * 1024,
        )
    assert list(config.staging_dir.glob("*")) == []
    # With room, the same file inflates whole (past several looks at the disk).
    staged = source.stage(
        bomb,
        config.staging_dir,
        bounds=source.Bounds(min_free_disk=1024 * 1024),
        memory_bytes=1024 * 1024,
    )
    assert staged.refused is None
    assert staged.csv_size > 4 * source.DISK_CHECK_BYTES
    staged.discard()


def test_moneylion_ingest_leaves_a_file_unread_while_the_disk_is_low(
    tmp_path: Path, config: Config
) -> None:
    path = write(
        tmp_path / "files", "x.csv.gz", gzip.compress(f"{TX_HEADER}\n{ROWS[1][0]}\n".encode())
    )
    floor = source.free_disk_bytes(config.warehouse) + 1024**4  # more than the disk has free
    env = {
        **os.environ,
        "MONEYLION_WAREHOUSE": str(config.warehouse),
        "MONEYLION_INBOX": str(config.inbox),
        "MONEYLION_MIN_FREE_DISK_BYTES": str(floor),
    }
    low = run_cli("ingest", "--quiet", str(path), env=env)
    assert low.returncode == 1
    assert "min_free_disk_bytes" in low.stderr
    assert "Traceback" not in low.stderr
    roomy = run_cli(
        "ingest", "--quiet", str(path), env={**env, "MONEYLION_MIN_FREE_DISK_BYTES": "0"}
    )
    assert roomy.returncode == 0, roomy.stderr
    # Nothing was recorded the first time: this is the ledger's first file.
    assert "x.csv.gz: transactions file #1: loaded 1," in roomy.stdout
    result = run_cli("verify", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
